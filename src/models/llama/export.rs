//! A Llama-family model written back as a Hugging Face folder: the merged state dict (tied
//! embeddings kept tied while they are equal), dense or in bitsandbytes' NF4 layout with the
//! `quantization_config` transformers reads.

use super::LlamaForCausalLM;
use crate::peft::Adapted;
use crate::{Error, Result};
use candle_core::Tensor;
use std::path::Path;

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
