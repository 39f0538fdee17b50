//! `postforge edit`: a masked image edit with one or more (LoRA, mask) pairs.

use anyhow::{bail, Context};
use clap::Args as ClapArgs;
use postforge::check;
use postforge::data::masks::Mask;
use postforge::diffusion::edit::{edit, region_diff, EditMode, EditRequest, Region};
use postforge::diffusion::pipeline::Pipeline;
use postforge::diffusion::sampler::SamplerKind;
use postforge::media::image::{read_rgb, write_png};
use postforge::peft::AdapterPlan;
use std::path::PathBuf;

#[derive(ClapArgs, Debug)]
pub struct Args {
    /// Pipeline folder (diffusers layout), e.g. assets/models/tiny-sd.
    #[arg(long)]
    model: PathBuf,
    /// Source image (its size must be a multiple of the VAE factor).
    #[arg(long)]
    image: PathBuf,
    /// LoRA files (kohya, diffusers/PEFT or LyCORIS keys); the i-th is routed by the i-th --mask.
    #[arg(long, required = true)]
    lora: Vec<PathBuf>,
    /// Mask PNGs (white = edit), one per --lora, or `background`: the complement of the other masks.
    #[arg(long)]
    mask: Vec<String>,
    /// Derive the mask of the (single) LoRA from the base model's cross-attention to this prompt
    /// word over the first sampling steps; the mask is saved next to the output.
    #[arg(long = "mask-from-token")]
    mask_from_token: Option<String>,
    /// Cut-off of the normalised attention map for --mask-from-token, in (0, 1).
    #[arg(long = "token-threshold", default_value_t = 0.5, value_parser = open_unit)]
    token_threshold: f64,
    /// The prompt of the edit.
    #[arg(long)]
    prompt: String,
    /// Negative prompt.
    #[arg(long, default_value = "")]
    negative: String,
    /// Share of the schedule that is re-run, in (0, 1] (SDEdit strength).
    #[arg(long, default_value_t = 0.6, value_parser = check::fraction)]
    strength: f64,
    /// route, blend, route+blend or unmasked.
    #[arg(long, default_value = "route+blend")]
    mode: String,
    /// LoRA multiplier (any finite number).
    #[arg(long, default_value_t = 1.0, value_parser = check::finite)]
    scale: f64,
    /// Sampling steps of the full schedule, ≥ 1.
    #[arg(long, default_value_t = 20, value_parser = check::count)]
    steps: usize,
    /// Sampler: ddim, euler, euler_a.
    #[arg(long, default_value = "euler_a")]
    sampler: String,
    /// CFG scale, ≥ 0.
    #[arg(long, default_value_t = 2.5, value_parser = check::non_negative)]
    cfg: f64,
    /// Noise seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Gaussian σ (pixels) of the paste-back edge; 0 keeps the outside bit-exact.
    #[arg(long, default_value_t = 0.0, value_parser = check::non_negative)]
    feather: f64,
    /// Normalise overlapping masks per pixel (M_c / Σ M_u) instead of adding them.
    #[arg(long = "normalize-masks")]
    normalize_masks: bool,
    /// How masks become gates on the U-Net's coarser grids: `area` (mean over each cell) or
    /// `threshold:T` (cells whose mean reaches T).
    #[arg(long = "gate-resize", default_value = "area")]
    gate_resize: String,
    /// Pixels the routing masks are grown by beyond the blend mask (route+blend).
    #[arg(long = "route-grow", default_value_t = 0)]
    route_grow: usize,
    /// Refuse masks whose size differs from the image instead of resizing them.
    #[arg(long)]
    strict: bool,
    /// Output PNG.
    #[arg(short, long)]
    out: PathBuf,
}

fn open_unit(s: &str) -> Result<f64, String> {
    check::parse_in(s, check::Range::open(0.0, 1.0))
}

pub fn run(a: Args) -> anyhow::Result<()> {
    let mode = EditMode::parse(&a.mode).context("--mode")?;
    let sampler = SamplerKind::parse(&a.sampler).context("--sampler")?;
    let gate = postforge::peft::GateResize::parse(&a.gate_resize).context("--gate-resize")?;
    let source = read_rgb(&a.image)?;
    let size = (source.width() as usize, source.height() as usize);
    match (&a.mask_from_token, a.mask.len()) {
        (Some(_), 0) if a.lora.len() == 1 => {}
        (Some(_), _) => {
            bail!("--mask-from-token derives the mask of a single --lora; give no --mask")
        }
        (None, n) if n == a.lora.len() => {}
        (None, n) => bail!(
            "{} --lora files but {n} --mask values: give one mask per LoRA (or `background`)",
            a.lora.len()
        ),
    }
    let mut p = Pipeline::load(&a.model, AdapterPlan::none(), AdapterPlan::none())?;
    let mut names = vec![];
    for (i, f) in a.lora.iter().enumerate() {
        let name = format!("lora{i}");
        let n = p.apply_lora_file(f, &name)?;
        p.set_adapter_scale(&name, a.scale)?;
        println!("{}: {n} modules as `{name}`", f.display());
        names.push(name);
    }
    let mut masks: Vec<Option<Mask>> = vec![];
    for m in &a.mask {
        masks.push(if m == "background" {
            None
        } else {
            Some(super::mask::read_fitted(
                std::path::Path::new(m),
                size,
                a.strict,
            )?)
        });
    }
    if let Some(word) = &a.mask_from_token {
        let m = postforge::diffusion::attn_mask::mask_from_token(
            &p,
            &source,
            &a.prompt,
            word,
            a.seed,
            a.steps,
            a.strength,
            a.cfg,
            sampler,
            a.token_threshold as f32,
        )?;
        let path = a.out.with_extension("mask.png");
        m.write_png(&path)?;
        println!(
            "derived the mask of `{word}` from cross-attention ({:.1} % of the image): {}",
            100.0 * m.coverage(),
            path.display()
        );
        masks.push(Some(m));
    }
    let given: Vec<&Mask> = masks.iter().flatten().collect();
    let background = if given.is_empty() {
        None
    } else {
        let mut u = given[0].clone();
        for m in &given[1..] {
            u = u.combine(m, postforge::data::masks::Combine::Union);
        }
        Some(u.invert())
    };
    let regions: Vec<Region> = names
        .iter()
        .zip(masks)
        .map(|(n, m)| -> anyhow::Result<Region> {
            let mask = match m {
                Some(m) => m,
                None => background
                    .clone()
                    .context("`background` needs at least one other --mask")?,
            };
            Ok(Region {
                adapter: n.clone(),
                mask,
            })
        })
        .collect::<anyhow::Result<_>>()?;
    let out = edit(
        &p,
        &EditRequest {
            source: source.clone(),
            prompt: a.prompt.clone(),
            negative: a.negative.clone(),
            seed: a.seed,
            steps: a.steps,
            strength: a.strength,
            guidance: a.cfg,
            sampler,
            mode,
            regions,
            normalize: a.normalize_masks,
            feather: a.feather as f32,
            gate,
            route_grow: a.route_grow,
        },
    )?;
    write_png(&a.out, &out.image)?;
    let d = region_diff(&out.image, &source, &out.mask.invert().threshold(0.5));
    println!(
        "wrote {} ({}x{}, mode {}): outside the mask PSNR {} against the source, max abs {}",
        a.out.display(),
        size.0,
        size.1,
        mode.name(),
        if d.psnr.is_finite() {
            format!("{:.1} dB", d.psnr)
        } else {
            "inf (identical)".into()
        },
        d.max_abs
    );
    Ok(())
}
