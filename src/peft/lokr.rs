//! LoKr (LyCORIS), PEFT 0.21 semantics (`peft_type = "LOKR"`):
//!
//! `ΔW = kron(W1, W2) · α/r`;  `δ(x) = x · ΔWᵀ` (a conv: `conv(x, ΔW)` with the base's stride and
//! padding). out = l·k and in = m·n are factored near the square root ([`factorization`],
//! `decompose_factor` = -1).
//!
//! Keys: `lokr_w1` (l, m), or `lokr_w1_a` (l, r) · `lokr_w1_b` (r, m) with `decompose_both` when
//! r < max(l, m)/2; `lokr_w2` (k, n[, kh, kw]), or `lokr_w2_a` (k, r) · `lokr_w2_b` (r, n·kh·kw) when
//! r < max(k, n)/2. `W1` (or `w1_a`) starts at 0, the rest kaiming-uniform. Options: those of
//! [`super::loha::LycorisSettings`] plus `decompose_both` and `decompose_factor`.

use super::adapter::{extra_bool, extra_i64, kaiming, Adapter, BaseOut, BuildSpec};
use super::base::Base;
use super::config::Method;
use super::ctx::ForwardCtx;
use super::loha::{check_target, LycorisSettings};
use crate::{Error, Result};
use candle_core::{DType, Tensor, Var};

/// A factor of a LoKr adapter: a full matrix, or a product of two.
pub enum Factor {
    /// One matrix.
    Full(Var),
    /// `a · b`.
    Product(Var, Var),
}

impl Factor {
    fn tensor(&self, ctx: &ForwardCtx) -> Result<Tensor> {
        Ok(match self {
            Factor::Full(v) => ctx.read(v),
            Factor::Product(a, b) => ctx.read(a).matmul(&ctx.read(b))?,
        })
    }
}

/// One LoKr adapter.
pub struct Lokr {
    /// W1.
    pub w1: Factor,
    /// W2 (4-D for a conv when full).
    pub w2: Factor,
    /// α / r.
    pub scale: f64,
    /// Probability of skipping the adapter for a training step.
    pub module_dropout: f64,
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

impl Lokr {
    /// Builds the adapter per `spec` on `base`.
    pub fn build(spec: &BuildSpec, base: &mut Base) -> Result<Self> {
        check_target(base, spec.r, "LoKr")?;
        let cfg = spec.cfg;
        let s = LycorisSettings::from_config(cfg, base.path(), base.dims())?;
        let (r, dims) = (spec.r, base.dims().to_vec());
        let (out, inn, k) = (dims[0], dims[1], dims[2..].iter().product::<usize>());
        let mut rng = spec.rng(base.path());
        let dev = crate::util::device::current();
        let factor = extra_i64(cfg, "decompose_factor", -1)?;
        if factor == 0 || factor < -1 {
            return Err(Error::Config(format!(
                "LOKR setting `decompose_factor` {factor} must be -1 (balanced) or positive"
            )));
        }
        let decompose_both = extra_bool(cfg, "decompose_both", false)?;
        let (in_m, in_n) = factorization(inn, factor);
        let (out_l, out_k) = factorization(out, factor);
        let use_w1 = !(decompose_both && (r as f64) < out_l.max(in_m) as f64 / 2.0);
        let use_w2 = (r as f64) >= out_k.max(in_n) as f64 / 2.0;
        let w1 = if use_w1 {
            let t = if s.init_weights {
                Tensor::zeros((out_l, in_m), DType::F32, &dev)?
            } else {
                kaiming(&[out_l, in_m], &mut rng)?
            };
            Factor::Full(base.var(t)?)
        } else {
            let a = if s.init_weights {
                Tensor::zeros((out_l, r), DType::F32, &dev)?
            } else {
                kaiming(&[out_l, r], &mut rng)?
            };
            Factor::Product(base.var(a)?, base.var(kaiming(&[r, in_m], &mut rng)?)?)
        };
        let w2 = if use_w2 {
            let mut shape = vec![out_k, in_n];
            shape.extend_from_slice(&dims[2..]);
            Factor::Full(base.var(kaiming(&shape, &mut rng)?)?)
        } else {
            Factor::Product(
                base.var(kaiming(&[out_k, r], &mut rng)?)?,
                base.var(kaiming(&[r, in_n * k], &mut rng)?)?,
            )
        };
        Ok(Self {
            w1,
            w2,
            scale: spec.alpha / r as f64,
            module_dropout: s.module_dropout,
        })
    }

    /// ΔW in the base layout, read through `ctx`.
    fn weight(&self, base: &Base, ctx: &ForwardCtx) -> Result<Tensor> {
        let (a, b) = (self.w1.tensor(ctx)?, self.w2.tensor(ctx)?);
        Ok((kron(&a, &b)? * self.scale)?.reshape(base.dims())?)
    }
}

impl Adapter for Lokr {
    fn method(&self) -> Method {
        Method::Lokr
    }

    fn params(&self) -> Vec<(&'static str, &Var)> {
        let mut v = vec![];
        match &self.w1 {
            Factor::Full(t) => v.push(("lokr_w1", t)),
            Factor::Product(a, b) => {
                v.push(("lokr_w1_a", a));
                v.push(("lokr_w1_b", b));
            }
        }
        match &self.w2 {
            Factor::Full(t) => v.push(("lokr_w2", t)),
            Factor::Product(a, b) => {
                v.push(("lokr_w2_a", a));
                v.push(("lokr_w2_b", b));
            }
        }
        v
    }

    fn check(&self, base: &Base) -> Result<()> {
        check_target(base, 1, "LoKr")?;
        self.weight(base, &ForwardCtx::eval())
            .map(|_| ())
            .map_err(|e| {
                base.err(format!(
                    "the LoKr factors do not make a {:?} weight ({e})",
                    base.dims()
                ))
            })
    }

    fn module_dropout(&self) -> f64 {
        self.module_dropout
    }

    fn delta(&self, base: &Base, x: &Tensor, _out: &BaseOut, ctx: &ForwardCtx) -> Result<Tensor> {
        base.apply_weight(x, &self.weight(base, ctx)?)
    }

    fn delta_weight(&self, base: &Base) -> Result<Tensor> {
        self.weight(base, &ForwardCtx::eval())
    }
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
        let a = Tensor::new(&[[1f32, 2.], [3., 4.]], &candle_core::Device::Cpu).unwrap();
        let b = Tensor::new(&[[0f32, 5.], [6., 7.]], &candle_core::Device::Cpu).unwrap();
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
