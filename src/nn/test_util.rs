//! Helpers shared by the unit tests of the nodes.

use candle_core::Tensor;

/// Normal values with standard deviation `std`, drawn from the stream `label`/`seed`.
pub(crate) fn randn(label: &str, shape: &[usize], seed: u64, std: f64) -> Tensor {
    let mut rng = crate::rng::rng_for(seed, label);
    crate::rng::normal(shape, std, &mut rng).unwrap()
}

/// max |a − c| relative to max |c|.
pub(crate) fn rel_max_err(a: &Tensor, c: &Tensor) -> f32 {
    let max = |t: &Tensor| -> f32 { t.abs().unwrap().max_all().unwrap().to_scalar().unwrap() };
    max(&(a - c).unwrap()) / max(c).max(1e-6)
}
