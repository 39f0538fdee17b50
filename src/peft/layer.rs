//! Adapted layers: a frozen base (plain tensors, never `Var`s) plus any number of named adapters.
//!
//! LoRA (Hu et al. 2021): `y = W x + b + s · B A x'`, `x' = dropout(x)`, `s = α/r` (rsLoRA: `α/√r`).
//! DoRA (Liu et al. 2024), PEFT semantics: with `g = m / ‖W + s·B A‖` (the norm per output feature,
//! detached), `y = W x + b + (g − 1) ⊙ W x' + g ⊙ s · B A x'`; the bias is not rescaled.
//! Each adapter's contribution is multiplied by its output multiplier (1 by default), which is how
//! weight sweeps at inference work; several active adapters add their contributions, as in PEFT.

use super::config::{AdapterConfig, Init, ModuleKind};
use super::init;
use super::methods::{Method, OtherAdapter};
use super::ops::{self, ConvCfg};
use super::quant::{Absmax, Nf4Tensor, QuantSpec, RoundingError};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::Rng;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

/// Per-forward context: training mode and the seeds that make dropout reproducible.
#[derive(Debug, Default)]
pub struct ForwardCtx {
    /// Training mode (dropout active).
    pub train: bool,
    /// The run's seed.
    pub seed: u64,
    /// The micro-step (so that a resumed run draws the same masks).
    pub step: u64,
    calls: AtomicU64,
}

impl ForwardCtx {
    /// Inference: no dropout.
    pub fn eval() -> Self {
        Self::default()
    }
    /// Training at micro-step `step` of a run seeded with `seed`.
    pub fn train(seed: u64, step: u64) -> Self {
        Self {
            train: true,
            seed,
            step,
            calls: AtomicU64::new(0),
        }
    }
    /// Module dropout (LoHa / LoKr): whether the adapter at `path` runs in this forward.
    fn keep_module(&self, path: &str, p: f64) -> bool {
        let call = self.calls.fetch_add(1, Ordering::Relaxed);
        let mut rng = init::rng_for(
            self.seed ^ self.step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ call,
            path,
        );
        rng.random::<f64>() >= p
    }
    fn dropout_mask(&self, path: &str, shape: &[usize], p: f64, device: &Device) -> Result<Tensor> {
        let call = self.calls.fetch_add(1, Ordering::Relaxed);
        let mut rng = init::rng_for(
            self.seed ^ self.step.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ call,
            path,
        );
        let keep = 1.0 / (1.0 - p);
        let n: usize = shape.iter().product();
        let v: Vec<f32> = (0..n)
            .map(|_| {
                if rng.random::<f64>() < p {
                    0.0
                } else {
                    keep as f32
                }
            })
            .collect();
        Ok(Tensor::from_vec(v, shape, device)?)
    }
}

/// The base layer kind.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum BaseKind {
    /// Linear, weight (out, in).
    Linear,
    /// Conv2d, weight (out, in, kh, kw).
    Conv2d(ConvCfg),
    /// Embedding, weight (num_embeddings, dim).
    Embedding,
    /// A norm's weight (dim): never adapted, trainable in full through `modules_to_save`
    /// (LongLoRA trains the norms); the model applies it.
    Norm,
}

impl BaseKind {
    /// The targeting kind.
    pub fn module_kind(&self) -> ModuleKind {
        match self {
            BaseKind::Linear => ModuleKind::Linear,
            BaseKind::Conv2d(_) => ModuleKind::Conv2d,
            BaseKind::Embedding => ModuleKind::Embedding,
            BaseKind::Norm => ModuleKind::Norm,
        }
    }
}

/// A frozen base weight: dense, or NF4 4-bit (a QLoRA / QDoRA base).
#[derive(Debug, Clone)]
pub enum BaseWeight {
    /// A dense tensor in the load dtype.
    Dense(Tensor),
    /// NF4 codes and scales; dequantized a block of rows at a time in the forward.
    Nf4(Arc<Nf4Tensor>),
}

impl BaseWeight {
    /// The weight's shape.
    pub fn dims(&self) -> &[usize] {
        match self {
            BaseWeight::Dense(t) => t.dims(),
            BaseWeight::Nf4(q) => &q.shape,
        }
    }
    /// The dense weight (dequantized to f32 for an NF4 base: a full temporary).
    pub fn dense(&self) -> Result<Tensor> {
        match self {
            BaseWeight::Dense(t) => Ok(t.clone()),
            BaseWeight::Nf4(q) => q.dequantize(),
        }
    }
    /// The dtype a dense weight is kept in (f32 for NF4, whose compute dtype is f32).
    pub fn dtype(&self) -> DType {
        match self {
            BaseWeight::Dense(t) => t.dtype(),
            BaseWeight::Nf4(_) => DType::F32,
        }
    }
    /// The device.
    pub fn device(&self) -> Device {
        match self {
            BaseWeight::Dense(t) => t.device().clone(),
            BaseWeight::Nf4(_) => Device::Cpu,
        }
    }
    /// The NF4 weight, if quantized.
    pub fn nf4(&self) -> Option<&Arc<Nf4Tensor>> {
        match self {
            BaseWeight::Nf4(q) => Some(q),
            BaseWeight::Dense(_) => None,
        }
    }
    /// Bytes the base weight occupies.
    pub fn storage_bytes(&self) -> usize {
        match self {
            BaseWeight::Dense(t) => t.elem_count() * t.dtype().size_in_bytes(),
            BaseWeight::Nf4(q) => q.storage_bytes(),
        }
    }
}

/// One LoRA / rsLoRA / DoRA adapter on one layer.
pub struct LoraAdapter {
    /// Rank.
    pub r: usize,
    /// Alpha.
    pub alpha: f64,
    /// The LoRA scale (α/r or α/√r).
    pub scale: f64,
    /// Dropout probability (training only).
    pub dropout: f64,
    /// A: linear (r, in); conv (r, in, kh, kw); embedding `lora_embedding_A` (r, num_embeddings).
    pub a: Var,
    /// B: linear (out, r); conv (out, r, 1, 1); embedding `lora_embedding_B` (dim, r).
    pub b: Var,
    /// DoRA magnitude, one per output feature.
    pub magnitude: Option<Var>,
    /// Output multiplier (1 = as trained).
    pub multiplier: f64,
    /// PiSSA/OLoRA: the initial (A₀, B₀), kept to export a plain LoRA ("subtract mutated init").
    pub initial: Option<(Tensor, Tensor)>,
}

/// Trainable full copies for `modules_to_save`.
struct SavedCopy {
    weight: Var,
    bias: Option<Var>,
}

impl LoraAdapter {
    /// A deep copy with fresh variables (same values, independent training).
    pub fn clone_detached(&self) -> Result<Self> {
        let copy = |v: &Var| -> Result<Var> { Ok(Var::from_tensor(&v.as_tensor().copy()?)?) };
        Ok(Self {
            r: self.r,
            alpha: self.alpha,
            scale: self.scale,
            dropout: self.dropout,
            a: copy(&self.a)?,
            b: copy(&self.b)?,
            magnitude: self.magnitude.as_ref().map(copy).transpose()?,
            multiplier: self.multiplier,
            initial: self.initial.clone(),
        })
    }
}

/// What was merged: the adapter's factors, scale and multiplier at merge time (and the DoRA
/// magnitude and norm), so that unmerging restores the base even if the adapter changed since.
struct MergeRecord {
    name: String,
    a: Tensor,
    b: Tensor,
    scale: f64,
    multiplier: f64,
    dora: Option<(Tensor, Tensor)>,
    /// A non-LoRA adapter's merge (then a, b, scale and dora are unused).
    other: Option<OtherMerge>,
    /// The NF4 base before this merge (with its ‖W‖² and rounding error), restored exactly on
    /// unmerge instead of re-quantizing twice.
    prev_nf4: Option<(Arc<Nf4Tensor>, Tensor, Option<RoundingError>)>,
}

/// What merging a non-LoRA adapter did.
enum OtherMerge {
    /// W += ΔW (LoHa, LoKr; multiplier included).
    Delta(Tensor),
    /// IA3: rows (and the bias) or columns of W multiplied by `l`.
    Ia3 { l: Tensor, feedforward: bool },
}

/// A frozen base layer with named adapters, an active set, enable/disable and merging.
pub struct AdaptedLayer {
    path: String,
    kind: BaseKind,
    weight: BaseWeight,
    /// Rounding error of the last re-quantization of an NF4 base (a merge, a PiSSA residual).
    rounding: Option<RoundingError>,
    /// ‖W‖² per output feature, for DoRA norms without a weight-sized temporary.
    weight_sq: Tensor,
    bias: Option<Tensor>,
    adapters: BTreeMap<String, LoraAdapter>,
    /// IA3, LoHa and LoKr adapters.
    others: BTreeMap<String, OtherAdapter>,
    active: Vec<String>,
    enabled: bool,
    /// Merged adapters in merge order, with what unmerging needs.
    merged: Vec<MergeRecord>,
    saved: Option<SavedCopy>,
}

pub(crate) fn var(t: Tensor) -> Result<Var> {
    Ok(Var::from_tensor(&t.to_dtype(DType::F32)?.contiguous()?)?)
}

impl AdaptedLayer {
    /// A bare base layer at module path `path`; adapters are added with [`Self::add_adapter`].
    pub fn new(path: &str, kind: BaseKind, weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let rank = weight.rank();
        let ok = match kind {
            BaseKind::Linear | BaseKind::Embedding => rank == 2,
            BaseKind::Conv2d(_) => rank == 4,
            BaseKind::Norm => rank == 1,
        };
        if !ok {
            return Err(Error::Msg(format!(
                "{path}: weight shape {:?} does not fit a {kind:?} layer",
                weight.dims()
            )));
        }
        if let Some(b) = &bias {
            if b.dims() != [weight.dim(0)?] {
                return Err(Error::Msg(format!(
                    "{path}: bias shape {:?} does not fit weight {:?}",
                    b.dims(),
                    weight.dims()
                )));
            }
        }
        let weight_sq = Self::feature_sq(kind, &weight)?;
        Ok(Self {
            path: path.to_string(),
            kind,
            weight: BaseWeight::Dense(weight),
            rounding: None,
            weight_sq,
            bias,
            adapters: BTreeMap::new(),
            others: BTreeMap::new(),
            active: vec![],
            enabled: true,
            merged: vec![],
            saved: None,
        })
    }

    fn feature_sq(kind: BaseKind, w: &Tensor) -> Result<Tensor> {
        let w = w.to_dtype(DType::F32)?;
        Ok(match kind {
            BaseKind::Embedding => w.sqr()?.sum(0)?,
            BaseKind::Norm => w.sqr()?,
            _ => w.flatten_from(1)?.sqr()?.sum(1)?,
        })
    }

    /// A linear layer at `path` over an NF4 base weight (out, in), as read from a 4-bit checkpoint.
    pub fn new_nf4(path: &str, weight: Nf4Tensor, bias: Option<Tensor>) -> Result<Self> {
        if weight.shape.len() != 2 {
            return Err(Error::Msg(format!(
                "{path}: 4-bit weight shape {:?} is not (out, in)",
                weight.shape
            )));
        }
        let mut l = Self::new(
            path,
            BaseKind::Linear,
            Tensor::zeros((0, weight.shape[1]), DType::F32, &Device::Cpu)?,
            None,
        )?;
        if let Some(b) = &bias {
            if b.dims() != [weight.shape[0]] {
                return Err(Error::Msg(format!(
                    "{path}: bias shape {:?} does not fit 4-bit weight {:?}",
                    b.dims(),
                    weight.shape
                )));
            }
        }
        l.bias = bias;
        l.weight_sq = Self::feature_sq(BaseKind::Linear, &weight.dequantize()?)?;
        l.weight = BaseWeight::Nf4(Arc::new(weight));
        Ok(l)
    }

    /// Quantizes the base weight to NF4 (QLoRA): linear layers only, as bitsandbytes does. Returns
    /// the rounding error. Adapters stay in f32; an already quantized base is left as it is.
    pub fn quantize_nf4(&mut self, spec: QuantSpec) -> Result<RoundingError> {
        if self.kind != BaseKind::Linear {
            return Err(Error::Msg(format!(
                "{}: only linear layers are quantized to NF4, not {:?}",
                self.path, self.kind
            )));
        }
        if let BaseWeight::Nf4(_) = self.weight {
            return Ok(self.rounding.unwrap_or_default());
        }
        let w = self.weight.dense()?;
        let q = Nf4Tensor::quantize(&w, spec.blocksize, spec.double_quant)?;
        let back = q.dequantize()?;
        let err = RoundingError::between(&w.to_dtype(DType::F32)?, &back)?;
        self.weight_sq = Self::feature_sq(self.kind, &back)?;
        self.weight = BaseWeight::Nf4(Arc::new(q));
        self.rounding = Some(err);
        Ok(err)
    }

    /// Replaces the base weight by `w` (f32). An NF4 base is re-quantized with its own settings
    /// and the rounding error recorded ([`Self::rounding_error`]).
    fn set_weight(&mut self, w: Tensor) -> Result<()> {
        match &self.weight {
            BaseWeight::Dense(old) => {
                let w = w.to_dtype(old.dtype())?;
                self.weight_sq = Self::feature_sq(self.kind, &w)?;
                self.weight = BaseWeight::Dense(w);
            }
            BaseWeight::Nf4(old) => {
                let dq = matches!(old.absmax, Absmax::Double { .. });
                let mut q = Nf4Tensor::quantize(&w, old.blocksize, dq)?;
                q.dtype = old.dtype.clone();
                let back = q.dequantize()?;
                self.rounding = Some(RoundingError::between(&w.to_dtype(DType::F32)?, &back)?);
                self.weight_sq = Self::feature_sq(self.kind, &back)?;
                self.weight = BaseWeight::Nf4(Arc::new(q));
            }
        }
        Ok(())
    }

    fn dims2(&self) -> Result<(usize, usize)> {
        match *self.weight.dims() {
            [a, b] => Ok((a, b)),
            ref d => Err(Error::Msg(format!(
                "{}: weight {d:?} is not 2-D",
                self.path
            ))),
        }
    }

    fn dims4(&self) -> Result<(usize, usize, usize, usize)> {
        match *self.weight.dims() {
            [a, b, c, d] => Ok((a, b, c, d)),
            ref d => Err(Error::Msg(format!(
                "{}: weight {d:?} is not 4-D",
                self.path
            ))),
        }
    }

    /// The NF4 base as it is now, for an exact unmerge.
    fn nf4_snapshot(&self) -> Option<(Arc<Nf4Tensor>, Tensor, Option<RoundingError>)> {
        match &self.weight {
            BaseWeight::Nf4(q) => Some((q.clone(), self.weight_sq.clone(), self.rounding)),
            BaseWeight::Dense(_) => None,
        }
    }

    fn norm_err(&self) -> Error {
        Error::Msg(format!(
            "{}: a norm weight is applied by its model and takes no adapters",
            self.path
        ))
    }

    /// The weight the model applies: the trained copy of a `modules_to_save` layer (while
    /// adapters are enabled), else the base weight (dense).
    pub fn effective_weight(&self) -> Result<Tensor> {
        match (&self.saved, self.enabled) {
            (Some(s), true) => Ok(s.weight.as_tensor().clone()),
            _ => self.weight.dense(),
        }
    }

    /// The rounding error of the last (re-)quantization of an NF4 base: after quantizing, merging
    /// into it, unmerging, or writing a PiSSA residual into it.
    pub fn rounding_error(&self) -> Option<RoundingError> {
        self.rounding
    }

    /// The DoRA norm ‖W + s·B A‖ per output feature, detached, without forming W + ΔW:
    /// ‖W‖² + 2s·Σ_k B_ik (W Aᵀ)_ik + s²·Σ_k (B·(A Aᵀ))_ik B_ik.
    fn dora_norm(&self, ad: &LoraAdapter) -> Result<Tensor> {
        let a = ad.a.as_tensor().detach();
        let b = ad.b.as_tensor().detach();
        let (a, b, wa) = match (&self.weight, self.kind) {
            (BaseWeight::Nf4(q), _) => {
                // W Aᵀ = (A Wᵀ)ᵀ, with the NF4 weight dequantized block by block.
                let wa = ops::nf4_linear(&a, q)?.t()?; // (out, r)
                (a, b, wa)
            }
            (BaseWeight::Dense(w), BaseKind::Embedding) => {
                let w = w.to_dtype(DType::F32)?;
                // Wᵀ (dim, num) plays W; ΔWᵀ = s·B A with A (r, num), B (dim, r).
                let wa = a.matmul(&w)?.t()?; // (dim, r)
                (a, b, wa)
            }
            (BaseWeight::Dense(w), _) => {
                let w = w.to_dtype(DType::F32)?;
                let af = a.flatten_from(1)?; // (r, K)
                let bf = b.flatten_from(1)?; // (out, r)
                let wa = w.flatten_from(1)?.matmul(&af.t()?)?; // (out, r)
                (af, bf, wa)
            }
        };
        let s = ad.scale;
        let cross = (&b * &wa)?.sum(1)?;
        let aat = a.matmul(&a.t()?)?;
        let quad = (b.matmul(&aat)? * &b)?.sum(1)?;
        let n2 = ((&self.weight_sq + (cross * (2.0 * s))?)? + (quad * (s * s))?)?;
        Ok(n2.relu()?.sqrt()?)
    }

    /// The module path (`model.layers.0.self_attn.q_proj`).
    pub fn path(&self) -> &str {
        &self.path
    }
    /// The base kind.
    pub fn kind(&self) -> BaseKind {
        self.kind
    }
    /// The current base weight as a dense tensor (includes merged adapters and PiSSA/OLoRA
    /// residuals; an NF4 base is dequantized).
    pub fn weight(&self) -> Result<Tensor> {
        self.weight.dense()
    }
    /// The base weight as stored (dense or NF4).
    pub fn base_weight(&self) -> &BaseWeight {
        &self.weight
    }
    /// The base bias.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
    /// Adapters by name.
    pub fn adapters(&self) -> &BTreeMap<String, LoraAdapter> {
        &self.adapters
    }
    /// IA3, LoHa, LoKr and VeRA adapters by name.
    pub fn others(&self) -> &BTreeMap<String, OtherAdapter> {
        &self.others
    }
    /// Mutable access to them (VeRA's shared projections are set this way).
    pub fn others_mut(&mut self) -> &mut BTreeMap<String, OtherAdapter> {
        &mut self.others
    }
    /// Mutable access to one adapter (to set its multiplier, for example).
    pub fn adapter_mut(&mut self, name: &str) -> Option<&mut LoraAdapter> {
        self.adapters.get_mut(name)
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

    /// Expected shapes of (A, B, magnitude) at rank r.
    pub fn factor_shapes(&self, r: usize) -> Result<(Vec<usize>, Vec<usize>, Vec<usize>)> {
        Ok(match self.kind {
            BaseKind::Linear => {
                let (o, i) = self.dims2()?;
                (vec![r, i], vec![o, r], vec![o])
            }
            BaseKind::Conv2d(_) => {
                let (o, i, kh, kw) = self.dims4()?;
                (vec![r, i, kh, kw], vec![o, r, 1, 1], vec![o])
            }
            BaseKind::Embedding => {
                let (n, d) = self.dims2()?;
                (vec![r, n], vec![d, r], vec![d])
            }
            BaseKind::Norm => return Err(self.norm_err()),
        })
    }

    /// Adds adapter `name` per `cfg` (rank/alpha after patterns), initialised from `seed`.
    /// PiSSA/OLoRA rewrite the base weight into the residual, as PEFT does.
    pub fn add_adapter(&mut self, name: &str, cfg: &AdapterConfig, seed: u64) -> Result<()> {
        if self.adapters.contains_key(name) || self.others.contains_key(name) {
            return Err(Error::Msg(format!(
                "{}: adapter `{name}` already exists",
                self.path
            )));
        }
        if self.kind == BaseKind::Norm {
            return Err(self.norm_err());
        }
        let st = cfg.settings_for(&self.path)?;
        if Method::of(&cfg.peft_type)? != Method::Lora {
            if self.kind == BaseKind::Embedding {
                return Err(Error::Config(format!(
                    "{}: {} adapters take linear and conv layers, not embeddings",
                    self.path, cfg.peft_type
                )));
            }
            let dims = self.weight.dims().to_vec();
            let ad = OtherAdapter::new(cfg, &self.path, &dims, st.r, st.alpha, seed, name)?;
            self.others.insert(name.to_string(), ad);
            if !self.active.iter().any(|a| a == name) {
                self.active.push(name.to_string());
            }
            return Ok(());
        }
        let r = st.r;
        let scale = cfg.scale(r, st.alpha);
        let (sa, sb, _) = self.factor_shapes(r)?;
        let fan_in: usize = sa[1..].iter().product();
        if fan_in == 0 || sb[0] == 0 {
            return Err(Error::Msg(format!(
                "{}: empty weight {:?}",
                self.path,
                self.weight.dims()
            )));
        }
        let mut rng = init::rng_for(seed, &format!("{}.{name}", self.path));
        let dev = self.weight.device();
        let mut initial = None;
        let (a, b) = match (cfg.init_lora_weights.parse()?, self.kind) {
            (Init::Default, BaseKind::Embedding) => (
                Tensor::zeros(sa.as_slice(), DType::F32, &dev)?,
                init::normal(&sb, 1.0, &mut rng)?,
            ),
            (Init::Default, _) => (
                init::kaiming_uniform(&sa, fan_in, &mut rng)?,
                Tensor::zeros(sb.as_slice(), DType::F32, &dev)?,
            ),
            (Init::Gaussian, BaseKind::Embedding) => (
                Tensor::zeros(sa.as_slice(), DType::F32, &dev)?,
                init::normal(&sb, 1.0 / r as f64, &mut rng)?,
            ),
            (Init::Gaussian, _) => (
                init::normal(&sa, 1.0 / r as f64, &mut rng)?,
                Tensor::zeros(sb.as_slice(), DType::F32, &dev)?,
            ),
            (Init::Random, BaseKind::Embedding) => (
                init::normal(&sa, 1.0, &mut rng)?,
                init::normal(&sb, 1.0, &mut rng)?,
            ),
            (Init::Random, _) => {
                let a = init::kaiming_uniform(&sa, fan_in, &mut rng)?;
                let b = init::kaiming_uniform(&sb, r, &mut rng)?;
                (a, b)
            }
            (m @ (Init::Pissa(_) | Init::Olora), BaseKind::Linear) => {
                if !self.merged.is_empty() {
                    return Err(Error::Msg(format!(
                        "{}: cannot add a PiSSA/OLoRA adapter while others are merged",
                        self.path
                    )));
                }
                let (o, i) = self.dims2()?;
                if r > o.min(i) {
                    return Err(Error::Config(format!(
                        "{}: rank {r} exceeds min(out, in) = {} of {:?}",
                        self.path,
                        o.min(i),
                        self.weight.dims()
                    )));
                }
                // On an NF4 base this is QPiSSA's order reversed only in time: the principal
                // components come from the dequantized weight, the residual is re-quantized.
                let w = self.weight.dense()?.to_dtype(DType::F32)?;
                let (a, b, res) = match m {
                    Init::Pissa(niter) => init::pissa(&w, r, scale, niter, &mut rng)?,
                    _ => init::olora(&w, r, scale)?,
                };
                self.set_weight(res)?;
                initial = Some((a.clone(), b.clone()));
                (a, b)
            }
            (Init::Loftq, BaseKind::Linear) => {
                if self.weight.nf4().is_some() {
                    return Err(Error::Config(format!(
                        "{}: LoftQ needs the full-precision weight; load the unquantized checkpoint with --quantize nf4 instead of a 4-bit one",
                        self.path
                    )));
                }
                if !self.merged.is_empty() {
                    return Err(Error::Msg(format!(
                        "{}: cannot add a LoftQ adapter while others are merged",
                        self.path
                    )));
                }
                let (o, i) = self.dims2()?;
                if r > o.min(i) {
                    return Err(Error::Config(format!(
                        "{}: rank {r} exceeds min(out, in) = {}",
                        self.path,
                        o.min(i)
                    )));
                }
                let w = self.weight.dense()?.to_dtype(DType::F32)?;
                let (a, b, q) = init::loftq(&w, r, cfg.loftq_iter()?)?;
                self.set_weight(q)?;
                (a, b)
            }
            (m, k) => {
                return Err(Error::Config(format!(
                    "{}: init {m:?} is only defined for Linear layers, not {k:?}",
                    self.path
                )))
            }
        };
        let adapter = LoraAdapter {
            r,
            alpha: st.alpha,
            scale,
            dropout: cfg.lora_dropout,
            a: var(a.to_device(&dev)?)?,
            b: var(b.to_device(&dev)?)?,
            magnitude: None,
            multiplier: 1.0,
            initial,
        };
        self.adapters.insert(name.to_string(), adapter);
        if cfg.use_dora {
            let n = self.dora_norm(&self.adapters[name])?;
            self.adapters
                .get_mut(name)
                .expect("just inserted")
                .magnitude = Some(var(n)?);
        }
        if !self.active.iter().any(|a| a == name) {
            self.active.push(name.to_string());
        }
        Ok(())
    }

    /// Inserts an adapter built elsewhere (a loaded file). Shapes are checked.
    pub fn insert_adapter(&mut self, name: &str, adapter: LoraAdapter) -> Result<()> {
        if self.adapters.contains_key(name) {
            return Err(Error::Msg(format!(
                "{}: adapter `{name}` already exists",
                self.path
            )));
        }
        let (sa, sb, sm) = self.factor_shapes(adapter.r)?;
        for (what, t, want) in [
            ("A", adapter.a.as_tensor(), &sa),
            ("B", adapter.b.as_tensor(), &sb),
        ] {
            if t.dims() != want.as_slice() {
                return Err(Error::Msg(format!(
                    "{}: lora_{what} has shape {:?}, the base needs {:?}",
                    self.path,
                    t.dims(),
                    want
                )));
            }
        }
        if let Some(m) = &adapter.magnitude {
            if m.dims() != sm.as_slice() {
                return Err(Error::Msg(format!(
                    "{}: magnitude has shape {:?}, needs {:?}",
                    self.path,
                    m.dims(),
                    sm
                )));
            }
        }
        self.adapters.insert(name.to_string(), adapter);
        if !self.active.iter().any(|a| a == name) {
            self.active.push(name.to_string());
        }
        Ok(())
    }

    /// Inserts an IA3 / LoHa / LoKr / VeRA / AdaLoRA adapter built elsewhere (a loaded file).
    pub fn insert_other(&mut self, name: &str, adapter: OtherAdapter) -> Result<()> {
        if self.adapters.contains_key(name) || self.others.contains_key(name) {
            return Err(Error::Msg(format!(
                "{}: adapter `{name}` already exists",
                self.path
            )));
        }
        if self.kind == BaseKind::Embedding || self.kind == BaseKind::Norm {
            return Err(Error::Msg(format!(
                "{}: this adapter type takes linear and conv layers",
                self.path
            )));
        }
        self.others.insert(name.to_string(), adapter);
        if !self.active.iter().any(|a| a == name) {
            self.active.push(name.to_string());
        }
        Ok(())
    }

    /// Makes this a `modules_to_save` layer: a trainable full copy of weight and bias.
    pub fn make_trainable_copy(&mut self) -> Result<()> {
        if self.saved.is_none() {
            let weight = var(self.weight.dense()?)?;
            let bias = self.bias.clone().map(var).transpose()?;
            self.saved = Some(SavedCopy { weight, bias });
        }
        Ok(())
    }

    /// Replaces the trainable copy's values (loading a file).
    pub fn set_trainable_copy(&mut self, weight: &Tensor, bias: Option<&Tensor>) -> Result<()> {
        self.make_trainable_copy()?;
        let s = self.saved.as_ref().expect("made above");
        s.weight.set(&weight.to_dtype(DType::F32)?)?;
        if let (Some(v), Some(b)) = (&s.bias, bias) {
            v.set(&b.to_dtype(DType::F32)?)?;
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
            if !self.adapters.contains_key(*n) && !self.others.contains_key(*n) {
                return Err(Error::Msg(format!("{}: no adapter named `{n}`", self.path)));
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

    /// Removes an adapter (unmerging it first if needed).
    pub fn delete_adapter(&mut self, name: &str) -> Result<Option<LoraAdapter>> {
        if self.merged.iter().any(|m| m.name == name) {
            self.unmerge()?;
        }
        self.active.retain(|a| a != name);
        self.others.remove(name);
        Ok(self.adapters.remove(name))
    }

    /// ΔW = mult·s·B A of an adapter in the base weight's layout.
    fn delta_of(&self, ad: &LoraAdapter, mult: f64) -> Result<Tensor> {
        self.delta_from(ad.a.as_tensor(), ad.b.as_tensor(), ad.scale * mult)
    }

    /// ΔW = s·B A from factors, in the base weight's layout.
    fn delta_from(&self, a: &Tensor, b: &Tensor, s: f64) -> Result<Tensor> {
        let (a, b) = (a.detach(), b.detach());
        Ok(match self.kind {
            BaseKind::Linear => (b.matmul(&a)? * s)?,
            BaseKind::Conv2d(_) => {
                let (o, r) = (b.dim(0)?, b.dim(1)?);
                let a2 = a.reshape((a.dim(0)?, ()))?;
                (b.reshape((o, r))?.matmul(&a2)? * s)?.reshape(self.weight.dims())?
            }
            BaseKind::Embedding => (b.matmul(&a)?.t()? * s)?.contiguous()?,
            BaseKind::Norm => return Err(self.norm_err()),
        })
    }

    /// The delta weight of adapter `name` (times its multiplier), in the base layout.
    pub fn delta_weight(&self, name: &str) -> Result<Tensor> {
        let ad = self.get(name)?;
        self.delta_of(ad, ad.multiplier)
    }

    fn get(&self, name: &str) -> Result<&LoraAdapter> {
        self.adapters
            .get(name)
            .ok_or_else(|| Error::Msg(format!("{}: no adapter named `{name}`", self.path)))
    }

    /// ‖W + ΔW‖ per output feature (detached). Linear/conv: over all but dim 0; embedding: over dim 0.
    fn weight_norm(&self, w: &Tensor, delta: &Tensor) -> Result<Tensor> {
        let m = (w.to_dtype(DType::F32)? + delta)?.detach();
        Ok(match self.kind {
            BaseKind::Embedding => m.sqr()?.sum(0)?.sqrt()?,
            _ => m.flatten_from(1)?.sqr()?.sum(1)?.sqrt()?,
        })
    }

    /// Reshapes a per-output-feature vector to broadcast against this layer's output.
    fn feature_view(&self, v: &Tensor, out_rank: usize) -> Result<Tensor> {
        let n = v.dim(0)?;
        Ok(match self.kind {
            BaseKind::Conv2d(_) => v.reshape((1, n, 1, 1))?,
            _ => {
                let mut shape = vec![1; out_rank];
                shape[out_rank - 1] = n;
                v.reshape(shape)?
            }
        })
    }

    /// The adapter path `s · B A x` (no multiplier) for an input already through dropout.
    fn lora_path(&self, ad: &LoraAdapter, x: &Tensor) -> Result<Tensor> {
        let y = match self.kind {
            BaseKind::Linear => {
                ops::plain_linear(&ops::plain_linear(x, ad.a.as_tensor())?, ad.b.as_tensor())?
            }
            BaseKind::Conv2d(c) => {
                // PEFT builds lora_A with the base's kernel, stride and padding, but dilation 1.
                let a_cfg = ConvCfg {
                    dilation: 1,
                    groups: 1,
                    ..c
                };
                let h = ops::conv2d(x, ad.a.as_tensor(), a_cfg, true)?;
                ops::conv2d(&h, ad.b.as_tensor(), ConvCfg::default(), true)?
            }
            BaseKind::Embedding => {
                // lookup rows of Aᵀ (num, r), then · Bᵀ
                let at = ad.a.as_tensor().t()?.contiguous()?;
                let h = embed(&at, x)?;
                ops::plain_linear(&h, ad.b.as_tensor())?
            }
            BaseKind::Norm => return Err(self.norm_err()),
        };
        Ok((y * ad.scale)?)
    }

    /// The frozen base path without bias.
    fn base_path(&self, x: &Tensor) -> Result<Tensor> {
        let w = match &self.weight {
            BaseWeight::Nf4(q) => return Ok(ops::nf4_linear(x, q)?),
            BaseWeight::Dense(w) => w,
        };
        Ok(match self.kind {
            BaseKind::Linear => ops::frozen_linear(x, w)?,
            BaseKind::Conv2d(c) => ops::frozen_conv2d(x, w, c)?,
            BaseKind::Embedding => {
                embed(w, x).map_err(|e| Error::Msg(format!("{}: {e}", self.path)))?
            }
            BaseKind::Norm => return Err(self.norm_err()),
        })
    }

    fn add_bias(&self, y: Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let Some(b) = bias else { return Ok(y) };
        let dim = match self.kind {
            BaseKind::Conv2d(_) => 1,
            _ => y.rank() - 1,
        };
        Ok(ops::add_channel_bias(&y, b, dim)?)
    }

    /// The names of the active adapters that still act at forward time (none while disabled;
    /// merged ones live in the weight).
    fn unmerged_active(&self) -> impl Iterator<Item = &String> {
        self.active
            .iter()
            .filter(|n| self.enabled && !self.merged.iter().any(|m| &m.name == *n))
    }

    /// The weight `W` when this layer's forward is exactly `x · Wᵀ` with `W` frozen: a dense linear
    /// layer without bias, trainable copy or any unmerged active adapter. Fused consumers (the
    /// language-model loss) use it to skip the layer's output; `None` means run [`Self::forward`].
    pub fn frozen_plain_weight(&self) -> Option<&Tensor> {
        if self.kind != BaseKind::Linear || self.bias.is_some() {
            return None;
        }
        if self.saved.is_some() && self.enabled {
            return None;
        }
        let live = self
            .unmerged_active()
            .any(|n| self.adapters.contains_key(n) || self.others.contains_key(n));
        match &self.weight {
            BaseWeight::Dense(w) if !live => Some(w),
            _ => None,
        }
    }

    /// Forward. Linear: x (..., in); conv: x (b, c, h, w); embedding: ids (...) as u32/i64.
    pub fn forward(&self, x: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        if let (Some(s), true) = (&self.saved, self.enabled) {
            let w = s.weight.as_tensor();
            let y = match self.kind {
                BaseKind::Linear => ops::plain_linear(x, w)?,
                BaseKind::Conv2d(c) => ops::conv2d(x, w, c, true)?,
                BaseKind::Embedding => {
                    embed(w, x).map_err(|e| Error::Msg(format!("{}: {e}", self.path)))?
                }
                BaseKind::Norm => return Err(self.norm_err()),
            };
            return self.add_bias(y, s.bias.as_ref().map(|v| v.as_tensor()));
        }
        let live: Vec<&LoraAdapter> = self
            .unmerged_active()
            .filter_map(|n| self.adapters.get(n))
            .collect();
        let others: Vec<(&String, &OtherAdapter)> = self
            .unmerged_active()
            .filter_map(|n| self.others.get(n).map(|o| (n, o)))
            .collect();
        if !others.is_empty() {
            return self.forward_with_others(x, ctx, &others, &live);
        }
        // Fast path: one linear adapter without dropout in effect is a single fused node.
        if let ([ad], BaseKind::Linear, true) = (live.as_slice(), self.kind, x.device().is_cpu()) {
            if !(ctx.train && ad.dropout > 0.0) {
                let (a, b) = (ad.a.as_tensor(), ad.b.as_tensor());
                let fused = |s: f64| -> Result<Tensor> {
                    Ok(match &self.weight {
                        BaseWeight::Dense(w) => ops::lora_linear(x, w, a, b, s)?,
                        BaseWeight::Nf4(q) => ops::qlora_linear(x, q, a, b, s)?,
                    })
                };
                match &ad.magnitude {
                    None => {
                        let y = fused(ad.scale * ad.multiplier)?;
                        return self.add_bias(y, self.bias.as_ref());
                    }
                    Some(m) if ad.multiplier == 1.0 => {
                        // y = g ⊙ (W x + s·B A x) + b with g = m / ‖W + s·B A‖ (detached norm).
                        let u = fused(ad.scale)?;
                        let g = m.as_tensor().div(&self.dora_norm(ad)?)?;
                        return self.add_bias(ops::scale_columns(&u, &g)?, self.bias.as_ref());
                    }
                    Some(_) => {}
                }
            }
        }
        let base = self.base_path(x)?;
        let mut y = base.clone();
        for ad in live {
            let use_dropout = ctx.train && ad.dropout > 0.0 && self.kind != BaseKind::Embedding;
            let xd = if use_dropout {
                let mask = ctx.dropout_mask(&self.path, x.dims(), ad.dropout, x.device())?;
                x.mul(&mask.to_dtype(x.dtype())?)?
            } else {
                x.clone()
            };
            let lora = self.lora_path(ad, &xd)?;
            let contrib = match &ad.magnitude {
                None => lora,
                Some(m) => {
                    let g =
                        self.feature_view(&m.as_tensor().div(&self.dora_norm(ad)?)?, y.rank())?;
                    let base_d = if use_dropout {
                        self.base_path(&xd)?
                    } else {
                        base.clone()
                    };
                    let gm1 = (&g - 1.0)?;
                    (base_d.broadcast_mul(&gm1)? + lora.broadcast_mul(&g)?)?
                }
            };
            y = if ad.multiplier == 1.0 {
                (y + contrib)?
            } else {
                (y + (contrib * ad.multiplier)?)?
            };
        }
        self.add_bias(y, self.bias.as_ref())
    }

    /// IA3's vector as a per-feature vector of the output (or, feed-forward, of the input).
    fn ia3_vector(l: &Var) -> Result<Tensor> {
        Ok(l.as_tensor().flatten_all()?)
    }

    /// Reshapes a per-input-feature vector to broadcast against the input `x`.
    fn input_view(&self, v: &Tensor, x: &Tensor) -> Result<Tensor> {
        let n = v.dim(0)?;
        Ok(match self.kind {
            BaseKind::Conv2d(_) => v.reshape((1, n, 1, 1))?,
            _ => {
                let mut shape = vec![1; x.rank()];
                shape[x.rank() - 1] = n;
                v.reshape(shape)?
            }
        })
    }

    /// Forward with IA3 / LoHa / LoKr adapters active (and any LoRA adapters beside them, added
    /// without DoRA): feed-forward IA3 scales the input of the base path, other IA3 vectors its
    /// output (bias included); LoHa and LoKr add the activations of their ΔW.
    fn forward_with_others(
        &self,
        x: &Tensor,
        ctx: &ForwardCtx,
        others: &[(&String, &OtherAdapter)],
        loras: &[&LoraAdapter],
    ) -> Result<Tensor> {
        let mut xin = x.clone();
        let mut out_scale: Option<Tensor> = None;
        for (_, o) in others {
            if let OtherAdapter::Ia3 { l, feedforward } = o {
                let v = Self::ia3_vector(l)?;
                if *feedforward {
                    xin = xin.broadcast_mul(&self.input_view(&v, x)?)?;
                } else {
                    out_scale = Some(match out_scale {
                        None => v,
                        Some(s) => (s * v)?,
                    });
                }
            }
        }
        let mut y = self.add_bias(self.base_path(&xin)?, self.bias.as_ref())?;
        if let Some(sc) = out_scale {
            y = y.broadcast_mul(&self.feature_view(&sc, y.rank())?)?;
        }
        let dims = self.weight.dims().to_vec();
        for (name, o) in others {
            if let OtherAdapter::Vera { dropout, .. } | OtherAdapter::Adalora { dropout, .. } = o {
                let xd = if ctx.train && *dropout > 0.0 {
                    let mask = ctx.dropout_mask(&self.path, x.dims(), *dropout, x.device())?;
                    x.mul(&mask.to_dtype(x.dtype())?)?
                } else {
                    x.clone()
                };
                y = match o {
                    OtherAdapter::Vera { .. } => (y + o.vera_activation(&xd)?)?,
                    _ => (y + o.adalora_activation(&xd)?)?,
                };
                continue;
            }
            let Some(d) = o.delta(&dims)? else { continue };
            let p = o.module_dropout();
            if ctx.train && p > 0.0 && !ctx.keep_module(&format!("{}.{name}", self.path), p) {
                continue;
            }
            let dy = match self.kind {
                BaseKind::Linear => ops::plain_linear(x, &d)?,
                BaseKind::Conv2d(c) => ops::conv2d(x, &d, c, true)?,
                BaseKind::Embedding | BaseKind::Norm => {
                    return Err(Error::Msg(format!(
                        "{}: {name} on an embedding or norm",
                        self.path
                    )))
                }
            };
            y = (y + dy)?;
        }
        for ad in loras {
            if ad.magnitude.is_some() {
                return Err(Error::Msg(format!(
                    "{}: a DoRA adapter cannot be active together with IA3/LoHa/LoKr adapters",
                    self.path
                )));
            }
            let use_dropout = ctx.train && ad.dropout > 0.0;
            let xd = if use_dropout {
                let mask = ctx.dropout_mask(&self.path, x.dims(), ad.dropout, x.device())?;
                x.mul(&mask.to_dtype(x.dtype())?)?
            } else {
                x.clone()
            };
            y = (y + (self.lora_path(ad, &xd)? * ad.multiplier)?)?;
        }
        Ok(y)
    }

    /// `w` (and `bias`) with non-LoRA adapter `o` merged in, and the record to undo it.
    fn merged_other(
        &self,
        w: &Tensor,
        bias: Option<&Tensor>,
        o: &OtherAdapter,
    ) -> Result<(Tensor, Option<Tensor>, OtherMerge)> {
        let wf = w.to_dtype(DType::F32)?;
        Ok(match o {
            OtherAdapter::Ia3 { l, feedforward } => {
                let v = Self::ia3_vector(l)?.detach();
                let smallest = v.abs()?.min(0)?.to_scalar::<f32>()?;
                if smallest < 1e-8 {
                    return Err(Error::Msg(format!(
                        "{}: an IA3 vector entry is {smallest:e}; merging would not be reversible",
                        self.path
                    )));
                }
                let b = match (bias, feedforward) {
                    (Some(b), false) => Some((b.to_dtype(DType::F32)? * &v)?),
                    (b, _) => b.cloned(),
                };
                (
                    wf.broadcast_mul(&self.ia3_weight_view(&v, *feedforward)?)?,
                    b,
                    OtherMerge::Ia3 {
                        l: v,
                        feedforward: *feedforward,
                    },
                )
            }
            _ => {
                let d = o
                    .delta(w.dims())?
                    .ok_or_else(|| Error::Msg(format!("{}: no delta", self.path)))?
                    .detach();
                ((wf + &d)?, bias.cloned(), OtherMerge::Delta(d))
            }
        })
    }

    /// IA3's vector shaped to scale the weight's rows (output) or columns (feed-forward input).
    fn ia3_weight_view(&self, l: &Tensor, feedforward: bool) -> Result<Tensor> {
        let n = l.dim(0)?;
        Ok(match (self.kind, feedforward) {
            (BaseKind::Conv2d(_), true) => l.reshape((1, n, 1, 1))?,
            (BaseKind::Conv2d(_), false) => l.reshape((n, 1, 1, 1))?,
            (_, true) => l.reshape((1, n))?,
            (_, false) => l.reshape((n, 1))?,
        })
    }

    /// The bias before an [`OtherMerge`] (only an output-scaling IA3 merge changed it).
    fn unmerged_bias(bias: Option<&Tensor>, m: &OtherMerge) -> Result<Option<Tensor>> {
        Ok(match (bias, m) {
            (
                Some(b),
                OtherMerge::Ia3 {
                    l,
                    feedforward: false,
                },
            ) => Some((b.to_dtype(DType::F32)? / l)?),
            (b, _) => b.cloned(),
        })
    }

    /// Undoes an [`OtherMerge`] on `w` and `bias`.
    fn unmerged_other(
        &self,
        w: &Tensor,
        bias: Option<&Tensor>,
        m: &OtherMerge,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let b = Self::unmerged_bias(bias, m)?;
        Ok(match m {
            OtherMerge::Delta(d) => ((w - d)?, b),
            OtherMerge::Ia3 { l, feedforward } => {
                (w.broadcast_div(&self.ia3_weight_view(l, *feedforward)?)?, b)
            }
        })
    }

    /// `w` with adapter `ad` merged in: W + t·ΔW (LoRA), or W + t·(g ⊙ (W + ΔW) − W) (DoRA, g = m/‖W + ΔW‖),
    /// with t the multiplier. Returns the DoRA norm used.
    fn merged_weight(&self, w: &Tensor, ad: &LoraAdapter) -> Result<(Tensor, Option<Tensor>)> {
        let wf = w.to_dtype(DType::F32)?;
        let delta = self.delta_of(ad, 1.0)?;
        match &ad.magnitude {
            None => Ok(((wf + (delta * ad.multiplier)?)?, None)),
            Some(m) => {
                let n = self.weight_norm(w, &delta)?;
                let gv = self.weight_view(&m.as_tensor().div(&n)?)?;
                let full = (&wf + delta)?.broadcast_mul(&gv)?;
                Ok(((&wf + ((full - &wf)? * ad.multiplier)?)?, Some(n)))
            }
        }
    }

    /// Reshapes a per-output-feature vector to broadcast against the weight.
    fn weight_view(&self, v: &Tensor) -> Result<Tensor> {
        let n = v.dim(0)?;
        Ok(match self.kind {
            BaseKind::Linear => v.reshape((n, 1))?,
            BaseKind::Conv2d(_) => v.reshape((n, 1, 1, 1))?,
            BaseKind::Embedding => v.reshape((1, n))?,
            BaseKind::Norm => v.clone(),
        })
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
        let dora = all
            .iter()
            .any(|n| self.adapters.get(*n).is_some_and(|a| a.magnitude.is_some()));
        if dora && all.len() > 1 {
            return Err(Error::Msg(format!(
                "{}: merging a DoRA adapter together with other adapters ({}) is not supported; merge one at a time into separate copies",
                self.path,
                all.join(", ")
            )));
        }
        Ok(())
    }

    /// Merges the active adapters (or `names`) into the base weight. Already merged adapters are
    /// skipped, so merging twice is idempotent. A merge that would produce NaN/Inf is refused, as is
    /// merging while adapters are disabled.
    pub fn merge(&mut self, names: Option<&[&str]>) -> Result<()> {
        if !self.enabled {
            return Err(Error::Msg(format!(
                "{}: adapters are disabled; enable them before merging",
                self.path
            )));
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
            if let Some(o) = self.others.get(&name) {
                let (w, b, rec) =
                    self.merged_other(&self.weight.dense()?, self.bias.as_ref(), o)?;
                let sum = w.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                if !sum.is_finite() {
                    return Err(Error::Msg(format!(
                        "{}: merging adapter `{name}` gives non-finite weights; refused",
                        self.path
                    )));
                }
                let empty = Tensor::zeros(0, DType::F32, &Device::Cpu)?;
                let prev_nf4 = self.nf4_snapshot();
                self.merged.push(MergeRecord {
                    name: name.clone(),
                    a: empty.clone(),
                    b: empty,
                    scale: 0.0,
                    multiplier: 1.0,
                    dora: None,
                    other: Some(rec),
                    prev_nf4,
                });
                self.set_weight(w)?;
                self.bias = b;
                continue;
            }
            let ad = self.get(&name)?;
            let (w, norm) = self.merged_weight(&self.weight.dense()?, ad)?;
            let sum = w.sum_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()?;
            if !sum.is_finite() {
                return Err(Error::Msg(format!(
                    "{}: merging adapter `{name}` gives non-finite weights; refused",
                    self.path
                )));
            }
            let record = MergeRecord {
                name: name.clone(),
                a: ad.a.as_tensor().copy()?,
                b: ad.b.as_tensor().copy()?,
                scale: ad.scale,
                multiplier: ad.multiplier,
                dora: match (&ad.magnitude, norm) {
                    (Some(m), Some(n)) => Some((m.as_tensor().copy()?, n)),
                    _ => None,
                },
                other: None,
                prev_nf4: self.nf4_snapshot(),
            };
            self.set_weight(w)?;
            self.merged.push(record);
        }
        Ok(())
    }

    /// Unmerges every merged adapter, newest first, restoring the base weight from what was merged
    /// (later changes to the adapter do not matter).
    pub fn unmerge(&mut self) -> Result<()> {
        while let Some(rec) = self.merged.pop() {
            if let Some((q, sq, rounding)) = rec.prev_nf4 {
                if let Some(m) = &rec.other {
                    self.bias = Self::unmerged_bias(self.bias.as_ref(), m)?;
                }
                self.weight = BaseWeight::Nf4(q);
                self.weight_sq = sq;
                self.rounding = rounding;
                continue;
            }
            if let Some(m) = &rec.other {
                let w = self.weight.dense()?.to_dtype(DType::F32)?;
                let (w, b) = self.unmerged_other(&w, self.bias.as_ref(), m)?;
                self.set_weight(w)?;
                self.bias = b;
                continue;
            }
            let delta = self.delta_from(&rec.a, &rec.b, rec.scale)?;
            let w = self.weight.dense()?.to_dtype(DType::F32)?;
            let t = rec.multiplier;
            let restored = match &rec.dora {
                None => (w - (delta * t)?)?,
                Some((m, n)) => {
                    // W' = W (1 − t + t g) + t g ΔW
                    let g = self.weight_view(&m.div(n)?)?;
                    let denom = ((&g * t)? + (1.0 - t))?;
                    (w - delta.broadcast_mul(&(&g * t)?)?)?.broadcast_div(&denom)?
                }
            };
            self.set_weight(restored)?;
        }
        Ok(())
    }

    /// The weight and bias with every active adapter merged, without changing the layer
    /// (a `modules_to_save` layer returns its trained copy).
    pub fn merged_tensors(&self) -> Result<(Tensor, Option<Tensor>)> {
        if let Some(s) = &self.saved {
            return Ok((
                s.weight.as_tensor().clone(),
                s.bias.as_ref().map(|b| b.as_tensor().clone()),
            ));
        }
        let mut w = self.weight.dense()?;
        let mut bias = self.bias.clone();
        if self.enabled {
            let pending: Vec<String> = self
                .active
                .iter()
                .filter(|n| !self.merged.iter().any(|m| &m.name == *n))
                .cloned()
                .collect();
            self.check_merge_mix(&pending)?;
            for name in &pending {
                if let Some(o) = self.others.get(name) {
                    let (w2, b2, _) = self.merged_other(&w, bias.as_ref(), o)?;
                    w = w2.to_dtype(self.weight.dtype())?;
                    bias = b2;
                    continue;
                }
                w = self
                    .merged_weight(&w, self.get(name)?)?
                    .0
                    .to_dtype(self.weight.dtype())?;
            }
        }
        Ok((w, bias))
    }

    /// Trainable tensors with PEFT's in-memory names
    /// (`base_model.model.<path>.lora_A.<adapter>.weight`, ...).
    pub fn named_vars(&self) -> Vec<(String, Var)> {
        let p = &self.path;
        let mut out = vec![];
        for (name, o) in &self.others {
            for (param, v) in o.params() {
                out.push((format!("base_model.model.{p}.{param}.{name}"), v.clone()));
            }
        }
        for (name, ad) in &self.adapters {
            let (ka, kb) = match self.kind {
                BaseKind::Embedding => (
                    format!("{p}.lora_embedding_A.{name}"),
                    format!("{p}.lora_embedding_B.{name}"),
                ),
                _ => (
                    format!("{p}.lora_A.{name}.weight"),
                    format!("{p}.lora_B.{name}.weight"),
                ),
            };
            out.push((format!("base_model.model.{ka}"), ad.a.clone()));
            out.push((format!("base_model.model.{kb}"), ad.b.clone()));
            if let Some(m) = &ad.magnitude {
                out.push((
                    format!("base_model.model.{p}.lora_magnitude_vector.{name}.weight"),
                    m.clone(),
                ));
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

/// Embedding lookup of ids (any integer dtype or integral floats) into `w` (num, dim).
pub fn embed(w: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let ids_u = match ids.dtype() {
        DType::U32 | DType::I64 | DType::U8 => ids.clone(),
        _ => ids.to_dtype(DType::U32)?,
    };
    let shape = ids_u.dims().to_vec();
    let flat = ids_u.flatten_all()?;
    let n = w.dim(0)?;
    if flat.elem_count() > 0 {
        let f = flat.to_dtype(DType::F64)?;
        let (lo, hi) = (f.min(0)?.to_scalar::<f64>()?, f.max(0)?.to_scalar::<f64>()?);
        if lo < 0.0 || hi as usize >= n {
            return Err(Error::Msg(format!(
                "embedding ids span {lo}..={hi}, outside the table's {n} rows"
            )));
        }
    }
    let rows = w.index_select(&flat, 0)?;
    let mut out = shape;
    out.push(w.dim(1)?);
    Ok(rows.reshape(out)?)
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
            return Err(Error::Msg(format!(
                "{path}: grouped convolutions cannot take LoRA adapters"
            )));
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
