//! Shared helpers for the integration tests.
#![allow(dead_code)]

use candle_core::{backprop::GradStore, Device, Tensor, Var};
use postforge::rng::{normal, rng_for};

pub fn randn(shape: &[usize], std: f64, name: &str) -> Tensor {
    normal(shape, std, &mut rng_for(7, name)).unwrap()
}

pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// max |a-b| / max(|b|, 1e-6): a relative error over the whole tensor.
pub fn rel_err(a: &Tensor, b: &Tensor) -> f32 {
    let scale = b
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .max(1e-6);
    max_abs_diff(a, b) / scale
}

pub fn ids(shape: &[usize], n: u32) -> Tensor {
    let count: usize = shape.iter().product();
    let v: Vec<u32> = (0..count as u32).map(|i| (i * 7 + 3) % n).collect();
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

/// Every tensor in `vars` got a finite, non-zero gradient (`what` names the case in messages).
pub fn assert_all_trained(grads: &GradStore, vars: &[(String, Var)], what: &str) {
    assert!(!vars.is_empty(), "{what}: nothing trainable");
    for (name, v) in vars {
        let g = grads
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{what}: no gradient for {name}"));
        let s = g
            .abs()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(s.is_finite() && s > 0.0, "{what}: {name} gradient sum {s}");
    }
}

/// Turns the pixel-space pipeline folder `model` (tiny-sd's layout) into a latent one: the fixture
/// VAE (factor 2, 4 latent channels) and a fresh U-Net with 4 input and output channels at 16×16.
pub fn make_latent_pipeline(model: &std::path::Path) {
    use postforge::diffusion::tiny_sd::{fresh_unet_tensors, unet_config};
    let fx = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/vae");
    std::fs::create_dir_all(model.join("vae")).unwrap();
    for f in ["config.json", "diffusion_pytorch_model.safetensors"] {
        std::fs::copy(fx.join(f), model.join("vae").join(f)).unwrap();
    }
    let mut ucfg = unet_config();
    ucfg.in_channels = 4;
    ucfg.out_channels = 4;
    ucfg.sample_size = 16;
    std::fs::write(
        model.join("unet/config.json"),
        serde_json::to_string(&ucfg).unwrap(),
    )
    .unwrap();
    postforge::util::save_safetensors(
        &model.join("unet/diffusion_pytorch_model.safetensors"),
        &fresh_unet_tensors(&ucfg, 5).unwrap(),
        None,
    )
    .unwrap();
    let idx = model.join("model_index.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&idx).unwrap()).unwrap();
    v["vae"] = serde_json::json!(["diffusers", "AutoencoderKL"]);
    std::fs::write(&idx, v.to_string()).unwrap();
}
