//! Custom ops for frozen base weights, the fused LoRA node and DoRA's column scaling. They live in
//! [`crate::nn`] ([`crate::nn::frozen`], [`crate::nn::conv`], [`crate::nn::lora_op`]) and are
//! re-exported here under the adapter core's names.

pub use crate::nn::conv::{add_channel_bias, conv2d, frozen_conv2d, ConvCfg};
pub use crate::nn::frozen::{add_assign, frozen_linear, nf4_linear, plain_linear};
pub use crate::nn::lora_op::{lora_linear, qlora_linear, scale_columns};
