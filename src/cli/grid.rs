use anyhow::Context;
use clap::Args as ClapArgs;
use postforge::check;
use postforge::diffusion::grid::{run as run_grid, Axis, Cell};
use postforge::diffusion::pipeline::Pipeline;
use postforge::media::image::write_png;
use postforge::peft::AdapterPlan;
use std::io::IsTerminal;
use std::path::PathBuf;

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Pipeline folder (diffusers layout), e.g. assets/models/tiny-sd.
    #[arg(long)]
    model: PathBuf,
    /// LoRA files to apply (kohya or diffusers); the `scale` axis sets their multiplier.
    #[arg(long)]
    lora: Vec<PathBuf>,
    /// Prompt used where the prompt is not an axis.
    #[arg(long, default_value = "a red circle in the center, gray background")]
    prompt: String,
    /// Negative prompt.
    #[arg(long, default_value = "")]
    negative: String,
    /// Columns: `axis=v1|v2|...` with axis one of prompt, seed (whole numbers), scale (finite),
    /// cfg (≥ 0), steps (≥ 1), sampler.
    #[arg(long)]
    x: String,
    /// Rows.
    #[arg(long)]
    y: Option<String>,
    /// One sub-grid per value.
    #[arg(long)]
    z: Option<String>,
    /// Default seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Default CFG scale, ≥ 0 (1 = no guidance; 0 samples unconditionally).
    #[arg(long, default_value_t = 3.0, value_parser = check::non_negative)]
    cfg: f64,
    /// Default sampling steps, ≥ 1.
    #[arg(long, default_value_t = 20, value_parser = check::count)]
    steps: usize,
    /// Default sampler.
    #[arg(long, default_value = "ddim")]
    sampler: String,
    /// Default LoRA scale (any finite number; negative inverts the LoRA).
    #[arg(long, default_value_t = 1.0, value_parser = check::finite)]
    scale: f64,
    /// diffusers' guidance_rescale φ, in [0, 1] (0.7 suits zero-terminal-SNR models) [default: 0].
    #[arg(long = "guidance-rescale", default_value_t = 0.0, value_parser = check::unit)]
    guidance_rescale: f64,
    /// Output PNG.
    #[arg(long, default_value = "grid.png")]
    out: PathBuf,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    // The axes are checked before the pipeline is loaded.
    let x = Axis::parse(&a.x).context("--x")?;
    let y = a.y.as_deref().map(Axis::parse).transpose().context("--y")?;
    let z = a.z.as_deref().map(Axis::parse).transpose().context("--z")?;
    postforge::diffusion::sampler::SamplerKind::parse(&a.sampler).context("--sampler")?;
    let mut p = Pipeline::load(&a.model, AdapterPlan::none(), AdapterPlan::none())?;
    p.guidance_rescale = a.guidance_rescale;
    let mut names = vec![];
    for (i, f) in a.lora.iter().enumerate() {
        let name = format!("lora{i}");
        let n = p.apply_lora_file(f, &name)?;
        println!("{}: {n} modules as `{name}`", f.display());
        names.push(name);
    }
    let defaults = Cell {
        prompt: a.prompt,
        negative: a.negative,
        seed: a.seed,
        scale: a.scale,
        cfg: a.cfg,
        steps: a.steps,
        sampler: a.sampler,
    };
    let size = p.unet.config().sample_size;
    let bar = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(0)
    } else {
        indicatif::ProgressBar::hidden()
    };
    let img = run_grid(
        &mut p,
        &names,
        &defaults,
        &x,
        y.as_ref(),
        z.as_ref(),
        (size, size),
        &bar,
    )?;
    bar.finish_and_clear();
    write_png(&a.out, &img)?;
    println!(
        "wrote {} ({}x{})",
        a.out.display(),
        img.width(),
        img.height()
    );
    Ok(())
}
