//! Softmax over the last dimension (plain, and attention's scaled + masked form) as one node with a
//! CPU backward, next to the differentiable composition.

use super::kernels::{exp_shifted_in_place, exp_shifted_into, f32_slice, row_max, rows_per_task};
use crate::Result;
use candle_core::{DType, Tensor, D};

/// Softmax over the last dimension: one fused node with a CPU forward and backward
/// (dx = y ⊙ (g − Σ g⊙y)) for f32, the differentiable composition ([`softmax_composite`]) elsewhere.
pub fn softmax_last(x: &Tensor) -> Result<Tensor> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 {
        return softmax_composite(x);
    }
    Ok(x.contiguous()?.apply_op1(SoftmaxOp)?)
}

/// Attention probabilities `softmax(scale · x + mask)` over the last dimension, for scores x
/// (B, H, Tq, Tk) and an additive mask (B or 1, 1, Tq, Tk) that carries no gradient: one node on
/// the CPU in f32 (dx = scale · y ⊙ (g − Σ g⊙y)), so neither the scaled scores nor the masked
/// ones are kept; elsewhere the composition.
pub fn scaled_masked_softmax(x: &Tensor, scale: f64, mask: Option<&Tensor>) -> Result<Tensor> {
    let (b, _, tq, tk) = x.dims4()?;
    if let Some(m) = mask {
        let (mb, mh, mq, mk) = m.dims4()?;
        if !(mb == b || mb == 1) || mh != 1 || mq != tq || mk != tk {
            return Err(crate::Error::Msg(format!(
                "attention mask {:?} does not fit scores {:?}",
                m.dims(),
                x.dims()
            )));
        }
    }
    if !x.device().is_cpu() || x.dtype() != DType::F32 {
        let s = (x * scale)?;
        let s = match mask {
            // f16 tops out at 65504: a large finite mask (−1e30) would turn into −∞ and a row whose
            // keys are all masked into NaN; such a row attends evenly instead, as in transformers.
            Some(m) if x.dtype() == DType::F16 => {
                s.broadcast_add(&m.clamp(-3.0e4f32, 3.0e4f32)?.to_dtype(DType::F16)?)?
            }
            Some(m) => s.broadcast_add(&m.to_dtype(x.dtype())?)?,
            None => s,
        };
        return softmax_composite(&s);
    }
    let mask = match mask {
        Some(m) => Some((
            std::sync::Arc::new(m.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?),
            m.dim(0)?,
        )),
        None => None,
    };
    Ok(x.contiguous()?.apply_op1(MaskedSoftmaxOp {
        scale: scale as f32,
        mask,
    })?)
}

struct MaskedSoftmaxOp {
    scale: f32,
    /// The mask values and its batch size (1: shared by every batch row).
    mask: Option<(std::sync::Arc<Vec<f32>>, usize)>,
}

impl candle_core::CustomOp1 for MaskedSoftmaxOp {
    fn name(&self) -> &'static str {
        "scaled-masked-softmax"
    }
    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let x = f32_slice(s, l, "softmax")?;
        let dims = l.shape().dims();
        let (h, tq, tk) = (dims[1], dims[2], dims[3].max(1));
        let mut out = vec![0f32; x.len()];
        let scale = self.scale;
        out.par_chunks_mut(tk)
            .zip(x.par_chunks(tk))
            .enumerate()
            .for_each(|(row, (o, xr))| {
                let (bi, qi) = (row / (h * tq), row % tq);
                let m = self.mask.as_ref().map(|(m, mb)| {
                    let r = (if *mb == 1 { 0 } else { bi }) * tq + qi;
                    &m[r * tk..(r + 1) * tk]
                });
                match m {
                    Some(m) => {
                        for ((o, x), m) in o.iter_mut().zip(xr).zip(m) {
                            *o = *x * scale + *m;
                        }
                    }
                    None => {
                        for (o, x) in o.iter_mut().zip(xr) {
                            *o = *x * scale;
                        }
                    }
                }
                let mx = row_max(o);
                let inv = 1.0 / exp_shifted_in_place(o, mx);
                o.iter_mut().for_each(|v| *v *= inv);
            });
        Ok((candle_core::CpuStorage::F32(out), l.shape().clone()))
    }
    fn bwd(
        &self,
        _arg: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op2_no_bwd(
            &res.contiguous()?,
            &SoftmaxBwd { scale: self.scale },
        )?))
    }
}

/// Softmax over the last dimension (max-subtracted) as a composition of differentiable ops.
pub fn softmax_composite(x: &Tensor) -> Result<Tensor> {
    let m = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&m)?.exp()?;
    Ok(e.broadcast_div(&e.sum_keepdim(D::Minus1)?)?)
}

struct SoftmaxOp;

impl candle_core::CustomOp1 for SoftmaxOp {
    fn name(&self) -> &'static str {
        "softmax-last"
    }
    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let x = f32_slice(s, l, "softmax")?;
        let d = l.shape().dims().last().copied().unwrap_or(1).max(1);
        let mut out = vec![0f32; x.len()];
        let chunk = rows_per_task(x.len() / d, d) * d;
        out.par_chunks_mut(chunk)
            .zip(x.par_chunks(chunk))
            .for_each(|(o, xs)| {
                for (orow, xrow) in o.chunks_mut(d).zip(xs.chunks(d)) {
                    let m = row_max(xrow);
                    let sum = exp_shifted_into(xrow, m, orow);
                    let inv = 1.0 / sum;
                    orow.iter_mut().for_each(|v| *v *= inv);
                }
            });
        Ok((candle_core::CpuStorage::F32(out), l.shape().clone()))
    }
    fn bwd(
        &self,
        _arg: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op2_no_bwd(
            &res.contiguous()?,
            &SoftmaxBwd { scale: 1.0 },
        )?))
    }
}

struct SoftmaxBwd {
    /// dx = scale · y ⊙ (g − Σ g⊙y) (the softmax of scaled scores).
    scale: f32,
}

impl candle_core::CustomOp2 for SoftmaxBwd {
    fn name(&self) -> &'static str {
        "softmax-last-bwd"
    }
    fn cpu_fwd(
        &self,
        sg: &candle_core::CpuStorage,
        lg: &candle_core::Layout,
        sy: &candle_core::CpuStorage,
        ly: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let (g, y) = (f32_slice(sg, lg, "softmax")?, f32_slice(sy, ly, "softmax")?);
        let d = ly.shape().dims().last().copied().unwrap_or(1).max(1);
        let mut out = vec![0f32; y.len()];
        let chunk = rows_per_task(y.len() / d, d) * d;
        out.par_chunks_mut(chunk)
            .zip(g.par_chunks(chunk).zip(y.par_chunks(chunk)))
            .for_each(|(o, (gs, ys))| {
                for ((orow, grow), yrow) in o
                    .chunks_exact_mut(d)
                    .zip(gs.chunks_exact(d))
                    .zip(ys.chunks_exact(d))
                {
                    let dot: f32 = grow.iter().zip(yrow).map(|(a, b)| a * b).sum();
                    for ((o, g), y) in orow.iter_mut().zip(grow).zip(yrow) {
                        *o = self.scale * *y * (*g - dot);
                    }
                }
            });
        Ok((candle_core::CpuStorage::F32(out), ly.shape().clone()))
    }
}
