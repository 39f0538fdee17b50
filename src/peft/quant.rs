//! How base weights are quantized (`--quantize nf4`), and the tensors transformers + bitsandbytes
//! save for an NF4 `Linear4bit` weight: [`Nf4Tensor::to_state_dict`] and
//! [`Nf4Tensor::from_state_dict`] write and read `weight`, `weight.absmax`, `weight.quant_map`,
//! `weight.nested_absmax`, `weight.nested_quant_map` and `weight.quant_state.bitsandbytes__nf4`.
//!
//! The NF4 codes, blockwise quantization and dequantization live in [`crate::nn::nf4`]; they are
//! re-exported here.

use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use std::path::Path;

pub use crate::nn::nf4::{
    dynamic_map, quantize_blockwise, Absmax, Nf4Tensor, RoundingError, BLOCKSIZE, NESTED_BLOCKSIZE,
    NF4_CODE,
};

/// How to quantize base weights (`--quantize nf4`): bitsandbytes' `bnb_4bit_quant_type="nf4"`
/// with `bnb_4bit_use_double_quant`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct QuantSpec {
    /// Elements per block (64).
    pub blocksize: usize,
    /// Double quantization of the absmax values.
    pub double_quant: bool,
}

impl Default for QuantSpec {
    fn default() -> Self {
        Self {
            blocksize: BLOCKSIZE,
            double_quant: true,
        }
    }
}

impl QuantSpec {
    /// Parses a `--quantize` value: `nf4` (double quantization on, as QLoRA trains) or
    /// `nf4-no-dq` (one f32 absmax per block); `none` gives `None`.
    pub fn parse(s: &str) -> Result<Option<Self>> {
        match s {
            "none" | "" => Ok(None),
            "nf4" => Ok(Some(Self::default())),
            "nf4-no-dq" => Ok(Some(Self {
                double_quant: false,
                ..Self::default()
            })),
            other => Err(Error::Config(format!(
                "--quantize `{other}` is not supported (expected nf4, nf4-no-dq or none)"
            ))),
        }
    }
}

impl Nf4Tensor {
    /// The tensors transformers + bitsandbytes save for this weight under `prefix` (e.g.
    /// `model.layers.0.mlp.down_proj.weight`).
    pub fn to_state_dict(&self, prefix: &str) -> Result<Vec<(String, Tensor)>> {
        let dev = Device::Cpu;
        let n = self.packed.len();
        let mut v = vec![(
            prefix.to_string(),
            Tensor::from_vec(self.packed.clone(), (n, 1), &dev)?,
        )];
        let f = |x: &[f32]| Tensor::from_vec(x.to_vec(), x.len(), &dev);
        let mut state = serde_json::json!({"quant_type": "nf4", "blocksize": self.blocksize,
            "dtype": self.dtype, "shape": self.shape});
        match &self.absmax {
            Absmax::F32(a) => {
                v.push((format!("{prefix}.absmax"), f(a)?));
                v.push((format!("{prefix}.quant_map"), f(&self.code)?));
            }
            Absmax::Double {
                codes,
                nested_absmax,
                nested_code,
                offset,
                nested_blocksize,
            } => {
                v.push((
                    format!("{prefix}.absmax"),
                    Tensor::from_vec(codes.clone(), codes.len(), &dev)?,
                ));
                v.push((format!("{prefix}.quant_map"), f(&self.code)?));
                v.push((format!("{prefix}.nested_absmax"), f(nested_absmax)?));
                v.push((format!("{prefix}.nested_quant_map"), f(nested_code)?));
                state["nested_blocksize"] = (*nested_blocksize).into();
                state["nested_dtype"] = "float32".into();
                state["nested_offset"] = (*offset as f64).into();
            }
        }
        let bytes = python_json(&state).into_bytes();
        let len = bytes.len();
        v.push((
            format!("{prefix}.quant_state.bitsandbytes__nf4"),
            Tensor::from_vec(bytes, len, &dev)?,
        ));
        Ok(v)
    }

    /// Reads a weight saved by transformers + bitsandbytes (see [`Self::to_state_dict`]) from
    /// `tensors` under `prefix`; `file` names the checkpoint in errors.
    pub fn from_state_dict<'a>(
        tensors: impl Fn(&str) -> Option<&'a Tensor>,
        prefix: &str,
        file: &Path,
    ) -> Result<Self> {
        let get = |k: &str| -> Result<&Tensor> {
            tensors(k).ok_or_else(|| Error::format(file, format!("missing 4-bit tensor `{k}`")))
        };
        let f32s = |k: &str| -> Result<Vec<f32>> {
            Ok(get(k)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?)
        };
        let u8s = |k: &str| -> Result<Vec<u8>> {
            let t = get(k)?;
            if t.dtype() != DType::U8 {
                return Err(Error::format(
                    file,
                    format!("`{k}` is {:?}, expected uint8", t.dtype()),
                ));
            }
            Ok(t.flatten_all()?.to_vec1::<u8>()?)
        };
        let state_key = format!("{prefix}.quant_state.bitsandbytes__nf4");
        let state: serde_json::Value = serde_json::from_slice(&u8s(&state_key)?)
            .map_err(|e| Error::format(file, format!("`{state_key}`: {e}")))?;
        if state["quant_type"] != "nf4" {
            return Err(Error::format(
                file,
                format!(
                    "`{state_key}`: quant_type {} is not nf4",
                    state["quant_type"]
                ),
            ));
        }
        let shape: Vec<usize> = state["shape"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|x| x.as_u64())
                    .map(|x| x as usize)
                    .collect()
            })
            .unwrap_or_default();
        let blocksize = state["blocksize"].as_u64().unwrap_or(0) as usize;
        let packed = u8s(prefix)?;
        let n: usize = shape.iter().product();
        let blocks = n.div_ceil(blocksize.max(1));
        if shape.is_empty() || blocksize == 0 || packed.len() != n.div_ceil(2) {
            return Err(Error::format(
                file,
                format!(
                    "`{prefix}`: {} packed bytes do not hold shape {:?} (blocksize {blocksize})",
                    packed.len(),
                    shape
                ),
            ));
        }
        let code = f32s(&format!("{prefix}.quant_map"))?;
        if code.len() != 16 {
            return Err(Error::format(
                file,
                format!(
                    "`{prefix}.quant_map` has {} values, expected 16",
                    code.len()
                ),
            ));
        }
        let absmax_key = format!("{prefix}.absmax");
        let absmax = if let Some(offset) = state["nested_offset"].as_f64() {
            let codes = u8s(&absmax_key)?;
            let nested_absmax = f32s(&format!("{prefix}.nested_absmax"))?;
            let nested_code = f32s(&format!("{prefix}.nested_quant_map"))?;
            let nb = state["nested_blocksize"].as_u64().unwrap_or(0) as usize;
            if codes.len() != blocks
                || nb == 0
                || nested_absmax.len() != blocks.div_ceil(nb)
                || nested_code.len() != 256
            {
                return Err(Error::format(
                    file,
                    format!(
                        "`{prefix}`: double-quantized state does not fit {blocks} blocks ({} codes, {} nested scales, nested blocksize {nb}, {} map values)",
                        codes.len(),
                        nested_absmax.len(),
                        nested_code.len()
                    ),
                ));
            }
            Absmax::Double {
                codes,
                nested_absmax,
                nested_code,
                offset: offset as f32,
                nested_blocksize: nb,
            }
        } else {
            let a = f32s(&absmax_key)?;
            if a.len() != blocks {
                return Err(Error::format(
                    file,
                    format!(
                        "`{absmax_key}` has {} values for {blocks} blocks of shape {:?}",
                        a.len(),
                        shape
                    ),
                ));
            }
            Absmax::F32(a)
        };
        Ok(Self {
            packed,
            absmax,
            code,
            shape,
            blocksize,
            dtype: state["dtype"].as_str().unwrap_or("float32").to_string(),
        })
    }
}

/// JSON text as Python's `json.dumps` writes it (`", "` and `": "` separators), which is how
/// bitsandbytes packs the quantization state.
fn python_json(v: &serde_json::Value) -> String {
    match v {
        serde_json::Value::Object(m) => {
            let items: Vec<String> = m
                .iter()
                .map(|(k, v)| {
                    format!(
                        "{}: {}",
                        serde_json::Value::String(k.clone()),
                        python_json(v)
                    )
                })
                .collect();
            format!("{{{}}}", items.join(", "))
        }
        serde_json::Value::Array(a) => {
            format!(
                "[{}]",
                a.iter().map(python_json).collect::<Vec<_>>().join(", ")
            )
        }
        other => other.to_string(),
    }
}
