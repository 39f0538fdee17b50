//! postforge: parameter-efficient fine-tuning and preference alignment on candle.
//!
//! The adapter core lives in [`peft`], the training core in [`train`], the differentiable ops both
//! build on in [`nn`]; pictures (loss curves, grids) in [`media`]. See `DESIGN.md` in the shared
//! folder for the layout and the decisions.
#![warn(missing_docs)]

pub mod align;
pub mod check;
pub mod data;
pub mod diffusion;
pub mod error;
pub mod media;
pub mod models;
pub mod nn;
pub mod peft;
pub mod recipe;
pub mod rng;
pub mod text;
pub mod train;
pub mod util;

pub use error::{Error, Result};
