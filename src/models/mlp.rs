//! A residual MLP with Hugging Face-style module paths, used by the `demo` command and the tests:
//! `embed` (optional token embedding), `layers.N.fc1` / `layers.N.fc2` (Linear), `head` (Linear).
//!
//! Forward: h = x (or embed(ids)); for each layer h = h + fc2(tanh(fc1(h))); y = head(h).
//! Weights load from a safetensors file with those names.

use crate::peft::{Adapted, AdaptedLayer, AdaptedLinear, AdapterPlan, ForwardCtx};
use crate::util::SafeTensors;
use crate::Result;
use candle_core::{Device, Tensor};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Sizes of the MLP.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct MlpConfig {
    /// Input (and residual) width.
    pub hidden_size: usize,
    /// Inner width of each block.
    pub intermediate_size: usize,
    /// Number of blocks.
    pub num_layers: usize,
    /// Output width.
    pub out_size: usize,
}

struct Block {
    fc1: AdaptedLinear,
    fc2: AdaptedLinear,
}

/// The model.
pub struct Mlp {
    layers: Vec<Block>,
    head: AdaptedLinear,
}

impl MlpConfig {
    /// Random base weights (N(0, 1/fan_in)) with their tensor names, from a seed.
    pub fn random_weights(&self, seed: u64) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        let mut add = |name: &str, o: usize, i: usize| -> Result<()> {
            let mut rng = crate::rng::rng_for(seed, name);
            out.insert(
                format!("{name}.weight"),
                crate::rng::normal(&[o, i], 1.0 / (i as f64).sqrt(), &mut rng)?,
            );
            out.insert(
                format!("{name}.bias"),
                crate::rng::normal(&[o], 0.1, &mut rng)?,
            );
            Ok(())
        };
        for l in 0..self.num_layers {
            add(
                &format!("layers.{l}.fc1"),
                self.intermediate_size,
                self.hidden_size,
            )?;
            add(
                &format!("layers.{l}.fc2"),
                self.hidden_size,
                self.intermediate_size,
            )?;
        }
        add("head", self.out_size, self.hidden_size)?;
        Ok(out)
    }
}

impl Mlp {
    /// Builds the model from named tensors, asking `plan` for adapters at every module path.
    pub fn new(
        cfg: &MlpConfig,
        weights: &BTreeMap<String, Tensor>,
        plan: &AdapterPlan,
        file: &std::path::Path,
    ) -> Result<Self> {
        let get = |k: &str, shape: &[usize]| -> Result<Tensor> {
            let t = weights.get(k).ok_or_else(|| crate::Error::Missing {
                path: file.into(),
                key: k.into(),
            })?;
            if t.dims() != shape {
                return Err(crate::Error::Shape {
                    path: file.into(),
                    key: k.into(),
                    expected: shape.to_vec(),
                    found: t.dims().to_vec(),
                });
            }
            Ok(t.to_dtype(candle_core::DType::F32)?)
        };
        let lin = |name: &str, o: usize, i: usize| -> Result<AdaptedLinear> {
            plan.linear(
                name,
                get(&format!("{name}.weight"), &[o, i])?,
                Some(get(&format!("{name}.bias"), &[o])?),
            )
        };
        let mut layers = vec![];
        for l in 0..cfg.num_layers {
            layers.push(Block {
                fc1: lin(
                    &format!("layers.{l}.fc1"),
                    cfg.intermediate_size,
                    cfg.hidden_size,
                )?,
                fc2: lin(
                    &format!("layers.{l}.fc2"),
                    cfg.hidden_size,
                    cfg.intermediate_size,
                )?,
            });
        }
        let mut m = Self {
            layers,
            head: lin("head", cfg.out_size, cfg.hidden_size)?,
        };
        plan.finish(&mut m.layers_mut())?;
        Ok(m)
    }

    /// Loads weights from a safetensors file.
    pub fn load(cfg: &MlpConfig, path: &std::path::Path, plan: &AdapterPlan) -> Result<Self> {
        let st = SafeTensors::read(path)?;
        Self::new(cfg, &st.into_tensors(), plan, path)
    }

    /// x: (..., hidden) → (..., out).
    pub fn forward(&self, x: &Tensor, ctx: &ForwardCtx) -> Result<Tensor> {
        let mut h = x.clone();
        for b in &self.layers {
            let u = b.fc1.forward(&h, ctx)?.tanh()?;
            h = (h + b.fc2.forward(&u, ctx)?)?;
        }
        self.head.forward(&h, ctx)
    }

    /// The device of the weights.
    pub fn device(&self) -> Device {
        self.head.base_weight().device()
    }
}

impl Adapted for Mlp {
    fn layers(&self) -> Vec<&AdaptedLayer> {
        let mut v: Vec<&AdaptedLayer> = vec![];
        for b in &self.layers {
            v.push(&b.fc1);
            v.push(&b.fc2);
        }
        v.push(&self.head);
        v
    }
    fn layers_mut(&mut self) -> Vec<&mut AdaptedLayer> {
        let mut v: Vec<&mut AdaptedLayer> = vec![];
        for b in &mut self.layers {
            v.push(&mut b.fc1);
            v.push(&mut b.fc2);
        }
        v.push(&mut self.head);
        v
    }
}
