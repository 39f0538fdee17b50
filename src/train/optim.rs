//! AdamW with PyTorch's update rule (decoupled weight decay, bias-corrected moments), fused into one
//! multithreaded in-place pass per parameter: candle's AdamW builds a dozen temporaries per tensor.
//!
//! p ← p·(1 − lr·wd); m ← m + (1−β₁)(g − m); v ← β₂v + (1−β₂)g²;
//! p ← p − lr/(1−β₁ᵗ) · m / (√v/√(1−β₂ᵗ) + ε)

use crate::{Error, Result};
use candle_core::{CpuStorage, InplaceOp2, Layout, Tensor, Var};
use rayon::prelude::*;
use std::collections::BTreeMap;
use std::sync::Mutex;

/// AdamW hyper-parameters (PyTorch's defaults except weight decay, which follows transformers: 0).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    /// β₁.
    pub beta1: f64,
    /// β₂.
    pub beta2: f64,
    /// ε.
    pub eps: f64,
    /// Decoupled weight decay.
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

struct Moments {
    m: Vec<f32>,
    v: Vec<f32>,
    /// Updates this parameter has received (torch keeps the count per parameter).
    t: u64,
}

/// One parameter and its moments.
struct Slot {
    name: String,
    var: Var,
    /// This parameter's learning rate over the scheduled one (a parameter group's lr).
    lr_scale: f64,
    state: Mutex<Moments>,
}

/// Fused AdamW over named parameters.
pub struct AdamW {
    cfg: AdamWConfig,
    slots: Vec<Slot>,
    step: u64,
}

#[derive(Clone, Copy)]
struct Hyper {
    decay: f32,
    b1: f32,
    b2: f32,
    step_size: f32,
    bc2_sqrt: f32,
    eps: f32,
    grad_scale: f32,
}

const CHUNK: usize = 1 << 14;

fn kernel(p: &mut [f32], g: &[f32], m: &mut [f32], v: &mut [f32], h: Hyper) {
    for i in 0..p.len() {
        let gi = g[i] * h.grad_scale;
        let mi = m[i] + (1.0 - h.b1) * (gi - m[i]);
        let vi = h.b2 * v[i] + (1.0 - h.b2) * gi * gi;
        m[i] = mi;
        v[i] = vi;
        let denom = vi.sqrt() / h.bc2_sqrt + h.eps;
        p[i] = p[i] * h.decay - h.step_size * mi / denom;
    }
}

struct FusedStep<'a> {
    h: Hyper,
    state: &'a Mutex<Moments>,
}

impl InplaceOp2 for FusedStep<'_> {
    fn name(&self) -> &'static str {
        "fused-adamw"
    }
    fn cpu_fwd(
        &self,
        s1: &mut CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<()> {
        let (CpuStorage::F32(p), CpuStorage::F32(g)) = (s1, s2) else {
            candle_core::bail!("fused AdamW needs f32 parameters and gradients");
        };
        let (Some((pa, pb)), Some((ga, gb))) = (l1.contiguous_offsets(), l2.contiguous_offsets())
        else {
            candle_core::bail!("fused AdamW needs contiguous tensors");
        };
        let (p, g) = (&mut p[pa..pb], &g[ga..gb]);
        let mut st = self
            .state
            .lock()
            .map_err(|_| candle_core::Error::Msg("optimizer state poisoned".into()))?;
        let Moments { m, v, .. } = &mut *st;
        if p.len() < 2 * CHUNK {
            kernel(p, g, m, v, self.h);
        } else {
            p.par_chunks_mut(CHUNK)
                .zip(g.par_chunks(CHUNK))
                .zip(m.par_chunks_mut(CHUNK))
                .zip(v.par_chunks_mut(CHUNK))
                .for_each(|(((p, g), m), v)| kernel(p, g, m, v, self.h));
        }
        Ok(())
    }
}

impl AdamW {
    /// An optimizer over `params` (name, variable). Parameters must be f32.
    pub fn new(params: Vec<(String, Var)>, cfg: AdamWConfig) -> Result<Self> {
        let mut slots = Vec::with_capacity(params.len());
        for (name, var) in params {
            if var.dtype() != candle_core::DType::F32 {
                return Err(Error::Msg(format!(
                    "AdamW: parameter `{name}` is {:?}, expected f32",
                    var.dtype()
                )));
            }
            let n = var.elem_count();
            slots.push(Slot {
                name,
                var,
                lr_scale: 1.0,
                state: Mutex::new(Moments {
                    m: vec![0.0; n],
                    v: vec![0.0; n],
                    t: 0,
                }),
            });
        }
        Ok(Self {
            cfg,
            slots,
            step: 0,
        })
    }

    /// Per-parameter learning-rate multipliers (parameter groups: kohya's block lr weights,
    /// `unet_lr` / `text_encoder_lr`); parameters not named keep 1. A name that is not a parameter,
    /// or a multiplier that is negative or not finite, is an error.
    pub fn set_lr_scales(&mut self, scales: &BTreeMap<String, f64>) -> Result<()> {
        for (name, &s) in scales {
            if !s.is_finite() || s < 0.0 {
                return Err(Error::Config(format!(
                    "learning-rate multiplier {s} of `{name}` is not a finite number >= 0"
                )));
            }
            let slot = self
                .slots
                .iter_mut()
                .find(|x| &x.name == name)
                .ok_or_else(|| Error::Msg(format!("no parameter `{name}` to scale the lr of")))?;
            slot.lr_scale = s;
        }
        Ok(())
    }

    /// Number of updates done.
    pub fn step_count(&self) -> u64 {
        self.step
    }

    /// Parameter names, in order.
    pub fn names(&self) -> Vec<&str> {
        self.slots.iter().map(|s| s.name.as_str()).collect()
    }

    /// One update with learning rate `lr`, gradients `grads` (by parameter name) multiplied by
    /// `grad_scale` (gradient clipping). Parameters without a gradient are left unchanged.
    pub fn step(
        &mut self,
        grads: &BTreeMap<String, Tensor>,
        lr: f64,
        grad_scale: f64,
    ) -> Result<()> {
        self.step += 1;
        let c = self.cfg;
        for slot in &self.slots {
            let Some(g) = grads.get(&slot.name) else {
                continue;
            };
            let lr = lr * slot.lr_scale;
            // Bias correction uses this parameter's own update count, as torch does.
            let t = {
                let mut st = slot
                    .state
                    .lock()
                    .map_err(|_| Error::Msg("optimizer state poisoned".into()))?;
                st.t += 1;
                st.t as i32
            };
            let (bc1, bc2) = (1.0 - c.beta1.powi(t), 1.0 - c.beta2.powi(t));
            let h = Hyper {
                decay: (1.0 - lr * c.weight_decay) as f32,
                b1: c.beta1 as f32,
                b2: c.beta2 as f32,
                step_size: (lr / bc1) as f32,
                bc2_sqrt: bc2.sqrt() as f32,
                eps: c.eps as f32,
                grad_scale: grad_scale as f32,
            };
            if g.dims() != slot.var.dims() {
                return Err(Error::Msg(format!(
                    "AdamW: gradient of `{}` has shape {:?}, parameter {:?}",
                    slot.name,
                    g.dims(),
                    slot.var.dims()
                )));
            }
            let g = g.to_dtype(candle_core::DType::F32)?.contiguous()?;
            if slot.var.device().is_cpu() {
                slot.var.as_tensor().inplace_op2(
                    &g,
                    &FusedStep {
                        h,
                        state: &slot.state,
                    },
                )?;
            } else {
                self.step_generic(slot, &g, h)?;
            }
        }
        Ok(())
    }

    /// The same update with tensor ops, for non-CPU devices.
    fn step_generic(&self, slot: &Slot, g: &Tensor, h: Hyper) -> Result<()> {
        let mut st = slot
            .state
            .lock()
            .map_err(|_| Error::Msg("optimizer state poisoned".into()))?;
        let dev = slot.var.device();
        let shape = slot.var.shape().clone();
        let m = Tensor::from_slice(&st.m, &shape, dev)?;
        let v = Tensor::from_slice(&st.v, &shape, dev)?;
        let g = (g * h.grad_scale as f64)?;
        let m = (&m + ((&g - &m)? * (1.0 - h.b1 as f64))?)?;
        let v = ((&v * h.b2 as f64)? + (g.sqr()? * (1.0 - h.b2 as f64))?)?;
        let denom = ((v.sqrt()? / h.bc2_sqrt as f64)? + h.eps as f64)?;
        let p =
            ((slot.var.as_tensor() * h.decay as f64)? - (m.div(&denom)? * h.step_size as f64)?)?;
        slot.var.set(&p)?;
        st.m = m.flatten_all()?.to_vec1()?;
        st.v = v.flatten_all()?.to_vec1()?;
        Ok(())
    }

    /// Moments as tensors named `exp_avg.<name>` / `exp_avg_sq.<name>` (for checkpoints).
    pub fn state_tensors(&self) -> Result<BTreeMap<String, Tensor>> {
        let mut out = BTreeMap::new();
        for s in &self.slots {
            let st = s
                .state
                .lock()
                .map_err(|_| Error::Msg("optimizer state poisoned".into()))?;
            let shape = s.var.shape().clone();
            out.insert(
                format!("exp_avg.{}", s.name),
                Tensor::from_slice(&st.m, &shape, &crate::util::device::current())?,
            );
            out.insert(
                format!("exp_avg_sq.{}", s.name),
                Tensor::from_slice(&st.v, &shape, &crate::util::device::current())?,
            );
        }
        Ok(out)
    }

    /// Restores moments and the step count saved by [`Self::state_tensors`].
    pub fn load_state(
        &mut self,
        tensors: &BTreeMap<String, Tensor>,
        step: u64,
        file: &std::path::Path,
    ) -> Result<()> {
        for s in &self.slots {
            let mut st = s
                .state
                .lock()
                .map_err(|_| Error::Msg("optimizer state poisoned".into()))?;
            // Per-parameter update counts (older checkpoints: the global step).
            st.t = match tensors.get(&format!("step.{}", s.name)) {
                Some(t) => t
                    .flatten_all()?
                    .to_vec1::<f64>()?
                    .first()
                    .copied()
                    .unwrap_or(step as f64) as u64,
                None => step,
            };
            let Moments { m, v, .. } = &mut *st;
            for (prefix, dst) in [("exp_avg", m), ("exp_avg_sq", v)] {
                let key = format!("{prefix}.{}", s.name);
                let t = tensors.get(&key).ok_or_else(|| Error::Missing {
                    path: file.into(),
                    key: key.clone(),
                })?;
                if t.dims() != s.var.dims() {
                    return Err(Error::Shape {
                        path: file.into(),
                        key,
                        expected: s.var.dims().to_vec(),
                        found: t.dims().to_vec(),
                    });
                }
                *dst = t.flatten_all()?.to_vec1()?;
            }
        }
        self.step = step;
        Ok(())
    }
}

#[cfg(test)]
mod lr_scale_tests {
    use super::*;
    use candle_core::{Device, Tensor};

    /// A parameter's lr multiplier scales its update (Adam's first step moves each weight by lr):
    /// 0 leaves it unchanged, 2 moves it twice as far; unknown names and bad values are refused.
    #[test]
    fn lr_scales_scale_the_update() {
        let mk = || {
            Var::from_tensor(&Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap())
                .unwrap()
        };
        let (a, b, c) = (mk(), mk(), mk());
        let mut opt = AdamW::new(
            vec![
                ("a".into(), a.clone()),
                ("b".into(), b.clone()),
                ("c".into(), c.clone()),
            ],
            AdamWConfig::default(),
        )
        .unwrap();
        opt.set_lr_scales(&BTreeMap::from([
            ("b".to_string(), 2.0),
            ("c".to_string(), 0.0),
        ]))
        .unwrap();
        let g = Tensor::new(&[1f32, -1.0, 0.5], &Device::Cpu).unwrap();
        let grads: BTreeMap<String, Tensor> = ["a", "b", "c"]
            .iter()
            .map(|n| (n.to_string(), g.clone()))
            .collect();
        opt.step(&grads, 0.1, 1.0).unwrap();
        let v = |x: &Var| x.as_tensor().to_vec1::<f32>().unwrap();
        for (x, y) in v(&a).iter().zip(v(&b)) {
            assert!((2.0 * x - y).abs() < 1e-6 && x.abs() > 0.09, "{x} {y}");
        }
        assert_eq!(v(&c), vec![0.0; 3]);
        assert!(opt
            .set_lr_scales(&BTreeMap::from([("zz".to_string(), 1.0)]))
            .is_err());
        assert!(opt
            .set_lr_scales(&BTreeMap::from([("a".to_string(), f64::NAN)]))
            .is_err());
    }
}
