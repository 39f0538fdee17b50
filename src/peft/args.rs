//! The adapter settings the training commands share (`sft`, `align`, pipeline stages), spelled as
//! on the command line, and the one place that turns them into an [`AdapterConfig`].

use super::config::{AdapterConfig, InitSpec, ModuleSpec};
use crate::Result;

/// The adapter settings the training commands share, as spelled on the command line and in
/// pipeline files (PEFT's names): one place turns them into an [`AdapterConfig`], so `sft`, `align`
/// and pipeline stages accept the same things.
#[derive(Debug, Clone, Copy)]
pub struct AdapterSpec<'a> {
    /// `peft_type`: lora, ia3, loha, lokr, vera, adalora (any case).
    pub peft_type: &'a str,
    /// Rank.
    pub r: usize,
    /// Alpha.
    pub lora_alpha: f64,
    /// Adapter dropout.
    pub lora_dropout: f64,
    /// Comma-separated names, a regex, or `all-linear`.
    pub target_modules: &'a str,
    /// DoRA.
    pub use_dora: bool,
    /// rsLoRA.
    pub use_rslora: bool,
    /// true | false | gaussian | pissa | pissa_niter_K | olora | loftq.
    pub init_lora_weights: &'a str,
    /// LoftQ rounds (with `init_lora_weights = loftq`).
    pub loftq_iter: usize,
    /// IA3's feed-forward modules.
    pub feedforward_modules: Option<&'a str>,
    /// Modules trained in full (comma-separated).
    pub modules_to_save: Option<&'a str>,
}

impl AdapterSpec<'_> {
    /// The configuration for a base model at `base` (recorded as `base_model_name_or_path`) and a
    /// PEFT `task_type`; checked.
    pub fn config(&self, base: &std::path::Path, task_type: &str) -> Result<AdapterConfig> {
        let mut cfg = AdapterConfig {
            r: self.r,
            lora_alpha: self.lora_alpha,
            lora_dropout: self.lora_dropout,
            target_modules: Some(ModuleSpec::parse_cli(self.target_modules)),
            use_dora: self.use_dora,
            use_rslora: self.use_rslora,
            init_lora_weights: InitSpec::parse_cli(self.init_lora_weights),
            base_model_name_or_path: Some(base.display().to_string()),
            task_type: Some(task_type.into()),
            ..Default::default()
        };
        if self.init_lora_weights == "loftq" {
            cfg.set_loftq(self.loftq_iter);
        }
        if let Some(m) = self.modules_to_save {
            cfg.modules_to_save = Some(
                m.split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
                    .collect(),
            );
        }
        cfg.with_method(self.peft_type, self.feedforward_modules)
    }
}
