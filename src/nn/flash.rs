//! Tiled scaled dot-product attention on the CPU (the FlashAttention idea, Dao et al. 2022, in our
//! own f32 kernel): `softmax(scale·q·kᵀ + mask)·v` as one node whose forward and backward walk over
//! blocks of query rows and never hold the Tq×Tk score or probability matrix. A block's scores are
//! a `rows × Tk` strip in a per-thread scratch buffer; the forward keeps only the output and each
//! row's maximum `m` and `1/Σ exp(S − m)`, and the backward recomputes the strip's probabilities
//! `P = exp(S − m)/Σ` from them. (A single log-sum-exp `m + ln Σ` would lose `ln Σ` to rounding
//! on a row whose keys are all masked by a large finite negative, as transformers' masks are.) Key/value heads may be fewer than query heads (grouped-query attention): query head
//! `i` reads key/value head `i / (H / KVH)`, with no repeated copy, and the key and value gradients
//! of a group accumulate into one buffer with GEMM-accumulate.
//!
//! Backward, per block (D_i = Σ_j dO_ij·O_ij):
//! `dV += Pᵀ·dO`, `dS = P ⊙ (dO·Vᵀ − D)`, `dQ = scale·dS·K`, `dK += scale·dSᵀ·Q`.

use super::gemm::{gemm_into, Mat, Par};
use super::kernels::{cpu_f32, exp_shifted_in_place, f32_slice, fast_exp, row_max};
use candle_core::{CpuStorage, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::{Arc, Mutex};

/// Values per block strip: a block holds `rows × Tk` scores, `rows` chosen so a strip stays
/// within about 256 KiB (the L2 cache) while the GEMMs get enough rows.
const STRIP: usize = 65_536;

/// The attention node over contiguous CPU f32 q (B, H, Tq, D), k (B, KVH, Tk, D) and
/// v (B, KVH, Tk, Dv), with an additive mask (B or 1, 1, Tq, Tk) that carries no gradient.
/// Shapes are checked by the caller (`nn::attention::attention`).
pub(super) fn tiled_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let mask = mask.map(mask_vals).transpose()?;
    q.contiguous()?.apply_op3(
        &k.contiguous()?,
        &v.contiguous()?,
        TiledAttention {
            scale,
            mask,
            lse: Mutex::new(None),
        },
    )
}

/// The attention output and the per-row softmax statistics for contiguous CPU f32 q, k, v (and an
/// additive mask from [`mask_vals`]), recording no graph: for block-level nodes that keep the statistics for their own
/// backward ([`attend_grads`]). Shapes as [`tiled_attention`]'s.
pub(super) fn attend_values(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f32,
    mask: Option<&Arc<MaskVals>>,
) -> Result<(Tensor, Arc<Vec<f32>>)> {
    let op = TiledAttention {
        scale,
        mask: mask.cloned(),
        lse: Mutex::new(None),
    };
    let o = q.apply_op3_no_bwd(k, v, &op)?;
    let lse = match op.lse.lock() {
        Ok(slot) => slot.clone(),
        Err(_) => None,
    };
    match lse {
        Some(l) => Ok((o, l)),
        None => candle_core::bail!("tiled attention: the forward kept no statistics"),
    }
}

/// The gradients of q, k and v for the output gradient `go`, from the forward's output `o` and the
/// statistics [`attend_values`] returned.
#[allow(clippy::too_many_arguments)]
pub(super) fn attend_grads(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    o: &Tensor,
    go: &Tensor,
    scale: f32,
    mask: Option<&Arc<MaskVals>>,
    lse: Arc<Vec<f32>>,
) -> Result<(Tensor, Tensor, Tensor)> {
    use candle_core::CustomOp3;
    let op = TiledAttention {
        scale,
        mask: mask.cloned(),
        lse: Mutex::new(Some(lse)),
    };
    match op.bwd(q, k, v, o, go)? {
        (Some(dq), Some(dk), Some(dv)) => Ok((dq, dk, dv)),
        _ => candle_core::bail!("tiled attention: the backward gave no gradient"),
    }
}

/// An additive mask (B or 1, 1, Tq, Tk)'s values, read once.
pub(super) fn mask_vals(m: &Tensor) -> Result<Arc<MaskVals>> {
    Ok(Arc::new(MaskVals {
        values: m
            .to_dtype(candle_core::DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?,
        batch: m.dim(0)?,
    }))
}

/// An additive attention mask's values.
pub(super) struct MaskVals {
    values: Vec<f32>,
    /// 1: one mask shared by every batch row.
    batch: usize,
}

impl MaskVals {
    /// The mask row of query `qi` of batch row `bi`.
    fn row(&self, bi: usize, qi: usize, tq: usize, tk: usize) -> &[f32] {
        let r = (if self.batch == 1 { 0 } else { bi }) * tq + qi;
        &self.values[r * tk..(r + 1) * tk]
    }
}

struct TiledAttention {
    scale: f32,
    mask: Option<Arc<MaskVals>>,
    /// Each query row's maximum scaled, masked score and the inverse of its exponentials' sum,
    /// (B·H·Tq, 2), from the forward.
    lse: Mutex<Option<Arc<Vec<f32>>>>,
}

#[derive(Clone, Copy)]
struct Geo {
    b: usize,
    h: usize,
    kvh: usize,
    tq: usize,
    tk: usize,
    d: usize,
    dv: usize,
    /// Query rows per block.
    bq: usize,
}

impl Geo {
    fn of(q: &[usize], k: &[usize], v: &[usize]) -> Result<Self> {
        if q.len() != 4 || k.len() != 4 || v.len() != 4 {
            candle_core::bail!(
                "tiled attention: q, k, v must be (B, H, T, D), got {q:?}, {k:?}, {v:?}"
            );
        }
        let (b, h, tq, d) = (q[0], q[1], q[2], q[3]);
        let (kvh, tk, dv) = (k[1], k[2], v[3]);
        if k[0] != b
            || v[0] != b
            || k[3] != d
            || v[1] != kvh
            || v[2] != tk
            || kvh == 0
            || h % kvh != 0
        {
            candle_core::bail!("tiled attention: q {q:?}, k {k:?} and v {v:?} do not fit together");
        }
        Ok(Self {
            b,
            h,
            kvh,
            tq,
            tk,
            d,
            dv,
            bq: (STRIP / tk.max(1)).clamp(8, 128),
        })
    }
    fn rep(&self) -> usize {
        self.h / self.kvh
    }
    fn blocks(&self) -> usize {
        self.tq.div_ceil(self.bq)
    }
}

/// `s = scale·q_blk·kᵀ (+ mask)` for the query rows `q0..q0+rows` of head `bh`.
#[allow(clippy::too_many_arguments)]
fn scores(
    s: &mut [f32],
    q: &[f32],
    k: &[f32],
    g: &Geo,
    bh: usize,
    q0: usize,
    rows: usize,
    scale: f32,
    mask: Option<&MaskVals>,
    par: Par,
) -> Result<()> {
    let kh = (bh / g.h) * g.kvh + (bh % g.h) / g.rep();
    let qm = &q[(bh * g.tq + q0) * g.d..][..rows * g.d];
    let km = &k[kh * g.tk * g.d..][..g.tk * g.d];
    gemm_into(
        s,
        Mat::rm(qm, rows, g.d),
        Mat::rm(km, g.tk, g.d).t(),
        scale,
        false,
        par,
    )?;
    if let Some(m) = mask {
        let bi = bh / g.h;
        for (i, row) in s.chunks_exact_mut(g.tk.max(1)).enumerate() {
            for (x, mv) in row.iter_mut().zip(m.row(bi, q0 + i, g.tq, g.tk)) {
                *x += *mv;
            }
        }
    }
    Ok(())
}

/// A contiguous CPU f32 tensor's values, held for one pass.
fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> Result<R>) -> Result<R> {
    let (s, l) = t.storage_and_layout();
    f(cpu_f32(&s, l)?)
}

fn par_for(tasks: usize) -> Par {
    if tasks >= rayon::current_num_threads() {
        Par::Serial
    } else {
        Par::all()
    }
}

impl candle_core::CustomOp3 for TiledAttention {
    fn name(&self) -> &'static str {
        "tiled-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = Geo::of(ql.dims(), kl.dims(), vl.dims())?;
        let (q, k, v) = (
            f32_slice(qs, ql, "attention q")?,
            f32_slice(ks, kl, "attention k")?,
            f32_slice(vs, vl, "attention v")?,
        );
        let mut out = vec![0f32; g.b * g.h * g.tq * g.dv];
        let mut lse = vec![0f32; g.b * g.h * g.tq * 2];
        let mask = self.mask.as_deref();
        let scale = self.scale;
        let par = par_for(g.b * g.h * g.blocks());
        if g.tq > 0 {
            out.par_chunks_mut(g.tq * g.dv.max(1))
                .zip(lse.par_chunks_mut(g.tq * 2))
                .enumerate()
                .try_for_each(|(bh, (o, l))| {
                    o.par_chunks_mut(g.bq * g.dv.max(1))
                        .zip(l.par_chunks_mut(g.bq * 2))
                        .enumerate()
                        .try_for_each_init(
                            || vec![0f32; g.bq * g.tk],
                            |strip, (qb, (ob, lb))| -> Result<()> {
                                let (q0, rows) = (qb * g.bq, lb.len() / 2);
                                let s = &mut strip[..rows * g.tk];
                                scores(s, q, k, &g, bh, q0, rows, scale, mask, par)?;
                                for (row, li) in
                                    s.chunks_exact_mut(g.tk.max(1)).zip(lb.chunks_exact_mut(2))
                                {
                                    let mx = row_max(row);
                                    if mx == f32::NEG_INFINITY {
                                        // Every key masked by −∞: the row attends to nothing.
                                        row.fill(0.0);
                                        li[0] = f32::NEG_INFINITY;
                                        li[1] = 0.0;
                                    } else {
                                        let inv = 1.0 / exp_shifted_in_place(row, mx);
                                        row.iter_mut().for_each(|x| *x *= inv);
                                        li[0] = mx;
                                        li[1] = inv;
                                    }
                                }
                                if g.tk == 0 {
                                    lb.fill(0.0);
                                }
                                let kh = (bh / g.h) * g.kvh + (bh % g.h) / g.rep();
                                let vm = &v[kh * g.tk * g.dv..][..g.tk * g.dv];
                                gemm_into(
                                    &mut ob[..rows * g.dv],
                                    Mat::rm(s, rows, g.tk),
                                    Mat::rm(vm, g.tk, g.dv),
                                    1.0,
                                    false,
                                    par,
                                )
                            },
                        )
                })?;
        }
        if let Ok(mut slot) = self.lse.lock() {
            *slot = Some(Arc::new(lse));
        }
        Ok((CpuStorage::F32(out), Shape::from((g.b, g.h, g.tq, g.dv))))
    }

    fn bwd(
        &self,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
        res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = Geo::of(q.dims(), k.dims(), v.dims())?;
        let lse = match self.lse.lock() {
            Ok(slot) => slot.clone(),
            Err(_) => None,
        };
        let Some(lse) = lse else {
            candle_core::bail!("tiled attention: backward before forward");
        };
        let grad = grad.contiguous()?;
        let res = res.contiguous()?;
        let rep = g.rep();
        let mut dq = vec![0f32; g.b * g.h * g.tq * g.d];
        let mut dk = vec![0f32; g.b * g.kvh * g.tk * g.d];
        let mut dv = vec![0f32; g.b * g.kvh * g.tk * g.dv];
        let mask = self.mask.as_deref();
        let scale = self.scale;
        let par = par_for(g.b * g.kvh);
        with_f32(q, |q| {
            with_f32(k, |k| {
                with_f32(v, |v| {
                    with_f32(&res, |o| {
                        with_f32(&grad, |go| {
                            dk.par_chunks_mut((g.tk * g.d).max(1))
                                .zip(dv.par_chunks_mut((g.tk * g.dv).max(1)))
                                .zip(dq.par_chunks_mut((rep * g.tq * g.d).max(1)))
                                .enumerate()
                                .try_for_each_init(
                                    || (vec![0f32; g.bq * g.tk], vec![0f32; g.bq * g.tk]),
                                    |(p, dp), (gi, ((dkc, dvc), dqc))| -> Result<()> {
                                        let km = &k[gi * g.tk * g.d..][..g.tk * g.d];
                                        let vm = &v[gi * g.tk * g.dv..][..g.tk * g.dv];
                                        let (bi, kh) = (gi / g.kvh, gi % g.kvh);
                                        let mut first = true;
                                        for r in 0..rep {
                                            let bh = bi * g.h + kh * rep + r;
                                            for qb in 0..g.blocks() {
                                                let q0 = qb * g.bq;
                                                let rows = g.bq.min(g.tq - q0);
                                                let (p, dp) =
                                                    (&mut p[..rows * g.tk], &mut dp[..rows * g.tk]);
                                                scores(
                                                    p, q, k, &g, bh, q0, rows, scale, mask, par,
                                                )?;
                                                let lrow = &lse[(bh * g.tq + q0) * 2..][..rows * 2];
                                                for (row, li) in p
                                                    .chunks_exact_mut(g.tk.max(1))
                                                    .zip(lrow.chunks_exact(2))
                                                {
                                                    let (mx, inv) = (li[0], li[1]);
                                                    if mx == f32::NEG_INFINITY {
                                                        row.fill(0.0);
                                                    } else {
                                                        row.iter_mut().for_each(|x| {
                                                            *x = fast_exp(*x - mx) * inv
                                                        });
                                                    }
                                                }
                                                let om =
                                                    &o[(bh * g.tq + q0) * g.dv..][..rows * g.dv];
                                                let gom =
                                                    &go[(bh * g.tq + q0) * g.dv..][..rows * g.dv];
                                                let qm = &q[(bh * g.tq + q0) * g.d..][..rows * g.d];
                                                // dP = dO·Vᵀ, then dS = P ⊙ (dP − D) in place.
                                                gemm_into(
                                                    dp,
                                                    Mat::rm(gom, rows, g.dv),
                                                    Mat::rm(vm, g.tk, g.dv).t(),
                                                    1.0,
                                                    false,
                                                    par,
                                                )?;
                                                for i in 0..rows {
                                                    let di: f32 = gom[i * g.dv..(i + 1) * g.dv]
                                                        .iter()
                                                        .zip(&om[i * g.dv..(i + 1) * g.dv])
                                                        .map(|(a, b)| a * b)
                                                        .sum();
                                                    let (pr, dr) = (
                                                        &p[i * g.tk..(i + 1) * g.tk],
                                                        &mut dp[i * g.tk..(i + 1) * g.tk],
                                                    );
                                                    for (d, p) in dr.iter_mut().zip(pr) {
                                                        *d = *p * (*d - di);
                                                    }
                                                }
                                                gemm_into(
                                                    dvc,
                                                    Mat::rm(p, rows, g.tk).t(),
                                                    Mat::rm(gom, rows, g.dv),
                                                    1.0,
                                                    !first,
                                                    par,
                                                )?;
                                                gemm_into(
                                                    &mut dqc[(r * g.tq + q0) * g.d..][..rows * g.d],
                                                    Mat::rm(dp, rows, g.tk),
                                                    Mat::rm(km, g.tk, g.d),
                                                    scale,
                                                    false,
                                                    par,
                                                )?;
                                                gemm_into(
                                                    dkc,
                                                    Mat::rm(dp, rows, g.tk).t(),
                                                    Mat::rm(qm, rows, g.d),
                                                    scale,
                                                    !first,
                                                    par,
                                                )?;
                                                first = false;
                                            }
                                        }
                                        if first {
                                            // No query rows: nothing flows to the keys and values.
                                            dkc.fill(0.0);
                                            dvc.fill(0.0);
                                        }
                                        Ok(())
                                    },
                                )
                        })
                    })
                })
            })
        })?;
        let dev = Device::Cpu;
        Ok((
            Some(Tensor::from_vec(dq, (g.b, g.h, g.tq, g.d), &dev)?),
            Some(Tensor::from_vec(dk, (g.b, g.kvh, g.tk, g.d), &dev)?),
            Some(Tensor::from_vec(dv, (g.b, g.kvh, g.tk, g.dv), &dev)?),
        ))
    }
}
