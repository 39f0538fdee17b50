//! The alignment experiment table: for each training run (its adapter and `run_report.json`),
//! held-out preference accuracy, generation accuracy on checkable tasks and reference perplexity
//! (forgetting), before and after the adapter, with the run's method, steps and wall time.

use super::tiny_chat::{accuracy, world};
use crate::data::pref::{read_pairs, tokenize_pc, Seq};
use crate::data::sft::{tokenize, unpacked, SftOptions};
use crate::data::tasks::{corpus, TaskKind};
use crate::data::text::TextTokenizer;
use crate::models::llama::{Inputs, LlamaForCausalLM};
use crate::peft::{Adapted, AdapterPlan, ForwardCtx};
use crate::{Error, Result};
use std::path::{Path, PathBuf};

/// What to measure.
#[derive(Debug, Clone)]
pub struct EvalSets {
    /// Held-out preference pairs (tokenized).
    pub pairs: Vec<(Seq, Seq)>,
    /// Task questions.
    pub questions: Vec<crate::data::tasks::TaskExample>,
    /// General reference rows (perplexity).
    pub reference: Vec<crate::data::sft::Row>,
}

/// One model's figures.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Figures {
    /// Share of pairs whose chosen completion has the higher mean log-prob.
    pub preference_accuracy: f64,
    /// Share of task questions answered exactly.
    pub generation_accuracy: f64,
    /// Perplexity on the reference set.
    pub reference_ppl: f64,
}

/// One row of the table.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EvalRow {
    /// Run folder.
    pub run: PathBuf,
    /// Method.
    pub method: String,
    /// Steps.
    pub steps: u64,
    /// Wall time of the training, seconds.
    pub seconds: f64,
    /// Without the adapter.
    pub before: Figures,
    /// With it.
    pub after: Figures,
}

/// Builds the evaluation sets.
pub fn sets(
    tok: &TextTokenizer,
    pairs: &Path,
    tasks: &[TaskKind],
    per_task: usize,
    reference: Option<&Path>,
    seed: u64,
) -> Result<EvalSets> {
    let pairs = read_pairs(pairs)?
        .iter()
        .map(|p| -> Result<(Seq, Seq)> {
            Ok((
                tokenize_pc(&p.prompt, &p.chosen, tok, 256)?,
                tokenize_pc(&p.prompt, &p.rejected, tok, 256)?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let questions = corpus(tasks, per_task * tasks.len(), &world(), seed ^ 0xe7a1);
    let reference = match reference {
        Some(p) => {
            let ex = crate::data::sft::read_jsonl(p)?;
            let seqs = ex
                .iter()
                .map(|e| {
                    tokenize(
                        e,
                        tok,
                        &SftOptions {
                            max_length: 256,
                            ..Default::default()
                        },
                    )
                })
                .collect::<Result<Vec<_>>>()?;
            unpacked(&seqs)
        }
        None => vec![],
    };
    Ok(EvalSets {
        pairs,
        questions,
        reference,
    })
}

fn mean_logp(m: &LlamaForCausalLM, seqs: &[&Seq], pad: u32) -> Result<Vec<f32>> {
    let (ids, cm, am) = super::align_task::collate(seqs, pad)?;
    let logits = m.forward(
        &ids,
        &Inputs {
            attention_mask: Some(&am),
            ..Default::default()
        },
        &ForwardCtx::eval(),
    )?;
    Ok(crate::align::logps::sequence_logps(&logits, &ids, &cm)?
        .mean()?
        .to_vec1::<f32>()?)
}

/// Measures one model.
pub fn figures(
    m: &LlamaForCausalLM,
    tok: &TextTokenizer,
    s: &EvalSets,
    progress: &indicatif::ProgressBar,
) -> Result<Figures> {
    let mut right = 0;
    for chunk in s.pairs.chunks(16) {
        let seqs: Vec<&Seq> = chunk
            .iter()
            .map(|p| &p.0)
            .chain(chunk.iter().map(|p| &p.1))
            .collect();
        let v = mean_logp(m, &seqs, tok.pad_id)?;
        let b = chunk.len();
        right += (0..b).filter(|&i| v[i] > v[b + i]).count();
    }
    let acc = accuracy(m, tok, &s.questions, progress)?;
    let (mut sum, mut n) = (0f64, 0usize);
    for chunk in s.reference.chunks(16) {
        let rows: Vec<&crate::data::sft::Row> = chunk.iter().collect();
        let b = crate::data::sft::collate(&rows, tok.pad_id)?;
        let l = m
            .next_token_loss(
                &b.ids,
                &Inputs {
                    attention_mask: Some(&b.attention_mask),
                    ..Default::default()
                },
                &b.weights,
                &ForwardCtx::eval(),
            )?
            .to_scalar::<f32>()? as f64;
        sum += l * b.num_tokens as f64;
        n += b.num_tokens;
    }
    Ok(Figures {
        preference_accuracy: right as f64 / s.pairs.len().max(1) as f64,
        generation_accuracy: acc.rate(),
        reference_ppl: if n > 0 {
            (sum / n as f64).exp()
        } else {
            f64::NAN
        },
    })
}

/// Evaluates a run folder (`adapter/`, `run_report.json`, and `base-merged/` when the run started
/// from merged earlier stages; otherwise `model`).
pub fn evaluate_run(
    run: &Path,
    model: &Path,
    s: &EvalSets,
    progress: &indicatif::ProgressBar,
) -> Result<EvalRow> {
    let report: serde_json::Value =
        crate::util::read_optional_json(&run.join("run_report.json"))?.unwrap_or_default();
    let base = if run.join("base-merged/config.json").exists() {
        run.join("base-merged")
    } else {
        model.to_path_buf()
    };
    let tok = TextTokenizer::load(&base)?;
    let mut m = LlamaForCausalLM::load(&base, AdapterPlan::none())?;
    let before = figures(&m, &tok, s, progress)?;
    let adapter = run.join("adapter");
    if !adapter.join("adapter_config.json").exists() {
        return Err(Error::format(
            run,
            "no adapter/ (a finished training run folder is expected)",
        ));
    }
    crate::peft::formats::peft::load(&adapter, &mut m.layers_mut(), "default")?;
    let after = figures(&m, &tok, s, progress)?;
    Ok(EvalRow {
        run: run.to_path_buf(),
        method: report["method"].as_str().unwrap_or("?").to_string(),
        steps: report["steps"].as_u64().unwrap_or(0),
        seconds: report["seconds"].as_f64().unwrap_or(f64::NAN),
        before,
        after,
    })
}

/// The table as Markdown.
pub fn table(rows: &[EvalRow]) -> String {
    let mut s = String::from(
        "| run | method | steps | wall s | pref. acc. before → after | gen. acc. before → after | ref. ppl before → after |\n|---|---|---|---|---|---|---|\n",
    );
    for r in rows {
        s += &format!(
            "| {} | {} | {} | {:.0} | {:.1}% → {:.1}% | {:.1}% → {:.1}% | {:.3} → {:.3} |\n",
            r.run.display(),
            r.method,
            r.steps,
            r.seconds,
            100.0 * r.before.preference_accuracy,
            100.0 * r.after.preference_accuracy,
            100.0 * r.before.generation_accuracy,
            100.0 * r.after.generation_accuracy,
            r.before.reference_ppl,
            r.after.reference_ppl
        );
    }
    s
}
