//! The training core used by every task: a [`Trainer`] over a [`Task`] that returns a loss; fused
//! AdamW, learning-rate schedules, gradient accumulation and clipping, NaN/Inf detection, atomic
//! checkpoints that resume bit-identically, JSONL metrics and a loss-curve PNG.

pub mod optim;
pub mod schedule;
pub mod trainer;

pub use optim::{AdamW, AdamWConfig};
pub use schedule::{Schedule, ScheduleKind};
pub use trainer::{Task, TrainConfig, TrainSummary, Trainer};
