//! Parity with Hugging Face PEFT 0.21.2 (torch 2.15.0): fixtures written by
//! `scripts/fixtures/make_peft_fixtures.py` into `tests/fixtures/`. Tolerance: 1e-5 relative (f32).

use crate::common::*;
use candle_core::{DType, Tensor, Var};
use postforge::peft::config::{AdapterConfig, ModuleKind};
use postforge::peft::formats::peft as files;
use postforge::peft::{AdaptedLayer, BaseKind, ConvCfg, ForwardCtx, Lora};
use postforge::util::SafeTensors;
use std::path::Path;

const TOL: f32 = 1e-5;

fn fixture(name: &str) -> SafeTensors {
    SafeTensors::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name),
    )
    .unwrap()
}

fn layer_from(st: &SafeTensors) -> (AdaptedLayer, Tensor) {
    let meta = st.metadata();
    let kind = match meta["kind"].as_str() {
        "linear" => BaseKind::Linear,
        "conv2d" => BaseKind::Conv2d(ConvCfg {
            padding: 1,
            stride: 2,
            dilation: 1,
            groups: 1,
        }),
        _ => BaseKind::Embedding,
    };
    let bias = st.get("base.bias").ok();
    let mut l = AdaptedLayer::new("layer", kind, st.get("base.weight").unwrap(), bias).unwrap();
    let a = st.get("lora_A").unwrap();
    let r = a.dim(0).unwrap();
    let magnitude = st
        .get("magnitude")
        .ok()
        .map(|m| Var::from_tensor(&m.flatten_all().unwrap()).unwrap());
    let alpha: f64 = meta["lora_alpha"].parse().unwrap();
    let scale: f64 = meta["scaling"].parse().unwrap();
    let ad = Lora {
        r,
        alpha,
        scale,
        dropout: 0.0,
        a: Var::from_tensor(&a).unwrap(),
        b: Var::from_tensor(&st.get("lora_B").unwrap()).unwrap(),
        magnitude,
        initial: None,
    };
    l.insert_adapter("default", ad).unwrap();
    let x = match kind {
        BaseKind::Embedding => st.get("ids").unwrap().to_dtype(DType::U32).unwrap(),
        _ => st.get("x").unwrap(),
    };
    (l, x)
}

fn check(label: &str, ours: &Tensor, theirs: &Tensor) {
    let ours = ours.reshape(theirs.shape()).unwrap();
    let e = rel_err(&ours, theirs);
    assert!(e < TOL, "{label}: relative error {e:e}");
}

#[test]
fn layers_match_peft_forward_gradients_merge_and_disable() {
    for kind in ["linear", "conv2d", "embedding"] {
        for method in ["lora", "rslora", "dora"] {
            let name = format!("layer_{kind}_{method}.safetensors");
            let st = fixture(&name);
            let (mut l, x) = layer_from(&st);
            let xv = (kind != "embedding").then(|| Var::from_tensor(&x).unwrap());
            let xin = xv
                .as_ref()
                .map(|v| v.as_tensor().clone())
                .unwrap_or(x.clone());
            let y = l.forward(&xin, &ForwardCtx::eval_with_grad()).unwrap();
            check(&format!("{name} y"), &y, &st.get("y").unwrap());
            let grads = (&y * st.get("g").unwrap())
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let ad = &l.lora("default").unwrap();
            check(
                &format!("{name} grad A"),
                grads.get(ad.a.as_tensor()).unwrap(),
                &st.get("grad.lora_A").unwrap(),
            );
            check(
                &format!("{name} grad B"),
                grads.get(ad.b.as_tensor()).unwrap(),
                &st.get("grad.lora_B").unwrap(),
            );
            if let Some(m) = &ad.magnitude {
                check(
                    &format!("{name} grad magnitude"),
                    grads.get(m.as_tensor()).unwrap(),
                    &st.get("grad.magnitude").unwrap(),
                );
            }
            if let Some(xv) = &xv {
                check(
                    &format!("{name} grad x"),
                    grads.get(xv.as_tensor()).unwrap(),
                    &st.get("grad.x").unwrap(),
                );
            }
            let (mw, mb) = l.merged_tensors().unwrap();
            check(
                &format!("{name} merged weight"),
                &mw,
                &st.get("merged.weight").unwrap(),
            );
            if let Some(mb) = mb {
                check(
                    &format!("{name} merged bias"),
                    &mb,
                    &st.get("merged.bias").unwrap(),
                );
            }
            l.set_enabled(false).unwrap();
            check(
                &format!("{name} disabled"),
                &l.forward(&x, &ForwardCtx::eval_with_grad()).unwrap(),
                &st.get("disabled.y").unwrap(),
            );
        }
    }
}

/// Aligns the sign of each rank component (row of A / column of B) of ours with theirs.
fn sign_aligned(a: &Tensor, b: &Tensor, ta: &Tensor) -> (Tensor, Tensor) {
    let r = a.dim(0).unwrap();
    let dots = (a * ta).unwrap().sum(1).unwrap().to_vec1::<f32>().unwrap();
    let s: Vec<f32> = dots
        .iter()
        .map(|d| if *d < 0.0 { -1.0 } else { 1.0 })
        .collect();
    let sv = Tensor::from_vec(s, r, a.device()).unwrap();
    (
        a.broadcast_mul(&sv.reshape((r, 1)).unwrap()).unwrap(),
        b.broadcast_mul(&sv.reshape((1, r)).unwrap()).unwrap(),
    )
}

#[test]
fn pissa_and_olora_match_peft_factors_and_residuals() {
    for (file, init) in [
        ("init_pissa.safetensors", "pissa"),
        ("init_olora.safetensors", "olora"),
    ] {
        let st = fixture(file);
        let w = st.get("base.weight").unwrap();
        let mut cfg = AdapterConfig::lora(4, 8.0, &["layer"]);
        cfg.init_lora_weights = postforge::peft::InitSpec::Method(init.into());
        let mut l = AdaptedLayer::new("layer", BaseKind::Linear, w.clone(), None).unwrap();
        l.add_adapter("default", &cfg, 0).unwrap();
        check(
            &format!("{init} residual"),
            &l.weight().unwrap(),
            &st.get("residual").unwrap(),
        );
        let ad = &l.lora("default").unwrap();
        let (a, b) = sign_aligned(
            ad.a.as_tensor(),
            ad.b.as_tensor(),
            &st.get("lora_A").unwrap(),
        );
        check(&format!("{init} A"), &a, &st.get("lora_A").unwrap());
        check(&format!("{init} B"), &b, &st.get("lora_B").unwrap());
        // The adapted layer still computes the original W.
        let x = randn(&[5, 16], 1.0, "px");
        let y = l.forward(&x, &ForwardCtx::eval_with_grad()).unwrap();
        check(
            &format!("{init} output = original"),
            &y,
            &x.matmul(&w.t().unwrap()).unwrap(),
        );
    }
}

#[test]
fn fast_pissa_approximates_exact_pissa_like_peft() {
    let st = fixture("init_pissa_niter_4.safetensors");
    let exact = fixture("init_pissa.safetensors");
    let w = st.get("base.weight").unwrap();
    let mut cfg = AdapterConfig::lora(4, 8.0, &["layer"]);
    cfg.init_lora_weights = postforge::peft::InitSpec::Method("pissa_niter_4".into());
    let mut l = AdaptedLayer::new("layer", BaseKind::Linear, w.clone(), None).unwrap();
    l.add_adapter("default", &cfg, 0).unwrap();
    let ad = &l.lora("default").unwrap();
    let (a, b) = (ad.a.as_tensor(), ad.b.as_tensor());
    // Structure PEFT's randomized PiSSA has too: residual + s·B·A = W, and BᵀB = A·Aᵀ = S/s (diagonal).
    let recon = (&l.weight().unwrap() + (b.matmul(a).unwrap() * 2.0).unwrap()).unwrap();
    assert!(rel_err(&recon, &w) < 1e-5);
    let btb = b.t().unwrap().matmul(b).unwrap();
    let aat = a.matmul(&a.t().unwrap()).unwrap();
    assert!(rel_err(&btb, &aat) < 1e-4, "BᵀB != AAᵀ");
    let off = (&btb
        - Tensor::eye(4, DType::F32, &candle_core::Device::Cpu)
            .unwrap()
            .mul(&btb)
            .unwrap())
    .unwrap();
    assert!(
        off.abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
            < 1e-4,
        "BᵀB not diagonal"
    );
    // How close to the exact top-4 subspace: ours vs PEFT's own randomized result.
    let ours = (&w - &l.weight().unwrap()).unwrap();
    let peft = (&w - st.get("residual").unwrap()).unwrap();
    let truth = (&w - exact.get("residual").unwrap()).unwrap();
    let (e_ours, e_peft) = (rel_err(&ours, &truth), rel_err(&peft, &truth));
    eprintln!("randomized PiSSA (niter 4) error vs exact: ours {e_ours:.3}, PEFT {e_peft:.3}");
    assert!(e_ours <= e_peft.max(0.5), "ours {e_ours}, peft {e_peft}");
}

struct Net {
    layers: Vec<(AdaptedLayer, AdaptedLayer)>,
    head: AdaptedLayer,
}

impl Net {
    fn load(dir: Option<&str>) -> Net {
        let st = fixture("peft_net/base.safetensors");
        let lin = |p: &str| {
            AdaptedLayer::new(
                p,
                BaseKind::Linear,
                st.get(&format!("{p}.weight")).unwrap(),
                st.get(&format!("{p}.bias")).ok(),
            )
            .unwrap()
        };
        let mut net = Net {
            layers: (0..2)
                .map(|i| {
                    (
                        lin(&format!("layers.{i}.q_proj")),
                        lin(&format!("layers.{i}.v_proj")),
                    )
                })
                .collect(),
            head: lin("head"),
        };
        if let Some(d) = dir {
            let mut refs: Vec<&mut AdaptedLayer> = vec![];
            for (q, v) in &mut net.layers {
                refs.push(q);
                refs.push(v);
            }
            refs.push(&mut net.head);
            files::load(
                &Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("tests/fixtures/peft_net")
                    .join(d),
                &mut refs,
                "default",
            )
            .unwrap();
        }
        net
    }
    fn forward(&self, x: &Tensor) -> Tensor {
        let c = ForwardCtx::eval_with_grad();
        let mut h = x.clone();
        for (q, v) in &self.layers {
            let u = q.forward(&h, &c).unwrap().tanh().unwrap();
            h = (h + v.forward(&u, &c).unwrap()).unwrap();
        }
        self.head.forward(&h, &c).unwrap()
    }
}

#[test]
fn folders_saved_by_peft_load_and_give_peft_outputs() {
    let io = fixture("peft_net/io.safetensors");
    let x = io.get("x").unwrap();
    check(
        "base net",
        &Net::load(None).forward(&x),
        &io.get("y_base").unwrap(),
    );
    let lora = Net::load(Some("lora"));
    // rank_pattern {"v_proj": 2} and alpha_pattern {"layers.1.q_proj": 16} were honoured.
    assert_eq!(lora.layers[0].1.lora("default").unwrap().r, 2);
    assert_eq!(lora.layers[1].0.lora("default").unwrap().scale, 4.0);
    assert!(lora.head.trainable_copy().is_some(), "modules_to_save head");
    check("lora net", &lora.forward(&x), &io.get("y_lora").unwrap());
    check(
        "dora net",
        &Net::load(Some("dora")).forward(&x),
        &io.get("y_dora").unwrap(),
    );
}

#[test]
fn targeting_matches_peft() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/targeting.json");
    let d: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let names: Vec<String> = serde_json::from_value(d["names"].clone()).unwrap();
    let mut checked = 0;
    for case in d["cases"].as_array().unwrap() {
        let cfg: AdapterConfig = serde_json::from_value(case["config"].clone()).unwrap();
        cfg.validate().unwrap();
        for n in &names {
            let want = case["targeted"][n].as_bool().unwrap();
            let got = cfg.targets(n, ModuleKind::Linear, false).unwrap();
            assert_eq!(got, want, "config {} on `{n}`", case["config"]);
            checked += 1;
        }
    }
    assert!(checked > 100);
    let p = &d["patterns"];
    // In file order (PEFT's dict order), and after a save (PEFT writes sorted keys).
    let cfg: AdapterConfig = serde_json::from_value(p["config"].clone()).unwrap();
    let saved: AdapterConfig = serde_json::from_str(&cfg.to_json().unwrap()).unwrap();
    for (c, key) in [(&cfg, "resolved"), (&saved, "resolved_sorted_keys")] {
        for (name, want) in p[key].as_object().unwrap() {
            let s = c.settings_for(name).unwrap();
            assert_eq!(
                s.r as u64,
                want["r"].as_u64().unwrap(),
                "{key}: rank of {name}"
            );
            assert_eq!(
                s.alpha,
                want["alpha"].as_f64().unwrap(),
                "{key}: alpha of {name}"
            );
        }
    }
}

#[test]
fn adamw_and_schedules_match_torch_and_transformers() {
    use postforge::train::{AdamW, AdamWConfig, Schedule, ScheduleKind};
    use std::collections::BTreeMap;
    let st = fixture("adamw.safetensors");
    for sched in [false, true] {
        let pre = if sched { "sched." } else { "" };
        let params: Vec<(String, Var)> = ["p0", "p1"]
            .iter()
            .map(|p| {
                (
                    p.to_string(),
                    Var::from_tensor(&st.get(&format!("init.{p}")).unwrap()).unwrap(),
                )
            })
            .collect();
        let mut opt = AdamW::new(
            params.clone(),
            AdamWConfig {
                beta1: 0.9,
                beta2: 0.999,
                eps: 1e-8,
                weight_decay: 0.1,
            },
        )
        .unwrap();
        let s = Schedule {
            kind: ScheduleKind::Cosine,
            base_lr: 1e-2,
            warmup: 2,
            total: 6,
        };
        let lrs = st.get("sched.lr").unwrap().to_vec1::<f32>().unwrap();
        for t in 1..=6 {
            let g: BTreeMap<String, Tensor> = ["p0", "p1"]
                .iter()
                .map(|p| (p.to_string(), st.get(&format!("grad.{t}.{p}")).unwrap()))
                .collect();
            let (lr, scale) = if sched {
                let norm = postforge::train::trainer::global_norm(&g).unwrap();
                assert!(
                    (s.lr(t - 1) as f32 - lrs[t - 1]).abs() < 1e-9,
                    "lr at step {t}"
                );
                (
                    s.lr(t - 1),
                    if norm > 1.0 { 1.0 / (norm + 1e-6) } else { 1.0 },
                )
            } else {
                (1e-2, 1.0)
            };
            opt.step(&g, lr, scale).unwrap();
            for (n, v) in &params {
                let want = st.get(&format!("{pre}step.{t}.{n}")).unwrap();
                let e = max_abs_diff(v.as_tensor(), &want);
                assert!(e < 2e-6, "{pre}step {t} {n}: {e}");
            }
        }
    }
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/schedules.json");
    let d: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    for (key, kind) in [
        ("constant_with_warmup", ScheduleKind::Constant),
        ("linear_with_warmup", ScheduleKind::Linear),
        ("cosine_with_warmup", ScheduleKind::Cosine),
    ] {
        let s = Schedule {
            kind,
            base_lr: 1.0,
            warmup: 4,
            total: 20,
        };
        for (i, v) in d["schedules"][key].as_array().unwrap().iter().enumerate() {
            assert!(
                (s.lr(i) - v.as_f64().unwrap()).abs() < 1e-12,
                "{key} at {i}"
            );
        }
    }
}

#[test]
fn saved_configs_carry_only_the_fields_of_their_peft_class() {
    // PEFT warns about keys its config class does not declare (IA3Config has no layers_pattern /
    // layers_to_transform, VeraConfig no exclude_modules), and fills peft_version.
    let ia3: AdapterConfig = serde_json::from_value(serde_json::json!({
        "peft_type": "IA3", "target_modules": ["k_proj", "down_proj"],
        "feedforward_modules": ["down_proj"]
    }))
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&ia3.to_json().unwrap()).unwrap();
    let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
    for k in [
        "layers_pattern",
        "layers_to_transform",
        "r",
        "lora_alpha",
        "rank_pattern",
    ] {
        assert!(
            !keys.iter().any(|x| *x == k),
            "IA3 config carries `{k}`: {keys:?}"
        );
    }
    assert_eq!(v["peft_version"], "0.21.2");
    assert_eq!(v["feedforward_modules"], serde_json::json!(["down_proj"]));
    // A setting the class cannot carry is refused, not dropped.
    let mut bad = ia3.clone();
    bad.layers_to_transform = serde_json::from_value(serde_json::json!([0])).unwrap();
    let e = bad.validate().unwrap_err().to_string();
    assert!(
        e.contains("layers_to_transform") && e.contains("IA3"),
        "{e}"
    );
    let vera: AdapterConfig = serde_json::from_value(serde_json::json!({
        "peft_type": "VERA", "target_modules": ["q_proj"], "exclude_modules": ["x"]
    }))
    .unwrap();
    let e = vera.to_json().unwrap_err().to_string();
    assert!(e.contains("exclude_modules"), "{e}");
    // A LoRA config keeps its LoRA fields and a version read from a file.
    let lora: AdapterConfig = serde_json::from_value(serde_json::json!({
        "peft_type": "LORA", "r": 4, "target_modules": ["q_proj"], "layers_to_transform": [1],
        "layers_pattern": "layers", "peft_version": "0.17.0"
    }))
    .unwrap();
    let v: serde_json::Value = serde_json::from_str(&lora.to_json().unwrap()).unwrap();
    assert_eq!(v["layers_to_transform"], serde_json::json!([1]));
    assert_eq!(v["peft_version"], "0.17.0");
}
