//! Pipeline files (`pipelines/*.toml`) run by `postforge run`: an ordered list of `[[stage]]`
//! tables, each with a `kind` and that stage's settings. A stage may leave out what the stage before
//! it produced (an evaluation takes the model and LoRA file of the preceding training stage).

use crate::check::Ranged;
use crate::diffusion::eval::{evaluate, EvalConfig, EvalReport};
use crate::diffusion::masked_edit::{self, MaskedEditConfig, MaskedEditReport};
use crate::diffusion::train::{train_lora, LoraTrainConfig};
use crate::text::align_run::{merge_into_folder, AlignReport, AlignRunConfig, Previous};
use crate::text::sft::{SftReport, SftRunConfig};
use crate::text::tiny_chat::{task_eval, TaskEvalConfig, TaskEvalReport};
use crate::train::TrainSummary;
use crate::{Error, Result};
use serde::Deserialize;
use std::path::{Path, PathBuf};

/// A pipeline file.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// Name shown in reports.
    #[serde(default)]
    pub name: Option<String>,
    /// What the pipeline does.
    #[serde(default)]
    pub description: Option<String>,
    /// Where every stage runs unless it names its own `device` (`cpu`, `cuda`, `cuda:N`, `metal`,
    /// `auto`; unset: the `--device` flag, else the CPU).
    #[serde(default)]
    pub device: Option<crate::util::device::DeviceSpec>,
    /// The dtype every stage loads base weights in unless it names its own `dtype` (`f32`, `bf16`,
    /// `f16`; unset: the `--dtype` flag, else f32).
    #[serde(default)]
    pub dtype: Option<crate::util::device::DTypeSpec>,
    /// The stages, in order.
    pub stage: Vec<Stage>,
}

/// One stage.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Stage {
    /// LoRA training of an image pipeline (kohya's keys).
    TrainDiffusion(LoraTrainConfig),
    /// Before/after grid and style/adherence scores of an image LoRA.
    DiffusionEval(EvalConfig),
    /// Masked edits with an image LoRA in every mode, a comparison grid and figures.
    MaskedEdit(MaskedEditConfig),
    /// Supervised fine-tuning of a causal LM with an adapter (PEFT / TRL keys).
    Sft(Box<SftRunConfig>),
    /// Task accuracy of a chat model without and with the adapter.
    TaskEval(TaskEvalConfig),
    /// Preference training (DPO family, IPO, SimPO, CPO, ORPO, KTO; TRL keys).
    Align(Box<AlignRunConfig>),
}

impl Stage {
    /// The stage's own `device` key.
    pub fn device(&self) -> Option<crate::util::device::DeviceSpec> {
        match self {
            Stage::TrainDiffusion(c) => c.device,
            Stage::DiffusionEval(c) => c.device,
            Stage::MaskedEdit(c) => c.device,
            Stage::Sft(c) => c.device,
            Stage::TaskEval(c) => c.device,
            Stage::Align(c) => c.device,
        }
    }

    /// The stage's own `dtype` key.
    pub fn dtype(&self) -> Option<crate::util::device::DTypeSpec> {
        match self {
            Stage::TrainDiffusion(c) => c.dtype,
            Stage::DiffusionEval(c) => c.dtype,
            Stage::MaskedEdit(c) => c.dtype,
            Stage::Sft(c) => c.dtype,
            Stage::TaskEval(c) => c.dtype,
            Stage::Align(c) => c.dtype,
        }
    }

    /// The `kind` key of the stage.
    pub fn kind(&self) -> &'static str {
        match self {
            Stage::TrainDiffusion(_) => "train-diffusion",
            Stage::DiffusionEval(_) => "diffusion-eval",
            Stage::MaskedEdit(_) => "masked-edit",
            Stage::Sft(_) => "sft",
            Stage::TaskEval(_) => "task-eval",
            Stage::Align(_) => "align",
        }
    }
}

impl Ranged for Stage {
    /// The stage's settings, each in its documented range.
    fn check(&self) -> Result<()> {
        match self {
            Stage::TrainDiffusion(c) => c.check(),
            Stage::DiffusionEval(c) => c.check(),
            Stage::MaskedEdit(c) => c.check(),
            Stage::Sft(c) => c.check(),
            Stage::TaskEval(c) => c.check(),
            Stage::Align(c) => c.check(),
        }
    }
}

/// What a stage produced.
#[derive(Debug, Clone)]
pub enum StageReport {
    /// A trained LoRA.
    Trained {
        /// Trainer summary.
        summary: TrainSummary,
        /// The LoRA file.
        file: PathBuf,
        /// The run folder.
        output_dir: PathBuf,
    },
    /// An evaluation.
    Evaluated(EvalReport),
    /// A masked-edit study.
    Edited(MaskedEditReport),
    /// An SFT run.
    FineTuned(Box<SftReport>),
    /// A task evaluation.
    TaskEvaluated(TaskEvalReport),
    /// A preference-training run.
    Aligned(Box<AlignReport>),
}

/// A stage's path `v`, or else the one the stage before it produced (`last`); an error naming the
/// stage (`i`, 0-based), its kind and the key when there is neither.
fn inherited(
    i: usize,
    kind: &str,
    v: &Option<PathBuf>,
    last: &Option<PathBuf>,
    what: &str,
) -> Result<PathBuf> {
    v.clone().or_else(|| last.clone()).ok_or_else(|| {
        Error::Config(format!(
            "stage {}: {kind} has no `{what}` and no training stage before it",
            i + 1
        ))
    })
}

impl Recipe {
    /// A parse error of a pipeline file; a value of the wrong type inside a stage (which serde
    /// reports without its key, at the `[[stage]]` line) gets the stage and the key named.
    fn explain(text: &str, e: toml::de::Error) -> String {
        let msg = e.to_string();
        let Ok(table) = toml::from_str::<toml::Table>(text) else {
            return msg;
        };
        let Some(toml::Value::Array(stages)) = table.get("stage") else {
            return msg;
        };
        for (i, st) in stages.iter().enumerate() {
            let Ok(serde_json::Value::Object(obj)) = serde_json::to_value(st) else {
                continue;
            };
            if let Err(se) = serde_json::from_value::<Stage>(serde_json::Value::Object(obj.clone()))
            {
                let kind = obj.get("kind").and_then(|k| k.as_str()).unwrap_or("?");
                let detail = crate::check::with_blamed_key::<Stage>(&obj, &se.to_string());
                return format!("stage {} ({kind}): {detail}", i + 1);
            }
        }
        msg
    }

    /// Reads and checks a pipeline file.
    pub fn load(path: &Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let r: Recipe =
            toml::from_str(&text).map_err(|e| Error::format(path, Self::explain(&text, e)))?;
        if r.stage.is_empty() {
            return Err(Error::format(path, "no [[stage]] tables"));
        }
        // Every stage's values are checked before stage 1 starts: a bad key in stage 3 is not
        // found after stages 1 and 2 have trained.
        for (i, st) in r.stage.iter().enumerate() {
            st.check().map_err(|e| {
                let e = match e {
                    Error::Config(m) => m,
                    e => e.to_string(),
                };
                Error::format(path, format!("stage {} ({}): {e}", i + 1, st.kind()))
            })?;
        }
        Ok(r)
    }

    /// Runs every stage in order. `resume` continues interrupted training stages from their
    /// newest checkpoint; otherwise they start afresh. `log` receives one line per event.
    pub fn run(
        &self,
        resume: bool,
        progress: &indicatif::ProgressBar,
        log: &mut dyn FnMut(&str),
    ) -> Result<Vec<StageReport>> {
        let mut reports = vec![];
        let mut last_model: Option<PathBuf> = None;
        let mut last_lora: Option<PathBuf> = None;
        let mut last_out: Option<PathBuf> = None;
        for (i, st) in self.stage.iter().enumerate() {
            // The stage's device, else the pipeline's, else whatever is current (`--device`).
            let _device = crate::util::device::scoped(st.device().or(self.device))?;
            let _dtype = crate::util::device::scoped_dtype(st.dtype().or(self.dtype));
            match st {
                Stage::TrainDiffusion(cfg) => {
                    log(&format!(
                        "stage {}: train-diffusion: {} on {} -> {}",
                        i + 1,
                        cfg.pretrained_model_name_or_path.display(),
                        cfg.train_data_dir.display(),
                        cfg.output_dir.display()
                    ));
                    let (summary, file, task) = train_lora(cfg, resume, !resume)?;
                    log(&format!(
                        "  trained {} steps ({} images) in {:.0}s: loss {:.4} -> {:.4}; wrote {}",
                        summary.steps,
                        task.num_images(),
                        summary.seconds,
                        summary.first_loss,
                        summary.last_loss,
                        file.display()
                    ));
                    if let Some(line) = task.validation_summary(&cfg.output_dir)? {
                        log(&format!("  {line}"));
                    }
                    last_model = Some(cfg.pretrained_model_name_or_path.clone());
                    last_lora = Some(file.clone());
                    last_out = Some(cfg.output_dir.clone());
                    reports.push(StageReport::Trained {
                        summary,
                        file,
                        output_dir: cfg.output_dir.clone(),
                    });
                }
                Stage::DiffusionEval(cfg) => {
                    let need = |v: &Option<PathBuf>, last: &Option<PathBuf>, what: &str| {
                        inherited(i, "diffusion-eval", v, last, what)
                    };
                    let model = need(&cfg.model, &last_model, "model")?;
                    let lora = need(&cfg.lora, &last_lora, "lora")?;
                    let out = need(&cfg.output_dir, &last_out, "output_dir")?;
                    log(&format!(
                        "stage {}: diffusion-eval: {} with {}",
                        i + 1,
                        model.display(),
                        lora.display()
                    ));
                    let rep = evaluate(cfg, &model, &lora, &out, progress)?;
                    log(&format!("  wrote {}", rep.grid.display()));
                    if !rep.scores.is_empty() {
                        log(&format!(
                            "  {:>10}  {:>11}  {:>9}  {:>6}  {:>6}  {:>8}",
                            "LoRA scale", "style score", "adherence", "shape", "colour", "position"
                        ));
                        for s in &rep.scores {
                            log(&format!(
                                "  {:>10.2}  {:>11.3}  {:>8.0}%  {:>5.0}%  {:>5.0}%  {:>7.0}%",
                                s.scale,
                                s.style_score,
                                100.0 * s.adherence,
                                100.0 * s.shape,
                                100.0 * s.color,
                                100.0 * s.position
                            ));
                        }
                    }
                    reports.push(StageReport::Evaluated(rep));
                }
                Stage::MaskedEdit(cfg) => {
                    let need = |v: &Option<PathBuf>, last: &Option<PathBuf>, what: &str| {
                        inherited(i, "masked-edit", v, last, what)
                    };
                    let model = need(&cfg.model, &last_model, "model")?;
                    let lora = need(&cfg.lora, &last_lora, "lora")?;
                    let out = need(&cfg.output_dir, &last_out, "output_dir")?;
                    log(&format!(
                        "stage {}: masked-edit: {} with {} on {} scenes",
                        i + 1,
                        model.display(),
                        lora.display(),
                        cfg.scenes
                    ));
                    let rep = masked_edit::run(cfg, &model, &lora, &out, progress)?;
                    log(&format!("  wrote {}", rep.grid.display()));
                    for line in masked_edit::table(&rep) {
                        log(&format!("  {line}"));
                    }
                    reports.push(StageReport::Edited(rep));
                }
                Stage::Sft(cfg) => {
                    let mut cfg = cfg.clone();
                    match (cfg.previous, &last_model, &last_lora) {
                        (Some(Previous::Merge), Some(m), Some(a)) => {
                            let merged = cfg.output_dir.join("base-merged");
                            merge_into_folder(m, a, &merged)?;
                            log(&format!("  merged the previous adapter into {}", merged.display()));
                            cfg.model = merged;
                        }
                        (Some(Previous::Stack), _, _) => {
                            return Err(Error::Config(format!(
                                "stage {}: sft stages take previous = \"merge\" (stacking is for align stages)",
                                i + 1
                            )))
                        }
                        (Some(_), _, _) => {
                            return Err(Error::Config(format!(
                                "stage {}: `previous` needs a training stage before it",
                                i + 1
                            )))
                        }
                        _ => {}
                    }
                    log(&format!(
                        "stage {}: sft: {} on {} -> {}",
                        i + 1,
                        cfg.model.display(),
                        cfg.data.display(),
                        cfg.output_dir.display()
                    ));
                    let r = cfg.run(resume, !resume)?;
                    let s = &r.summary;
                    log(&format!(
                        "  {} rows, {} trainable parameters; {} steps in {:.0}s: loss {:.4} -> {:.4}; adapter {}",
                        r.rows, r.trainable, s.steps, s.seconds, s.first_loss, s.last_loss,
                        s.adapter_dir.display()
                    ));
                    if let (Some(a), Some(b)) = (r.history.first(), r.history.last()) {
                        let mut parts = vec![];
                        if a.eval_loss.is_finite() {
                            parts.push(format!(
                                "held-out loss {:.4} -> {:.4}",
                                a.eval_loss, b.eval_loss
                            ));
                        }
                        if a.reference_ppl.is_finite() {
                            parts.push(format!(
                                "reference perplexity {:.3} -> {:.3} (forgetting {:+.1}%)",
                                a.reference_ppl,
                                b.reference_ppl,
                                100.0 * b.forgetting
                            ));
                        }
                        log(&format!("  {}", parts.join("; ")));
                    }
                    last_model = Some(cfg.model.clone());
                    last_lora = Some(s.adapter_dir.clone());
                    last_out = Some(cfg.output_dir.clone());
                    reports.push(StageReport::FineTuned(Box::new(r)));
                }
                Stage::Align(cfg) => {
                    let mut cfg = cfg.clone();
                    match (cfg.previous, &last_model, &last_lora) {
                        (Some(p), Some(m), Some(a)) => {
                            // The record of the chain is always base + earlier adapters merged;
                            // stacking keeps the previous adapter separate while training.
                            let merged = cfg.output_dir.join("base-merged");
                            merge_into_folder(m, a, &merged)?;
                            match p {
                                Previous::Merge => cfg.model = merged,
                                Previous::Stack => {
                                    cfg.model = m.clone();
                                    cfg.previous_adapter = Some(a.clone());
                                }
                            }
                        }
                        (Some(_), _, _) => {
                            return Err(Error::Config(format!(
                                "stage {}: `previous` needs a training stage before it",
                                i + 1
                            )))
                        }
                        _ => {}
                    }
                    log(&format!(
                        "stage {}: align ({}): {} on {} -> {}",
                        i + 1,
                        cfg.loss,
                        cfg.model.display(),
                        cfg.data.display(),
                        cfg.output_dir.display()
                    ));
                    let r = cfg.run(resume, !resume)?;
                    let s = &r.summary;
                    log(&format!(
                        "  {} examples; {} steps in {:.0}s: loss {:.4} -> {:.4}; adapter {}",
                        r.examples,
                        s.steps,
                        s.seconds,
                        s.first_loss,
                        s.last_loss,
                        s.adapter_dir.display()
                    ));
                    if let Some((b, a)) = r.eval_accuracy {
                        log(&format!(
                            "  held-out preference accuracy (chosen has the higher mean log-prob): {:.1}% -> {:.1}%",
                            100.0 * b,
                            100.0 * a
                        ));
                    }
                    last_model = Some(match cfg.previous {
                        Some(Previous::Stack) => cfg.output_dir.join("base-merged"),
                        _ => cfg.model.clone(),
                    });
                    last_lora = Some(s.adapter_dir.clone());
                    last_out = Some(cfg.output_dir.clone());
                    reports.push(StageReport::Aligned(Box::new(r)));
                }
                Stage::TaskEval(cfg) => {
                    let model = cfg.model.clone().or(last_model.clone()).ok_or_else(|| {
                        Error::Config(format!(
                            "stage {}: task-eval has no `model` and no training stage before it",
                            i + 1
                        ))
                    })?;
                    let adapter = cfg.adapter.clone().or(last_lora.clone()).ok_or_else(|| {
                        Error::Config(format!(
                            "stage {}: task-eval has no `adapter` and no training stage before it",
                            i + 1
                        ))
                    })?;
                    log(&format!(
                        "stage {}: task-eval: {} with {}",
                        i + 1,
                        model.display(),
                        adapter.display()
                    ));
                    let rep = task_eval(cfg, &model, &adapter, progress)?;
                    log(&format!(
                        "  {:>10}  {:>8}  {:>8}",
                        "task", "before", "after"
                    ));
                    for (k, (c0, n0)) in &rep.before.per_task {
                        let (c1, n1) = rep.after.per_task.get(k).copied().unwrap_or((0, 0));
                        log(&format!(
                            "  {k:>10}  {:>7.0}%  {:>7.0}%",
                            100.0 * *c0 as f64 / (*n0).max(1) as f64,
                            100.0 * c1 as f64 / n1.max(1) as f64
                        ));
                    }
                    log(&format!(
                        "  {:>10}  {:>7.0}%  {:>7.0}%",
                        "all",
                        100.0 * rep.before.rate(),
                        100.0 * rep.after.rate()
                    ));
                    if let Some(out) = &last_out {
                        let json = serde_json::to_string_pretty(&rep)
                            .map_err(|e| Error::Msg(e.to_string()))?;
                        crate::util::write_atomic(&out.join("task_eval.json"), json.as_bytes())?;
                    }
                    reports.push(StageReport::TaskEvaluated(rep));
                }
            }
        }
        Ok(reports)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shipped pipelines stay inside every range.
    #[test]
    fn the_shipped_pipelines_pass_their_range_checks() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("pipelines");
        let mut n = 0;
        for e in std::fs::read_dir(&dir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "toml") {
                Recipe::load(&p).unwrap_or_else(|e| panic!("{e}"));
                n += 1;
            }
        }
        assert!(n >= 3, "{n} pipelines in {}", dir.display());
    }

    /// Every stage is checked at load, before stage 1 runs: the error names the file, the stage
    /// (number and kind), the key, the value and the range.
    #[test]
    fn a_bad_value_in_any_stage_is_found_at_load() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("p.toml");
        let stages = "[[stage]]\nkind = \"task-eval\"\ntasks = [\"add\"]\n\n[[stage]]\nkind = \"align\"\nmodel = \"m\"\ndata = \"d\"\noutput_dir = \"o\"\n";
        std::fs::write(&p, format!("{stages}beta = 0.2\n")).unwrap();
        Recipe::load(&p).unwrap();
        for (line, needle) in [
            (
                "beta = nan",
                "stage 2 (align): beta = NaN is out of range: it must be a finite number > 0",
            ),
            (
                "max_grad_norm = -1",
                "stage 2 (align): max_grad_norm = -1 is out of range",
            ),
            (
                "label_smoothing = inf",
                "stage 2 (align): label_smoothing = inf is out of range",
            ),
        ] {
            std::fs::write(&p, format!("{stages}{line}\n")).unwrap();
            let e = Recipe::load(&p).unwrap_err().to_string();
            assert!(e.contains(needle) && e.contains("p.toml"), "{line}: {e}");
        }
        std::fs::write(
            &p,
            "[[stage]]\nkind = \"diffusion-eval\"\nprompts = [\"a\"]\ncfg = nan\n",
        )
        .unwrap();
        let e = Recipe::load(&p).unwrap_err().to_string();
        assert!(e.contains("stage 1 (diffusion-eval): cfg = NaN"), "{e}");
    }
}
