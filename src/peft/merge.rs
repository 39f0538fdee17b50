//! Merge-and-unload: write a full model whose adapted tensors carry the merged weights, under the
//! original tensor names, in the original dtypes; and merging a PEFT folder straight into a
//! safetensors checkpoint without building the model.

use crate::peft::formats::peft as peft_files;
use crate::peft::{AdaptedLayer, BaseKind, ConvCfg};
use crate::util::{save_safetensors, SafeTensors};
use crate::{Error, Result};
use std::collections::BTreeMap;
use std::path::Path;

/// Reads the base checkpoint `src`, replaces `<path>.weight` / `<path>.bias` of every adapted layer by
/// its merged tensors, and writes `out` atomically. Every replaced tensor must exist in `src` with the
/// same shape.
pub fn merge_and_unload(layers: &[&AdaptedLayer], src: &Path, out: &Path) -> Result<()> {
    write_merged(layers, SafeTensors::read(src)?.into_tensors(), src, out)
}

/// [`merge_and_unload`] over base tensors already in memory (`src` names them in errors).
fn write_merged(
    layers: &[&AdaptedLayer],
    mut tensors: BTreeMap<String, candle_core::Tensor>,
    src: &Path,
    out: &Path,
) -> Result<()> {
    for l in layers {
        let (w, b) = l.merged_tensors()?;
        for (key, t) in [
            (format!("{}.weight", l.path()), Some(w)),
            (format!("{}.bias", l.path()), b),
        ] {
            let Some(t) = t else { continue };
            let orig = tensors.get(&key).ok_or_else(|| Error::Missing {
                path: src.into(),
                key: key.clone(),
            })?;
            if orig.dims() != t.dims() {
                return Err(Error::Shape {
                    path: src.into(),
                    key,
                    expected: t.dims().to_vec(),
                    found: orig.dims().to_vec(),
                });
            }
            let dt = orig.dtype();
            tensors.insert(key, t.to_dtype(dt)?);
        }
    }
    save_safetensors(out, &tensors, None)
}

/// Builds bare layers for every module a PEFT folder adapts, from a base checkpoint, and loads the
/// adapter into them. The layer kind follows the file: `lora_embedding_*` → embedding, a 4-D base
/// weight → conv2d, otherwise linear.
pub fn layers_from_checkpoint(
    base: &BTreeMap<String, candle_core::Tensor>,
    base_path: &Path,
    adapter_dir: &Path,
) -> Result<Vec<AdaptedLayer>> {
    let st = SafeTensors::read(adapter_dir.join(peft_files::WEIGHTS_FILE))?;
    let cfg =
        crate::peft::AdapterConfig::from_json_file(&adapter_dir.join(peft_files::CONFIG_FILE))?;
    let mut paths: BTreeMap<String, bool> = BTreeMap::new(); // path -> is embedding
                                                             // The parameter names of every adapter type, as PEFT saves them after the module path.
    const PARAMS: [&str; 17] = [
        "lora_A.weight",
        "lora_B.weight",
        "lora_magnitude_vector",
        "lora_A",
        "lora_B",
        "lora_E",
        "ia3_l",
        "hada_w1_a",
        "hada_w1_b",
        "hada_w2_a",
        "hada_w2_b",
        "lokr_w1",
        "lokr_w1_a",
        "lokr_w1_b",
        "lokr_w2",
        "lokr_w2_a",
        "lokr_w2_b",
    ];
    for k in st.keys() {
        if k == "base_model.vera_A" || k == "base_model.vera_B" {
            continue; // VeRA's shared projections: not a module
        }
        let Some(rest) = k.strip_prefix("base_model.model.") else {
            return Err(Error::format(
                st.path(),
                format!("tensor `{k}` lacks the `base_model.model.` prefix"),
            ));
        };
        if let Some(p) = rest.strip_suffix(".lora_embedding_A") {
            paths.insert(p.to_string(), true);
            continue;
        }
        if let Some(p) = PARAMS
            .iter()
            .chain(["vera_lambda_b", "vera_lambda_d"].iter())
            .find_map(|s| rest.strip_suffix(&format!(".{s}")))
        {
            paths.entry(p.to_string()).or_insert(false);
            continue;
        }
        if let Some(p) = rest.strip_suffix(".weight").filter(|p| cfg.saves_module(p)) {
            paths.insert(p.to_string(), false);
        }
    }
    let mut layers = vec![];
    for (path, emb) in paths {
        let wk = format!("{path}.weight");
        let w = base
            .get(&wk)
            .ok_or_else(|| Error::Missing {
                path: base_path.into(),
                key: wk.clone(),
            })?
            .clone();
        let b = base.get(&format!("{path}.bias")).cloned();
        let kind = if emb {
            BaseKind::Embedding
        } else if w.rank() == 4 {
            BaseKind::Conv2d(ConvCfg::default())
        } else if w.rank() == 1 {
            BaseKind::Norm // a norm weight trained in full (LongLoRA's modules_to_save)
        } else {
            BaseKind::Linear
        };
        layers.push(AdaptedLayer::new(
            &path,
            kind,
            w,
            if emb { None } else { b },
        )?);
    }
    let mut refs: Vec<&mut AdaptedLayer> = layers.iter_mut().collect();
    peft_files::load(adapter_dir, &mut refs, "default")?;
    Ok(layers)
}

/// `postforge merge` for a plain checkpoint: base safetensors + PEFT folder → merged safetensors.
pub fn merge_folder_into_checkpoint(base: &Path, adapter_dir: &Path, out: &Path) -> Result<usize> {
    let tensors = SafeTensors::read(base)?.into_tensors();
    let layers = layers_from_checkpoint(&tensors, base, adapter_dir)?;
    let refs: Vec<&AdaptedLayer> = layers.iter().collect();
    write_merged(&refs, tensors, base, out)?;
    Ok(layers.len())
}
