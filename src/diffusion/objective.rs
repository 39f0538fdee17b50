//! Training objective of a denoiser: the target (ε, v or x₀), min-SNR-γ weighting (Hang et al. 2023),
//! noise offset, and a masked per-pixel MSE, with kohya / diffusers semantics:
//! - min-SNR-γ: ε-prediction weight min(SNR, γ)/SNR, v-prediction min(SNR, γ)/(SNR + 1);
//! - noise offset: ε ← ε + offset·n with n ~ N(0, 1) of shape (B, C, 1, 1);
//! - masked loss: the mask (area-resized to the latent grid) multiplies the per-pixel loss, which is
//!   then averaged over channels and pixels, weighted per sample, and averaged over the batch.

use super::schedule::{NoiseSchedule, Prediction};
use crate::rng::normal;
use crate::{Error, Result};
use candle_core::{DType, Tensor};
use rand_chacha::ChaCha8Rng;

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

/// Which training timesteps are drawn: kohya's `--min_timestep` / `--max_timestep` range (max
/// exclusive) and diffusers' timestep bias (`--timestep_bias_strategy earlier|later|range|none`
/// with `--timestep_bias_multiplier`, `--timestep_bias_portion`, `--timestep_bias_begin` /
/// `--timestep_bias_end`): the biased timesteps' weights are multiplied, and timesteps are drawn
/// in proportion to their weights.
#[derive(Debug, Clone, PartialEq)]
pub struct TimestepSampling {
    /// Smallest timestep drawn (kohya default 0).
    pub min_timestep: Option<usize>,
    /// One past the largest timestep drawn (kohya default T).
    pub max_timestep: Option<usize>,
    /// `none`, `earlier`, `later`, `range`.
    pub bias_strategy: String,
    /// Weight factor of the biased timesteps (diffusers default 1).
    pub bias_multiplier: f64,
    /// Share of the timesteps biased by `earlier` / `later` (diffusers default 0.25).
    pub bias_portion: f64,
    /// First timestep biased by `range`.
    pub bias_begin: usize,
    /// One past the last timestep biased by `range`.
    pub bias_end: usize,
}

impl Default for TimestepSampling {
    fn default() -> Self {
        Self {
            min_timestep: None,
            max_timestep: None,
            bias_strategy: "none".into(),
            bias_multiplier: 1.0,
            bias_portion: 0.25,
            bias_begin: 0,
            bias_end: 1000,
        }
    }
}

impl TimestepSampling {
    /// The probability of each of the `n` training timesteps (sums to 1), or an error naming the
    /// setting that is out of range.
    pub fn probabilities(&self, n: usize) -> Result<Vec<f64>> {
        let lo = self.min_timestep.unwrap_or(0);
        let hi = self.max_timestep.unwrap_or(n);
        if lo >= hi || hi > n {
            return Err(Error::Config(format!(
                "min_timestep {lo} / max_timestep {hi} must satisfy 0 <= min < max <= {n}"
            )));
        }
        let mut w = vec![1.0f64; n];
        let biased = match self.bias_strategy.as_str() {
            "none" => None,
            "earlier" | "later" => {
                if !(0.0..=1.0).contains(&self.bias_portion) {
                    return Err(Error::Config(format!(
                        "timestep_bias_portion {} is not in [0, 1]",
                        self.bias_portion
                    )));
                }
                let k = (self.bias_portion * n as f64) as usize;
                Some(if self.bias_strategy == "later" {
                    n - k..n
                } else {
                    0..k
                })
            }
            "range" => {
                if self.bias_begin >= self.bias_end || self.bias_end > n {
                    return Err(Error::Config(format!(
                        "timestep_bias_begin {} / timestep_bias_end {} must satisfy begin < end <= {n}",
                        self.bias_begin, self.bias_end
                    )));
                }
                Some(self.bias_begin..self.bias_end)
            }
            s => {
                return Err(Error::Config(format!(
                    "timestep_bias_strategy `{s}` is not one of none, earlier, later, range"
                )))
            }
        };
        if let Some(r) = biased {
            if !(self.bias_multiplier > 0.0 && self.bias_multiplier.is_finite()) {
                return Err(Error::Config(format!(
                    "timestep_bias_multiplier {} must be positive",
                    self.bias_multiplier
                )));
            }
            for v in &mut w[r] {
                *v *= self.bias_multiplier;
            }
        }
        for (i, v) in w.iter_mut().enumerate() {
            if i < lo || i >= hi {
                *v = 0.0;
            }
        }
        let s: f64 = w.iter().sum();
        Ok(w.into_iter().map(|v| v / s).collect())
    }

    /// A sampler over `n` timesteps.
    pub fn sampler(&self, n: usize) -> Result<TimestepSampler> {
        let p = self.probabilities(n)?;
        let mut acc = 0.0;
        let cdf = p
            .iter()
            .map(|v| {
                acc += v;
                acc
            })
            .collect();
        Ok(TimestepSampler { cdf })
    }
}

/// Draws training timesteps from the distribution of a [`TimestepSampling`].
#[derive(Debug, Clone)]
pub struct TimestepSampler {
    cdf: Vec<f64>,
}

impl TimestepSampler {
    /// One timestep.
    pub fn draw(&self, rng: &mut ChaCha8Rng) -> usize {
        use rand::Rng;
        let u: f64 = rng.random::<f64>() * self.cdf.last().copied().unwrap_or(1.0);
        self.cdf
            .partition_point(|&c| c <= u)
            .min(self.cdf.len().saturating_sub(1))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn timestep_bias_follows_diffusers_weights() {
        let later = TimestepSampling {
            bias_strategy: "later".into(),
            bias_multiplier: 3.0,
            bias_portion: 0.25,
            ..Default::default()
        };
        let p = later.probabilities(1000).unwrap();
        // 750 timesteps of weight 1 and 250 of weight 3: 1/1500 and 3/1500.
        assert!((p[0] - 1.0 / 1500.0).abs() < 1e-12 && (p[999] - 3.0 / 1500.0).abs() < 1e-12);
        assert!((p[749] - p[0]).abs() < 1e-15 && (p[750] - p[999]).abs() < 1e-15);
        let s = later.sampler(1000).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let n = 20000;
        let high = (0..n).filter(|_| s.draw(&mut rng) >= 750).count() as f64 / n as f64;
        assert!((high - 0.5).abs() < 0.02, "share of late timesteps {high}");
        // kohya's range: nothing drawn outside [min, max).
        let r = TimestepSampling {
            min_timestep: Some(100),
            max_timestep: Some(200),
            ..Default::default()
        };
        let s = r.sampler(1000).unwrap();
        assert!((0..2000)
            .map(|_| s.draw(&mut rng))
            .all(|t| (100..200).contains(&t)));
        for bad in [
            TimestepSampling {
                bias_strategy: "sideways".into(),
                ..Default::default()
            },
            TimestepSampling {
                bias_strategy: "later".into(),
                bias_multiplier: 0.0,
                ..Default::default()
            },
            TimestepSampling {
                min_timestep: Some(500),
                max_timestep: Some(400),
                ..Default::default()
            },
        ] {
            assert!(bad.probabilities(1000).is_err(), "{bad:?}");
        }
    }
}
