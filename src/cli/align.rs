use anyhow::Context;
use clap::{ArgMatches, Args as ClapArgs};
use postforge::peft::args::AdapterArgs;
use postforge::text::align_run::AlignRunConfig;
use serde::Serialize;
use std::path::PathBuf;

/// TRL's flag names and defaults (`--beta 0.1`, `--loss-type sigmoid`, `--learning-rate 1e-6`, ...)
/// and PEFT's adapter flags; `--config-file` reads the same keys from TOML.
#[derive(ClapArgs, Debug, Serialize)]
pub struct Args {
    /// TOML file with the same keys as a pipeline's `align` stage; flags given here override it.
    #[arg(long)]
    #[serde(skip)]
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
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    precompute_ref_logps: bool,
    /// Start from this adapter; a frozen copy of it is the reference.
    #[arg(long)]
    ref_adapter: Option<PathBuf>,
    #[command(flatten)]
    #[serde(flatten)]
    adapter: AdapterArgs,
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
    /// Continue from the newest checkpoint.
    #[arg(long)]
    #[serde(skip)]
    resume: bool,
    /// Start afresh even if the output folder holds checkpoints.
    #[arg(long)]
    #[serde(skip)]
    overwrite_output_dir: bool,
}

pub fn run(a: Args, given: &ArgMatches) -> anyhow::Result<()> {
    let file = a.config_file.as_deref();
    let v = super::overlay::settings(
        file,
        &a,
        given,
        &[("output_dir", "runs/align".into())],
        &["model", "data"],
    )?;
    let cfg: AlignRunConfig = serde_json::from_value(v)
        .with_context(|| super::overlay::context(file, "alignment settings"))?;
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
