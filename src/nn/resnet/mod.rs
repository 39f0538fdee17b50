//! diffusers' ResnetBlock2D (every resnet of the U-Net and the VAE) as one node with its own
//! backward:
//!
//! `y = (shortcut(x) + conv2(silu(gn2(conv1(silu(gn1(x))) + t)))) / s_out`
//!
//! where each conv is a frozen kernel and bias with an optional plain LoCon (`+ s·B·(A ⋆ x)`), `t`
//! is the time-embedding projection added per channel (absent in the VAE), and the shortcut is a
//! 1×1 conv (with its own optional LoCon) or the identity. One task runs the whole block for one
//! image, so each image's maps stay in cache from the first norm to the residual, and every product
//! writes into a buffer the node owns (the bias add, the time add, the residual and the scale are
//! folded into the products' outputs instead of being nodes of their own).
//!
//! For the backward the node keeps only the second norm's input (conv1's output plus `t`) and each
//! LoCon's rank-r hidden; both `silu(gn(·))` activations are recomputed from `x` and that map. The
//! composed path keeps five maps per block (two activations, conv1's output, the sum with `t`, the
//! conv2 output). The input gradients of the shortcut and of the main branch are summed into one
//! buffer. CPU, f32, frozen norms and kernels; otherwise `None` and the block takes the composed
//! path.

mod op;

use super::conv::ConvCfg;
use super::lora_conv::Geom;
use candle_core::{DType, Device, Result, Tensor};
use op::{norm_vals, ResnetOp};
use std::sync::Mutex;

/// A frozen GroupNorm.
#[derive(Clone)]
pub struct NormPart {
    /// γ (channels).
    pub weight: Tensor,
    /// β (channels).
    pub bias: Tensor,
    /// Number of groups.
    pub groups: usize,
    /// ε.
    pub eps: f64,
}

/// A plain LoCon on a conv: A (r, c, kh, kw), B (o, r, 1, 1), scale s (α/r times the gain).
#[derive(Clone)]
pub struct Locon {
    /// A (r, c, kh, kw).
    pub a: Tensor,
    /// B (o, r, 1, 1).
    pub b: Tensor,
    /// s.
    pub scale: f64,
}

/// A frozen conv with its bias and an optional LoCon.
#[derive(Clone)]
pub struct ConvPart {
    /// The kernel (o, c, kh, kw).
    pub weight: Tensor,
    /// The bias (o).
    pub bias: Option<Tensor>,
    /// Padding, stride, ….
    pub cfg: ConvCfg,
    /// The adapter, if one runs.
    pub lora: Option<Locon>,
}

/// The parts of one ResnetBlock2D.
#[derive(Clone)]
pub struct ResnetParts {
    /// norm1 (over the input's channels).
    pub norm1: NormPart,
    /// conv1 (input → output channels).
    pub conv1: ConvPart,
    /// norm2 (over the output channels).
    pub norm2: NormPart,
    /// conv2 (output → output channels).
    pub conv2: ConvPart,
    /// conv_shortcut (1×1), where the channel counts differ.
    pub shortcut: Option<ConvPart>,
    /// diffusers' `output_scale_factor`.
    pub out_scale: f64,
}

fn usable(t: &Tensor) -> bool {
    t.device().is_cpu() && t.dtype() == DType::F32
}

/// The block (see the module doc) for x (n, c, h, w) and t (n, o), or `None` where the node does
/// not apply (device, dtype, a trained norm, kernel or bias, a conv that changes the grid); an
/// error naming the shapes where the parts do not fit together.
pub fn resnet_block(x: &Tensor, t: Option<&Tensor>, parts: &ResnetParts) -> Result<Option<Tensor>> {
    let mut frozen: Vec<&Tensor> = vec![
        &parts.norm1.weight,
        &parts.norm1.bias,
        &parts.norm2.weight,
        &parts.norm2.bias,
    ];
    let convs: Vec<&ConvPart> = [
        Some(&parts.conv1),
        Some(&parts.conv2),
        parts.shortcut.as_ref(),
    ]
    .into_iter()
    .flatten()
    .collect();
    for c in &convs {
        frozen.push(&c.weight);
        frozen.extend(c.bias.iter());
    }
    let factors_ok = convs
        .iter()
        .filter_map(|c| c.lora.as_ref())
        .all(|l| usable(&l.a) && usable(&l.b));
    if !usable(x)
        || t.is_some_and(|t| !usable(t))
        || !factors_ok
        || frozen.iter().any(|f| !usable(f) || f.track_op())
        || x.rank() != 4
    {
        super::fallback::note(|| {
            let why = super::fallback::cpu_f32_miss(x)
                .unwrap_or_else(|| "a trained norm, kernel or bias, or a non-f32 part".into());
            ("ResnetBlock2D".into(), why)
        });
        return Ok(None);
    }
    let (n, c, h, w) = x.dims4()?;
    let misfit = |what: &str| -> candle_core::Error {
        candle_core::Error::Msg(format!(
            "ResnetBlock2D: input {:?}, {what} do not fit (conv1 {:?}, conv2 {:?}, shortcut {:?}, t {:?})",
            x.dims(),
            parts.conv1.weight.dims(),
            parts.conv2.weight.dims(),
            parts.shortcut.as_ref().map(|s| s.weight.dims().to_vec()),
            t.map(|t| t.dims().to_vec()),
        ))
    };
    let Some(mut g1) = Geom::of(
        x,
        &parts.conv1.weight,
        parts.conv1.bias.as_ref(),
        parts.conv1.cfg,
    )?
    else {
        return Ok(None);
    };
    let o = g1.o;
    let keeps_grid = |k: (usize, usize), cfg: ConvCfg| {
        cfg.stride > 0
            && h + 2 * cfg.padding >= k.0
            && w + 2 * cfg.padding >= k.1
            && super::conv::conv_out_size(h, k.0, cfg) == h
            && super::conv::conv_out_size(w, k.1, cfg) == w
    };
    if !keeps_grid((g1.kh, g1.kw), g1.cfg) {
        // A conv that changes the grid is not a resnet's.
        super::fallback::note(|| {
            (
                "ResnetBlock2D".into(),
                format!("conv1 {:?}", parts.conv1.cfg),
            )
        });
        return Ok(None);
    }
    let (o2, c2, kh2, kw2) = parts.conv2.weight.dims4()?;
    if c2 != o || o2 != o || parts.conv2.bias.as_ref().is_some_and(|b| b.dims() != [o]) {
        return Err(misfit("conv2"));
    }
    let mut g2 = Geom {
        n,
        c: o,
        h,
        w,
        o,
        r: 0,
        kh: kh2,
        kw: kw2,
        cfg: parts.conv2.cfg,
        p: h * w,
    };
    if !keeps_grid((kh2, kw2), g2.cfg) || g2.cfg.groups != 1 || g2.cfg.dilation != 1 {
        super::fallback::note(|| {
            (
                "ResnetBlock2D".into(),
                format!("conv2 {:?}", parts.conv2.cfg),
            )
        });
        return Ok(None);
    }
    let mut gs = match &parts.shortcut {
        None if c != o => return Err(misfit("no shortcut with different channel counts")),
        None => None,
        Some(s) => {
            let Some(g) = Geom::of(x, &s.weight, s.bias.as_ref(), s.cfg)? else {
                return Ok(None);
            };
            if !g.point() || g.o != o {
                return Err(misfit("the shortcut"));
            }
            Some(g)
        }
    };
    for (norm, ch, what) in [(&parts.norm1, c, "norm1"), (&parts.norm2, o, "norm2")] {
        if norm.groups == 0
            || ch % norm.groups != 0
            || norm.weight.dims() != [ch]
            || norm.bias.dims() != [ch]
        {
            return Err(misfit(&format!(
                "{what} ({} groups, γ {:?})",
                norm.groups,
                norm.weight.dims()
            )));
        }
    }
    if t.is_some_and(|t| t.dims() != [n, o]) {
        return Err(misfit("t"));
    }
    // Factors: checked against their conv, packed in the order A1 B1 A2 B2 As Bs.
    let mut factors = Vec::new();
    let mut scales = [0f32; 3];
    let geoms: [Option<&mut Geom>; 3] = [Some(&mut g1), Some(&mut g2), gs.as_mut()];
    let conv_parts = [
        Some(&parts.conv1),
        Some(&parts.conv2),
        parts.shortcut.as_ref(),
    ];
    for (k, (g, cp)) in geoms.into_iter().zip(conv_parts).enumerate() {
        let (Some(g), Some(cp)) = (g, cp) else {
            continue;
        };
        if let Some(l) = &cp.lora {
            let r = l.a.dim(0)?;
            if r == 0 || l.a.dims() != [r, g.c, g.kh, g.kw] || l.b.dims() != [g.o, r, 1, 1] {
                return Err(misfit(&format!(
                    "LoCon factors A {:?}, B {:?} of conv {k}",
                    l.a.dims(),
                    l.b.dims()
                )));
            }
            g.r = r;
            scales[k] = l.scale as f32;
            factors.push(l.a.flatten_all()?);
            factors.push(l.b.flatten_all()?);
        }
    }
    let packed = if factors.is_empty() {
        Tensor::zeros(0, DType::F32, &Device::Cpu)?
    } else {
        Tensor::cat(&factors, 0)?
    };
    let empty = Tensor::zeros(0, DType::F32, &Device::Cpu)?;
    let tt = t.cloned().unwrap_or(empty);
    let detached = |p: &ConvPart| -> Result<(Tensor, Option<Tensor>)> {
        Ok((
            p.weight.detach().contiguous()?,
            p.bias
                .as_ref()
                .map(|b| b.detach().contiguous())
                .transpose()?,
        ))
    };
    let keep = x.track_op() || tt.track_op() || packed.track_op();
    let op = ResnetOp {
        g1,
        g2,
        gs,
        n1: norm_vals(&parts.norm1)?,
        n2: norm_vals(&parts.norm2)?,
        k1: detached(&parts.conv1)?,
        k2: detached(&parts.conv2)?,
        ks: parts.shortcut.as_ref().map(detached).transpose()?,
        scales,
        with_t: t.is_some(),
        out_scale: parts.out_scale as f32,
        keep,
        saved: Mutex::new(None),
    };
    let (x, tt, packed) = (x.contiguous()?, tt.contiguous()?, packed.contiguous()?);
    Ok(Some(if keep {
        x.apply_op3_arc(&tt, &packed, std::sync::Arc::new(Box::new(op)))?
    } else {
        x.apply_op3_no_bwd(&tt, &packed, &op)?
    }))
}

#[cfg(test)]
mod tests;
