//! AdaLoRA against PEFT 0.21.2 (fixture from `scripts/fixtures/make_adalora_fixtures.py`): eight
//! SGD steps with PEFT's orthogonality term in the loss and `update_and_allocate` after each:
//! every step's loss, the E vectors after every allocation (the pruning masks of the cubic budget
//! schedule), the final factors and the final rank pattern match; saving cuts the tensors to the
//! kept ranks and writes `rank_pattern` as PEFT does, and the saved folder loads back.

use crate::common::*;
use candle_core::Tensor;
use postforge::peft::adalora::{orth_regularizer, AdaloraSettings, RankAllocator};
use postforge::peft::formats::peft as peft_format;
use postforge::peft::{AdaptedLayer, AdapterConfig, AdapterPlan, ForwardCtx, ModuleSpec};
use postforge::util::SafeTensors;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/adalora")
}

fn config() -> AdapterConfig {
    let mut cfg = AdapterConfig::lora(8, 8.0, &[]);
    cfg.target_modules = Some(ModuleSpec::List(vec!["lin1".into(), "lin2".into()]));
    cfg.peft_type = "ADALORA".into();
    for (k, v) in [
        ("init_r", 4.0),
        ("target_r", 2.0),
        ("tinit", 1.0),
        ("tfinal", 2.0),
        ("total_step", 8.0),
        ("deltaT", 1.0),
        ("orth_reg_weight", 0.5),
    ] {
        let v = if k == "orth_reg_weight" {
            serde_json::json!(v)
        } else {
            serde_json::json!(v as u64)
        };
        cfg.extra.insert(k.into(), v);
    }
    cfg.validate().unwrap();
    cfg
}

#[test]
fn adalora_schedule_matches_peft() {
    let io = SafeTensors::read(dir().join("io.safetensors")).unwrap();
    let cfg = config();
    let plan = AdapterPlan::single(cfg.clone(), 0).unwrap();
    let g = |k: &str| io.get(k).unwrap();
    let mut lin1 = plan
        .linear("lin1", g("base.lin1.weight"), Some(g("base.lin1.bias")))
        .unwrap();
    let mut lin2 = plan
        .linear("lin2", g("base.lin2.weight"), Some(g("base.lin2.bias")))
        .unwrap();
    let set_all = |layers: &[&AdaptedLayer], prefix: &str| {
        for l in layers {
            for (name, v) in l.named_vars() {
                let key = name
                    .trim_start_matches("base_model.model.")
                    .replace(".default", "");
                v.set(&io.get(&format!("{prefix}.{key}")).unwrap()).unwrap();
            }
        }
    };
    set_all(&[&lin1.0, &lin2.0], "init");
    let settings = AdaloraSettings::from_config(&cfg).unwrap();
    let mut alloc = RankAllocator::new(&[&lin1.0, &lin2.0], "default", settings.clone()).unwrap();
    assert_eq!((alloc.init_bgt, alloc.target_bgt), (8, 4));
    let (x, target) = (g("x"), g("target"));
    let losses = g("losses").to_vec1::<f32>().unwrap();
    for step in 0..8usize {
        let ctx = ForwardCtx::train(0, step as u64);
        let y = lin2
            .forward(&lin1.forward(&x, &ctx).unwrap(), &ctx)
            .unwrap();
        let mse = (y - &target).unwrap().sqr().unwrap().mean_all().unwrap();
        let reg = orth_regularizer(&[&lin1.0, &lin2.0], "default")
            .unwrap()
            .unwrap();
        let loss = (mse + (reg * settings.orth_reg_weight).unwrap()).unwrap();
        let lv = loss.to_scalar::<f32>().unwrap();
        assert!(
            (lv - losses[step]).abs() < 1e-5 * losses[step].abs(),
            "step {step}: loss {lv} vs {}",
            losses[step]
        );
        let grads = loss.backward().unwrap();
        let mut by_name = BTreeMap::new();
        for l in [&lin1.0, &lin2.0] {
            for (name, v) in l.named_vars() {
                let gr = grads.get(v.as_tensor()).unwrap().clone();
                v.set(&(v.as_tensor() - (&gr * 0.05).unwrap()).unwrap())
                    .unwrap();
                by_name.insert(name, gr);
            }
        }
        alloc
            .update_and_allocate(&mut [&mut lin1.0, &mut lin2.0], step, &by_name)
            .unwrap();
        for l in [&lin1.0, &lin2.0] {
            for (name, v) in l.named_vars() {
                if name.contains("lora_E") {
                    let key = format!(
                        "step{step}.{}",
                        name.trim_start_matches("base_model.model.")
                            .replace(".default", "")
                    );
                    let want = io.get(&key).unwrap();
                    let e = max_abs_diff(v.as_tensor(), &want);
                    assert!(e < 1e-5, "{key}: differs by {e}");
                    // The pruned entries are exactly zero in both.
                    let zeros = |t: &Tensor| {
                        t.flatten_all()
                            .unwrap()
                            .to_vec1::<f32>()
                            .unwrap()
                            .iter()
                            .map(|v| *v == 0.0)
                            .collect::<Vec<_>>()
                    };
                    assert_eq!(zeros(v.as_tensor()), zeros(&want), "{key}: mask");
                }
            }
        }
    }
    let pattern = alloc.rank_pattern.clone().unwrap();
    let peft_cfg: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir().join("saved/adapter_config.json")).unwrap(),
    )
    .unwrap();
    for m in ["lin1", "lin2"] {
        assert_eq!(
            serde_json::json!(pattern[m]),
            peft_cfg["rank_pattern"][format!("{m}.lora_E")],
            "{m}: rank pattern"
        );
    }
    let kept: usize = pattern.values().flatten().filter(|k| **k).count();
    assert_eq!(kept, 4, "target_r 2 × 2 layers");
    for l in [&lin1.0, &lin2.0] {
        for (name, v) in l.named_vars() {
            let key = format!(
                "final.{}",
                name.trim_start_matches("base_model.model.")
                    .replace(".default", "")
            );
            let e = rel_err(v.as_tensor(), &io.get(&key).unwrap());
            assert!(e < 1e-4, "{key}: relative error {e:e}");
        }
    }
    // Save with the rank pattern: the same keys and shapes as PEFT's folder, which loads back.
    let mut saved_cfg = cfg.clone();
    let rp: serde_json::Map<String, serde_json::Value> = pattern
        .iter()
        .map(|(k, v)| (format!("{k}.lora_E"), serde_json::json!(v)))
        .collect();
    saved_cfg
        .extra
        .insert("adalora_rank_pattern".into(), serde_json::Value::Object(rp));
    let tmp = tempfile::tempdir().unwrap();
    peft_format::save(
        tmp.path(),
        &[&lin1.0, &lin2.0],
        "default",
        &saved_cfg,
        Default::default(),
    )
    .unwrap();
    let ours = SafeTensors::read(tmp.path().join("adapter_model.safetensors")).unwrap();
    let theirs = SafeTensors::read(dir().join("saved/adapter_model.safetensors")).unwrap();
    for k in theirs.keys() {
        let (a, b) = (ours.get(k).unwrap(), theirs.get(k).unwrap());
        assert_eq!(a.dims(), b.dims(), "{k}");
        assert!(rel_err(&a, &b) < 1e-4, "{k}");
    }
    assert_eq!(ours.keys().count(), theirs.keys().count());
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(tmp.path().join("adapter_config.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(json["rank_pattern"], peft_cfg["rank_pattern"]);
    // PEFT's folder loads onto fresh layers at the kept ranks and gives the trained output.
    let bare = AdapterPlan::none();
    let mut l1 = bare
        .linear("lin1", g("base.lin1.weight"), Some(g("base.lin1.bias")))
        .unwrap();
    let mut l2 = bare
        .linear("lin2", g("base.lin2.weight"), Some(g("base.lin2.bias")))
        .unwrap();
    peft_format::load(&dir().join("saved"), &mut [&mut l1.0, &mut l2.0], "default").unwrap();
    let ctx = ForwardCtx::eval_with_grad();
    let want = lin2
        .forward(&lin1.forward(&x, &ctx).unwrap(), &ctx)
        .unwrap();
    let got = l2.forward(&l1.forward(&x, &ctx).unwrap(), &ctx).unwrap();
    assert!(rel_err(&got, &want) < 1e-5);
}
