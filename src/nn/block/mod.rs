//! diffusers' BasicTransformerBlock (the spatial transformer layer of the U-Net) as one node with
//! its own backward:
//!
//! ```text
//! h1 = x  + out1(attn(q1(n1), k1(n1), v1(n1)))      n1 = LN1(x)
//! h2 = h1 + out2(attn(q2(n2), k2(c),  v2(c)))       n2 = LN2(h1), c the text context
//! y  = h2 + ff_out(geglu(ff_proj(n3)))              n3 = LN3(h2)
//! ```
//!
//! Each of the ten projections is a frozen weight (with its bias, if any) and an optional plain
//! LoRA. The forward runs the same kernels the composed path does (the LayerNorm, the tiled
//! attention, GEGLU) on values that record no graph, and the block enters the graph as one node
//! over (x, context, the packed LoRA factors). What the composed path records as some forty nodes
//! (each with its saved input and its gradient started as zeros and then summed) is here one
//! backward that:
//! - keeps only what it cannot cheaply recompute: each attention's heads (q, k, v, output) and its
//!   per-row softmax statistics, the two residual sums h1 and h2, the GEGLU input and the LoRA
//!   hiddens; the three LayerNorm outputs are recomputed from h1, h2 and x;
//! - folds biases and residuals into the products' outputs (a projection's output starts as
//!   residual + bias and the GEMM accumulates onto it);
//! - sums every input-gradient contribution into one buffer with GEMM-accumulate: the residual's
//!   gradient, each LayerNorm's, and q/k/v's (and each LoRA's `ĝ·A`) in the self-attention.
//!
//! CPU, f32, frozen norms and weights; otherwise `None`, and the caller takes the composed path.

mod attn;
mod decoder;
#[cfg(test)]
mod decoder_tests;
mod op;
#[cfg(test)]
mod tests;

use candle_core::{DType, Device, Result, Tensor};

/// Why a model did not take a block node: a projection runs something other than nothing or one
/// plain LoRA (the debug note of [`crate::nn::fallback`]).
pub const NOT_PLAIN: &str = "a projection without at most one plain LoRA (other method, DoRA, dropout, routing, a trainable copy)";
/// Why a block node gave way (it returned `None`).
pub const NOT_FROZEN_F32: &str =
    "a trained norm, weight or bias, or a base or LoRA that is not f32";
pub use decoder::{decoder_attention, decoder_mlp, DecoderAttnParts, DecoderMlpParts};

/// The frozen base of a projection.
#[derive(Clone)]
pub enum ProjBase {
    /// A dense f32 weight (out, in).
    Dense(Tensor),
    /// An NF4 weight (out, in).
    Nf4(std::sync::Arc<super::nf4::Nf4Tensor>),
}

/// A plain LoRA on a linear layer: A (r, in), B (out, r), scale s (α/r times the gain).
#[derive(Clone)]
pub struct LoraFactors {
    /// A (r, in).
    pub a: Tensor,
    /// B (out, r).
    pub b: Tensor,
    /// s.
    pub scale: f64,
}

/// A frozen linear layer (weight (out, in), dense or NF4, optional bias) with an optional plain
/// LoRA.
#[derive(Clone)]
pub struct LinearPart {
    /// The weight (out, in).
    pub base: ProjBase,
    /// The bias (out).
    pub bias: Option<Tensor>,
    /// The LoRA that runs on it.
    pub lora: Option<LoraFactors>,
}

/// A frozen LayerNorm over the last dimension.
#[derive(Clone)]
pub struct LnPart {
    /// γ.
    pub weight: Tensor,
    /// β.
    pub bias: Tensor,
    /// ε.
    pub eps: f64,
}

/// One attention's projections: `to_q`, `to_k`, `to_v`, `to_out.0`.
#[derive(Clone)]
pub struct AttnPart {
    /// `to_q`.
    pub q: LinearPart,
    /// `to_k`.
    pub k: LinearPart,
    /// `to_v`.
    pub v: LinearPart,
    /// `to_out.0`.
    pub out: LinearPart,
}

/// The parts of one BasicTransformerBlock.
#[derive(Clone)]
pub struct BlockParts {
    /// `norm1`.
    pub norm1: LnPart,
    /// `attn1` (self-attention).
    pub attn1: AttnPart,
    /// `norm2`.
    pub norm2: LnPart,
    /// `attn2` (cross-attention over the context).
    pub attn2: AttnPart,
    /// `norm3`.
    pub norm3: LnPart,
    /// `ff.net.0.proj` (the GEGLU projection, 2·inner wide).
    pub ff_proj: LinearPart,
    /// `ff.net.2`.
    pub ff_out: LinearPart,
    /// Attention heads.
    pub heads: usize,
}

impl BlockParts {
    /// The ten projections in the node's fixed order (the order of the packed factors).
    fn linears(&self) -> [&LinearPart; 10] {
        let (a1, a2) = (&self.attn1, &self.attn2);
        [
            &a1.q,
            &a1.k,
            &a1.v,
            &a1.out,
            &a2.q,
            &a2.k,
            &a2.v,
            &a2.out,
            &self.ff_proj,
            &self.ff_out,
        ]
    }

    fn norms(&self) -> [&LnPart; 3] {
        [&self.norm1, &self.norm2, &self.norm3]
    }
}

const NAMES: [&str; 10] = [
    "attn1.to_q",
    "attn1.to_k",
    "attn1.to_v",
    "attn1.to_out.0",
    "attn2.to_q",
    "attn2.to_k",
    "attn2.to_v",
    "attn2.to_out.0",
    "ff.net.0.proj",
    "ff.net.2",
];

/// Why a tensor cannot be a frozen part of the node (another device or dtype, or trained).
fn frozen_miss(t: &Tensor) -> bool {
    !t.device().is_cpu() || t.dtype() != DType::F32 || t.is_variable() || t.track_op()
}

fn on_cpu_f32(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

/// A projection the nodes can take: a frozen CPU f32 (or NF4) base and bias, f32 factors.
fn linear_ok(l: &LinearPart) -> bool {
    let base = match &l.base {
        ProjBase::Dense(w) => !frozen_miss(w),
        ProjBase::Nf4(_) => true,
    };
    base && l.bias.as_ref().is_none_or(|b| !frozen_miss(b))
        && l.lora
            .as_ref()
            .is_none_or(|f| on_cpu_f32(&f.a) && on_cpu_f32(&f.b))
}

impl LinearPart {
    /// (out, in).
    fn out_in(&self) -> Vec<usize> {
        match &self.base {
            ProjBase::Dense(w) => w.dims().to_vec(),
            ProjBase::Nf4(q) => q.shape.clone(),
        }
    }
}

/// The packed LoRA factors of `linears` (A then B of each adapted one, in order) and their element
/// counts; a 0-element tensor when none is adapted.
fn pack(linears: &[&LinearPart]) -> Result<(Tensor, Vec<usize>)> {
    let mut factors = vec![];
    for l in linears {
        if let Some(f) = &l.lora {
            factors.push(f.a.flatten_all()?);
            factors.push(f.b.flatten_all()?);
        }
    }
    let sizes: Vec<usize> = factors.iter().map(Tensor::elem_count).collect();
    let packed = if factors.is_empty() {
        Tensor::zeros(0, DType::F32, &Device::Cpu)?
    } else {
        Tensor::cat(&factors, 0)?
    };
    Ok((packed, sizes))
}

/// Checks a projection's base, bias and LoRA against (out, in).
fn check_linear(
    l: &LinearPart,
    (o, i): (usize, usize),
    name: &str,
) -> std::result::Result<(), String> {
    let wd = l.out_in();
    if wd != [o, i] {
        return Err(format!("{name} weight {wd:?} is not ({o}, {i})"));
    }
    if let Some(bias) = &l.bias {
        if bias.dims() != [o] {
            return Err(format!("{name} bias {:?} is not ({o})", bias.dims()));
        }
    }
    if let Some(f) = &l.lora {
        let r = f.a.dims().first().copied().unwrap_or(0);
        if f.a.dims() != [r, i] || f.b.dims() != [o, r] {
            return Err(format!(
                "{name} LoRA A {:?} and B {:?} do not make a ({o}, {i}) update",
                f.a.dims(),
                f.b.dims()
            ));
        }
    }
    Ok(())
}

/// The block for x (B, N, C) and the context (B, T, C_ctx), as one node; `None` when it cannot be
/// taken (off the CPU or f32, a trained norm, weight or bias), and the caller composes it.
pub fn transformer_block(x: &Tensor, context: &Tensor, p: &BlockParts) -> Result<Option<Tensor>> {
    if !on_cpu_f32(x) || !on_cpu_f32(context) {
        return Ok(None);
    }
    let frozen_ok = p.linears().iter().all(|l| linear_ok(l))
        && p.norms()
            .iter()
            .all(|n| !frozen_miss(&n.weight) && !frozen_miss(&n.bias));
    if !frozen_ok {
        return Ok(None);
    }
    check_shapes(x, context, p)?;
    let (packed, sizes) = pack(&p.linears())?;
    op::run(x, context, &packed, p, sizes).map(Some)
}

fn check_shapes(x: &Tensor, context: &Tensor, p: &BlockParts) -> Result<()> {
    let (b, _, c) = x.dims3()?;
    let (cb, _, cc) = context.dims3()?;
    let inner = p.attn1.q.out_in().first().copied().unwrap_or(0);
    let ff = p.ff_out.out_in().get(1).copied().unwrap_or(0);
    // (name, expected (out, in)) per projection, in the node's order.
    let want = [
        (inner, c),
        (inner, c),
        (inner, c),
        (c, inner),
        (inner, c),
        (inner, cc),
        (inner, cc),
        (c, inner),
        (2 * ff, c),
        (c, ff),
    ];
    let bad = |what: String| -> Result<()> {
        candle_core::bail!(
            "transformer block: {what} (x {:?}, context {:?}, {} heads)",
            x.dims(),
            context.dims(),
            p.heads
        )
    };
    if cb != b {
        return bad(format!("context batch {cb} is not the input's {b}"));
    }
    if p.heads == 0 || inner % p.heads != 0 {
        return bad(format!("inner width {inner} does not split into the heads"));
    }
    for ((l, oi), name) in p.linears().iter().zip(want).zip(NAMES) {
        check_linear(l, oi, name).or_else(bad)?;
    }
    for (n, name) in p.norms().iter().zip(["norm1", "norm2", "norm3"]) {
        if n.weight.dims() != [c] || n.bias.dims() != [c] {
            return bad(format!(
                "{name} weight {:?} and bias {:?} are not ({c})",
                n.weight.dims(),
                n.bias.dims()
            ));
        }
    }
    Ok(())
}
