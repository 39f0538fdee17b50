//! The `config.json` of the Llama family (Llama, Qwen2, Mistral): defaults, checks, RoPE with
//! `rope_theta` and llama3 / linear scaling (both `rope_scaling` and transformers 5's
//! `rope_parameters`), and the stop tokens.

use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;

fn d_eps() -> f64 {
    1e-6
}
fn d_act() -> String {
    "silu".into()
}
fn d_maxpos() -> usize {
    4096
}

/// The `config.json` fields of the Llama family.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// `llama`, `qwen2` or `mistral`.
    pub model_type: String,
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA); default: the query heads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    /// Head width; default hidden / heads.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// RMSNorm ε.
    #[serde(default = "d_eps")]
    pub rms_norm_eps: f64,
    /// RoPE base (pre-transformers-5 configs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    /// RoPE scaling (pre-transformers-5 configs).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<serde_json::Value>,
    /// transformers 5: `{rope_theta, rope_type, factor, ...}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<serde_json::Value>,
    /// Longest position.
    #[serde(default = "d_maxpos")]
    pub max_position_embeddings: usize,
    /// `lm_head` shares `embed_tokens`.
    #[serde(default)]
    pub tie_word_embeddings: bool,
    /// Biases on q/k/v/o (Llama's switch; Qwen2 always has q/k/v biases).
    #[serde(default)]
    pub attention_bias: bool,
    /// Biases on the MLP.
    #[serde(default)]
    pub mlp_bias: bool,
    /// `silu`.
    #[serde(default = "d_act")]
    pub hidden_act: String,
    /// BOS id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<serde_json::Value>,
    /// EOS id(s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<serde_json::Value>,
    /// Everything else, kept for writing the config back.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

/// How positions are scaled before the rotation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RopeScaling {
    /// None.
    Default,
    /// Positions divided by `factor`.
    Linear {
        /// Factor.
        factor: f64,
    },
    /// Llama 3's frequency-dependent scaling.
    Llama3 {
        /// Factor.
        factor: f64,
        /// Low-frequency factor.
        low_freq_factor: f64,
        /// High-frequency factor.
        high_freq_factor: f64,
        /// Context the model was trained with.
        original_max_position_embeddings: f64,
    },
}

impl LlamaConfig {
    /// Reads `config.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        crate::util::read_json_config(path, Self::validate)
    }

    /// Checks the fields this implementation depends on.
    pub fn validate(&self) -> Result<()> {
        if !matches!(self.model_type.as_str(), "llama" | "qwen2" | "mistral") {
            return Err(Error::Config(format!(
                "model_type `{}` is not llama, qwen2 or mistral",
                self.model_type
            )));
        }
        if self.hidden_act != "silu" {
            return Err(Error::Config(format!(
                "hidden_act `{}` is not supported (silu)",
                self.hidden_act
            )));
        }
        let (h, kv) = (self.num_attention_heads, self.kv_heads());
        if h == 0 || kv == 0 || h % kv != 0 {
            return Err(Error::Config(format!(
                "num_attention_heads {h} must be a positive multiple of num_key_value_heads {kv}"
            )));
        }
        if self.head_dim() % 2 != 0 {
            return Err(Error::Config(format!(
                "head_dim {} must be even for RoPE",
                self.head_dim()
            )));
        }
        self.rope()?;
        Ok(())
    }

    /// Key/value heads.
    pub fn kv_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// Head width.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// Whether q/k/v carry biases.
    pub fn qkv_bias(&self) -> bool {
        self.attention_bias || self.model_type == "qwen2"
    }

    /// (θ, scaling) from either config style.
    pub fn rope(&self) -> Result<(f64, RopeScaling)> {
        let params = self.rope_parameters.as_ref();
        let scaling = self
            .rope_scaling
            .as_ref()
            .filter(|v| !v.is_null())
            .or(params);
        let theta = self
            .rope_theta
            .or_else(|| params.and_then(|p| p["rope_theta"].as_f64()))
            .unwrap_or(10000.0);
        let Some(s) = scaling else {
            return Ok((theta, RopeScaling::Default));
        };
        let kind = s["rope_type"]
            .as_str()
            .or(s["type"].as_str())
            .unwrap_or("default");
        let f = |k: &str| {
            s[k].as_f64()
                .ok_or_else(|| Error::Config(format!("rope scaling `{kind}` needs `{k}`")))
        };
        let sc = match kind {
            "default" => RopeScaling::Default,
            "linear" => RopeScaling::Linear {
                factor: f("factor")?,
            },
            "llama3" => RopeScaling::Llama3 {
                factor: f("factor")?,
                low_freq_factor: f("low_freq_factor")?,
                high_freq_factor: f("high_freq_factor")?,
                original_max_position_embeddings: f("original_max_position_embeddings")?,
            },
            k => {
                return Err(Error::Config(format!(
                    "rope scaling `{k}` is not supported (default, linear, llama3)"
                )))
            }
        };
        Ok((theta, sc))
    }

    /// The RoPE inverse frequencies (head_dim / 2 values), scaled.
    pub fn inv_freq(&self) -> Result<Vec<f32>> {
        let (theta, sc) = self.rope()?;
        let d = self.head_dim();
        let base: Vec<f64> = (0..d / 2)
            .map(|i| 1.0 / theta.powf(2.0 * i as f64 / d as f64))
            .collect();
        Ok(match sc {
            RopeScaling::Default => base,
            RopeScaling::Linear { factor } => base.iter().map(|f| f / factor).collect(),
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                base.iter()
                    .map(|&f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (old / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
        .into_iter()
        .map(|f| f as f32)
        .collect())
    }

    /// EOS ids (one or a list).
    pub fn eos_ids(&self) -> Vec<u32> {
        match &self.eos_token_id {
            Some(serde_json::Value::Number(n)) => {
                n.as_u64().map(|v| vec![v as u32]).unwrap_or_default()
            }
            Some(serde_json::Value::Array(a)) => a
                .iter()
                .filter_map(|v| v.as_u64())
                .map(|v| v as u32)
                .collect(),
            _ => vec![],
        }
    }
}
