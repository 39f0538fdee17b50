//! Re-reads a `diffusion-eval` sheet (`scored_scale_<s>.png`, 8 samples of 32×32 per row) with the current
//! detector: the striped style score, how many samples show the prompted shape, colour and position, and which missed.
//!   cargo run --release --example rescore_sheet -- <sheet.png> <score_samples> <seed> [-v]
use postforge::data::shapes::{detect, style_score, Scene, Style};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    anyhow::ensure!(
        args.len() >= 4,
        "usage: rescore_sheet <sheet.png> <score_samples> <seed> [-v]"
    );
    let sheet = image::open(&args[1])?.to_rgb8();
    let n: usize = args[2].parse()?;
    let seed: u64 = args[3].parse()?;
    let verbose = args.get(4).is_some();
    let mut rng = postforge::rng::rng_for(seed, "style-eval");
    let scenes: Vec<Scene> = (0..n).map(|_| Scene::random(&mut rng)).collect();
    let (mut shape, mut all, mut style) = (0, 0, 0f32);
    for (i, want) in scenes.iter().enumerate() {
        let (x, y) = (1 + 33 * (i % 8) as u32, 1 + 33 * (i / 8) as u32);
        let tile = image::imageops::crop_imm(&sheet, x, y, 32, 32).to_image();
        let d = detect(&tile);
        style += style_score(&tile, Style::Striped);
        let got = d.scene;
        shape += got.is_some_and(|g| g.shape == want.shape) as usize;
        let ok = got.is_some_and(|g| {
            g.shape == want.shape && g.color == want.color && g.position == want.position
        });
        all += ok as usize;
        if verbose && !ok {
            let read = got.map_or("nothing".to_string(), |g| g.caption());
            println!("  {i}: {} -> {read} (fits {:?})", want.caption(), d.fits);
        }
    }
    println!(
        "{}: adherence {all}/{n}, shape {shape}/{n}, striped style score {:.3}",
        args[1],
        style / n.max(1) as f32
    );
    Ok(())
}
