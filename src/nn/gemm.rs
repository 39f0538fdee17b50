//! f32 matrix products into buffers we own, through the `gemm` crate that candle's own CPU matmul
//! uses: `dst = [dst +] β·lhs·rhs` over strided views of slices. The fused nodes compute their
//! forward and backward with these, so that an output is written once (no zero-fill, no copy out of
//! a candle tensor) and a sum of products accumulates into one buffer.
//!
//! This is the crate's only `unsafe`: every view is checked to lie inside its slice before the call.

use candle_core::Result;

/// A strided `rows × cols` view of a slice: element (i, j) at `i·rs + j·cs`.
#[derive(Clone, Copy)]
pub struct Mat<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    rs: usize,
    cs: usize,
}

impl<'a> Mat<'a> {
    /// A row-major `rows × cols` matrix at the start of `data`.
    pub fn rm(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            rs: cols,
            cs: 1,
        }
    }

    /// A `rows × cols` view with row stride `rs` and column stride `cs` (a column block of a wider
    /// row-major matrix: `&data[c0..]` with `rs` its width).
    pub fn strided(data: &'a [f32], rows: usize, cols: usize, rs: usize, cs: usize) -> Self {
        Self {
            data,
            rows,
            cols,
            rs,
            cs,
        }
    }

    /// The transposed view (no copy).
    pub fn t(self) -> Self {
        Self {
            rows: self.cols,
            cols: self.rows,
            rs: self.cs,
            cs: self.rs,
            ..self
        }
    }

    fn check(&self, what: &str) -> Result<()> {
        let last = if self.rows == 0 || self.cols == 0 {
            0
        } else {
            (self.rows - 1) * self.rs + (self.cols - 1) * self.cs + 1
        };
        if last > self.data.len() {
            candle_core::bail!(
                "gemm: {what} view {}x{} (strides {}, {}) needs {last} values, the slice has {}",
                self.rows,
                self.cols,
                self.rs,
                self.cs,
                self.data.len()
            );
        }
        Ok(())
    }
}

/// How a product uses the threads: `Serial` inside a task that is itself one of many parallel
/// tasks, `Threads(n)` for one large product.
#[derive(Clone, Copy, Debug)]
pub enum Par {
    /// One thread.
    Serial,
    /// Split over `n` rayon threads.
    Threads(usize),
}

impl Par {
    /// All the current rayon pool's threads.
    pub fn all() -> Self {
        Par::Threads(rayon::current_num_threads().max(1))
    }
}

/// `dst = β·lhs·rhs` (`accumulate` false) or `dst += β·lhs·rhs` (true), `dst` row-major
/// `lhs.rows × rhs.cols`.
pub fn gemm_into(
    dst: &mut [f32],
    lhs: Mat,
    rhs: Mat,
    beta: f32,
    accumulate: bool,
    par: Par,
) -> Result<()> {
    gemm_strided(dst, false, lhs, rhs, beta, accumulate, par)
}

/// [`gemm_into`] with `dst` column-major (the row-major `rhs.cols × lhs.rows` transpose). The
/// `gemm` crate packs whichever operand ends up on the left of its column-major problem unless its
/// rows are unit-strided; for a product that contracts over both operands' contiguous dimension
/// (a weight gradient `G·Pᵀ` over pixels) a column-major destination puts the small operand there,
/// so the large one is read in place instead of copied with a strided gather.
pub fn gemm_into_cm(
    dst: &mut [f32],
    lhs: Mat,
    rhs: Mat,
    beta: f32,
    accumulate: bool,
    par: Par,
) -> Result<()> {
    gemm_strided(dst, true, lhs, rhs, beta, accumulate, par)
}

/// [`gemm_into`] into a column block of a wider row-major matrix: element (i, j) of the product
/// goes to `dst[i·ld + j]` (`dst` starts at the block's first element).
pub fn gemm_into_ld(
    dst: &mut [f32],
    ld: usize,
    lhs: Mat,
    rhs: Mat,
    beta: f32,
    accumulate: bool,
    par: Par,
) -> Result<()> {
    let (m, n) = (lhs.rows, rhs.cols);
    if ld < n || (m > 0 && n > 0 && (m - 1) * ld + n > dst.len()) {
        candle_core::bail!(
            "gemm: a {m}x{n} block with row stride {ld} does not fit {} values",
            dst.len()
        );
    }
    gemm_raw(dst, (1, ld as isize), lhs, rhs, beta, accumulate, par)
}

/// `dst += β·op(lhs)·op(rhs)` in place on tensors, where `op` transposes when asked (a view, no
/// copy): a sum of products accumulated into one buffer by the GEMM, for the fused nodes' input
/// gradients. `dst` must be a fresh tensor owned by the caller (not part of any graph); CPU f32,
/// every operand contiguous and 2-D.
pub fn gemm_acc(
    dst: &candle_core::Tensor,
    lhs: &candle_core::Tensor,
    lhs_t: bool,
    rhs: &candle_core::Tensor,
    rhs_t: bool,
    beta: f32,
) -> Result<()> {
    let (lr, lc) = lhs.dims2()?;
    let (rr, rc) = rhs.dims2()?;
    dst.inplace_op3(
        lhs,
        rhs,
        &GemmAcc {
            lhs: (lr, lc, lhs_t),
            rhs: (rr, rc, rhs_t),
            beta,
        },
    )
}

struct GemmAcc {
    lhs: (usize, usize, bool),
    rhs: (usize, usize, bool),
    beta: f32,
}

impl candle_core::InplaceOp3 for GemmAcc {
    fn name(&self) -> &'static str {
        "gemm-acc"
    }
    fn cpu_fwd(
        &self,
        d: &mut candle_core::CpuStorage,
        dl: &candle_core::Layout,
        a: &candle_core::CpuStorage,
        al: &candle_core::Layout,
        b: &candle_core::CpuStorage,
        bl: &candle_core::Layout,
    ) -> Result<()> {
        use super::kernels::f32_slice;
        let view = |s, (r, c, t): (usize, usize, bool)| {
            let m = Mat::rm(s, r, c);
            if t {
                m.t()
            } else {
                m
            }
        };
        let (a, b) = (
            view(f32_slice(a, al, "gemm-acc lhs")?, self.lhs),
            view(f32_slice(b, bl, "gemm-acc rhs")?, self.rhs),
        );
        let candle_core::CpuStorage::F32(d) = d else {
            candle_core::bail!("gemm-acc: f32 destination only")
        };
        let (Some((d0, d1)), true) = (dl.contiguous_offsets(), dl.dims() == [a.rows, b.cols])
        else {
            candle_core::bail!(
                "gemm-acc: a contiguous {}x{} destination, not {:?}",
                a.rows,
                b.cols,
                dl.dims()
            )
        };
        gemm_into(&mut d[d0..d1], a, b, self.beta, true, Par::all())
    }
}

fn gemm_strided(
    dst: &mut [f32],
    col_major: bool,
    lhs: Mat,
    rhs: Mat,
    beta: f32,
    accumulate: bool,
    par: Par,
) -> Result<()> {
    let (m, n) = (lhs.rows, rhs.cols);
    if dst.len() != m * n {
        candle_core::bail!(
            "gemm: ({m}x{}) · ({}x{n}) into {} values",
            lhs.cols,
            rhs.rows,
            dst.len()
        );
    }
    let strides = if col_major {
        (m as isize, 1)
    } else {
        (1, n as isize)
    };
    gemm_raw(dst, strides, lhs, rhs, beta, accumulate, par)
}

/// The product into `dst` with (column, row) strides `dst_s`; `dst` is checked by the callers.
fn gemm_raw(
    dst: &mut [f32],
    dst_s: (isize, isize),
    lhs: Mat,
    rhs: Mat,
    beta: f32,
    accumulate: bool,
    par: Par,
) -> Result<()> {
    let (m, k, n) = (lhs.rows, lhs.cols, rhs.cols);
    if rhs.rows != k {
        candle_core::bail!("gemm: ({m}x{k}) · ({}x{n})", rhs.rows);
    }
    lhs.check("left")?;
    rhs.check("right")?;
    if m == 0 || n == 0 {
        return Ok(());
    }
    if k == 0 {
        if !accumulate {
            for i in 0..m {
                for j in 0..n {
                    dst[i * dst_s.1 as usize + j * dst_s.0 as usize] = 0.0;
                }
            }
        }
        return Ok(());
    }
    let parallelism = match par {
        Par::Serial => gemm::Parallelism::None,
        Par::Threads(t) if t > 1 => gemm::Parallelism::Rayon(t),
        Par::Threads(_) => gemm::Parallelism::None,
    };
    // SAFETY: every element the product reads lies inside `lhs.data` / `rhs.data` (checked
    // above), every element it writes, (i, j) at i·dst_s.1 + j·dst_s.0, lies inside the exclusive
    // slice `dst` (checked by each caller), and no view aliases `dst`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.as_mut_ptr(),
            dst_s.0,
            dst_s.1,
            accumulate,
            lhs.data.as_ptr(),
            lhs.cs as isize,
            lhs.rs as isize,
            rhs.data.as_ptr(),
            rhs.cs as isize,
            rhs.rs as isize,
            1.0,
            beta,
            false,
            false,
            false,
            parallelism,
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
        let mut c = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                c[i * n + j] = (0..k).map(|p| a[i * k + p] * b[p * n + j]).sum();
            }
        }
        c
    }

    #[test]
    fn products_views_and_accumulation_match_a_plain_loop() {
        let (m, k, n) = (7, 13, 5);
        let a: Vec<f32> = (0..m * k)
            .map(|i| ((i * 37 % 11) as f32 - 5.0) / 3.0)
            .collect();
        let b: Vec<f32> = (0..k * n)
            .map(|i| ((i * 17 % 7) as f32 - 3.0) / 2.0)
            .collect();
        let want = naive(&a, &b, m, k, n);
        for par in [Par::Serial, Par::Threads(2)] {
            let mut c = vec![f32::NAN; m * n];
            gemm_into(
                &mut c,
                Mat::rm(&a, m, k),
                Mat::rm(&b, k, n),
                1.0,
                false,
                par,
            )
            .unwrap();
            for (x, y) in c.iter().zip(&want) {
                assert!((x - y).abs() < 1e-4, "{x} vs {y}");
            }
            // c += 2·a·b, with b given as the transpose of its transpose.
            let bt: Vec<f32> = (0..n * k).map(|i| b[(i % k) * n + i / k]).collect();
            gemm_into(
                &mut c,
                Mat::rm(&a, m, k),
                Mat::rm(&bt, n, k).t(),
                2.0,
                true,
                par,
            )
            .unwrap();
            for (x, y) in c.iter().zip(&want) {
                assert!((x - 3.0 * y).abs() < 1e-4, "{x} vs {}", 3.0 * y);
            }
        }
        // The column-major destination holds the transpose, for each thread split.
        for par in [Par::Serial, Par::Threads(2)] {
            let mut ct = vec![f32::NAN; m * n];
            gemm_into_cm(
                &mut ct,
                Mat::rm(&a, m, k),
                Mat::rm(&b, k, n),
                1.0,
                false,
                par,
            )
            .unwrap();
            for i in 0..m {
                for j in 0..n {
                    assert!((ct[j * m + i] - want[i * n + j]).abs() < 1e-4);
                }
            }
            gemm_into_cm(
                &mut ct,
                Mat::rm(&a, m, k),
                Mat::rm(&b, k, n),
                -1.0,
                true,
                par,
            )
            .unwrap();
            assert!(ct.iter().all(|x| x.abs() < 1e-4));
        }
        // A view that runs past its slice is refused, not read.
        let mut c = vec![0f32; m * n];
        assert!(gemm_into(
            &mut c,
            Mat::rm(&a[1..], m, k),
            Mat::rm(&b, k, n),
            1.0,
            false,
            Par::Serial
        )
        .is_err());
        assert!(gemm_into(
            &mut c[1..],
            Mat::rm(&a, m, k),
            Mat::rm(&b, k, n),
            1.0,
            false,
            Par::Serial
        )
        .is_err());
    }
}
