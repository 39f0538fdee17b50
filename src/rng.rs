//! The run's seeded random numbers (DESIGN decision 8): one deterministic generator per
//! (seed, name), so that adapter initialisation, data shuffles, noise draws and samplers give the
//! same numbers on every platform and on resume, and N(0, σ²) tensors drawn from it.

use crate::Result;
use candle_core::{Device, Tensor};
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// A deterministic generator for one adapter tensor: the same (seed, name) always gives the same numbers.
pub fn rng_for(seed: u64, name: &str) -> ChaCha8Rng {
    // FNV-1a of the name, mixed with the seed: stable across platforms and Rust versions.
    let mut h: u64 = 0xcbf29ce484222325;
    for b in name.as_bytes() {
        h ^= *b as u64;
        h = h.wrapping_mul(0x100000001b3);
    }
    ChaCha8Rng::seed_from_u64(seed ^ h.rotate_left(17))
}

/// N(0, std²).
pub fn normal(shape: &[usize], std: f64, rng: &mut ChaCha8Rng) -> Result<Tensor> {
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| {
            let z: f64 = StandardNormal.sample(rng);
            (z * std) as f32
        })
        .collect();
    // Drawn on the CPU (the same values on every device), then moved to the current device.
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?.to_device(&crate::util::device::current())?)
}
