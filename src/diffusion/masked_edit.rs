//! The masked-edit study (the `masked-edit` stage of a pipeline file): scenes of the shape corpus
//! (one object, or with `objects = 2` a second one on the opposite side), a mask on the edited
//! object (from the shape detector, dilated), and a style LoRA applied in every [`EditMode`]. It writes a comparison grid
//! (source | mask | base edit | each mode) and `eval.json` with, per mode:
//!
//! - PSNR, largest and mean absolute difference outside the mask against the source;
//! - leakage: the mean absolute difference outside the mask against the base edit (the same edit
//!   without the LoRA), i.e. what the adapter changed where it should not;
//! - the style score of the edited object (inside) and of the other object (outside);
//! - prompt adherence of the edited object (shape, colour and position as prompted).

use super::edit::{edit, region_diff, EditMode, EditRequest, Region};
use super::eval::load_with_lora;
use super::sampler::SamplerKind;
use crate::check::{self, count_at_least, f64_in, Ranged};
use crate::data::masks::{Combine, Mask};
use crate::data::shapes::{adheres, style_score, Scene, Style, BACKGROUNDS, COLORS, SHAPES};
use crate::media::grid::{render, GridLabels};
use crate::media::image::write_png;
use crate::peft::GateResize;
use crate::rng::rng_for;
use crate::{Error, Result};
use image::{Rgb, RgbImage};
use rand::Rng;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

fn d_scenes() -> usize {
    16
}
fn d_strength() -> f64 {
    0.6
}
fn d_steps() -> usize {
    20
}
fn d_cfg() -> f64 {
    2.5
}
fn d_sampler() -> String {
    "euler_a".into()
}
fn d_style() -> String {
    "striped".into()
}
fn d_objects() -> usize {
    1
}
fn d_dilate() -> usize {
    2
}
fn d_rows() -> usize {
    4
}
fn d_scale() -> f64 {
    1.0
}
fn d_gate() -> String {
    "area".into()
}
fn d_token_threshold() -> f32 {
    0.5
}
fn d_modes() -> Vec<String> {
    ["unmasked", "blend", "route", "route+blend"]
        .map(String::from)
        .to_vec()
}

/// Settings of the masked-edit study.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MaskedEditConfig {
    /// Where this stage runs: `cpu`, `cuda`, `cuda:N`, `metal` or `auto` (unset: the pipeline's
    /// `device`, else the `--device` flag, else the CPU).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<crate::util::device::DeviceSpec>,
    /// The dtype this stage loads base weights in: `f32`, `bf16` or `f16` (unset: the pipeline's
    /// `dtype`, else the `--dtype` flag, else f32). Adapters stay f32.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<crate::util::device::DTypeSpec>,
    /// Pipeline folder (default: the model of the preceding training stage).
    #[serde(default)]
    pub model: Option<PathBuf>,
    /// LoRA file (default: the file the preceding training stage wrote).
    #[serde(default)]
    pub lora: Option<PathBuf>,
    /// Where the grid, masks and `eval.json` go (default: the preceding stage's output folder).
    #[serde(default)]
    pub output_dir: Option<PathBuf>,
    /// Scenes edited (each in every mode).
    #[serde(default = "d_scenes")]
    pub scenes: usize,
    /// Seed of the scenes and of the edits' noise.
    #[serde(default)]
    pub seed: u64,
    /// Share of the schedule re-run (SDEdit strength).
    #[serde(default = "d_strength")]
    pub strength: f64,
    /// Sampler steps of the full schedule.
    #[serde(default = "d_steps")]
    pub steps: usize,
    /// Classifier-free guidance.
    #[serde(default = "d_cfg")]
    pub cfg: f64,
    /// Sampler (`ddim`, `euler`, `euler_a`).
    #[serde(default = "d_sampler")]
    pub sampler: String,
    /// The style the LoRA carries (`striped`, `outlined`, `filled`).
    #[serde(default = "d_style")]
    pub style: String,
    /// Objects per scene: 1 (the edited one) or 2 (a second one outside the mask).
    #[serde(default = "d_objects")]
    pub objects: usize,
    /// Pixels the object mask is grown by.
    #[serde(default = "d_dilate")]
    pub dilate: usize,
    /// Gaussian σ of the paste-back edge (0: hard, the outside bit-exact).
    #[serde(default)]
    pub feather: f32,
    /// LoRA multiplier.
    #[serde(default = "d_scale")]
    pub scale: f64,
    /// Modes compared (`unmasked`, `blend`, `route`, `route+blend`).
    #[serde(default = "d_modes")]
    pub modes: Vec<String>,
    /// How the mask becomes the gate of coarser U-Net grids: `area` or `threshold:T`.
    #[serde(default = "d_gate")]
    pub gate_resize: String,
    /// Pixels the routing mask is grown by beyond the blend mask.
    #[serde(default)]
    pub route_grow: usize,
    /// Also edit with the mask derived from the base model's cross-attention to the shape word
    /// (route+blend), scored against the detector's mask; the IoU of the two is reported.
    #[serde(default)]
    pub token_masks: bool,
    /// Threshold of the min–max scaled attention map for `token_masks`.
    #[serde(default = "d_token_threshold")]
    pub token_threshold: f32,
    /// Scenes shown in the grid.
    #[serde(default = "d_rows")]
    pub grid_rows: usize,
}

impl Ranged for MaskedEditConfig {
    fn check(&self) -> Result<()> {
        count_at_least("scenes", self.scenes, 1)?;
        count_at_least("steps", self.steps, 1)?;
        f64_in("strength", self.strength, check::FRACTION)?;
        f64_in("cfg", self.cfg, check::NON_NEGATIVE)?;
        f64_in("scale", self.scale, check::FINITE)?;
        f64_in("feather", self.feather as f64, check::NON_NEGATIVE)?;
        if !(1..=2).contains(&self.objects) {
            return Err(Error::Config(format!(
                "objects = {}: a scene holds 1 or 2 objects",
                self.objects
            )));
        }
        SamplerKind::parse(&self.sampler)?;
        GateResize::parse(&self.gate_resize)?;
        Style::parse(&self.style).ok_or_else(|| {
            Error::Config(format!(
                "style `{}` is not striped, outlined or filled",
                self.style
            ))
        })?;
        if self.modes.is_empty() {
            return Err(Error::Config("modes is empty".into()));
        }
        for m in &self.modes {
            EditMode::parse(m)?;
        }
        Ok(())
    }
}

/// Figures of one mode over all scenes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModeScore {
    /// `base` (no LoRA), or the edit mode.
    pub mode: String,
    /// PSNR outside the mask against the source over all scenes' outside pixels (dB; `null` in
    /// JSON = ∞, identical).
    pub psnr_outside: Option<f64>,
    /// Largest absolute difference outside the mask (8-bit levels).
    pub max_abs_outside: u8,
    /// Mean absolute difference outside the mask (8-bit levels).
    pub mean_abs_outside: f64,
    /// Mean absolute difference outside the mask against the base edit (8-bit levels).
    pub leakage: f64,
    /// The same, over the pixels more than 4 pixels from the mask (what reaches beyond the
    /// object's immediate surroundings).
    pub leakage_far: f64,
    /// Mean style score of the edited object.
    pub style_inside: f64,
    /// Mean stripe-edge share outside the mask (the striped measure on the outside pixels; a plain
    /// background scores 0).
    pub style_outside: f64,
    /// Share of edits whose object keeps the prompted shape, colour and position.
    pub adherence: f64,
}

/// What the study produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MaskedEditReport {
    /// The comparison grid.
    pub grid: PathBuf,
    /// The source's own figures (style of its plain objects), then the base edit, then each mode
    /// (and `token route+blend` with attention-derived masks).
    pub scores: Vec<ModeScore>,
    /// Mean intersection over union of the attention-derived masks with the detector's masks.
    #[serde(default)]
    pub token_mask_iou: Option<f64>,
}

/// A source scene: the object to edit and, with two objects, another one on the opposite side.
fn scene_pair(rng: &mut rand_chacha::ChaCha8Rng) -> (Scene, Scene) {
    // left, right, top, bottom and their opposites (the centre has no opposite).
    let opposite = [1usize, 0, 3, 2];
    let a = Scene {
        shape: rng.random_range(0..SHAPES.len()),
        color: rng.random_range(0..COLORS.len()),
        position: rng.random_range(0..4),
        background: rng.random_range(0..BACKGROUNDS.len()),
    };
    let mut color = rng.random_range(0..COLORS.len() - 1);
    if color >= a.color {
        color += 1;
    }
    let b = Scene {
        shape: rng.random_range(0..SHAPES.len()),
        color,
        position: opposite[a.position],
        background: a.background,
    };
    (a, b)
}

/// The striped style outside an object: the share of horizontally adjacent pixel pairs inside
/// `region` that change between near-white and not (the striped score's own measure; a plain
/// background scores 0).
fn edge_share(img: &RgbImage, region: &Mask) -> f32 {
    let white = |p: &Rgb<u8>| p.0.iter().all(|v| *v > 200);
    let (mut changes, mut pairs) = (0usize, 0usize);
    for y in 0..img.height() {
        for x in 0..img.width().saturating_sub(1) {
            let i = y as usize * region.w + x as usize;
            if region.data[i] > 0.5 && region.data[i + 1] > 0.5 {
                pairs += 1;
                changes += (white(img.get_pixel(x, y)) != white(img.get_pixel(x + 1, y))) as usize;
            }
        }
    }
    (changes as f32 / pairs.max(1) as f32 * 2.0).min(1.0)
}

/// `img` with the pixels where `keep` ≤ 0.5 painted `bg`.
fn only(img: &RgbImage, keep: &Mask, bg: [u8; 3]) -> RgbImage {
    let mut out = img.clone();
    for (x, y, p) in out.enumerate_pixels_mut() {
        if keep.data[y as usize * keep.w + x as usize] <= 0.5 {
            *p = Rgb(bg);
        }
    }
    out
}

struct Acc {
    se: f64,
    n: f64,
    max: u8,
    abs: f64,
    leak: f64,
    far: f64,
    inside: f64,
    outside: f64,
    ok: usize,
    count: usize,
}

impl Acc {
    fn new() -> Self {
        Self {
            se: 0.0,
            n: 0.0,
            max: 0,
            abs: 0.0,
            leak: 0.0,
            far: 0.0,
            inside: 0.0,
            outside: 0.0,
            ok: 0,
            count: 0,
        }
    }
    fn score(&self, mode: &str) -> ModeScore {
        let c = self.count.max(1) as f64;
        let mse = self.se / self.n.max(1.0);
        ModeScore {
            mode: mode.into(),
            psnr_outside: (mse > 0.0).then(|| 10.0 * (255f64 * 255.0 / mse).log10()),
            max_abs_outside: self.max,
            mean_abs_outside: self.abs / c,
            leakage: self.leak / c,
            leakage_far: self.far / c,
            style_inside: self.inside / c,
            style_outside: self.outside / c,
            adherence: self.ok as f64 / c,
        }
    }
}

/// Runs the study: writes `<out>/masked_edit.png`, `<out>/masks/NNN.png`, every edit as
/// `<out>/edits/NNN_<mode>.png` and `<out>/eval.json`.
pub fn run(
    cfg: &MaskedEditConfig,
    model: &Path,
    lora: &Path,
    out: &Path,
    progress: &indicatif::ProgressBar,
) -> Result<MaskedEditReport> {
    cfg.check()?;
    let style = Style::parse(&cfg.style)
        .ok_or_else(|| Error::Config(format!("style `{}` is unknown", cfg.style)))?;
    let sampler = SamplerKind::parse(&cfg.sampler)?;
    let modes: Vec<EditMode> = cfg
        .modes
        .iter()
        .map(|m| EditMode::parse(m))
        .collect::<Result<_>>()?;
    let gate = GateResize::parse(&cfg.gate_resize)?;
    let mut p = load_with_lora(model, lora)?;
    let size = p.unet.config().sample_size * p.vae_factor();
    let mut rng = rng_for(cfg.seed, "masked-edit-scenes");
    progress.set_length(progress.length().unwrap_or(0) + (cfg.scenes * (modes.len() + 1)) as u64);
    if !(cfg.token_threshold > 0.0 && cfg.token_threshold < 1.0) {
        return Err(Error::Config(format!(
            "token_threshold {} must be in (0, 1)",
            cfg.token_threshold
        )));
    }
    let mask_dir = out.join("masks");
    let edit_dir = out.join("edits");
    for d in [&mask_dir, &edit_dir] {
        std::fs::create_dir_all(d).map_err(|e| Error::io(d, e))?;
    }
    let mut source_acc = Acc::new();
    let mut base_acc = Acc::new();
    let mut accs: Vec<Acc> = modes.iter().map(|_| Acc::new()).collect();
    let mut token_acc = Acc::new();
    let mut iou = 0f64;
    let mut rows = vec![];
    let mut row_labels = vec![];
    for k in 0..cfg.scenes {
        let (a, b) = scene_pair(&mut rng);
        let mut draw_rng = rng_for(cfg.seed.wrapping_add(k as u64), "masked-edit-draw");
        let mut src = a.draw(size as u32, Style::Filled, &mut draw_rng);
        let bg = BACKGROUNDS[a.background].1;
        if cfg.objects == 2 {
            let other = b.draw(size as u32, Style::Filled, &mut draw_rng);
            for (x, y, px) in other.enumerate_pixels() {
                if px.0 != bg {
                    src.put_pixel(x, y, *px);
                }
            }
        }
        let mask = Mask::from_shape(&src, COLORS[a.color].0)?.dilate(cfg.dilate);
        mask.write_png(&mask_dir.join(format!("{k:03}.png")))?;
        let outside = mask.invert().threshold(0.5);
        let far = mask.threshold(0.5).dilate(4).invert();
        let inside_view = mask.threshold(0.5);
        // With two objects the prompt names both (the edited one first), so that the base model
        // has no reason to erase the other one.
        let prompt = if cfg.objects == 2 {
            let head = |c: String| c.split(',').next().unwrap_or_default().to_string();
            format!(
                "{}, {}, {} background",
                head(a.caption()),
                head(b.caption()),
                BACKGROUNDS[a.background].0
            )
        } else {
            a.caption()
        };
        let req = |mode: EditMode| EditRequest {
            source: src.clone(),
            prompt: prompt.clone(),
            negative: String::new(),
            seed: cfg.seed.wrapping_add(1000 + k as u64),
            steps: cfg.steps,
            strength: cfg.strength,
            guidance: cfg.cfg,
            sampler,
            mode,
            regions: vec![Region {
                adapter: "lora".into(),
                mask: mask.clone(),
            }],
            normalize: false,
            feather: cfg.feather,
            gate,
            route_grow: cfg.route_grow,
        };
        let measure = |acc: &mut Acc, img: &RgbImage, base: &RgbImage| {
            let d = region_diff(img, &src, &outside);
            acc.se += d.mse * d.count as f64;
            acc.n += d.count as f64;
            acc.max = acc.max.max(d.max_abs);
            acc.abs += d.mean_abs;
            acc.leak += region_diff(img, base, &outside).mean_abs;
            acc.far += region_diff(img, base, &far).mean_abs;
            let inner = only(img, &inside_view, bg);
            acc.inside += style_score(&inner, style) as f64;
            acc.outside += edge_share(img, &outside) as f64;
            acc.ok += adheres(&inner, &a) as usize;
            acc.count += 1;
        };
        // The base edits: the same edits with the LoRA off, without and with blending (leakage is
        // measured against the one with the same blending).
        p.set_adapter_scale("lora", 0.0)?;
        let base = edit(&p, &req(EditMode::Unmasked))?.image;
        let base_blend = edit(&p, &req(EditMode::Blend))?.image;
        progress.inc(1);
        p.set_adapter_scale("lora", cfg.scale)?;
        measure(&mut source_acc, &src, &src);
        write_png(&edit_dir.join(format!("{k:03}_source.png")), &src)?;
        write_png(&edit_dir.join(format!("{k:03}_base.png")), &base)?;
        measure(&mut base_acc, &base, &base);
        let mut row = vec![src.clone(), mask.to_rgb(), base.clone()];
        for (mode, acc) in modes.iter().zip(accs.iter_mut()) {
            let img = edit(&p, &req(*mode))?.image;
            measure(acc, &img, if mode.blends() { &base_blend } else { &base });
            write_png(
                &edit_dir.join(format!("{k:03}_{}.png", mode.name().replace('+', "_"))),
                &img,
            )?;
            row.push(img);
            progress.inc(1);
        }
        if cfg.token_masks {
            let word = SHAPES[a.shape];
            let tm = crate::diffusion::attn_mask::mask_from_token(
                &p,
                &src,
                &prompt,
                word,
                cfg.seed.wrapping_add(1000 + k as u64),
                cfg.steps,
                cfg.strength,
                cfg.cfg,
                sampler,
                cfg.token_threshold,
            )?;
            tm.write_png(&mask_dir.join(format!("{k:03}_token_{word}.png")))?;
            let truth = mask.threshold(0.5);
            let inter = tm.combine(&truth, Combine::Intersect).coverage();
            let uni = tm.combine(&truth, Combine::Union).coverage();
            iou += (inter / uni.max(1e-6)) as f64;
            let mut r = req(EditMode::RouteBlend);
            r.regions[0].mask = tm.clone();
            let img = edit(&p, &r)?.image;
            measure(&mut token_acc, &img, &base_blend);
            write_png(&edit_dir.join(format!("{k:03}_token.png")), &img)?;
            row.push(tm.to_rgb());
            row.push(img);
        }
        if k < cfg.grid_rows {
            rows.push(row);
            row_labels.push(prompt);
        }
    }
    let mut columns: Vec<String> = ["source", "mask", "base edit"].map(String::from).to_vec();
    columns.extend(modes.iter().map(|m| {
        if *m == EditMode::Unmasked {
            "unmasked LoRA".to_string()
        } else {
            m.name().to_string()
        }
    }));
    if cfg.token_masks {
        columns.push("token mask".into());
        columns.push("token route+blend".into());
    }
    let grid_img = render(
        &rows,
        &GridLabels {
            title: Some(format!(
                "masked edit: strength {}, {} steps {}, LoRA x{}",
                cfg.strength, cfg.steps, cfg.sampler, cfg.scale
            )),
            columns,
            rows: row_labels,
        },
        96,
    )?;
    let grid = out.join("masked_edit.png");
    write_png(&grid, &grid_img)?;
    let mut scores = vec![source_acc.score("source"), base_acc.score("base")];
    scores.extend(modes.iter().zip(&accs).map(|(m, a)| a.score(m.name())));
    if cfg.token_masks {
        scores.push(token_acc.score("token route+blend"));
    }
    let report = MaskedEditReport {
        grid,
        scores,
        token_mask_iou: cfg.token_masks.then(|| iou / cfg.scenes as f64),
    };
    let json = serde_json::to_vec_pretty(&report).map_err(|e| Error::Msg(e.to_string()))?;
    crate::util::write_atomic(&out.join("eval.json"), &json)?;
    Ok(report)
}

/// The report as a table (one line per row: mode, PSNR outside, max abs outside, leakage, style
/// inside / outside, adherence).
pub fn table(r: &MaskedEditReport) -> Vec<String> {
    let mut lines = vec![format!(
        "{:>17}  {:>12}  {:>7}  {:>8}  {:>11}  {:>12}  {:>13}  {:>9}",
        "mode",
        "PSNR outside",
        "max abs",
        "leakage",
        "leakage far",
        "style inside",
        "style outside",
        "adherence"
    )];
    for s in &r.scores {
        lines.push(format!(
            "{:>17}  {:>12}  {:>7}  {:>8.2}  {:>11.2}  {:>12.3}  {:>13.3}  {:>8.0}%",
            s.mode,
            s.psnr_outside
                .map_or("inf".to_string(), |v| format!("{v:.1} dB")),
            s.max_abs_outside,
            s.leakage,
            s.leakage_far,
            s.style_inside,
            s.style_outside,
            100.0 * s.adherence
        ));
    }
    if let Some(iou) = r.token_mask_iou {
        lines.push(format!(
            "attention-derived masks: IoU {iou:.2} with the detector's masks"
        ));
    }
    lines
}
