//! The transformer-block node against its composition, and the helpers the block tests share.

use super::*;
use crate::nn::attention::{attention_composed, merge_heads, split_heads};
use crate::nn::test_util::rel_max_err as rel;
use candle_core::Var;

pub(super) fn randn(shape: &[usize], seed: u64, std: f64) -> Tensor {
    crate::nn::test_util::randn("block-test", shape, seed, std)
}

pub(super) fn input(shape: &[usize], seed: u64, grad: bool) -> (Var, Tensor) {
    crate::nn::test_util::input("block-test", shape, seed, grad)
}

/// A random (o, i) projection (NF4 when asked), with a bias when asked and a rank-r LoRA (none
/// for 0) whose factors are pushed onto `vars`.
pub(super) fn lin_part(
    o: usize,
    i: usize,
    r: usize,
    seed: u64,
    nf4: bool,
    bias: bool,
    vars: &mut Vec<Var>,
) -> LinearPart {
    let w = randn(&[o, i], seed, 1.0 / (i as f64).sqrt());
    let base = if nf4 {
        let q = crate::nn::nf4::Nf4Tensor::quantize(&w, 16, false).unwrap();
        ProjBase::Nf4(std::sync::Arc::new(q))
    } else {
        ProjBase::Dense(w)
    };
    let lora = (r > 0).then(|| {
        let a = Var::from_tensor(&randn(&[r, i], seed + 1, 0.3)).unwrap();
        let b = Var::from_tensor(&randn(&[o, r], seed + 2, 0.3)).unwrap();
        let f = LoraFactors {
            a: a.as_tensor().clone(),
            b: b.as_tensor().clone(),
            scale: 0.5 + (seed % 7) as f64 / 10.0,
        };
        vars.extend([a, b]);
        f
    });
    LinearPart {
        base,
        bias: bias.then(|| randn(&[o], seed + 3, 0.1)),
        lora,
    }
}

/// The same projection with its factors detached (inference).
pub(super) fn frozen(l: &LinearPart) -> LinearPart {
    let mut l = l.clone();
    if let Some(f) = &mut l.lora {
        (f.a, f.b) = (f.a.detach(), f.b.detach());
    }
    l
}

/// The composed projection `x·Wᵀ + b + s·(x·Aᵀ)·Bᵀ` (an NF4 base dequantized).
pub(super) fn lin_ref(l: &LinearPart, x: &Tensor) -> Tensor {
    let w = match &l.base {
        ProjBase::Dense(w) => w.clone(),
        ProjBase::Nf4(q) => q.dequantize().unwrap(),
    };
    let mut y = x.broadcast_matmul(&w.t().unwrap()).unwrap();
    if let Some(b) = &l.bias {
        y = y.broadcast_add(b).unwrap();
    }
    if let Some(f) = &l.lora {
        let u = x
            .broadcast_matmul(&f.a.t().unwrap())
            .unwrap()
            .broadcast_matmul(&f.b.t().unwrap())
            .unwrap();
        y = (y + (u * f.scale).unwrap()).unwrap();
    }
    y
}

/// [`crate::nn::test_util::compare`] with the projections' dense weights frozen.
pub(super) fn compare(
    node: &Tensor,
    want: &Tensor,
    asked: &[(&str, &Var)],
    not_asked: &[&Tensor],
    frozen: &[&LinearPart],
    seed: u64,
) {
    let dense: Vec<&Tensor> = frozen
        .iter()
        .filter_map(|l| match &l.base {
            ProjBase::Dense(w) => Some(w),
            ProjBase::Nf4(_) => None,
        })
        .collect();
    crate::nn::test_util::compare(node, want, asked, not_asked, &dense, seed)
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

/// (batch, tokens, context tokens, width, context width, heads).
type Shape6 = (usize, usize, usize, usize, usize, usize);

/// The parts with a rank-`ranks[i]` LoRA on projection i (in the node's order), every factor a Var.
fn parts((_, _, _, c, cc, heads): Shape6, ranks: [usize; 10], seed: u64) -> (BlockParts, Vec<Var>) {
    let ff = 2 * c;
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
    let mut lins = (0..10).map(|i| {
        lin_part(
            dims[i].0,
            dims[i].1,
            ranks[i],
            seed + 10 * i as u64,
            false,
            biased[i],
            &mut vars,
        )
    });
    let mut attn = || AttnPart {
        q: lins.next().unwrap(),
        k: lins.next().unwrap(),
        v: lins.next().unwrap(),
        out: lins.next().unwrap(),
    };
    let (attn1, attn2) = (attn(), attn());
    let ln = |s: u64| LnPart {
        weight: (randn(&[c], s, 0.1) + 1.0).unwrap(),
        bias: randn(&[c], s + 1, 0.1),
        eps: 1e-5,
    };
    let (ff_proj, ff_out) = (lins.next().unwrap(), lins.next().unwrap());
    let (norm1, norm2, norm3) = (ln(seed + 500), ln(seed + 510), ln(seed + 520));
    (
        BlockParts {
            norm1,
            attn1,
            norm2,
            attn2,
            norm3,
            ff_proj,
            ff_out,
            heads,
        },
        vars,
    )
}

fn check(s: Shape6, ranks: [usize; 10], x_grad: bool, ctx_grad: bool, seed: u64) {
    let (b, n, t, c, cc, _) = s;
    let (p, vars) = parts(s, ranks, seed);
    let (xv, x) = input(&[b, n, c], seed + 900, x_grad);
    let (cv, ctx) = input(&[b, t, cc], seed + 901, ctx_grad);
    let node = transformer_block(&x, &ctx, &p)
        .unwrap()
        .expect("the node is taken");
    let want = block_ref(&x, &ctx, &p);
    let mut asked: Vec<(&str, &Var)> = vars.iter().map(|v| ("factor", v)).collect();
    let mut not_asked = vec![];
    for (what, v, fed, g) in [("x", &xv, &x, x_grad), ("context", &cv, &ctx, ctx_grad)] {
        if g {
            asked.push((what, v))
        } else {
            not_asked.push(fed)
        }
    }
    compare(&node, &want, &asked, &not_asked, &p.linears(), seed + 902);
    // Inference records no graph and gives the same values.
    let f = |a: &AttnPart| AttnPart {
        q: frozen(&a.q),
        k: frozen(&a.k),
        v: frozen(&a.v),
        out: frozen(&a.out),
    };
    let fp = BlockParts {
        attn1: f(&p.attn1),
        attn2: f(&p.attn2),
        ff_proj: frozen(&p.ff_proj),
        ff_out: frozen(&p.ff_out),
        ..p.clone()
    };
    let plain = transformer_block(&x.detach(), &ctx.detach(), &fp)
        .unwrap()
        .unwrap();
    assert!(!plain.track_op());
    assert!(rel(&plain, &node) == 0.0);
}

#[test]
fn the_block_node_equals_the_composition_in_value_and_every_gradient() {
    // Every projection adapted, x and the context trained.
    check((2, 9, 5, 16, 12, 2), [3; 10], true, true, 0);
    // Some projections adapted (cross-attention keys/values, the feed-forward out), factors only,
    // as U-Net LoRA training asks for them.
    check(
        (1, 33, 7, 8, 8, 1),
        [0, 0, 0, 0, 0, 2, 4, 0, 0, 1],
        false,
        false,
        100,
    );
    // The attention (q, k, v, out) of both, x and factors.
    check(
        (3, 4, 6, 12, 20, 3),
        [2, 2, 2, 2, 1, 1, 1, 1, 0, 0],
        true,
        false,
        200,
    );
    // No adapter: x and the context (text-encoder training through a frozen U-Net).
    check((2, 6, 3, 8, 4, 2), [0; 10], true, true, 300);
}

#[test]
fn misfit_parts_name_the_shapes_and_other_devices_or_trained_weights_fall_back() {
    let (p, _) = parts((1, 4, 3, 8, 6, 2), [2; 10], 7);
    let x = randn(&[1, 4, 8], 1, 1.0);
    let ctx = randn(&[1, 3, 6], 2, 1.0);
    let err = |x: &Tensor, c: &Tensor, p: &BlockParts| {
        transformer_block(x, c, p)
            .expect_err("an error")
            .to_string()
    };
    // A context of the wrong width, for another batch.
    let e = err(&x, &randn(&[1, 3, 5], 3, 1.0), &p);
    assert!(e.contains("attn2.to_k") && e.contains("[1, 3, 5]"), "{e}");
    let e = err(&x, &randn(&[2, 3, 6], 3, 1.0), &p);
    assert!(e.contains("batch"), "{e}");
    // Heads that do not divide the width.
    let e = err(
        &x,
        &ctx,
        &BlockParts {
            heads: 3,
            ..p.clone()
        },
    );
    assert!(e.contains("heads"), "{e}");
    // A LoRA whose B does not fit.
    let mut q = p.clone();
    if let Some(f) = &mut q.ff_out.lora {
        f.b = randn(&[7, 2], 4, 1.0);
    }
    let e = err(&x, &ctx, &q);
    assert!(e.contains("ff.net.2") && e.contains("[7, 2]"), "{e}");
    // bf16 input, a trained weight or norm: the caller composes.
    let mut q = p.clone();
    q.norm2.weight = Var::from_tensor(&p.norm2.weight)
        .unwrap()
        .as_tensor()
        .clone();
    assert!(transformer_block(&x, &ctx, &q).unwrap().is_none());
    let xb = x.to_dtype(DType::BF16).unwrap();
    assert!(transformer_block(&xb, &ctx, &p).unwrap().is_none());
    let mut q = p.clone();
    if let ProjBase::Dense(w) = &p.attn1.out.base {
        q.attn1.out.base = ProjBase::Dense(Var::from_tensor(w).unwrap().as_tensor().clone());
    }
    assert!(transformer_block(&x, &ctx, &q).unwrap().is_none());
}
