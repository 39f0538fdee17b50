//! Evaluation of an image LoRA: a before/after grid (rows: prompts, columns: LoRA scales, fixed
//! seeds) and procedural measures over random prompts of the shape corpus: the style score of a
//! [`Style`] and prompt adherence (does the content survive the style), at every scale.

use super::grid::{run as run_grid, Axis, Cell};
use super::pipeline::{Pipeline, SampleRequest};
use super::sampler::SamplerKind;
use crate::check::{self, all_in, count_at_least, f64_in, Ranged};
use crate::data::shapes::{detect, style_score, Scene, Style};
use crate::media::image::{tensor_to_image, write_png};
use crate::peft::ForwardCtx;
use crate::peft::{Adapted, AdapterPlan};
use crate::rng::rng_for;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

fn d_scales() -> Vec<f64> {
    vec![0.0, 0.5, 1.0]
}
fn d_steps() -> usize {
    20
}
fn d_cfg() -> f64 {
    3.0
}
fn d_sampler() -> String {
    "ddim".into()
}
fn d_samples() -> usize {
    32
}

/// Settings of a LoRA evaluation (the `diffusion-eval` stage of a pipeline file).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalConfig {
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
    /// Where the grid and `eval.json` go (default: the preceding stage's output folder).
    #[serde(default)]
    pub output_dir: Option<PathBuf>,
    /// Grid rows.
    pub prompts: Vec<String>,
    /// Grid columns: LoRA output multipliers.
    #[serde(default = "d_scales")]
    pub scales: Vec<f64>,
    /// Seed of every grid cell (and first seed of the scored samples).
    #[serde(default)]
    pub seed: u64,
    /// Sampling steps.
    #[serde(default = "d_steps")]
    pub steps: usize,
    /// Classifier-free guidance.
    #[serde(default = "d_cfg")]
    pub cfg: f64,
    /// diffusers' `guidance_rescale` φ (0 = off).
    #[serde(default)]
    pub guidance_rescale: f64,
    /// Sampler.
    #[serde(default = "d_sampler")]
    pub sampler: String,
    /// Procedural style to score (`striped`, `outlined`, `filled`); none: no score.
    #[serde(default)]
    pub style: Option<String>,
    /// Random corpus prompts sampled per scale for the scores.
    #[serde(default = "d_samples")]
    pub score_samples: usize,
    /// The scales that are scored (default: every grid scale); each must be a grid scale.
    #[serde(default)]
    pub score_scales: Option<Vec<f64>>,
}

impl Ranged for EvalConfig {
    /// The numeric keys in their ranges (a NaN guidance once gave black images and scores of 0),
    /// the lists non-empty, every scored scale a grid scale, and the sampler and style known.
    fn check(&self) -> Result<()> {
        if self.prompts.is_empty() || self.scales.is_empty() {
            return Err(Error::Config(
                "diffusion-eval needs at least one prompt and one scale".into(),
            ));
        }
        all_in("scales", &self.scales, check::FINITE)?;
        count_at_least("steps", self.steps, 1)?;
        f64_in("cfg", self.cfg, check::NON_NEGATIVE)?;
        f64_in("guidance_rescale", self.guidance_rescale, check::UNIT)?;
        count_at_least("score_samples", self.score_samples, 1)?;
        if let Some(s) = &self.score_scales {
            if s.is_empty() {
                return Err(Error::Config(
                    "score_scales is empty (leave it out to score every grid scale)".into(),
                ));
            }
            all_in("score_scales", s, check::FINITE)?;
            if let Some(x) = s.iter().find(|x| !self.scales.contains(x)) {
                return Err(Error::Config(format!(
                    "score_scales: {x} is not one of the grid's scales {:?}",
                    self.scales
                )));
            }
        }
        SamplerKind::parse(&self.sampler)?;
        if let Some(st) = &self.style {
            Style::parse(st).ok_or_else(|| {
                Error::Config(format!("style `{st}` is not striped, outlined or filled"))
            })?;
        }
        Ok(())
    }
}

/// Scores at one LoRA scale.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ScaleScore {
    /// LoRA multiplier.
    pub scale: f64,
    /// Mean style score in [0, 1].
    pub style_score: f64,
    /// Share of samples showing the prompted shape, colour and position.
    pub adherence: f64,
    /// Share with the prompted shape (what adherence loses first when a style bends the form).
    #[serde(default)]
    pub shape: f64,
    /// Share with the prompted colour.
    #[serde(default)]
    pub color: f64,
    /// Share with the prompted position.
    #[serde(default)]
    pub position: f64,
    /// The scored samples as one sheet (8 per row, prompt order).
    #[serde(default)]
    pub sheet: Option<PathBuf>,
    /// The samples that missed: their place on the sheet, the prompt and what the detector read.
    #[serde(default)]
    pub misses: Vec<Miss>,
}

/// One scored sample that does not show its prompt.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Miss {
    /// Index in prompt order (row-major on the sheet, 8 per row).
    pub index: usize,
    /// The prompt.
    pub prompt: String,
    /// What the detector read (`None`: no shape stands out from the background).
    pub read: Option<String>,
}

/// What an evaluation produced.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct EvalReport {
    /// The grid PNG.
    pub grid: PathBuf,
    /// Scores per scale (empty without a style).
    pub scores: Vec<ScaleScore>,
}

/// Loads `model` with the LoRA file as adapter `lora`.
pub fn load_with_lora(model: &Path, lora: &Path) -> Result<Pipeline> {
    let mut p = Pipeline::load(model, AdapterPlan::none(), AdapterPlan::none())?;
    p.apply_lora_file(lora, "lora")?;
    Ok(p)
}

/// Tiles equally sized images `per_row` to a row with a 1-pixel gray gap.
fn contact_sheet(images: &[image::RgbImage], per_row: usize) -> image::RgbImage {
    let (w, h) = images.first().map_or((1, 1), |i| i.dimensions());
    let cols = per_row.clamp(1, images.len().max(1)) as u32;
    let rows = images.len().div_ceil(per_row.max(1)).max(1) as u32;
    let mut sheet =
        image::RgbImage::from_pixel(cols * (w + 1) + 1, rows * (h + 1) + 1, image::Rgb([128; 3]));
    for (k, im) in images.iter().enumerate() {
        let (c, r) = ((k as u32) % cols, (k as u32) / cols);
        image::imageops::replace(
            &mut sheet,
            im,
            (1 + c * (w + 1)) as i64,
            (1 + r * (h + 1)) as i64,
        );
    }
    sheet
}

/// Runs the evaluation: writes `<out>/before_after.png` and `<out>/eval.json`.
pub fn evaluate(
    cfg: &EvalConfig,
    model: &Path,
    lora: &Path,
    out: &Path,
    progress: &indicatif::ProgressBar,
) -> Result<EvalReport> {
    cfg.check()?;
    let scored = cfg
        .score_scales
        .clone()
        .unwrap_or_else(|| cfg.scales.clone());
    if let Some(s) = scored.iter().chain(&cfg.scales).find(|s| !s.is_finite()) {
        return Err(Error::Config(format!(
            "diffusion-eval: scale {s} is not a finite number"
        )));
    }
    let style = cfg
        .style
        .as_deref()
        .map(|s| {
            Style::parse(s).ok_or_else(|| {
                Error::Config(format!("style `{s}` is not striped, outlined or filled"))
            })
        })
        .transpose()?;
    let kind = SamplerKind::parse(&cfg.sampler)?;
    let mut p = load_with_lora(model, lora)?;
    p.guidance_rescale = cfg.guidance_rescale;
    let size = p.unet.config().sample_size;
    let defaults = Cell {
        prompt: cfg.prompts[0].clone(),
        negative: String::new(),
        seed: cfg.seed,
        scale: 1.0,
        cfg: cfg.cfg,
        steps: cfg.steps,
        sampler: cfg.sampler.clone(),
    };
    let img = run_grid(
        &mut p,
        &["lora".to_string()],
        &defaults,
        &Axis::Scale(cfg.scales.clone()),
        Some(&Axis::Prompt(cfg.prompts.clone())),
        None,
        (size, size),
        progress,
    )?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let grid = out.join("before_after.png");
    write_png(&grid, &img)?;
    let mut scores = vec![];
    if let Some(style) = style {
        let mut rng = rng_for(cfg.seed, "style-eval");
        let scenes: Vec<Scene> = (0..cfg.score_samples)
            .map(|_| Scene::random(&mut rng))
            .collect();
        progress.set_length(progress.length().unwrap_or(0) + (scored.len() * scenes.len()) as u64);
        for &scale in &scored {
            p.set_adapter_scale("lora", scale)?;
            // The LoRA is merged into the weights at this scale while the scores are sampled, so
            // each step costs what the base model costs (scale 0 skips the adapter altogether).
            let merged = scale != 0.0;
            if merged {
                p.unet.merge_adapters()?;
                p.text_encoder.merge_adapters()?;
            }
            let (mut st, mut ok, mut parts) = (0f64, 0usize, [0usize; 3]);
            let mut images = vec![];
            let mut misses = vec![];
            for chunk in (0..scenes.len()).collect::<Vec<_>>().chunks(8) {
                let prompts: Vec<String> = chunk.iter().map(|&i| scenes[i].caption()).collect();
                let seeds: Vec<u64> = chunk
                    .iter()
                    .map(|&i| cfg.seed.wrapping_add(i as u64))
                    .collect();
                let imgs = p.sample(
                    &SampleRequest {
                        prompts: prompts.to_vec(),
                        negative: String::new(),
                        seeds: seeds.to_vec(),
                        steps: cfg.steps,
                        guidance: cfg.cfg,
                        sampler: kind,
                        size: (size, size),
                    },
                    &ForwardCtx::eval(),
                )?;
                for (k, &i) in chunk.iter().enumerate() {
                    let im = tensor_to_image(&imgs.get(k)?)?;
                    st += style_score(&im, style) as f64;
                    let want = &scenes[i];
                    let got = detect(&im).scene;
                    let mut all = false;
                    if let Some(got) = got {
                        let hit = [
                            got.shape == want.shape,
                            got.color == want.color,
                            got.position == want.position,
                        ];
                        all = hit.iter().all(|h| *h);
                        ok += all as usize;
                        for (n, h) in parts.iter_mut().zip(hit) {
                            *n += h as usize;
                        }
                    }
                    if !all {
                        misses.push(Miss {
                            index: i,
                            prompt: want.caption(),
                            read: got.map(|g| g.caption()),
                        });
                    }
                    images.push(im);
                }
                progress.inc(chunk.len() as u64);
            }
            if merged {
                p.unet.unmerge_adapters()?;
                p.text_encoder.unmerge_adapters()?;
            }
            let n = scenes.len().max(1) as f64;
            let sheet = out.join(format!("scored_scale_{scale}.png"));
            write_png(&sheet, &contact_sheet(&images, 8))?;
            scores.push(ScaleScore {
                scale,
                style_score: st / n,
                adherence: ok as f64 / n,
                shape: parts[0] as f64 / n,
                color: parts[1] as f64 / n,
                position: parts[2] as f64 / n,
                sheet: Some(sheet),
                misses,
            });
        }
    }
    let report = EvalReport { grid, scores };
    let json = serde_json::to_string_pretty(&report).map_err(|e| Error::Msg(e.to_string()))?;
    crate::util::write_atomic(&out.join("eval.json"), json.as_bytes())?;
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each numeric key refuses NaN and a value out of its range, naming the key and the range.
    #[test]
    fn every_numeric_key_is_checked_by_name() {
        let base: EvalConfig =
            serde_json::from_value(serde_json::json!({"prompts": ["a"]})).unwrap();
        base.check().unwrap();
        type Set = fn(&mut EvalConfig);
        let cases: &[(&str, Set)] = &[
            ("scales[1] = NaN", |c| c.scales[1] = f64::NAN),
            ("scales[0] = inf", |c| c.scales[0] = f64::INFINITY),
            ("steps = 0 is out of range: it must be at least 1", |c| {
                c.steps = 0
            }),
            ("cfg = NaN", |c| c.cfg = f64::NAN),
            (
                "cfg = -1 is out of range: it must be a finite number ≥ 0",
                |c| c.cfg = -1.0,
            ),
            ("guidance_rescale = NaN", |c| c.guidance_rescale = f64::NAN),
            (
                "guidance_rescale = 1.5 is out of range: it must be a number in [0, 1]",
                |c| c.guidance_rescale = 1.5,
            ),
            ("score_samples = 0", |c| c.score_samples = 0),
            ("score_scales[0] = NaN", |c| {
                c.score_scales = Some(vec![f64::NAN])
            }),
            ("score_scales: 2 is not one of the grid's scales", |c| {
                c.score_scales = Some(vec![2.0])
            }),
            ("score_scales is empty", |c| c.score_scales = Some(vec![])),
            ("at least one prompt", |c| c.prompts.clear()),
            ("sampler `plms`", |c| c.sampler = "plms".into()),
            ("style `wavy`", |c| c.style = Some("wavy".into())),
        ];
        for (needle, set) in cases {
            let mut c = base.clone();
            set(&mut c);
            let e = c.check().unwrap_err().to_string();
            assert!(e.contains(needle), "{needle}: {e}");
        }
    }
}
