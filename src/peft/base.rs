//! The frozen base of an adapted layer: its kind, its weight (dense or NF4 4-bit), its bias and
//! the cached ‖W‖² per output feature that DoRA's norms use. Adapters read the base; only merging
//! and the inits that rewrite the weight (PiSSA, OLoRA, LoftQ) change it.

use super::config::ModuleKind;
use super::quant::QuantSpec;
use crate::nn::conv::ConvCfg;
use crate::nn::nf4::{Absmax, Nf4Tensor, RoundingError};
use crate::nn::{conv, frozen};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, Var};
use std::sync::Arc;

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

/// An NF4 base as it was before a change, for an exact undo (no second re-quantization).
pub(crate) type Nf4Snapshot = (Arc<Nf4Tensor>, Tensor, Option<RoundingError>);

/// The frozen part of an adapted layer.
pub struct Base {
    pub(crate) path: String,
    pub(crate) kind: BaseKind,
    pub(crate) weight: BaseWeight,
    /// Rounding error of the last re-quantization of an NF4 base (a merge, a PiSSA residual).
    pub(crate) rounding: Option<RoundingError>,
    /// ‖W‖² per output feature, for DoRA norms without a weight-sized temporary.
    pub(crate) weight_sq: Tensor,
    pub(crate) bias: Option<Tensor>,
}

/// A trainable variable (f32, contiguous) holding `t`, on `t`'s device.
pub(crate) fn var(t: Tensor) -> Result<Var> {
    Ok(Var::from_tensor(&t.to_dtype(DType::F32)?.contiguous()?)?)
}

impl Base {
    /// A trainable variable (f32, contiguous) holding `t`, on this layer's device: adapters are
    /// drawn on the CPU (their seeds give the same values everywhere) and live beside the base.
    pub(crate) fn var(&self, t: Tensor) -> Result<Var> {
        var(t.to_device(&self.weight.device())?)
    }

    /// A base layer at module path `path`; shapes of weight and bias are checked against `kind`.
    pub fn new(path: &str, kind: BaseKind, weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let rank = weight.rank();
        let ok = match kind {
            BaseKind::Linear | BaseKind::Embedding => rank == 2,
            BaseKind::Conv2d(_) => rank == 4,
            BaseKind::Norm => rank == 1,
        };
        if !ok {
            return Err(Error::layer(
                path,
                format!(
                    "weight shape {:?} does not fit a {kind:?} layer",
                    weight.dims()
                ),
            ));
        }
        if let Some(b) = &bias {
            if b.dims() != [weight.dim(0)?] {
                return Err(Error::layer(
                    path,
                    format!(
                        "bias shape {:?} does not fit weight {:?}",
                        b.dims(),
                        weight.dims()
                    ),
                ));
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
        })
    }

    /// A linear base over an NF4 weight (out, in), as read from a 4-bit checkpoint.
    pub fn new_nf4(path: &str, weight: Nf4Tensor, bias: Option<Tensor>) -> Result<Self> {
        if weight.shape.len() != 2 {
            return Err(Error::layer(
                path,
                format!("4-bit weight shape {:?} is not (out, in)", weight.shape),
            ));
        }
        if let Some(b) = &bias {
            if b.dims() != [weight.shape[0]] {
                return Err(Error::layer(
                    path,
                    format!(
                        "bias shape {:?} does not fit 4-bit weight {:?}",
                        b.dims(),
                        weight.shape
                    ),
                ));
            }
        }
        Ok(Self {
            path: path.to_string(),
            kind: BaseKind::Linear,
            weight_sq: Self::feature_sq(BaseKind::Linear, &weight.dequantize()?)?,
            weight: BaseWeight::Nf4(Arc::new(weight)),
            rounding: None,
            bias,
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

    /// An error about this layer.
    pub fn err(&self, msg: impl Into<String>) -> Error {
        Error::layer(&self.path, msg)
    }

    /// The module path.
    pub fn path(&self) -> &str {
        &self.path
    }
    /// The kind.
    pub fn kind(&self) -> BaseKind {
        self.kind
    }
    /// The weight as stored.
    pub fn weight(&self) -> &BaseWeight {
        &self.weight
    }
    /// The weight's shape.
    pub fn dims(&self) -> &[usize] {
        self.weight.dims()
    }
    /// The bias.
    pub fn bias(&self) -> Option<&Tensor> {
        self.bias.as_ref()
    }
    /// ‖W‖² per output feature (f32).
    pub fn weight_sq(&self) -> &Tensor {
        &self.weight_sq
    }

    /// (out, in) of a 2-D weight.
    pub fn dims2(&self) -> Result<(usize, usize)> {
        match *self.weight.dims() {
            [a, b] => Ok((a, b)),
            ref d => Err(self.err(format!("weight {d:?} is not 2-D"))),
        }
    }

    /// Quantizes the weight to NF4 (QLoRA): linear layers only, as bitsandbytes does. Returns the
    /// rounding error; an already quantized base is left as it is.
    pub fn quantize_nf4(&mut self, spec: QuantSpec) -> Result<RoundingError> {
        if self.kind != BaseKind::Linear {
            return Err(self.err(format!(
                "only linear layers are quantized to NF4, not {:?}",
                self.kind
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

    /// Replaces the weight by `w` (f32). An NF4 base is re-quantized with its own settings and the
    /// rounding error recorded.
    pub(crate) fn set_weight(&mut self, w: Tensor) -> Result<()> {
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

    /// The NF4 base as it is now, for an exact undo.
    pub(crate) fn nf4_snapshot(&self) -> Option<Nf4Snapshot> {
        match &self.weight {
            BaseWeight::Nf4(q) => Some((q.clone(), self.weight_sq.clone(), self.rounding)),
            BaseWeight::Dense(_) => None,
        }
    }

    /// Restores an NF4 snapshot.
    pub(crate) fn restore_nf4(&mut self, snap: Nf4Snapshot) {
        let (q, sq, rounding) = snap;
        self.weight = BaseWeight::Nf4(q);
        self.weight_sq = sq;
        self.rounding = rounding;
    }

    /// The error for adapters on a norm weight.
    pub(crate) fn norm_err(&self) -> Error {
        self.err("a norm weight is applied by its model and takes no adapters")
    }

    /// The frozen path without bias: `W x` (linear), `conv(x, W)`, or the embedding lookup.
    pub fn forward_nobias(&self, x: &Tensor) -> Result<Tensor> {
        let w = match &self.weight {
            BaseWeight::Nf4(q) => return Ok(frozen::nf4_linear(x, q)?),
            BaseWeight::Dense(w) => w,
        };
        Ok(match self.kind {
            BaseKind::Linear => frozen::frozen_linear(x, w)?,
            BaseKind::Conv2d(c) => conv::frozen_conv2d(x, w, c)?,
            BaseKind::Embedding => embed(w, x).map_err(|e| self.err(e.to_string()))?,
            BaseKind::Norm => return Err(self.norm_err()),
        })
    }

    /// `y + b` along this layer's feature dimension.
    pub fn add_bias(&self, y: Tensor, bias: Option<&Tensor>) -> Result<Tensor> {
        let Some(b) = bias else { return Ok(y) };
        let dim = match self.kind {
            BaseKind::Conv2d(_) => 1,
            _ => y.rank() - 1,
        };
        Ok(conv::add_channel_bias(&y, b, dim)?)
    }

    /// The activations of a weight-shaped `w` on `x` with this layer's geometry (a linear map, or
    /// a convolution with the base's stride and padding); gradients flow into `w` and `x`.
    pub fn apply_weight(&self, x: &Tensor, w: &Tensor) -> Result<Tensor> {
        Ok(match self.kind {
            BaseKind::Linear => frozen::plain_linear(x, w)?,
            BaseKind::Conv2d(c) => conv::conv2d(x, w, c, true)?,
            BaseKind::Embedding => embed(w, x).map_err(|e| self.err(e.to_string()))?,
            BaseKind::Norm => return Err(self.norm_err()),
        })
    }

    /// A per-output-feature vector shaped to broadcast against an output of rank `out_rank`.
    pub fn feature_view(&self, v: &Tensor, out_rank: usize) -> Result<Tensor> {
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

    /// A per-input-feature vector shaped to broadcast against the input `x`.
    pub fn input_view(&self, v: &Tensor, x: &Tensor) -> Result<Tensor> {
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

    /// A per-output-feature vector shaped to broadcast against the weight.
    pub fn weight_view(&self, v: &Tensor) -> Result<Tensor> {
        let n = v.dim(0)?;
        Ok(match self.kind {
            BaseKind::Linear => v.reshape((n, 1))?,
            BaseKind::Conv2d(_) => v.reshape((n, 1, 1, 1))?,
            BaseKind::Embedding => v.reshape((1, n))?,
            BaseKind::Norm => v.clone(),
        })
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
        // On the host in i64 (every id fits; Metal has no f64 and ids are few).
        let v = flat.to_dtype(DType::I64)?.to_vec1::<i64>()?;
        let (lo, hi) = (
            v.iter().copied().min().unwrap_or(0),
            v.iter().copied().max().unwrap_or(0),
        );
        if lo < 0 || hi as u64 >= n as u64 {
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
