//! conv2d as im2col + GEMM with a backward written as GEMMs (and a frozen-kernel form that gives only
//! dL/dx, a transposed convolution), and the parallel per-channel bias node.

use super::frozen::{attach, take_result};
use super::kernels::{f32_slice, ROWS};
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

/// Convolution settings of a conv2d layer (symmetric, as candle supports).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConvCfg {
    /// Padding on each side.
    pub padding: usize,
    /// Stride.
    pub stride: usize,
    /// Dilation.
    pub dilation: usize,
    /// Groups.
    pub groups: usize,
}

impl Default for ConvCfg {
    fn default() -> Self {
        Self {
            padding: 0,
            stride: 1,
            dilation: 1,
            groups: 1,
        }
    }
}

/// conv2d of `x` (b, c, h, w) with a frozen kernel `w` (out, c/groups, kh, kw). Backward gives only dL/dx.
pub fn frozen_conv2d(x: &Tensor, w: &Tensor, cfg: ConvCfg) -> Result<Tensor> {
    if x.device().is_cpu()
        && cfg.groups == 1
        && x.dtype() == candle_core::DType::F32
        && x.rank() == 4
    {
        // One node over owned buffers (`lora_conv`), else GEMMs over im2col patches (see
        // [`conv2d`]); input gradient only either way.
        if let Some(y) = super::lora_conv::frozen_conv2d_bias(x, &w.detach(), None, cfg)? {
            return Ok(y);
        }
        return conv2d(x, &w.detach(), cfg, false);
    }
    if x.track_op() && (!x.device().is_cpu() || cfg.groups != 1) {
        return x.conv2d(
            &w.detach(),
            cfg.padding,
            cfg.stride,
            cfg.dilation,
            cfg.groups,
        );
    }
    let y = x
        .detach()
        .conv2d(w, cfg.padding, cfg.stride, cfg.dilation, cfg.groups)?;
    let w2 = w.clone();
    let in_h = x.dim(2)?;
    let in_w = x.dim(3)?;
    attach(x, y, "frozen-conv2d", move |g| {
        // The full transposed convolution (no cropping), zero-extended where the strided forward
        // never reached, then cropped by the padding: exact for any input size, stride and padding.
        let full = g.conv_transpose2d(&w2, 0, 0, cfg.stride, cfg.dilation)?;
        let (fh, fw) = (full.dim(2)?, full.dim(3)?);
        let (ph, pw) = (in_h + 2 * cfg.padding, in_w + 2 * cfg.padding);
        let full = full
            .pad_with_zeros(2, 0, ph.saturating_sub(fh))?
            .pad_with_zeros(3, 0, pw.saturating_sub(fw))?;
        full.narrow(2, cfg.padding, in_h)?
            .narrow(3, cfg.padding, in_w)
    })
}

/// Output size of a conv along one axis.
pub(super) fn conv_out_size(n: usize, k: usize, cfg: ConvCfg) -> usize {
    (n + 2 * cfg.padding).saturating_sub(cfg.dilation * (k - 1) + 1) / cfg.stride + 1
}

/// The output positions `o` in `0..on` whose input index `o·stride + k·dilation − padding` falls
/// inside `0..n`, and that input index for the first of them.
fn valid_range(on: usize, n: usize, k: usize, cfg: ConvCfg) -> (usize, usize) {
    let off = (k * cfg.dilation) as isize - cfg.padding as isize;
    let s = cfg.stride as isize;
    // first o with o·s + off >= 0
    let lo = if off >= 0 {
        0
    } else {
        ((-off + s - 1) / s) as usize
    };
    // last o with o·s + off <= n − 1
    let hi = if (n as isize - 1 - off) < 0 {
        0
    } else {
        (((n as isize - 1 - off) / s) as usize + 1).min(on)
    };
    (lo.min(hi), hi)
}

/// The kernel taps of a conv over an h×w plane: for tap `ky·kw + kx`, calls `f(tap, y0..y1, x0..x1,
/// start)` with the output rows and columns whose input lies inside the plane, where `start(oy)` is
/// the input index of output (oy, x0) and consecutive outputs step `cfg.stride` in the input.
fn for_each_tap(
    (h, w): (usize, usize),
    kh: usize,
    kw: usize,
    cfg: ConvCfg,
    mut f: impl FnMut(usize, std::ops::Range<usize>, std::ops::Range<usize>, &dyn Fn(usize) -> usize),
) {
    let (oh, ow) = (conv_out_size(h, kh, cfg), conv_out_size(w, kw, cfg));
    for ky in 0..kh {
        let (y0, y1) = valid_range(oh, h, ky, cfg);
        for kx in 0..kw {
            let (x0, x1) = valid_range(ow, w, kx, cfg);
            let start = |oy: usize| {
                (oy * cfg.stride + ky * cfg.dilation - cfg.padding) * w
                    + (x0 * cfg.stride + kx * cfg.dilation - cfg.padding)
            };
            f(ky * kw + kx, y0..y1, x0..x1, &start);
        }
    }
}

/// One channel plane `src` (h·w) into its kh·kw patch rows of oh·ow values each (`dst`, every
/// value written: zeros where the kernel reads padding).
pub(super) fn im2col_plane(
    src: &[f32],
    (h, w): (usize, usize),
    kh: usize,
    kw: usize,
    cfg: ConvCfg,
    dst: &mut [f32],
) {
    let (oh, ow) = (conv_out_size(h, kh, cfg), conv_out_size(w, kw, cfg));
    let s = cfg.stride;
    for_each_tap((h, w), kh, kw, cfg, |tap, ys, xs, start| {
        let row = &mut dst[tap * oh * ow..(tap + 1) * oh * ow];
        // Padding rows and columns are zero; the rest is copied.
        row[..ys.start * ow].fill(0.0);
        row[ys.end * ow..].fill(0.0);
        for oy in ys {
            let line = &mut row[oy * ow..(oy + 1) * ow];
            line[..xs.start].fill(0.0);
            line[xs.end..].fill(0.0);
            let (d, i0) = (&mut line[xs.clone()], start(oy));
            if s == 1 {
                d.copy_from_slice(&src[i0..i0 + d.len()]);
            } else {
                d.iter_mut()
                    .enumerate()
                    .for_each(|(j, v)| *v = src[i0 + j * s]);
            }
        }
    });
}

/// The adjoint of [`im2col_plane`]: adds the kh·kw patch rows `src` back into the plane `dst`
/// (h·w), rows in a fixed order (reproducible).
pub(super) fn col2im_plane(
    src: &[f32],
    (h, w): (usize, usize),
    kh: usize,
    kw: usize,
    cfg: ConvCfg,
    dst: &mut [f32],
) {
    let (oh, ow) = (conv_out_size(h, kh, cfg), conv_out_size(w, kw, cfg));
    let s = cfg.stride;
    for_each_tap((h, w), kh, kw, cfg, |tap, ys, xs, start| {
        let row = &src[tap * oh * ow..(tap + 1) * oh * ow];
        for oy in ys {
            let (r, i0) = (&row[oy * ow + xs.start..oy * ow + xs.end], start(oy));
            if s == 1 {
                dst[i0..i0 + r.len()]
                    .iter_mut()
                    .zip(r)
                    .for_each(|(d, v)| *d += v);
            } else {
                r.iter().enumerate().for_each(|(j, v)| dst[i0 + j * s] += v);
            }
        }
    });
}

/// im2col in the "channels × positions" layout: (b, c, h, w) → (b, c·kh·kw, oh·ow), so that
/// `W (o, c·kh·kw) · cols[b]` is the output of image `b` already in (o, oh·ow) order.
struct Im2ColT {
    kh: usize,
    kw: usize,
    cfg: ConvCfg,
}

impl candle_core::CustomOp1 for Im2ColT {
    fn name(&self) -> &'static str {
        "im2col"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let x = f32_slice(s, l, "im2col")?;
        let (b, c, h, w) = l.shape().dims4()?;
        let (kh, kw, cfg) = (self.kh, self.kw, self.cfg);
        let (oh, ow) = (conv_out_size(h, kh, cfg), conv_out_size(w, kw, cfg));
        let ohw = oh * ow;
        let mut out = vec![0f32; b * c * kh * kw * ohw];
        // One (image, channel) plane per task: kh·kw rows of oh·ow values.
        out.par_chunks_mut(kh * kw * ohw)
            .enumerate()
            .for_each(|(plane, dst)| {
                im2col_plane(
                    &x[plane * h * w..(plane + 1) * h * w],
                    (h, w),
                    kh,
                    kw,
                    cfg,
                    dst,
                )
            });
        Ok((CpuStorage::F32(out), Shape::from((b, c * kh * kw, ohw))))
    }
}

/// col2im for [`Im2ColT`]'s layout: scatter-adds (b, c·kh·kw, oh·ow) back into (b, c, h, w).
struct Col2ImT {
    shape: (usize, usize, usize, usize),
    kh: usize,
    kw: usize,
    cfg: ConvCfg,
}

impl candle_core::CustomOp1 for Col2ImT {
    fn name(&self) -> &'static str {
        "col2im"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let g = f32_slice(s, l, "col2im")?;
        let (b, c, h, w) = self.shape;
        let (kh, kw, cfg) = (self.kh, self.kw, self.cfg);
        let (oh, ow) = (conv_out_size(h, kh, cfg), conv_out_size(w, kw, cfg));
        let ohw = oh * ow;
        let mut out = vec![0f32; b * c * h * w];
        // One (image, channel) plane per task, rows added in a fixed order: reproducible.
        out.par_chunks_mut(h * w)
            .enumerate()
            .for_each(|(plane, dst)| {
                let src = &g[plane * kh * kw * ohw..(plane + 1) * kh * kw * ohw];
                col2im_plane(src, (h, w), kh, kw, cfg, dst)
            });
        Ok((CpuStorage::F32(out), Shape::from((b, c, h, w))))
    }
}

/// Whether the conv is a plain per-pixel matmul (1×1, stride 1, no padding).
pub(super) fn pointwise(kh: usize, kw: usize, cfg: ConvCfg) -> bool {
    kh == 1 && kw == 1 && cfg.stride == 1 && cfg.padding == 0
}

/// The patch matrix (b, c·kh·kw, oh·ow) of `x` (contiguous (b, c, h, w)).
fn patches(x: &Tensor, kh: usize, kw: usize, cfg: ConvCfg) -> Result<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    if pointwise(kh, kw, cfg) {
        return x.reshape((b, c, h * w));
    }
    x.apply_op1_no_bwd(&Im2ColT { kh, kw, cfg })
}

/// conv2d of `x` (b, c, h, w) with kernel `w` (out, c, kh, kw), groups 1, CPU f32: im2col into a
/// (c·kh·kw, oh·ow) patch matrix per image and one GEMM per image that writes NCHW directly, with a
/// backward written as GEMMs over the same patches (candle's own CPU conv spends most of its time
/// in strided copies, and its backward in a direct transposed-conv loop). `w_trainable` false skips
/// the kernel gradient (frozen kernels).
pub fn conv2d(x: &Tensor, w: &Tensor, cfg: ConvCfg, w_trainable: bool) -> Result<Tensor> {
    if !x.device().is_cpu()
        || cfg.groups != 1
        || x.dtype() != candle_core::DType::F32
        || w.dtype() != candle_core::DType::F32
        || x.rank() != 4
    {
        return if w_trainable {
            x.conv2d(w, cfg.padding, cfg.stride, cfg.dilation, cfg.groups)
        } else {
            frozen_conv2d(x, w, cfg)
        };
    }
    let (b, c, h, wd) = x.dims4()?;
    let (o, wc, kh, kw) = w.dims4()?;
    if wc != c {
        candle_core::bail!(
            "conv2d: input has {c} channels, kernel {:?} expects {wc}",
            w.dims()
        );
    }
    let (oh, ow) = (conv_out_size(h, kh, cfg), conv_out_size(wd, kw, cfg));
    if h + 2 * cfg.padding < cfg.dilation * (kh - 1) + 1
        || wd + 2 * cfg.padding < cfg.dilation * (kw - 1) + 1
    {
        candle_core::bail!(
            "conv2d: input {:?} is smaller than the kernel {:?} (padding {})",
            x.dims(),
            w.dims(),
            cfg.padding
        );
    }
    let xd = x.detach().contiguous()?;
    let cols = patches(&xd, kh, kw, cfg)?;
    let wm = w.detach().reshape((o, c * kh * kw))?;
    let y = wm
        .broadcast_left(b)?
        .matmul(&cols)?
        .reshape((b, o, oh, ow))?;
    if !(x.track_op() || w_trainable && w.track_op()) {
        return Ok(y);
    }
    let op = ConvOp {
        y: std::sync::Mutex::new(Some(y)),
        cfg,
        w_trainable,
    };
    x.apply_op2_arc(w, std::sync::Arc::new(Box::new(op)))
}

struct ConvOp {
    y: std::sync::Mutex<Option<Tensor>>,
    cfg: ConvCfg,
    w_trainable: bool,
}

impl CustomOp2 for ConvOp {
    fn name(&self) -> &'static str {
        "conv2d-gemm"
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        take_result(&self.y, "conv2d-gemm")
    }
    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let (b, c, h, wd) = x.dims4()?;
        let (o, _, kh, kw) = w.dims4()?;
        let (_, _, oh, ow) = grad.dims4()?;
        let g = grad.contiguous()?.reshape((b, o, oh * ow))?;
        let wm = w.reshape((o, c * kh * kw))?;
        let gx = if x.track_op() {
            // (c·kh·kw, o) · (o, oh·ow) per image, then scattered back.
            let gcols = wm.t()?.broadcast_left(b)?.matmul(&g)?;
            Some(if pointwise(kh, kw, self.cfg) {
                gcols.reshape((b, c, h, wd))?
            } else {
                gcols.apply_op1_no_bwd(&Col2ImT {
                    shape: (b, c, h, wd),
                    kh,
                    kw,
                    cfg: self.cfg,
                })?
            })
        } else {
            None
        };
        let gw = if self.w_trainable {
            let cols = patches(&x.contiguous()?, kh, kw, self.cfg)?;
            // (Σ_b g[b]·cols[b]ᵀ)ᵀ = Σ_b cols[b] (c·kh·kw, oh·ow) · g[b]ᵀ (oh·ow, o): the patches
            // on the left are read in place by the GEMM (as the right operand's transpose they
            // would be gathered with a stride), the smaller g is the one packed.
            let per_image = cols.matmul(&g.transpose(1, 2)?)?;
            Some(
                per_image
                    .apply_op1_no_bwd(&ChannelSum {
                        c: o * c * kh * kw,
                        inner: 1,
                    })?
                    .reshape((c * kh * kw, o))?
                    .t()?
                    .contiguous()?
                    .reshape((o, c, kh, kw))?,
            )
        } else {
            None
        };
        Ok((gx, gw))
    }
}

/// `y + b` where `b` holds one value per slice of `y` along the middle of the view
/// (outer, c, inner) of `y`: a linear's bias (`dim` = last), a conv's bias (`dim` = 1 of NCHW), or a
/// per-(image, channel) shift such as a U-Net's time embedding (`b` of shape (B, C), `dim` = 1,
/// viewed as c = B·C). One parallel node; its backward passes `grad` through to `y` without a copy
/// and sums `grad` into `b`'s shape in a fixed order (candle's broadcast backward reduces on one
/// thread through strided loops). Falls back to `broadcast_add` off the CPU or for non-f32.
pub fn add_channel_bias(y: &Tensor, b: &Tensor, dim: usize) -> Result<Tensor> {
    let dims = y.dims().to_vec();
    if dim >= dims.len() {
        candle_core::bail!(
            "add_channel_bias: dim {dim} of a rank-{} tensor",
            dims.len()
        );
    }
    // The bias covers dims [first, dim] of y: a (C) bias starts at `dim`, a (B, C) one at dim - 1.
    let first = match b.rank() {
        1 => Some(dim),
        2 => dim.checked_sub(1),
        _ => None,
    };
    let Some(first) = first.filter(|&f| b.dims() == &dims[f..=dim]) else {
        candle_core::bail!(
            "add_channel_bias: bias {:?} does not fit {:?} at dim {dim}",
            b.dims(),
            dims
        );
    };
    if !y.device().is_cpu() || y.dtype() != candle_core::DType::F32 || b.dtype() != y.dtype() {
        let mut shape = vec![1usize; dims.len()];
        shape[first..=dim].copy_from_slice(b.dims());
        return y.broadcast_add(&b.reshape(shape)?);
    }
    let inner: usize = dims[dim + 1..].iter().product();
    if b.elem_count() == 0 || inner == 0 {
        return Ok(y.clone());
    }
    let op = ChannelBias { inner };
    if !(y.track_op() || b.track_op()) {
        return y.contiguous()?.apply_op2_no_bwd(&b.contiguous()?, &op);
    }
    y.contiguous()?.apply_op2(&b.contiguous()?, op)
}

struct ChannelBias {
    inner: usize,
}

impl CustomOp2 for ChannelBias {
    fn name(&self) -> &'static str {
        "add-channel-bias"
    }
    fn cpu_fwd(
        &self,
        sy: &CpuStorage,
        ly: &Layout,
        sb: &CpuStorage,
        lb: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let (y, b) = (
            f32_slice(sy, ly, "add_channel_bias")?,
            f32_slice(sb, lb, "add_channel_bias")?,
        );
        let (c, inner) = (b.len(), self.inner);
        let mut out = vec![0f32; y.len()];
        if inner == 1 {
            out.par_chunks_mut(c * ROWS)
                .zip(y.par_chunks(c * ROWS))
                .for_each(|(o, y)| {
                    for (orow, yrow) in o.chunks_exact_mut(c).zip(y.chunks_exact(c)) {
                        for ((o, y), b) in orow.iter_mut().zip(yrow).zip(b) {
                            *o = *y + *b;
                        }
                    }
                });
        } else {
            out.par_chunks_mut(inner)
                .zip(y.par_chunks(inner))
                .enumerate()
                .for_each(|(k, (o, y))| {
                    let v = b[k % c];
                    o.iter_mut().zip(y).for_each(|(o, y)| *o = *y + v);
                });
        }
        Ok((CpuStorage::F32(out), ly.shape().clone()))
    }
    fn bwd(
        &self,
        y: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let gb = if b.track_op() {
            Some(
                grad.contiguous()?
                    .apply_op1_no_bwd(&ChannelSum {
                        c: b.elem_count(),
                        inner: self.inner,
                    })?
                    .reshape(b.shape())?,
            )
        } else {
            None
        };
        Ok((y.track_op().then(|| grad.clone()), gb))
    }
}

/// Σ over `outer` and `inner` of a contiguous (outer, c, inner) tensor → (c).
struct ChannelSum {
    c: usize,
    inner: usize,
}

impl candle_core::CustomOp1 for ChannelSum {
    fn name(&self) -> &'static str {
        "channel-sum"
    }
    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let g = f32_slice(s, l, "channel_sum")?;
        let (c, inner) = (self.c, self.inner);
        let plane = c * inner;
        let outer = g.len() / plane.max(1);
        // Fixed chunks of outer slices, each summed in order, then the partial sums in order.
        let per = outer
            .div_ceil(rayon::current_num_threads().max(1) * 2)
            .max(1);
        let parts: Vec<Vec<f64>> = g
            .par_chunks(plane * per)
            .map(|block| {
                let mut acc = vec![0f64; c];
                for slab in block.chunks(plane) {
                    if inner == 1 {
                        for (a, v) in acc.iter_mut().zip(slab) {
                            *a += *v as f64;
                        }
                    } else {
                        for (a, row) in acc.iter_mut().zip(slab.chunks(inner)) {
                            *a += row.iter().map(|v| *v as f64).sum::<f64>();
                        }
                    }
                }
                acc
            })
            .collect();
        let mut out = vec![0f64; c];
        for p in parts {
            for (o, v) in out.iter_mut().zip(p) {
                *o += v;
            }
        }
        Ok((
            CpuStorage::F32(out.into_iter().map(|v| v as f32).collect()),
            Shape::from(c),
        ))
    }
}
