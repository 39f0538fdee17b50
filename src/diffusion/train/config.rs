//! The training settings under kohya's `train_network.py` names (with kohya's defaults), what
//! they turn into (adapter configs, buckets, timestep sampling, the trainer's settings), and
//! kohya's sample-prompt lines.

use super::blocks::{self, Blocks, NumList, Preset, TEXT_TARGETS, UNET_CONV_PATTERN, UNET_TARGETS};
use crate::check;
use crate::data::buckets::BucketConfig;
use crate::diffusion::objective::TimestepSampling;
use crate::peft::config::ModuleSpec;
use crate::peft::AdapterConfig;
use crate::train::{ScheduleKind, TrainConfig};
use crate::{Error, Result};
use indexmap::IndexMap;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

fn d_txt() -> String {
    ".txt".into()
}
fn d_res() -> String {
    "512".into()
}
fn d_min_bucket() -> u32 {
    256
}
fn d_max_bucket() -> u32 {
    1024
}
fn d_bucket_steps() -> u32 {
    64
}
fn d_dim() -> usize {
    4
}
fn d_alpha() -> f64 {
    1.0
}
fn d_lr() -> f64 {
    1e-4
}
fn d_sched() -> String {
    "constant".into()
}
fn d_steps() -> usize {
    1600
}
fn d_one() -> usize {
    1
}
fn d_clip() -> f64 {
    1.0
}
fn d_seed() -> u64 {
    42
}
fn d_sep() -> String {
    ",".into()
}
fn d_out_name() -> String {
    "last".into()
}
fn d_bias() -> String {
    TimestepSampling::default().bias_strategy
}
fn d_bias_mult() -> f64 {
    TimestepSampling::default().bias_multiplier
}
fn d_bias_portion() -> f64 {
    TimestepSampling::default().bias_portion
}
fn d_bias_end() -> usize {
    TimestepSampling::default().bias_end
}
fn d_prior_weight() -> f64 {
    1.0
}
fn d_class_images() -> usize {
    100
}
fn d_sample_bs() -> usize {
    4
}
fn d_class_steps() -> usize {
    25
}
fn d_class_cfg() -> f64 {
    7.5
}
fn d_sampler() -> String {
    "ddim".into()
}
fn d_format() -> String {
    "kohya".into()
}

/// Settings of a LoRA training run (kohya's flag names in snake_case; TOML and CLI use them).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LoraTrainConfig {
    /// Where this stage runs: `cpu`, `cuda`, `cuda:N`, `metal` or `auto` (unset: the pipeline's
    /// `device`, else the `--device` flag, else the CPU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<crate::util::device::DeviceSpec>,
    /// The dtype this stage loads base weights in: `f32`, `bf16` or `f16` (unset: the pipeline's
    /// `dtype`, else the `--dtype` flag, else f32). Adapters stay f32.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<crate::util::device::DTypeSpec>,
    /// Pipeline folder (diffusers layout).
    pub pretrained_model_name_or_path: PathBuf,
    /// Image folder: kohya `<repeats>_<name>/` subfolders with caption files, or `metadata.jsonl`.
    pub train_data_dir: PathBuf,
    /// Caption file extension.
    #[serde(default = "d_txt")]
    pub caption_extension: String,
    /// Training resolution, `W,H` or one side.
    #[serde(default = "d_res")]
    pub resolution: String,
    /// Aspect-ratio buckets.
    #[serde(default)]
    pub enable_bucket: bool,
    /// Smallest bucket side.
    #[serde(default = "d_min_bucket")]
    pub min_bucket_reso: u32,
    /// Largest bucket side.
    #[serde(default = "d_max_bucket")]
    pub max_bucket_reso: u32,
    /// Bucket side step.
    #[serde(default = "d_bucket_steps")]
    pub bucket_reso_steps: u32,
    /// Do not upscale small images into a bucket.
    #[serde(default)]
    pub bucket_no_upscale: bool,
    /// LoRA rank.
    #[serde(default = "d_dim")]
    pub network_dim: usize,
    /// LoRA alpha (scale = alpha / dim).
    #[serde(default = "d_alpha")]
    pub network_alpha: f64,
    /// LoCon: rank of the conv adapters (resnets, samplers); none = linears only.
    #[serde(default)]
    pub conv_dim: Option<usize>,
    /// LoCon alpha (default: `network_alpha`).
    #[serde(default)]
    pub conv_alpha: Option<f64>,
    /// Dropout on the adapter input (PEFT's `lora_dropout`).
    #[serde(default)]
    pub network_dropout: f64,
    /// LyCORIS module preset: full, full-lin, attn-mlp (kohya's default set), attn-only,
    /// unet-transformer-only, unet-convblock-only.
    #[serde(default)]
    pub preset: Option<String>,
    /// kohya: 25 ranks of the linear adapters per block (IN00..IN11, MID, OUT00..OUT11; 0 = none).
    #[serde(default)]
    pub block_dims: Option<NumList>,
    /// kohya: 25 alphas per block (default: `network_alpha`).
    #[serde(default)]
    pub block_alphas: Option<NumList>,
    /// kohya: 25 ranks of the 3×3 conv adapters per block (LoCon; default: `conv_dim`).
    #[serde(default)]
    pub conv_block_dims: Option<NumList>,
    /// kohya: 25 conv alphas per block (default: `conv_alpha`).
    #[serde(default)]
    pub conv_block_alphas: Option<NumList>,
    /// kohya: 12 lr multipliers of IN00..IN11, or a preset (cosine, sine, linear,
    /// reverse_linear, zeros, with an optional `+x`).
    #[serde(default)]
    pub down_lr_weight: Option<NumList>,
    /// kohya: the lr multiplier of the mid block.
    #[serde(default)]
    pub mid_lr_weight: Option<f64>,
    /// kohya: 12 lr multipliers of OUT00..OUT11, or a preset.
    #[serde(default)]
    pub up_lr_weight: Option<NumList>,
    /// kohya: blocks whose lr multiplier is at most this get no adapter.
    #[serde(default)]
    pub block_lr_zero_threshold: f64,
    /// kohya: learning rate of the U-Net adapters (default: `learning_rate`).
    #[serde(default)]
    pub unet_lr: Option<f64>,
    /// kohya: learning rate of the text-encoder adapters (default: `learning_rate`).
    #[serde(default)]
    pub text_encoder_lr: Option<f64>,
    /// DoRA (weight-decomposed LoRA; kohya/LyCORIS `dora_wd`).
    #[serde(default)]
    pub dora_wd: bool,
    /// Train the U-Net only (no text-encoder LoRA).
    #[serde(default)]
    pub network_train_unet_only: bool,
    /// Peak learning rate.
    #[serde(default = "d_lr")]
    pub learning_rate: f64,
    /// `constant`, `linear`, `cosine` (with warmup: `constant_with_warmup` is `constant`).
    #[serde(default = "d_sched")]
    pub lr_scheduler: String,
    /// Warmup steps.
    #[serde(default)]
    pub lr_warmup_steps: usize,
    /// Optimizer steps.
    #[serde(default = "d_steps")]
    pub max_train_steps: usize,
    /// Images per micro-batch.
    #[serde(default = "d_one")]
    pub train_batch_size: usize,
    /// Micro-batches per optimizer step.
    #[serde(default = "d_one")]
    pub gradient_accumulation_steps: usize,
    /// Gradient clipping (0 = off).
    #[serde(default = "d_clip")]
    pub max_grad_norm: f64,
    /// Seed of everything random in the run.
    #[serde(default = "d_seed")]
    pub seed: u64,
    /// min-SNR-γ loss weighting.
    #[serde(default)]
    pub min_snr_gamma: Option<f64>,
    /// Noise offset.
    #[serde(default)]
    pub noise_offset: f64,
    /// Train with v-prediction whatever the scheduler says.
    #[serde(default)]
    pub v_parameterization: bool,
    /// Rescale the training betas to zero terminal SNR (kohya `--zero_terminal_snr`; use with
    /// v-prediction).
    #[serde(default)]
    pub zero_terminal_snr: bool,
    /// Smallest training timestep (kohya `--min_timestep`, default 0).
    #[serde(default)]
    pub min_timestep: Option<usize>,
    /// One past the largest training timestep (kohya `--max_timestep`, default T).
    #[serde(default)]
    pub max_timestep: Option<usize>,
    /// diffusers' `--timestep_bias_strategy`: `none`, `earlier`, `later`, `range`.
    #[serde(default = "d_bias")]
    pub timestep_bias_strategy: String,
    /// diffusers' `--timestep_bias_multiplier`.
    #[serde(default = "d_bias_mult")]
    pub timestep_bias_multiplier: f64,
    /// diffusers' `--timestep_bias_portion`.
    #[serde(default = "d_bias_portion")]
    pub timestep_bias_portion: f64,
    /// diffusers' `--timestep_bias_begin`.
    #[serde(default)]
    pub timestep_bias_begin: usize,
    /// diffusers' `--timestep_bias_end`.
    #[serde(default = "d_bias_end")]
    pub timestep_bias_end: usize,
    /// Probability of training a sample with an empty caption.
    #[serde(default)]
    pub caption_dropout_rate: f64,
    /// Shuffle the caption's tags (split at `caption_separator`).
    #[serde(default)]
    pub shuffle_caption: bool,
    /// Tags kept in front when shuffling.
    #[serde(default)]
    pub keep_tokens: usize,
    /// Tag separator.
    #[serde(default = "d_sep")]
    pub caption_separator: String,
    /// Random horizontal flips.
    #[serde(default)]
    pub flip_aug: bool,
    /// kohya's `masked_loss`: the per-pixel loss is multiplied by the image's mask (from
    /// `conditioning_data_dir` or, with `alpha_mask`, the image's alpha channel).
    #[serde(default)]
    pub masked_loss: bool,
    /// Folder of masks named like the images (`<stem>.png`, `.jpg`, `.webp`; white = learn),
    /// searched through the same `<repeats>_<name>/` subfolders as the images.
    #[serde(default)]
    pub conditioning_data_dir: Option<PathBuf>,
    /// kohya's `alpha_mask`: the images' alpha channel is the mask.
    #[serde(default)]
    pub alpha_mask: bool,
    /// Route the U-Net adapter to each image's mask while training (y = base + M ⊙ δ in every
    /// layer), so that the adapter only acts inside the mask; implies the masked loss.
    #[serde(default)]
    pub route_adapter_to_mask: bool,
    /// Run folder (checkpoints, metrics, samples, the LoRA file).
    pub output_dir: PathBuf,
    /// Name of the LoRA file (`<output_dir>/<output_name>.safetensors`).
    #[serde(default = "d_out_name")]
    pub output_name: String,
    /// `kohya` (A1111/ComfyUI) or `diffusers`.
    #[serde(default = "d_format")]
    pub lora_format: String,
    /// Checkpoint every N steps (0 = at the end only).
    #[serde(default)]
    pub save_every_n_steps: usize,
    /// Sample the prompts every N steps (0 = never).
    #[serde(default)]
    pub sample_every_n_steps: usize,
    /// Also sample before training.
    #[serde(default)]
    pub sample_at_first: bool,
    /// File of kohya prompt lines (`prompt --n neg --w 512 --h 512 --d seed --s steps --l cfg`).
    #[serde(default)]
    pub sample_prompts: Option<PathBuf>,
    /// Sampler for the samples (`ddim`, `euler`, `euler_a`).
    #[serde(default = "d_sampler")]
    pub sample_sampler: String,
    /// kohya: regularisation images, a folder of `<repeats>_<class>` subfolders like
    /// `train_data_dir` (captions from caption files or the class name). Each epoch uses as many
    /// regularisation samples as training samples.
    #[serde(default)]
    pub reg_data_dir: Option<PathBuf>,
    /// kohya / diffusers: weight of the loss on regularisation (class) images.
    #[serde(default = "d_prior_weight")]
    pub prior_loss_weight: f64,
    /// diffusers DreamBooth: regularise with class images from `class_data_dir` captioned
    /// `class_prompt`, generating the missing ones (up to `num_class_images`) with the base model.
    #[serde(default)]
    pub with_prior_preservation: bool,
    /// diffusers: the class-image folder (created when missing).
    #[serde(default)]
    pub class_data_dir: Option<PathBuf>,
    /// diffusers: the class prompt (the caption of every class image).
    #[serde(default)]
    pub class_prompt: Option<String>,
    /// diffusers: how many class images prior preservation uses (generated when missing).
    #[serde(default = "d_class_images")]
    pub num_class_images: usize,
    /// diffusers: images per batch when generating class images.
    #[serde(default = "d_sample_bs")]
    pub sample_batch_size: usize,
    /// Sampler steps of the class-image generation.
    #[serde(default = "d_class_steps")]
    pub class_inference_steps: usize,
    /// Guidance scale of the class-image generation (diffusers' pipeline default 7.5).
    #[serde(default = "d_class_cfg")]
    pub class_guidance_scale: f64,
    /// diffusers' `guidance_rescale` of the class-image generation (0 = off).
    #[serde(default)]
    pub class_guidance_rescale: f64,
    /// kohya: share of the images held out for the validation loss (0 = none), in [0, 1).
    #[serde(default)]
    pub validation_split: f64,
    /// kohya: seed of the split and of the validation noise (default: `seed`).
    #[serde(default)]
    pub validation_seed: Option<u64>,
    /// kohya: validation loss every N steps (default: a tenth of the run), and at the last step.
    #[serde(default)]
    pub validate_every_n_steps: Option<usize>,
    /// kohya: at most this many validation batches per evaluation (default: all).
    #[serde(default)]
    pub max_validation_steps: Option<usize>,
}

impl LoraTrainConfig {
    /// A configuration with kohya's defaults for the given model, data and output.
    pub fn new(model: &Path, data: &Path, output_dir: &Path) -> Self {
        let v = serde_json::json!({
            "pretrained_model_name_or_path": model, "train_data_dir": data, "output_dir": output_dir
        });
        serde_json::from_value(v).expect("defaults deserialize")
    }

    /// The steps after which the validation loss is measured (none without a validation split).
    pub fn validates_at(&self, step: usize) -> bool {
        if self.validation_split <= 0.0 {
            return false;
        }
        let every = self
            .validate_every_n_steps
            .unwrap_or((self.max_train_steps / 10).max(1));
        step == self.max_train_steps || (every > 0 && step.is_multiple_of(every))
    }

    /// Which training timesteps are drawn.
    pub fn timestep_sampling(&self) -> TimestepSampling {
        TimestepSampling {
            min_timestep: self.min_timestep,
            max_timestep: self.max_timestep,
            bias_strategy: self.timestep_bias_strategy.clone(),
            bias_multiplier: self.timestep_bias_multiplier,
            bias_portion: self.timestep_bias_portion,
            bias_begin: self.timestep_bias_begin,
            bias_end: self.timestep_bias_end,
        }
    }

    /// `(width, height)` from `resolution`.
    pub fn resolution(&self) -> Result<(u32, u32)> {
        let parts: Vec<&str> = self.resolution.split(',').map(|s| s.trim()).collect();
        let num = |s: &str| {
            s.parse::<u32>().map_err(|_| {
                Error::Config(format!(
                    "resolution `{}` is not `W,H` or one number",
                    self.resolution
                ))
            })
        };
        match parts.as_slice() {
            [s] => {
                let s = num(s)?;
                Ok((s, s))
            }
            [w, h] => Ok((num(w)?, num(h)?)),
            _ => Err(Error::Config(format!(
                "resolution `{}` is not `W,H` or one number",
                self.resolution
            ))),
        }
    }

    /// The bucket settings.
    pub fn buckets(&self) -> Result<BucketConfig> {
        Ok(BucketConfig {
            resolution: self.resolution()?,
            enabled: self.enable_bucket,
            min_reso: self.min_bucket_reso,
            max_reso: self.max_bucket_reso,
            reso_steps: self.bucket_reso_steps,
            no_upscale: self.bucket_no_upscale,
        })
    }

    /// The adapter configuration of the U-Net: kohya's LoRA (the transformer blocks' linears),
    /// LoCon with `conv_dim`, a LyCORIS `preset`, and per-block ranks (`block_dims`, ...).
    pub fn unet_adapter(&self) -> Result<AdapterConfig> {
        let mut cfg = AdapterConfig::lora(self.network_dim, self.network_alpha, &UNET_TARGETS);
        cfg.lora_dropout = self.network_dropout;
        cfg.use_dora = self.dora_wd;
        match (self.preset()?, self.blocks()?) {
            (None, None) => {
                if let Some(cd) = self.conv_dim {
                    let linear = UNET_TARGETS
                        .iter()
                        .map(|t| regex::escape(t))
                        .collect::<Vec<_>>()
                        .join("|");
                    cfg.target_modules = Some(ModuleSpec::Regex(format!(
                        r".*\.({linear}|{UNET_CONV_PATTERN})"
                    )));
                    let mut rp = IndexMap::new();
                    rp.insert(UNET_CONV_PATTERN.to_string(), cd);
                    cfg.rank_pattern = rp;
                    let mut ap = IndexMap::new();
                    ap.insert(
                        UNET_CONV_PATTERN.to_string(),
                        self.conv_alpha.unwrap_or(self.network_alpha),
                    );
                    cfg.alpha_pattern = ap;
                }
            }
            (preset, blocks) => {
                let preset = match preset {
                    Some(p) => p,
                    None => Preset {
                        conv: self.conv_dim.is_some() || self.conv_block_dims.is_some(),
                        ..Preset::named("attn-mlp")?
                    },
                };
                let blocks = match blocks {
                    Some(b) => b,
                    None => self.uniform_blocks(),
                };
                let t = blocks::targets(&preset, &blocks, (self.network_dim, self.network_alpha))?;
                cfg.target_modules = Some(ModuleSpec::Regex(format!(r"(?:.*\.)?{}", t.target)));
                cfg.rank_pattern = t.patterns.iter().map(|(k, r, _)| (k.clone(), *r)).collect();
                cfg.alpha_pattern = t.patterns.iter().map(|(k, _, a)| (k.clone(), *a)).collect();
            }
        }
        cfg.validate()?;
        Ok(cfg)
    }

    /// The LyCORIS preset, if one is set.
    pub fn preset(&self) -> Result<Option<Preset>> {
        self.preset.as_deref().map(Preset::named).transpose()
    }

    fn conv_dims(&self) -> Option<(usize, f64)> {
        let alpha = self.conv_alpha.unwrap_or(self.network_alpha);
        match self.conv_dim {
            Some(d) => Some((d, alpha)),
            // A preset with convs and no conv_dim: LyCORIS's default, the linear rank.
            None => Some((self.network_dim, alpha)),
        }
    }

    fn uniform_blocks(&self) -> Blocks {
        let n = blocks::TOTAL_BLOCKS;
        Blocks {
            dims: vec![(self.network_dim, self.network_alpha); n],
            conv: self.conv_dims().map(|c| vec![c; n]),
            lr: vec![1.0; n],
        }
    }

    /// kohya's per-block ranks, alphas and lr weights, if any is set.
    pub fn blocks(&self) -> Result<Option<Blocks>> {
        let any = self.block_dims.is_some()
            || self.block_alphas.is_some()
            || self.conv_block_dims.is_some()
            || self.conv_block_alphas.is_some()
            || self.down_lr_weight.is_some()
            || self.mid_lr_weight.is_some()
            || self.up_lr_weight.is_some();
        if !any {
            return Ok(None);
        }
        let mut b = self.uniform_blocks();
        if let Some(d) = &self.block_dims {
            for (slot, r) in b.dims.iter_mut().zip(d.ranks("block_dims")?) {
                slot.0 = r;
            }
        }
        if let Some(a) = &self.block_alphas {
            let v = a.values("block_alphas", blocks::TOTAL_BLOCKS)?;
            for (slot, a) in b.dims.iter_mut().zip(v) {
                slot.1 = a;
            }
        }
        if let Some(d) = &self.conv_block_dims {
            let conv = b.conv.get_or_insert_with(Vec::new);
            let alpha = self.conv_alpha.unwrap_or(self.network_alpha);
            *conv = d
                .ranks("conv_block_dims")?
                .into_iter()
                .map(|r| (r, alpha))
                .collect();
        }
        if let Some(a) = &self.conv_block_alphas {
            let Some(conv) = b.conv.as_mut() else {
                return Err(Error::Config(
                    "conv_block_alphas needs conv_block_dims or conv_dim".into(),
                ));
            };
            for (slot, a) in conv
                .iter_mut()
                .zip(a.values("conv_block_alphas", blocks::TOTAL_BLOCKS)?)
            {
                slot.1 = a;
            }
        }
        let n = blocks::NUM_BLOCKS;
        if let Some(w) = &self.down_lr_weight {
            b.lr[..n].copy_from_slice(&blocks::lr_weights(w, "down_lr_weight")?);
        }
        if let Some(w) = self.mid_lr_weight {
            if !w.is_finite() || w < 0.0 {
                return Err(Error::Config(format!(
                    "mid_lr_weight {w} is not a finite number >= 0"
                )));
            }
            b.lr[n] = w;
        }
        if let Some(w) = &self.up_lr_weight {
            b.lr[n + 1..].copy_from_slice(&blocks::lr_weights(w, "up_lr_weight")?);
        }
        // kohya: a block at or below the threshold gets no adapter at all.
        for (i, &w) in b.lr.iter().enumerate() {
            if w <= self.block_lr_zero_threshold {
                b.dims[i].0 = 0;
                if let Some(c) = b.conv.as_mut() {
                    c[i].0 = 0;
                }
            }
        }
        Ok(Some(b))
    }

    /// The adapter configuration of the text encoder, if it is trained.
    pub fn text_adapter(&self) -> Result<Option<AdapterConfig>> {
        if self.network_train_unet_only {
            return Ok(None);
        }
        let targets = match self.preset()? {
            Some(p) if p.text.is_empty() => return Ok(None),
            Some(p) => p.text,
            None => TEXT_TARGETS.to_vec(),
        };
        let mut cfg = AdapterConfig::lora(self.network_dim, self.network_alpha, &targets);
        cfg.lora_dropout = self.network_dropout;
        cfg.use_dora = self.dora_wd;
        cfg.validate()?;
        Ok(Some(cfg))
    }

    /// The trainer settings.
    pub fn trainer(&self, overwrite: bool) -> Result<TrainConfig> {
        let kind = match self.lr_scheduler.as_str() {
            "constant" | "constant_with_warmup" => ScheduleKind::Constant,
            "linear" => ScheduleKind::Linear,
            "cosine" => ScheduleKind::Cosine,
            s => {
                return Err(Error::Config(format!(
                "lr_scheduler `{s}` is not one of constant, constant_with_warmup, linear, cosine"
            )))
            }
        };
        if self.train_batch_size == 0 || self.gradient_accumulation_steps == 0 {
            return Err(Error::Config(
                "train_batch_size and gradient_accumulation_steps must be positive".into(),
            ));
        }
        if !(0.0..1.0).contains(&self.validation_split) {
            return Err(Error::Config(format!(
                "validation_split {} is not in [0, 1)",
                self.validation_split
            )));
        }
        if !(0.0..=1.0).contains(&self.caption_dropout_rate) {
            return Err(Error::Config(format!(
                "caption_dropout_rate {} is not in [0, 1]",
                self.caption_dropout_rate
            )));
        }
        Ok(TrainConfig {
            learning_rate: self.learning_rate,
            lr_scheduler: kind,
            warmup_steps: self.lr_warmup_steps,
            max_steps: self.max_train_steps,
            gradient_accumulation_steps: self.gradient_accumulation_steps,
            max_grad_norm: crate::check::grad_clip("max_grad_norm", self.max_grad_norm)?,
            save_steps: self.save_every_n_steps,
            seed: self.seed,
            output_dir: self.output_dir.clone(),
            overwrite_output_dir: overwrite,
            ..TrainConfig::default()
        })
    }
}

/// One kohya sample-prompt line: `--w`/`--h` ≥ 1, `--s` ≥ 1, `--l` ≥ 0, `--d` a whole number.
#[derive(Debug, Clone, PartialEq)]
pub struct SamplePrompt {
    /// Prompt.
    pub prompt: String,
    /// Negative prompt (`--n`).
    pub negative: String,
    /// Width (`--w`).
    pub width: Option<usize>,
    /// Height (`--h`).
    pub height: Option<usize>,
    /// Seed (`--d`).
    pub seed: Option<u64>,
    /// Steps (`--s`, default 30).
    pub steps: usize,
    /// CFG scale (`--l`, default 7.5).
    pub cfg: f64,
    /// Sampler (`--ss`).
    pub sampler: Option<String>,
}

impl SamplePrompt {
    /// Parses a line; `None` for blank lines and `#` comments. Unknown options are ignored, as
    /// kohya does.
    pub fn parse(line: &str) -> Result<Option<Self>> {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            return Ok(None);
        }
        let mut parts = line.split(" --");
        let prompt = parts.next().unwrap_or_default().trim().to_string();
        let mut p = SamplePrompt {
            prompt,
            negative: String::new(),
            width: None,
            height: None,
            seed: None,
            steps: 30,
            cfg: 7.5,
            sampler: None,
        };
        for opt in parts {
            let (k, v) = opt.split_once(' ').unwrap_or((opt, ""));
            let v = v.trim();
            let bad = |e: String| Error::Config(format!("sample prompt `{line}`: --{k}: {e}"));
            match k {
                "n" => p.negative = v.to_string(),
                "w" => p.width = Some(check::count_from(v, 1).map_err(bad)?),
                "h" => p.height = Some(check::count_from(v, 1).map_err(bad)?),
                "d" => {
                    p.seed =
                        Some(v.parse().map_err(|_| {
                            bad(format!("`{v}` is not a seed (a whole number ≥ 0)"))
                        })?)
                }
                "s" => p.steps = check::count_from(v, 1).map_err(bad)?,
                "l" => p.cfg = check::parse_in(v, check::NON_NEGATIVE).map_err(bad)?,
                "ss" => p.sampler = Some(v.to_string()),
                _ => {}
            }
        }
        Ok(Some(p))
    }

    /// Reads a prompt file.
    pub fn read_file(path: &Path) -> Result<Vec<Self>> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut v = vec![];
        for l in text.lines() {
            if let Some(p) = Self::parse(l).map_err(|e| Error::format(path, e.to_string()))? {
                v.push(p);
            }
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kohya_prompt_lines() {
        let p = SamplePrompt::parse(
            "a red circle on the left, black background --n blurry, ugly --w 32 --h 48 --d 7 --s 12 --l 4.5 --ss euler_a --am 1",
        )
        .unwrap()
        .unwrap();
        assert_eq!(p.prompt, "a red circle on the left, black background");
        assert_eq!(p.negative, "blurry, ugly");
        assert_eq!((p.width, p.height, p.seed), (Some(32), Some(48), Some(7)));
        assert_eq!((p.steps, p.cfg), (12, 4.5));
        assert_eq!(p.sampler.as_deref(), Some("euler_a"));
        assert!(SamplePrompt::parse("# comment").unwrap().is_none());
        assert!(SamplePrompt::parse("   ").unwrap().is_none());
        assert!(SamplePrompt::parse("x --w wide").is_err());
        for (bad, needle) in [
            (
                "x --l nan",
                "--l: NaN is out of range: it must be a finite number ≥ 0",
            ),
            ("x --l -2", "--l: -2 is out of range"),
            ("x --s 0", "--s: 0 is out of range: it must be at least 1"),
            ("x --s 2.5", "--s: `2.5` is not a whole number ≥ 1"),
            ("x --w 0", "--w: 0 is out of range"),
            ("x --d -1", "--d: `-1` is not a seed"),
        ] {
            let e = SamplePrompt::parse(bad).unwrap_err().to_string();
            assert!(e.contains(needle), "{bad}: {e}");
        }
        let d = SamplePrompt::parse("just a prompt").unwrap().unwrap();
        assert_eq!((d.steps, d.cfg, d.seed), (30, 7.5, None));
    }

    #[test]
    fn config_defaults_are_kohyas_and_unknown_fields_are_refused() {
        let c = LoraTrainConfig::new(Path::new("m"), Path::new("d"), Path::new("o"));
        assert_eq!((c.network_dim, c.network_alpha), (4, 1.0));
        assert_eq!(c.lr_scheduler, "constant");
        assert_eq!(c.resolution().unwrap(), (512, 512));
        let bad = serde_json::json!({"pretrained_model_name_or_path": "m", "train_data_dir": "d",
            "output_dir": "o", "network_dimm": 8});
        let e = serde_json::from_value::<LoraTrainConfig>(bad).unwrap_err();
        assert!(e.to_string().contains("network_dimm"), "{e}");
        let mut c2 = c.clone();
        c2.conv_dim = Some(2);
        let a = c2.unet_adapter().unwrap();
        assert_eq!(a.rank_pattern.values().next(), Some(&2));
        c2.resolution = "32,a".into();
        assert!(c2.resolution().is_err());
    }

    #[test]
    fn lycoris_presets_choose_the_modules() {
        use crate::peft::config::ModuleKind;
        let base = LoraTrainConfig::new(Path::new("m"), Path::new("d"), Path::new("o"));
        let hits = |c: &LoraTrainConfig, path: &str, kind| {
            c.unet_adapter()
                .unwrap()
                .targets(path, kind, false)
                .unwrap()
        };
        let (q, ff, conv) = (
            "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
            "mid_block.attentions.0.transformer_blocks.0.ff.net.2",
            "up_blocks.0.resnets.1.conv2",
        );
        let mut c = base.clone();
        c.preset = Some("unet-convblock-only".into());
        assert!(hits(&c, conv, ModuleKind::Conv2d) && !hits(&c, q, ModuleKind::Linear));
        assert!(c.text_adapter().unwrap().is_none());
        c.preset = Some("attn-only".into());
        assert!(hits(&c, q, ModuleKind::Linear) && !hits(&c, ff, ModuleKind::Linear));
        assert!(!hits(&c, conv, ModuleKind::Conv2d));
        c.preset = Some("full".into());
        assert!(hits(&c, "conv_in", ModuleKind::Conv2d) && hits(&c, ff, ModuleKind::Linear));
        c.preset = Some("everything".into());
        assert!(c
            .unet_adapter()
            .unwrap_err()
            .to_string()
            .contains("everything"));
        // No preset and no block settings: the configuration is the one kohya's LoRA has always had.
        assert_eq!(
            base.unet_adapter().unwrap().target_modules,
            AdapterConfig::lora(4, 1.0, &UNET_TARGETS).target_modules
        );
    }
}
