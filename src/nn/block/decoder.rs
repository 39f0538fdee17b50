//! The attention half of a Llama / Mistral / Qwen2 decoder layer as one node with its own backward:
//!
//! ```text
//! y = h + o(attn(rope(q(n)), rope(k(n)), v(n), mask))      n = RMSNorm(h)
//! ```
//!
//! with grouped-query heads read in place, each projection a frozen dense or NF4 base (with
//! Qwen2's biases) and an optional plain LoRA. As the transformer-block node, it keeps only the
//! rotated q and k, v, the attention output and its softmax statistics, and the LoRA hiddens; the
//! norm's output is recomputed; the residual and the bias start the output projection's buffer;
//! the input gradients of q, k and v (and their LoRAs) and the norm's are summed into one buffer
//! that starts as the residual's. Training forwards only (no KV cache, no S²-Attn): the caller
//! composes the rest.

use super::attn::{pack_grads, to_candle, Attn, AttnSaved, Dims, Lin};
use super::{check_linear, frozen_miss, linear_ok, pack, AttnPart};
use crate::nn::flash::mask_vals;
use crate::nn::frozen::take_result;
use crate::nn::norm::{rms_norm_grad_acc, rms_norm_values};
use crate::nn::rope::rope_tables;
use candle_core::{CpuStorage, DType, Layout, Result, Shape, Tensor};
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
    let bad = |what: String| -> Result<()> {
        candle_core::bail!(
            "decoder attention: {what} (hidden {:?}, {} heads, {} key/value heads, head width {hd})",
            h.dims(),
            p.heads,
            p.kv_heads
        )
    };
    if p.heads == 0 || p.kv_heads == 0 || !p.heads.is_multiple_of(p.kv_heads) {
        bad("the key/value heads do not divide the heads".into())?;
    }
    let (qw, kw) = (p.heads * hd, p.kv_heads * hd);
    let want = [(qw, dm), (kw, dm), (kw, dm), (dm, qw)];
    for ((l, oi), name) in linears
        .iter()
        .zip(want)
        .zip(["q_proj", "k_proj", "v_proj", "o_proj"])
    {
        check_linear(l, oi, name).or_else(bad)?;
    }
    if p.norm_weight.dims() != [dm] {
        bad(format!("input_layernorm weight {:?}", p.norm_weight.dims()))?;
    }
    if positions.dims() != [b, t] {
        bad(format!("positions {:?}", positions.dims()))?;
    }
    if let Some(m) = mask {
        let md = m.dims();
        if md.len() != 4 || !(md[0] == b || md[0] == 1) || md[1] != 1 || md[2] != t || md[3] != t {
            bad(format!("mask {md:?} is not (B or 1, 1, {t}, {t})"))?;
        }
    }
    let (packed, sizes) = pack(&linears)?;
    let attn = Attn {
        q: Lin::of(&a.q)?,
        k: Lin::of(&a.k)?,
        v: Lin::of(&a.v)?,
        out: Lin::of(&a.out)?,
        heads: p.heads,
        kv_heads: p.kv_heads,
        rope: Some(rope_tables(positions, inv_freq).map_err(to_candle)?),
        mask: mask.map(mask_vals).transpose()?,
    };
    let w = p.norm_weight.detach().contiguous()?;
    let d = Dims { b, n: t, t };
    let h2 = h.detach().contiguous()?.reshape((b * t, dm))?;
    let n = rms_norm_values(&h2, &w, p.eps)?;
    let (y, saved) = attn.fwd(&n, &n, &h2, d)?;
    drop(n);
    let y = y.reshape((b, t, dm))?;
    if !(h.track_op() || packed.track_op()) {
        return Ok(Some(y));
    }
    let op = DecoderAttnOp {
        wv: w.to_vec1::<f32>()?,
        w,
        eps: p.eps,
        attn,
        saved,
        dims: d,
        sizes,
        y: Mutex::new(Some(y)),
    };
    h.apply_op2_arc(&packed, Arc::new(Box::new(op))).map(Some)
}

struct DecoderAttnOp {
    w: Tensor,
    wv: Vec<f32>,
    eps: f64,
    attn: Attn,
    saved: AttnSaved,
    dims: Dims,
    sizes: Vec<usize>,
    y: Mutex<Option<Tensor>>,
}

impl candle_core::CustomOp2 for DecoderAttnOp {
    fn name(&self) -> &'static str {
        "decoder-attention"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        take_result(&self.y, "decoder-attention")
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
        if g.dtype() != DType::F32 {
            candle_core::bail!("decoder-attention: gradient of dtype {:?}", g.dtype());
        }
        let n = rms_norm_values(&h2, &self.w, self.eps)?;
        let (dn, _, f) = self
            .attn
            .bwd(&self.saved, &g, &n, &n, true, want_x, false, want_f, d)?;
        drop(n);
        let dx = match dn {
            Some(dn) if want_x => {
                let dx = g.copy()?;
                rms_norm_grad_acc(&dx, &dn, &h2, &self.wv, self.eps)?;
                Some(dx.reshape(h.dims())?)
            }
            _ => None,
        };
        let dp = if want_f {
            Some(pack_grads(f, &self.sizes, "decoder-attention")?)
        } else {
            None
        };
        Ok((dx, dp))
    }
}
