//! Adapter initialisations: kaiming-uniform / gaussian (PEFT's defaults), PiSSA (exact SVD, or
//! randomized SVD with `niter` power iterations) and OLoRA (QR).
//!
//! PiSSA (Meng et al. 2024): W = U S Vᵀ; with S_r the top-r singular values divided by the LoRA scale s,
//! A = √S_r V_rᵀ, B = U_r √S_r, and the base becomes the residual W − s·B·A.
//! OLoRA (Büyükakyüz 2024): W = Q R; B = Q[:, :r], A = R[:r], residual W − s·B·A.

use crate::{Error, Result};
use candle_core::{DType, Device, Tensor};
use nalgebra::DMatrix;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// U(−bound, bound) with bound = 1/√fan_in: torch's `kaiming_uniform_(a=√5)`.
pub fn kaiming_uniform(shape: &[usize], fan_in: usize, rng: &mut ChaCha8Rng) -> Result<Tensor> {
    let bound = 1.0 / (fan_in as f64).sqrt();
    let n: usize = shape.iter().product();
    let v: Vec<f32> = (0..n)
        .map(|_| rng.random_range(-bound..bound) as f32)
        .collect();
    Ok(Tensor::from_vec(v, shape, &crate::util::device::current())?)
}

pub(crate) fn to_matrix(t: &Tensor) -> Result<DMatrix<f64>> {
    let (r, c) = t.dims2()?;
    let v = t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()?;
    Ok(DMatrix::from_row_slice(r, c, &v))
}

pub(crate) fn from_matrix(m: &DMatrix<f64>, device: &Device) -> Result<Tensor> {
    let (r, c) = m.shape();
    let mut v = Vec::with_capacity(r * c);
    for i in 0..r {
        for j in 0..c {
            v.push(m[(i, j)] as f32);
        }
    }
    Ok(Tensor::from_vec(v, (r, c), device)?)
}

/// Top-`r` singular triplets of `w` (out, in): (U_r (out, r), S_r, V_rᵀ (r, in)), exact.
pub fn svd_top(w: &Tensor, r: usize) -> Result<(DMatrix<f64>, Vec<f64>, DMatrix<f64>)> {
    let m = to_matrix(w)?;
    let svd = m.svd(true, true);
    let (u, vt) = match (svd.u, svd.v_t) {
        (Some(u), Some(v)) => (u, v),
        _ => return Err(Error::Msg("SVD did not converge".into())),
    };
    // nalgebra's `svd` sorts singular values in descending order.
    let k = r.min(svd.singular_values.len());
    let s: Vec<f64> = svd.singular_values.iter().take(k).copied().collect();
    Ok((u.columns(0, k).into_owned(), s, vt.rows(0, k).into_owned()))
}

fn orthonormalize(m: DMatrix<f64>) -> DMatrix<f64> {
    let cols = m.ncols();
    let q = m.qr().q();
    q.columns(0, cols.min(q.ncols())).into_owned()
}

/// Randomized SVD (Halko et al.), as `torch.svd_lowrank(W, q=r, niter)`: a Gaussian sketch of the range,
/// `niter` power iterations with re-orthonormalisation, then an exact SVD of the small projected matrix.
pub fn svd_lowrank(
    w: &Tensor,
    r: usize,
    niter: usize,
    rng: &mut ChaCha8Rng,
) -> Result<(DMatrix<f64>, Vec<f64>, DMatrix<f64>)> {
    let m = to_matrix(w)?;
    let (rows, cols) = m.shape();
    let q = r.min(rows).min(cols);
    let omega = DMatrix::<f64>::from_fn(cols, q, |_, _| StandardNormal.sample(rng));
    let mut y = orthonormalize(&m * omega);
    for _ in 0..niter {
        let z = orthonormalize(m.transpose() * &y);
        y = orthonormalize(&m * z);
    }
    let small = y.transpose() * &m; // (q, cols)
    let svd = small.svd(true, true);
    let (u, vt) = match (svd.u, svd.v_t) {
        (Some(u), Some(v)) => (u, v),
        _ => return Err(Error::Msg("SVD did not converge".into())),
    };
    let k = q.min(svd.singular_values.len());
    let s: Vec<f64> = svd.singular_values.iter().take(k).copied().collect();
    Ok((
        (y * u).columns(0, k).into_owned(),
        s,
        vt.rows(0, k).into_owned(),
    ))
}

/// PiSSA factors for `w` (out, in) at rank `r` and LoRA scale `scale`: (A (r, in), B (out, r), residual).
pub fn pissa(
    w: &Tensor,
    r: usize,
    scale: f64,
    niter: Option<usize>,
    rng: &mut ChaCha8Rng,
) -> Result<(Tensor, Tensor, Tensor)> {
    let (u, s, vt) = match niter {
        None => svd_top(w, r)?,
        Some(k) => svd_lowrank(w, r, k, rng)?,
    };
    let k = s.len();
    let sq: Vec<f64> = s.iter().map(|x| (x / scale).sqrt()).collect();
    let a = DMatrix::from_fn(k, vt.ncols(), |i, j| sq[i] * vt[(i, j)]);
    let b = DMatrix::from_fn(u.nrows(), k, |i, j| u[(i, j)] * sq[j]);
    residual(w, a, b, scale)
}

/// LoftQ (Li et al. 2023) as PEFT's `loftq_init` with 4 bits: starting from `res = W`, each round
/// quantizes `res` to NF4 (blocks of 64, no double quantization) giving `Q`, and takes the rank-r
/// SVD `L R` of `W − Q` (`L = U√S`, `R = √S Vᵀ`); between rounds `res = W − L R`. Returns
/// (A = R, B = L, Q dequantized). As in PEFT the factors are not divided by the LoRA scale, so
/// `Q + s·B A ≈ W` holds for `s = 1` (`lora_alpha = r`).
pub fn loftq(w: &Tensor, r: usize, iters: usize) -> Result<(Tensor, Tensor, Tensor)> {
    use crate::nn::nf4::{Nf4Tensor, BLOCKSIZE};
    let dev = w.device().clone();
    let w = w.to_dtype(DType::F32)?;
    let mut res = w.clone();
    let mut out = None;
    for i in 0..iters.max(1) {
        let q = Nf4Tensor::quantize(&res, BLOCKSIZE, false)?
            .dequantize()?
            .to_device(&dev)?;
        let (u, s, vt) = svd_top(&(&w - &q)?, r)?;
        let sq: Vec<f64> = s.iter().map(|x| x.sqrt()).collect();
        let k = sq.len();
        let a = from_matrix(
            &DMatrix::from_fn(k, vt.ncols(), |i, j| sq[i] * vt[(i, j)]),
            &dev,
        )?;
        let b = from_matrix(
            &DMatrix::from_fn(u.nrows(), k, |i, j| u[(i, j)] * sq[j]),
            &dev,
        )?;
        if i + 1 < iters {
            res = (&w - b.matmul(&a)?)?;
        }
        out = Some((a, b, q));
    }
    out.ok_or_else(|| Error::Msg("LoftQ: no iterations".into()))
}

/// OLoRA factors: (A = R[:r], B = Q[:, :r], residual).
pub fn olora(w: &Tensor, r: usize, scale: f64) -> Result<(Tensor, Tensor, Tensor)> {
    let m = to_matrix(w)?;
    let (rows, cols) = m.shape();
    let qr = m.qr();
    let (q, rr) = (qr.q(), qr.r());
    let k = r.min(rows).min(cols);
    let b = q.columns(0, k).into_owned();
    let a = rr.rows(0, k).into_owned();
    residual(w, a, b, scale)
}

fn residual(
    w: &Tensor,
    a: DMatrix<f64>,
    b: DMatrix<f64>,
    scale: f64,
) -> Result<(Tensor, Tensor, Tensor)> {
    let dev = w.device();
    let at = from_matrix(&a, dev)?;
    let bt = from_matrix(&b, dev)?;
    let wm = to_matrix(w)?;
    let res = wm - (&b * &a) * scale;
    Ok((at, bt, from_matrix(&res, dev)?.to_dtype(w.dtype())?))
}
