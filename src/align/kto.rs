//! KTO (TRL 1.16's `KTOTrainer`): unpaired desirable / undesirable completions against a KL
//! reference point estimated from mismatched (rotated) prompt–completion pairs, clamped at 0 and
//! detached; weighted losses and TRL's advice on the weights for unbalanced data.

use super::logps::sigmoid;
use crate::{Error, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// KTO `loss_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum KtoLossType {
    /// Eq. 7 of the KTO paper.
    Kto,
    /// Unpaired APO-zero (no KL term).
    ApoZeroUnpaired,
}

fn d_beta() -> f64 {
    0.1
}
fn d_one() -> f64 {
    1.0
}
fn d_type() -> KtoLossType {
    KtoLossType::Kto
}

/// KTO settings (TRL `KTOConfig` names and defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KtoConfig {
    /// β.
    #[serde(default = "d_beta")]
    pub beta: f64,
    /// Loss type.
    #[serde(default = "d_type")]
    pub loss_type: KtoLossType,
    /// Weight of desirable examples.
    #[serde(default = "d_one")]
    pub desirable_weight: f64,
    /// Weight of undesirable examples.
    #[serde(default = "d_one")]
    pub undesirable_weight: f64,
}

impl Default for KtoConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("defaults")
    }
}

/// Log-probs of a KTO batch.
#[derive(Debug, Clone)]
pub struct KtoLogps {
    /// Policy log-probs of the desirable completions (D).
    pub chosen: Tensor,
    /// Of the undesirable completions (U).
    pub rejected: Tensor,
    /// Reference log-probs, desirable.
    pub ref_chosen: Tensor,
    /// Reference log-probs, undesirable.
    pub ref_rejected: Tensor,
    /// Policy log-probs of the mismatched pairs (the KL estimate), all rows.
    pub kl: Tensor,
    /// Reference log-probs of the mismatched pairs.
    pub ref_kl: Tensor,
}

/// The mismatched-pair permutation: row i takes the completion of row i + 1 (cyclic), as TRL does.
pub fn rotated(n: usize) -> Vec<usize> {
    (0..n).map(|i| (i + 1) % n.max(1)).collect()
}

/// TRL's warning for unbalanced data: the recommended weight ranges (Eq. 8 of the KTO paper), or
/// `None` when the weights are fine.
pub fn weight_advice(cfg: &KtoConfig, desirable: usize, undesirable: usize) -> Option<String> {
    let (d, u) = (desirable.max(1) as f64, undesirable.max(1) as f64);
    if desirable == undesirable {
        return None;
    }
    let r2 = |x: f64| (x * 100.0).round() / 100.0;
    let (dl, du) = (
        r2(u * cfg.undesirable_weight / d),
        r2(u * cfg.undesirable_weight / d * 1.33),
    );
    let (ul, uu) = (
        r2(d * cfg.desirable_weight / u / 1.33),
        r2(d * cfg.desirable_weight / u),
    );
    let d_ok = dl <= cfg.desirable_weight && cfg.desirable_weight <= du;
    let u_ok = ul <= cfg.undesirable_weight && cfg.undesirable_weight <= uu;
    if d_ok || u_ok {
        return None;
    }
    Some(format!(
        "{desirable} desirable and {undesirable} undesirable examples: set EITHER desirable_weight in [{dl}, {du}] or undesirable_weight in [{ul}, {uu}] (but not both)"
    ))
}

impl KtoConfig {
    /// The loss (mean of the weighted per-example losses) and TRL's metrics (`kl`, `rewards/*`,
    /// `logps/*`).
    pub fn loss(&self, lp: &KtoLogps) -> Result<(Tensor, BTreeMap<String, f64>)> {
        if self.beta <= 0.0 {
            return Err(Error::Config(format!(
                "beta {} must be positive",
                self.beta
            )));
        }
        let beta = self.beta;
        let kl = match self.loss_type {
            KtoLossType::Kto => (&lp.kl - &lp.ref_kl)?
                .mean_all()?
                .detach()
                .clamp(0f32, f32::MAX)?,
            KtoLossType::ApoZeroUnpaired => {
                Tensor::zeros((), candle_core::DType::F32, lp.chosen.device())?
            }
        };
        let mut parts = vec![];
        let mut m = BTreeMap::new();
        let nonempty = |t: &Tensor| t.elem_count() > 0;
        if nonempty(&lp.chosen) {
            let cr = (&lp.chosen - &lp.ref_chosen)?;
            let l = match self.loss_type {
                KtoLossType::Kto => (sigmoid(&(cr.broadcast_sub(&kl)? * beta)?)?.neg()? + 1.0)?,
                KtoLossType::ApoZeroUnpaired => (sigmoid(&(&cr * beta)?)?.neg()? + 1.0)?,
            };
            parts.push((l * self.desirable_weight)?);
            m.insert(
                "rewards/chosen".into(),
                (cr * beta)?.mean_all()?.to_scalar::<f32>()? as f64,
            );
            m.insert(
                "logps/chosen".into(),
                lp.chosen.mean_all()?.to_scalar::<f32>()? as f64,
            );
        }
        if nonempty(&lp.rejected) {
            let rr = (&lp.rejected - &lp.ref_rejected)?;
            let l = match self.loss_type {
                KtoLossType::Kto => {
                    (sigmoid(&(rr.broadcast_sub(&kl)?.neg()? * beta)?)?.neg()? + 1.0)?
                }
                KtoLossType::ApoZeroUnpaired => sigmoid(&(&rr * beta)?)?,
            };
            parts.push((l * self.undesirable_weight)?);
            m.insert(
                "rewards/rejected".into(),
                (rr * beta)?.mean_all()?.to_scalar::<f32>()? as f64,
            );
            m.insert(
                "logps/rejected".into(),
                lp.rejected.mean_all()?.to_scalar::<f32>()? as f64,
            );
        }
        if parts.is_empty() {
            return Err(Error::Msg("a KTO batch with no examples".into()));
        }
        let loss = Tensor::cat(&parts, 0)?.mean_all()?;
        m.insert("kl".into(), kl.to_scalar::<f32>()? as f64);
        if let (Some(c), Some(r)) = (
            m.get("rewards/chosen").copied(),
            m.get("rewards/rejected").copied(),
        ) {
            m.insert("rewards/margins".into(), c - r);
        }
        Ok((loss, m))
    }
}
