//! Parity with diffusers 0.42.1 schedulers (fixtures from `scripts/fixtures/make_diffusion_fixtures.py`):
//! schedules, timesteps, sigmas, scaled inputs and every step's outputs; training targets and min-SNR.

use crate::common::*;
use candle_core::{DType, Tensor};
use postforge::diffusion::objective::Objective;
use postforge::diffusion::sampler::{Sampler, SamplerKind};
use postforge::diffusion::{NoiseSchedule, Prediction, SchedulerConfig};
use postforge::util::SafeTensors;
use std::path::Path;

fn fixture(name: &str) -> SafeTensors {
    SafeTensors::read(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/diffusion")
            .join(format!("{name}.safetensors")),
    )
    .unwrap()
}

fn vec1(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn samplers_match_diffusers_step_by_step() {
    for case in [
        "ddim_sd15",
        "ddim_v_trailing_eta",
        "ddim_cos_linspace",
        "ddim_linear_clip",
        "euler_linspace",
        "euler_leading_v",
        "euler_ancestral",
        "euler_trailing",
    ] {
        let st = fixture(case);
        let meta = st.metadata();
        let cfg: SchedulerConfig = serde_json::from_str(&meta["config"]).unwrap();
        let n: usize = meta["num_inference_steps"].parse().unwrap();
        let kind = match SamplerKind::parse(&meta["scheduler_class"]).unwrap() {
            SamplerKind::Ddim { .. } => SamplerKind::Ddim {
                eta: meta["eta"].parse().unwrap(),
            },
            k => k,
        };
        let sched = NoiseSchedule::new(&cfg).unwrap();
        let ac =
            Tensor::from_slice(&sched.alphas_cumprod, 1000, &candle_core::Device::Cpu).unwrap();
        assert!(
            rel_err(&ac, &st.get("alphas_cumprod").unwrap()) < 1e-6,
            "{case}: alphas_cumprod {}",
            rel_err(&ac, &st.get("alphas_cumprod").unwrap())
        );
        let s = Sampler::new(kind, &cfg, n).unwrap();
        assert_eq!(
            s.timesteps(),
            vec1(&st.get("timesteps").unwrap()).as_slice(),
            "{case}: timesteps"
        );
        if let Ok(sig) = st.get("sigmas") {
            let ours = Tensor::from_slice(s.sigmas(), s.sigmas().len(), &candle_core::Device::Cpu)
                .unwrap();
            assert!(rel_err(&ours, &sig) < 1e-6, "{case}: sigmas");
            let init = vec1(&st.get("init_noise_sigma").unwrap())[0];
            assert!(
                (s.init_noise_sigma(&cfg) - init).abs() < 1e-5 * init,
                "{case}: init_noise_sigma"
            );
        }
        let mut x = st.get("x").unwrap();
        for i in 0..n {
            let xin = s.scale_model_input(&x, i).unwrap();
            assert!(
                rel_err(&xin, &st.get(&format!("input.{i}")).unwrap()) < 1e-5,
                "{case}: input {i}"
            );
            let noise = st.get(&format!("noise.{i}")).ok();
            let out = s
                .step(
                    &st.get(&format!("model_output.{i}")).unwrap(),
                    i,
                    &x,
                    noise.as_ref(),
                )
                .unwrap();
            let want = st.get(&format!("prev.{i}")).unwrap();
            let e = rel_err(&out.prev_sample, &want);
            assert!(e < 1e-5, "{case}: step {i} prev_sample error {e:e}");
            if let Ok(p) = st.get(&format!("pred_x0.{i}")) {
                assert!(
                    rel_err(&out.pred_original_sample, &p) < 1e-5,
                    "{case}: step {i} x0"
                );
            }
            x = want; // continue from diffusers' trajectory, so errors do not compound
        }
    }
}

#[test]
fn training_targets_and_min_snr_match_diffusers() {
    let st = fixture("training");
    let cfg = SchedulerConfig {
        beta_start: 0.00085,
        beta_end: 0.012,
        beta_schedule: "scaled_linear".into(),
        ..Default::default()
    };
    let sched = NoiseSchedule::new(&cfg).unwrap();
    let t: Vec<usize> = vec1(&st.get("timesteps").unwrap())
        .iter()
        .map(|x| *x as usize)
        .collect();
    let (x0, noise) = (st.get("x0").unwrap(), st.get("noise").unwrap());
    assert!(
        rel_err(
            &sched.add_noise(&x0, &noise, &t).unwrap(),
            &st.get("noisy").unwrap()
        ) < 1e-6
    );
    assert!(
        rel_err(
            &sched.velocity(&x0, &noise, &t).unwrap(),
            &st.get("velocity").unwrap()
        ) < 1e-6
    );
    let snr = Tensor::from_vec(sched.snr(&t), 4, &candle_core::Device::Cpu).unwrap();
    assert!(rel_err(&snr, &st.get("snr").unwrap()) < 1e-5);
    for (p, key) in [
        (Prediction::Epsilon, "min_snr_eps"),
        (Prediction::V, "min_snr_v"),
    ] {
        let o = Objective {
            prediction: p,
            min_snr_gamma: Some(5.0),
            noise_offset: 0.0,
        };
        let w = Tensor::from_vec(o.weights(&sched, &t), 4, &candle_core::Device::Cpu).unwrap();
        assert!(rel_err(&w, &st.get(key).unwrap()) < 1e-5, "{key}");
    }
    // The v target equals the velocity; the ε target is the noise.
    let o = Objective {
        prediction: Prediction::V,
        min_snr_gamma: None,
        noise_offset: 0.0,
    };
    assert!(
        rel_err(
            &o.target(&sched, &x0, &noise, &t).unwrap(),
            &st.get("velocity").unwrap()
        ) < 1e-6
    );
}

#[test]
fn masked_loss_weights_pixels_and_rejects_wrong_mask_sizes() {
    let o = Objective {
        prediction: Prediction::Epsilon,
        min_snr_gamma: None,
        noise_offset: 0.0,
    };
    let pred = randn(&[2, 4, 8, 8], 1.0, "p");
    let target = randn(&[2, 4, 8, 8], 1.0, "t");
    let ones = Tensor::ones((2, 1, 8, 8), DType::F32, &candle_core::Device::Cpu).unwrap();
    let full = o
        .loss(&pred, &target, &[1.0, 1.0], None)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let masked = o
        .loss(&pred, &target, &[1.0, 1.0], Some(&ones))
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!((full - masked).abs() < 1e-6);
    // Left half masked out: only the right half counts.
    let half = Tensor::cat(
        &[
            Tensor::zeros((2, 1, 8, 4), DType::F32, &candle_core::Device::Cpu).unwrap(),
            Tensor::ones((2, 1, 8, 4), DType::F32, &candle_core::Device::Cpu).unwrap(),
        ],
        3,
    )
    .unwrap();
    let right = o
        .loss(
            &pred.narrow(3, 4, 4).unwrap(),
            &target.narrow(3, 4, 4).unwrap(),
            &[1.0, 1.0],
            None,
        )
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    let hm = o
        .loss(&pred, &target, &[1.0, 1.0], Some(&half))
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!((hm - right / 2.0).abs() < 1e-6);
    let wrong = Tensor::ones((2, 1, 16, 16), DType::F32, &candle_core::Device::Cpu).unwrap();
    let msg = o
        .loss(&pred, &target, &[1.0, 1.0], Some(&wrong))
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("[2, 1, 16, 16]") && msg.contains("(2, 1, 8, 8)"),
        "{msg}"
    );
    // A 64x64 image mask area-resizes to the 8x8 latent grid.
    let big = Tensor::ones((2, 1, 64, 64), DType::F32, &candle_core::Device::Cpu).unwrap();
    assert_eq!(
        postforge::diffusion::objective::resize_mask(&big, 8, 8)
            .unwrap()
            .dims(),
        &[2, 1, 8, 8]
    );
    assert!(postforge::diffusion::objective::resize_mask(&big, 7, 7).is_err());
}

#[test]
fn sampling_is_per_image_deterministic_and_denoises_a_known_signal() {
    // With an oracle denoiser that knows x₀, DDIM and Euler land on x₀; an image's result does not
    // depend on the other images in the batch.
    let cfg = SchedulerConfig {
        beta_start: 0.00085,
        beta_end: 0.012,
        beta_schedule: "scaled_linear".into(),
        steps_offset: 1,
        set_alpha_to_one: Some(true),
        clip_sample: Some(false),
        ..Default::default()
    };
    let sched = NoiseSchedule::new(&cfg).unwrap();
    let x0 = randn(&[4, 8, 8], 0.5, "x0");
    for kind in [
        SamplerKind::Ddim { eta: 0.0 },
        SamplerKind::Euler,
        SamplerKind::EulerAncestral,
    ] {
        let s = Sampler::new(kind, &cfg, 30).unwrap();
        let run = |seeds: &[u64]| {
            s.sample(
                &cfg,
                &[4, 8, 8],
                seeds,
                &candle_core::Device::Cpu,
                |x_in, t| {
                    // ε = (x_t − √ᾱ x₀)/√(1−ᾱ), from the unscaled sample.
                    let b = x_in.dim(0)?;
                    let (a, scale) = match kind {
                        SamplerKind::Ddim { .. } => (sched.alphas_cumprod[t as usize] as f64, 1.0),
                        _ => {
                            let i = s.timesteps().iter().position(|v| *v == t).unwrap();
                            let sig = s.sigmas()[i] as f64;
                            (1.0 / (1.0 + sig * sig), (sig * sig + 1.0).sqrt())
                        }
                    };
                    let xt = match kind {
                        SamplerKind::Ddim { .. } => x_in.clone(),
                        _ => ((x_in * scale)? * a.sqrt())?, // Euler's x is x_t/√ᾱ
                    };
                    let x0b = x0.unsqueeze(0)?.repeat((b, 1, 1, 1))?;
                    Ok(((xt - (x0b * a.sqrt())?)? / (1.0 - a).sqrt())?)
                },
            )
            .unwrap()
        };
        let both = run(&[1, 2]);
        let alone = run(&[2]);
        assert!(
            max_abs_diff(&both.narrow(0, 1, 1).unwrap(), &alone) < 1e-5,
            "{kind:?}: batch changed an image"
        );
        let err = max_abs_diff(&both.narrow(0, 0, 1).unwrap().squeeze(0).unwrap(), &x0);
        assert!(
            err < 2e-2,
            "{kind:?}: oracle sampling ends {err} away from x0"
        );
    }
}
