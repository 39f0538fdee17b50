//! The trainer: schedules, AdamW, accumulation, clipping, checkpoints and resume.
//!
//! One test binary per capability (fewer executables to link); each file is a module.

#[path = "../common/mod.rs"]
mod common;

mod trainer;
