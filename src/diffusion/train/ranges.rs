//! The ranges of `train-diffusion`'s settings ([`Ranged`] for [`LoraTrainConfig`]) and the
//! prior-preservation rules: checked once, before the pipeline is loaded.

use super::blocks;
use super::config::LoraTrainConfig;
use crate::check::{self, all_in, count_at_least, f64_in, opt_count_at_least, opt_f64_in, Ranged};
use crate::{Error, Result};

impl Ranged for LoraTrainConfig {
    /// Every numeric key in its range, and the settings that used to be found only after the
    /// pipeline load, the class images and the latent cache (`lr_scheduler`, `lora_format`,
    /// `resolution`, the block lists, the timestep bias, `sample_sampler`, prior preservation),
    /// named in the error.
    fn check(&self) -> Result<()> {
        let (min_b, max_b) = (self.min_bucket_reso as usize, self.max_bucket_reso as usize);
        count_at_least("min_bucket_reso", min_b, 1)?;
        count_at_least(
            "max_bucket_reso",
            max_b,
            if self.enable_bucket { min_b } else { 1 },
        )?;
        count_at_least("bucket_reso_steps", self.bucket_reso_steps as usize, 1)?;
        count_at_least("network_dim", self.network_dim, 1)?;
        if (self.masked_loss || self.route_adapter_to_mask)
            && self.conditioning_data_dir.is_none()
            && !self.alpha_mask
        {
            return Err(crate::Error::Config(
                "masked_loss / route_adapter_to_mask need masks: give conditioning_data_dir or alpha_mask".into(),
            ));
        }
        if self.conditioning_data_dir.is_some() && self.alpha_mask {
            return Err(crate::Error::Config(
                "conditioning_data_dir and alpha_mask both give the masks; choose one".into(),
            ));
        }
        f64_in("network_alpha", self.network_alpha, check::POSITIVE)?;
        opt_count_at_least("conv_dim", self.conv_dim, 1)?;
        opt_f64_in("conv_alpha", self.conv_alpha, check::POSITIVE)?;
        f64_in("network_dropout", self.network_dropout, check::DROPOUT)?;
        let n = blocks::TOTAL_BLOCKS;
        for (key, list) in [
            ("block_alphas", &self.block_alphas),
            ("conv_block_alphas", &self.conv_block_alphas),
        ] {
            if let Some(l) = list {
                all_in(key, &l.values(key, n)?, check::POSITIVE)?;
            }
        }
        for (key, list) in [
            ("down_lr_weight", &self.down_lr_weight),
            ("up_lr_weight", &self.up_lr_weight),
        ] {
            if let Some(l) = list {
                all_in(key, &blocks::lr_weights(l, key)?, check::NON_NEGATIVE)?;
            }
        }
        opt_f64_in("mid_lr_weight", self.mid_lr_weight, check::NON_NEGATIVE)?;
        f64_in(
            "block_lr_zero_threshold",
            self.block_lr_zero_threshold,
            check::NON_NEGATIVE,
        )?;
        opt_f64_in("unet_lr", self.unet_lr, check::NON_NEGATIVE)?;
        opt_f64_in("text_encoder_lr", self.text_encoder_lr, check::NON_NEGATIVE)?;
        f64_in("learning_rate", self.learning_rate, check::POSITIVE)?;
        count_at_least("max_train_steps", self.max_train_steps, 1)?;
        count_at_least("train_batch_size", self.train_batch_size, 1)?;
        count_at_least(
            "gradient_accumulation_steps",
            self.gradient_accumulation_steps,
            1,
        )?;
        check::grad_clip("max_grad_norm", self.max_grad_norm)?;
        opt_f64_in("min_snr_gamma", self.min_snr_gamma, check::POSITIVE)?;
        f64_in("noise_offset", self.noise_offset, check::NON_NEGATIVE)?;
        if let (Some(lo), Some(hi)) = (self.min_timestep, self.max_timestep) {
            count_at_least("max_timestep", hi, lo + 1)?;
        }
        f64_in(
            "timestep_bias_multiplier",
            self.timestep_bias_multiplier,
            check::POSITIVE,
        )?;
        f64_in(
            "timestep_bias_portion",
            self.timestep_bias_portion,
            check::UNIT,
        )?;
        if self.timestep_bias_strategy == "range" {
            count_at_least(
                "timestep_bias_end",
                self.timestep_bias_end,
                self.timestep_bias_begin + 1,
            )?;
        }
        f64_in(
            "caption_dropout_rate",
            self.caption_dropout_rate,
            check::UNIT,
        )?;
        f64_in(
            "prior_loss_weight",
            self.prior_loss_weight,
            check::NON_NEGATIVE,
        )?;
        count_at_least("num_class_images", self.num_class_images, 1)?;
        count_at_least("sample_batch_size", self.sample_batch_size, 1)?;
        count_at_least("class_inference_steps", self.class_inference_steps, 1)?;
        f64_in(
            "class_guidance_scale",
            self.class_guidance_scale,
            check::NON_NEGATIVE,
        )?;
        f64_in(
            "class_guidance_rescale",
            self.class_guidance_rescale,
            check::UNIT,
        )?;
        f64_in("validation_split", self.validation_split, check::DROPOUT)?;
        opt_count_at_least("validate_every_n_steps", self.validate_every_n_steps, 1)?;
        opt_count_at_least("max_validation_steps", self.max_validation_steps, 1)?;
        // The string settings, which used to be read only when they were first needed.
        self.resolution()?;
        self.trainer(false)?;
        if !matches!(
            self.timestep_bias_strategy.as_str(),
            "none" | "earlier" | "later" | "range"
        ) {
            return Err(Error::Config(format!(
                "timestep_bias_strategy `{}` is not one of none, earlier, later, range",
                self.timestep_bias_strategy
            )));
        }
        self.blocks()?;
        self.preset()?;
        crate::diffusion::sampler::SamplerKind::parse(&self.sample_sampler)?;
        if !matches!(self.lora_format.as_str(), "kohya" | "diffusers") {
            return Err(Error::Config(format!(
                "lora_format `{}` is not kohya or diffusers",
                self.lora_format
            )));
        }
        check_prior(self)
    }
}

/// Checks the regularisation settings: kohya's folder or diffusers' class images, not both;
/// diffusers' needs a folder and a prompt; weights and counts in range.
pub(super) fn check_prior(cfg: &LoraTrainConfig) -> Result<()> {
    if !cfg.prior_loss_weight.is_finite() || cfg.prior_loss_weight < 0.0 {
        return Err(Error::Config(format!(
            "prior_loss_weight {} is not a finite number >= 0",
            cfg.prior_loss_weight
        )));
    }
    if cfg.with_prior_preservation {
        if cfg.reg_data_dir.is_some() {
            return Err(Error::Config(
                "reg_data_dir (kohya) and with_prior_preservation (diffusers) both set: use one"
                    .into(),
            ));
        }
        if cfg.class_data_dir.is_none()
            || cfg
                .class_prompt
                .as_deref()
                .is_none_or(|p| p.trim().is_empty())
        {
            return Err(Error::Config(
                "with_prior_preservation needs class_data_dir and class_prompt".into(),
            ));
        }
        if cfg.num_class_images == 0 || cfg.sample_batch_size == 0 || cfg.class_inference_steps == 0
        {
            return Err(Error::Config(
                "num_class_images, sample_batch_size and class_inference_steps must be positive"
                    .into(),
            ));
        }
        if !cfg.class_guidance_scale.is_finite()
            || !(0.0..=1.0).contains(&cfg.class_guidance_rescale)
        {
            return Err(Error::Config(format!(
                "class_guidance_scale {} must be finite and class_guidance_rescale {} in [0, 1]",
                cfg.class_guidance_scale, cfg.class_guidance_rescale
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::blocks::NumList;
    use super::*;
    use std::path::Path;

    /// Each numeric key (and each value of a block list) refuses NaN and a value out of its range,
    /// naming the key and the range; so do the string settings once read only after the pipeline
    /// load.
    #[test]
    fn every_numeric_key_is_checked_by_name() {
        let base = LoraTrainConfig::new(Path::new("m"), Path::new("d"), Path::new("o"));
        base.check().unwrap();
        type Set = fn(&mut LoraTrainConfig);
        let cases: &[(&str, Set)] = &[
            ("min_bucket_reso = 0", |c| c.min_bucket_reso = 0),
            (
                "max_bucket_reso = 128 is out of range: it must be at least 256",
                |c| {
                    c.enable_bucket = true;
                    c.max_bucket_reso = 128
                },
            ),
            ("bucket_reso_steps = 0", |c| c.bucket_reso_steps = 0),
            ("network_dim = 0", |c| c.network_dim = 0),
            ("network_alpha = NaN", |c| c.network_alpha = f64::NAN),
            (
                "network_alpha = 0 is out of range: it must be a finite number > 0",
                |c| c.network_alpha = 0.0,
            ),
            ("conv_dim = 0", |c| c.conv_dim = Some(0)),
            ("conv_alpha = NaN", |c| c.conv_alpha = Some(f64::NAN)),
            ("conv_alpha = 0", |c| c.conv_alpha = Some(0.0)),
            ("network_dropout = NaN", |c| c.network_dropout = f64::NAN),
            ("network_dropout = 1", |c| c.network_dropout = 1.0),
            ("block_alphas", |c| {
                c.block_alphas = Some(NumList::List(vec![f64::NAN; 25]))
            }),
            ("block_alphas[0] = 0 is out of range", |c| {
                c.block_alphas = Some(NumList::List(vec![0.0; 25]))
            }),
            ("conv_block_alphas", |c| {
                c.conv_dim = Some(2);
                c.conv_block_alphas = Some(NumList::Text(vec!["nan"; 25].join(",")))
            }),
            ("down_lr_weight", |c| {
                c.down_lr_weight = Some(NumList::Text("cosine+nan".into()))
            }),
            ("up_lr_weight[0] = -1 is out of range", |c| {
                c.up_lr_weight = Some(NumList::Text("zeros+-1".into()))
            }),
            ("mid_lr_weight = NaN", |c| c.mid_lr_weight = Some(f64::NAN)),
            ("block_lr_zero_threshold = NaN", |c| {
                c.block_lr_zero_threshold = f64::NAN
            }),
            ("unet_lr = NaN", |c| c.unet_lr = Some(f64::NAN)),
            ("unet_lr = -1", |c| c.unet_lr = Some(-1.0)),
            ("text_encoder_lr = NaN", |c| {
                c.text_encoder_lr = Some(f64::NAN)
            }),
            ("learning_rate = NaN", |c| c.learning_rate = f64::NAN),
            ("learning_rate = 0", |c| c.learning_rate = 0.0),
            ("max_train_steps = 0", |c| c.max_train_steps = 0),
            ("train_batch_size = 0", |c| c.train_batch_size = 0),
            ("gradient_accumulation_steps = 0", |c| {
                c.gradient_accumulation_steps = 0
            }),
            ("max_grad_norm = NaN", |c| c.max_grad_norm = f64::NAN),
            (
                "max_grad_norm = -1 is out of range: it must be a finite number ≥ 0",
                |c| c.max_grad_norm = -1.0,
            ),
            ("min_snr_gamma = NaN", |c| c.min_snr_gamma = Some(f64::NAN)),
            ("min_snr_gamma = 0", |c| c.min_snr_gamma = Some(0.0)),
            ("noise_offset = NaN", |c| c.noise_offset = f64::NAN),
            (
                "max_timestep = 10 is out of range: it must be at least 21",
                |c| {
                    c.min_timestep = Some(20);
                    c.max_timestep = Some(10)
                },
            ),
            ("timestep_bias_multiplier = NaN", |c| {
                c.timestep_bias_multiplier = f64::NAN
            }),
            ("timestep_bias_portion = NaN", |c| {
                c.timestep_bias_portion = f64::NAN
            }),
            ("timestep_bias_end = 5 is out of range", |c| {
                c.timestep_bias_strategy = "range".into();
                c.timestep_bias_begin = 5;
                c.timestep_bias_end = 5
            }),
            ("caption_dropout_rate = NaN", |c| {
                c.caption_dropout_rate = f64::NAN
            }),
            ("prior_loss_weight = NaN", |c| {
                c.prior_loss_weight = f64::NAN
            }),
            ("num_class_images = 0", |c| c.num_class_images = 0),
            ("sample_batch_size = 0", |c| c.sample_batch_size = 0),
            ("class_inference_steps = 0", |c| c.class_inference_steps = 0),
            ("class_guidance_scale = NaN", |c| {
                c.class_guidance_scale = f64::NAN
            }),
            ("class_guidance_scale = -1", |c| {
                c.class_guidance_scale = -1.0
            }),
            ("class_guidance_rescale = NaN", |c| {
                c.class_guidance_rescale = f64::NAN
            }),
            ("validation_split = NaN", |c| c.validation_split = f64::NAN),
            (
                "validation_split = 1 is out of range: it must be a number in [0, 1)",
                |c| c.validation_split = 1.0,
            ),
            ("validate_every_n_steps = 0", |c| {
                c.validate_every_n_steps = Some(0)
            }),
            ("max_validation_steps = 0", |c| {
                c.max_validation_steps = Some(0)
            }),
            ("lr_scheduler `cosin`", |c| c.lr_scheduler = "cosin".into()),
            ("lora_format `safetensors`", |c| {
                c.lora_format = "safetensors".into()
            }),
            ("timestep_bias_strategy `late`", |c| {
                c.timestep_bias_strategy = "late".into()
            }),
            ("resolution `32,a`", |c| c.resolution = "32,a".into()),
            ("sampler", |c| c.sample_sampler = "plms".into()),
        ];
        for (needle, set) in cases {
            let mut c = base.clone();
            set(&mut c);
            let e = c.check().unwrap_err().to_string();
            assert!(e.contains(needle), "{needle}: {e}");
        }
    }
}
