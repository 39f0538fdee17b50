//! The registry of adapter methods: one arm per method. Adding a method is a new file that
//! implements [`Adapter`] and one line here.

use super::adapter::{Adapter, BuildSpec};
use super::base::Base;
use super::config::{AdapterConfig, Method};
use super::layer::AdaptedLayer;
use crate::Result;

impl Method {
    /// Builds adapter `name` of `cfg` (rank `r`, alpha `alpha` after patterns) on `base`, drawing
    /// its initial values from `seed`. Inits that rewrite the base (PiSSA, OLoRA, LoftQ) do it here;
    /// `merged` says whether the layer has merged adapters (such inits are refused then).
    pub fn build(
        self,
        cfg: &AdapterConfig,
        base: &mut Base,
        name: &str,
        r: usize,
        alpha: f64,
        seed: u64,
        merged: bool,
    ) -> Result<Box<dyn Adapter>> {
        let spec = BuildSpec {
            cfg,
            name,
            r,
            alpha,
            seed,
            merged,
        };
        Ok(match self {
            Method::Lora => Box::new(super::lora::Lora::build(&spec, base)?),
            Method::Ia3 => Box::new(super::ia3::Ia3::build(&spec, base)?),
            Method::Loha => Box::new(super::loha::Loha::build(&spec, base)?),
            Method::Lokr => Box::new(super::lokr::Lokr::build(&spec, base)?),
            Method::Vera => Box::new(super::vera::Vera::build(&spec, base)?),
            Method::Adalora => Box::new(super::adalora::Adalora::build(&spec, base)?),
        })
    }
}

impl AdaptedLayer {
    /// Adds adapter `name` per `cfg` (rank/alpha after patterns), initialised from `seed`.
    /// PiSSA/OLoRA/LoftQ rewrite the base weight into the residual, as PEFT does.
    pub fn add_adapter(&mut self, name: &str, cfg: &AdapterConfig, seed: u64) -> Result<()> {
        self.check_new(name)?;
        let st = cfg.settings_for(self.path())?;
        let merged = !self.merged().is_empty();
        let adapter = Method::of(&cfg.peft_type)?.build(
            cfg,
            self.base_mut(),
            name,
            st.r,
            st.alpha,
            seed,
            merged,
        )?;
        self.push(name, adapter);
        Ok(())
    }
}
