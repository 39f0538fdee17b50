//! The training core used by every task: a [`Trainer`] over a [`Task`] that returns a loss; fused
//! AdamW, learning-rate schedules, gradient accumulation and clipping, NaN/Inf detection, atomic
//! checkpoints that resume bit-identically, JSONL metrics and a loss-curve PNG.
//!
//! ```
//! use postforge::train::{Schedule, ScheduleKind};
//! // transformers' get_cosine_schedule_with_warmup(num_warmup_steps=2, num_training_steps=10)
//! let s = Schedule { kind: ScheduleKind::Cosine, base_lr: 1e-3, warmup: 2, total: 10 };
//! assert_eq!(s.lr(0), 0.0);
//! assert_eq!(s.lr(2), 1e-3);
//! assert!(s.lr(9) < 1e-4);
//! ```

pub mod ema;
pub mod optim;
pub mod schedule;
pub mod trainer;

pub use optim::{AdamW, AdamWConfig};
pub use schedule::{Schedule, ScheduleKind};
pub use trainer::{Task, TrainConfig, TrainSummary, Trainer};
