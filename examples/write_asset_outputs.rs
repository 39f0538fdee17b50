//! Runs the shipped models under `assets/models/` on fixed inputs and writes postforge's outputs,
//! for `scripts/fixtures/check_assets.py` to compare with diffusers / transformers loading the same
//! folders.
//!
//! `cargo run --release --example write_asset_outputs -- OUT_DIR` writes
//! `OUT_DIR/tiny_sd.safetensors` (prompt token ids, text-encoder hidden states, a U-Net input, its
//! timestep and the U-Net's prediction, without and with the shipped striped LoCon
//! `assets/loras/striped`, the 20 DDIM timesteps of the scheduler) and
//! `OUT_DIR/tiny_chat.safetensors` (the token ids of a chat text and the model's logits).

use candle_core::{DType, Device, Tensor};
use postforge::diffusion::pipeline::Pipeline;
use postforge::diffusion::sampler::{Sampler, SamplerKind};
use postforge::models::llama::{Inputs, LlamaForCausalLM};
use postforge::peft::{AdapterPlan, ForwardCtx};
use postforge::util::save_safetensors;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Deterministic values in [-1, 1] (no RNG: the Python side does not need to reproduce one).
fn wave(shape: &[usize], phase: f64) -> postforge::Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|i| ((i as f64 * 0.37 + phase).sin() * 0.9) as f32)
        .collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

fn tiny_sd(out: &Path) -> postforge::Result<()> {
    let p = Pipeline::load(
        Path::new("assets/models/tiny-sd"),
        AdapterPlan::none(),
        AdapterPlan::none(),
    )?;
    let ctx = ForwardCtx::eval();
    let prompts = vec![
        "a red circle on the left, black background".to_string(),
        "a blue square in the center, white background".to_string(),
    ];
    let ids = p.tokenizer.encode(&prompts, &Device::Cpu)?;
    let hidden = p.encode(&prompts, &ctx)?;
    let size = p.unet.config().sample_size;
    let x = wave(&[2, p.unet.config().in_channels, size, size], 0.0)?;
    let t = Tensor::new(&[999f32, 500.0], &Device::Cpu)?;
    let pred = p.unet.forward(&x, &t, &hidden, None, &ctx)?;
    // The shipped striped LoCon (assets/loras/striped) on the same inputs.
    let lp = postforge::diffusion::eval::load_with_lora(
        Path::new("assets/models/tiny-sd"),
        Path::new("assets/loras/striped/striped.safetensors"),
    )?;
    let lora_pred = lp.unet.forward(&x, &t, &hidden, None, &ctx)?;
    let sampler = Sampler::new(SamplerKind::parse("ddim")?, &p.scheduler, 20)?;
    let steps: Vec<f32> = sampler.timesteps().iter().map(|v| *v as f32).collect();
    let n = steps.len();
    let tensors = BTreeMap::from([
        ("input_ids".to_string(), ids.to_dtype(DType::I64)?),
        ("text_hidden".to_string(), hidden),
        ("sample".to_string(), x),
        ("timestep".to_string(), t),
        ("unet_out".to_string(), pred),
        ("unet_lora_out".to_string(), lora_pred),
        (
            "ddim_timesteps_20".to_string(),
            Tensor::from_vec(steps, n, &Device::Cpu)?,
        ),
    ]);
    save_safetensors(&out.join("tiny_sd.safetensors"), &tensors, None)
}

fn tiny_chat(out: &Path) -> postforge::Result<()> {
    let dir = Path::new("assets/models/tiny-chat");
    let tok = tokenizers::Tokenizer::from_file(dir.join("tokenizer.json"))
        .map_err(|e| postforge::Error::Msg(format!("tokenizer.json: {e}")))?;
    let text = "<|im_start|>user\nwhat is 3 plus 4?<|im_end|>\n<|im_start|>assistant\n";
    let enc = tok
        .encode(text, false)
        .map_err(|e| postforge::Error::Msg(format!("tokenizing: {e}")))?;
    let ids: Vec<u32> = enc.get_ids().to_vec();
    let n = ids.len();
    let ids = Tensor::from_vec(ids, (1, n), &Device::Cpu)?;
    let m = LlamaForCausalLM::load(dir, AdapterPlan::none())?;
    let logits = m.forward(&ids, &Inputs::default(), &ForwardCtx::eval())?;
    let tensors = BTreeMap::from([
        ("input_ids".to_string(), ids.to_dtype(DType::I64)?),
        ("logits".to_string(), logits),
    ]);
    save_safetensors(&out.join("tiny_chat.safetensors"), &tensors, None)
}

fn main() -> anyhow::Result<()> {
    let out = PathBuf::from(
        std::env::args()
            .nth(1)
            .unwrap_or_else(|| "runs/assets_check".into()),
    );
    std::fs::create_dir_all(&out)?;
    tiny_sd(&out)?;
    tiny_chat(&out)?;
    println!("wrote {}", out.display());
    Ok(())
}
