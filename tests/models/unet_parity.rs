//! U-Net parity with diffusers 0.42.1 + PEFT 0.21.2 (fixtures from `scripts/fixtures/make_unet_fixtures.py`):
//! a tiny SD1-like (1x1-conv projections, legacy head count) and SDXL-like (linear projections,
//! two transformer layers, text_time conditioning) UNet2DConditionModel. Noise prediction and LoRA
//! gradients within 1e-4 relative.

use crate::common::*;
use candle_core::Tensor;
use postforge::models::unet::{AddedCond, UNet2DConditionModel, UNetConfig};
use postforge::models::Weights;
use postforge::peft::{Adapted, AdapterConfig, AdapterPlan, ForwardCtx, InitSpec};
use postforge::util::SafeTensors;
use std::path::{Path, PathBuf};

const TARGETS: [&str; 8] = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "ff.net.0.proj",
    "ff.net.2",
    "proj_in",
    "proj_out",
];

fn dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/unet")
        .join(name)
}

fn load(name: &str, plan: AdapterPlan) -> UNet2DConditionModel {
    let cfg = UNetConfig::from_file(&dir(name).join("config.json")).unwrap();
    let w = Weights::from_files(
        &[dir(name).join("diffusion_pytorch_model.safetensors")],
        plan,
    )
    .unwrap();
    UNet2DConditionModel::new(&cfg, &w).unwrap()
}

fn run(model: &UNet2DConditionModel, io: &SafeTensors) -> Tensor {
    let (te, ti) = (io.get("text_embeds").ok(), io.get("time_ids").ok());
    let added = match (&te, &ti) {
        (Some(t), Some(i)) => Some(AddedCond {
            text_embeds: t,
            time_ids: i,
        }),
        _ => None,
    };
    model
        .forward(
            &io.get("sample").unwrap(),
            &io.get("timestep").unwrap(),
            &io.get("encoder_hidden_states").unwrap(),
            added.as_ref(),
            &ForwardCtx::eval_with_grad(),
        )
        .unwrap()
}

#[test]
fn unet_noise_prediction_matches_diffusers() {
    for name in ["sd1", "sdxl"] {
        let io = SafeTensors::read(dir(name).join("io.safetensors")).unwrap();
        let model = load(name, AdapterPlan::none());
        let out = run(&model, &io);
        let e = rel_err(&out, &io.get("out").unwrap());
        assert!(e < 1e-4, "{name}: relative error {e:e}");
    }
}

#[test]
fn unet_lora_output_and_gradients_match_peft() {
    for name in ["sd1", "sdxl"] {
        let io = SafeTensors::read(dir(name).join("io.safetensors")).unwrap();
        let lora = SafeTensors::read(dir(name).join("lora.safetensors")).unwrap();
        let mut cfg = AdapterConfig::lora(4, 8.0, &TARGETS);
        cfg.init_lora_weights = InitSpec::Bool(false);
        let model = load(name, AdapterPlan::single(cfg, 0).unwrap());
        let mut n = 0;
        for l in model.layers() {
            if let Some(ad) = l.lora("default") {
                ad.a.set(&lora.get(&format!("{}.lora_A.weight", l.path())).unwrap())
                    .unwrap();
                ad.b.set(&lora.get(&format!("{}.lora_B.weight", l.path())).unwrap())
                    .unwrap();
                n += 1;
            }
        }
        let expected_layers = lora
            .keys()
            .filter(|k| k.ends_with(".lora_A.weight") && !k.starts_with("grad."))
            .count();
        assert_eq!(n, expected_layers, "{name}: adapted layer count");
        let out = run(&model, &io);
        let e = rel_err(&out, &lora.get("out_lora").unwrap());
        assert!(e < 1e-4, "{name}: LoRA output relative error {e:e}");
        let grads = (out * lora.get("g").unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for l in model.layers() {
            let Some(ad) = l.lora("default") else {
                continue;
            };
            for (which, v) in [("lora_A", &ad.a), ("lora_B", &ad.b)] {
                let key = format!("grad.{}.{which}.weight", l.path());
                let g = grads
                    .get(v.as_tensor())
                    .unwrap_or_else(|| panic!("{name}: no gradient for {key}"));
                let e = rel_err(g, &lora.get(&key).unwrap());
                assert!(e < 1e-4, "{name}: {key} relative error {e:e}");
            }
        }
    }
}
