//! ORPO (TRL 1.16's `ORPOTrainer`): NLL of the chosen completion minus λ·log σ(log-odds ratio),
//! on length-averaged policy log-probs, with a stable log(1 − eˣ); no reference model.

use super::dpo::reward_metrics;
use super::logps::{log1mexp, log_sigmoid};
use crate::{Error, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

fn d_beta() -> f64 {
    0.1
}

/// ORPO settings (`beta` is the paper's λ).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrpoConfig {
    /// λ.
    #[serde(default = "d_beta")]
    pub beta: f64,
}

impl Default for OrpoConfig {
    fn default() -> Self {
        Self { beta: 0.1 }
    }
}

impl OrpoConfig {
    /// The loss from length-averaged policy log-probs (B) and the chosen NLL (scalar); TRL's metrics
    /// with `nll_loss`, `log_odds_ratio`, `log_odds_chosen`.
    pub fn loss(
        &self,
        chosen: &Tensor,
        rejected: &Tensor,
        chosen_nll: &Tensor,
    ) -> Result<(Tensor, BTreeMap<String, f64>)> {
        if self.beta < 0.0 {
            return Err(Error::Config(format!(
                "beta {} must not be negative",
                self.beta
            )));
        }
        let log_odds = ((chosen - rejected)? - (log1mexp(chosen)? - log1mexp(rejected)?)?)?;
        let ratio = log_sigmoid(&log_odds)?;
        let losses = (&ratio * self.beta)?;
        let loss = (chosen_nll - losses.mean_all()?)?;
        let mut m = reward_metrics(
            &(chosen.detach() * self.beta)?,
            &(rejected.detach() * self.beta)?,
        )?;
        let s = |t: &Tensor| -> Result<f64> { Ok(t.mean_all()?.to_scalar::<f32>()? as f64) };
        m.insert("logps/chosen".into(), s(chosen)?);
        m.insert("logps/rejected".into(), s(rejected)?);
        m.insert("nll_loss".into(), s(chosen_nll)?);
        m.insert("log_odds_ratio".into(), s(&ratio)?);
        m.insert("log_odds_chosen".into(), s(&log_odds)?);
        Ok((loss, m))
    }
}
