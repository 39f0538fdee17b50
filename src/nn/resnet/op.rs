//! The ResnetBlock2D node's forward and backward (see the parent module).

use super::NormPart;
use crate::nn::gemm::{gemm_into, gemm_into_cm, Mat, Par};
use crate::nn::kernels::{cpu_f32, f32_slice};
use crate::nn::lora_conv::Geom;
use crate::nn::norm::GroupNormRef;
use candle_core::{CpuStorage, Device, Layout, Result, Shape, Tensor};
use rayon::prelude::*;
use std::sync::Mutex;
/// A norm's γ and β as values, with its groups and ε.
pub(super) struct NormVals {
    w: Vec<f32>,
    b: Vec<f32>,
    groups: usize,
    eps: f64,
}

impl NormVals {
    fn as_ref(&self) -> GroupNormRef<'_> {
        GroupNormRef {
            weight: &self.w,
            bias: &self.b,
            groups: self.groups,
            eps: self.eps,
        }
    }
}

pub(super) fn norm_vals(p: &NormPart) -> Result<NormVals> {
    Ok(NormVals {
        w: p.weight.to_vec1()?,
        b: p.bias.to_vec1()?,
        groups: p.groups,
        eps: p.eps,
    })
}

pub(super) struct ResnetOp {
    /// conv1 (x → o), conv2 (o → o), the shortcut (x → o, 1×1); `r` is each one's LoCon rank
    /// (0: none).
    pub(super) g1: Geom,
    pub(super) g2: Geom,
    pub(super) gs: Option<Geom>,
    pub(super) n1: NormVals,
    pub(super) n2: NormVals,
    /// Kernels and biases (detached, contiguous).
    pub(super) k1: (Tensor, Option<Tensor>),
    pub(super) k2: (Tensor, Option<Tensor>),
    pub(super) ks: Option<(Tensor, Option<Tensor>)>,
    /// LoCon scales of conv1, conv2, the shortcut.
    pub(super) scales: [f32; 3],
    pub(super) with_t: bool,
    pub(super) out_scale: f32,
    /// Keep what the backward needs (a gradient will be asked for).
    pub(super) keep: bool,
    pub(super) saved: Mutex<Option<Saved>>,
}

/// Per image, back to back: conv1's output plus t (o·p), and the hiddens A·P of conv1, conv2 and
/// the shortcut (r·p each).
pub(super) struct Saved {
    y1: Vec<f32>,
    h: [Vec<f32>; 3],
}

/// The offsets of A and B of each conv in the packed factor vector.
fn offsets(geoms: [Option<&Geom>; 3]) -> [(usize, usize); 3] {
    let mut at = 0;
    let mut out = [(0, 0); 3];
    for (k, g) in geoms.into_iter().enumerate() {
        if let Some(g) = g.filter(|g| g.r > 0) {
            out[k] = (at, at + g.r * g.k());
            at += g.r * g.k() + g.o * g.r;
        }
    }
    out
}

/// Splits `v` into `n` chunks of `len` values, or `n` `None`s when it holds nothing.
fn split(v: &mut [f32], n: usize, len: usize) -> Vec<Option<&mut [f32]>> {
    if len == 0 || v.len() < n * len || n == 0 {
        return (0..n).map(|_| None).collect();
    }
    v.chunks_mut(len).take(n).map(Some).collect()
}

fn slices<'a, G: std::ops::Deref<Target = candle_core::Storage>>(
    guards: &'a [(G, &Layout)],
) -> Result<Vec<&'a [f32]>> {
    guards.iter().map(|(s, l)| cpu_f32(s, l)).collect()
}

fn poisoned() -> candle_core::Error {
    candle_core::Error::Msg("ResnetBlock2D: poisoned".into())
}

/// Per-thread scratch buffers.
#[derive(Default)]
struct Scratch {
    act: Vec<f32>,
    cols: Vec<f32>,
    dcols: Vec<f32>,
    y1: Vec<f32>,
    h: Vec<f32>,
    gsc: Vec<f32>,
    da: Vec<f32>,
    dy1: Vec<f32>,
    gn: Vec<f32>,
    gh: Vec<f32>,
    dat: Vec<f32>,
}

impl Scratch {
    fn bytes(&self) -> usize {
        let v = [
            &self.act,
            &self.cols,
            &self.dcols,
            &self.y1,
            &self.h,
            &self.gsc,
            &self.da,
            &self.dy1,
            &self.gn,
            &self.gh,
            &self.dat,
        ];
        v.iter().map(|b| b.capacity() * 4).sum()
    }
}

/// A thread keeps its scratch between calls up to this size, so the unfolded patches are not
/// allocated (page by page, zeroed by the kernel) and zero-filled again in every block.
const KEEP_BYTES: usize = 32 << 20;

thread_local! {
    static CACHED: std::cell::Cell<Option<Scratch>> = const { std::cell::Cell::new(None) };
}

/// This thread's kept scratch (or a new one, e.g. for a task nested in another on this thread),
/// handed back when dropped.
struct Pooled(Scratch);

impl Pooled {
    fn take() -> Self {
        Pooled(CACHED.with(|c| c.take()).unwrap_or_default())
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let s = std::mem::take(&mut self.0);
        if s.bytes() <= KEEP_BYTES {
            CACHED.with(|c| c.set(Some(s)));
        }
    }
}

fn sized(v: &mut Vec<f32>, len: usize) -> &mut [f32] {
    if v.len() < len {
        v.resize(len, 0.0);
    }
    &mut v[..len]
}

/// `dst += s·B·H` for the LoCon of a conv whose patches are `pm`: H = A·P into `h` first.
#[allow(clippy::too_many_arguments)]
fn locon_forward(
    g: &Geom,
    a: &[f32],
    b: &[f32],
    s: f32,
    pm: &[f32],
    h: &mut [f32],
    dst: &mut [f32],
    par: Par,
) -> Result<()> {
    let (k, p) = (g.k(), g.p);
    gemm_into(h, Mat::rm(a, g.r, k), Mat::rm(pm, k, p), 1.0, false, par)?;
    gemm_into(dst, Mat::rm(b, g.o, g.r), Mat::rm(h, g.r, p), s, true, par)
}

/// The LoCon gradients of one image for its output gradient `gm` (o×p), saved hidden `h` (r×p) and
/// patches `pm` (k×p): Ĝ = s·Bᵀ·G into `gh`, dB = s·G·Hᵀ into `db`, dA = Ĝ·Pᵀ into `da` (through
/// a column-major product, the patches read in place).
#[allow(clippy::too_many_arguments)]
fn locon_grads(
    g: &Geom,
    gm: Mat,
    b: &[f32],
    s: f32,
    h: &[f32],
    pm: &[f32],
    gh: &mut [f32],
    da: &mut [f32],
    db: &mut [f32],
    dat: &mut Vec<f32>,
    par: Par,
) -> Result<()> {
    let (k, p, r) = (g.k(), g.p, g.r);
    gemm_into(gh, Mat::rm(b, g.o, r).t(), gm, s, false, par)?;
    gemm_into(db, gm, Mat::rm(h, r, p).t(), s, false, par)?;
    let dat = sized(dat, r * k);
    gemm_into_cm(
        dat,
        Mat::rm(gh, r, p),
        Mat::rm(pm, k, p).t(),
        1.0,
        false,
        par,
    )?;
    for (ri, row) in da.chunks_exact_mut(k).enumerate() {
        for (kk, v) in row.iter_mut().enumerate() {
            *v = dat[kk * r + ri];
        }
    }
    Ok(())
}

impl candle_core::CustomOp3 for ResnetOp {
    fn name(&self) -> &'static str {
        "resnet-block"
    }

    fn cpu_fwd(
        &self,
        sx: &CpuStorage,
        lx: &Layout,
        st: &CpuStorage,
        lt: &Layout,
        sp: &CpuStorage,
        lp: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (g1, g2) = (self.g1, self.g2);
        let (n, c, o, p) = (g1.n, g1.c, g1.o, g1.p);
        let x = f32_slice(sx, lx, "ResnetBlock2D")?;
        let t = f32_slice(st, lt, "ResnetBlock2D")?;
        let packed = f32_slice(sp, lp, "ResnetBlock2D")?;
        let off = offsets([Some(&g1), Some(&g2), self.gs.as_ref()]);
        let ranks = [g1.r, g2.r, self.gs.map_or(0, |g| g.r)];
        let mut y = vec![0f32; n * o * p];
        let mut y1 = vec![0f32; if self.keep { n * o * p } else { 0 }];
        let mut hs: [Vec<f32>; 3] =
            std::array::from_fn(|k| vec![0f32; if self.keep { n * ranks[k] * p } else { 0 }]);
        let mut tensors = vec![&self.k1.0, &self.k2.0];
        tensors.extend(self.ks.as_ref().map(|k| &k.0));
        let biases = [
            self.k1.1.as_ref(),
            self.k2.1.as_ref(),
            self.ks.as_ref().and_then(|k| k.1.as_ref()),
        ];
        tensors.extend(biases.iter().flatten());
        let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
        let vals = slices(&guards)?;
        let ws_short = self.ks.as_ref().map(|_| vals[2]);
        let mut at = if self.ks.is_some() { 3 } else { 2 };
        let bs: Vec<Option<&[f32]>> = biases
            .iter()
            .map(|b| {
                b.map(|_| {
                    at += 1;
                    vals[at - 1]
                })
            })
            .collect();
        let (nm1, nm2) = (self.n1.as_ref(), self.n2.as_ref());
        let par = g1.par();
        let [h1v, h2v, hsv] = &mut hs;
        let jobs: Vec<_> = y
            .chunks_mut(o * p)
            .zip(split(&mut y1, n, o * p))
            .zip(split(h1v, n, ranks[0] * p))
            .zip(split(h2v, n, ranks[1] * p))
            .zip(split(hsv, n, ranks[2] * p))
            .enumerate()
            .collect();
        jobs.into_par_iter().try_for_each_init(
            Pooled::take,
            |sc, (i, ((((yi, y1s), h1s), h2s), hss))| -> Result<()> {
                let xi = &x[i * c * p..(i + 1) * c * p];
                let Scratch {
                    act,
                    cols,
                    y1: y1b,
                    h: hb,
                    ..
                } = &mut sc.0;
                // conv1(silu(gn1(x))) (+ LoCon) + t
                let y1i = match y1s {
                    Some(s) => s,
                    None => sized(y1b, o * p),
                };
                let a1 = sized(act, c.max(o) * p);
                nm1.silu_image(xi, &mut a1[..c * p], p);
                let pm = g1.base_product(&a1[..c * p], vals[0], bs[0], y1i, cols)?;
                if g1.r > 0 {
                    let h = match h1s {
                        Some(s) => s,
                        None => sized(hb, g1.r * p),
                    };
                    let (a, b) = (&packed[off[0].0..off[0].1], &packed[off[0].1..]);
                    locon_forward(&g1, a, b, self.scales[0], pm, h, y1i, par)?;
                }
                if self.with_t {
                    for (row, tv) in y1i.chunks_mut(p).zip(&t[i * o..(i + 1) * o]) {
                        row.iter_mut().for_each(|v| *v += tv);
                    }
                }
                // conv2(silu(gn2(·))) (+ LoCon)
                let a2 = &mut act[..o * p];
                nm2.silu_image(y1i, a2, p);
                let pm = g2.base_product(a2, vals[1], bs[1], yi, cols)?;
                if g2.r > 0 {
                    let h = match h2s {
                        Some(s) => s,
                        None => sized(hb, g2.r * p),
                    };
                    let (a, b) = (&packed[off[1].0..off[1].1], &packed[off[1].1..]);
                    locon_forward(&g2, a, b, self.scales[1], pm, h, yi, par)?;
                }
                // + shortcut(x)
                match (&self.gs, ws_short) {
                    (Some(gs), Some(wsv)) => {
                        gemm_into(yi, Mat::rm(wsv, o, c), Mat::rm(xi, c, p), 1.0, true, par)?;
                        if let Some(bv) = bs[2] {
                            for (row, b) in yi.chunks_mut(p).zip(bv) {
                                row.iter_mut().for_each(|v| *v += b);
                            }
                        }
                        if gs.r > 0 {
                            let h = match hss {
                                Some(s) => s,
                                None => sized(hb, gs.r * p),
                            };
                            let (a, b) = (&packed[off[2].0..off[2].1], &packed[off[2].1..]);
                            locon_forward(gs, a, b, self.scales[2], xi, h, yi, par)?;
                        }
                    }
                    _ => yi.iter_mut().zip(xi).for_each(|(v, xv)| *v += xv),
                }
                if self.out_scale != 1.0 {
                    let s = self.out_scale;
                    yi.iter_mut().for_each(|v| *v /= s);
                }
                Ok(())
            },
        )?;
        if self.keep {
            *self.saved.lock().map_err(|_| poisoned())? = Some(Saved { y1, h: hs });
        }
        Ok((CpuStorage::F32(y), Shape::from((n, o, g1.h, g1.w))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        t: &Tensor,
        packed: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (g1, g2) = (self.g1, self.g2);
        let (n, c, o, p) = (g1.n, g1.c, g1.o, g1.p);
        let (want_x, want_t, want_f) = (
            x.track_op(),
            self.with_t && t.track_op(),
            packed.track_op() && packed.elem_count() > 0,
        );
        let saved = self.saved.lock().map_err(|_| poisoned())?;
        let Some(sv) = saved.as_ref() else {
            candle_core::bail!("ResnetBlock2D: backward before forward")
        };
        let grad = grad.contiguous()?;
        let (gs_, gl) = grad.storage_and_layout();
        let gy = cpu_f32(&gs_, gl)?;
        let (xs, xl) = x.storage_and_layout();
        let xv = cpu_f32(&xs, xl)?;
        let (ps, pl) = packed.storage_and_layout();
        let pv = cpu_f32(&ps, pl)?;
        let mut tensors = vec![&self.k1.0, &self.k2.0];
        tensors.extend(self.ks.as_ref().map(|k| &k.0));
        let guards: Vec<_> = tensors.iter().map(|t| t.storage_and_layout()).collect();
        let vals = slices(&guards)?;
        let geoms = [Some(g1), Some(g2), self.gs];
        let off = offsets([Some(&g1), Some(&g2), self.gs.as_ref()]);
        let ranks = geoms.map(|g| g.map_or(0, |g| g.r));
        // Per-image shares of each factor's gradient (A then B), summed in image order after.
        let flen: Vec<usize> = geoms
            .iter()
            .map(|g| g.map_or(0, |g| g.r * g.k() + g.o * g.r))
            .collect();
        let per_image: usize = if want_f { flen.iter().sum() } else { 0 };
        let mut fparts = vec![0f32; n * per_image];
        let mut dx = vec![0f32; if want_x { n * c * p } else { 0 }];
        let mut dt = vec![0f32; if want_t { n * o } else { 0 }];
        let (nm1, nm2) = (self.n1.as_ref(), self.n2.as_ref());
        let par = g1.par();
        let jobs: Vec<_> = split(&mut dx, n, c * p)
            .into_iter()
            .zip(split(&mut dt, n, o))
            .zip(split(&mut fparts, n, per_image))
            .enumerate()
            .collect();
        jobs.into_par_iter().try_for_each_init(
            Pooled::take,
            |sc, (i, ((mut dxi, dti), fi))| -> Result<()> {
                let xi = &xv[i * c * p..(i + 1) * c * p];
                let y1i = &sv.y1[i * o * p..(i + 1) * o * p];
                let hi = |k: usize| &sv.h[k][i * ranks[k] * p..(i + 1) * ranks[k] * p];
                let Scratch {
                    act,
                    cols,
                    dcols,
                    gsc,
                    da,
                    dy1,
                    gn,
                    gh,
                    dat,
                    ..
                } = &mut sc.0;
                // The factor gradients of this image: (dA, dB) per conv.
                let mut fsplit: [(&mut [f32], &mut [f32]); 3] = Default::default();
                if let Some(f) = fi {
                    let mut rest = f;
                    for k in 0..3 {
                        if let Some(g) = geoms[k].filter(|g| g.r > 0) {
                            let (a, tail) = rest.split_at_mut(g.r * g.k());
                            let (b, tail) = tail.split_at_mut(g.o * g.r);
                            fsplit[k] = (a, b);
                            rest = tail;
                        }
                    }
                }
                let gi_raw = &gy[i * o * p..(i + 1) * o * p];
                let gi: &[f32] = if self.out_scale != 1.0 {
                    let s = self.out_scale;
                    let b = sized(gsc, o * p);
                    b.iter_mut().zip(gi_raw).for_each(|(d, v)| *d = v / s);
                    b
                } else {
                    gi_raw
                };
                let gm = Mat::rm(gi, o, p);
                let factor =
                    |k: usize| -> (&[f32], &[f32]) { (&pv[off[k].0..off[k].1], &pv[off[k].1..]) };
                // Shortcut: dx = Wsᵀ·G (+ Asᵀ·Ĝs), or dx = G.
                match self.gs {
                    Some(gs) => {
                        if want_f && gs.r > 0 {
                            let gh = sized(gh, gs.r * p);
                            let (da_, db_) = &mut fsplit[2];
                            locon_grads(
                                &gs,
                                gm,
                                factor(2).1,
                                self.scales[2],
                                hi(2),
                                xi,
                                gh,
                                da_,
                                db_,
                                dat,
                                par,
                            )?;
                        }
                        if let Some(d) = dxi.as_deref_mut() {
                            gemm_into(d, Mat::rm(vals[2], o, c).t(), gm, 1.0, false, par)?;
                            if gs.r > 0 {
                                let ghs = sized(gh, gs.r * p);
                                if !want_f {
                                    gemm_into(
                                        ghs,
                                        Mat::rm(factor(2).1, o, gs.r).t(),
                                        gm,
                                        self.scales[2],
                                        false,
                                        par,
                                    )?;
                                }
                                gemm_into(
                                    d,
                                    Mat::rm(factor(2).0, gs.r, c).t(),
                                    Mat::rm(ghs, gs.r, p),
                                    1.0,
                                    true,
                                    par,
                                )?;
                            }
                        }
                    }
                    None => {
                        if let Some(d) = dxi.as_deref_mut() {
                            d.copy_from_slice(gi);
                        }
                    }
                }
                // conv2: its LoCon's gradients, then dL/d(silu(gn2)) into `da`.
                let a = sized(act, c.max(o) * p);
                let ghv = sized(gh, g1.r.max(g2.r).max(1) * p);
                if g2.r > 0 {
                    if want_f {
                        nm2.silu_image(y1i, &mut a[..o * p], p);
                        let pm = g2.patches(&a[..o * p], cols);
                        let (da_, db_) = &mut fsplit[1];
                        locon_grads(
                            &g2,
                            gm,
                            factor(1).1,
                            self.scales[1],
                            hi(1),
                            pm,
                            &mut ghv[..g2.r * p],
                            da_,
                            db_,
                            dat,
                            par,
                        )?;
                    } else {
                        gemm_into(
                            &mut ghv[..g2.r * p],
                            Mat::rm(factor(1).1, o, g2.r).t(),
                            gm,
                            self.scales[1],
                            false,
                            par,
                        )?;
                    }
                }
                let need_branch = want_x || want_t || (want_f && g1.r > 0);
                if !need_branch {
                    return Ok(());
                }
                let dav = sized(da, c.max(o) * p);
                dav[..o * p].fill(0.0);
                let lora2 = (g2.r > 0).then(|| {
                    (
                        Mat::rm(factor(1).0, g2.r, g2.k()),
                        Mat::rm(&ghv[..g2.r * p], g2.r, p),
                    )
                });
                g2.input_grad(gm, vals[1], lora2, &mut dav[..o * p], dcols)?;
                // Through silu(gn2): dL/dy1.
                let dyv = sized(dy1, o * p);
                dyv.fill(0.0);
                nm2.silu_image_bwd(&dav[..o * p], y1i, dyv, gn, p);
                if let Some(d) = dti {
                    for (v, row) in d.iter_mut().zip(dyv.chunks(p)) {
                        *v = row.iter().sum();
                    }
                }
                let g1m = Mat::rm(dyv, o, p);
                // conv1.
                if g1.r > 0 {
                    if want_f {
                        nm1.silu_image(xi, &mut a[..c * p], p);
                        let pm = g1.patches(&a[..c * p], cols);
                        let (da_, db_) = &mut fsplit[0];
                        locon_grads(
                            &g1,
                            g1m,
                            factor(0).1,
                            self.scales[0],
                            hi(0),
                            pm,
                            &mut ghv[..g1.r * p],
                            da_,
                            db_,
                            dat,
                            par,
                        )?;
                    } else if want_x {
                        gemm_into(
                            &mut ghv[..g1.r * p],
                            Mat::rm(factor(0).1, o, g1.r).t(),
                            g1m,
                            self.scales[0],
                            false,
                            par,
                        )?;
                    }
                }
                if let Some(d) = dxi {
                    dav[..c * p].fill(0.0);
                    let lora1 = (g1.r > 0).then(|| {
                        (
                            Mat::rm(factor(0).0, g1.r, g1.k()),
                            Mat::rm(&ghv[..g1.r * p], g1.r, p),
                        )
                    });
                    g1.input_grad(g1m, vals[0], lora1, &mut dav[..c * p], dcols)?;
                    nm1.silu_image_bwd(&dav[..c * p], xi, d, gn, p);
                }
                Ok(())
            },
        )?;
        let dx = if want_x {
            Some(Tensor::from_vec(dx, x.shape(), &Device::Cpu)?)
        } else {
            None
        };
        let dt = if want_t {
            Some(Tensor::from_vec(dt, t.shape(), &Device::Cpu)?)
        } else {
            None
        };
        let df = if want_f {
            let mut acc = vec![0f32; per_image];
            for part in fparts.chunks(per_image.max(1)) {
                acc.iter_mut().zip(part).for_each(|(s, v)| *s += v);
            }
            Some(Tensor::from_vec(acc, packed.shape(), &Device::Cpu)?)
        } else {
            None
        };
        Ok((dx, dt, df))
    }
}
