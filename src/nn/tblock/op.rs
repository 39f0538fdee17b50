//! The transformer-block node: its forward (values with no graph, and what the backward keeps)
//! and its backward.

use super::{BlockParts, LinearPart, LnPart};
use crate::nn::act::{geglu_grad, geglu_values};
use crate::nn::attention::{merge_heads, split_heads};
use crate::nn::flash::{attend_grads, attend_values};
use crate::nn::frozen::take_result;
use crate::nn::gemm::gemm_acc;
use crate::nn::norm::{layer_norm_grad_acc, layer_norm_values};
use candle_core::{CpuStorage, Layout, Result, Shape, Tensor};
use std::sync::{Arc, Mutex};

/// A LoRA's (dA, dB), when it has one and they are asked for.
type FactorGrads = Option<(Tensor, Tensor)>;

/// A projection with detached tensors.
struct Lin {
    w: Tensor,
    bias: Option<Tensor>,
    /// (A, B, s).
    lora: Option<(Tensor, Tensor, f64)>,
}

impl Lin {
    fn of(p: &LinearPart) -> Result<Self> {
        Ok(Self {
            w: p.weight.detach().contiguous()?,
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

    /// `residual + x2·Wᵀ + bias + s·(x2·Aᵀ)·Bᵀ` for x2 (m, in), and the LoRA hidden x2·Aᵀ.
    fn fwd(&self, x2: &Tensor, residual: Option<&Tensor>) -> Result<(Tensor, Option<Tensor>)> {
        let (m, out) = (x2.dim(0)?, self.w.dim(0)?);
        let y = match (residual, &self.bias) {
            (Some(r), Some(b)) => r.broadcast_add(b)?,
            (Some(r), None) => r.copy()?,
            (None, Some(b)) => b.unsqueeze(0)?.broadcast_as((m, out))?.contiguous()?,
            (None, None) => x2.matmul(&self.w.t()?)?,
        };
        if residual.is_some() || self.bias.is_some() {
            gemm_acc(&y, x2, false, &self.w, true, 1.0)?;
        }
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
    fn bwd(
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
            let d = match acc {
                Some(d) => {
                    gemm_acc(d, g, false, &self.w, false, 1.0)?;
                    d.clone()
                }
                None => g.matmul(&self.w)?,
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

struct Ln {
    w: Tensor,
    b: Tensor,
    wv: Vec<f32>,
    eps: f64,
}

impl Ln {
    fn of(p: &LnPart) -> Result<Self> {
        let w = p.weight.detach().contiguous()?;
        Ok(Self {
            wv: w.to_vec1::<f32>()?,
            w,
            b: p.bias.detach().contiguous()?,
            eps: p.eps,
        })
    }
    fn fwd(&self, x2: &Tensor) -> Result<Tensor> {
        layer_norm_values(x2, &self.w, &self.b, self.eps)
    }
    /// `dst += ∂LN/∂x · g`.
    fn bwd_acc(&self, dst: &Tensor, g: &Tensor, x2: &Tensor) -> Result<()> {
        layer_norm_grad_acc(dst, g, x2, &self.wv, self.eps)
    }
}

struct Attn {
    q: Lin,
    k: Lin,
    v: Lin,
    out: Lin,
}

/// What one attention keeps for the backward.
struct AttnSaved {
    /// q (B, H, N, D), k and v (B, H, T, D), the output (B, H, N, D).
    q: Tensor,
    k: Tensor,
    v: Tensor,
    o: Tensor,
    lse: Arc<Vec<f32>>,
    /// The LoRA hiddens of q, k, v, out.
    h: [Option<Tensor>; 4],
}

/// Batch, query tokens, key/value tokens, heads.
#[derive(Clone, Copy)]
struct Dims {
    b: usize,
    n: usize,
    t: usize,
    heads: usize,
}

impl Attn {
    fn scale(&self, heads: usize) -> Result<f32> {
        let inner = self.q.w.dim(0)?;
        Ok(1.0 / ((inner / heads.max(1)) as f32).sqrt())
    }

    /// `residual + out(attn(q(n), k(kv), v(kv)))` for n (B·N, C) and kv (B·T, C_kv).
    fn fwd(
        &self,
        n: &Tensor,
        kv: &Tensor,
        residual: &Tensor,
        d: Dims,
    ) -> Result<(Tensor, AttnSaved)> {
        let (q, hq) = self.q.fwd(n, None)?;
        let (k, hk) = self.k.fwd(kv, None)?;
        let (v, hv) = self.v.fwd(kv, None)?;
        let inner = q.dim(1)?;
        let heads = |t: Tensor, len: usize| -> Result<Tensor> {
            split_heads(&t.reshape((d.b, len, inner))?, d.heads).map_err(to_candle)
        };
        let (q, k, v) = (heads(q, d.n)?, heads(k, d.t)?, heads(v, d.t)?);
        let (o, lse) = attend_values(&q, &k, &v, self.scale(d.heads)?)?;
        let om = merge_heads(&o)
            .map_err(to_candle)?
            .reshape((d.b * d.n, inner))?;
        let (y, ho) = self.out.fwd(&om, Some(residual))?;
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
    fn bwd(
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
        let inner = self.q.w.dim(0)?;
        let om = merge_heads(&s.o)
            .map_err(to_candle)?
            .reshape((d.b * d.n, inner))?;
        let (dom, fo) = self.out.bwd(dy, &om, s.h[3].as_ref(), None, true, want_f)?;
        drop(om);
        let Some(dom) = dom else {
            candle_core::bail!("transformer-block: no attention-output gradient");
        };
        let dom = split_heads(&dom.reshape((d.b, d.n, inner))?, d.heads).map_err(to_candle)?;
        let (dq, dk, dv) = attend_grads(
            &s.q,
            &s.k,
            &s.v,
            &s.o,
            &dom,
            self.scale(d.heads)?,
            s.lse.clone(),
        )?;
        drop(dom);
        let flat = |t: Tensor, len: usize| -> Result<Tensor> {
            merge_heads(&t)
                .map_err(to_candle)?
                .reshape((d.b * len, inner))
        };
        let (dq, dk, dv) = (flat(dq, d.n)?, flat(dk, d.t)?, flat(dv, d.t)?);
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

fn to_candle(e: crate::Error) -> candle_core::Error {
    candle_core::Error::Msg(e.to_string())
}

/// Runs the block's forward and returns its output as a node over (x, context, packed).
pub(super) fn run(
    x: &Tensor,
    context: &Tensor,
    packed: &Tensor,
    p: &BlockParts,
    sizes: Vec<usize>,
) -> Result<Tensor> {
    let (b, n, c) = x.dims3()?;
    let (_, t, cc) = context.dims3()?;
    let d = Dims {
        b,
        n,
        t,
        heads: p.heads,
    };
    let attn = |a: &super::AttnPart| -> Result<Attn> {
        Ok(Attn {
            q: Lin::of(&a.q)?,
            k: Lin::of(&a.k)?,
            v: Lin::of(&a.v)?,
            out: Lin::of(&a.out)?,
        })
    };
    let parts = Parts {
        norms: [Ln::of(&p.norm1)?, Ln::of(&p.norm2)?, Ln::of(&p.norm3)?],
        attn1: attn(&p.attn1)?,
        attn2: attn(&p.attn2)?,
        ff_proj: Lin::of(&p.ff_proj)?,
        ff_out: Lin::of(&p.ff_out)?,
    };
    // Inference (no input asks for a gradient) keeps nothing and records no node.
    let keep = x.track_op() || context.track_op() || packed.track_op();
    let x2 = x.detach().contiguous()?.reshape((b * n, c))?;
    let c2 = context.detach().contiguous()?.reshape((b * t, cc))?;
    let n1 = parts.norms[0].fwd(&x2)?;
    let (h1, s1) = parts.attn1.fwd(&n1, &n1, &x2, Dims { t: n, ..d })?;
    let s1 = keep.then_some(s1);
    drop(n1);
    let n2 = parts.norms[1].fwd(&h1)?;
    let (h2, s2) = parts.attn2.fwd(&n2, &c2, &h1, d)?;
    let s2 = keep.then_some(s2);
    drop(n2);
    let n3 = parts.norms[2].fwd(&h2)?;
    let (pr, hp) = parts.ff_proj.fwd(&n3, None)?;
    drop(n3);
    let gg = geglu_values(&pr)?;
    let (y, ho) = parts.ff_out.fwd(&gg, Some(&h2))?;
    drop(gg);
    let y = y.reshape((b, n, c))?;
    let (Some(s1), Some(s2)) = (s1, s2) else {
        return Ok(y);
    };
    let op = BlockOp {
        parts,
        dims: d,
        sizes,
        saved: Saved {
            s1,
            s2,
            h1,
            h2,
            pr,
            hp,
            ho,
        },
        y: Mutex::new(Some(y)),
    };
    x.apply_op3_arc(context, packed, Arc::new(Box::new(op)))
}

struct Parts {
    norms: [Ln; 3],
    attn1: Attn,
    attn2: Attn,
    ff_proj: Lin,
    ff_out: Lin,
}

struct Saved {
    s1: AttnSaved,
    s2: AttnSaved,
    /// The residual sums after each attention (B·N, C).
    h1: Tensor,
    h2: Tensor,
    /// The GEGLU input (B·N, 2·inner) and the feed-forward LoRA hiddens.
    pr: Tensor,
    hp: Option<Tensor>,
    ho: Option<Tensor>,
}

struct BlockOp {
    parts: Parts,
    dims: Dims,
    /// Element counts of the packed factors (A then B of each adapted projection, in order).
    sizes: Vec<usize>,
    saved: Saved,
    y: Mutex<Option<Tensor>>,
}

impl candle_core::CustomOp3 for BlockOp {
    fn name(&self) -> &'static str {
        "transformer-block"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        take_result(&self.y, "transformer-block")
    }

    fn bwd(
        &self,
        x: &Tensor,
        context: &Tensor,
        packed: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (p, s, d) = (&self.parts, &self.saved, self.dims);
        let (want_x, want_c) = (x.track_op(), context.track_op());
        let want_f = packed.track_op() && packed.elem_count() > 0;
        let c = x.dim(2)?;
        let cc = context.dim(2)?;
        let x2 = x.detach().contiguous()?.reshape((d.b * d.n, c))?;
        let c2 = context.detach().contiguous()?.reshape((d.b * d.t, cc))?;
        let g = grad.contiguous()?.reshape((d.b * d.n, c))?;
        // Feed-forward: y = h2 + ff_out(geglu(ff_proj(LN3(h2)))).
        let gg = geglu_values(&s.pr)?;
        let (dgg, f_out) = p.ff_out.bwd(&g, &gg, s.ho.as_ref(), None, true, want_f)?;
        drop(gg);
        let Some(dgg) = dgg else {
            candle_core::bail!("transformer-block: no GEGLU gradient");
        };
        let dpr = geglu_grad(&dgg, &s.pr)?;
        drop(dgg);
        let n3 = p.norms[2].fwd(&s.h2)?;
        let (dn3, f_proj) = p
            .ff_proj
            .bwd(&dpr, &n3, s.hp.as_ref(), None, true, want_f)?;
        drop((dpr, n3));
        let dh = g.copy()?;
        if let Some(dn3) = dn3 {
            p.norms[2].bwd_acc(&dh, &dn3, &s.h2)?;
        }
        // Cross-attention: h2 = h1 + attn2(LN2(h1), context).
        let n2 = p.norms[1].fwd(&s.h1)?;
        let (dn2, dctx, f2) = p
            .attn2
            .bwd(&s.s2, &dh, &n2, &c2, false, true, want_c, want_f, d)?;
        drop(n2);
        if let Some(dn2) = dn2 {
            p.norms[1].bwd_acc(&dh, &dn2, &s.h1)?;
        }
        // Self-attention: h1 = x + attn1(LN1(x)).
        let n1 = p.norms[0].fwd(&x2)?;
        let (dn1, _, f1) = p.attn1.bwd(
            &s.s1,
            &dh,
            &n1,
            &n1,
            true,
            want_x,
            false,
            want_f,
            Dims { t: d.n, ..d },
        )?;
        drop(n1);
        let dx = match dn1 {
            Some(dn1) if want_x => {
                p.norms[0].bwd_acc(&dh, &dn1, &x2)?;
                Some(dh.reshape(x.dims())?)
            }
            _ => None,
        };
        let dctx = match dctx {
            Some(t) => Some(t.reshape(context.dims())?),
            None => None,
        };
        let dpacked = if want_f {
            let mut flat = vec![];
            let all = f1.into_iter().chain(f2).chain([f_proj, f_out]);
            for (da, db) in all.flatten() {
                flat.push(da.flatten_all()?);
                flat.push(db.flatten_all()?);
            }
            let got: Vec<usize> = flat.iter().map(Tensor::elem_count).collect();
            if got != self.sizes {
                candle_core::bail!(
                    "transformer-block: factor gradients of {got:?} values, not {:?}",
                    self.sizes
                );
            }
            Some(Tensor::cat(&flat, 0)?)
        } else {
            None
        };
        Ok((dx, dctx, dpacked))
    }
}
