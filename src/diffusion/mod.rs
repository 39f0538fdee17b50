//! Diffusion: noise schedules and training targets (ε, v, min-SNR-γ, noise offset, masked loss) and
//! samplers (DDIM, Euler, Euler ancestral) with classifier-free guidance and per-image seeds, with
//! diffusers' semantics and `scheduler_config.json` fields.

pub mod attn_mask;
pub mod edit;
pub mod eval;
pub mod grid;
pub mod masked_edit;
pub mod objective;
pub mod pipeline;
pub mod sampler;
pub mod schedule;
pub mod tiny_sd;
pub mod train;

pub use objective::Objective;
pub use sampler::{Sampler, SamplerKind};
pub use schedule::{NoiseSchedule, Prediction, SchedulerConfig};
