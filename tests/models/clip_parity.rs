//! CLIP text encoder parity with transformers 5.24.0 + PEFT 0.21.2 (fixtures from
//! `scripts/fixtures/make_clip_fixtures.py`): hidden states, pooled output, penultimate layer, LoRA
//! gradients, for quick_gelu (SD1) and gelu (SD2) variants.

use crate::common::*;
use postforge::models::clip::{ClipTextConfig, ClipTextModel};
use postforge::models::Weights;
use postforge::peft::{Adapted, AdapterConfig, AdapterPlan, ForwardCtx, InitSpec};
use postforge::util::SafeTensors;
use std::path::Path;

#[test]
fn clip_text_encoder_matches_transformers_and_peft() {
    for name in ["text_encoder", "text_encoder_gelu"] {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/clip")
            .join(name);
        let cfg = ClipTextConfig::from_file(&dir.join("config.json")).unwrap();
        let io = SafeTensors::read(dir.join("io.safetensors")).unwrap();
        let ids = io.get("input_ids").unwrap();
        let base = ClipTextModel::new(
            &cfg,
            &Weights::from_files(&[dir.join("model.safetensors")], AdapterPlan::none()).unwrap(),
        )
        .unwrap();
        let out = base.forward(&ids, &ForwardCtx::eval_with_grad()).unwrap();
        assert!(
            rel_err(
                &out.last_hidden_state,
                &io.get("last_hidden_state").unwrap()
            ) < 1e-5,
            "{name}: last_hidden_state"
        );
        assert!(
            rel_err(&out.pooled, &io.get("pooler_output").unwrap()) < 1e-5,
            "{name}: pooled"
        );
        let pen = &out.hidden_states[out.hidden_states.len() - 2];
        assert!(
            rel_err(pen, &io.get("hidden_states_penultimate").unwrap()) < 1e-5,
            "{name}: penultimate"
        );

        let mut lcfg = AdapterConfig::lora(
            4,
            8.0,
            &["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"],
        );
        lcfg.init_lora_weights = InitSpec::Bool(false);
        let model = ClipTextModel::new(
            &cfg,
            &Weights::from_files(
                &[dir.join("model.safetensors")],
                AdapterPlan::single(lcfg, 0).unwrap(),
            )
            .unwrap(),
        )
        .unwrap();
        for l in model.layers() {
            let Some(ad) = l.lora("default") else {
                continue;
            };
            ad.a.set(&io.get(&format!("lora.{}.lora_A.weight", l.path())).unwrap())
                .unwrap();
            ad.b.set(&io.get(&format!("lora.{}.lora_B.weight", l.path())).unwrap())
                .unwrap();
        }
        let y = model
            .forward(&ids, &ForwardCtx::eval_with_grad())
            .unwrap()
            .last_hidden_state;
        assert!(
            rel_err(&y, &io.get("lora_last_hidden_state").unwrap()) < 1e-5,
            "{name}: LoRA output"
        );
        let grads = (y * io.get("g").unwrap())
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for l in model.layers() {
            let Some(ad) = l.lora("default") else {
                continue;
            };
            for (w, v) in [("lora_A", &ad.a), ("lora_B", &ad.b)] {
                let key = format!("grad.{}.{w}.weight", l.path());
                let e = rel_err(grads.get(v.as_tensor()).unwrap(), &io.get(&key).unwrap());
                assert!(e < 1e-4, "{name}: {key} {e:e}");
            }
        }
    }
}
