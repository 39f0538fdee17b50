//! Samplers with diffusers' step semantics: DDIM (Song et al. 2021, with η), Euler and Euler ancestral
//! (Karras et al. 2022, k-diffusion), over `leading` / `trailing` / `linspace` timestep spacings.
//!
//! DDIM: x̂₀ from the prediction, then x_{t'} = √ᾱ_{t'}·x̂₀ + √(1 − ᾱ_{t'} − σ²)·ε̂ + σ·z with
//! σ = η·√((1 − ᾱ_{t'})/(1 − ᾱ_t)·(1 − ᾱ_t/ᾱ_{t'})) and t' = t − T/n.
//! Euler: σ_t = √((1 − ᾱ)/ᾱ) interpolated at the (possibly fractional) timesteps; the model sees
//! x/√(σ² + 1); x ← x + (x − x̂₀)/σ·(σ_next − σ). Ancestral: step to σ_down, add z·σ_up.

use super::schedule::{NoiseSchedule, Prediction, SchedulerConfig};
use crate::rng::{normal, rng_for};
use crate::{Error, Result};
use candle_core::Tensor;

/// Which sampler (kohya's `--ss` names: `ddim`, `euler`, `euler_a`).
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SamplerKind {
    /// DDIM with η (0 = deterministic).
    Ddim {
        /// η.
        eta: f64,
    },
    /// Euler (deterministic).
    Euler,
    /// Euler ancestral.
    EulerAncestral,
}

impl SamplerKind {
    /// Parses `ddim`, `euler`, `euler_a` (also diffusers class names).
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "ddim" | "DDIMScheduler" => Ok(Self::Ddim { eta: 0.0 }),
            "euler" | "EulerDiscreteScheduler" => Ok(Self::Euler),
            "euler_a" | "k_euler_a" | "EulerAncestralDiscreteScheduler" => Ok(Self::EulerAncestral),
            s => Err(Error::Config(format!(
                "sampler `{s}` is not one of ddim, euler, euler_a"
            ))),
        }
    }
    /// Short name.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Ddim { .. } => "ddim",
            Self::Euler => "euler",
            Self::EulerAncestral => "euler_a",
        }
    }
}

/// Result of one step.
pub struct StepOutput {
    /// The next (less noisy) sample.
    pub prev_sample: Tensor,
    /// The model's estimate of the clean sample.
    pub pred_original_sample: Tensor,
}

/// A sampler prepared for `n` inference steps.
pub struct Sampler {
    kind: SamplerKind,
    schedule: NoiseSchedule,
    prediction: Prediction,
    timesteps: Vec<f64>,
    sigmas: Vec<f32>,
    clip: Option<f64>,
    final_alpha: f32,
    train_steps: usize,
}

fn round_half_even(x: f64) -> f64 {
    // numpy's round: halves to even.
    let r = x.round();
    if (x - x.trunc()).abs() == 0.5 && r % 2.0 != 0.0 {
        r - x.signum()
    } else {
        r
    }
}

impl Sampler {
    /// Prepares `kind` over `steps` inference steps for the schedule in `cfg`.
    pub fn new(kind: SamplerKind, cfg: &SchedulerConfig, steps: usize) -> Result<Self> {
        let schedule = NoiseSchedule::new(cfg)?;
        let t = cfg.num_train_timesteps;
        if steps == 0 || steps > t {
            return Err(Error::Config(format!(
                "inference steps {steps} must be in 1..={t}"
            )));
        }
        let prediction = cfg.prediction()?;
        let is_ddim = matches!(kind, SamplerKind::Ddim { .. });
        let spacing = cfg.timestep_spacing.clone().unwrap_or_else(|| {
            if is_ddim {
                "leading".into()
            } else {
                "linspace".into()
            }
        });
        let timesteps: Vec<f64> = match spacing.as_str() {
            "leading" => {
                let ratio = (t / steps) as f64;
                (0..steps)
                    .rev()
                    .map(|i| round_half_even(i as f64 * ratio) + cfg.steps_offset as f64)
                    .collect()
            }
            "trailing" => {
                let ratio = t as f64 / steps as f64;
                let mut v = vec![];
                let mut x = t as f64;
                while x > 0.0 && v.len() < steps {
                    v.push(round_half_even(x) - 1.0);
                    x -= ratio;
                }
                v
            }
            "linspace" => {
                let last = (t - 1) as f64;
                (0..steps)
                    .rev()
                    .map(|i| {
                        let v = if steps == 1 {
                            0.0
                        } else {
                            last * i as f64 / (steps - 1) as f64
                        };
                        if is_ddim {
                            round_half_even(v)
                        } else {
                            v as f32 as f64
                        }
                    })
                    .collect()
            }
            s => {
                return Err(Error::Config(format!(
                    "timestep_spacing `{s}` is not one of leading, trailing, linspace"
                )))
            }
        };
        if timesteps.iter().any(|x| *x < 0.0 || *x > (t - 1) as f64) {
            return Err(Error::Config(format!(
                "timesteps {timesteps:?} fall outside 0..{t} (steps_offset too large?)"
            )));
        }
        let mut sigmas = vec![];
        if !is_ddim {
            // σ over the training grid, linearly interpolated at the inference timesteps, then 0.
            // With zero terminal SNR the last ᾱ is 0 (σ = ∞); diffusers' Euler schedulers
            // replace it with 2⁻²⁴.
            let grid: Vec<f32> = schedule
                .alphas_cumprod
                .iter()
                .map(|&a| if a == 0.0 { 2f32.powi(-24) } else { a })
                .map(|a| ((1.0 - a) / a).sqrt())
                .collect();
            for &ts in &timesteps {
                let lo = ts.floor() as usize;
                let hi = (lo + 1).min(t - 1);
                let f = ts - lo as f64;
                sigmas.push((grid[lo] as f64 * (1.0 - f) + grid[hi] as f64 * f) as f32);
            }
            sigmas.push(0.0);
        }
        let clip = (is_ddim && cfg.clip_sample.unwrap_or(true)).then_some(cfg.clip_sample_range);
        let final_alpha = if cfg.set_alpha_to_one.unwrap_or(true) {
            1.0
        } else {
            schedule.alphas_cumprod[0]
        };
        Ok(Self {
            kind,
            schedule,
            prediction,
            timesteps,
            sigmas,
            clip,
            final_alpha,
            train_steps: t,
        })
    }

    /// The kind.
    pub fn kind(&self) -> SamplerKind {
        self.kind
    }
    /// Inference timesteps (integers for DDIM, possibly fractional for Euler), from noisy to clean.
    pub fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }
    /// σ per step (Euler family), with a trailing 0.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }
    /// The scale of the initial noise.
    pub fn init_noise_sigma(&self, cfg: &SchedulerConfig) -> f64 {
        if matches!(self.kind, SamplerKind::Ddim { .. }) {
            return 1.0;
        }
        let max = self.sigmas.iter().cloned().fold(0f32, f32::max) as f64;
        match cfg.timestep_spacing.as_deref().unwrap_or("linspace") {
            "linspace" | "trailing" => max,
            _ => (max * max + 1.0).sqrt(),
        }
    }

    /// What the model sees at step `i` (Euler: x/√(σ² + 1); DDIM: x).
    pub fn scale_model_input(&self, x: &Tensor, i: usize) -> Result<Tensor> {
        if matches!(self.kind, SamplerKind::Ddim { .. }) {
            return Ok(x.clone());
        }
        let s = self.sigma(i)? as f64;
        Ok((x / (s * s + 1.0).sqrt())?)
    }

    fn sigma(&self, i: usize) -> Result<f32> {
        self.sigmas
            .get(i)
            .copied()
            .ok_or_else(|| Error::Msg(format!("step {i} out of range")))
    }

    /// Whether step `i` draws noise.
    pub fn needs_noise(&self) -> bool {
        match self.kind {
            SamplerKind::Ddim { eta } => eta > 0.0,
            SamplerKind::Euler => false,
            SamplerKind::EulerAncestral => true,
        }
    }

    /// One step from `sample` at step index `i` given the (guided) model output. `noise` is required
    /// when [`Self::needs_noise`].
    pub fn step(
        &self,
        model_output: &Tensor,
        i: usize,
        sample: &Tensor,
        noise: Option<&Tensor>,
    ) -> Result<StepOutput> {
        let t = *self
            .timesteps
            .get(i)
            .ok_or_else(|| Error::Msg(format!("step {i} out of range")))?;
        match self.kind {
            SamplerKind::Ddim { eta } => {
                let ti = t as usize;
                let prev = ti as i64 - (self.train_steps / self.timesteps.len()) as i64;
                let a_t = self.schedule.alphas_cumprod[ti];
                let a_p = if prev >= 0 {
                    self.schedule.alphas_cumprod[prev as usize]
                } else {
                    self.final_alpha
                };
                let b_t = 1.0 - a_t;
                let (sa, sb) = (a_t.sqrt() as f64, b_t.sqrt() as f64);
                let (mut x0, eps) = match self.prediction {
                    Prediction::Epsilon => (
                        ((sample - (model_output * sb)?)? / sa)?,
                        model_output.clone(),
                    ),
                    Prediction::Sample => {
                        let x0 = model_output.clone();
                        let eps = ((sample - (&x0 * sa)?)? / sb)?;
                        (x0, eps)
                    }
                    Prediction::V => (
                        (((sample * sa)? - (model_output * sb)?)?),
                        ((model_output * sa)? + (sample * sb)?)?,
                    ),
                };
                if let Some(r) = self.clip {
                    // diffusers clips x̂₀ but keeps ε̂ from the model output.
                    x0 = x0.clamp(-r, r)?;
                }
                let variance = (1.0 - a_p) / b_t * (1.0 - a_t / a_p);
                let std = eta * (variance as f64).sqrt();
                let dir = (&eps * ((1.0 - a_p as f64) - std * std).max(0.0).sqrt())?;
                let mut prev_sample = ((&x0 * (a_p as f64).sqrt())? + dir)?;
                if eta > 0.0 {
                    let z =
                        noise.ok_or_else(|| Error::Msg("DDIM with eta > 0 needs noise".into()))?;
                    prev_sample = (prev_sample + (z * std)?)?;
                }
                Ok(StepOutput {
                    prev_sample,
                    pred_original_sample: x0,
                })
            }
            SamplerKind::Euler | SamplerKind::EulerAncestral => {
                let s = self.sigma(i)? as f64;
                let s_next = self.sigma(i + 1)? as f64;
                let x0 = match self.prediction {
                    Prediction::Epsilon => (sample - (model_output * s)?)?,
                    Prediction::V => {
                        ((model_output * (-s / (s * s + 1.0).sqrt()))? + (sample / (s * s + 1.0))?)?
                    }
                    Prediction::Sample => model_output.clone(),
                };
                let deriv = ((sample - &x0)? / s)?;
                if self.kind == SamplerKind::Euler {
                    let prev_sample = (sample + (deriv * (s_next - s))?)?;
                    return Ok(StepOutput {
                        prev_sample,
                        pred_original_sample: x0,
                    });
                }
                let up = (s_next * s_next * (s * s - s_next * s_next) / (s * s))
                    .max(0.0)
                    .sqrt();
                let down = (s_next * s_next - up * up).max(0.0).sqrt();
                let z = noise.ok_or_else(|| Error::Msg("Euler ancestral needs noise".into()))?;
                let prev_sample = ((sample + (deriv * (down - s))?)? + (z * up)?)?;
                Ok(StepOutput {
                    prev_sample,
                    pred_original_sample: x0,
                })
            }
        }
    }

    /// Samples a batch: one seed per image (initial noise and any step noise come from that image's
    /// seed alone, so an image does not change with the batch it is in). `denoise(x_in, t)` returns
    /// the (already guided) model output for the scaled input at timestep `t`.
    pub fn sample(
        &self,
        cfg: &SchedulerConfig,
        latent_shape: &[usize],
        seeds: &[u64],
        device: &candle_core::Device,
        denoise: impl FnMut(&Tensor, f64) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let per_image = |tag: &str| -> Result<Tensor> {
            let parts: Vec<Tensor> = seeds
                .iter()
                .map(|s| normal(latent_shape, 1.0, &mut rng_for(*s, tag)))
                .collect::<Result<_>>()?;
            Ok(Tensor::stack(&parts, 0)?.to_device(device)?)
        };
        let x = (per_image("latents")? * self.init_noise_sigma(cfg))?;
        self.run_from(x, 0, seeds, device, denoise, |_, x| Ok(x))
    }

    /// The step index an image-to-image run starts at for `strength` in [0, 1] (diffusers'
    /// `get_timesteps`: the last ⌊steps·strength⌋ steps run; `steps` means none do).
    pub fn start_index(&self, strength: f64) -> usize {
        let n = self.timesteps.len();
        let init = ((n as f64 * strength) as usize).min(n);
        n - init
    }

    /// `x0` noised to the level the sampler expects before step `i` (diffusers' `add_noise`):
    /// DDIM √ᾱ_t·x₀ + √(1 − ᾱ_t)·ε; Euler x₀ + σ_i·ε. `i` = the number of steps gives `x0` itself.
    pub fn add_noise(&self, x0: &Tensor, noise: &Tensor, i: usize) -> Result<Tensor> {
        if i >= self.timesteps.len() {
            return Ok(x0.clone());
        }
        match self.kind {
            SamplerKind::Ddim { .. } => {
                let a = self.schedule.alphas_cumprod[self.timesteps[i] as usize] as f64;
                Ok(((x0 * a.sqrt())? + (noise * (1.0 - a).sqrt())?)?)
            }
            SamplerKind::Euler | SamplerKind::EulerAncestral => {
                Ok((x0 + (noise * self.sigma(i)? as f64)?)?)
            }
        }
    }

    /// Runs steps `start..` from `x` (already at step `start`'s noise level), with the same
    /// per-image step noise as [`Self::sample`]. `after(i, x)` sees the sample after step `i` and
    /// returns the one to continue from (a masked edit pastes the noised source back there).
    pub fn run_from(
        &self,
        mut x: Tensor,
        start: usize,
        seeds: &[u64],
        device: &candle_core::Device,
        mut denoise: impl FnMut(&Tensor, f64) -> Result<Tensor>,
        mut after: impl FnMut(usize, Tensor) -> Result<Tensor>,
    ) -> Result<Tensor> {
        let shape: Vec<usize> = x.dims()[1..].to_vec();
        let per_image = |tag: &str| -> Result<Tensor> {
            let parts: Vec<Tensor> = seeds
                .iter()
                .map(|s| normal(&shape, 1.0, &mut rng_for(*s, tag)))
                .collect::<Result<_>>()?;
            Ok(Tensor::stack(&parts, 0)?.to_device(device)?)
        };
        for (i, &t) in self.timesteps.iter().enumerate().skip(start) {
            let x_in = self.scale_model_input(&x, i)?;
            let out = denoise(&x_in, t)?;
            let z = if self.needs_noise() {
                Some(per_image(&format!("step{i}"))?)
            } else {
                None
            };
            x = self.step(&out, i, &x, z.as_ref())?.prev_sample;
            x = after(i, x)?;
        }
        Ok(x)
    }
}

/// Classifier-free guidance: ε_u + s·(ε_c − ε_u).
pub fn guide(uncond: &Tensor, cond: &Tensor, scale: f64) -> Result<Tensor> {
    Ok((uncond + ((cond - uncond)? * scale)?)?)
}

/// diffusers' `guidance_rescale` (Lin et al. 2024, §3.4; `rescale_noise_cfg`): the guided output
/// is rescaled per image to the standard deviation of the conditional one, and mixed back with
/// weight φ: out = φ·guided·(σ_cond/σ_guided) + (1 − φ)·guided. Standard deviations are torch's
/// (unbiased) over all but the batch dimension. It keeps strong guidance from over-exposing images
/// of a zero-terminal-SNR model.
pub fn rescale_guidance(guided: &Tensor, cond: &Tensor, phi: f64) -> Result<Tensor> {
    if phi == 0.0 {
        return Ok(guided.clone());
    }
    let std = |t: &Tensor| -> Result<Tensor> {
        let f = t.flatten_from(1)?;
        let n = f.dim(1)?;
        let mean = f.mean_keepdim(1)?;
        let var = (f.broadcast_sub(&mean)?.sqr()?.sum_keepdim(1)? / (n.max(2) - 1) as f64)?;
        Ok(var.sqrt()?)
    };
    let shape: Vec<usize> = std::iter::once(guided.dim(0)?)
        .chain(std::iter::repeat_n(1, guided.rank() - 1))
        .collect();
    let ratio = (std(cond)? / std(guided)?)?.reshape(shape)?;
    let rescaled = guided.broadcast_mul(&ratio)?;
    Ok(((rescaled * phi)? + (guided * (1.0 - phi))?)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn guidance_rescale_matches_the_diffusers_formula() {
        // Two images of four values each; torch's std is the unbiased one.
        let cond = Tensor::new(&[[1f32, 2.0, 3.0, 4.0], [0.0, 0.0, 1.0, 1.0]], &Device::Cpu)
            .unwrap()
            .reshape((2, 1, 2, 2))
            .unwrap();
        let guided = Tensor::new(
            &[[2f32, 6.0, 4.0, 0.0], [3.0, -3.0, 1.0, 1.0]],
            &Device::Cpu,
        )
        .unwrap()
        .reshape((2, 1, 2, 2))
        .unwrap();
        let std = |v: &[f32]| {
            let m = v.iter().sum::<f32>() / v.len() as f32;
            (v.iter().map(|x| (x - m).powi(2)).sum::<f32>() / (v.len() - 1) as f32).sqrt()
        };
        let c: Vec<Vec<f32>> = cond.flatten_from(1).unwrap().to_vec2().unwrap();
        let g: Vec<Vec<f32>> = guided.flatten_from(1).unwrap().to_vec2().unwrap();
        let phi = 0.7;
        let out: Vec<Vec<f32>> = rescale_guidance(&guided, &cond, phi as f64)
            .unwrap()
            .flatten_from(1)
            .unwrap()
            .to_vec2()
            .unwrap();
        for i in 0..2 {
            let r = std(&c[i]) / std(&g[i]);
            for j in 0..4 {
                let want = phi * g[i][j] * r + (1.0 - phi) * g[i][j];
                assert!(
                    (out[i][j] - want).abs() < 1e-5,
                    "{i},{j}: {} vs {want}",
                    out[i][j]
                );
            }
        }
        // φ = 0 leaves the guided output alone.
        let same = rescale_guidance(&guided, &cond, 0.0).unwrap();
        assert_eq!(
            same.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            guided.flatten_all().unwrap().to_vec1::<f32>().unwrap()
        );
    }
}
