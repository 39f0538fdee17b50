//! The ranges of the SFT settings ([`Ranged`] for [`SftRunConfig`]): every numeric key, PEFT's
//! adapter keys included, checked once before anything is loaded.

use super::sft::SftRunConfig;
use crate::check::{self, count_at_least, f64_in, opt_count_at_least, opt_f64_in, Ranged};
use crate::{Error, Result};

impl Ranged for SftRunConfig {
    /// Every numeric key in its range (and the settings that used to be found only after the model
    /// was loaded: `quantize`, S²-Attn with packing), named in the error.
    fn check(&self) -> Result<()> {
        super::check_adapter(&self.adapter)?;
        f64_in("replay_ratio", self.replay_ratio, check::UNIT)?;
        opt_f64_in("max_forgetting", self.max_forgetting, check::NON_NEGATIVE)?;
        opt_f64_in(
            "s2_attn_group_ratio",
            self.s2_attn_group_ratio,
            check::FRACTION,
        )?;
        opt_f64_in(
            "position_interpolation",
            self.position_interpolation,
            check::AT_LEAST_ONE,
        )?;
        count_at_least("max_length", self.max_length, 2)?;
        f64_in("learning_rate", self.learning_rate, check::POSITIVE)?;
        opt_count_at_least("max_steps", self.max_steps, 1)?;
        count_at_least("num_train_epochs", self.num_train_epochs, 1)?;
        count_at_least(
            "per_device_train_batch_size",
            self.per_device_train_batch_size,
            1,
        )?;
        count_at_least(
            "gradient_accumulation_steps",
            self.gradient_accumulation_steps,
            1,
        )?;
        check::grad_clip("max_grad_norm", self.max_grad_norm)?;
        f64_in("weight_decay", self.weight_decay, check::NON_NEGATIVE)?;
        crate::peft::quant::QuantSpec::parse(&self.quantize)?;
        if self.s2_attn_group_ratio.is_some() && self.packing {
            return Err(Error::Config(
                "s2_attn_group_ratio (S²-Attn) needs packing off: groups would mix packed sequences".into(),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each numeric key (PEFT's adapter keys included) refuses NaN and a value out of its range,
    /// naming the key and the range, before anything is loaded.
    #[test]
    fn every_numeric_key_is_checked_by_name() {
        let base: SftRunConfig = serde_json::from_value(serde_json::json!({
            "model": "m", "data": "d", "output_dir": "o"
        }))
        .unwrap();
        base.check().unwrap();
        type Set = fn(&mut SftRunConfig);
        let cases: &[(&str, Set)] = &[
            ("replay_ratio = NaN", |c| c.replay_ratio = f64::NAN),
            (
                "replay_ratio = 1.5 is out of range: it must be a number in [0, 1]",
                |c| c.replay_ratio = 1.5,
            ),
            ("max_forgetting = NaN", |c| {
                c.max_forgetting = Some(f64::NAN)
            }),
            ("max_forgetting = -0.1", |c| c.max_forgetting = Some(-0.1)),
            ("lora_alpha = NaN", |c| c.adapter.lora_alpha = f64::NAN),
            (
                "lora_alpha = 0 is out of range: it must be a finite number > 0",
                |c| c.adapter.lora_alpha = 0.0,
            ),
            ("lora_dropout = NaN", |c| c.adapter.lora_dropout = f64::NAN),
            (
                "lora_dropout = 1 is out of range: it must be a number in [0, 1)",
                |c| c.adapter.lora_dropout = 1.0,
            ),
            ("r = 0 is out of range: it must be at least 1", |c| {
                c.adapter.r = 0
            }),
            ("loftq_iter = 0", |c| c.adapter.loftq_iter = 0),
            ("init_lora_weights: the iteration count `x`", |c| {
                c.adapter.init_lora_weights = "pissa_niter_x".into()
            }),
            ("s2_attn_group_ratio = NaN", |c| {
                c.s2_attn_group_ratio = Some(f64::NAN)
            }),
            (
                "s2_attn_group_ratio = 0 is out of range: it must be a number in (0, 1]",
                |c| c.s2_attn_group_ratio = Some(0.0),
            ),
            ("position_interpolation = NaN", |c| {
                c.position_interpolation = Some(f64::NAN)
            }),
            ("position_interpolation = inf", |c| {
                c.position_interpolation = Some(f64::INFINITY)
            }),
            (
                "position_interpolation = 0.5 is out of range: it must be a finite number ≥ 1",
                |c| c.position_interpolation = Some(0.5),
            ),
            (
                "max_length = 1 is out of range: it must be at least 2",
                |c| c.max_length = 1,
            ),
            ("learning_rate = NaN", |c| c.learning_rate = f64::NAN),
            ("learning_rate = 0", |c| c.learning_rate = 0.0),
            ("max_steps = 0", |c| c.max_steps = Some(0)),
            ("num_train_epochs = 0", |c| c.num_train_epochs = 0),
            ("per_device_train_batch_size = 0", |c| {
                c.per_device_train_batch_size = 0
            }),
            ("gradient_accumulation_steps = 0", |c| {
                c.gradient_accumulation_steps = 0
            }),
            ("max_grad_norm = NaN", |c| c.max_grad_norm = f64::NAN),
            (
                "max_grad_norm = -1 is out of range: it must be a finite number ≥ 0",
                |c| c.max_grad_norm = -1.0,
            ),
            ("weight_decay = NaN", |c| c.weight_decay = f64::NAN),
            ("weight_decay = -5", |c| c.weight_decay = -5.0),
            ("quantize", |c| c.quantize = "nf3".into()),
        ];
        for (needle, set) in cases {
            let mut c = base.clone();
            set(&mut c);
            let e = c.check().unwrap_err().to_string();
            assert!(e.contains(needle), "{needle}: {e}");
        }
        let mut c = base.clone();
        c.max_grad_norm = 0.0;
        c.max_forgetting = Some(0.0);
        c.position_interpolation = Some(1.0);
        c.s2_attn_group_ratio = Some(1.0);
        c.check().unwrap();
    }
}
