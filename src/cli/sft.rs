use clap::Args as ClapArgs;
use postforge::text::sft::SftRunConfig;
use postforge::train::ScheduleKind;
use std::path::PathBuf;

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
    /// true | false | gaussian | pissa | pissa_niter_K | olora | loftq.
    #[arg(long, default_value = "true")]
    init_lora_weights: String,
    /// Adapter method: lora, ia3, loha, lokr or vera (--lora-alpha is LoHa/LoKr's alpha).
    #[arg(long, default_value = "lora")]
    peft_type: String,
    /// IA3: modules whose input is scaled (comma-separated or a regex), e.g. down_proj.
    #[arg(long)]
    feedforward_modules: Option<String>,
    /// Modules trained in full beside the adapter (comma-separated, e.g. embed_tokens).
    #[arg(long)]
    modules_to_save: Option<String>,
    /// LongLoRA: shifted sparse attention in training, groups of this share of the sequence (0.25).
    #[arg(long)]
    s2_attn_group_ratio: Option<f64>,
    /// LongLoRA: position interpolation (linear RoPE scaling) by this factor.
    #[arg(long)]
    position_interpolation: Option<f64>,
    /// LoftQ rounds (with --init-lora-weights loftq).
    #[arg(long, default_value_t = 1)]
    loftq_iter: usize,
    /// Quantize the base's linear layers to 4 bits: nf4 (QLoRA/QDoRA, double quantization),
    /// nf4-no-dq, or none. 4-bit checkpoints are read as NF4 regardless.
    #[arg(long, default_value = "none")]
    quantize: String,
    /// Train every linear layer and the embeddings in full (no adapters): the baseline.
    #[arg(long)]
    full_finetune: bool,
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

pub fn run(a: Args) -> anyhow::Result<()> {
    let cfg = SftRunConfig {
        model: a.model,
        data: a.data.clone(),
        eval_data: a.eval_data,
        reference: a.reference,
        replay: a.replay,
        replay_ratio: a.replay_ratio,
        eval_steps: a.eval_steps,
        max_forgetting: a.max_forgetting,
        stop_on_forgetting: a.stop_on_forgetting,
        r: a.r,
        lora_alpha: a.lora_alpha,
        lora_dropout: a.lora_dropout,
        target_modules: a.target_modules,
        use_dora: a.use_dora,
        use_rslora: a.use_rslora,
        init_lora_weights: a.init_lora_weights,
        loftq_iter: a.loftq_iter,
        peft_type: a.peft_type,
        feedforward_modules: a.feedforward_modules,
        modules_to_save: a.modules_to_save,
        s2_attn_group_ratio: a.s2_attn_group_ratio,
        position_interpolation: a.position_interpolation,
        quantize: a.quantize,
        full_finetune: a.full_finetune,
        chat_template: a.chat_template,
        max_length: a.max_length,
        packing: a.packing,
        completion_only_loss: a.completion_only_loss,
        assistant_only_loss: a.assistant_only_loss,
        learning_rate: a.learning_rate,
        lr_scheduler_type: a.lr_scheduler_type,
        warmup_steps: a.warmup_steps,
        max_steps: a.max_steps,
        num_train_epochs: a.num_train_epochs,
        per_device_train_batch_size: a.per_device_train_batch_size,
        gradient_accumulation_steps: a.gradient_accumulation_steps,
        max_grad_norm: a.max_grad_norm,
        weight_decay: a.weight_decay,
        save_steps: a.save_steps,
        seed: a.seed,
        output_dir: a.output_dir,
        previous: None,
    };
    let r = cfg.run(a.resume, a.overwrite_output_dir)?;
    let s = &r.summary;
    println!(
        "{}: {} rows, {} trainable parameters; trained {} steps in {:.0}s: loss {:.4} -> {:.4}; adapter in {}",
        a.data.display(),
        r.rows,
        r.trainable,
        s.steps,
        s.seconds,
        s.first_loss,
        s.last_loss,
        s.adapter_dir.display()
    );
    if let (Some(first), Some(last)) = (r.history.first(), r.history.last()) {
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
