use anyhow::Context;
use clap::{ArgMatches, Args as ClapArgs};
use postforge::check::{self, Ranged};
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
    /// Weights of several DPO loss types, one per --loss-type, each ≥ 0.
    #[arg(long, num_args = 1.., value_parser = check::non_negative)]
    loss_weights: Vec<f64>,
    /// β, > 0 (ORPO's λ: ≥ 0) [default: 0.1].
    #[arg(long, value_parser = check::non_negative)]
    beta: Option<f64>,
    /// Label smoothing ε (conservative DPO, robust, exo_pair, CPO, SimPO), in [0, 0.5)
    /// [default: 0].
    #[arg(long, value_parser = check::label_smoothing)]
    label_smoothing: Option<f64>,
    /// reverse_kl | forward_kl | js_divergence | alpha_divergence.
    #[arg(long)]
    f_divergence_type: Option<String>,
    /// SimPO's target reward margin γ, ≥ 0 [default: 0.5].
    #[arg(long, value_parser = check::non_negative)]
    simpo_gamma: Option<f64>,
    /// Weight of CPO's NLL term, ≥ 0 [default: 1].
    #[arg(long, value_parser = check::non_negative)]
    cpo_alpha: Option<f64>,
    /// KTO's weight of the desirable examples, > 0 [default: 1].
    #[arg(long, value_parser = check::positive)]
    desirable_weight: Option<f64>,
    /// KTO's weight of the undesirable examples, > 0 [default: 1].
    #[arg(long, value_parser = check::positive)]
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
    /// Longest prompt + completion, ≥ 2 [default: 1024].
    #[arg(long, value_parser = check::count_2)]
    max_length: Option<usize>,
    /// Peak learning rate, > 0 [default: 1e-6].
    #[arg(long, value_parser = check::positive)]
    learning_rate: Option<f64>,
    /// linear (TRL's default), cosine, constant.
    #[arg(long, value_enum)]
    lr_scheduler_type: Option<postforge::train::ScheduleKind>,
    #[arg(long)]
    warmup_steps: Option<usize>,
    /// Optimizer steps, ≥ 1 [default: the epochs].
    #[arg(long, value_parser = check::count)]
    max_steps: Option<usize>,
    /// Epochs when --max-steps is not given, ≥ 1 [default: 3].
    #[arg(long, value_parser = check::count)]
    num_train_epochs: Option<usize>,
    /// Pairs (or unpaired examples) per micro-batch, ≥ 1 [default: 8].
    #[arg(long, value_parser = check::count)]
    per_device_train_batch_size: Option<usize>,
    /// Micro-batches per optimizer step, ≥ 1 [default: 1].
    #[arg(long, value_parser = check::count)]
    gradient_accumulation_steps: Option<usize>,
    /// Gradient clipping: the largest global gradient norm, ≥ 0 (0 = off) [default: 1].
    #[arg(long, value_parser = check::non_negative)]
    max_grad_norm: Option<f64>,
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
    let cfg: AlignRunConfig = super::overlay::deserialize(v, file, "alignment settings")?;
    cfg.check()
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
