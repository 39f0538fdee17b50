//! The transformer-block node against its composition.

use super::*;
use crate::nn::attention::{attention_composed, merge_heads, split_heads};
use crate::nn::test_util::rel_max_err as rel;
use candle_core::Var;

pub(super) fn randn(shape: &[usize], seed: u64, std: f64) -> Tensor {
    crate::nn::test_util::randn("block-test", shape, seed, std)
}

/// The dense base of a test projection.
pub(super) fn dense(l: &LinearPart) -> &Tensor {
    match &l.base {
        ProjBase::Dense(w) => w,
        ProjBase::Nf4(_) => panic!("a dense base"),
    }
}

pub(super) fn lin_ref(l: &LinearPart, x: &Tensor) -> Tensor {
    let mut y = x.broadcast_matmul(&dense(l).t().unwrap()).unwrap();
    if let Some(b) = &l.bias {
        y = y.broadcast_add(b).unwrap();
    }
    if let Some(f) = &l.lora {
        let h = x.broadcast_matmul(&f.a.t().unwrap()).unwrap();
        let u = h.broadcast_matmul(&f.b.t().unwrap()).unwrap();
        y = (y + (u * f.scale).unwrap()).unwrap();
    }
    y
}

fn attn_ref(a: &AttnPart, n: &Tensor, kv: &Tensor, heads: usize) -> Tensor {
    let sp = |t: Tensor| split_heads(&t, heads).unwrap();
    let (q, k, v) = (
        sp(lin_ref(&a.q, n)),
        sp(lin_ref(&a.k, kv)),
        sp(lin_ref(&a.v, kv)),
    );
    let o = merge_heads(&attention_composed(&q, &k, &v, None).unwrap()).unwrap();
    lin_ref(&a.out, &o)
}

fn block_ref(x: &Tensor, c: &Tensor, p: &BlockParts) -> Tensor {
    let ln = |v: &Tensor, n: &LnPart| {
        crate::nn::norm::layer_norm_composite(v, &n.weight, &n.bias, n.eps).unwrap()
    };
    let n1 = ln(x, &p.norm1);
    let h1 = (x + attn_ref(&p.attn1, &n1, &n1, p.heads)).unwrap();
    let h2 = (&h1 + attn_ref(&p.attn2, &ln(&h1, &p.norm2), c, p.heads)).unwrap();
    let pr = lin_ref(&p.ff_proj, &ln(&h2, &p.norm3));
    let half = pr.dim(2).unwrap() / 2;
    let g = (pr.narrow(2, 0, half).unwrap()
        * pr.narrow(2, half, half).unwrap().gelu_erf().unwrap())
    .unwrap();
    (h2 + lin_ref(&p.ff_out, &g)).unwrap()
}

struct Case {
    b: usize,
    n: usize,
    t: usize,
    c: usize,
    cc: usize,
    heads: usize,
    /// LoRA rank per projection, in the node's order (0: none).
    ranks: [usize; 10],
    x_grad: bool,
    ctx_grad: bool,
}

/// The parts with every LoRA factor a Var (returned in the packing order).
fn parts(cs: &Case, seed: u64) -> (BlockParts, Vec<Var>) {
    let (c, cc, ff) = (cs.c, cs.cc, 2 * cs.c);
    let dims = [
        (c, c),
        (c, c),
        (c, c),
        (c, c),
        (c, c),
        (c, cc),
        (c, cc),
        (c, c),
        (2 * ff, c),
        (c, ff),
    ];
    let biased = [
        false, false, false, true, false, false, false, true, true, true,
    ];
    let mut vars = vec![];
    let mut lins = vec![];
    for (i, ((o, inn), r)) in dims.iter().zip(cs.ranks).enumerate() {
        let s = seed + 10 * i as u64;
        let lora = (r > 0).then(|| {
            let a = Var::from_tensor(&randn(&[r, *inn], s + 1, 0.3)).unwrap();
            let b = Var::from_tensor(&randn(&[*o, r], s + 2, 0.3)).unwrap();
            let f = LoraFactors {
                a: a.as_tensor().clone(),
                b: b.as_tensor().clone(),
                scale: 0.5 + 0.1 * i as f64,
            };
            vars.push(a);
            vars.push(b);
            f
        });
        lins.push(LinearPart {
            base: ProjBase::Dense(randn(&[*o, *inn], s, 1.0 / (*inn as f64).sqrt())),
            bias: biased[i].then(|| randn(&[*o], s + 3, 0.1)),
            lora,
        });
    }
    let ln = |s: u64| LnPart {
        weight: (randn(&[c], s, 0.1) + 1.0).unwrap(),
        bias: randn(&[c], s + 1, 0.1),
        eps: 1e-5,
    };
    let mut it = lins.into_iter();
    let mut next = || it.next().unwrap();
    let mut attn = || AttnPart {
        q: next(),
        k: next(),
        v: next(),
        out: next(),
    };
    let (attn1, attn2) = (attn(), attn());
    let p = BlockParts {
        norm1: ln(seed + 500),
        attn1,
        norm2: ln(seed + 510),
        attn2,
        norm3: ln(seed + 520),
        ff_proj: next(),
        ff_out: next(),
        heads: cs.heads,
    };
    (p, vars)
}

fn check(cs: &Case, seed: u64) {
    let (p, vars) = parts(cs, seed);
    let xv = Var::from_tensor(&randn(&[cs.b, cs.n, cs.c], seed + 900, 1.0)).unwrap();
    let cv = Var::from_tensor(&randn(&[cs.b, cs.t, cs.cc], seed + 901, 1.0)).unwrap();
    let x = if cs.x_grad {
        xv.as_tensor().clone()
    } else {
        xv.as_tensor().detach()
    };
    let ctx = if cs.ctx_grad {
        cv.as_tensor().clone()
    } else {
        cv.as_tensor().detach()
    };
    let w = randn(&[cs.b, cs.n, cs.c], seed + 902, 1.0);
    let node = transformer_block(&x, &ctx, &p)
        .unwrap()
        .expect("the node is taken");
    let want = block_ref(&x, &ctx, &p);
    let e = rel(&node, &want);
    assert!(e < 1e-5, "value: relative error {e:e}");
    let gn = (&node * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let gr = (&want * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let mut asked: Vec<(&str, &Var)> = vars.iter().map(|v| ("factor", v)).collect();
    if cs.x_grad {
        asked.push(("x", &xv));
    }
    if cs.ctx_grad {
        asked.push(("context", &cv));
    }
    assert!(!asked.is_empty());
    for (i, (what, v)) in asked.iter().enumerate() {
        let (a, b) = (gn.get(v.as_tensor()), gr.get(v.as_tensor()));
        let (a, b) = (
            a.unwrap_or_else(|| panic!("{what} {i}: no node gradient")),
            b.unwrap_or_else(|| panic!("{what} {i}: no reference gradient")),
        );
        let e = rel(a, b);
        assert!(e < 1e-4, "{what} {i}: gradient relative error {e:e}");
        let s: f32 = a.abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(s.is_finite() && s > 0.0, "{what} {i}: gradient {s}");
    }
    if !cs.x_grad {
        assert!(gn.get(xv.as_tensor()).is_none(), "x was not asked for");
    }
    if !cs.ctx_grad {
        assert!(
            gn.get(cv.as_tensor()).is_none(),
            "context was not asked for"
        );
    }
    for l in p.linears() {
        assert!(gn.get(dense(l)).is_none(), "a frozen weight got a gradient");
    }
    // Inference records no graph and gives the same values.
    let mut frozen = p.clone();
    for l in [
        &mut frozen.attn1.q,
        &mut frozen.attn1.k,
        &mut frozen.attn1.v,
        &mut frozen.attn1.out,
        &mut frozen.attn2.q,
        &mut frozen.attn2.k,
        &mut frozen.attn2.v,
        &mut frozen.attn2.out,
        &mut frozen.ff_proj,
        &mut frozen.ff_out,
    ] {
        if let Some(f) = &mut l.lora {
            f.a = f.a.detach();
            f.b = f.b.detach();
        }
    }
    let plain = transformer_block(&x.detach(), &ctx.detach(), &frozen)
        .unwrap()
        .unwrap();
    assert!(!plain.track_op());
    assert!(rel(&plain, &node) == 0.0);
}

#[test]
fn the_block_node_equals_the_composition_in_value_and_every_gradient() {
    let all = [3; 10];
    let cases = [
        // Every projection adapted, x and the context trained.
        Case {
            b: 2,
            n: 9,
            t: 5,
            c: 16,
            cc: 12,
            heads: 2,
            ranks: all,
            x_grad: true,
            ctx_grad: true,
        },
        // Only some projections adapted (cross-attention keys/values and the feed-forward out),
        // factors only, as U-Net LoRA training asks for them.
        Case {
            b: 1,
            n: 33,
            t: 7,
            c: 8,
            cc: 8,
            heads: 1,
            ranks: [0, 0, 0, 0, 0, 2, 4, 0, 0, 1],
            x_grad: false,
            ctx_grad: false,
        },
        // The attention (q, k, v, out) of both, x and factors.
        Case {
            b: 3,
            n: 4,
            t: 6,
            c: 12,
            cc: 20,
            heads: 3,
            ranks: [2, 2, 2, 2, 1, 1, 1, 1, 0, 0],
            x_grad: true,
            ctx_grad: false,
        },
        // No adapter: the gradients of x and the context (text-encoder training through a frozen U-Net).
        Case {
            b: 2,
            n: 6,
            t: 3,
            c: 8,
            cc: 4,
            heads: 2,
            ranks: [0; 10],
            x_grad: true,
            ctx_grad: true,
        },
    ];
    for (i, cs) in cases.iter().enumerate() {
        check(cs, 100 * i as u64);
    }
}

#[test]
fn misfit_parts_name_the_shapes_and_other_devices_or_trained_weights_fall_back() {
    let cs = Case {
        b: 1,
        n: 4,
        t: 3,
        c: 8,
        cc: 6,
        heads: 2,
        ranks: [2; 10],
        x_grad: false,
        ctx_grad: false,
    };
    let (p, _) = parts(&cs, 7);
    let x = randn(&[1, 4, 8], 1, 1.0);
    let ctx = randn(&[1, 3, 6], 2, 1.0);
    // A context of the wrong width.
    let bad = randn(&[1, 3, 5], 3, 1.0);
    let e = transformer_block(&x, &bad, &p)
        .expect_err("an error")
        .to_string();
    assert!(e.contains("attn2.to_k") && e.contains("[1, 3, 5]"), "{e}");
    // A context for another batch.
    let bad = randn(&[2, 3, 6], 3, 1.0);
    let e = transformer_block(&x, &bad, &p)
        .expect_err("an error")
        .to_string();
    assert!(e.contains("batch"), "{e}");
    // Heads that do not divide the width.
    let mut q = p.clone();
    q.heads = 3;
    let e = transformer_block(&x, &ctx, &q)
        .expect_err("an error")
        .to_string();
    assert!(e.contains("heads"), "{e}");
    // A LoRA whose B does not fit.
    let mut q = p.clone();
    if let Some(f) = &mut q.ff_out.lora {
        f.b = randn(&[7, 2], 4, 1.0);
    }
    let e = transformer_block(&x, &ctx, &q)
        .expect_err("an error")
        .to_string();
    assert!(e.contains("ff.net.2") && e.contains("[7, 2]"), "{e}");
    // bf16 input, a trained weight: the caller composes.
    let xb = x.to_dtype(DType::BF16).unwrap();
    assert!(transformer_block(&xb, &ctx, &p).unwrap().is_none());
    let mut q = p.clone();
    q.attn1.train_out_weight();
    assert!(transformer_block(&x, &ctx, &q).unwrap().is_none());
}

impl AttnPart {
    fn train_out_weight(&mut self) {
        let w = Var::from_tensor(dense(&self.out)).unwrap();
        self.out.base = ProjBase::Dense(w.as_tensor().clone());
    }
}
