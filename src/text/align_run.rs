//! A whole preference-training run (the `align` stage of a pipeline file and `postforge align`):
//! TRL's keys for the losses and training, PEFT's for the adapter, and how an earlier stage's
//! adapter enters: merged into the base, stacked (frozen) under the new adapter, or as the starting
//! point of the policy with a frozen copy as the reference (`ref_adapter`).

use super::align_task::{kto_examples, reference_cache_path, AlignData, AlignTask, Objective};
use super::check_adapter;
use crate::align::cpo::{CpoConfig, CpoLossType};
use crate::align::dpo::{DpoConfig, DpoLossType, FDivergence};
use crate::align::kto::{weight_advice, KtoConfig, KtoLossType};
use crate::align::orpo::OrpoConfig;
use crate::check::{self, all_in, count_at_least, f64_in, opt_count_at_least, Ranged};
use crate::data::pref::{read_pairs, read_unpaired, tokenize_pc, Seq};
use crate::data::text::TextTokenizer;
use crate::models::llama::LlamaForCausalLM;
use crate::peft::args::AdapterArgs;
use crate::peft::{Adapted, AdapterConfig, AdapterPlan};
use crate::train::{ScheduleKind, TrainConfig, TrainSummary, Trainer};
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

/// How the previous stage's adapter enters this stage.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Previous {
    /// Merged into the base weights (the reference is the merged model).
    Merge,
    /// Kept frozen and active under the new adapter (the reference is base + previous adapter).
    Stack,
}

fn d_loss() -> String {
    "dpo".into()
}
fn d_beta() -> f64 {
    0.1
}
fn d_quant() -> String {
    "none".into()
}
fn d_maxlen() -> usize {
    1024
}
fn d_lr() -> f64 {
    1e-6
}
fn d_sched() -> ScheduleKind {
    ScheduleKind::Linear
}
fn d_epochs() -> usize {
    3
}
fn d_bs() -> usize {
    8
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
fn d_gamma() -> f64 {
    0.5
}
fn d_cpo_alpha() -> f64 {
    1.0
}
fn d_w() -> f64 {
    1.0
}

/// Settings of a preference-training run.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AlignRunConfig {
    /// Where this stage runs: `cpu`, `cuda`, `cuda:N`, `metal` or `auto` (unset: the pipeline's
    /// `device`, else the `--device` flag, else the CPU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<crate::util::device::DeviceSpec>,
    /// The dtype this stage loads base weights in: `f32`, `bf16` or `f16` (unset: the pipeline's
    /// `dtype`, else the `--dtype` flag, else f32). Adapters stay f32.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<crate::util::device::DTypeSpec>,
    /// Model folder.
    pub model: PathBuf,
    /// Preference JSONL (paired; unpaired or paired for KTO).
    pub data: PathBuf,
    /// Held-out preference pairs: the report gives the share whose chosen completion has the
    /// higher mean log-prob, before (the stage's starting model) and after training.
    #[serde(default)]
    pub eval_data: Option<PathBuf>,
    /// `dpo`, `ipo`, `simpo`, `cpo`, `orpo` or `kto`.
    #[serde(default = "d_loss")]
    pub loss: String,
    /// DPO loss types (e.g. ["sigmoid"], ["hinge"]); CPO: one of sigmoid, hinge, ipo, simpo.
    #[serde(default)]
    pub loss_type: Vec<String>,
    /// Weights of several DPO loss types.
    #[serde(default)]
    pub loss_weights: Option<Vec<f64>>,
    /// β (ORPO's λ).
    #[serde(default = "d_beta")]
    pub beta: f64,
    /// ε.
    #[serde(default)]
    pub label_smoothing: f64,
    /// DPO f-divergence.
    #[serde(default)]
    pub f_divergence_type: FDivergence,
    /// SimPO γ.
    #[serde(default = "d_gamma")]
    pub simpo_gamma: f64,
    /// CPO NLL weight (SimPO: 0).
    #[serde(default = "d_cpo_alpha")]
    pub cpo_alpha: f64,
    /// KTO desirable weight.
    #[serde(default = "d_w")]
    pub desirable_weight: f64,
    /// KTO undesirable weight.
    #[serde(default = "d_w")]
    pub undesirable_weight: f64,
    /// Compute reference log-probs once, cached on disk.
    #[serde(default)]
    pub precompute_ref_logps: bool,
    /// Where reference caches go (default: `<output_dir>/../.ref-cache`).
    #[serde(default)]
    pub ref_cache_dir: Option<PathBuf>,
    /// Start the policy from this adapter (a frozen copy is the reference).
    #[serde(default)]
    pub ref_adapter: Option<PathBuf>,
    /// Previous stage's adapter and how it enters (set by pipelines).
    #[serde(default)]
    pub previous_adapter: Option<PathBuf>,
    /// `merge` or `stack`.
    #[serde(default)]
    pub previous: Option<Previous>,
    /// The adapter: PEFT's keys (`peft_type`, `r`, `lora_alpha`, `target_modules`, ...), shared
    /// with every training command and stage.
    #[serde(flatten)]
    pub adapter: AdapterArgs,
    /// Quantize the base's linear layers: `nf4` (QLoRA / QDoRA alignment), `nf4-no-dq`, `none`.
    #[serde(default = "d_quant")]
    pub quantize: String,
    /// Built-in chat template for models without one.
    #[serde(default)]
    pub chat_template: Option<String>,
    /// Longest prompt + completion.
    #[serde(default = "d_maxlen")]
    pub max_length: usize,
    /// Peak learning rate (TRL's default 1e-6).
    #[serde(default = "d_lr")]
    pub learning_rate: f64,
    /// Schedule.
    #[serde(default = "d_sched")]
    pub lr_scheduler_type: ScheduleKind,
    /// Warmup steps.
    #[serde(default)]
    pub warmup_steps: usize,
    /// Optimizer steps (default: epochs × batches).
    #[serde(default)]
    pub max_steps: Option<usize>,
    /// Epochs when `max_steps` is not set.
    #[serde(default = "d_epochs")]
    pub num_train_epochs: usize,
    /// Pairs (or unpaired examples) per micro-batch.
    #[serde(default = "d_bs")]
    pub per_device_train_batch_size: usize,
    /// Micro-batches per step.
    #[serde(default = "d_one")]
    pub gradient_accumulation_steps: usize,
    /// Clipping (0 = off).
    #[serde(default = "d_clip")]
    pub max_grad_norm: f64,
    /// Checkpoint every N steps.
    #[serde(default)]
    pub save_steps: usize,
    /// Seed.
    #[serde(default = "d_seed")]
    pub seed: u64,
    /// Run folder.
    pub output_dir: PathBuf,
}

/// What a run produced.
#[derive(Debug, Clone)]
pub struct AlignReport {
    /// Trainer summary.
    pub summary: TrainSummary,
    /// Examples.
    pub examples: usize,
    /// The objective's name.
    pub method: String,
    /// A warning about KTO weights, if any.
    pub warning: Option<String>,
    /// Held-out preference accuracy (before, after), with `eval_data`.
    pub eval_accuracy: Option<(f64, f64)>,
}

impl Ranged for AlignRunConfig {
    /// Every numeric key in its range, and the objective's own rules (loss names, DPO's
    /// `loss_weights` count and ε rules) that used to be found at the first training step, after
    /// the model load and the reference pass.
    fn check(&self) -> Result<()> {
        check_adapter(&self.adapter)?;
        let obj = self.objective()?;
        // ORPO's λ may be 0 (plain SFT); every other β divides or scales a log-ratio.
        let beta = match obj {
            Objective::Orpo(_) => check::NON_NEGATIVE,
            _ => check::POSITIVE,
        };
        f64_in("beta", self.beta, beta)?;
        f64_in(
            "label_smoothing",
            self.label_smoothing,
            check::LABEL_SMOOTHING,
        )?;
        if let Some(w) = &self.loss_weights {
            all_in("loss_weights", w, check::NON_NEGATIVE)?;
        }
        f64_in("simpo_gamma", self.simpo_gamma, check::NON_NEGATIVE)?;
        f64_in("cpo_alpha", self.cpo_alpha, check::NON_NEGATIVE)?;
        f64_in("desirable_weight", self.desirable_weight, check::POSITIVE)?;
        f64_in(
            "undesirable_weight",
            self.undesirable_weight,
            check::POSITIVE,
        )?;
        if let Objective::Dpo(d) = &obj {
            d.validate()?;
        }
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
        crate::peft::quant::QuantSpec::parse(&self.quantize)?;
        Ok(())
    }
}

impl AlignRunConfig {
    /// The objective from `loss` and its keys.
    pub fn objective(&self) -> Result<Objective> {
        let parse_dpo = |s: &str| -> Result<DpoLossType> {
            serde_json::from_value(serde_json::Value::String(s.into()))
                .map_err(|_| Error::Config(format!("DPO loss_type `{s}` is not known")))
        };
        Ok(match self.loss.as_str() {
            "dpo" | "ipo" => {
                let mut types = self
                    .loss_type
                    .iter()
                    .map(|s| parse_dpo(s))
                    .collect::<Result<Vec<_>>>()?;
                if types.is_empty() {
                    types.push(if self.loss == "ipo" {
                        DpoLossType::Ipo
                    } else {
                        DpoLossType::Sigmoid
                    });
                }
                Objective::Dpo(DpoConfig {
                    beta: self.beta,
                    loss_type: types,
                    loss_weights: self.loss_weights.clone(),
                    label_smoothing: self.label_smoothing,
                    f_divergence_type: self.f_divergence_type,
                    ..Default::default()
                })
            }
            "cpo" | "simpo" => {
                let lt = match (
                    self.loss.as_str(),
                    self.loss_type.first().map(|s| s.as_str()),
                ) {
                    ("simpo", _) | (_, Some("simpo")) => CpoLossType::Simpo,
                    (_, None) | (_, Some("sigmoid")) => CpoLossType::Sigmoid,
                    (_, Some("hinge")) => CpoLossType::Hinge,
                    (_, Some("ipo")) => CpoLossType::Ipo,
                    (_, Some(o)) => {
                        return Err(Error::Config(format!("CPO loss_type `{o}` is not known")))
                    }
                };
                Objective::Cpo(CpoConfig {
                    beta: self.beta,
                    loss_type: lt,
                    label_smoothing: self.label_smoothing,
                    simpo_gamma: self.simpo_gamma,
                    cpo_alpha: if self.loss == "simpo" {
                        0.0
                    } else {
                        self.cpo_alpha
                    },
                    alpha: 0.0,
                })
            }
            "orpo" => Objective::Orpo(OrpoConfig { beta: self.beta }),
            "kto" => Objective::Kto(KtoConfig {
                beta: self.beta,
                loss_type: match self.loss_type.first().map(|s| s.as_str()) {
                    None | Some("kto") => KtoLossType::Kto,
                    Some("apo_zero_unpaired") => KtoLossType::ApoZeroUnpaired,
                    Some(o) => {
                        return Err(Error::Config(format!("KTO loss_type `{o}` is not known")))
                    }
                },
                desirable_weight: self.desirable_weight,
                undesirable_weight: self.undesirable_weight,
            }),
            o => {
                return Err(Error::Config(format!(
                    "loss `{o}` is not one of dpo, ipo, simpo, cpo, orpo, kto"
                )))
            }
        })
    }

    /// The new adapter's configuration.
    pub fn adapter(&self) -> Result<AdapterConfig> {
        self.adapter.config(&self.model, Some("CAUSAL_LM"))
    }

    /// The tokenizer.
    pub fn tokenizer(&self) -> Result<TextTokenizer> {
        let mut tok = TextTokenizer::load(&self.model)?;
        if let Some(name) = &self.chat_template {
            tok.use_builtin_template(name)?;
        }
        Ok(tok)
    }

    /// Tokenized data for the objective.
    pub fn data(
        &self,
        tok: &TextTokenizer,
        obj: &Objective,
    ) -> Result<(AlignData, Option<String>)> {
        let ml = self.max_length;
        if let Objective::Kto(cfg) = obj {
            let ex = read_unpaired(&self.data)?;
            let mut seqs = vec![];
            let (mut prompts, mut comps) = (vec![], vec![]);
            for (i, e) in ex.iter().enumerate() {
                let s = tokenize_pc(&e.prompt, &e.completion, tok, ml).map_err(|err| {
                    Error::format(&self.data, format!("example {}: {err}", i + 1))
                })?;
                let n = s
                    .completion
                    .iter()
                    .position(|c| *c == 1)
                    .unwrap_or(s.ids.len());
                prompts.push(s.ids[..n].to_vec());
                comps.push(s.ids[n..].to_vec());
                seqs.push((s, e.label));
            }
            let d = seqs.iter().filter(|s| s.1).count();
            let warning = weight_advice(cfg, d, seqs.len() - d);
            return Ok((
                AlignData::Unpaired(kto_examples(seqs, &prompts, &comps, ml)),
                warning,
            ));
        }
        let pairs = read_pairs(&self.data)?
            .iter()
            .enumerate()
            .map(|(i, p)| -> Result<(Seq, Seq)> {
                let f = |err: Error| Error::format(&self.data, format!("example {}: {err}", i + 1));
                Ok((
                    tokenize_pc(&p.prompt, &p.chosen, tok, ml).map_err(f)?,
                    tokenize_pc(&p.prompt, &p.rejected, tok, ml).map_err(|e| {
                        Error::format(&self.data, format!("example {}: {e}", i + 1))
                    })?,
                ))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok((AlignData::Pairs(pairs), None))
    }

    /// Loads the model with its adapters: `default` (trainable) and, as configured, the frozen
    /// `prev` (stacked) or `ref` (reference copy of the starting adapter). Returns (model, adapter
    /// config, policy adapters, reference adapters).
    pub fn load_model(
        &self,
    ) -> Result<(
        LlamaForCausalLM,
        AdapterConfig,
        Vec<String>,
        Option<Vec<String>>,
    )> {
        let mut m = LlamaForCausalLM::load(
            &self.model,
            AdapterPlan::none().quantized(crate::peft::quant::QuantSpec::parse(&self.quantize)?),
        )?;
        let seed = self.seed;
        let mut policy = vec![];
        let mut reference = None;
        if let (Some(prev), Some(Previous::Stack)) = (&self.previous_adapter, self.previous) {
            crate::peft::formats::peft::load(prev, &mut m.layers_mut(), "prev")?;
            policy.push("prev".to_string());
            reference = Some(vec!["prev".to_string()]);
        }
        let cfg = if let Some(start) = &self.ref_adapter {
            let cfg = crate::peft::formats::peft::load(start, &mut m.layers_mut(), "default")?;
            crate::peft::formats::peft::load(start, &mut m.layers_mut(), "ref")?;
            reference = Some(vec!["ref".to_string()]);
            cfg
        } else {
            let cfg = self.adapter()?;
            add_adapter(&mut m, "default", &cfg, seed)?;
            cfg
        };
        policy.push("default".to_string());
        Ok((m, cfg, policy, reference))
    }

    /// Runs the training.
    pub fn run(&self, resume: bool, overwrite: bool) -> Result<AlignReport> {
        self.check()?;
        let _lock = crate::util::outdir::DirLock::acquire(&self.output_dir)?;
        let obj = self.objective()?;
        // The adapter settings are checked before anything is read.
        self.adapter()?;
        let tok = self.tokenizer()?;
        let (data, warning) = self.data(&tok, &obj)?;
        if let Some(w) = &warning {
            eprintln!("warning: {w}");
        }
        let n = match &data {
            AlignData::Pairs(p) => p.len(),
            AlignData::Unpaired(u) => u.len(),
        };
        let (model, adapter, policy, reference) = self.load_model()?;
        let bs = self.per_device_train_batch_size;
        let steps = self.max_steps.unwrap_or(
            self.num_train_epochs * n.div_ceil(bs.max(1)) / self.gradient_accumulation_steps.max(1),
        );
        let mut task =
            AlignTask::new(model, adapter, obj.clone(), data, bs, tok.pad_id, self.seed)?
                .with_adapters(policy, reference);
        if self.precompute_ref_logps && obj.needs_reference() {
            let dir = self.ref_cache_dir.clone().unwrap_or_else(|| {
                self.output_dir
                    .parent()
                    .unwrap_or(Path::new("."))
                    .join(".ref-cache")
            });
            let mut inputs: Vec<&Path> = vec![&self.data, &self.model];
            if let Some(p) = &self.previous_adapter {
                inputs.push(p);
            }
            if let Some(p) = &self.ref_adapter {
                inputs.push(p);
            }
            // The reference runs on the same (possibly 4-bit) base, so quantization is part of
            // what the cached log-probs depend on.
            let settings = format!(
                "{:?}|{}|{:?}|{:?}|{}",
                self.previous,
                self.max_length,
                self.chat_template,
                obj.name(),
                self.quantize
            );
            let cache = reference_cache_path(&dir, &inputs, &settings)?;
            task.precompute_reference(Some(&cache))?;
        }
        let trainer = Trainer::new(TrainConfig {
            learning_rate: self.learning_rate,
            lr_scheduler: self.lr_scheduler_type,
            warmup_steps: self.warmup_steps,
            max_steps: steps,
            gradient_accumulation_steps: self.gradient_accumulation_steps,
            max_grad_norm: crate::check::grad_clip("max_grad_norm", self.max_grad_norm)?,
            save_steps: self.save_steps,
            seed: self.seed,
            output_dir: self.output_dir.clone(),
            overwrite_output_dir: overwrite,
            ..Default::default()
        })?;
        let held_out = match &self.eval_data {
            Some(p) => {
                let ml = self.max_length;
                let pairs = read_pairs(p)?
                    .iter()
                    .map(|e| -> Result<(Seq, Seq)> {
                        Ok((
                            tokenize_pc(&e.prompt, &e.chosen, &tok, ml)?,
                            tokenize_pc(&e.prompt, &e.rejected, &tok, ml)?,
                        ))
                    })
                    .collect::<Result<Vec<_>>>()?;
                if pairs.is_empty() {
                    return Err(Error::format(p, "no preference pairs"));
                }
                Some(pairs)
            }
            None => None,
        };
        let before = match &held_out {
            Some(p) => Some(task.mean_logp_accuracy(p, true)?),
            None => None,
        };
        let summary = trainer.train(&mut task, resume)?;
        let eval_accuracy = match (&held_out, before) {
            (Some(p), Some(b)) => Some((b, task.mean_logp_accuracy(p, false)?)),
            _ => None,
        };
        let report = serde_json::json!({"method": obj.name(), "loss": self.loss, "steps": summary.steps,
            "seconds": summary.seconds, "first_loss": summary.first_loss, "last_loss": summary.last_loss,
            "examples": n, "eval_preference_accuracy": eval_accuracy.map(|(b, a)| serde_json::json!({"before": b, "after": a}))});
        crate::util::write_atomic(
            &self.output_dir.join("run_report.json"),
            serde_json::to_string_pretty(&report)
                .map_err(|e| Error::Msg(e.to_string()))?
                .as_bytes(),
        )?;
        Ok(AlignReport {
            summary,
            examples: n,
            method: self.loss.clone(),
            warning,
            eval_accuracy,
        })
    }
}

/// Adds a fresh adapter `name` to every layer the configuration targets (PEFT's rules; the output
/// head is left out by `all-linear`).
pub fn add_adapter(
    m: &mut LlamaForCausalLM,
    name: &str,
    cfg: &AdapterConfig,
    seed: u64,
) -> Result<usize> {
    let mut n = 0;
    for l in m.layers_mut() {
        let head = l.path() == "lm_head";
        if l.kind() != crate::peft::BaseKind::Norm
            && cfg.targets(l.path(), l.kind().module_kind(), head)?
        {
            l.add_adapter(name, cfg, seed)?;
            n += 1;
        }
    }
    if n == 0 {
        return Err(Error::Config(
            "no module matched the adapter's target_modules".into(),
        ));
    }
    if cfg.peft_type == "VERA" {
        crate::peft::vera::share_vera_projections(&mut m.layers_mut(), name, seed, None)?;
    }
    Ok(n)
}

/// Writes a merged copy of `model` + `adapter` as a model folder at `out` (tokenizer files copied):
/// `postforge merge` and pipeline stages that continue from a merged adapter. Returns the number of
/// merged modules.
pub fn merge_into_folder(model: &Path, adapter: &Path, out: &Path) -> Result<usize> {
    merge_into_folder_as(model, adapter, out, None).map(|r| r.modules)
}

/// What a merge did.
#[derive(Debug, Clone, Default)]
pub struct MergeReport {
    /// Modules carrying the adapter.
    pub modules: usize,
    /// Layers written in 4 bits.
    pub quantized: usize,
    /// The largest relative rounding error ‖Q − W‖/‖W‖ of a re-quantized layer.
    pub max_rounding: Option<f64>,
}

/// Merges `adapter` into `model` and writes a Hugging Face folder at `out`: dense, or with
/// `quantize` (or a 4-bit base) in 4 bits. A 4-bit base is dequantized, merged and re-quantized
/// (PEFT's bitsandbytes merge); a dense base asked to be written in 4 bits is merged first, then
/// quantized. The rounding error is reported.
pub fn merge_into_folder_as(
    model: &Path,
    adapter: &Path,
    out: &Path,
    quantize: Option<crate::peft::quant::QuantSpec>,
) -> Result<MergeReport> {
    let mut m = LlamaForCausalLM::load(model, AdapterPlan::none())?;
    crate::peft::formats::peft::load(adapter, &mut m.layers_mut(), "default")?;
    let modules = m
        .layers()
        .iter()
        .filter(|l| l.has_adapter("default"))
        .count();
    let four_bit = m.layers().iter().any(|l| l.base_weight().nf4().is_some());
    m.merge_adapters()?;
    if let Some(spec) = quantize {
        for l in m.layers_mut() {
            if l.kind() == crate::peft::BaseKind::Linear
                && l.path() != "lm_head"
                && l.base_weight().nf4().is_none()
            {
                l.quantize_nf4(spec)?;
            }
        }
    }
    let mut report = MergeReport {
        modules,
        ..Default::default()
    };
    for l in m.layers() {
        if l.base_weight().nf4().is_some() {
            report.quantized += 1;
            if let Some(e) = l.rounding_error() {
                report.max_rounding = Some(report.max_rounding.unwrap_or(0f64).max(e.rel_fro));
            }
        }
    }
    if quantize.is_some() || four_bit {
        m.save_pretrained_nf4(out)?;
    } else {
        m.save_pretrained(out)?;
    }
    for f in [
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
        "special_tokens_map.json",
        "chat_template.jinja",
    ] {
        let src = model.join(f);
        if src.exists() {
            let bytes = std::fs::read(&src).map_err(|e| Error::io(&src, e))?;
            crate::util::write_atomic(&out.join(f), &bytes)?;
        }
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `align` and `sft` build their adapter through the same `AdapterArgs`: LoftQ and
    /// `modules_to_save` reach the configuration (they used to be dropped by `align`).
    #[test]
    fn align_takes_every_adapter_setting_sft_takes() {
        let cfg: AlignRunConfig = serde_json::from_value(serde_json::json!({
            "model": "m", "data": "d.jsonl", "loss": "dpo", "output_dir": "runs/x",
            "init_lora_weights": "loftq", "loftq_iter": 3, "modules_to_save": "embed_tokens, lm_head"
        }))
        .unwrap();
        let a = cfg.adapter().unwrap();
        assert_eq!(a.loftq_iter().unwrap(), 3);
        assert_eq!(
            a.modules_to_save,
            Some(vec!["embed_tokens".to_string(), "lm_head".to_string()])
        );
    }

    /// Each numeric key refuses NaN and a value out of its range, naming the key and the range;
    /// the objective's own rules (DPO's weights count, ε for exo_pair) are checked with them.
    #[test]
    fn every_numeric_key_is_checked_by_name() {
        let base: AlignRunConfig = serde_json::from_value(serde_json::json!({
            "model": "m", "data": "d.jsonl", "output_dir": "o"
        }))
        .unwrap();
        base.check().unwrap();
        type Set = fn(&mut AlignRunConfig);
        let cases: &[(&str, Set)] = &[
            ("beta = NaN", |c| c.beta = f64::NAN),
            ("beta = inf", |c| c.beta = f64::INFINITY),
            (
                "beta = 0 is out of range: it must be a finite number > 0",
                |c| c.beta = 0.0,
            ),
            (
                "beta = -0.1 is out of range: it must be a finite number ≥ 0",
                |c| {
                    c.loss = "orpo".into();
                    c.beta = -0.1
                },
            ),
            ("label_smoothing = NaN", |c| c.label_smoothing = f64::NAN),
            (
                "label_smoothing = 2 is out of range: it must be a number in [0, 0.5)",
                |c| c.label_smoothing = 2.0,
            ),
            ("label_smoothing = 0.5", |c| {
                c.loss = "simpo".into();
                c.label_smoothing = 0.5
            }),
            ("exo_pair needs label_smoothing > 0", |c| {
                c.loss_type = vec!["exo_pair".into()]
            }),
            ("loss_weights[1] = NaN", |c| {
                c.loss_type = vec!["sigmoid".into(), "sft".into()];
                c.loss_weights = Some(vec![1.0, f64::NAN])
            }),
            ("loss_weights[0] = -1", |c| {
                c.loss_type = vec!["sigmoid".into(), "sft".into()];
                c.loss_weights = Some(vec![-1.0, 1.0])
            }),
            ("1 loss_weights for 2 loss types", |c| {
                c.loss_type = vec!["sigmoid".into(), "sft".into()];
                c.loss_weights = Some(vec![1.0])
            }),
            ("simpo_gamma = NaN", |c| c.simpo_gamma = f64::NAN),
            ("simpo_gamma = -0.5", |c| c.simpo_gamma = -0.5),
            ("cpo_alpha = NaN", |c| c.cpo_alpha = f64::NAN),
            ("cpo_alpha = -1", |c| c.cpo_alpha = -1.0),
            ("desirable_weight = NaN", |c| c.desirable_weight = f64::NAN),
            ("desirable_weight = 0", |c| c.desirable_weight = 0.0),
            ("undesirable_weight = NaN", |c| {
                c.undesirable_weight = f64::NAN
            }),
            ("undesirable_weight = -1", |c| c.undesirable_weight = -1.0),
            ("lora_alpha = NaN", |c| c.adapter.lora_alpha = f64::NAN),
            ("lora_dropout = NaN", |c| c.adapter.lora_dropout = f64::NAN),
            ("r = 0", |c| c.adapter.r = 0),
            ("max_length = 1", |c| c.max_length = 1),
            ("learning_rate = NaN", |c| c.learning_rate = f64::NAN),
            ("learning_rate = -1", |c| c.learning_rate = -1.0),
            ("max_steps = 0", |c| c.max_steps = Some(0)),
            ("num_train_epochs = 0", |c| c.num_train_epochs = 0),
            ("per_device_train_batch_size = 0", |c| {
                c.per_device_train_batch_size = 0
            }),
            ("gradient_accumulation_steps = 0", |c| {
                c.gradient_accumulation_steps = 0
            }),
            ("max_grad_norm = NaN", |c| c.max_grad_norm = f64::NAN),
            ("max_grad_norm = -1", |c| c.max_grad_norm = -1.0),
            ("loss `dpoo`", |c| c.loss = "dpoo".into()),
        ];
        for (needle, set) in cases {
            let mut c = base.clone();
            set(&mut c);
            let e = c.check().unwrap_err().to_string();
            assert!(e.contains(needle), "{needle}: {e}");
        }
        let mut c = base.clone();
        c.loss = "orpo".into();
        c.beta = 0.0;
        c.max_grad_norm = 0.0;
        c.check().unwrap();
    }
}
