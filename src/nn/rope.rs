//! Positions: rotary position embedding (one node with a CPU backward, and its composition) and the
//! sinusoidal timestep embedding of diffusion models.

use super::kernels::f32_slice;
use crate::Result;
use candle_core::{DType, Tensor, D};

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
    let tables = rope_tables(positions, inv_freq)?;
    if !x.device().is_cpu() || x.dtype() != DType::F32 {
        return rope_composite(x, &tables);
    }
    Ok(x.contiguous()?.apply_op1(RopeOp {
        tables,
        inverse: false,
    })?)
}

/// The rotation of a contiguous CPU f32 `x` (B, H, T, D) by the tables' angles (by their negatives
/// when `inverse`: the backward), recording no graph (for nodes with their own backward).
pub(super) fn rope_values(
    x: &Tensor,
    tables: &std::sync::Arc<RopeTables>,
    inverse: bool,
) -> candle_core::Result<Tensor> {
    x.apply_op1_no_bwd(&RopeOp {
        tables: tables.clone(),
        inverse,
    })
}

/// The cos/sin tables of `positions` (B, T) for the frequencies θ.
pub(super) fn rope_tables(
    positions: &Tensor,
    inv_freq: &[f32],
) -> Result<std::sync::Arc<RopeTables>> {
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
    Ok(std::sync::Arc::new(RopeTables {
        pos,
        cos,
        sin,
        half,
    }))
}

/// Per-position cos and sin of the rotation angles.
pub(super) struct RopeTables {
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
