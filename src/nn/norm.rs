//! Normalisations: GroupNorm (plain, fused, fused with SiLU), LayerNorm and RMSNorm, each as one
//! node with a CPU forward and backward for f32, next to the differentiable composition it falls
//! back to elsewhere (and that the tests compare it with).

use super::act::sigmoid;
use super::kernels::{f32_slice, rows_per_task};
use crate::Result;
use candle_core::{DType, Tensor, D};

/// GroupNorm over (B, C, ...) with `groups` groups, biased variance, affine (C) weight and bias.
pub fn group_norm(
    x: &Tensor,
    groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let (b, c) = (dims[0], dims[1]);
    let xf = x.to_dtype(DType::F32)?.reshape((b, groups, ()))?;
    let mean = xf.mean_keepdim(2)?;
    let xc = xf.broadcast_sub(&mean)?;
    let var = xc.sqr()?.mean_keepdim(2)?;
    let xn = xc
        .broadcast_div(&(var + eps)?.sqrt()?)?
        .reshape(dims.as_slice())?;
    let mut shape = vec![1; dims.len()];
    shape[1] = c;
    Ok(xn
        .broadcast_mul(&weight.reshape(shape.as_slice())?)?
        .broadcast_add(&bias.reshape(shape.as_slice())?)?
        .to_dtype(x.dtype())?)
}

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

/// GroupNorm as one node with a CPU kernel for the forward and the backward (the composition in
/// [`group_norm`] makes about a dozen passes over the activations in each direction). Falls back to
/// the composition off the CPU or for non-f32 inputs. Reductions run in a fixed order per group.
pub fn group_norm_fused(
    x: &Tensor,
    groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 || x.rank() < 2 || x.dim(1)? % groups != 0 {
        return group_norm(x, groups, weight, bias, eps);
    }
    let x = x.contiguous()?;
    Ok(x.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        GroupNormOp {
            groups,
            eps,
            silu: false,
        },
    )?)
}

/// `silu(group_norm(x))` as one node (the pre-activation of every resnet conv): one pass over the
/// activations in each direction instead of the norm's and the activation's separate passes.
pub fn group_norm_silu(
    x: &Tensor,
    groups: usize,
    weight: &Tensor,
    bias: &Tensor,
    eps: f64,
) -> Result<Tensor> {
    if !x.device().is_cpu() || x.dtype() != DType::F32 || x.rank() < 2 || x.dim(1)? % groups != 0 {
        return Ok(group_norm(x, groups, weight, bias, eps)?.silu()?);
    }
    let x = x.contiguous()?;
    Ok(x.apply_op3(
        &weight.contiguous()?,
        &bias.contiguous()?,
        GroupNormOp {
            groups,
            eps,
            silu: true,
        },
    )?)
}

struct GroupNormOp {
    groups: usize,
    eps: f64,
    /// Apply SiLU to the output.
    silu: bool,
}

/// (mean, 1/std) of one group's values, in f64.
fn stats(v: &[f32], eps: f64) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = v.iter().map(|x| *x as f64).sum::<f64>() / n;
    let var = v.iter().map(|x| (*x as f64 - mean).powi(2)).sum::<f64>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

impl candle_core::CustomOp3 for GroupNormOp {
    fn name(&self) -> &'static str {
        "group-norm"
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
            f32_slice(sx, lx, "group_norm")?,
            f32_slice(sw, lw, "group_norm")?,
            f32_slice(sb, lb, "group_norm")?,
        );
        let dims = lx.shape().dims();
        let (c, hw) = (dims[1], dims[2..].iter().product::<usize>());
        let cpg = c / self.groups;
        let glen = cpg * hw;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(glen)
            .zip(x.par_chunks(glen))
            .enumerate()
            .for_each(|(gi, (o, xs))| {
                let (mean, inv) = stats(xs, self.eps);
                let c0 = (gi % self.groups) * cpg;
                for (k, (oo, xx)) in o.iter_mut().zip(xs).enumerate() {
                    let ch = c0 + k / hw;
                    let y = ((*xx as f64 - mean) * inv) as f32 * w[ch] + b[ch];
                    *oo = if self.silu { y * sigmoid(y) } else { y };
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
        let c = x.dim(1)?;
        let packed = grad.contiguous()?.apply_op3_no_bwd(
            x,
            w,
            &GroupNormBwd {
                groups: self.groups,
                eps: self.eps,
                silu: self.silu,
                bias: if self.silu {
                    Some(_b.contiguous()?)
                } else {
                    None
                },
            },
        )?;
        let n = x.elem_count();
        let gx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        let gw = packed.narrow(0, n, c)?;
        let gb = packed.narrow(0, n + c, c)?;
        Ok((Some(gx), Some(gw), Some(gb)))
    }
}

struct GroupNormBwd {
    groups: usize,
    eps: f64,
    silu: bool,
    /// The affine bias (needed to recompute the pre-activation when `silu`).
    bias: Option<Tensor>,
}

impl candle_core::CustomOp3 for GroupNormBwd {
    fn name(&self) -> &'static str {
        "group-norm-bwd"
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
            f32_slice(sg, lg, "group_norm")?,
            f32_slice(sx, lx, "group_norm")?,
            f32_slice(sw, lw, "group_norm")?,
        );
        let dims = lx.shape().dims();
        let (c, hw) = (dims[1], dims[2..].iter().product::<usize>());
        let cpg = c / self.groups;
        let glen = cpg * hw;
        let bias_t = match &self.bias {
            Some(b) => Some(b.flatten_all()?.to_vec1::<f32>()?),
            None => None,
        };
        // With SiLU after the norm, the gradient reaching the norm's output is g·silu'(y), where
        // y = x̂·γ + β is recomputed here: silu'(y) = σ(y)·(1 + y·(1 − σ(y))).
        let geff: Option<Vec<f32>> = if self.silu {
            let bv = bias_t.as_deref().unwrap_or(&[]);
            let mut ge = vec![0f32; x.len()];
            ge.par_chunks_mut(glen)
                .zip(x.par_chunks(glen))
                .zip(g.par_chunks(glen))
                .enumerate()
                .for_each(|(gi, ((o, xs), gs))| {
                    let (mean, inv) = stats(xs, self.eps);
                    let c0 = (gi % self.groups) * cpg;
                    for k in 0..glen {
                        let ch = c0 + k / hw;
                        let y = ((xs[k] as f64 - mean) * inv) as f32 * w[ch] + bv[ch];
                        let sg = sigmoid(y);
                        o[k] = gs[k] * sg * (1.0 + y * (1.0 - sg));
                    }
                });
            Some(ge)
        } else {
            None
        };
        let g: &[f32] = geff.as_deref().unwrap_or(g);
        let mut gx = vec![0f32; x.len()];
        // Per group: dx, and the per-channel partial sums for dγ and dβ.
        let partial: Vec<(Vec<f64>, Vec<f64>)> = gx
            .par_chunks_mut(glen)
            .zip(x.par_chunks(glen))
            .zip(g.par_chunks(glen))
            .enumerate()
            .map(|(gi, ((dx, xs), gs))| {
                let (mean, inv) = stats(xs, self.eps);
                let c0 = (gi % self.groups) * cpg;
                let n = glen as f64;
                let (mut s1, mut s2) = (0f64, 0f64);
                let mut dgam = vec![0f64; cpg];
                let mut dbet = vec![0f64; cpg];
                for k in 0..glen {
                    let ch = k / hw;
                    let xh = (xs[k] as f64 - mean) * inv;
                    let dxh = gs[k] as f64 * w[c0 + ch] as f64;
                    s1 += dxh;
                    s2 += dxh * xh;
                    dgam[ch] += gs[k] as f64 * xh;
                    dbet[ch] += gs[k] as f64;
                }
                for k in 0..glen {
                    let ch = k / hw;
                    let xh = (xs[k] as f64 - mean) * inv;
                    let dxh = gs[k] as f64 * w[c0 + ch] as f64;
                    dx[k] = (inv / n * (n * dxh - s1 - xh * s2)) as f32;
                }
                (dgam, dbet)
            })
            .collect();
        let mut dw = vec![0f64; c];
        let mut db = vec![0f64; c];
        for (gi, (dg, dbp)) in partial.iter().enumerate() {
            let c0 = (gi % self.groups) * cpg;
            for k in 0..cpg {
                dw[c0 + k] += dg[k];
                db[c0 + k] += dbp[k];
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
                for (orow, xrow) in o.chunks_mut(d).zip(xs.chunks(d)) {
                    let (mean, inv) = stats(xrow, self.eps);
                    for k in 0..d {
                        orow[k] = ((xrow[k] as f64 - mean) * inv) as f32 * w[k] + b[k];
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

/// RMSNorm over the last dimension (`x · rsqrt(mean(x²) + eps) · w`, as Llama computes it) as one
/// node with a CPU forward and backward for f32; the differentiable composition elsewhere.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let d = x.dim(D::Minus1)?;
    if !x.device().is_cpu() || x.dtype() != DType::F32 || weight.elem_count() != d {
        return rms_norm_composite(x, weight, eps);
    }
    Ok(x.contiguous()?
        .apply_op2(&weight.contiguous()?, RmsNormOp { eps })?)
}

/// RMSNorm as a composition of differentiable ops (the reference).
pub fn rms_norm_composite(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Tensor> {
    let r = (x.sqr()?.mean_keepdim(D::Minus1)? + eps)?.sqrt()?.recip()?;
    Ok(x.broadcast_mul(&r)?.broadcast_mul(weight)?)
}

struct RmsNormOp {
    eps: f64,
}

fn rms_inv(row: &[f32], eps: f64) -> f64 {
    let ss: f64 = row.iter().map(|v| (*v as f64) * (*v as f64)).sum();
    1.0 / (ss / row.len().max(1) as f64 + eps).sqrt()
}

impl candle_core::CustomOp2 for RmsNormOp {
    fn name(&self) -> &'static str {
        "rms-norm"
    }
    fn cpu_fwd(
        &self,
        sx: &candle_core::CpuStorage,
        lx: &candle_core::Layout,
        sw: &candle_core::CpuStorage,
        lw: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let (x, w) = (
            f32_slice(sx, lx, "rms_norm")?,
            f32_slice(sw, lw, "rms_norm")?,
        );
        let d = w.len().max(1);
        let mut out = vec![0f32; x.len()];
        let chunk = rows_per_task(x.len() / d, d) * d;
        out.par_chunks_mut(chunk)
            .zip(x.par_chunks(chunk))
            .for_each(|(o, xs)| {
                for (orow, xrow) in o.chunks_mut(d).zip(xs.chunks(d)) {
                    let inv = rms_inv(xrow, self.eps) as f32;
                    for k in 0..d {
                        orow[k] = xrow[k] * inv * w[k];
                    }
                }
            });
        Ok((candle_core::CpuStorage::F32(out), lx.shape().clone()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let packed = grad
            .contiguous()?
            .apply_op3_no_bwd(x, w, &RmsNormBwd { eps: self.eps })?;
        let n = x.elem_count();
        let gx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
        // A frozen weight (a plain tensor) gets no gradient: candle would otherwise file one for
        // every custom-op argument.
        let gw = if w.track_op() {
            Some(packed.narrow(0, n, w.elem_count())?.reshape(w.shape())?)
        } else {
            None
        };
        Ok((Some(gx), gw))
    }
}

struct RmsNormBwd {
    eps: f64,
}

impl candle_core::CustomOp3 for RmsNormBwd {
    fn name(&self) -> &'static str {
        "rms-norm-bwd"
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
            f32_slice(sg, lg, "rms_norm")?,
            f32_slice(sx, lx, "rms_norm")?,
            f32_slice(sw, lw, "rms_norm")?,
        );
        let d = w.len().max(1);
        let mut gx = vec![0f32; x.len()];
        let chunk = rows_per_task(x.len() / d, d) * d;
        // dx_j = r·(g_j w_j − x_j r² Σ_k g_k w_k x_k / d), dw_j = Σ_rows g_j x_j r.
        let partial: Vec<Vec<f64>> = gx
            .par_chunks_mut(chunk)
            .zip(x.par_chunks(chunk))
            .zip(g.par_chunks(chunk))
            .map(|((dx, xs), gs)| {
                let mut dw = vec![0f64; d];
                for ((dxr, xr), gr) in dx.chunks_mut(d).zip(xs.chunks(d)).zip(gs.chunks(d)) {
                    let r = rms_inv(xr, self.eps);
                    let dot: f64 = (0..d)
                        .map(|k| gr[k] as f64 * w[k] as f64 * xr[k] as f64)
                        .sum();
                    let c = r * r * dot / d as f64;
                    for k in 0..d {
                        dxr[k] = (r * (gr[k] as f64 * w[k] as f64 - xr[k] as f64 * c)) as f32;
                        dw[k] += gr[k] as f64 * xr[k] as f64 * r;
                    }
                }
                dw
            })
            .collect();
        let mut dw = vec![0f64; d];
        for p in &partial {
            for k in 0..d {
                dw[k] += p[k];
            }
        }
        let mut out = gx;
        out.extend(dw.iter().map(|v| *v as f32));
        let len = out.len();
        Ok((
            candle_core::CpuStorage::F32(out),
            candle_core::Shape::from(len),
        ))
    }
}
