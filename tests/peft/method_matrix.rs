//! One test matrix over every adapter method and every layer kind it supports (PEFT's
//! `TEST_CASES × generic tests`): merged = unmerged, unmerge restores, disabled = base, the gain
//! scales the contribution (merged too), every adapter tensor gets a finite non-zero gradient and
//! the base none, inference records no graph, a PEFT folder round-trips, and routing: an all-zero
//! gate is the base, an all-one gate is the ungated adapter (so the fused and multiplicative fast
//! paths equal the one equation), and a checkerboard keeps the base outside its mask.

use crate::common::*;
use candle_core::{DType, Device, Tensor};
use postforge::peft::formats::peft::{self as files, SaveOptions};
use postforge::peft::{
    AdaptedLayer, AdapterConfig, AdapterPlan, BaseKind, ConvCfg, ForwardCtx, InitSpec, Layout,
    Routing,
};
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq)]
enum M {
    Lora,
    RsLora,
    Dora,
    Ia3,
    Ia3Ff,
    Loha,
    Lokr,
    Vera,
    Adalora,
}
const METHODS: [M; 9] = [
    M::Lora,
    M::RsLora,
    M::Dora,
    M::Ia3,
    M::Ia3Ff,
    M::Loha,
    M::Lokr,
    M::Vera,
    M::Adalora,
];

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Linear,
    Conv,
    Embedding,
}

fn supported(m: M, k: Kind) -> bool {
    match k {
        Kind::Linear => true,
        Kind::Conv => !matches!(m, M::Vera | M::Adalora),
        Kind::Embedding => matches!(m, M::Lora | M::RsLora | M::Dora),
    }
}

fn cases() -> Vec<(M, Kind)> {
    METHODS
        .iter()
        .flat_map(|&m| [Kind::Linear, Kind::Conv, Kind::Embedding].map(|k| (m, k)))
        .filter(|&(m, k)| supported(m, k))
        .collect()
}

fn config(m: M) -> AdapterConfig {
    let mut c = AdapterConfig::lora(4, 8.0, &["layer"]);
    let json = |v: serde_json::Value| v;
    match m {
        M::Lora | M::RsLora | M::Dora => {
            c.use_rslora = m == M::RsLora;
            c.use_dora = m == M::Dora;
            c.init_lora_weights = InitSpec::Bool(false);
        }
        M::Ia3 | M::Ia3Ff => {
            c.peft_type = "IA3".into();
            c.extra
                .insert("init_ia3_weights".into(), json(false.into()));
            if m == M::Ia3Ff {
                c.extra
                    .insert("feedforward_modules".into(), serde_json::json!(["layer"]));
            }
        }
        M::Loha | M::Lokr => {
            c.peft_type = if m == M::Loha { "LOHA" } else { "LOKR" }.into();
            c.extra.insert("init_weights".into(), json(false.into()));
        }
        M::Vera => {
            c.peft_type = "VERA".into();
            c.extra.insert("init_weights".into(), json(false.into()));
        }
        M::Adalora => {
            c.peft_type = "ADALORA".into();
            c.extra.insert("init_r".into(), json(4.into()));
            c.extra.insert("target_r".into(), json(2.into()));
            c.extra.insert("total_step".into(), json(10.into()));
            c.extra.insert("init_weights".into(), json(false.into()));
        }
    }
    c.validate().unwrap();
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
                stride: 1,
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

/// Linear inputs are tokens of a 2×3 grid: (b, 6, in).
fn input(k: Kind) -> Tensor {
    match k {
        Kind::Linear => randn(&[2, 6, 16], 1.0, "x"),
        Kind::Conv => randn(&[2, 4, 4, 6], 1.0, "x"),
        Kind::Embedding => ids(&[2, 6], 20),
    }
}

fn layout(k: Kind) -> Layout {
    match k {
        Kind::Linear => Layout::Tokens { h: 2, w: 3 },
        Kind::Conv => Layout::Image,
        Kind::Embedding => Layout::Sequence,
    }
}

fn adapted(m: M, k: Kind) -> AdaptedLayer {
    let plan = AdapterPlan::single(config(m), 1).unwrap();
    let mut l = plan.apply(base(k)).unwrap();
    plan.finish(&mut [&mut l]).unwrap();
    assert!(l.has_adapter("default"), "{m:?} {k:?}: not adapted");
    l
}

fn fwd(l: &AdaptedLayer, x: &Tensor) -> Tensor {
    l.forward(x, &ForwardCtx::eval()).unwrap()
}

fn routed_fwd(l: &AdaptedLayer, x: &Tensor, k: Kind, mask: &Tensor) -> Tensor {
    let r = Routing::new().with_mask("default", mask).unwrap();
    let ctx = ForwardCtx::eval().routed(Arc::new(r)).at(layout(k));
    l.forward(x, &ctx).unwrap()
}

/// A mask at "full resolution" for kind `k`: a grid twice the layer's (area-averaged down), or
/// per token for text.
fn mask(k: Kind, f: impl Fn(usize, usize) -> f32) -> Tensor {
    let (h, w) = match k {
        Kind::Linear => (2, 3),
        Kind::Conv => (4, 6),
        Kind::Embedding => {
            let v: Vec<f32> = (0..12).map(|i| f(i / 6, i % 6)).collect();
            return Tensor::from_vec(v, (2, 6), &Device::Cpu).unwrap();
        }
    };
    // Each cell of the layer grid is a 2×2 block of equal values in the mask.
    let (hh, ww) = (2 * h, 2 * w);
    let v: Vec<f32> = (0..2 * hh * ww)
        .map(|i| f((i % (hh * ww)) / ww / 2, (i % ww) / 2))
        .collect();
    Tensor::from_vec(v, (2, hh, ww), &Device::Cpu).unwrap()
}

#[test]
fn merged_equals_unmerged_and_unmerge_restores() {
    for (m, k) in cases() {
        let mut l = adapted(m, k);
        let x = input(k);
        let (w0, y) = (l.weight().unwrap(), fwd(&l, &x));
        l.merge(None).unwrap();
        assert!(
            rel_err(&l.weight().unwrap(), &w0) > 1e-4,
            "{m:?} {k:?}: merge left W as it was"
        );
        let e = rel_err(&fwd(&l, &x), &y);
        assert!(e < 1e-5, "{m:?} {k:?}: merged differs by {e}");
        // Merging twice is idempotent.
        l.merge(None).unwrap();
        assert!(
            rel_err(&fwd(&l, &x), &y) < 1e-5,
            "{m:?} {k:?}: second merge"
        );
        l.unmerge().unwrap();
        let e = rel_err(&l.weight().unwrap(), &w0);
        assert!(e < 1e-6, "{m:?} {k:?}: unmerge error {e}");
        assert!(
            rel_err(&fwd(&l, &x), &y) < 1e-6,
            "{m:?} {k:?}: unmerged output"
        );
    }
}

#[test]
fn disabled_equals_base() {
    for (m, k) in cases() {
        let mut l = adapted(m, k);
        let x = input(k);
        let yb = fwd(&base(k), &x);
        assert!(
            max_abs_diff(&fwd(&l, &x), &yb) > 1e-3,
            "{m:?} {k:?}: no-op adapter"
        );
        l.set_enabled(false).unwrap();
        assert!(
            max_abs_diff(&fwd(&l, &x), &yb) < 1e-6,
            "{m:?} {k:?}: disabled != base"
        );
    }
}

#[test]
fn gain_scales_the_contribution_for_every_method() {
    for (m, k) in cases() {
        let mut l = adapted(m, k);
        let x = input(k);
        let yb = fwd(&base(k), &x);
        let d1 = (fwd(&l, &x) - &yb).unwrap();
        for g in [0.0, 0.5, -1.0] {
            l.set_gain("default", g).unwrap();
            let dg = (fwd(&l, &x) - &yb).unwrap();
            let e = max_abs_diff(&dg, &(&d1 * g).unwrap());
            assert!(e < 1e-4, "{m:?} {k:?}: gain {g} off by {e}");
        }
        // Merging uses the gain too (a DoRA merge is not linear in it: compare outputs).
        l.set_gain("default", 0.5).unwrap();
        let y = fwd(&l, &x);
        l.merge(None).unwrap();
        let e = rel_err(&fwd(&l, &x), &y);
        assert!(e < 1e-5, "{m:?} {k:?}: merged at gain 0.5 differs by {e}");
    }
}

#[test]
fn every_adapter_tensor_gets_a_gradient_and_the_base_none() {
    for (m, k) in cases() {
        let l = adapted(m, k);
        let x = input(k);
        let y = l.forward(&x, &ForwardCtx::eval_with_grad()).unwrap();
        let loss = y.sqr().unwrap().sum_all().unwrap();
        let grads = loss.backward().unwrap();
        let vars = l.named_vars();
        assert_all_trained(&grads, &vars, &format!("{m:?} {k:?}"));
        assert!(
            grads
                .get(l.base_weight().dense().as_ref().unwrap())
                .is_none(),
            "{m:?} {k:?}: the base weight got a gradient"
        );
        // Training mode (dropout draws) keeps the graph too.
        let y = l.forward(&x, &ForwardCtx::train(3, 1)).unwrap();
        let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        assert_all_trained(&grads, &vars, &format!("{m:?} {k:?} (train)"));
    }
}

#[test]
fn inference_records_no_graph() {
    for (m, k) in cases() {
        let l = adapted(m, k);
        let y = fwd(&l, &input(k));
        let grads = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
        for (name, v) in l.named_vars() {
            assert!(
                grads.get(v.as_tensor()).is_none(),
                "{m:?} {k:?}: inference output depends on {name} through a graph"
            );
        }
    }
}

#[test]
fn peft_folder_round_trip() {
    for (m, k) in cases() {
        let l = adapted(m, k);
        let x = input(k);
        let dir = tempfile::tempdir().unwrap();
        files::save(
            dir.path(),
            &[&l],
            "default",
            &config(m),
            SaveOptions::default(),
        )
        .unwrap();
        let mut back = base(k);
        files::load(dir.path(), &mut [&mut back], "default").unwrap();
        let e = rel_err(&fwd(&back, &x), &fwd(&l, &x));
        assert!(e < 1e-6, "{m:?} {k:?}: reloaded output differs by {e}");
    }
}

#[test]
fn zero_gate_is_the_base_and_one_gate_is_the_unrouted_adapter() {
    for (m, k) in cases() {
        let l = adapted(m, k);
        let x = input(k);
        let (yb, y) = (fwd(&base(k), &x), fwd(&l, &x));
        let z = routed_fwd(&l, &x, k, &mask(k, |_, _| 0.0));
        assert!(
            max_abs_diff(&z, &yb) < 1e-6,
            "{m:?} {k:?}: zero gate != base"
        );
        // The all-one gate runs the equation; unrouted runs the fused / multiplicative paths.
        let o = routed_fwd(&l, &x, k, &mask(k, |_, _| 1.0));
        let e = rel_err(&o, &y);
        assert!(
            e < 1e-5,
            "{m:?} {k:?}: one gate differs from unrouted by {e}"
        );
    }
}

#[test]
fn checkerboard_gate_keeps_the_base_outside_the_mask() {
    for (m, k) in cases() {
        let l = adapted(m, k);
        let x = input(k);
        let (yb, y) = (fwd(&base(k), &x), fwd(&l, &x));
        let on = |i: usize, j: usize| ((i + j) % 2) as f32;
        let r = routed_fwd(&l, &x, k, &mask(k, on));
        // The mask at the layer's grid, shaped to broadcast against the output.
        let g: Vec<f32> = match k {
            Kind::Linear => (0..12).map(|t| on((t % 6) / 3, t % 3)).collect(),
            Kind::Conv => (0..48).map(|t| on((t % 24) / 6, t % 6)).collect(),
            Kind::Embedding => (0..12).map(|t| on(t / 6, t % 6)).collect(),
        };
        let g = match k {
            Kind::Conv => Tensor::from_vec(g, (2, 1, 4, 6), &Device::Cpu),
            _ => Tensor::from_vec(g, (2, 6, 1), &Device::Cpu),
        }
        .unwrap();
        let want = (&yb + (&y - &yb).unwrap().broadcast_mul(&g).unwrap()).unwrap();
        let e = max_abs_diff(&r, &want);
        assert!(e < 1e-5, "{m:?} {k:?}: checkerboard off by {e}");
    }
}

#[test]
fn a_merged_adapter_cannot_be_routed_and_a_layer_without_layout_refuses() {
    let mut l = adapted(M::Lora, Kind::Conv);
    let x = input(Kind::Conv);
    let r = Arc::new(
        Routing::new()
            .with_mask("default", &mask(Kind::Conv, |_, _| 1.0))
            .unwrap(),
    );
    let err = l
        .forward(&x, &ForwardCtx::eval().routed(r.clone()))
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("block.layer") && err.contains("layout"),
        "{err}"
    );
    l.merge(None).unwrap();
    let err = l
        .forward(&x, &ForwardCtx::eval().routed(r).at(Layout::Image))
        .unwrap_err()
        .to_string();
    assert!(err.contains("merged") && err.contains("default"), "{err}");
    let bad = Tensor::full(2f32, (1, 4, 4), &Device::Cpu).unwrap();
    assert!(Routing::new().with_mask("a", &bad).is_err());
    let nan = Tensor::full(f32::NAN, (1, 4, 4), &Device::Cpu).unwrap();
    assert!(Routing::new().with_mask("a", &nan).is_err());
    let _ = DType::F32;
}

/// The adapter tensors of a layer.
fn adapter_vars(l: &AdaptedLayer) -> Vec<(String, candle_core::Var)> {
    l.named_vars()
}

#[test]
fn a_loss_outside_the_mask_gives_the_adapter_exactly_zero_gradient() {
    for (m, k) in cases() {
        let l = adapted(m, k);
        let x = input(k);
        let on = |i: usize, j: usize| ((i + j) % 2) as f32;
        let r = Routing::new().with_mask("default", &mask(k, on)).unwrap();
        let ctx = ForwardCtx::eval_with_grad()
            .routed(Arc::new(r))
            .at(layout(k));
        let g: Vec<f32> = match k {
            Kind::Linear => (0..12).map(|t| on((t % 6) / 3, t % 3)).collect(),
            Kind::Conv => (0..48).map(|t| on((t % 24) / 6, t % 6)).collect(),
            Kind::Embedding => (0..12).map(|t| on(t / 6, t % 6)).collect(),
        };
        let g = match k {
            Kind::Conv => Tensor::from_vec(g, (2, 1, 4, 6), &Device::Cpu),
            _ => Tensor::from_vec(g, (2, 6, 1), &Device::Cpu),
        }
        .unwrap();
        let y = l.forward(&x, &ctx).unwrap();
        let w = randn(y.dims(), 1.0, "loss-weights");
        let weighted = |gate: &Tensor| {
            y.mul(&w)
                .unwrap()
                .broadcast_mul(gate)
                .unwrap()
                .sum_all()
                .unwrap()
        };
        let outside = weighted(&(1.0 - &g).unwrap()).backward().unwrap();
        let inside = weighted(&g).backward().unwrap();
        let mut moved = 0;
        for (n, v) in adapter_vars(&l) {
            if let Some(gr) = outside.get(v.as_tensor()) {
                let a = gr
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap();
                assert_eq!(a, 0.0, "{m:?} {k:?}: {n} gets {a} from outside the mask");
            }
            let gi = inside
                .get(v.as_tensor())
                .unwrap_or_else(|| panic!("{m:?} {k:?}: {n} gets no gradient inside"));
            let a = gi
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(a.is_finite(), "{m:?} {k:?}: {n} gradient {a}");
            moved += (a > 0.0) as usize;
        }
        assert!(moved > 0, "{m:?} {k:?}: nothing learns inside the mask");
    }
}

#[test]
fn an_nf4_base_routes_like_a_dense_one() {
    for m in [M::Lora, M::Dora] {
        let mut b = base(Kind::Linear);
        b.quantize_nf4(Default::default()).unwrap();
        let plan = AdapterPlan::single(config(m), 1).unwrap();
        let mut l = plan.apply(b).unwrap();
        plan.finish(&mut [&mut l]).unwrap();
        let mut nb = base(Kind::Linear);
        nb.quantize_nf4(Default::default()).unwrap();
        let x = input(Kind::Linear);
        let (yb, y) = (fwd(&nb, &x), fwd(&l, &x));
        assert!(
            max_abs_diff(&y, &yb) > 1e-3,
            "{m:?}: the adapter is a no-op"
        );
        let z = routed_fwd(&l, &x, Kind::Linear, &mask(Kind::Linear, |_, _| 0.0));
        assert!(max_abs_diff(&z, &yb) < 1e-6, "{m:?}: zero gate != NF4 base");
        let o = routed_fwd(&l, &x, Kind::Linear, &mask(Kind::Linear, |_, _| 1.0));
        assert!(rel_err(&o, &y) < 1e-5, "{m:?}: one gate != unrouted");
    }
}

#[test]
fn a_mask_of_the_wrong_batch_or_channels_is_refused_with_both_shapes() {
    let l = adapted(M::Lora, Kind::Conv);
    let x = input(Kind::Conv); // (2, 4, 4, 6)
    for bad in [
        Tensor::ones((3, 4, 6), DType::F32, &Device::Cpu).unwrap(),
        Tensor::ones((2, 3, 4, 6), DType::F32, &Device::Cpu).unwrap(),
    ] {
        let r = Routing::new().with_mask("default", &bad).unwrap();
        let ctx = ForwardCtx::eval().routed(Arc::new(r)).at(Layout::Image);
        let err = l.forward(&x, &ctx).unwrap_err().to_string();
        let shape = format!("{:?}", bad.dims());
        assert!(
            err.contains(&shape) && err.contains("[2, 4, 6]") && err.contains("block.layer"),
            "{err}"
        );
    }
}
