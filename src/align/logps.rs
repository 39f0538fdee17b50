//! Sequence log-probabilities from logits, and the numerically stable scalar functions the
//! preference losses are built from (each a composition of differentiable candle ops).

use crate::{Error, Result};
use candle_core::{DType, Tensor, D};

/// log σ(x) = min(x, 0) − log(1 + e^{−|x|}), stable for large |x|.
pub fn log_sigmoid(x: &Tensor) -> Result<Tensor> {
    let neg_abs = x.abs()?.neg()?;
    Ok((x.minimum(0f32)? - (neg_abs.exp()? + 1.0)?.log()?)?)
}

/// σ(x) = exp(log σ(x)).
pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    Ok(log_sigmoid(x)?.exp()?)
}

/// log(1 − eˣ) for x < 0, stable on both sides of −ln 2 (TRL's `log1mexp`).
pub fn log1mexp(x: &Tensor) -> Result<Tensor> {
    // x < −ln2: log1p(−eˣ); otherwise log(−expm1(x)). candle has neither log1p nor expm1, so
    // both branches are written with care: for x < −ln2, eˣ < ½ and log(1 − eˣ) is well
    // conditioned; for −ln2 ≤ x < 0, −expm1(x) = 1 − eˣ is computed as −x·(1 + x/2 + x²/6 + x³/24
    // + x⁴/120) near 0 and as 1 − eˣ elsewhere.
    let t = -std::f64::consts::LN_2;
    let far = (x.exp()?.neg()? + 1.0)?.log()?;
    let x2 = x.sqr()?;
    let series = x.neg()?.mul(
        &((((x.clone() / 2.0)? + 1.0)? + (&x2 / 6.0)?)?
            + ((x2.mul(x)? / 24.0)? + (x2.sqr()? / 120.0)?)?)?,
    )?;
    let near_zero = x.ge(-1e-2)?;
    let near = near_zero
        .where_cond(&series, &(x.exp()?.neg()? + 1.0)?)?
        .log()?;
    Ok(x.lt(t)?.where_cond(&far, &near)?)
}

/// Per-token log-probs of `targets` (B, T) under `logits` (B, T, V) (already aligned: position t
/// scores target t).
pub fn token_logps(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    let t = targets
        .to_dtype(DType::U32)?
        .flatten_all()?
        .to_vec1::<u32>()?;
    crate::nn::loss::token_logprobs(logits, &t)
}

/// Sequence log-probs of the completion tokens: for ids (B, T) and the completion mask (B, T;
/// 1 on completion tokens), the next-token log-probs of the masked targets, summed (and the token
/// counts, for means). Also the mean logit over completion positions (TRL's `logits/*` metric).
pub struct SeqLogps {
    /// Σ log p over completion tokens (B).
    pub sum: Tensor,
    /// Completion tokens per row (B).
    pub tokens: Tensor,
    /// Per row, the sum over completion tokens of the mean logit (over the vocabulary) at the
    /// predicting position (B, detached): with `tokens` it gives TRL's `logits/*` metrics.
    pub logit_sum: Vec<f32>,
    /// Mean next-token NLL over all completion tokens of the batch (scalar tensor).
    pub nll: Tensor,
}

impl SeqLogps {
    /// The mean logit over the completion tokens of rows `rows` (TRL's `logits/chosen` and
    /// `logits/rejected`: the mean over those tokens and the vocabulary).
    pub fn mean_logit(&self, rows: impl IntoIterator<Item = usize>) -> Result<f64> {
        let toks = self.tokens.to_vec1::<f32>()?;
        let (mut s, mut n) = (0f64, 0f64);
        for i in rows {
            s += *self.logit_sum.get(i).unwrap_or(&0.0) as f64;
            n += *toks.get(i).unwrap_or(&0.0) as f64;
        }
        Ok(if n > 0.0 { s / n } else { 0.0 })
    }

    /// Σ log p / tokens (B).
    pub fn mean(&self) -> Result<Tensor> {
        Ok(self.sum.div(&self.tokens.clamp(1f32, f32::MAX)?)?)
    }
}

/// Computes [`SeqLogps`] from logits (B, T, V), ids (B, T) and the completion mask (B, T).
pub fn sequence_logps(logits: &Tensor, ids: &Tensor, completion_mask: &Tensor) -> Result<SeqLogps> {
    let (b, t, _) = logits.dims3()?;
    if ids.dims() != [b, t] || completion_mask.dims() != [b, t] {
        return Err(Error::Msg(format!(
            "logits {:?}, ids {:?} and completion mask {:?} do not fit",
            logits.dims(),
            ids.dims(),
            completion_mask.dims()
        )));
    }
    let m = completion_mask.narrow(1, 1, t - 1)?.to_dtype(DType::F32)?;
    let lp = crate::nn::loss::shifted_logprobs(logits, ids)?;
    let sum = (&lp * &m)?.sum(1)?;
    let tokens = m.sum(1)?;
    let n = m.sum_all()?.to_scalar::<f32>()?;
    if n <= 0.0 {
        return Err(Error::Msg("no completion tokens in the batch".into()));
    }
    let nll = ((&lp * &m)?.sum_all()? * (-1.0 / n as f64))?;
    let logit_sum = (logits.narrow(1, 0, t - 1)?.detach().mean(D::Minus1)? * &m)?
        .sum(1)?
        .to_vec1::<f32>()?;
    Ok(SeqLogps {
        sum,
        tokens,
        logit_sum,
        nll,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn mean_logits_split_by_row() -> Result<()> {
        let dev = Device::Cpu;
        // Two rows of three positions over a vocabulary of two; row 0 predicts its last two
        // tokens, row 1 only its last.
        let logits = Tensor::from_vec(
            vec![1f32, 3., 5., 7., 0., 0., -2., 0., 4., 6., 9., 9.],
            (2, 3, 2),
            &dev,
        )?;
        let ids = Tensor::from_vec(vec![0u32, 1, 0, 1, 1, 0], (2, 3), &dev)?;
        let mask = Tensor::from_vec(vec![0u8, 1, 1, 0, 0, 1], (2, 3), &dev)?;
        let lp = sequence_logps(&logits, &ids, &mask)?;
        // Row 0: mean logits at positions 0 and 1 are 2 and 6; row 1: position 1 gives 5.
        assert_eq!(lp.logit_sum, vec![8.0, 5.0]);
        assert!((lp.mean_logit(0..1)? - 4.0).abs() < 1e-6);
        assert!((lp.mean_logit(1..2)? - 5.0).abs() < 1e-6);
        assert!((lp.mean_logit(0..2)? - 13.0 / 3.0).abs() < 1e-6);
        Ok(())
    }
}
