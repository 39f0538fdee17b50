//! What the block-level nodes share: a projection (frozen dense or NF4 base, bias, optional plain
//! LoRA) with its forward and backward, and an attention (q, k, v, out projections around the tiled
//! kernel, with grouped-query heads, RoPE and an additive mask) with what its backward keeps.

use super::{LinearPart, ProjBase};
use crate::nn::attention::{merge_heads, split_heads};
use crate::nn::flash::{attend_grads, attend_values, MaskVals};
use crate::nn::frozen::{add_assign, Frozen};
use crate::nn::gemm::gemm_acc;
use crate::nn::rope::{rope_values, RopeTables};
use candle_core::{Result, Tensor};
use std::sync::Arc;

/// A LoRA's (dA, dB), when it has one and they are asked for.
pub(super) type FactorGrads = Option<(Tensor, Tensor)>;

/// A projection with detached tensors.
pub(super) struct Lin {
    w: Frozen,
    bias: Option<Tensor>,
    /// (A, B, s).
    lora: Option<(Tensor, Tensor, f64)>,
}

impl Lin {
    pub(super) fn of(p: &LinearPart) -> Result<Self> {
        Ok(Self {
            w: match &p.base {
                ProjBase::Dense(w) => Frozen::Dense(w.detach().contiguous()?),
                ProjBase::Nf4(q) => Frozen::nf4(q)?,
            },
            bias: p
                .bias
                .as_ref()
                .map(|b| b.detach().contiguous())
                .transpose()?,
            lora: match &p.lora {
                Some(f) => Some((
                    f.a.detach().contiguous()?,
                    f.b.detach().contiguous()?,
                    f.scale,
                )),
                None => None,
            },
        })
    }

    fn out(&self) -> Result<usize> {
        Ok(self.w.out_in()?.0)
    }

    /// `residual + x2·Wᵀ + bias + s·(x2·Aᵀ)·Bᵀ` for x2 (m, in), and the LoRA hidden x2·Aᵀ.
    pub(super) fn fwd(
        &self,
        x2: &Tensor,
        residual: Option<&Tensor>,
    ) -> Result<(Tensor, Option<Tensor>)> {
        let (m, out) = (x2.dim(0)?, self.out()?);
        // The residual and the bias start the output; a dense base accumulates onto them.
        let start = match (residual, &self.bias) {
            (Some(r), Some(b)) => Some(r.broadcast_add(b)?),
            (Some(r), None) => Some(r.force_contiguous()?),
            (None, Some(b)) => Some(bias_rows(b, m, out)?),
            (None, None) => None,
        };
        let y = match (&self.w, start) {
            (Frozen::Dense(w), Some(y)) => {
                gemm_acc(&y, x2, false, w, true, 1.0)?;
                y
            }
            (w, Some(s)) => {
                let y = w.forward(x2)?;
                add_assign(&y, &s)?;
                y
            }
            (w, None) => w.forward(x2)?,
        };
        let h = match &self.lora {
            Some((a, b, s)) => {
                let h = x2.matmul(&a.t()?)?;
                gemm_acc(&y, &h, false, b, true, *s as f32)?;
                Some(h)
            }
            None => None,
        };
        Ok((y, h))
    }

    /// For the output gradient g (m, out), the layer's input `xin` (m, in) and its saved hidden:
    /// the input gradient `g·W + ĝ·A` (ĝ = s·g·B), summed into `acc` when given, when `want_in`;
    /// and (dA = ĝᵀ·xin, dB = s·gᵀ·h) when `want_f` and the layer has a LoRA.
    pub(super) fn bwd(
        &self,
        g: &Tensor,
        xin: &Tensor,
        h: Option<&Tensor>,
        acc: Option<&Tensor>,
        want_in: bool,
        want_f: bool,
    ) -> Result<(Option<Tensor>, FactorGrads)> {
        let gh = match &self.lora {
            Some((_, b, s)) if want_in || want_f => Some((g.matmul(b)? * *s)?),
            _ => None,
        };
        let din = if want_in {
            let d = match (acc, &self.w) {
                (Some(d), Frozen::Dense(w)) => {
                    gemm_acc(d, g, false, w, false, 1.0)?;
                    d.clone()
                }
                (Some(d), w) => {
                    add_assign(d, &w.input_grad(g)?)?;
                    d.clone()
                }
                (None, w) => w.input_grad(g)?,
            };
            if let (Some(gh), Some((a, _, _))) = (&gh, &self.lora) {
                gemm_acc(&d, gh, false, a, false, 1.0)?;
            }
            Some(d)
        } else {
            None
        };
        let f = match (&self.lora, &gh, h) {
            (Some((_, _, s)), Some(gh), Some(h)) if want_f => {
                Some((gh.t()?.matmul(xin)?, (g.t()?.matmul(h)? * *s)?))
            }
            _ => None,
        };
        Ok((din, f))
    }
}

/// The bias repeated over m rows, in a buffer of its own (for m = 1 the broadcast is already
/// contiguous and `contiguous` would share the model's bias).
fn bias_rows(b: &Tensor, m: usize, out: usize) -> Result<Tensor> {
    b.unsqueeze(0)?.broadcast_as((m, out))?.force_contiguous()
}

/// An attention's projections and what shapes its heads.
pub(super) struct Attn {
    pub(super) q: Lin,
    pub(super) k: Lin,
    pub(super) v: Lin,
    pub(super) out: Lin,
    pub(super) heads: usize,
    /// Key/value heads (dividing `heads`: grouped-query attention).
    pub(super) kv_heads: usize,
    /// RoPE on q and k.
    pub(super) rope: Option<Arc<RopeTables>>,
    /// An additive mask.
    pub(super) mask: Option<Arc<MaskVals>>,
}

/// What one attention keeps for the backward.
pub(super) struct AttnSaved {
    /// q (B, H, N, D), k and v (B, KVH, T, D) (q and k rotated), the output (B, H, N, D).
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Arc<Vec<f32>>,
    /// The LoRA hiddens of q, k, v, out.
    h: [Option<Tensor>; 4],
}

/// Batch, query tokens, key/value tokens.
#[derive(Clone, Copy)]
pub(super) struct Dims {
    pub(super) b: usize,
    pub(super) n: usize,
    pub(super) t: usize,
}

pub(super) fn to_candle(e: crate::Error) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// (b·len, H·D) → (b, H, len, D).
fn heads_of(t: &Tensor, b: usize, len: usize, heads: usize) -> Result<Tensor> {
    let w = t.dim(1)?;
    split_heads(&t.reshape((b, len, w))?, heads).map_err(to_candle)
}

/// (b, H, len, D) → (b·len, H·D).
fn rows_of(t: &Tensor) -> Result<Tensor> {
    let (b, h, len, d) = t.dims4()?;
    merge_heads(t).map_err(to_candle)?.reshape((b * len, h * d))
}

impl Attn {
    /// Whether any of its projections runs a LoRA.
    pub(super) fn adapted(&self) -> bool {
        [&self.q, &self.k, &self.v, &self.out]
            .iter()
            .any(|l| l.lora.is_some())
    }

    fn scale(&self) -> Result<f32> {
        let inner = self.q.out()?;
        Ok(1.0 / ((inner / self.heads.max(1)) as f32).sqrt())
    }

    /// `residual + out(attn(q(n), k(kv), v(kv)))` for n (B·N, C) and kv (B·T, C_kv).
    pub(super) fn fwd(
        &self,
        n: &Tensor,
        kv: &Tensor,
        residual: &Tensor,
        d: Dims,
    ) -> Result<(Tensor, AttnSaved)> {
        let (q, hq) = self.q.fwd(n, None)?;
        let (k, hk) = self.k.fwd(kv, None)?;
        let (v, hv) = self.v.fwd(kv, None)?;
        let mut q = heads_of(&q, d.b, d.n, self.heads)?;
        let mut k = heads_of(&k, d.b, d.t, self.kv_heads)?;
        let v = heads_of(&v, d.b, d.t, self.kv_heads)?;
        if let Some(r) = &self.rope {
            q = rope_values(&q, r, false)?;
            k = rope_values(&k, r, false)?;
        }
        let (o, lse) = attend_values(&q, &k, &v, self.scale()?, self.mask.as_ref())?;
        let (y, ho) = self.out.fwd(&rows_of(&o)?, Some(residual))?;
        Ok((
            y,
            AttnSaved {
                q,
                k,
                v,
                o,
                lse,
                h: [hq, hk, hv, ho],
            },
        ))
    }

    /// For the output gradient dy (B·N, C): the gradient of n (`None` unless `want_n`), of kv
    /// (summed into n's for a self-attention; `None` unless `want_kv`), and the four layers'
    /// factor gradients.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn bwd(
        &self,
        s: &AttnSaved,
        dy: &Tensor,
        n: &Tensor,
        kv: &Tensor,
        selfattn: bool,
        want_n: bool,
        want_kv: bool,
        want_f: bool,
        d: Dims,
    ) -> Result<(Option<Tensor>, Option<Tensor>, [FactorGrads; 4])> {
        let om = rows_of(&s.o)?;
        let (dom, fo) = self.out.bwd(dy, &om, s.h[3].as_ref(), None, true, want_f)?;
        drop(om);
        let Some(dom) = dom else {
            candle_core::bail!("attention block: no attention-output gradient");
        };
        let dom = heads_of(&dom, d.b, d.n, self.heads)?;
        let (mut dq, mut dk, dv) = attend_grads(
            &s.q,
            &s.k,
            &s.v,
            &s.o,
            &dom,
            self.scale()?,
            self.mask.as_ref(),
            s.lse.clone(),
        )?;
        drop(dom);
        if let Some(r) = &self.rope {
            dq = rope_values(&dq, r, true)?;
            dk = rope_values(&dk, r, true)?;
        }
        let (dq, dk, dv) = (rows_of(&dq)?, rows_of(&dk)?, rows_of(&dv)?);
        let (dn, fq) = self.q.bwd(&dq, n, s.h[0].as_ref(), None, want_n, want_f)?;
        let (dn, dkv, fk, fv) = if selfattn {
            let (dn, fk) = self
                .k
                .bwd(&dk, kv, s.h[1].as_ref(), dn.as_ref(), want_n, want_f)?;
            let (dn, fv) = self
                .v
                .bwd(&dv, kv, s.h[2].as_ref(), dn.as_ref(), want_n, want_f)?;
            (dn, None, fk, fv)
        } else {
            let (dkv, fk) = self
                .k
                .bwd(&dk, kv, s.h[1].as_ref(), None, want_kv, want_f)?;
            let (dkv, fv) = self
                .v
                .bwd(&dv, kv, s.h[2].as_ref(), dkv.as_ref(), want_kv, want_f)?;
            (dn, dkv, fk, fv)
        };
        Ok((dn, dkv, [fq, fk, fv, fo]))
    }
}

/// Flattens the factor gradients in order and checks them against the packed sizes.
pub(super) fn pack_grads(
    grads: impl IntoIterator<Item = FactorGrads>,
    sizes: &[usize],
    node: &str,
) -> Result<Tensor> {
    let mut flat = vec![];
    for (da, db) in grads.into_iter().flatten() {
        flat.push(da.flatten_all()?);
        flat.push(db.flatten_all()?);
    }
    let got: Vec<usize> = flat.iter().map(Tensor::elem_count).collect();
    if got != sizes {
        candle_core::bail!("{node}: factor gradients of {got:?} values, not {sizes:?}");
    }
    Tensor::cat(&flat, 0)
}
