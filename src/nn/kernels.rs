//! Scalar and row kernels shared by the ops: vectorizable `exp`/`erf`, row maxima and shifted
//! exponentials, the parallel split of row-wise work, and the checks that give an op its f32 slice.

use candle_core::{CpuStorage, Layout, Result, Tensor};

/// `exp(x)` for f32 in a form the compiler vectorizes (libm's `expf` is a scalar call): Cody–Waite
/// reduction `x = k·ln2 + r`, |r| ≤ ln2/2, a degree-6 Taylor polynomial for `e^r` (relative error
/// below 2e-7, about one ulp), and `2^k` built in the exponent bits. Inputs below −87.3 give 0,
/// above 88.3 are clamped (softmax inputs are ≤ 0 after the max shift).
#[inline(always)]
pub fn fast_exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2^23: adding and subtracting rounds to an integer
                                     // max/min rather than clamp, and 2^k from the rounding sum's mantissa bits rather than a
                                     // float-to-int cast: both keep the loop vectorized (3.5× faster than the cast form).
    let xc = x.max(-87.3).min(88.3);
    let kr = xc * LOG2E + ROUND;
    let k = kr - ROUND;
    let r = xc - k * LN2_HI - k * LN2_LO;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    // kr = 1.5·2^23 + k exactly (|k| ≤ 127 keeps the exponent), so its low bits are k.
    let scale = f32::from_bits(kr.to_bits().wrapping_sub(ROUND.to_bits()).wrapping_add(127) << 23);
    let y = if x < -87.3 { 0.0 } else { p * scale };
    // NaN in, NaN out (max/min alone would turn it into a number).
    if x.is_nan() {
        x
    } else {
        y
    }
}

/// The largest value of a row (vectorizable: 16 running maxima).
pub(super) fn row_max(x: &[f32]) -> f32 {
    let mut acc = [f32::NEG_INFINITY; 16];
    let chunks = x.chunks_exact(16);
    let rem = chunks.remainder();
    for c in chunks {
        for i in 0..16 {
            acc[i] = if c[i] > acc[i] { c[i] } else { acc[i] };
        }
    }
    let mut m = acc.iter().fold(f32::NEG_INFINITY, |a, b| a.max(*b));
    for v in rem {
        m = m.max(*v);
    }
    m
}

/// `o_k = exp(x_k − m)` for a row, returning Σ o_k (16 running sums, so it vectorizes).
pub(super) fn exp_shifted_into(x: &[f32], m: f32, o: &mut [f32]) -> f32 {
    let mut acc = [0f32; 16];
    let n = x.len() - x.len() % 16;
    for (oc, xc) in o[..n].chunks_exact_mut(16).zip(x[..n].chunks_exact(16)) {
        for i in 0..16 {
            let e = fast_exp(xc[i] - m);
            oc[i] = e;
            acc[i] += e;
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (oo, xx) in o[n..].iter_mut().zip(&x[n..]) {
        *oo = fast_exp(*xx - m);
        s += *oo;
    }
    s
}

/// `v_k = exp(v_k − m)` in place, returning Σ v_k (16 running sums, so it vectorizes: a single
/// running sum would keep `exp` scalar).
pub(super) fn exp_shifted_in_place(v: &mut [f32], m: f32) -> f32 {
    let mut acc = [0f32; 16];
    let mut chunks = v.chunks_exact_mut(16);
    for c in &mut chunks {
        for i in 0..16 {
            let e = fast_exp(c[i] - m);
            c[i] = e;
            acc[i] += e;
        }
    }
    let mut s: f32 = acc.iter().sum();
    for x in chunks.into_remainder() {
        *x = fast_exp(*x - m);
        s += *x;
    }
    s
}

/// Rows per parallel task for row-wise kernels (enough work per task to amortise scheduling).
pub(super) fn rows_per_task(rows: usize, d: usize) -> usize {
    (16384 / d.max(1)).clamp(1, rows.max(1))
}

/// `erf(x)` in a vectorizable form (Abramowitz & Stegun 7.1.26 with [`fast_exp`]): absolute error
/// below 1e-6 in f32 (1.5e-7 in exact arithmetic), against libm's scalar `erff`.
#[inline(always)]
pub fn fast_erf(x: f32) -> f32 {
    const P: f32 = 0.327_591_1;
    const A: [f32; 5] = [
        0.254_829_6,
        -0.284_496_74,
        1.421_413_7,
        -1.453_152_1,
        1.061_405_4,
    ];
    let ax = x.abs();
    let t = 1.0 / (1.0 + P * ax);
    let poly = t * (A[0] + t * (A[1] + t * (A[2] + t * (A[3] + t * A[4]))));
    let y = 1.0 - poly * fast_exp(-ax * ax);
    if x < 0.0 {
        -y
    } else {
        y
    }
}

#[cfg(test)]
mod fast_exp_tests {
    use super::fast_exp;

    #[test]
    fn fast_exp_is_within_two_ulps_of_libm() {
        let mut worst = 0f64;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (a, b) = (fast_exp(x) as f64, (x as f64).exp());
            worst = worst.max(((a - b) / b).abs());
            x += 0.0137;
        }
        assert!(worst < 3e-7, "relative error {worst:e}");
        assert_eq!(fast_exp(-1e30), 0.0);
        assert_eq!(fast_exp(0.0), 1.0);
        assert!(fast_exp(1e30).is_finite());
        assert!(fast_exp(f32::NAN).is_nan());
        assert_eq!(fast_exp(f32::NEG_INFINITY), 0.0);
    }

    #[test]
    fn fast_erf_is_within_1e_6_of_libm() {
        let mut worst = 0f32;
        let mut x = -6.0f32;
        while x < 6.0 {
            worst = worst.max((super::fast_erf(x) - libm::erff(x)).abs());
            x += 0.00731;
        }
        assert!(worst < 1e-6, "absolute error {worst:e}");
    }
}

pub(super) const ROWS: usize = 64;

pub(crate) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("{what}: needs contiguous f32"),
    }
}

/// The f32 values of a contiguous CPU tensor's storage.
pub(super) fn cpu_f32<'a>(s: &'a candle_core::Storage, l: &Layout) -> Result<&'a [f32]> {
    match s {
        candle_core::Storage::Cpu(c) => f32_slice(c, l, "frozen op"),
        _ => candle_core::bail!("frozen op: CPU only"),
    }
}

/// The frozen weight (or kernel) and bias of a node, read for one pass.
pub(super) struct FrozenParams {
    w: Tensor,
    bias: Option<Tensor>,
}

impl FrozenParams {
    pub(super) fn new(w: &Tensor, bias: Option<&Tensor>) -> Result<Self> {
        Ok(Self {
            w: w.detach().contiguous()?,
            bias: bias.map(|t| t.detach().contiguous()).transpose()?,
        })
    }
    /// Runs `f` on the kernel's and the bias's values.
    pub(super) fn with<R>(&self, f: impl FnOnce(&[f32], Option<&[f32]>) -> Result<R>) -> Result<R> {
        let (ws, wl) = self.w.storage_and_layout();
        let bguard = self.bias.as_ref().map(|t| t.storage_and_layout());
        let bias = match &bguard {
            Some((s, l)) => Some(cpu_f32(s, l)?),
            None => None,
        };
        f(cpu_f32(&ws, wl)?, bias)
    }
}

pub(super) fn check_rank(x: &Tensor, what: &str) -> Result<()> {
    if x.rank() == 0 {
        candle_core::bail!("{what}: the input must have at least one dimension (features last)");
    }
    Ok(())
}
