//! Llama, Qwen2 and Mistral causal LMs from a Hugging Face `config.json` and (sharded) safetensors,
//! with HF module paths (`model.layers.N.self_attn.q_proj`, ...) built through the adapter core:
//! grouped-query attention, RoPE with `rope_theta` and llama3 / linear `rope_scaling` (both the
//! `rope_scaling` + `rope_theta` fields and transformers 5's `rope_parameters`), Qwen2's q/k/v biases,
//! tied embeddings, RMSNorm, softmax and RoPE as fused nodes with a real backward, padding masks,
//! packed sequences (positions restart, no attention across sequences) and a KV cache.

mod config;
mod export;

pub use config::{LlamaConfig, RopeScaling};

use super::generate::{Decoder, GenerationConfig};
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
use std::path::Path;

/// What every decoder layer's attention sees in one forward.
struct Step<'a> {
    /// (B, T) positions.
    pos: &'a Tensor,
    inv_freq: &'a [f32],
    /// (B, 1, T, past + T) additive mask.
    mask: &'a Tensor,
    /// LongLoRA's S²-Attn group ratio and the padding mask, when it applies to this forward.
    s2: Option<(f64, Option<&'a [u32]>)>,
}

/// `self_attn`: q/k/v/o projections, RoPE, grouped-query attention over the cache.
struct Attention {
    q: AdaptedLinear,
    k: AdaptedLinear,
    v: AdaptedLinear,
    o: AdaptedLinear,
    heads: usize,
    kv_heads: usize,
}

impl Attention {
    fn new(cfg: &LlamaConfig, w: &Weights, p: &str) -> Result<Self> {
        let (d, hd) = (cfg.hidden_size, cfg.head_dim());
        let (nh, kvh) = (cfg.num_attention_heads, cfg.kv_heads());
        let qb = cfg.qkv_bias();
        Ok(Self {
            q: w.linear(&format!("{p}.q_proj"), d, nh * hd, qb)?,
            k: w.linear(&format!("{p}.k_proj"), d, kvh * hd, qb)?,
            v: w.linear(&format!("{p}.v_proj"), d, kvh * hd, qb)?,
            o: w.linear(&format!("{p}.o_proj"), nh * hd, d, cfg.attention_bias)?,
            heads: nh,
            kv_heads: kvh,
        })
    }

    /// (B, T, D) → (B, T, D); `kv` is this layer's cache slot, extended in place.
    fn forward(
        &self,
        x: &Tensor,
        step: &Step,
        kv: Option<&mut Option<(Tensor, Tensor)>>,
        ctx: &ForwardCtx,
    ) -> Result<Tensor> {
        let (nh, kvh) = (self.heads, self.kv_heads);
        let q = rope(
            &split_heads(&self.q.forward(x, ctx)?, nh)?,
            step.pos,
            step.inv_freq,
        )?;
        let mut k = rope(
            &split_heads(&self.k.forward(x, ctx)?, kvh)?,
            step.pos,
            step.inv_freq,
        )?;
        let mut v = split_heads(&self.v.forward(x, ctx)?, kvh)?;
        if let Some(slot) = kv {
            if let Some((pk, pv)) = slot.as_ref() {
                k = Tensor::cat(&[pk, &k], 2)?;
                v = Tensor::cat(&[pv, &v], 2)?;
            }
            *slot = Some((k.clone(), v.clone()));
        }
        let a = match step.s2 {
            Some((ratio, valid)) => shifted_sparse_attention(
                &q,
                &repeat_kv(&k, nh / kvh)?,
                &repeat_kv(&v, nh / kvh)?,
                ratio,
                valid,
            )?,
            // Grouped-query heads are read in place (no repeated copy of the cache).
            None => merge_heads(&attention(&q, &k, &v, Some(step.mask))?)?,
        };
        self.o.forward(&a, ctx)
    }

    fn layers(&self) -> [&AdaptedLayer; 4] {
        [&self.q, &self.k, &self.v, &self.o]
    }
    fn layers_mut(&mut self) -> [&mut AdaptedLayer; 4] {
        [&mut self.q, &mut self.k, &mut self.v, &mut self.o]
    }
}

/// `mlp`: down(silu(gate(x)) ⊙ up(x)).
struct Mlp {
    gate: AdaptedLinear,
    up: AdaptedLinear,
    down: AdaptedLinear,
}

impl Mlp {
    fn new(cfg: &LlamaConfig, w: &Weights, p: &str) -> Result<Self> {
        let (d, i, b) = (cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias);
        Ok(Self {
            gate: w.linear(&format!("{p}.gate_proj"), d, i, b)?,
            up: w.linear(&format!("{p}.up_proj"), d, i, b)?,
            down: w.linear(&format!("{p}.down_proj"), i, d, b)?,
        })
    }

    fn forward(&self, x: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let m = swiglu(&self.gate.forward(x, ctx)?, &self.up.forward(x, ctx)?)?;
        self.down.forward(&m, ctx)
    }

    fn layers(&self) -> [&AdaptedLayer; 3] {
        [&self.gate, &self.up, &self.down]
    }
    fn layers_mut(&mut self) -> [&mut AdaptedLayer; 3] {
        [&mut self.gate, &mut self.up, &mut self.down]
    }
}

/// `model.layers.N`: h += attn(RMSNorm(h)); h += mlp(RMSNorm(h)).
struct DecoderLayer {
    input_norm: AdaptedLayer,
    attn: Attention,
    post_norm: AdaptedLayer,
    mlp: Mlp,
    eps: f64,
}

impl DecoderLayer {
    fn new(cfg: &LlamaConfig, w: &Weights, p: &str) -> Result<Self> {
        let d = cfg.hidden_size;
        let norm = |n: &str| {
            let path = format!("{p}.{n}");
            w.plan.norm(&path, w.get(&format!("{path}.weight"), &[d])?)
        };
        Ok(Self {
            input_norm: norm("input_layernorm")?,
            attn: Attention::new(cfg, w, &format!("{p}.self_attn"))?,
            post_norm: norm("post_attention_layernorm")?,
            mlp: Mlp::new(cfg, w, &format!("{p}.mlp"))?,
            eps: cfg.rms_norm_eps,
        })
    }

    fn forward(
        &self,
        h: &Tensor,
        step: &Step,
        kv: Option<&mut Option<(Tensor, Tensor)>>,
        ctx: &ForwardCtx,
    ) -> Result<Tensor> {
        let norm = self.input_norm.effective_weight(ctx)?;
        let h = match self.fused_attention(h, &norm, step, kv.is_some(), ctx)? {
            Some(h) => h,
            None => {
                let x = rms_norm(h, &norm, self.eps)?;
                (h + self.attn.forward(&x, step, kv, ctx)?)?
            }
        };
        let norm = self.post_norm.effective_weight(ctx)?;
        if let Some(y) = self.fused_mlp(&h, &norm, ctx)? {
            return Ok(y);
        }
        let x = rms_norm(&h, &norm, self.eps)?;
        Ok((&h + self.mlp.forward(&x, ctx)?)?)
    }

    /// The attention half (norm, attention, residual) as one node ([`crate::nn::block`]) when
    /// training without a cache or S²-Attn on the CPU in f32 and each projection runs no adapter
    /// or one plain LoRA; `None` (with a debug note, once) for the composed path.
    fn fused_attention(
        &self,
        h: &Tensor,
        norm: &Tensor,
        step: &Step,
        cached: bool,
        ctx: &ForwardCtx,
    ) -> Result<Option<Tensor>> {
        use crate::nn::block::{decoder_attention, AttnPart, DecoderAttnParts};
        use crate::nn::fallback::{cpu_f32_miss, note};
        const NODE: &str = "decoder attention";
        if cached || step.s2.is_some() {
            // Generation and S²-Attn: not a training step the node covers (no note: by design).
            return Ok(None);
        }
        if let Some(why) = cpu_f32_miss(h) {
            note(|| (NODE.into(), why));
            return Ok(None);
        }
        let a = &self.attn;
        let attn = (|| {
            Some(AttnPart {
                q: a.q.plain_linear(ctx)?,
                k: a.k.plain_linear(ctx)?,
                v: a.v.plain_linear(ctx)?,
                out: a.o.plain_linear(ctx)?,
            })
        })();
        let Some(attn) = attn else {
            note(|| (NODE.into(), crate::nn::block::NOT_PLAIN.into()));
            return Ok(None);
        };
        let parts = DecoderAttnParts {
            norm_weight: norm.clone(),
            eps: self.eps,
            attn,
            heads: a.heads,
            kv_heads: a.kv_heads,
        };
        let y = decoder_attention(h, &parts, step.pos, step.inv_freq, Some(step.mask))?;
        if y.is_none() {
            note(|| (NODE.into(), crate::nn::block::NOT_FROZEN_F32.into()));
        }
        Ok(y)
    }

    /// The MLP half (norm, gated MLP, residual) as one node when each projection runs no adapter
    /// or one plain LoRA on the CPU in f32; `None` (with a debug note, once) for the composed path.
    fn fused_mlp(&self, h: &Tensor, norm: &Tensor, ctx: &ForwardCtx) -> Result<Option<Tensor>> {
        use crate::nn::block::{decoder_mlp, DecoderMlpParts};
        use crate::nn::fallback::{cpu_f32_miss, note};
        const NODE: &str = "decoder MLP";
        if let Some(why) = cpu_f32_miss(h) {
            note(|| (NODE.into(), why));
            return Ok(None);
        }
        let m = &self.mlp;
        let parts = (|| {
            Some(DecoderMlpParts {
                norm_weight: norm.clone(),
                eps: self.eps,
                gate: m.gate.plain_linear(ctx)?,
                up: m.up.plain_linear(ctx)?,
                down: m.down.plain_linear(ctx)?,
            })
        })();
        let Some(parts) = parts else {
            note(|| (NODE.into(), crate::nn::block::NOT_PLAIN.into()));
            return Ok(None);
        };
        let y = decoder_mlp(h, &parts)?;
        if y.is_none() {
            note(|| (NODE.into(), crate::nn::block::NOT_FROZEN_F32.into()));
        }
        Ok(y)
    }

    fn layers(&self) -> Vec<&AdaptedLayer> {
        let mut v = vec![&self.input_norm];
        v.extend(self.attn.layers());
        v.push(&self.post_norm);
        v.extend(self.mlp.layers());
        v
    }
    fn layers_mut(&mut self) -> Vec<&mut AdaptedLayer> {
        let mut v = vec![&mut self.input_norm];
        v.extend(self.attn.layers_mut());
        v.push(&mut self.post_norm);
        v.extend(self.mlp.layers_mut());
        v
    }
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
    layers: Vec<DecoderLayer>,
    norm: AdaptedLayer,
    lm_head: AdaptedLinear,
    /// The f32 copy of a half-precision output weight for the fused loss, with the id of the
    /// tensor it was made from.
    lm_head_f32: std::sync::Mutex<Option<(candle_core::TensorId, Tensor)>>,
    inv_freq: Vec<f32>,
    /// LongLoRA's shifted sparse attention in training: the share of the sequence per group.
    s2_attn: Option<f64>,
}

impl LlamaForCausalLM {
    /// Builds the model from `w` (layers through `w.plan`).
    pub fn new(cfg: &LlamaConfig, w: &Weights) -> Result<Self> {
        cfg.validate()?;
        let d = cfg.hidden_size;
        let layers = (0..cfg.num_hidden_layers)
            .map(|l| DecoderLayer::new(cfg, w, &format!("model.layers.{l}")))
            .collect::<Result<Vec<_>>>()?;
        let emb_w = w.get("model.embed_tokens.weight", &[cfg.vocab_size, d])?;
        let lm_head = if cfg.tie_word_embeddings && !w.contains("lm_head.weight") {
            w.plan.linear("lm_head", emb_w.clone(), None)?
        } else {
            w.linear("lm_head", d, cfg.vocab_size, false)?
        };
        let mut m = Self {
            embed: w.plan.embedding("model.embed_tokens", emb_w)?,
            layers,
            norm: w
                .plan
                .norm("model.norm", w.get("model.norm.weight", &[d])?)?,
            lm_head,
            lm_head_f32: std::sync::Mutex::new(None),
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
        let s2 = match (self.s2_attn, ctx.train, past) {
            (Some(ratio), true, 0) => {
                if packed {
                    return Err(Error::Config(
                        "shifted sparse attention (S²-Attn) cannot be used with packed sequences; turn packing off".into(),
                    ));
                }
                Some((ratio, valid.as_deref()))
            }
            _ => None,
        };
        let step = Step {
            pos: &pos,
            inv_freq: &self.inv_freq,
            mask: &mask,
            s2,
        };
        let mut h = self.embed.forward(&ids, ctx)?;
        for (li, l) in self.layers.iter().enumerate() {
            let kv = cache.as_deref_mut().map(|c| &mut c.kv[li]);
            h = l.forward(&h, &step, kv, ctx)?;
        }
        if let Some(c) = cache {
            c.len += t;
        }
        rms_norm(&h, &self.norm.effective_weight(ctx)?, self.cfg.rms_norm_eps)
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
        let logits = self.lm_head.forward(&h, &ctx.at(Layout::Sequence))?;
        // Logits in f32 whatever the model's dtype (transformers' `logits.float()`).
        Ok(if logits.dtype() == DType::F32 {
            logits
        } else {
            logits.to_dtype(DType::F32)?
        })
    }

    /// Whether [`Self::next_token_loss`] skips the logits (a frozen plain `lm_head` on the CPU).
    pub fn lm_head_is_fused_in_the_loss(&self) -> bool {
        self.lm_head
            .0
            .frozen_plain_weight()
            .is_some_and(|w| w.device().is_cpu())
    }

    /// The frozen plain output weight on the CPU, in f32. A bf16 / f16 one is widened once and
    /// the copy kept while the weight stays the same tensor (a merge replaces it).
    fn fused_lm_head(&self) -> Option<Tensor> {
        let w = self
            .lm_head
            .0
            .frozen_plain_weight()
            .filter(|w| w.device().is_cpu())?;
        if w.dtype() == DType::F32 {
            return Some(w.clone());
        }
        let mut cache = self.lm_head_f32.lock().ok()?;
        if let Some((id, wide)) = cache.as_ref() {
            if *id == w.id() {
                return Some(wide.clone());
            }
        }
        let wide = w.to_dtype(DType::F32).ok()?;
        *cache = Some((w.id(), wide.clone()));
        Some(wide)
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
        let h = if h.dtype() == DType::F32 {
            h
        } else {
            h.to_dtype(DType::F32)?
        };
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
        v.extend(self.layers.iter().flat_map(DecoderLayer::layers));
        v.push(&self.norm);
        v.push(&self.lm_head);
        v
    }
    fn layers_mut(&mut self) -> Vec<&mut AdaptedLayer> {
        let mut v: Vec<&mut AdaptedLayer> = vec![&mut self.embed];
        v.extend(self.layers.iter_mut().flat_map(DecoderLayer::layers_mut));
        v.push(&mut self.norm);
        v.push(&mut self.lm_head);
        v
    }
}

impl Decoder for LlamaForCausalLM {
    type Cache = KvCache;
    fn new_cache(&self) -> KvCache {
        self.cache()
    }
    fn cached(&self, cache: &KvCache) -> usize {
        cache.len
    }
    fn max_positions(&self) -> usize {
        self.cfg.max_position_embeddings
    }
    fn next_logits(&self, ids: &[u32], cache: &mut KvCache) -> Result<Vec<f32>> {
        let input = Tensor::from_vec(
            ids.to_vec(),
            (1, ids.len()),
            &crate::util::device::current(),
        )?;
        let logits =
            self.forward_cached(&input, &Inputs::default(), Some(cache), &ForwardCtx::eval())?;
        Ok(logits.get(0)?.get(ids.len() - 1)?.to_vec1::<f32>()?)
    }
}

impl LlamaForCausalLM {
    /// Generates a continuation of `prompt` (token ids) with a KV cache; returns the new tokens
    /// (see [`super::generate::generate`]).
    pub fn generate(&self, prompt: &[u32], cfg: &GenerationConfig) -> Result<Vec<u32>> {
        super::generate::generate(self, prompt, cfg)
    }
}
