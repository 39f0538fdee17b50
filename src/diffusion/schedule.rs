//! Noise schedules from a diffusers `scheduler_config.json`: betas (`linear`, `scaled_linear`,
//! `squaredcos_cap_v2`, or `trained_betas`), ᾱ = Π(1 − β), and the forward process
//! x_t = √ᾱ_t·x₀ + √(1 − ᾱ_t)·ε, and what the denoiser predicts (`prediction_type`).
//!
//! Arithmetic follows torch's: betas in f32 (`linspace` evaluated from both ends), the cumulative
//! product accumulated in f64 and stored as f32, so that values match diffusers to the last bits.

use crate::util::linspace_f32;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};
use std::path::Path;

fn default_t() -> usize {
    1000
}
fn default_beta_start() -> f64 {
    0.0001
}
fn default_beta_end() -> f64 {
    0.02
}
fn default_schedule() -> String {
    "linear".into()
}
fn default_prediction() -> String {
    "epsilon".into()
}
fn default_clip_range() -> f64 {
    1.0
}

/// The fields of diffusers' scheduler configs that postforge reads. Fields whose default differs per
/// scheduler class are `Option`s, resolved by the sampler.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SchedulerConfig {
    /// `_class_name` (DDIMScheduler, EulerDiscreteScheduler, ...).
    #[serde(rename = "_class_name", default)]
    pub class_name: Option<String>,
    /// Training timesteps T.
    #[serde(default = "default_t")]
    pub num_train_timesteps: usize,
    /// First beta.
    #[serde(default = "default_beta_start")]
    pub beta_start: f64,
    /// Last beta.
    #[serde(default = "default_beta_end")]
    pub beta_end: f64,
    /// `linear`, `scaled_linear`, `squaredcos_cap_v2`.
    #[serde(default = "default_schedule")]
    pub beta_schedule: String,
    /// Explicit betas.
    #[serde(default)]
    pub trained_betas: Option<Vec<f64>>,
    /// `epsilon`, `v_prediction`, `sample`.
    #[serde(default = "default_prediction")]
    pub prediction_type: String,
    /// Added to inference timesteps (`leading` spacing).
    #[serde(default)]
    pub steps_offset: usize,
    /// `leading`, `trailing`, `linspace` (default depends on the class).
    #[serde(default)]
    pub timestep_spacing: Option<String>,
    /// DDIM: clip x̂₀ (default true in the class, false in SD pipelines).
    #[serde(default)]
    pub clip_sample: Option<bool>,
    /// DDIM: clipping range.
    #[serde(default = "default_clip_range")]
    pub clip_sample_range: f64,
    /// DDIM: ᾱ before the first step is 1 (else ᾱ₀).
    #[serde(default)]
    pub set_alpha_to_one: Option<bool>,
    /// Rescale betas to zero terminal SNR.
    #[serde(default)]
    pub rescale_betas_zero_snr: bool,
    /// Everything else, kept for round trips.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Default for SchedulerConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("empty config deserialises")
    }
}

impl SchedulerConfig {
    /// Reads a `scheduler_config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        crate::util::read_json_config(path, |c: &Self| c.prediction().map(|_| ()))
    }
    /// Parsed `prediction_type`.
    pub fn prediction(&self) -> Result<Prediction> {
        Prediction::parse(&self.prediction_type)
    }
}

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

    /// Whether a model predicting this can be trained on a zero-terminal-SNR schedule: ε is
    /// undefined at SNR 0, so ε-prediction is refused.
    pub fn check_zero_terminal_snr(self) -> Result<()> {
        if self == Self::Epsilon {
            return Err(Error::Config(
                "zero terminal SNR needs v-prediction (v_parameterization): ε is undefined at SNR 0"
                    .into(),
            ));
        }
        Ok(())
    }
}

/// β_t, ᾱ_t and derived quantities of one schedule.
#[derive(Debug, Clone)]
pub struct NoiseSchedule {
    /// β (T).
    pub betas: Vec<f32>,
    /// ᾱ (T).
    pub alphas_cumprod: Vec<f32>,
}

impl NoiseSchedule {
    /// Builds the schedule of `cfg`.
    pub fn new(cfg: &SchedulerConfig) -> Result<Self> {
        let t = cfg.num_train_timesteps;
        if t == 0 {
            return Err(Error::Config("num_train_timesteps must be positive".into()));
        }
        let mut betas: Vec<f32> = if let Some(b) = &cfg.trained_betas {
            b.iter().map(|x| *x as f32).collect()
        } else {
            match cfg.beta_schedule.as_str() {
                "linear" => linspace_f32(cfg.beta_start as f32, cfg.beta_end as f32, t),
                "scaled_linear" => linspace_f32(
                    (cfg.beta_start as f32).sqrt(),
                    (cfg.beta_end as f32).sqrt(),
                    t,
                )
                .into_iter()
                .map(|b| b * b)
                .collect(),
                "squaredcos_cap_v2" => {
                    let ab = |x: f64| {
                        ((x + 0.008) / 1.008 * std::f64::consts::PI / 2.0)
                            .cos()
                            .powi(2)
                    };
                    (0..t)
                        .map(|i| {
                            let (t1, t2) = (i as f64 / t as f64, (i + 1) as f64 / t as f64);
                            (1.0 - ab(t2) / ab(t1)).min(0.999) as f32
                        })
                        .collect()
                }
                s => {
                    return Err(Error::Config(format!(
                        "beta_schedule `{s}` is not supported"
                    )))
                }
            }
        };
        if cfg.rescale_betas_zero_snr {
            betas = rescale_zero_terminal_snr(&betas);
        }
        let mut acc = 1f64;
        let alphas_cumprod = betas
            .iter()
            .map(|b| {
                acc *= (1.0f32 - b) as f64;
                acc as f32
            })
            .collect();
        Ok(Self {
            betas,
            alphas_cumprod,
        })
    }

    /// T.
    pub fn len(&self) -> usize {
        self.betas.len()
    }
    /// Never empty.
    pub fn is_empty(&self) -> bool {
        self.betas.is_empty()
    }

    /// ᾱ at integer timesteps, as a (b) tensor.
    fn gather(&self, t: &[usize], f: impl Fn(f32) -> f32, device: &Device) -> Result<Tensor> {
        let v: Vec<f32> = t
            .iter()
            .map(|&i| {
                self.alphas_cumprod.get(i).copied().map(&f).ok_or_else(|| {
                    Error::Msg(format!("timestep {i} out of range 0..{}", self.len()))
                })
            })
            .collect::<Result<_>>()?;
        Ok(Tensor::from_vec(v, t.len(), device)?)
    }

    fn per_sample(v: Tensor, like: &Tensor) -> Result<Tensor> {
        let mut shape = vec![1; like.rank()];
        shape[0] = v.dim(0)?;
        Ok(v.reshape(shape)?.to_dtype(like.dtype())?)
    }

    /// x_t = √ᾱ_t·x₀ + √(1 − ᾱ_t)·ε, one timestep per sample.
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, t: &[usize]) -> Result<Tensor> {
        let a = Self::per_sample(self.gather(t, |a| a.sqrt(), x0.device())?, x0)?;
        let s = Self::per_sample(self.gather(t, |a| (1.0 - a).sqrt(), x0.device())?, x0)?;
        Ok((x0.broadcast_mul(&a)? + noise.broadcast_mul(&s)?)?)
    }

    /// v = √ᾱ_t·ε − √(1 − ᾱ_t)·x₀.
    pub fn velocity(&self, x0: &Tensor, noise: &Tensor, t: &[usize]) -> Result<Tensor> {
        let a = Self::per_sample(self.gather(t, |a| a.sqrt(), x0.device())?, x0)?;
        let s = Self::per_sample(self.gather(t, |a| (1.0 - a).sqrt(), x0.device())?, x0)?;
        Ok((noise.broadcast_mul(&a)? - x0.broadcast_mul(&s)?)?)
    }

    /// SNR_t = ᾱ_t / (1 − ᾱ_t), computed as diffusers' `compute_snr` does ((√ᾱ / √(1−ᾱ))²).
    pub fn snr(&self, t: &[usize]) -> Vec<f32> {
        t.iter()
            .filter_map(|&i| self.alphas_cumprod.get(i))
            .map(|a| {
                let r = a.sqrt() / (1.0 - a).sqrt();
                r * r
            })
            .collect()
    }

    /// The schedule's ᾱ as a tensor.
    pub fn alphas_cumprod_tensor(&self, device: &Device) -> Result<Tensor> {
        Ok(Tensor::from_slice(&self.alphas_cumprod, self.len(), device)?.to_dtype(DType::F32)?)
    }
}

/// Lin et al. 2023: shift and scale √ᾱ so that the last timestep has zero SNR.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let mut acc = 1f64;
    let sqrt_ab: Vec<f64> = betas
        .iter()
        .map(|b| {
            acc *= 1.0 - *b as f64;
            acc.sqrt()
        })
        .collect();
    let (first, last) = (sqrt_ab[0], sqrt_ab[sqrt_ab.len() - 1]);
    let scaled: Vec<f64> = sqrt_ab
        .iter()
        .map(|s| (s - last) * first / (first - last))
        .collect();
    let ab: Vec<f64> = scaled.iter().map(|s| s * s).collect();
    let mut out = Vec::with_capacity(ab.len());
    for i in 0..ab.len() {
        let alpha = if i == 0 { ab[0] } else { ab[i] / ab[i - 1] };
        out.push((1.0 - alpha) as f32);
    }
    out
}
