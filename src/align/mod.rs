//! The alignment core: supervised fine-tuning of causal LMs, and the preference losses (DPO family,
//! IPO, SimPO, CPO, ORPO, KTO) as pure functions of sequence log-probs with TRL 1.16's semantics
//! and metric names, usable by any model family.

pub mod cpo;
pub mod dpo;
pub mod eval;
pub mod kto;
pub mod logps;
pub mod orpo;
pub mod run;
pub mod sft;
pub mod task;
pub mod tiny_chat;
