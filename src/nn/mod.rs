//! Differentiable ops: the lowest room of the crate, below the adapter core and the model families,
//! above candle only.
//!
//! candle's fused `layer_norm`, `rms_norm` and `softmax_last_dim` record no backward, and its matmul
//! and conv2d backward always compute the weight gradient, even for a frozen weight. The ops here are
//! single nodes with a CPU forward and backward (mostly f32), each next to its backward op and the
//! differentiable composition it falls back to elsewhere (the `*_composite` references the tests
//! compare against).

pub mod act;
pub mod attention;
pub mod block;
pub mod conv;
pub mod fallback;
pub mod flash;
pub mod frozen;
pub mod gemm;
pub mod kernels;
pub mod layer_norm;
pub mod lora_conv;
pub mod lora_op;
pub mod loss;
pub mod nf4;
pub mod norm;
pub mod resample;
pub mod resnet;
pub mod rope;
pub mod softmax;

#[cfg(test)]
pub(crate) mod test_util;
