//! IA3 (Liu et al. 2022), PEFT 0.21 semantics (`peft_type = "IA3"`): one learned vector per layer,
//! starting at 1.
//!
//! - Ordinary targets scale the output, bias included: `y = l ⊙ (W x + b)`; `ia3_l` (out, 1),
//!   conv (1, out, 1, 1). As an additive share: `δ = (l − 1) ⊙ (W x + b)`.
//! - `feedforward_modules` scale the input: `y = W (l ⊙ x) + b`; `ia3_l` (1, in), conv
//!   (1, in, 1, 1). As an additive share: `δ = W ((l − 1) ⊙ x)`.
//! - With gain t the vector acts as `1 + t (l − 1)`. Several active IA3 adapters multiply
//!   (`l₁ ⊙ l₂`, PEFT's behaviour) unless routed, when each adds its own share.
//! - Merging multiplies the weight's rows (and the bias) or columns by the vector.
//!
//! Options (typed in [`Ia3Settings`]): `feedforward_modules`, `init_ia3_weights`.

use super::adapter::{Adapter, BaseOut, BuildSpec, Merged, Rescale, Unmerge};
use super::base::{Base, BaseKind};
use super::config::{spec_matches, AdapterConfig, Method, ModuleSpec};
use super::ctx::ForwardCtx;
use crate::{Error, Result};
use candle_core::{DType, Tensor, Var};

/// IA3's options from `adapter_config.json`.
#[derive(Debug, Clone, PartialEq)]
pub struct Ia3Settings {
    /// Modules whose input (not output) is scaled.
    pub feedforward_modules: Option<ModuleSpec>,
    /// Start at 1 (`true`) or at random values (PEFT's test setting).
    pub init_ia3_weights: bool,
}

impl Ia3Settings {
    /// Reads and checks the options.
    pub fn from_config(cfg: &AdapterConfig) -> Result<Self> {
        let feedforward_modules = match cfg.extra.get("feedforward_modules") {
            None | Some(serde_json::Value::Null) => None,
            Some(v) => Some(
                serde_json::from_value(v.clone())
                    .map_err(|e| Error::Config(format!("feedforward_modules: {e}")))?,
            ),
        };
        Ok(Self {
            feedforward_modules,
            init_ia3_weights: super::adapter::extra_bool(cfg, "init_ia3_weights", true)?,
        })
    }
}

/// One IA3 adapter.
pub struct Ia3 {
    /// The learned vector: (out, 1) or (1, in); conv (1, n, 1, 1).
    pub l: Var,
    /// Scales the input (a feed-forward module) rather than the output.
    pub feedforward: bool,
}

impl Ia3 {
    /// Builds the adapter per `spec` on `base`.
    pub fn build(spec: &BuildSpec, base: &mut Base) -> Result<Self> {
        let s = Ia3Settings::from_config(spec.cfg)?;
        let feedforward = match &s.feedforward_modules {
            Some(m) => spec_matches(m, base.path())?,
            None => false,
        };
        let dims = base.dims();
        let (out, inn) = (dims[0], dims[1]);
        let shape = match (base.kind(), feedforward) {
            (BaseKind::Conv2d(_), true) => vec![1, inn, 1, 1],
            (BaseKind::Conv2d(_), false) => vec![1, out, 1, 1],
            (BaseKind::Linear, true) => vec![1, inn],
            (BaseKind::Linear, false) => vec![out, 1],
            (k, _) => return Err(base.err(format!("IA3 adapts linear and conv layers, not {k:?}"))),
        };
        let l = if s.init_ia3_weights {
            Tensor::ones(
                shape.as_slice(),
                DType::F32,
                &crate::util::device::current(),
            )?
        } else {
            let mut rng = spec.rng(base.path());
            (super::adapter::kaiming(&shape, &mut rng)? + 1.0)?
        };
        Ok(Self {
            l: base.var(l)?,
            feedforward,
        })
    }

    /// The vector at gain `t`: `1 + t (l − 1)` (flat).
    fn vector(&self, gain: f64, ctx: &ForwardCtx) -> Result<Tensor> {
        let v = ctx.read(&self.l).flatten_all()?;
        Ok(if gain == 1.0 {
            v
        } else {
            (((v - 1.0)? * gain)? + 1.0)?
        })
    }

    /// The vector shaped to scale the weight's rows (output) or columns (feed-forward input).
    fn weight_view(&self, base: &Base, l: &Tensor) -> Result<Tensor> {
        let n = l.dim(0)?;
        Ok(match (base.kind(), self.feedforward) {
            (BaseKind::Conv2d(_), true) => l.reshape((1, n, 1, 1))?,
            (BaseKind::Conv2d(_), false) => l.reshape((n, 1, 1, 1))?,
            (_, true) => l.reshape((1, n))?,
            (_, false) => l.reshape((n, 1))?,
        })
    }
}

impl Adapter for Ia3 {
    fn method(&self) -> Method {
        Method::Ia3
    }

    fn params(&self) -> Vec<(&'static str, &Var)> {
        vec![("ia3_l", &self.l)]
    }

    fn check(&self, base: &Base) -> Result<()> {
        let n = self.l.elem_count();
        let want = if self.feedforward {
            base.dims()[1]
        } else {
            base.dims()[0]
        };
        if n != want {
            return Err(base.err(format!(
                "ia3_l has {n} entries, the base needs {want} ({:?})",
                base.dims()
            )));
        }
        Ok(())
    }

    fn delta(&self, base: &Base, x: &Tensor, out: &BaseOut, ctx: &ForwardCtx) -> Result<Tensor> {
        let v = (self.vector(1.0, ctx)? - 1.0)?;
        if self.feedforward {
            base.forward_nobias(&x.broadcast_mul(&base.input_view(&v, x)?)?)
        } else {
            Ok(out
                .y0
                .broadcast_mul(&base.feature_view(&v, out.y0.rank())?)?)
        }
    }

    fn rescale(&self, _base: &Base, gain: f64, ctx: &ForwardCtx) -> Result<Option<Rescale>> {
        let v = self.vector(gain, ctx)?;
        Ok(Some(if self.feedforward {
            Rescale::Input(v)
        } else {
            Rescale::Output(v)
        }))
    }

    fn delta_weight(&self, base: &Base) -> Result<Tensor> {
        let w = base.weight().dense()?.to_dtype(DType::F32)?;
        let v = self.l.as_tensor().detach().flatten_all()?;
        Ok((w.broadcast_mul(&self.weight_view(base, &v)?)? - &w)?)
    }

    fn merge(&self, base: &Base, w: &Tensor, bias: Option<&Tensor>, gain: f64) -> Result<Merged> {
        let v = self.vector(gain, &ForwardCtx::eval())?;
        let smallest = v.abs()?.min(0)?.to_scalar::<f32>()?;
        if smallest < 1e-8 {
            return Err(base.err(format!(
                "an IA3 vector entry is {smallest:e}; merging would not be reversible"
            )));
        }
        let bias = match (bias, self.feedforward) {
            (Some(b), false) => Some((b.to_dtype(DType::F32)? * &v)?),
            (b, _) => b.cloned(),
        };
        let view = self.weight_view(base, &v)?;
        Ok(Merged {
            weight: w.to_dtype(DType::F32)?.broadcast_mul(&view)?,
            bias,
            undo: Box::new(Ia3Undo {
                view,
                l: v,
                feedforward: self.feedforward,
            }),
        })
    }
}

/// An IA3 merge: rows (and the bias) or columns were multiplied by `l`.
struct Ia3Undo {
    l: Tensor,
    view: Tensor,
    feedforward: bool,
}

impl Unmerge for Ia3Undo {
    fn unmerge_weight(&self, _base: &Base, w: Tensor) -> Result<Tensor> {
        Ok(w.broadcast_div(&self.view)?)
    }
    fn unmerge_bias(&self, bias: Option<Tensor>) -> Result<Option<Tensor>> {
        Ok(match (bias, self.feedforward) {
            (Some(b), false) => Some((b.to_dtype(DType::F32)? / &self.l)?),
            (b, _) => b,
        })
    }
}
