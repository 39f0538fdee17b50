//! Model families against transformers and diffusers.
//!
//! One test binary per capability (fewer executables to link); each file is a module.

#[path = "../common/mod.rs"]
mod common;

mod clip_parity;
mod llama_parity;
mod mixed_precision;
mod routing;
mod unet_parity;
mod vae_parity;
