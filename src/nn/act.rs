//! Gated activations: GEGLU with the exact (erf) GELU and SwiGLU, each as one node with a CPU
//! backward; the composition of candle ops elsewhere.

use super::kernels::{f32_slice, fast_erf, fast_exp, rows_per_task};
use crate::Result;
use candle_core::{DType, Tensor, D};

pub(super) fn sigmoid(v: f32) -> f32 {
    1.0 / (1.0 + fast_exp(-v))
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

/// GEGLU's values for a contiguous CPU f32 `p`, recording no graph (for nodes with their own
/// backward).
pub(super) fn geglu_values(p: &Tensor) -> candle_core::Result<Tensor> {
    p.apply_op1_no_bwd(&GegluOp)
}

/// The gradient of `p` for GEGLU's output gradient `g` (contiguous CPU f32).
pub(super) fn geglu_grad(g: &Tensor, p: &Tensor) -> candle_core::Result<Tensor> {
    g.apply_op2_no_bwd(p, &GegluBwd)
}

const FRAC_1_SQRT_2PI: f32 = 0.398_942_3;

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

/// `silu(gate) ⊙ up` for contiguous CPU f32 tensors of one shape, recording no graph (for nodes
/// with their own backward).
pub(super) fn swiglu_values(gate: &Tensor, up: &Tensor) -> candle_core::Result<Tensor> {
    gate.apply_op2_no_bwd(up, &SwigluOp)
}

/// (d gate, d up) of [`swiglu_values`] for the output gradient `d`, in one pass.
pub(super) fn swiglu_grads(
    d: &Tensor,
    gate: &Tensor,
    up: &Tensor,
) -> candle_core::Result<(Tensor, Tensor)> {
    let packed = d.contiguous()?.apply_op3_no_bwd(gate, up, &SwigluBwd)?;
    let n = gate.elem_count();
    Ok((
        packed.narrow(0, 0, n)?.reshape(gate.shape())?,
        packed.narrow(0, n, n)?.reshape(up.shape())?,
    ))
}

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
