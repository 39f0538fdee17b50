//! `UNet2DConditionModel` configuration: the fields of a diffusers `unet/config.json`.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// A value given once for all blocks or per block.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    /// Same for every block.
    One(T),
    /// One per down block.
    Many(Vec<T>),
}

impl<T: Clone> PerBlock<T> {
    /// The value for each of `n` blocks.
    pub fn expand(&self, n: usize, field: &str) -> Result<Vec<T>> {
        match self {
            PerBlock::One(v) => Ok(vec![v.clone(); n]),
            PerBlock::Many(v) if v.len() == n => Ok(v.clone()),
            PerBlock::Many(v) => Err(Error::Config(format!(
                "{field} has {} entries for {n} blocks",
                v.len()
            ))),
        }
    }
}

fn d_sample() -> usize {
    64
}
fn d_ch() -> usize {
    4
}
fn d_true() -> bool {
    true
}
fn d_blocks() -> Vec<String> {
    vec![
        "CrossAttnDownBlock2D".into(),
        "CrossAttnDownBlock2D".into(),
        "CrossAttnDownBlock2D".into(),
        "DownBlock2D".into(),
    ]
}
fn d_up() -> Vec<String> {
    vec![
        "UpBlock2D".into(),
        "CrossAttnUpBlock2D".into(),
        "CrossAttnUpBlock2D".into(),
        "CrossAttnUpBlock2D".into(),
    ]
}
fn d_mid() -> Option<String> {
    Some("UNetMidBlock2DCrossAttn".into())
}
fn d_boc() -> Vec<usize> {
    vec![320, 640, 1280, 1280]
}
fn d_lpb() -> PerBlock<usize> {
    PerBlock::One(2)
}
fn d_one_f() -> f64 {
    1.0
}
fn d_pad() -> usize {
    1
}
fn d_act() -> String {
    "silu".into()
}
fn d_groups() -> usize {
    32
}
fn d_eps() -> f64 {
    1e-5
}
fn d_cross() -> PerBlock<usize> {
    PerBlock::One(1280)
}
fn d_tlpb() -> PerBlock<usize> {
    PerBlock::One(1)
}
fn d_head() -> PerBlock<usize> {
    PerBlock::One(8)
}
fn d_positional() -> String {
    "positional".into()
}
fn d_default() -> String {
    "default".into()
}
fn null_is_default_positional<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<String, D::Error> {
    Ok(Option::<String>::deserialize(d)?.unwrap_or_else(d_positional))
}
fn null_is_default_shift<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<String, D::Error> {
    Ok(Option::<String>::deserialize(d)?.unwrap_or_else(d_default))
}
fn d_k() -> usize {
    3
}

/// diffusers' UNet2DConditionModel config (SD1.x, SD2.x, SDXL families).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UNetConfig {
    /// Latent size the model was trained at.
    #[serde(default = "d_sample")]
    pub sample_size: usize,
    /// Input channels.
    #[serde(default = "d_ch")]
    pub in_channels: usize,
    /// Output channels.
    #[serde(default = "d_ch")]
    pub out_channels: usize,
    /// 2x − 1 on the input.
    #[serde(default)]
    pub center_input_sample: bool,
    /// Timestep embedding order (cos, sin).
    #[serde(default = "d_true")]
    pub flip_sin_to_cos: bool,
    /// Timestep embedding frequency shift.
    #[serde(default)]
    pub freq_shift: f64,
    /// Down block types.
    #[serde(default = "d_blocks")]
    pub down_block_types: Vec<String>,
    /// Mid block type.
    #[serde(default = "d_mid")]
    pub mid_block_type: Option<String>,
    /// Up block types.
    #[serde(default = "d_up")]
    pub up_block_types: Vec<String>,
    /// Channels per block.
    #[serde(default = "d_boc")]
    pub block_out_channels: Vec<usize>,
    /// Resnets per down block.
    #[serde(default = "d_lpb")]
    pub layers_per_block: PerBlock<usize>,
    /// Downsampler padding.
    #[serde(default = "d_pad")]
    pub downsample_padding: usize,
    /// Mid block output scale.
    #[serde(default = "d_one_f")]
    pub mid_block_scale_factor: f64,
    /// Activation (`silu`).
    #[serde(default = "d_act")]
    pub act_fn: String,
    /// GroupNorm groups.
    #[serde(default = "d_groups")]
    pub norm_num_groups: usize,
    /// GroupNorm epsilon in resnets and the output norm.
    #[serde(default = "d_eps")]
    pub norm_eps: f64,
    /// Text-encoder width.
    #[serde(default = "d_cross")]
    pub cross_attention_dim: PerBlock<usize>,
    /// Transformer blocks per attention (SDXL).
    #[serde(default = "d_tlpb")]
    pub transformer_layers_per_block: PerBlock<usize>,
    /// Legacy: the number of heads when `num_attention_heads` is absent (diffusers issue #2011).
    #[serde(default = "d_head")]
    pub attention_head_dim: PerBlock<usize>,
    /// Number of heads.
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock<usize>>,
    /// Linear (SD2/SDXL) or 1x1 conv (SD1) proj_in/proj_out.
    #[serde(default)]
    pub use_linear_projection: bool,
    /// `text_time` (SDXL) or none.
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    /// SDXL: embedding width of each time id.
    #[serde(default)]
    pub addition_time_embed_dim: Option<usize>,
    /// SDXL: input width of `add_embedding`.
    #[serde(default)]
    pub projection_class_embeddings_input_dim: Option<usize>,
    /// Class embedding (unsupported unless null).
    #[serde(default)]
    pub class_embed_type: Option<String>,
    /// Time embedding type (`positional`; a `null` read from an old file means the default).
    #[serde(
        default = "d_positional",
        deserialize_with = "null_is_default_positional"
    )]
    pub time_embedding_type: String,
    /// `default` only (a `null` read from an old file means the default).
    #[serde(default = "d_default", deserialize_with = "null_is_default_shift")]
    pub resnet_time_scale_shift: String,
    /// Conv kernel of conv_in.
    #[serde(default = "d_k")]
    pub conv_in_kernel: usize,
    /// Conv kernel of conv_out.
    #[serde(default = "d_k")]
    pub conv_out_kernel: usize,
    /// Other fields, kept for round trips.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl UNetConfig {
    /// Reads `unet/config.json`.
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        crate::util::read_json_config(path, Self::validate)
    }

    /// Rejects settings this implementation does not cover, by name.
    pub fn validate(&self) -> Result<()> {
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(Error::Config(
                "down/up block types and block_out_channels must have the same length".into(),
            ));
        }
        if self.act_fn != "silu" {
            return Err(Error::Config(format!(
                "act_fn `{}` is not supported (silu only)",
                self.act_fn
            )));
        }
        if let Some(c) = &self.class_embed_type {
            return Err(Error::Config(format!(
                "class_embed_type `{c}` is not supported"
            )));
        }
        if let Some(t) = self
            .addition_embed_type
            .as_deref()
            .filter(|t| *t != "text_time")
        {
            return Err(Error::Config(format!(
                "addition_embed_type `{t}` is not supported (text_time only)"
            )));
        }
        if self.time_embedding_type != "positional" {
            return Err(Error::Config(
                "only positional time embeddings are supported".into(),
            ));
        }
        if self.resnet_time_scale_shift != "default" {
            return Err(Error::Config(
                "resnet_time_scale_shift other than `default` is not supported".into(),
            ));
        }
        for (k, v) in &self.extra {
            let inert = match (k.as_str(), v) {
                (_, serde_json::Value::Null) | (_, serde_json::Value::Bool(false)) => true,
                ("dual_cross_attention" | "only_cross_attention" | "upcast_attention", _) => {
                    v == &serde_json::Value::Bool(false)
                }
                ("attention_type", serde_json::Value::String(s)) => s == "default",
                (
                    "timestep_post_act"
                    | "time_cond_proj_dim"
                    | "encoder_hid_dim"
                    | "encoder_hid_dim_type"
                    | "num_class_embeds",
                    _,
                ) => false,
                _ => true,
            };
            if !inert {
                return Err(Error::Config(format!(
                    "UNet config field `{k}` = {v} is not supported"
                )));
            }
        }
        for t in self.down_block_types.iter().chain(&self.up_block_types) {
            if !matches!(
                t.as_str(),
                "CrossAttnDownBlock2D" | "DownBlock2D" | "CrossAttnUpBlock2D" | "UpBlock2D"
            ) {
                return Err(Error::Config(format!("block type `{t}` is not supported")));
            }
        }
        if let Some(m) = self
            .mid_block_type
            .as_deref()
            .filter(|m| *m != "UNetMidBlock2DCrossAttn")
        {
            return Err(Error::Config(format!(
                "mid_block_type `{m}` is not supported"
            )));
        }
        Ok(())
    }

    /// Heads per down block (legacy `attention_head_dim` means heads).
    pub fn heads(&self) -> Result<Vec<usize>> {
        let n = self.block_out_channels.len();
        match &self.num_attention_heads {
            Some(h) => h.expand(n, "num_attention_heads"),
            None => self.attention_head_dim.expand(n, "attention_head_dim"),
        }
    }
}
