//! The adapter core: every method and layer kind, PEFT/bitsandbytes/kohya/diffusers parity.
//!
//! One test binary per capability (fewer executables to link); each file is a module.

#[path = "../common/mod.rs"]
mod common;

mod adalora;
mod adapter_matrix;
mod combine;
mod longlora;
mod lora_files;
mod method_matrix;
mod methods;
mod nf4;
mod peft_parity;
mod qlora;
