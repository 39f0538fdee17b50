//! Model families, each built through the adapter core ([`crate::peft::AdapterPlan`]).

pub mod clip;
pub mod generate;
pub mod llama;
pub mod mlp;
pub mod unet;
pub mod vae;
pub mod weights;

pub use weights::Weights;
