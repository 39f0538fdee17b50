//! U-Net building blocks with diffusers names: ResnetBlock2D, Transformer2DModel (with
//! BasicTransformerBlock, Attention, GEGLU feed-forward), Downsample2D, Upsample2D.

use crate::models::Weights;
use crate::nn::act::geglu;
use crate::nn::attention::{attention, merge_heads, split_heads};
use crate::nn::norm::{group_norm_fused, group_norm_silu, layer_norm};
use crate::peft::{
    AdaptedConv2d, AdaptedLayer, AdaptedLinear, AttnProbe, ConvCfg, ForwardCtx, Layout,
};
use crate::Result;
use candle_core::Tensor;

/// GroupNorm parameters.
pub struct GroupNorm {
    w: Tensor,
    b: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    fn new(w: &Weights, path: &str, c: usize, groups: usize, eps: f64) -> Result<Self> {
        let (weight, bias) = w.norm(path, c)?;
        Ok(Self {
            w: weight,
            b: bias,
            groups,
            eps,
        })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        group_norm_fused(x, self.groups, &self.w, &self.b, self.eps)
    }
}

struct LayerNorm {
    w: Tensor,
    b: Tensor,
}

impl LayerNorm {
    fn new(w: &Weights, path: &str, c: usize) -> Result<Self> {
        let (weight, bias) = w.norm(path, c)?;
        Ok(Self { w: weight, b: bias })
    }
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        layer_norm(x, &self.w, &self.b, 1e-5)
    }
}

fn conv3(w: &Weights, path: &str, inn: usize, out: usize, stride: usize) -> Result<AdaptedConv2d> {
    w.conv2d(
        path,
        inn,
        out,
        3,
        ConvCfg {
            padding: 1,
            stride,
            dilation: 1,
            groups: 1,
        },
    )
}

/// ResnetBlock2D: GroupNorm → SiLU → conv → + time projection → GroupNorm → SiLU → conv, + shortcut.
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: AdaptedConv2d,
    time_emb_proj: Option<AdaptedLinear>,
    norm2: GroupNorm,
    conv2: AdaptedConv2d,
    conv_shortcut: Option<AdaptedConv2d>,
    output_scale_factor: f64,
}

impl ResnetBlock2D {
    /// Builds `path` with `inn` → `out` channels; `temb` 0 means no time embedding (the VAE's
    /// resnets).
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        w: &Weights,
        path: &str,
        inn: usize,
        out: usize,
        temb: usize,
        groups: usize,
        eps: f64,
        scale: f64,
    ) -> Result<Self> {
        Ok(Self {
            norm1: GroupNorm::new(w, &format!("{path}.norm1"), inn, groups, eps)?,
            conv1: conv3(w, &format!("{path}.conv1"), inn, out, 1)?,
            time_emb_proj: if temb > 0 {
                Some(w.linear(&format!("{path}.time_emb_proj"), temb, out, true)?)
            } else {
                None
            },
            norm2: GroupNorm::new(w, &format!("{path}.norm2"), out, groups, eps)?,
            conv2: conv3(w, &format!("{path}.conv2"), out, out, 1)?,
            conv_shortcut: if inn != out {
                Some(w.conv2d(
                    &format!("{path}.conv_shortcut"),
                    inn,
                    out,
                    1,
                    ConvCfg::default(),
                )?)
            } else {
                None
            },
            output_scale_factor: scale,
        })
    }

    /// x (B, C, H, W), temb (B, T) (ignored without a time projection).
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>, ctx: &ForwardCtx) -> Result<Tensor> {
        let time = |ctx: &ForwardCtx| -> Result<Option<Tensor>> {
            Ok(match (&self.time_emb_proj, temb) {
                (Some(p), Some(temb)) => Some(p.forward(&temb.silu()?, ctx)?),
                _ => None,
            })
        };
        let mut t = None;
        if let Some(parts) = self.fused_parts(ctx) {
            t = time(ctx)?;
            if let Some(y) = crate::nn::resnet::resnet_block(x, t.as_ref(), &parts)? {
                return Ok(y);
            }
        }
        // Composed: conv1 before the time projection (the order of their dropout draws).
        let h = self.conv1.forward(&self.norm1.apply_silu(x)?, ctx)?;
        if t.is_none() {
            t = time(ctx)?;
        }
        let h = match &t {
            Some(t) => crate::nn::conv::add_channel_bias(&h, t, 1)?,
            None => h,
        };
        let h = self.conv2.forward(&self.norm2.apply_silu(&h)?, ctx)?;
        let x = match &self.conv_shortcut {
            Some(c) => c.forward(x, ctx)?,
            None => x.clone(),
        };
        let y = (x + h)?;
        Ok(if self.output_scale_factor == 1.0 {
            y
        } else {
            (y / self.output_scale_factor)?
        })
    }

    /// The block as one fused node's parts ([`crate::nn::resnet`]) when each conv runs at most one
    /// plain LoCon; `None` (noted once at debug level) when a conv needs its own forward.
    fn fused_parts(&self, ctx: &ForwardCtx) -> Option<crate::nn::resnet::ResnetParts> {
        let convs = [
            Some(&self.conv1),
            Some(&self.conv2),
            self.conv_shortcut.as_ref(),
        ];
        let mut parts = convs.map(|c| c.map(|c| c.plain_conv(ctx)));
        if parts.iter().flatten().any(Option::is_none) {
            crate::nn::fallback::note(|| {
                (
                    "ResnetBlock2D".into(),
                    "a conv runs an adapter other than one plain unrouted LoCon".into(),
                )
            });
            return None;
        }
        let norm = |g: &GroupNorm| crate::nn::resnet::NormPart {
            weight: g.w.clone(),
            bias: g.b.clone(),
            groups: g.groups,
            eps: g.eps,
        };
        Some(crate::nn::resnet::ResnetParts {
            norm1: norm(&self.norm1),
            conv1: parts[0].take().flatten()?,
            norm2: norm(&self.norm2),
            conv2: parts[1].take().flatten()?,
            shortcut: parts[2].take().flatten(),
            out_scale: self.output_scale_factor,
        })
    }

    /// Adaptable layers.
    pub fn collect<'a>(&'a self, v: &mut Vec<&'a AdaptedLayer>) {
        v.push(&*self.conv1);
        if let Some(t) = &self.time_emb_proj {
            v.push(t);
        }
        v.push(&*self.conv2);
        if let Some(c) = &self.conv_shortcut {
            v.push(c);
        }
    }
    /// Adaptable layers, mutably.
    pub fn collect_mut<'a>(&'a mut self, v: &mut Vec<&'a mut AdaptedLayer>) {
        v.push(&mut self.conv1);
        if let Some(t) = &mut self.time_emb_proj {
            v.push(t);
        }
        v.push(&mut self.conv2);
        if let Some(c) = &mut self.conv_shortcut {
            v.push(c);
        }
    }
}

struct Attention {
    to_q: AdaptedLinear,
    to_k: AdaptedLinear,
    to_v: AdaptedLinear,
    to_out: AdaptedLinear,
    heads: usize,
}

impl Attention {
    fn new(w: &Weights, path: &str, dim: usize, ctx_dim: usize, heads: usize) -> Result<Self> {
        Ok(Self {
            to_q: w.linear(&format!("{path}.to_q"), dim, dim, false)?,
            to_k: w.linear(&format!("{path}.to_k"), ctx_dim, dim, false)?,
            to_v: w.linear(&format!("{path}.to_v"), ctx_dim, dim, false)?,
            to_out: w.linear(&format!("{path}.to_out.0"), dim, dim, true)?,
            heads,
        })
    }

    fn forward(&self, x: &Tensor, context: Option<&Tensor>, ctx: &ForwardCtx) -> Result<Tensor> {
        // Cross-attention keys and values are text tokens, not the image grid.
        let kv_ctx = match context {
            Some(_) => ctx.at(Layout::Context),
            None => ctx.clone(),
        };
        let cross = context.is_some();
        let context = context.unwrap_or(x);
        let q = split_heads(&self.to_q.forward(x, ctx)?, self.heads)?;
        let attend = |kv_ctx: &ForwardCtx| -> Result<Tensor> {
            let k = split_heads(&self.to_k.forward(context, kv_ctx)?, self.heads)?;
            let v = split_heads(&self.to_v.forward(context, kv_ctx)?, self.heads)?;
            merge_heads(&attention(&q, &k, &v, None)?)
        };
        // Routed adapters on the text keys/values cannot be gated per pixel there: each one's
        // attention output is computed on its own and mixed by its gate on the query grid.
        let on_kv: Vec<String> = if cross {
            let live: Vec<&str> = self
                .to_k
                .live_adapter_names()
                .into_iter()
                .chain(self.to_v.live_adapter_names())
                .collect();
            ctx.routed_names()
                .into_iter()
                .filter(|n| live.contains(&n.as_str()))
                .collect()
        } else {
            vec![]
        };
        if let (true, Some(probe), Layout::Tokens { h, w }) = (cross, ctx.probe(), ctx.layout()) {
            self.record(probe, &q, context, &kv_ctx, (h, w))?;
        }
        let mut o = attend(&kv_ctx)?;
        if !on_kv.is_empty() {
            let o0 = o.clone();
            for name in &on_kv {
                let oa = attend(&kv_ctx.picking(Some(name)))?;
                if let Some(g) = ctx.gate(self.to_out.path(), name, &o0)? {
                    o = (o + (oa - &o0)?.broadcast_mul(&g)?)?;
                }
            }
        }
        self.to_out.forward(&o, ctx)
    }

    /// Records the attention of the probe's tokens: softmax(q·kᵀ/√d) summed over those tokens,
    /// averaged over heads, for the probe's batch rows, as (rows, h, w).
    fn record(
        &self,
        probe: &AttnProbe,
        q: &Tensor,
        context: &Tensor,
        kv_ctx: &ForwardCtx,
        (h, w): (usize, usize),
    ) -> Result<()> {
        let k = split_heads(&self.to_k.forward(context, kv_ctx)?, self.heads)?;
        let d = q.dim(3)?;
        let rows = probe.rows.clone();
        let (q, k) = (
            q.narrow(0, rows.start, rows.len())?,
            k.narrow(0, rows.start, rows.len())?,
        );
        let scores = q.contiguous()?.matmul(&k.contiguous()?.t()?)?;
        let p = crate::nn::softmax::scaled_masked_softmax(&scores, 1.0 / (d as f64).sqrt(), None)?;
        let idx = Tensor::from_vec(
            probe.tokens.iter().map(|&t| t as u32).collect::<Vec<_>>(),
            probe.tokens.len(),
            q.device(),
        )?;
        // (b, heads, n, t) -> tokens -> (b, heads, n) -> mean over heads -> (b, h, w)
        let m = p.index_select(&idx, 3)?.sum(3)?.mean(1)?;
        probe.record(m.reshape((rows.len(), h, w))?)
    }

    fn layers<'a>(&'a self, v: &mut Vec<&'a AdaptedLayer>) {
        v.extend([&*self.to_q, &*self.to_k, &*self.to_v, &*self.to_out]);
    }
    fn layers_mut<'a>(&'a mut self, v: &mut Vec<&'a mut AdaptedLayer>) {
        v.push(&mut self.to_q);
        v.push(&mut self.to_k);
        v.push(&mut self.to_v);
        v.push(&mut self.to_out);
    }
}

struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff_proj: AdaptedLinear,
    ff_out: AdaptedLinear,
}

impl BasicTransformerBlock {
    fn new(w: &Weights, path: &str, dim: usize, ctx_dim: usize, heads: usize) -> Result<Self> {
        let inner = 4 * dim;
        Ok(Self {
            norm1: LayerNorm::new(w, &format!("{path}.norm1"), dim)?,
            attn1: Attention::new(w, &format!("{path}.attn1"), dim, dim, heads)?,
            norm2: LayerNorm::new(w, &format!("{path}.norm2"), dim)?,
            attn2: Attention::new(w, &format!("{path}.attn2"), dim, ctx_dim, heads)?,
            norm3: LayerNorm::new(w, &format!("{path}.norm3"), dim)?,
            ff_proj: w.linear(&format!("{path}.ff.net.0.proj"), dim, 2 * inner, true)?,
            ff_out: w.linear(&format!("{path}.ff.net.2"), inner, dim, true)?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        if let Some(y) = self.fused(x, context, ctx)? {
            return Ok(y);
        }
        let h = (self.attn1.forward(&self.norm1.forward(x)?, None, ctx)? + x)?;
        let h = (self
            .attn2
            .forward(&self.norm2.forward(&h)?, Some(context), ctx)?
            + h)?;
        // GEGLU: (value, gate) halves of one projection; value · gelu(gate).
        let p = self.ff_proj.forward(&self.norm3.forward(&h)?, ctx)?;
        let g = geglu(&p)?;
        Ok((self.ff_out.forward(&g, ctx)? + h)?)
    }

    /// The whole block as one node ([`crate::nn::block`]) when each projection runs no adapter or
    /// one plain LoRA on the CPU in f32 and no attention probe is recording; `None` (and a debug
    /// note saying why, once) for the composed path.
    fn fused(&self, x: &Tensor, context: &Tensor, ctx: &ForwardCtx) -> Result<Option<Tensor>> {
        use crate::nn::block::{AttnPart, BlockParts, LnPart};
        use crate::nn::fallback::{cpu_f32_miss, note};
        const NODE: &str = "transformer block";
        if let Some(why) = cpu_f32_miss(x).or_else(|| cpu_f32_miss(context)) {
            note(|| (NODE.into(), why));
            return Ok(None);
        }
        if ctx.probe().is_some() {
            note(|| {
                (
                    NODE.into(),
                    "an attention probe records the cross-attention".into(),
                )
            });
            return Ok(None);
        }
        let kv = ctx.at(Layout::Context);
        let attn = |a: &Attention, kv: &ForwardCtx| -> Option<AttnPart> {
            Some(AttnPart {
                q: a.to_q.plain_linear(ctx)?,
                k: a.to_k.plain_linear(kv)?,
                v: a.to_v.plain_linear(kv)?,
                out: a.to_out.plain_linear(ctx)?,
            })
        };
        let ln = |n: &LayerNorm| LnPart {
            weight: n.w.clone(),
            bias: n.b.clone(),
            eps: 1e-5,
        };
        let parts = (|| {
            Some(BlockParts {
                norm1: ln(&self.norm1),
                attn1: attn(&self.attn1, ctx)?,
                norm2: ln(&self.norm2),
                attn2: attn(&self.attn2, &kv)?,
                norm3: ln(&self.norm3),
                ff_proj: self.ff_proj.plain_linear(ctx)?,
                ff_out: self.ff_out.plain_linear(ctx)?,
                heads: self.attn1.heads,
            })
        })();
        let Some(parts) = parts else {
            note(|| (NODE.into(), crate::nn::block::NOT_PLAIN.into()));
            return Ok(None);
        };
        let y = crate::nn::block::transformer_block(x, context, &parts)?;
        if y.is_none() {
            note(|| (NODE.into(), crate::nn::block::NOT_FROZEN_F32.into()));
        }
        Ok(y)
    }

    fn layers<'a>(&'a self, v: &mut Vec<&'a AdaptedLayer>) {
        self.attn1.layers(v);
        self.attn2.layers(v);
        v.extend([&*self.ff_proj, &*self.ff_out]);
    }
    fn layers_mut<'a>(&'a mut self, v: &mut Vec<&'a mut AdaptedLayer>) {
        self.attn1.layers_mut(v);
        self.attn2.layers_mut(v);
        v.push(&mut self.ff_proj);
        v.push(&mut self.ff_out);
    }
}

enum Proj {
    Linear(AdaptedLinear),
    Conv(AdaptedConv2d),
}

impl Proj {
    fn new(w: &Weights, path: &str, c: usize, linear: bool) -> Result<Self> {
        Ok(if linear {
            Proj::Linear(w.linear(path, c, c, true)?)
        } else {
            Proj::Conv(w.conv2d(path, c, c, 1, ConvCfg::default())?)
        })
    }
    fn layer(&self) -> &AdaptedLayer {
        match self {
            Proj::Linear(l) => l,
            Proj::Conv(c) => c,
        }
    }
    fn layer_mut(&mut self) -> &mut AdaptedLayer {
        match self {
            Proj::Linear(l) => l,
            Proj::Conv(c) => c,
        }
    }
}

/// Transformer2DModel: GroupNorm → proj_in → transformer blocks → proj_out, + residual.
pub struct Transformer2D {
    norm: GroupNorm,
    proj_in: Proj,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Proj,
}

impl Transformer2D {
    /// Builds `path` over `c` channels with `heads` heads and `layers` transformer blocks.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        w: &Weights,
        path: &str,
        c: usize,
        ctx_dim: usize,
        heads: usize,
        layers: usize,
        groups: usize,
        linear: bool,
    ) -> Result<Self> {
        Ok(Self {
            norm: GroupNorm::new(w, &format!("{path}.norm"), c, groups, 1e-6)?,
            proj_in: Proj::new(w, &format!("{path}.proj_in"), c, linear)?,
            blocks: (0..layers)
                .map(|i| {
                    BasicTransformerBlock::new(
                        w,
                        &format!("{path}.transformer_blocks.{i}"),
                        c,
                        ctx_dim,
                        heads,
                    )
                })
                .collect::<Result<_>>()?,
            proj_out: Proj::new(w, &format!("{path}.proj_out"), c, linear)?,
        })
    }

    /// x (B, C, H, W), context (B, N, ctx_dim).
    pub fn forward(&self, x: &Tensor, context: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let (b, c, h, wd) = x.dims4()?;
        let n = self.norm.forward(x)?;
        let to_tokens = |t: &Tensor| -> Result<Tensor> {
            Ok(t.permute((0, 2, 3, 1))?.reshape((b, h * wd, c))?)
        }; // (b, h*w, c)
        let to_image = |t: &Tensor| -> Result<Tensor> {
            Ok(t.reshape((b, h, wd, c))?
                .permute((0, 3, 1, 2))?
                .contiguous()?)
        };
        // Layers here see image feature maps (conv projections) or tokens of the h×w grid.
        let (img, tok) = (ctx.at(Layout::Image), ctx.at(Layout::Tokens { h, w: wd }));
        let mut t = match &self.proj_in {
            Proj::Conv(p) => to_tokens(&p.forward(&n, &img)?)?,
            Proj::Linear(p) => p.forward(&to_tokens(&n)?, &tok)?,
        };
        for blk in &self.blocks {
            t = blk.forward(&t, context, &tok)?;
        }
        let out = match &self.proj_out {
            Proj::Conv(p) => p.forward(&to_image(&t)?, &img)?,
            Proj::Linear(p) => to_image(&p.forward(&t, &tok)?)?,
        };
        Ok((out + x)?)
    }

    /// Adaptable layers.
    pub fn layers<'a>(&'a self, v: &mut Vec<&'a AdaptedLayer>) {
        v.push(self.proj_in.layer());
        self.blocks.iter().for_each(|b| b.layers(v));
        v.push(self.proj_out.layer());
    }
    /// Adaptable layers, mutably.
    pub fn layers_mut<'a>(&'a mut self, v: &mut Vec<&'a mut AdaptedLayer>) {
        v.push(self.proj_in.layer_mut());
        self.blocks.iter_mut().for_each(|b| b.layers_mut(v));
        v.push(self.proj_out.layer_mut());
    }
}

/// Resnets (and attentions) of one down/up block, plus its down/upsampler.
pub struct Block {
    /// Resnets.
    pub resnets: Vec<ResnetBlock2D>,
    /// Attentions (empty for DownBlock2D / UpBlock2D).
    pub attentions: Vec<Transformer2D>,
    /// `downsamplers.0.conv` or `upsamplers.0.conv`.
    pub sampler: Option<AdaptedConv2d>,
}

impl Block {
    pub(crate) fn layers<'a>(&'a self, v: &mut Vec<&'a AdaptedLayer>) {
        for (i, r) in self.resnets.iter().enumerate() {
            r.collect(v);
            if let Some(a) = self.attentions.get(i) {
                a.layers(v);
            }
        }
        if let Some(s) = &self.sampler {
            v.push(s);
        }
    }
    pub(crate) fn layers_mut<'a>(&'a mut self, v: &mut Vec<&'a mut AdaptedLayer>) {
        let mut attns = self.attentions.iter_mut();
        for r in self.resnets.iter_mut() {
            r.collect_mut(v);
            if let Some(a) = attns.next() {
                a.layers_mut(v);
            }
        }
        if let Some(s) = &mut self.sampler {
            v.push(s);
        }
    }
}

pub(crate) fn conv3x3(
    w: &Weights,
    path: &str,
    inn: usize,
    out: usize,
    stride: usize,
    padding: usize,
) -> Result<AdaptedConv2d> {
    w.conv2d(
        path,
        inn,
        out,
        3,
        ConvCfg {
            padding,
            stride,
            dilation: 1,
            groups: 1,
        },
    )
}

pub(crate) fn groupnorm(
    w: &Weights,
    path: &str,
    c: usize,
    groups: usize,
    eps: f64,
) -> Result<GroupNorm> {
    GroupNorm::new(w, path, c, groups, eps)
}

impl GroupNorm {
    /// Applies the norm.
    pub fn apply(&self, x: &Tensor) -> Result<Tensor> {
        self.forward(x)
    }
    /// `silu(norm(x))` as one fused node.
    pub fn apply_silu(&self, x: &Tensor) -> Result<Tensor> {
        group_norm_silu(x, self.groups, &self.w, &self.b, self.eps)
    }
}
