//! The decoder-layer nodes (attention half, MLP half) against their composition.

use super::tests::{compare, input, lin_part, lin_ref, randn};
use super::*;
use crate::nn::attention::{attention_composed, causal_mask, merge_heads, split_heads};
use crate::nn::norm::rms_norm_composite;
use candle_core::Var;

fn norm(d: usize, seed: u64) -> Tensor {
    (randn(&[d], seed, 0.1) + 1.0).unwrap()
}

fn attn_ref(
    h: &Tensor,
    p: &DecoderAttnParts,
    pos: &Tensor,
    f: &[f32],
    mask: Option<&Tensor>,
) -> Tensor {
    let a = &p.attn;
    let n = rms_norm_composite(h, &p.norm_weight, p.eps).unwrap();
    let heads = |t: Tensor, k: usize| split_heads(&t, k).unwrap();
    let rope = |t: Tensor| crate::nn::rope::rope(&t, pos, f).unwrap();
    let q = rope(heads(lin_ref(&a.q, &n), p.heads));
    let k = rope(heads(lin_ref(&a.k, &n), p.kv_heads));
    let v = heads(lin_ref(&a.v, &n), p.kv_heads);
    let o = merge_heads(&attention_composed(&q, &k, &v, mask).unwrap()).unwrap();
    (h + lin_ref(&a.out, &o)).unwrap()
}

/// (batch, tokens, width, heads, key/value heads, head width / 2).
type Shape6 = (usize, usize, usize, usize, usize, usize);

/// `ranks` of q, k, v, o; q/k/v biases (Qwen2); the mask: 0 none, 1 one shared causal mask, 2 causal
/// with a padded batch row.
fn check_attn(
    s: Shape6,
    ranks: [usize; 4],
    bias: bool,
    mask: u8,
    nf4: bool,
    h_grad: bool,
    seed: u64,
) {
    let (b, t, dm, heads, kv_heads, freqs) = s;
    let hd = 2 * freqs;
    let (qw, kw) = (heads * hd, kv_heads * hd);
    let dims = [(qw, dm), (kw, dm), (kw, dm), (dm, qw)];
    let mut vars = vec![];
    let mut l = (0..4).map(|i| {
        lin_part(
            dims[i].0,
            dims[i].1,
            ranks[i],
            seed + 10 * i as u64,
            nf4,
            bias && i < 3,
            &mut vars,
        )
    });
    let attn = AttnPart {
        q: l.next().unwrap(),
        k: l.next().unwrap(),
        v: l.next().unwrap(),
        out: l.next().unwrap(),
    };
    let p = DecoderAttnParts {
        norm_weight: norm(dm, seed + 400),
        eps: 1e-6,
        attn,
        heads,
        kv_heads,
    };
    let f: Vec<f32> = (0..freqs)
        .map(|i| 10000f32.powf(-((2 * i) as f32) / hd as f32))
        .collect();
    // Positions that are not 0..T (a packed or left-padded row).
    let pos: Vec<u32> = (0..b * t).map(|i| (i % t + 3 * (i / t)) as u32).collect();
    let pos = Tensor::from_vec(pos, (b, t), &Device::Cpu).unwrap();
    let causal = causal_mask(t, 0, &Device::Cpu).unwrap();
    let mask = match mask {
        0 => None,
        1 => Some(causal),
        _ => {
            // Row 1's first two tokens are padding: masked as keys by a large finite negative.
            let pad: Vec<f32> = (0..b * t)
                .map(|i| if i >= t && i < t + 2 { -1e9 } else { 0.0 })
                .collect();
            let pad = Tensor::from_vec(pad, (b, 1, 1, t), &Device::Cpu).unwrap();
            Some(causal.broadcast_add(&pad).unwrap())
        }
    };
    let (hv, h) = input(&[b, t, dm], seed + 900, h_grad);
    let node = decoder_attention(&h, &p, &pos, &f, mask.as_ref())
        .unwrap()
        .expect("the node is taken");
    let want = attn_ref(&h, &p, &pos, &f, mask.as_ref());
    let mut asked: Vec<(&str, &Var)> = vars.iter().map(|v| ("factor", v)).collect();
    let not: Vec<&Tensor> = if h_grad {
        asked.push(("h", &hv));
        vec![]
    } else {
        vec![&h]
    };
    let a = &p.attn;
    compare(
        &node,
        &want,
        &asked,
        &not,
        &[&a.q, &a.k, &a.v, &a.out],
        seed + 901,
    );
}

#[test]
fn the_decoder_attention_node_equals_the_composition_in_value_and_every_gradient() {
    let cases = [
        // Grouped-query heads, Qwen2's q/k/v biases, every projection adapted, a padded batch.
        ((2, 7, 16, 4, 2, 2), [2, 3, 2, 4], true, 2, false, true),
        // PEFT's default targets (q and v), factors only, one shared causal mask.
        ((1, 40, 12, 2, 2, 3), [4, 0, 4, 0], false, 1, false, false),
        // QLoRA on Qwen2: NF4 bases with biases, multi-query attention.
        ((2, 5, 16, 4, 1, 2), [2, 2, 2, 2], true, 2, true, true),
        // No mask.
        ((2, 6, 8, 2, 2, 2), [1, 1, 0, 0], false, 0, false, true),
    ];
    for (i, (s, ranks, bias, mask, nf4, h_grad)) in cases.into_iter().enumerate() {
        check_attn(s, ranks, bias, mask, nf4, h_grad, 1000 + 100 * i as u64);
    }
}

#[test]
fn the_decoder_mlp_node_equals_the_composition_in_value_and_every_gradient() {
    let (b, t, d, i) = (2, 5, 12, 20);
    // (ranks of gate, up, down; NF4 bases; `mlp_bias`; h's gradient asked)
    for (k, (ranks, nf4, bias, h_grad)) in [
        ([4, 3, 2], false, true, true),
        ([2, 0, 3], true, false, true),
        ([0, 4, 0], false, false, false),
    ]
    .into_iter()
    .enumerate()
    {
        let seed = 2000 + 100 * k as u64;
        let mut vars = vec![];
        let dims = [(i, d), (i, d), (d, i)];
        let mut l = (0..3).map(|j| {
            lin_part(
                dims[j].0,
                dims[j].1,
                ranks[j],
                seed + 10 * j as u64,
                nf4,
                bias,
                &mut vars,
            )
        });
        let (gate, up, down) = (l.next().unwrap(), l.next().unwrap(), l.next().unwrap());
        let p = DecoderMlpParts {
            norm_weight: norm(d, seed + 50),
            eps: 1e-6,
            gate,
            up,
            down,
        };
        let (hv, h) = input(&[b, t, d], seed + 60, h_grad);
        let node = decoder_mlp(&h, &p).unwrap().expect("the node is taken");
        let n = rms_norm_composite(&h, &p.norm_weight, p.eps).unwrap();
        let m = (lin_ref(&p.gate, &n).silu().unwrap() * lin_ref(&p.up, &n)).unwrap();
        let want = (&h + lin_ref(&p.down, &m)).unwrap();
        let mut asked: Vec<(&str, &Var)> = vars.iter().map(|v| ("factor", v)).collect();
        let not: Vec<&Tensor> = if h_grad {
            asked.push(("h", &hv));
            vec![]
        } else {
            vec![&h]
        };
        compare(
            &node,
            &want,
            &asked,
            &not,
            &[&p.gate, &p.up, &p.down],
            seed + 70,
        );
        // A down projection of the wrong width is named.
        let bad = DecoderMlpParts {
            down: lin_part(d, i + 1, 0, 1, false, false, &mut vec![]),
            ..p.clone()
        };
        let e = decoder_mlp(&h, &bad).expect_err("an error").to_string();
        assert!(e.contains("down_proj") && e.contains("[12, 21]"), "{e}");
    }
}

/// One token (generation's shape): the bias rows get a buffer of their own, so the model's biases
/// stay as they are and a second call gives the same output.
#[test]
fn a_one_token_call_leaves_the_biases_unchanged() {
    let (d, i) = (8, 12);
    let mut v = vec![];
    let mut l = |o, inn, s| lin_part(o, inn, 2, s, false, true, &mut v);
    let (gate, up, down) = (l(i, d, 1), l(i, d, 2), l(d, i, 3));
    let p = DecoderMlpParts {
        norm_weight: norm(d, 4),
        eps: 1e-6,
        gate,
        up,
        down,
    };
    let bias = |p: &DecoderMlpParts| p.gate.bias.as_ref().unwrap().to_vec1::<f32>().unwrap();
    let (before, h) = (bias(&p), randn(&[1, 1, d], 5, 1.0));
    let y1 = decoder_mlp(&h, &p).unwrap().unwrap();
    let y2 = decoder_mlp(&h, &p).unwrap().unwrap();
    assert_eq!(bias(&p), before);
    assert_eq!(
        y1.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
        y2.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    );
}

#[test]
fn misfit_decoder_parts_name_the_shapes() {
    let mut v = vec![];
    let mut l = |o: usize, s: u64| lin_part(o, 8, 0, s, false, false, &mut v);
    let attn = AttnPart {
        q: l(8, 1),
        k: l(4, 2),
        v: l(4, 3),
        out: l(8, 4),
    };
    let p = DecoderAttnParts {
        norm_weight: norm(8, 5),
        eps: 1e-6,
        attn,
        heads: 2,
        kv_heads: 1,
    };
    let h = randn(&[1, 3, 8], 5, 1.0);
    let pos = Tensor::from_vec(vec![0u32, 1, 2], (1, 3), &Device::Cpu).unwrap();
    let f = [1.0f32, 0.1];
    assert!(decoder_attention(&h, &p, &pos, &f, None).unwrap().is_some());
    let err = |p: &DecoderAttnParts, pos: &Tensor, m: Option<&Tensor>| {
        decoder_attention(&h, p, pos, &f, m)
            .expect_err("an error")
            .to_string()
    };
    let mut q = p.clone();
    q.attn.k = lin_part(8, 8, 0, 6, false, false, &mut vec![]);
    let e = err(&q, &pos, None);
    assert!(e.contains("k_proj") && e.contains("[8, 8]"), "{e}");
    let e = err(
        &p,
        &Tensor::from_vec(vec![0u32, 1], (1, 2), &Device::Cpu).unwrap(),
        None,
    );
    assert!(e.contains("positions [1, 2]"), "{e}");
    let m = Tensor::zeros((1, 1, 3, 4), DType::F32, &Device::Cpu).unwrap();
    let e = err(&p, &pos, Some(&m));
    assert!(e.contains("mask [1, 1, 3, 4]"), "{e}");
    let hb = h.to_dtype(DType::BF16).unwrap();
    assert!(decoder_attention(&hb, &p, &pos, &f, None)
        .unwrap()
        .is_none());
}
