use anyhow::Context;
use clap::Args as ClapArgs;
use postforge::align::sft::{MonitorConfig, SftTask};
use postforge::data::chat::ChatTemplate;
use postforge::data::sft::{pack_bfd, read_jsonl, tokenize, unpacked, Row, SftOptions};
use postforge::data::text::TextTokenizer;
use postforge::models::llama::LlamaForCausalLM;
use postforge::peft::{Adapted, AdapterConfig, AdapterPlan, InitSpec, ModuleSpec};
use postforge::train::{ScheduleKind, TrainConfig, Trainer};
use std::path::{Path, PathBuf};

/// Adapter flags carry PEFT's names and defaults; training flags TRL's `SFTConfig` names.
#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Model folder (Hugging Face layout: config.json, safetensors, tokenizer.json).
    #[arg(long)]
    model: PathBuf,
    /// Training data (JSONL: text, prompt/completion, or messages).
    #[arg(long)]
    data: PathBuf,
    /// Held-out task data for the evaluation loss.
    #[arg(long)]
    eval_data: Option<PathBuf>,
    /// General reference text (JSONL) whose perplexity measures forgetting.
    #[arg(long)]
    reference: Option<PathBuf>,
    /// General data mixed into training batches (replay buffer).
    #[arg(long)]
    replay: Option<PathBuf>,
    /// Share of batch slots given to replay data.
    #[arg(long, default_value_t = 0.05)]
    replay_ratio: f64,
    /// Evaluate every N steps.
    #[arg(long, default_value_t = 50)]
    eval_steps: usize,
    /// Warn when reference perplexity rises by more than this fraction (e.g. 0.1).
    #[arg(long)]
    max_forgetting: Option<f64>,
    /// Stop instead of warning when --max-forgetting is exceeded.
    #[arg(long)]
    stop_on_forgetting: bool,
    /// LoRA rank.
    #[arg(long, default_value_t = 8)]
    r: usize,
    /// LoRA alpha.
    #[arg(long, default_value_t = 8.0)]
    lora_alpha: f64,
    /// Adapter dropout.
    #[arg(long, default_value_t = 0.0)]
    lora_dropout: f64,
    /// Comma-separated module names, a regex, or all-linear.
    #[arg(long, default_value = "all-linear")]
    target_modules: String,
    /// DoRA.
    #[arg(long)]
    use_dora: bool,
    /// rsLoRA scaling.
    #[arg(long)]
    use_rslora: bool,
    /// true | false | gaussian | pissa | pissa_niter_K | olora.
    #[arg(long, default_value = "true")]
    init_lora_weights: String,
    /// Built-in chat template (chatml, llama3, vicuna) for models without one.
    #[arg(long)]
    chat_template: Option<String>,
    /// Longest sequence.
    #[arg(long, default_value_t = 1024)]
    max_length: usize,
    /// Pack sequences (best-fit decreasing, no cross-attention).
    #[arg(long)]
    packing: bool,
    /// Loss on completions only (default: yes for prompt/completion data).
    #[arg(long)]
    completion_only_loss: Option<bool>,
    /// Loss on assistant turns only.
    #[arg(long)]
    assistant_only_loss: bool,
    #[arg(long, default_value_t = 2e-5)]
    learning_rate: f64,
    #[arg(long, value_enum, default_value_t = ScheduleKind::Linear)]
    lr_scheduler_type: ScheduleKind,
    #[arg(long, default_value_t = 0)]
    warmup_steps: usize,
    /// Optimizer steps (default: 3 epochs).
    #[arg(long)]
    max_steps: Option<usize>,
    #[arg(long, default_value_t = 3)]
    num_train_epochs: usize,
    #[arg(long, default_value_t = 8)]
    per_device_train_batch_size: usize,
    #[arg(long, default_value_t = 1)]
    gradient_accumulation_steps: usize,
    #[arg(long, default_value_t = 1.0)]
    max_grad_norm: f64,
    #[arg(long, default_value_t = 0.0)]
    weight_decay: f64,
    #[arg(long, default_value_t = 0)]
    save_steps: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    #[arg(long, default_value = "runs/sft")]
    output_dir: PathBuf,
    /// Continue from the newest checkpoint.
    #[arg(long)]
    resume: bool,
    /// Start afresh even if the output folder holds checkpoints.
    #[arg(long)]
    overwrite_output_dir: bool,
}

fn rows(path: &Path, tok: &TextTokenizer, o: &SftOptions, packing: bool) -> anyhow::Result<Vec<Row>> {
    let ex = read_jsonl(path)?;
    let seqs = ex
        .iter()
        .enumerate()
        .map(|(i, e)| tokenize(e, tok, o).with_context(|| format!("{}: example {}", path.display(), i + 1)))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(if packing {
        pack_bfd(&seqs, o.max_length)
    } else {
        unpacked(&seqs)
    })
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let mut tok = TextTokenizer::load(&a.model)?;
    if let Some(name) = &a.chat_template {
        let bos = tok.bos.as_ref().map(|b| b.0.clone()).unwrap_or_default();
        let eos = tok.eos.as_ref().map(|b| b.0.clone()).unwrap_or_default();
        tok.chat_template = Some(ChatTemplate::builtin(name, &bos, &eos)?);
    }
    let opts = SftOptions {
        max_length: a.max_length,
        completion_only_loss: a.completion_only_loss,
        assistant_only_loss: a.assistant_only_loss,
    };
    let train = rows(&a.data, &tok, &opts, a.packing)?;
    let adapter = AdapterConfig {
        r: a.r,
        lora_alpha: a.lora_alpha,
        lora_dropout: a.lora_dropout,
        target_modules: Some(ModuleSpec::parse_cli(&a.target_modules)),
        use_dora: a.use_dora,
        use_rslora: a.use_rslora,
        init_lora_weights: InitSpec::parse_cli(&a.init_lora_weights),
        base_model_name_or_path: Some(a.model.display().to_string()),
        task_type: Some("CAUSAL_LM".into()),
        ..Default::default()
    };
    let model = LlamaForCausalLM::load(&a.model, AdapterPlan::single(adapter.clone(), a.seed)?)?;
    let n_train: usize = model.trainable().iter().map(|(_, v)| v.elem_count()).sum();
    println!("{}: {} rows, {n_train} trainable parameters", a.data.display(), train.len());
    let bs = a.per_device_train_batch_size;
    let steps = a
        .max_steps
        .unwrap_or(a.num_train_epochs * train.len().div_ceil(bs) / a.gradient_accumulation_steps.max(1));
    let mut task = SftTask::new(model, adapter, train, bs, tok.pad_id, a.seed)?;
    if let Some(r) = &a.replay {
        task = task.with_replay(rows(r, &tok, &opts, false)?, a.replay_ratio)?;
    }
    if a.eval_data.is_some() || a.reference.is_some() {
        let held = match &a.eval_data {
            Some(p) => rows(p, &tok, &opts, false)?,
            None => vec![],
        };
        let reference = match &a.reference {
            Some(p) => rows(p, &tok, &opts, false)?,
            None => vec![],
        };
        task = task.with_monitor(
            held,
            reference,
            MonitorConfig {
                eval_steps: a.eval_steps,
                max_forgetting: a.max_forgetting,
                stop_on_forgetting: a.stop_on_forgetting,
            },
        );
    }
    let trainer = Trainer::new(TrainConfig {
        learning_rate: a.learning_rate,
        lr_scheduler: a.lr_scheduler_type,
        warmup_steps: a.warmup_steps,
        max_steps: steps,
        gradient_accumulation_steps: a.gradient_accumulation_steps,
        max_grad_norm: (a.max_grad_norm > 0.0).then_some(a.max_grad_norm),
        weight_decay: a.weight_decay,
        save_steps: a.save_steps,
        seed: a.seed,
        output_dir: a.output_dir.clone(),
        overwrite_output_dir: a.overwrite_output_dir,
        ..Default::default()
    })?;
    let s = trainer.train(&mut task, a.resume)?;
    println!(
        "trained {} steps in {:.0}s: loss {:.4} -> {:.4}; adapter in {}",
        s.steps,
        s.seconds,
        s.first_loss,
        s.last_loss,
        s.adapter_dir.display()
    );
    if let (Some(first), Some(last)) = (task.history.first(), task.history.last()) {
        println!(
            "held-out loss {:.4} -> {:.4}; reference perplexity {:.3} -> {:.3} (forgetting {:+.1}%)",
            first.eval_loss,
            last.eval_loss,
            first.reference_ppl,
            last.reference_ppl,
            100.0 * last.forgetting
        );
    }
    Ok(())
}
