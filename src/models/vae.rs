//! AutoencoderKL (the VAE of latent-diffusion pipelines) from a diffusers `vae/config.json`, with
//! diffusers tensor names (and the older `query`/`key`/`value`/`proj_attn` attention names), frozen:
//! `encode` gives the diagonal-Gaussian posterior of an image batch, `decode` an image batch from
//! latents. Latents are scaled as pipelines do: `(z − shift_factor) · scaling_factor` for the
//! denoiser, and back before decoding.

use super::unet::blocks::{conv3x3, groupnorm, GroupNorm, ResnetBlock2D};
use super::Weights;
use crate::nn::attention::attention;
use crate::peft::{AdaptedConv2d, AdaptedLinear, ConvCfg, ForwardCtx, Layout};
use crate::{Error, Result};
use candle_core::Tensor;
use serde::{Deserialize, Serialize};
use std::path::Path;

fn d_three() -> usize {
    3
}
fn d_one() -> usize {
    1
}
fn d_four() -> usize {
    4
}
fn d_groups() -> usize {
    32
}
fn d_scale() -> f64 {
    0.18215
}
fn d_true() -> bool {
    true
}
fn d_act() -> String {
    "silu".into()
}

/// `vae/config.json` (AutoencoderKL).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VaeConfig {
    /// Image channels in.
    #[serde(default = "d_three")]
    pub in_channels: usize,
    /// Image channels out.
    #[serde(default = "d_three")]
    pub out_channels: usize,
    /// `DownEncoderBlock2D` per level.
    #[serde(default)]
    pub down_block_types: Vec<String>,
    /// `UpDecoderBlock2D` per level.
    #[serde(default)]
    pub up_block_types: Vec<String>,
    /// Channels per level.
    pub block_out_channels: Vec<usize>,
    /// Resnets per encoder level (decoder: one more).
    #[serde(default = "d_one")]
    pub layers_per_block: usize,
    /// Activation (`silu`).
    #[serde(default = "d_act")]
    pub act_fn: String,
    /// Latent channels.
    #[serde(default = "d_four")]
    pub latent_channels: usize,
    /// GroupNorm groups.
    #[serde(default = "d_groups")]
    pub norm_num_groups: usize,
    /// Latent scale.
    #[serde(default = "d_scale")]
    pub scaling_factor: f64,
    /// Latent shift (SD3 / Flux VAEs).
    #[serde(default)]
    pub shift_factor: Option<f64>,
    /// 1×1 conv after the encoder.
    #[serde(default = "d_true")]
    pub use_quant_conv: bool,
    /// 1×1 conv before the decoder.
    #[serde(default = "d_true")]
    pub use_post_quant_conv: bool,
    /// Attention in the mid blocks.
    #[serde(default = "d_true")]
    pub mid_block_add_attention: bool,
}

impl VaeConfig {
    /// Reads `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        crate::util::read_json_config(path, Self::validate)
    }

    fn validate(&self) -> Result<()> {
        if self.block_out_channels.is_empty() {
            return Err(Error::Config("block_out_channels is empty".into()));
        }
        for t in &self.down_block_types {
            if t != "DownEncoderBlock2D" {
                return Err(Error::Config(format!(
                    "down block `{t}` is not supported (DownEncoderBlock2D)"
                )));
            }
        }
        for t in &self.up_block_types {
            if t != "UpDecoderBlock2D" {
                return Err(Error::Config(format!(
                    "up block `{t}` is not supported (UpDecoderBlock2D)"
                )));
            }
        }
        if self.act_fn != "silu" {
            return Err(Error::Config(format!(
                "act_fn `{}` is not supported (silu)",
                self.act_fn
            )));
        }
        if self
            .block_out_channels
            .iter()
            .any(|c| c % self.norm_num_groups != 0)
        {
            return Err(Error::Config(format!(
                "block_out_channels {:?} are not all divisible by norm_num_groups {}",
                self.block_out_channels, self.norm_num_groups
            )));
        }
        Ok(())
    }

    /// Spatial downsampling of the latents (2^(levels−1)).
    pub fn factor(&self) -> usize {
        1 << (self.block_out_channels.len() - 1)
    }
}

/// Single-head self-attention over pixels with a GroupNorm in front and a residual.
struct SpatialAttention {
    norm: GroupNorm,
    q: AdaptedLinear,
    k: AdaptedLinear,
    v: AdaptedLinear,
    out: AdaptedLinear,
}

impl SpatialAttention {
    fn new(w: &Weights, path: &str, c: usize, groups: usize) -> Result<Self> {
        let legacy = w.contains(&format!("{path}.query.weight"));
        let name = |new: &str, old: &str| format!("{path}.{}", if legacy { old } else { new });
        Ok(Self {
            norm: groupnorm(w, &format!("{path}.group_norm"), c, groups, 1e-6)?,
            q: w.linear(&name("to_q", "query"), c, c, true)?,
            k: w.linear(&name("to_k", "key"), c, c, true)?,
            v: w.linear(&name("to_v", "value"), c, c, true)?,
            out: w.linear(&name("to_out.0", "proj_attn"), c, c, true)?,
        })
    }

    fn forward(&self, x: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let (b, c, h, wd) = x.dims4()?;
        let t = self
            .norm
            .apply(x)?
            .reshape((b, c, h * wd))?
            .transpose(1, 2)?
            .contiguous()?;
        let ctx = &ctx.at(Layout::Tokens { h, w: wd });
        let q = self.q.forward(&t, ctx)?;
        let k = self.k.forward(&t, ctx)?;
        let v = self.v.forward(&t, ctx)?;
        // One head over the channels.
        let one = |x: Tensor| x.unsqueeze(1);
        let a = attention(&one(q)?, &one(k)?, &one(v)?, None)?.squeeze(1)?;
        let o = self.out.forward(&a, ctx)?;
        let o = o.transpose(1, 2)?.contiguous()?.reshape((b, c, h, wd))?;
        Ok((o + x)?)
    }
}

struct MidBlock {
    r0: ResnetBlock2D,
    attn: Option<SpatialAttention>,
    r1: ResnetBlock2D,
}

impl MidBlock {
    fn new(w: &Weights, path: &str, c: usize, groups: usize, attn: bool) -> Result<Self> {
        let res = |i: usize| {
            ResnetBlock2D::new(
                w,
                &format!("{path}.resnets.{i}"),
                c,
                c,
                0,
                groups,
                1e-6,
                1.0,
            )
        };
        Ok(Self {
            r0: res(0)?,
            attn: if attn {
                Some(SpatialAttention::new(
                    w,
                    &format!("{path}.attentions.0"),
                    c,
                    groups,
                )?)
            } else {
                None
            },
            r1: res(1)?,
        })
    }
    fn forward(&self, x: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let mut x = self.r0.forward(x, None, ctx)?;
        if let Some(a) = &self.attn {
            x = a.forward(&x, ctx)?;
        }
        self.r1.forward(&x, None, ctx)
    }
}

struct Level {
    resnets: Vec<ResnetBlock2D>,
    sampler: Option<AdaptedConv2d>,
}

/// The VAE.
pub struct AutoencoderKL {
    cfg: VaeConfig,
    enc_in: AdaptedConv2d,
    enc_levels: Vec<Level>,
    enc_mid: MidBlock,
    enc_norm: GroupNorm,
    enc_out: AdaptedConv2d,
    quant: Option<AdaptedConv2d>,
    post_quant: Option<AdaptedConv2d>,
    dec_in: AdaptedConv2d,
    dec_mid: MidBlock,
    dec_levels: Vec<Level>,
    dec_norm: GroupNorm,
    dec_out: AdaptedConv2d,
}

impl AutoencoderKL {
    /// Builds the VAE from `w` (frozen; adapters are not applied to it).
    pub fn new(cfg: &VaeConfig, w: &Weights) -> Result<Self> {
        cfg.validate()?;
        let g = cfg.norm_num_groups;
        let boc = &cfg.block_out_channels;
        let n = boc.len();
        let lat = cfg.latent_channels;
        let res =
            |path: String, i: usize, o: usize| ResnetBlock2D::new(w, &path, i, o, 0, g, 1e-6, 1.0);
        let enc_in = conv3x3(w, "encoder.conv_in", cfg.in_channels, boc[0], 1, 1)?;
        let mut enc_levels = vec![];
        let mut prev = boc[0];
        for (i, &c) in boc.iter().enumerate() {
            let mut resnets = vec![];
            for j in 0..cfg.layers_per_block {
                resnets.push(res(
                    format!("encoder.down_blocks.{i}.resnets.{j}"),
                    if j == 0 { prev } else { c },
                    c,
                )?);
            }
            let sampler = if i + 1 < n {
                // Downsample2D of the encoder: pad right/bottom by one, then a stride-2 conv
                // without padding.
                Some(conv3x3(
                    w,
                    &format!("encoder.down_blocks.{i}.downsamplers.0.conv"),
                    c,
                    c,
                    2,
                    0,
                )?)
            } else {
                None
            };
            enc_levels.push(Level { resnets, sampler });
            prev = c;
        }
        let top = boc[n - 1];
        let enc_mid = MidBlock::new(w, "encoder.mid_block", top, g, cfg.mid_block_add_attention)?;
        let enc_norm = groupnorm(w, "encoder.conv_norm_out", top, g, 1e-6)?;
        let enc_out = conv3x3(w, "encoder.conv_out", top, 2 * lat, 1, 1)?;
        let one = |path: &str, c: usize| w.conv2d(path, c, c, 1, ConvCfg::default());
        let quant = if cfg.use_quant_conv {
            Some(one("quant_conv", 2 * lat)?)
        } else {
            None
        };
        let post_quant = if cfg.use_post_quant_conv {
            Some(one("post_quant_conv", lat)?)
        } else {
            None
        };
        let dec_in = conv3x3(w, "decoder.conv_in", lat, top, 1, 1)?;
        let dec_mid = MidBlock::new(w, "decoder.mid_block", top, g, cfg.mid_block_add_attention)?;
        let mut dec_levels = vec![];
        let mut prev = top;
        for (i, &c) in boc.iter().rev().enumerate() {
            let mut resnets = vec![];
            for j in 0..=cfg.layers_per_block {
                resnets.push(res(
                    format!("decoder.up_blocks.{i}.resnets.{j}"),
                    if j == 0 { prev } else { c },
                    c,
                )?);
            }
            let sampler = if i + 1 < n {
                Some(conv3x3(
                    w,
                    &format!("decoder.up_blocks.{i}.upsamplers.0.conv"),
                    c,
                    c,
                    1,
                    1,
                )?)
            } else {
                None
            };
            dec_levels.push(Level { resnets, sampler });
            prev = c;
        }
        let dec_norm = groupnorm(w, "decoder.conv_norm_out", boc[0], g, 1e-6)?;
        let dec_out = conv3x3(w, "decoder.conv_out", boc[0], cfg.out_channels, 1, 1)?;
        Ok(Self {
            cfg: cfg.clone(),
            enc_in,
            enc_levels,
            enc_mid,
            enc_norm,
            enc_out,
            quant,
            post_quant,
            dec_in,
            dec_mid,
            dec_levels,
            dec_norm,
            dec_out,
        })
    }

    /// Loads `dir/config.json` and the safetensors weights of a `vae/` folder.
    pub fn load(dir: &Path) -> Result<Self> {
        let cfg = VaeConfig::from_file(&dir.join("config.json"))?;
        let files = super::weights::weight_files(dir)?;
        Self::new(
            &cfg,
            &Weights::from_files(&files, crate::peft::AdapterPlan::none())?,
        )
    }

    /// The configuration.
    pub fn config(&self) -> &VaeConfig {
        &self.cfg
    }

    /// The posterior of images `x` (B, C, H, W) in [−1, 1]: (mean, logvar), each (B, latent, H/f, W/f).
    pub fn encode(&self, x: &Tensor, ctx: &ForwardCtx) -> Result<(Tensor, Tensor)> {
        let ctx = &ctx.at(Layout::Image);
        let f = self.cfg.factor();
        let (_, _, h, w) = x.dims4()?;
        if h % f != 0 || w % f != 0 {
            return Err(Error::Msg(format!(
                "VAE input {h}x{w} is not a multiple of the VAE's downsampling factor {f}"
            )));
        }
        let mut h = self.enc_in.forward(x, ctx)?;
        for l in &self.enc_levels {
            for r in &l.resnets {
                h = r.forward(&h, None, ctx)?;
            }
            if let Some(s) = &l.sampler {
                h = s.forward(&h.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?, ctx)?;
            }
        }
        h = self.enc_mid.forward(&h, ctx)?;
        h = self.enc_out.forward(&self.enc_norm.apply_silu(&h)?, ctx)?;
        if let Some(q) = &self.quant {
            h = q.forward(&h, ctx)?;
        }
        let lat = self.cfg.latent_channels;
        let mean = h.narrow(1, 0, lat)?;
        let logvar = h.narrow(1, lat, lat)?.clamp(-30f32, 20f32)?;
        Ok((mean, logvar))
    }

    /// Images (B, C, H·f, W·f) from unscaled latents `z`.
    pub fn decode(&self, z: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let ctx = &ctx.at(Layout::Image);
        let mut h = match &self.post_quant {
            Some(p) => p.forward(z, ctx)?,
            None => z.clone(),
        };
        h = self.dec_in.forward(&h, ctx)?;
        h = self.dec_mid.forward(&h, ctx)?;
        for l in &self.dec_levels {
            for r in &l.resnets {
                h = r.forward(&h, None, ctx)?;
            }
            if let Some(s) = &l.sampler {
                h = s.forward(&crate::nn::resample::upsample_nearest(&h, 2)?, ctx)?;
            }
        }
        self.dec_out.forward(&self.dec_norm.apply_silu(&h)?, ctx)
    }

    /// Denoiser-space latents of images: a posterior sample (`noise` of the latent shape, or the
    /// mean without it), shifted and scaled.
    pub fn encode_scaled(
        &self,
        x: &Tensor,
        noise: Option<&Tensor>,
        ctx: &ForwardCtx,
    ) -> Result<Tensor> {
        let (mean, logvar) = self.encode(x, ctx)?;
        let z = match noise {
            Some(n) => (mean + (logvar * 0.5)?.exp()?.mul(n)?)?,
            None => mean,
        };
        Ok(((z - self.cfg.shift_factor.unwrap_or(0.0))? * self.cfg.scaling_factor)?)
    }

    /// Images from denoiser-space latents.
    pub fn decode_scaled(&self, z: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let z = ((z / self.cfg.scaling_factor)? + self.cfg.shift_factor.unwrap_or(0.0))?;
        self.decode(&z, ctx)
    }
}
