//! Text recipes: supervised fine-tuning and preference training of causal LMs (the Llama family)
//! with adapters, the run configurations behind `postforge sft`, `postforge align` and the pipeline
//! stages, the alignment experiment table, and the embedded `tiny-chat` model. The losses come from
//! [`crate::align`], the model from [`crate::models::llama`], the data from [`crate::data`].

pub mod align_run;
pub mod align_task;
pub mod eval;
pub mod sft;
pub mod tiny_chat;
