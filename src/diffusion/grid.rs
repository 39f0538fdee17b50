//! Evaluation grids over a pipeline in the manner of the X/Y/Z plot: each axis is one of prompt,
//! seed, LoRA scale, CFG scale, steps or sampler; every cell is sampled with the other settings at
//! their defaults, and the picture carries `axis: value` labels.

use super::pipeline::{Pipeline, SampleRequest};
use super::sampler::SamplerKind;
use crate::check;
use crate::media::grid::{render, side_by_side, GridLabels};
use crate::media::image::tensor_to_image;
use crate::peft::ForwardCtx;
use crate::{Error, Result};
use image::RgbImage;

/// One axis and its values.
#[derive(Debug, Clone, PartialEq)]
pub enum Axis {
    /// Prompts.
    Prompt(Vec<String>),
    /// Seeds.
    Seed(Vec<u64>),
    /// Output multiplier of the loaded LoRA(s).
    Scale(Vec<f64>),
    /// Classifier-free guidance.
    Cfg(Vec<f64>),
    /// Sampling steps.
    Steps(Vec<usize>),
    /// Samplers (`ddim`, `euler`, `euler_a`).
    Sampler(Vec<String>),
}

impl Axis {
    /// Parses `name=v1|v2|v3` (`|` separates values, so prompts may hold commas). Seeds are whole
    /// numbers ≥ 0, steps whole numbers ≥ 1, scales finite, CFG scales finite and ≥ 0; an error
    /// names the axis spec, the value and the range.
    pub fn parse(spec: &str) -> Result<Self> {
        let (name, values) = spec
            .split_once('=')
            .ok_or_else(|| Error::Config(format!("axis `{spec}`: expected name=v1|v2|...")))?;
        let vals: Vec<&str> = values
            .split('|')
            .map(|v| v.trim())
            .filter(|v| !v.is_empty())
            .collect();
        if vals.is_empty() {
            return Err(Error::Config(format!("axis `{name}` has no values")));
        }
        let name = name.trim();
        let bad = |v: &str, e: String| Error::Config(format!("axis `{spec}`: {name}={v}: {e}"));
        let nums = |range| -> Result<Vec<f64>> {
            vals.iter()
                .map(|v| check::parse_in(v, range).map_err(|e| bad(v, e)))
                .collect()
        };
        Ok(match name {
            "prompt" => Axis::Prompt(vals.iter().map(|v| v.to_string()).collect()),
            // Seeds and steps are whole numbers, parsed as such (not through f64, which would
            // truncate 1.9 to 1 and round seeds above 2^53).
            "seed" => Axis::Seed(
                vals.iter()
                    .map(|v| {
                        v.parse::<u64>().map_err(|_| {
                            bad(v, format!("`{v}` is not a seed (a whole number ≥ 0)"))
                        })
                    })
                    .collect::<Result<_>>()?,
            ),
            "scale" | "lora_scale" => Axis::Scale(nums(check::FINITE)?),
            "cfg" => Axis::Cfg(nums(check::NON_NEGATIVE)?),
            "steps" => Axis::Steps(
                vals.iter()
                    .map(|v| check::count_from(v, 1).map_err(|e| bad(v, e)))
                    .collect::<Result<_>>()?,
            ),
            "sampler" => {
                for v in &vals {
                    SamplerKind::parse(v)?;
                }
                Axis::Sampler(vals.iter().map(|v| v.to_string()).collect())
            }
            n => {
                return Err(Error::Config(format!(
                    "unknown axis `{n}` (prompt, seed, scale, cfg, steps, sampler)"
                )))
            }
        })
    }

    fn len(&self) -> usize {
        match self {
            Axis::Prompt(v) | Axis::Sampler(v) => v.len(),
            Axis::Seed(v) => v.len(),
            Axis::Scale(v) | Axis::Cfg(v) => v.len(),
            Axis::Steps(v) => v.len(),
        }
    }

    fn label(&self, i: usize) -> String {
        match self {
            Axis::Prompt(v) => v[i].clone(),
            Axis::Seed(v) => format!("seed: {}", v[i]),
            Axis::Scale(v) => format!("LoRA scale: {}", v[i]),
            Axis::Cfg(v) => format!("CFG: {}", v[i]),
            Axis::Steps(v) => format!("steps: {}", v[i]),
            Axis::Sampler(v) => format!("sampler: {}", v[i]),
        }
    }

    fn apply(&self, i: usize, c: &mut Cell) {
        match self {
            Axis::Prompt(v) => c.prompt = v[i].clone(),
            Axis::Seed(v) => c.seed = v[i],
            Axis::Scale(v) => c.scale = v[i],
            Axis::Cfg(v) => c.cfg = v[i],
            Axis::Steps(v) => c.steps = v[i],
            Axis::Sampler(v) => c.sampler = v[i].clone(),
        }
    }
}

/// The settings of one cell (and the defaults of every axis not on the grid).
#[derive(Debug, Clone, PartialEq)]
pub struct Cell {
    /// Prompt.
    pub prompt: String,
    /// Negative prompt.
    pub negative: String,
    /// Seed.
    pub seed: u64,
    /// LoRA output multiplier.
    pub scale: f64,
    /// CFG.
    pub cfg: f64,
    /// Steps.
    pub steps: usize,
    /// Sampler.
    pub sampler: String,
}

/// Samples and renders the grid: X = columns, Y = rows, one sub-grid per Z value. `adapters` are
/// the names of the loaded LoRAs whose multiplier the scale axis sets.
#[allow(clippy::too_many_arguments)]
pub fn run(
    p: &mut Pipeline,
    adapters: &[String],
    defaults: &Cell,
    x: &Axis,
    y: Option<&Axis>,
    z: Option<&Axis>,
    size: (usize, usize),
    progress: &indicatif::ProgressBar,
) -> Result<RgbImage> {
    let one = Axis::Seed(vec![defaults.seed]);
    let y_axis = y.unwrap_or(&one);
    let z_axis = z;
    let nz = z_axis.map(|a| a.len()).unwrap_or(1);
    progress.set_length((x.len() * y_axis.len() * nz) as u64);
    // Every cell's settings, in (z, y, x) order.
    let mut cells = Vec::with_capacity(nz * y_axis.len() * x.len());
    for zi in 0..nz {
        for yi in 0..y_axis.len() {
            for xi in 0..x.len() {
                let mut c = defaults.clone();
                if let Some(za) = z_axis {
                    za.apply(zi, &mut c);
                }
                if y.is_some() {
                    y_axis.apply(yi, &mut c);
                }
                x.apply(xi, &mut c);
                cells.push(c);
            }
        }
    }
    // Cells that differ only in prompt and seed are sampled together, up to 8 at a time. Each
    // image's noise comes from its own seed, so an image does not depend on its batch.
    let mut groups: Vec<(&Cell, Vec<usize>)> = vec![];
    for (i, c) in cells.iter().enumerate() {
        let same = |g: &Cell| {
            (
                &g.negative,
                g.scale.to_bits(),
                g.cfg.to_bits(),
                g.steps,
                &g.sampler,
            ) == (
                &c.negative,
                c.scale.to_bits(),
                c.cfg.to_bits(),
                c.steps,
                &c.sampler,
            )
        };
        match groups.iter_mut().find(|(g, _)| same(g)) {
            Some((_, members)) => members.push(i),
            None => groups.push((c, vec![i])),
        }
    }
    let mut images: Vec<Option<RgbImage>> = vec![None; cells.len()];
    for (c, members) in &groups {
        for a in adapters {
            p.set_adapter_scale(a, c.scale)?;
        }
        for chunk in members.chunks(8) {
            let imgs = p.sample(
                &SampleRequest {
                    prompts: chunk.iter().map(|&i| cells[i].prompt.clone()).collect(),
                    negative: c.negative.clone(),
                    seeds: chunk.iter().map(|&i| cells[i].seed).collect(),
                    steps: c.steps,
                    guidance: c.cfg,
                    sampler: SamplerKind::parse(&c.sampler)?,
                    size,
                },
                &ForwardCtx::eval(),
            )?;
            for (k, &i) in chunk.iter().enumerate() {
                images[i] = Some(tensor_to_image(&imgs.get(k)?)?);
            }
            progress.inc(chunk.len() as u64);
        }
    }
    let mut images = images.into_iter();
    let mut grids = vec![];
    for zi in 0..nz {
        let mut rows = vec![];
        for _ in 0..y_axis.len() {
            let mut row = vec![];
            for _ in 0..x.len() {
                row.push(
                    images
                        .next()
                        .flatten()
                        .ok_or_else(|| Error::Msg("grid: a cell was not sampled".into()))?,
                );
            }
            rows.push(row);
        }
        let labels = GridLabels {
            title: z_axis.map(|a| a.label(zi)),
            columns: (0..x.len()).map(|i| x.label(i)).collect(),
            rows: (0..y_axis.len())
                .map(|i| {
                    if y.is_some() {
                        y_axis.label(i)
                    } else {
                        defaults.prompt.clone()
                    }
                })
                .collect(),
        };
        grids.push(render(&rows, &labels, 96)?);
    }
    side_by_side(&grids)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Axis values are parsed as what they are (whole seeds and steps, finite scales, CFG ≥ 0);
    /// the error names the spec, the value and the range.
    #[test]
    fn axis_values_are_checked_with_the_spec_named() {
        assert_eq!(
            Axis::parse("seed=1|9007199254740993").unwrap(),
            Axis::Seed(vec![1, 9007199254740993])
        );
        assert_eq!(Axis::parse("steps=2|30").unwrap(), Axis::Steps(vec![2, 30]));
        assert_eq!(
            Axis::parse("scale=-1|0.5").unwrap(),
            Axis::Scale(vec![-1.0, 0.5])
        );
        assert_eq!(Axis::parse("cfg=0|7.5").unwrap(), Axis::Cfg(vec![0.0, 7.5]));
        for (spec, needle) in [
            (
                "cfg=1|nan",
                "axis `cfg=1|nan`: cfg=nan: NaN is out of range: it must be a finite number ≥ 0",
            ),
            ("cfg=-2", "cfg=-2: -2 is out of range"),
            ("cfg=inf", "cfg=inf: inf is out of range"),
            (
                "scale=nan",
                "scale=nan: NaN is out of range: it must be a finite number",
            ),
            ("steps=2.9", "steps=2.9: `2.9` is not a whole number ≥ 1"),
            (
                "steps=0",
                "steps=0: 0 is out of range: it must be at least 1",
            ),
            ("seed=1.9", "seed=1.9: `1.9` is not a seed"),
            ("seed=-1", "seed=-1: `-1` is not a seed"),
            ("seed=nan", "seed=nan: `nan` is not a seed"),
        ] {
            let e = Axis::parse(spec).unwrap_err().to_string();
            assert!(e.contains(needle), "{spec}: {e}");
        }
    }
}
