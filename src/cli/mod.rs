//! Subcommands. Each file wires flags to library calls; no logic lives here.

mod align;
mod combine;
mod convert;
mod demo;
mod edit;
mod eval;
mod generate;
mod grid;
mod mask;
mod merge;
mod overlay;
mod pretrain;
mod run;
mod sft;
mod styles;
mod task_data;
mod train_diffusion;

use clap::{CommandFactory, Parser, Subcommand};
use postforge::check;

/// postforge: adapt pre-trained models (LoRA family, preference alignment) in one binary.
#[derive(Parser, Debug)]
#[command(name = "postforge", version, about)]
pub struct Cli {
    #[command(subcommand)]
    cmd: Command,
    /// Load adapter files whose weights or alphas hold NaN/inf (refused by default, naming the
    /// file and tensor).
    #[arg(long, global = true)]
    allow_nonfinite: bool,
    /// Where models run: cpu, cuda, cuda:N, metal, metal:N, or auto (CUDA when this build has it
    /// and a GPU is present). A pipeline stage's `device` key overrides it for that stage.
    #[arg(long, global = true, default_value = "cpu", value_name = "DEVICE")]
    device: postforge::util::device::DeviceSpec,
    /// The dtype base weights are loaded in: f32, bf16 or f16 (transformers' `torch_dtype`).
    /// Adapters, their gradients and the optimizer state stay f32 (mixed precision as PEFT runs
    /// it). Llama-family commands; image pipelines run in f32.
    #[arg(long, global = true, default_value = "f32", value_parser = postforge::util::device::parse_dtype)]
    dtype: candle_core::DType,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Train LoRA/DoRA adapters that recover a hidden low-rank update of a frozen MLP (a self-check of
    /// the adapter and training core; writes a PEFT folder, metrics, a loss curve and a merged model).
    Demo(demo::Args),
    /// Sample a labeled X/Y/Z evaluation grid (prompt, seed, LoRA scale, CFG, steps, sampler) from a pipeline.
    Grid(grid::Args),
    /// Masked image edit: SDEdit-style partial noising, LoRAs routed to their masks, background blending.
    Edit(Box<edit::Args>),
    /// Build a mask PNG (box, colour key, shape detector, file) and transform it (invert, dilate, erode, feather, combine).
    Mask(mask::Args),
    /// Merge a PEFT adapter folder into a safetensors checkpoint (merge-and-unload), keeping tensor names.
    Merge(merge::Args),
    /// Convert an image-model LoRA file between kohya/A1111/ComfyUI and diffusers/PEFT layouts.
    Convert(convert::Args),
    /// Combine adapters (PEFT's add_weighted_adapter: cat, svd, linear, ties, dare, magnitude_prune).
    Combine(combine::Args),
    /// Train an embedded default model from scratch on procedural data (`tiny-sd`, `tiny-chat`).
    Pretrain(pretrain::Args),
    /// Run a pipeline file (`pipelines/*.toml`): training and evaluation stages in order.
    Run(run::Args),
    /// Train a LoRA/LoCon/DoRA on an image pipeline from a kohya folder (kohya's flag names).
    TrainDiffusion(Box<train_diffusion::Args>),
    /// Write a procedural style set (shapes in a striped, outlined or filled style) as a kohya folder.
    MakeStyleSet(styles::Args),
    /// Supervised fine-tuning of a Llama/Qwen2/Mistral model with LoRA/DoRA (PEFT flag names, TRL data formats), with a forgetting monitor and replay.
    Sft(Box<sft::Args>),
    /// Preference training of a Llama-family model with an adapter: DPO (every TRL loss type), IPO, SimPO, CPO, ORPO, KTO.
    Align(Box<align::Args>),
    /// Table of alignment runs: method, steps, wall time, preference / generation accuracy and reference perplexity before and after.
    Eval(eval::Args),
    /// Generate text from a Llama-family model folder (optionally with a PEFT adapter).
    Generate(generate::Args),
    /// Write procedural instruction tasks (tiny-chat's world) as TRL JSONL.
    MakeTaskData(task_data::Args),
    /// Draw a loss-curve PNG from a metrics.jsonl file.
    Plot(merge::PlotArgs),
}

/// The command line: [`Cli`] with negative numbers allowed as flag values (`--weights -1,1`,
/// `--weight-decay -5`), so that a value out of range reaches its parser and is refused with the
/// flag, the value and the range named instead of being taken for a short flag.
pub fn command() -> clap::Command {
    Cli::command().mut_subcommands(|sc| {
        sc.mut_args(|a| {
            if a.get_action().takes_values() {
                a.allow_negative_numbers(true)
            } else {
                a
            }
        })
    })
}

/// Runs the parsed command; `matches` tells which flags were given (for `--config-file` overlays).
pub fn run(cli: Cli, matches: &clap::ArgMatches) -> anyhow::Result<()> {
    let given = |name: &str| {
        matches
            .subcommand_matches(name)
            .cloned()
            .unwrap_or_default()
    };
    check::set_allow_nonfinite(cli.allow_nonfinite);
    postforge::util::device::set_current(cli.device)?;
    postforge::util::device::set_dtype(cli.dtype);
    match cli.cmd {
        Command::Demo(a) => demo::run(a),
        Command::Edit(a) => edit::run(*a),
        Command::Mask(a) => mask::run(a),
        Command::Merge(a) => merge::run(a),
        Command::Plot(a) => merge::plot(a),
        Command::Convert(a) => convert::run(a),
        Command::Combine(a) => combine::run(a),
        Command::Pretrain(a) => pretrain::run(a),
        Command::Grid(a) => grid::run(a),
        Command::Run(a) => run::run(a),
        Command::Sft(a) => sft::run(*a, &given("sft")),
        Command::Align(a) => align::run(*a, &given("align")),
        Command::Eval(a) => eval::run(a),
        Command::Generate(a) => generate::run(a),
        Command::TrainDiffusion(a) => train_diffusion::run(*a, &given("train-diffusion")),
        Command::MakeStyleSet(a) => styles::run(a),
        Command::MakeTaskData(a) => task_data::run(a),
    }
}
