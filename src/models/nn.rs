//! Differentiable building blocks shared by model families. candle's fused `layer_norm`,
//! `rms_norm` and `softmax_last_dim` record no backward (see the reference notes), so models use
//! these compositions of differentiable ops.

use crate::peft::ops::f32_slice;
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
                        for k in 0..tk {
                            o[k] = xr[k] * scale + m[k];
                        }
                    }
                    None => {
                        for k in 0..tk {
                            o[k] = xr[k] * scale;
                        }
                    }
                }
                let mx = row_max(o);
                let mut sum = 0f32;
                for v in o.iter_mut() {
                    *v = fast_exp(*v - mx);
                    sum += *v;
                }
                let inv = 1.0 / sum;
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

/// Sinusoidal timestep embedding as diffusers' `Timesteps`: (B) → (B, dim).
pub fn timestep_embedding(
    t: &Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
) -> Result<Tensor> {
    let half = dim / 2;
    let freqs: Vec<f32> = (0..half)
        .map(|i| (-(10000f64.ln()) * i as f64 / (half as f64 - freq_shift)).exp() as f32)
        .collect();
    let freqs = Tensor::from_vec(freqs, (1, half), t.device())?;
    let args = t
        .to_dtype(DType::F32)?
        .unsqueeze(1)?
        .broadcast_mul(&freqs)?;
    let (s, c) = (args.sin()?, args.cos()?);
    let emb = if flip_sin_to_cos {
        Tensor::cat(&[c, s], 1)?
    } else {
        Tensor::cat(&[s, c], 1)?
    };
    if dim % 2 == 1 {
        return Ok(emb.pad_with_zeros(1, 0, 1)?);
    }
    Ok(emb)
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

fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + fast_exp(-v))
}

/// `exp(x)` for f32 in a form the compiler vectorizes (libm's `expf` is a scalar call): Cody–Waite
/// reduction `x = k·ln2 + r`, |r| ≤ ln2/2, a degree-6 Taylor polynomial for `e^r` (relative error
/// below 2e-7, about one ulp), and `2^k` built in the exponent bits. Inputs below −87.3 give 0,
/// above 88.3 are clamped (softmax inputs are ≤ 0 after the max shift).
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23: adding and subtracting rounds to an integer
    let xc = x.clamp(-87.3, 88.3);
    let k = (xc * LOG2E + ROUND) - ROUND;
    let r = xc - k * LN2_HI - k * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let scale = f32::from_bits(((k as i32 + 127) as u32) << 23);
    if x < -87.3 {
        0.0
    } else {
        p * scale
    }
}

/// The largest value of a row (vectorizable: 16 running maxima).
fn row_max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let chunks = x.chunks_exact(16);
    let rem = chunks.remainder();
    for c in chunks {
        for i in 0..16 {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    let mut m = acc.iter().fold(f32::NEG_INFINITY, |a, b| a.max(*b));
    for v in rem {
        m = m.max(*v);
    }
    m
}

/// `o_k = exp(x_k − m)` for a row, returning Σ o_k (16 running sums, so it vectorizes).
fn exp_shifted_into(x: &[f32], m: f32, o: &mut [f32]) -> f32 {
    let mut acc = [0f32; 16];
    let n = x.len() - x.len() % 16;
    for (oc, xc) in o[..n].chunks_exact_mut(16).zip(x[..n].chunks_exact(16)) {
        for i in 0..16 {
            let e = fast_exp(xc[i] - m);
            oc[i] = e;
            acc[i] += e;
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (oo, xx) in o[n..].iter_mut().zip(&x[n..]) {
        *oo = fast_exp(*xx - m);
        s += *oo;
    }
    s
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

/// Rows per parallel task for row-wise kernels (enough work per task to amortise scheduling).
fn rows_per_task(rows: usize, d: usize) -> usize {
    (16384 / d.max(1)).clamp(1, rows.max(1))
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
                for ((orow, grow), yrow) in o.chunks_mut(d).zip(gs.chunks(d)).zip(ys.chunks(d)) {
                    let dot: f32 = grow.iter().zip(yrow).map(|(a, b)| a * b).sum();
                    for k in 0..d {
                        orow[k] = self.scale * yrow[k] * (grow[k] - dot);
                    }
                }
            });
        Ok((candle_core::CpuStorage::F32(out), ly.shape().clone()))
    }
}

/// GEGLU over the last dimension: `p = [value, gate]` (two halves) → `value · gelu(gate)` with the
/// exact (erf) GELU, as one node with a CPU backward that writes the gradient of `p` in its own
/// layout. Off the CPU or for non-f32 inputs: the composition of candle ops.
pub fn geglu(p: &Tensor) -> Result<Tensor> {
    let d = p.dim(D::Minus1)?;
    if !p.device().is_cpu() || p.dtype() != DType::F32 || d % 2 != 0 {
        let half = d / 2;
        return Ok((p.narrow(D::Minus1, 0, half)? * p.narrow(D::Minus1, half, half)?.gelu_erf()?)?);
    }
    Ok(p.contiguous()?.apply_op1(GegluOp)?)
}

const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

/// `erf(x)` in a vectorizable form (Abramowitz & Stegun 7.1.26 with [`fast_exp`]): absolute error
/// below 1e-6 in f32 (1.5e-7 in exact arithmetic), against libm's scalar `erff`.
#[inline(always)]
pub fn fast_erf(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_7,
        -1.453_152_1,
        1.061_405_4,
    ];
    let ax = x.abs();
    let t = 1.0 / (1.0 + P * ax);
    let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    let y = 1.0 - poly * fast_exp(-ax * ax);
    if x < 0.0 {
        -y
    } else {
        y
    }
}

fn gelu_erf(x: f32) -> f32 {
    0.5 * x * (1.0 + fast_erf(x * std::f32::consts::FRAC_1_SQRT_2))
}

fn gelu_erf_grad(x: f32) -> f32 {
    0.5 * (1.0 + fast_erf(x * std::f32::consts::FRAC_1_SQRT_2))
        + x * FRAC_1_SQRT_2PI * fast_exp(-0.5 * x * x)
}

struct GegluOp;

impl candle_core::CustomOp1 for GegluOp {
    fn name(&self) -> &'static str {
        "geglu"
    }
    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let p = f32_slice(s, l, "geglu")?;
        let dims = l.shape().dims();
        let d = *dims.last().unwrap_or(&0);
        let h = d / 2;
        let mut out = vec![0f32; p.len() / 2];
        let rows = rows_per_task(p.len() / d.max(1), d);
        out.par_chunks_mut(rows * h)
            .zip(p.par_chunks(rows * d))
            .for_each(|(o, ps)| {
                for (orow, prow) in o.chunks_mut(h).zip(ps.chunks(d)) {
                    for k in 0..h {
                        orow[k] = prow[k] * gelu_erf(prow[h + k]);
                    }
                }
            });
        let mut od = dims.to_vec();
        if let Some(last) = od.last_mut() {
            *last = h;
        }
        Ok((
            candle_core::CpuStorage::F32(out),
            candle_core::Shape::from(od),
        ))
    }
    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(
            grad.contiguous()?
                .apply_op2_no_bwd(&arg.contiguous()?, &GegluBwd)?,
        ))
    }
}

struct GegluBwd;

impl candle_core::CustomOp2 for GegluBwd {
    fn name(&self) -> &'static str {
        "geglu-bwd"
    }
    fn cpu_fwd(
        &self,
        sg: &candle_core::CpuStorage,
        lg: &candle_core::Layout,
        sp: &candle_core::CpuStorage,
        lp: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let (g, p) = (f32_slice(sg, lg, "geglu")?, f32_slice(sp, lp, "geglu")?);
        let d = *lp.shape().dims().last().unwrap_or(&0);
        let h = d / 2;
        let mut out = vec![0f32; p.len()];
        let rows = rows_per_task(p.len() / d.max(1), d);
        out.par_chunks_mut(rows * d)
            .zip(p.par_chunks(rows * d).zip(g.par_chunks(rows * h)))
            .for_each(|(o, (ps, gs))| {
                for ((orow, prow), grow) in o.chunks_mut(d).zip(ps.chunks(d)).zip(gs.chunks(h)) {
                    for k in 0..h {
                        let (v, gate) = (prow[k], prow[h + k]);
                        orow[k] = grow[k] * gelu_erf(gate);
                        orow[h + k] = grow[k] * v * gelu_erf_grad(gate);
                    }
                }
            });
        Ok((candle_core::CpuStorage::F32(out), lp.shape().clone()))
    }
}

/// SwiGLU, Llama's MLP activation: `silu(gate) ⊙ up` as one node (two parallel passes instead of
/// candle's single-threaded silu and mul, and no stored `silu(gate)` intermediate). Backward:
/// `d gate = g ⊙ up ⊙ σ(gate)(1 + gate(1 − σ(gate)))`, `d up = g ⊙ silu(gate)`. CPU f32; the
/// composition elsewhere.
pub fn swiglu(gate: &Tensor, up: &Tensor) -> Result<Tensor> {
    if !gate.device().is_cpu()
        || gate.dtype() != DType::F32
        || up.dtype() != DType::F32
        || gate.dims() != up.dims()
    {
        return Ok((gate.silu()? * up)?);
    }
    Ok(gate.contiguous()?.apply_op2(&up.contiguous()?, SwigluOp)?)
}

struct SwigluOp;

const SWIGLU_CHUNK: usize = 1 << 14;

impl candle_core::CustomOp2 for SwigluOp {
    fn name(&self) -> &'static str {
        "swiglu"
    }
    fn cpu_fwd(
        &self,
        sg: &candle_core::CpuStorage,
        lg: &candle_core::Layout,
        su: &candle_core::CpuStorage,
        lu: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let (g, u) = (f32_slice(sg, lg, "swiglu")?, f32_slice(su, lu, "swiglu")?);
        let mut out = vec![0f32; g.len()];
        out.par_chunks_mut(SWIGLU_CHUNK)
            .zip(g.par_chunks(SWIGLU_CHUNK).zip(u.par_chunks(SWIGLU_CHUNK)))
            .for_each(|(o, (gs, us))| {
                for ((o, &x), &v) in o.iter_mut().zip(gs).zip(us) {
                    *o = x * sigmoid(x) * v;
                }
            });
        Ok((candle_core::CpuStorage::F32(out), lg.shape().clone()))
    }
    fn bwd(
        &self,
        gate: &Tensor,
        up: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let packed = grad.contiguous()?.apply_op3_no_bwd(gate, up, &SwigluBwd)?;
        let n = gate.elem_count();
        let dg = packed.narrow(0, 0, n)?.reshape(gate.shape())?;
        let du = packed.narrow(0, n, n)?.reshape(up.shape())?;
        Ok((Some(dg), Some(du)))
    }
}

struct SwigluBwd;

impl candle_core::CustomOp3 for SwigluBwd {
    fn name(&self) -> &'static str {
        "swiglu-bwd"
    }
    fn cpu_fwd(
        &self,
        sd: &candle_core::CpuStorage,
        ld: &candle_core::Layout,
        sg: &candle_core::CpuStorage,
        lg: &candle_core::Layout,
        su: &candle_core::CpuStorage,
        lu: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let (d, g, u) = (
            f32_slice(sd, ld, "swiglu")?,
            f32_slice(sg, lg, "swiglu")?,
            f32_slice(su, lu, "swiglu")?,
        );
        let n = g.len();
        let mut out = vec![0f32; 2 * n];
        let (dg, du) = out.split_at_mut(n);
        dg.par_chunks_mut(SWIGLU_CHUNK)
            .zip(du.par_chunks_mut(SWIGLU_CHUNK))
            .zip(
                d.par_chunks(SWIGLU_CHUNK)
                    .zip(g.par_chunks(SWIGLU_CHUNK).zip(u.par_chunks(SWIGLU_CHUNK))),
            )
            .for_each(|((dgs, dus), (ds, (gs, us)))| {
                for i in 0..gs.len() {
                    let (x, v, gr) = (gs[i], us[i], ds[i]);
                    let sg = sigmoid(x);
                    dus[i] = gr * x * sg;
                    dgs[i] = gr * v * sg * (1.0 + x * (1.0 - sg));
                }
            });
        Ok((
            candle_core::CpuStorage::F32(out),
            candle_core::Shape::from(2 * n),
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

/// Rotary position embedding in Hugging Face's rotate-half layout: for `x` (B, H, T, D) and integer
/// `positions` (B, T), `x·cos(pθ) + rotate_half(x)·sin(pθ)` with `inv_freq` θ (D/2 values). One node
/// with a CPU backward (the rotation by −pθ); the differentiable composition elsewhere.
pub fn rope(x: &Tensor, positions: &Tensor, inv_freq: &[f32]) -> Result<Tensor> {
    let (b, _h, t, d) = x.dims4()?;
    if positions.dims() != [b, t] || d != 2 * inv_freq.len() {
        return Err(crate::Error::Msg(format!(
            "rope: x {:?}, positions {:?} and {} frequencies do not fit",
            x.dims(),
            positions.dims(),
            inv_freq.len()
        )));
    }
    let pos: Vec<u32> = positions
        .to_dtype(DType::U32)?
        .flatten_all()?
        .to_vec1::<u32>()?;
    let max_p = pos.iter().copied().max().unwrap_or(0) as usize + 1;
    let half = inv_freq.len();
    let mut cos = vec![0f32; max_p * half];
    let mut sin = vec![0f32; max_p * half];
    for p in 0..max_p {
        for i in 0..half {
            let a = p as f32 * inv_freq[i];
            cos[p * half + i] = a.cos();
            sin[p * half + i] = a.sin();
        }
    }
    let tables = std::sync::Arc::new(RopeTables {
        pos,
        cos,
        sin,
        half,
    });
    if !x.device().is_cpu() || x.dtype() != DType::F32 {
        return rope_composite(x, &tables);
    }
    Ok(x.contiguous()?.apply_op1(RopeOp {
        tables,
        inverse: false,
    })?)
}

struct RopeTables {
    /// Position of each (batch, token), row-major.
    pos: Vec<u32>,
    cos: Vec<f32>,
    sin: Vec<f32>,
    half: usize,
}

fn rope_composite(x: &Tensor, tb: &RopeTables) -> Result<Tensor> {
    let (b, _h, t, d) = x.dims4()?;
    let half = tb.half;
    let mut c = vec![0f32; b * t * d];
    let mut s = vec![0f32; b * t * d];
    for (bt, &p) in tb.pos.iter().enumerate() {
        for i in 0..half {
            let (cv, sv) = (tb.cos[p as usize * half + i], tb.sin[p as usize * half + i]);
            c[bt * d + i] = cv;
            c[bt * d + half + i] = cv;
            s[bt * d + i] = sv;
            s[bt * d + half + i] = sv;
        }
    }
    let c = Tensor::from_vec(c, (b, 1, t, d), x.device())?.to_dtype(x.dtype())?;
    let s = Tensor::from_vec(s, (b, 1, t, d), x.device())?.to_dtype(x.dtype())?;
    let x1 = x.narrow(D::Minus1, 0, half)?;
    let x2 = x.narrow(D::Minus1, half, half)?;
    let rot = Tensor::cat(&[&x2.neg()?, &x1], D::Minus1)?;
    Ok((x.broadcast_mul(&c)? + rot.broadcast_mul(&s)?)?)
}

struct RopeOp {
    tables: std::sync::Arc<RopeTables>,
    /// Rotate by −pθ (the backward).
    inverse: bool,
}

impl candle_core::CustomOp1 for RopeOp {
    fn name(&self) -> &'static str {
        "rope"
    }
    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let x = f32_slice(s, l, "rope")?;
        let (_b, h, t, d) = l.shape().dims4()?;
        let tb = &self.tables;
        let half = tb.half;
        let sign = if self.inverse { -1f32 } else { 1f32 };
        let mut out = vec![0f32; x.len()];
        // One (batch, head) plane of t rows per task.
        out.par_chunks_mut(t * d)
            .zip(x.par_chunks(t * d))
            .enumerate()
            .for_each(|(plane, (o, xs))| {
                let bi = plane / h;
                for ti in 0..t {
                    let p = tb.pos[bi * t + ti] as usize;
                    let (c, sn) = (&tb.cos[p * half..][..half], &tb.sin[p * half..][..half]);
                    let (xr, or) = (&xs[ti * d..][..d], &mut o[ti * d..][..d]);
                    for i in 0..half {
                        let (x1, x2) = (xr[i], xr[half + i]);
                        let s = sign * sn[i];
                        or[i] = x1 * c[i] - x2 * s;
                        or[half + i] = x2 * c[i] + x1 * s;
                    }
                }
            });
        Ok((candle_core::CpuStorage::F32(out), l.shape().clone()))
    }
    fn bwd(
        &self,
        _arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(grad.contiguous()?.apply_op1_no_bwd(&RopeOp {
            tables: self.tables.clone(),
            inverse: !self.inverse,
        })?))
    }
}

/// Log-probabilities of `targets` under `logits` (..., V): `log_softmax(logits)[..., target]`,
/// one value per row, shaped like `logits` without its last dimension. On the CPU in f32 it is one
/// node that never materialises the log-softmax: the forward keeps a running max and sum per row,
/// the backward writes `g · (onehot − softmax)` straight into the logits' gradient (recomputing
/// the row's log-sum-exp). Elsewhere: log-softmax and gather. A target outside the vocabulary is
/// an error naming it.
pub fn token_logprobs(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let dims = logits.dims();
    let v = dims.last().copied().unwrap_or(0);
    let rows: usize = dims[..dims.len().saturating_sub(1)].iter().product();
    if dims.is_empty() || rows != targets.len() {
        return Err(crate::Error::Msg(format!(
            "{} targets for logits {:?}",
            targets.len(),
            dims
        )));
    }
    if let Some((i, t)) = targets.iter().enumerate().find(|(_, t)| **t as usize >= v) {
        return Err(crate::Error::Msg(format!(
            "target token {t} (row {i}) is outside the vocabulary of {v} logits"
        )));
    }
    let out_shape = &dims[..dims.len() - 1];
    if !logits.device().is_cpu() || logits.dtype() != DType::F32 {
        let lp = crate::models::llama::log_softmax(logits)?;
        let t = Tensor::from_vec(targets.to_vec(), out_shape, logits.device())?;
        return Ok(lp
            .gather(&t.unsqueeze(D::Minus1)?, D::Minus1)?
            .squeeze(D::Minus1)?);
    }
    let op = TokenLogprobOp {
        targets: std::sync::Arc::new(targets.to_vec()),
        lse: std::sync::Mutex::new(None),
    };
    Ok(logits.contiguous()?.apply_op1(op)?.reshape(out_shape)?)
}

fn row_lse(x: &[f32]) -> f32 {
    let m = row_max(x);
    let mut acc = [0f32; 16];
    let chunks = x.chunks_exact(16);
    let rem = chunks.remainder();
    for c in chunks {
        for i in 0..16 {
            acc[i] += fast_exp(c[i] - m);
        }
    }
    let mut s: f32 = acc.iter().sum();
    for v in rem {
        s += fast_exp(v - m);
    }
    m + s.ln()
}

struct TokenLogprobOp {
    targets: std::sync::Arc<Vec<u32>>,
    /// Each row's log-sum-exp, kept by the forward for the backward.
    lse: std::sync::Mutex<Option<std::sync::Arc<Vec<f32>>>>,
}

impl candle_core::CustomOp1 for TokenLogprobOp {
    fn name(&self) -> &'static str {
        "token-logprob"
    }
    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let x = f32_slice(s, l, "token-logprob")?;
        let d = l.shape().dims().last().copied().unwrap_or(1).max(1);
        let lse: Vec<f32> = x.par_chunks(d).map(row_lse).collect();
        let out: Vec<f32> = x
            .chunks(d)
            .zip(self.targets.iter())
            .zip(&lse)
            .map(|((row, &t), l)| row[t as usize] - l)
            .collect();
        if let Ok(mut g) = self.lse.lock() {
            *g = Some(std::sync::Arc::new(lse));
        }
        let n = out.len();
        Ok((
            candle_core::CpuStorage::F32(out),
            candle_core::Shape::from(n),
        ))
    }
    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let g = grad.flatten_all()?.contiguous()?;
        let lse = self.lse.lock().ok().and_then(|g| g.clone());
        Ok(Some(arg.contiguous()?.apply_op2_no_bwd(
            &g,
            &TokenLogprobBwd {
                targets: self.targets.clone(),
                lse,
            },
        )?))
    }
}

struct TokenLogprobBwd {
    targets: std::sync::Arc<Vec<u32>>,
    lse: Option<std::sync::Arc<Vec<f32>>>,
}

impl candle_core::CustomOp2 for TokenLogprobBwd {
    fn name(&self) -> &'static str {
        "token-logprob-bwd"
    }
    fn cpu_fwd(
        &self,
        sx: &candle_core::CpuStorage,
        lx: &candle_core::Layout,
        sg: &candle_core::CpuStorage,
        lg: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let (x, g) = (
            f32_slice(sx, lx, "token-logprob")?,
            f32_slice(sg, lg, "token-logprob")?,
        );
        let d = lx.shape().dims().last().copied().unwrap_or(1).max(1);
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .zip(g.par_iter().zip(self.targets.par_iter()))
            .enumerate()
            .for_each(|(i, ((o, row), (&gi, &t)))| {
                if gi == 0.0 {
                    return;
                }
                let lse = match &self.lse {
                    Some(l) if l.len() > i => l[i],
                    _ => row_lse(row),
                };
                for (oo, xx) in o.iter_mut().zip(row) {
                    *oo = -gi * fast_exp(xx - lse);
                }
                o[t as usize] += gi;
            });
        Ok((candle_core::CpuStorage::F32(out), lx.shape().clone()))
    }
}

#[cfg(test)]
mod fast_exp_tests {
    use super::fast_exp;

    #[test]
    fn fast_exp_is_within_two_ulps_of_libm() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (fast_exp(x) as f64, (x as f64).exp());
            worst = worst.max(((a - b) / b).abs());
            x += 0.0137;
        }
        assert!(worst < 3e-7, "relative error {worst:e}");
        assert_eq!(fast_exp(-1e30), 0.0);
        assert_eq!(fast_exp(0.0), 1.0);
        assert!(fast_exp(1e30).is_finite());
    }

    #[test]
    fn fast_erf_is_within_1e_6_of_libm() {
        let mut worst = 0f32;
        let mut x = -6.0f32;
        while x < 6.0 {
            worst = worst.max((super::fast_erf(x) - libm::erff(x)).abs());
            x += 0.00731;
        }
        assert!(worst < 1e-6, "absolute error {worst:e}");
    }
}

/// Nearest-neighbour upsampling of (b, c, h, w) by an integer `scale` (diffusers' `Upsample2D`,
/// `F.interpolate(scale_factor=2, mode="nearest")`) as one parallel node. Its backward sums each
/// `scale`×`scale` block of the gradient; candle's own backward runs a grouped conv with one group
/// per channel. Falls back to candle off the CPU or for non-f32.
pub fn upsample_nearest(x: &Tensor, scale: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if scale == 0 || h == 0 || w == 0 {
        return Err(crate::Error::Msg(format!(
            "upsample_nearest: cannot upsample {:?} by {scale}",
            x.dims()
        )));
    }
    if !x.device().is_cpu() || x.dtype() != DType::F32 {
        return Ok(x.upsample_nearest2d(h * scale, w * scale)?);
    }
    Ok(x.contiguous()?.apply_op1(UpsampleOp { scale })?)
}

struct UpsampleOp {
    scale: usize,
}

impl candle_core::CustomOp1 for UpsampleOp {
    fn name(&self) -> &'static str {
        "upsample-nearest"
    }
    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let x = f32_slice(s, l, "upsample_nearest")?;
        let (b, c, h, w) = l.shape().dims4()?;
        let k = self.scale;
        let (oh, ow) = (h * k, w * k);
        let mut out = vec![0f32; b * c * oh * ow];
        out.par_chunks_mut(oh * ow)
            .zip(x.par_chunks(h * w))
            .for_each(|(o, x)| {
                for (i, row) in x.chunks(w).enumerate() {
                    let first = &mut o[i * k * ow..(i * k + 1) * ow];
                    for (j, v) in row.iter().enumerate() {
                        first[j * k..(j + 1) * k].fill(*v);
                    }
                    let (done, rest) = o[i * k * ow..(i + 1) * k * ow].split_at_mut(ow);
                    for r in rest.chunks_mut(ow) {
                        r.copy_from_slice(done);
                    }
                }
            });
        Ok((
            candle_core::CpuStorage::F32(out),
            candle_core::Shape::from((b, c, oh, ow)),
        ))
    }
    fn bwd(
        &self,
        _x: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(
            grad.contiguous()?
                .apply_op1_no_bwd(&BlockSumOp { scale: self.scale })?,
        ))
    }
}

/// Sums each `scale`×`scale` block of (b, c, H, W) → (b, c, H/scale, W/scale).
struct BlockSumOp {
    scale: usize,
}

impl candle_core::CustomOp1 for BlockSumOp {
    fn name(&self) -> &'static str {
        "block-sum"
    }
    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let g = f32_slice(s, l, "block_sum")?;
        let (b, c, oh, ow) = l.shape().dims4()?;
        let k = self.scale;
        let (h, w) = (oh / k, ow / k);
        let mut out = vec![0f32; b * c * h * w];
        out.par_chunks_mut(h * w)
            .zip(g.par_chunks(oh * ow))
            .for_each(|(o, g)| {
                for (i, orow) in o.chunks_mut(w).enumerate() {
                    for r in 0..k {
                        let grow = &g[(i * k + r) * ow..(i * k + r + 1) * ow];
                        for (j, v) in orow.iter_mut().enumerate() {
                            *v += grow[j * k..(j + 1) * k].iter().sum::<f32>();
                        }
                    }
                }
            });
        Ok((
            candle_core::CpuStorage::F32(out),
            candle_core::Shape::from((b, c, h, w)),
        ))
    }
}

/// Logits that [`linear_cross_entropy`] holds at once: 8M values (32 MB in f32; 256 rows of a
/// 32K vocabulary). Smaller chunks make the output-layer matmuls repack the weight too often.
const LCE_CHUNK_VALUES: usize = 1 << 23;

/// Weighted mean cross-entropy of a frozen, bias-free output layer, straight from its input:
/// `−Σᵢ cᵢ · log_softmax(hᵢ · Wᵀ)[targetᵢ] / Σᵢ cᵢ` over the rows of `h` (N, D) with `W` (V, D),
/// targets and non-negative coefficients `c` (one per row). The same value as the output layer
/// followed by [`token_logprobs`], but the (N, V) logits are never held: rows go through in chunks
/// of [`LCE_CHUNK_VALUES`] logits, rows with `c = 0` are skipped (they cost no matmul), and when `h`
/// needs a gradient each chunk's `dL/dh = (c/Σc)·(softmax − onehot) · W` is computed while its
/// logits are at hand, so the backward is one scale of a stored (N, D) tensor: no second pass over
/// the vocabulary and no logits-sized gradient. `W` gets no gradient (it must be frozen). CPU f32.
pub fn linear_cross_entropy(
    h: &Tensor,
    w: &Tensor,
    targets: &[u32],
    coefs: &[f32],
) -> Result<Tensor> {
    linear_cross_entropy_chunked(h, w, targets, coefs, LCE_CHUNK_VALUES)
}

fn linear_cross_entropy_chunked(
    h: &Tensor,
    w: &Tensor,
    targets: &[u32],
    coefs: &[f32],
    chunk_values: usize,
) -> Result<Tensor> {
    use rayon::prelude::*;
    let (n, d) = h.dims2()?;
    let (v, dw) = w.dims2()?;
    if dw != d || targets.len() != n || coefs.len() != n {
        return Err(crate::Error::Msg(format!(
            "linear cross-entropy: hidden {:?}, output weight {:?}, {} targets and {} weights do not fit",
            h.dims(),
            w.dims(),
            targets.len(),
            coefs.len()
        )));
    }
    if !h.device().is_cpu() || h.dtype() != DType::F32 || w.dtype() != DType::F32 {
        return Err(crate::Error::Msg(
            "linear cross-entropy: CPU f32 only".into(),
        ));
    }
    if let Some((i, t)) = targets.iter().enumerate().find(|(_, t)| **t as usize >= v) {
        return Err(crate::Error::Msg(format!(
            "target token {t} (row {i}) is outside the vocabulary of {v} logits"
        )));
    }
    if let Some((i, c)) = coefs
        .iter()
        .enumerate()
        .find(|(_, c)| !(c.is_finite() && **c >= 0.0))
    {
        return Err(crate::Error::Msg(format!(
            "linear cross-entropy: weight {c} of row {i} is not a finite non-negative number"
        )));
    }
    let total: f64 = coefs.iter().map(|&c| c as f64).sum();
    if total <= 0.0 {
        return Err(crate::Error::Msg(format!(
            "no target token carries weight among {n} rows"
        )));
    }
    let rows: Vec<u32> = (0..n as u32).filter(|&i| coefs[i as usize] > 0.0).collect();
    let grad = h.track_op();
    let hd = h.detach();
    let wt = w.t()?;
    let chunk = (chunk_values / v.max(1)).max(1);
    let mut loss = 0f64;
    let mut gh: Vec<f32> = if grad { vec![0f32; n * d] } else { vec![] };
    for sel in rows.chunks(chunk) {
        let idx = Tensor::from_slice(sel, sel.len(), h.device())?;
        let hc = hd.index_select(&idx, 0)?;
        let z = hc.matmul(&wt)?.contiguous()?;
        let (zs, zl) = z.storage_and_layout();
        let candle_core::Storage::Cpu(zc) = &*zs else {
            return Err(crate::Error::Msg("linear cross-entropy: CPU only".into()));
        };
        let zv = f32_slice(zc, zl, "linear-cross-entropy")?;
        let tgt: Vec<usize> = sel.iter().map(|&i| targets[i as usize] as usize).collect();
        let lp: Vec<f32> = if grad {
            // dz = s · (softmax − onehot), written row by row; the row's log-prob comes with it.
            let scale: Vec<f32> = sel
                .iter()
                .map(|&i| (coefs[i as usize] as f64 / total) as f32)
                .collect();
            let mut dz = vec![0f32; sel.len() * v];
            let lp = dz
                .par_chunks_mut(v)
                .zip(zv.par_chunks(v))
                .enumerate()
                .map(|(r, (o, row))| {
                    let lse = row_lse(row);
                    let s = scale[r];
                    for (oo, &x) in o.iter_mut().zip(row) {
                        *oo = s * fast_exp(x - lse);
                    }
                    o[tgt[r]] -= s;
                    row[tgt[r]] - lse
                })
                .collect();
            drop(zs);
            drop(z);
            let g = Tensor::from_vec(dz, (sel.len(), v), h.device())?.matmul(w)?;
            let g = g.flatten_all()?.to_vec1::<f32>()?;
            for (k, &i) in sel.iter().enumerate() {
                gh[i as usize * d..(i as usize + 1) * d].copy_from_slice(&g[k * d..(k + 1) * d]);
            }
            lp
        } else {
            zv.par_chunks(v)
                .enumerate()
                .map(|(r, row)| row[tgt[r]] - row_lse(row))
                .collect()
        };
        loss -= lp
            .iter()
            .zip(sel)
            .map(|(&l, &i)| l as f64 * coefs[i as usize] as f64)
            .sum::<f64>();
    }
    let y = Tensor::new((loss / total) as f32, h.device())?;
    if !grad {
        return Ok(y);
    }
    let gh = Tensor::from_vec(gh, (n, d), h.device())?;
    Ok(crate::peft::ops::attach(
        h,
        y,
        "linear-cross-entropy",
        move |g| gh.broadcast_mul(g),
    )?)
}

#[cfg(test)]
mod linear_cross_entropy_tests {
    use super::*;
    use candle_core::{Device, Var};

    fn composite(h: &Tensor, w: &Tensor, t: &[u32], c: &[f32]) -> Tensor {
        let lp = token_logprobs(&h.matmul(&w.t().unwrap()).unwrap(), t).unwrap();
        let cw = Tensor::new(c, &Device::Cpu).unwrap();
        let n: f32 = c.iter().sum();
        ((lp * cw).unwrap().sum_all().unwrap() * (-1.0 / n as f64)).unwrap()
    }

    #[test]
    fn chunked_loss_and_input_gradient_equal_logits_then_log_softmax() {
        let dev = Device::Cpu;
        let (n, d, v) = (10, 6, 50);
        let hv = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, d), &dev).unwrap()).unwrap();
        let w = (Tensor::randn(0f32, 1.0, (v, d), &dev).unwrap() * 0.7).unwrap();
        let t: Vec<u32> = (0..n as u32).map(|i| (i * 7 + 3) % v as u32).collect();
        // Zero-weight rows (prompt tokens, padding) are skipped; weights need not be 0/1.
        let c = [1.0f32, 0.0, 2.0, 1.0, 0.0, 0.5, 1.0, 1.0, 0.0, 1.0];
        let want = composite(hv.as_tensor(), &w, &t, &c);
        let gw = want.backward().unwrap();
        let gw = gw.get(hv.as_tensor()).unwrap();
        for chunk_values in [3 * v, v, 1 << 22] {
            let got =
                linear_cross_entropy_chunked(hv.as_tensor(), &w, &t, &c, chunk_values).unwrap();
            let (a, b) = (
                got.to_scalar::<f32>().unwrap(),
                want.to_scalar::<f32>().unwrap(),
            );
            assert!((a - b).abs() < 1e-5 * b.abs(), "loss {a} vs {b}");
            let scaled = (got * 3.0).unwrap();
            let gg = scaled.backward().unwrap();
            let gg = (gg.get(hv.as_tensor()).unwrap() / 3.0).unwrap();
            let e = (&gg - gw)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(e < 1e-6, "chunk {chunk_values}: gradient differs by {e}");
            // Rows of weight 0 get exactly no gradient.
            let g4 = gg.get(4).unwrap().abs().unwrap().sum_all().unwrap();
            assert_eq!(g4.to_scalar::<f32>().unwrap(), 0.0);
            assert!(
                gg.get(0)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    > 0.0
            );
        }
        // Without a gradient the value is the same.
        let plain = linear_cross_entropy(&hv.as_tensor().detach(), &w, &t, &c).unwrap();
        let (a, b) = (
            plain.to_scalar::<f32>().unwrap(),
            want.to_scalar::<f32>().unwrap(),
        );
        assert!((a - b).abs() < 1e-5 * b.abs());
    }

    #[test]
    fn linear_cross_entropy_refuses_bad_input() {
        let dev = Device::Cpu;
        let h = Tensor::zeros((3, 4), DType::F32, &dev).unwrap();
        let w = Tensor::zeros((5, 4), DType::F32, &dev).unwrap();
        let e = linear_cross_entropy(&h, &w, &[0, 1, 7], &[1.0; 3]).unwrap_err();
        assert!(e.to_string().contains("target token 7"), "{e}");
        let e = linear_cross_entropy(&h, &w, &[0, 1, 2], &[0.0; 3]).unwrap_err();
        assert!(
            e.to_string().contains("no target token carries weight"),
            "{e}"
        );
        let e = linear_cross_entropy(&h, &w, &[0, 1, 2], &[1.0, f32::NAN, 1.0]).unwrap_err();
        assert!(e.to_string().contains("row 1"), "{e}");
        let w3 = Tensor::zeros((5, 3), DType::F32, &dev).unwrap();
        let e = linear_cross_entropy(&h, &w3, &[0, 1, 2], &[1.0; 3]).unwrap_err();
        assert!(e.to_string().contains("[5, 3]"), "{e}");
    }
}
