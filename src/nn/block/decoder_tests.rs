//! The decoder-attention node against its composition.

use super::tests::{dense, lin_ref, randn};
use super::*;
use crate::nn::attention::{attention_composed, causal_mask, merge_heads, split_heads};
use crate::nn::nf4::Nf4Tensor;
use crate::nn::test_util::rel_max_err as rel;
use candle_core::Var;
use std::sync::Arc;

struct Case {
    b: usize,
    t: usize,
    dm: usize,
    heads: usize,
    kv_heads: usize,
    /// Head width / 2.
    freqs: usize,
    /// LoRA rank of q, k, v, o (0: none).
    ranks: [usize; 4],
    qkv_bias: bool,
    /// A mask per batch row (a padded row) rather than one shared causal mask.
    padded: bool,
    nf4: bool,
    h_grad: bool,
}

/// The reference with every NF4 base replaced by its dequantized weight.
fn reference(h: &Tensor, p: &DecoderAttnParts, pos: &Tensor, f: &[f32], mask: &Tensor) -> Tensor {
    let deq = |l: &LinearPart| -> LinearPart {
        let mut l = l.clone();
        if let ProjBase::Nf4(q) = &l.base {
            l.base = ProjBase::Dense(q.dequantize().unwrap());
        }
        l
    };
    let a = &p.attn;
    let n = crate::nn::norm::rms_norm_composite(h, &p.norm_weight, p.eps).unwrap();
    let heads = |t: Tensor, k: usize| split_heads(&t, k).unwrap();
    let rope = |t: Tensor| crate::nn::rope::rope(&t, pos, f).unwrap();
    let q = rope(heads(lin_ref(&deq(&a.q), &n), p.heads));
    let k = rope(heads(lin_ref(&deq(&a.k), &n), p.kv_heads));
    let v = heads(lin_ref(&deq(&a.v), &n), p.kv_heads);
    let o = merge_heads(&attention_composed(&q, &k, &v, Some(mask)).unwrap()).unwrap();
    (h + lin_ref(&deq(&a.out), &o)).unwrap()
}

fn check(cs: &Case, seed: u64) {
    let hd = 2 * cs.freqs;
    let (qw, kw) = (cs.heads * hd, cs.kv_heads * hd);
    let dims = [(qw, cs.dm), (kw, cs.dm), (kw, cs.dm), (cs.dm, qw)];
    let mut vars = vec![];
    let mut lins = vec![];
    for (i, ((o, inn), r)) in dims.iter().zip(cs.ranks).enumerate() {
        let s = seed + 10 * i as u64;
        let w = randn(&[*o, *inn], s, 1.0 / (*inn as f64).sqrt());
        let base = if cs.nf4 {
            ProjBase::Nf4(Arc::new(Nf4Tensor::quantize(&w, 16, false).unwrap()))
        } else {
            ProjBase::Dense(w)
        };
        let lora = (r > 0).then(|| {
            let a = Var::from_tensor(&randn(&[r, *inn], s + 1, 0.3)).unwrap();
            let b = Var::from_tensor(&randn(&[*o, r], s + 2, 0.3)).unwrap();
            let f = LoraFactors {
                a: a.as_tensor().clone(),
                b: b.as_tensor().clone(),
                scale: 0.7 + 0.1 * i as f64,
            };
            vars.push(a);
            vars.push(b);
            f
        });
        lins.push(LinearPart {
            base,
            bias: (cs.qkv_bias && i < 3).then(|| randn(&[*o], s + 3, 0.1)),
            lora,
        });
    }
    let mut it = lins.into_iter();
    let mut next = || it.next().unwrap();
    let p = DecoderAttnParts {
        norm_weight: (randn(&[cs.dm], seed + 400, 0.1) + 1.0).unwrap(),
        eps: 1e-6,
        attn: AttnPart {
            q: next(),
            k: next(),
            v: next(),
            out: next(),
        },
        heads: cs.heads,
        kv_heads: cs.kv_heads,
    };
    let freqs: Vec<f32> = (0..cs.freqs)
        .map(|i| 10000f32.powf(-((2 * i) as f32) / hd as f32))
        .collect();
    // Positions that are not 0..T (a packed or left-padded row) and a mask to match.
    let pos: Vec<u32> = (0..cs.b * cs.t)
        .map(|i| (i % cs.t + 3 * (i / cs.t)) as u32)
        .collect();
    let pos = Tensor::from_vec(pos, (cs.b, cs.t), &Device::Cpu).unwrap();
    let causal = causal_mask(cs.t, 0, &Device::Cpu).unwrap();
    let mask = if cs.padded {
        // Row 1 has its first two tokens padded: masked as keys by a large finite negative.
        let mut pad = vec![0f32; cs.b * cs.t];
        for j in 0..2.min(cs.t) {
            pad[cs.t + j] = -1e9;
        }
        let pad = Tensor::from_vec(pad, (cs.b, 1, 1, cs.t), &Device::Cpu).unwrap();
        causal.broadcast_add(&pad).unwrap()
    } else {
        causal
    };
    let hv = Var::from_tensor(&randn(&[cs.b, cs.t, cs.dm], seed + 900, 1.0)).unwrap();
    let h = if cs.h_grad {
        hv.as_tensor().clone()
    } else {
        hv.as_tensor().detach()
    };
    let node = decoder_attention(&h, &p, &pos, &freqs, Some(&mask))
        .unwrap()
        .expect("the node is taken");
    let want = reference(&h, &p, &pos, &freqs, &mask);
    let e = rel(&node, &want);
    assert!(e < 1e-5, "value: relative error {e:e}");
    let w = randn(&[cs.b, cs.t, cs.dm], seed + 901, 1.0);
    let gn = (&node * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let gr = (&want * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let mut asked: Vec<(&str, &Var)> = vars.iter().map(|v| ("factor", v)).collect();
    if cs.h_grad {
        asked.push(("h", &hv));
    }
    for (i, (what, v)) in asked.iter().enumerate() {
        let a = gn
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{what} {i}: no node gradient"));
        let b = gr
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{what} {i}: no reference gradient"));
        let e = rel(a, b);
        assert!(e < 1e-4, "{what} {i}: gradient relative error {e:e}");
        let s: f32 = a.abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(s.is_finite() && s > 0.0, "{what} {i}: gradient {s}");
    }
    if !cs.h_grad {
        assert!(gn.get(hv.as_tensor()).is_none());
    }
    for l in [&p.attn.q, &p.attn.k, &p.attn.v, &p.attn.out] {
        if let ProjBase::Dense(_) = l.base {
            assert!(gn.get(dense(l)).is_none(), "a frozen weight got a gradient");
        }
    }
    assert!(gn.get(&p.norm_weight).is_none());
}

#[test]
fn the_decoder_attention_node_equals_the_composition_in_value_and_every_gradient() {
    let cases = [
        // Grouped-query heads, Qwen2's q/k/v biases, every projection adapted, a padded batch.
        Case {
            b: 2,
            t: 7,
            dm: 16,
            heads: 4,
            kv_heads: 2,
            freqs: 2,
            ranks: [2, 3, 2, 4],
            qkv_bias: true,
            padded: true,
            nf4: false,
            h_grad: true,
        },
        // PEFT's default targets (q and v), factors only, one shared causal mask.
        Case {
            b: 1,
            t: 40,
            dm: 12,
            heads: 2,
            kv_heads: 2,
            freqs: 3,
            ranks: [4, 0, 4, 0],
            qkv_bias: false,
            padded: false,
            nf4: false,
            h_grad: false,
        },
        // QLoRA: NF4 bases, multi-query attention.
        Case {
            b: 2,
            t: 5,
            dm: 16,
            heads: 4,
            kv_heads: 1,
            freqs: 2,
            ranks: [2, 2, 2, 2],
            qkv_bias: false,
            padded: true,
            nf4: true,
            h_grad: true,
        },
    ];
    for (i, cs) in cases.iter().enumerate() {
        check(cs, 1000 + 100 * i as u64);
    }
}

#[test]
fn misfit_decoder_parts_name_the_shapes() {
    let l = |o: usize, i: usize, s: u64| LinearPart {
        base: ProjBase::Dense(randn(&[o, i], s, 0.3)),
        bias: None,
        lora: None,
    };
    let p = DecoderAttnParts {
        norm_weight: Tensor::ones(8, DType::F32, &Device::Cpu).unwrap(),
        eps: 1e-6,
        attn: AttnPart {
            q: l(8, 8, 1),
            k: l(4, 8, 2),
            v: l(4, 8, 3),
            out: l(8, 8, 4),
        },
        heads: 2,
        kv_heads: 1,
    };
    let h = randn(&[1, 3, 8], 5, 1.0);
    let pos = Tensor::from_vec(vec![0u32, 1, 2], (1, 3), &Device::Cpu).unwrap();
    let f = [1.0f32, 0.1];
    assert!(decoder_attention(&h, &p, &pos, &f, None).unwrap().is_some());
    let mut q = p.clone();
    q.attn.k = l(8, 8, 6);
    let e = decoder_attention(&h, &q, &pos, &f, None)
        .expect_err("an error")
        .to_string();
    assert!(e.contains("k_proj") && e.contains("[8, 8]"), "{e}");
    let bad_pos = Tensor::from_vec(vec![0u32, 1], (1, 2), &Device::Cpu).unwrap();
    let e = decoder_attention(&h, &p, &bad_pos, &f, None)
        .expect_err("an error")
        .to_string();
    assert!(e.contains("positions [1, 2]"), "{e}");
    let m = Tensor::zeros((1, 1, 3, 4), DType::F32, &Device::Cpu).unwrap();
    let e = decoder_attention(&h, &p, &pos, &f, Some(&m))
        .expect_err("an error")
        .to_string();
    assert!(e.contains("mask [1, 1, 3, 4]"), "{e}");
    let hb = h.to_dtype(DType::BF16).unwrap();
    assert!(decoder_attention(&hb, &p, &pos, &f, None)
        .unwrap()
        .is_none());
}
