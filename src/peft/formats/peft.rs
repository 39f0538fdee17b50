//! PEFT adapter folders: `adapter_config.json` + `adapter_model.safetensors`, with PEFT's key names:
//! `base_model.model.<path>.lora_A.weight` (r, in), `.lora_B.weight` (out, r),
//! `.lora_magnitude_vector` (DoRA), `.lora_embedding_A` / `.lora_embedding_B` (embeddings), and
//! `base_model.model.<path>.weight` for `modules_to_save`.

use crate::peft::vera::{share_vera_projections, Vera};
use crate::peft::{AdaptedLayer, AdapterConfig, BaseKind, InitSpec, Lora};
use crate::util::{save_safetensors, write_atomic, SafeTensors};
use crate::{Error, Result};
use candle_core::{Tensor, Var};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::Path;

/// The config file name.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// The weights file name.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

/// Options for writing a folder.
#[derive(Debug, Clone, Copy, Default)]
pub struct SaveOptions {
    /// Convert PiSSA/OLoRA adapters to plain LoRA against the original base ("subtract mutated init"):
    /// A' = [A; A₀], B' = [B, −B₀], rank and alpha doubled (alpha ×√2 with rsLoRA), so that servers
    /// which refuse PiSSA/OLoRA (mistral.rs, vLLM) load the result on the unmodified base model.
    pub plain_lora: bool,
}

fn keys_for(kind: BaseKind, path: &str) -> (String, String, String) {
    let p = format!("base_model.model.{path}");
    match kind {
        BaseKind::Embedding => (
            format!("{p}.lora_embedding_A"),
            format!("{p}.lora_embedding_B"),
            format!("{p}.lora_magnitude_vector"),
        ),
        _ => (
            format!("{p}.lora_A.weight"),
            format!("{p}.lora_B.weight"),
            format!("{p}.lora_magnitude_vector"),
        ),
    }
}

/// Writes adapter `name` of `layers` as a PEFT folder at `dir` (files written atomically).
pub fn save(
    dir: &Path,
    layers: &[&AdaptedLayer],
    name: &str,
    cfg: &AdapterConfig,
    opts: SaveOptions,
) -> Result<()> {
    let mut tensors = BTreeMap::new();
    let mut cfg = cfg.clone();
    let mut converted = false;
    for l in layers {
        if let Some((w, b)) = l.trainable_copy() {
            let p = format!("base_model.model.{}", l.path());
            tensors.insert(format!("{p}.weight"), w.as_tensor().clone());
            if let Some(b) = b {
                tensors.insert(format!("{p}.bias"), b.as_tensor().clone());
            }
        }
        let Some(o) = l.adapter(name) else {
            continue;
        };
        if l.lora(name).is_none() {
            if let Some(Vera {
                proj: Some((va, vb)),
                ..
            }) = l.adapter_as::<Vera>(name)
            {
                tensors.insert("base_model.vera_A".into(), va.clone());
                tensors.insert("base_model.vera_B".into(), vb.clone());
            }
            // AdaLoRA: only the kept ranks are saved, as PEFT's resize_state_dict_by_rank_pattern.
            let keep: Option<Vec<u32>> = cfg
                .extra
                .get("adalora_rank_pattern")
                .and_then(|p| p.get(format!("{}.lora_E", l.path())))
                .and_then(|m| m.as_array())
                .map(|m| {
                    m.iter()
                        .enumerate()
                        .filter(|(_, b)| b.as_bool() == Some(true))
                        .map(|(i, _)| i as u32)
                        .collect()
                });
            for (param, v) in o.params() {
                let mut t = v.as_tensor().clone();
                if let Some(idx) = &keep {
                    let full = if param == "lora_B" {
                        t.dim(1)?
                    } else {
                        t.dim(0)?
                    };
                    if idx.len() != full {
                        let ix = Tensor::new(idx.as_slice(), t.device())?;
                        t = t.index_select(&ix, if param == "lora_B" { 1 } else { 0 })?;
                    }
                }
                tensors.insert(format!("base_model.model.{}.{param}", l.path()), t);
            }
            continue;
        }
        let Some(ad) = l.lora(name) else {
            continue;
        };
        let (ka, kb, km) = keys_for(l.kind(), l.path());
        let (mut a, mut b) = (ad.a.as_tensor().clone(), ad.b.as_tensor().clone());
        if opts.plain_lora {
            if let Some((a0, b0)) = &ad.initial {
                if ad.magnitude.is_some() {
                    return Err(Error::Msg(format!(
                        "{}: DoRA with PiSSA/OLoRA init cannot be exported as plain LoRA",
                        l.path()
                    )));
                }
                a = Tensor::cat(&[&a, a0], 0)?;
                b = Tensor::cat(&[&b, &b0.neg()?], 1)?;
                converted = true;
            }
        }
        tensors.insert(ka, a);
        tensors.insert(kb, b);
        if let Some(m) = &ad.magnitude {
            // PEFT stores the conv magnitude as (1, out, 1, 1), linear and embedding ones flat.
            let m = match l.kind() {
                BaseKind::Conv2d(_) => m.as_tensor().reshape((1, (), 1, 1))?,
                _ => m.as_tensor().clone(),
            };
            tensors.insert(km, m);
        }
    }
    if opts.plain_lora && !converted && cfg.init_lora_weights.mutates_base() {
        return Err(Error::Msg(format!(
            "adapter `{name}` was initialised with {:?} but carries no initial factors (loaded from disk?): it cannot be converted to plain LoRA",
            cfg.init_lora_weights
        )));
    }
    if opts.plain_lora && converted {
        let f = if cfg.use_rslora { 2f64.sqrt() } else { 2.0 };
        cfg.r *= 2;
        cfg.lora_alpha *= f;
        cfg.rank_pattern.values_mut().for_each(|v| *v *= 2);
        cfg.alpha_pattern.values_mut().for_each(|v| *v *= f);
        cfg.init_lora_weights = InitSpec::Bool(true);
    }
    if tensors.is_empty() {
        return Err(Error::Msg(format!(
            "no layer carries adapter `{name}`: nothing to save"
        )));
    }
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    save_safetensors(&dir.join(WEIGHTS_FILE), &tensors, Some(meta))?;
    write_atomic(&dir.join(CONFIG_FILE), cfg.to_json()?.as_bytes())
}

/// Finds `key` or its in-memory form with the adapter name (`...lora_A.default.weight`).
fn find(st: &SafeTensors, key: &str, name: &str) -> Option<String> {
    if st.contains(key) {
        return Some(key.to_string());
    }
    let alt = if let Some(stem) = key.strip_suffix(".weight") {
        format!("{stem}.{name}.weight")
    } else {
        format!("{key}.{name}")
    };
    st.contains(&alt).then_some(alt)
}

fn check_shape(st: &SafeTensors, key: &str, t: &Tensor, want: &[usize]) -> Result<Tensor> {
    if t.dims() != want {
        return Err(Error::Shape {
            path: st.path().to_path_buf(),
            key: key.into(),
            expected: want.to_vec(),
            found: t.dims().to_vec(),
        });
    }
    super::checked(st.path(), key, t)
}

/// Loads a PEFT folder into `layers` as adapter `name`. Every tensor in the file must land on a layer,
/// every targeted layer must find its tensors, and every shape must fit; errors name the file, the key
/// and both shapes.
pub fn load(dir: &Path, layers: &mut [&mut AdaptedLayer], name: &str) -> Result<AdapterConfig> {
    let cfg = AdapterConfig::from_json_file(&dir.join(CONFIG_FILE))?;
    let wpath = dir.join(WEIGHTS_FILE);
    let st = SafeTensors::read(&wpath)?;
    let mut used = BTreeSet::new();
    let mut excluded: Vec<String> = vec![];
    for l in layers.iter_mut() {
        let path = l.path().to_string();
        let kind = l.kind();
        // modules_to_save
        let p = format!("base_model.model.{path}");
        if cfg.saves_module(&path) {
            let kw = find(&st, &format!("{p}.weight"), name).ok_or_else(|| Error::Missing {
                path: wpath.clone(),
                key: format!("{p}.weight"),
            })?;
            let w = check_shape(&st, &kw, &st.get(&kw)?, l.base_weight().dims())?;
            used.insert(kw);
            let b = match l.bias().map(|b| b.dims().to_vec()) {
                Some(bd) => {
                    let kb =
                        find(&st, &format!("{p}.bias"), name).ok_or_else(|| Error::Missing {
                            path: wpath.clone(),
                            key: format!("{p}.bias"),
                        })?;
                    let b = check_shape(&st, &kb, &st.get(&kb)?, &bd)?;
                    used.insert(kb);
                    Some(b)
                }
                None => None,
            };
            l.set_trainable_copy(&w, b.as_ref())?;
            continue;
        }
        if cfg.peft_type != "LORA" {
            // IA3 / LoHa / LoKr: build the adapter as the config says, then set every tensor.
            if !cfg.targets(&path, kind.module_kind(), path.ends_with("lm_head"))? {
                continue;
            }
            l.add_adapter(name, &cfg, 0)?;
            let o = l
                .adapter(name)
                .ok_or_else(|| Error::layer(&path, format!("adapter `{name}` was not created")))?;
            for (param, v) in o.params() {
                let key = format!("base_model.model.{path}.{param}");
                let k = find(&st, &key, name).ok_or_else(|| Error::Missing {
                    path: wpath.clone(),
                    key: key.clone(),
                })?;
                v.set(&check_shape(&st, &k, &st.get(&k)?, v.dims())?)?;
                used.insert(k);
            }
            continue;
        }
        let (ka, kb, km) = keys_for(kind, &path);
        if !cfg.targets(&path, kind.module_kind(), path.ends_with("lm_head"))? {
            // PEFT creates no adapter where the config's target_modules / exclude_modules /
            // layers_to_transform say no, so tensors stored for such a module are not loaded.
            for k in [&ka, &kb, &km] {
                if let Some(k) = find(&st, k, name) {
                    used.insert(k.clone());
                    excluded.push(k);
                }
            }
            continue;
        }
        let (ka, kb) = match (find(&st, &ka, name), find(&st, &kb, name)) {
            (Some(a), Some(b)) => (a, b),
            (Some(_), None) => {
                return Err(Error::Missing {
                    path: wpath.clone(),
                    key: kb,
                })
            }
            (None, Some(_)) => {
                return Err(Error::Missing {
                    path: wpath.clone(),
                    key: ka,
                })
            }
            (None, None) => {
                return Err(Error::Missing {
                    path: wpath.clone(),
                    key: ka,
                });
            }
        };
        let a = st.get(&ka)?;
        let r = a.dim(0)?;
        let (sa, sb, sm) = l.factor_shapes(r)?;
        let a = check_shape(&st, &ka, &a, &sa)?;
        let b = check_shape(&st, &kb, &st.get(&kb)?, &sb)?;
        let settings = cfg.settings_for(&path)?;
        if settings.r != r {
            return Err(Error::format(
                &wpath,
                format!(
                    "`{ka}` has rank {r}, but the config gives rank {} for `{path}`",
                    settings.r
                ),
            ));
        }
        let magnitude = if cfg.use_dora {
            let km2 = find(&st, &km, name).ok_or_else(|| Error::Missing {
                path: wpath.clone(),
                key: km.clone(),
            })?;
            let m = st.get(&km2)?;
            let m = if m.elem_count() == sm[0] {
                m.flatten_all()?
            } else {
                m
            };
            let m = check_shape(&st, &km2, &m, &sm)?;
            used.insert(km2);
            Some(Var::from_tensor(&m.to_device(&l.device())?)?)
        } else {
            None
        };
        used.insert(ka);
        used.insert(kb);
        let adapter = Lora {
            r,
            alpha: settings.alpha,
            scale: cfg.scale(r, settings.alpha),
            dropout: cfg.lora_dropout,
            a: Var::from_tensor(&a.to_device(&l.device())?)?,
            b: Var::from_tensor(&b.to_device(&l.device())?)?,
            magnitude,
            initial: None,
        };
        l.insert_adapter(name, adapter)?;
    }
    if cfg.peft_type == "VERA" {
        let get = |k: &str| -> Result<(String, Tensor)> {
            let key = find(&st, k, name).ok_or_else(|| Error::Missing {
                path: wpath.clone(),
                key: k.into(),
            })?;
            let t = super::checked(&wpath, &key, &st.get(&key)?)?;
            Ok((key, t))
        };
        let (ka, a) = get("base_model.vera_A")?;
        let (kb, b) = get("base_model.vera_B")?;
        share_vera_projections(layers, name, 0, Some((a, b)))
            .map_err(|e| Error::format(&wpath, e.to_string()))?;
        used.insert(ka);
        used.insert(kb);
    }
    if let Some(k) = st.keys().find(|k| !used.contains(*k)) {
        return Err(Error::format(
            &wpath,
            format!("tensor `{k}` does not match any module of the model"),
        ));
    }
    if let Some(first) = excluded.first() {
        eprintln!(
            "warning: {}: {} tensor(s) belong to modules that {CONFIG_FILE} does not target \
             (target_modules / exclude_modules / layers_to_transform) and were not loaded, as in \
             PEFT; the first is `{first}`",
            wpath.display(),
            excluded.len()
        );
    }
    Ok(cfg)
}
