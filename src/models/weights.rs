//! Named base weights for model constructors: shape-checked access with errors naming the file, the
//! key and both shapes, and builders for adapted layers through an [`AdapterPlan`].

use crate::nn::nf4::Nf4Tensor;
use crate::peft::{AdaptedConv2d, AdaptedLinear, AdapterPlan, ConvCfg};
use crate::util::SafeTensors;
use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Base weights by checkpoint name, plus the adapter plan layers are built with.
pub struct Weights {
    tensors: BTreeMap<String, Tensor>,
    /// When set, missing tensors are created (for training from scratch) from this seed:
    /// matrices and kernels N(0, 1/fan_in), norm weights 1, biases 0. Created tensors are recorded.
    fresh: Option<(u64, std::sync::Mutex<BTreeMap<String, Tensor>>)>,
    file: PathBuf,
    /// Adapter plan applied to every layer built here.
    pub plan: AdapterPlan,
    dtype: DType,
    /// Where the layers built from these weights live (the current device when made).
    device: Device,
}

impl Weights {
    /// Weights from memory (`file` names their origin in errors).
    pub fn new(
        tensors: BTreeMap<String, Tensor>,
        file: impl Into<PathBuf>,
        plan: AdapterPlan,
    ) -> Self {
        Self {
            tensors,
            file: file.into(),
            plan,
            dtype: crate::util::device::current_dtype(),
            fresh: None,
            device: crate::util::device::current(),
        }
    }

    /// The same weights, building layers on `device` instead of the current device.
    pub fn on(mut self, device: &Device) -> Self {
        self.device = device.clone();
        self
    }

    /// The same weights, loaded in `dtype` (bf16 / f16 bases with f32 adapters, or f32).
    pub fn with_dtype(mut self, dtype: DType) -> Self {
        self.dtype = dtype;
        self
    }

    /// The dtype base weights are loaded in.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The device the layers are built on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Reads one or more safetensors files (a sharded checkpoint is several).
    pub fn from_files(files: &[PathBuf], plan: AdapterPlan) -> Result<Self> {
        let mut tensors = BTreeMap::new();
        for f in files {
            tensors.extend(SafeTensors::read(f)?.into_tensors());
        }
        let file = files.first().cloned().unwrap_or_default();
        Ok(Self::new(tensors, file, plan))
    }

    /// The checkpoint file (for messages).
    pub fn file(&self) -> &Path {
        &self.file
    }

    /// Whether `key` exists.
    pub fn contains(&self, key: &str) -> bool {
        self.tensors.contains_key(key)
    }

    /// Weights that do not exist yet: every tensor asked for is created from `seed` (a model trained
    /// from scratch, as `pretrain` does). [`Self::created`] returns them for saving.
    pub fn fresh(seed: u64, plan: AdapterPlan) -> Self {
        let mut w = Self::new(BTreeMap::new(), "<new weights>", plan);
        w.fresh = Some((seed, std::sync::Mutex::new(BTreeMap::new())));
        w
    }

    /// The tensors created by a [`Self::fresh`] weight set.
    pub fn created(&self) -> BTreeMap<String, Tensor> {
        match &self.fresh {
            Some((_, m)) => m.lock().map(|m| m.clone()).unwrap_or_default(),
            None => BTreeMap::new(),
        }
    }

    fn create(&self, seed: u64, key: &str, shape: &[usize]) -> Result<Tensor> {
        let dev = self.device.clone();
        let t = if key.ends_with(".bias") {
            Tensor::zeros(shape, DType::F32, &dev)?
        } else if shape.len() == 1 {
            Tensor::ones(shape, DType::F32, &dev)?
        } else {
            let fan_in: usize = shape[1..].iter().product();
            crate::rng::normal(
                shape,
                1.0 / (fan_in.max(1) as f64).sqrt(),
                &mut crate::rng::rng_for(seed, key),
            )?
            .to_device(&dev)?
        };
        if let Some((_, m)) = &self.fresh {
            if let Ok(mut m) = m.lock() {
                m.insert(key.to_string(), t.clone());
            }
        }
        Ok(t.to_dtype(self.dtype)?)
    }

    /// Tensor `key` with exactly `shape`, in the compute dtype.
    pub fn get(&self, key: &str, shape: &[usize]) -> Result<Tensor> {
        if let (Some((seed, _)), false) = (&self.fresh, self.tensors.contains_key(key)) {
            return self.create(*seed, key, shape);
        }
        let t = self.tensors.get(key).ok_or_else(|| Error::Missing {
            path: self.file.clone(),
            key: key.into(),
        })?;
        if t.dims() != shape {
            return Err(Error::Shape {
                path: self.file.clone(),
                key: key.into(),
                expected: shape.to_vec(),
                found: t.dims().to_vec(),
            });
        }
        Ok(t.to_device(&self.device)?.to_dtype(self.dtype)?)
    }

    /// An adapted linear layer `path` (out, in), with or without bias. A weight saved in 4 bits
    /// by transformers + bitsandbytes (`<path>.weight.quant_state.bitsandbytes__nf4` present) is
    /// read as an NF4 base.
    pub fn linear(&self, path: &str, inn: usize, out: usize, bias: bool) -> Result<AdaptedLinear> {
        let b = if bias {
            Some(self.get(&format!("{path}.bias"), &[out])?)
        } else {
            None
        };
        let key = format!("{path}.weight");
        if self
            .tensors
            .contains_key(&format!("{key}.quant_state.bitsandbytes__nf4"))
        {
            if !self.device.is_cpu() {
                return Err(Error::format(
                    &self.file,
                    format!("`{key}` is an NF4 (bitsandbytes 4-bit) weight; NF4 bases run on the CPU only in this version: load the unquantized checkpoint on {:?}, or use --device cpu", self.device.location()),
                ));
            }
            let q = Nf4Tensor::from_state_dict(|k| self.tensors.get(k), &key, &self.file)?;
            if q.shape != [out, inn] {
                return Err(Error::Shape {
                    path: self.file.clone(),
                    key,
                    expected: vec![out, inn],
                    found: q.shape.clone(),
                });
            }
            return self.plan.linear_nf4(path, q, b);
        }
        let w = self.get(&key, &[out, inn])?;
        self.plan.linear(path, w, b)
    }

    /// An adapted conv2d layer `path` with a square kernel.
    pub fn conv2d(
        &self,
        path: &str,
        inn: usize,
        out: usize,
        k: usize,
        cfg: ConvCfg,
    ) -> Result<AdaptedConv2d> {
        let w = self.get(&format!("{path}.weight"), &[out, inn, k, k])?;
        let b = Some(self.get(&format!("{path}.bias"), &[out])?);
        self.plan.conv2d(path, w, b, cfg)
    }

    /// (weight, bias) of a norm layer with `n` features.
    pub fn norm(&self, path: &str, n: usize) -> Result<(Tensor, Tensor)> {
        Ok((
            self.get(&format!("{path}.weight"), &[n])?,
            self.get(&format!("{path}.bias"), &[n])?,
        ))
    }

    /// Every key of the checkpoint.
    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }

    /// A checkpoint tensor by key, whatever its shape, in the load dtype.
    pub fn get_any(&self, key: &str) -> Result<Tensor> {
        let t = self.tensors.get(key).ok_or_else(|| Error::Missing {
            path: self.file.clone(),
            key: key.into(),
        })?;
        Ok(t.to_device(&self.device)?.to_dtype(self.dtype)?)
    }
}

/// A JSON file, with errors naming it.
pub(crate) fn read_json(path: &Path) -> Result<serde_json::Value> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| Error::format(path, e.to_string()))
}

/// The safetensors weights file of a model folder (`diffusion_pytorch_model.safetensors` or
/// `model.safetensors`, possibly sharded with an index).
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    for name in ["diffusion_pytorch_model", "model"] {
        let single = dir.join(format!("{name}.safetensors"));
        if single.exists() {
            return Ok(vec![single]);
        }
        let index = dir.join(format!("{name}.safetensors.index.json"));
        if index.exists() {
            let v = read_json(&index)?;
            let map = v["weight_map"]
                .as_object()
                .ok_or_else(|| Error::format(&index, "no weight_map"))?;
            let mut files: Vec<PathBuf> = map
                .values()
                .filter_map(|f| f.as_str())
                .map(|f| dir.join(f))
                .collect();
            files.sort();
            files.dedup();
            return Ok(files);
        }
    }
    if dir.join("diffusion_pytorch_model.bin").exists() || dir.join("pytorch_model.bin").exists() {
        return Err(Error::format(
            dir,
            "only pickle (.bin) weights found; postforge reads safetensors only",
        ));
    }
    Err(Error::format(dir, "no safetensors weights found"))
}
