use clap::Args as ClapArgs;
use postforge::check;
use postforge::data::image_folder::write_kohya;
use postforge::data::shapes::{dataset, dataset_balanced, Style};
use std::path::PathBuf;

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// striped, outlined or filled.
    #[arg(long, default_value = "striped")]
    style: String,
    /// Number of images, ≥ 1.
    #[arg(long, default_value_t = 24, value_parser = check::count)]
    images: usize,
    /// Image side in pixels, ≥ 1.
    #[arg(long, default_value_t = 32, value_parser = check::count_u32)]
    size: u32,
    /// kohya repeats (the subfolder is `<repeats>_<style>`), ≥ 1.
    #[arg(long, default_value_t = 10, value_parser = check::count)]
    repeats: usize,
    /// Seed.
    #[arg(long, default_value_t = 7)]
    seed: u64,
    /// Write the style word into the captions (a trigger word) instead of leaving it out.
    #[arg(long)]
    caption_style: bool,
    /// Draw each scene at random instead of covering shapes, colours, positions and backgrounds evenly
    /// (the sets written before 2026-12-07; an uneven set teaches its content bias along with the style).
    #[arg(long)]
    random_content: bool,
    /// Output folder (a kohya training folder).
    #[arg(long)]
    out: PathBuf,
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let style = Style::parse(&a.style)
        .ok_or_else(|| anyhow::anyhow!("style `{}` is not striped, outlined or filled", a.style))?;
    let make = if a.random_content {
        dataset
    } else {
        dataset_balanced
    };
    let items: Vec<_> = make(a.images, a.size, style, a.seed)?
        .into_iter()
        .map(|(img, cap, _)| {
            let cap = if a.caption_style {
                format!("{cap}, {} style", style.name())
            } else {
                cap
            };
            (img, cap)
        })
        .collect();
    let dir = write_kohya(&a.out, a.repeats, style.name(), &items, ".txt")?;
    println!(
        "wrote {} images with captions to {}",
        items.len(),
        dir.display()
    );
    Ok(())
}
