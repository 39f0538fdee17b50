use anyhow::Context;
use clap::{ArgMatches, Args as ClapArgs};
use postforge::check::{self, Ranged};
use postforge::peft::args::AdapterArgs;
use postforge::text::sft::SftRunConfig;
use postforge::train::ScheduleKind;
use serde::Serialize;
use std::path::PathBuf;

/// Adapter flags carry PEFT's names and defaults (shared with `align` and pipeline stages);
/// training flags TRL's `SFTConfig` names; `--config-file` reads the same keys from TOML.
#[derive(ClapArgs, Debug, Serialize)]
pub struct Args {
    /// TOML file with the same keys as a pipeline's `sft` stage; flags given here override it.
    #[arg(long)]
    #[serde(skip)]
    config_file: Option<PathBuf>,
    /// Model folder (Hugging Face layout: config.json, safetensors, tokenizer.json).
    #[arg(long)]
    model: Option<PathBuf>,
    /// Training data (JSONL: text, prompt/completion, or messages).
    #[arg(long)]
    data: Option<PathBuf>,
    /// Held-out task data for the evaluation loss.
    #[arg(long)]
    eval_data: Option<PathBuf>,
    /// General reference text (JSONL) whose perplexity measures forgetting.
    #[arg(long)]
    reference: Option<PathBuf>,
    /// General data mixed into training batches (replay buffer).
    #[arg(long)]
    replay: Option<PathBuf>,
    /// Share of batch slots given to replay data, in [0, 1].
    #[arg(long, default_value_t = 0.05, value_parser = check::unit)]
    replay_ratio: f64,
    /// Evaluate every N steps.
    #[arg(long, default_value_t = 50)]
    eval_steps: usize,
    /// Warn when reference perplexity rises by more than this fraction (e.g. 0.1), ≥ 0.
    #[arg(long, value_parser = check::non_negative)]
    max_forgetting: Option<f64>,
    /// Stop instead of warning when --max-forgetting is exceeded.
    #[arg(long)]
    stop_on_forgetting: bool,
    #[command(flatten)]
    #[serde(flatten)]
    adapter: AdapterArgs,
    /// LongLoRA: shifted sparse attention in training, groups of this share of the sequence (0.25),
    /// in (0, 1].
    #[arg(long, value_parser = check::fraction)]
    s2_attn_group_ratio: Option<f64>,
    /// LongLoRA: position interpolation (linear RoPE scaling) by this factor, ≥ 1.
    #[arg(long, value_parser = check::at_least_one)]
    position_interpolation: Option<f64>,
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
    /// Longest sequence, ≥ 2.
    #[arg(long, default_value_t = 1024, value_parser = check::count_2)]
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
    /// Peak learning rate, > 0.
    #[arg(long, default_value_t = 2e-5, value_parser = check::positive)]
    learning_rate: f64,
    #[arg(long, value_enum, default_value_t = ScheduleKind::Linear)]
    lr_scheduler_type: ScheduleKind,
    #[arg(long, default_value_t = 0)]
    warmup_steps: usize,
    /// Optimizer steps, ≥ 1 (default: the epochs).
    #[arg(long, value_parser = check::count)]
    max_steps: Option<usize>,
    /// Epochs when --max-steps is not given, ≥ 1.
    #[arg(long, default_value_t = 3, value_parser = check::count)]
    num_train_epochs: usize,
    /// Rows per micro-batch, ≥ 1.
    #[arg(long, default_value_t = 8, value_parser = check::count)]
    per_device_train_batch_size: usize,
    /// Micro-batches per optimizer step, ≥ 1.
    #[arg(long, default_value_t = 1, value_parser = check::count)]
    gradient_accumulation_steps: usize,
    /// Gradient clipping: the largest global gradient norm, ≥ 0 (0 = off).
    #[arg(long, default_value_t = 1.0, value_parser = check::non_negative)]
    max_grad_norm: f64,
    /// AdamW weight decay, ≥ 0.
    #[arg(long, default_value_t = 0.0, value_parser = check::non_negative)]
    weight_decay: f64,
    #[arg(long, default_value_t = 0)]
    save_steps: usize,
    #[arg(long, default_value_t = 42)]
    seed: u64,
    #[arg(long, default_value = "runs/sft")]
    output_dir: PathBuf,
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
        &[("output_dir", "runs/sft".into())],
        &["model", "data"],
    )?;
    let cfg: SftRunConfig = super::overlay::deserialize(v, file, "SFT settings")?;
    cfg.check()
        .with_context(|| super::overlay::context(file, "SFT settings"))?;
    let data = cfg.data.clone();
    let r = cfg.run(a.resume, a.overwrite_output_dir)?;
    let s = &r.summary;
    println!(
        "{}: {} rows, {} trainable parameters; trained {} steps in {:.0}s: loss {:.4} -> {:.4}; adapter in {}",
        data.display(),
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::{CommandFactory, FromArgMatches};

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        a: Args,
    }

    /// The defaults `sft --help` shows are the ones a pipeline stage gets: parsing no flags and
    /// serializing every field gives the same configuration as the bare table.
    #[test]
    fn flag_defaults_are_the_stage_defaults() {
        let m = Cli::command().get_matches_from(["sft", "--model", "m", "--data", "d"]);
        let a = Cli::from_arg_matches(&m).unwrap().a;
        let mut all = serde_json::to_value(&a).unwrap();
        all.as_object_mut().unwrap().retain(|_, v| !v.is_null());
        let from_flags: SftRunConfig = serde_json::from_value(all).unwrap();
        let bare = super::super::overlay::settings(
            None,
            &a,
            &m,
            &[("output_dir", "runs/sft".into())],
            &[],
        )
        .unwrap();
        let from_table: SftRunConfig = serde_json::from_value(bare).unwrap();
        assert_eq!(format!("{from_flags:?}"), format!("{from_table:?}"));
    }

    /// A flag overrides the file; a flag left at its default does not.
    #[test]
    fn flags_override_the_config_file_and_defaults_do_not() {
        let dir = std::env::temp_dir().join(format!("pf-sft-overlay-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("c.toml");
        std::fs::write(
            &f,
            "model = \"m\"\ndata = \"d\"\nr = 16\nlora_alpha = 32\nlearning_rate = 0.001\n",
        )
        .unwrap();
        let f_s = f.to_str().unwrap();
        let m = Cli::command().get_matches_from(["sft", "--config-file", f_s, "--r", "4"]);
        let a = Cli::from_arg_matches(&m).unwrap().a;
        let v = super::super::overlay::settings(
            Some(&f),
            &a,
            &m,
            &[("output_dir", "o".into())],
            &["model"],
        )
        .unwrap();
        let c: SftRunConfig = serde_json::from_value(v).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            (c.adapter.r, c.adapter.lora_alpha, c.learning_rate),
            (4, 32.0, 0.001)
        );
        std::fs::write(&f, "model = \"m\"\ndata = \"d\"\nrank = 16\n").unwrap();
        let v =
            super::super::overlay::settings(Some(&f), &a, &m, &[("output_dir", "o".into())], &[])
                .unwrap();
        let e = serde_json::from_value::<SftRunConfig>(v)
            .unwrap_err()
            .to_string();
        assert!(e.contains("rank"), "{e}");
        let m = Cli::command().get_matches_from(["sft"]);
        let e = super::super::overlay::settings(None, &a, &m, &[], &["model"]).unwrap_err();
        assert!(e.to_string().contains("--model"), "{e}");
        std::fs::remove_dir_all(&dir).ok();
    }
}
