use clap::Args as ClapArgs;
use postforge::recipe::Recipe;
use std::io::IsTerminal;
use std::path::PathBuf;

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Pipeline file, e.g. pipelines/style-lora.toml.
    recipe: PathBuf,
    /// Continue interrupted training stages from their newest checkpoints (default: start afresh).
    #[arg(long)]
    resume: bool,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let r = Recipe::load(&a.recipe)?;
    if let Some(n) = &r.name {
        println!("{n}: {} stage(s)", r.stage.len());
    }
    let bar = if std::io::stderr().is_terminal() {
        indicatif::ProgressBar::new(0)
    } else {
        indicatif::ProgressBar::hidden()
    };
    r.run(a.resume, &bar, &mut |l| bar.suspend(|| println!("{l}")))?;
    bar.finish_and_clear();
    Ok(())
}
