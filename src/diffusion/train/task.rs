//! The training task: the pipeline with its adapters, the bucketed image set in memory (flips,
//! caption shuffling and dropout), the diffusion loss, sample images, and the LoRA file with
//! kohya's `ss_*` metadata.

use super::config::{LoraTrainConfig, SamplePrompt};
use crate::data::buckets::cover_crop_at;
use crate::data::image_folder::scan;
use crate::diffusion::objective::{Objective, TimestepSampler};
use crate::diffusion::pipeline::{Conditioning, Pipeline, SampleRequest};
use crate::diffusion::sampler::SamplerKind;
use crate::diffusion::schedule::{NoiseSchedule, Prediction};
use crate::media::image::{image_to_tensor, tensor_to_image, write_png};
use crate::peft::formats::lora_file::{LoraFile, LoraFormat};
use crate::peft::{Adapted, AdapterPlan, ForwardCtx, Routing};
use crate::rng::rng_for;
use crate::train::Task;
use crate::{Error, Result};
use candle_core::{Tensor, Var};
use rand::seq::SliceRandom;
use rand::Rng;
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

struct Item {
    /// Denoiser-space input (VAE latents, or pixels), and that of the mirrored image (`flip_aug`).
    image: Tensor,
    flipped: Option<Tensor>,
    /// SDXL micro-conditioning: [orig_h, orig_w, crop_top, crop_left, target_h, target_w].
    time_ids: [f32; 6],
    caption: String,
    bucket: usize,
    repeats: usize,
    /// A regularisation (prior-preservation) image: its loss is weighted by `prior_loss_weight`.
    reg: bool,
    /// The image's mask (1, H, W) at the bucket size, and the mirrored one (`masked_loss`).
    mask: Option<(Tensor, Option<Tensor>)>,
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
    /// Learning-rate multipliers (block lr weights, `unet_lr`, `text_encoder_lr`).
    lr_scales: BTreeMap<String, f64>,
    /// Held-out images (`validation_split`), by bucket.
    val_items: Vec<Item>,
    /// The regularisation samples of every epoch (indices into `items`).
    reg_picks: Vec<usize>,
}

/// Learning-rate multipliers of the trainable tensors named `names` (`unet.<path>...`,
/// `text_encoder.<path>...`): `unet_lr` / `text_encoder_lr` over `learning_rate`, times the
/// block's lr weight.
fn lr_scales(cfg: &LoraTrainConfig, names: &[String]) -> Result<BTreeMap<String, f64>> {
    let lr = cfg.learning_rate;
    let rel = |x: Option<f64>, key: &str| -> Result<f64> {
        match x {
            None => Ok(1.0),
            Some(v) if v.is_finite() && v >= 0.0 && lr > 0.0 => Ok(v / lr),
            Some(v) => Err(Error::Config(format!(
                "{key} {v} must be a finite number >= 0 (with learning_rate > 0)"
            ))),
        }
    };
    let (unet, text) = (
        rel(cfg.unet_lr, "unet_lr")?,
        rel(cfg.text_encoder_lr, "text_encoder_lr")?,
    );
    let blocks = cfg.blocks()?;
    let mut out = BTreeMap::new();
    for n in names {
        let s = match n.strip_prefix("unet.") {
            Some(path) => unet * blocks.as_ref().map_or(1.0, |b| b.lr_weight(path)),
            None => text,
        };
        if s != 1.0 {
            out.insert(n.clone(), s);
        }
    }
    Ok(out)
}

/// Timesteps of the validation loss: the middles of `n` equal slices of `[lo, hi)`.
fn validation_timesteps(lo: usize, hi: usize, n: usize) -> Vec<usize> {
    (0..n)
        .map(|k| lo + ((hi - lo) as f64 * (k as f64 + 0.5) / n as f64) as usize)
        .collect()
}

/// Splits off `ceil(split · n)` images (at least one when `split > 0`, never all) for validation,
/// chosen by `seed`.
fn split_validation(items: Vec<Item>, split: f64, seed: u64) -> Result<(Vec<Item>, Vec<Item>)> {
    if !(0.0..1.0).contains(&split) {
        return Err(Error::Config(format!(
            "validation_split {split} is not in [0, 1)"
        )));
    }
    if split == 0.0 {
        return Ok((items, vec![]));
    }
    let n = items.len();
    let k = ((split * n as f64).ceil() as usize).max(1);
    if k >= n {
        return Err(Error::Config(format!(
            "validation_split {split} of {n} images leaves none to train on"
        )));
    }
    let mut idx: Vec<usize> = (0..n).collect();
    idx.shuffle(&mut rng_for(seed, "validation-split"));
    let held: std::collections::BTreeSet<usize> = idx[..k].iter().copied().collect();
    let (mut train, mut val) = (vec![], vec![]);
    for (i, it) in items.into_iter().enumerate() {
        if held.contains(&i) {
            val.push(it);
        } else {
            train.push(it);
        }
    }
    Ok((train, val))
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
        // The prompt file is small: its values are checked before the pipeline is loaded.
        let prompts = match &cfg.sample_prompts {
            Some(p) => SamplePrompt::read_file(p)?,
            None => vec![],
        };
        let unet_plan = AdapterPlan::single(cfg.unet_adapter()?, cfg.seed)?;
        let text_cfg = cfg.text_adapter()?;
        let train_text = text_cfg.is_some();
        let text_plan = match text_cfg {
            Some(c) => AdapterPlan::single(c, cfg.seed ^ 0x7e)?,
            None => AdapterPlan::none(),
        };
        let mut pipe = Pipeline::load(&cfg.pretrained_model_name_or_path, unet_plan, text_plan)?;
        if pipe.unet.trainable().is_empty() {
            return Err(Error::Config(format!(
                "no U-Net module of {} matched the LoRA targets",
                cfg.pretrained_model_name_or_path.display()
            )));
        }
        let bc = cfg.buckets()?;
        bc.validate(unet_divisor(&pipe))?;
        let buckets = bc.resolutions();
        super::ranges::check_prior(&cfg)?;
        if cfg.with_prior_preservation {
            let made = super::prior::generate_class_images(&cfg, &mut pipe)?;
            if made > 0 {
                eprintln!("generated {made} class images");
            }
        }
        let examples = scan(&cfg.train_data_dir, &cfg.caption_extension)?;
        let n_train = examples.len();
        let reg_examples = super::prior::reg_examples(&cfg)?;
        let mut items = vec![];
        for (k, ex) in examples.into_iter().chain(reg_examples).enumerate() {
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
            crate::data::image_folder::check_trainable_size(&ex.path, (ow, oh), b)?;
            let (img, (left, top)) = cover_crop_at(&img, b);
            let time_ids = [
                oh as f32,
                ow as f32,
                top as f32,
                left as f32,
                b.1 as f32,
                b.0 as f32,
            ];
            let img = image_to_tensor(&img, &crate::util::device::current())?.unsqueeze(0)?;
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
            let mask = if k < n_train {
                super::masks::item_mask(&cfg, &ex.path, (ow, oh), b)?
            } else {
                None
            };
            let mask = match mask {
                Some(m) => {
                    let f = if cfg.flip_aug {
                        Some(mirror(&m)?)
                    } else {
                        None
                    };
                    Some((m, f))
                }
                None => None,
            };
            items.push(Item {
                image: pipe.to_model_space(&img, Some(seed))?.squeeze(0)?,
                flipped,
                time_ids,
                caption: ex.caption,
                bucket,
                repeats: ex.repeats.max(1),
                reg: k >= n_train,
                mask,
            });
        }
        let reg_items = items.split_off(n_train);
        let val_seed = cfg.validation_seed.unwrap_or(cfg.seed);
        let (mut items, val_items) = split_validation(items, cfg.validation_split, val_seed)?;
        // kohya: each epoch takes as many regularisation samples as training samples.
        let train_samples: usize = items.iter().map(|it| it.repeats).sum();
        let picks = super::prior::reg_picks(
            &reg_items.iter().map(|it| it.repeats).collect::<Vec<_>>(),
            train_samples,
        );
        let reg_picks: Vec<usize> = picks.iter().map(|&i| items.len() + i).collect();
        items.extend(reg_items);
        let bs = cfg.train_batch_size.max(1);
        let mut per_bucket = vec![0usize; buckets.len()];
        for it in items.iter().filter(|it| !it.reg) {
            per_bucket[it.bucket] += it.repeats;
        }
        for &i in &reg_picks {
            per_bucket[items[i].bucket] += 1;
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
        SamplerKind::parse(&cfg.sample_sampler)?;
        let mut task = Self {
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
            lr_scales: BTreeMap::new(),
            val_items,
            reg_picks,
        };
        let names: Vec<String> = task.trainable().into_iter().map(|(n, _)| n).collect();
        task.lr_scales = lr_scales(&task.cfg, &names)?;
        Ok(task)
    }

    /// Training images (before repeats; regularisation and held-out images not counted).
    pub fn num_images(&self) -> usize {
        self.items.iter().filter(|it| !it.reg).count()
    }

    /// Regularisation (class) images.
    pub fn num_reg_images(&self) -> usize {
        self.items.iter().filter(|it| it.reg).count()
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
                if it.bucket == b && !it.reg {
                    members.extend(std::iter::repeat_n(i, it.repeats));
                }
            }
            members.extend(
                self.reg_picks
                    .iter()
                    .copied()
                    .filter(|&i| self.items[i].bucket == b),
            );
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
            let seed = p.seed.unwrap_or(self.cfg.seed.wrapping_add(i as u64));
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

impl LoraTrainTask {
    /// The loss of denoising `xs` (model space) captioned `caps` from timesteps `ts` with `noise`,
    /// each sample weighted by `weights`.
    #[allow(clippy::too_many_arguments)]
    fn denoising_loss(
        &mut self,
        xs: &[Tensor],
        time_ids: &[[f32; 6]],
        caps: &[String],
        ts: &[usize],
        noise: &Tensor,
        weights: &[f32],
        masks: Option<&Tensor>,
        ctx: &ForwardCtx,
    ) -> Result<Tensor> {
        let x0 = Tensor::stack(xs, 0)?;
        let b = xs.len();
        let xt = self.schedule.add_noise(&x0, noise, ts)?;
        let cond = self.condition(caps, ctx)?;
        let t = Tensor::from_vec(
            ts.iter().map(|t| *t as f32).collect::<Vec<_>>(),
            b,
            &crate::util::device::current(),
        )?;
        let time_ids = Pipeline::time_ids(time_ids)?;
        let added = match &cond.pooled {
            Some(p) if self.pipe.text_time() => Some(crate::models::unet::AddedCond {
                text_embeds: p,
                time_ids: &time_ids,
            }),
            _ => None,
        };
        // masks: (b, H, W) at the image size. The adapter is routed by them (the U-Net only: the
        // text encoder sees tokens, not pixels); the loss takes them at the model's grid.
        let unet_ctx = match masks {
            Some(m) if self.cfg.route_adapter_to_mask => {
                ctx.routed(std::sync::Arc::new(Routing::new().with_mask("default", m)?))
            }
            _ => ctx.clone(),
        };
        let pred = self
            .pipe
            .unet
            .forward(&xt, &t, &cond.context, added.as_ref(), &unet_ctx)?;
        let target = self.objective.target(&self.schedule, &x0, noise, ts)?;
        let loss_mask = match masks {
            Some(m) => {
                let (_, _, h, w) = pred.dims4()?;
                Some(crate::peft::ctx::resize_to(m, &[b, h, w])?.unsqueeze(1)?)
            }
            None => None,
        };
        self.objective
            .loss(&pred, &target, weights, loss_mask.as_ref())
    }

    /// Images held out for the validation loss.
    pub fn num_validation_images(&self) -> usize {
        self.val_items.len()
    }

    /// The validation loss of a finished run in `output_dir`, first and last, as one line; `None`
    /// when the run measured none.
    pub fn validation_summary(&self, output_dir: &Path) -> Result<Option<String>> {
        let val =
            crate::train::trainer::read_metric(&output_dir.join("metrics.jsonl"), "val_loss")?;
        Ok(match (val.first(), val.last()) {
            (Some(a), Some(b)) => Some(format!(
                "validation loss ({} held-out images): {:.4} at step {} -> {:.4} at step {}",
                self.num_validation_images(),
                a.1,
                a.0,
                b.1,
                b.0
            )),
            _ => None,
        })
    }

    /// The validation loss: the unweighted denoising MSE of every held-out image (its caption as
    /// is, no flip, its mask when the run is masked) at 4 fixed timesteps spread over the training range, with noise fixed by
    /// `validation_seed`, so that values from different steps (and runs) compare. No graph is
    /// recorded. `None` without held-out images.
    pub fn validation_loss(&mut self) -> Result<Option<f64>> {
        if self.val_items.is_empty() {
            return Ok(None);
        }
        let seed = self.cfg.validation_seed.unwrap_or(self.cfg.seed);
        let n_t = self.schedule.len();
        let lo = self.cfg.min_timestep.unwrap_or(0).min(n_t - 1);
        let hi = self.cfg.max_timestep.unwrap_or(n_t).clamp(lo + 1, n_t);
        let steps = validation_timesteps(lo, hi, 4);
        let bs = self.cfg.train_batch_size.max(1);
        let mut batches: Vec<Vec<usize>> = vec![];
        for b in 0..self.buckets.len() {
            let members: Vec<usize> = (0..self.val_items.len())
                .filter(|&i| self.val_items[i].bucket == b)
                .collect();
            batches.extend(members.chunks(bs).map(|c| c.to_vec()));
        }
        if let Some(m) = self.cfg.max_validation_steps {
            batches.truncate(m.max(1));
        }
        let ctx = ForwardCtx::eval();
        let (mut sum, mut n) = (0f64, 0usize);
        for (bi, batch) in batches.iter().enumerate() {
            let xs: Vec<Tensor> = batch
                .iter()
                .map(|&i| self.val_items[i].image.clone())
                .collect();
            let time_ids: Vec<[f32; 6]> =
                batch.iter().map(|&i| self.val_items[i].time_ids).collect();
            let caps: Vec<String> = batch
                .iter()
                .map(|&i| self.val_items[i].caption.clone())
                .collect();
            // Masked runs validate on the masked loss too.
            let masks = batch
                .iter()
                .map(|&i| self.val_items[i].mask.as_ref().map(|m| m.0.clone()))
                .collect::<Option<Vec<Tensor>>>()
                .map(|v| Tensor::cat(&v, 0))
                .transpose()?;
            for (k, &t) in steps.iter().enumerate() {
                let mut rng = rng_for(seed, &format!("validation-noise-{bi}-{k}"));
                let shape = [&[batch.len()], xs[0].dims()].concat();
                let noise = crate::rng::normal(&shape, 1.0, &mut rng)?;
                let ts = vec![t; batch.len()];
                let w = vec![1.0f32; batch.len()];
                let l = self.denoising_loss(
                    &xs,
                    &time_ids,
                    &caps,
                    &ts,
                    &noise,
                    &w,
                    masks.as_ref(),
                    &ctx,
                )?;
                sum += l.to_scalar::<f32>()? as f64 * batch.len() as f64;
                n += batch.len();
            }
        }
        Ok(Some(sum / n.max(1) as f64))
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

    fn lr_scales(&self) -> BTreeMap<String, f64> {
        self.lr_scales.clone()
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
        let mut masks = vec![];
        for &i in &batch {
            let flip = self.cfg.flip_aug && rng.random::<bool>();
            let x = match (&self.items[i].flipped, flip) {
                (Some(f), true) => f.clone(),
                _ => self.items[i].image.clone(),
            };
            xs.push(x);
            // Regularisation images have no mask: they are learned everywhere.
            let (h, w) = (
                self.buckets[self.items[i].bucket].1,
                self.buckets[self.items[i].bucket].0,
            );
            masks.push(match &self.items[i].mask {
                Some((_, Some(f))) if flip => f.clone(),
                Some((m, _)) => m.clone(),
                None => Tensor::ones(
                    (1, h as usize, w as usize),
                    candle_core::DType::F32,
                    &crate::util::device::current(),
                )?,
            });
            let raw = self.items[i].caption.clone();
            caps.push(self.caption(&raw, &mut rng));
        }
        let b = batch.len();
        let ts: Vec<usize> = (0..b).map(|_| self.timesteps.draw(&mut rng)).collect();
        let shape = [&[b], xs[0].dims()].concat();
        let noise = self.objective.noise(&shape, &mut rng)?;
        let time_ids: Vec<[f32; 6]> = batch.iter().map(|&i| self.items[i].time_ids).collect();
        let mut weights = self.objective.weights(&self.schedule, &ts);
        for (w, &i) in weights.iter_mut().zip(&batch) {
            if self.items[i].reg {
                *w *= self.cfg.prior_loss_weight as f32;
            }
        }
        let masks = if self.items.iter().any(|it| it.mask.is_some()) {
            Some(Tensor::cat(&masks, 0)?)
        } else {
            None
        };
        self.denoising_loss(
            &xs,
            &time_ids,
            &caps,
            &ts,
            &noise,
            &weights,
            masks.as_ref(),
            ctx,
        )
    }

    fn save_adapter(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
        self.lora_file(None)?.write(
            &dir.join(format!("{}.safetensors", self.cfg.output_name)),
            self.format()?,
        )
    }

    fn step_metrics(&mut self, step: usize) -> Result<BTreeMap<String, f64>> {
        let mut m = BTreeMap::new();
        if self.cfg.validates_at(step) {
            if let Some(v) = self.validation_loss()? {
                m.insert("val_loss".to_string(), v);
            }
        }
        Ok(m)
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
    // Every setting is checked before the pipeline is loaded.
    crate::check::Ranged::check(cfg)?;
    // The folder is this run's from before the class images and caches are written into it.
    let _lock = crate::util::outdir::DirLock::acquire(&cfg.output_dir)?;
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
        let x = Tensor::arange(0f32, 6.0, &candle_core::Device::Cpu)
            .unwrap()
            .reshape((1, 2, 3))
            .unwrap();
        let m = mirror(&x).unwrap().to_vec3::<f32>().unwrap();
        assert_eq!(m, vec![vec![vec![2.0, 1.0, 0.0], vec![5.0, 4.0, 3.0]]]);
    }
}
