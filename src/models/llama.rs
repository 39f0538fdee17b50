//! Llama, Qwen2 and Mistral causal LMs from a Hugging Face `config.json` and (sharded) safetensors,
//! with HF module paths (`model.layers.N.self_attn.q_proj`, ...) built through the adapter core:
//! grouped-query attention, RoPE with `rope_theta` and llama3 / linear `rope_scaling` (both the
//! `rope_scaling` + `rope_theta` fields and transformers 5's `rope_parameters`), Qwen2's q/k/v biases,
//! tied embeddings, RMSNorm, softmax and RoPE as fused nodes with a real backward, padding masks,
//! packed sequences (positions restart, no attention across sequences) and a KV cache.

use super::Weights;
use crate::nn::act::swiglu;
use crate::nn::attention::{
    attention, merge_heads, repeat_kv, shifted_sparse_attention, split_heads,
};
use crate::nn::loss::{linear_cross_entropy, next_token_loss, shift_left};
use crate::nn::norm::rms_norm;
use crate::nn::rope::rope;
use crate::peft::{Adapted, AdaptedEmbedding, AdaptedLayer, AdaptedLinear, ForwardCtx, Layout};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
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
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let c: Self =
            serde_json::from_str(&text).map_err(|e| Error::format(path, e.to_string()))?;
        c.validate()
            .map_err(|e| Error::format(path, e.to_string()))?;
        Ok(c)
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

struct Layer {
    input_norm: AdaptedLayer,
    q: AdaptedLinear,
    k: AdaptedLinear,
    v: AdaptedLinear,
    o: AdaptedLinear,
    post_norm: AdaptedLayer,
    gate: AdaptedLinear,
    up: AdaptedLinear,
    down: AdaptedLinear,
}

/// Keys and values of earlier positions, per layer.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    kv: Vec<Option<(Tensor, Tensor)>>,
    /// Positions already in the cache.
    pub len: usize,
}

/// What to attend to.
#[derive(Debug, Clone, Default)]
pub struct Inputs<'a> {
    /// (B, T) 1 for real tokens, 0 for padding.
    pub attention_mask: Option<&'a Tensor>,
    /// (B, T) positions (packing: they restart per sequence); default 0.. (after the cache).
    pub position_ids: Option<&'a Tensor>,
    /// (B, T) sequence index of each token in a packed row: attention stays within a sequence.
    pub segment_ids: Option<&'a Tensor>,
}

/// A causal LM of the Llama family.
pub struct LlamaForCausalLM {
    cfg: LlamaConfig,
    embed: AdaptedEmbedding,
    layers: Vec<Layer>,
    norm: AdaptedLayer,
    lm_head: AdaptedLinear,
    inv_freq: Vec<f32>,
    /// LongLoRA's shifted sparse attention in training: the share of the sequence per group.
    s2_attn: Option<f64>,
}

impl LlamaForCausalLM {
    /// Builds the model from `w` (layers through `w.plan`).
    pub fn new(cfg: &LlamaConfig, w: &Weights) -> Result<Self> {
        cfg.validate()?;
        let (d, hd) = (cfg.hidden_size, cfg.head_dim());
        let (nh, kv) = (cfg.num_attention_heads, cfg.kv_heads());
        let lin = |p: &str, i: usize, o: usize, bias: bool| w.linear(p, i, o, bias);
        let mut layers = vec![];
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let qb = cfg.qkv_bias();
            layers.push(Layer {
                input_norm: w.plan.norm(
                    &format!("{p}.input_layernorm"),
                    w.get(&format!("{p}.input_layernorm.weight"), &[d])?,
                )?,
                q: lin(&format!("{p}.self_attn.q_proj"), d, nh * hd, qb)?,
                k: lin(&format!("{p}.self_attn.k_proj"), d, kv * hd, qb)?,
                v: lin(&format!("{p}.self_attn.v_proj"), d, kv * hd, qb)?,
                o: lin(
                    &format!("{p}.self_attn.o_proj"),
                    nh * hd,
                    d,
                    cfg.attention_bias,
                )?,
                post_norm: w.plan.norm(
                    &format!("{p}.post_attention_layernorm"),
                    w.get(&format!("{p}.post_attention_layernorm.weight"), &[d])?,
                )?,
                gate: lin(
                    &format!("{p}.mlp.gate_proj"),
                    d,
                    cfg.intermediate_size,
                    cfg.mlp_bias,
                )?,
                up: lin(
                    &format!("{p}.mlp.up_proj"),
                    d,
                    cfg.intermediate_size,
                    cfg.mlp_bias,
                )?,
                down: lin(
                    &format!("{p}.mlp.down_proj"),
                    cfg.intermediate_size,
                    d,
                    cfg.mlp_bias,
                )?,
            });
        }
        let emb_w = w.get("model.embed_tokens.weight", &[cfg.vocab_size, d])?;
        let lm_head = if cfg.tie_word_embeddings && !w.contains("lm_head.weight") {
            w.plan.linear("lm_head", emb_w.clone(), None)?
        } else {
            lin("lm_head", d, cfg.vocab_size, false)?
        };
        let mut m = Self {
            embed: w.plan.embedding("model.embed_tokens", emb_w)?,
            layers,
            norm: w
                .plan
                .norm("model.norm", w.get("model.norm.weight", &[d])?)?,
            lm_head,
            inv_freq: cfg.inv_freq()?,
            cfg: cfg.clone(),
            s2_attn: None,
        };
        w.plan.finish(&mut m.layers_mut())?;
        Ok(m)
    }

    /// LongLoRA: shifted sparse attention in training forwards, with groups of `ratio` of the
    /// sequence (the paper's 1/4); `None` turns it off. Inference always attends in full.
    pub fn set_shifted_sparse_attention(&mut self, ratio: Option<f64>) {
        self.s2_attn = ratio;
    }

    /// Position interpolation (Chen et al. 2023), as LongLoRA extends context: linear RoPE
    /// scaling by `factor` (positions divided by it) and `max_position_embeddings` times it.
    /// Written into the config, so that saved and merged models keep it.
    pub fn set_position_interpolation(&mut self, factor: f64) -> Result<()> {
        if !(factor >= 1.0) {
            return Err(Error::Config(format!(
                "position interpolation factor {factor} must be at least 1"
            )));
        }
        let (theta, current) = self.cfg.rope()?;
        self.cfg.rope_theta = Some(theta);
        if !matches!(current, RopeScaling::Default) {
            return Err(Error::Config(
                "the model already has RoPE scaling; position interpolation stacks only on plain RoPE".into(),
            ));
        }
        self.cfg.rope_scaling = Some(serde_json::json!({"type": "linear", "factor": factor}));
        self.cfg.rope_parameters = None;
        self.cfg.max_position_embeddings =
            (self.cfg.max_position_embeddings as f64 * factor).round() as usize;
        self.inv_freq = self.cfg.inv_freq()?;
        Ok(())
    }

    /// Loads a Hugging Face model folder.
    pub fn load(dir: &Path, plan: crate::peft::AdapterPlan) -> Result<Self> {
        let cfg = LlamaConfig::from_file(&dir.join("config.json"))?;
        let w = Weights::from_files(&super::weights::weight_files(dir)?, plan)?;
        Self::new(&cfg, &w)
    }

    /// The configuration.
    pub fn config(&self) -> &LlamaConfig {
        &self.cfg
    }

    /// An empty cache.
    pub fn cache(&self) -> KvCache {
        KvCache {
            kv: vec![None; self.layers.len()],
            len: 0,
        }
    }

    /// Logits (B, T, V) of token ids (B, T).
    pub fn forward(&self, ids: &Tensor, inputs: &Inputs, ctx: &ForwardCtx) -> Result<Tensor> {
        self.forward_cached(ids, inputs, None, ctx)
    }

    /// Hidden states after the final norm (B, T, D).
    pub fn hidden(
        &self,
        ids: &Tensor,
        inputs: &Inputs,
        mut cache: Option<&mut KvCache>,
        ctx: &ForwardCtx,
    ) -> Result<Tensor> {
        // Every layer of a decoder sees the token sequence (routing masks are per token).
        let ctx = &ctx.at(Layout::Sequence);
        let (b, t) = ids.dims2()?;
        let dev = ids.device().clone();
        let ids = ids.to_dtype(DType::U32)?;
        if let Some(bad) = ids
            .flatten_all()?
            .to_vec1::<u32>()?
            .into_iter()
            .find(|&i| i as usize >= self.cfg.vocab_size)
        {
            return Err(Error::Msg(format!(
                "token id {bad} is not below vocab_size {}",
                self.cfg.vocab_size
            )));
        }
        let past = cache.as_ref().map_or(0, |c| c.len);
        let pos = match inputs.position_ids {
            Some(p) => {
                if p.dims() != [b, t] {
                    return Err(Error::Msg(format!(
                        "position_ids {:?} do not match input ids ({b}, {t})",
                        p.dims()
                    )));
                }
                p.to_dtype(DType::U32)?
            }
            None => Tensor::arange(past as u32, (past + t) as u32, &dev)?
                .unsqueeze(0)?
                .repeat((b, 1))?,
        };
        let mask = self.mask(b, t, past, inputs, &dev)?;
        let valid: Option<Vec<u32>> = match (self.s2_attn, inputs.attention_mask) {
            (Some(_), Some(m)) if m.dims() == [b, t] => {
                Some(m.to_dtype(DType::U32)?.flatten_all()?.to_vec1::<u32>()?)
            }
            _ => None,
        };
        // Packed rows (several segments in one row) cannot go through S²-Attn's groups.
        let packed = match (self.s2_attn, inputs.segment_ids) {
            (Some(_), Some(sg)) => {
                let v = sg.to_dtype(DType::U32)?.to_vec2::<u32>()?;
                v.iter().enumerate().any(|(bi, row)| {
                    let ok = |i: usize| valid.as_ref().is_none_or(|m| m[bi * t + i] != 0);
                    let mut ids = row
                        .iter()
                        .enumerate()
                        .filter(|(i, _)| ok(*i))
                        .map(|(_, s)| s);
                    let first = ids.next();
                    ids.any(|s| Some(s) != first)
                })
            }
            _ => false,
        };
        let (nh, kvh) = (self.cfg.num_attention_heads, self.cfg.kv_heads());
        let eps = self.cfg.rms_norm_eps;
        let mut h = self.embed.forward(&ids, ctx)?;
        for (li, l) in self.layers.iter().enumerate() {
            let x = rms_norm(&h, &l.input_norm.effective_weight(ctx)?, eps)?;
            let q = rope(
                &split_heads(&l.q.forward(&x, ctx)?, nh)?,
                &pos,
                &self.inv_freq,
            )?;
            let mut k = rope(
                &split_heads(&l.k.forward(&x, ctx)?, kvh)?,
                &pos,
                &self.inv_freq,
            )?;
            let mut v = split_heads(&l.v.forward(&x, ctx)?, kvh)?;
            if let Some(c) = cache.as_deref_mut() {
                if let Some((pk, pv)) = &c.kv[li] {
                    k = Tensor::cat(&[pk, &k], 2)?;
                    v = Tensor::cat(&[pv, &v], 2)?;
                }
                c.kv[li] = Some((k.clone(), v.clone()));
            }
            let (k, v) = (repeat_kv(&k, nh / kvh)?, repeat_kv(&v, nh / kvh)?);
            let a = match (self.s2_attn, ctx.train, past) {
                (Some(ratio), true, 0) => {
                    if packed {
                        return Err(Error::Config(
                            "shifted sparse attention (S²-Attn) cannot be used with packed sequences; turn packing off".into(),
                        ));
                    }
                    shifted_sparse_attention(&q, &k, &v, ratio, valid.as_deref())?
                }
                _ => merge_heads(&attention(&q, &k, &v, Some(&mask))?)?,
            };
            h = (h + l.o.forward(&a, ctx)?)?;
            let x = rms_norm(&h, &l.post_norm.effective_weight(ctx)?, eps)?;
            let m = swiglu(&l.gate.forward(&x, ctx)?, &l.up.forward(&x, ctx)?)?;
            h = (h + l.down.forward(&m, ctx)?)?;
        }
        if let Some(c) = cache {
            c.len += t;
        }
        rms_norm(&h, &self.norm.effective_weight(ctx)?, eps)
    }

    /// Logits, extending `cache` (generation) when given.
    pub fn forward_cached(
        &self,
        ids: &Tensor,
        inputs: &Inputs,
        cache: Option<&mut KvCache>,
        ctx: &ForwardCtx,
    ) -> Result<Tensor> {
        let h = self.hidden(ids, inputs, cache, ctx)?;
        self.lm_head.forward(&h, &ctx.at(Layout::Sequence))
    }

    /// Whether [`Self::next_token_loss`] skips the logits (a frozen plain `lm_head` in f32 on the CPU).
    pub fn lm_head_is_fused_in_the_loss(&self) -> bool {
        self.fused_lm_head().is_some()
    }

    fn fused_lm_head(&self) -> Option<Tensor> {
        self.lm_head
            .0
            .frozen_plain_weight()
            .filter(|w| w.device().is_cpu() && w.dtype() == DType::F32)
            .cloned()
    }

    /// Mean next-token cross-entropy of `ids` (B, T) with per-token `weights` (B, T; the weight of
    /// token t + 1 counts the prediction made at t), as [`next_token_loss`] of [`Self::forward`].
    /// When `lm_head` is a frozen plain linear layer (LoRA training leaves it so) on the CPU in f32,
    /// the logits are never materialised: [`linear_cross_entropy`] takes the final
    /// hidden states, skips positions of weight 0 and keeps no (B, T, V) tensor in either pass.
    pub fn next_token_loss(
        &self,
        ids: &Tensor,
        inputs: &Inputs,
        weights: &Tensor,
        ctx: &ForwardCtx,
    ) -> Result<Tensor> {
        let Some(w) = self.fused_lm_head() else {
            let logits = self.forward(ids, inputs, ctx)?;
            return next_token_loss(&logits, ids, weights);
        };
        let (b, t) = ids.dims2()?;
        if t < 2 {
            return Err(Error::Msg(
                "next-token loss needs at least two tokens".into(),
            ));
        }
        if weights.dims() != [b, t] {
            return Err(Error::Msg(format!(
                "loss weights {:?} do not match input ids ({b}, {t})",
                weights.dims()
            )));
        }
        let h = self.hidden(ids, inputs, None, ctx)?;
        if h.dtype() != DType::F32 {
            let logits = self.lm_head.forward(&h, &ctx.at(Layout::Sequence))?;
            return next_token_loss(&logits, ids, weights);
        }
        let targets = shift_left(&ids.to_dtype(DType::U32)?.to_vec2::<u32>()?, 0);
        let coefs = shift_left(&weights.to_dtype(DType::F32)?.to_vec2::<f32>()?, 0.0);
        let d = h.dim(2)?;
        linear_cross_entropy(&h.reshape((b * t, d))?, &w, &targets, &coefs)
    }

    /// The additive attention mask (B, 1, T, past + T): causal, padding and packing.
    fn mask(&self, b: usize, t: usize, past: usize, inp: &Inputs, dev: &Device) -> Result<Tensor> {
        let s = past + t;
        let pad: Option<Vec<u32>> = match inp.attention_mask {
            Some(m) => {
                if m.dims() != [b, s] && m.dims() != [b, t] {
                    return Err(Error::Msg(format!(
                        "attention_mask {:?} does not match ({b}, {s})",
                        m.dims()
                    )));
                }
                let v = m.to_dtype(DType::U32)?.flatten_all()?.to_vec1::<u32>()?;
                // A mask of the new tokens only: earlier positions count as real.
                Some(if m.dim(1)? == s {
                    v
                } else {
                    (0..b)
                        .flat_map(|bi| {
                            std::iter::repeat_n(1, past).chain(v[bi * t..(bi + 1) * t].to_vec())
                        })
                        .collect()
                })
            }
            None => None,
        };
        let seg: Option<Vec<u32>> = match inp.segment_ids {
            Some(sg) => {
                if sg.dims() != [b, t] || past > 0 {
                    return Err(Error::Msg(format!(
                        "segment_ids {:?} must be ({b}, {t}) and are not used with a cache",
                        sg.dims()
                    )));
                }
                Some(sg.to_dtype(DType::U32)?.flatten_all()?.to_vec1::<u32>()?)
            }
            None => None,
        };
        const NEG: f32 = -1e30;
        let mut m = vec![0f32; b * t * s];
        for bi in 0..b {
            for qi in 0..t {
                let qpos = past + qi;
                for kj in 0..s {
                    let mut ok = kj <= qpos;
                    if let Some(p) = &pad {
                        ok &= p[bi * s + kj] != 0;
                    }
                    if let (Some(sg), true) = (&seg, ok) {
                        ok &= sg[bi * t + qi] == sg[bi * t + kj];
                    }
                    if !ok {
                        m[(bi * t + qi) * s + kj] = NEG;
                    }
                }
            }
        }
        Ok(Tensor::from_vec(m, (b, 1, t, s), dev)?)
    }
}

impl Adapted for LlamaForCausalLM {
    fn layers(&self) -> Vec<&AdaptedLayer> {
        let mut v: Vec<&AdaptedLayer> = vec![&self.embed];
        for l in &self.layers {
            v.push(&l.input_norm);
            v.extend([&*l.q, &*l.k, &*l.v, &*l.o]);
            v.push(&l.post_norm);
            v.extend([&*l.gate, &*l.up, &*l.down]);
        }
        v.push(&self.norm);
        v.push(&self.lm_head);
        v
    }
    fn layers_mut(&mut self) -> Vec<&mut AdaptedLayer> {
        let mut v: Vec<&mut AdaptedLayer> = vec![&mut self.embed];
        for l in &mut self.layers {
            v.push(&mut l.input_norm);
            v.push(&mut l.q);
            v.push(&mut l.k);
            v.push(&mut l.v);
            v.push(&mut l.o);
            v.push(&mut l.post_norm);
            v.push(&mut l.gate);
            v.push(&mut l.up);
            v.push(&mut l.down);
        }
        v.push(&mut self.norm);
        v.push(&mut self.lm_head);
        v
    }
}

/// Decoding settings (transformers' `generation_config.json` names).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GenerationConfig {
    /// Tokens to generate at most.
    pub max_new_tokens: usize,
    /// Sample (false: greedy).
    pub do_sample: bool,
    /// Softmax temperature when sampling.
    pub temperature: f64,
    /// Nucleus sampling mass (1 = off).
    pub top_p: f64,
    /// Keep the k most likely tokens (0 = off).
    pub top_k: usize,
    /// Seed of the sampler.
    pub seed: u64,
    /// Stop when one of these is generated (it is kept in the output).
    pub stop_token_ids: Vec<u32>,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 64,
            do_sample: false,
            temperature: 1.0,
            top_p: 1.0,
            top_k: 0,
            seed: 0,
            stop_token_ids: vec![],
        }
    }
}

/// Picks the next token from logits (V) as configured.
pub fn pick_token(
    logits: &[f32],
    cfg: &GenerationConfig,
    rng: &mut rand_chacha::ChaCha8Rng,
) -> Result<u32> {
    use rand::Rng;
    if logits.is_empty() {
        return Err(Error::Msg("empty logits".into()));
    }
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0usize, f32::NEG_INFINITY), |b, (i, &v)| {
                if v > b.1 {
                    (i, v)
                } else {
                    b
                }
            })
            .0 as u32
    };
    if !cfg.do_sample || cfg.temperature <= 0.0 {
        return Ok(argmax());
    }
    let t = cfg.temperature as f32;
    let m = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut p: Vec<(usize, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &l)| (i, ((l - m) / t).exp()))
        .collect();
    p.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    if cfg.top_k > 0 {
        p.truncate(cfg.top_k);
    }
    let total: f32 = p.iter().map(|x| x.1).sum();
    if cfg.top_p < 1.0 {
        let mut acc = 0f32;
        let mut keep = 0;
        for (k, x) in p.iter().enumerate() {
            acc += x.1 / total;
            keep = k + 1;
            if acc >= cfg.top_p as f32 {
                break;
            }
        }
        p.truncate(keep.max(1));
    }
    let total: f32 = p.iter().map(|x| x.1).sum();
    let mut u = rng.random::<f32>() * total;
    for (i, w) in &p {
        if u < *w {
            return Ok(*i as u32);
        }
        u -= w;
    }
    Ok(p.last().map(|x| x.0 as u32).unwrap_or_else(argmax))
}

impl LlamaForCausalLM {
    /// Generates a continuation of `prompt` (token ids) with a KV cache; returns the new tokens.
    pub fn generate(&self, prompt: &[u32], cfg: &GenerationConfig) -> Result<Vec<u32>> {
        if prompt.is_empty() {
            return Err(Error::Msg("generation needs a non-empty prompt".into()));
        }
        let mut rng = crate::rng::rng_for(cfg.seed, "generate");
        let mut cache = self.cache();
        let ctx = ForwardCtx::eval();
        let mut input = Tensor::from_vec(prompt.to_vec(), (1, prompt.len()), &Device::Cpu)?;
        let mut out = vec![];
        for _ in 0..cfg.max_new_tokens {
            if cache.len + input.dim(1)? > self.cfg.max_position_embeddings {
                break;
            }
            let logits = self.forward_cached(&input, &Inputs::default(), Some(&mut cache), &ctx)?;
            let last = logits.get(0)?.get(logits.dim(1)? - 1)?.to_vec1::<f32>()?;
            let next = pick_token(&last, cfg, &mut rng)?;
            out.push(next);
            if cfg.stop_token_ids.contains(&next) {
                break;
            }
            input = Tensor::from_vec(vec![next], (1, 1), &Device::Cpu)?;
        }
        Ok(out)
    }
}

impl LlamaForCausalLM {
    /// Every weight under its Hugging Face name, with active adapters (and trained copies) merged
    /// in. A tied `lm_head` is left out while it still equals the embedding; the second value says
    /// whether the embeddings stay tied.
    pub fn merged_state_dict(&self) -> Result<(std::collections::BTreeMap<String, Tensor>, bool)> {
        let mut t = std::collections::BTreeMap::new();
        for l in self.layers() {
            let (w, b) = l.merged_tensors()?;
            t.insert(format!("{}.weight", l.path()), w);
            if let Some(b) = b {
                t.insert(format!("{}.bias", l.path()), b);
            }
        }
        let mut tied = self.cfg.tie_word_embeddings;
        if tied {
            let same = match (t.get("lm_head.weight"), t.get("model.embed_tokens.weight")) {
                (Some(h), Some(e)) => (h - e)?.abs()?.max_all()?.to_scalar::<f32>()? == 0.0,
                _ => false,
            };
            if same {
                t.remove("lm_head.weight");
            } else {
                tied = false;
            }
        }
        Ok((t, tied))
    }

    /// Writes `config.json` and `model.safetensors` (merged, as transformers loads them) into `dir`.
    pub fn save_pretrained(&self, dir: &Path) -> Result<()> {
        self.save_pretrained_as(dir, false)
    }

    /// Writes a Hugging Face folder whose NF4 linear layers (every layer with an NF4 base, active
    /// adapters merged in and re-quantized) are saved in the 4-bit layout transformers +
    /// bitsandbytes write, with the `quantization_config` that makes transformers load them in
    /// 4 bits. Other tensors are written dense.
    pub fn save_pretrained_nf4(&self, dir: &Path) -> Result<()> {
        self.save_pretrained_as(dir, true)
    }

    fn save_pretrained_as(&self, dir: &Path, nf4: bool) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        let (mut t, tied) = self.merged_state_dict()?;
        let mut quantized = None;
        if nf4 {
            for l in self.layers() {
                let Some(q) = l.base_weight().nf4() else {
                    continue;
                };
                if l.trainable_copy().is_some() {
                    continue; // a fully trained copy: written dense from merged_tensors
                }
                let pending = l.active().iter().any(|n| !l.merged().contains(&n.as_str()));
                if pending && l.enabled() {
                    return Err(Error::Msg(format!(
                        "{}: merge the adapters before saving in 4 bits",
                        l.path()
                    )));
                }
                let key = format!("{}.weight", l.path());
                t.remove(&key);
                t.extend(q.to_state_dict(&key)?);
                quantized = Some(matches!(q.absmax, crate::nn::nf4::Absmax::Double { .. }));
            }
        }
        let meta = std::collections::HashMap::from([("format".to_string(), "pt".to_string())]);
        crate::util::save_safetensors(&dir.join("model.safetensors"), &t, Some(meta))?;
        let mut cfg = self.cfg.clone();
        cfg.tie_word_embeddings = tied;
        match quantized {
            Some(dq) => {
                cfg.extra.insert(
                    "quantization_config".into(),
                    serde_json::json!({
                        "quant_method": "bitsandbytes", "load_in_4bit": true, "load_in_8bit": false,
                        "_load_in_4bit": true, "_load_in_8bit": false,
                        "bnb_4bit_quant_type": "nf4", "bnb_4bit_use_double_quant": dq,
                        "bnb_4bit_compute_dtype": "float32", "bnb_4bit_quant_storage": "uint8",
                        "llm_int8_enable_fp32_cpu_offload": false, "llm_int8_has_fp16_weight": false,
                        "llm_int8_skip_modules": null, "llm_int8_threshold": 6.0
                    }),
                );
            }
            None => {
                // Dense weights: a base's 4-bit settings no longer apply.
                cfg.extra.remove("quantization_config");
            }
        }
        let mut v = serde_json::to_value(&cfg).map_err(|e| Error::Msg(e.to_string()))?;
        if v.get("architectures").is_none() {
            let arch = match cfg.model_type.as_str() {
                "qwen2" => "Qwen2ForCausalLM",
                "mistral" => "MistralForCausalLM",
                _ => "LlamaForCausalLM",
            };
            v["architectures"] = serde_json::json!([arch]);
        }
        v["torch_dtype"] = "float32".into();
        let text = serde_json::to_string_pretty(&v).map_err(|e| Error::Msg(e.to_string()))?;
        crate::util::write_atomic(&dir.join("config.json"), text.as_bytes())
    }
}
