//! Noise schedules, samplers, tiny-sd and kohya-style LoRA training.
//!
//! One test binary per capability (fewer executables to link); each file is a module.

#[path = "../common/mod.rs"]
mod common;

mod diffusion_parity;
mod masked_edit;
mod tiny_sd;
mod train_diffusion;
