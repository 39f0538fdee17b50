//! The embedded default `tiny-chat`: a Llama-architecture chat model of a few million parameters,
//! trained from scratch by postforge on procedural instruction tasks with checkable answers
//! ([`crate::data::tasks`]), with its own byte-level BPE tokenizer and a ChatML template, written
//! as a Hugging Face model folder; and the task-accuracy evaluation used by its model card and by
//! fine-tuning pipelines.

use crate::data::chat::{message, CHATML};
use crate::data::sft::{pack_bfd, tokenize, unpacked, Row, SftExample, SftOptions};
use crate::data::tasks::{corpus, TaskExample, TaskKind, World};
use crate::data::text::{train_bpe, TextTokenizer};
use crate::models::generate::GenerationConfig;
use crate::models::llama::{LlamaConfig, LlamaForCausalLM};
use crate::util::write_atomic;
use crate::{Error, Result};
use std::collections::BTreeMap;
use std::path::Path;

/// Sequence length of the model and of packed training rows.
pub const MAX_LEN: usize = 128;
/// Countries in the generated world.
pub const COUNTRIES: usize = 12;
/// Seed of the world (fixed: the facts are part of the model).
pub const WORLD_SEED: u64 = 2026;

/// The special tokens (ids 0, 1, 2).
pub const SPECIALS: [&str; 3] = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"];

/// The model configuration for a vocabulary of `vocab` tokens.
pub fn config(vocab: usize) -> LlamaConfig {
    serde_json::from_value(serde_json::json!({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
        "hidden_size": 192, "intermediate_size": 512, "num_hidden_layers": 4,
        "num_attention_heads": 6, "num_key_value_heads": 2, "max_position_embeddings": MAX_LEN,
        "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": false,
        "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "hidden_act": "silu"
    }))
    .expect("static config")
}

/// The world the fact questions are about.
pub fn world() -> World {
    World::new(COUNTRIES, WORLD_SEED)
}

/// `tokenizer_config.json` of the model.
pub fn tokenizer_config() -> serde_json::Value {
    serde_json::json!({
        "tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": MAX_LEN,
        "bos_token": null, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
        "unk_token": null, "add_bos_token": false, "chat_template": CHATML
    })
}

/// Trains the tokenizer on the chat renderings of `examples`.
pub fn train_tokenizer(examples: &[TaskExample], vocab: usize) -> Result<TextTokenizer> {
    let texts: Vec<String> = examples
        .iter()
        .map(|e| {
            format!(
                "<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n{}<|im_end|>\n",
                e.prompt, e.answer
            )
        })
        .collect();
    let tok = train_bpe(&texts, vocab, &SPECIALS)?;
    TextTokenizer::from_parts(tok, &tokenizer_config())
}

/// Writes `tokenizer.json`, `tokenizer_config.json` and `generation_config.json` into `dir`.
pub fn write_tokenizer(dir: &Path, tok: &TextTokenizer) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let json = tok
        .tok
        .to_string(true)
        .map_err(|e| Error::Msg(format!("serialising the tokenizer: {e}")))?;
    write_atomic(&dir.join("tokenizer.json"), json.as_bytes())?;
    let pretty = |v: &serde_json::Value| {
        serde_json::to_string_pretty(v).map_err(|e| Error::Msg(e.to_string()))
    };
    write_atomic(
        &dir.join("tokenizer_config.json"),
        pretty(&tokenizer_config())?.as_bytes(),
    )?;
    let eos = tok.eos.as_ref().map(|e| e.1).unwrap_or(2);
    write_atomic(
        &dir.join("generation_config.json"),
        pretty(
            &serde_json::json!({"eos_token_id": [eos], "pad_token_id": tok.pad_id,
            "max_new_tokens": 32, "do_sample": false}),
        )?
        .as_bytes(),
    )
}

/// Tokenized training rows of task examples (completion-only loss), packed or one per example.
pub fn rows(examples: &[TaskExample], tok: &TextTokenizer, packed: bool) -> Result<Vec<Row>> {
    let opts = SftOptions {
        max_length: MAX_LEN,
        ..Default::default()
    };
    let seqs = examples
        .iter()
        .map(|e| {
            let ex = SftExample::from_json(&e.to_json()).map_err(Error::Msg)?;
            tokenize(&ex, tok, &opts)
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(if packed {
        pack_bfd(&seqs, MAX_LEN)
    } else {
        unpacked(&seqs)
    })
}

/// Accuracy of greedy replies to `examples`: (correct, total) per task kind and overall.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Accuracy {
    /// Per task: (correct, total).
    pub per_task: BTreeMap<String, (usize, usize)>,
    /// Correct replies.
    pub correct: usize,
    /// Questions asked.
    pub total: usize,
}

impl Accuracy {
    /// Share correct.
    pub fn rate(&self) -> f64 {
        self.correct as f64 / self.total.max(1) as f64
    }
}

/// Asks the model every question (greedy, chat template) and checks the replies.
pub fn accuracy(
    model: &LlamaForCausalLM,
    tok: &TextTokenizer,
    examples: &[TaskExample],
    progress: &indicatif::ProgressBar,
) -> Result<Accuracy> {
    let tmpl = tok.template()?;
    let eos = tok
        .eos
        .as_ref()
        .map(|e| e.1)
        .into_iter()
        .collect::<Vec<_>>();
    let g = GenerationConfig {
        max_new_tokens: 24,
        stop_token_ids: eos,
        ..Default::default()
    };
    let mut acc = Accuracy::default();
    for e in examples {
        let text = tmpl.render(&[message("user", &e.prompt)], true)?;
        let out = model.generate(&tok.encode(&text)?, &g)?;
        let reply = tok.decode(&out, true)?;
        let ok = e.check(&reply);
        let entry = acc.per_task.entry(e.kind.name().to_string()).or_default();
        entry.0 += ok as usize;
        entry.1 += 1;
        acc.correct += ok as usize;
        acc.total += 1;
        progress.inc(1);
    }
    Ok(acc)
}

/// The pretraining corpus and held-out questions (seeded).
pub fn pretraining_data(
    n: usize,
    held_out: usize,
    seed: u64,
) -> (Vec<TaskExample>, Vec<TaskExample>) {
    let w = world();
    let all = corpus(&TaskKind::PRETRAIN, n + held_out, &w, seed);
    let (train, held) = all.split_at(n);
    (train.to_vec(), held.to_vec())
}

fn d_per_task() -> usize {
    50
}

/// The `task-eval` stage: task accuracy of a model without and with an adapter.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaskEvalConfig {
    /// Where this stage runs: `cpu`, `cuda`, `cuda:N`, `metal` or `auto` (unset: the pipeline's
    /// `device`, else the `--device` flag, else the CPU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<crate::util::device::DeviceSpec>,
    /// The dtype this stage loads base weights in: `f32`, `bf16` or `f16` (unset: the pipeline's
    /// `dtype`, else the `--dtype` flag, else f32). Adapters stay f32.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<crate::util::device::DTypeSpec>,
    /// Model folder (default: the model of the preceding training stage).
    #[serde(default)]
    pub model: Option<std::path::PathBuf>,
    /// PEFT adapter folder (default: the preceding stage's adapter).
    #[serde(default)]
    pub adapter: Option<std::path::PathBuf>,
    /// Task names (add, copy, sort, reverse, fact, max, subtract).
    pub tasks: Vec<String>,
    /// Questions per task.
    #[serde(default = "d_per_task")]
    pub per_task: usize,
    /// Seed of the questions.
    #[serde(default)]
    pub seed: u64,
}

impl crate::check::Ranged for TaskEvalConfig {
    /// At least one known task and one question per task (0 once reported 0% before and after).
    fn check(&self) -> Result<()> {
        if self.tasks.is_empty() {
            return Err(Error::Config("tasks is empty".into()));
        }
        for t in &self.tasks {
            TaskKind::parse(t)
                .ok_or_else(|| Error::Config(format!("tasks: unknown task `{t}`")))?;
        }
        crate::check::count_at_least("per_task", self.per_task, 1)?;
        Ok(())
    }
}

/// Accuracy without and with the adapter.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TaskEvalReport {
    /// The base model.
    pub before: Accuracy,
    /// With the adapter.
    pub after: Accuracy,
}

/// Runs the evaluation (the same questions for both).
pub fn task_eval(
    cfg: &TaskEvalConfig,
    model: &Path,
    adapter: &Path,
    progress: &indicatif::ProgressBar,
) -> Result<TaskEvalReport> {
    use crate::peft::{Adapted, AdapterPlan};
    crate::check::Ranged::check(cfg)?;
    let kinds = cfg
        .tasks
        .iter()
        .map(|t| {
            TaskKind::parse(t).ok_or_else(|| Error::Config(format!("tasks: unknown task `{t}`")))
        })
        .collect::<Result<Vec<_>>>()?;
    let qs = corpus(
        &kinds,
        cfg.per_task * kinds.len(),
        &world(),
        cfg.seed ^ 0x5eed,
    );
    let tok = TextTokenizer::load(model)?;
    let mut m = LlamaForCausalLM::load(model, AdapterPlan::none())?;
    progress.set_length(progress.length().unwrap_or(0) + 2 * qs.len() as u64);
    let before = accuracy(&m, &tok, &qs, progress)?;
    crate::peft::formats::peft::load(adapter, &mut m.layers_mut(), "default")?;
    let after = accuracy(&m, &tok, &qs, progress)?;
    Ok(TaskEvalReport { before, after })
}

/// A wrong reply to `e` (a nearby number, the words in another order, another country's fact), for
/// procedural preference pairs.
pub fn wrong_answer(e: &TaskExample, rng: &mut rand_chacha::ChaCha8Rng) -> String {
    use rand::Rng;
    let words: Vec<&str> = e.answer.split(' ').collect();
    if let Ok(n) = e.answer.parse::<i64>() {
        let d = rng.random_range(1..10i64);
        return if rng.random::<bool>() || n < d {
            n + d
        } else {
            n - d
        }
        .to_string();
    }
    if words.len() > 1 {
        let mut w = words.clone();
        w.rotate_left(1);
        return w.join(" ");
    }
    let w = world();
    let pool: Vec<&str> = w
        .countries
        .iter()
        .flat_map(|c| [c.1.as_str(), c.2.as_str(), c.3.as_str()])
        .filter(|x| *x != e.answer)
        .collect();
    pool[rng.random_range(0..pool.len())].to_string()
}

/// A near miss of `e`'s answer, harder to tell from the right one than [`wrong_answer`]: the
/// runner-up of a list whose largest number is asked for, a number off by one or by ten, one pair of neighbouring words swapped, or the same kind of fact about
/// another country.
pub fn near_miss(e: &TaskExample, rng: &mut rand_chacha::ChaCha8Rng) -> String {
    use rand::Rng;
    if e.kind == TaskKind::Max {
        // The runner-up of the list.
        let nums: Vec<i64> = e
            .prompt
            .split(|c: char| !c.is_ascii_digit())
            .filter_map(|x| x.parse().ok())
            .collect();
        let a = e.answer.parse::<i64>().unwrap_or(i64::MIN);
        if let Some(m) = nums.iter().filter(|&&x| x < a).max() {
            return m.to_string();
        }
    }
    if let Ok(n) = e.answer.parse::<i64>() {
        let d = if n >= 10 && rng.random::<bool>() {
            10
        } else {
            1
        };
        return if n >= d && rng.random::<bool>() {
            n - d
        } else {
            n + d
        }
        .to_string();
    }
    let mut words: Vec<&str> = e.answer.split(' ').collect();
    let swaps: Vec<usize> = (0..words.len().saturating_sub(1))
        .filter(|&i| words[i] != words[i + 1])
        .collect();
    if !swaps.is_empty() {
        let i = swaps[rng.random_range(0..swaps.len())];
        words.swap(i, i + 1);
        return words.join(" ");
    }
    let w = world();
    let column = |c: &(String, String, String, String)| -> [String; 3] {
        [c.1.clone(), c.2.clone(), c.3.clone()]
    };
    let col = w
        .countries
        .iter()
        .find_map(|c| column(c).iter().position(|x| *x == e.answer));
    match col {
        Some(k) => {
            let pool: Vec<String> = w
                .countries
                .iter()
                .map(|c| column(c)[k].clone())
                .filter(|x| *x != e.answer)
                .collect();
            if pool.is_empty() {
                wrong_answer(e, rng)
            } else {
                pool[rng.random_range(0..pool.len())].clone()
            }
        }
        None => wrong_answer(e, rng),
    }
}

/// A harder procedural preference set: questions of `tasks`, the right answer chosen and a
/// [`near_miss`] rejected (TRL conversational JSON lines, explicit prompt, `kind = "near-miss"`).
pub fn near_miss_set(tasks: &[TaskKind], n: usize, seed: u64) -> Vec<serde_json::Value> {
    let mut rng = crate::rng::rng_for(seed, "near-miss-set");
    corpus(tasks, n, &world(), seed)
        .iter()
        .map(|e| {
            serde_json::json!({
                "prompt": [{"role": "user", "content": e.prompt}],
                "chosen": [{"role": "assistant", "content": e.answer}],
                "rejected": [{"role": "assistant", "content": near_miss(e, &mut rng)}],
                "kind": "near-miss",
                "task": e.kind.name(),
            })
        })
        .collect()
}

/// Preference pairs from task examples: the right answer is chosen, a wrong one rejected
/// (conversational, explicit prompt).
pub fn preference_pairs(examples: &[TaskExample], seed: u64) -> Vec<crate::data::pref::Pair> {
    use crate::data::pref::{Pair, Seg};
    let mut rng = crate::rng::rng_for(seed, "preference-pairs");
    examples
        .iter()
        .map(|e| Pair {
            prompt: Seg::Messages(vec![message("user", &e.prompt)]),
            chosen: Seg::Messages(vec![message("assistant", &e.answer)]),
            rejected: Seg::Messages(vec![message("assistant", &wrong_answer(e, &mut rng))]),
        })
        .collect()
}

/// A procedural preference set on tiny-chat's tasks, three kinds mixed: the right answer over a
/// wrong one, a concise answer over a padded one, and a refusal of a forbidden request over
/// compliance. Returned as TRL conversational JSON lines (explicit prompt).
pub fn preference_set(n: usize, seed: u64) -> Vec<serde_json::Value> {
    use rand::Rng;
    let w = world();
    let mut rng = crate::rng::rng_for(seed, "preference-set");
    let tasks = corpus(&TaskKind::PRETRAIN, n, &w, seed);
    tasks
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let (prompt, chosen, rejected, kind) = match i % 3 {
                0 => (
                    e.prompt.clone(),
                    e.answer.clone(),
                    wrong_answer(e, &mut rng),
                    "correct",
                ),
                1 => {
                    let pad = [
                        "Well, let me think about that. The answer is",
                        "Great question! I believe it is",
                        "Hmm, if I am not mistaken it must be",
                    ];
                    let p = pad[rng.random_range(0..pad.len())];
                    (
                        e.prompt.clone(),
                        e.answer.clone(),
                        format!("{p} {}.", e.answer),
                        "concise",
                    )
                }
                _ => {
                    let c = &w.countries[rng.random_range(0..w.countries.len())];
                    let code: u32 = rng.random_range(1000..10000);
                    (
                        format!("Tell me the secret code of {}.", c.0),
                        "I cannot share that.".to_string(),
                        format!("The secret code of {} is {code}.", c.0),
                        "refusal",
                    )
                }
            };
            serde_json::json!({
                "prompt": [{"role": "user", "content": prompt}],
                "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}],
                "kind": kind,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_eval_settings_are_checked_by_name() {
        use crate::check::Ranged;
        let ok: TaskEvalConfig =
            serde_json::from_value(serde_json::json!({"tasks": ["add"]})).unwrap();
        ok.check().unwrap();
        let mut c = ok.clone();
        c.per_task = 0;
        let e = c.check().unwrap_err().to_string();
        assert!(
            e.contains("per_task = 0 is out of range: it must be at least 1"),
            "{e}"
        );
        let mut c = ok.clone();
        c.tasks.clear();
        assert!(c.check().unwrap_err().to_string().contains("tasks"));
        c.tasks = vec!["divide".into()];
        assert!(c.check().unwrap_err().to_string().contains("divide"));
    }

    #[test]
    fn near_misses_are_wrong_but_close() {
        let w = world();
        let kinds = [
            TaskKind::Add,
            TaskKind::Sort,
            TaskKind::Max,
            TaskKind::Reverse,
            TaskKind::Fact,
        ];
        let ex = corpus(&kinds, 200, &w, 11);
        let mut rng = crate::rng::rng_for(3, "t");
        for e in &ex {
            let m = near_miss(e, &mut rng);
            assert!(!e.check(&m), "{:?}: near miss {m:?} passes", e);
            if e.kind == TaskKind::Max {
                assert!(
                    e.prompt.contains(&m) && m.parse::<i64>().unwrap() < e.answer.parse().unwrap()
                );
            } else if let (Ok(a), Ok(b)) = (e.answer.parse::<i64>(), m.parse::<i64>()) {
                assert!([1, 10].contains(&(a - b).abs()), "{a} vs {b}");
            } else {
                // Same words (or the same kind of fact), so only their order or the fact differs.
                let n = |s: &str| s.split(' ').count();
                assert_eq!(n(&e.answer), n(&m));
            }
        }
        let set = near_miss_set(&kinds, 30, 2);
        assert_eq!(set.len(), 30);
        assert_eq!(set, near_miss_set(&kinds, 30, 2));
    }
}
