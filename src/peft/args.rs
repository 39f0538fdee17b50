//! The adapter settings every training command and pipeline stage shares, declared once: the same
//! struct is a clap `Args` group (`--r`, `--lora-alpha`, ... with PEFT's names) and a serde table
//! (`r = 8`, `lora_alpha = 16` in a pipeline stage or a `--config-file`), with one set of defaults.
//! [`AdapterArgs::config`] is the one place that turns them into an [`AdapterConfig`].

use super::config::{AdapterConfig, InitSpec, ModuleSpec};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};

/// Default `peft_type`.
pub const PEFT_TYPE: &str = "lora";
/// Default rank.
pub const R: usize = 8;
/// Default alpha.
pub const LORA_ALPHA: f64 = 8.0;
/// Default target modules.
pub const TARGET_MODULES: &str = "all-linear";
/// Default initialisation.
pub const INIT_LORA_WEIGHTS: &str = "true";
/// Default LoftQ rounds.
pub const LOFTQ_ITER: usize = 1;

/// The adapter settings, as spelled on the command line (`--lora-alpha`; kohya-style
/// `--lora_alpha` is accepted too) and in TOML/JSON (`lora_alpha`): PEFT's `LoraConfig` names.
#[derive(Debug, Clone, PartialEq, clap::Args, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdapterArgs {
    /// Adapter method (PEFT's `peft_type`): lora, ia3, loha, lokr, vera or adalora.
    #[arg(long, default_value = PEFT_TYPE)]
    pub peft_type: String,
    /// Rank, ≥ 1.
    #[arg(long, default_value_t = R, value_parser = crate::check::count)]
    pub r: usize,
    /// Alpha, > 0 (the scale is alpha/r, or alpha/sqrt(r) with rsLoRA; LoHa/LoKr's alpha too).
    #[arg(long, default_value_t = LORA_ALPHA, value_parser = crate::check::positive)]
    pub lora_alpha: f64,
    /// Adapter dropout, in [0, 1).
    #[arg(long, default_value_t = 0.0, value_parser = crate::check::dropout)]
    pub lora_dropout: f64,
    /// Comma-separated module names, a regex (full match), or all-linear.
    #[arg(long, default_value = TARGET_MODULES)]
    pub target_modules: String,
    /// DoRA (weight-decomposed LoRA).
    #[arg(long)]
    pub use_dora: bool,
    /// rsLoRA scaling alpha/sqrt(r).
    #[arg(long)]
    pub use_rslora: bool,
    /// true | false | gaussian | pissa | pissa_niter_K | olora | loftq.
    #[arg(long, default_value = INIT_LORA_WEIGHTS, value_parser = crate::check::init_lora_weights_flag)]
    pub init_lora_weights: String,
    /// LoftQ rounds (with --init-lora-weights loftq), ≥ 1.
    #[arg(long, default_value_t = LOFTQ_ITER, value_parser = crate::check::count)]
    pub loftq_iter: usize,
    /// IA3: modules whose input is scaled rather than their output (names or a regex), e.g. down_proj.
    #[arg(long)]
    pub feedforward_modules: Option<String>,
    /// Modules trained in full beside the adapter (comma-separated, e.g. embed_tokens).
    #[arg(long)]
    pub modules_to_save: Option<String>,
}

impl Default for AdapterArgs {
    fn default() -> Self {
        Self {
            peft_type: PEFT_TYPE.into(),
            r: R,
            lora_alpha: LORA_ALPHA,
            lora_dropout: 0.0,
            target_modules: TARGET_MODULES.into(),
            use_dora: false,
            use_rslora: false,
            init_lora_weights: INIT_LORA_WEIGHTS.into(),
            loftq_iter: LOFTQ_ITER,
            feedforward_modules: None,
            modules_to_save: None,
        }
    }
}

impl AdapterArgs {
    /// The configuration for a base model at `base` (recorded as `base_model_name_or_path`) and a
    /// PEFT `task_type` (None for a model PEFT has no task for); every value checked, with the
    /// setting named.
    pub fn config(&self, base: &std::path::Path, task_type: Option<&str>) -> Result<AdapterConfig> {
        let bad = |key: &str, why: String| Err(Error::Config(format!("{key}: {why}")));
        if !self.lora_alpha.is_finite() || self.lora_alpha <= 0.0 {
            return bad(
                "lora_alpha",
                format!("must be a positive number, got {}", self.lora_alpha),
            );
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return bad(
                "lora_dropout",
                format!("must be in [0, 1), got {}", self.lora_dropout),
            );
        }
        if self.target_modules.trim().is_empty() {
            return bad("target_modules", "is empty".into());
        }
        if self.loftq_iter == 0 {
            return bad("loftq_iter", "must be at least 1".into());
        }
        let mut cfg = AdapterConfig {
            r: self.r,
            lora_alpha: self.lora_alpha,
            lora_dropout: self.lora_dropout,
            target_modules: Some(ModuleSpec::parse_cli(self.target_modules.trim())),
            use_dora: self.use_dora,
            use_rslora: self.use_rslora,
            init_lora_weights: InitSpec::parse_cli(&self.init_lora_weights),
            base_model_name_or_path: Some(base.display().to_string()),
            task_type: task_type.map(str::to_string),
            ..Default::default()
        };
        if self.init_lora_weights == "loftq" {
            cfg.set_loftq(self.loftq_iter);
        }
        if let Some(m) = &self.modules_to_save {
            let names: Vec<String> = m
                .split(',')
                .map(|s| s.trim().to_string())
                .filter(|s| !s.is_empty())
                .collect();
            if names.is_empty() {
                return bad("modules_to_save", format!("names no module: `{m}`"));
            }
            cfg.modules_to_save = Some(names);
        }
        cfg.with_method(&self.peft_type, self.feedforward_modules.as_deref())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        a: AdapterArgs,
    }

    /// The command line with no flags, an empty table and `Default` are the same settings: the
    /// defaults are declared once.
    #[test]
    fn clap_serde_and_default_agree() {
        let from_cli = Cli::try_parse_from(["x"]).unwrap().a;
        let from_toml: AdapterArgs = serde_json::from_str("{}").unwrap();
        assert_eq!(from_cli, AdapterArgs::default());
        assert_eq!(from_toml, AdapterArgs::default());
        let cli = Cli::try_parse_from(["x", "--r", "4", "--use-dora", "--lora-alpha", "2"])
            .unwrap()
            .a;
        let toml: AdapterArgs =
            serde_json::from_str(r#"{"r": 4, "use_dora": true, "lora_alpha": 2.0}"#).unwrap();
        assert_eq!(cli, toml);
    }

    #[test]
    fn bad_values_name_their_setting() {
        let p = std::path::Path::new("m");
        for (a, key) in [
            (
                AdapterArgs {
                    lora_dropout: 1.5,
                    ..Default::default()
                },
                "lora_dropout",
            ),
            (
                AdapterArgs {
                    lora_alpha: f64::NAN,
                    ..Default::default()
                },
                "lora_alpha",
            ),
            (
                AdapterArgs {
                    r: 0,
                    ..Default::default()
                },
                "r must",
            ),
            (
                AdapterArgs {
                    peft_type: "lorax".into(),
                    ..Default::default()
                },
                "LORAX",
            ),
            (
                AdapterArgs {
                    modules_to_save: Some(" , ".into()),
                    ..Default::default()
                },
                "modules_to_save",
            ),
            (
                AdapterArgs {
                    init_lora_weights: "pisa".into(),
                    ..Default::default()
                },
                "init_lora_weights",
            ),
        ] {
            let e = a.config(p, None).unwrap_err().to_string();
            assert!(e.contains(key), "{e}");
        }
        assert!(serde_json::from_str::<AdapterArgs>(r#"{"rank": 4}"#).is_err());
    }
}
