//! Normalisations: GroupNorm (plain, fused, fused with SiLU), LayerNorm and RMSNorm, each as one
//! node with a CPU forward and backward for f32, next to the differentiable composition it falls
//! back to elsewhere (and that the tests compare it with).

use super::act::sigmoid;
use super::kernels::{f32_slice, rows_per_task};
use crate::Result;
use candle_core::{DType, Tensor, D};

pub(super) use super::layer_norm::layer_norm_values;
pub use super::layer_norm::{layer_norm, layer_norm_composite};

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

/// Σ v in 16 f32 lanes, the lanes added in f64 (vectorizes; one group is at most a few
/// thousand values per lane pass).
fn lane_sum(v: &[f32]) -> f64 {
    let mut acc = [0f32; 16];
    let chunks = v.chunks_exact(16);
    let rem = chunks.remainder();
    for c in chunks {
        for i in 0..16 {
            acc[i] += c[i];
        }
    }
    acc.iter().map(|a| *a as f64).sum::<f64>() + rem.iter().map(|a| *a as f64).sum::<f64>()
}

/// Σ (v − m)² in 16 f32 lanes, the lanes added in f64.
fn lane_sq_dev(v: &[f32], m: f32) -> f64 {
    let mut acc = [0f32; 16];
    let chunks = v.chunks_exact(16);
    let rem = chunks.remainder();
    for c in chunks {
        for i in 0..16 {
            let d = c[i] - m;
            acc[i] += d * d;
        }
    }
    acc.iter().map(|a| *a as f64).sum::<f64>()
        + rem.iter().map(|a| ((*a - m) as f64).powi(2)).sum::<f64>()
}

/// (mean, 1/std) of one group's values (two passes, f64 lane totals).
pub(super) fn stats(v: &[f32], eps: f64) -> (f64, f64) {
    let n = v.len() as f64;
    let mean = lane_sum(v) / n;
    let var = lane_sq_dev(v, mean as f32) / n;
    (mean, 1.0 / (var + eps).sqrt())
}

/// Per channel of a group: `y = x·scale + shift` with `scale = γ·inv`, `shift = β − mean·scale`.
fn channel_affine(mean: f64, inv: f64, w: f32, b: f32) -> (f32, f32) {
    let scale = w as f64 * inv;
    (scale as f32, (b as f64 - mean * scale) as f32)
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
                let c0 = (gi % self.groups) * cpg;
                group_fwd(xs, o, hw, c0, (w, b), self.eps, self.silu);
            });
        Ok((candle_core::CpuStorage::F32(out), lx.shape().clone()))
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let c = x.dim(1)?;
        // Frozen norms (every norm of a LoRA run) get no γ/β gradient, so none is computed.
        let affine = w.track_op() || b.track_op();
        let packed = grad.contiguous()?.apply_op3_no_bwd(
            &x.contiguous()?,
            &w.contiguous()?,
            &GroupNormBwd {
                groups: self.groups,
                eps: self.eps,
                silu: self.silu,
                bias: b.contiguous()?,
                affine,
            },
        )?;
        if !affine {
            return Ok((Some(packed.reshape(x.shape())?), None, None));
        }
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
    bias: Tensor,
    /// Also compute dγ and dβ (appended after dx).
    affine: bool,
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
        let bv = self.bias.flatten_all()?.to_vec1::<f32>()?;
        let extra = if self.affine { 2 * c } else { 0 };
        let mut out = vec![0f32; x.len() + extra];
        // Per group, two passes over its values:
        // 1. the gradient reaching the norm's output, ĝ = g (or g·silu'(y) with y = x̂·γ + β
        //    recomputed, silu'(y) = σ(y)·(1 + y·(1 − σ(y)))), kept in a scratch row, and the sums
        //    s1 = Σ ĝ·γ, s2 = Σ ĝ·γ·x̂ (and per channel Σ ĝ·x̂, Σ ĝ for dγ, dβ);
        // 2. dx = inv·(ĝ·γ − s1/n − x̂·s2/n).
        let partial: Vec<(Vec<f64>, Vec<f64>)> = out[..x.len()]
            .par_chunks_mut(glen)
            .zip(x.par_chunks(glen))
            .zip(g.par_chunks(glen))
            .enumerate()
            .map_init(
                || vec![0f32; glen],
                |ge, (gi, ((dx, xs), gs))| {
                    let c0 = (gi % self.groups) * cpg;
                    let how = GroupBwd {
                        silu: self.silu,
                        accumulate: false,
                        affine: self.affine,
                    };
                    group_bwd(gs, xs, dx, ge, hw, c0, (w, &bv), self.eps, how)
                },
            )
            .collect();
        if self.affine {
            let (mut dw, mut db) = (vec![0f64; c], vec![0f64; c]);
            for (gi, (dg, dbp)) in partial.iter().enumerate() {
                let c0 = (gi % self.groups) * cpg;
                for k in 0..cpg {
                    dw[c0 + k] += dg[k];
                    db[c0 + k] += dbp[k];
                }
            }
            for (o, v) in out[x.len()..].iter_mut().zip(dw.iter().chain(&db)) {
                *o = *v as f32;
            }
        }
        let len = out.len();
        Ok((
            candle_core::CpuStorage::F32(out),
            candle_core::Shape::from(len),
        ))
    }
}

/// One group's values `xs` (its channels × `hw`, first channel `c0`) normalized into `o` with the
/// channels' γ and β, then SiLU when `silu`.
fn group_fwd(
    xs: &[f32],
    o: &mut [f32],
    hw: usize,
    c0: usize,
    (w, b): (&[f32], &[f32]),
    eps: f64,
    silu: bool,
) {
    let (mean, inv) = stats(xs, eps);
    for (k, (oc, xc)) in o.chunks_mut(hw).zip(xs.chunks(hw)).enumerate() {
        let (scale, shift) = channel_affine(mean, inv, w[c0 + k], b[c0 + k]);
        if silu {
            for (oo, xx) in oc.iter_mut().zip(xc) {
                let y = *xx * scale + shift;
                *oo = y * sigmoid(y);
            }
        } else {
            for (oo, xx) in oc.iter_mut().zip(xc) {
                *oo = *xx * scale + shift;
            }
        }
    }
}

#[derive(Clone, Copy)]
struct GroupBwd {
    /// The forward applied SiLU after the norm.
    silu: bool,
    /// Add dx into the destination instead of writing it.
    accumulate: bool,
    /// Also return the per-channel (Σ ĝ·x̂, Σ ĝ) for dγ and dβ.
    affine: bool,
}

/// dL/dx of one group (see [`group_fwd`]) for its output gradient `gs`, `ge` a scratch row of the
/// group's length. Two passes over the values:
/// 1. the gradient reaching the norm's output, ĝ = g (or g·silu'(y) with y = x̂·γ + β recomputed,
///    silu'(y) = σ(y)·(1 + y·(1 − σ(y)))), kept in `ge`, and the sums s1 = Σ ĝ·γ, s2 = Σ ĝ·γ·x̂
///    (and per channel Σ ĝ·x̂, Σ ĝ for dγ, dβ);
/// 2. dx = inv·(ĝ·γ − s1/n − x̂·s2/n).
#[allow(clippy::too_many_arguments)]
fn group_bwd(
    gs: &[f32],
    xs: &[f32],
    dx: &mut [f32],
    ge: &mut [f32],
    hw: usize,
    c0: usize,
    (w, bv): (&[f32], &[f32]),
    eps: f64,
    how: GroupBwd,
) -> (Vec<f64>, Vec<f64>) {
    let glen = xs.len();
    let cpg = glen / hw.max(1);
    let (mean, inv) = stats(xs, eps);
    let n = glen as f64;
    let (mut s1, mut s2) = (0f64, 0f64);
    let mut dgam = vec![0f64; if how.affine { cpg } else { 0 }];
    let mut dbet = vec![0f64; if how.affine { cpg } else { 0 }];
    let (meanf, invf) = (mean as f32, inv as f32);
    for k in 0..cpg {
        let ch = c0 + k;
        let range = k * hw..(k + 1) * hw;
        let (xc, gc, ec) = (&xs[range.clone()], &gs[range.clone()], &mut ge[range]);
        if how.silu {
            let (scale, shift) = channel_affine(mean, inv, w[ch], bv[ch]);
            for ((e, xx), gg) in ec.iter_mut().zip(xc).zip(gc) {
                let y = *xx * scale + shift;
                let sg = sigmoid(y);
                *e = *gg * sg * (1.0 + y * (1.0 - sg));
            }
        } else {
            ec.copy_from_slice(gc);
        }
        // Σ ĝ and Σ ĝ·x̂ over the channel (x̂ = (x − mean)·inv).
        let (mut a1, mut a2) = ([0f32; 16], [0f32; 16]);
        let n16 = hw - hw % 16;
        for (ee, xx) in ec[..n16].chunks_exact(16).zip(xc[..n16].chunks_exact(16)) {
            for i in 0..16 {
                a1[i] += ee[i];
                a2[i] += ee[i] * ((xx[i] - meanf) * invf);
            }
        }
        let mut sum_g = a1.iter().map(|v| *v as f64).sum::<f64>();
        let mut sum_gx = a2.iter().map(|v| *v as f64).sum::<f64>();
        for (ee, xx) in ec[n16..].iter().zip(&xc[n16..]) {
            sum_g += *ee as f64;
            sum_gx += (*ee * ((*xx - meanf) * invf)) as f64;
        }
        s1 += sum_g * w[ch] as f64;
        s2 += sum_gx * w[ch] as f64;
        if how.affine {
            dgam[k] = sum_gx;
            dbet[k] = sum_g;
        }
    }
    let (a, b1) = ((inv * s1 / n) as f32, (inv * s2 / n) as f32);
    for k in 0..cpg {
        let wi = w[c0 + k] * invf;
        let range = k * hw..(k + 1) * hw;
        let it = dx[range.clone()]
            .iter_mut()
            .zip(&ge[range.clone()])
            .zip(&xs[range]);
        if how.accumulate {
            for ((d, ee), xx) in it {
                *d += *ee * wi - a - (*xx - meanf) * invf * b1;
            }
        } else {
            for ((d, ee), xx) in it {
                *d = *ee * wi - a - (*xx - meanf) * invf * b1;
            }
        }
    }
    (dgam, dbet)
}

/// A frozen GroupNorm's parameters, for the block-level nodes that run it per image.
pub(super) struct GroupNormRef<'a> {
    pub weight: &'a [f32],
    pub bias: &'a [f32],
    pub groups: usize,
    pub eps: f64,
}

impl GroupNormRef<'_> {
    /// `silu(group_norm(x))` of one image `x` (channels × `hw`) into `out`.
    pub(super) fn silu_image(&self, x: &[f32], out: &mut [f32], hw: usize) {
        let glen = x.len() / self.groups;
        let cpg = glen / hw.max(1);
        for (gi, (xs, o)) in x.chunks(glen).zip(out.chunks_mut(glen)).enumerate() {
            group_fwd(
                xs,
                o,
                hw,
                gi * cpg,
                (self.weight, self.bias),
                self.eps,
                true,
            );
        }
    }
    /// Adds dL/dx of [`Self::silu_image`] for the output gradient `g` into `dx` (`scratch` any
    /// buffer, resized to one group).
    pub(super) fn silu_image_bwd(
        &self,
        g: &[f32],
        x: &[f32],
        dx: &mut [f32],
        scratch: &mut Vec<f32>,
        hw: usize,
    ) {
        let glen = x.len() / self.groups;
        let cpg = glen / hw.max(1);
        scratch.resize(glen, 0.0);
        let how = GroupBwd {
            silu: true,
            accumulate: true,
            affine: false,
        };
        for (gi, ((xs, gs), d)) in x
            .chunks(glen)
            .zip(g.chunks(glen))
            .zip(dx.chunks_mut(glen))
            .enumerate()
        {
            group_bwd(
                gs,
                xs,
                d,
                scratch,
                hw,
                gi * cpg,
                (self.weight, self.bias),
                self.eps,
                how,
            );
        }
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
                for (orow, xrow) in o.chunks_exact_mut(d).zip(xs.chunks_exact(d)) {
                    let inv = rms_inv(xrow, self.eps) as f32;
                    for ((o, x), w) in orow.iter_mut().zip(xrow).zip(w) {
                        *o = *x * inv * *w;
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
        let packed = grad.contiguous()?.apply_op3_no_bwd(
            x,
            w,
            &RowNormBwd {
                kind: RowNorm::Rms,
                eps: self.eps,
            },
        )?;
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

/// RMSNorm's values for a contiguous CPU f32 `x`, recording no graph (for nodes with their own
/// backward).
pub(super) fn rms_norm_values(
    x: &Tensor,
    weight: &Tensor,
    eps: f64,
) -> candle_core::Result<Tensor> {
    x.apply_op2_no_bwd(weight, &RmsNormOp { eps })
}

/// The row normalisation an input gradient is for.
#[derive(Clone, Copy)]
pub(super) enum RowNorm {
    /// LayerNorm: `(x − mean)·inv·w + b`.
    Layer,
    /// RMSNorm: `x·r·w`, r = 1/√(mean(x²) + ε).
    Rms,
}

/// One row's input gradient for a frozen weight, written (or added, `accumulate`) into `dx`:
/// LayerNorm `dx = inv/d·(d·ĝ − Σĝ − x̂·Σĝx̂)`, RMSNorm `dx = r·(ĝ − x·r²·Σĝx/d)`, ĝ = g ⊙ w.
pub(super) fn row_input_grad(
    kind: RowNorm,
    g: &[f32],
    x: &[f32],
    w: &[f32],
    eps: f64,
    dx: &mut [f32],
    accumulate: bool,
) {
    let (n, d) = (x.len(), x.len() as f64);
    let gw = |k: usize| g[k] as f64 * w[k] as f64;
    // dx_k = a·ĝ_k + b·x_k + c with the row's constants a, b, c.
    let (a, b, c) = match kind {
        RowNorm::Layer => {
            let (mean, inv) = stats(x, eps);
            let xh = |k: usize| (x[k] as f64 - mean) * inv;
            let (s1, s2) = (0..n).fold((0f64, 0f64), |(a, b), k| (a + gw(k), b + gw(k) * xh(k)));
            // inv/d·(d·ĝ − s1 − x̂·s2), x̂ = (x − mean)·inv.
            (inv, -inv * inv * s2 / d, inv / d * (-s1 + mean * inv * s2))
        }
        RowNorm::Rms => {
            let r = rms_inv(x, eps);
            (
                r,
                -r * r * r * (0..n).map(|k| gw(k) * x[k] as f64).sum::<f64>() / d,
                0.0,
            )
        }
    };
    for (k, o) in dx.iter_mut().enumerate().take(n) {
        let v = (a * gw(k) + b * x[k] as f64 + c) as f32;
        *o = if accumulate { *o + v } else { v };
    }
}

/// `dst += ∂norm(x)/∂x · g` in place for a frozen weight (D values), rows of the weight's width:
/// a norm's input gradient summed into a buffer that already holds the residual's. `dst` must be a
/// fresh tensor owned by the caller; CPU f32, contiguous, the shape of `x` and `g`.
pub(super) fn norm_grad_acc(
    dst: &Tensor,
    g: &Tensor,
    x: &Tensor,
    weight: &Tensor,
    eps: f64,
    kind: RowNorm,
) -> candle_core::Result<()> {
    dst.inplace_op3(
        g,
        x,
        &NormGradAcc {
            w: &weight.to_vec1::<f32>()?,
            eps,
            kind,
        },
    )
}

struct NormGradAcc<'a> {
    w: &'a [f32],
    eps: f64,
    kind: RowNorm,
}

impl candle_core::InplaceOp3 for NormGradAcc<'_> {
    fn name(&self) -> &'static str {
        "norm-grad-acc"
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
            f32_slice(sg, lg, "norm grad")?,
            f32_slice(sx, lx, "norm grad")?,
        );
        let (candle_core::CpuStorage::F32(dv), Some((d0, d1))) = (sd, ld.contiguous_offsets())
        else {
            candle_core::bail!("norm grad: contiguous f32 destination only")
        };
        let (dst, d) = (&mut dv[d0..d1], self.w.len());
        if dst.len() != x.len() || g.len() != x.len() || d == 0 || x.len() % d != 0 {
            candle_core::bail!(
                "norm grad: {} gradient and {} input values into {} over width {d}",
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
                    row_input_grad(self.kind, gr, xr, self.w, self.eps, dxr, true);
                }
            });
        Ok(())
    }
}

/// The backward of a row norm for the output gradient g: `[dx, dw]` (RMSNorm) or `[dx, dw, db]`
/// (LayerNorm), flat; the weight sums in task order, in f64.
pub(super) struct RowNormBwd {
    pub(super) kind: RowNorm,
    pub(super) eps: f64,
}

impl candle_core::CustomOp3 for RowNormBwd {
    fn name(&self) -> &'static str {
        "row-norm-bwd"
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
            f32_slice(sg, lg, "norm")?,
            f32_slice(sx, lx, "norm")?,
            f32_slice(sw, lw, "norm")?,
        );
        let d = w.len().max(1);
        let mut gx = vec![0f32; x.len()];
        let chunk = rows_per_task(x.len() / d, d) * d;
        // Per task: dx rows, and partial sums of dw (and db) over its rows.
        let partial: Vec<Vec<f64>> = gx
            .par_chunks_mut(chunk)
            .zip(x.par_chunks(chunk))
            .zip(g.par_chunks(chunk))
            .map(|((dx, xs), gs)| {
                let mut acc = vec![0f64; 2 * d];
                for ((dxr, xr), gr) in dx.chunks_mut(d).zip(xs.chunks(d)).zip(gs.chunks(d)) {
                    row_input_grad(self.kind, gr, xr, w, self.eps, dxr, false);
                    let (mean, inv) = match self.kind {
                        RowNorm::Layer => stats(xr, self.eps),
                        RowNorm::Rms => (0.0, rms_inv(xr, self.eps)),
                    };
                    for k in 0..d {
                        acc[k] += gr[k] as f64 * (xr[k] as f64 - mean) * inv;
                        acc[d + k] += gr[k] as f64;
                    }
                }
                acc
            })
            .collect();
        let sums = match self.kind {
            RowNorm::Layer => 2 * d,
            RowNorm::Rms => d,
        };
        let mut out = gx;
        out.extend((0..sums).map(|k| partial.iter().map(|p| p[k]).sum::<f64>() as f32));
        let len = out.len();
        Ok((
            candle_core::CpuStorage::F32(out),
            candle_core::Shape::from(len),
        ))
    }
}
