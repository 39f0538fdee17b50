//! Adapter file formats: PEFT folders (text and VLM models) and kohya / diffusers / LyCORIS single
//! files. Every adapter tensor read from a file goes through [`checked`]: a floating-point dtype and
//! finite values (unless [`crate::check::allow_nonfinite`]), with the file and key named.

mod lora_checks;
pub mod lora_file;
pub mod peft;

use crate::{Error, Result};
use candle_core::{DType, Tensor};
use std::path::Path;

/// `t` (tensor `key` of `file`) as f32, refused when its dtype is not a float (an integer `lora_A`
/// would be cast into weights of any size) or when it holds NaN/inf (unless
/// [`crate::check::allow_nonfinite`]).
pub fn checked(file: &Path, key: &str, t: &Tensor) -> Result<Tensor> {
    if !matches!(
        t.dtype(),
        DType::F16 | DType::BF16 | DType::F32 | DType::F64
    ) {
        return Err(Error::format(
            file,
            format!(
                "tensor `{key}` has dtype {:?}; adapter weights must be floating point",
                t.dtype()
            ),
        ));
    }
    let t = t.to_dtype(DType::F32)?;
    if !crate::check::allow_nonfinite() {
        let bad = non_finite_count(&t)?;
        if bad > 0 {
            return Err(Error::format(
                file,
                format!(
                    "tensor `{key}` {:?} has {bad} non-finite value(s) (NaN or inf) of {}; \
                     pass --allow-nonfinite to load it anyway",
                    t.dims(),
                    t.elem_count()
                ),
            ));
        }
    }
    Ok(t)
}

/// How many elements of an f32 tensor are NaN or ±inf.
pub fn non_finite_count(t: &Tensor) -> Result<usize> {
    let v = t.flatten_all()?.to_dtype(DType::F32)?.to_vec1::<f32>()?;
    Ok(v.iter().filter(|x| !x.is_finite()).count())
}
