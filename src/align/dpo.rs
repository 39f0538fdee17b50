//! The DPO family with TRL 1.16's semantics: the log-ratios of policy and reference, an optional
//! f-divergence transform of them, and every `loss_type` TRL lists (several may be combined with
//! `loss_weights`), as pure functions of sequence log-probs; plus TRL's reward metrics.

use super::logps::{log_sigmoid, sigmoid};
use crate::{Error, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// `loss_type` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum DpoLossType {
    /// −log σ(βΔ).
    Sigmoid,
    /// relu(1 − βΔ).
    Hinge,
    /// (Δ̄ − 1/2β)² with length-averaged scores.
    Ipo,
    /// Label-noise-robust sigmoid.
    Robust,
    /// −log σ(βr_w) − log σ(−βr_l).
    BcoPair,
    /// (r_w − 1/2β)² + (r_l + 1/2β)².
    SppoHard,
    /// NCA for pairs.
    NcaPair,
    /// APO-zero.
    ApoZero,
    /// APO-down.
    ApoDown,
    /// −log σ(βΔ̄) with length-averaged scores.
    SigmoidNorm,
    /// EXO for pairs (needs label_smoothing > 0).
    ExoPair,
    /// DiscoPOP.
    Discopop,
    /// NLL of the chosen completion.
    Sft,
}

/// `f_divergence_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum FDivergence {
    /// Standard DPO.
    #[default]
    ReverseKl,
    /// f′(t) = 1 − 1/t.
    ForwardKl,
    /// f′(t) = log 2 + log σ(log t).
    JsDivergence,
    /// f′(t) = (t^(α−1) − 1)/(α − 1).
    AlphaDivergence,
}

fn d_beta() -> f64 {
    0.1
}
fn d_types() -> Vec<DpoLossType> {
    vec![DpoLossType::Sigmoid]
}
fn d_alpha() -> f64 {
    1.0
}
fn d_tau() -> f64 {
    0.05
}

/// DPO settings (TRL `DPOConfig` names and defaults).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DpoConfig {
    /// β.
    #[serde(default = "d_beta")]
    pub beta: f64,
    /// Loss types (summed with `loss_weights`).
    #[serde(default = "d_types")]
    pub loss_type: Vec<DpoLossType>,
    /// Weights of the loss types (default all 1).
    #[serde(default)]
    pub loss_weights: Option<Vec<f64>>,
    /// ε.
    #[serde(default)]
    pub label_smoothing: f64,
    /// f-divergence of the log-ratio transform.
    #[serde(default)]
    pub f_divergence_type: FDivergence,
    /// α of the alpha divergence.
    #[serde(default = "d_alpha")]
    pub f_alpha_divergence_coef: f64,
    /// τ of DiscoPOP.
    #[serde(default = "d_tau")]
    pub discopop_tau: f64,
}

impl Default for DpoConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("defaults")
    }
}

/// Policy and reference sequence log-probs of a batch of pairs (each (B)), and the completion
/// token counts (for the length-averaged losses).
#[derive(Debug, Clone)]
pub struct PairLogps {
    /// log π(y_w|x), summed.
    pub chosen: Tensor,
    /// log π(y_l|x), summed.
    pub rejected: Tensor,
    /// log π_ref(y_w|x).
    pub ref_chosen: Tensor,
    /// log π_ref(y_l|x).
    pub ref_rejected: Tensor,
    /// |y_w|.
    pub chosen_tokens: Tensor,
    /// |y_l|.
    pub rejected_tokens: Tensor,
    /// Mean NLL of the chosen completions (scalar), for `sft`.
    pub chosen_nll: Option<Tensor>,
}

fn mean(t: &Tensor) -> Result<f64> {
    Ok(t.mean_all()?
        .to_dtype(candle_core::DType::F64)?
        .to_scalar::<f64>()?)
}

/// TRL's reward metrics from β·(log-ratio) rewards.
pub fn reward_metrics(
    chosen_rewards: &Tensor,
    rejected_rewards: &Tensor,
) -> Result<BTreeMap<String, f64>> {
    let mut m = BTreeMap::new();
    m.insert("rewards/chosen".into(), mean(chosen_rewards)?);
    m.insert("rewards/rejected".into(), mean(rejected_rewards)?);
    m.insert(
        "rewards/accuracies".into(),
        mean(
            &chosen_rewards
                .gt(rejected_rewards)?
                .to_dtype(candle_core::DType::F32)?,
        )?,
    );
    m.insert(
        "rewards/margins".into(),
        mean(&(chosen_rewards - rejected_rewards)?)?,
    );
    Ok(m)
}

impl DpoConfig {
    /// Checks the settings.
    pub fn validate(&self) -> Result<()> {
        if self.loss_type.is_empty() {
            return Err(Error::Config("loss_type is empty".into()));
        }
        if let Some(w) = &self.loss_weights {
            if w.len() != self.loss_type.len() {
                return Err(Error::Config(format!(
                    "{} loss_weights for {} loss types",
                    w.len(),
                    self.loss_type.len()
                )));
            }
        }
        if self.loss_type.contains(&DpoLossType::ExoPair) && self.label_smoothing <= 0.0 {
            return Err(Error::Config(
                "exo_pair needs label_smoothing > 0 (it takes log ε)".into(),
            ));
        }
        if self.loss_type.contains(&DpoLossType::Robust) && self.label_smoothing >= 0.5 {
            return Err(Error::Config("robust needs label_smoothing < 0.5".into()));
        }
        if self.beta <= 0.0 {
            return Err(Error::Config(format!(
                "beta {} must be positive",
                self.beta
            )));
        }
        Ok(())
    }

    /// The loss (mean over the batch, summed over loss types with their weights) and TRL's
    /// metrics (`rewards/*`, `logps/*`).
    pub fn loss(&self, lp: &PairLogps) -> Result<(Tensor, BTreeMap<String, f64>)> {
        self.validate()?;
        let beta = self.beta;
        let eps = self.label_smoothing;
        let cr = (&lp.chosen - &lp.ref_chosen)?;
        let rr = (&lp.rejected - &lp.ref_rejected)?;
        let (cs, rs) = match self.f_divergence_type {
            FDivergence::ReverseKl => (cr.clone(), rr.clone()),
            FDivergence::ForwardKl => (
                (cr.neg()?.exp()?.neg()? + 1.0)?,
                (rr.neg()?.exp()?.neg()? + 1.0)?,
            ),
            FDivergence::JsDivergence => (
                (log_sigmoid(&cr)? + std::f64::consts::LN_2)?,
                (log_sigmoid(&rr)? + std::f64::consts::LN_2)?,
            ),
            FDivergence::AlphaDivergence => {
                let a = self.f_alpha_divergence_coef;
                if (a - 1.0).abs() < 1e-6 {
                    (cr.clone(), rr.clone())
                } else {
                    let f = |r: &Tensor| -> Result<Tensor> {
                        Ok((((r * (a - 1.0))?.clamp(f32::MIN, 80f32)?.exp()? - 1.0)? / (a - 1.0))?)
                    };
                    (f(&cr)?, f(&rr)?)
                }
            }
        };
        let delta = (&cs - &rs)?;
        let avg =
            |s: &Tensor, n: &Tensor| -> Result<Tensor> { Ok(s.div(&n.clamp(1f32, f32::MAX)?)?) };
        let weights = self
            .loss_weights
            .clone()
            .unwrap_or_else(|| vec![1.0; self.loss_type.len()]);
        let mut total: Option<Tensor> = None;
        for (kind, w) in self.loss_type.iter().zip(weights) {
            let bd = (&delta * beta)?;
            let per = match kind {
                DpoLossType::Sigmoid => log_sigmoid(&bd)?.neg()?,
                DpoLossType::Hinge => (bd.neg()? + 1.0)?.relu()?,
                DpoLossType::Ipo => {
                    let d = (avg(&cs, &lp.chosen_tokens)? - avg(&rs, &lp.rejected_tokens)?)?;
                    (d - 1.0 / (2.0 * beta))?.sqr()?
                }
                DpoLossType::Robust => {
                    let clean = (log_sigmoid(&bd)? * -(1.0 - eps))?;
                    let flipped = (log_sigmoid(&bd.neg()?)? * -eps)?;
                    ((clean - flipped)? / (1.0 - 2.0 * eps))?
                }
                DpoLossType::BcoPair => {
                    (log_sigmoid(&(&cr * beta)?)?.neg()? - log_sigmoid(&(&rr * -beta)?)?)?
                }
                DpoLossType::SppoHard => {
                    ((&cr - 0.5 / beta)?.sqr()? + (&rr + 0.5 / beta)?.sqr()?)?
                }
                DpoLossType::NcaPair => {
                    let (c, r) = ((&cr * beta)?, (&rr * beta)?);
                    ((log_sigmoid(&c)?.neg()? - (log_sigmoid(&c.neg()?)? * 0.5)?)?
                        - (log_sigmoid(&r.neg()?)? * 0.5)?)?
                }
                DpoLossType::ApoZero => {
                    ((sigmoid(&(&cr * beta)?)?.neg()? + 1.0)? + sigmoid(&(&rr * beta)?)?)?
                }
                DpoLossType::ApoDown => {
                    (sigmoid(&(&cr * beta)?)? + (sigmoid(&((&cr - &rr)? * beta)?)?.neg()? + 1.0)?)?
                }
                DpoLossType::SigmoidNorm => {
                    let d = (avg(&cs, &lp.chosen_tokens)? - avg(&rs, &lp.rejected_tokens)?)?;
                    log_sigmoid(&(d * beta)?)?.neg()?
                }
                DpoLossType::ExoPair => {
                    let qw = sigmoid(&bd)?;
                    let log_qw = log_sigmoid(&bd)?;
                    let ql = sigmoid(&bd.neg()?)?;
                    let log_ql = log_sigmoid(&bd.neg()?)?;
                    let (log_pw, log_pl) = ((-eps).ln_1p(), eps.ln());
                    ((qw * (log_qw - log_pw)?)? + (ql * (log_ql - log_pl)?)?)?
                }
                DpoLossType::Discopop => {
                    let modulation = sigmoid(&(&bd / self.discopop_tau)?)?;
                    let logistic = log_sigmoid(&bd)?.neg()?;
                    let expo = bd.neg()?.exp()?;
                    ((logistic * (modulation.neg()? + 1.0)?)? + (expo * modulation)?)?
                }
                DpoLossType::Sft => {
                    let nll = lp.chosen_nll.as_ref().ok_or_else(|| {
                        Error::Config("loss_type sft needs the chosen completions' NLL".into())
                    })?;
                    nll.broadcast_as(lp.chosen.shape())?.contiguous()?
                }
            };
            let term = (per.mean_all()? * w)?;
            total = Some(match total {
                None => term,
                Some(t) => (t + term)?,
            });
        }
        let loss = total.ok_or_else(|| Error::Config("no loss type".into()))?;
        let mut m = reward_metrics(&(cr.detach() * beta)?, &(rr.detach() * beta)?)?;
        m.insert("logps/chosen".into(), mean(&lp.chosen)?);
        m.insert("logps/rejected".into(), mean(&lp.rejected)?);
        Ok((loss, m))
    }
}
