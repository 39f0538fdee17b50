//! Training objective of a denoiser: the target (ε, v or x₀), min-SNR-γ weighting (Hang et al. 2023),
//! noise offset, and a masked per-pixel MSE, with kohya / diffusers semantics:
//! - min-SNR-γ: ε-prediction weight min(SNR, γ)/SNR, v-prediction min(SNR, γ)/(SNR + 1);
//! - noise offset: ε ← ε + offset·n with n ~ N(0, 1) of shape (B, C, 1, 1);
//! - masked loss: the mask (area-resized to the latent grid) multiplies the per-pixel loss, which is
//!   then averaged over channels and pixels, weighted per sample, and averaged over the batch.

use super::schedule::NoiseSchedule;
use crate::peft::init::normal;
use crate::{Error, Result};
use candle_core::{DType, Tensor};
use rand_chacha::ChaCha8Rng;

/// What the denoiser predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Prediction {
    /// ε (`epsilon`).
    Epsilon,
    /// v = √ᾱ·ε − √(1−ᾱ)·x₀ (`v_prediction`).
    V,
    /// x₀ (`sample`).
    Sample,
}

impl Prediction {
    /// Parses diffusers' `prediction_type`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "epsilon" => Ok(Self::Epsilon),
            "v_prediction" => Ok(Self::V),
            "sample" => Ok(Self::Sample),
            s => Err(Error::Config(format!(
                "prediction_type `{s}` is not one of epsilon, v_prediction, sample"
            ))),
        }
    }
}

/// The loss settings of a diffusion training run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Objective {
    /// Target kind.
    pub prediction: Prediction,
    /// min-SNR-γ (kohya `--min_snr_gamma`; 5 is the usual choice).
    pub min_snr_gamma: Option<f64>,
    /// Noise offset (kohya `--noise_offset`).
    pub noise_offset: f64,
}

impl Objective {
    /// Training noise for latents of `shape` (B, C, H, W), with the noise offset applied.
    pub fn noise(&self, shape: &[usize], rng: &mut ChaCha8Rng) -> Result<Tensor> {
        let n = normal(shape, 1.0, rng)?;
        if self.noise_offset == 0.0 {
            return Ok(n);
        }
        let (b, c) = (shape[0], shape[1]);
        let off = (normal(&[b, c, 1, 1], 1.0, rng)? * self.noise_offset)?;
        Ok(n.broadcast_add(&off)?)
    }

    /// The regression target at timesteps `t`.
    pub fn target(
        &self,
        schedule: &NoiseSchedule,
        x0: &Tensor,
        noise: &Tensor,
        t: &[usize],
    ) -> Result<Tensor> {
        Ok(match self.prediction {
            Prediction::Epsilon => noise.clone(),
            Prediction::V => schedule.velocity(x0, noise, t)?,
            Prediction::Sample => x0.clone(),
        })
    }

    /// Per-sample loss weights (1 without min-SNR).
    pub fn weights(&self, schedule: &NoiseSchedule, t: &[usize]) -> Vec<f32> {
        let Some(g) = self.min_snr_gamma else {
            return vec![1.0; t.len()];
        };
        schedule
            .snr(t)
            .into_iter()
            .map(|snr| {
                let m = snr.min(g as f32);
                match self.prediction {
                    Prediction::Epsilon => m / snr,
                    Prediction::V => m / (snr + 1.0),
                    Prediction::Sample => m,
                }
            })
            .collect()
    }

    /// Weighted (masked) MSE: mean over the batch of wᵢ · mean_{c,h,w}((pred − target)² ⊙ mask).
    /// `mask` is (B, 1, H, W) or (B, H, W) at the latent resolution, values in [0, 1].
    pub fn loss(
        &self,
        pred: &Tensor,
        target: &Tensor,
        weights: &[f32],
        mask: Option<&Tensor>,
    ) -> Result<Tensor> {
        if pred.dims() != target.dims() {
            return Err(Error::Msg(format!(
                "prediction shape {:?} differs from target shape {:?}",
                pred.dims(),
                target.dims()
            )));
        }
        let b = pred.dim(0)?;
        if weights.len() != b {
            return Err(Error::Msg(format!(
                "{} loss weights for a batch of {b}",
                weights.len()
            )));
        }
        let mut l = (pred - target)?.sqr()?;
        if let Some(m) = mask {
            let m = if m.rank() == 3 {
                m.unsqueeze(1)?
            } else {
                m.clone()
            };
            let (want_h, want_w) = (pred.dim(2)?, pred.dim(3)?);
            if m.rank() != 4
                || m.dim(0)? != b
                || m.dim(1)? != 1
                || m.dim(2)? != want_h
                || m.dim(3)? != want_w
            {
                return Err(Error::Msg(format!(
                    "loss mask has shape {:?}; it must be ({b}, 1, {want_h}, {want_w}) to match the latents {:?}",
                    m.dims(),
                    pred.dims()
                )));
            }
            l = l.broadcast_mul(&m.to_dtype(l.dtype())?)?;
        }
        let per = l.flatten_from(1)?.mean(1)?; // (B)
        let w = Tensor::from_slice(weights, b, pred.device())?.to_dtype(per.dtype())?;
        Ok((per * w)?.mean_all()?)
    }
}

/// Area-resizes a mask (B, 1, H, W) to (B, 1, h, w) when H, W are integer multiples of h, w
/// (the usual image-to-latent factor of 8); values stay in [0, 1].
pub fn resize_mask(mask: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (_, _, mh, mw) = mask.dims4()?;
    if mh % h != 0 || mw % w != 0 {
        return Err(Error::Msg(format!(
            "mask of {mh}x{mw} cannot be area-resized to {h}x{w} (not an integer factor)"
        )));
    }
    let (fh, fw) = (mh / h, mw / w);
    Ok(mask.to_dtype(DType::F32)?.avg_pool2d((fh, fw))?)
}
