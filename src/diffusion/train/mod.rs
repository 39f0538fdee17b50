//! LoRA / LoCon / DoRA training of a text-to-image pipeline on an image folder, in the manner of
//! kohya's `train_network.py`: kohya folders or `metadata.jsonl`, aspect-ratio buckets, caption
//! shuffling and dropout, min-SNR-γ, noise offset, sample images every N steps from kohya prompt
//! lines, and a kohya (or diffusers) LoRA file as the result. Field names follow kohya's flags.

pub mod blocks;
mod config;
mod masks;
pub mod prior;
mod ranges;
mod task;

pub use blocks::{TEXT_TARGETS, UNET_CONV_PATTERN, UNET_TARGETS};
pub use config::{LoraTrainConfig, SamplePrompt};
pub use task::{train_lora, LoraTrainTask};
