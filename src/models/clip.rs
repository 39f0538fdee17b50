//! CLIP text encoder (`CLIPTextModel`, Hugging Face names), the conditioning model of SD1.x/2.x and
//! SDXL. Reads `text_encoder/config.json` (`hidden_act` quick_gelu or gelu, `eos_token_id`) and
//! weights named `text_model.…` (older checkpoints) or without that prefix (transformers 5).
//!
//! Pre-LN transformer with a causal mask: h += attn(LN1(h)); h += fc2(act(fc1(LN2(h)))); then
//! `final_layer_norm`. The pooled output takes the EOS position (legacy `eos_token_id == 2`: the
//! position of the largest token id, as transformers does). Every linear goes through the adapter
//! core (`q_proj`, `k_proj`, `v_proj`, `out_proj`, `fc1`, `fc2`).

use crate::models::Weights;
use crate::nn::attention::{attention, causal_mask, merge_heads, split_heads};
use crate::nn::norm::layer_norm;
use crate::peft::{Adapted, AdaptedEmbedding, AdaptedLayer, AdaptedLinear, ForwardCtx, Layout};
use crate::{Error, Result};
use candle_core::{DType, Tensor};
use serde::{Deserialize, Serialize};

fn d_act() -> String {
    "quick_gelu".into()
}
fn d_eps() -> f64 {
    1e-5
}
fn d_eos() -> u32 {
    2
}

/// `CLIPTextConfig` fields used here.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClipTextConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Layers.
    pub num_hidden_layers: usize,
    /// Heads.
    pub num_attention_heads: usize,
    /// Longest sequence.
    pub max_position_embeddings: usize,
    /// `quick_gelu` (SD1) or `gelu` (SD2 / OpenCLIP).
    #[serde(default = "d_act")]
    pub hidden_act: String,
    /// LayerNorm epsilon.
    #[serde(default = "d_eps")]
    pub layer_norm_eps: f64,
    /// EOS token id (2 = legacy pooling by the largest id).
    #[serde(default = "d_eos")]
    pub eos_token_id: u32,
    /// Everything else.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl ClipTextConfig {
    /// Reads `config.json`.
    pub fn from_file(path: &std::path::Path) -> Result<Self> {
        crate::util::read_json_config(path, Self::validate)
    }

    /// Rejects settings this implementation does not cover, by name.
    pub fn validate(&self) -> Result<()> {
        if !matches!(self.hidden_act.as_str(), "quick_gelu" | "gelu") {
            return Err(Error::Config(format!(
                "hidden_act `{}` is not supported (quick_gelu, gelu)",
                self.hidden_act
            )));
        }
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(Error::Config(format!(
                "hidden_size {} must be a multiple of num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            )));
        }
        Ok(())
    }
}

struct Layer {
    ln1: (Tensor, Tensor),
    q: AdaptedLinear,
    k: AdaptedLinear,
    v: AdaptedLinear,
    o: AdaptedLinear,
    ln2: (Tensor, Tensor),
    fc1: AdaptedLinear,
    fc2: AdaptedLinear,
}

/// Encoder outputs.
pub struct ClipOutput {
    /// After `final_layer_norm` (B, T, D).
    pub last_hidden_state: Tensor,
    /// Output of every layer before the final norm; `hidden_states[i]` = after layer i (0 = embeddings).
    pub hidden_states: Vec<Tensor>,
    /// The EOS-position vector of `last_hidden_state` (B, D).
    pub pooled: Tensor,
}

/// The text encoder.
pub struct ClipTextModel {
    cfg: ClipTextConfig,
    token_embedding: AdaptedEmbedding,
    position_embedding: AdaptedEmbedding,
    layers: Vec<Layer>,
    final_ln: (Tensor, Tensor),
    /// `text_projection` of CLIPTextModelWithProjection (SDXL's second encoder), frozen.
    text_projection: Option<Tensor>,
}

impl ClipTextModel {
    /// Builds the encoder; tensor names may carry the `text_model.` prefix or not.
    pub fn new(cfg: &ClipTextConfig, w: &Weights) -> Result<Self> {
        let pre = if w.contains("text_model.embeddings.token_embedding.weight") {
            "text_model."
        } else {
            ""
        };
        let d = cfg.hidden_size;
        let norm = |p: &str| w.norm(&format!("{pre}{p}"), d);
        let lin = |p: &str, i: usize, o: usize| w.linear(&format!("{pre}{p}"), i, o, true);
        let mut layers = vec![];
        for l in 0..cfg.num_hidden_layers {
            let p = format!("encoder.layers.{l}");
            layers.push(Layer {
                ln1: norm(&format!("{p}.layer_norm1"))?,
                q: lin(&format!("{p}.self_attn.q_proj"), d, d)?,
                k: lin(&format!("{p}.self_attn.k_proj"), d, d)?,
                v: lin(&format!("{p}.self_attn.v_proj"), d, d)?,
                o: lin(&format!("{p}.self_attn.out_proj"), d, d)?,
                ln2: norm(&format!("{p}.layer_norm2"))?,
                fc1: lin(&format!("{p}.mlp.fc1"), d, cfg.intermediate_size)?,
                fc2: lin(&format!("{p}.mlp.fc2"), cfg.intermediate_size, d)?,
            });
        }
        Ok(Self {
            cfg: cfg.clone(),
            token_embedding: w.plan.embedding(
                &format!("{pre}embeddings.token_embedding"),
                w.get(
                    &format!("{pre}embeddings.token_embedding.weight"),
                    &[cfg.vocab_size, d],
                )?,
            )?,
            position_embedding: w.plan.embedding(
                &format!("{pre}embeddings.position_embedding"),
                w.get(
                    &format!("{pre}embeddings.position_embedding.weight"),
                    &[cfg.max_position_embeddings, d],
                )?,
            )?,
            layers,
            final_ln: norm("final_layer_norm")?,
            text_projection: if w.contains("text_projection.weight") {
                let p = w.get_any("text_projection.weight")?;
                if p.rank() != 2 || p.dim(1)? != d {
                    return Err(Error::Shape {
                        path: w.file().to_path_buf(),
                        key: "text_projection.weight".into(),
                        expected: vec![p.dim(0).unwrap_or(0), d],
                        found: p.dims().to_vec(),
                    });
                }
                Some(p)
            } else {
                None
            },
        })
    }

    /// Whether the encoder has a `text_projection` (CLIPTextModelWithProjection).
    pub fn has_projection(&self) -> bool {
        self.text_projection.is_some()
    }

    /// `text_embeds` of CLIPTextModelWithProjection: the pooled output through `text_projection`
    /// (the pooled output itself without one).
    pub fn text_embeds(&self, pooled: &Tensor) -> Result<Tensor> {
        match &self.text_projection {
            Some(p) => Ok(pooled.matmul(&p.t()?)?),
            None => Ok(pooled.clone()),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &ClipTextConfig {
        &self.cfg
    }

    fn act(&self, x: &Tensor) -> Result<Tensor> {
        Ok(match self.cfg.hidden_act.as_str() {
            "gelu" => x.gelu_erf()?,
            _ => (x * candle_nn::ops::sigmoid(&(x * 1.702)?)?)?,
        })
    }

    /// Encodes token ids (B, T) (u32 or i64).
    pub fn forward(&self, ids: &Tensor, ctx: &ForwardCtx) -> Result<ClipOutput> {
        // Every layer of a text encoder sees the token sequence.
        let ctx = &ctx.at(Layout::Sequence);
        let (b, t) = ids.dims2()?;
        if t > self.cfg.max_position_embeddings {
            return Err(Error::Msg(format!(
                "{t} tokens exceed max_position_embeddings {}",
                self.cfg.max_position_embeddings
            )));
        }
        let ids_u = ids.to_dtype(DType::U32)?;
        let n = self.cfg.vocab_size as u32;
        if ids_u
            .flatten_all()?
            .to_vec1::<u32>()?
            .iter()
            .any(|&i| i >= n)
        {
            return Err(Error::Msg(format!(
                "token ids must be below vocab_size {n}"
            )));
        }
        let tok = self.token_embedding.forward(&ids_u, ctx)?; // (b, t, d)
        let positions = Tensor::arange(0u32, t as u32, ids.device())?;
        let mut h = tok.broadcast_add(
            &self
                .position_embedding
                .forward(&positions, ctx)?
                .unsqueeze(0)?,
        )?;
        let mask = causal_mask(t, 0, h.device())?;
        let (heads, d) = (self.cfg.num_attention_heads, self.cfg.hidden_size);
        let eps = self.cfg.layer_norm_eps;
        let mut hidden_states = vec![h.clone()];
        for l in &self.layers {
            let x = layer_norm(&h, &l.ln1.0, &l.ln1.1, eps)?;
            let q = split_heads(&l.q.forward(&x, ctx)?, heads)?;
            let k = split_heads(&l.k.forward(&x, ctx)?, heads)?;
            let v = split_heads(&l.v.forward(&x, ctx)?, heads)?;
            let a = merge_heads(&attention(&q, &k, &v, Some(&mask))?)?;
            h = (h + l.o.forward(&a, ctx)?)?;
            let x = layer_norm(&h, &l.ln2.0, &l.ln2.1, eps)?;
            h = (&h + l.fc2.forward(&self.act(&l.fc1.forward(&x, ctx)?)?, ctx)?)?;
            hidden_states.push(h.clone());
        }
        let last = layer_norm(&h, &self.final_ln.0, &self.final_ln.1, eps)?;
        // Pooling position: the first EOS, or (legacy eos_token_id == 2) the largest token id.
        let rows = ids_u.to_vec2::<u32>()?;
        let pos: Vec<u32> = rows
            .iter()
            .map(|r| {
                let key = |i: usize| {
                    if self.cfg.eos_token_id == 2 {
                        r[i]
                    } else {
                        (r[i] == self.cfg.eos_token_id) as u32
                    }
                };
                // first index of the maximum
                let mut best = 0;
                for i in 1..r.len() {
                    if key(i) > key(best) {
                        best = i;
                    }
                }
                best as u32
            })
            .collect();
        let idx = Tensor::from_vec(
            pos.iter()
                .enumerate()
                .map(|(i, p)| i as u32 * t as u32 + p)
                .collect::<Vec<u32>>(),
            b,
            last.device(),
        )?;
        let pooled = last.reshape((b * t, d))?.index_select(&idx, 0)?;
        Ok(ClipOutput {
            last_hidden_state: last,
            hidden_states,
            pooled,
        })
    }

    /// SD conditioning with clip skip: `skip = 1` is `last_hidden_state`; `skip = 2` the penultimate
    /// layer's output through `final_layer_norm` (diffusers' `clip_skip`).
    pub fn condition(&self, ids: &Tensor, skip: usize, ctx: &ForwardCtx) -> Result<Tensor> {
        let out = self.forward(ids, ctx)?;
        if skip <= 1 {
            return Ok(out.last_hidden_state);
        }
        let i = out
            .hidden_states
            .len()
            .checked_sub(skip)
            .ok_or_else(|| Error::Msg(format!("clip skip {skip} exceeds the layer count")))?;
        layer_norm(
            &out.hidden_states[i],
            &self.final_ln.0,
            &self.final_ln.1,
            self.cfg.layer_norm_eps,
        )
    }
}

impl Adapted for ClipTextModel {
    fn layers(&self) -> Vec<&AdaptedLayer> {
        let mut v: Vec<&AdaptedLayer> = vec![&self.token_embedding, &self.position_embedding];
        v.extend(
            self.layers
                .iter()
                .flat_map(|l| [&*l.q, &*l.k, &*l.v, &*l.o, &*l.fc1, &*l.fc2]),
        );
        v
    }
    fn layers_mut(&mut self) -> Vec<&mut AdaptedLayer> {
        let mut v: Vec<&mut AdaptedLayer> =
            vec![&mut self.token_embedding, &mut self.position_embedding];
        for l in &mut self.layers {
            v.push(&mut l.q);
            v.push(&mut l.k);
            v.push(&mut l.v);
            v.push(&mut l.o);
            v.push(&mut l.fc1);
            v.push(&mut l.fc2);
        }
        v
    }
}
