//! VeRA (Kopiczko et al. 2024), PEFT 0.21 semantics (`peft_type = "VERA"`):
//!
//! `δ(x) = λ_b ⊙ (B_s (λ_d ⊙ (A_s x)))`, with frozen random projections shared by every layer and
//! sliced to this one (`A_s = vera_A[:, :in]`, `B_s = vera_B[:out, :]`).
//!
//! Keys: `vera_lambda_d` (r), `vera_lambda_b` (out); the shared `base_model.vera_A` (r, max in) and
//! `base_model.vera_B` (max out, r). λ_d starts at `d_initial` (0.1), λ_b at 0. Options:
//! `vera_dropout`, `d_initial`, `projection_prng_key`, `save_projection` (must stay true),
//! `init_weights`.

use super::adapter::{extra_bool, extra_f64, extra_i64, Adapter, BaseOut, BuildSpec};
use super::base::{Base, BaseKind};
use super::config::AdapterConfig;
use super::config::Method;
use super::ctx::ForwardCtx;
use super::layer::AdaptedLayer;
use crate::nn::frozen;
use crate::rng::rng_for;
use crate::{Error, Result};
use candle_core::{DType, Tensor, Var};

/// VeRA's options, typed (they stay in the config's fields, so `adapter_config.json` round-trips
/// unchanged).
#[derive(Debug, Clone, PartialEq)]
pub struct VeraSettings {
    /// Seed of the shared projections (PEFT: `projection_prng_key`, 0).
    pub projection_prng_key: u64,
    /// Dropout on the layer input, in [0, 1).
    pub vera_dropout: f64,
    /// λ_d's starting value (0.1).
    pub d_initial: f64,
    /// λ_b = 0 at the start (`true`), or random λ_d and λ_b = 1 (PEFT's test setting).
    pub init_weights: bool,
}

impl VeraSettings {
    /// Reads and checks the options; a wrong type or value names its key.
    pub fn from_config(cfg: &AdapterConfig) -> Result<Self> {
        if !extra_bool(cfg, "save_projection", true)? {
            return Err(Error::Config(
                "VeRA with save_projection = false is not supported: the projections come from torch's generator, which postforge cannot replay; keep them in the file".into(),
            ));
        }
        let key = extra_i64(cfg, "projection_prng_key", 0)?;
        let vera_dropout = extra_f64(cfg, "vera_dropout", 0.0)?;
        if !(0.0..1.0).contains(&vera_dropout) {
            return Err(Error::Config(format!(
                "VERA setting `vera_dropout` {vera_dropout} must be in [0, 1)"
            )));
        }
        Ok(Self {
            projection_prng_key: u64::try_from(key).map_err(|_| {
                Error::Config(format!(
                    "VERA setting `projection_prng_key` {key} must not be negative"
                ))
            })?,
            vera_dropout,
            d_initial: extra_f64(cfg, "d_initial", 0.1)?,
            init_weights: extra_bool(cfg, "init_weights", true)?,
        })
    }
}

/// One VeRA adapter.
pub struct Vera {
    /// The shared (vera_A (r, max_in), vera_B (max_out, r)); `None` until
    /// [`share_vera_projections`] has seen every layer.
    pub proj: Option<(Tensor, Tensor)>,
    /// vera_lambda_d (r).
    pub lambda_d: Var,
    /// vera_lambda_b (out).
    pub lambda_b: Var,
    /// vera_dropout.
    pub dropout: f64,
    /// (out, in) of the layer.
    pub dims: (usize, usize),
}

impl Vera {
    /// Builds the adapter per `spec` on `base` (the projections come later, shared).
    pub fn build(spec: &BuildSpec, base: &mut Base) -> Result<Self> {
        let cfg = spec.cfg;
        if base.kind() != BaseKind::Linear {
            return Err(base.err("VeRA adapts linear layers only"));
        }
        if spec.r == 0 {
            return Err(Error::Config(format!(
                "{}: r must be positive",
                base.path()
            )));
        }
        let st = VeraSettings::from_config(cfg)?;
        let dropout = st.vera_dropout;
        let (out, inn) = base.dims2()?;
        let dev = crate::util::device::current();
        let (ld, lb) = if st.init_weights {
            (
                Tensor::full(st.d_initial as f32, spec.r, &dev)?,
                Tensor::zeros(out, DType::F32, &dev)?,
            )
        } else {
            let mut rng = spec.rng(base.path());
            (
                crate::rng::normal(&[spec.r], 1.0, &mut rng)?,
                Tensor::ones(out, DType::F32, &dev)?,
            )
        };
        Ok(Self {
            proj: None,
            lambda_d: base.var(ld)?,
            lambda_b: base.var(lb)?,
            dropout,
            dims: (out, inn),
        })
    }

    /// The projections sliced to this layer: (A_s (r, in), B_s (out, r)).
    pub fn slices(&self) -> Result<(Tensor, Tensor)> {
        let (out, inn) = self.dims;
        match &self.proj {
            Some((a, b)) => Ok((a.narrow(1, 0, inn)?, b.narrow(0, 0, out)?)),
            None => Err(Error::Msg(
                "VeRA projections are not set (share_vera_projections was not called)".into(),
            )),
        }
    }

    /// The rank.
    pub fn rank(&self) -> usize {
        self.lambda_d.dims()[0]
    }
}

impl Adapter for Vera {
    fn method(&self) -> Method {
        Method::Vera
    }

    fn params(&self) -> Vec<(&'static str, &Var)> {
        vec![
            ("vera_lambda_b", &self.lambda_b),
            ("vera_lambda_d", &self.lambda_d),
        ]
    }

    fn check(&self, base: &Base) -> Result<()> {
        if base.kind() != BaseKind::Linear || base.dims2()? != self.dims {
            return Err(base.err(format!(
                "a VeRA adapter for {:?} does not fit weight {:?}",
                self.dims,
                base.dims()
            )));
        }
        Ok(())
    }

    fn input_dropout(&self) -> f64 {
        self.dropout
    }

    fn delta(&self, base: &Base, x: &Tensor, _out: &BaseOut, ctx: &ForwardCtx) -> Result<Tensor> {
        let (a, b) = self.slices().map_err(|e| base.err(e.to_string()))?;
        let h = frozen::plain_linear(x, &a)?.broadcast_mul(&ctx.read(&self.lambda_d))?;
        Ok(frozen::plain_linear(&h, &b)?.broadcast_mul(&ctx.read(&self.lambda_b))?)
    }

    fn delta_weight(&self, base: &Base) -> Result<Tensor> {
        let (a, b) = self.slices().map_err(|e| base.err(e.to_string()))?;
        let bl = b.broadcast_mul(&self.lambda_b.as_tensor().detach().unsqueeze(1)?)?;
        let al = a.broadcast_mul(&self.lambda_d.as_tensor().detach().unsqueeze(1)?)?;
        Ok(bl.matmul(&al)?.reshape(base.dims())?)
    }
}

/// Gives every VeRA adapter `name` in `layers` the shared projections: `given` (read from a file),
/// or fresh ones drawn from `seed` with PEFT's shapes and init (kaiming-uniform, gain √2:
/// vera_A (r, max in) with bound √6/√max_in, vera_B (max out, r) with bound √6/√r), sized to the
/// largest targeted layer. Returns the projections (for saving), if any layer has the adapter.
pub fn share_vera_projections(
    layers: &mut [&mut AdaptedLayer],
    name: &str,
    seed: u64,
    given: Option<(Tensor, Tensor)>,
) -> Result<Option<(Tensor, Tensor)>> {
    let mut max = None::<(usize, usize, usize)>;
    for l in layers.iter() {
        if let Some(v) = l.adapter_as::<Vera>(name) {
            let ((o, i), r) = (v.dims, v.rank());
            max = Some(match max {
                None => (o, i, r),
                Some((mo, mi, mr)) => {
                    if mr != r {
                        return Err(Error::Config(format!(
                            "VeRA adapter `{name}`: every layer needs the same r ({mr} vs {r})"
                        )));
                    }
                    (mo.max(o), mi.max(i), r)
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
                Tensor::from_vec(v, shape, &crate::util::device::current())
            };
            (uni(&[r, mi], mi, &mut rng)?, uni(&[mo, r], r, &mut rng)?)
        }
    };
    for l in layers.iter_mut() {
        let dev = l.device();
        if let Some(v) = l.adapter_as_mut::<Vera>(name) {
            // One copy per device (a model on one device shares one).
            v.proj = Some((a.to_device(&dev)?, b.to_device(&dev)?));
        }
    }
    Ok(Some((a, b)))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A setting of the wrong type or out of range is refused with its key named, not replaced by
    /// the default.
    #[test]
    fn bad_settings_name_their_key() {
        let base = AdapterConfig {
            peft_type: "VERA".into(),
            ..Default::default()
        };
        assert_eq!(VeraSettings::from_config(&base).unwrap().d_initial, 0.1);
        for (key, v) in [
            ("vera_dropout", serde_json::json!("0.1")),
            ("vera_dropout", serde_json::json!(1.0)),
            ("d_initial", serde_json::json!([1])),
            ("init_weights", serde_json::json!("yes")),
            ("projection_prng_key", serde_json::json!(-3)),
        ] {
            let mut cfg = base.clone();
            cfg.extra.insert(key.into(), v);
            let e = VeraSettings::from_config(&cfg).unwrap_err().to_string();
            assert!(e.contains(key), "{e}");
        }
    }
}
