//! `AdapterConfig`: the fields of PEFT's `adapter_config.json` for LoRA-family adapters, and PEFT's
//! rules for choosing which modules an adapter targets.
//!
//! Targeting follows PEFT (`check_target_module_exists`): a string `target_modules` is a regex that must
//! match the whole module path; a list matches a path exactly or as a `.name` suffix, and only then do
//! `layers_to_transform` / `layers_pattern` restrict the layer index. `exclude_modules` uses the same
//! list/regex rules. `rank_pattern` / `alpha_pattern` keys are regexes matched against the end of the path.

use crate::{Error, Result};
use indexmap::IndexMap;
use regex::Regex;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// `target_modules` / `exclude_modules`: a list of names, or one full-match regex.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ModuleSpec {
    /// Names matched exactly or as a `.name` suffix (`"all-linear"` as a string means every linear).
    List(Vec<String>),
    /// A regex matched against the whole path.
    Regex(String),
}

/// `layers_to_transform`: one index or a list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LayerIndices {
    /// One layer.
    One(usize),
    /// Several layers.
    Many(Vec<usize>),
}

/// `layers_pattern`: one name or a list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LayersPattern {
    /// One pattern.
    One(String),
    /// Several patterns, tried in order.
    Many(Vec<String>),
}

/// `init_lora_weights`: `true`, `false`, or a method name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum InitSpec {
    /// `true`: kaiming-uniform A, zero B. `false`: random A and B (not a no-op).
    Bool(bool),
    /// `"gaussian"`, `"pissa"`, `"pissa_niter_K"`, `"olora"`.
    Method(String),
}

/// The initialisation an adapter starts from, parsed from [`InitSpec`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Init {
    /// A ~ kaiming-uniform(a=√5), B = 0 (embeddings: A = 0, B ~ N(0,1)).
    Default,
    /// Both factors random (PEFT's `init_lora_weights=False`).
    Random,
    /// A ~ N(0, 1/r), B = 0.
    Gaussian,
    /// Principal singular components of W; W becomes the residual. `Some(k)`: randomized SVD, k power iterations.
    Pissa(Option<usize>),
    /// QR of W; W becomes the residual.
    Olora,
    /// LoftQ: alternating NF4 quantization and rank-r SVD; W becomes the quantized part
    /// (`loftq_config.loftq_iter` rounds).
    Loftq,
}

impl ModuleSpec {
    /// Parses a command-line value: a comma-separated list of names (or one plain name, or
    /// `all-linear`), otherwise a regex matched against the whole path.
    pub fn parse_cli(s: &str) -> Self {
        if s == "all-linear" {
            return Self::Regex(s.into());
        }
        if s.contains(',')
            || s.chars()
                .all(|c| c.is_alphanumeric() || c == '_' || c == '.')
        {
            Self::List(s.split(',').map(|x| x.trim().to_string()).collect())
        } else {
            Self::Regex(s.to_string())
        }
    }
}

impl InitSpec {
    /// Parses a command-line value: `true`, `false`, or a method name.
    pub fn parse_cli(s: &str) -> Self {
        match s {
            "true" => Self::Bool(true),
            "false" => Self::Bool(false),
            m => Self::Method(m.to_string()),
        }
    }

    /// Parses the spec; unknown names are an error.
    pub fn parse(&self) -> Result<Init> {
        match self {
            InitSpec::Bool(true) => Ok(Init::Default),
            InitSpec::Bool(false) => Ok(Init::Random),
            InitSpec::Method(m) => match m.as_str() {
                "gaussian" => Ok(Init::Gaussian),
                "pissa" => Ok(Init::Pissa(None)),
                "olora" => Ok(Init::Olora),
                "loftq" => Ok(Init::Loftq),
                "true" | "True" => Ok(Init::Default),
                s if s.starts_with("pissa_niter_") => s["pissa_niter_".len()..]
                    .parse()
                    .map(|k| Init::Pissa(Some(k)))
                    .map_err(|_| Error::Config(format!("init_lora_weights: bad iteration count in `{s}`"))),
                s => Err(Error::Config(format!(
                    "init_lora_weights `{s}` is not supported (expected true, false, gaussian, pissa, pissa_niter_K, olora or loftq)"
                ))),
            },
        }
    }
    /// True for initialisations that rewrite the base weight (PiSSA, OLoRA, LoftQ).
    pub fn mutates_base(&self) -> bool {
        matches!(
            self.parse(),
            Ok(Init::Pissa(_)) | Ok(Init::Olora) | Ok(Init::Loftq)
        )
    }
}

fn default_peft_type() -> String {
    "LORA".into()
}
fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    8.0
}
fn default_bias() -> String {
    "none".into()
}
fn default_init() -> InitSpec {
    InitSpec::Bool(true)
}

/// The adapter family of a configuration (`peft_type`); each has its own file and
/// [`super::adapter::Adapter`] implementation, registered in [`Method::build`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    /// LoRA, rsLoRA, DoRA, PiSSA, OLoRA, LoftQ ([`super::lora`]).
    Lora,
    /// IA3 ([`super::ia3`]).
    Ia3,
    /// LoHa ([`super::loha`]).
    Loha,
    /// LoKr ([`super::lokr`]).
    Lokr,
    /// VeRA ([`super::vera`]).
    Vera,
    /// AdaLoRA ([`super::adalora`]).
    Adalora,
}

impl Method {
    /// Every method.
    pub const ALL: [Method; 6] = [
        Method::Lora,
        Method::Ia3,
        Method::Loha,
        Method::Lokr,
        Method::Vera,
        Method::Adalora,
    ];
    /// The method of `peft_type`.
    pub fn of(peft_type: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|m| m.peft_type() == peft_type)
            .ok_or_else(|| {
                Error::Config(format!(
                    "peft_type {peft_type} is not supported (LORA, ADALORA, IA3, LOHA, LOKR, VERA)"
                ))
            })
    }
    /// The `peft_type` string.
    pub fn peft_type(self) -> &'static str {
        match self {
            Self::Lora => "LORA",
            Self::Ia3 => "IA3",
            Self::Loha => "LOHA",
            Self::Lokr => "LOKR",
            Self::Vera => "VERA",
            Self::Adalora => "ADALORA",
        }
    }
}

/// A LoRA-family adapter configuration with PEFT's field names and defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterConfig {
    /// `"LORA"` (DoRA, rsLoRA, PiSSA, OLoRA are LoRA variants in PEFT).
    #[serde(default = "default_peft_type")]
    pub peft_type: String,
    /// `CAUSAL_LM`, ... (informative).
    #[serde(default)]
    pub task_type: Option<String>,
    /// Where the base model came from.
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// Rank.
    #[serde(default = "default_r")]
    pub r: usize,
    /// LoRA alpha (scale = alpha / r, or alpha / √r with rsLoRA).
    #[serde(default = "default_alpha")]
    pub lora_alpha: f64,
    /// Dropout on the adapter input, in training only.
    #[serde(default)]
    pub lora_dropout: f64,
    /// Which modules get an adapter.
    #[serde(default)]
    pub target_modules: Option<ModuleSpec>,
    /// Which modules never get one.
    #[serde(default)]
    pub exclude_modules: Option<ModuleSpec>,
    /// Weights stored (in, out) (GPT-2 Conv1D).
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// `"none"`, `"all"`, `"lora_only"`.
    #[serde(default = "default_bias")]
    pub bias: String,
    /// Scale alpha/√r.
    #[serde(default)]
    pub use_rslora: bool,
    /// Modules trained in full and saved whole.
    #[serde(default)]
    pub modules_to_save: Option<Vec<String>>,
    /// Initialisation.
    #[serde(default = "default_init")]
    pub init_lora_weights: InitSpec,
    /// Restrict to these layer indices.
    #[serde(default)]
    pub layers_to_transform: Option<LayerIndices>,
    /// Name of the layer list (`layers`, `h`, ...).
    #[serde(default)]
    pub layers_pattern: Option<LayersPattern>,
    /// Per-module rank overrides (regex → r).
    #[serde(default)]
    pub rank_pattern: IndexMap<String, usize>,
    /// Per-module alpha overrides (regex → alpha).
    #[serde(default)]
    pub alpha_pattern: IndexMap<String, f64>,
    /// DoRA.
    #[serde(default)]
    pub use_dora: bool,
    /// A trainable bias on lora_B (not supported yet; must be false).
    #[serde(default)]
    pub lora_bias: bool,
    /// Saved for inference only.
    #[serde(default)]
    pub inference_mode: bool,
    /// Base model revision.
    #[serde(default)]
    pub revision: Option<String>,
    /// The writer's version.
    #[serde(default)]
    pub peft_version: Option<String>,
    /// Fields we do not interpret, kept so that a read/write round trip loses nothing.
    #[serde(flatten)]
    pub extra: BTreeMap<String, serde_json::Value>,
}

impl Default for AdapterConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("empty config deserialises")
    }
}

/// The kind of base layer a module is, as far as targeting cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ModuleKind {
    /// nn.Linear.
    Linear,
    /// nn.Conv2d.
    Conv2d,
    /// nn.Embedding.
    Embedding,
    /// A norm layer (never adapted; `modules_to_save` only).
    Norm,
}

/// What an adapter config says about one module.
#[derive(Debug, Clone, PartialEq)]
pub struct LayerSettings {
    /// Rank for this module.
    pub r: usize,
    /// Alpha for this module.
    pub alpha: f64,
}

/// `Regex::new(pattern)` through a process-wide cache: a model build asks the same few target and
/// pattern regexes once per layer, and compiling them each time took about 0.5 s per U-Net. A
/// compiled `Regex` is cheap to clone (shared). The cache holds at most 256 patterns.
fn cached_regex(pattern: String) -> std::result::Result<Regex, regex::Error> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static CACHE: OnceLock<Mutex<HashMap<String, Regex>>> = OnceLock::new();
    let cache = CACHE.get_or_init(|| Mutex::new(HashMap::new()));
    if let Some(r) = cache.lock().ok().and_then(|c| c.get(&pattern).cloned()) {
        return Ok(r);
    }
    let r = Regex::new(&pattern)?;
    if let Ok(mut c) = cache.lock() {
        if c.len() >= 256 {
            c.clear();
        }
        c.insert(pattern, r.clone());
    }
    Ok(r)
}

fn full_regex(p: &str) -> Result<Regex> {
    cached_regex(format!("^(?:{p})$")).map_err(|e| Error::Config(format!("bad regex `{p}`: {e}")))
}

pub(crate) fn spec_matches(spec: &ModuleSpec, path: &str) -> Result<bool> {
    Ok(match spec {
        ModuleSpec::Regex(r) => full_regex(r)?.is_match(path),
        ModuleSpec::List(names) => names
            .iter()
            .any(|n| path == n || path.ends_with(&format!(".{n}"))),
    })
}

impl AdapterConfig {
    /// A LoRA config with rank, alpha and list targets; other fields at PEFT's defaults.
    pub fn lora(r: usize, alpha: f64, targets: &[&str]) -> Self {
        Self {
            r,
            lora_alpha: alpha,
            target_modules: Some(ModuleSpec::List(
                targets.iter().map(|s| s.to_string()).collect(),
            )),
            ..Default::default()
        }
    }

    /// LoftQ's `loftq_config` (`{"loftq_bits": 4, "loftq_iter": N}`, needed when
    /// `init_lora_weights = "loftq"`): the number of alternating rounds.
    pub fn loftq_iter(&self) -> Result<usize> {
        let c = self
            .extra
            .get("loftq_config")
            .and_then(|v| v.as_object())
            .filter(|m| !m.is_empty())
            .ok_or_else(|| {
                Error::Config(
                    "init_lora_weights = \"loftq\" needs a loftq_config (e.g. {\"loftq_bits\": 4, \"loftq_iter\": 1})".into(),
                )
            })?;
        let bits = c.get("loftq_bits").and_then(|v| v.as_u64()).unwrap_or(4);
        if bits != 4 {
            return Err(Error::Config(format!(
                "loftq_config.loftq_bits = {bits}: only 4-bit (NF4) LoftQ is supported"
            )));
        }
        match c.get("loftq_iter").map(|v| v.as_u64()) {
            None => Ok(1),
            Some(Some(n)) if n >= 1 => Ok(n as usize),
            Some(_) => Err(Error::Config(format!(
                "loftq_config.loftq_iter = {} must be a positive integer",
                c["loftq_iter"]
            ))),
        }
    }

    /// Makes this a `peft_type` adapter (`lora`, `ia3`, `loha`, `lokr`, `vera`, any case), with
    /// IA3's `feedforward_modules` (a comma-separated list or a regex). Checks the result.
    pub fn with_method(
        mut self,
        peft_type: &str,
        feedforward_modules: Option<&str>,
    ) -> Result<Self> {
        self.peft_type = Method::of(&peft_type.to_uppercase())?.peft_type().into();
        if let Some(ff) = feedforward_modules {
            if self.peft_type != "IA3" {
                return Err(Error::Config(
                    "feedforward_modules is an IA3 setting".into(),
                ));
            }
            let spec = ModuleSpec::parse_cli(ff);
            self.extra.insert(
                "feedforward_modules".into(),
                serde_json::to_value(&spec).map_err(|e| Error::Msg(e.to_string()))?,
            );
        }
        self.validate()?;
        Ok(self)
    }

    /// Sets `init_lora_weights = "loftq"` with `loftq_iter` rounds.
    pub fn set_loftq(&mut self, iter: usize) {
        self.init_lora_weights = InitSpec::Method("loftq".into());
        self.extra.insert(
            "loftq_config".into(),
            serde_json::json!({"loftq_bits": 4, "loftq_iter": iter}),
        );
    }

    /// Checks field values; unknown `peft_type` or values are errors naming the field.
    pub fn validate(&self) -> Result<()> {
        let method = Method::of(&self.peft_type)?;
        if method != Method::Lora
            && (self.use_dora
                || self.use_rslora
                || self.init_lora_weights.parse()? != Init::Default)
        {
            return Err(Error::Config(format!(
                "use_dora, use_rslora and init_lora_weights are LoRA settings, not {}",
                self.peft_type
            )));
        }
        if self.r == 0 {
            return Err(Error::Config("r must be at least 1".into()));
        }
        // IA3 has no alpha; every other method scales by it, and 0 (or less) makes the adapter a
        // no-op (or a sign flip) that trains and merges into nothing useful.
        if method != Method::Ia3 {
            crate::check::f64_in("lora_alpha", self.lora_alpha, crate::check::POSITIVE)?;
            for (k, a) in &self.alpha_pattern {
                crate::check::f64_in(&format!("alpha_pattern[{k}]"), *a, crate::check::POSITIVE)?;
            }
        }
        for (k, r) in &self.rank_pattern {
            crate::check::count_at_least(&format!("rank_pattern[{k}]"), *r, 1)?;
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return Err(Error::Config(format!(
                "lora_dropout {} must be in [0, 1)",
                self.lora_dropout
            )));
        }
        match self.bias.as_str() {
            "none" => {}
            "all" | "lora_only" => {
                return Err(Error::Config(format!(
                    "bias `{}` (trainable base biases) is not supported yet; use `none`",
                    self.bias
                )))
            }
            b => {
                return Err(Error::Config(format!(
                    "bias `{b}` must be none, all or lora_only"
                )))
            }
        }
        if self.lora_bias {
            return Err(Error::Config(
                "lora_bias = true is not supported yet".into(),
            ));
        }
        if self.fan_in_fan_out {
            return Err(Error::Config(
                "fan_in_fan_out = true (GPT-2 Conv1D weights) is not supported yet".into(),
            ));
        }
        let init = self.init_lora_weights.parse()?;
        if init == Init::Loftq {
            self.loftq_iter()?;
        }
        let method_fields: &[&str] = match method {
            Method::Lora => &[],
            Method::Ia3 => &["feedforward_modules", "init_ia3_weights"],
            Method::Loha => &[
                "rank_dropout",
                "module_dropout",
                "use_effective_conv2d",
                "init_weights",
            ],
            Method::Lokr => &[
                "rank_dropout",
                "module_dropout",
                "use_effective_conv2d",
                "init_weights",
                "decompose_both",
                "decompose_factor",
                "rank_dropout_scale",
            ],
            Method::Adalora => &[
                "target_r",
                "init_r",
                "tinit",
                "tfinal",
                "deltaT",
                "beta1",
                "beta2",
                "orth_reg_weight",
                "total_step",
                "adalora_rank_pattern",
            ],
            Method::Vera => &[
                "projection_prng_key",
                "save_projection",
                "vera_dropout",
                "d_initial",
                "init_weights",
            ],
        };
        for (k, v) in &self.extra {
            if (k == "loftq_config" && init == Init::Loftq) || method_fields.contains(&k.as_str()) {
                continue;
            }
            let inert = match v {
                serde_json::Value::Null | serde_json::Value::Bool(false) => true,
                serde_json::Value::Object(m) => m.is_empty() || k == "auto_mapping",
                serde_json::Value::Array(a) => a.is_empty(),
                _ => INERT_FIELDS.contains(&k.as_str()),
            };
            if !inert {
                return Err(Error::Config(format!(
                    "field `{k}` = {v} is not supported by postforge yet"
                )));
            }
        }
        // A setting that PEFT's config class for this method does not have cannot be written.
        self.to_json()?;
        for (key, spec) in [
            ("target_modules", &self.target_modules),
            ("exclude_modules", &self.exclude_modules),
        ] {
            if let Some(ModuleSpec::Regex(r)) = spec {
                full_regex(r).map_err(|e| Error::Config(format!("{key}: {e}")))?;
            }
        }
        for k in self.rank_pattern.keys().chain(self.alpha_pattern.keys()) {
            pattern_regex(k)?;
        }
        if let Some(v) = self.rank_pattern.iter().find(|(_, &v)| v == 0) {
            return Err(Error::Config(format!("rank_pattern `{}` sets rank 0", v.0)));
        }
        Ok(())
    }

    /// PEFT's `check_target_module_exists` plus `exclude_modules`: does this adapter target `path`?
    /// `is_output_head` marks the model's output projection, which `all-linear` leaves out.
    pub fn targets(&self, path: &str, kind: ModuleKind, is_output_head: bool) -> Result<bool> {
        if let Some(ex) = &self.exclude_modules {
            if spec_matches(ex, path)? {
                return Ok(false);
            }
        }
        if self.inside_modules_to_save(path)? {
            return Ok(false);
        }
        let Some(spec) = &self.target_modules else {
            return Ok(false);
        };
        match spec {
            ModuleSpec::Regex(r) if r == "all-linear" => {
                Ok(kind == ModuleKind::Linear && !is_output_head)
            }
            ModuleSpec::Regex(r) => Ok(full_regex(r)?.is_match(path)),
            ModuleSpec::List(names) => {
                if names.iter().any(|n| n == path) {
                    return Ok(true);
                }
                if !names.iter().any(|n| path.ends_with(&format!(".{n}"))) {
                    return Ok(false);
                }
                self.layer_index_allowed(path)
            }
        }
    }

    fn layer_index_allowed(&self, path: &str) -> Result<bool> {
        let allowed: Vec<usize> = match &self.layers_to_transform {
            None => return Ok(true),
            Some(LayerIndices::Many(v)) if v.is_empty() => return Ok(true),
            Some(LayerIndices::Many(v)) => v.clone(),
            Some(LayerIndices::One(i)) => vec![*i],
        };
        let patterns: Vec<String> = match &self.layers_pattern {
            None => vec![],
            Some(LayersPattern::One(p)) => vec![p.clone()],
            Some(LayersPattern::Many(v)) => v.clone(),
        };
        let mut index = None;
        if patterns.iter().all(|p| p.is_empty()) {
            let re = cached_regex(r"^.*?\.[^.]*\.(\d+)\.".to_string()).expect("static regex");
            index = re.captures(path).map(|c| c[1].to_string());
        } else {
            for p in &patterns {
                let re = cached_regex(format!(r"^(?:.*?\.)?{p}\.(\d+)\."))
                    .map_err(|e| Error::Config(format!("bad layers_pattern `{p}`: {e}")))?;
                if let Some(c) = re.captures(path) {
                    index = Some(c[1].to_string());
                    break;
                }
            }
        }
        Ok(match index.and_then(|s| s.parse::<usize>().ok()) {
            Some(i) => allowed.contains(&i),
            None => false,
        })
    }

    /// PEFT never adapts a module that is, or lies inside, a `modules_to_save` module.
    fn inside_modules_to_save(&self, path: &str) -> Result<bool> {
        for m in self.modules_to_save.iter().flatten() {
            // PEFT's `key.endswith(name)` on module names (so `norm` also wraps
            // `input_layernorm`), and everything inside a wrapped container.
            let re = cached_regex(format!(r"^.*{}(?:$|\..*)$", regex::escape(m)))
                .map_err(|e| Error::Config(format!("bad modules_to_save entry `{m}`: {e}")))?;
            if re.is_match(path) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Whether `path` is one of `modules_to_save` (its name ends with an entry, as PEFT's
    /// `endswith` test) or lies inside one.
    pub fn saves_module(&self, path: &str) -> bool {
        // PEFT's rule: a container such as `classifier` makes every layer under it a trainable copy.
        self.inside_modules_to_save(path).unwrap_or(false)
    }

    /// Rank and alpha for `path`, after `rank_pattern` / `alpha_pattern`.
    pub fn settings_for(&self, path: &str) -> Result<LayerSettings> {
        let r = match pattern_key(self.rank_pattern.keys(), path)? {
            Some(k) => self.rank_pattern[&k],
            None => self.r,
        };
        let alpha = match pattern_key(self.alpha_pattern.keys(), path)? {
            Some(k) => self.alpha_pattern[&k],
            None => self.lora_alpha,
        };
        Ok(LayerSettings { r, alpha })
    }

    /// The LoRA scale for a given rank and alpha.
    pub fn scale(&self, r: usize, alpha: f64) -> f64 {
        if self.use_rslora {
            alpha / (r as f64).sqrt()
        } else {
            alpha / r as f64
        }
    }

    /// Reads `adapter_config.json`, with errors naming the file and field.
    pub fn from_json_file(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        let mut raw: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::format(path, e.to_string()))?;
        // AdaLoRA's rank_pattern is a kept-rank mask per `<module>.lora_E`, not a rank.
        if raw["peft_type"] == "ADALORA" {
            if let Some(m) = raw.as_object_mut() {
                if let Some(rp) = m.remove("rank_pattern") {
                    if !rp.is_null() {
                        m.insert("adalora_rank_pattern".into(), rp);
                    }
                }
            }
        }
        let mut cfg: Self = serde_json::from_value(raw.clone()).map_err(|e| {
            let msg = match raw.as_object() {
                Some(obj) => crate::check::with_blamed_key::<Self>(obj, &e.to_string()),
                None => e.to_string(),
            };
            Error::format(path, msg)
        })?;
        // LoHa / LoKr call alpha `alpha`.
        if matches!(cfg.peft_type.as_str(), "LOHA" | "LOKR") {
            if let Some(a) = cfg.extra.remove("alpha") {
                cfg.lora_alpha = a
                    .as_f64()
                    .ok_or_else(|| Error::format(path, format!("alpha = {a} is not a number")))?;
            }
        }
        cfg.validate()
            .map_err(|e| Error::format(path, e.to_string()))?;
        Ok(cfg)
    }
}

/// Extra PEFT fields whose non-default values change nothing we compute.
const INERT_FIELDS: &[&str] = &[
    "auto_mapping",
    "megatron_core",
    "qalora_group_size",
    "ensure_weight_tying",
    "peft_version",
    "corda_config",
    "eva_config",
];

fn pattern_regex(key: &str) -> Result<Regex> {
    cached_regex(format!(r"^(?:.*\.)?(?:{key})$"))
        .map_err(|e| Error::Config(format!("bad pattern `{key}`: {e}")))
}

/// PEFT's `get_pattern_key`: the first pattern key (in the config's order) that matches the end of `path`.
pub fn pattern_key<'a>(
    keys: impl Iterator<Item = &'a String>,
    path: &str,
) -> Result<Option<String>> {
    for k in keys {
        if pattern_regex(k)?.is_match(path) {
            return Ok(Some(k.clone()));
        }
    }
    Ok(None)
}
