//! The transformer-block node: its forward (values with no graph, and what the backward keeps)
//! and its backward.

use super::attn::{pack_grads, Attn, AttnSaved, Dims, Lin};
use super::{BlockParts, LnPart};
use crate::nn::act::{geglu_grad, geglu_values};
use crate::nn::frozen::take_result;
use crate::nn::norm::{layer_norm_values, norm_grad_acc, RowNorm};
use candle_core::{CpuStorage, Layout, Result, Shape, Tensor};
use std::sync::{Arc, Mutex};

struct Ln {
    w: Tensor,
    b: Tensor,
    eps: f64,
}

impl Ln {
    fn of(p: &LnPart) -> Result<Self> {
        Ok(Self {
            w: p.weight.detach().contiguous()?,
            b: p.bias.detach().contiguous()?,
            eps: p.eps,
        })
    }
    fn fwd(&self, x2: &Tensor) -> Result<Tensor> {
        layer_norm_values(x2, &self.w, &self.b, self.eps)
    }
    /// `dst += ∂LN/∂x · g`.
    fn bwd_acc(&self, dst: &Tensor, g: &Tensor, x2: &Tensor) -> Result<()> {
        norm_grad_acc(dst, g, x2, &self.w, self.eps, RowNorm::Layer)
    }
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
    let d = Dims { b, n, t };
    let attn = |a: &super::AttnPart| -> Result<Attn> {
        Ok(Attn {
            q: Lin::of(&a.q)?,
            k: Lin::of(&a.k)?,
            v: Lin::of(&a.v)?,
            out: Lin::of(&a.out)?,
            heads: p.heads,
            kv_heads: p.heads,
            rope: None,
            mask: None,
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
        let dh = g.force_contiguous()?;
        if let Some(dn3) = dn3 {
            p.norms[2].bwd_acc(&dh, &dn3, &s.h2)?;
        }
        // The gradient reaching h1 is needed for x's or attn1's factors; attn2's backward also
        // for the context's or its own factors (the first block of a LoRA run needs neither).
        let need_h1 = want_x || (want_f && p.attn1.adapted());
        let need_attn2 = need_h1 || want_c || (want_f && p.attn2.adapted());
        // Cross-attention: h2 = h1 + attn2(LN2(h1), context).
        let (mut dctx, mut f2) = (None, Default::default());
        if need_attn2 {
            let n2 = p.norms[1].fwd(&s.h1)?;
            let (dn2, dc, f) = p
                .attn2
                .bwd(&s.s2, &dh, &n2, &c2, false, need_h1, want_c, want_f, d)?;
            (dctx, f2) = (dc, f);
            if let Some(dn2) = dn2 {
                p.norms[1].bwd_acc(&dh, &dn2, &s.h1)?;
            }
        }
        // Self-attention: h1 = x + attn1(LN1(x)).
        let (mut dx, mut f1) = (None, Default::default());
        if need_h1 {
            let n1 = p.norms[0].fwd(&x2)?;
            let (dn1, _, f) = p.attn1.bwd(
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
            f1 = f;
            if let (Some(dn1), true) = (dn1, want_x) {
                p.norms[0].bwd_acc(&dh, &dn1, &x2)?;
                dx = Some(dh.reshape(x.dims())?);
            }
        }
        let dctx = match dctx {
            Some(t) => Some(t.reshape(context.dims())?),
            None => None,
        };
        let dpacked = if want_f {
            let all = f1.into_iter().chain(f2).chain([f_proj, f_out]);
            Some(pack_grads(all, &self.sizes, "transformer-block")?)
        } else {
            None
        };
        Ok((dx, dctx, dpacked))
    }
}
