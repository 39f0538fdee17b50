//! Exponential moving average of trainable weights, with the semantics of diffusers' `EMAModel`
//! (`--use_ema` in its training scripts):
//! - the decay at optimization step n (counted from 1) is 0 while n ≤ `update_after_step` + 1,
//!   then `min(decay, max(min_decay, d(k)))` with k = n − `update_after_step` − 1 and
//!   d(k) = (1 + k)/(10 + k), or 1 − (1 + k/`inv_gamma`)^−`power` with `use_ema_warmup`;
//! - each step moves the shadow towards the weights: s ← s − (1 − decay)·(s − w).
//!
//! The shadow weights are what a pipeline is saved with; they travel in checkpoints so that a
//! resumed run equals an unbroken one.

use crate::{Error, Result};
use candle_core::{Tensor, Var};
use std::collections::BTreeMap;

/// EMA settings (diffusers' `EMAModel` arguments and defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EmaConfig {
    /// Largest decay (diffusers default 0.9999).
    pub decay: f64,
    /// Smallest decay once updates start (default 0).
    pub min_decay: f64,
    /// Steps before the average starts following the weights (default 0).
    pub update_after_step: usize,
    /// Warmup decay 1 − (1 + k/inv_gamma)^−power instead of (1 + k)/(10 + k) (default false).
    pub use_ema_warmup: bool,
    /// Warmup's inverse gamma (default 1).
    pub inv_gamma: f64,
    /// Warmup's power (default 2/3).
    pub power: f64,
}

impl Default for EmaConfig {
    fn default() -> Self {
        Self {
            decay: 0.9999,
            min_decay: 0.0,
            update_after_step: 0,
            use_ema_warmup: false,
            inv_gamma: 1.0,
            power: 2.0 / 3.0,
        }
    }
}

impl EmaConfig {
    /// The decay applied at optimization step `n` (from 1).
    pub fn decay_at(&self, n: usize) -> f64 {
        let k = n as i64 - self.update_after_step as i64 - 1;
        if k <= 0 {
            return 0.0;
        }
        let k = k as f64;
        let d = if self.use_ema_warmup {
            1.0 - (1.0 + k / self.inv_gamma).powf(-self.power)
        } else {
            (1.0 + k) / (10.0 + k)
        };
        d.min(self.decay).max(self.min_decay)
    }
}

/// Shadow copies of a set of named weights.
#[derive(Debug, Clone)]
pub struct Ema {
    cfg: EmaConfig,
    shadow: BTreeMap<String, Tensor>,
    steps: usize,
}

impl Ema {
    /// Starts the average at the current values of `vars`.
    pub fn new(cfg: EmaConfig, vars: &[(String, Var)]) -> Result<Self> {
        if !(0.0..=1.0).contains(&cfg.decay) || !(0.0..=1.0).contains(&cfg.min_decay) {
            return Err(Error::Config(format!(
                "EMA decay {} / min_decay {} must lie in [0, 1]",
                cfg.decay, cfg.min_decay
            )));
        }
        let shadow = vars
            .iter()
            .map(|(n, v)| Ok((n.clone(), v.as_tensor().copy()?)))
            .collect::<Result<_>>()?;
        Ok(Self {
            cfg,
            shadow,
            steps: 0,
        })
    }

    /// Optimization steps averaged so far.
    pub fn steps(&self) -> usize {
        self.steps
    }

    /// The shadow weights by name.
    pub fn shadow(&self) -> &BTreeMap<String, Tensor> {
        &self.shadow
    }

    /// One optimization step: moves every shadow weight towards its variable's current value.
    pub fn update(&mut self, vars: &[(String, Var)]) -> Result<()> {
        self.steps += 1;
        let keep = self.cfg.decay_at(self.steps);
        for (n, v) in vars {
            let s = self.shadow.get_mut(n).ok_or_else(|| {
                Error::Msg(format!(
                    "EMA: no shadow weight for `{n}` (the model changed?)"
                ))
            })?;
            let w = v.as_tensor().detach();
            *s = if keep == 0.0 {
                w.copy()?
            } else {
                ((&*s * keep)? + (w * (1.0 - keep))?)?
            };
        }
        Ok(())
    }

    /// Puts the shadow values into `vars` and returns the values they held (for [`Self::restore`]).
    pub fn swap_in(&self, vars: &[(String, Var)]) -> Result<BTreeMap<String, Tensor>> {
        let mut old = BTreeMap::new();
        for (n, v) in vars {
            let s = self
                .shadow
                .get(n)
                .ok_or_else(|| Error::Msg(format!("EMA: no shadow weight for `{n}`")))?;
            old.insert(n.clone(), v.as_tensor().copy()?);
            v.set(s)?;
        }
        Ok(old)
    }

    /// Undoes [`Self::swap_in`].
    pub fn restore(vars: &[(String, Var)], old: &BTreeMap<String, Tensor>) -> Result<()> {
        for (n, v) in vars {
            if let Some(t) = old.get(n) {
                v.set(t)?;
            }
        }
        Ok(())
    }

    /// Checkpoint state: the shadow tensors (prefixed `ema.`) and the step count.
    pub fn state(&self) -> (BTreeMap<String, Tensor>, serde_json::Value) {
        (
            self.shadow
                .iter()
                .map(|(n, t)| (format!("ema.{n}"), t.clone()))
                .collect(),
            serde_json::json!({ "ema_steps": self.steps }),
        )
    }

    /// Restores [`Self::state`]; every shadow weight must be present with its shape.
    pub fn load_state(
        &mut self,
        tensors: &BTreeMap<String, Tensor>,
        json: &serde_json::Value,
    ) -> Result<()> {
        for (n, s) in self.shadow.iter_mut() {
            let t = tensors
                .get(&format!("ema.{n}"))
                .ok_or_else(|| Error::Msg(format!("checkpoint has no EMA weight `ema.{n}`")))?;
            if t.dims() != s.dims() {
                return Err(Error::Msg(format!(
                    "checkpoint EMA weight `ema.{n}` has shape {:?}, the model {:?}",
                    t.dims(),
                    s.dims()
                )));
            }
            *s = t.clone();
        }
        self.steps = json
            .get("ema_steps")
            .and_then(|v| v.as_u64())
            .ok_or_else(|| Error::Msg("checkpoint task state has no `ema_steps`".into()))?
            as usize;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn decay_follows_diffusers_schedule() {
        let c = EmaConfig::default();
        assert_eq!(c.decay_at(1), 0.0);
        assert!((c.decay_at(2) - 2.0 / 11.0).abs() < 1e-12);
        assert!((c.decay_at(11) - 11.0 / 20.0).abs() < 1e-12);
        assert_eq!(c.decay_at(10_000_000), 0.9999);
        let w = EmaConfig {
            use_ema_warmup: true,
            update_after_step: 5,
            decay: 0.999,
            ..Default::default()
        };
        assert_eq!(w.decay_at(6), 0.0);
        assert!((w.decay_at(7) - (1.0 - 2f64.powf(-2.0 / 3.0))).abs() < 1e-12);
    }

    #[test]
    fn shadow_tracks_the_average_and_round_trips() {
        let v = Var::from_tensor(&Tensor::new(&[1f32, 2.0], &Device::Cpu).unwrap()).unwrap();
        let vars = vec![("w".to_string(), v.clone())];
        let mut e = Ema::new(EmaConfig::default(), &vars).unwrap();
        // Step 1 copies the weights; step 2 keeps 2/11 of the shadow.
        v.set(&Tensor::new(&[3f32, 4.0], &Device::Cpu).unwrap())
            .unwrap();
        e.update(&vars).unwrap();
        v.set(&Tensor::new(&[14f32, 15.0], &Device::Cpu).unwrap())
            .unwrap();
        e.update(&vars).unwrap();
        let s: Vec<f32> = e.shadow()["w"].to_vec1().unwrap();
        let want = [
            3.0 * 2.0 / 11.0 + 14.0 * 9.0 / 11.0,
            4.0 * 2.0 / 11.0 + 15.0 * 9.0 / 11.0,
        ];
        assert!((s[0] - want[0]).abs() < 1e-5 && (s[1] - want[1]).abs() < 1e-5);
        let old = e.swap_in(&vars).unwrap();
        assert_eq!(v.as_tensor().to_vec1::<f32>().unwrap(), s);
        Ema::restore(&vars, &old).unwrap();
        assert_eq!(v.as_tensor().to_vec1::<f32>().unwrap(), vec![14.0, 15.0]);
        let (t, j) = e.state();
        let mut f = Ema::new(EmaConfig::default(), &vars).unwrap();
        f.load_state(&t, &j).unwrap();
        assert_eq!(f.steps(), 2);
        assert_eq!(f.shadow()["w"].to_vec1::<f32>().unwrap(), s);
        let bad: BTreeMap<String, Tensor> = [(
            "ema.w".to_string(),
            Tensor::zeros(3, candle_core::DType::F32, &Device::Cpu).unwrap(),
        )]
        .into();
        let err = f.load_state(&bad, &j).unwrap_err().to_string();
        assert!(err.contains("ema.w") && err.contains("[3]"), "{err}");
    }
}
