//! One module of a LoRA file ([`ModuleLora`]) and the checks modules pass as they are read: factors that agree with each other
//! (ranks, 1×1 conv ups, DoRA magnitudes, LoHa/LoKr inner dimensions) and alphas that are numbers.

use crate::{Error, Result};
use candle_core::Tensor;
use std::collections::HashMap;
use std::path::Path;

/// One adapted module: A (down), B (up), alpha, and the DoRA magnitude.
#[derive(Debug, Clone)]
pub struct ModuleLora {
    /// A: (r, in) or (r, in, kh, kw).
    pub down: Tensor,
    /// B: (out, r) or (out, r, 1, 1).
    pub up: Tensor,
    /// Alpha (scale = alpha / r).
    pub alpha: f64,
    /// DoRA magnitude, one value per output feature (flat).
    pub magnitude: Option<Tensor>,
}

impl ModuleLora {
    /// Rank.
    pub fn rank(&self) -> usize {
        self.down.dims()[0]
    }

    /// The factors agree with each other: down (r, in[, kh, kw]) and up (out, r[, 1, 1]) share
    /// the rank, a conv's up is 1×1, the DoRA magnitude has one value per output and alpha is
    /// finite. `names` are the file's field names of down and up, for the message.
    pub fn check(&self, file: &Path, module: &str, names: (&str, &str)) -> Result<()> {
        let (d, u) = (self.down.dims(), self.up.dims());
        let bad = |msg: String| Err(Error::format(file, format!("`{module}`: {msg}")));
        if !matches!(d.len(), 2 | 4) || u.len() != d.len() {
            return bad(format!(
                "{} has shape {d:?} and {} {u:?}; LoRA factors are both matrices (linear) or \
                 both 4-d kernels (conv)",
                names.0, names.1
            ));
        }
        if d[0] == 0 || u[1] != d[0] {
            return bad(format!(
                "{} {d:?} has rank {} but {} {u:?} has rank {} (swapped or mismatched factors)",
                names.0, d[0], names.1, u[1]
            ));
        }
        if u.len() == 4 && u[2..] != [1, 1] {
            return bad(format!(
                "{} {u:?} of a conv LoRA must have a 1×1 kernel",
                names.1
            ));
        }
        if let Some(m) = &self.magnitude {
            if m.elem_count() != u[0] {
                return bad(format!(
                    "the DoRA magnitude has {} values, but {} {u:?} has {} outputs",
                    m.elem_count(),
                    names.1,
                    u[0]
                ));
            }
        }
        if !self.alpha.is_finite() && !crate::check::allow_nonfinite() {
            return bad(format!("alpha = {} is not finite", self.alpha));
        }
        Ok(())
    }
}

/// LoHa: hada_w{1,2}_a (out, r) · hada_w{1,2}_b (r, in) with equal outs and ins; LoKr: each
/// factor given as a product has matching inner dimensions.
pub(super) fn check_lycoris_factors(
    file: &Path,
    module: &str,
    p: &HashMap<&str, Tensor>,
) -> Result<()> {
    let dims = |k: &str| p.get(k).map(|t| t.dims().to_vec());
    let pair = |a: &str, b: &str| -> Result<()> {
        if let (Some(da), Some(db)) = (dims(a), dims(b)) {
            if da.len() < 2 || db.is_empty() || da[1] != db[0] {
                return Err(Error::format(
                    file,
                    format!("`{module}`: {a} {da:?} and {b} {db:?} do not multiply (inner dimensions differ)"),
                ));
            }
        }
        Ok(())
    };
    for (a, b) in [
        ("hada_w1_a", "hada_w1_b"),
        ("hada_w2_a", "hada_w2_b"),
        ("lokr_w1_a", "lokr_w1_b"),
        ("lokr_w2_a", "lokr_w2_b"),
    ] {
        pair(a, b)?;
    }
    if let (Some(a1), Some(a2), Some(b1), Some(b2)) = (
        dims("hada_w1_a"),
        dims("hada_w2_a"),
        dims("hada_w1_b"),
        dims("hada_w2_b"),
    ) {
        if a1[0] != a2[0] || b1.get(1) != b2.get(1) {
            return Err(Error::format(
                file,
                format!(
                    "`{module}`: the two Hadamard factors have different shapes \
                     ({a1:?}·{b1:?} against {a2:?}·{b2:?})"
                ),
            ));
        }
    }
    Ok(())
}

/// The alpha of module `sub` of `component` from diffusers metadata (PEFT pattern rules); without
/// metadata, alpha = r (diffusers' rule).
pub(super) fn component_alpha(
    cfg: &serde_json::Map<String, serde_json::Value>,
    component: &str,
    sub: &str,
    r: usize,
) -> Result<f64> {
    let number = |key: &str, v: &serde_json::Value| -> Result<f64> {
        v.as_f64().filter(|a| a.is_finite()).ok_or_else(|| {
            Error::Config(format!(
                "lora_adapter_metadata: `{key}` = {v} is not a finite number"
            ))
        })
    };
    let key = format!("{component}.lora_alpha");
    let Some(alpha) = cfg.get(&key) else {
        return Ok(r as f64);
    };
    let alpha = number(&key, alpha)?;
    let pkey = format!("{component}.alpha_pattern");
    match cfg.get(&pkey) {
        Some(serde_json::Value::Object(ap)) => {
            let keys: Vec<String> = ap.keys().cloned().collect();
            if let Some(k) = crate::peft::config::pattern_key(keys.iter(), sub)? {
                return number(&format!("{pkey}.{k}"), &ap[&k]);
            }
        }
        None | Some(serde_json::Value::Null) => {}
        Some(v) => {
            return Err(Error::Config(format!(
                "lora_adapter_metadata: `{pkey}` = {v} is not a table of module patterns"
            )))
        }
    }
    Ok(alpha)
}
