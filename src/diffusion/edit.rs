//! Masked image edits: SDEdit-style partial noising of a source image (Meng et al. 2022), adapters
//! routed to their masks through the forward context, and background blending (RePaint, Lugmayr et
//! al. 2022): after every step the region outside the mask is replaced by the source noised to
//! that step, and at the end a (feathered) paste-back restores the outside pixels exactly.
//!
//! Modes:
//! - `unmasked`: the adapters act everywhere (the plain img2img edit, for comparison);
//! - `route`: each adapter acts inside its own mask only (y = base(x) + M ⊙ δ(x) in every layer);
//! - `blend`: the adapters act everywhere, but the outside is reset to the source at every step;
//! - `route+blend`: both (the default).
//!
//! Works in pixel space and through a VAE (the mask is area-resized to the latent grid for the
//! per-step blend; the paste-back is in pixels), with every sampler. The prompt is encoded unrouted:
//! a LoRA's text-encoder part acts on the whole prompt. Several (adapter, mask) pairs
//! make a multi-region edit; their masks combine additively or normalised per pixel.

use super::pipeline::Pipeline;
use super::sampler::{Sampler, SamplerKind};
use crate::data::masks::Mask;
use crate::media::image::{image_to_tensor, tensor_to_image};
use crate::peft::{Blend, ForwardCtx, GateResize, Routing};
use crate::rng::{normal, rng_for};
use crate::{Error, Result};
use candle_core::DType;
use image::RgbImage;
use std::sync::Arc;

/// How the adapters and the source meet.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum EditMode {
    /// Adapters everywhere, no blending.
    Unmasked,
    /// Adapters routed to their masks.
    Route,
    /// Adapters everywhere; outside the mask reset to the noised source at every step.
    Blend,
    /// Routed and blended.
    RouteBlend,
}

impl EditMode {
    /// Parses `unmasked`, `route`, `blend`, `route+blend`.
    pub fn parse(s: &str) -> Result<Self> {
        Ok(match s {
            "unmasked" | "none" => Self::Unmasked,
            "route" => Self::Route,
            "blend" => Self::Blend,
            "route+blend" | "route_blend" | "both" => Self::RouteBlend,
            _ => {
                return Err(Error::Config(format!(
                    "edit mode `{s}` is not one of unmasked, route, blend, route+blend"
                )))
            }
        })
    }
    /// The name.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Unmasked => "unmasked",
            Self::Route => "route",
            Self::Blend => "blend",
            Self::RouteBlend => "route+blend",
        }
    }
    /// Whether adapters are routed to their masks.
    pub fn routes(&self) -> bool {
        matches!(self, Self::Route | Self::RouteBlend)
    }
    /// Whether the outside is reset to the source.
    pub fn blends(&self) -> bool {
        matches!(self, Self::Blend | Self::RouteBlend)
    }
}

/// One adapter and the region it edits.
#[derive(Debug, Clone)]
pub struct Region {
    /// The adapter's name in the pipeline.
    pub adapter: String,
    /// Its mask at the image's size.
    pub mask: Mask,
}

/// One edit.
#[derive(Debug, Clone)]
pub struct EditRequest {
    /// The source image (its size is the output's; a multiple of the VAE factor).
    pub source: RgbImage,
    /// The prompt.
    pub prompt: String,
    /// The negative prompt.
    pub negative: String,
    /// Noise seed.
    pub seed: u64,
    /// Sampler steps for the full schedule (the edit runs the last ⌊steps·strength⌋).
    pub steps: usize,
    /// Share of the schedule that is re-run, in (0, 1].
    pub strength: f64,
    /// Classifier-free guidance.
    pub guidance: f64,
    /// The sampler.
    pub sampler: SamplerKind,
    /// Routing / blending.
    pub mode: EditMode,
    /// Adapters and their masks (at least one).
    pub regions: Vec<Region>,
    /// Normalise overlapping masks per pixel (LoRAShop's M_c / (Σ M_u + ε)) instead of adding.
    pub normalize: bool,
    /// Gaussian σ (pixels) of the final paste-back's mask edge (0: a hard edge, the outside exact).
    pub feather: f32,
    /// How masks become gates on the U-Net's coarser grids.
    pub gate: GateResize,
    /// Pixels the routing masks are grown by beyond the blend mask (route+blend: the adapter sees
    /// a margin around its region, and the blend still keeps the outside exact).
    pub route_grow: usize,
}

/// What an edit produced.
#[derive(Debug, Clone)]
pub struct EditOutput {
    /// The edited image.
    pub image: RgbImage,
    /// The union of the region masks (what the edit may change).
    pub mask: Mask,
}

/// The union of the region masks.
pub fn union(regions: &[Region]) -> Result<Mask> {
    let first = regions
        .first()
        .ok_or_else(|| Error::Config("an edit needs at least one adapter and mask".into()))?;
    Ok(regions.iter().skip(1).fold(first.mask.clone(), |u, r| {
        u.combine(&r.mask, crate::data::masks::Combine::Union)
    }))
}

/// The routing of `regions`' adapters by their masks.
pub fn routing(regions: &[Region], normalize: bool, gate: GateResize) -> Result<Routing> {
    let mut r = Routing::new().with_resize(gate);
    for reg in regions {
        r = r.with_mask(
            &reg.adapter,
            &reg.mask.to_tensor(&crate::util::device::current())?,
        )?;
    }
    if normalize {
        r = r.with_blend(Blend::Normalized { eps: 1e-6 });
    }
    Ok(r)
}

/// Runs one masked edit on `p`, whose adapters named in the regions are active.
pub fn edit(p: &Pipeline, req: &EditRequest) -> Result<EditOutput> {
    if !(req.strength > 0.0 && req.strength <= 1.0) {
        return Err(Error::Config(format!(
            "strength {} must be in (0, 1]",
            req.strength
        )));
    }
    let (w, h) = (req.source.width() as usize, req.source.height() as usize);
    for r in &req.regions {
        if (r.mask.w, r.mask.h) != (w, h) {
            return Err(Error::Config(format!(
                "the mask of adapter `{}` is {}x{} but the image is {w}x{h}",
                r.adapter, r.mask.w, r.mask.h
            )));
        }
    }
    let f = p.vae_factor();
    if w % f != 0 || h % f != 0 {
        return Err(Error::Config(format!(
            "the source image is {w}x{h}, not a multiple of the VAE factor {f}"
        )));
    }
    let mask = union(&req.regions)?;
    let base_ctx = ForwardCtx::eval();
    let ctx = if req.mode.routes() {
        let grown: Vec<Region> = req
            .regions
            .iter()
            .map(|r| Region {
                adapter: r.adapter.clone(),
                mask: r.mask.dilate(req.route_grow),
            })
            .collect();
        base_ctx.routed(Arc::new(routing(&grown, req.normalize, req.gate)?))
    } else {
        base_ctx.clone()
    };
    let src = image_to_tensor(&req.source, &crate::util::device::current())?.unsqueeze(0)?;
    let x0 = p.to_model_space(&src, None)?;
    let sampler = Sampler::new(req.sampler, &p.scheduler, req.steps)?;
    let start = sampler.start_index(req.strength);
    if start >= req.steps {
        return Err(Error::Config(format!(
            "strength {} with {} steps re-runs ⌊steps·strength⌋ = 0 steps; raise the strength or the steps",
            req.strength, req.steps
        )));
    }
    let dims = x0.dims().to_vec();
    let noise = normal(&dims[1..], 1.0, &mut rng_for(req.seed, "latents"))?.unsqueeze(0)?;
    let x = sampler.add_noise(&x0, &noise, start)?;
    // The blend mask on the model's grid (area-averaged: soft at a latent pixel that straddles the edge).
    let m = crate::peft::ctx::resize_to(
        &mask.to_tensor(&crate::util::device::current())?,
        &[1, dims[2], dims[3]],
    )?
    .unsqueeze(1)?
    .to_dtype(x0.dtype())?;
    let keep = (1.0 - &m)?;
    // The prompt is encoded unrouted: a text-encoder part of a LoRA sees tokens, not pixels, so
    // it acts on the whole prompt (its effect reaches the image only through the routed U-Net).
    let guided = p.guided(
        std::slice::from_ref(&req.prompt),
        &req.negative,
        req.guidance,
        (h, w),
        &base_ctx,
    )?;
    let x = sampler.run_from(
        x,
        start,
        &[req.seed],
        &crate::util::device::current(),
        |x_in, t| guided.predict(p, x_in, t, &ctx),
        |i, x| {
            if !req.mode.blends() {
                return Ok(x);
            }
            let bg = sampler.add_noise(&x0, &noise, i + 1)?;
            Ok((x.broadcast_mul(&m)? + bg.broadcast_mul(&keep)?)?)
        },
    )?;
    let out = match &p.vae {
        Some(v) => v.decode_scaled(&x.to_dtype(DType::F32)?, &ctx)?,
        None => x,
    };
    let mut image = tensor_to_image(&out.to_dtype(DType::F32)?.clamp(-1f32, 1f32)?.squeeze(0)?)?;
    if req.mode.blends() {
        paste_back(&mut image, &req.source, &mask.feather(req.feather));
    }
    Ok(EditOutput { image, mask })
}

/// out ← m·out + (1 − m)·source per pixel: where m = 0 the source's bytes are kept exactly.
pub fn paste_back(out: &mut RgbImage, source: &RgbImage, m: &Mask) {
    for (x, y, p) in out.enumerate_pixels_mut() {
        let a = m.data[y as usize * m.w + x as usize];
        let s = source.get_pixel(x, y);
        if a <= 0.0 {
            *p = *s;
        } else if a < 1.0 {
            for c in 0..3 {
                p.0[c] = (a * p.0[c] as f32 + (1.0 - a) * s.0[c] as f32).round() as u8;
            }
        }
    }
}

/// Differences between an edit and its source over the pixels where `outside` > 0.5.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct OutsideDiff {
    /// PSNR in dB over those pixels (∞ when identical).
    pub psnr: f64,
    /// Largest absolute difference in 8-bit levels.
    pub max_abs: u8,
    /// Mean absolute difference in 8-bit levels.
    pub mean_abs: f64,
    /// Mean squared difference in 8-bit levels.
    pub mse: f64,
    /// Values compared (pixels × 3 channels).
    pub count: usize,
}

/// PSNR and the largest and mean absolute difference between `a` and `b` where `region` > 0.5.
pub fn region_diff(a: &RgbImage, b: &RgbImage, region: &Mask) -> OutsideDiff {
    let (mut se, mut sa, mut n, mut mx) = (0f64, 0f64, 0usize, 0u8);
    for (x, y, p) in a.enumerate_pixels() {
        if region.data[y as usize * region.w + x as usize] <= 0.5 {
            continue;
        }
        let q = b.get_pixel(x, y);
        for c in 0..3 {
            let d = p.0[c].abs_diff(q.0[c]);
            mx = mx.max(d);
            se += (d as f64).powi(2);
            sa += d as f64;
            n += 1;
        }
    }
    let mse = se / n.max(1) as f64;
    OutsideDiff {
        psnr: if mse == 0.0 {
            f64::INFINITY
        } else {
            10.0 * (255f64 * 255.0 / mse).log10()
        },
        max_abs: mx,
        mean_abs: sa / n.max(1) as f64,
        mse,
        count: n,
    }
}
