//! LoRA / LoCon / DoRA training of a text-to-image pipeline on an image folder, in the manner of
//! kohya's `train_network.py`: kohya folders or `metadata.jsonl`, aspect-ratio buckets, caption
//! shuffling and dropout, min-SNR-γ, noise offset, sample images every N steps from kohya prompt
//! lines, and a kohya (or diffusers) LoRA file as the result. Field names follow kohya's flags.

use super::objective::{Objective, TimestepSampler, TimestepSampling};
use super::pipeline::{Conditioning, Pipeline, SampleRequest};
use super::sampler::SamplerKind;
use super::schedule::{NoiseSchedule, Prediction};
use crate::data::buckets::{cover_crop_at, BucketConfig};
use crate::data::image_folder::scan;
use crate::media::image::{image_to_tensor, tensor_to_image, write_png};
use crate::peft::formats::lora_file::{LoraFile, LoraFormat};
use crate::peft::{Adapted, AdapterConfig, AdapterPlan, ForwardCtx};
use crate::rng::rng_for;
use crate::train::{ScheduleKind, Task, TrainConfig};
use crate::{Error, Result};
use candle_core::{Device, Tensor, Var};
use indexmap::IndexMap;
use rand::seq::SliceRandom;
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

/// The U-Net modules kohya's LoRA adapts (the linears of every Transformer2DModel).
pub const UNET_TARGETS: [&str; 8] = [
    "to_q",
    "to_k",
    "to_v",
    "to_out.0",
    "ff.net.0.proj",
    "ff.net.2",
    "proj_in",
    "proj_out",
];
/// The U-Net convolutions LoCon adds with `conv_dim` (resnets, down- and upsamplers).
pub const UNET_CONV_PATTERN: &str =
    r"(resnets\.\d+\.(conv1|conv2|conv_shortcut)|downsamplers\.0\.conv|upsamplers\.0\.conv)";
/// The text-encoder modules kohya's LoRA adapts (CLIPAttention and CLIPMLP linears).
pub const TEXT_TARGETS: [&str; 6] = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"];

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
}

impl LoraTrainConfig {
    /// A configuration with kohya's defaults for the given model, data and output.
    pub fn new(model: &Path, data: &Path, output_dir: &Path) -> Self {
        let v = serde_json::json!({
            "pretrained_model_name_or_path": model, "train_data_dir": data, "output_dir": output_dir
        });
        serde_json::from_value(v).expect("defaults deserialize")
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

    /// The adapter configuration of the U-Net (LoRA on the attention linears; LoCon convs with
    /// `conv_dim`; DoRA with `dora_wd`).
    pub fn unet_adapter(&self) -> Result<AdapterConfig> {
        let mut cfg = AdapterConfig::lora(self.network_dim, self.network_alpha, &UNET_TARGETS);
        cfg.lora_dropout = self.network_dropout;
        cfg.use_dora = self.dora_wd;
        if let Some(cd) = self.conv_dim {
            let linear = UNET_TARGETS
                .iter()
                .map(|t| regex::escape(t))
                .collect::<Vec<_>>()
                .join("|");
            cfg.target_modules = Some(crate::peft::config::ModuleSpec::Regex(format!(
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
        cfg.validate()?;
        Ok(cfg)
    }

    /// The adapter configuration of the text encoder, if it is trained.
    pub fn text_adapter(&self) -> Result<Option<AdapterConfig>> {
        if self.network_train_unet_only {
            return Ok(None);
        }
        let mut cfg = AdapterConfig::lora(self.network_dim, self.network_alpha, &TEXT_TARGETS);
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
            max_grad_norm: (self.max_grad_norm > 0.0).then_some(self.max_grad_norm),
            save_steps: self.save_every_n_steps,
            seed: self.seed,
            output_dir: self.output_dir.clone(),
            overwrite_output_dir: overwrite,
            ..TrainConfig::default()
        })
    }
}

/// One kohya sample-prompt line.
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
            let bad = |what: &str| {
                Error::Config(format!("sample prompt `{line}`: --{k} `{v}` is not {what}"))
            };
            match k {
                "n" => p.negative = v.to_string(),
                "w" => p.width = Some(v.parse().map_err(|_| bad("a width"))?),
                "h" => p.height = Some(v.parse().map_err(|_| bad("a height"))?),
                "d" => p.seed = Some(v.parse().map_err(|_| bad("a seed"))?),
                "s" => p.steps = v.parse().map_err(|_| bad("a step count"))?,
                "l" => p.cfg = v.parse().map_err(|_| bad("a CFG scale"))?,
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

struct Item {
    /// Denoiser-space input (VAE latents, or pixels), and that of the mirrored image (`flip_aug`).
    image: Tensor,
    flipped: Option<Tensor>,
    /// SDXL micro-conditioning: [orig_h, orig_w, crop_top, crop_left, target_h, target_w].
    time_ids: [f32; 6],
    caption: String,
    bucket: usize,
    repeats: usize,
}

/// The training task: the pipeline with adapters, the bucketed data set in memory, and the
/// objective.
pub struct LoraTrainTask {
    /// The pipeline being trained (adapter `default` on the U-Net and maybe the text encoder).
    pub pipe: Pipeline,
    cfg: LoraTrainConfig,
    items: Vec<Item>,
    buckets: Vec<(u32, u32)>,
    batches_per_epoch: u64,
    epoch: Option<(u64, Vec<Vec<usize>>)>,
    schedule: NoiseSchedule,
    timesteps: TimestepSampler,
    objective: Objective,
    text_cache: HashMap<String, Conditioning>,
    train_text: bool,
    prompts: Vec<SamplePrompt>,
    /// Whether samples are written (off in the middle of tests).
    pub sampling: bool,
}

/// The pipeline's total spatial downsampling in pixels (U-Net levels and VAE).
fn unet_divisor(p: &Pipeline) -> u32 {
    (1u32 << (p.unet.config().block_out_channels.len().saturating_sub(1))) * p.vae_factor() as u32
}

/// The image mirrored left–right.
fn mirror(x: &Tensor) -> Result<Tensor> {
    let w = x.dim(candle_core::D::Minus1)?;
    let idx = Tensor::from_vec((0..w as u32).rev().collect::<Vec<u32>>(), w, x.device())?;
    Ok(x.index_select(&idx, x.rank() - 1)?)
}

impl LoraTrainTask {
    /// Loads the pipeline with fresh adapters and the data set.
    pub fn new(cfg: LoraTrainConfig) -> Result<Self> {
        let unet_plan = AdapterPlan::single(cfg.unet_adapter()?, cfg.seed)?;
        let text_cfg = cfg.text_adapter()?;
        let train_text = text_cfg.is_some();
        let text_plan = match text_cfg {
            Some(c) => AdapterPlan::single(c, cfg.seed ^ 0x7e)?,
            None => AdapterPlan::none(),
        };
        let pipe = Pipeline::load(&cfg.pretrained_model_name_or_path, unet_plan, text_plan)?;
        if pipe.unet.trainable().is_empty() {
            return Err(Error::Config(format!(
                "no U-Net module of {} matched the LoRA targets",
                cfg.pretrained_model_name_or_path.display()
            )));
        }
        let bc = cfg.buckets()?;
        bc.validate(unet_divisor(&pipe))?;
        let buckets = bc.resolutions();
        let examples = scan(&cfg.train_data_dir, &cfg.caption_extension)?;
        let mut items = vec![];
        for ex in examples {
            let img = image::open(&ex.path)
                .map_err(|e| Error::format(&ex.path, format!("not a readable image: {e}")))?
                .to_rgb8();
            let b = bc.assign(img.dimensions(), &buckets);
            let bucket = match buckets.iter().position(|x| *x == b) {
                Some(i) => i,
                None => {
                    // no_upscale sizes are buckets of their own.
                    return Err(Error::Config(format!(
                        "{}: size {:?} maps to {b:?}, which is not a bucket (bucket_no_upscale needs buckets that cover every image size)",
                        ex.path.display(),
                        img.dimensions()
                    )));
                }
            };
            let (ow, oh) = img.dimensions();
            let (img, (left, top)) = cover_crop_at(&img, b);
            let time_ids = [
                oh as f32,
                ow as f32,
                top as f32,
                left as f32,
                b.1 as f32,
                b.0 as f32,
            ];
            let img = image_to_tensor(&img, &Device::Cpu)?.unsqueeze(0)?;
            // Latents are cached once, from a seeded posterior sample (kohya's --cache_latents).
            let seed = cfg.seed ^ (items.len() as u64).wrapping_mul(0x9e37_79b9);
            let flipped = if cfg.flip_aug {
                Some(
                    pipe.to_model_space(&mirror(&img)?, Some(seed ^ 1))?
                        .squeeze(0)?,
                )
            } else {
                None
            };
            items.push(Item {
                image: pipe.to_model_space(&img, Some(seed))?.squeeze(0)?,
                flipped,
                time_ids,
                caption: ex.caption,
                bucket,
                repeats: ex.repeats.max(1),
            });
        }
        let bs = cfg.train_batch_size.max(1);
        let mut per_bucket = vec![0usize; buckets.len()];
        for it in &items {
            per_bucket[it.bucket] += it.repeats;
        }
        let batches_per_epoch = per_bucket.iter().map(|n| n.div_ceil(bs) as u64).sum();
        let prediction = if cfg.v_parameterization {
            Prediction::V
        } else {
            pipe.scheduler.prediction()?
        };
        let mut train_sched = pipe.scheduler.clone();
        if cfg.zero_terminal_snr {
            prediction.check_zero_terminal_snr()?;
            train_sched.rescale_betas_zero_snr = true;
        }
        let schedule = NoiseSchedule::new(&train_sched)?;
        let timesteps = cfg.timestep_sampling().sampler(schedule.len())?;
        let prompts = match &cfg.sample_prompts {
            Some(p) => SamplePrompt::read_file(p)?,
            None => vec![],
        };
        SamplerKind::parse(&cfg.sample_sampler)?;
        Ok(Self {
            pipe,
            objective: Objective {
                prediction,
                min_snr_gamma: cfg.min_snr_gamma,
                noise_offset: cfg.noise_offset,
            },
            cfg,
            items,
            buckets,
            batches_per_epoch,
            epoch: None,
            schedule,
            timesteps,
            text_cache: HashMap::new(),
            train_text,
            prompts,
            sampling: true,
        })
    }

    /// Images in the data set (before repeats).
    pub fn num_images(&self) -> usize {
        self.items.len()
    }

    /// Micro-batches per epoch (repeats included).
    pub fn batches_per_epoch(&self) -> u64 {
        self.batches_per_epoch
    }

    /// The micro-batches of `epoch` (item indices), shuffled deterministically from the seed.
    fn epoch_batches(&self, epoch: u64) -> Vec<Vec<usize>> {
        let bs = self.cfg.train_batch_size.max(1);
        let mut batches = vec![];
        for b in 0..self.buckets.len() {
            let mut members: Vec<usize> = vec![];
            for (i, it) in self.items.iter().enumerate() {
                if it.bucket == b {
                    members.extend(std::iter::repeat_n(i, it.repeats));
                }
            }
            let mut rng = rng_for(self.cfg.seed, &format!("epoch-{epoch}-bucket-{b}"));
            members.shuffle(&mut rng);
            batches.extend(members.chunks(bs).map(|c| c.to_vec()));
        }
        let mut rng = rng_for(self.cfg.seed, &format!("epoch-{epoch}"));
        batches.shuffle(&mut rng);
        batches
    }

    fn caption(&self, raw: &str, rng: &mut rand_chacha::ChaCha8Rng) -> String {
        if self.cfg.caption_dropout_rate > 0.0
            && rng.random::<f64>() < self.cfg.caption_dropout_rate
        {
            return String::new();
        }
        if !self.cfg.shuffle_caption {
            return raw.to_string();
        }
        let sep = self.cfg.caption_separator.as_str();
        let mut tags: Vec<&str> = raw.split(sep).map(|t| t.trim()).collect();
        let keep = self.cfg.keep_tokens.min(tags.len());
        tags[keep..].shuffle(rng);
        tags.join(&format!("{} ", sep.trim()))
    }

    fn condition(&mut self, captions: &[String], ctx: &ForwardCtx) -> Result<Conditioning> {
        if self.train_text {
            return self.pipe.encode_cond(captions, ctx);
        }
        // Frozen text encoders: each caption is encoded once (kohya's cache_text_encoder_outputs).
        let eval = ForwardCtx::eval();
        let (mut rows, mut pooled) = (vec![], vec![]);
        for c in captions {
            if !self.text_cache.contains_key(c) {
                let e = self.pipe.encode_cond(std::slice::from_ref(c), &eval)?;
                let e = Conditioning {
                    context: e.context.detach(),
                    pooled: e.pooled.map(|p| p.detach()),
                };
                self.text_cache.insert(c.clone(), e);
            }
            let e = &self.text_cache[c];
            rows.push(e.context.clone());
            if let Some(p) = &e.pooled {
                pooled.push(p.clone());
            }
        }
        Ok(Conditioning {
            context: Tensor::cat(&rows, 0)?,
            pooled: if pooled.is_empty() {
                None
            } else {
                Some(Tensor::cat(&pooled, 0)?)
            },
        })
    }

    /// Samples every prompt of the prompt file into `<out>/sample/`.
    pub fn sample_prompts(&self, step: usize, out: &Path) -> Result<Vec<PathBuf>> {
        let dir = out.join("sample");
        let mut written = vec![];
        let (w0, h0) = self.cfg.resolution()?;
        for (i, p) in self.prompts.iter().enumerate() {
            let seed = p.seed.unwrap_or(self.cfg.seed + i as u64);
            let kind =
                SamplerKind::parse(p.sampler.as_deref().unwrap_or(&self.cfg.sample_sampler))?;
            let size = (
                p.height.unwrap_or(h0 as usize),
                p.width.unwrap_or(w0 as usize),
            );
            let img = self.pipe.sample(
                &SampleRequest {
                    prompts: vec![p.prompt.clone()],
                    negative: p.negative.clone(),
                    seeds: vec![seed],
                    steps: p.steps,
                    guidance: p.cfg,
                    sampler: kind,
                    size,
                },
                &ForwardCtx::eval(),
            )?;
            let file = dir.join(format!(
                "{}_{step:06}_{i:02}_{seed}.png",
                self.cfg.output_name
            ));
            write_png(&file, &tensor_to_image(&img.get(0)?)?)?;
            written.push(file);
        }
        Ok(written)
    }

    /// The trained LoRA as a file model (U-Net and, if trained, text encoder), with kohya metadata.
    pub fn lora_file(&self, steps: Option<usize>) -> Result<LoraFile> {
        let mut f = LoraFile::default();
        f.add_layers("unet", &self.pipe.unet.layers(), "default")?;
        if self.train_text {
            f.add_layers("text_encoder", &self.pipe.text_encoder.layers(), "default")?;
            if let Some(te2) = &self.pipe.text_encoder_2 {
                f.add_layers("text_encoder_2", &te2.layers(), "default")?;
            }
        }
        let (w, h) = self.cfg.resolution()?;
        let mut m = BTreeMap::new();
        m.insert("ss_network_module".into(), "networks.lora".into());
        m.insert("ss_network_dim".into(), self.cfg.network_dim.to_string());
        m.insert(
            "ss_network_alpha".into(),
            self.cfg.network_alpha.to_string(),
        );
        if let Some(cd) = self.cfg.conv_dim {
            let args = serde_json::json!({"conv_dim": cd.to_string(),
                "conv_alpha": self.cfg.conv_alpha.unwrap_or(self.cfg.network_alpha).to_string()});
            m.insert("ss_network_args".into(), args.to_string());
        }
        m.insert(
            "ss_learning_rate".into(),
            self.cfg.learning_rate.to_string(),
        );
        m.insert("ss_lr_scheduler".into(), self.cfg.lr_scheduler.clone());
        m.insert(
            "ss_max_train_steps".into(),
            self.cfg.max_train_steps.to_string(),
        );
        if let Some(s) = steps {
            m.insert("ss_steps".into(), s.to_string());
        }
        m.insert("ss_resolution".into(), format!("({w}, {h})"));
        m.insert("ss_num_train_images".into(), self.items.len().to_string());
        m.insert(
            "ss_batch_size_per_device".into(),
            self.cfg.train_batch_size.to_string(),
        );
        m.insert("ss_seed".into(), self.cfg.seed.to_string());
        m.insert(
            "ss_min_snr_gamma".into(),
            self.cfg
                .min_snr_gamma
                .map(|g| g.to_string())
                .unwrap_or_else(|| "None".into()),
        );
        m.insert("ss_noise_offset".into(), self.cfg.noise_offset.to_string());
        m.insert(
            "ss_caption_dropout_rate".into(),
            self.cfg.caption_dropout_rate.to_string(),
        );
        m.insert(
            "ss_enable_bucket".into(),
            self.cfg.enable_bucket.to_string(),
        );
        m.insert(
            "ss_network_train_unet_only".into(),
            self.cfg.network_train_unet_only.to_string(),
        );
        m.insert("ss_output_name".into(), self.cfg.output_name.clone());
        m.insert(
            "ss_sd_model_name".into(),
            self.cfg
                .pretrained_model_name_or_path
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
        );
        m.insert("ss_v2".into(), "False".into());
        if self.pipe.text_time() {
            m.insert("ss_base_model_version".into(), "sdxl_base_v1-0".into());
        }
        m.insert(
            "ss_training_comment".into(),
            "trained with postforge".into(),
        );
        m.insert(
            "modelspec.architecture".into(),
            if self.pipe.text_time() {
                "stable-diffusion-xl-v1-base/lora"
            } else {
                "stable-diffusion-v1/lora"
            }
            .into(),
        );
        m.insert("modelspec.implementation".into(), "diffusers".into());
        m.insert("modelspec.title".into(), self.cfg.output_name.clone());
        f.metadata = m;
        Ok(f)
    }

    /// The file format to write.
    pub fn format(&self) -> Result<LoraFormat> {
        match self.cfg.lora_format.as_str() {
            "kohya" => Ok(LoraFormat::Kohya),
            "diffusers" => Ok(LoraFormat::Diffusers),
            s => Err(Error::Config(format!(
                "lora_format `{s}` is not kohya or diffusers"
            ))),
        }
    }
}

impl Task for LoraTrainTask {
    fn trainable(&self) -> Vec<(String, Var)> {
        let mut v: Vec<(String, Var)> = self
            .pipe
            .unet
            .trainable()
            .into_iter()
            .map(|(n, v)| (format!("unet.{n}"), v))
            .collect();
        if self.train_text {
            v.extend(
                self.pipe
                    .text_encoder
                    .trainable()
                    .into_iter()
                    .map(|(n, v)| (format!("text_encoder.{n}"), v)),
            );
            if let Some(te2) = &self.pipe.text_encoder_2 {
                v.extend(
                    te2.trainable()
                        .into_iter()
                        .map(|(n, v)| (format!("text_encoder_2.{n}"), v)),
                );
            }
        }
        v
    }

    fn loss(&mut self, cursor: u64, ctx: &ForwardCtx) -> Result<Tensor> {
        let bpe = self.batches_per_epoch.max(1);
        let (epoch, idx) = (cursor / bpe, (cursor % bpe) as usize);
        if self.epoch.as_ref().map(|e| e.0) != Some(epoch) {
            self.epoch = Some((epoch, self.epoch_batches(epoch)));
        }
        let batch = self
            .epoch
            .as_ref()
            .and_then(|(_, b)| b.get(idx).cloned())
            .ok_or_else(|| Error::Msg(format!("no micro-batch {idx} in epoch {epoch}")))?;
        let mut rng = rng_for(self.cfg.seed, &format!("batch-{cursor}"));
        let mut xs = vec![];
        let mut caps = vec![];
        for &i in &batch {
            let flip = self.cfg.flip_aug && rng.random::<bool>();
            let x = match (&self.items[i].flipped, flip) {
                (Some(f), true) => f.clone(),
                _ => self.items[i].image.clone(),
            };
            xs.push(x);
            let raw = self.items[i].caption.clone();
            caps.push(self.caption(&raw, &mut rng));
        }
        let x0 = Tensor::stack(&xs, 0)?;
        let b = batch.len();
        let ts: Vec<usize> = (0..b).map(|_| self.timesteps.draw(&mut rng)).collect();
        let noise = self.objective.noise(x0.dims(), &mut rng)?;
        let xt = self.schedule.add_noise(&x0, &noise, &ts)?;
        let cond = self.condition(&caps, ctx)?;
        let t = Tensor::from_vec(
            ts.iter().map(|t| *t as f32).collect::<Vec<_>>(),
            b,
            &Device::Cpu,
        )?;
        let time_ids = Pipeline::time_ids(
            &batch
                .iter()
                .map(|&i| self.items[i].time_ids)
                .collect::<Vec<_>>(),
        )?;
        let added = match &cond.pooled {
            Some(p) if self.pipe.text_time() => Some(crate::models::unet::AddedCond {
                text_embeds: p,
                time_ids: &time_ids,
            }),
            _ => None,
        };
        let pred = self
            .pipe
            .unet
            .forward(&xt, &t, &cond.context, added.as_ref(), ctx)?;
        let target = self.objective.target(&self.schedule, &x0, &noise, &ts)?;
        self.objective.loss(
            &pred,
            &target,
            &self.objective.weights(&self.schedule, &ts),
            None,
        )
    }

    fn save_adapter(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        self.lora_file(None)?.write(
            &dir.join(format!("{}.safetensors", self.cfg.output_name)),
            self.format()?,
        )
    }

    fn on_start(&mut self, step: usize, out: &Path) -> Result<()> {
        if self.sampling && self.cfg.sample_at_first && !self.prompts.is_empty() {
            self.sample_prompts(step, out)?;
        }
        Ok(())
    }

    fn after_step(&mut self, step: usize, out: &Path) -> Result<()> {
        let n = self.cfg.sample_every_n_steps;
        if self.sampling && n > 0 && step.is_multiple_of(n) && !self.prompts.is_empty() {
            self.sample_prompts(step, out)?;
        }
        Ok(())
    }
}

/// Trains a LoRA as configured and writes `<output_dir>/<output_name>.safetensors`; returns the
/// trainer's summary and the file.
pub fn train_lora(
    cfg: &LoraTrainConfig,
    resume: bool,
    overwrite: bool,
) -> Result<(crate::train::TrainSummary, PathBuf, LoraTrainTask)> {
    let mut task = LoraTrainTask::new(cfg.clone())?;
    let trainer = crate::train::Trainer::new(cfg.trainer(overwrite)?)?;
    let summary = trainer.train(&mut task, resume)?;
    let file = cfg
        .output_dir
        .join(format!("{}.safetensors", cfg.output_name));
    task.lora_file(Some(summary.steps))?
        .write(&file, task.format()?)?;
    Ok((summary, file, task))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mirror_reverses_the_last_axis() {
        let x = Tensor::arange(0f32, 6.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 2, 3))
            .unwrap();
        let m = mirror(&x).unwrap().to_vec3::<f32>().unwrap();
        assert_eq!(m, vec![vec![vec![2.0, 1.0, 0.0], vec![5.0, 4.0, 3.0]]]);
    }

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
}
