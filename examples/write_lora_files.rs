//! Writes kohya and diffusers LoRA files for the tiny SD1-like fixture U-Net, for
//! `scripts/fixtures/check_lora_files.py` to load with diffusers.
//!
//! `cargo run --release --example write_lora_files -- OUT_DIR` writes, for `lora`, `lora_alphas`
//! (per-module alphas) and `dora`:
//! `<name>_kohya.safetensors`, `<name>_diffusers.safetensors`, `<name>_io.safetensors` (inputs and
//! postforge's adapted prediction) and `<name>_merged.safetensors` (the U-Net with the LoRA merged,
//! diffusers tensor names).

use candle_core::Tensor;
use postforge::models::unet::{UNet2DConditionModel, UNetConfig};
use postforge::models::Weights;
use postforge::peft::formats::lora_file::{LoraFile, LoraFormat};
use postforge::peft::{Adapted, AdapterConfig, AdapterPlan, ForwardCtx, InitSpec};
use postforge::util::save_safetensors;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

fn main() -> anyhow::Result<()> {
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "runs/lora_files".into()),
    );
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/unet/sd1");
    let ucfg = UNetConfig::from_file(&dir.join("config.json"))?;
    let wfile = dir.join("diffusion_pytorch_model.safetensors");
    for name in ["lora", "lora_alphas", "dora"] {
        let mut cfg = AdapterConfig::lora(
            4,
            8.0,
            &[
                "to_q",
                "to_k",
                "to_v",
                "to_out.0",
                "ff.net.0.proj",
                "ff.net.2",
                "proj_in",
                "proj_out",
            ],
        );
        cfg.init_lora_weights = InitSpec::Bool(false);
        cfg.rank_pattern.insert("ff.net.2".into(), 2);
        if name == "lora_alphas" {
            // Per-module alphas: diffusers reads them from lora_adapter_metadata.
            cfg.alpha_pattern.insert("to_v".into(), 2.0);
        }
        cfg.use_dora = name == "dora";
        let model = UNet2DConditionModel::new(
            &ucfg,
            &Weights::from_files(std::slice::from_ref(&wfile), AdapterPlan::single(cfg, 4)?)?,
        )?;
        let mut rng = postforge::rng::rng_for(5, name);
        let x = postforge::rng::normal(&[2, 4, 8, 8], 1.0, &mut rng)?;
        let c = postforge::rng::normal(&[2, 5, 32], 1.0, &mut rng)?;
        let t = Tensor::new(&[50f32, 800.], &candle_core::Device::Cpu)?;
        let y = model.forward(&x, &t, &c, None, &ForwardCtx::eval())?;
        let mut f = LoraFile::default();
        f.add_layers("unet", &model.layers(), "default")?;
        std::fs::create_dir_all(&out)?;
        f.write(
            &out.join(format!("{name}_kohya.safetensors")),
            LoraFormat::Kohya,
        )?;
        f.write(
            &out.join(format!("{name}_diffusers.safetensors")),
            LoraFormat::Diffusers,
        )?;
        let io = BTreeMap::from([
            ("sample".to_string(), x),
            ("timestep".into(), t),
            ("encoder_hidden_states".into(), c),
            ("out".into(), y),
        ]);
        save_safetensors(&out.join(format!("{name}_io.safetensors")), &io, None)?;
        postforge::peft::merge::merge_and_unload(
            &model.layers(),
            &wfile,
            &out.join(format!("{name}_merged.safetensors")),
        )?;
        println!("wrote {}/{name}_*.safetensors", out.display());
    }
    Ok(())
}
