//! U-Net training-step and sampling speed on a tiny-sd-like config (pixel space, 32x32) and a
//! mid-size config, LoRA vs full training, and how much of a step candle's conv backward takes.
//!
//! `cargo bench --bench unet` prints medians of interleaved runs.

use candle_core::{Device, Tensor};
use postforge::models::unet::{UNet2DConditionModel, UNetConfig};
use postforge::models::Weights;
use postforge::peft::{AdapterConfig, AdapterPlan, ForwardCtx};
use std::time::Instant;

fn config(boc: &[usize], sample: usize, ch: usize, cross: usize) -> UNetConfig {
    serde_json::from_value(serde_json::json!({
        "sample_size": sample, "in_channels": ch, "out_channels": ch,
        "block_out_channels": boc, "layers_per_block": 1,
        "down_block_types": boc.iter().enumerate().map(|(i, _)| if i + 1 < boc.len() { "CrossAttnDownBlock2D" } else { "DownBlock2D" }).collect::<Vec<_>>(),
        "up_block_types": boc.iter().enumerate().map(|(i, _)| if i == 0 { "UpBlock2D" } else { "CrossAttnUpBlock2D" }).collect::<Vec<_>>(),
        "cross_attention_dim": cross, "attention_head_dim": 4, "norm_num_groups": 8,
    }))
    .unwrap()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

fn main() {
    postforge::util::runtime::init();
    let mut low_attn = config(&[32, 64, 64], 32, 3, 64);
    low_attn.down_block_types = vec![
        "DownBlock2D".into(),
        "CrossAttnDownBlock2D".into(),
        "CrossAttnDownBlock2D".into(),
    ];
    low_attn.up_block_types = vec![
        "CrossAttnUpBlock2D".into(),
        "CrossAttnUpBlock2D".into(),
        "UpBlock2D".into(),
    ];
    let cases = [
        (
            "tiny-sd, attention at 16x16 and 8x8 only, batch 8",
            low_attn.clone(),
            8,
            32,
        ),
        (
            "tiny-sd (32,64,64) @32x32, batch 8",
            config(&[32, 64, 64], 32, 3, 64),
            8usize,
            32usize,
        ),
        (
            "mid (64,128,256) @32x32, batch 4",
            config(&[64, 128, 256], 32, 4, 128),
            4,
            32,
        ),
        (
            "main job: tiny-sd, LoCon r16 on the resnet and sampler convs, batch 8",
            low_attn,
            8,
            32,
        ),
    ];
    // POSTFORGE_BENCH_CASE=i runs one case, POSTFORGE_BENCH_MODE=lora|full one model and no
    // sampling: the peak RSS printed at the end is then that training step's (compare it with
    // scripts/bench/unet_diffusers.py --case i --mode lora).
    let only_case: Option<usize> = std::env::var("POSTFORGE_BENCH_CASE")
        .ok()
        .and_then(|v| v.parse().ok());
    let mode = std::env::var("POSTFORGE_BENCH_MODE").unwrap_or_else(|_| "all".into());
    for (ci, (name, cfg, batch, hw)) in cases.into_iter().enumerate() {
        if only_case.is_some_and(|c| c != ci) {
            continue;
        }
        // Case 3 is the main job's adapter (pipelines/style-lora.toml: LyCORIS's
        // unet-convblock-only preset, LoCon dim 16, alpha 16); the others adapt attention.
        let lora = if ci == 3 {
            AdapterConfig::lora(16, 16.0, &["conv1", "conv2", "conv", "conv_shortcut"])
        } else {
            AdapterConfig::lora(
                8,
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
            )
        };
        let plans = [
            (
                if ci == 3 {
                    "LoCon r16 (convs)"
                } else {
                    "LoRA r8 (attention)"
                },
                AdapterPlan::single(lora, 0).unwrap(),
            ),
            (
                "full training",
                AdapterPlan {
                    full_training: true,
                    ..AdapterPlan::none()
                },
            ),
        ];
        let models: Vec<(&str, UNet2DConditionModel)> = plans
            .into_iter()
            .filter(|(n, _)| {
                mode == "all" || ((mode == "lora" || mode == "sample") == !n.starts_with("full"))
            })
            .map(|(n, p)| {
                (
                    n,
                    UNet2DConditionModel::new(&cfg, &Weights::fresh(1, p)).unwrap(),
                )
            })
            .collect();
        let mut rng = postforge::rng::rng_for(2, "unet-bench");
        let x = postforge::rng::normal(&[batch, cfg.in_channels, hw, hw], 1.0, &mut rng).unwrap();
        let c = postforge::rng::normal(&[batch, 8, cross_dim(&cfg)], 1.0, &mut rng).unwrap();
        let t = Tensor::from_vec(vec![500f32; batch], batch, &Device::Cpu).unwrap();
        let mut times = vec![vec![]; models.len()];
        let mut fwd = vec![];
        // POSTFORGE_BENCH_MODE=sample: sampling only (for a profile of inference).
        let rounds = if mode == "sample" { 0 } else { 5 };
        for round in 0..rounds {
            for (i, (_, m)) in models.iter().enumerate() {
                let t0 = Instant::now();
                let y = m
                    .forward(&x, &t, &c, None, &ForwardCtx::train(0, round))
                    .unwrap();
                let f = t0.elapsed().as_secs_f64();
                let _ = y.sqr().unwrap().mean_all().unwrap().backward().unwrap();
                if round > 0 {
                    times[i].push(t0.elapsed().as_secs_f64());
                    if i == 0 {
                        fwd.push(f);
                    }
                }
            }
        }
        let mut line = format!("{name}:");
        if rounds > 0 {
            for (i, (n, _)) in models.iter().enumerate() {
                line += &format!(" train step {n} {:.0} ms;", median(times[i].clone()) * 1e3);
            }
            line += &format!(" fwd {:.0} ms", median(fwd.clone()) * 1e3);
        }
        if mode == "all" || mode == "sample" {
            // Sampling: 20 steps with CFG (batch doubled), the LoRA model, no gradients.
            let t0 = Instant::now();
            let steps = 20;
            for _ in 0..steps {
                let xx = Tensor::cat(&[&x, &x], 0).unwrap();
                let cc = Tensor::cat(&[&c, &c], 0).unwrap();
                let tt = Tensor::cat(&[&t, &t], 0).unwrap();
                let _ = models[0]
                    .1
                    .forward(&xx, &tt, &cc, None, &ForwardCtx::eval())
                    .unwrap();
            }
            let sample_s = t0.elapsed().as_secs_f64();
            line += &format!(
                "; sampling {steps} CFG steps for {batch} images {sample_s:.2} s ({:.1} images/s)",
                batch as f64 / sample_s
            );
        }
        eprintln!("{line}");
    }
    if let Ok(st) = std::fs::read_to_string("/proc/self/status") {
        if let Some(l) = st.lines().find(|l| l.starts_with("VmHWM")) {
            eprintln!("peak RSS: {}", l.trim_start_matches("VmHWM:").trim());
        }
    }
    if mode != "all" {
        return;
    }
    // candle's conv backward: one 3x3 conv, 64->64 channels at 32x32, batch 8.
    let mut rng = postforge::rng::rng_for(3, "conv");
    let w = candle_core::Var::from_tensor(
        &postforge::rng::normal(&[64, 64, 3, 3], 0.05, &mut rng).unwrap(),
    )
    .unwrap();
    let xv = candle_core::Var::from_tensor(
        &postforge::rng::normal(&[8, 64, 32, 32], 1.0, &mut rng).unwrap(),
    )
    .unwrap();
    let (mut f, mut fb) = (vec![], vec![]);
    for _ in 0..5 {
        let t0 = Instant::now();
        let y = xv.as_tensor().conv2d(w.as_tensor(), 1, 1, 1, 1).unwrap();
        f.push(t0.elapsed().as_secs_f64());
        let _ = y.sum_all().unwrap().backward().unwrap();
        fb.push(t0.elapsed().as_secs_f64());
    }
    eprintln!("conv 3x3 64->64 @32x32 batch 8: forward {:.1} ms, forward+backward {:.1} ms (backward/forward {:.1}x)", median(f.clone()) * 1e3, median(fb.clone()) * 1e3, (median(fb) - median(f.clone())) / median(f));
}

fn cross_dim(cfg: &UNetConfig) -> usize {
    match &cfg.cross_attention_dim {
        postforge::models::unet::config::PerBlock::One(c) => *c,
        postforge::models::unet::config::PerBlock::Many(v) => v[0],
    }
}
