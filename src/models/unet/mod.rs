//! `UNet2DConditionModel` with diffusers tensor names, for SD1.x (1x1-conv `proj_in/out`, legacy
//! `attention_head_dim` = heads), SD2.x (linear projections) and SDXL (`transformer_layers_per_block`,
//! `addition_embed_type = "text_time"`) configurations. Every linear and conv is built through the
//! adapter core, so LoRA targets (`to_q`, `to_k`, `to_v`, `to_out.0`, `ff.net.0.proj`, `ff.net.2`,
//! `proj_in`, `proj_out`, and convs for LoCon) are chosen by module path; norms, softmax and attention
//! are differentiable compositions.

pub mod blocks;
pub mod config;

pub use config::UNetConfig;

use crate::models::Weights;
use crate::nn::rope::timestep_embedding;
use crate::peft::{Adapted, AdaptedConv2d, AdaptedLayer, AdaptedLinear, ForwardCtx, Layout};
use crate::{Error, Result};
use blocks::{conv3x3, groupnorm, Block, GroupNorm, ResnetBlock2D, Transformer2D};
use candle_core::Tensor;

/// SDXL's extra conditioning: pooled text embeddings and the six size/crop time ids.
pub struct AddedCond<'a> {
    /// (B, pooled dim).
    pub text_embeds: &'a Tensor,
    /// (B, 6).
    pub time_ids: &'a Tensor,
}

/// The U-Net.
pub struct UNet2DConditionModel {
    cfg: UNetConfig,
    conv_in: AdaptedConv2d,
    time_1: AdaptedLinear,
    time_2: AdaptedLinear,
    add_1: Option<AdaptedLinear>,
    add_2: Option<AdaptedLinear>,
    down: Vec<Block>,
    mid_resnets: Vec<ResnetBlock2D>,
    mid_attn: Option<Transformer2D>,
    up: Vec<Block>,
    norm_out: GroupNorm,
    conv_out: AdaptedConv2d,
}

impl UNet2DConditionModel {
    /// Builds the model from `cfg` and weights named as in diffusers' `diffusion_pytorch_model.safetensors`.
    pub fn new(cfg: &UNetConfig, w: &Weights) -> Result<Self> {
        cfg.validate()?;
        let n = cfg.block_out_channels.len();
        let boc = &cfg.block_out_channels;
        let heads = cfg.heads()?;
        let layers = cfg.layers_per_block.expand(n, "layers_per_block")?;
        let cross = cfg.cross_attention_dim.expand(n, "cross_attention_dim")?;
        let tlpb = cfg
            .transformer_layers_per_block
            .expand(n, "transformer_layers_per_block")?;
        let (g, eps) = (cfg.norm_num_groups, cfg.norm_eps);
        let temb = boc[0] * 4;
        let lin = cfg.use_linear_projection;
        let pad = (cfg.conv_in_kernel - 1) / 2;
        let conv_in = conv3x3_k(
            w,
            "conv_in",
            cfg.in_channels,
            boc[0],
            cfg.conv_in_kernel,
            pad,
        )?;
        let time_1 = w.linear("time_embedding.linear_1", boc[0], temb, true)?;
        let time_2 = w.linear("time_embedding.linear_2", temb, temb, true)?;
        let (add_1, add_2) = if cfg.addition_embed_type.as_deref() == Some("text_time") {
            let inn = cfg.projection_class_embeddings_input_dim.ok_or_else(|| {
                Error::Config("text_time needs projection_class_embeddings_input_dim".into())
            })?;
            (
                Some(w.linear("add_embedding.linear_1", inn, temb, true)?),
                Some(w.linear("add_embedding.linear_2", temb, temb, true)?),
            )
        } else {
            (None, None)
        };

        let mut down = vec![];
        let mut out_ch = boc[0];
        for (i, ty) in cfg.down_block_types.iter().enumerate() {
            let in_ch = out_ch;
            out_ch = boc[i];
            let last = i == n - 1;
            let p = format!("down_blocks.{i}");
            let mut resnets = vec![];
            let mut attentions = vec![];
            for j in 0..layers[i] {
                let c_in = if j == 0 { in_ch } else { out_ch };
                resnets.push(ResnetBlock2D::new(
                    w,
                    &format!("{p}.resnets.{j}"),
                    c_in,
                    out_ch,
                    temb,
                    g,
                    eps,
                    1.0,
                )?);
                if ty == "CrossAttnDownBlock2D" {
                    attentions.push(Transformer2D::new(
                        w,
                        &format!("{p}.attentions.{j}"),
                        out_ch,
                        cross[i],
                        heads[i],
                        tlpb[i],
                        g,
                        lin,
                    )?);
                }
            }
            let sampler = if last {
                None
            } else {
                Some(conv3x3(
                    w,
                    &format!("{p}.downsamplers.0.conv"),
                    out_ch,
                    out_ch,
                    2,
                    cfg.downsample_padding,
                )?)
            };
            down.push(Block {
                resnets,
                attentions,
                sampler,
            });
        }

        let top = boc[n - 1];
        let mid_resnets = (0..2)
            .map(|j| {
                ResnetBlock2D::new(
                    w,
                    &format!("mid_block.resnets.{j}"),
                    top,
                    top,
                    temb,
                    g,
                    eps,
                    cfg.mid_block_scale_factor,
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let mid_attn = Some(Transformer2D::new(
            w,
            "mid_block.attentions.0",
            top,
            cross[n - 1],
            heads[n - 1],
            tlpb[n - 1],
            g,
            lin,
        )?);

        let rev: Vec<usize> = boc.iter().rev().copied().collect();
        let (rheads, rcross, rtlpb, rlayers): (Vec<_>, Vec<_>, Vec<_>, Vec<_>) = (
            heads.iter().rev().copied().collect(),
            cross.iter().rev().copied().collect(),
            tlpb.iter().rev().copied().collect(),
            layers.iter().rev().copied().collect(),
        );
        let mut up = vec![];
        let mut prev_out = rev[0];
        for (i, ty) in cfg.up_block_types.iter().enumerate() {
            let out_c = rev[i];
            let in_c = rev[(i + 1).min(n - 1)];
            let last = i == n - 1;
            let p = format!("up_blocks.{i}");
            let nl = rlayers[i] + 1;
            let mut resnets = vec![];
            let mut attentions = vec![];
            for j in 0..nl {
                let skip = if j == nl - 1 { in_c } else { out_c };
                let r_in = if j == 0 { prev_out } else { out_c };
                resnets.push(ResnetBlock2D::new(
                    w,
                    &format!("{p}.resnets.{j}"),
                    r_in + skip,
                    out_c,
                    temb,
                    g,
                    eps,
                    1.0,
                )?);
                if ty == "CrossAttnUpBlock2D" {
                    attentions.push(Transformer2D::new(
                        w,
                        &format!("{p}.attentions.{j}"),
                        out_c,
                        rcross[i],
                        rheads[i],
                        rtlpb[i],
                        g,
                        lin,
                    )?);
                }
            }
            let sampler = if last {
                None
            } else {
                Some(conv3x3(
                    w,
                    &format!("{p}.upsamplers.0.conv"),
                    out_c,
                    out_c,
                    1,
                    1,
                )?)
            };
            up.push(Block {
                resnets,
                attentions,
                sampler,
            });
            prev_out = out_c;
        }
        let norm_out = groupnorm(w, "conv_norm_out", boc[0], g, eps)?;
        let conv_out = conv3x3_k(
            w,
            "conv_out",
            boc[0],
            cfg.out_channels,
            cfg.conv_out_kernel,
            (cfg.conv_out_kernel - 1) / 2,
        )?;
        Ok(Self {
            cfg: cfg.clone(),
            conv_in,
            time_1,
            time_2,
            add_1,
            add_2,
            down,
            mid_resnets,
            mid_attn,
            up,
            norm_out,
            conv_out,
        })
    }

    /// The configuration.
    pub fn config(&self) -> &UNetConfig {
        &self.cfg
    }

    /// The timestep (and SDXL added-condition) embedding that feeds every resnet.
    pub fn time_embedding(
        &self,
        timesteps: &Tensor,
        added: Option<&AddedCond>,
        ctx: &ForwardCtx,
    ) -> Result<Tensor> {
        let c0 = self.cfg.block_out_channels[0];
        let t = timestep_embedding(timesteps, c0, self.cfg.flip_sin_to_cos, self.cfg.freq_shift)?;
        let mut emb = self
            .time_2
            .forward(&self.time_1.forward(&t, ctx)?.silu()?, ctx)?;
        if let (Some(a1), Some(a2)) = (&self.add_1, &self.add_2) {
            let add = added.ok_or_else(|| {
                Error::Msg("this SDXL-style U-Net needs text_embeds and time_ids".into())
            })?;
            let b = add.time_ids.dim(0)?;
            let d = self
                .cfg
                .addition_time_embed_dim
                .ok_or_else(|| Error::Config("text_time needs addition_time_embed_dim".into()))?;
            let ids = timestep_embedding(
                &add.time_ids.flatten_all()?,
                d,
                self.cfg.flip_sin_to_cos,
                self.cfg.freq_shift,
            )?
            .reshape((b, ()))?;
            let x = Tensor::cat(
                &[add.text_embeds, &ids.to_dtype(add.text_embeds.dtype())?],
                1,
            )?;
            emb = (emb + a2.forward(&a1.forward(&x, ctx)?.silu()?, ctx)?)?;
        }
        Ok(emb)
    }

    /// Noise prediction for `sample` (B, C, H, W) at `timesteps` (B) given `context` (B, N, D).
    pub fn forward(
        &self,
        sample: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
        added: Option<&AddedCond>,
        ctx: &ForwardCtx,
    ) -> Result<Tensor> {
        // Convolutions see image feature maps; transformer blocks declare their token grids.
        let ctx = &ctx.at(Layout::Image);
        let (_, _, h, w) = sample.dims4()?;
        let factor = 1 << (self.cfg.block_out_channels.len() - 1);
        if h % factor != 0 || w % factor != 0 {
            return Err(Error::Msg(format!(
                "latent size {h}x{w} must be a multiple of {factor} for this U-Net"
            )));
        }
        let emb = self.time_embedding(timesteps, added, ctx)?;
        let x = if self.cfg.center_input_sample {
            ((sample * 2.0)? - 1.0)?
        } else {
            sample.clone()
        };
        let mut x = self.conv_in.forward(&x, ctx)?;
        let mut skips = vec![x.clone()];
        for blk in &self.down {
            for (j, r) in blk.resnets.iter().enumerate() {
                x = r.forward(&x, Some(&emb), ctx)?;
                if let Some(a) = blk.attentions.get(j) {
                    x = a.forward(&x, context, ctx)?;
                }
                skips.push(x.clone());
            }
            if let Some(s) = &blk.sampler {
                x = s.forward(&x, ctx)?;
                skips.push(x.clone());
            }
        }
        x = self.mid_resnets[0].forward(&x, Some(&emb), ctx)?;
        if let Some(a) = &self.mid_attn {
            x = a.forward(&x, context, ctx)?;
        }
        x = self.mid_resnets[1].forward(&x, Some(&emb), ctx)?;
        for blk in &self.up {
            for (j, r) in blk.resnets.iter().enumerate() {
                let skip = skips
                    .pop()
                    .ok_or_else(|| Error::Msg("U-Net skip connections exhausted".into()))?;
                x = r.forward(&Tensor::cat(&[&x, &skip], 1)?, Some(&emb), ctx)?;
                if let Some(a) = blk.attentions.get(j) {
                    x = a.forward(&x, context, ctx)?;
                }
            }
            if let Some(s) = &blk.sampler {
                x = s.forward(&crate::nn::resample::upsample_nearest(&x, 2)?, ctx)?;
            }
        }
        let x = self.norm_out.apply_silu(&x)?;
        self.conv_out.forward(&x, ctx)
    }
}

fn conv3x3_k(
    w: &Weights,
    path: &str,
    inn: usize,
    out: usize,
    k: usize,
    pad: usize,
) -> Result<AdaptedConv2d> {
    w.conv2d(
        path,
        inn,
        out,
        k,
        crate::peft::ConvCfg {
            padding: pad,
            stride: 1,
            dilation: 1,
            groups: 1,
        },
    )
}

impl Adapted for UNet2DConditionModel {
    fn layers(&self) -> Vec<&AdaptedLayer> {
        let mut v: Vec<&AdaptedLayer> = vec![&self.conv_in, &self.time_1, &self.time_2];
        if let (Some(a), Some(b)) = (&self.add_1, &self.add_2) {
            v.push(a);
            v.push(b);
        }
        self.down.iter().for_each(|b| b.layers(&mut v));
        for r in &self.mid_resnets {
            r.collect(&mut v);
        }
        if let Some(a) = &self.mid_attn {
            a.layers(&mut v);
        }
        self.up.iter().for_each(|b| b.layers(&mut v));
        v.push(&self.conv_out);
        v
    }
    fn layers_mut(&mut self) -> Vec<&mut AdaptedLayer> {
        let mut v: Vec<&mut AdaptedLayer> =
            vec![&mut self.conv_in, &mut self.time_1, &mut self.time_2];
        if let (Some(a), Some(b)) = (&mut self.add_1, &mut self.add_2) {
            v.push(a);
            v.push(b);
        }
        self.down.iter_mut().for_each(|b| b.layers_mut(&mut v));
        for r in &mut self.mid_resnets {
            r.collect_mut(&mut v);
        }
        if let Some(a) = &mut self.mid_attn {
            a.layers_mut(&mut v);
        }
        self.up.iter_mut().for_each(|b| b.layers_mut(&mut v));
        v.push(&mut self.conv_out);
        v
    }
}
