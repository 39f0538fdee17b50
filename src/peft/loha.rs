//! LoHa (FedPara, Hyeon-Woo et al. 2022), PEFT 0.21 semantics (`peft_type = "LOHA"`):
//!
//! `ΔW = (W1a · W1b) ⊙ (W2a · W2b) · α/r`;  `δ(x) = x · ΔWᵀ` (a conv: `conv(x, ΔW)` with the base's
//! stride and padding), as PEFT's `_get_delta_activations`.
//!
//! Keys: `hada_w1_a` (out, r), `hada_w1_b` (r, in·kh·kw), `hada_w2_a` (out, r), `hada_w2_b`
//! (r, in·kh·kw); all kaiming-uniform but `hada_w2_b = 0`. LyCORIS files use the same names.
//! Options (typed in [`LycorisSettings`]): `module_dropout` (skip the adapter for a step), `init_weights`;
//! `rank_dropout` and `use_effective_conv2d` are refused.

use super::adapter::{kaiming, Adapter, BaseOut, BuildSpec};
use super::base::{Base, BaseKind};
use super::config::{AdapterConfig, Method};
use super::ctx::ForwardCtx;
use crate::{Error, Result};
use candle_core::{DType, Tensor, Var};

/// The options LoHa and LoKr share.
#[derive(Debug, Clone, PartialEq)]
pub struct LycorisSettings {
    /// Probability of skipping the adapter in a training step.
    pub module_dropout: f64,
    /// Start with ΔW = 0 (`true`) or random factors (PEFT's test setting).
    pub init_weights: bool,
}

impl LycorisSettings {
    /// Reads and checks the options for the layer at `path` whose weight has `dims`.
    pub fn from_config(cfg: &AdapterConfig, path: &str, dims: &[usize]) -> Result<Self> {
        use super::adapter::{extra_bool, extra_f64};
        let module_dropout = extra_f64(cfg, "module_dropout", 0.0)?;
        if !(0.0..1.0).contains(&module_dropout) {
            return Err(Error::Config(format!(
                "module_dropout {module_dropout} must be in [0, 1)"
            )));
        }
        if extra_f64(cfg, "rank_dropout", 0.0)? != 0.0 {
            return Err(Error::Config(format!(
                "{path}: rank_dropout is not supported yet (module_dropout is)"
            )));
        }
        let k: usize = dims[2..].iter().product();
        if extra_bool(cfg, "use_effective_conv2d", false)? && dims.len() == 4 && k > 1 {
            return Err(Error::Config(format!(
                "{path}: use_effective_conv2d (the CP decomposition of conv kernels) is not supported yet"
            )));
        }
        Ok(Self {
            module_dropout,
            init_weights: extra_bool(cfg, "init_weights", true)?,
        })
    }
}

/// Refuses a non-linear, non-conv base or a zero rank.
pub(crate) fn check_target(base: &Base, r: usize, what: &str) -> Result<()> {
    if !matches!(base.kind(), BaseKind::Linear | BaseKind::Conv2d(_)) {
        return Err(base.err(format!(
            "{what} adapts linear and conv layers, not {:?}",
            base.kind()
        )));
    }
    if r == 0 {
        return Err(Error::Config(format!(
            "{}: r must be positive",
            base.path()
        )));
    }
    Ok(())
}

/// One LoHa adapter.
pub struct Loha {
    /// hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b.
    pub w: [Var; 4],
    /// α / r.
    pub scale: f64,
    /// Probability of skipping the adapter for a training step.
    pub module_dropout: f64,
}

impl Loha {
    /// Builds the adapter per `spec` on `base`.
    pub fn build(spec: &BuildSpec, base: &mut Base) -> Result<Self> {
        check_target(base, spec.r, "LoHa")?;
        let s = LycorisSettings::from_config(spec.cfg, base.path(), base.dims())?;
        let (r, dims) = (spec.r, base.dims());
        let (out, cols) = (dims[0], dims[1..].iter().product::<usize>());
        let mut rng = spec.rng(base.path());
        let w1a = kaiming(&[out, r], &mut rng)?;
        let w1b = kaiming(&[r, cols], &mut rng)?;
        let w2a = kaiming(&[out, r], &mut rng)?;
        let w2b = if s.init_weights {
            Tensor::zeros((r, cols), DType::F32, &crate::util::device::current())?
        } else {
            kaiming(&[r, cols], &mut rng)?
        };
        Ok(Self {
            w: [
                base.var(w1a)?,
                base.var(w1b)?,
                base.var(w2a)?,
                base.var(w2b)?,
            ],
            scale: spec.alpha / r as f64,
            module_dropout: s.module_dropout,
        })
    }

    /// The rank.
    pub fn rank(&self) -> usize {
        self.w[1].dims()[0]
    }

    /// ΔW in the base layout, read through `ctx` (differentiable when it records a graph).
    fn weight(&self, base: &Base, ctx: &ForwardCtx) -> Result<Tensor> {
        let p1 = ctx.read(&self.w[0]).matmul(&ctx.read(&self.w[1]))?;
        let p2 = ctx.read(&self.w[2]).matmul(&ctx.read(&self.w[3]))?;
        Ok(((p1 * p2)? * self.scale)?.reshape(base.dims())?)
    }
}

impl Adapter for Loha {
    fn method(&self) -> Method {
        Method::Loha
    }

    fn params(&self) -> Vec<(&'static str, &Var)> {
        vec![
            ("hada_w1_a", &self.w[0]),
            ("hada_w1_b", &self.w[1]),
            ("hada_w2_a", &self.w[2]),
            ("hada_w2_b", &self.w[3]),
        ]
    }

    fn check(&self, base: &Base) -> Result<()> {
        check_target(base, self.rank(), "LoHa")?;
        self.weight(base, &ForwardCtx::eval())
            .map(|_| ())
            .map_err(|e| {
                base.err(format!(
                    "the LoHa factors do not make a {:?} weight ({e})",
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
