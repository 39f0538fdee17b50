//! LayerNorm over the last dimension: one node with a CPU forward and backward for f32, the
//! differentiable composition it falls back to elsewhere, and the value and input-gradient kernels
//! the block-level nodes run inside their own backward.

use super::kernels::{f32_slice, rows_per_task};
use super::norm::{stats, RowNorm, RowNormBwd};
use crate::Result;
use candle_core::{DType, Tensor, D};

/// LayerNorm over the last dimension: one fused node with a CPU forward and backward for
/// contiguous f32 inputs, the differentiable composition ([`layer_norm_composite`]) elsewhere.
pub fn layer_norm(x: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    if !x.device().is_cpu()
        || x.dtype() != DType::F32
        || weight.dtype() != DType::F32
        || weight.elem_count() != d
        || bias.elem_count() != d
    {
        return layer_norm_composite(x, weight, bias, eps);
    }
    Ok(x.contiguous()?.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        LayerNormOp { eps },
    )?)
}

/// LayerNorm over the last dimension as a composition of differentiable ops (the reference).
pub fn layer_norm_composite(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let mean = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let xn = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    Ok(xn.broadcast_mul(weight)?.broadcast_add(bias)?)
}

struct LayerNormOp {
    eps: f64,
}

impl candle_core::CustomOp3 for LayerNormOp {
    fn name(&self) -> &'static str {
        "layer-norm"
    }
    fn cpu_fwd(
        &self,
        sx: &candle_core::CpuStorage,
        lx: &candle_core::Layout,
        sw: &candle_core::CpuStorage,
        lw: &candle_core::Layout,
        sb: &candle_core::CpuStorage,
        lb: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let (x, w, b) = (
            f32_slice(sx, lx, "layer_norm")?,
            f32_slice(sw, lw, "layer_norm")?,
            f32_slice(sb, lb, "layer_norm")?,
        );
        let d = w.len();
        let mut out = vec![0f32; x.len()];
        let chunk = rows_per_task(x.len() / d.max(1), d) * d;
        out.par_chunks_mut(chunk)
            .zip(x.par_chunks(chunk))
            .for_each(|(o, xs)| {
                for (orow, xrow) in o.chunks_exact_mut(d).zip(xs.chunks_exact(d)) {
                    let (mean, inv) = stats(xrow, self.eps);
                    let (mean, inv) = (mean as f32, inv as f32);
                    for (((o, x), w), b) in orow.iter_mut().zip(xrow).zip(w).zip(b) {
                        *o = (*x - mean) * inv * *w + *b;
                    }
                }
            });
        Ok((candle_core::CpuStorage::F32(out), lx.shape().clone()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let d = w.elem_count();
        let packed = grad.contiguous()?.apply_op3_no_bwd(
            x,
            w,
            &RowNormBwd {
                kind: RowNorm::Layer,
                eps: self.eps,
            },
        )?;
        let n = x.elem_count();
        let gx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        let gw = packed.narrow(0, n, d)?.reshape(w.shape())?;
        let gb = packed.narrow(0, n + d, d)?.reshape(w.shape())?;
        Ok((Some(gx), Some(gw), Some(gb)))
    }
}

/// LayerNorm's values over the last dimension of a contiguous CPU f32 `x`, recording no graph
/// (for nodes with their own backward).
pub(super) fn layer_norm_values(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> candle_core::Result<Tensor> {
    x.apply_op3_no_bwd(weight, bias, &LayerNormOp { eps })
}
