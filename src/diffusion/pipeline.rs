//! A text-to-image pipeline in the diffusers folder layout: `model_index.json`, `unet/`,
//! `text_encoder/` (CLIPTextModel), `tokenizer/` (`tokenizer.json`), `scheduler/`, and optionally
//! `vae/` (latent pipelines; the embedded tiny-sd works in pixel space and has none).
//! Safetensors only; a missing or mismatched tensor is an error naming it.

use super::sampler::{guide, rescale_guidance, Sampler, SamplerKind};
use super::schedule::SchedulerConfig;
use crate::models::clip::{ClipTextConfig, ClipTextModel};
use crate::models::unet::{AddedCond, UNet2DConditionModel, UNetConfig};
use crate::models::vae::AutoencoderKL;
use crate::models::weights::{read_json, weight_files};
use crate::models::Weights;
use crate::peft::{Adapted, AdapterPlan, ForwardCtx};
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::path::{Path, PathBuf};

/// Prompt tokenizer: `tokenizer/tokenizer.json`, padded to a fixed length like CLIP's.
pub struct PromptTokenizer {
    tok: tokenizers::Tokenizer,
    max_len: usize,
    pad_id: u32,
}

impl PromptTokenizer {
    /// Loads `dir/tokenizer.json` (and `model_max_length` / `pad_token` from `tokenizer_config.json`).
    pub fn load(dir: &Path, max_positions: usize) -> Result<Self> {
        let file = dir.join("tokenizer.json");
        if !file.exists() {
            return Err(Error::format(
                dir,
                "no tokenizer.json (a slow-tokenizer folder with vocab.json/merges.txt can be converted with transformers: AutoTokenizer.from_pretrained(dir).save_pretrained(dir))",
            ));
        }
        let json = std::fs::read_to_string(&file).map_err(|e| Error::io(&file, e))?;
        // tokenizer_config.json is optional; one that exists must parse.
        let cfg: serde_json::Value =
            crate::util::read_optional_json(&dir.join("tokenizer_config.json"))?
                .unwrap_or_default();
        Self::from_json(&json, &cfg, max_positions).map_err(|e| Error::format(&file, e.to_string()))
    }

    /// A tokenizer from `tokenizer.json` text and the `tokenizer_config.json` values.
    pub fn from_json(json: &str, cfg: &serde_json::Value, max_positions: usize) -> Result<Self> {
        let tok: tokenizers::Tokenizer = json
            .parse()
            .map_err(|e: tokenizers::Error| Error::Msg(e.to_string()))?;
        let max_len = cfg["model_max_length"]
            .as_u64()
            .map(|v| v as usize)
            .unwrap_or(max_positions)
            .min(max_positions);
        let pad = cfg["pad_token"].as_str().unwrap_or("<|endoftext|>");
        let pad_id = tok
            .token_to_id(pad)
            .or_else(|| tok.token_to_id("<|endoftext|>"))
            .unwrap_or(0);
        Ok(Self {
            tok,
            max_len,
            pad_id,
        })
    }

    /// The positions of `word`'s tokens in `prompt` as [`Self::encode`] lays it out (every
    /// occurrence); an error names the word and the prompt when it is not there.
    pub fn positions(&self, prompt: &str, word: &str) -> Result<Vec<usize>> {
        let ids = |s: &str, special: bool| -> Result<Vec<u32>> {
            Ok(self
                .tok
                .encode(s, special)
                .map_err(|e| Error::Msg(format!("tokenizing `{s}`: {e}")))?
                .get_ids()
                .to_vec())
        };
        let full = ids(prompt, true)?;
        let full = &full[..full.len().min(self.max_len)];
        let w = ids(word.trim(), false)?;
        let mut out = vec![];
        if !w.is_empty() {
            for i in 0..full.len().saturating_sub(w.len() - 1) {
                if full[i..i + w.len()] == w[..] {
                    out.extend(i..i + w.len());
                }
            }
        }
        if out.is_empty() {
            return Err(Error::Config(format!(
                "the word `{word}` is not among the tokens of the prompt `{prompt}`"
            )));
        }
        Ok(out)
    }

    /// Token ids (B, max_len), truncated and padded.
    pub fn encode(&self, prompts: &[String], device: &Device) -> Result<Tensor> {
        let mut rows = vec![];
        for p in prompts {
            let enc = self
                .tok
                .encode(p.as_str(), true)
                .map_err(|e| Error::Msg(format!("tokenizing `{p}`: {e}")))?;
            let mut ids: Vec<u32> = enc.get_ids().to_vec();
            if ids.len() > self.max_len {
                let last = *ids.last().unwrap_or(&self.pad_id);
                ids.truncate(self.max_len);
                ids[self.max_len - 1] = last; // keep the end token
            }
            ids.resize(self.max_len, self.pad_id);
            rows.extend(ids);
        }
        Ok(Tensor::from_vec(
            rows,
            (prompts.len(), self.max_len),
            device,
        )?)
    }
}

/// What to sample: one image per prompt, each with its own seed.
#[derive(Debug, Clone, PartialEq)]
pub struct SampleRequest {
    /// Prompts, one image each.
    pub prompts: Vec<String>,
    /// The negative prompt (empty: the unconditional branch, zeros where the pipeline says so).
    pub negative: String,
    /// One noise seed per prompt.
    pub seeds: Vec<u64>,
    /// Sampler steps.
    pub steps: usize,
    /// Classifier-free guidance scale (1 = none).
    pub guidance: f64,
    /// The sampler.
    pub sampler: SamplerKind,
    /// Image size (height, width) in pixels.
    pub size: (usize, usize),
}

/// A loaded pipeline.
pub struct Pipeline {
    /// The folder.
    pub dir: PathBuf,
    /// Denoiser.
    pub unet: UNet2DConditionModel,
    /// Text encoder.
    pub text_encoder: ClipTextModel,
    /// Tokenizer.
    pub tokenizer: PromptTokenizer,
    /// Scheduler configuration.
    pub scheduler: SchedulerConfig,
    /// The VAE of a latent pipeline (none in pixel space).
    pub vae: Option<AutoencoderKL>,
    /// SDXL's second text encoder (CLIPTextModelWithProjection).
    pub text_encoder_2: Option<ClipTextModel>,
    /// Its tokenizer.
    pub tokenizer_2: Option<PromptTokenizer>,
    /// An empty negative prompt means zero conditioning (SDXL's default).
    pub force_zeros_for_empty_prompt: bool,
    /// diffusers' `guidance_rescale` φ applied when sampling with guidance (0 = off, the default;
    /// 0.7 is the paper's choice for zero-terminal-SNR models).
    pub guidance_rescale: f64,
}

/// What a prompt batch conditions the U-Net with.
#[derive(Debug, Clone)]
pub struct Conditioning {
    /// Cross-attention context (B, T, D).
    pub context: Tensor,
    /// SDXL's pooled text embeddings (B, P).
    pub pooled: Option<Tensor>,
}

impl Pipeline {
    /// Loads a pipeline folder; `unet_plan` / `text_plan` choose the adapters of each component.
    pub fn load(dir: &Path, unet_plan: AdapterPlan, text_plan: AdapterPlan) -> Result<Self> {
        let dt = crate::util::device::current_dtype();
        if dt != candle_core::DType::F32 {
            return Err(crate::Error::Config(format!(
                "{}: image pipelines run with f32 weights in this version (--dtype {dt:?} applies to the Llama family); use --dtype f32",
                dir.display()
            )));
        }
        let index = read_json(&dir.join("model_index.json"))?;
        let vae = if index["vae"].is_array() && !index["vae"][0].is_null() {
            Some(AutoencoderKL::load(&dir.join("vae"))?)
        } else {
            None
        };
        let ucfg = UNetConfig::from_file(&dir.join("unet/config.json"))?;
        let unet = UNet2DConditionModel::new(
            &ucfg,
            &Weights::from_files(&weight_files(&dir.join("unet"))?, unet_plan)?,
        )?;
        let tcfg = ClipTextConfig::from_file(&dir.join("text_encoder/config.json"))?;
        let text_encoder = ClipTextModel::new(
            &tcfg,
            &Weights::from_files(&weight_files(&dir.join("text_encoder"))?, text_plan.clone())?,
        )?;
        let tokenizer =
            PromptTokenizer::load(&dir.join("tokenizer"), tcfg.max_position_embeddings)?;
        let (text_encoder_2, tokenizer_2) = if index["text_encoder_2"].is_array()
            && !index["text_encoder_2"][0].is_null()
        {
            let c2 = ClipTextConfig::from_file(&dir.join("text_encoder_2/config.json"))?;
            let te2 = ClipTextModel::new(
                &c2,
                &Weights::from_files(&weight_files(&dir.join("text_encoder_2"))?, text_plan)?,
            )?;
            let tok2 = PromptTokenizer::load(&dir.join("tokenizer_2"), c2.max_position_embeddings)?;
            (Some(te2), Some(tok2))
        } else {
            (None, None)
        };
        let scheduler = SchedulerConfig::from_file(&dir.join("scheduler/scheduler_config.json"))?;
        let text_time = unet.config().addition_embed_type.as_deref() == Some("text_time");
        if text_time && !text_encoder_2.as_ref().is_some_and(|t| t.has_projection()) {
            return Err(Error::format(
                dir.join("model_index.json"),
                "the U-Net takes text_time conditioning (SDXL) but there is no text_encoder_2 with a text_projection",
            ));
        }
        let force_zeros_for_empty_prompt = index["force_zeros_for_empty_prompt"]
            .as_bool()
            .unwrap_or(text_encoder_2.is_some());
        Ok(Self {
            dir: dir.to_path_buf(),
            unet,
            text_encoder,
            tokenizer,
            text_encoder_2,
            tokenizer_2,
            scheduler,
            vae,
            force_zeros_for_empty_prompt,
            guidance_rescale: 0.0,
        })
    }

    /// Whether the U-Net takes SDXL's pooled-text and size conditioning.
    pub fn text_time(&self) -> bool {
        self.unet.config().addition_embed_type.as_deref() == Some("text_time")
    }

    /// Pixels per latent pixel (the VAE's downsampling; 1 in pixel space).
    pub fn vae_factor(&self) -> usize {
        self.vae.as_ref().map_or(1, |v| v.config().factor())
    }

    /// Denoiser-space inputs of images (B, 3, H, W) in [−1, 1]: VAE latents (a posterior sample
    /// drawn with `noise_seed`, or the mean without it), scaled; the images themselves in pixel space.
    pub fn to_model_space(&self, images: &Tensor, noise_seed: Option<u64>) -> Result<Tensor> {
        match &self.vae {
            None => Ok(images.clone()),
            Some(v) => {
                let noise = match noise_seed {
                    Some(s) => {
                        let (b, _, h, w) = images.dims4()?;
                        let f = v.config().factor();
                        Some(crate::rng::normal(
                            &[b, v.config().latent_channels, h / f, w / f],
                            1.0,
                            &mut crate::rng::rng_for(s, "vae-posterior"),
                        )?)
                    }
                    None => None,
                };
                // Data preparation: the VAE is frozen and nothing needs its graph.
                v.encode_scaled(images, noise.as_ref(), &ForwardCtx::eval())
            }
        }
    }

    /// Prompt conditioning (B, T, D): the cross-attention context.
    pub fn encode(&self, prompts: &[String], ctx: &ForwardCtx) -> Result<Tensor> {
        Ok(self.encode_cond(prompts, ctx)?.context)
    }

    /// Prompt conditioning with SDXL's pooled embeddings: SD takes the last hidden state; SDXL the
    /// penultimate hidden states of both encoders side by side, and the second encoder's projected
    /// pooled output.
    pub fn encode_cond(&self, prompts: &[String], ctx: &ForwardCtx) -> Result<Conditioning> {
        let ids = self
            .tokenizer
            .encode(prompts, &crate::util::device::current())?;
        let (Some(te2), Some(tok2)) = (&self.text_encoder_2, &self.tokenizer_2) else {
            return Ok(Conditioning {
                context: self.text_encoder.condition(&ids, 1, ctx)?,
                pooled: None,
            });
        };
        let penultimate = |hs: &[Tensor]| -> Result<Tensor> {
            hs.len()
                .checked_sub(2)
                .map(|i| hs[i].clone())
                .ok_or_else(|| Error::Msg("a text encoder without layers".into()))
        };
        let o1 = self.text_encoder.forward(&ids, ctx)?;
        let o2 = te2.forward(&tok2.encode(prompts, &crate::util::device::current())?, ctx)?;
        Ok(Conditioning {
            context: Tensor::cat(
                &[
                    penultimate(&o1.hidden_states)?,
                    penultimate(&o2.hidden_states)?,
                ],
                2,
            )?,
            pooled: Some(te2.text_embeds(&o2.pooled)?),
        })
    }

    /// SDXL's micro-conditioning rows `[orig_h, orig_w, crop_top, crop_left, target_h, target_w]`.
    pub fn time_ids(rows: &[[f32; 6]]) -> Result<Tensor> {
        Ok(Tensor::from_vec(
            rows.iter().flatten().copied().collect::<Vec<f32>>(),
            (rows.len(), 6),
            &crate::util::device::current(),
        )?)
    }

    /// Applies an image LoRA file (kohya, diffusers/PEFT or LyCORIS keys) as adapter `name` to the
    /// U-Net and to the text encoders it has modules for; returns the number of modules.
    pub fn apply_lora_file(&mut self, path: &Path, name: &str) -> Result<usize> {
        use crate::peft::formats::lora_file::{kohya_names, LoraFile};
        let known = kohya_names(&self.unet.layers());
        let (file, _) = LoraFile::read(path, Some(&known))?;
        let has = |prefix: &str| {
            file.modules
                .keys()
                .any(|k| k.starts_with(&format!("{prefix}.")))
        };
        let mut n = file.apply("unet", &mut self.unet.layers_mut(), name, path)?;
        if has("text_encoder") {
            n += file.apply(
                "text_encoder",
                &mut self.text_encoder.layers_mut(),
                name,
                path,
            )?;
        }
        if let Some(te2) = &mut self.text_encoder_2 {
            if has("text_encoder_2") {
                n += file.apply("text_encoder_2", &mut te2.layers_mut(), name, path)?;
            }
        }
        Ok(n)
    }

    /// Sets the output multiplier (gain) of adapter `name` on every component that carries it
    /// (U-Net, text encoders), whatever its method; an error if no component carries it.
    pub fn set_adapter_scale(&mut self, name: &str, scale: f64) -> Result<()> {
        let mut found = false;
        let mut comps: Vec<&mut dyn Adapted> = vec![&mut self.unet, &mut self.text_encoder];
        if let Some(te2) = &mut self.text_encoder_2 {
            comps.push(te2);
        }
        for c in comps {
            if c.layers().iter().any(|l| l.has_adapter(name)) {
                c.set_multiplier(name, scale)?;
                found = true;
            }
        }
        if !found {
            return Err(Error::Msg(format!(
                "no component of the pipeline at {} carries adapter `{name}`",
                self.dir.display()
            )));
        }
        Ok(())
    }

    /// The classifier-free-guided denoiser for `prompts` (one image each) against `negative`.
    pub fn guided(
        &self,
        prompts: &[String],
        negative: &str,
        guidance: f64,
        size: (usize, usize),
        ctx: &ForwardCtx,
    ) -> Result<Guided> {
        let cond = self.encode_cond(prompts, ctx)?;
        let uncond = if negative.is_empty() && self.force_zeros_for_empty_prompt {
            Conditioning {
                context: cond.context.zeros_like()?,
                pooled: cond.pooled.as_ref().map(|p| p.zeros_like()).transpose()?,
            }
        } else {
            self.encode_cond(&vec![negative.to_string(); prompts.len()], ctx)?
        };
        let both = Tensor::cat(&[&uncond.context, &cond.context], 0)?;
        let b = prompts.len();
        let pooled = match (&uncond.pooled, &cond.pooled) {
            (Some(u), Some(c)) if self.text_time() => Some(Tensor::cat(&[u, c], 0)?),
            _ => None,
        };
        let (h, w) = (size.0 as f32, size.1 as f32);
        let time_ids = Self::time_ids(&vec![[h, w, 0.0, 0.0, h, w]; 2 * b])?;
        Ok(Guided {
            both,
            pooled,
            time_ids,
            b,
            guidance,
            rescale: self.guidance_rescale,
        })
    }

    /// Samples one image per prompt (with its own seed), as tensors (B, C, H, W) in [-1, 1]. Every
    /// model runs under `ctx`: [`ForwardCtx::eval`] records no graph; a routed context carries
    /// masks to the adapters; a training context lets gradients flow through sampling.
    pub fn sample(&self, req: &SampleRequest, ctx: &ForwardCtx) -> Result<Tensor> {
        let SampleRequest {
            prompts,
            negative,
            seeds,
            steps,
            guidance,
            sampler: kind,
            size,
        } = req;
        let (steps, guidance, kind, size) = (*steps, *guidance, *kind, *size);
        if prompts.len() != seeds.len() {
            return Err(Error::Msg(format!(
                "{} prompts but {} seeds",
                prompts.len(),
                seeds.len()
            )));
        }
        let guided = self.guided(prompts, negative, guidance, size, ctx)?;
        let sampler = Sampler::new(kind, &self.scheduler, steps)?;
        let c = self.unet.config().in_channels;
        let f = self.vae_factor();
        if size.0 % f != 0 || size.1 % f != 0 {
            return Err(Error::Msg(format!(
                "image size {}x{} is not a multiple of the VAE factor {f}",
                size.1, size.0
            )));
        }
        let x = sampler.sample(
            &self.scheduler,
            &[c, size.0 / f, size.1 / f],
            seeds,
            &crate::util::device::current(),
            |x_in, t| guided.predict(self, x_in, t, ctx),
        )?;
        let x = match &self.vae {
            Some(v) => v.decode_scaled(&x.to_dtype(DType::F32)?, ctx)?,
            None => x,
        };
        Ok(x.to_dtype(DType::F32)?.clamp(-1f32, 1f32)?)
    }
}

/// A prompt batch's guided denoiser: unconditional and conditional branches in one U-Net batch,
/// combined by classifier-free guidance (and diffusers' `guidance_rescale`).
pub struct Guided {
    both: Tensor,
    pooled: Option<Tensor>,
    time_ids: Tensor,
    b: usize,
    guidance: f64,
    rescale: f64,
}

impl Guided {
    /// The guided model output for the scaled input `x_in` (b, c, h, w) at timestep `t`.
    pub fn predict(&self, p: &Pipeline, x_in: &Tensor, t: f64, ctx: &ForwardCtx) -> Result<Tensor> {
        let b = self.b;
        let tt = Tensor::from_vec(
            vec![t as f32; 2 * b],
            2 * b,
            &crate::util::device::current(),
        )?;
        let xx = Tensor::cat(&[x_in, x_in], 0)?;
        let added = self.pooled.as_ref().map(|pl| AddedCond {
            text_embeds: pl,
            time_ids: &self.time_ids,
        });
        let out = p.unet.forward(&xx, &tt, &self.both, added.as_ref(), ctx)?;
        let (u, k) = (out.narrow(0, 0, b)?, out.narrow(0, b, b)?);
        if self.guidance == 1.0 {
            Ok(k)
        } else {
            rescale_guidance(&guide(&u, &k, self.guidance)?, &k, self.rescale)
        }
    }
}
