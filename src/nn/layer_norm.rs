//! LayerNorm over the last dimension: one node with a CPU forward and backward for f32, the
//! differentiable composition it falls back to elsewhere, and the value and input-gradient kernels
//! the block-level nodes run inside their own backward.

use super::kernels::{f32_slice, rows_per_task};
use super::norm::stats;
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
        let packed = grad
            .contiguous()?
            .apply_op3_no_bwd(x, w, &LayerNormBwd { eps: self.eps })?;
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

/// `dst += ∂LayerNorm(x)/∂x · g` in place, for a frozen γ (`weight`, its values): the input
/// gradient of a LayerNorm summed into a buffer that already holds the residual's. `dst` must be a
/// fresh tensor owned by the caller; CPU f32, contiguous, the shape of `x` and `g`.
pub(super) fn layer_norm_grad_acc(
    dst: &Tensor,
    g: &Tensor,
    x: &Tensor,
    weight: &[f32],
    eps: f64,
) -> candle_core::Result<()> {
    dst.inplace_op3(
        g,
        x,
        &LayerNormGradAcc {
            w: weight.to_vec(),
            eps,
        },
    )
}

struct LayerNormGradAcc {
    w: Vec<f32>,
    eps: f64,
}

impl candle_core::InplaceOp3 for LayerNormGradAcc {
    fn name(&self) -> &'static str {
        "layer-norm-grad-acc"
    }
    fn cpu_fwd(
        &self,
        sd: &mut candle_core::CpuStorage,
        ld: &candle_core::Layout,
        sg: &candle_core::CpuStorage,
        lg: &candle_core::Layout,
        sx: &candle_core::CpuStorage,
        lx: &candle_core::Layout,
    ) -> candle_core::Result<()> {
        use rayon::prelude::*;
        let (g, x) = (
            f32_slice(sg, lg, "layer_norm grad")?,
            f32_slice(sx, lx, "layer_norm grad")?,
        );
        let (candle_core::CpuStorage::F32(dv), Some((d0, d1))) = (sd, ld.contiguous_offsets())
        else {
            candle_core::bail!("layer_norm grad: contiguous f32 destination only")
        };
        let dst = &mut dv[d0..d1];
        let (w, d) = (&self.w, self.w.len());
        if dst.len() != x.len() || g.len() != x.len() || d == 0 || x.len() % d != 0 {
            candle_core::bail!(
                "layer_norm grad: {} gradient and {} input values into {} over width {d}",
                g.len(),
                x.len(),
                dst.len()
            );
        }
        let chunk = rows_per_task(x.len() / d, d) * d;
        dst.par_chunks_mut(chunk)
            .zip(x.par_chunks(chunk))
            .zip(g.par_chunks(chunk))
            .for_each(|((dx, xs), gs)| {
                for ((dxr, xr), gr) in dx.chunks_mut(d).zip(xs.chunks(d)).zip(gs.chunks(d)) {
                    let (mean, inv) = stats(xr, self.eps);
                    let (mut s1, mut s2) = (0f64, 0f64);
                    for k in 0..d {
                        let xh = (xr[k] as f64 - mean) * inv;
                        let dxh = gr[k] as f64 * w[k] as f64;
                        s1 += dxh;
                        s2 += dxh * xh;
                    }
                    let n = d as f64;
                    for k in 0..d {
                        let xh = (xr[k] as f64 - mean) * inv;
                        let dxh = gr[k] as f64 * w[k] as f64;
                        dxr[k] += (inv / n * (n * dxh - s1 - xh * s2)) as f32;
                    }
                }
            });
        Ok(())
    }
}

struct LayerNormBwd {
    eps: f64,
}

impl candle_core::CustomOp3 for LayerNormBwd {
    fn name(&self) -> &'static str {
        "layer-norm-bwd"
    }
    fn cpu_fwd(
        &self,
        sg: &candle_core::CpuStorage,
        lg: &candle_core::Layout,
        sx: &candle_core::CpuStorage,
        lx: &candle_core::Layout,
        sw: &candle_core::CpuStorage,
        lw: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let (g, x, w) = (
            f32_slice(sg, lg, "layer_norm")?,
            f32_slice(sx, lx, "layer_norm")?,
            f32_slice(sw, lw, "layer_norm")?,
        );
        let d = w.len();
        let mut gx = vec![0f32; x.len()];
        let chunk = rows_per_task(x.len() / d.max(1), d) * d;
        // Per task: dx rows, and partial sums for dγ and dβ (summed in task order afterwards).
        let partial: Vec<(Vec<f64>, Vec<f64>)> = gx
            .par_chunks_mut(chunk)
            .zip(x.par_chunks(chunk))
            .zip(g.par_chunks(chunk))
            .map(|((dx, xs), gs)| {
                let mut dgam = vec![0f64; d];
                let mut dbet = vec![0f64; d];
                let mut xh = vec![0f64; d];
                for ((dxr, xr), gr) in dx.chunks_mut(d).zip(xs.chunks(d)).zip(gs.chunks(d)) {
                    let (mean, inv) = stats(xr, self.eps);
                    let (mut s1, mut s2) = (0f64, 0f64);
                    for k in 0..d {
                        xh[k] = (xr[k] as f64 - mean) * inv;
                        let dxh = gr[k] as f64 * w[k] as f64;
                        s1 += dxh;
                        s2 += dxh * xh[k];
                        dgam[k] += gr[k] as f64 * xh[k];
                        dbet[k] += gr[k] as f64;
                    }
                    let n = d as f64;
                    for k in 0..d {
                        let dxh = gr[k] as f64 * w[k] as f64;
                        dxr[k] = (inv / n * (n * dxh - s1 - xh[k] * s2)) as f32;
                    }
                }
                (dgam, dbet)
            })
            .collect();
        let mut dw = vec![0f64; d];
        let mut db = vec![0f64; d];
        for (dg, dbp) in &partial {
            for k in 0..d {
                dw[k] += dg[k];
                db[k] += dbp[k];
            }
        }
        let mut out = gx;
        out.extend(dw.iter().map(|v| *v as f32));
        out.extend(db.iter().map(|v| *v as f32));
        let len = out.len();
        Ok((
            candle_core::CpuStorage::F32(out),
            candle_core::Shape::from(len),
        ))
    }
}
