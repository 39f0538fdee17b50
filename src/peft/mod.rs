//! The adapter core: frozen base layers with LoRA-family adapters, PEFT's targeting rules, merging,
//! and PEFT / kohya / diffusers files. Modality-agnostic: it knows module paths and tensors only.
//!
//! A model is built through an [`AdapterPlan`]: each layer asks the plan for an adapted layer at its
//! module path, and gets adapters for every configuration that targets that path.
//!
//! ```
//! use candle_core::{Device, Tensor};
//! use postforge::peft::{AdapterConfig, AdapterPlan, ForwardCtx};
//!
//! # fn main() -> postforge::Result<()> {
//! let mut cfg = AdapterConfig::lora(4, 8.0, &["q_proj"]); // r = 4, lora_alpha = 8
//! cfg.use_dora = true;
//! let plan = AdapterPlan::single(cfg, 0)?;
//! let w = Tensor::randn(0f32, 0.1, (32, 16), &Device::Cpu)?;
//! let mut q = plan.linear("model.layers.0.self_attn.q_proj", w, None)?;
//! let k = plan.linear("model.layers.0.self_attn.k_proj", Tensor::zeros((32, 16), candle_core::DType::F32, &Device::Cpu)?, None)?;
//! assert!(q.lora("default").is_some()); // targeted
//! assert!(k.is_plain()); // not targeted: a plain frozen layer
//!
//! let x = Tensor::randn(0f32, 1.0, (2, 5, 16), &Device::Cpu)?;
//! let y = q.forward(&x, &ForwardCtx::eval())?;
//! q.merge(None)?; // fold the adapter into the base weight
//! let merged = q.forward(&x, &ForwardCtx::eval())?;
//! let diff = (y - merged)?.abs()?.max_all()?.to_scalar::<f32>()?;
//! assert!(diff < 1e-5);
//! # Ok(())
//! # }
//! ```

pub mod adalora;
pub mod adapter;
pub mod args;
pub mod base;
pub mod combine;
pub mod config;
mod config_json;
pub mod ctx;
pub mod formats;
pub mod ia3;
pub mod init;
pub mod layer;
pub mod loha;
pub mod lokr;
pub mod lora;
pub mod merge;

pub mod quant;
pub mod registry;
pub mod vera;

pub use crate::nn::conv::ConvCfg;
pub use adapter::Adapter;
pub use base::{Base, BaseKind, BaseWeight};
pub use config::{AdapterConfig, Init, InitSpec, Method, ModuleKind, ModuleSpec};
pub use ctx::{AttnProbe, Blend, ForwardCtx, GateResize, Layout, Routing};
pub use layer::{AdaptedConv2d, AdaptedEmbedding, AdaptedLayer, AdaptedLinear};
pub use lora::Lora;

use crate::{Error, Result};
use candle_core::{Tensor, Var};

/// Which adapters to create while a model is built: named configurations and a seed.
#[derive(Debug, Clone, Default)]
pub struct AdapterPlan {
    /// (adapter name, configuration), in creation order.
    pub adapters: Vec<(String, AdapterConfig)>,
    /// Seed for adapter initialisation.
    pub seed: u64,
    /// Module paths that are the model's output head (left out by `all-linear`).
    pub output_heads: Vec<String>,
    /// Train every layer in full (pretraining): each layer gets a trainable copy of its weights.
    pub full_training: bool,
    /// Quantize the base weight of every linear layer but the output heads and `modules_to_save`
    /// (QLoRA / QDoRA: `--quantize nf4`). Adapters are added first, so a PiSSA residual is what
    /// gets quantized (QPiSSA).
    pub quantize: Option<quant::QuantSpec>,
}

impl AdapterPlan {
    /// No adapters: every layer is a plain frozen layer (`lm_head` is the output head, which
    /// quantization leaves alone, as transformers does).
    pub fn none() -> Self {
        Self {
            output_heads: vec!["lm_head".into()],
            ..Self::default()
        }
    }
    /// One adapter named `default`.
    pub fn single(cfg: AdapterConfig, seed: u64) -> Result<Self> {
        cfg.validate()?;
        Ok(Self {
            adapters: vec![("default".into(), cfg)],
            seed,
            output_heads: vec!["lm_head".into()],
            full_training: false,
            quantize: None,
        })
    }

    /// The same plan, quantizing base weights per `spec`.
    pub fn quantized(mut self, spec: Option<quant::QuantSpec>) -> Self {
        self.quantize = spec;
        self
    }

    /// Applies the plan to a bare layer: adds every targeting adapter, or makes a trainable copy for
    /// `modules_to_save`.
    pub fn apply(&self, mut layer: AdaptedLayer) -> Result<AdaptedLayer> {
        if self.full_training {
            layer.make_trainable_copy()?;
            return Ok(layer);
        }
        let path = layer.path().to_string();
        let head = self
            .output_heads
            .iter()
            .any(|h| path == *h || path.ends_with(&format!(".{h}")));
        let mut saved = false;
        let mut loftq = false;
        for (name, cfg) in &self.adapters {
            if cfg.saves_module(&path) {
                layer.make_trainable_copy()?;
                saved = true;
            } else if layer.kind() != BaseKind::Norm
                && cfg.targets(&path, layer.kind().module_kind(), head)?
            {
                layer.add_adapter(name, cfg, self.seed)?;
                loftq |= cfg.init_lora_weights.parse()? == Init::Loftq;
            }
        }
        if let (Some(mut spec), BaseKind::Linear, false, false) =
            (self.quantize, layer.kind(), head, saved)
        {
            // LoftQ fitted its factors to a Q quantized without double quantization: keep that Q.
            if loftq {
                spec.double_quant = false;
            }
            if !layer.device().is_cpu() {
                return Err(crate::Error::Config(format!(
                    "{path}: NF4 bases (QLoRA, --quantize nf4) run on the CPU only in this version; train on {:?} without quantization, or use --device cpu",
                    layer.device().location()
                )));
            }
            layer.quantize_nf4(spec)?;
        }
        Ok(layer)
    }
    /// An adapted linear layer at `path`.
    pub fn linear(
        &self,
        path: &str,
        weight: Tensor,
        bias: Option<Tensor>,
    ) -> Result<AdaptedLinear> {
        Ok(AdaptedLinear(
            self.apply(AdaptedLinear::new(path, weight, bias)?.0)?,
        ))
    }
    /// An adapted conv2d layer at `path`.
    pub fn conv2d(
        &self,
        path: &str,
        weight: Tensor,
        bias: Option<Tensor>,
        cfg: ConvCfg,
    ) -> Result<AdaptedConv2d> {
        Ok(AdaptedConv2d(
            self.apply(AdaptedConv2d::new(path, weight, bias, cfg)?.0)?,
        ))
    }
    /// Completes adapters that need every layer first, once a model is built: VeRA's projections
    /// are shared, sized to the largest targeted layer.
    pub fn finish(&self, layers: &mut [&mut AdaptedLayer]) -> Result<()> {
        for (name, cfg) in &self.adapters {
            if cfg.peft_type == "VERA" {
                let key = vera::VeraSettings::from_config(cfg)?.projection_prng_key;
                vera::share_vera_projections(layers, name, self.seed ^ key, None)?;
            }
        }
        Ok(())
    }
    /// An adapted linear layer at `path` over an NF4 base read from a 4-bit checkpoint.
    pub fn linear_nf4(
        &self,
        path: &str,
        weight: quant::Nf4Tensor,
        bias: Option<Tensor>,
    ) -> Result<AdaptedLinear> {
        Ok(AdaptedLinear(
            self.apply(AdaptedLayer::new_nf4(path, weight, bias)?)?,
        ))
    }
    /// A norm weight at `path` (trainable in full when `modules_to_save` names it).
    pub fn norm(&self, path: &str, weight: Tensor) -> Result<AdaptedLayer> {
        self.apply(AdaptedLayer::new(path, BaseKind::Norm, weight, None)?)
    }
    /// An adapted embedding at `path`.
    pub fn embedding(&self, path: &str, weight: Tensor) -> Result<AdaptedEmbedding> {
        Ok(AdaptedEmbedding(
            self.apply(AdaptedEmbedding::new(path, weight)?.0)?,
        ))
    }
}

/// A model whose adaptable layers can be listed. Every model family implements this.
pub trait Adapted {
    /// All adaptable layers, in a stable order.
    fn layers(&self) -> Vec<&AdaptedLayer>;
    /// All adaptable layers, mutably, in the same order.
    fn layers_mut(&mut self) -> Vec<&mut AdaptedLayer>;

    /// Every trainable tensor with its PEFT in-memory name, sorted by name.
    fn trainable(&self) -> Vec<(String, Var)> {
        let mut v: Vec<_> = self
            .layers()
            .into_iter()
            .flat_map(|l| l.named_vars())
            .collect();
        v.sort_by(|a, b| a.0.cmp(&b.0));
        v
    }
    /// Enables or disables every adapter (disabled = the base model; merged adapters are unmerged).
    fn set_adapters_enabled(&mut self, enabled: bool) -> Result<()> {
        self.layers_mut()
            .into_iter()
            .try_for_each(|l| l.set_enabled(enabled))
    }
    /// Sets the active adapters on every layer that has them.
    fn set_active_adapters(&mut self, names: &[&str]) -> Result<()> {
        for l in self.layers_mut() {
            let have: Vec<&str> = names.iter().copied().filter(|n| l.has_adapter(n)).collect();
            l.set_active(&have)?;
        }
        Ok(())
    }
    /// Sets one adapter's output multiplier (gain) everywhere, whatever its method.
    fn set_multiplier(&mut self, name: &str, multiplier: f64) -> Result<()> {
        let mut found = false;
        for l in self.layers_mut() {
            if l.has_adapter(name) {
                l.set_gain(name, multiplier)?;
                found = true;
            }
        }
        if !found {
            return Err(Error::Msg(format!("no adapter named `{name}`")));
        }
        Ok(())
    }
    /// Merges active adapters into every layer.
    fn merge_adapters(&mut self) -> Result<()> {
        self.layers_mut()
            .into_iter()
            .try_for_each(|l| l.merge(None))
    }
    /// Unmerges every layer.
    fn unmerge_adapters(&mut self) -> Result<()> {
        self.layers_mut().into_iter().try_for_each(|l| l.unmerge())
    }
}
