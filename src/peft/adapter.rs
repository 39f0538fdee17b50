//! The adapter contract. Every method (LoRA with its variants, IA3, LoHa, LoKr, VeRA, AdaLoRA)
//! implements [`Adapter`] in a file of its own; the layer ([`super::AdaptedLayer`]) owns everything
//! that cuts across methods — the output gain, dropout draws, the active/enabled/merged state and
//! routing — and computes one equation for all of them:
//!
//! `y = base(x) + Σ_a gate_a ⊙ gain_a · δ_a(x_a)`,  `x_a = dropout_a(x)`,
//!
//! where `δ_a` is the adapter's additive share. Fast paths (a fused LoRA/DoRA node, IA3's
//! multiplicative input/output scaling) are taken only when they equal the equation: nothing is
//! routed, and for IA3, PEFT's product `l₁ ⊙ l₂` of several active vectors is kept.
//!
//! Adding a method is one new file implementing the trait and one arm in
//! [`super::registry`]'s `Method::build`.

use super::base::{Base, BaseKind};
use super::config::{AdapterConfig, Method};
use super::ctx::ForwardCtx;
use crate::Result;
use candle_core::{Tensor, Var};
use std::any::Any;

/// What the base computed for the current input, for adapters whose share depends on it.
pub struct BaseOut<'a> {
    /// `W x` without bias (on the undropped input).
    pub wx: &'a Tensor,
    /// `W x + b`.
    pub y0: &'a Tensor,
    /// Whether the adapter's input went through dropout (then `wx` is not `W x_a`).
    pub dropped: bool,
}

/// A multiplicative adapter's factor (IA3): scales the layer's input or its output.
pub enum Rescale {
    /// `W (v ⊙ x) + b`; `v` per input feature.
    Input(Tensor),
    /// `v ⊙ (W x + b)`; `v` per output feature.
    Output(Tensor),
}

/// A merge: the new weight and bias, and how to undo it.
pub struct Merged {
    /// The merged weight (f32, in the base layout).
    pub weight: Tensor,
    /// The merged bias.
    pub bias: Option<Tensor>,
    /// The undo record.
    pub undo: Box<dyn Unmerge>,
}

/// Undoes one merge, from what was merged (later changes to the adapter do not matter).
pub trait Unmerge: Send + Sync {
    /// The weight before the merge, from the merged one (f32).
    fn unmerge_weight(&self, base: &Base, w: Tensor) -> Result<Tensor>;
    /// The bias before the merge.
    fn unmerge_bias(&self, bias: Option<Tensor>) -> Result<Option<Tensor>> {
        Ok(bias)
    }
}

/// Undo of an additive merge `W += Δ`.
pub struct SubtractDelta(pub Tensor);

impl Unmerge for SubtractDelta {
    fn unmerge_weight(&self, _base: &Base, w: Tensor) -> Result<Tensor> {
        Ok((w - &self.0)?)
    }
}

/// One adapter of one method on one layer.
pub trait Adapter: Any + Send + Sync {
    /// The method.
    fn method(&self) -> Method;

    /// The trainable tensors with PEFT's parameter names (`lora_A`, `hada_w1_a`, `ia3_l`, ...).
    fn params(&self) -> Vec<(&'static str, &Var)>;

    /// The trainable tensors with PEFT's in-memory names below the layer path, for adapter `name`
    /// (`lora_A.default.weight`, `hada_w1_a.default`, ...).
    fn named_params(&self, _kind: BaseKind, name: &str) -> Vec<(String, Var)> {
        self.params()
            .into_iter()
            .map(|(p, v)| (format!("{p}.{name}"), v.clone()))
            .collect()
    }

    /// Checks the adapter's shapes against the base it is put on.
    fn check(&self, base: &Base) -> Result<()>;

    /// Dropout probability on the adapter's input (training only).
    fn input_dropout(&self) -> f64 {
        0.0
    }
    /// Probability of skipping the whole adapter for a training step (LoHa, LoKr).
    fn module_dropout(&self) -> f64 {
        0.0
    }

    /// The additive share `δ(x)` for input `x` (already through this adapter's dropout), without
    /// the gain; `out` is what the base computed.
    fn delta(&self, base: &Base, x: &Tensor, out: &BaseOut, ctx: &ForwardCtx) -> Result<Tensor>;

    /// `base(x) + bias + gain · δ(x)`, in one fused node where the method has one and it is
    /// exact for this call (`None`: use the equation).
    fn fused(
        &self,
        _base: &Base,
        _bias: Option<&Tensor>,
        _x: &Tensor,
        _gain: f64,
        _ctx: &ForwardCtx,
    ) -> Result<Option<Tensor>> {
        Ok(None)
    }

    /// For multiplicative methods (IA3): the factor at `gain`, composed with other such factors
    /// when nothing is routed.
    fn rescale(&self, _base: &Base, _gain: f64, _ctx: &ForwardCtx) -> Result<Option<Rescale>> {
        Ok(None)
    }

    /// The weight change `ΔW` at gain 1, detached, in the base weight's layout.
    fn delta_weight(&self, base: &Base) -> Result<Tensor>;

    /// Merges into `w` (f32, the base's layout) and `bias` at `gain`. The default is additive:
    /// `W + gain · ΔW`.
    fn merge(&self, base: &Base, w: &Tensor, bias: Option<&Tensor>, gain: f64) -> Result<Merged> {
        let d = (self.delta_weight(base)? * gain)?;
        Ok(Merged {
            weight: (w + &d)?,
            bias: bias.cloned(),
            undo: Box::new(SubtractDelta(d)),
        })
    }

    /// Whether merging rescales the whole weight (DoRA), so that it cannot share a merged weight
    /// with other adapters.
    fn rescales_weight(&self) -> bool {
        false
    }
}

/// What a method's constructor gets.
pub struct BuildSpec<'a> {
    /// The configuration.
    pub cfg: &'a AdapterConfig,
    /// The adapter name.
    pub name: &'a str,
    /// Rank after `rank_pattern`.
    pub r: usize,
    /// Alpha after `alpha_pattern`.
    pub alpha: f64,
    /// The initialisation seed.
    pub seed: u64,
    /// Whether the layer has merged adapters.
    pub merged: bool,
}

impl BuildSpec<'_> {
    /// The seeded generator for this adapter on the layer at `path`.
    pub fn rng(&self, path: &str) -> rand_chacha::ChaCha8Rng {
        crate::rng::rng_for(self.seed, &format!("{path}.{}", self.name))
    }
}

/// PEFT's `kaiming_uniform_(a=√5)` on a tensor of `shape` (fan_in = the product of all but dim 0).
pub(crate) fn kaiming(shape: &[usize], rng: &mut rand_chacha::ChaCha8Rng) -> Result<Tensor> {
    let fan_in: usize = shape[1..].iter().product();
    super::init::kaiming_uniform(shape, fan_in.max(1), rng)
}

/// A boolean method option from the config's extra fields (absent or null: `default`); any other
/// type is an error naming the key.
pub(crate) fn extra_bool(cfg: &AdapterConfig, key: &str, default: bool) -> Result<bool> {
    match cfg.extra.get(key) {
        None | Some(serde_json::Value::Null) => Ok(default),
        Some(serde_json::Value::Bool(b)) => Ok(*b),
        Some(v) => Err(crate::Error::Config(format!(
            "{} setting `{key}` must be true or false, got {v}",
            cfg.peft_type
        ))),
    }
}

/// A numeric method option from the config's extra fields (absent or null: `default`); a
/// non-number or a non-finite number is an error naming the key.
pub(crate) fn extra_f64(cfg: &AdapterConfig, key: &str, default: f64) -> Result<f64> {
    match cfg.extra.get(key) {
        None | Some(serde_json::Value::Null) => Ok(default),
        Some(v) => v.as_f64().filter(|x| x.is_finite()).ok_or_else(|| {
            crate::Error::Config(format!(
                "{} setting `{key}` must be a finite number, got {v}",
                cfg.peft_type
            ))
        }),
    }
}

/// An integer method option from the config's extra fields (absent or null: `default`).
pub(crate) fn extra_i64(cfg: &AdapterConfig, key: &str, default: i64) -> Result<i64> {
    match cfg.extra.get(key) {
        None | Some(serde_json::Value::Null) => Ok(default),
        Some(v) => v.as_i64().ok_or_else(|| {
            crate::Error::Config(format!(
                "{} setting `{key}` must be an integer, got {v}",
                cfg.peft_type
            ))
        }),
    }
}
