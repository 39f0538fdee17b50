//! Adapted layers: a frozen [`Base`] (plain tensors, never `Var`s) plus named adapters of any
//! method, behind one [`Adapter`] trait. The layer owns what every method shares — the output gain,
//! dropout draws, the active set, enable/disable, merge records and routing — and computes
//!
//! `y = base(x) + Σ_a gate_a ⊙ gain_a · δ_a(dropout_a(x))`
//!
//! over the live adapters (active, enabled, not merged), in their activation order. Fast paths are
//! taken only when they equal this equation and no live adapter is routed: a single LoRA/DoRA
//! adapter as one fused node, and IA3 vectors applied multiplicatively (PEFT's `l₁ ⊙ l₂` when
//! several are active).

use super::adapter::{Adapter, BaseOut, Rescale, Unmerge};
use super::base::{Base, BaseKind, BaseWeight, Nf4Snapshot};
use super::ctx::ForwardCtx;
use super::lora::Lora;
use super::quant::QuantSpec;
use crate::nn::conv::ConvCfg;
use crate::nn::nf4::{Nf4Tensor, RoundingError};
use crate::nn::{conv, frozen};
use crate::{Error, Result};
mod fused;
mod mixed;

use candle_core::{Tensor, Var};
use std::collections::BTreeMap;

pub use super::base::embed;

/// One adapter on a layer, with its output gain (the multiplier of weight sweeps; 1 = as trained).
struct Slot {
    adapter: Box<dyn Adapter>,
    gain: f64,
}

/// What a merge did: the adapter, how to undo it, and the NF4 base before it (restored exactly on
/// unmerge instead of re-quantizing twice).
struct MergeRecord {
    name: String,
    undo: Box<dyn Unmerge>,
    prev_nf4: Option<Nf4Snapshot>,
}

/// Trainable full copies for `modules_to_save`.
struct SavedCopy {
    weight: Var,
    bias: Option<Var>,
}

/// A frozen base layer with named adapters, an active set, enable/disable and merging.
pub struct AdaptedLayer {
    base: Base,
    slots: BTreeMap<String, Slot>,
    active: Vec<String>,
    enabled: bool,
    /// Merged adapters in merge order, with what unmerging needs.
    merged: Vec<MergeRecord>,
    saved: Option<SavedCopy>,
}

impl AdaptedLayer {
    /// A bare base layer at module path `path`; adapters are added with [`Self::add_adapter`].
    pub fn new(path: &str, kind: BaseKind, weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        Ok(Self::from_base(Base::new(path, kind, weight, bias)?))
    }

    /// A linear layer at `path` over an NF4 base weight (out, in), as read from a 4-bit checkpoint.
    pub fn new_nf4(path: &str, weight: Nf4Tensor, bias: Option<Tensor>) -> Result<Self> {
        Ok(Self::from_base(Base::new_nf4(path, weight, bias)?))
    }

    fn from_base(base: Base) -> Self {
        Self {
            base,
            slots: BTreeMap::new(),
            active: vec![],
            enabled: true,
            merged: vec![],
            saved: None,
        }
    }

    fn err(&self, msg: impl Into<String>) -> Error {
        self.base.err(msg)
    }

    /// Quantizes the base weight to NF4 (QLoRA): linear layers only, as bitsandbytes does. Returns
    /// the rounding error. Adapters stay in f32; an already quantized base is left as it is.
    pub fn quantize_nf4(&mut self, spec: QuantSpec) -> Result<RoundingError> {
        self.base.quantize_nf4(spec)
    }

    /// The frozen base.
    pub fn base(&self) -> &Base {
        &self.base
    }
    pub(crate) fn base_mut(&mut self) -> &mut Base {
        &mut self.base
    }
    /// The device the base weight (and so every adapter of the layer) lives on.
    pub fn device(&self) -> candle_core::Device {
        self.base.weight().device()
    }
    /// The module path (`model.layers.0.self_attn.q_proj`).
    pub fn path(&self) -> &str {
        self.base.path()
    }
    /// The base kind.
    pub fn kind(&self) -> BaseKind {
        self.base.kind()
    }
    /// The current base weight as a dense tensor (includes merged adapters and PiSSA/OLoRA
    /// residuals; an NF4 base is dequantized).
    pub fn weight(&self) -> Result<Tensor> {
        self.base.weight().dense()
    }
    /// The base weight as stored (dense or NF4).
    pub fn base_weight(&self) -> &BaseWeight {
        self.base.weight()
    }
    /// The base bias.
    pub fn bias(&self) -> Option<&Tensor> {
        self.base.bias()
    }
    /// The rounding error of the last (re-)quantization of an NF4 base: after quantizing, merging
    /// into it, unmerging, or writing a PiSSA residual into it.
    pub fn rounding_error(&self) -> Option<RoundingError> {
        self.base.rounding
    }

    /// The weight the model applies: the trained copy of a `modules_to_save` layer (while
    /// adapters are enabled, read through `ctx`), else the base weight (dense).
    pub fn effective_weight(&self, ctx: &ForwardCtx) -> Result<Tensor> {
        match (&self.saved, self.enabled) {
            (Some(s), true) => Ok(ctx.read(&s.weight)),
            _ => self.base.weight().dense(),
        }
    }

    /// Adapter names, sorted.
    pub fn adapter_names(&self) -> impl Iterator<Item = &str> {
        self.slots.keys().map(|s| s.as_str())
    }
    /// Whether the layer carries adapter `name`.
    pub fn has_adapter(&self, name: &str) -> bool {
        self.slots.contains_key(name)
    }
    /// Whether the layer carries no adapter.
    pub fn is_plain(&self) -> bool {
        self.slots.is_empty()
    }
    /// Adapter `name`.
    pub fn adapter(&self, name: &str) -> Option<&dyn Adapter> {
        self.slots.get(name).map(|s| s.adapter.as_ref())
    }
    /// Adapter `name` if it is of method type `T` (`Lora`, `Loha`, `Vera`, ...).
    pub fn adapter_as<T: Adapter>(&self, name: &str) -> Option<&T> {
        let a: &dyn std::any::Any = self.slots.get(name)?.adapter.as_ref();
        a.downcast_ref::<T>()
    }
    /// Adapter `name` mutably, if it is of method type `T`.
    pub fn adapter_as_mut<T: Adapter>(&mut self, name: &str) -> Option<&mut T> {
        let a: &mut dyn std::any::Any = self.slots.get_mut(name)?.adapter.as_mut();
        a.downcast_mut::<T>()
    }
    /// LoRA adapter `name` (LoRA, rsLoRA, DoRA).
    pub fn lora(&self, name: &str) -> Option<&Lora> {
        self.adapter_as::<Lora>(name)
    }
    /// The output gain of adapter `name`.
    pub fn gain(&self, name: &str) -> Option<f64> {
        self.slots.get(name).map(|s| s.gain)
    }
    /// Sets the output gain (multiplier) of adapter `name`, for every method. A merged adapter
    /// keeps the gain it was merged with until it is unmerged.
    pub fn set_gain(&mut self, name: &str, gain: f64) -> Result<()> {
        if !gain.is_finite() {
            return Err(self.err(format!("adapter `{name}`: gain {gain} is not finite")));
        }
        let slot = self
            .slots
            .get_mut(name)
            .ok_or_else(|| Error::layer(self.base.path(), format!("no adapter named `{name}`")))?;
        slot.gain = gain;
        Ok(())
    }
    /// Active adapter names.
    pub fn active(&self) -> &[String] {
        &self.active
    }
    /// Whether adapters are enabled.
    pub fn enabled(&self) -> bool {
        self.enabled
    }
    /// Names of merged adapters.
    pub fn merged(&self) -> Vec<&str> {
        self.merged.iter().map(|m| m.name.as_str()).collect()
    }

    /// Expected shapes of LoRA's (A, B, magnitude) at rank r.
    pub fn factor_shapes(&self, r: usize) -> Result<(Vec<usize>, Vec<usize>, Vec<usize>)> {
        super::lora::factor_shapes(&self.base, r)
    }

    pub(crate) fn check_new(&self, name: &str) -> Result<()> {
        if self.slots.contains_key(name) {
            return Err(self.err(format!("adapter `{name}` already exists")));
        }
        if self.kind() == BaseKind::Norm {
            return Err(self.base.norm_err());
        }
        Ok(())
    }

    pub(crate) fn push(&mut self, name: &str, adapter: Box<dyn Adapter>) {
        self.slots
            .insert(name.to_string(), Slot { adapter, gain: 1.0 });
        if !self.active.iter().any(|a| a == name) {
            self.active.push(name.to_string());
        }
    }

    /// Inserts an adapter built elsewhere (a loaded file); its shapes are checked against the base.
    pub fn insert_adapter(&mut self, name: &str, adapter: impl Adapter) -> Result<()> {
        self.insert_boxed(name, Box::new(adapter))
    }

    /// [`Self::insert_adapter`] for a boxed adapter.
    pub fn insert_boxed(&mut self, name: &str, adapter: Box<dyn Adapter>) -> Result<()> {
        self.check_new(name)?;
        adapter.check(&self.base)?;
        self.push(name, adapter);
        Ok(())
    }

    /// Makes this a `modules_to_save` layer: a trainable full copy of weight and bias.
    pub fn make_trainable_copy(&mut self) -> Result<()> {
        if self.saved.is_none() {
            let weight = self.base.var(self.base.weight().dense()?)?;
            let bias = self
                .base
                .bias
                .clone()
                .map(|b| self.base.var(b))
                .transpose()?;
            self.saved = Some(SavedCopy { weight, bias });
        }
        Ok(())
    }

    /// Replaces the trainable copy's values (loading a file).
    pub fn set_trainable_copy(&mut self, weight: &Tensor, bias: Option<&Tensor>) -> Result<()> {
        self.make_trainable_copy()?;
        let Some(s) = self.saved.as_ref() else {
            return Err(self.err("no trainable copy"));
        };
        s.weight.set(&weight.to_dtype(candle_core::DType::F32)?)?;
        if let (Some(v), Some(b)) = (&s.bias, bias) {
            v.set(&b.to_dtype(candle_core::DType::F32)?)?;
        }
        Ok(())
    }

    /// The trainable copy (weight, bias), if this is a `modules_to_save` layer.
    pub fn trainable_copy(&self) -> Option<(&Var, Option<&Var>)> {
        self.saved.as_ref().map(|s| (&s.weight, s.bias.as_ref()))
    }

    /// Sets which adapters are active (their outputs add up).
    pub fn set_active(&mut self, names: &[&str]) -> Result<()> {
        for n in names {
            if !self.slots.contains_key(*n) {
                return Err(self.err(format!("no adapter named `{n}`")));
            }
        }
        self.active = names.iter().map(|s| s.to_string()).collect();
        Ok(())
    }

    /// Enables or disables all adapters. Disabling first unmerges merged adapters (as PEFT does).
    pub fn set_enabled(&mut self, enabled: bool) -> Result<()> {
        if !enabled && !self.merged.is_empty() {
            self.unmerge()?;
        }
        self.enabled = enabled;
        Ok(())
    }

    /// Removes an adapter (unmerging first if needed) and returns it.
    pub fn delete_adapter(&mut self, name: &str) -> Result<Option<Box<dyn Adapter>>> {
        if self.merged.iter().any(|m| m.name == name) {
            self.unmerge()?;
        }
        self.active.retain(|a| a != name);
        Ok(self.slots.remove(name).map(|s| s.adapter))
    }

    /// The weight change of adapter `name` at its gain, in the base layout (detached).
    pub fn delta_weight(&self, name: &str) -> Result<Tensor> {
        let s = self
            .slots
            .get(name)
            .ok_or_else(|| self.err(format!("no adapter named `{name}`")))?;
        Ok((s.adapter.delta_weight(&self.base)? * s.gain)?)
    }

    /// The live adapters: active, enabled and not merged, in activation order.
    fn live(&self) -> Vec<(&str, &Slot)> {
        if !self.enabled {
            return vec![];
        }
        // An adapter at gain 0 adds exactly nothing (every method interpolates from the base), so
        // it is not computed at all: a scale-0 column of a grid runs at the base model's speed.
        self.active
            .iter()
            .filter(|n| !self.merged.iter().any(|m| &m.name == *n))
            .filter_map(|n| self.slots.get(n).map(|s| (n.as_str(), s)))
            .filter(|(_, s)| s.gain != 0.0)
            .collect()
    }

    /// The names of the adapters that run in a forward now (active, enabled, not merged, gain ≠ 0).
    pub fn live_adapter_names(&self) -> Vec<&str> {
        self.live().into_iter().map(|(n, _)| n).collect()
    }

    /// The weight `W` when this layer's forward is exactly `x · Wᵀ` with `W` frozen: a dense linear
    /// layer without bias, trainable copy or any live adapter. Fused consumers (the language-model
    /// loss) use it to skip the layer's output; `None` means run [`Self::forward`].
    pub fn frozen_plain_weight(&self) -> Option<&Tensor> {
        if self.kind() != BaseKind::Linear || self.base.bias.is_some() {
            return None;
        }
        if self.saved.is_some() && self.enabled {
            return None;
        }
        match self.base.weight() {
            BaseWeight::Dense(w) if self.live().is_empty() => Some(w),
            _ => None,
        }
    }

    /// The forward of a `modules_to_save` layer: its trained copy.
    fn saved_forward(&self, s: &SavedCopy, x: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let w = ctx.read(&s.weight);
        let y = match self.kind() {
            BaseKind::Linear => frozen::plain_linear(x, &w)?,
            BaseKind::Conv2d(c) => conv::conv2d(x, &w, c, true)?,
            BaseKind::Embedding => {
                super::base::embed(&w, x).map_err(|e| self.err(e.to_string()))?
            }
            BaseKind::Norm => return Err(self.base.norm_err()),
        };
        let b = s.bias.as_ref().map(|v| ctx.read(v));
        self.base.add_bias(y, b.as_ref())
    }

    /// Forward. Linear: x (..., in); conv: x (b, c, h, w); embedding: ids (...) as u32/i64.
    pub fn forward(&self, x: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let bd = self.base.weight().dtype();
        if bd != candle_core::DType::F32 && self.kind() != BaseKind::Norm {
            return self.forward_mixed(x, ctx, bd);
        }
        // An NF4 base computes in f32 (its compute dtype) inside a half-precision model.
        if let (BaseWeight::Nf4(_), false, true) = (
            self.base.weight(),
            self.kind() == BaseKind::Embedding,
            x.dtype() == candle_core::DType::BF16 || x.dtype() == candle_core::DType::F16,
        ) {
            return Ok(self
                .forward(&x.to_dtype(candle_core::DType::F32)?, ctx)?
                .to_dtype(x.dtype())?);
        }
        if let (Some(s), true) = (&self.saved, self.enabled) {
            return self.saved_forward(s, x, ctx);
        }
        if self.enabled && ctx.routing().is_some() {
            if let Some(m) = self.merged.iter().find(|m| ctx.is_routed(&m.name)) {
                return Err(self.err(format!(
                    "adapter `{}` is merged into the weight and cannot be routed by a mask; unmerge it first",
                    m.name
                )));
            }
        }
        let live = self.live();
        let routed = live.iter().any(|(n, _)| ctx.is_routed(n));
        let bias = self.base.bias.as_ref();
        if let ([(_, s)], false) = (live.as_slice(), routed) {
            if let Some(y) = s.adapter.fused(&self.base, bias, x, s.gain, ctx)? {
                return Ok(y);
            }
            // LoRA notes its own reason; the other methods have no fused node.
            if s.adapter.method() != super::Method::Lora {
                crate::nn::fallback::note(|| {
                    (
                        format!("{:?} adapter", s.adapter.method()),
                        "no fused node for this method".into(),
                    )
                });
            }
        } else if !live.is_empty() {
            crate::nn::fallback::note(|| {
                let why = if routed {
                    "routed adapters"
                } else {
                    "several live adapters"
                };
                ("adapted layer".into(), why.into())
            });
        }
        if let (true, BaseWeight::Dense(w)) = (live.is_empty(), self.base.weight()) {
            // No live adapter: kernel (or weight) and bias in one node.
            let y = match self.kind() {
                BaseKind::Conv2d(cfg) => crate::nn::lora_conv::frozen_conv2d_bias(x, w, bias, cfg)?,
                BaseKind::Linear => crate::nn::frozen::frozen_linear_bias(x, w, bias)?,
                _ => None,
            };
            if let Some(y) = y {
                return Ok(y);
            }
        }
        // Unrouted multiplicative adapters (IA3) compose into one input and one output factor.
        let mut xin = x.clone();
        let mut rescaled = false;
        let mut out_scale: Option<Tensor> = None;
        let mut additive = Vec::with_capacity(live.len());
        for (n, s) in live {
            let r = if routed {
                None
            } else {
                s.adapter.rescale(&self.base, s.gain, ctx)?
            };
            match r {
                Some(Rescale::Input(v)) => {
                    xin = xin.broadcast_mul(&self.base.input_view(&v, x)?)?;
                    rescaled = true;
                }
                Some(Rescale::Output(v)) => {
                    rescaled = true;
                    out_scale = Some(match out_scale {
                        None => v,
                        Some(s) => (s * v)?,
                    })
                }
                None => additive.push((n, s)),
            }
        }
        let wx = self.base.forward_nobias(&xin)?;
        let mut y0 = self.base.add_bias(wx.clone(), bias)?;
        if let Some(sc) = out_scale {
            y0 = y0.broadcast_mul(&self.base.feature_view(&sc, y0.rank())?)?;
        }
        let mut y = y0.clone();
        for (name, s) in additive {
            let a = &s.adapter;
            if rescaled && a.rescales_weight() {
                return Err(self.err(format!(
                    "DoRA adapter `{name}` cannot be active together with IA3 adapters"
                )));
            }
            if let Some(d) = self.adapter_delta(name, s, x, &wx, &y0, ctx)? {
                y = (y + d)?;
            }
        }
        Ok(y)
    }

    /// Adapter `name`'s contribution `gain · gate ⊙ δ(dropout(x))` given the base's `wx` and `y0`,
    /// or `None` when module dropout skips it in this step.
    fn adapter_delta(
        &self,
        name: &str,
        s: &Slot,
        x: &Tensor,
        wx: &Tensor,
        y0: &Tensor,
        ctx: &ForwardCtx,
    ) -> Result<Option<Tensor>> {
        let a = &s.adapter;
        let pm = a.module_dropout();
        if ctx.train && pm > 0.0 && !ctx.keep_module(&format!("{}.{name}", self.path()), pm) {
            return Ok(None);
        }
        let p = a.input_dropout();
        let dropped = ctx.train && p > 0.0 && self.kind() != BaseKind::Embedding;
        let xd = if dropped {
            let mask = ctx.dropout_mask(self.path(), x.dims(), p, x.device())?;
            x.mul(&mask.to_dtype(x.dtype())?)?
        } else {
            x.clone()
        };
        let out = BaseOut { wx, y0, dropped };
        let mut d = a.delta(&self.base, &xd, &out, ctx)?;
        if s.gain != 1.0 {
            d = (d * s.gain)?;
        }
        if let Some(g) = ctx.gate(self.path(), name, y0)? {
            d = d.broadcast_mul(&g)?;
        }
        Ok(Some(d))
    }

    /// A DoRA adapter rescales the whole weight, so it cannot share a merged weight with other
    /// adapters (PEFT itself needed a fix for that case, peft#3608): such merges are refused.
    fn check_merge_mix(&self, names: &[String]) -> Result<()> {
        let mut all: Vec<&str> = self.merged.iter().map(|m| m.name.as_str()).collect();
        for n in names {
            if !all.contains(&n.as_str()) {
                all.push(n);
            }
        }
        let dora = all.iter().any(|n| {
            self.slots
                .get(*n)
                .is_some_and(|s| s.adapter.rescales_weight())
        });
        if dora && all.len() > 1 {
            return Err(self.err(format!(
                "merging a DoRA adapter together with other adapters ({}) is not supported; merge one at a time into separate copies",
                all.join(", ")
            )));
        }
        Ok(())
    }

    fn slot(&self, name: &str) -> Result<&Slot> {
        self.slots
            .get(name)
            .ok_or_else(|| self.err(format!("no adapter named `{name}`")))
    }

    /// Merges the active adapters (or `names`) into the base weight at their gains. Already merged
    /// adapters are skipped, so merging twice is idempotent. A merge that would produce NaN/Inf is
    /// refused, as is merging while adapters are disabled.
    pub fn merge(&mut self, names: Option<&[&str]>) -> Result<()> {
        if !self.enabled {
            return Err(self.err("adapters are disabled; enable them before merging"));
        }
        let names: Vec<String> = match names {
            Some(n) => n.iter().map(|s| s.to_string()).collect(),
            None => self.active.clone(),
        };
        self.check_merge_mix(&names)?;
        for name in names {
            if self.merged.iter().any(|m| m.name == name) {
                continue;
            }
            let s = self.slot(&name)?;
            let w = self
                .base
                .weight()
                .dense()?
                .to_dtype(candle_core::DType::F32)?;
            let m = s
                .adapter
                .merge(&self.base, &w, self.base.bias.as_ref(), s.gain)?;
            let sum = m
                .weight
                .sum_all()?
                .to_dtype(candle_core::DType::F64)?
                .to_scalar::<f64>()?;
            if !sum.is_finite() {
                return Err(self.err(format!(
                    "merging adapter `{name}` gives non-finite weights; refused"
                )));
            }
            let prev_nf4 = self.base.nf4_snapshot();
            self.base.set_weight(m.weight)?;
            self.base.bias = m.bias;
            self.merged.push(MergeRecord {
                name,
                undo: m.undo,
                prev_nf4,
            });
        }
        Ok(())
    }

    /// Unmerges every merged adapter, newest first, restoring the base weight from what was merged
    /// (later changes to the adapter do not matter).
    pub fn unmerge(&mut self) -> Result<()> {
        while let Some(rec) = self.merged.pop() {
            self.base.bias = rec.undo.unmerge_bias(self.base.bias.take())?;
            if let Some(snap) = rec.prev_nf4 {
                self.base.restore_nf4(snap);
                continue;
            }
            let w = self
                .base
                .weight()
                .dense()?
                .to_dtype(candle_core::DType::F32)?;
            let restored = rec.undo.unmerge_weight(&self.base, w)?;
            self.base.set_weight(restored)?;
        }
        Ok(())
    }

    /// The weight and bias with every active adapter merged at its gain, without changing the
    /// layer (a `modules_to_save` layer returns its trained copy).
    pub fn merged_tensors(&self) -> Result<(Tensor, Option<Tensor>)> {
        if let Some(s) = &self.saved {
            return Ok((
                s.weight.as_tensor().clone(),
                s.bias.as_ref().map(|b| b.as_tensor().clone()),
            ));
        }
        let dtype = self.base.weight().dtype();
        let mut w = self.base.weight().dense()?;
        let mut bias = self.base.bias.clone();
        if self.enabled {
            let pending: Vec<String> = self
                .active
                .iter()
                .filter(|n| !self.merged.iter().any(|m| &m.name == *n))
                .cloned()
                .collect();
            self.check_merge_mix(&pending)?;
            for name in &pending {
                let s = self.slot(name)?;
                let wf = w.to_dtype(candle_core::DType::F32)?;
                let m = s.adapter.merge(&self.base, &wf, bias.as_ref(), s.gain)?;
                w = m.weight.to_dtype(dtype)?;
                bias = m.bias;
            }
        }
        Ok((w, bias))
    }

    /// Trainable tensors with PEFT's in-memory names
    /// (`base_model.model.<path>.lora_A.<adapter>.weight`, ...).
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        let p = self.path();
        let mut out = vec![];
        for (name, s) in &self.slots {
            for (k, v) in s.adapter.named_params(self.kind(), name) {
                out.push((format!("base_model.model.{p}.{k}"), v));
            }
        }
        if let Some(s) = &self.saved {
            out.push((
                format!("base_model.model.{p}.modules_to_save.default.weight"),
                s.weight.clone(),
            ));
            if let Some(b) = &s.bias {
                out.push((
                    format!("base_model.model.{p}.modules_to_save.default.bias"),
                    b.clone(),
                ));
            }
        }
        out
    }
}

macro_rules! wrapper {
    ($name:ident, $doc:literal) => {
        #[doc = $doc]
        pub struct $name(pub AdaptedLayer);
        impl std::ops::Deref for $name {
            type Target = AdaptedLayer;
            fn deref(&self) -> &AdaptedLayer {
                &self.0
            }
        }
        impl std::ops::DerefMut for $name {
            fn deref_mut(&mut self) -> &mut AdaptedLayer {
                &mut self.0
            }
        }
    };
}

wrapper!(
    AdaptedLinear,
    "A frozen linear layer (weight (out, in)) with adapters."
);
wrapper!(
    AdaptedConv2d,
    "A frozen conv2d layer with LoCon adapters (A: conv like the base, B: 1x1)."
);
wrapper!(
    AdaptedEmbedding,
    "A frozen embedding with adapters (`lora_embedding_A/B`)."
);

impl AdaptedLinear {
    /// A linear layer at `path` with weight (out, in) and optional bias.
    pub fn new(path: &str, weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        Ok(Self(AdaptedLayer::new(
            path,
            BaseKind::Linear,
            weight,
            bias,
        )?))
    }
}
impl AdaptedConv2d {
    /// A conv2d layer at `path` with weight (out, in, kh, kw).
    pub fn new(path: &str, weight: Tensor, bias: Option<Tensor>, cfg: ConvCfg) -> Result<Self> {
        if cfg.groups != 1 {
            return Err(Error::layer(
                path,
                "grouped convolutions cannot take LoRA adapters",
            ));
        }
        Ok(Self(AdaptedLayer::new(
            path,
            BaseKind::Conv2d(cfg),
            weight,
            bias,
        )?))
    }
}
impl AdaptedEmbedding {
    /// An embedding at `path` with weight (num_embeddings, dim).
    pub fn new(path: &str, weight: Tensor) -> Result<Self> {
        Ok(Self(AdaptedLayer::new(
            path,
            BaseKind::Embedding,
            weight,
            None,
        )?))
    }
}
