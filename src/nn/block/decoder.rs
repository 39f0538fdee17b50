//! A Llama / Mistral / Qwen2 decoder layer as two nodes with their own backward, one per residual
//! half:
//!
//! ```text
//! h' = h  + o(attn(rope(q(n)), rope(k(n)), v(n), mask))     n  = RMSNorm₁(h)
//! y  = h' + down(silu(gate(n')) ⊙ up(n'))                   n' = RMSNorm₂(h')
//! ```
//!
//! Each projection is a frozen dense or NF4 base (with Qwen2's q/k/v biases or `mlp_bias`) and an
//! optional plain LoRA; grouped-query heads are read in place. A half keeps for its backward only
//! what it cannot cheaply recompute: the rotated q and k, v, the attention output and its softmax
//! statistics; the gate and up pre-activations; the LoRA hiddens. The norm's output is recomputed
//! from h, and the product that feeds `down` from the pre-activations. The residual (and the bias)
//! start the last projection's output buffer; the input gradient starts as the residual's, and the
//! norm's share and every projection's (their LoRAs' included) are summed into it. Training
//! forwards only (no KV cache, no S²-Attn): the caller composes the rest.

use super::attn::{pack_grads, to_candle, Attn, AttnSaved, Dims, FactorGrads, Lin};
use super::{check_linear, frozen_miss, linear_ok, pack, AttnPart, LinearPart};
use crate::nn::act::{swiglu_grads, swiglu_values};
use crate::nn::flash::mask_vals;
use crate::nn::frozen::take_result;
use crate::nn::norm::{norm_grad_acc, rms_norm_values, RowNorm};
use crate::nn::rope::rope_tables;
use candle_core::{CpuStorage, Layout, Result, Shape, Tensor};
use std::sync::{Arc, Mutex};

/// The parts of one decoder layer's attention half.
#[derive(Clone)]
pub struct DecoderAttnParts {
    /// `input_layernorm.weight` (frozen).
    pub norm_weight: Tensor,
    /// RMSNorm ε.
    pub eps: f64,
    /// `q_proj`, `k_proj`, `v_proj`, `o_proj`.
    pub attn: AttnPart,
    /// Query heads.
    pub heads: usize,
    /// Key/value heads.
    pub kv_heads: usize,
}

/// The parts of one decoder layer's MLP half.
#[derive(Clone)]
pub struct DecoderMlpParts {
    /// `post_attention_layernorm.weight` (frozen).
    pub norm_weight: Tensor,
    /// RMSNorm ε.
    pub eps: f64,
    /// `gate_proj`, `up_proj` (intermediate, hidden), `down_proj` (hidden, intermediate).
    pub gate: LinearPart,
    /// `up_proj`.
    pub up: LinearPart,
    /// `down_proj`.
    pub down: LinearPart,
}

fn bad_shape(h: &Tensor, what: String) -> candle_core::Error {
    candle_core::Error::Msg(format!("decoder layer: {what} (hidden {:?})", h.dims()))
}

/// `h + self_attn(input_layernorm(h))` for h (B, T, D), positions (B, T), RoPE's frequencies and
/// an additive mask (B or 1, 1, T, T), as one node; `None` when it cannot be taken (off the CPU or
/// f32, a trained norm, weight or bias), and the caller composes it.
pub fn decoder_attention(
    h: &Tensor,
    p: &DecoderAttnParts,
    positions: &Tensor,
    inv_freq: &[f32],
    mask: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    let a = &p.attn;
    let linears = [&a.q, &a.k, &a.v, &a.out];
    if !super::on_cpu_f32(h) || frozen_miss(&p.norm_weight) || !linears.iter().all(|l| linear_ok(l))
    {
        return Ok(None);
    }
    let (b, t, dm) = h.dims3()?;
    let hd = 2 * inv_freq.len();
    let heads = format!(
        "{} heads, {} key/value heads, head width {hd}",
        p.heads, p.kv_heads
    );
    if p.heads == 0 || p.kv_heads == 0 || !p.heads.is_multiple_of(p.kv_heads) {
        return Err(bad_shape(
            h,
            format!("the key/value heads do not divide the heads ({heads})"),
        ));
    }
    let (qw, kw) = (p.heads * hd, p.kv_heads * hd);
    let want = [(qw, dm), (kw, dm), (kw, dm), (dm, qw)];
    for ((l, oi), name) in linears
        .iter()
        .zip(want)
        .zip(["q_proj", "k_proj", "v_proj", "o_proj"])
    {
        check_linear(l, oi, name).map_err(|e| bad_shape(h, format!("{e} ({heads})")))?;
    }
    if positions.dims() != [b, t] {
        return Err(bad_shape(h, format!("positions {:?}", positions.dims())));
    }
    if let Some(m) = mask {
        let md = m.dims();
        if md.len() != 4 || !(md[0] == b || md[0] == 1) || md[1] != 1 || md[2] != t || md[3] != t {
            return Err(bad_shape(
                h,
                format!("mask {md:?} is not (B or 1, 1, {t}, {t})"),
            ));
        }
    }
    let half = Half::Attn(Attn {
        q: Lin::of(&a.q)?,
        k: Lin::of(&a.k)?,
        v: Lin::of(&a.v)?,
        out: Lin::of(&a.out)?,
        heads: p.heads,
        kv_heads: p.kv_heads,
        rope: Some(rope_tables(positions, inv_freq).map_err(to_candle)?),
        mask: mask.map(mask_vals).transpose()?,
    });
    run(h, &p.norm_weight, p.eps, half, &linears).map(Some)
}

/// `h + mlp(post_attention_layernorm(h))` for h (B, T, D), as one node; `None` when it cannot be
/// taken, and the caller composes it.
pub fn decoder_mlp(h: &Tensor, p: &DecoderMlpParts) -> Result<Option<Tensor>> {
    let linears = [&p.gate, &p.up, &p.down];
    if !super::on_cpu_f32(h) || frozen_miss(&p.norm_weight) || !linears.iter().all(|l| linear_ok(l))
    {
        return Ok(None);
    }
    let dm = h.dim(2)?;
    let i = p.gate.out_in().first().copied().unwrap_or(0);
    let want = [(i, dm), (i, dm), (dm, i)];
    for ((l, oi), name) in linears
        .iter()
        .zip(want)
        .zip(["gate_proj", "up_proj", "down_proj"])
    {
        check_linear(l, oi, name).map_err(|e| bad_shape(h, e))?;
    }
    let half = Half::Mlp([Lin::of(&p.gate)?, Lin::of(&p.up)?, Lin::of(&p.down)?]);
    run(h, &p.norm_weight, p.eps, half, &linears).map(Some)
}

enum Half {
    Attn(Attn),
    /// gate, up, down.
    Mlp([Lin; 3]),
}

enum HalfSaved {
    Attn(AttnSaved),
    /// G and U (tokens, intermediate), and the hiddens of gate, up and down.
    Mlp(Tensor, Tensor, [Option<Tensor>; 3]),
}

impl Half {
    /// `residual + half(n)` and what its backward keeps.
    fn fwd(&self, n: &Tensor, residual: &Tensor, d: Dims) -> Result<(Tensor, HalfSaved)> {
        match self {
            Half::Attn(a) => {
                let (y, s) = a.fwd(n, n, residual, d)?;
                Ok((y, HalfSaved::Attn(s)))
            }
            Half::Mlp([gate, up, down]) => {
                let (g, hg) = gate.fwd(n, None)?;
                let (u, hu) = up.fwd(n, None)?;
                let (y, hd) = down.fwd(&swiglu_values(&g, &u)?, Some(residual))?;
                Ok((y, HalfSaved::Mlp(g, u, [hg, hu, hd])))
            }
        }
    }

    /// The gradient of n (when `want_n`) and the factor gradients, in the projections' order.
    fn bwd(
        &self,
        s: &HalfSaved,
        g: &Tensor,
        n: &Tensor,
        want_n: bool,
        want_f: bool,
        d: Dims,
    ) -> Result<(Option<Tensor>, Vec<FactorGrads>)> {
        match (self, s) {
            (Half::Attn(a), HalfSaved::Attn(s)) => {
                let (dn, _, f) = a.bwd(s, g, n, n, true, want_n, false, want_f, d)?;
                Ok((dn, f.into()))
            }
            (Half::Mlp([gate, up, down]), HalfSaved::Mlp(gv, uv, h)) => {
                let m = swiglu_values(gv, uv)?;
                let (dm, fd) = down.bwd(g, &m, h[2].as_ref(), None, true, want_f)?;
                drop(m);
                let Some(dm) = dm else {
                    candle_core::bail!(
                        "decoder layer: no gradient for the down projection's input"
                    );
                };
                let (dg, du) = swiglu_grads(&dm, gv, uv)?;
                drop(dm);
                let (dn, fg) = gate.bwd(&dg, n, h[0].as_ref(), None, want_n, want_f)?;
                let (dn, fu) = up.bwd(&du, n, h[1].as_ref(), dn.as_ref(), want_n, want_f)?;
                Ok((dn, vec![fg, fu, fd]))
            }
            _ => candle_core::bail!("decoder layer: saved values of the other half"),
        }
    }
}

/// Runs `h + half(RMSNorm(h))` and returns it as a node over (h, packed factors).
fn run(h: &Tensor, norm: &Tensor, eps: f64, half: Half, linears: &[&LinearPart]) -> Result<Tensor> {
    let (b, t, dm) = h.dims3()?;
    if norm.dims() != [dm] {
        return Err(bad_shape(h, format!("norm weight {:?}", norm.dims())));
    }
    let (packed, sizes) = pack(linears)?;
    let w = norm.detach().contiguous()?;
    let d = Dims { b, n: t, t };
    let h2 = h.detach().contiguous()?.reshape((b * t, dm))?;
    let n = rms_norm_values(&h2, &w, eps)?;
    let (y, saved) = half.fwd(&n, &h2, d)?;
    drop(n);
    let y = y.reshape((b, t, dm))?;
    if !(h.track_op() || packed.track_op()) {
        return Ok(y);
    }
    let op = DecoderHalfOp {
        w,
        eps,
        half,
        saved,
        dims: d,
        sizes,
        y: Mutex::new(Some(y)),
    };
    h.apply_op2_arc(&packed, Arc::new(Box::new(op)))
}

struct DecoderHalfOp {
    w: Tensor,
    eps: f64,
    half: Half,
    saved: HalfSaved,
    dims: Dims,
    sizes: Vec<usize>,
    y: Mutex<Option<Tensor>>,
}

impl candle_core::CustomOp2 for DecoderHalfOp {
    fn name(&self) -> &'static str {
        "decoder-half"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        take_result(&self.y, "decoder-half")
    }

    fn bwd(
        &self,
        h: &Tensor,
        packed: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let d = self.dims;
        let dm = h.dim(2)?;
        let want_x = h.track_op();
        let want_f = packed.track_op() && packed.elem_count() > 0;
        let h2 = h.detach().contiguous()?.reshape((d.b * d.n, dm))?;
        let g = grad.contiguous()?.reshape((d.b * d.n, dm))?;
        let n = rms_norm_values(&h2, &self.w, self.eps)?;
        let (dn, f) = self.half.bwd(&self.saved, &g, &n, want_x, want_f, d)?;
        drop(n);
        let dx = match dn {
            Some(dn) if want_x => {
                let dx = g.force_contiguous()?;
                norm_grad_acc(&dx, &dn, &h2, &self.w, self.eps, RowNorm::Rms)?;
                Some(dx.reshape(h.dims())?)
            }
            _ => None,
        };
        let dp = if want_f {
            Some(pack_grads(f, &self.sizes, "decoder-half")?)
        } else {
            None
        };
        Ok((dx, dp))
    }
}
