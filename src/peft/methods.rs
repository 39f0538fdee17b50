//! Adapters other than LoRA, with PEFT's math, initialisation and names:
//!
//! - **IA3** (`peft_type = "IA3"`): one vector `ia3_l` per layer, starting at 1. On ordinary targets
//!   it scales the layer's output, bias included (`l ⊙ (W x + b)`, `ia3_l` of shape (out, 1)); on
//!   `feedforward_modules` it scales the input (`W (l ⊙ x) + b`, shape (1, in)). Merging multiplies
//!   the weight's rows (and the bias) or columns by `l`.
//! - **LoHa** (`"LOHA"`, FedPara): `ΔW = (W1a W1b) ⊙ (W2a W2b) · α/r`, with `hada_w1_a` (out, r),
//!   `hada_w1_b` (r, in), `hada_w2_a` (out, r), `hada_w2_b` (r, in) (a conv: `in·kh·kw`); all
//!   kaiming-uniform but `hada_w2_b = 0`.
//! - **LoKr** (`"LOKR"`): `ΔW = kron(W1, W2) · α/r` with out = l·k and in = m·n factored near the
//!   square root (`decompose_factor` = -1): `lokr_w1` (l, m), or `lokr_w1_a` (l, r) · `lokr_w1_b`
//!   (r, m) with `decompose_both` when r < max(l, m)/2; `lokr_w2` (k, n[, kh, kw]), or `lokr_w2_a`
//!   (k, r) · `lokr_w2_b` (r, n·kh·kw) when r < max(k, n)/2. `W1` (or `w1_a`) starts at 0, the rest
//!   kaiming-uniform.
//!
//! LoHa and LoKr add `x · ΔWᵀ` (or a convolution with ΔW, with the base's stride and padding) to
//! the base output, as PEFT's `_get_delta_activations` does; `module_dropout` skips the whole
//! adapter for a step with that probability (from our seeded generator).

use super::config::AdapterConfig;
use super::init::{kaiming_uniform, rng_for};
use super::layer::var;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor, Var};

/// The adapter family of a configuration (`peft_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// LoRA, rsLoRA, DoRA, PiSSA, OLoRA, LoftQ.
    Lora,
    /// IA3.
    Ia3,
    /// LoHa.
    Loha,
    /// LoKr.
    Lokr,
    /// VeRA.
    Vera,
    /// AdaLoRA.
    Adalora,
}

impl Method {
    /// The method of `peft_type`.
    pub fn of(peft_type: &str) -> Result<Self> {
        match peft_type {
            "LORA" => Ok(Self::Lora),
            "IA3" => Ok(Self::Ia3),
            "LOHA" => Ok(Self::Loha),
            "LOKR" => Ok(Self::Lokr),
            "VERA" => Ok(Self::Vera),
            "ADALORA" => Ok(Self::Adalora),
            other => Err(Error::Config(format!(
                "peft_type {other} is not supported (LORA, ADALORA, IA3, LOHA, LOKR, VERA)"
            ))),
        }
    }
    /// The `peft_type` string.
    pub fn peft_type(self) -> &'static str {
        match self {
            Self::Lora => "LORA",
            Self::Ia3 => "IA3",
            Self::Loha => "LOHA",
            Self::Lokr => "LOKR",
            Self::Vera => "VERA",
            Self::Adalora => "ADALORA",
        }
    }
}

/// A factor of a LoKr adapter: a full matrix, or a product of two.
pub enum Factor {
    /// One matrix.
    Full(Var),
    /// `a · b`.
    Product(Var, Var),
}

impl Factor {
    fn tensor(&self) -> Result<Tensor> {
        Ok(match self {
            Factor::Full(v) => v.as_tensor().clone(),
            Factor::Product(a, b) => a.as_tensor().matmul(b.as_tensor())?,
        })
    }
}

/// One non-LoRA adapter on one layer.
pub enum OtherAdapter {
    /// IA3: `l` of shape (out, 1), or (1, in) on a feed-forward module.
    Ia3 {
        /// The learned vector.
        l: Var,
        /// Scales the input (feed-forward module) rather than the output.
        feedforward: bool,
    },
    /// LoHa.
    Loha {
        /// hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b.
        w: [Var; 4],
        /// α / r.
        scale: f64,
        /// Probability of skipping the adapter for a training step.
        module_dropout: f64,
    },
    /// VeRA: `y += λ_b ⊙ (B_s (λ_d ⊙ (A_s x)))` with the shared frozen projections sliced to
    /// this layer (`A_s` = vera_A[:, :in], `B_s` = vera_B[:out, :]).
    Vera {
        /// The shared (vera_A (r, max_in), vera_B (max_out, r)); `None` until
        /// [`share_vera_projections`] has seen every layer.
        proj: Option<(Tensor, Tensor)>,
        /// vera_lambda_d (r).
        lambda_d: Var,
        /// vera_lambda_b (out).
        lambda_b: Var,
        /// vera_dropout.
        dropout: f64,
        /// (out, in) of the layer.
        dims: (usize, usize),
    },
    /// AdaLoRA: `y += x (A ⊙ E)ᵀ Bᵀ · α / (ranknum + 1e-5)` (see [`super::adalora`]).
    Adalora {
        /// lora_A (r, in).
        a: Var,
        /// lora_B (out, r).
        b: Var,
        /// lora_E (r, 1).
        e: Var,
        /// α / (ranknum + 1e-5).
        scale: f64,
        /// lora_dropout.
        dropout: f64,
    },
    /// LoKr.
    Lokr {
        /// W1.
        w1: Factor,
        /// W2 (4-D for a conv when full).
        w2: Factor,
        /// α / r.
        scale: f64,
        /// Probability of skipping the adapter for a training step.
        module_dropout: f64,
    },
}

/// LoKr's `factorization(dimension, factor)`: two factors m ≤ n with m·n = dimension, m as close
/// to √dimension as the divisors allow (or `factor` when it divides).
pub fn factorization(dimension: usize, factor: i64) -> (usize, usize) {
    // PEFT 0.21.2 returns (factor, dimension / factor) unsorted when the factor divides, and
    // treats a negative factor other than -1 as "no factor above 1".
    if factor > 0 && dimension % factor as usize == 0 {
        return (factor as usize, dimension / factor as usize);
    }
    let factor = if factor == -1 {
        dimension
    } else {
        factor.max(1) as usize
    };
    let (mut m, mut n) = (1usize, dimension);
    let length = m + n;
    while m < n {
        let mut new_m = m + 1;
        while dimension % new_m != 0 {
            new_m += 1;
        }
        let new_n = dimension / new_m;
        if new_m + new_n > length || new_m > factor {
            break;
        }
        m = new_m;
        n = new_n;
    }
    if m > n {
        (n, m)
    } else {
        (m, n)
    }
}

/// PEFT's `kaiming_uniform_(a=√5)` on a tensor of `shape` (fan_in = the product of all but dim 0).
fn kaiming(shape: &[usize], rng: &mut rand_chacha::ChaCha8Rng) -> Result<Tensor> {
    let fan_in: usize = shape[1..].iter().product();
    kaiming_uniform(shape, fan_in.max(1), rng)
}

fn extra_bool(cfg: &AdapterConfig, key: &str, default: bool) -> bool {
    cfg.extra
        .get(key)
        .and_then(|v| v.as_bool())
        .unwrap_or(default)
}

fn extra_f64(cfg: &AdapterConfig, key: &str, default: f64) -> f64 {
    cfg.extra
        .get(key)
        .and_then(|v| v.as_f64())
        .unwrap_or(default)
}

impl OtherAdapter {
    /// Creates adapter `name` of `cfg`'s method for a layer at `path` whose weight has shape
    /// `dims` ((out, in) or (out, in, kh, kw)), rank `r` and alpha `alpha` (after patterns).
    pub fn new(
        cfg: &AdapterConfig,
        path: &str,
        dims: &[usize],
        r: usize,
        alpha: f64,
        seed: u64,
        name: &str,
    ) -> Result<Self> {
        let method = Method::of(&cfg.peft_type)?;
        let mut rng = rng_for(seed, &format!("{path}.{name}"));
        let dev = Device::Cpu;
        let (out, inn) = (dims[0], dims[1]);
        let k: usize = dims[2..].iter().product();
        // `init_weights` / `init_ia3_weights` = false: random factors (PEFT's test setting).
        let init = match method {
            Method::Ia3 => extra_bool(cfg, "init_ia3_weights", true),
            _ => extra_bool(cfg, "init_weights", true),
        };
        let module_dropout = extra_f64(cfg, "module_dropout", 0.0);
        if extra_f64(cfg, "rank_dropout", 0.0) != 0.0 {
            return Err(Error::Config(format!(
                "{path}: rank_dropout is not supported yet (module_dropout is)"
            )));
        }
        if extra_bool(cfg, "use_effective_conv2d", false) && dims.len() == 4 && k > 1 {
            return Err(Error::Config(format!(
                "{path}: use_effective_conv2d (the CP decomposition of conv kernels) is not supported yet"
            )));
        }
        if r == 0 && method != Method::Ia3 {
            return Err(Error::Config(format!("{path}: r must be positive")));
        }
        let scale = alpha / r.max(1) as f64;
        Ok(match method {
            Method::Adalora => {
                if dims.len() != 2 {
                    return Err(Error::Config(format!(
                        "{path}: AdaLoRA adapts linear layers only here"
                    )));
                }
                // PEFT builds every layer at init_r (rank_pattern, once saved, gives the kept
                // ranks of a trained adapter).
                let init_r = super::adalora::AdaloraSettings::from_config(cfg)?.init_r;
                let r = match cfg
                    .extra
                    .get("adalora_rank_pattern")
                    .and_then(|p| p.get(format!("{path}.lora_E")))
                {
                    Some(serde_json::Value::Array(mask)) => {
                        mask.iter().filter(|m| m.as_bool() == Some(true)).count()
                    }
                    _ => init_r,
                };
                let (e, a, b) = if init {
                    (
                        Tensor::zeros((r, 1), DType::F32, &dev)?,
                        super::init::normal(&[r, inn], 0.02, &mut rng)?,
                        super::init::normal(&[out, r], 0.02, &mut rng)?,
                    )
                } else {
                    (
                        super::init::normal(&[r, 1], 1.0, &mut rng)?,
                        super::init::normal(&[r, inn], 1.0, &mut rng)?,
                        super::init::normal(&[out, r], 1.0, &mut rng)?,
                    )
                };
                let ranknum = init_r as f64;
                OtherAdapter::Adalora {
                    a: var(a)?,
                    b: var(b)?,
                    e: var(e)?,
                    scale: alpha / (ranknum + 1e-5),
                    dropout: cfg.lora_dropout,
                }
            }
            Method::Vera => {
                if dims.len() != 2 {
                    return Err(Error::Config(format!(
                        "{path}: VeRA adapts linear layers only"
                    )));
                }
                if !extra_bool(cfg, "save_projection", true) {
                    return Err(Error::Config(
                        "VeRA with save_projection = false is not supported: the projections come from torch's generator, which postforge cannot replay; keep them in the file".into(),
                    ));
                }
                let d0 = extra_f64(cfg, "d_initial", 0.1);
                let (ld, lb) = if init {
                    (
                        Tensor::full(d0 as f32, r, &dev)?,
                        Tensor::zeros(out, DType::F32, &dev)?,
                    )
                } else {
                    (
                        super::init::normal(&[r], 1.0, &mut rng)?,
                        Tensor::ones(out, DType::F32, &dev)?,
                    )
                };
                OtherAdapter::Vera {
                    proj: None,
                    lambda_d: var(ld)?,
                    lambda_b: var(lb)?,
                    dropout: extra_f64(cfg, "vera_dropout", 0.0),
                    dims: (out, inn),
                }
            }
            Method::Lora => {
                return Err(Error::Msg(format!(
                    "{path}: LoRA adapters are built by the layer"
                )))
            }
            Method::Ia3 => {
                let feedforward = match &cfg.extra.get("feedforward_modules") {
                    None | Some(serde_json::Value::Null) => false,
                    Some(v) => {
                        let spec: super::ModuleSpec = serde_json::from_value((*v).clone())
                            .map_err(|e| Error::Config(format!("feedforward_modules: {e}")))?;
                        super::config::spec_matches(&spec, path)?
                    }
                };
                // PEFT's shapes: linear (out, 1) or (1, in); conv (1, out, 1, 1) or (1, in, 1, 1).
                let shape = match (dims.len(), feedforward) {
                    (4, true) => vec![1, inn, 1, 1],
                    (4, false) => vec![1, out, 1, 1],
                    (_, true) => vec![1, inn],
                    (_, false) => vec![out, 1],
                };
                let l = if init {
                    Tensor::ones(shape.as_slice(), DType::F32, &dev)?
                } else {
                    (kaiming(&shape, &mut rng)? + 1.0)?
                };
                OtherAdapter::Ia3 {
                    l: var(l)?,
                    feedforward,
                }
            }
            Method::Loha => {
                let cols = inn * k;
                let w1a = kaiming(&[out, r], &mut rng)?;
                let w1b = kaiming(&[r, cols], &mut rng)?;
                let w2a = kaiming(&[out, r], &mut rng)?;
                let w2b = if init {
                    Tensor::zeros((r, cols), DType::F32, &dev)?
                } else {
                    kaiming(&[r, cols], &mut rng)?
                };
                OtherAdapter::Loha {
                    w: [var(w1a)?, var(w1b)?, var(w2a)?, var(w2b)?],
                    scale,
                    module_dropout,
                }
            }
            Method::Lokr => {
                let factor = cfg
                    .extra
                    .get("decompose_factor")
                    .and_then(|v| v.as_i64())
                    .unwrap_or(-1);
                let decompose_both = extra_bool(cfg, "decompose_both", false);
                let (in_m, in_n) = factorization(inn, factor);
                let (out_l, out_k) = factorization(out, factor);
                let use_w1 = !(decompose_both && (r as f64) < out_l.max(in_m) as f64 / 2.0);
                let use_w2 = (r as f64) >= out_k.max(in_n) as f64 / 2.0;
                let w1 = if use_w1 {
                    let t = if init {
                        Tensor::zeros((out_l, in_m), DType::F32, &dev)?
                    } else {
                        kaiming(&[out_l, in_m], &mut rng)?
                    };
                    Factor::Full(var(t)?)
                } else {
                    let a = if init {
                        Tensor::zeros((out_l, r), DType::F32, &dev)?
                    } else {
                        kaiming(&[out_l, r], &mut rng)?
                    };
                    Factor::Product(var(a)?, var(kaiming(&[r, in_m], &mut rng)?)?)
                };
                let w2 = if use_w2 {
                    let mut shape = vec![out_k, in_n];
                    shape.extend_from_slice(&dims[2..]);
                    Factor::Full(var(kaiming(&shape, &mut rng)?)?)
                } else {
                    Factor::Product(
                        var(kaiming(&[out_k, r], &mut rng)?)?,
                        var(kaiming(&[r, in_n * k], &mut rng)?)?,
                    )
                };
                OtherAdapter::Lokr {
                    w1,
                    w2,
                    scale,
                    module_dropout,
                }
            }
        })
    }

    /// The additive ΔW in the base weight's shape (differentiable in the adapter's tensors); IA3
    /// has none.
    pub fn delta(&self, dims: &[usize]) -> Result<Option<Tensor>> {
        Ok(match self {
            OtherAdapter::Ia3 { .. } => None,
            OtherAdapter::Adalora { a, b, e, scale, .. } => {
                let ae = a.as_tensor().broadcast_mul(e.as_tensor())?;
                Some((b.as_tensor().matmul(&ae)? * *scale)?.reshape(dims)?)
            }
            OtherAdapter::Vera {
                lambda_d, lambda_b, ..
            } => {
                let (a, b) = self.vera_slices()?;
                let bl = b.broadcast_mul(&lambda_b.as_tensor().unsqueeze(1)?)?;
                let al = a.broadcast_mul(&lambda_d.as_tensor().unsqueeze(1)?)?;
                Some(bl.matmul(&al)?.reshape(dims)?)
            }
            OtherAdapter::Loha { w, scale, .. } => {
                let p1 = w[0].as_tensor().matmul(w[1].as_tensor())?;
                let p2 = w[2].as_tensor().matmul(w[3].as_tensor())?;
                Some(((p1 * p2)? * *scale)?.reshape(dims)?)
            }
            OtherAdapter::Lokr { w1, w2, scale, .. } => {
                let (a, b) = (w1.tensor()?, w2.tensor()?);
                Some((kron(&a, &b)? * *scale)?.reshape(dims)?)
            }
        })
    }

    /// VeRA's projections sliced to this layer: (A_s (r, in), B_s (out, r)).
    pub fn vera_slices(&self) -> Result<(Tensor, Tensor)> {
        match self {
            OtherAdapter::Vera {
                proj: Some((a, b)),
                dims: (out, inn),
                ..
            } => Ok((a.narrow(1, 0, *inn)?, b.narrow(0, 0, *out)?)),
            OtherAdapter::Vera { proj: None, .. } => Err(Error::Msg(
                "VeRA projections are not set (share_vera_projections was not called)".into(),
            )),
            _ => Err(Error::Msg("not a VeRA adapter".into())),
        }
    }

    /// VeRA's adapter path for an input already through dropout: `λ_b ⊙ ((λ_d ⊙ (x A_sᵀ)) B_sᵀ)`.
    pub fn vera_activation(&self, x: &Tensor) -> Result<Tensor> {
        let OtherAdapter::Vera {
            lambda_d, lambda_b, ..
        } = self
        else {
            return Err(Error::Msg("not a VeRA adapter".into()));
        };
        let (a, b) = self.vera_slices()?;
        let h = super::ops::plain_linear(x, &a)?.broadcast_mul(lambda_d.as_tensor())?;
        Ok(super::ops::plain_linear(&h, &b)?.broadcast_mul(lambda_b.as_tensor())?)
    }

    /// AdaLoRA's adapter path for an input already through dropout.
    pub fn adalora_activation(&self, x: &Tensor) -> Result<Tensor> {
        let OtherAdapter::Adalora { a, b, e, scale, .. } = self else {
            return Err(Error::Msg("not an AdaLoRA adapter".into()));
        };
        let ae = a.as_tensor().broadcast_mul(e.as_tensor())?;
        let h = super::ops::plain_linear(x, &ae)?;
        Ok((super::ops::plain_linear(&h, b.as_tensor())? * *scale)?)
    }

    /// Probability of skipping this adapter in a training step.
    pub fn module_dropout(&self) -> f64 {
        match self {
            OtherAdapter::Ia3 { .. } | OtherAdapter::Vera { .. } | OtherAdapter::Adalora { .. } => {
                0.0
            }
            OtherAdapter::Loha { module_dropout, .. }
            | OtherAdapter::Lokr { module_dropout, .. } => *module_dropout,
        }
    }

    /// The trainable tensors with their PEFT parameter names (`hada_w1_a`, `lokr_w1`, `ia3_l`, ...),
    /// without prefix or adapter name.
    pub fn params(&self) -> Vec<(&'static str, &Var)> {
        match self {
            OtherAdapter::Ia3 { l, .. } => vec![("ia3_l", l)],
            OtherAdapter::Adalora { a, b, e, .. } => {
                vec![("lora_A", a), ("lora_B", b), ("lora_E", e)]
            }
            OtherAdapter::Vera {
                lambda_d, lambda_b, ..
            } => vec![("vera_lambda_b", lambda_b), ("vera_lambda_d", lambda_d)],
            OtherAdapter::Loha { w, .. } => vec![
                ("hada_w1_a", &w[0]),
                ("hada_w1_b", &w[1]),
                ("hada_w2_a", &w[2]),
                ("hada_w2_b", &w[3]),
            ],
            OtherAdapter::Lokr { w1, w2, .. } => {
                let mut v = vec![];
                match w1 {
                    Factor::Full(t) => v.push(("lokr_w1", t)),
                    Factor::Product(a, b) => {
                        v.push(("lokr_w1_a", a));
                        v.push(("lokr_w1_b", b));
                    }
                }
                match w2 {
                    Factor::Full(t) => v.push(("lokr_w2", t)),
                    Factor::Product(a, b) => {
                        v.push(("lokr_w2_a", a));
                        v.push(("lokr_w2_b", b));
                    }
                }
                v
            }
        }
    }
}

/// Gives every VeRA adapter `name` in `layers` the shared projections: `given` (read from a file),
/// or fresh ones drawn from `seed` with PEFT's shapes and init (kaiming-uniform, gain √2:
/// vera_A (r, max in) with bound √6/√max_in, vera_B (max out, r) with bound √6/√r), sized to the
/// largest targeted layer. Returns the projections (for saving), if any layer has the adapter.
pub fn share_vera_projections(
    layers: &mut [&mut super::AdaptedLayer],
    name: &str,
    seed: u64,
    given: Option<(Tensor, Tensor)>,
) -> Result<Option<(Tensor, Tensor)>> {
    let mut max = None::<(usize, usize, usize)>;
    for l in layers.iter() {
        if let Some(OtherAdapter::Vera {
            lambda_d,
            dims: (o, i),
            ..
        }) = l.others().get(name)
        {
            let r = lambda_d.dims()[0];
            max = Some(match max {
                None => (*o, *i, r),
                Some((mo, mi, mr)) => {
                    if mr != r {
                        return Err(Error::Config(format!(
                            "VeRA adapter `{name}`: every layer needs the same r ({mr} vs {r})"
                        )));
                    }
                    (mo.max(*o), mi.max(*i), r)
                }
            });
        }
    }
    let Some((mo, mi, r)) = max else {
        return Ok(None);
    };
    let (a, b) = match given {
        Some((a, b)) => {
            if a.dims() != [r, a.dim(1)?]
                || a.dim(1)? < mi
                || b.dims() != [b.dim(0)?, r]
                || b.dim(0)? < mo
            {
                return Err(Error::Msg(format!(
                    "VeRA projections vera_A {:?} / vera_B {:?} do not cover rank {r}, in {mi}, out {mo}",
                    a.dims(),
                    b.dims()
                )));
            }
            (a.to_dtype(DType::F32)?, b.to_dtype(DType::F32)?)
        }
        None => {
            let mut rng = rng_for(seed, &format!("vera.{name}"));
            let uni = |shape: &[usize], fan: usize, rng: &mut rand_chacha::ChaCha8Rng| {
                use rand::Rng;
                let bound = (6.0 / fan as f64).sqrt();
                let n: usize = shape.iter().product();
                let v: Vec<f32> = (0..n)
                    .map(|_| ((rng.random::<f64>() * 2.0 - 1.0) * bound) as f32)
                    .collect();
                Tensor::from_vec(v, shape, &Device::Cpu)
            };
            (uni(&[r, mi], mi, &mut rng)?, uni(&[mo, r], r, &mut rng)?)
        }
    };
    for l in layers.iter_mut() {
        if let Some(OtherAdapter::Vera { proj, .. }) = l.others_mut().get_mut(name) {
            *proj = Some((a.clone(), b.clone()));
        }
    }
    Ok(Some((a, b)))
}

/// Kronecker product of 2-D `a` (p, q) with `b` (s, t[, kh, kw]): (p·s, q·t[, kh, kw]), as
/// torch.kron with `a` unsqueezed to 4-D.
pub fn kron(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    let (p, q) = a.dims2()?;
    let bd = b.dims().to_vec();
    if bd.len() < 2 {
        return Err(Error::Msg(format!(
            "LoKr: W2 of shape {bd:?} must have at least 2 dimensions"
        )));
    }
    let (s, t) = (bd[0], bd[1]);
    let rest: Vec<usize> = bd[2..].to_vec();
    let r: usize = rest.iter().product();
    // (p, 1, q, 1, 1) * (1, s, 1, t, r) -> (p, s, q, t, r)
    let a5 = a.reshape((p, 1, q, 1, 1))?;
    let b5 = b.reshape((1, s, 1, t, r))?;
    let k = a5.broadcast_mul(&b5)?;
    let mut shape = vec![p * s, q * t];
    shape.extend(rest);
    Ok(k.reshape(shape)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn factorization_matches_peft_examples() {
        assert_eq!(factorization(256, -1), (16, 16));
        assert_eq!(factorization(128, -1), (8, 16));
        assert_eq!(factorization(127, -1), (1, 127));
        assert_eq!(factorization(128, 4), (4, 32));
        // PEFT 0.21.2's own outputs.
        assert_eq!(factorization(16, 8), (8, 2));
        assert_eq!(factorization(12, -2), (1, 12));
        assert_eq!(factorization(12, -1), (3, 4));
    }

    #[test]
    fn kron_matches_definition() {
        let a = Tensor::new(&[[1f32, 2.], [3., 4.]], &Device::Cpu).unwrap();
        let b = Tensor::new(&[[0f32, 5.], [6., 7.]], &Device::Cpu).unwrap();
        let k = kron(&a, &b).unwrap().to_vec2::<f32>().unwrap();
        assert_eq!(
            k,
            vec![
                vec![0., 5., 0., 10.],
                vec![6., 7., 12., 14.],
                vec![0., 15., 0., 20.],
                vec![18., 21., 24., 28.]
            ]
        );
    }
}
