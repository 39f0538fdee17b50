//! The alignment core: the preference losses (DPO family, IPO, SimPO, CPO, ORPO, KTO) as pure
//! functions of sequence log-probs with TRL 1.16's semantics and metric names, usable by any model
//! family. It imports no model and no data reader; the text recipes that train with these losses
//! (SFT, preference runs, the tiny-chat model) live in `crate::text`.

pub mod cpo;
pub mod dpo;
pub mod kto;
pub mod logps;
pub mod orpo;
