//! Small shared helpers: atomic file writes, safetensors reading with clear errors, torch's f32 linspace;
//! output folders that are locked and swapped in whole ([`outdir`]).

pub mod device;
pub mod mem;
pub mod outdir;
pub mod runtime;

use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Reads an optional JSON file: `None` when it does not exist; a file that exists must read and
/// parse (errors name the file).
pub fn read_optional_json<T: serde::de::DeserializeOwned>(path: &Path) -> Result<Option<T>> {
    match std::fs::read_to_string(path) {
        Ok(t) => serde_json::from_str(&t)
            .map(Some)
            .map_err(|e| Error::format(path, e.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(Error::io(path, e)),
    }
}

/// Reads a JSON configuration file (`config.json`, `scheduler_config.json`, ...) and checks it
/// with `check`: every error, from reading, parsing or checking, names the file.
pub fn read_json_config<T: serde::de::DeserializeOwned>(
    path: &Path,
    check: impl FnOnce(&T) -> Result<()>,
) -> Result<T> {
    let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
    let c: T = serde_json::from_str(&text).map_err(|e| Error::format(path, e.to_string()))?;
    check(&c).map_err(|e| match e {
        Error::Format { .. } => e,
        e => Error::format(path, e.to_string()),
    })?;
    Ok(c)
}

/// A JSON parse error of line `line` (1-based) of a JSONL file, as `line L, column C: what`
/// (serde's own "at line 1 column C" counts within the line and would misname the line).
pub fn json_line_error(line: usize, e: &serde_json::Error) -> String {
    let msg = e.to_string();
    let what = msg
        .rsplit_once(" at line ")
        .map_or(msg.as_str(), |(w, _)| w)
        .to_string();
    format!("line {line}, column {}: {what}", e.column())
}

/// Writes `bytes` to `path` atomically: a temporary file in the same folder, fsync, rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{name}.tmp{}", std::process::id()));
    {
        let mut f = std::fs::File::create(&tmp).map_err(|e| Error::io(&tmp, e))?;
        f.write_all(bytes).map_err(|e| Error::io(&tmp, e))?;
        f.sync_all().map_err(|e| Error::io(&tmp, e))?;
    }
    std::fs::rename(&tmp, path).map_err(|e| Error::io(path, e))
}

/// Saves tensors (converted to contiguous CPU data) as a safetensors file, atomically, with metadata.
pub fn save_safetensors(
    path: &Path,
    tensors: &BTreeMap<String, Tensor>,
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let mut views = Vec::with_capacity(tensors.len());
    for (k, t) in tensors {
        let t = t.to_device(&Device::Cpu)?.contiguous()?;
        let dtype = match t.dtype() {
            DType::F32 => safetensors::Dtype::F32,
            DType::F64 => safetensors::Dtype::F64,
            DType::F16 => safetensors::Dtype::F16,
            DType::BF16 => safetensors::Dtype::BF16,
            DType::U8 => safetensors::Dtype::U8,
            DType::U32 => safetensors::Dtype::U32,
            DType::I64 => safetensors::Dtype::I64,
            d => {
                return Err(Error::Msg(format!(
                    "cannot save tensor `{k}` of dtype {d:?}"
                )))
            }
        };
        let bytes = tensor_bytes(&t)?;
        views.push((k.clone(), dtype, t.dims().to_vec(), bytes));
    }
    let data: Vec<(String, safetensors::tensor::TensorView<'_>)> = views
        .iter()
        .map(|(k, d, s, b)| {
            safetensors::tensor::TensorView::new(*d, s.clone(), b)
                .map(|v| (k.clone(), v))
                .map_err(|e| Error::format(path, format!("tensor `{k}`: {e}")))
        })
        .collect::<Result<_>>()?;
    let bytes =
        safetensors::serialize(data, metadata).map_err(|e| Error::format(path, e.to_string()))?;
    write_atomic(path, &bytes)
}

fn tensor_bytes(t: &Tensor) -> Result<Vec<u8>> {
    fn le<T: Copy, const N: usize>(v: Vec<T>, f: impl Fn(T) -> [u8; N]) -> Vec<u8> {
        let mut out = Vec::with_capacity(v.len() * N);
        v.into_iter().for_each(|x| out.extend_from_slice(&f(x)));
        out
    }
    let flat = t.flatten_all()?;
    Ok(match t.dtype() {
        DType::F32 => le(flat.to_vec1::<f32>()?, |x| x.to_le_bytes()),
        DType::F64 => le(flat.to_vec1::<f64>()?, |x| x.to_le_bytes()),
        DType::F16 => le(flat.to_vec1::<half::f16>()?, |x| x.to_le_bytes()),
        DType::BF16 => le(flat.to_vec1::<half::bf16>()?, |x| x.to_le_bytes()),
        DType::U8 => flat.to_vec1::<u8>()?,
        DType::U32 => le(flat.to_vec1::<u32>()?, |x| x.to_le_bytes()),
        DType::I64 => le(flat.to_vec1::<i64>()?, |x| x.to_le_bytes()),
        d => return Err(Error::Msg(format!("unsupported dtype {d:?}"))),
    })
}

/// A safetensors file read fully into memory, with errors that name the file.
pub struct SafeTensors {
    path: PathBuf,
    tensors: BTreeMap<String, Tensor>,
    metadata: HashMap<String, String>,
}

impl SafeTensors {
    /// Reads and validates `path`. A truncated or non-safetensors file is an error naming the file.
    pub fn read(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .map_err(|e| Error::format(&path, format!("not a valid safetensors file: {e}")))?;
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| Error::format(&path, format!("not a valid safetensors file: {e}")))?;
        let metadata = meta.metadata().clone().unwrap_or_default();
        let mut tensors = BTreeMap::new();
        for (name, view) in st.tensors() {
            let t = candle_core::safetensors::Load::load(&view, &Device::Cpu)
                .map_err(|e| Error::format(&path, format!("tensor `{name}`: {e}")))?;
            tensors.insert(name, t);
        }
        Ok(Self {
            path,
            tensors,
            metadata,
        })
    }
    /// The file path.
    pub fn path(&self) -> &Path {
        &self.path
    }
    /// The `__metadata__` map.
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }
    /// All tensor names, sorted.
    pub fn keys(&self) -> impl Iterator<Item = &String> {
        self.tensors.keys()
    }
    /// Whether `key` exists.
    pub fn contains(&self, key: &str) -> bool {
        self.tensors.contains_key(key)
    }
    /// The tensor `key`, or an error naming the file and key.
    pub fn get(&self, key: &str) -> Result<Tensor> {
        self.tensors
            .get(key)
            .cloned()
            .ok_or_else(|| Error::Missing {
                path: self.path.clone(),
                key: key.to_string(),
            })
    }
    /// The tensor `key` as f32, checked against `shape`.
    pub fn get_f32(&self, key: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.get(key)?;
        if t.dims() != shape {
            return Err(Error::Shape {
                path: self.path.clone(),
                key: key.to_string(),
                expected: shape.to_vec(),
                found: t.dims().to_vec(),
            });
        }
        Ok(t.to_dtype(DType::F32)?)
    }
    /// Takes all tensors out.
    pub fn into_tensors(self) -> BTreeMap<String, Tensor> {
        self.tensors
    }
}

/// torch.linspace(start, end, n) in f32, evaluated from the nearer end as torch's CPU kernel does.
pub(crate) fn linspace_f32(start: f32, end: f32, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![start];
    }
    let step = (end - start) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                start + step * i as f32
            } else {
                end - step * (n - i - 1) as f32
            }
        })
        .collect()
}
