use anyhow::Context;
use clap::Args as ClapArgs;
use postforge::text::align_run::AlignRunConfig;
use std::path::PathBuf;

/// TRL's flag names and defaults (`--beta 0.1`, `--loss-type sigmoid`, `--learning-rate 1e-6`, ...)
/// and PEFT's adapter flags; `--config-file` reads the same keys from TOML.
#[derive(ClapArgs, Debug)]
pub struct Args {
    #[arg(long)]
    config_file: Option<PathBuf>,
    /// Model folder.
    #[arg(long)]
    model: Option<PathBuf>,
    /// Preference JSONL.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Held-out preference pairs: preference accuracy before and after training in the report.
    #[arg(long)]
    eval_data: Option<PathBuf>,
    /// dpo | ipo | simpo | cpo | orpo | kto.
    #[arg(long)]
    loss: Option<String>,
    /// DPO: sigmoid, hinge, ipo, robust, bco_pair, sppo_hard, nca_pair, apo_zero, apo_down,
    /// sigmoid_norm, exo_pair, discopop, sft (several allowed); CPO: sigmoid, hinge, ipo, simpo;
    /// KTO: kto, apo_zero_unpaired.
    #[arg(long, num_args = 1..)]
    loss_type: Vec<String>,
    #[arg(long, num_args = 1..)]
    loss_weights: Vec<f64>,
    #[arg(long)]
    beta: Option<f64>,
    #[arg(long)]
    label_smoothing: Option<f64>,
    /// reverse_kl | forward_kl | js_divergence | alpha_divergence.
    #[arg(long)]
    f_divergence_type: Option<String>,
    #[arg(long)]
    simpo_gamma: Option<f64>,
    #[arg(long)]
    cpo_alpha: Option<f64>,
    #[arg(long)]
    desirable_weight: Option<f64>,
    #[arg(long)]
    undesirable_weight: Option<f64>,
    /// Compute reference log-probs once and cache them on disk.
    #[arg(long)]
    precompute_ref_logps: bool,
    /// Start from this adapter; a frozen copy of it is the reference.
    #[arg(long)]
    ref_adapter: Option<PathBuf>,
    #[arg(long)]
    r: Option<usize>,
    #[arg(long)]
    lora_alpha: Option<f64>,
    #[arg(long)]
    lora_dropout: Option<f64>,
    #[arg(long)]
    target_modules: Option<String>,
    #[arg(long)]
    use_dora: bool,
    #[arg(long)]
    use_rslora: bool,
    #[arg(long)]
    init_lora_weights: Option<String>,
    /// Adapter method: lora, ia3, loha, lokr or vera.
    #[arg(long)]
    peft_type: Option<String>,
    /// IA3: modules whose input is scaled (comma-separated or a regex).
    #[arg(long)]
    feedforward_modules: Option<String>,
    /// Modules trained in full beside the adapter (comma-separated).
    #[arg(long)]
    modules_to_save: Option<String>,
    /// LoftQ rounds (with --init-lora-weights loftq).
    #[arg(long)]
    loftq_iter: Option<usize>,
    /// Quantize the base's linear layers to NF4 (QLoRA/QDoRA alignment): nf4, nf4-no-dq, none.
    #[arg(long)]
    quantize: Option<String>,
    #[arg(long)]
    chat_template: Option<String>,
    #[arg(long)]
    max_length: Option<usize>,
    #[arg(long)]
    learning_rate: Option<f64>,
    /// linear (TRL's default), cosine, constant.
    #[arg(long, value_enum)]
    lr_scheduler_type: Option<postforge::train::ScheduleKind>,
    #[arg(long)]
    warmup_steps: Option<usize>,
    #[arg(long)]
    max_steps: Option<usize>,
    #[arg(long)]
    num_train_epochs: Option<usize>,
    #[arg(long)]
    per_device_train_batch_size: Option<usize>,
    #[arg(long)]
    gradient_accumulation_steps: Option<usize>,
    #[arg(long)]
    save_steps: Option<usize>,
    #[arg(long)]
    seed: Option<u64>,
    #[arg(long)]
    output_dir: Option<PathBuf>,
    #[arg(long)]
    resume: bool,
    #[arg(long)]
    overwrite_output_dir: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let mut v = match &a.config_file {
        Some(p) => {
            let text =
                std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
            let t: toml::Table =
                toml::from_str(&text).with_context(|| format!("parsing {}", p.display()))?;
            serde_json::to_value(t)?
        }
        None => serde_json::json!({}),
    };
    let o = v
        .as_object_mut()
        .context("the config file must be a table")?;
    macro_rules! opt {
        ($($f:ident),*) => {$(
            if let Some(x) = &a.$f { o.insert(stringify!($f).into(), serde_json::to_value(x)?); }
        )*};
    }
    opt!(
        model,
        data,
        eval_data,
        loss,
        beta,
        label_smoothing,
        f_divergence_type,
        simpo_gamma,
        cpo_alpha,
        desirable_weight,
        undesirable_weight,
        ref_adapter,
        r,
        lora_alpha,
        lora_dropout,
        target_modules,
        init_lora_weights,
        peft_type,
        feedforward_modules,
        modules_to_save,
        loftq_iter,
        quantize,
        chat_template,
        max_length,
        learning_rate,
        lr_scheduler_type,
        warmup_steps,
        max_steps,
        num_train_epochs,
        per_device_train_batch_size,
        gradient_accumulation_steps,
        save_steps,
        seed,
        output_dir
    );
    if !a.loss_type.is_empty() {
        o.insert("loss_type".into(), serde_json::to_value(&a.loss_type)?);
    }
    if !a.loss_weights.is_empty() {
        o.insert(
            "loss_weights".into(),
            serde_json::to_value(&a.loss_weights)?,
        );
    }
    for (flag, key) in [
        (a.precompute_ref_logps, "precompute_ref_logps"),
        (a.use_dora, "use_dora"),
        (a.use_rslora, "use_rslora"),
    ] {
        if flag {
            o.insert(key.into(), true.into());
        }
    }
    if !o.contains_key("output_dir") {
        o.insert("output_dir".into(), "runs/align".into());
    }
    for need in ["model", "data"] {
        if !o.contains_key(need) {
            anyhow::bail!("--{need} is required (on the command line or in --config-file)");
        }
    }
    let cfg: AlignRunConfig =
        serde_json::from_value(v).context("invalid alignment configuration")?;
    let r = cfg.run(a.resume, a.overwrite_output_dir)?;
    let s = &r.summary;
    println!(
        "{}: {} examples; {} steps in {:.0}s: loss {:.4} -> {:.4}; adapter in {} (metrics.jsonl has TRL's rewards/*, logps/* ...)",
        r.method, r.examples, s.steps, s.seconds, s.first_loss, s.last_loss, s.adapter_dir.display()
    );
    if let Some((b, a)) = r.eval_accuracy {
        println!(
            "held-out preference accuracy (chosen has the higher mean log-prob): {:.1}% -> {:.1}%",
            100.0 * b,
            100.0 * a
        );
    }
    Ok(())
}
