use clap::Args as ClapArgs;
use std::path::PathBuf;

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Base model weights (safetensors).
    #[arg(long)]
    base: PathBuf,
    /// PEFT adapter folder (adapter_config.json + adapter_model.safetensors).
    #[arg(long)]
    adapter: PathBuf,
    /// Output safetensors file.
    #[arg(long)]
    out: PathBuf,
}

pub fn run(a: Args) -> anyhow::Result<()> {
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
