//! Single-file LoRA formats of the image-model world, read and written losslessly:
//! - kohya / A1111 / ComfyUI (and LyCORIS LoCon): `lora_unet_<path with _>.lora_down.weight` (A),
//!   `.lora_up.weight` (B), `.alpha` (0-d; scale = alpha / r), `.dora_scale` (DoRA magnitude,
//!   (out, 1) or (out, 1, 1, 1)), with `ss_*` / `modelspec.*` metadata;
//! - diffusers / PEFT: `unet.<path>.lora_A.weight`, `.lora_B.weight`, `.lora_magnitude_vector`, with
//!   the adapter config (`r`, `lora_alpha`, `rank_pattern`, `alpha_pattern`, ...) in the
//!   `lora_adapter_metadata` header entry that diffusers' `load_lora_weights` reads.
//!
//! Components: `unet` ↔ `lora_unet`, `text_encoder` ↔ `lora_te` (`lora_te1` beside a second encoder),
//! `text_encoder_2` ↔ `lora_te2`, `transformer` ↔ `lora_unet`.

pub use super::lora_checks::ModuleLora;
use super::lora_checks::{check_lycoris_factors, component_alpha};
use crate::peft::loha::Loha;
use crate::peft::lokr::{Factor, Lokr};
use crate::peft::{AdaptedLayer, Adapter, Lora};
use crate::util::{save_safetensors, SafeTensors};
use crate::{Error, Result};
use candle_core::{DType, Tensor, Var};
use std::collections::{BTreeMap, HashMap};
use std::path::Path;

/// A LyCORIS LoHa or LoKr module (kohya layout only): its tensors by LyCORIS name (`hada_w1_a`,
/// ..., `lokr_w1`, `lokr_w2_a`, ...) and its alpha.
#[derive(Debug, Clone)]
pub struct LycorisModule {
    /// Tensors by field name.
    pub tensors: BTreeMap<String, Tensor>,
    /// Alpha (`None`: the file had none; LyCORIS then uses alpha = r, scale 1).
    pub alpha: Option<f64>,
}

impl LycorisModule {
    /// Whether this is LoHa (else LoKr).
    pub fn is_loha(&self) -> bool {
        self.tensors.keys().any(|k| k.starts_with("hada_"))
    }

    /// The rank LyCORIS scales by: LoHa's `hada_w1_b` rows; LoKr's decomposed factor's rank, or
    /// `None` when both LoKr factors are full (LyCORIS then ignores alpha: scale 1).
    pub fn rank(&self) -> Option<usize> {
        let t = |k: &str| self.tensors.get(k).map(|t| t.dims()[0]);
        if self.is_loha() {
            t("hada_w1_b")
        } else {
            t("lokr_w1_b").or_else(|| t("lokr_w2_b"))
        }
    }

    /// The scale α/r (LoKr with two full factors: 1).
    pub fn scale(&self) -> f64 {
        match self.rank() {
            Some(r) => self.alpha.unwrap_or(r as f64) / r as f64,
            None => 1.0,
        }
    }

    /// The adapter for a layer.
    pub fn to_adapter(
        &self,
        module: &str,
        file: &Path,
        dev: &candle_core::Device,
    ) -> Result<Box<dyn Adapter>> {
        let get = |k: &str| -> Result<Var> {
            let t = self.tensors.get(k).ok_or_else(|| Error::Missing {
                path: file.into(),
                key: format!("{module}.{k}"),
            })?;
            Ok(Var::from_tensor(&t.to_dtype(DType::F32)?.to_device(dev)?)?)
        };
        let has = |k: &str| self.tensors.contains_key(k);
        Ok(if self.is_loha() {
            Box::new(Loha {
                w: [
                    get("hada_w1_a")?,
                    get("hada_w1_b")?,
                    get("hada_w2_a")?,
                    get("hada_w2_b")?,
                ],
                scale: self.scale(),
                module_dropout: 0.0,
            })
        } else {
            let w1 = if has("lokr_w1") {
                Factor::Full(get("lokr_w1")?)
            } else {
                Factor::Product(get("lokr_w1_a")?, get("lokr_w1_b")?)
            };
            let w2 = if has("lokr_w2") {
                Factor::Full(get("lokr_w2")?)
            } else {
                Factor::Product(get("lokr_w2_a")?, get("lokr_w2_b")?)
            };
            Box::new(Lokr {
                w1,
                w2,
                scale: self.scale(),
                module_dropout: 0.0,
            })
        })
    }
}

/// The file formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LoraFormat {
    /// kohya / A1111 / ComfyUI single file.
    Kohya,
    /// diffusers / PEFT single file (`pytorch_lora_weights.safetensors`).
    Diffusers,
}

/// A LoRA for one or more model components, by module path (`unet.down_blocks.0....to_q`).
#[derive(Debug, Clone, Default)]
pub struct LoraFile {
    /// Modules, keyed `<component>.<module path>`.
    pub modules: BTreeMap<String, ModuleLora>,
    /// LyCORIS LoHa / LoKr modules, keyed the same way.
    pub lycoris: BTreeMap<String, LycorisModule>,
    /// Header metadata to write (kohya `ss_*`, `modelspec.*`); read back as found.
    pub metadata: BTreeMap<String, String>,
}

const COMPONENTS: [(&str, &str); 5] = [
    ("lora_unet", "unet"),
    ("lora_te1", "text_encoder"),
    ("lora_te2", "text_encoder_2"),
    ("lora_te3", "text_encoder_3"),
    ("lora_te", "text_encoder"),
];

/// Multi-word module names, so that kohya names (every `.` turned into `_`) map back to paths.
const COMPOUNDS: &[&str] = &[
    "down_blocks",
    "up_blocks",
    "mid_block",
    "transformer_blocks",
    "single_transformer_blocks",
    "to_q",
    "to_k",
    "to_v",
    "to_out",
    "proj_in",
    "proj_out",
    "time_emb_proj",
    "conv_shortcut",
    "time_embedding",
    "linear_1",
    "linear_2",
    "conv_in",
    "conv_out",
    "conv_norm_out",
    "add_embedding",
    "text_model",
    "self_attn",
    "q_proj",
    "k_proj",
    "v_proj",
    "out_proj",
    "o_proj",
    "final_layer_norm",
    "layer_norm1",
    "layer_norm2",
    "token_embedding",
    "position_embedding",
    "add_q_proj",
    "add_k_proj",
    "add_v_proj",
    "to_add_out",
    "norm_out",
    "x_embedder",
    "context_embedder",
    "time_text_embed",
    "proj_mlp",
    "ff_context",
    "norm1_context",
    "timestep_embedder",
    "guidance_embedder",
    "text_embedder",
    "motion_modules",
    "temporal_transformer",
    "attention_blocks",
    "pos_encoder",
    "embed_tokens",
    "gate_proj",
    "up_proj",
    "down_proj",
    "lm_head",
    "input_blocks",
    "output_blocks",
    "middle_block",
    "text_projection",
];

/// Maps a kohya module name (without prefix) back to a dotted path: exactly through `known` paths
/// when given (a model's module list), else by re-joining known multi-word names.
pub fn kohya_to_path(name: &str, known: Option<&HashMap<String, String>>) -> String {
    if let Some(p) = known.and_then(|k| k.get(name)) {
        return p.clone();
    }
    let toks: Vec<&str> = name.split('_').collect();
    let mut out: Vec<String> = vec![];
    let mut i = 0;
    while i < toks.len() {
        let mut best = 1;
        for c in COMPOUNDS {
            let n = c.split('_').count();
            if n > best && i + n <= toks.len() && toks[i..i + n].join("_") == *c {
                best = n;
            }
        }
        out.push(toks[i..i + best].join("_"));
        i += best;
    }
    out.join(".")
}

fn scalar(t: &Tensor) -> Result<f64> {
    Ok(t.flatten_all()?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?
        .first()
        .copied()
        .unwrap_or(0.0))
}

/// The kohya name of module `<component>.<path>`: the component's prefix (`lora_te1` when a second
/// text encoder is present) and the path with every `.` turned into `_`.
fn kohya_module_name(key: &str, has_te2: bool) -> Result<String> {
    let (component, sub) = key
        .split_once('.')
        .ok_or_else(|| Error::Msg(format!("module `{key}` lacks a component")))?;
    let prefix = match component {
        "unet" | "transformer" => "lora_unet",
        "text_encoder" if has_te2 => "lora_te1",
        "text_encoder" => "lora_te",
        "text_encoder_2" => "lora_te2",
        "text_encoder_3" => "lora_te3",
        c => return Err(Error::Msg(format!("component `{c}` has no kohya prefix"))),
    };
    Ok(format!("{prefix}_{}", sub.replace('.', "_")))
}

impl LoraFile {
    /// Collects adapter `name` of `layers` under `component` (`unet`, `text_encoder`, ...).
    pub fn add_layers(
        &mut self,
        component: &str,
        layers: &[&AdaptedLayer],
        name: &str,
    ) -> Result<()> {
        for l in layers {
            let Some(o) = l.adapter(name) else {
                continue;
            };
            if l.lora(name).is_none() {
                let (scale, r) = if let Some(h) = l.adapter_as::<Loha>(name) {
                    (h.scale, Some(h.rank()))
                } else if let Some(k) = l.adapter_as::<Lokr>(name) {
                    (k.scale, None)
                } else {
                    return Err(Error::layer(
                        l.path(),
                        format!(
                            "adapter `{name}` is {:?}: only LoRA, LoHa and LoKr adapters have a kohya/LyCORIS layout",
                            o.method()
                        ),
                    ));
                };
                let tensors: BTreeMap<String, Tensor> = o
                    .params()
                    .into_iter()
                    .map(|(f, v)| Ok((f.to_string(), v.as_tensor().copy()?)))
                    .collect::<Result<_>>()?;
                let mut m = LycorisModule {
                    tensors,
                    alpha: None,
                };
                // alpha such that LyCORIS' alpha / r gives this adapter's scale. LyCORIS ignores
                // alpha when both LoKr factors are full (PEFT does not): the scale goes into W1.
                m.alpha = match (r, m.rank()) {
                    (Some(r), _) | (None, Some(r)) => Some(scale * r as f64),
                    (None, None) => {
                        if let Some(w1) = m.tensors.get_mut("lokr_w1") {
                            *w1 = (&*w1 * scale)?;
                        }
                        None
                    }
                };
                self.lycoris.insert(format!("{component}.{}", l.path()), m);
                continue;
            }
            let Some(ad) = l.lora(name) else {
                continue;
            };
            self.modules.insert(
                format!("{component}.{}", l.path()),
                ModuleLora {
                    down: ad.a.as_tensor().copy()?,
                    up: ad.b.as_tensor().copy()?,
                    // kohya's scale is alpha / r: store the alpha that keeps this adapter's scale
                    // (rsLoRA's alpha / √r included).
                    alpha: ad.scale * ad.r as f64,
                    magnitude: ad
                        .magnitude
                        .as_ref()
                        .map(|m| m.as_tensor().copy())
                        .transpose()?,
                },
            );
        }
        if self.modules.is_empty() && self.lycoris.is_empty() {
            return Err(Error::Msg(format!("no layer carries adapter `{name}`")));
        }
        Ok(())
    }

    /// Inserts the modules of `component` into `layers` as adapter `name`. Every module of that
    /// component must find its layer; shapes are checked with errors naming the module.
    pub fn apply(
        &self,
        component: &str,
        layers: &mut [&mut AdaptedLayer],
        name: &str,
        file: &Path,
    ) -> Result<usize> {
        let prefix = format!("{component}.");
        let mut by_path: HashMap<String, &ModuleLora> = self
            .modules
            .iter()
            .filter_map(|(k, v)| k.strip_prefix(&prefix).map(|p| (p.to_string(), v)))
            .collect();
        let mut n = 0;
        for l in layers.iter_mut() {
            let Some(m) = by_path.remove(l.path()) else {
                continue;
            };
            let r = m.rank();
            let (sa, sb, sm) = l.factor_shapes(r)?;
            for (what, t, want) in [("lora_down", &m.down, &sa), ("lora_up", &m.up, &sb)] {
                if t.dims() != want.as_slice() {
                    return Err(Error::Shape {
                        path: file.into(),
                        key: format!("{component}.{}.{what}", l.path()),
                        expected: want.clone(),
                        found: t.dims().to_vec(),
                    });
                }
            }
            let magnitude = match &m.magnitude {
                Some(t) if t.elem_count() == sm[0] => Some(Var::from_tensor(
                    &t.flatten_all()?
                        .to_dtype(DType::F32)?
                        .to_device(&l.device())?,
                )?),
                Some(t) => {
                    return Err(Error::Shape {
                        path: file.into(),
                        key: format!("{component}.{}.dora_scale", l.path()),
                        expected: sm.clone(),
                        found: t.dims().to_vec(),
                    })
                }
                None => None,
            };
            let adapter = Lora {
                r,
                alpha: m.alpha,
                scale: m.alpha / r as f64,
                dropout: 0.0,
                a: Var::from_tensor(&m.down.to_dtype(DType::F32)?.to_device(&l.device())?)?,
                b: Var::from_tensor(&m.up.to_dtype(DType::F32)?.to_device(&l.device())?)?,
                magnitude,
                initial: None,
            };
            l.insert_adapter(name, adapter)?;
            n += 1;
        }
        let mut ly: HashMap<String, &LycorisModule> = self
            .lycoris
            .iter()
            .filter_map(|(k, v)| k.strip_prefix(&prefix).map(|p| (p.to_string(), v)))
            .collect();
        for l in layers.iter_mut() {
            let Some(m) = ly.remove(l.path()) else {
                continue;
            };
            let key = format!("{component}.{}", l.path());
            let ad = m.to_adapter(&key, file, &l.device())?;
            let dims = l.base_weight().dims().to_vec();
            ad.check(l.base()).map_err(|e| {
                Error::format(
                    file,
                    format!("`{key}`: the LoHa/LoKr factors do not make a {dims:?} weight ({e})"),
                )
            })?;
            l.insert_boxed(name, ad)?;
            n += 1;
        }
        if let Some(k) = by_path.keys().chain(ly.keys()).next() {
            return Err(Error::format(
                file,
                format!("LoRA module `{component}.{k}` matches no layer of the model"),
            ));
        }
        Ok(n)
    }

    /// Reads a kohya or diffusers file (detected from its keys). `known` maps kohya names to module
    /// paths per component (from a model) for exact names; without it, names are re-joined by rule.
    pub fn read(
        path: &Path,
        known: Option<&HashMap<String, String>>,
    ) -> Result<(Self, LoraFormat)> {
        let st = SafeTensors::read(path)?;
        let metadata: BTreeMap<String, String> = st
            .metadata()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let keys: Vec<String> = st.keys().cloned().collect();
        if keys.is_empty() {
            return Err(Error::format(path, "no tensors: not a LoRA file"));
        }
        let kohya = keys.iter().all(|k| k.starts_with("lora_"));
        let mut out = LoraFile {
            modules: BTreeMap::new(),
            lycoris: BTreeMap::new(),
            metadata,
        };
        if kohya {
            let mut parts: BTreeMap<String, HashMap<&str, Tensor>> = BTreeMap::new();
            for k in &keys {
                let (module, field) = match k.find('.') {
                    Some(i) => (&k[..i], &k[i + 1..]),
                    None => {
                        return Err(Error::format(
                            path,
                            format!("tensor `{k}` is not a kohya LoRA key"),
                        ))
                    }
                };
                let field = match field {
                    "lora_down.weight" => "down",
                    "lora_up.weight" => "up",
                    "alpha" => "alpha",
                    "dora_scale" => "dora",
                    "lora_mid.weight" => {
                        return Err(Error::format(
                            path,
                            format!("`{k}`: LoCon with a Tucker core (lora_mid) is not supported"),
                        ))
                    }
                    "hada_t1" | "hada_t2" | "lokr_t2" => {
                        return Err(Error::format(
                            path,
                            format!("`{k}`: LoHa/LoKr with a CP-decomposed conv kernel (use_effective_conv2d) is not supported"),
                        ))
                    }
                    f @ ("hada_w1_a" | "hada_w1_b" | "hada_w2_a" | "hada_w2_b" | "lokr_w1"
                    | "lokr_w1_a" | "lokr_w1_b" | "lokr_w2" | "lokr_w2_a" | "lokr_w2_b") => f,
                    "diff" | "diff_b" | "lora_up.bias" => {
                        return Err(Error::format(
                            path,
                            format!("`{k}`: full-weight differences are not supported"),
                        ))
                    }
                    f => return Err(Error::format(path, format!("`{k}`: unknown field `{f}`"))),
                };
                parts
                    .entry(module.to_string())
                    .or_default()
                    .insert(field, super::checked(path, k, &st.get(k)?)?);
            }
            for (module, mut p) in parts {
                let (prefix, component) = COMPONENTS
                    .iter()
                    .find(|(pre, _)| module.starts_with(&format!("{pre}_")))
                    .ok_or_else(|| {
                        Error::format(path, format!("`{module}`: unknown component prefix"))
                    })?;
                let rest = &module[prefix.len() + 1..];
                let dotted = kohya_to_path(rest, known);
                if p.keys()
                    .any(|f| f.starts_with("hada_") || f.starts_with("lokr_"))
                {
                    if p.contains_key("down") || p.contains_key("up") {
                        return Err(Error::format(
                            path,
                            format!("`{module}` mixes LoRA and LoHa/LoKr tensors"),
                        ));
                    }
                    let alpha = match p.remove("alpha") {
                        Some(a) => Some(scalar(&a)?).filter(|a| *a != 0.0),
                        None => None,
                    };
                    if let Some((f, t)) = p.iter().find(|(_, t)| t.rank() < 2) {
                        return Err(Error::format(
                            path,
                            format!(
                                "`{module}.{f}` has shape {:?}; LoHa/LoKr factors are matrices",
                                t.dims()
                            ),
                        ));
                    }
                    check_lycoris_factors(path, &module, &p)?;
                    let tensors = p.into_iter().map(|(f, t)| (f.to_string(), t)).collect();
                    out.lycoris.insert(
                        format!("{component}.{dotted}"),
                        LycorisModule { tensors, alpha },
                    );
                    continue;
                }
                let down = p.remove("down").ok_or_else(|| Error::Missing {
                    path: path.into(),
                    key: format!("{module}.lora_down.weight"),
                })?;
                let up = p.remove("up").ok_or_else(|| Error::Missing {
                    path: path.into(),
                    key: format!("{module}.lora_up.weight"),
                })?;
                let r = down.dims()[0];
                let alpha = match p.remove("alpha") {
                    // kohya: a missing or zero alpha means alpha = r.
                    Some(a) => Some(scalar(&a)?).filter(|a| *a != 0.0).unwrap_or(r as f64),
                    None => r as f64,
                };
                let m = ModuleLora {
                    down,
                    up,
                    alpha,
                    magnitude: p.remove("dora").map(|t| t.flatten_all()).transpose()?,
                };
                m.check(path, &module, ("lora_down.weight", "lora_up.weight"))?;
                out.modules.insert(format!("{component}.{dotted}"), m);
            }
            Ok((out, LoraFormat::Kohya))
        } else {
            let cfg: serde_json::Map<String, serde_json::Value> =
                match out.metadata.get("lora_adapter_metadata") {
                    Some(s) => serde_json::from_str(s)
                        .map_err(|e| Error::format(path, format!("lora_adapter_metadata: {e}")))?,
                    None => Default::default(),
                };
            let mut parts: BTreeMap<String, HashMap<&str, Tensor>> = BTreeMap::new();
            for k in &keys {
                let (module, field) = if let Some(m) = k.strip_suffix(".lora_A.weight") {
                    (m, "down")
                } else if let Some(m) = k.strip_suffix(".lora_B.weight") {
                    (m, "up")
                } else if let Some(m) = k.strip_suffix(".lora_magnitude_vector") {
                    (m, "dora")
                } else {
                    return Err(Error::format(
                        path,
                        format!("tensor `{k}` is neither a kohya nor a diffusers LoRA key"),
                    ));
                };
                parts
                    .entry(module.to_string())
                    .or_default()
                    .insert(field, super::checked(path, k, &st.get(k)?)?);
            }
            for (module, mut p) in parts {
                let component = module.split('.').next().unwrap_or_default().to_string();
                let sub = module[component.len()..]
                    .trim_start_matches('.')
                    .to_string();
                let down = p.remove("down").ok_or_else(|| Error::Missing {
                    path: path.into(),
                    key: format!("{module}.lora_A.weight"),
                })?;
                let up = p.remove("up").ok_or_else(|| Error::Missing {
                    path: path.into(),
                    key: format!("{module}.lora_B.weight"),
                })?;
                let r = down.dims()[0];
                let alpha = component_alpha(&cfg, &component, &sub, r)
                    .map_err(|e| Error::format(path, e.to_string()))?;
                let m = ModuleLora {
                    down,
                    up,
                    alpha,
                    magnitude: p.remove("dora").map(|t| t.flatten_all()).transpose()?,
                };
                m.check(path, &module, ("lora_A.weight", "lora_B.weight"))?;
                out.modules.insert(module.clone(), m);
            }
            Ok((out, LoraFormat::Diffusers))
        }
    }

    /// Writes the file in `format` (atomically).
    pub fn write(&self, path: &Path, format: LoraFormat) -> Result<()> {
        let mut tensors = BTreeMap::new();
        let mut meta: HashMap<String, String> = self
            .metadata
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        match format {
            LoraFormat::Kohya => {
                let has_te2 = self
                    .modules
                    .keys()
                    .chain(self.lycoris.keys())
                    .any(|k| k.starts_with("text_encoder_2."));
                for (k, m) in &self.modules {
                    let name = kohya_module_name(k, has_te2)?;
                    tensors.insert(format!("{name}.lora_down.weight"), m.down.clone());
                    tensors.insert(format!("{name}.lora_up.weight"), m.up.clone());
                    tensors.insert(
                        format!("{name}.alpha"),
                        Tensor::new(m.alpha as f32, m.down.device())?,
                    );
                    if let Some(mag) = &m.magnitude {
                        let mut shape = vec![mag.elem_count(), 1];
                        if m.down.rank() == 4 {
                            shape.extend([1, 1]);
                        }
                        tensors.insert(format!("{name}.dora_scale"), mag.reshape(shape)?);
                    }
                }
                for (k, m) in &self.lycoris {
                    let name = kohya_module_name(k, has_te2)?;
                    for (f, t) in &m.tensors {
                        tensors.insert(format!("{name}.{f}"), t.clone());
                    }
                    if let Some(a) = m.alpha {
                        tensors.insert(
                            format!("{name}.alpha"),
                            Tensor::new(a as f32, &crate::util::device::current())?,
                        );
                    }
                }
                meta.remove("lora_adapter_metadata");
                if !self.lycoris.is_empty() && self.modules.is_empty() {
                    meta.entry("ss_network_module".into())
                        .or_insert_with(|| "lycoris.kohya".into());
                }
                meta.entry("ss_network_module".into())
                    .or_insert_with(|| "networks.lora".into());
                if let Some((r, a)) = self.common_rank_alpha() {
                    meta.entry("ss_network_dim".into())
                        .or_insert_with(|| r.to_string());
                    meta.entry("ss_network_alpha".into())
                        .or_insert_with(|| format_alpha(a));
                }
                meta.entry("modelspec.sai_model_spec".into())
                    .or_insert_with(|| "1.0.0".into());
            }
            LoraFormat::Diffusers => {
                if let Some(k) = self.lycoris.keys().next() {
                    return Err(Error::Msg(format!(
                        "`{k}` is a LoHa/LoKr module: those exist only in the kohya/LyCORIS layout (--to kohya)"
                    )));
                }
                for (k, m) in &self.modules {
                    tensors.insert(format!("{k}.lora_A.weight"), m.down.clone());
                    tensors.insert(format!("{k}.lora_B.weight"), m.up.clone());
                    if let Some(mag) = &m.magnitude {
                        let mag = if m.down.rank() == 4 {
                            mag.reshape((1, (), 1, 1))?
                        } else {
                            mag.clone()
                        };
                        tensors.insert(format!("{k}.lora_magnitude_vector"), mag);
                    }
                }
                meta.insert("lora_adapter_metadata".into(), self.adapter_metadata()?);
            }
        }
        meta.insert("format".into(), "pt".into());
        save_safetensors(path, &tensors, Some(meta))
    }

    fn common_rank_alpha(&self) -> Option<(usize, f64)> {
        let mut counts: BTreeMap<(usize, u64), usize> = BTreeMap::new();
        for m in self.modules.values() {
            *counts.entry((m.rank(), m.alpha.to_bits())).or_default() += 1;
        }
        counts
            .into_iter()
            .max_by_key(|(_, c)| *c)
            .map(|((r, a), _)| (r, f64::from_bits(a)))
    }

    /// diffusers' `lora_adapter_metadata`: per component, a LoraConfig with `r` / `lora_alpha` set to
    /// the most common values and `rank_pattern` / `alpha_pattern` for the rest (full paths).
    fn adapter_metadata(&self) -> Result<String> {
        let mut by_comp: BTreeMap<&str, Vec<(&str, &ModuleLora)>> = BTreeMap::new();
        for (k, m) in &self.modules {
            let (c, sub) = k
                .split_once('.')
                .ok_or_else(|| Error::Msg(format!("module `{k}` lacks a component")))?;
            by_comp.entry(c).or_default().push((sub, m));
        }
        let mut out = serde_json::Map::new();
        for (c, mods) in by_comp {
            let sub = LoraFile {
                modules: mods
                    .iter()
                    .map(|(p, m)| (p.to_string(), (*m).clone()))
                    .collect(),
                lycoris: Default::default(),
                metadata: Default::default(),
            };
            let (r, a) = sub.common_rank_alpha().unwrap_or((1, 1.0));
            let mut rp = serde_json::Map::new();
            let mut ap = serde_json::Map::new();
            for (p, m) in &mods {
                if m.rank() != r {
                    rp.insert(p.to_string(), m.rank().into());
                }
                if m.alpha != a {
                    ap.insert(p.to_string(), m.alpha.into());
                }
            }
            let mut targets: Vec<String> = mods.iter().map(|(p, _)| p.to_string()).collect();
            targets.sort();
            out.insert(format!("{c}.r"), r.into());
            out.insert(format!("{c}.lora_alpha"), a.into());
            out.insert(format!("{c}.rank_pattern"), rp.into());
            out.insert(format!("{c}.alpha_pattern"), ap.into());
            out.insert(format!("{c}.target_modules"), targets.into());
            out.insert(
                format!("{c}.use_dora"),
                mods.iter().any(|(_, m)| m.magnitude.is_some()).into(),
            );
        }
        let v = serde_json::Value::Object(out);
        serde_json::to_string_pretty(&v).map_err(|e| Error::Msg(e.to_string()))
    }
}

fn format_alpha(a: f64) -> String {
    if a.fract() == 0.0 {
        format!("{a:.1}")
    } else {
        a.to_string()
    }
}

/// The module paths of `layers`, by kohya name (dots → underscores), for exact name mapping.
pub fn kohya_names(layers: &[&AdaptedLayer]) -> HashMap<String, String> {
    layers
        .iter()
        .map(|l| (l.path().replace('.', "_"), l.path().to_string()))
        .collect()
}
