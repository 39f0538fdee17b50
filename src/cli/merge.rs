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
    /// Write the merged model folder in 4 bits (nf4 or nf4-no-dq; a 4-bit base is always written
    /// in 4 bits, dequantized, merged and re-quantized).
    #[arg(long)]
    quantize: Option<String>,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    if a.base.is_dir() {
        let q = match &a.quantize {
            Some(s) => postforge::peft::quant::QuantSpec::parse(s)?,
            None => None,
        };
        let r = postforge::text::align_run::merge_into_folder_as(&a.base, &a.adapter, &a.out, q)?;
        println!(
            "merged {} modules into the model folder {}",
            r.modules,
            a.out.display()
        );
        if r.quantized > 0 {
            println!(
                "{} layers written in 4 bits; largest relative rounding error ‖Q − W‖/‖W‖ {:.4}",
                r.quantized,
                r.max_rounding.unwrap_or(0.0)
            );
        }
        return Ok(());
    }
    if a.quantize.is_some() {
        anyhow::bail!("--quantize needs a model folder as --base");
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
