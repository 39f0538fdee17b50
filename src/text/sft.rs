//! Supervised fine-tuning of a causal LM with adapters: batches of tokenized rows (padded or
//! packed), the mean next-token loss over learned tokens, a replay buffer that mixes general data
//! into the batches, and a forgetting monitor that tracks held-out loss and the perplexity of a
//! general reference set, warning (or stopping) when the reference perplexity rises too far.

use crate::check::Ranged;
use crate::data::sft::{collate, Row};
use crate::models::llama::{Inputs, LlamaForCausalLM};
use crate::peft::args::AdapterArgs;
use crate::peft::formats::peft::{save, SaveOptions};
use crate::peft::{Adapted, AdapterConfig, ForwardCtx};
use crate::rng::rng_for;
use crate::train::Task;
use crate::{Error, Result};
use candle_core::{Tensor, Var};
use rand::seq::SliceRandom;
use rand::Rng;
use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

/// Forgetting-monitor settings.
#[derive(Debug, Clone)]
pub struct MonitorConfig {
    /// Evaluate every N optimizer steps (and before training).
    pub eval_steps: usize,
    /// Warn when reference perplexity rises by more than this fraction of its starting value.
    pub max_forgetting: Option<f64>,
    /// Stop training (with an error, after the last checkpoint) instead of only warning.
    pub stop_on_forgetting: bool,
}

/// One evaluation.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct EvalPoint {
    /// Optimizer step.
    pub step: usize,
    /// Mean next-token loss on the held-out task rows.
    pub eval_loss: f64,
    /// Perplexity on the reference rows.
    pub reference_ppl: f64,
    /// reference_ppl / starting reference_ppl − 1.
    pub forgetting: f64,
}

/// An `eval.jsonl` line read back.
struct EvalPointRead {
    step: usize,
    reference_ppl: f64,
    line: String,
}

impl<'de> serde::Deserialize<'de> for EvalPointRead {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        Ok(Self {
            step: v["step"].as_u64().unwrap_or(0) as usize,
            reference_ppl: v["reference_ppl"].as_f64().unwrap_or(f64::NAN),
            line: v.to_string(),
        })
    }
}

/// The SFT task.
pub struct SftTask {
    /// The model (adapter `default`).
    pub model: LlamaForCausalLM,
    /// The adapter configuration (written with the adapter).
    pub adapter: AdapterConfig,
    rows: Vec<Row>,
    replay: Vec<Row>,
    replay_ratio: f64,
    batch_size: usize,
    pad_id: u32,
    seed: u64,
    epoch: Option<(u64, Vec<usize>)>,
    held_out: Vec<Row>,
    reference: Vec<Row>,
    monitor: Option<MonitorConfig>,
    base_ppl: Option<f64>,
    /// Evaluations so far.
    pub history: Vec<EvalPoint>,
    /// Save the whole merged model folder with these extra files (full training) instead of a
    /// PEFT adapter.
    full_model_files: Option<Vec<(String, Vec<u8>)>>,
    /// AdaLoRA's rank allocator (adapter `default` of type ADALORA).
    adalora: Option<crate::peft::adalora::RankAllocator>,
}

impl SftTask {
    /// A task over `rows` (batches of `batch_size`).
    pub fn new(
        model: LlamaForCausalLM,
        adapter: AdapterConfig,
        rows: Vec<Row>,
        batch_size: usize,
        pad_id: u32,
        seed: u64,
    ) -> Result<Self> {
        if rows.is_empty() {
            return Err(Error::Msg("the training set is empty".into()));
        }
        if batch_size == 0 {
            return Err(Error::Config("batch size must be positive".into()));
        }
        let adalora = if adapter.peft_type == "ADALORA" {
            Some(crate::peft::adalora::RankAllocator::new(
                &model.layers(),
                "default",
                crate::peft::adalora::AdaloraSettings::from_config(&adapter)?,
            )?)
        } else {
            None
        };
        Ok(Self {
            adalora,
            model,
            adapter,
            rows,
            replay: vec![],
            replay_ratio: 0.0,
            batch_size,
            pad_id,
            seed,
            epoch: None,
            held_out: vec![],
            reference: vec![],
            monitor: None,
            base_ppl: None,
            history: vec![],
            full_model_files: None,
        })
    }

    /// Saves the whole model as a Hugging Face folder (with `files`, e.g. the tokenizer) instead of
    /// an adapter: for full training.
    pub fn save_full_model(mut self, files: Vec<(String, Vec<u8>)>) -> Self {
        self.full_model_files = Some(files);
        self
    }

    /// Mixes `rows` of general data into batches: each batch slot is a replay row with
    /// probability `ratio`.
    pub fn with_replay(mut self, rows: Vec<Row>, ratio: f64) -> Result<Self> {
        if !(0.0..=1.0).contains(&ratio) || (ratio > 0.0 && rows.is_empty()) {
            return Err(Error::Config(format!(
                "replay ratio {ratio} must be in [0, 1] with a non-empty replay set"
            )));
        }
        self.replay = rows;
        self.replay_ratio = ratio;
        Ok(self)
    }

    /// Evaluates held-out task rows and reference rows as configured.
    pub fn with_monitor(
        mut self,
        held_out: Vec<Row>,
        reference: Vec<Row>,
        cfg: MonitorConfig,
    ) -> Self {
        self.held_out = held_out;
        self.reference = reference;
        self.monitor = Some(cfg);
        self
    }

    /// Batches per epoch.
    pub fn batches_per_epoch(&self) -> usize {
        self.rows.len().div_ceil(self.batch_size)
    }

    /// Mean next-token loss over `rows` (token-weighted), without gradients.
    pub fn mean_loss(&self, rows: &[Row]) -> Result<f64> {
        let (mut sum, mut n) = (0f64, 0usize);
        for chunk in rows.chunks(self.batch_size.max(1)) {
            let refs: Vec<&Row> = chunk.iter().collect();
            let b = collate(&refs, self.pad_id)?;
            if b.num_tokens == 0 {
                continue;
            }
            let l = self.batch_loss(&b, &ForwardCtx::eval())?;
            sum += l.to_scalar::<f32>()? as f64 * b.num_tokens as f64;
            n += b.num_tokens;
        }
        if n == 0 {
            return Err(Error::Msg("no learned tokens to evaluate".into()));
        }
        Ok(sum / n as f64)
    }

    fn batch_loss(&self, b: &crate::data::sft::Batch, ctx: &ForwardCtx) -> Result<Tensor> {
        self.model.next_token_loss(
            &b.ids,
            &Inputs {
                attention_mask: Some(&b.attention_mask),
                position_ids: Some(&b.positions),
                segment_ids: Some(&b.segments),
            },
            &b.weights,
            ctx,
        )
    }

    fn evaluate(&mut self, step: usize, out: &Path) -> Result<()> {
        let Some(m) = self.monitor.clone() else {
            return Ok(());
        };
        let eval_loss = if self.held_out.is_empty() {
            f64::NAN
        } else {
            self.mean_loss(&self.held_out)?
        };
        let reference_ppl = if self.reference.is_empty() {
            f64::NAN
        } else {
            self.mean_loss(&self.reference)?.exp()
        };
        let base = *self.base_ppl.get_or_insert(reference_ppl);
        let p = EvalPoint {
            step,
            eval_loss,
            reference_ppl,
            forgetting: reference_ppl / base - 1.0,
        };
        self.history.push(p);
        let path = out.join("eval.jsonl");
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .map_err(|e| Error::io(&path, e))?;
        writeln!(
            f,
            "{}",
            serde_json::to_string(&p).map_err(|e| Error::Msg(e.to_string()))?
        )
        .map_err(|e| Error::io(&path, e))?;
        if let Some(max) = m.max_forgetting {
            if p.forgetting > max {
                let msg = format!(
                    "forgetting: reference perplexity rose {:.1}% (from {base:.3} to {reference_ppl:.3}) at step {step}, more than --max-forgetting {:.1}%",
                    100.0 * p.forgetting,
                    100.0 * max
                );
                if m.stop_on_forgetting {
                    return Err(Error::Msg(msg));
                }
                eprintln!("warning: {msg}");
            }
        }
        Ok(())
    }
}

impl Task for SftTask {
    fn trainable(&self) -> Vec<(String, Var)> {
        self.model.trainable()
    }

    fn loss(&mut self, cursor: u64, ctx: &ForwardCtx) -> Result<Tensor> {
        let bpe = self.batches_per_epoch() as u64;
        let (epoch, idx) = (cursor / bpe, (cursor % bpe) as usize);
        if self.epoch.as_ref().map(|e| e.0) != Some(epoch) {
            let mut order: Vec<usize> = (0..self.rows.len()).collect();
            order.shuffle(&mut rng_for(self.seed, &format!("sft-epoch-{epoch}")));
            self.epoch = Some((epoch, order));
        }
        let order = &self
            .epoch
            .as_ref()
            .ok_or_else(|| Error::Msg("no epoch order".into()))?
            .1;
        let mut rng = rng_for(self.seed, &format!("sft-batch-{cursor}"));
        let mut rows: Vec<&Row> = vec![];
        for &i in order
            .iter()
            .skip(idx * self.batch_size)
            .take(self.batch_size)
        {
            if self.replay_ratio > 0.0 && rng.random::<f64>() < self.replay_ratio {
                let j = rng.random_range(0..self.replay.len());
                rows.push(&self.replay[j]);
            } else {
                rows.push(&self.rows[i]);
            }
        }
        let b = collate(&rows, self.pad_id)?;
        if b.num_tokens == 0 {
            return Err(Error::Msg(format!(
                "micro-batch {cursor} has no learned tokens (every completion was truncated away?)"
            )));
        }
        let loss = self.batch_loss(&b, ctx)?;
        match &self.adalora {
            Some(a) => {
                match crate::peft::adalora::orth_regularizer(&self.model.layers(), "default")? {
                    Some(reg) => Ok((loss + (reg * a.settings.orth_reg_weight)?)?),
                    None => Ok(loss),
                }
            }
            None => Ok(loss),
        }
    }

    fn after_update(
        &mut self,
        step: usize,
        grads: &BTreeMap<String, Tensor>,
        grad_scale: f64,
    ) -> Result<()> {
        if let Some(a) = &mut self.adalora {
            // PEFT's importance uses the gradient the optimizer applied (after clipping).
            let scaled;
            let grads = if grad_scale != 1.0 {
                scaled = grads
                    .iter()
                    .map(|(k, g)| Ok((k.clone(), (g * grad_scale)?)))
                    .collect::<Result<BTreeMap<_, _>>>()?;
                &scaled
            } else {
                grads
            };
            // PEFT's update_and_allocate(global_step) counts steps from 0.
            a.update_and_allocate(&mut self.model.layers_mut(), step - 1, grads)?;
        }
        Ok(())
    }

    fn task_state(&self) -> Result<(BTreeMap<String, Tensor>, serde_json::Value)> {
        Ok(match &self.adalora {
            Some(a) => {
                let (t, p) = a.state();
                (t, serde_json::json!({ "adalora_rank_pattern": p }))
            }
            None => (BTreeMap::new(), serde_json::Value::Null),
        })
    }

    fn load_task_state(
        &mut self,
        tensors: &BTreeMap<String, Tensor>,
        json: &serde_json::Value,
    ) -> Result<()> {
        if let Some(a) = &mut self.adalora {
            let p = serde_json::from_value(json["adalora_rank_pattern"].clone())
                .map_err(|e| Error::Msg(format!("checkpoint AdaLoRA state: {e}")))?;
            a.set_state(tensors, p);
        }
        Ok(())
    }

    fn save_adapter(&self, dir: &Path) -> Result<()> {
        if let Some(files) = &self.full_model_files {
            self.model.save_pretrained(dir)?;
            for (name, bytes) in files {
                crate::util::write_atomic(&dir.join(name), bytes)?;
            }
            return Ok(());
        }
        let mut cfg = self.adapter.clone();
        if let Some(p) = self.adalora.as_ref().and_then(|a| a.rank_pattern.as_ref()) {
            let rp: serde_json::Map<String, serde_json::Value> = p
                .iter()
                .map(|(k, v)| (format!("{k}.lora_E"), serde_json::json!(v)))
                .collect();
            cfg.extra
                .insert("adalora_rank_pattern".into(), serde_json::Value::Object(rp));
        }
        save(
            dir,
            &self.model.layers(),
            "default",
            &cfg,
            SaveOptions::default(),
        )
    }

    fn on_start(&mut self, step: usize, out: &Path) -> Result<()> {
        if self.monitor.is_none() {
            return Ok(());
        }
        // A fresh run starts a fresh eval.jsonl; a resumed one keeps the evaluations up to its
        // step and the starting perplexity as the forgetting baseline.
        let path = out.join("eval.jsonl");
        let mut kept: Vec<EvalPointRead> = vec![];
        if step > 0 {
            let text = match std::fs::read_to_string(&path) {
                Ok(t) => t,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
                Err(e) => return Err(Error::io(&path, e)),
            };
            for (i, l) in text
                .lines()
                .enumerate()
                .filter(|(_, l)| !l.trim().is_empty())
            {
                let p: EvalPointRead = serde_json::from_str(l)
                    .map_err(|e| Error::format(&path, crate::util::json_line_error(i + 1, &e)))?;
                if p.step < step {
                    kept.push(p);
                }
            }
        }
        self.base_ppl = kept.first().map(|p| p.reference_ppl);
        let body: String = kept.iter().map(|p| format!("{}\n", p.line)).collect();
        crate::util::write_atomic(&path, body.as_bytes())?;
        self.evaluate(step, out)
    }

    fn after_step(&mut self, step: usize, out: &Path) -> Result<()> {
        match &self.monitor {
            Some(m) if m.eval_steps > 0 && step.is_multiple_of(m.eval_steps) => {
                self.evaluate(step, out)
            }
            _ => Ok(()),
        }
    }
}

fn d_ratio() -> f64 {
    0.05
}
fn d_eval_steps() -> usize {
    50
}
fn d_quant() -> String {
    "none".into()
}
fn d_maxlen() -> usize {
    1024
}
fn d_lr() -> f64 {
    2e-5
}
fn d_sched() -> crate::train::ScheduleKind {
    crate::train::ScheduleKind::Linear
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

/// A whole SFT run (the `sft` stage of a pipeline file and `postforge sft`): PEFT's adapter keys
/// and TRL's `SFTConfig` keys.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SftRunConfig {
    /// Where this stage runs: `cpu`, `cuda`, `cuda:N`, `metal` or `auto` (unset: the pipeline's
    /// `device`, else the `--device` flag, else the CPU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<crate::util::device::DeviceSpec>,
    /// The dtype this stage loads base weights in: `f32`, `bf16` or `f16` (unset: the pipeline's
    /// `dtype`, else the `--dtype` flag, else f32). Adapters stay f32.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<crate::util::device::DTypeSpec>,
    /// Model folder.
    pub model: std::path::PathBuf,
    /// Training JSONL.
    pub data: std::path::PathBuf,
    /// Held-out JSONL (evaluation loss).
    #[serde(default)]
    pub eval_data: Option<std::path::PathBuf>,
    /// General reference JSONL (forgetting).
    #[serde(default)]
    pub reference: Option<std::path::PathBuf>,
    /// Replay JSONL.
    #[serde(default)]
    pub replay: Option<std::path::PathBuf>,
    /// Replay share of batch slots.
    #[serde(default = "d_ratio")]
    pub replay_ratio: f64,
    /// Evaluate every N steps.
    #[serde(default = "d_eval_steps")]
    pub eval_steps: usize,
    /// Forgetting threshold (fraction).
    #[serde(default)]
    pub max_forgetting: Option<f64>,
    /// Stop instead of warning.
    #[serde(default)]
    pub stop_on_forgetting: bool,
    /// The adapter: PEFT's keys (`peft_type`, `r`, `lora_alpha`, `target_modules`, ...), shared
    /// with every training command and stage.
    #[serde(flatten)]
    pub adapter: AdapterArgs,
    /// LongLoRA: shifted sparse attention in training with groups of this share of the sequence
    /// (the paper's 0.25). Packing must be off.
    #[serde(default)]
    pub s2_attn_group_ratio: Option<f64>,
    /// LongLoRA: position interpolation, linear RoPE scaling by this factor (context × factor).
    #[serde(default)]
    pub position_interpolation: Option<f64>,
    /// Quantize the base's linear layers: `nf4` (QLoRA / QDoRA, double quantization), `nf4-no-dq`
    /// or `none`. A checkpoint saved in 4 bits is read as NF4 whatever this says.
    #[serde(default = "d_quant")]
    pub quantize: String,
    /// Train every weight in full (linear layers, embeddings, norms) instead of adapters: the
    /// baseline adapters are compared with.
    #[serde(default)]
    pub full_finetune: bool,
    /// Built-in chat template for models without one.
    #[serde(default)]
    pub chat_template: Option<String>,
    /// Longest sequence.
    #[serde(default = "d_maxlen")]
    pub max_length: usize,
    /// BFD packing.
    #[serde(default)]
    pub packing: bool,
    /// Completion-only loss.
    #[serde(default)]
    pub completion_only_loss: Option<bool>,
    /// Assistant-only loss.
    #[serde(default)]
    pub assistant_only_loss: bool,
    /// Peak learning rate.
    #[serde(default = "d_lr")]
    pub learning_rate: f64,
    /// Schedule.
    #[serde(default = "d_sched")]
    pub lr_scheduler_type: crate::train::ScheduleKind,
    /// Warmup steps.
    #[serde(default)]
    pub warmup_steps: usize,
    /// Optimizer steps (default: epochs × batches).
    #[serde(default)]
    pub max_steps: Option<usize>,
    /// Epochs when `max_steps` is not set.
    #[serde(default = "d_epochs")]
    pub num_train_epochs: usize,
    /// Rows per micro-batch.
    #[serde(default = "d_bs")]
    pub per_device_train_batch_size: usize,
    /// Micro-batches per step.
    #[serde(default = "d_one")]
    pub gradient_accumulation_steps: usize,
    /// Clipping (0 = off).
    #[serde(default = "d_clip")]
    pub max_grad_norm: f64,
    /// Weight decay.
    #[serde(default)]
    pub weight_decay: f64,
    /// Checkpoint every N steps.
    #[serde(default)]
    pub save_steps: usize,
    /// Seed.
    #[serde(default = "d_seed")]
    pub seed: u64,
    /// Run folder.
    pub output_dir: std::path::PathBuf,
    /// In a pipeline: how the previous stage's adapter enters (`merge` only for SFT).
    #[serde(default)]
    pub previous: Option<super::align_run::Previous>,
}

/// What an SFT run produced.
#[derive(Debug, Clone)]
pub struct SftReport {
    /// Trainer summary.
    pub summary: crate::train::TrainSummary,
    /// Evaluations (held-out loss, reference perplexity, forgetting).
    pub history: Vec<EvalPoint>,
    /// Training rows.
    pub rows: usize,
    /// Trainable parameters.
    pub trainable: usize,
}

impl SftRunConfig {
    /// The adapter configuration.
    pub fn adapter(&self) -> Result<AdapterConfig> {
        self.adapter.config(&self.model, Some("CAUSAL_LM"))
    }

    /// The tokenizer of the model (with the built-in template if asked for).
    pub fn tokenizer(&self) -> Result<crate::data::text::TextTokenizer> {
        let mut tok = crate::data::text::TextTokenizer::load(&self.model)?;
        if let Some(name) = &self.chat_template {
            tok.use_builtin_template(name)?;
        }
        Ok(tok)
    }

    fn rows(
        &self,
        path: &Path,
        tok: &crate::data::text::TextTokenizer,
        packing: bool,
    ) -> Result<Vec<Row>> {
        use crate::data::sft::{pack_bfd, read_jsonl_lines, tokenize, unpacked, SftOptions};
        let opts = SftOptions {
            max_length: self.max_length,
            completion_only_loss: self.completion_only_loss,
            assistant_only_loss: self.assistant_only_loss,
        };
        let seqs = read_jsonl_lines(path)?
            .iter()
            .map(|(line, e)| {
                tokenize(e, tok, &opts)
                    .map_err(|err| Error::format(path, format!("line {line}: {err}")))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(if packing {
            pack_bfd(&seqs, self.max_length)
        } else {
            unpacked(&seqs)
        })
    }

    /// Runs the training; `overwrite` starts afresh over an earlier run's checkpoints.
    pub fn run(&self, resume: bool, overwrite: bool) -> Result<SftReport> {
        // Settings are checked before anything is read.
        self.check()?;
        let _lock = crate::util::outdir::DirLock::acquire(&self.output_dir)?;
        let mut adapter = self.adapter()?;
        let tok = self.tokenizer()?;
        let train = self.rows(&self.data, &tok, self.packing)?;
        let bs = self.per_device_train_batch_size;
        let n_rows = train.len();
        let steps = self.max_steps.unwrap_or(
            (self.num_train_epochs * n_rows.div_ceil(bs.max(1)))
                / self.gradient_accumulation_steps.max(1),
        );
        if adapter.peft_type == "ADALORA" && !adapter.extra.contains_key("total_step") {
            adapter
                .extra
                .insert("total_step".into(), serde_json::json!(steps));
        }
        let mut model = LlamaForCausalLM::load(
            &self.model,
            crate::peft::AdapterPlan {
                full_training: self.full_finetune,
                ..crate::peft::AdapterPlan::single(adapter.clone(), self.seed)?
                    .quantized(crate::peft::quant::QuantSpec::parse(&self.quantize)?)
            },
        )?;
        if let Some(f) = self.position_interpolation {
            model.set_position_interpolation(f)?;
        }
        if self.s2_attn_group_ratio.is_some() && self.packing {
            return Err(Error::Config(
                "s2_attn_group_ratio (S²-Attn) needs packing off: groups would mix packed sequences".into(),
            ));
        }
        model.set_shifted_sparse_attention(self.s2_attn_group_ratio);
        let trainable: usize = model.trainable().iter().map(|(_, v)| v.elem_count()).sum();
        let (base_bytes, base_params) = model.layers().iter().fold((0, 0), |(b, n), l| {
            let w = l.base_weight();
            (
                b + w.storage_bytes(),
                n + w.dims().iter().product::<usize>(),
            )
        });
        let quantized = model
            .layers()
            .iter()
            .any(|l| l.base_weight().nf4().is_some());
        let mut task = SftTask::new(model, adapter, train, bs, tok.pad_id, self.seed)?;
        if let Some(r) = &self.replay {
            task = task.with_replay(self.rows(r, &tok, false)?, self.replay_ratio)?;
        }
        if self.eval_data.is_some() || self.reference.is_some() {
            let held = match &self.eval_data {
                Some(p) => self.rows(p, &tok, false)?,
                None => vec![],
            };
            let reference = match &self.reference {
                Some(p) => self.rows(p, &tok, false)?,
                None => vec![],
            };
            task = task.with_monitor(
                held,
                reference,
                MonitorConfig {
                    eval_steps: self.eval_steps,
                    max_forgetting: self.max_forgetting,
                    stop_on_forgetting: self.stop_on_forgetting,
                },
            );
        }
        let trainer = crate::train::Trainer::new(crate::train::TrainConfig {
            learning_rate: self.learning_rate,
            lr_scheduler: self.lr_scheduler_type,
            warmup_steps: self.warmup_steps,
            max_steps: steps,
            gradient_accumulation_steps: self.gradient_accumulation_steps,
            max_grad_norm: crate::check::grad_clip("max_grad_norm", self.max_grad_norm)?,
            weight_decay: self.weight_decay,
            save_steps: self.save_steps,
            seed: self.seed,
            output_dir: self.output_dir.clone(),
            overwrite_output_dir: overwrite,
            ..Default::default()
        })?;
        let summary = trainer.train(&mut task, resume)?;
        // The last step is always evaluated, whatever eval_steps says.
        if task.monitor.is_some() && task.history.last().map(|p| p.step) != Some(summary.steps) {
            task.evaluate(summary.steps, &self.output_dir)?;
        }
        let method = match (self.adapter.use_dora, quantized) {
            _ if self.full_finetune => "sft (full)",
            (false, false) => "sft",
            (true, false) => "sft (DoRA)",
            (false, true) => "sft (QLoRA)",
            (true, true) => "sft (QDoRA)",
        };
        let report = serde_json::json!({"method": method,
            "base_weight_bytes": base_bytes, "base_weight_params": base_params,
            "base_bytes_per_param": base_bytes as f64 / base_params.max(1) as f64,
            "steps": summary.steps, "seconds": summary.seconds, "first_loss": summary.first_loss,
            "last_loss": summary.last_loss, "rows": n_rows});
        crate::util::write_atomic(
            &self.output_dir.join("run_report.json"),
            serde_json::to_string_pretty(&report)
                .map_err(|e| Error::Msg(e.to_string()))?
                .as_bytes(),
        )?;
        Ok(SftReport {
            summary,
            history: task.history.clone(),
            rows: n_rows,
            trainable,
        })
    }
}
