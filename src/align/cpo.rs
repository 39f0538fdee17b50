//! CPO and SimPO (TRL 1.16's `CPOTrainer`): reference-free pairwise losses on policy log-probs
//! (length-averaged for `simpo` and `ipo`), an NLL term weighted by `cpo_alpha`, and the AlphaPO
//! reward transform.

use super::dpo::reward_metrics;
use super::logps::log_sigmoid;
use crate::{Error, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// CPO `loss_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum CpoLossType {
    /// Eq. 3 of the CPO paper.
    Sigmoid,
    /// relu(1 − βΔ).
    Hinge,
    /// (Δ − 1/2β)².
    Ipo,
    /// SimPO: sigmoid with the margin γ/β.
    Simpo,
}

fn d_beta() -> f64 {
    0.1
}
fn d_type() -> CpoLossType {
    CpoLossType::Sigmoid
}
fn d_gamma() -> f64 {
    0.5
}
fn d_cpo_alpha() -> f64 {
    1.0
}

/// CPO / SimPO settings (TRL `CPOConfig` names and defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CpoConfig {
    /// β.
    #[serde(default = "d_beta")]
    pub beta: f64,
    /// Loss type.
    #[serde(default = "d_type")]
    pub loss_type: CpoLossType,
    /// ε.
    #[serde(default)]
    pub label_smoothing: f64,
    /// SimPO's γ (the margin is γ/β).
    #[serde(default = "d_gamma")]
    pub simpo_gamma: f64,
    /// Weight of the NLL term (SimPO proper uses 0).
    #[serde(default = "d_cpo_alpha")]
    pub cpo_alpha: f64,
    /// AlphaPO α (0 = off).
    #[serde(default)]
    pub alpha: f64,
}

impl Default for CpoConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("defaults")
    }
}

impl CpoConfig {
    /// Whether the policy log-probs are averaged over completion tokens (TRL: `ipo`, `simpo`).
    pub fn average_log_prob(&self) -> bool {
        matches!(self.loss_type, CpoLossType::Ipo | CpoLossType::Simpo)
    }

    /// The loss from policy log-probs (B) (already averaged when [`Self::average_log_prob`]) and the
    /// chosen NLL (scalar); TRL's metrics with `nll_loss`.
    pub fn loss(
        &self,
        chosen: &Tensor,
        rejected: &Tensor,
        chosen_nll: &Tensor,
    ) -> Result<(Tensor, BTreeMap<String, f64>)> {
        if self.beta <= 0.0 {
            return Err(Error::Config(format!(
                "beta {} must be positive",
                self.beta
            )));
        }
        let beta = self.beta;
        let eps = self.label_smoothing;
        let (cr, rr) = if self.alpha != 0.0 {
            let f = |lp: &Tensor| -> Result<Tensor> {
                Ok(((lp * -self.alpha)?.exp()?.neg()? + 1.0)?.affine(1.0 / self.alpha, 0.0)?)
            };
            (f(chosen)?, f(rejected)?)
        } else {
            (chosen.clone(), rejected.clone())
        };
        let mut logits = (&cr - &rr)?;
        let smoothed = |l: &Tensor| -> Result<Tensor> {
            let bl = (l * beta)?;
            Ok(((log_sigmoid(&bl)? * -(1.0 - eps))? - (log_sigmoid(&bl.neg()?)? * eps)?)?)
        };
        let losses = match self.loss_type {
            CpoLossType::Simpo => {
                logits = (logits - self.simpo_gamma / beta)?;
                smoothed(&logits)?
            }
            CpoLossType::Sigmoid => smoothed(&logits)?,
            CpoLossType::Hinge => ((&logits * beta)?.neg()? + 1.0)?.relu()?,
            CpoLossType::Ipo => (&logits - 1.0 / (2.0 * beta))?.sqr()?,
        };
        let loss = ((losses.mean_all()? + (chosen_nll * self.cpo_alpha)?)?).clone();
        let mut m = reward_metrics(&(cr.detach() * beta)?, &(rr.detach() * beta)?)?;
        m.insert(
            "logps/chosen".into(),
            chosen.mean_all()?.to_scalar::<f32>()? as f64,
        );
        m.insert(
            "logps/rejected".into(),
            rejected.mean_all()?.to_scalar::<f32>()? as f64,
        );
        m.insert("nll_loss".into(), chosen_nll.to_scalar::<f32>()? as f64);
        Ok((loss, m))
    }
}
