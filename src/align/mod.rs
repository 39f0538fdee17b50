//! The alignment core: supervised fine-tuning of causal LMs now; preference losses (DPO family,
//! IPO, SimPO, CPO, ORPO, KTO) as pure functions of sequence log-probs next.

pub mod sft;
pub mod tiny_chat;
