//! NF4 4-bit weights, compatible with bitsandbytes: the 16-value NormalFloat code, blocks of 64 with
//! an f32 absmax each, two codes per byte (the even element in the high nibble), and double
//! quantization of the absmax values (their mean subtracted, then 8-bit with bitsandbytes'
//! signed "dynamic" map in blocks of 256 with an f32 absmax each).
//!
//! [`Nf4Tensor::quantize`] rounds as bitsandbytes' CPU path does (values scaled by the reciprocal
//! of the block's absmax, clamped to [-1, 1], then the code whose midpoint interval holds them, a
//! value on a midpoint going to the lower code). The bitsandbytes state-dict layout
//! ([`Nf4Tensor::to_state_dict`], [`Nf4Tensor::from_state_dict`]) lives with the adapter core's
//! quantization settings in `peft::quant`.

use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};

/// The NF4 code (bitsandbytes' `quant_map` for `nf4`), indices 0–15.
pub const NF4_CODE: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];

/// Block size of the 4-bit codes (bitsandbytes' default for NF4).
pub const BLOCKSIZE: usize = 64;
/// Block size of the double-quantized absmax values.
pub const NESTED_BLOCKSIZE: usize = 256;

/// bitsandbytes' signed 8-bit "dynamic" map (`create_dynamic_map(signed=True)`): for exponents
/// 10⁻⁶ … 10⁰, the midpoints of 2^i + 1 evenly spaced points in [0.1, 1] scaled by the exponent,
/// both signs, plus 0 and 1; sorted.
pub fn dynamic_map() -> Vec<f32> {
    let (max_exp, non_sign) = (7i32, 7i32);
    let mut data: Vec<f64> = vec![];
    for i in 0..max_exp {
        let items = (1usize << (i + non_sign - max_exp)) + 1;
        // torch.linspace(0.1, 1, items) in f32, then the f32 midpoints.
        let b: Vec<f32> = crate::util::linspace_f32(0.1, 1.0, items);
        let scale = 10f64.powi(-(max_exp - 1) + i);
        for k in 0..items - 1 {
            let m = (b[k] + b[k + 1]) / 2.0;
            data.push(scale * m as f64);
            data.push(-scale * m as f64);
        }
    }
    data.push(0.0);
    data.push(1.0);
    let mut v: Vec<f32> = data.into_iter().map(|x| x as f32).collect();
    v.resize(256, 0.0);
    v.sort_by(|a, b| a.total_cmp(b));
    v
}

/// Blockwise absmax quantization of `data` to the nearest entry of the sorted `code`: returns the
/// code indices and one absmax per block (the last block may be short).
pub fn quantize_blockwise(data: &[f32], code: &[f32], blocksize: usize) -> (Vec<u8>, Vec<f32>) {
    let bounds: Vec<f32> = code.windows(2).map(|w| (w[0] + w[1]) / 2.0).collect();
    let mut q = Vec::with_capacity(data.len());
    let mut absmax = Vec::with_capacity(data.len().div_ceil(blocksize.max(1)));
    for block in data.chunks(blocksize.max(1)) {
        let am = block.iter().fold(0f32, |a, v| a.max(v.abs()));
        absmax.push(am);
        let full = block.len() == blocksize;
        let am = am.max(1e-38);
        let inv = 1.0 / am;
        for &v in block {
            let s = if full { v * inv } else { v / am }.clamp(-1.0, 1.0);
            // torch.bucketize (right=False): the number of bounds strictly below s.
            q.push(bounds.partition_point(|b| *b < s) as u8);
        }
    }
    (q, absmax)
}

/// How far a quantized weight is from the dense one.
#[derive(Debug, Clone, Copy, Default, PartialEq, serde::Serialize)]
pub struct RoundingError {
    /// Largest absolute difference.
    pub max_abs: f64,
    /// Root mean square difference.
    pub rms: f64,
    /// ‖Q − W‖_F / ‖W‖_F.
    pub rel_fro: f64,
}

impl RoundingError {
    /// The error of `approx` against `exact` (same shape).
    pub fn between(exact: &Tensor, approx: &Tensor) -> Result<Self> {
        let e = exact
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let a = approx
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        if e.len() != a.len() {
            return Err(Error::Msg(format!(
                "rounding error: {:?} against {:?}",
                exact.dims(),
                approx.dims()
            )));
        }
        let (mut max_abs, mut se, mut sw) = (0f64, 0f64, 0f64);
        for (x, y) in e.iter().zip(&a) {
            let d = (*x as f64 - *y as f64).abs();
            max_abs = max_abs.max(d);
            se += d * d;
            sw += (*x as f64) * (*x as f64);
        }
        Ok(Self {
            max_abs,
            rms: (se / e.len().max(1) as f64).sqrt(),
            rel_fro: if sw > 0.0 {
                (se / sw).sqrt()
            } else {
                se.sqrt()
            },
        })
    }
}

/// How the per-block absmax values are stored.
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    /// One f32 per block.
    F32(Vec<f32>),
    /// Double quantization: `code[codes[i]] · nested_absmax[i / nested_blocksize] + offset`.
    Double {
        /// 8-bit codes, one per 4-bit block.
        codes: Vec<u8>,
        /// One f32 per nested block.
        nested_absmax: Vec<f32>,
        /// The 8-bit map (256 values).
        nested_code: Vec<f32>,
        /// The mean subtracted before quantizing.
        offset: f32,
        /// Nested block size (256).
        nested_blocksize: usize,
    },
}

/// A 4-bit NF4 weight with its quantization state.
#[derive(Debug, Clone, PartialEq)]
pub struct Nf4Tensor {
    /// Two codes per byte, the even element in the high nibble.
    pub packed: Vec<u8>,
    /// Per-block scales.
    pub absmax: Absmax,
    /// The 16-value code (`quant_map`).
    pub code: Vec<f32>,
    /// Shape of the original weight.
    pub shape: Vec<usize>,
    /// Elements per block.
    pub blocksize: usize,
    /// dtype name of the original weight (`float32`, `float16`, `bfloat16`).
    pub dtype: String,
}

impl Nf4Tensor {
    /// Quantizes `w` (any float dtype) to NF4 in blocks of `blocksize`, with double quantization
    /// of the absmax values when `double_quant`.
    pub fn quantize(w: &Tensor, blocksize: usize, double_quant: bool) -> Result<Self> {
        if blocksize == 0 {
            return Err(Error::Config("NF4 blocksize must be positive".into()));
        }
        let dtype = match w.dtype() {
            DType::F32 => "float32",
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            d => {
                return Err(Error::Config(format!(
                    "NF4 quantizes float weights, not {d:?}"
                )))
            }
        };
        let data = w.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
        let (mut q, absmax) = quantize_blockwise(&data, &NF4_CODE, blocksize);
        if q.len() % 2 == 1 {
            q.push(7); // bitsandbytes pads with a zero, which is code 7
        }
        let packed = q.chunks(2).map(|p| (p[0] << 4) | p[1]).collect();
        let absmax = if double_quant {
            let offset =
                (absmax.iter().map(|v| *v as f64).sum::<f64>() / absmax.len().max(1) as f64) as f32;
            let centred: Vec<f32> = absmax.iter().map(|v| v - offset).collect();
            let nested_code = dynamic_map();
            let (codes, nested_absmax) =
                quantize_blockwise(&centred, &nested_code, NESTED_BLOCKSIZE);
            Absmax::Double {
                codes,
                nested_absmax,
                nested_code,
                offset,
                nested_blocksize: NESTED_BLOCKSIZE,
            }
        } else {
            Absmax::F32(absmax)
        };
        Ok(Self {
            packed,
            absmax,
            code: NF4_CODE.to_vec(),
            shape: w.dims().to_vec(),
            blocksize,
            dtype: dtype.into(),
        })
    }

    /// Elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    /// Whether the weight has no elements.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The f32 absmax of every block (double quantization undone).
    pub fn absmax_f32(&self) -> Vec<f32> {
        match &self.absmax {
            Absmax::F32(v) => v.clone(),
            Absmax::Double {
                codes,
                nested_absmax,
                nested_code,
                offset,
                nested_blocksize,
            } => codes
                .iter()
                .enumerate()
                .map(|(i, &c)| {
                    nested_code[c as usize] * nested_absmax[i / (*nested_blocksize).max(1)] + offset
                })
                .collect(),
        }
    }

    /// Dequantizes elements `start..start + out.len()` (of the flattened weight) into `out`, with
    /// `absmax` from [`Self::absmax_f32`]: lets a matmul work block by block without a dense copy.
    pub fn dequantize_into(&self, absmax: &[f32], start: usize, out: &mut [f32]) {
        let bs = self.blocksize;
        if start % 2 != 0 || bs % 2 != 0 || bs == 0 || self.code.len() < 16 {
            for (k, o) in out.iter_mut().enumerate() {
                let i = start + k;
                let byte = self.packed[i / 2];
                let c = if i % 2 == 0 { byte >> 4 } else { byte & 0xF };
                *o = self.code[c as usize] * absmax[i / bs];
            }
            return;
        }
        // Whole bytes, one block (one scale) at a time.
        let mut i = start;
        let mut rest = &mut out[..];
        while !rest.is_empty() {
            let block_end = (i / bs + 1) * bs;
            let n = (block_end - i).min(rest.len());
            let (head, tail) = rest.split_at_mut(n);
            let scale = absmax[i / bs];
            let bytes = &self.packed[i / 2..(i + n).div_ceil(2)];
            for (pair, &byte) in head.chunks_mut(2).zip(bytes) {
                pair[0] = self.code[(byte >> 4) as usize] * scale;
                if let Some(second) = pair.get_mut(1) {
                    *second = self.code[(byte & 0xF) as usize] * scale;
                }
            }
            i += n;
            rest = tail;
        }
    }

    /// The dense f32 weight.
    pub fn dequantize(&self) -> Result<Tensor> {
        let absmax = self.absmax_f32();
        let mut out = vec![0f32; self.len()];
        self.dequantize_into(&absmax, 0, &mut out);
        Ok(Tensor::from_vec(out, self.shape.as_slice(), &Device::Cpu)?)
    }

    /// Bytes of storage (codes, scales, maps): about 0.5 + 4/64 per parameter, or 0.5 + 1/64 +
    /// 4/(64·256) with double quantization.
    pub fn storage_bytes(&self) -> usize {
        self.packed.len()
            + self.code.len() * 4
            + match &self.absmax {
                Absmax::F32(v) => v.len() * 4,
                Absmax::Double {
                    codes,
                    nested_absmax,
                    nested_code,
                    ..
                } => codes.len() + nested_absmax.len() * 4 + nested_code.len() * 4 + 4,
            }
    }
}
