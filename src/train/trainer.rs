//! The training loop. A [`Task`] turns a data cursor into a loss; the [`Trainer`] owns everything
//! else: accumulation, clipping, the schedule, AdamW, NaN checks, checkpoints, metrics, progress.
//!
//! Every random choice of a run is a function of (seed, cursor, micro-step): the checkpoint stores
//! the step, the data cursor, the seed, the parameters and the optimizer moments, so a resumed run
//! replays exactly what an unbroken run would have done (bit-identical on CPU).

use super::optim::{AdamW, AdamWConfig};
use super::schedule::{Schedule, ScheduleKind};
use crate::media::plot::{line_plot, Series};
use crate::peft::ForwardCtx;
use crate::util::{save_safetensors, write_atomic, SafeTensors};
use crate::{Error, Result};
use candle_core::{DType, Tensor, Var};
use indicatif::{ProgressBar, ProgressStyle};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

/// What a trainer trains.
pub trait Task {
    /// The trainable tensors by name (sorted, stable).
    fn trainable(&self) -> Vec<(String, Var)>;
    /// The loss of micro-batch number `cursor` (a global counter: the task maps it to data,
    /// deterministically).
    fn loss(&mut self, cursor: u64, ctx: &ForwardCtx) -> Result<Tensor>;
    /// Writes the adapter in the task's own format (a PEFT folder, a kohya file, ...) into `dir`.
    fn save_adapter(&self, dir: &Path) -> Result<()>;
    /// Called once before the first step this call runs (`step` = steps already done), e.g. to
    /// sample images before training. Default: nothing.
    fn on_start(&mut self, _step: usize, _output_dir: &Path) -> Result<()> {
        Ok(())
    }
    /// Extra metrics of step `step` (from 1), just taken: averages over its micro-batches, or
    /// an evaluation such as a validation loss; merged into its `metrics.jsonl` line.
    /// Default: none.
    fn step_metrics(&mut self, _step: usize) -> Result<BTreeMap<String, f64>> {
        Ok(BTreeMap::new())
    }
    /// Called after each optimizer step (`step` counts from 1) and any checkpoint it wrote, e.g.
    /// to sample images every N steps. Default: nothing.
    fn after_step(&mut self, _step: usize, _output_dir: &Path) -> Result<()> {
        Ok(())
    }
    /// Learning-rate multipliers by trainable name (parameter groups); unnamed ones keep 1.
    /// Default: none.
    fn lr_scales(&self) -> BTreeMap<String, f64> {
        BTreeMap::new()
    }
    /// Called right after optimizer step `step` (from 1), before any checkpoint, with the
    /// step's gradients and the clipping factor the update applied to them (the applied gradient
    /// is `grad_scale · grads`), e.g. AdaLoRA's rank allocation. Default: nothing.
    fn after_update(
        &mut self,
        _step: usize,
        _grads: &BTreeMap<String, Tensor>,
        _grad_scale: f64,
    ) -> Result<()> {
        Ok(())
    }
    /// State beyond the trainable tensors that a checkpoint must keep for an exact resume
    /// (tensors and JSON). Default: none.
    fn task_state(&self) -> Result<(BTreeMap<String, Tensor>, serde_json::Value)> {
        Ok((BTreeMap::new(), serde_json::Value::Null))
    }
    /// Restores [`Self::task_state`].
    fn load_task_state(
        &mut self,
        _tensors: &BTreeMap<String, Tensor>,
        _json: &serde_json::Value,
    ) -> Result<()> {
        Ok(())
    }
}

/// Trainer settings.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Peak learning rate.
    pub learning_rate: f64,
    /// Schedule after warmup.
    pub lr_scheduler: ScheduleKind,
    /// Warmup steps.
    pub warmup_steps: usize,
    /// Optimizer steps.
    pub max_steps: usize,
    /// Micro-batches per optimizer step.
    pub gradient_accumulation_steps: usize,
    /// Global gradient-norm clipping (None = off).
    pub max_grad_norm: Option<f64>,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// AdamW β₁.
    pub adam_beta1: f64,
    /// AdamW β₂.
    pub adam_beta2: f64,
    /// AdamW ε.
    pub adam_epsilon: f64,
    /// Checkpoint every N optimizer steps (0: only at the end).
    pub save_steps: usize,
    /// Checkpoints kept on disk (the newest ones).
    pub save_total_limit: usize,
    /// Run seed.
    pub seed: u64,
    /// Output folder.
    pub output_dir: PathBuf,
    /// Start afresh even if the output folder holds checkpoints of an earlier run (they are removed).
    pub overwrite_output_dir: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            learning_rate: 2e-4,
            lr_scheduler: ScheduleKind::Linear,
            warmup_steps: 0,
            max_steps: 100,
            gradient_accumulation_steps: 1,
            max_grad_norm: Some(1.0),
            weight_decay: 0.0,
            adam_beta1: 0.9,
            adam_beta2: 0.999,
            adam_epsilon: 1e-8,
            save_steps: 0,
            save_total_limit: 2,
            seed: 42,
            output_dir: PathBuf::from("runs/out"),
            overwrite_output_dir: false,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct TrainerState {
    step: usize,
    cursor: u64,
    seed: u64,
    micro_step: u64,
    config: TrainConfig,
}

/// What a finished run reports.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    /// Optimizer steps done in total.
    pub steps: usize,
    /// Loss of the first step run in this call.
    pub first_loss: f64,
    /// Loss of the last step.
    pub last_loss: f64,
    /// Wall time of this call, seconds.
    pub seconds: f64,
    /// Where the final adapter was written.
    pub adapter_dir: PathBuf,
    /// The step resumed from, if any.
    pub resumed_from: Option<usize>,
}

/// The trainer.
pub struct Trainer {
    cfg: TrainConfig,
}

fn checkpoint_dirs(out: &Path) -> Vec<(usize, PathBuf)> {
    let mut v = vec![];
    if let Ok(rd) = std::fs::read_dir(out) {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if let Some(n) = name
                .strip_prefix("checkpoint-")
                .and_then(|s| s.parse::<usize>().ok())
            {
                if e.path().join("trainer_state.json").exists() {
                    v.push((n, e.path()));
                }
            }
        }
    }
    v.sort();
    v
}

/// Global L2 norm of a set of gradients.
pub fn global_norm(grads: &BTreeMap<String, Tensor>) -> Result<f64> {
    let mut sq = 0f64;
    for g in grads.values() {
        sq += g
            .to_dtype(DType::F32)?
            .sqr()?
            .sum_all()?
            .to_scalar::<f32>()? as f64;
    }
    Ok(sq.sqrt())
}

impl Trainer {
    /// A trainer with `cfg`.
    pub fn new(cfg: TrainConfig) -> Result<Self> {
        if cfg.max_steps == 0 || cfg.gradient_accumulation_steps == 0 {
            return Err(Error::Config(
                "max_steps and gradient_accumulation_steps must be at least 1".into(),
            ));
        }
        if cfg
            .max_grad_norm
            .is_some_and(|m| !(m.is_finite() && m > 0.0))
        {
            return Err(Error::Config(format!(
                "max_grad_norm {:?} must be positive (None disables clipping)",
                cfg.max_grad_norm
            )));
        }
        if !(cfg.learning_rate.is_finite() && cfg.learning_rate > 0.0) {
            return Err(Error::Config(format!(
                "learning rate {} must be positive",
                cfg.learning_rate
            )));
        }
        Ok(Self { cfg })
    }

    /// The latest complete checkpoint in the output folder.
    pub fn latest_checkpoint(&self) -> Option<PathBuf> {
        checkpoint_dirs(&self.cfg.output_dir).pop().map(|(_, p)| p)
    }

    fn save_checkpoint(
        &self,
        task: &dyn Task,
        opt: &AdamW,
        state: &TrainerState,
    ) -> Result<PathBuf> {
        let out = &self.cfg.output_dir;
        let final_dir = out.join(format!("checkpoint-{}", state.step));
        let tmp = out.join(format!(".checkpoint-{}.tmp", state.step));
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        }
        std::fs::create_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        let params: BTreeMap<String, Tensor> = task
            .trainable()
            .into_iter()
            .map(|(n, v)| (n, v.as_tensor().clone()))
            .collect();
        save_safetensors(&tmp.join("params.safetensors"), &params, None)?;
        save_safetensors(
            &tmp.join("optimizer.safetensors"),
            &opt.state_tensors()?,
            None,
        )?;
        task.save_adapter(&tmp.join("adapter"))?;
        let (ts, tj) = task.task_state()?;
        if !ts.is_empty() || !tj.is_null() {
            save_safetensors(&tmp.join("task_state.safetensors"), &ts, None)?;
            write_atomic(&tmp.join("task_state.json"), tj.to_string().as_bytes())?;
        }
        let json = serde_json::to_string_pretty(state).map_err(|e| Error::Msg(e.to_string()))?;
        write_atomic(&tmp.join("trainer_state.json"), json.as_bytes())?;
        // An existing checkpoint of the same step is moved aside before it is replaced, so that
        // one complete copy exists at every moment.
        crate::util::outdir::swap_dir_in(&tmp, &final_dir)?;
        let all = checkpoint_dirs(out);
        if all.len() > self.cfg.save_total_limit.max(1) {
            for (_, p) in &all[..all.len() - self.cfg.save_total_limit.max(1)] {
                let _ = std::fs::remove_dir_all(p);
            }
        }
        Ok(final_dir)
    }

    fn load_checkpoint(
        &self,
        dir: &Path,
        task: &mut dyn Task,
        opt: &mut AdamW,
    ) -> Result<TrainerState> {
        let sp = dir.join("trainer_state.json");
        let text = std::fs::read_to_string(&sp).map_err(|e| Error::io(&sp, e))?;
        let state: TrainerState =
            serde_json::from_str(&text).map_err(|e| Error::format(&sp, e.to_string()))?;
        // The run must be the same run: anything that changes the data order, the schedule or the
        // update makes "resume" a different experiment.
        let (a, b) = (&state.config, &self.cfg);
        let mut diffs = vec![];
        if state.seed != b.seed {
            diffs.push(format!("seed {} vs {}", state.seed, b.seed));
        }
        if a.gradient_accumulation_steps != b.gradient_accumulation_steps {
            diffs.push(format!(
                "gradient_accumulation_steps {} vs {}",
                a.gradient_accumulation_steps, b.gradient_accumulation_steps
            ));
        }
        if a.max_steps != b.max_steps
            || a.warmup_steps != b.warmup_steps
            || a.lr_scheduler != b.lr_scheduler
            || a.learning_rate != b.learning_rate
        {
            diffs.push(format!(
                "schedule {:?} lr {} warmup {} of {} steps vs {:?} lr {} warmup {} of {} steps",
                a.lr_scheduler,
                a.learning_rate,
                a.warmup_steps,
                a.max_steps,
                b.lr_scheduler,
                b.learning_rate,
                b.warmup_steps,
                b.max_steps
            ));
        }
        if !diffs.is_empty() {
            return Err(Error::Config(format!(
                "{}: the checkpoint belongs to a different run: {}",
                sp.display(),
                diffs.join("; ")
            )));
        }
        let pp = dir.join("params.safetensors");
        let params = SafeTensors::read(&pp)?;
        for (name, var) in task.trainable() {
            let t = params.get_f32(&name, var.dims())?;
            var.set(&t.to_device(var.device())?)?;
        }
        let op = dir.join("optimizer.safetensors");
        let ot = SafeTensors::read(&op)?.into_tensors();
        opt.load_state(&ot, state.step as u64, &op)?;
        let tsp = dir.join("task_state.json");
        if tsp.exists() {
            let text = std::fs::read_to_string(&tsp).map_err(|e| Error::io(&tsp, e))?;
            let json: serde_json::Value =
                serde_json::from_str(&text).map_err(|e| Error::format(&tsp, e.to_string()))?;
            let tensors = SafeTensors::read(dir.join("task_state.safetensors"))?.into_tensors();
            let tensors: BTreeMap<String, Tensor> = tensors.into_iter().collect();
            task.load_task_state(&tensors, &json)?;
        }
        Ok(state)
    }

    /// Runs (or, with `resume`, continues) training. Returns a summary; a NaN/Inf loss or gradient
    /// stops the run with [`Error::NonFinite`], leaving the last good checkpoint in place.
    pub fn train(&self, task: &mut dyn Task, resume: bool) -> Result<TrainSummary> {
        let c = &self.cfg;
        let out = c.output_dir.clone();
        if out.exists() && !out.is_dir() {
            return Err(Error::Config(format!(
                "output_dir {} is a file, not a folder",
                out.display()
            )));
        }
        // One run per output folder; what killed runs left there is cleaned up.
        let _lock = crate::util::outdir::DirLock::acquire(&out)?;
        let params = task.trainable();
        if params.is_empty() {
            return Err(Error::Config(
                "nothing to train: no trainable tensors (did any module match target_modules?)"
                    .into(),
            ));
        }
        let adam = AdamWConfig {
            beta1: c.adam_beta1,
            beta2: c.adam_beta2,
            eps: c.adam_epsilon,
            weight_decay: c.weight_decay,
        };
        let mut opt = AdamW::new(params.clone(), adam)?;
        opt.set_lr_scales(&task.lr_scales())?;
        let sched = Schedule {
            kind: c.lr_scheduler,
            base_lr: c.learning_rate,
            warmup: c.warmup_steps,
            total: c.max_steps,
        };
        let mut state = TrainerState {
            step: 0,
            cursor: 0,
            seed: c.seed,
            micro_step: 0,
            config: c.clone(),
        };
        let mut resumed_from = None;
        let metrics_path = out.join("metrics.jsonl");
        let mut last_ckpt = "none".to_string();
        match (resume, self.latest_checkpoint()) {
            (true, Some(dir)) => {
                state = self.load_checkpoint(&dir, task, &mut opt)?;
                if state.step >= c.max_steps {
                    return Err(Error::Config(format!(
                        "--resume: {} is at step {} and max_train_steps is {}: the run is \
                         finished (its results are kept); raise max_train_steps to train further",
                        dir.display(),
                        state.step,
                        c.max_steps
                    )));
                }
                resumed_from = Some(state.step);
                last_ckpt = dir.display().to_string();
            }
            (true, None) => {
                return Err(Error::Config(format!(
                    "--resume: {} holds no checkpoint-<step> folder to resume from; run without \
                     --resume to start a new run",
                    out.display()
                )))
            }
                        (false, Some(_)) if c.overwrite_output_dir => {
                for (_, p) in checkpoint_dirs(&out) {
                    std::fs::remove_dir_all(&p).map_err(|e| Error::io(&p, e))?;
                }
            }
            (false, Some(dir)) => {
                return Err(Error::Config(format!(
                                        "{} holds a checkpoint of an earlier run ({}); resume it, overwrite the folder, or choose another",
                    out.display(),
                    dir.display()
                )))
            }
            _ => {}
        }
        // Keep the metric lines up to the resumed step; drop lines of steps that will be redone.
        let kept: Vec<String> = match std::fs::read_to_string(&metrics_path) {
            Ok(t) if resumed_from.is_some() => t
                .lines()
                .filter(|l| {
                    serde_json::from_str::<serde_json::Value>(l)
                        .ok()
                        .and_then(|v| v["step"].as_u64())
                        .is_some_and(|s| (s as usize) <= state.step)
                })
                .map(String::from)
                .collect(),
            _ => vec![],
        };
        let mut body = kept.join("\n");
        if !body.is_empty() {
            body.push('\n');
        }
        write_atomic(&metrics_path, body.as_bytes())?;
        let mut metrics = std::fs::OpenOptions::new()
            .append(true)
            .open(&metrics_path)
            .map_err(|e| Error::io(&metrics_path, e))?;

        let bar = if std::io::stderr().is_terminal() {
            let b = ProgressBar::new(c.max_steps as u64);
            b.set_style(
                ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
                )
                .map_err(|e| Error::Msg(e.to_string()))?,
            );
            b.set_position(state.step as u64);
            b
        } else {
            ProgressBar::hidden()
        };
        let start = Instant::now();
        let (mut first_loss, mut last_loss) = (f64::NAN, f64::NAN);
        if state.step < c.max_steps {
            task.on_start(state.step, &out)?;
        }
        while state.step < c.max_steps {
            let t0 = Instant::now();
            let mut acc: BTreeMap<String, Tensor> = BTreeMap::new();
            let mut loss_sum = 0f64;
            for _ in 0..c.gradient_accumulation_steps {
                let ctx = ForwardCtx::train(c.seed, state.micro_step);
                let loss = task.loss(state.cursor, &ctx)?;
                let lv = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
                if !lv.is_finite() {
                    bar.abandon();
                    return Err(Error::NonFinite {
                        what: "loss",
                        value: lv,
                        step: state.step + 1,
                        checkpoint: last_ckpt,
                    });
                }
                loss_sum += lv;
                let scaled = (loss / c.gradient_accumulation_steps as f64)?;
                let grads = scaled.backward()?;
                for (name, var) in &params {
                    if let Some(g) = grads.get(var.as_tensor()) {
                        let g = match acc.remove(name) {
                            Some(prev) => (prev + g)?,
                            None => g.clone(),
                        };
                        acc.insert(name.clone(), g);
                    }
                }
                state.cursor += 1;
                state.micro_step += 1;
            }
            let loss = loss_sum / c.gradient_accumulation_steps as f64;
            let norm = global_norm(&acc)?;
            if !norm.is_finite() {
                bar.abandon();
                return Err(Error::NonFinite {
                    what: "gradient norm",
                    value: norm,
                    step: state.step + 1,
                    checkpoint: last_ckpt,
                });
            }
            let scale = match c.max_grad_norm {
                Some(m) if norm > m => m / (norm + 1e-6),
                _ => 1.0,
            };
            let lr = sched.lr(state.step);
            opt.step(&acc, lr, scale)?;
            state.step += 1;
            task.after_update(state.step, &acc, scale)?;
            if first_loss.is_nan() {
                first_loss = loss;
            }
            last_loss = loss;
            let dt = t0.elapsed().as_secs_f64();
            let mut line = serde_json::json!({
                "step": state.step, "loss": loss, "lr": lr, "grad_norm": norm,
                "step_time_s": dt, "elapsed_s": start.elapsed().as_secs_f64(),
            });
            for (k, v) in task.step_metrics(state.step)? {
                line[k] = v.into();
            }
            writeln!(metrics, "{line}").map_err(|e| Error::io(&metrics_path, e))?;
            bar.set_position(state.step as u64);
            bar.set_message(format!(
                "loss {loss:.4} lr {lr:.2e} {:.2} it/s",
                1.0 / dt.max(1e-9)
            ));
            let at_end = state.step == c.max_steps;
            if at_end || (c.save_steps > 0 && state.step.is_multiple_of(c.save_steps)) {
                last_ckpt = self
                    .save_checkpoint(task, &opt, &state)?
                    .display()
                    .to_string();
            }
            task.after_step(state.step, &out)?;
        }
        bar.finish_and_clear();
        drop(metrics);
        let adapter_dir = out.join("adapter");
        let tmp = out.join(".adapter.tmp");
        if tmp.exists() {
            std::fs::remove_dir_all(&tmp).map_err(|e| Error::io(&tmp, e))?;
        }
        task.save_adapter(&tmp)?;
        crate::util::outdir::swap_dir_in(&tmp, &adapter_dir)?;
        plot_metrics(&metrics_path, &out.join("loss_curve.png"))?;
        Ok(TrainSummary {
            steps: state.step,
            first_loss,
            last_loss,
            seconds: start.elapsed().as_secs_f64(),
            adapter_dir,
            resumed_from,
        })
    }
}

/// The (step, value) pairs of `key` in a `metrics.jsonl` file (lines without it are skipped); a
/// line that is not JSON is an error naming the file and line.
pub fn read_metric(metrics: &Path, key: &str) -> Result<Vec<(usize, f64)>> {
    let text = std::fs::read_to_string(metrics).map_err(|e| Error::io(metrics, e))?;
    let mut out = vec![];
    for (i, l) in text.lines().enumerate() {
        let v: serde_json::Value = serde_json::from_str(l)
            .map_err(|e| Error::format(metrics, crate::util::json_line_error(i + 1, &e)))?;
        if let (Some(s), Some(x)) = (v["step"].as_u64(), v[key].as_f64()) {
            out.push((s as usize, x));
        }
    }
    Ok(out)
}

/// Draws `metrics.jsonl` (loss per step, its moving average, and the validation loss) as a PNG.
pub fn plot_metrics(metrics: &Path, png: &Path) -> Result<()> {
    let text = std::fs::read_to_string(metrics).map_err(|e| Error::io(metrics, e))?;
    let (mut pts, mut val) = (vec![], vec![]);
    for (i, l) in text.lines().enumerate() {
        let v: serde_json::Value = serde_json::from_str(l)
            .map_err(|e| Error::format(metrics, crate::util::json_line_error(i + 1, &e)))?;
        if let (Some(s), Some(loss)) = (v["step"].as_f64(), v["loss"].as_f64()) {
            pts.push((s, loss));
        }
        if let (Some(s), Some(loss)) = (v["step"].as_f64(), v["val_loss"].as_f64()) {
            val.push((s, loss));
        }
    }
    let mut ema = vec![];
    let mut m = f64::NAN;
    let k = 2.0 / (1.0 + (pts.len() as f64 / 50.0).max(1.0));
    for (s, l) in &pts {
        m = if m.is_nan() { *l } else { m + k * (l - m) };
        ema.push((*s, m));
    }
    let (lo, hi) = pts.iter().fold((f64::INFINITY, 0f64), |(lo, hi), (_, l)| {
        (lo.min(*l), hi.max(*l))
    });
    let log_y = lo > 0.0 && hi / lo > 30.0;
    let mut series = vec![
        Series {
            label: "loss".into(),
            points: pts,
        },
        Series {
            label: "moving average".into(),
            points: ema,
        },
    ];
    if !val.is_empty() {
        series.push(Series {
            label: "validation loss".into(),
            points: val,
        });
    }
    line_plot(
        png,
        "training loss",
        "optimizer step",
        "loss",
        &series,
        log_y,
    )
}
