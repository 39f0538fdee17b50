//! The whole LoRA conv layer (LoCon, PEFT's `Conv2d` LoRA) as one node:
//! `y = conv(x, W) + bias + s·conv1x1(conv(x, A), B)` for a frozen kernel `W` (o, c, kh, kw) and
//! trainable `A` (r, c, kh, kw), `B` (o, r, 1, 1).
//!
//! The base and `A` read the same patches, so each image is unfolded once per pass: forward
//! `Y = W·P (+ bias) ; H = A·P ; Y += s·B·H`, backward `Ĝ = s·Bᵀ·G ; dB = s·G·Hᵀ ; dA = Ĝ·Pᵀ ;
//! dP = Wᵀ·G + Aᵀ·Ĝ` folded back into dL/dx. Every product writes into a buffer the node owns (the
//! `gemm` crate, as candle's matmul), images run in parallel, and nothing is copied out of a candle
//! tensor: the composed path makes two unfoldings, a 1×1 conv, a scale, an add and a bias node per
//! pass, each with its own output-sized buffer. CPU, f32, groups 1, dilation 1; otherwise `None`
//! and the layer takes the composed path.

use super::conv::{col2im_plane, conv_out_size, im2col_plane, pointwise, ConvCfg};
use super::gemm::{gemm_into, gemm_into_cm, Mat, Par};
use super::kernels::{cpu_f32, f32_slice, FrozenParams};
use candle_core::{CpuStorage, DType, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;

#[derive(Clone, Copy)]
pub(super) struct Geom {
    pub(super) n: usize,
    pub(super) c: usize,
    pub(super) h: usize,
    pub(super) w: usize,
    pub(super) o: usize,
    pub(super) r: usize,
    pub(super) kh: usize,
    pub(super) kw: usize,
    pub(super) cfg: ConvCfg,
    /// oh·ow
    pub(super) p: usize,
}

impl Geom {
    /// The geometry of `conv(x, w) + bias` (r = 0), `None` where the nodes do not apply (device,
    /// dtype, groups, dilation, rank, or a kernel or bias that is itself trained), an error naming
    /// the shapes where they do not fit.
    pub(super) fn of(
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        cfg: ConvCfg,
    ) -> Result<Option<Self>> {
        let f32s = x.dtype() == DType::F32
            && w.dtype() == DType::F32
            && bias.is_none_or(|t| t.dtype() == DType::F32);
        if !x.device().is_cpu()
            || !f32s
            || cfg.groups != 1
            || cfg.dilation != 1
            || cfg.stride == 0
            || w.track_op()
            || bias.is_some_and(Tensor::track_op)
            || x.rank() != 4
            || w.rank() != 4
        {
            super::fallback::note(|| {
                let why = super::fallback::cpu_f32_miss(x)
                    .or_else(|| super::fallback::cpu_f32_miss(w))
                    .unwrap_or_else(|| format!("{cfg:?}, or a trained kernel"));
                ("conv2d".into(), why)
            });
            return Ok(None);
        }
        let (n, c, h, wd) = x.dims4()?;
        let (o, wc, kh, kw) = w.dims4()?;
        if wc != c || bias.is_some_and(|t| t.dims() != [o]) {
            candle_core::bail!(
                "conv2d: input {:?}, kernel {:?}, bias {:?} do not fit",
                x.dims(),
                w.dims(),
                bias.map(|t| t.dims().to_vec())
            );
        }
        if h + 2 * cfg.padding < kh || wd + 2 * cfg.padding < kw {
            candle_core::bail!(
                "conv2d: input {:?} is smaller than the kernel {:?} (padding {})",
                x.dims(),
                w.dims(),
                cfg.padding
            );
        }
        let p = conv_out_size(h, kh, cfg) * conv_out_size(wd, kw, cfg);
        Ok(Some(Self {
            n,
            c,
            h,
            w: wd,
            o,
            r: 0,
            kh,
            kw,
            cfg,
            p,
        }))
    }
    /// c·kh·kw
    pub(super) fn k(&self) -> usize {
        self.c * self.kh * self.kw
    }
    pub(super) fn point(&self) -> bool {
        pointwise(self.kh, self.kw, self.cfg)
    }
    pub(super) fn in_len(&self) -> usize {
        self.c * self.h * self.w
    }
    pub(super) fn out_shape(&self) -> Shape {
        Shape::from((
            self.n,
            self.o,
            conv_out_size(self.h, self.kh, self.cfg),
            conv_out_size(self.w, self.kw, self.cfg),
        ))
    }
    /// The patch matrix (k × p) of image `xi`: `xi` itself for a 1×1 conv, else unfolded into
    /// `cols`.
    pub(super) fn patches<'a>(&self, xi: &'a [f32], cols: &'a mut Vec<f32>) -> &'a [f32] {
        if self.point() {
            return xi;
        }
        let (plane, rows) = (self.h * self.w, self.kh * self.kw * self.p);
        cols.resize(self.k() * self.p, 0.0);
        for ch in 0..self.c {
            im2col_plane(
                &xi[ch * plane..(ch + 1) * plane],
                (self.h, self.w),
                self.kh,
                self.kw,
                self.cfg,
                &mut cols[ch * rows..(ch + 1) * rows],
            );
        }
        cols
    }
    /// How each image's products use the threads: serial when the images alone fill the
    /// threads, else threaded (images still run as parallel tasks).
    pub(super) fn par(&self) -> Par {
        if self.n >= rayon::current_num_threads().max(1) {
            Par::Serial
        } else {
            Par::all()
        }
    }
    /// `yi = W·P (+ bias)` for image `xi`; returns P for the products that follow.
    pub(super) fn base_product<'a>(
        &self,
        xi: &'a [f32],
        w: &[f32],
        bias: Option<&[f32]>,
        yi: &mut [f32],
        cols: &'a mut Vec<f32>,
    ) -> Result<&'a [f32]> {
        let pm = self.patches(xi, cols);
        if let Some(bv) = bias {
            for (row, v) in yi.chunks_mut(self.p).zip(bv) {
                row.fill(*v);
            }
        }
        let (k, p) = (self.k(), self.p);
        gemm_into(
            yi,
            Mat::rm(w, self.o, k),
            Mat::rm(pm, k, p),
            1.0,
            bias.is_some(),
            self.par(),
        )?;
        Ok(pm)
    }
    /// dL/dx of image i: `Wᵀ·G (+ Aᵀ·Ĝ)` folded back onto the input grid (`dxi` starts at zero).
    pub(super) fn input_grad(
        &self,
        gi: Mat,
        w: &[f32],
        lora: Option<(Mat, Mat)>,
        dxi: &mut [f32],
        dcols: &mut Vec<f32>,
    ) -> Result<()> {
        let (k, p, par) = (self.k(), self.p, self.par());
        let wt = Mat::rm(w, self.o, k).t();
        let dst: &mut [f32] = if self.point() {
            dxi
        } else {
            dcols.resize(k * p, 0.0);
            dcols
        };
        gemm_into(dst, wt, gi, 1.0, false, par)?;
        if let Some((am, ghm)) = lora {
            gemm_into(dst, am.t(), ghm, 1.0, true, par)?;
        }
        if !self.point() {
            let (plane, rows) = (self.h * self.w, self.kh * self.kw * p);
            for ch in 0..self.c {
                col2im_plane(
                    &dcols[ch * rows..(ch + 1) * rows],
                    (self.h, self.w),
                    self.kh,
                    self.kw,
                    self.cfg,
                    &mut dxi[ch * plane..(ch + 1) * plane],
                );
            }
        }
        Ok(())
    }
}

/// The f32 values of a CPU storage (the frozen kernel and bias the nodes hold).
/// `conv(x, w) + bias + scale·conv1x1(conv(x, a), b)` as one node (see the module doc), or `None`
/// where the node does not apply (device, dtype, groups, dilation, rank, or a kernel or bias
/// that is itself trained).
pub fn lora_conv2d(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
    cfg: ConvCfg,
) -> Result<Option<Tensor>> {
    if a.dtype() != DType::F32 || b.dtype() != DType::F32 || a.rank() != 4 || b.rank() != 4 {
        super::fallback::note(|| ("LoCon conv2d".into(), format!("factors {:?}", a.dtype())));
        return Ok(None);
    }
    let Some(mut g) = Geom::of(x, w, bias, cfg)? else {
        return Ok(None);
    };
    let r = a.dim(0)?;
    if a.dims() != [r, g.c, g.kh, g.kw] || b.dims() != [g.o, r, 1, 1] {
        candle_core::bail!(
            "lora_conv2d: input {:?}, kernel {:?}, A {:?}, B {:?} do not fit",
            x.dims(),
            w.dims(),
            a.dims(),
            b.dims()
        );
    }
    g.r = r;
    let op = LoraConvOp {
        g,
        frozen: FrozenParams::new(w, bias)?,
        scale: scale as f32,
        hidden: Mutex::new(None),
    };
    let (x, a, b) = (x.contiguous()?, a.contiguous()?, b.contiguous()?);
    Ok(Some(if x.track_op() || a.track_op() || b.track_op() {
        x.apply_op3_arc(&a, &b, std::sync::Arc::new(Box::new(op)))?
    } else {
        x.apply_op3_no_bwd(&a, &b, &op)?
    }))
}

struct LoraConvOp {
    g: Geom,
    frozen: FrozenParams,
    scale: f32,
    /// H = A·P per image (n, r, p), kept from the forward for dB.
    hidden: Mutex<Option<Vec<f32>>>,
}

fn poisoned() -> candle_core::Error {
    candle_core::Error::Msg("lora_conv2d: poisoned".into())
}

impl candle_core::CustomOp3 for LoraConvOp {
    fn name(&self) -> &'static str {
        "lora-conv2d"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        sa: &CpuStorage,
        la: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let g = self.g;
        let x = f32_slice(sx, lx, "lora_conv2d")?;
        let a = f32_slice(sa, la, "lora_conv2d")?;
        let b = f32_slice(sb, lb, "lora_conv2d")?;
        let (k, p, len, par) = (g.k(), g.p, g.in_len(), g.par());
        let mut y = vec![0f32; g.n * g.o * p];
        let mut hid = vec![0f32; g.n * g.r * p];
        self.frozen.with(|w, bias| {
            y.par_chunks_mut(g.o * p)
                .zip(hid.par_chunks_mut(g.r * p))
                .enumerate()
                .try_for_each_init(Vec::new, |cols, (i, (yi, hi))| {
                    let pm = g.base_product(&x[i * len..(i + 1) * len], w, bias, yi, cols)?;
                    gemm_into(hi, Mat::rm(a, g.r, k), Mat::rm(pm, k, p), 1.0, false, par)?;
                    gemm_into(
                        yi,
                        Mat::rm(b, g.o, g.r),
                        Mat::rm(hi, g.r, p),
                        self.scale,
                        true,
                        par,
                    )
                })
        })?;
        *self.hidden.lock().map_err(|_| poisoned())? = Some(hid);
        Ok((CpuStorage::F32(y), g.out_shape()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let g = self.g;
        let (k, p, len, s, par) = (g.k(), g.p, g.in_len(), self.scale, g.par());
        let want_x = x.track_op();
        let grad = grad.contiguous()?;
        let hidden = self.hidden.lock().map_err(|_| poisoned())?;
        let Some(hid) = hidden.as_ref() else {
            candle_core::bail!("lora_conv2d: backward before forward")
        };
        let (gs, gl) = grad.storage_and_layout();
        let gy = cpu_f32(&gs, gl)?;
        let (xs, xl) = x.storage_and_layout();
        let xv = cpu_f32(&xs, xl)?;
        let (as_, al) = a.storage_and_layout();
        let am = Mat::rm(cpu_f32(&as_, al)?, g.r, k);
        let (bs, bl) = b.storage_and_layout();
        let bm = Mat::rm(cpu_f32(&bs, bl)?, g.o, g.r);
        // Per-image shares of dA and dB, summed in image order afterwards (reproducible).
        let mut da_parts = vec![0f32; g.n * g.r * k];
        let mut db_parts = vec![0f32; g.n * g.o * g.r];
        let dx_len = if want_x { len } else { 1 };
        let mut dx = vec![0f32; g.n * dx_len];
        self.frozen.with(|w, _| {
            da_parts
                .par_chunks_mut(g.r * k)
                .zip(db_parts.par_chunks_mut(g.o * g.r))
                .zip(dx.par_chunks_mut(dx_len))
                .enumerate()
                .try_for_each_init(
                    || {
                        (
                            Vec::new(),
                            Vec::new(),
                            vec![0f32; g.r * p],
                            vec![0f32; g.r * k],
                        )
                    },
                    |(cols, dcols, gh, dat), (i, ((da, db), dxi))| {
                        let gi = Mat::rm(&gy[i * g.o * p..(i + 1) * g.o * p], g.o, p);
                        let hi = Mat::rm(&hid[i * g.r * p..(i + 1) * g.r * p], g.r, p);
                        // Ĝ = s·Bᵀ·G ; dB_i = s·G·Hᵀ ; dA_i = Ĝ·Pᵀ
                        gemm_into(gh, bm.t(), gi, s, false, par)?;
                        gemm_into(db, gi, hi.t(), s, false, par)?;
                        let pm = g.patches(&xv[i * len..(i + 1) * len], cols);
                        let ghm = Mat::rm(gh, g.r, p);
                        // dA_i column-major (the patches are read in place, not gathered),
                        // then transposed (r·k values).
                        gemm_into_cm(dat, ghm, Mat::rm(pm, k, p).t(), 1.0, false, par)?;
                        for (ri, row) in da.chunks_exact_mut(k).enumerate() {
                            for (kk, v) in row.iter_mut().enumerate() {
                                *v = dat[kk * g.r + ri];
                            }
                        }
                        if want_x {
                            g.input_grad(gi, w, Some((am, ghm)), dxi, dcols)?;
                        }
                        Ok(())
                    },
                )
        })?;
        let sum_parts = |parts: Vec<f32>, len: usize| -> Vec<f32> {
            let mut it = parts.chunks(len);
            let mut acc = it.next().map(<[f32]>::to_vec).unwrap_or_default();
            for part in it {
                acc.iter_mut().zip(part).for_each(|(s, v)| *s += *v);
            }
            acc
        };
        let da = Tensor::from_vec(
            sum_parts(da_parts, g.r * k),
            (g.r, g.c, g.kh, g.kw),
            &Device::Cpu,
        )?;
        let db = Tensor::from_vec(
            sum_parts(db_parts, g.o * g.r),
            (g.o, g.r, 1, 1),
            &Device::Cpu,
        )?;
        let dx = if want_x {
            Some(Tensor::from_vec(dx, (g.n, g.c, g.h, g.w), &Device::Cpu)?)
        } else {
            None
        };
        Ok((dx, Some(da), Some(db)))
    }
}

/// `conv(x, w) + bias` for a frozen kernel and bias as one node, with the same per-image
/// products as [`lora_conv2d`]; its backward gives dL/dx only. `None` where the node does not
/// apply (the caller takes the composed frozen path).
pub fn frozen_conv2d_bias(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    cfg: ConvCfg,
) -> Result<Option<Tensor>> {
    let Some(g) = Geom::of(x, w, bias, cfg)? else {
        return Ok(None);
    };
    let op = FrozenConvOp {
        g,
        frozen: FrozenParams::new(w, bias)?,
    };
    let x = x.contiguous()?;
    Ok(Some(if x.track_op() {
        x.apply_op1_arc(std::sync::Arc::new(Box::new(op)))?
    } else {
        x.apply_op1_no_bwd(&op)?
    }))
}

struct FrozenConvOp {
    g: Geom,
    frozen: FrozenParams,
}

impl candle_core::CustomOp1 for FrozenConvOp {
    fn name(&self) -> &'static str {
        "frozen-conv2d-bias"
    }

    fn cpu_fwd(&self, sx: &CpuStorage, lx: &Layout) -> Result<(CpuStorage, Shape)> {
        let g = self.g;
        let x = f32_slice(sx, lx, "conv2d")?;
        let len = g.in_len();
        let mut y = vec![0f32; g.n * g.o * g.p];
        self.frozen.with(|w, bias| {
            y.par_chunks_mut(g.o * g.p)
                .enumerate()
                .try_for_each_init(Vec::new, |cols, (i, yi)| {
                    g.base_product(&x[i * len..(i + 1) * len], w, bias, yi, cols)
                        .map(|_| ())
                })
        })?;
        Ok((CpuStorage::F32(y), g.out_shape()))
    }

    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        let g = self.g;
        let (p, len) = (g.p, g.in_len());
        let grad = grad.contiguous()?;
        let (gs, gl) = grad.storage_and_layout();
        let gy = cpu_f32(&gs, gl)?;
        let mut dx = vec![0f32; g.n * len];
        self.frozen.with(|w, _| {
            dx.par_chunks_mut(len)
                .enumerate()
                .try_for_each_init(Vec::new, |dcols, (i, dxi)| {
                    let gi = Mat::rm(&gy[i * g.o * p..(i + 1) * g.o * p], g.o, p);
                    g.input_grad(gi, w, None, dxi, dcols)
                })
        })?;
        Ok(Some(Tensor::from_vec(
            dx,
            (g.n, g.c, g.h, g.w),
            &Device::Cpu,
        )?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    fn randn(shape: &[usize], seed: u64, std: f64) -> Tensor {
        let mut rng = crate::rng::rng_for(seed, "lora-conv-test");
        crate::rng::normal(shape, std, &mut rng).unwrap()
    }

    /// The composed reference: candle's conv2d for the base, A and B, a broadcast bias.
    fn composed(
        x: &Tensor,
        w: &Tensor,
        bias: Option<&Tensor>,
        a: &Tensor,
        b: &Tensor,
        s: f64,
        cfg: ConvCfg,
    ) -> Tensor {
        let y = x.conv2d(w, cfg.padding, cfg.stride, 1, 1).unwrap();
        let y = match bias {
            Some(bb) => y
                .broadcast_add(&bb.reshape((1, (), 1, 1)).unwrap())
                .unwrap(),
            None => y,
        };
        let hh = x.conv2d(a, cfg.padding, cfg.stride, 1, 1).unwrap();
        (y + (hh.conv2d(b, 0, 1, 1, 1).unwrap() * s).unwrap()).unwrap()
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .flatten_all()
            .unwrap()
            .max(0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    #[test]
    fn the_fused_locon_node_matches_the_composed_layer_in_value_and_every_gradient() {
        // (batch, c, o, r, h, w, k, stride, padding, bias): 3×3 same, strided downsampler,
        // 1×1 shortcut, one image (threaded products), odd sizes.
        let cases = [
            (3, 4, 6, 2, 8, 8, 3, 1, 1, true),
            (2, 5, 3, 3, 9, 7, 3, 2, 1, true),
            (4, 6, 5, 2, 5, 6, 1, 1, 0, false),
            (1, 3, 4, 2, 6, 6, 3, 1, 1, false),
            (3, 2, 3, 1, 4, 5, 3, 1, 0, true),
        ];
        for (ci, &(n, c, o, r, h, wd, k, stride, padding, with_bias)) in cases.iter().enumerate() {
            let cfg = ConvCfg {
                padding,
                stride,
                dilation: 1,
                groups: 1,
            };
            let seed = ci as u64 * 10;
            let x = Var::from_tensor(&randn(&[n, c, h, wd], seed, 1.0)).unwrap();
            let w = randn(&[o, c, k, k], seed + 1, 0.3);
            let bias = with_bias.then(|| randn(&[o], seed + 2, 0.5));
            let a = Var::from_tensor(&randn(&[r, c, k, k], seed + 3, 0.3)).unwrap();
            let b = Var::from_tensor(&randn(&[o, r, 1, 1], seed + 4, 0.3)).unwrap();
            let (xt, at, bt) = (x.as_tensor(), a.as_tensor(), b.as_tensor());
            let fused = lora_conv2d(xt, &w, bias.as_ref(), at, bt, 0.75, cfg)
                .unwrap()
                .expect("CPU f32 takes the fused node");
            let want = composed(xt, &w, bias.as_ref(), at, bt, 0.75, cfg);
            // Every gradient close and non-zero; the frozen kernel gets nothing.
            let asked = [("x", &x), ("A", &a), ("B", &b)];
            crate::nn::test_util::compare(&fused, &want, &asked, &[], &[&w], seed + 5);
        }
    }

    #[test]
    fn the_frozen_conv_node_matches_candle_in_value_and_input_gradient() {
        for (ci, &(n, c, o, h, wd, k, stride, padding, with_bias)) in [
            (3, 4, 6, 8, 8, 3, 1, 1, true),
            (2, 5, 3, 9, 7, 3, 2, 1, false),
            (4, 6, 5, 5, 6, 1, 1, 0, true),
            (1, 3, 4, 6, 6, 3, 1, 1, true),
        ]
        .iter()
        .enumerate()
        {
            let cfg = ConvCfg {
                padding,
                stride,
                dilation: 1,
                groups: 1,
            };
            let seed = 100 + ci as u64 * 10;
            let x = Var::from_tensor(&randn(&[n, c, h, wd], seed, 1.0)).unwrap();
            let w = randn(&[o, c, k, k], seed + 1, 0.3);
            let bias = with_bias.then(|| randn(&[o], seed + 2, 0.5));
            let fused = frozen_conv2d_bias(x.as_tensor(), &w, bias.as_ref(), cfg)
                .unwrap()
                .unwrap();
            let y = x.as_tensor().conv2d(&w, padding, stride, 1, 1).unwrap();
            let want = match &bias {
                Some(bb) => y
                    .broadcast_add(&bb.reshape((1, (), 1, 1)).unwrap())
                    .unwrap(),
                None => y,
            };
            let frozen: Vec<&Tensor> = [Some(&w), bias.as_ref()].into_iter().flatten().collect();
            crate::nn::test_util::compare(&fused, &want, &[("x", &x)], &[], &frozen, seed + 5);
        }
    }

    #[test]
    fn without_gradients_it_records_no_graph_and_gives_the_same_values() {
        let cfg = ConvCfg {
            padding: 1,
            stride: 1,
            dilation: 1,
            groups: 1,
        };
        let x = randn(&[2, 3, 6, 6], 1, 1.0);
        let w = randn(&[4, 3, 3, 3], 2, 0.3);
        let a = randn(&[2, 3, 3, 3], 3, 0.3);
        let b = randn(&[4, 2, 1, 1], 4, 0.3);
        let y = lora_conv2d(&x, &w, None, &a, &b, 2.0, cfg)
            .unwrap()
            .unwrap();
        assert!(!y.track_op());
        assert!(max_diff(&y, &composed(&x, &w, None, &a, &b, 2.0, cfg)) < 1e-4);
    }

    #[test]
    fn unsupported_calls_fall_back_and_misfits_name_the_shapes() {
        let x = randn(&[1, 3, 6, 6], 1, 1.0);
        let w = randn(&[4, 3, 3, 3], 2, 0.3);
        let a = randn(&[2, 3, 3, 3], 3, 0.3);
        let b = randn(&[4, 2, 1, 1], 4, 0.3);
        let dil = ConvCfg {
            padding: 2,
            stride: 1,
            dilation: 2,
            groups: 1,
        };
        assert!(lora_conv2d(&x, &w, None, &a, &b, 1.0, dil)
            .unwrap()
            .is_none());
        let x16 = x.to_dtype(DType::F16).unwrap();
        assert!(lora_conv2d(&x16, &w, None, &a, &b, 1.0, ConvCfg::default())
            .unwrap()
            .is_none());
        let bad_b = randn(&[5, 2, 1, 1], 4, 0.3);
        let err = lora_conv2d(&x, &w, None, &a, &bad_b, 1.0, ConvCfg::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("[5, 2, 1, 1]") && err.contains("[4, 3, 3, 3]"),
            "{err}"
        );
    }
}
