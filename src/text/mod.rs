//! Text recipes: supervised fine-tuning and preference training of causal LMs (the Llama family)
//! with adapters, the run configurations behind `postforge sft`, `postforge align` and the pipeline
//! stages, the alignment experiment table, and the embedded `tiny-chat` model. The losses come from
//! [`crate::align`], the model from [`crate::models::llama`], the data from [`crate::data`].

pub mod align_run;
pub mod align_task;
pub mod eval;
pub mod sft;
mod sft_ranges;
pub mod tiny_chat;

use crate::check::{self, count_at_least, f64_in};

/// The ranges of PEFT's adapter keys (`r`, `lora_alpha`, `lora_dropout`, `loftq_iter`,
/// `init_lora_weights = "pissa_niter_K"`), shared by the `sft` and `align` settings; checked when
/// the settings are parsed, before anything is loaded.
pub(crate) fn check_adapter(a: &crate::peft::args::AdapterArgs) -> crate::Result<()> {
    count_at_least("r", a.r, 1)?;
    f64_in("lora_alpha", a.lora_alpha, check::POSITIVE)?;
    f64_in("lora_dropout", a.lora_dropout, check::DROPOUT)?;
    count_at_least("loftq_iter", a.loftq_iter, 1)?;
    check::init_lora_weights("init_lora_weights", &a.init_lora_weights)
}
