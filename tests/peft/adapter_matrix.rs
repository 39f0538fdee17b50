//! LoRA-family specifics on a strided conv and the fused ops: save/load, gradients, optimizer steps
//! touch only adapters, dropout, fused = composite, merge records; and the fused-op reference tests.
//! The generic properties of every method live in `method_matrix.rs`.

use crate::common::*;
use candle_core::{DType, Device, Tensor};
use postforge::peft::formats::peft::{self as files, SaveOptions};
use postforge::peft::{
    AdaptedLayer, AdapterConfig, AdapterPlan, BaseKind, ConvCfg, ForwardCtx, InitSpec,
};
use postforge::train::{AdamW, AdamWConfig};
use std::collections::BTreeMap;

#[derive(Clone, Copy, Debug)]
enum Method {
    Lora,
    RsLora,
    Dora,
}
const METHODS: [Method; 3] = [Method::Lora, Method::RsLora, Method::Dora];

#[derive(Clone, Copy, Debug)]
enum Kind {
    Linear,
    Conv,
    Embedding,
}
const KINDS: [Kind; 3] = [Kind::Linear, Kind::Conv, Kind::Embedding];

fn config(m: Method) -> AdapterConfig {
    let mut c = AdapterConfig::lora(4, 8.0, &["layer"]);
    c.use_rslora = matches!(m, Method::RsLora);
    c.use_dora = matches!(m, Method::Dora);
    // Random A and B so that the adapter is not a no-op.
    c.init_lora_weights = InitSpec::Bool(false);
    c
}

fn base(k: Kind) -> AdaptedLayer {
    match k {
        Kind::Linear => AdaptedLayer::new(
            "block.layer",
            BaseKind::Linear,
            randn(&[24, 16], 0.3, "w"),
            Some(randn(&[24], 0.3, "b")),
        )
        .unwrap(),
        Kind::Conv => AdaptedLayer::new(
            "block.layer",
            BaseKind::Conv2d(ConvCfg {
                padding: 1,
                stride: 2,
                dilation: 1,
                groups: 1,
            }),
            randn(&[6, 4, 3, 3], 0.3, "w"),
            Some(randn(&[6], 0.3, "b")),
        )
        .unwrap(),
        Kind::Embedding => AdaptedLayer::new(
            "block.layer",
            BaseKind::Embedding,
            randn(&[20, 8], 0.3, "w"),
            None,
        )
        .unwrap(),
    }
}

fn input(k: Kind) -> Tensor {
    match k {
        Kind::Linear => randn(&[3, 5, 16], 1.0, "x"),
        Kind::Conv => randn(&[2, 4, 9, 9], 1.0, "x"),
        Kind::Embedding => ids(&[3, 7], 20),
    }
}

fn adapted(k: Kind, m: Method) -> AdaptedLayer {
    let plan = AdapterPlan::single(config(m), 1).unwrap();
    plan.apply(base(k)).unwrap()
}

fn fwd(l: &AdaptedLayer, x: &Tensor) -> Tensor {
    l.forward(x, &ForwardCtx::eval_with_grad()).unwrap()
}

// Merge/unmerge, disable and gain for every method and kind: `method_matrix.rs`.

#[test]
fn save_load_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    for k in KINDS {
        for m in METHODS {
            let l = adapted(k, m);
            let x = input(k);
            let d = dir.path().join(format!("{k:?}-{m:?}"));
            files::save(&d, &[&l], "default", &config(m), SaveOptions::default()).unwrap();
            let mut fresh = base(k);
            let cfg = files::load(&d, &mut [&mut fresh], "default").unwrap();
            assert_eq!(cfg.use_dora, matches!(m, Method::Dora));
            assert_eq!(
                max_abs_diff(&fwd(&fresh, &x), &fwd(&l, &x)),
                0.0,
                "{k:?} {m:?}"
            );
        }
    }
}

#[test]
fn every_adapter_tensor_gets_a_finite_nonzero_gradient_and_the_base_none() {
    for k in KINDS {
        for m in METHODS {
            let l = adapted(k, m);
            let x = input(k);
            // An input that itself needs a gradient, as inside a deep model.
            let (x, xv) = match k {
                Kind::Embedding => (x, None),
                _ => {
                    let v = candle_core::Var::from_tensor(&x).unwrap();
                    (v.as_tensor().clone(), Some(v))
                }
            };
            let y = fwd(&l, &x);
            let g = randn(y.dims(), 1.0, "g");
            let grads = (y * g).unwrap().sum_all().unwrap().backward().unwrap();
            for (name, v) in l.named_vars() {
                let gr = grads
                    .get(v.as_tensor())
                    .unwrap_or_else(|| panic!("{k:?} {m:?}: no gradient for {name}"));
                let n = gr
                    .sqr()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(
                    n.is_finite() && n > 0.0,
                    "{k:?} {m:?}: gradient of {name} is {n}"
                );
            }
            let wn = l.base_weight().dims().iter().product::<usize>();
            let weight_sized = grads
                .get_ids()
                .filter(|id| grads.get_id(**id).is_some_and(|t| t.elem_count() == wn))
                .count();
            assert_eq!(
                weight_sized, 0,
                "{k:?} {m:?}: a weight-sized gradient exists for the frozen weight"
            );
            if let Some(xv) = xv {
                assert!(
                    grads.get(xv.as_tensor()).is_some(),
                    "{k:?} {m:?}: no input gradient"
                );
            }
        }
    }
}

#[test]
fn optimizer_step_changes_only_adapter_tensors() {
    for k in KINDS {
        for m in METHODS {
            let l = adapted(k, m);
            let w0 = l.weight().unwrap();
            let b0 = l.bias().cloned();
            let before: BTreeMap<String, Tensor> = l
                .named_vars()
                .into_iter()
                .map(|(n, v)| (n, v.as_tensor().copy().unwrap()))
                .collect();
            let x = input(k);
            let y = fwd(&l, &x);
            let grads = y.sqr().unwrap().mean_all().unwrap().backward().unwrap();
            let vars = l.named_vars();
            let g: BTreeMap<String, Tensor> = vars
                .iter()
                .filter_map(|(n, v)| grads.get(v.as_tensor()).map(|g| (n.clone(), g.clone())))
                .collect();
            let mut opt = AdamW::new(vars.clone(), AdamWConfig::default()).unwrap();
            opt.step(&g, 1e-2, 1.0).unwrap();
            for (n, v) in &vars {
                assert!(
                    max_abs_diff(v.as_tensor(), &before[n]) > 0.0,
                    "{k:?} {m:?}: {n} did not change"
                );
            }
            assert_eq!(max_abs_diff(&l.weight().unwrap(), &w0), 0.0);
            if let Some(b0) = b0 {
                assert_eq!(max_abs_diff(l.bias().unwrap(), &b0), 0.0);
            }
        }
    }
}

#[test]
fn frozen_linear_allocates_no_weight_gradient() {
    // A two-layer chain: the second layer's input depends on a trainable tensor, so the frozen
    // matmul sits inside the graph. Its weight must not appear in the gradient store.
    let w1 = candle_core::Var::from_tensor(&randn(&[32, 16], 0.2, "w1")).unwrap();
    let w2 = randn(&[8, 32], 0.2, "w2");
    let x = randn(&[4, 16], 1.0, "x");
    let h = x.matmul(&w1.as_tensor().t().unwrap()).unwrap();
    let y = postforge::nn::frozen::frozen_linear(&h, &w2).unwrap();
    let grads = y.sum_all().unwrap().backward().unwrap();
    // Compare with the plain (full-gradient) path.
    let y2 = h.matmul(&w2.t().unwrap()).unwrap();
    let grads2 = y2.sum_all().unwrap().backward().unwrap();
    let a = grads.get(w1.as_tensor()).unwrap();
    let b = grads2.get(w1.as_tensor()).unwrap();
    assert!(rel_err(a, b) < 1e-6);
    let sized = |g: &candle_core::backprop::GradStore| {
        g.get_ids()
            .filter(|id| {
                g.get_id(**id)
                    .is_some_and(|t| t.elem_count() == w2.elem_count())
            })
            .count()
    };
    assert_eq!(
        sized(&grads2),
        1,
        "the plain path allocates a weight-sized gradient (the waste we avoid)"
    );
    assert_eq!(sized(&grads), 0, "the frozen path must not");
}

#[test]
fn frozen_linear_bias_node_matches_the_composite_and_falls_back_where_it_must() {
    use postforge::nn::frozen::frozen_linear_bias;
    // (input shape, with bias): a 3-D token batch, a 2-D batch, a single row.
    for (k, (xs, with_bias)) in [
        (&[2usize, 5, 12][..], true),
        (&[7, 12][..], false),
        (&[1, 12][..], true),
    ]
    .into_iter()
    .enumerate()
    {
        let w = randn(&[9, 12], 0.3, &format!("w{k}"));
        let b = with_bias.then(|| randn(&[9], 0.5, &format!("b{k}")));
        let x = candle_core::Var::from_tensor(&randn(xs, 1.0, &format!("x{k}"))).unwrap();
        let y = frozen_linear_bias(x.as_tensor(), &w, b.as_ref())
            .unwrap()
            .expect("CPU f32 with a frozen weight takes the node");
        let mut yc = x.as_tensor().broadcast_matmul(&w.t().unwrap()).unwrap();
        if let Some(b) = &b {
            yc = yc.broadcast_add(b).unwrap();
        }
        assert_eq!(y.dims(), yc.dims());
        assert!(rel_err(&y, &yc) < 1e-6, "case {k}: value");
        // A weighted sum, so every output element has its own gradient.
        let wts = randn(yc.dims(), 1.0, &format!("g{k}"));
        let g = (y * &wts).unwrap().sum_all().unwrap().backward().unwrap();
        let gc = (yc * &wts).unwrap().sum_all().unwrap().backward().unwrap();
        let (dx, dxc) = (
            g.get(x.as_tensor()).unwrap(),
            gc.get(x.as_tensor()).unwrap(),
        );
        assert!(rel_err(dx, dxc) < 1e-6, "case {k}: input gradient");
        assert!(
            g.get(&w).is_none(),
            "case {k}: the frozen weight gets no gradient"
        );
        // No graph without a tracked input.
        let y = frozen_linear_bias(&x.as_tensor().detach(), &w, b.as_ref())
            .unwrap()
            .unwrap();
        assert!(!y.track_op());
    }
    let x = randn(&[3, 12], 1.0, "xf");
    let w = randn(&[9, 12], 0.3, "wf");
    // A trained bias or weight takes the composed path.
    let bv = candle_core::Var::from_tensor(&randn(&[9], 0.5, "bf")).unwrap();
    assert!(frozen_linear_bias(&x, &w, Some(bv.as_tensor()))
        .unwrap()
        .is_none());
    let wv = candle_core::Var::from_tensor(&w).unwrap();
    assert!(frozen_linear_bias(&x, wv.as_tensor(), None)
        .unwrap()
        .is_none());
    // Another dtype as well.
    let x64 = x.to_dtype(DType::F64).unwrap();
    assert!(
        frozen_linear_bias(&x64, &w.to_dtype(DType::F64).unwrap(), None)
            .unwrap()
            .is_none()
    );
    // Misfit shapes are named.
    let e = frozen_linear_bias(&randn(&[3, 11], 1.0, "xm"), &w, None)
        .unwrap_err()
        .to_string();
    assert!(e.contains("[3, 11]") && e.contains("(9, 12)"), "{e}");
    let e = frozen_linear_bias(&x, &w, Some(&randn(&[8], 1.0, "bm")))
        .unwrap_err()
        .to_string();
    assert!(e.contains("[8]"), "{e}");
}

#[test]
fn channel_bias_matches_broadcast_add_in_value_and_gradients() {
    // (y shape, bias shape, dim, the broadcast shape of the bias for the composite)
    let cases: [(&[usize], &[usize], usize, &[usize]); 4] = [
        (&[3, 5, 7], &[7], 2, &[1, 1, 7]),          // linear bias
        (&[2, 6, 4, 5], &[6], 1, &[1, 6, 1, 1]),    // conv bias
        (&[2, 6, 4, 5], &[2, 6], 1, &[2, 6, 1, 1]), // time embedding per image and channel
        (&[4, 3], &[3], 1, &[1, 3]),                // a plain 2-D linear output
    ];
    for (k, (ys, bs, dim, view)) in cases.into_iter().enumerate() {
        let y = candle_core::Var::from_tensor(&randn(ys, 1.0, &format!("y{k}"))).unwrap();
        let b = candle_core::Var::from_tensor(&randn(bs, 1.0, &format!("b{k}"))).unwrap();
        let g = randn(ys, 1.0, &format!("g{k}"));
        let ours =
            postforge::nn::conv::add_channel_bias(y.as_tensor(), b.as_tensor(), dim).unwrap();
        let reference = y
            .as_tensor()
            .broadcast_add(&b.as_tensor().reshape(view).unwrap())
            .unwrap();
        assert!(max_abs_diff(&ours, &reference) < 1e-6, "case {k}");
        let g1 = (&ours * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&reference * &g)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for v in [&y, &b] {
            let (a, r) = (
                g1.get(v.as_tensor()).unwrap(),
                g2.get(v.as_tensor()).unwrap(),
            );
            assert_eq!(a.dims(), v.dims());
            assert!(rel_err(a, r) < 1e-5, "case {k}: {}", rel_err(a, r));
        }
        // A frozen bias gets no gradient; a wrong-sized one is an error naming both shapes.
        let frozen = randn(bs, 1.0, "frozen");
        let out = postforge::nn::conv::add_channel_bias(y.as_tensor(), &frozen, dim).unwrap();
        let gs = out.sum_all().unwrap().backward().unwrap();
        assert!(gs.get(&frozen).is_none());
        let bad = randn(&[bs[bs.len() - 1] + 1], 1.0, "bad");
        let err = postforge::nn::conv::add_channel_bias(y.as_tensor(), &bad, dim)
            .unwrap_err()
            .to_string();
        assert!(err.contains(&format!("{:?}", bad.dims())), "{err}");
    }
}

#[test]
fn upsample_nearest_matches_candle_in_value_and_gradient() {
    for (shape, k) in [([2usize, 3, 4, 5], 2usize), ([1, 2, 3, 3], 3)] {
        let x = candle_core::Var::from_tensor(&randn(&shape, 1.0, "up-x")).unwrap();
        let ours = postforge::nn::resample::upsample_nearest(x.as_tensor(), k).unwrap();
        let theirs = x
            .as_tensor()
            .upsample_nearest2d(shape[2] * k, shape[3] * k)
            .unwrap();
        assert_eq!(max_abs_diff(&ours, &theirs), 0.0);
        let g = randn(ours.dims(), 1.0, "up-g");
        let a = (&ours * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let b = (&theirs * &g)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let (a, b) = (a.get(x.as_tensor()).unwrap(), b.get(x.as_tensor()).unwrap());
        assert!(rel_err(a, b) < 1e-6, "{}", rel_err(a, b));
    }
}

#[test]
fn frozen_conv2d_input_gradient_is_the_exact_adjoint() {
    // conv2d is linear in x, so the input gradient g ↦ dL/dx must satisfy <conv(z), g> = <z, dL/dx>
    // for every z. Checked for odd/even, non-square inputs where candle's own conv backward fails.
    for (stride, padding) in [(1, 0), (1, 1), (2, 1), (2, 0), (3, 2)] {
        for (h, wd) in [(9, 9), (9, 10), (8, 11)] {
            let w = randn(&[5, 3, 3, 3], 0.3, "cw");
            let xv = candle_core::Var::from_tensor(&randn(&[2, 3, h, wd], 1.0, "cx")).unwrap();
            let cfg = ConvCfg {
                padding,
                stride,
                dilation: 1,
                groups: 1,
            };
            let y = postforge::nn::conv::frozen_conv2d(xv.as_tensor(), &w, cfg).unwrap();
            // Our GEMM conv sums in another order than candle's: equal to rounding.
            assert!(
                max_abs_diff(
                    &y,
                    &xv.as_tensor().conv2d(&w, padding, stride, 1, 1).unwrap()
                ) < 1e-5
            );
            let g = randn(y.dims(), 1.0, "cg");
            let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let gx = grads.get(xv.as_tensor()).unwrap();
            assert_eq!(gx.dims(), xv.dims());
            for probe in 0..3 {
                let z = randn(&[2, 3, h, wd], 1.0, &format!("z{probe}"));
                let lhs = (z.conv2d(&w, padding, stride, 1, 1).unwrap() * &g)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                let rhs = (&z * gx)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert!(
                    (lhs - rhs).abs() <= 1e-4 * lhs.abs().max(1.0),
                    "s{stride} p{padding} {h}x{wd}: {lhs} vs {rhs}"
                );
            }
            // Where candle's own backward works, both agree.
            let y2 = xv.as_tensor().conv2d(&w, padding, stride, 1, 1).unwrap();
            if let Ok(grads2) = (&y2 * &g).unwrap().sum_all().unwrap().backward() {
                if let Some(b) = grads2.get(xv.as_tensor()).filter(|b| b.dims() == gx.dims()) {
                    assert!(rel_err(gx, b) < 1e-5);
                }
            }
            let sized = grads
                .get_ids()
                .filter(|id| {
                    grads
                        .get_id(**id)
                        .is_some_and(|t| t.elem_count() == w.elem_count())
                })
                .count();
            assert_eq!(sized, 0, "no kernel-sized gradient");
        }
    }
}

#[test]
fn dropout_is_training_only_and_reproducible() {
    let mut c = config(Method::Lora);
    c.lora_dropout = 0.5;
    let l = AdapterPlan::single(c, 1)
        .unwrap()
        .apply(base(Kind::Linear))
        .unwrap();
    let x = input(Kind::Linear);
    let e1 = l.forward(&x, &ForwardCtx::eval_with_grad()).unwrap();
    let e2 = l.forward(&x, &ForwardCtx::eval_with_grad()).unwrap();
    assert_eq!(max_abs_diff(&e1, &e2), 0.0);
    let t1 = l.forward(&x, &ForwardCtx::train(3, 10)).unwrap();
    let t2 = l.forward(&x, &ForwardCtx::train(3, 10)).unwrap();
    let t3 = l.forward(&x, &ForwardCtx::train(3, 11)).unwrap();
    assert_eq!(max_abs_diff(&t1, &t2), 0.0, "same step, same masks");
    assert!(
        max_abs_diff(&t1, &t3) > 0.0,
        "another step draws other masks"
    );
    assert!(
        max_abs_diff(&t1, &e1) > 0.0,
        "dropout changes the training output"
    );
}

#[test]
fn two_active_adapters_add_up() {
    let mut l = base(Kind::Linear);
    let c = config(Method::Lora);
    l.add_adapter("one", &c, 1).unwrap();
    l.add_adapter("two", &c, 2).unwrap();
    let x = input(Kind::Linear);
    let yb = fwd(&base(Kind::Linear), &x);
    let both = fwd(&l, &x);
    l.set_active(&["one"]).unwrap();
    let y1 = fwd(&l, &x);
    l.set_active(&["two"]).unwrap();
    let y2 = fwd(&l, &x);
    let expect = ((y1 + y2).unwrap() - yb).unwrap();
    assert!(max_abs_diff(&both, &expect) < 1e-5);
    assert!(l.set_active(&["three"]).is_err());
}

#[test]
fn default_init_is_a_no_op_and_gaussian_too() {
    for init in [InitSpec::Bool(true), InitSpec::Method("gaussian".into())] {
        for k in KINDS {
            let mut c = AdapterConfig::lora(4, 8.0, &["layer"]);
            c.init_lora_weights = init.clone();
            let l = AdapterPlan::single(c, 1).unwrap().apply(base(k)).unwrap();
            let x = input(k);
            assert_eq!(
                max_abs_diff(&fwd(&l, &x), &fwd(&base(k), &x)),
                0.0,
                "{k:?} {init:?}"
            );
        }
    }
    // kaiming-uniform(a=√5) bound is 1/√fan_in.
    let l = AdapterPlan::single(AdapterConfig::lora(4, 8.0, &["layer"]), 1)
        .unwrap()
        .apply(base(Kind::Linear))
        .unwrap();
    let a = l
        .lora("default")
        .unwrap()
        .a
        .as_tensor()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(a <= 0.25 && a > 0.15, "A bound {a}");
    let _ = DType::F32;
}

#[test]
fn fused_lora_and_dora_match_the_composite_reference() {
    // The fast single-node path against the obviously correct composition of candle ops.
    for m in [Method::Lora, Method::Dora] {
        let l = adapted(Kind::Linear, m);
        let ad = &l.lora("default").unwrap();
        let xv = candle_core::Var::from_tensor(&input(Kind::Linear)).unwrap();
        let x = xv.as_tensor();
        let g = randn(&[3, 5, 24], 1.0, "g");
        let y = fwd(&l, x);
        let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        // Reference: W, A, B as plain graph tensors.
        let w = &l.weight().unwrap();
        let x2 = x.reshape((15, 16)).unwrap();
        let lora = x2
            .matmul(&ad.a.t().unwrap())
            .unwrap()
            .matmul(&ad.b.t().unwrap())
            .unwrap();
        let u = (x2.matmul(&w.t().unwrap()).unwrap() + (lora * ad.scale).unwrap()).unwrap();
        let u = match &ad.magnitude {
            None => u,
            Some(mag) => {
                let delta = (ad.b.matmul(&ad.a).unwrap() * ad.scale).unwrap();
                let n = (w + delta)
                    .unwrap()
                    .sqr()
                    .unwrap()
                    .sum(1)
                    .unwrap()
                    .sqrt()
                    .unwrap()
                    .detach();
                u.broadcast_mul(&mag.div(&n).unwrap().reshape((1, 24)).unwrap())
                    .unwrap()
            }
        };
        let yr = u
            .broadcast_add(&l.bias().unwrap().reshape((1, 24)).unwrap())
            .unwrap()
            .reshape((3, 5, 24))
            .unwrap();
        assert!(rel_err(&y, &yr) < 1e-5, "{m:?} forward");
        let grads_r = (&yr * &g).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, v) in l
            .named_vars()
            .iter()
            .map(|(n, v)| (n.clone(), v.as_tensor().clone()))
            .chain([("x".to_string(), x.clone())])
        {
            let e = rel_err(grads.get(&v).unwrap(), grads_r.get(&v).unwrap());
            assert!(e < 1e-5, "{m:?} gradient of {name}: {e}");
        }
    }
}

#[test]
fn unmerge_restores_the_base_even_if_the_adapter_changed_since() {
    for m in METHODS {
        let mut l = adapted(Kind::Linear, m);
        let w0 = l.weight().unwrap();
        l.set_gain("default", 0.7).unwrap();
        l.merge(None).unwrap();
        // The multiplier and the factors change while merged (a sweep, an optimizer step).
        l.set_gain("default", 0.2).unwrap();
        let b = &l.lora("default").unwrap().b;
        b.set(&(b.as_tensor() * 3.0).unwrap()).unwrap();
        l.unmerge().unwrap();
        assert!(
            rel_err(&l.weight().unwrap(), &w0) < 1e-6,
            "{m:?}: {}",
            rel_err(&l.weight().unwrap(), &w0)
        );
    }
}

#[test]
fn dora_merge_mixes_and_disabled_merges_are_refused() {
    let mut l = base(Kind::Linear);
    l.add_adapter("dora", &config(Method::Dora), 1).unwrap();
    l.add_adapter("lora", &config(Method::Lora), 2).unwrap();
    let msg = l.merge(None).unwrap_err().to_string();
    assert!(
        msg.contains("DoRA") && msg.contains("dora") && msg.contains("lora"),
        "{msg}"
    );
    assert!(l.merged().is_empty(), "a refused merge changes nothing");
    l.merge(Some(&["lora"])).unwrap();
    assert!(l.merge(Some(&["dora"])).is_err());
    l.unmerge().unwrap();
    l.set_enabled(false).unwrap();
    assert!(l
        .merge(Some(&["lora"]))
        .unwrap_err()
        .to_string()
        .contains("disabled"));
    // Two active adapters with DoRA: PEFT's eval semantics rescale the running result.
    l.set_enabled(true).unwrap();
    let x = input(Kind::Linear);
    let y = fwd(&l, &x);
    assert!(y
        .to_vec3::<f32>()
        .unwrap()
        .iter()
        .flatten()
        .flatten()
        .all(|v| v.is_finite()));
    assert!(
        l.insert_adapter("lora", l.lora("lora").unwrap().clone_detached().unwrap())
            .is_err(),
        "inserting over an adapter is refused"
    );
}

#[test]
fn gemm_conv_backward_matches_candle_and_is_the_adjoint() {
    for (stride, padding, dilation, (h, w)) in [
        (1, 1, 1, (9, 9)),
        (2, 1, 1, (10, 10)),
        (1, 0, 1, (8, 8)),
        (2, 1, 1, (9, 10)),
        (1, 2, 2, (9, 9)),
        (3, 2, 1, (11, 8)),
    ] {
        let k = randn(&[5, 3, 3, 3], 0.3, "gk");
        let kv = candle_core::Var::from_tensor(&k).unwrap();
        let xv = candle_core::Var::from_tensor(&randn(&[2, 3, h, w], 1.0, "gx")).unwrap();
        let cfg = ConvCfg {
            padding,
            stride,
            dilation,
            groups: 1,
        };
        let y = postforge::nn::conv::conv2d(xv.as_tensor(), kv.as_tensor(), cfg, true).unwrap();
        let y_ref = xv
            .as_tensor()
            .conv2d(kv.as_tensor(), padding, stride, dilation, 1)
            .unwrap();
        assert!(
            max_abs_diff(&y, &y_ref) < 1e-5,
            "forward (summation order only)"
        );
        let g = randn(y.dims(), 1.0, "gg");
        let grads = (&y * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let (gx, gk) = (
            grads.get(xv.as_tensor()).unwrap(),
            grads.get(kv.as_tensor()).unwrap(),
        );
        // Adjoint identities: <conv(z, K), g> = <z, dL/dx> and <conv(x, Z), g> = <Z, dL/dK>.
        for probe in 0..2 {
            let z = randn(&[2, 3, h, w], 1.0, &format!("z{probe}"));
            let lhs = (z.conv2d(&k, padding, stride, dilation, 1).unwrap() * &g)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let rhs = (&z * gx)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                (lhs - rhs).abs() <= 1e-4 * lhs.abs().max(1.0),
                "x adjoint s{stride} p{padding} d{dilation} {h}x{w}: {lhs} vs {rhs}"
            );
            let zk = randn(&[5, 3, 3, 3], 1.0, &format!("zk{probe}"));
            let lhs = (xv
                .as_tensor()
                .conv2d(&zk, padding, stride, dilation, 1)
                .unwrap()
                * &g)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            let rhs = (&zk * gk)
                .unwrap()
                .sum_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(
                (lhs - rhs).abs() <= 1e-4 * lhs.abs().max(1.0),
                "kernel adjoint s{stride} p{padding} d{dilation} {h}x{w}: {lhs} vs {rhs}"
            );
        }
        // Where candle's own backward works, the gradients agree.
        if let Ok(gr) = (&y_ref * &g).unwrap().sum_all().unwrap().backward() {
            if let (Some(a), Some(b)) = (gr.get(xv.as_tensor()), gr.get(kv.as_tensor())) {
                if a.dims() == gx.dims() {
                    assert!(
                        rel_err(gx, a) < 1e-5 && rel_err(gk, b) < 1e-5,
                        "s{stride} p{padding} d{dilation} {h}x{w}"
                    );
                }
            }
        }
    }
}

#[test]
fn fused_group_norm_matches_the_composite_in_value_and_gradients() {
    use postforge::nn::norm::{group_norm, group_norm_fused};
    for (shape, groups) in [
        (vec![2usize, 8, 5, 6], 4usize),
        (vec![2, 8, 9, 7], 2),
        (vec![3, 6, 7], 3),
        (vec![1, 4, 2, 2], 1),
    ] {
        let c = shape[1];
        let xv =
            candle_core::Var::from_tensor(&(randn(&shape, 2.0, "gnx") + 0.5).unwrap()).unwrap();
        let wv = candle_core::Var::from_tensor(&(randn(&[c], 0.3, "gnw") + 1.0).unwrap()).unwrap();
        let bv = candle_core::Var::from_tensor(&randn(&[c], 0.3, "gnb")).unwrap();
        let g = randn(&shape, 1.0, "gng");
        let y1 =
            group_norm_fused(xv.as_tensor(), groups, wv.as_tensor(), bv.as_tensor(), 1e-5).unwrap();
        let y2 = group_norm(xv.as_tensor(), groups, wv.as_tensor(), bv.as_tensor(), 1e-5).unwrap();
        assert!(rel_err(&y1, &y2) < 1e-5, "forward {shape:?}");
        // GroupNorm + SiLU fused, against the composite.
        let s1 = postforge::nn::norm::group_norm_silu(
            xv.as_tensor(),
            groups,
            wv.as_tensor(),
            bv.as_tensor(),
            1e-5,
        )
        .unwrap();
        let s2 = y2.silu().unwrap();
        assert!(rel_err(&s1, &s2) < 1e-5, "silu forward {shape:?}");
        let h1 = (&s1 * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let h2 = (&s2 * &g).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, v) in [("x", &xv), ("weight", &wv), ("bias", &bv)] {
            let e = rel_err(
                h1.get(v.as_tensor()).unwrap(),
                h2.get(v.as_tensor()).unwrap(),
            );
            assert!(e < 1e-4, "{shape:?} silu d{name}: {e}");
        }
        let g1 = (&y1 * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&y2 * &g).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, v) in [("x", &xv), ("weight", &wv), ("bias", &bv)] {
            let e = rel_err(
                g1.get(v.as_tensor()).unwrap(),
                g2.get(v.as_tensor()).unwrap(),
            );
            assert!(e < 1e-4, "{shape:?} d{name}: {e}");
        }
        // Frozen γ and β (a LoRA run's norms): the same dx, and no gradient for them.
        let (wf, bf) = (wv.as_tensor().detach(), bv.as_tensor().detach());
        for silu in [false, true] {
            let (f, r) = if silu {
                let f =
                    postforge::nn::norm::group_norm_silu(xv.as_tensor(), groups, &wf, &bf, 1e-5);
                let r = group_norm(xv.as_tensor(), groups, &wf, &bf, 1e-5)
                    .unwrap()
                    .silu();
                (f.unwrap(), r.unwrap())
            } else {
                let f = group_norm_fused(xv.as_tensor(), groups, &wf, &bf, 1e-5);
                (
                    f.unwrap(),
                    group_norm(xv.as_tensor(), groups, &wf, &bf, 1e-5).unwrap(),
                )
            };
            let gf = (&f * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let gr = (&r * &g).unwrap().sum_all().unwrap().backward().unwrap();
            let e = rel_err(
                gf.get(xv.as_tensor()).unwrap(),
                gr.get(xv.as_tensor()).unwrap(),
            );
            assert!(e < 1e-4, "{shape:?} frozen affine, silu {silu}: dx {e}");
            assert!(gf.get(&wf).is_none() && gf.get(&bf).is_none());
        }
    }
}

#[test]
fn fused_layer_norm_and_softmax_match_the_composites_in_value_and_gradients() {
    use postforge::nn::norm::{layer_norm, layer_norm_composite};
    use postforge::nn::softmax::{softmax_composite, softmax_last};
    for shape in [vec![2usize, 5, 8], vec![3, 64], vec![1, 1, 7]] {
        let d = *shape.last().unwrap();
        let xv =
            candle_core::Var::from_tensor(&(randn(&shape, 2.0, "lnx") + 0.5).unwrap()).unwrap();
        let wv = candle_core::Var::from_tensor(&(randn(&[d], 0.3, "lnw") + 1.0).unwrap()).unwrap();
        let bv = candle_core::Var::from_tensor(&randn(&[d], 0.3, "lnb")).unwrap();
        let g = randn(&shape, 1.0, "lng");
        let y1 = layer_norm(xv.as_tensor(), wv.as_tensor(), bv.as_tensor(), 1e-5).unwrap();
        let y2 =
            layer_norm_composite(xv.as_tensor(), wv.as_tensor(), bv.as_tensor(), 1e-5).unwrap();
        assert!(rel_err(&y1, &y2) < 1e-5, "layer norm forward {shape:?}");
        let g1 = (&y1 * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&y2 * &g).unwrap().sum_all().unwrap().backward().unwrap();
        for (name, v) in [("x", &xv), ("weight", &wv), ("bias", &bv)] {
            let e = rel_err(
                g1.get(v.as_tensor()).unwrap(),
                g2.get(v.as_tensor()).unwrap(),
            );
            assert!(e < 1e-4, "layer norm {shape:?} d{name}: {e}");
        }
        // Softmax, on a non-contiguous input too (the transpose of a 2-D view).
        let s1 = softmax_last(xv.as_tensor()).unwrap();
        let s2 = softmax_composite(xv.as_tensor()).unwrap();
        assert!(rel_err(&s1, &s2) < 1e-5, "softmax forward {shape:?}");
        let g1 = (&s1 * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&s2 * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let e = rel_err(
            g1.get(xv.as_tensor()).unwrap(),
            g2.get(xv.as_tensor()).unwrap(),
        );
        assert!(e < 1e-4, "softmax {shape:?} dx: {e}");
    }
    // GEGLU (value · gelu_erf(gate)) against candle's composition.
    let pv = candle_core::Var::from_tensor(&randn(&[2, 3, 10], 1.5, "geglu")).unwrap();
    let g = randn(&[2, 3, 5], 1.0, "geglu-g");
    let p = pv.as_tensor();
    let y1 = postforge::nn::act::geglu(p).unwrap();
    let y2 = (p.narrow(2, 0, 5).unwrap() * p.narrow(2, 5, 5).unwrap().gelu_erf().unwrap()).unwrap();
    assert!(rel_err(&y1, &y2) < 1e-5, "geglu forward");
    let g1 = (&y1 * &g).unwrap().sum_all().unwrap().backward().unwrap();
    let g2 = (&y2 * &g).unwrap().sum_all().unwrap().backward().unwrap();
    let e = rel_err(g1.get(p).unwrap(), g2.get(p).unwrap());
    assert!(e < 1e-4, "geglu dp: {e}");
    let t = randn(&[4, 6], 1.0, "smt").t().unwrap();
    let e = rel_err(&softmax_last(&t).unwrap(), &softmax_composite(&t).unwrap());
    assert!(e < 1e-6, "softmax of a transposed view: {e}");
    // SwiGLU (silu(gate) · up) against candle's composition, over more than one parallel chunk.
    let gv = candle_core::Var::from_tensor(&randn(&[3, 7, 1000], 2.0, "swg")).unwrap();
    let uv = candle_core::Var::from_tensor(&randn(&[3, 7, 1000], 1.0, "swu")).unwrap();
    let g = randn(&[3, 7, 1000], 1.0, "swgrad");
    let y1 = postforge::nn::act::swiglu(gv.as_tensor(), uv.as_tensor()).unwrap();
    let y2 = (gv.as_tensor().silu().unwrap() * uv.as_tensor()).unwrap();
    assert!(rel_err(&y1, &y2) < 1e-5, "swiglu forward");
    let g1 = (&y1 * &g).unwrap().sum_all().unwrap().backward().unwrap();
    let g2 = (&y2 * &g).unwrap().sum_all().unwrap().backward().unwrap();
    for (name, v) in [("gate", &gv), ("up", &uv)] {
        let e = rel_err(
            g1.get(v.as_tensor()).unwrap(),
            g2.get(v.as_tensor()).unwrap(),
        );
        assert!(e < 1e-4, "swiglu d{name}: {e}");
    }
}

#[test]
fn fused_token_logprobs_match_log_softmax_and_gather_in_value_and_gradient() {
    use postforge::nn::loss::{log_softmax, token_logprobs};
    for (shape, seed) in [(vec![2usize, 5, 11], "tl1"), (vec![7, 300], "tl2")] {
        let v = *shape.last().unwrap();
        let rows: usize = shape[..shape.len() - 1].iter().product();
        let targets: Vec<u32> = (0..rows).map(|i| ((i * 7 + 3) % v) as u32).collect();
        let xv = candle_core::Var::from_tensor(&randn(&shape, 3.0, seed)).unwrap();
        let out_shape = &shape[..shape.len() - 1];
        // Some rows carry no gradient (masked positions), which the fused backward skips.
        let g = (randn(out_shape, 1.0, "tlg")
            * Tensor::from_vec(
                (0..rows)
                    .map(|i| (i % 3 != 1) as u8 as f32)
                    .collect::<Vec<_>>(),
                out_shape,
                &Device::Cpu,
            )
            .unwrap())
        .unwrap();
        let y1 = token_logprobs(xv.as_tensor(), &targets).unwrap();
        let t = Tensor::from_vec(targets.clone(), out_shape, &Device::Cpu).unwrap();
        let y2 = log_softmax(xv.as_tensor())
            .unwrap()
            .gather(
                &t.unsqueeze(candle_core::D::Minus1).unwrap(),
                candle_core::D::Minus1,
            )
            .unwrap()
            .squeeze(candle_core::D::Minus1)
            .unwrap();
        assert_eq!(y1.dims(), out_shape);
        assert!(
            rel_err(&y1, &y2) < 1e-5,
            "token log-probs forward {shape:?}"
        );
        let g1 = (&y1 * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&y2 * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let e = rel_err(
            g1.get(xv.as_tensor()).unwrap(),
            g2.get(xv.as_tensor()).unwrap(),
        );
        assert!(e < 1e-5, "token log-probs {shape:?} dlogits: {e}");
    }
    let x = randn(&[2, 4], 1.0, "tl3");
    let err = token_logprobs(&x, &[1, 4]).unwrap_err().to_string();
    assert!(
        err.contains("target token 4") && err.contains("vocabulary of 4"),
        "{err}"
    );
    assert!(token_logprobs(&x, &[1]).is_err());
}

#[test]
fn fused_scaled_masked_softmax_matches_the_composite_in_value_and_gradient() {
    use postforge::nn::softmax::{scaled_masked_softmax, softmax_composite};
    let shape = [2usize, 3, 5, 7];
    let xv = candle_core::Var::from_tensor(&randn(&shape, 2.0, "msx")).unwrap();
    let g = randn(&shape, 1.0, "msg");
    // A causal-style mask per batch row, and one shared by the batch.
    let mvals: Vec<f32> = (0..2 * 5 * 7)
        .map(|i| {
            let (b, q, k) = (i / 35, (i / 7) % 5, i % 7);
            if k > q + 2 + b {
                f32::NEG_INFINITY
            } else {
                0.0
            }
        })
        .collect();
    let per_row = Tensor::from_vec(mvals, (2, 1, 5, 7), &Device::Cpu).unwrap();
    let shared = per_row.narrow(0, 1, 1).unwrap();
    for mask in [Some(&per_row), Some(&shared), None] {
        let y1 = scaled_masked_softmax(xv.as_tensor(), 0.35, mask).unwrap();
        let s = (xv.as_tensor() * 0.35).unwrap();
        let s = match mask {
            Some(m) => s.broadcast_add(m).unwrap(),
            None => s,
        };
        let y2 = softmax_composite(&s).unwrap();
        assert!(rel_err(&y1, &y2) < 1e-5, "masked softmax forward");
        let g1 = (&y1 * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let g2 = (&y2 * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let e = rel_err(
            g1.get(xv.as_tensor()).unwrap(),
            g2.get(xv.as_tensor()).unwrap(),
        );
        assert!(e < 1e-5, "masked softmax dx: {e}");
    }
    let bad = Tensor::zeros((2, 1, 5, 6), DType::F32, &Device::Cpu).unwrap();
    assert!(scaled_masked_softmax(xv.as_tensor(), 1.0, Some(&bad)).is_err());
}

#[test]
fn modules_the_config_does_not_target_are_not_loaded() {
    // A folder whose weights file carries tensors for a module that adapter_config.json excludes
    // (PEFT creates no adapter there and leaves those tensors out): the module stays the base.
    let dir = tempfile::tempdir().unwrap();
    let k = Kind::Linear;
    let m = Method::Lora;
    let l = adapted(k, m);
    let x = input(k);
    let d = dir.path().join("excluded");
    files::save(&d, &[&l], "default", &config(m), SaveOptions::default()).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(d.join(files::CONFIG_FILE)).unwrap())
            .unwrap();
    cfg["exclude_modules"] = serde_json::json!([l.path()]);
    std::fs::write(d.join(files::CONFIG_FILE), cfg.to_string()).unwrap();
    let mut fresh = base(k);
    files::load(&d, &mut [&mut fresh], "default").unwrap();
    assert!(
        fresh.adapter("default").is_none(),
        "an excluded module got an adapter"
    );
    assert_eq!(max_abs_diff(&fwd(&fresh, &x), &fwd(&base(k), &x)), 0.0);
    assert!(max_abs_diff(&fwd(&l, &x), &fwd(&base(k), &x)) > 0.0);
}
