//! Model families, each built through the adapter core ([`crate::peft::AdapterPlan`]).

pub mod mlp;
