//! Writing an [`AdapterConfig`] as PEFT writes `adapter_config.json`: sorted keys, the fields of
//! the method's own PEFT config class only (PEFT warns about any other key), `peft_version` filled.

use super::config::AdapterConfig;
use crate::{Error, Result};
use std::collections::BTreeMap;

impl AdapterConfig {
    /// PEFT-style JSON: sorted keys, indent 2; IA3 / LoHa / LoKr configs carry their own config
    /// class's fields (`alpha` rather than `lora_alpha`, no LoRA-only keys).
    pub fn to_json(&self) -> Result<String> {
        let mut v = serde_json::to_value(self).map_err(|e| Error::Msg(e.to_string()))?;
        let lora_only = [
            "lora_dropout",
            "bias",
            "use_rslora",
            "init_lora_weights",
            "use_dora",
            "lora_bias",
        ];
        if let (Some(m), false) = (v.as_object_mut(), self.peft_type == "LORA") {
            let adalora = self.peft_type == "ADALORA";
            for k in lora_only {
                if !adalora {
                    m.remove(k);
                }
            }
            if let Some(a) = m.remove("lora_alpha") {
                if adalora {
                    m.insert("lora_alpha".into(), a.clone());
                }
                if matches!(self.peft_type.as_str(), "LOHA" | "LOKR") {
                    m.insert("alpha".into(), a);
                }
            }
            if self.peft_type == "ADALORA" {
                let rp = m
                    .remove("adalora_rank_pattern")
                    .unwrap_or(serde_json::Value::Null);
                m.insert("rank_pattern".into(), rp);
            }
            match self.peft_type.as_str() {
                "ADALORA" => {}
                "IA3" => {
                    for k in ["r", "rank_pattern", "alpha_pattern"] {
                        m.remove(k);
                    }
                }
                "VERA" => {
                    for k in ["rank_pattern", "alpha_pattern"] {
                        m.remove(k);
                    }
                }
                _ => {
                    m.remove("fan_in_fan_out");
                }
            }
        }
        if let Some(m) = v.as_object_mut() {
            // Only the fields of PEFT's config class for this method: PEFT warns about any other
            // key. A dropped key must not carry a setting the file would then lose.
            let fields = peft_fields(&self.peft_type);
            let dropped: Vec<String> = m
                .keys()
                .filter(|k| !fields.contains(&k.as_str()) && !self.extra.contains_key(k.as_str()))
                .cloned()
                .collect();
            for k in dropped {
                let v = m.remove(&k).unwrap_or(serde_json::Value::Null);
                let inert = match &v {
                    serde_json::Value::Null | serde_json::Value::Bool(false) => true,
                    serde_json::Value::Object(o) => o.is_empty(),
                    serde_json::Value::Array(a) => a.is_empty(),
                    _ => false,
                };
                if !inert {
                    return Err(Error::Config(format!(
                        "`{k}` = {v} is not a field of PEFT's {} config, so an adapter_config.json \
                         cannot carry it",
                        self.peft_type
                    )));
                }
            }
            if m.get("peft_version").is_none_or(|v| v.is_null()) {
                m.insert("peft_version".into(), PEFT_VERSION.into());
            }
        }
        let v = sorted(v);
        serde_json::to_string_pretty(&v).map_err(|e| Error::Msg(e.to_string()))
    }
}

/// The PEFT release whose files postforge writes (`peft_version` of the configs it saves).
pub const PEFT_VERSION: &str = "0.21.2";

/// The fields of PEFT's (0.21.2) config class for `peft_type`, as its dataclass declares them;
/// `None` for a type postforge does not write.
fn peft_fields(peft_type: &str) -> &'static [&'static str] {
    const COMMON: &[&str] = &[
        "auto_mapping",
        "base_model_name_or_path",
        "inference_mode",
        "modules_to_save",
        "peft_type",
        "peft_version",
        "revision",
        "target_modules",
        "task_type",
    ];
    const LORA: &[&str] = &[
        "alpha_pattern",
        "bias",
        "exclude_modules",
        "fan_in_fan_out",
        "init_lora_weights",
        "layer_replication",
        "layers_pattern",
        "layers_to_transform",
        "loftq_config",
        "lora_alpha",
        "lora_bias",
        "lora_dropout",
        "megatron_config",
        "megatron_core",
        "qalora_group_size",
        "r",
        "rank_pattern",
        "target_parameters",
        "trainable_token_indices",
        "use_dora",
        "use_qalora",
        "use_rslora",
        "ensure_weight_tying",
        "corda_config",
        "eva_config",
        "runtime_config",
        "alora_invocation_tokens",
        "arrow_config",
    ];
    const ADALORA: &[&str] = &[
        "beta1",
        "beta2",
        "deltaT",
        "init_r",
        "orth_reg_weight",
        "target_r",
        "tfinal",
        "tinit",
        "total_step",
    ];
    const IA3: &[&str] = &[
        "exclude_modules",
        "fan_in_fan_out",
        "feedforward_modules",
        "init_ia3_weights",
    ];
    const LYCORIS: &[&str] = &[
        "alpha",
        "alpha_pattern",
        "exclude_modules",
        "init_weights",
        "layers_pattern",
        "layers_to_transform",
        "module_dropout",
        "r",
        "rank_dropout",
        "rank_pattern",
        "use_effective_conv2d",
    ];
    const LOKR: &[&str] = &["decompose_both", "decompose_factor", "rank_dropout_scale"];
    const VERA: &[&str] = &[
        "bias",
        "d_initial",
        "fan_in_fan_out",
        "init_weights",
        "layers_pattern",
        "layers_to_transform",
        "projection_prng_key",
        "r",
        "save_projection",
        "vera_dropout",
    ];
    static TABLE: std::sync::OnceLock<BTreeMap<&'static str, Vec<&'static str>>> =
        std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let join =
            |parts: &[&[&'static str]]| parts.iter().flat_map(|p| p.iter().copied()).collect();
        BTreeMap::from([
            ("LORA", join(&[COMMON, LORA])),
            ("ADALORA", join(&[COMMON, LORA, ADALORA])),
            ("IA3", join(&[COMMON, IA3])),
            ("LOHA", join(&[COMMON, LYCORIS])),
            ("LOKR", join(&[COMMON, LYCORIS, LOKR])),
            ("VERA", join(&[COMMON, VERA])),
        ])
    });
    table.get(peft_type).map_or(COMMON, |v| v.as_slice())
}

/// JSON with object keys sorted, as PEFT writes (`sort_keys=True`). Reading keeps file order, which
/// decides `rank_pattern` / `alpha_pattern` precedence exactly as PEFT's dict order does.
fn sorted(v: serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Object(m) => {
            let mut pairs: Vec<_> = m.into_iter().collect();
            pairs.sort_by(|a, b| a.0.cmp(&b.0));
            serde_json::Value::Object(pairs.into_iter().map(|(k, v)| (k, sorted(v))).collect())
        }
        serde_json::Value::Array(a) => {
            serde_json::Value::Array(a.into_iter().map(sorted).collect())
        }
        other => other,
    }
}
