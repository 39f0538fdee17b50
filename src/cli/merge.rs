use clap::Args as ClapArgs;
use std::path::PathBuf;

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Base model weights (safetensors), or a Hugging Face model folder (Llama / Qwen2 / Mistral),
    /// in which case `--out` is a model folder that transformers loads (config, weights, tokenizer).
    #[arg(long)]
    base: PathBuf,
    /// PEFT adapter folder (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    adapter: PathBuf,
    /// Output safetensors file (or model folder).
    #[arg(long)]
    out: PathBuf,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if a.base.is_dir() {
        let n = postforge::align::run::merge_into_folder(&a.base, &a.adapter, &a.out)?;
        println!(
            "merged {n} modules into the model folder {}",
            a.out.display()
        );
        return Ok(());
    }
    let n = postforge::peft::merge::merge_folder_into_checkpoint(&a.base, &a.adapter, &a.out)?;
    println!("merged {n} modules into {}", a.out.display());
    Ok(())
}

#[derive(ClapArgs, Debug)]
pub struct PlotArgs {
    /// metrics.jsonl written by a training run.
    metrics: PathBuf,
    /// Output PNG.
    #[arg(long, default_value = "loss_curve.png")]
    out: PathBuf,
}

pub fn plot(a: PlotArgs) -> anyhow::Result<()> {
    postforge::train::trainer::plot_metrics(&a.metrics, &a.out)?;
    println!("wrote {}", a.out.display());
    Ok(())
}
