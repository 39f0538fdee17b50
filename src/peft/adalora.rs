//! AdaLoRA (Zhang et al. 2023) with PEFT's math and schedule (`tuners/adalora`).
//!
//! Each targeted linear layer carries `ΔW = P Λ Q` as `lora_B` (out, r), `lora_E` (r, 1) and
//! `lora_A` (r, in), with `r = init_r`; the forward adds `x (A ⊙ E)ᵀ Bᵀ · α / (r + 1e-5)` (the scale
//! is `lora_alpha`, not `α/r`). A and B start N(0, 0.02), E at zero.
//!
//! After each optimizer step ([`RankAllocator::update_and_allocate`] with PEFT's `global_step`,
//! counted from 0) the allocator keeps, per entry of A, B and E, the smoothed sensitivity
//! `Ī ← β1·Ī + (1−β1)·|w ⊙ ∇w|` and uncertainty `Ū ← β2·Ū + (1−β2)·|I − Ī|`; a triplet's score is
//! `s(E_i) + Σ_row mean_j s(A_ij) + mean_j s(B_ji)` with `s = Ī·Ū`. The budget (total kept rank)
//! stays at `Σ init_r` for `tinit` steps, falls cubically to `target_r × layers` until
//! `total_step − tfinal`, and the `(b₀ − b)` lowest-scoring triplets get `E_i = 0` every `deltaT`
//! steps. At `total_step − tfinal` the final mask becomes the config's `rank_pattern` and is
//! re-applied at every later step. [`orth_regularizer`] is the loss term
//! `mean(‖AAᵀ − I‖_F, ‖BᵀB − I‖_F)` weighted by `orth_reg_weight`.

use super::adapter::{Adapter, BaseOut, BuildSpec};
use super::base::{Base, BaseKind};
use super::config::Method;
use super::ctx::ForwardCtx;
use super::layer::AdaptedLayer;
use crate::nn::frozen;
use crate::{Error, Result};
use candle_core::{DType, Tensor, Var};
use std::collections::BTreeMap;

/// One AdaLoRA adapter: `δ(x) = x (A ⊙ E)ᵀ Bᵀ · α / (ranknum + 1e-5)`.
/// Keys: `lora_A` (r, in), `lora_B` (out, r), `lora_E` (r, 1).
pub struct Adalora {
    /// lora_A (r, in).
    pub a: Var,
    /// lora_B (out, r).
    pub b: Var,
    /// lora_E (r, 1).
    pub e: Var,
    /// α / (ranknum + 1e-5).
    pub scale: f64,
    /// lora_dropout.
    pub dropout: f64,
}

impl Adalora {
    /// Builds the adapter per `spec` on `base`, at `init_r` (or at the kept ranks of the config's
    /// `adalora_rank_pattern`, for a trained adapter).
    pub fn build(spec: &BuildSpec, base: &mut Base) -> Result<Self> {
        let cfg = spec.cfg;
        if base.kind() != BaseKind::Linear {
            return Err(base.err("AdaLoRA adapts linear layers only here"));
        }
        let (out, inn) = base.dims2()?;
        let init_r = AdaloraSettings::from_config(cfg)?.init_r;
        let r = match cfg
            .extra
            .get("adalora_rank_pattern")
            .and_then(|p| p.get(format!("{}.lora_E", base.path())))
        {
            Some(serde_json::Value::Array(mask)) => {
                mask.iter().filter(|m| m.as_bool() == Some(true)).count()
            }
            _ => init_r,
        };
        let mut rng = spec.rng(base.path());
        let dev = crate::util::device::current();
        let normal = crate::rng::normal;
        let (e, a, b) = if super::adapter::extra_bool(cfg, "init_weights", true)? {
            (
                Tensor::zeros((r, 1), DType::F32, &dev)?,
                normal(&[r, inn], 0.02, &mut rng)?,
                normal(&[out, r], 0.02, &mut rng)?,
            )
        } else {
            (
                normal(&[r, 1], 1.0, &mut rng)?,
                normal(&[r, inn], 1.0, &mut rng)?,
                normal(&[out, r], 1.0, &mut rng)?,
            )
        };
        Ok(Self {
            a: base.var(a)?,
            b: base.var(b)?,
            e: base.var(e)?,
            scale: spec.alpha / (init_r as f64 + 1e-5),
            dropout: cfg.lora_dropout,
        })
    }
}

impl Adapter for Adalora {
    fn method(&self) -> Method {
        Method::Adalora
    }

    fn params(&self) -> Vec<(&'static str, &Var)> {
        vec![
            ("lora_A", &self.a),
            ("lora_B", &self.b),
            ("lora_E", &self.e),
        ]
    }

    fn check(&self, base: &Base) -> Result<()> {
        let (out, inn) = base.dims2()?;
        let r = self.a.dims()[0];
        if self.a.dims() != [r, inn] || self.b.dims() != [out, r] || self.e.dims() != [r, 1] {
            return Err(base.err(format!(
                "AdaLoRA A {:?}, B {:?}, E {:?} do not fit weight {:?}",
                self.a.dims(),
                self.b.dims(),
                self.e.dims(),
                base.dims()
            )));
        }
        Ok(())
    }

    fn input_dropout(&self) -> f64 {
        self.dropout
    }

    fn delta(&self, _base: &Base, x: &Tensor, _out: &BaseOut, ctx: &ForwardCtx) -> Result<Tensor> {
        let ae = ctx.read(&self.a).broadcast_mul(&ctx.read(&self.e))?;
        let h = frozen::plain_linear(x, &ae)?;
        Ok((frozen::plain_linear(&h, &ctx.read(&self.b))? * self.scale)?)
    }

    fn delta_weight(&self, base: &Base) -> Result<Tensor> {
        let ae = self.a.as_tensor().broadcast_mul(self.e.as_tensor())?;
        Ok((self.b.as_tensor().matmul(&ae)? * self.scale)?
            .detach()
            .reshape(base.dims())?)
    }
}

/// AdaLoRA's schedule settings (`AdaLoraConfig`).
#[derive(Debug, Clone, PartialEq)]
pub struct AdaloraSettings {
    /// Target average rank.
    pub target_r: usize,
    /// Initial rank of every layer.
    pub init_r: usize,
    /// Steps before any pruning.
    pub tinit: usize,
    /// Final steps at the target budget.
    pub tfinal: usize,
    /// Steps between budget allocations.
    pub delta_t: usize,
    /// EMA factor of the sensitivity.
    pub beta1: f64,
    /// EMA factor of the uncertainty.
    pub beta2: f64,
    /// Weight of the orthogonality regulariser.
    pub orth_reg_weight: f64,
    /// Total training steps (required).
    pub total_step: usize,
}

impl AdaloraSettings {
    /// Reads the settings from an `ADALORA` config (PEFT's defaults: target_r 8, init_r 12,
    /// tinit = tfinal = 0, deltaT 1, beta1 = beta2 = 0.85, orth_reg_weight 0.5).
    pub fn from_config(cfg: &super::AdapterConfig) -> Result<Self> {
        let u = |k: &str, d: usize| -> Result<usize> {
            match cfg.extra.get(k) {
                None | Some(serde_json::Value::Null) => Ok(d),
                Some(v) => v.as_u64().map(|x| x as usize).ok_or_else(|| {
                    Error::Config(format!("AdaLoRA `{k}` = {v} is not a non-negative integer"))
                }),
            }
        };
        let f = |k: &str, d: f64| super::adapter::extra_f64(cfg, k, d);
        let total_step = u("total_step", 0)?;
        let s = Self {
            target_r: u("target_r", 8)?,
            init_r: u("init_r", 12)?,
            tinit: u("tinit", 0)?,
            tfinal: u("tfinal", 0)?,
            delta_t: u("deltaT", 1)?.max(1),
            beta1: f("beta1", 0.85)?,
            beta2: f("beta2", 0.85)?,
            orth_reg_weight: f("orth_reg_weight", 0.5)?,
            total_step,
        };
        if s.init_r == 0 || s.target_r == 0 || s.target_r > s.init_r {
            return Err(Error::Config(format!(
                "AdaLoRA needs 0 < target_r ({}) <= init_r ({})",
                s.target_r, s.init_r
            )));
        }
        if !(0.0..1.0).contains(&s.beta1) || !(0.0..1.0).contains(&s.beta2) {
            return Err(Error::Config(format!(
                "AdaLoRA's beta1 ({}) and beta2 ({}) must be in [0, 1)",
                s.beta1, s.beta2
            )));
        }
        if s.total_step == 0 {
            return Err(Error::Config(
                "AdaLoRA needs total_step (the number of training steps) to schedule its budget"
                    .into(),
            ));
        }
        if s.tinit >= s.total_step.saturating_sub(s.tfinal) {
            return Err(Error::Config(format!(
                "AdaLoRA: tinit {} must be below total_step − tfinal = {}",
                s.tinit,
                s.total_step.saturating_sub(s.tfinal)
            )));
        }
        Ok(s)
    }
}

/// The module paths of layers carrying AdaLoRA adapter `name`, in order.
fn adalora_layers<'a>(layers: &'a [&'a AdaptedLayer], name: &str) -> Vec<&'a AdaptedLayer> {
    layers
        .iter()
        .copied()
        .filter(|l| l.adapter_as::<Adalora>(name).is_some())
        .collect()
}

/// PEFT's orthogonality regulariser over adapter `name`: the mean over A and B matrices of
/// `‖A Aᵀ − I‖_F` and `‖Bᵀ B − I‖_F` (differentiable). `None` without AdaLoRA layers.
pub fn orth_regularizer(layers: &[&AdaptedLayer], name: &str) -> Result<Option<Tensor>> {
    let mut terms = vec![];
    for l in adalora_layers(layers, name) {
        if let Some(ad) = l.adapter_as::<Adalora>(name) {
            for (m, left) in [(ad.a.as_tensor(), true), (ad.b.as_tensor(), false)] {
                if m.elem_count() == 0 {
                    continue;
                }
                let cov = if left {
                    m.matmul(&m.t()?)?
                } else {
                    m.t()?.matmul(m)?
                };
                let n = cov.dim(0)?;
                let eye = Tensor::eye(n, DType::F32, cov.device())?;
                terms.push((cov - eye)?.sqr()?.sum_all()?.sqrt()?);
            }
        }
    }
    if terms.is_empty() {
        return Ok(None);
    }
    let n = terms.len() as f64;
    Ok(Some((Tensor::stack(&terms, 0)?.sum_all()? / n)?))
}

/// PEFT's `RankAllocator` for one adapter.
pub struct RankAllocator {
    /// The schedule.
    pub settings: AdaloraSettings,
    name: String,
    /// Σ init_r over the layers.
    pub init_bgt: usize,
    /// target_r × layers.
    pub target_bgt: usize,
    exp_avg_ipt: BTreeMap<String, Tensor>,
    exp_avg_unc: BTreeMap<String, Tensor>,
    /// The final mask per layer path (set at `total_step − tfinal`): kept ranks.
    pub rank_pattern: Option<BTreeMap<String, Vec<bool>>>,
}

impl RankAllocator {
    /// An allocator for adapter `name` over `layers`.
    pub fn new(layers: &[&AdaptedLayer], name: &str, settings: AdaloraSettings) -> Result<Self> {
        let ls = adalora_layers(layers, name);
        if ls.is_empty() {
            return Err(Error::Config(format!(
                "AdaLoRA adapter `{name}` targets no layer"
            )));
        }
        let init_bgt = ls
            .iter()
            .map(|l| l.adapter_as::<Adalora>(name).map_or(0, |ad| ad.a.dims()[0]))
            .sum();
        Ok(Self {
            target_bgt: settings.target_r * ls.len(),
            settings,
            name: name.into(),
            init_bgt,
            exp_avg_ipt: BTreeMap::new(),
            exp_avg_unc: BTreeMap::new(),
            rank_pattern: None,
        })
    }

    /// (budget, whether to mask) at `step` (PEFT's `budget_schedule`).
    pub fn budget_schedule(&self, step: usize) -> (usize, bool) {
        let s = &self.settings;
        if step <= s.tinit {
            (self.init_bgt, false)
        } else if step > s.total_step - s.tfinal {
            (self.target_bgt, true)
        } else {
            let mul = 1.0 - (step - s.tinit) as f64 / (s.total_step - s.tfinal - s.tinit) as f64;
            let b = ((self.init_bgt as f64 - self.target_bgt as f64) * mul.powi(3)
                + self.target_bgt as f64) as usize;
            (b, step % s.delta_t == 0)
        }
    }

    /// The sensitivity / uncertainty EMAs of every A, B and E entry, from the current values and
    /// `grads` (keyed by the layers' trainable names).
    fn update_ipt(
        &mut self,
        layers: &[&AdaptedLayer],
        grads: &BTreeMap<String, Tensor>,
    ) -> Result<()> {
        let (b1, b2) = (self.settings.beta1, self.settings.beta2);
        for l in adalora_layers(layers, &self.name) {
            for (key, v) in l.named_vars() {
                if !key.ends_with(&format!(".{}", self.name)) {
                    continue;
                }
                let Some(g) = grads.get(&key) else { continue };
                let ipt = (v.as_tensor() * g)?.abs()?.detach();
                let avg = match self.exp_avg_ipt.get(&key) {
                    Some(prev) => ((prev * b1)? + (&ipt * (1.0 - b1))?)?,
                    None => (&ipt * (1.0 - b1))?,
                };
                let dev = (&ipt - &avg)?.abs()?;
                let unc = match self.exp_avg_unc.get(&key) {
                    Some(prev) => ((prev * b2)? + (dev * (1.0 - b2))?)?,
                    None => (dev * (1.0 - b2))?,
                };
                self.exp_avg_ipt.insert(key.clone(), avg);
                self.exp_avg_unc.insert(key, unc);
            }
        }
        Ok(())
    }

    fn score(&self, key: &str) -> Result<Tensor> {
        match (self.exp_avg_ipt.get(key), self.exp_avg_unc.get(key)) {
            (Some(i), Some(u)) => Ok((i * u)?),
            _ => Err(Error::Msg(format!(
                "AdaLoRA: no importance for `{key}` yet (no gradient seen)"
            ))),
        }
    }

    /// Zeroes the E entries of the `init_bgt − budget` lowest-scoring triplets; returns the mask.
    fn mask_to_budget(
        &self,
        layers: &mut [&mut AdaptedLayer],
        budget: usize,
    ) -> Result<BTreeMap<String, Vec<bool>>> {
        let name = &self.name;
        let mut triplet: BTreeMap<String, Vec<f32>> = BTreeMap::new();
        for l in layers.iter() {
            if l.adapter_as::<Adalora>(name).is_none() {
                continue;
            }
            let p = format!("base_model.model.{}", l.path());
            let sa = self
                .score(&format!("{p}.lora_A.{name}"))?
                .mean_keepdim(1)?
                .flatten_all()?;
            let sb = self
                .score(&format!("{p}.lora_B.{name}"))?
                .mean(0)?
                .flatten_all()?;
            let se = self.score(&format!("{p}.lora_E.{name}"))?.flatten_all()?;
            let total = ((se + sa)? + sb)?;
            triplet.insert(l.path().to_string(), total.to_vec1::<f32>()?);
        }
        let mut all: Vec<f32> = triplet.values().flatten().copied().collect();
        let k = self.init_bgt.saturating_sub(budget);
        let mut pattern = BTreeMap::new();
        if k == 0 || all.is_empty() {
            for (p, v) in &triplet {
                pattern.insert(p.clone(), vec![true; v.len()]);
            }
            return Ok(pattern);
        }
        all.sort_by(|a, b| a.total_cmp(b));
        let threshold = all[(k - 1).min(all.len() - 1)];
        for l in layers.iter_mut() {
            let Some(scores) = triplet.get(l.path()) else {
                continue;
            };
            let keep: Vec<bool> = scores.iter().map(|s| *s > threshold).collect();
            if let Some(ad) = l.adapter_as_mut::<Adalora>(name) {
                mask_e(&ad.e, &keep)?;
            }
            pattern.insert(l.path().to_string(), keep);
        }
        Ok(pattern)
    }

    /// PEFT's `update_and_allocate(global_step)`, after the optimizer step that produced `grads`.
    pub fn update_and_allocate(
        &mut self,
        layers: &mut [&mut AdaptedLayer],
        global_step: usize,
        grads: &BTreeMap<String, Tensor>,
    ) -> Result<()> {
        let s = self.settings.clone();
        let end = s.total_step - s.tfinal;
        if global_step < end {
            {
                let view: Vec<&AdaptedLayer> = layers.iter().map(|l| &**l).collect();
                self.update_ipt(&view, grads)?;
            }
            let (budget, mask) = self.budget_schedule(global_step);
            if mask {
                let p = self.mask_to_budget(layers, budget)?;
                self.rank_pattern = Some(p);
            }
        } else if global_step == end {
            let (budget, _) = self.budget_schedule(global_step);
            let p = self.mask_to_budget(layers, budget)?;
            self.rank_pattern = Some(p);
            self.exp_avg_ipt.clear();
            self.exp_avg_unc.clear();
        } else if let Some(p) = &self.rank_pattern {
            for l in layers.iter_mut() {
                let Some(keep) = p.get(l.path()).cloned() else {
                    continue;
                };
                if let Some(ad) = l.adapter_as_mut::<Adalora>(&self.name) {
                    mask_e(&ad.e, &keep)?;
                }
            }
        }
        Ok(())
    }

    /// The allocator's state (for checkpoints): the EMAs by tensor name and the mask.
    pub fn state(
        &self,
    ) -> (
        BTreeMap<String, Tensor>,
        Option<BTreeMap<String, Vec<bool>>>,
    ) {
        let mut t = BTreeMap::new();
        for (k, v) in &self.exp_avg_ipt {
            t.insert(format!("ipt.{k}"), v.clone());
        }
        for (k, v) in &self.exp_avg_unc {
            t.insert(format!("unc.{k}"), v.clone());
        }
        (t, self.rank_pattern.clone())
    }

    /// Restores [`Self::state`].
    pub fn set_state(
        &mut self,
        tensors: &BTreeMap<String, Tensor>,
        rank_pattern: Option<BTreeMap<String, Vec<bool>>>,
    ) {
        self.exp_avg_ipt.clear();
        self.exp_avg_unc.clear();
        for (k, v) in tensors {
            if let Some(n) = k.strip_prefix("ipt.") {
                self.exp_avg_ipt.insert(n.into(), v.clone());
            } else if let Some(n) = k.strip_prefix("unc.") {
                self.exp_avg_unc.insert(n.into(), v.clone());
            }
        }
        self.rank_pattern = rank_pattern;
    }
}

/// Sets E's entries whose `keep` is false to zero.
fn mask_e(e: &candle_core::Var, keep: &[bool]) -> Result<()> {
    let m: Vec<f32> = keep.iter().map(|k| if *k { 1.0 } else { 0.0 }).collect();
    let m = Tensor::from_vec(m, (keep.len(), 1), e.device())?;
    e.set(&(e.as_tensor() * m)?)?;
    Ok(())
}
