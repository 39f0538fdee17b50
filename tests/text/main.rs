//! Text SFT and preference alignment against TRL, and the chat pipelines.
//!
//! One test binary per capability (fewer executables to link); each file is a module.

#[path = "../common/mod.rs"]
mod common;

mod align_parity;
mod align_task;
mod chat_pipeline;
mod sft;
