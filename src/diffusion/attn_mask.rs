//! Attention-derived masks: where the base model puts a prompt word. The source is noised as for
//! the edit, the base model (every adapter routed to an all-zero mask, so none acts) runs the first
//! half of the edit's steps, and every cross-attention layer records the attention its image
//! tokens pay to the word's tokens. The maps are upsampled to the image, averaged over layers and
//! steps, smoothed (Gaussian, σ = 1/16 of the image side), min–max scaled to [0, 1] and cut at a
//! threshold (as LoRAShop and FreeFuse derive their subject masks).

use super::pipeline::Pipeline;
use super::sampler::{Sampler, SamplerKind};
use crate::data::masks::Mask;
use crate::media::image::image_to_tensor;
use crate::peft::{Adapted, AttnProbe, ForwardCtx, Routing};
use crate::rng::{normal, rng_for};
use crate::{Error, Result};
use candle_core::{DType, Tensor};
use image::RgbImage;
use std::sync::Arc;

/// The soft attention map of `word`, min–max scaled to [0, 1], at the source's size.
#[allow(clippy::too_many_arguments)]
pub fn attention_map(
    p: &Pipeline,
    source: &RgbImage,
    prompt: &str,
    word: &str,
    seed: u64,
    steps: usize,
    strength: f64,
    guidance: f64,
    sampler: SamplerKind,
) -> Result<Mask> {
    let tokens = p.tokenizer.positions(prompt, word)?;
    let (w, h) = (source.width() as usize, source.height() as usize);
    // The base model: every adapter of the U-Net routed to an all-zero mask.
    let (routing, _) = switched_off(&p.unet.layers(), &[1, h, w])?;
    // Rows of the guided batch: [unconditional, conditional]; the conditional one is probed.
    let probe = Arc::new(AttnProbe::new(tokens, 1..2));
    let ctx = ForwardCtx::eval()
        .routed(Arc::new(routing))
        .probed(probe.clone());
    let src = image_to_tensor(source, &crate::util::device::current())?.unsqueeze(0)?;
    let x0 = p.to_model_space(&src, None)?;
    let s = Sampler::new(sampler, &p.scheduler, steps)?;
    let start = s.start_index(strength);
    let run = (steps - start).div_ceil(2).max(1).min(steps - start);
    if run == 0 || start >= steps {
        return Err(Error::Config(format!(
            "strength {strength} with {steps} steps runs no step to take attention from"
        )));
    }
    let shape = x0.dims()[1..].to_vec();
    let noise = normal(&shape, 1.0, &mut rng_for(seed, "latents"))?.unsqueeze(0)?;
    let mut x = s.add_noise(&x0, &noise, start)?;
    // The text encoders' adapters are off too: routed to all-zero per-token masks.
    let t_len = p
        .tokenizer
        .encode(&[String::new()], &crate::util::device::current())?
        .dim(1)?;
    let (text_routing, any) = switched_off(&p.text_encoder.layers(), &[1, t_len])?;
    if p.text_encoder_2.is_some() && any {
        return Err(Error::Config(
            "attention-derived masks with text-encoder adapters on a two-encoder (SDXL) pipeline are not supported; use a U-Net-only LoRA".into(),
        ));
    }
    let text_ctx = ForwardCtx::eval().routed(Arc::new(text_routing));
    let guided = p.guided(&[prompt.to_string()], "", guidance, (h, w), &text_ctx)?;
    for i in start..start + run {
        let out = guided.predict(p, &s.scale_model_input(&x, i)?, s.timesteps()[i], &ctx)?;
        let z = if s.needs_noise() {
            Some(normal(&shape, 1.0, &mut rng_for(seed, &format!("step{i}")))?.unsqueeze(0)?)
        } else {
            None
        };
        x = s.step(&out, i, &x, z.as_ref())?.prev_sample;
    }
    let maps = probe.maps()?;
    if maps.is_empty() {
        return Err(Error::Msg(
            "the U-Net has no cross-attention layer to take a mask from".into(),
        ));
    }
    let mut acc = vec![0f32; w * h];
    for m in &maps {
        let m = Mask {
            w: m.dim(2)?,
            h: m.dim(1)?,
            data: m.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?,
        };
        // Each layer's map is scaled to its own maximum, so that every resolution counts alike.
        let top = m.data.iter().cloned().fold(0f32, f32::max).max(1e-12);
        let up = Mask {
            data: m.data.iter().map(|v| v / top).collect(),
            ..m
        }
        .resize(w, h);
        for (a, v) in acc.iter_mut().zip(&up.data) {
            *a += v / maps.len() as f32;
        }
    }
    let soft = Mask { w, h, data: acc }.feather(w.min(h) as f32 / 16.0);
    // Min–max scaled: a word that every pixel attends to alike has no region of its own, and the
    // threshold is a share of the range the map spans.
    let top = soft.data.iter().cloned().fold(f32::MIN, f32::max);
    let low = soft.data.iter().cloned().fold(f32::MAX, f32::min);
    let span = (top - low).max(1e-12);
    Ok(Mask {
        data: soft.data.iter().map(|v| (v - low) / span).collect(),
        ..soft
    })
}

/// Every adapter on `layers` routed to an all-zero mask of `shape` (so none acts), and whether
/// there was any.
fn switched_off(layers: &[&crate::peft::AdaptedLayer], shape: &[usize]) -> Result<(Routing, bool)> {
    let names: std::collections::BTreeSet<&str> =
        layers.iter().flat_map(|l| l.adapter_names()).collect();
    let zero = Tensor::zeros(shape, DType::F32, &crate::util::device::current())?;
    let mut routing = Routing::new();
    for n in &names {
        routing = routing.with_mask(n, &zero)?;
    }
    Ok((routing, !names.is_empty()))
}

/// The binary mask of `word`: [`attention_map`] cut at `threshold`.
#[allow(clippy::too_many_arguments)]
pub fn mask_from_token(
    p: &Pipeline,
    source: &RgbImage,
    prompt: &str,
    word: &str,
    seed: u64,
    steps: usize,
    strength: f64,
    guidance: f64,
    sampler: SamplerKind,
    threshold: f32,
) -> Result<Mask> {
    Ok(attention_map(
        p, source, prompt, word, seed, steps, strength, guidance, sampler,
    )?
    .threshold(threshold))
}
