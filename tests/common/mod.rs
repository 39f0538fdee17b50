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
