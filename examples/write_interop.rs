//! Writes postforge adapter folders for the `peft_net` fixture network, for
//! `scripts/fixtures/check_postforge_folders.py` to load with `PeftModel.from_pretrained`.
//!
//! `cargo run --release --example write_interop -- OUT_DIR` writes, for each of `lora`, `dora`,
//! `pissa_as_lora` (PiSSA exported as plain LoRA against the original base), `ia3`, `loha`, `lokr`
//! and `vera`, `OUT_DIR/<name>/` with
//! the PEFT folder, `postforge_io.safetensors` (x and postforge's output) and `merged.safetensors`
//! (merge-and-unload of the original base).

use candle_core::Tensor;
use postforge::peft::formats::peft::{self as files, SaveOptions};
use postforge::peft::{AdaptedLayer, AdapterConfig, AdapterPlan, ForwardCtx, InitSpec};
use postforge::util::{save_safetensors, SafeTensors};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

struct Net {
    layers: Vec<AdaptedLayer>,
}

impl Net {
    fn new(base: &BTreeMap<String, Tensor>, plan: &AdapterPlan) -> postforge::Result<Self> {
        let mut layers = vec![];
        for p in [
            "layers.0.q_proj",
            "layers.0.v_proj",
            "layers.1.q_proj",
            "layers.1.v_proj",
            "head",
        ] {
            let w = base[&format!("{p}.weight")].clone();
            let b = base.get(&format!("{p}.bias")).cloned();
            layers.push(plan.apply(AdaptedLayer::new(
                p,
                postforge::peft::BaseKind::Linear,
                w,
                b,
            )?)?);
        }
        Ok(Self { layers })
    }
    fn forward(&self, x: &Tensor) -> postforge::Result<Tensor> {
        let c = ForwardCtx::eval();
        let mut h = x.clone();
        for i in 0..2 {
            let u = self.layers[2 * i].forward(&h, &c)?.tanh()?;
            h = (h + self.layers[2 * i + 1].forward(&u, &c)?)?;
        }
        self.layers[4].forward(&h, &c)
    }
}

fn main() -> anyhow::Result<()> {
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "runs/interop".into()),
    );
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/peft_net");
    let base_file = fixtures.join("base.safetensors");
    let base = SafeTensors::read(&base_file)?.into_tensors();
    let x = SafeTensors::read(fixtures.join("io.safetensors"))?.get("x")?;
    for name in [
        "lora",
        "dora",
        "pissa_as_lora",
        "ia3",
        "loha",
        "lokr",
        "vera",
    ] {
        let mut cfg = AdapterConfig::lora(4, 8.0, &["q_proj", "v_proj"]);
        match name {
            "ia3" | "loha" | "lokr" | "vera" => {
                let mut v = serde_json::json!({
                    "peft_type": name.to_uppercase(), "r": 4, "lora_alpha": 8.0,
                    "target_modules": ["q_proj", "v_proj"],
                });
                if name == "ia3" {
                    v["feedforward_modules"] = serde_json::json!(["v_proj"]);
                }
                cfg = serde_json::from_value(v)?;
            }
            "lora" => {
                cfg.init_lora_weights = InitSpec::Bool(false);
                cfg.modules_to_save = Some(vec!["head".into()]);
                cfg.rank_pattern.insert("v_proj".into(), 2);
                cfg.alpha_pattern.insert("layers.1.q_proj".into(), 16.0);
            }
            "dora" => {
                cfg.init_lora_weights = InitSpec::Bool(false);
                cfg.use_dora = true;
            }
            _ => cfg.init_lora_weights = InitSpec::Method("pissa".into()),
        }
        let mut net = Net::new(&base, &AdapterPlan::single(cfg.clone(), 3)?)?;
        if name == "vera" {
            let mut refs: Vec<&mut AdaptedLayer> = net.layers.iter_mut().collect();
            postforge::peft::vera::share_vera_projections(&mut refs, "default", 3, None)?;
        }
        // Move every factor away from its initial value, as training would.
        for l in &mut net.layers {
            for (i, (_, v)) in l.named_vars().into_iter().enumerate() {
                let noise = postforge::rng::normal(
                    v.dims(),
                    0.05,
                    &mut postforge::rng::rng_for(i as u64, l.path()),
                )?;
                v.set(&(v.as_tensor() + noise)?)?;
            }
        }
        let dir = out.join(name);
        let layers: Vec<&AdaptedLayer> = net.layers.iter().collect();
        files::save(
            &dir,
            &layers,
            "default",
            &cfg,
            SaveOptions {
                plain_lora: name == "pissa_as_lora",
            },
        )?;
        let y = net.forward(&x)?;
        save_safetensors(
            &dir.join("postforge_io.safetensors"),
            &BTreeMap::from([("x".to_string(), x.clone()), ("y".to_string(), y)]),
            None,
        )?;
        // Merged checkpoint of the ORIGINAL base: from the folder alone (the exported PiSSA adapter
        // applies to the unmodified base).
        postforge::peft::merge::merge_folder_into_checkpoint(
            &base_file,
            &dir,
            &dir.join("merged.safetensors"),
        )?;
        println!("wrote {}", dir.display());
    }
    Ok(())
}
