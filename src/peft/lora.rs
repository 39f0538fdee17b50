//! LoRA (Hu et al. 2021) with PEFT 0.21's semantics, and its variants:
//!
//! - LoRA: `δ(x) = s · B A x`, `s = α/r`; rsLoRA: `s = α/√r`.
//!   Keys: `lora_A.weight` (r, in) / conv (r, in, kh, kw), `lora_B.weight` (out, r) / conv
//!   (out, r, 1, 1); embeddings `lora_embedding_A` (r, num), `lora_embedding_B` (dim, r).
//! - DoRA (Liu et al. 2024), a variant as PEFT's `LoraVariant`: with `g = m / ‖W + s·B A‖` (norm per
//!   output feature, detached), `δ(x) = (g − 1) ⊙ W x + g ⊙ s · B A x`; the bias is not rescaled.
//!   Key: `lora_magnitude_vector` (out).
//! - Inits (`init_lora_weights`): kaiming-uniform A and zero B (default), gaussian, random, PiSSA
//!   (exact or randomized SVD), OLoRA (QR) and LoftQ; the last three rewrite the base into the
//!   residual, as PEFT does.

use super::adapter::{Adapter, BaseOut, BuildSpec, Merged, Unmerge};
use super::base::{embed, var, Base, BaseKind, BaseWeight};
use super::config::{Init, Method};
use super::ctx::ForwardCtx;
use super::init;
use crate::nn::conv::ConvCfg;
use crate::nn::{conv, frozen, lora_conv, lora_op};
use crate::Result;
use candle_core::{DType, Tensor, Var};

/// One LoRA / rsLoRA / DoRA adapter on one layer.
pub struct Lora {
    /// Rank.
    pub r: usize,
    /// Alpha.
    pub alpha: f64,
    /// The LoRA scale (α/r or α/√r).
    pub scale: f64,
    /// Dropout probability (training only).
    pub dropout: f64,
    /// A: linear (r, in); conv (r, in, kh, kw); embedding `lora_embedding_A` (r, num_embeddings).
    pub a: Var,
    /// B: linear (out, r); conv (out, r, 1, 1); embedding `lora_embedding_B` (dim, r).
    pub b: Var,
    /// DoRA magnitude, one per output feature.
    pub magnitude: Option<Var>,
    /// PiSSA/OLoRA: the initial (A₀, B₀), kept to export a plain LoRA ("subtract mutated init").
    pub initial: Option<(Tensor, Tensor)>,
}

/// Expected shapes of (A, B, magnitude) at rank `r` on `base`.
pub fn factor_shapes(base: &Base, r: usize) -> Result<(Vec<usize>, Vec<usize>, Vec<usize>)> {
    let d = base.dims();
    Ok(match base.kind() {
        BaseKind::Linear => (vec![r, d[1]], vec![d[0], r], vec![d[0]]),
        BaseKind::Conv2d(_) => (vec![r, d[1], d[2], d[3]], vec![d[0], r, 1, 1], vec![d[0]]),
        BaseKind::Embedding => (vec![r, d[0]], vec![d[1], r], vec![d[1]]),
        BaseKind::Norm => return Err(base.norm_err()),
    })
}

impl Lora {
    /// A deep copy with fresh variables (same values, independent training).
    pub fn clone_detached(&self) -> Result<Self> {
        let copy = |v: &Var| -> Result<Var> { Ok(Var::from_tensor(&v.as_tensor().copy()?)?) };
        Ok(Self {
            r: self.r,
            alpha: self.alpha,
            scale: self.scale,
            dropout: self.dropout,
            a: copy(&self.a)?,
            b: copy(&self.b)?,
            magnitude: self.magnitude.as_ref().map(copy).transpose()?,
            initial: self.initial.clone(),
        })
    }

    /// Builds the adapter per `spec` on `base` (PiSSA/OLoRA/LoftQ rewrite the base weight).
    pub fn build(spec: &BuildSpec, base: &mut Base) -> Result<Self> {
        let (cfg, r) = (spec.cfg, spec.r);
        let scale = cfg.scale(r, spec.alpha);
        let (sa, sb, _) = factor_shapes(base, r)?;
        let fan_in: usize = sa[1..].iter().product();
        if fan_in == 0 || sb[0] == 0 {
            return Err(base.err(format!("empty weight {:?}", base.dims())));
        }
        let mut rng = spec.rng(base.path());
        let dev = base.weight().device();
        let zeros = |s: &[usize]| Tensor::zeros(s, DType::F32, &dev);
        let mut initial = None;
        let (a, b) = match (cfg.init_lora_weights.parse()?, base.kind()) {
            (Init::Default, BaseKind::Embedding) => {
                (zeros(&sa)?, crate::rng::normal(&sb, 1.0, &mut rng)?)
            }
            (Init::Default, _) => (init::kaiming_uniform(&sa, fan_in, &mut rng)?, zeros(&sb)?),
            (Init::Gaussian, BaseKind::Embedding) => (
                zeros(&sa)?,
                crate::rng::normal(&sb, 1.0 / r as f64, &mut rng)?,
            ),
            (Init::Gaussian, _) => (
                crate::rng::normal(&sa, 1.0 / r as f64, &mut rng)?,
                zeros(&sb)?,
            ),
            (Init::Random, BaseKind::Embedding) => (
                crate::rng::normal(&sa, 1.0, &mut rng)?,
                crate::rng::normal(&sb, 1.0, &mut rng)?,
            ),
            (Init::Random, _) => {
                let a = init::kaiming_uniform(&sa, fan_in, &mut rng)?;
                let b = init::kaiming_uniform(&sb, r, &mut rng)?;
                (a, b)
            }
            (m @ (Init::Pissa(_) | Init::Olora), BaseKind::Linear) => {
                if spec.merged {
                    return Err(base.err(format!(
                        "cannot add PiSSA/OLoRA adapter `{}` while others are merged",
                        spec.name
                    )));
                }
                let (o, i) = base.dims2()?;
                if r > o.min(i) {
                    return Err(base.err(format!(
                        "rank {r} exceeds min(out, in) = {} of {:?}",
                        o.min(i),
                        base.dims()
                    )));
                }
                // On an NF4 base this is QPiSSA's order reversed only in time: the principal
                // components come from the dequantized weight, the residual is re-quantized.
                let w = base.weight().dense()?.to_dtype(DType::F32)?;
                let (a, b, res) = match m {
                    Init::Pissa(niter) => init::pissa(&w, r, scale, niter, &mut rng)?,
                    _ => init::olora(&w, r, scale)?,
                };
                base.set_weight(res)?;
                initial = Some((a.clone(), b.clone()));
                (a, b)
            }
            (Init::Loftq, BaseKind::Linear) => {
                if base.weight().nf4().is_some() {
                    return Err(base.err(
                        "LoftQ needs the full-precision weight; load the unquantized checkpoint with --quantize nf4 instead of a 4-bit one",
                    ));
                }
                if spec.merged {
                    return Err(base.err(format!(
                        "cannot add LoftQ adapter `{}` while others are merged",
                        spec.name
                    )));
                }
                let (o, i) = base.dims2()?;
                if r > o.min(i) {
                    return Err(base.err(format!("rank {r} exceeds min(out, in) = {}", o.min(i))));
                }
                let w = base.weight().dense()?.to_dtype(DType::F32)?;
                let (a, b, q) = init::loftq(&w, r, cfg.loftq_iter()?)?;
                base.set_weight(q)?;
                (a, b)
            }
            (m, k) => {
                return Err(base.err(format!(
                    "init {m:?} is only defined for Linear layers, not {k:?}"
                )))
            }
        };
        let mut lora = Lora {
            r,
            alpha: spec.alpha,
            scale,
            dropout: cfg.lora_dropout,
            a: var(a.to_device(&dev)?)?,
            b: var(b.to_device(&dev)?)?,
            magnitude: None,
            initial,
        };
        if cfg.use_dora {
            lora.magnitude = Some(base.var(dora_norm(base, &lora.a, &lora.b, scale)?)?);
        }
        Ok(lora)
    }

    /// `s · B A x` (no gain) for an input already through dropout.
    fn path(&self, base: &Base, x: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let (a, b) = (ctx.read(&self.a), ctx.read(&self.b));
        let y = match base.kind() {
            BaseKind::Linear => frozen::plain_linear(&frozen::plain_linear(x, &a)?, &b)?,
            BaseKind::Conv2d(c) => {
                // PEFT builds lora_A with the base's kernel, stride and padding, but dilation 1.
                let a_cfg = ConvCfg {
                    dilation: 1,
                    groups: 1,
                    ..c
                };
                let h = conv::conv2d(x, &a, a_cfg, true)?;
                conv::conv2d(&h, &b, ConvCfg::default(), true)?
            }
            BaseKind::Embedding => {
                // lookup rows of Aᵀ (num, r), then · Bᵀ
                let h = embed(&a.t()?.contiguous()?, x)?;
                frozen::plain_linear(&h, &b)?
            }
            BaseKind::Norm => return Err(base.norm_err()),
        };
        Ok((y * self.scale)?)
    }

    /// DoRA's `g = m / ‖W + s·B A‖` per output feature (the norm detached).
    fn dora_gain(&self, base: &Base, m: &Var, ctx: &ForwardCtx) -> Result<Tensor> {
        Ok(ctx
            .read(m)
            .div(&dora_norm(base, &self.a, &self.b, self.scale)?)?)
    }
}

/// ΔW = s·B A from factors, in the base weight's layout (detached).
pub(crate) fn delta_from(base: &Base, a: &Tensor, b: &Tensor, s: f64) -> Result<Tensor> {
    let (a, b) = (a.detach(), b.detach());
    Ok(match base.kind() {
        BaseKind::Linear => (b.matmul(&a)? * s)?,
        BaseKind::Conv2d(_) => {
            let (o, r) = (b.dim(0)?, b.dim(1)?);
            let a2 = a.reshape((a.dim(0)?, ()))?;
            (b.reshape((o, r))?.matmul(&a2)? * s)?.reshape(base.dims())?
        }
        BaseKind::Embedding => (b.matmul(&a)?.t()? * s)?.contiguous()?,
        BaseKind::Norm => return Err(base.norm_err()),
    })
}

/// The DoRA norm ‖W + s·B A‖ per output feature, detached, without forming W + ΔW:
/// ‖W‖² + 2s·Σ_k B_ik (W Aᵀ)_ik + s²·Σ_k (B·(A Aᵀ))_ik B_ik.
pub(crate) fn dora_norm(base: &Base, a: &Var, b: &Var, s: f64) -> Result<Tensor> {
    let a = a.as_tensor().detach();
    let b = b.as_tensor().detach();
    let (a, b, wa) = match (base.weight(), base.kind()) {
        (BaseWeight::Nf4(q), _) => {
            // W Aᵀ = (A Wᵀ)ᵀ, with the NF4 weight dequantized block by block.
            let wa = frozen::nf4_linear(&a, q)?.t()?; // (out, r)
            (a, b, wa)
        }
        (BaseWeight::Dense(w), BaseKind::Embedding) => {
            let w = w.to_dtype(DType::F32)?;
            // Wᵀ (dim, num) plays W; ΔWᵀ = s·B A with A (r, num), B (dim, r).
            let wa = a.matmul(&w)?.t()?; // (dim, r)
            (a, b, wa)
        }
        (BaseWeight::Dense(w), _) => {
            let w = w.to_dtype(DType::F32)?;
            let af = a.flatten_from(1)?; // (r, K)
            let bf = b.flatten_from(1)?; // (out, r)
            let wa = w.flatten_from(1)?.matmul(&af.t()?)?; // (out, r)
            (af, bf, wa)
        }
    };
    let cross = (&b * &wa)?.sum(1)?;
    let aat = a.matmul(&a.t()?)?;
    let quad = (b.matmul(&aat)? * &b)?.sum(1)?;
    let n2 = ((base.weight_sq() + (cross * (2.0 * s))?)? + (quad * (s * s))?)?;
    Ok(n2.relu()?.sqrt()?)
}

/// ‖W + ΔW‖ per output feature (detached). Linear/conv: over all but dim 0; embedding: over dim 0.
fn weight_norm(base: &Base, w: &Tensor, delta: &Tensor) -> Result<Tensor> {
    let m = (w.to_dtype(DType::F32)? + delta)?.detach();
    Ok(match base.kind() {
        BaseKind::Embedding => m.sqr()?.sum(0)?.sqrt()?,
        _ => m.flatten_from(1)?.sqr()?.sum(1)?.sqrt()?,
    })
}

impl Adapter for Lora {
    fn method(&self) -> Method {
        Method::Lora
    }

    fn params(&self) -> Vec<(&'static str, &Var)> {
        let mut v = vec![("lora_A", &self.a), ("lora_B", &self.b)];
        if let Some(m) = &self.magnitude {
            v.push(("lora_magnitude_vector", m));
        }
        v
    }

    fn named_params(&self, kind: BaseKind, name: &str) -> Vec<(String, Var)> {
        let mut out = match kind {
            BaseKind::Embedding => vec![
                (format!("lora_embedding_A.{name}"), self.a.clone()),
                (format!("lora_embedding_B.{name}"), self.b.clone()),
            ],
            _ => vec![
                (format!("lora_A.{name}.weight"), self.a.clone()),
                (format!("lora_B.{name}.weight"), self.b.clone()),
            ],
        };
        if let Some(m) = &self.magnitude {
            out.push((format!("lora_magnitude_vector.{name}.weight"), m.clone()));
        }
        out
    }

    fn check(&self, base: &Base) -> Result<()> {
        let (sa, sb, sm) = factor_shapes(base, self.r)?;
        for (what, t, want) in [
            ("A", self.a.as_tensor(), &sa),
            ("B", self.b.as_tensor(), &sb),
        ] {
            if t.dims() != want.as_slice() {
                return Err(base.err(format!(
                    "lora_{what} has shape {:?}, the base needs {want:?}",
                    t.dims()
                )));
            }
        }
        if let Some(m) = &self.magnitude {
            if m.dims() != sm.as_slice() {
                return Err(base.err(format!("magnitude has shape {:?}, needs {sm:?}", m.dims())));
            }
        }
        Ok(())
    }

    fn input_dropout(&self) -> f64 {
        self.dropout
    }

    fn delta(&self, base: &Base, x: &Tensor, out: &BaseOut, ctx: &ForwardCtx) -> Result<Tensor> {
        let lora = self.path(base, x, ctx)?;
        let Some(m) = &self.magnitude else {
            return Ok(lora);
        };
        // DoRA: (g − 1) ⊙ W x' + g ⊙ s·B A x'
        let g = base.feature_view(&self.dora_gain(base, m, ctx)?, out.y0.rank())?;
        let wx = if out.dropped {
            base.forward_nobias(x)?
        } else {
            out.wx.clone()
        };
        Ok((wx.broadcast_mul(&(&g - 1.0)?)? + lora.broadcast_mul(&g)?)?)
    }

    fn fused(
        &self,
        base: &Base,
        bias: Option<&Tensor>,
        x: &Tensor,
        gain: f64,
        ctx: &ForwardCtx,
    ) -> Result<Option<Tensor>> {
        if !x.device().is_cpu() || (ctx.train && self.dropout > 0.0) {
            crate::nn::fallback::note(|| {
                let why = crate::nn::fallback::cpu_f32_miss(x)
                    .unwrap_or_else(|| format!("lora_dropout {} while training", self.dropout));
                ("fused LoRA".into(), why)
            });
            return Ok(None);
        }
        let (a, b) = (ctx.read(&self.a), ctx.read(&self.b));
        if let (BaseKind::Conv2d(cfg), BaseWeight::Dense(w), None) =
            (base.kind(), base.weight(), &self.magnitude)
        {
            // LoCon: base, bias and both factors in one node over one unfolding of x.
            return Ok(lora_conv::lora_conv2d(
                x,
                w,
                bias,
                &a,
                &b,
                self.scale * gain,
                cfg,
            )?);
        }
        if base.kind() != BaseKind::Linear {
            crate::nn::fallback::note(|| ("fused LoRA".into(), format!("{:?} layer", base.kind())));
            return Ok(None);
        }
        let fused = |s: f64| -> Result<Tensor> {
            Ok(match base.weight() {
                BaseWeight::Dense(w) => lora_op::lora_linear(x, w, &a, &b, s)?,
                BaseWeight::Nf4(q) => lora_op::qlora_linear(x, q, &a, &b, s)?,
            })
        };
        let y = match &self.magnitude {
            None => fused(self.scale * gain)?,
            // y = g ⊙ (W x + s·B A x) with g = m / ‖W + s·B A‖ (detached norm).
            Some(m) if gain == 1.0 => {
                let u = fused(self.scale)?;
                lora_op::scale_columns(&u, &self.dora_gain(base, m, ctx)?)?
            }
            Some(_) => {
                crate::nn::fallback::note(|| {
                    ("fused DoRA".into(), "an output gain other than 1".into())
                });
                return Ok(None);
            }
        };
        Ok(Some(base.add_bias(y, bias)?))
    }

    fn delta_weight(&self, base: &Base) -> Result<Tensor> {
        let d = delta_from(base, self.a.as_tensor(), self.b.as_tensor(), self.scale)?;
        let Some(m) = &self.magnitude else {
            return Ok(d);
        };
        let w = base.weight().dense()?.to_dtype(DType::F32)?;
        let g = base.weight_view(&m.as_tensor().detach().div(&weight_norm(base, &w, &d)?)?)?;
        Ok(((&w + d)?.broadcast_mul(&g)? - &w)?)
    }

    /// W + t·ΔW (LoRA), or W + t·(g ⊙ (W + ΔW) − W) (DoRA, g = m/‖W + ΔW‖), t the gain.
    fn merge(&self, base: &Base, w: &Tensor, bias: Option<&Tensor>, gain: f64) -> Result<Merged> {
        let wf = w.to_dtype(DType::F32)?;
        let delta = delta_from(base, self.a.as_tensor(), self.b.as_tensor(), self.scale)?;
        let (weight, dora) = match &self.magnitude {
            None => ((wf + (&delta * gain)?)?, None),
            Some(m) => {
                let n = weight_norm(base, w, &delta)?;
                let gv = base.weight_view(&m.as_tensor().div(&n)?)?;
                let full = (&wf + &delta)?.broadcast_mul(&gv)?;
                let merged = (&wf + ((full - &wf)? * gain)?)?;
                (merged, Some((m.as_tensor().copy()?, n)))
            }
        };
        Ok(Merged {
            weight,
            bias: bias.cloned(),
            undo: Box::new(LoraUndo {
                a: self.a.as_tensor().copy()?,
                b: self.b.as_tensor().copy()?,
                scale: self.scale,
                gain,
                dora,
            }),
        })
    }

    fn rescales_weight(&self) -> bool {
        self.magnitude.is_some()
    }
}

/// What a LoRA merge used: factors, scale, gain and (DoRA) the magnitude and norm.
struct LoraUndo {
    a: Tensor,
    b: Tensor,
    scale: f64,
    gain: f64,
    dora: Option<(Tensor, Tensor)>,
}

impl Unmerge for LoraUndo {
    fn unmerge_weight(&self, base: &Base, w: Tensor) -> Result<Tensor> {
        let delta = delta_from(base, &self.a, &self.b, self.scale)?;
        let t = self.gain;
        Ok(match &self.dora {
            None => (w - (delta * t)?)?,
            Some((m, n)) => {
                // W' = W (1 − t + t g) + t g ΔW
                let g = base.weight_view(&m.div(n)?)?;
                let denom = ((&g * t)? + (1.0 - t))?;
                (w - delta.broadcast_mul(&(&g * t)?)?)?.broadcast_div(&denom)?
            }
        })
    }
}
