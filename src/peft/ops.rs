//! Custom ops for frozen base weights.
//!
//! candle's matmul and conv2d backward always compute the weight gradient, even when the weight is a
//! plain (frozen) tensor: a weight-sized buffer per layer per step, for nothing. The ops here compute
//! the forward with ordinary candle kernels on a detached input, then attach a node whose backward
//! returns only the input gradient (`g · W` for a linear layer, a transposed convolution for conv2d).
//! No weight-sized gradient is ever allocated. The fused LoRA node ([`lora_linear`]) and DoRA's
//! column scaling ([`scale_columns`]) live here too: they remove the output-sized intermediates that
//! candle keeps per elementwise node, in both passes. Each has a composite reference in the tests.

use candle_core::{backend::BackendStorage, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

/// Re-attaches a detached forward result `y` to the graph of the input `x`, with a backward that
/// only knows how to map the output gradient to the input gradient. `y` is taken out when the node
/// copies it, so the graph does not keep a second output-sized tensor alive.
struct Attach<F: Fn(&Tensor) -> Result<Tensor> + Send + Sync> {
    name: &'static str,
    y: std::sync::Mutex<Option<Tensor>>,
    input_grad: F,
}

fn copy_contiguous(s: &CpuStorage, l: &Layout) -> Result<CpuStorage> {
    macro_rules! copy {
        ($v:expr, $variant:ident) => {{
            let v = match l.contiguous_offsets() {
                Some((a, b)) => $v[a..b].to_vec(),
                // The forward results we attach are fresh matmul/conv outputs, always contiguous.
                None => candle_core::bail!("frozen op: non-contiguous forward result"),
            };
            CpuStorage::$variant(v)
        }};
    }
    Ok(match s {
        CpuStorage::F32(v) => copy!(v, F32),
        CpuStorage::F64(v) => copy!(v, F64),
        CpuStorage::F16(v) => copy!(v, F16),
        CpuStorage::BF16(v) => copy!(v, BF16),
        other => candle_core::bail!("frozen op: unsupported dtype {:?}", other.dtype()),
    })
}

/// Moves the precomputed result out of its slot into fresh storage.
fn take_result(slot: &std::sync::Mutex<Option<Tensor>>, name: &str) -> Result<(CpuStorage, Shape)> {
    let y = slot
        .lock()
        .map_err(|_| candle_core::Error::Msg(format!("{name}: poisoned")))?
        .take()
        .ok_or_else(|| candle_core::Error::Msg(format!("{name}: forward ran twice")))?;
    let (s, l) = y.storage_and_layout();
    match &*s {
        candle_core::Storage::Cpu(c) => Ok((copy_contiguous(c, l)?, l.shape().clone())),
        _ => candle_core::bail!("{name}: CPU only"),
    }
}

impl<F: Fn(&Tensor) -> Result<Tensor> + Send + Sync> candle_core::CustomOp1 for Attach<F> {
    fn name(&self) -> &'static str {
        self.name
    }
    fn cpu_fwd(&self, _x: &CpuStorage, _xl: &Layout) -> Result<(CpuStorage, Shape)> {
        take_result(&self.y, self.name)
    }
    fn bwd(&self, _x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some((self.input_grad)(grad)?))
    }
}

pub(crate) fn attach<F>(x: &Tensor, y: Tensor, name: &'static str, input_grad: F) -> Result<Tensor>
where
    F: Fn(&Tensor) -> Result<Tensor> + Send + Sync + 'static,
{
    if !x.track_op() {
        // Nothing upstream needs a gradient: the plain result is enough.
        return Ok(y);
    }
    x.apply_op1_arc(std::sync::Arc::new(Box::new(Attach {
        name,
        y: std::sync::Mutex::new(Some(y)),
        input_grad,
    })))
}

/// `x · Wᵀ` for a frozen weight `w` of shape (out, in); `x` is (..., in). Backward gives only dL/dx.
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    check_rank(x, "frozen_linear")?;
    if x.track_op() && !x.device().is_cpu() {
        return plain_linear(x, &w.detach());
    }
    let y = plain_linear(&x.detach(), w)?;
    let w2 = w.clone();
    attach(x, y, "frozen-linear", move |g| {
        // g: (..., out) · W (out, in) -> (..., in)
        let dims = g.dims().to_vec();
        let out = dims[dims.len() - 1];
        let lead: usize = dims[..dims.len() - 1].iter().product();
        let gx = g.reshape((lead, out))?.matmul(&w2)?;
        let mut xd = dims.clone();
        let last = xd.len() - 1;
        xd[last] = w2.dim(1)?;
        gx.reshape(xd)
    })
}

/// `x · Wᵀ` for a frozen NF4 weight (out, in) (QLoRA's base layer): the weight is dequantized a
/// block of output rows at a time (about 64K values, in parallel) and multiplied, in the forward
/// and again in the backward, which gives only dL/dx. No dense copy of the weight is ever alive.
pub fn nf4_linear(x: &Tensor, w: &std::sync::Arc<super::quant::Nf4Tensor>) -> Result<Tensor> {
    check_rank(x, "nf4_linear")?;
    let base = Frozen::nf4(w)?;
    let (out, inn) = base.out_in()?;
    let dims = x.dims().to_vec();
    if dims[dims.len() - 1] != inn {
        candle_core::bail!(
            "nf4_linear: input {:?} does not fit weight {:?}",
            dims,
            w.shape
        );
    }
    let lead: usize = dims[..dims.len() - 1].iter().product();
    let x2 = x
        .detach()
        .to_dtype(candle_core::DType::F32)?
        .reshape((lead, inn))?;
    let mut yd = dims.clone();
    let last = yd.len() - 1;
    yd[last] = out;
    let y = base.forward(&x2)?.reshape(yd)?;
    attach(x, y, "nf4-linear", move |g| {
        let gx = base.input_grad(&g.reshape((lead, out))?)?;
        let mut xd = dims.clone();
        let last = xd.len() - 1;
        xd[last] = inn;
        gx.reshape(xd)
    })
}

/// A frozen linear weight (out, in) as the fused ops use it: dense, or NF4 with its absmax
/// values unpacked once per call.
#[derive(Clone)]
enum Frozen {
    Dense(Tensor),
    Nf4 {
        w: std::sync::Arc<super::quant::Nf4Tensor>,
        absmax: std::sync::Arc<Vec<f32>>,
    },
}

impl Frozen {
    fn nf4(w: &std::sync::Arc<super::quant::Nf4Tensor>) -> Result<Self> {
        if w.shape.len() != 2 {
            candle_core::bail!("NF4 linear: weight shape {:?} is not (out, in)", w.shape);
        }
        Ok(Frozen::Nf4 {
            w: w.clone(),
            absmax: std::sync::Arc::new(w.absmax_f32()),
        })
    }
    fn out_in(&self) -> Result<(usize, usize)> {
        match self {
            Frozen::Dense(w) => w.dims2(),
            Frozen::Nf4 { w, .. } => Ok((w.shape[0], w.shape[1])),
        }
    }
    /// Output rows dequantized per block (about 64K values).
    fn rows_per_block(inn: usize, out: usize) -> usize {
        (65536 / inn.max(1)).clamp(1, out.max(1))
    }
    /// `x2 · Wᵀ` for x2 (tokens, in): a fresh contiguous (tokens, out) tensor.
    fn forward(&self, x2: &Tensor) -> Result<Tensor> {
        match self {
            Frozen::Dense(w) => x2.matmul(&w.t()?),
            Frozen::Nf4 { w, absmax } => {
                let (out, inn) = (w.shape[0], w.shape[1]);
                let rows = Self::rows_per_block(inn, out);
                let mut parts = vec![];
                for r0 in (0..out).step_by(rows) {
                    let wc = nf4_rows(w, absmax, r0, rows.min(out - r0))?;
                    parts.push(x2.matmul(&wc.t()?)?);
                }
                Tensor::cat(&parts, 1)
            }
        }
    }
    /// `g2 · W` for g2 (tokens, out): a fresh contiguous (tokens, in) tensor.
    fn input_grad(&self, g2: &Tensor) -> Result<Tensor> {
        match self {
            Frozen::Dense(w) => g2.matmul(w),
            Frozen::Nf4 { w, absmax } => {
                let (out, inn) = (w.shape[0], w.shape[1]);
                let rows = Self::rows_per_block(inn, out);
                let mut gx: Option<Tensor> = None;
                for r0 in (0..out).step_by(rows) {
                    let n = rows.min(out - r0);
                    let wc = nf4_rows(w, absmax, r0, n)?;
                    let part = g2.narrow(1, r0, n)?.contiguous()?.matmul(&wc)?;
                    gx = Some(match gx {
                        None => part,
                        Some(acc) => {
                            add_assign(&acc, &part)?;
                            acc
                        }
                    });
                }
                match gx {
                    Some(t) => Ok(t),
                    None => Tensor::zeros(
                        (g2.dim(0)?, inn),
                        candle_core::DType::F32,
                        &candle_core::Device::Cpu,
                    ),
                }
            }
        }
    }
}

/// Rows `r0..r0 + n` of an NF4 weight (out, in), dequantized (n, in).
fn nf4_rows(w: &super::quant::Nf4Tensor, absmax: &[f32], r0: usize, n: usize) -> Result<Tensor> {
    use rayon::prelude::*;
    let inn = w.shape[1];
    let mut buf = vec![0f32; n * inn];
    buf.par_chunks_mut(inn)
        .enumerate()
        .for_each(|(i, row)| w.dequantize_into(absmax, (r0 + i) * inn, row));
    Tensor::from_vec(buf, (n, inn), &candle_core::Device::Cpu)
}

/// `x · Wᵀ` through a 2-D matmul (the fast path for contiguous inputs of any rank).
pub fn plain_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    check_rank(x, "linear")?;
    let dims = x.dims().to_vec();
    let inn = dims[dims.len() - 1];
    let lead: usize = dims[..dims.len() - 1].iter().product();
    let y = x.reshape((lead, inn))?.matmul(&w.t()?)?;
    let mut yd = dims;
    let last = yd.len() - 1;
    yd[last] = w.dim(0)?;
    y.reshape(yd)
}

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
        // GEMM backward over im2col patches (see [`conv2d`]), input gradient only.
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

/// The whole LoRA linear layer as one node: `y = x·Wᵀ + s·(x·Aᵀ)·Bᵀ` for a frozen `w` (out, in) and
/// trainable `a` (r, in), `b` (out, r). Backward gives dL/dx, dL/dA and dL/dB, and nothing
/// weight-sized: candle would otherwise keep one output-sized tensor per intermediate node
/// (scale, add) in both passes. CPU, f32 (layers take the composite path elsewhere).
pub fn lora_linear(x: &Tensor, w: &Tensor, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    lora_linear_on(x, Frozen::Dense(w.clone()), a, b, scale)
}

/// [`lora_linear`] over a frozen NF4 weight (QLoRA): the base is dequantized block by block in
/// both passes, and no dense copy of it is alive.
pub fn qlora_linear(
    x: &Tensor,
    w: &std::sync::Arc<super::quant::Nf4Tensor>,
    a: &Tensor,
    b: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    lora_linear_on(x, Frozen::nf4(w)?, a, b, scale)
}

fn lora_linear_on(x: &Tensor, w: Frozen, a: &Tensor, b: &Tensor, scale: f64) -> Result<Tensor> {
    check_rank(x, "lora_linear")?;
    let xd = x.detach();
    let dims = x.dims().to_vec();
    let inn = dims[dims.len() - 1];
    let (out, w_in) = w.out_in()?;
    if inn != w_in || a.dims() != [a.dim(0)?, inn] || b.dims() != [out, a.dim(0)?] {
        candle_core::bail!(
            "lora_linear: input {:?}, weight ({out}, {w_in}), A {:?}, B {:?} do not fit",
            dims,
            a.dims(),
            b.dims()
        );
    }
    let lead: usize = dims[..dims.len() - 1].iter().product();
    let x2 = xd.reshape((lead, inn))?;
    let h = x2.matmul(&a.detach().t()?)?; // (tokens, r)
    let y = w.forward(&x2)?;
    add_assign(&y, &(&h * scale)?.matmul(&b.detach().t()?)?)?;
    let mut yd = dims;
    let last = yd.len() - 1;
    yd[last] = out;
    let y = y.reshape(yd)?;
    let op = LoraOp {
        w,
        h,
        scale,
        y: std::sync::Mutex::new(Some(y.clone())),
    };
    x.apply_op3_arc(a, b, std::sync::Arc::new(Box::new(op)))
}

struct LoraOp {
    w: Frozen,
    h: Tensor,
    scale: f64,
    /// The forward result, computed with candle kernels before the node is made; taken (not kept)
    /// when the node copies it out.
    y: std::sync::Mutex<Option<Tensor>>,
}

impl candle_core::CustomOp3 for LoraOp {
    fn name(&self) -> &'static str {
        "lora-linear"
    }
    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        take_result(&self.y, "lora-linear")
    }
    fn bwd(
        &self,
        x: &Tensor,
        a: &Tensor,
        b: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let xdims = x.dims();
        let inn = xdims[xdims.len() - 1];
        let (out, _) = self.w.out_in()?;
        let lead = grad.elem_count() / out;
        let g2 = grad.reshape((lead, out))?;
        let gb = (g2.matmul(b)? * self.scale)?; // (tokens, r) = s·g·B
        let gx = self.w.input_grad(&g2)?;
        add_assign(&gx, &gb.matmul(a)?)?;
        let gx = gx.reshape(xdims)?;
        let x2 = x.reshape((lead, inn))?;
        let ga = gb.t()?.matmul(&x2)?; // (r, in)
        let gbw = (g2.t()?.matmul(&self.h)? * self.scale)?; // (out, r)
        Ok((x.track_op().then_some(gx), Some(ga), Some(gbw)))
    }
}

/// `dst += src` in place, over all cores (candle's elementwise ops run on one thread and allocate).
/// `dst` must be a fresh tensor owned by the caller (not part of any graph); CPU f32, contiguous.
pub fn add_assign(dst: &Tensor, src: &Tensor) -> Result<()> {
    dst.inplace_op2(src, &AddAssign)
}

struct AddAssign;
impl candle_core::InplaceOp2 for AddAssign {
    fn name(&self) -> &'static str {
        "add-assign"
    }
    fn cpu_fwd(&self, d: &mut CpuStorage, dl: &Layout, s: &CpuStorage, sl: &Layout) -> Result<()> {
        use rayon::prelude::*;
        let (CpuStorage::F32(d), CpuStorage::F32(s)) = (d, s) else {
            candle_core::bail!("add-assign: f32 only")
        };
        let (Some((da, db)), Some((sa, sb))) = (dl.contiguous_offsets(), sl.contiguous_offsets())
        else {
            candle_core::bail!("add-assign: contiguous tensors only")
        };
        if db - da != sb - sa {
            candle_core::bail!("add-assign: sizes differ ({} vs {})", db - da, sb - sa)
        }
        d[da..db]
            .par_chunks_mut(1 << 15)
            .zip(s[sa..sb].par_chunks(1 << 15))
            .for_each(|(d, s)| {
                d.iter_mut().zip(s).for_each(|(d, s)| *d += *s);
            });
        Ok(())
    }
}

/// `u ⊙ g` for `u` (..., n) and a per-column scale `g` (n): DoRA's magnitude scaling as one node with
/// a two-core forward and a single-pass backward (dL/du = grad ⊙ g, dL/dg = Σ_rows grad ⊙ u, summed in
/// a fixed order so that runs are reproducible). CPU, f32, contiguous.
pub fn scale_columns(u: &Tensor, g: &Tensor) -> Result<Tensor> {
    if g.rank() != 1 || u.rank() == 0 || g.elem_count() == 0 {
        candle_core::bail!(
            "scale_columns: u {:?} and g {:?} do not fit",
            u.dims(),
            g.dims()
        );
    }
    let n = g.dim(0)?;
    if u.dim(u.rank() - 1)? != n || g.rank() != 1 {
        candle_core::bail!(
            "scale_columns: u {:?} and g {:?} do not fit",
            u.dims(),
            g.dims()
        );
    }
    u.contiguous()?.apply_op2(&g.contiguous()?, ColScale)
}

const ROWS: usize = 64;

pub(crate) fn f32_slice<'a>(s: &'a CpuStorage, l: &Layout, what: &str) -> Result<&'a [f32]> {
    match (s, l.contiguous_offsets()) {
        (CpuStorage::F32(v), Some((a, b))) => Ok(&v[a..b]),
        _ => candle_core::bail!("{what}: needs contiguous f32"),
    }
}

struct ColScale;
impl CustomOp2 for ColScale {
    fn name(&self) -> &'static str {
        "scale-columns"
    }
    fn cpu_fwd(
        &self,
        su: &CpuStorage,
        lu: &Layout,
        sg: &CpuStorage,
        lg: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let (u, g) = (
            f32_slice(su, lu, "scale_columns")?,
            f32_slice(sg, lg, "scale_columns")?,
        );
        let n = g.len();
        let mut out = vec![0f32; u.len()];
        out.par_chunks_mut(n * ROWS)
            .zip(u.par_chunks(n * ROWS))
            .for_each(|(o, u)| {
                for (orow, urow) in o.chunks_mut(n).zip(u.chunks(n)) {
                    for j in 0..n {
                        orow[j] = urow[j] * g[j];
                    }
                }
            });
        Ok((CpuStorage::F32(out), lu.shape().clone()))
    }
    fn bwd(
        &self,
        u: &Tensor,
        g: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let n = g.dim(0)?;
        let rows = u.elem_count() / n;
        let packed = grad
            .contiguous()?
            .apply_op2_no_bwd(u, &ColScaleBwd { g: g.clone() })?; // (rows + 1, n)
        let gu = packed.narrow(0, 0, rows)?.reshape(u.shape())?;
        let gg = packed.narrow(0, rows, 1)?.reshape(n)?;
        Ok((Some(gu), Some(gg)))
    }
}

struct ColScaleBwd {
    g: Tensor,
}
impl CustomOp2 for ColScaleBwd {
    fn name(&self) -> &'static str {
        "scale-columns-bwd"
    }
    fn cpu_fwd(
        &self,
        sgr: &CpuStorage,
        lgr: &Layout,
        su: &CpuStorage,
        lu: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        use rayon::prelude::*;
        let (grad, u) = (
            f32_slice(sgr, lgr, "scale_columns bwd")?,
            f32_slice(su, lu, "scale_columns bwd")?,
        );
        let (gs, gl) = self.g.storage_and_layout();
        let g = match &*gs {
            candle_core::Storage::Cpu(c) => f32_slice(c, gl, "scale_columns bwd")?.to_vec(),
            _ => candle_core::bail!("scale_columns: CPU only"),
        };
        let n = g.len();
        let rows = u.len() / n;
        let mut out = vec![0f32; u.len() + n];
        let (gu, _) = out.split_at_mut(u.len());
        let partials: Vec<Vec<f32>> = gu
            .par_chunks_mut(n * ROWS)
            .zip(grad.par_chunks(n * ROWS))
            .zip(u.par_chunks(n * ROWS))
            .map(|((o, gr), u)| {
                let mut acc = vec![0f32; n];
                for ((orow, grow), urow) in o.chunks_mut(n).zip(gr.chunks(n)).zip(u.chunks(n)) {
                    for j in 0..n {
                        orow[j] = grow[j] * g[j];
                        acc[j] += grow[j] * urow[j];
                    }
                }
                acc
            })
            .collect();
        let tail = &mut out[rows * n..];
        for p in &partials {
            for j in 0..n {
                tail[j] += p[j];
            }
        }
        Ok((CpuStorage::F32(out), Shape::from((rows + 1, n))))
    }
}

fn check_rank(x: &Tensor, what: &str) -> Result<()> {
    if x.rank() == 0 {
        candle_core::bail!("{what}: the input must have at least one dimension (features last)");
    }
    Ok(())
}

/// Output size of a conv along one axis.
fn conv_out_size(n: usize, k: usize, cfg: ConvCfg) -> usize {
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
                let src = &x[plane * h * w..(plane + 1) * h * w];
                for ky in 0..kh {
                    let (y0, y1) = valid_range(oh, h, ky, cfg);
                    for kx in 0..kw {
                        let (x0, x1) = valid_range(ow, w, kx, cfg);
                        let row = &mut dst[(ky * kw + kx) * ohw..][..ohw];
                        for oy in y0..y1 {
                            let iy = oy * cfg.stride + ky * cfg.dilation - cfg.padding;
                            let ix0 = x0 * cfg.stride + kx * cfg.dilation - cfg.padding;
                            let d = &mut row[oy * ow + x0..oy * ow + x1];
                            if cfg.stride == 1 {
                                d.copy_from_slice(&src[iy * w + ix0..iy * w + ix0 + d.len()]);
                            } else {
                                for (j, v) in d.iter_mut().enumerate() {
                                    *v = src[iy * w + ix0 + j * cfg.stride];
                                }
                            }
                        }
                    }
                }
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
                for ky in 0..kh {
                    let (y0, y1) = valid_range(oh, h, ky, cfg);
                    for kx in 0..kw {
                        let (x0, x1) = valid_range(ow, w, kx, cfg);
                        let row = &src[(ky * kw + kx) * ohw..][..ohw];
                        for oy in y0..y1 {
                            let iy = oy * cfg.stride + ky * cfg.dilation - cfg.padding;
                            let ix0 = x0 * cfg.stride + kx * cfg.dilation - cfg.padding;
                            let r = &row[oy * ow + x0..oy * ow + x1];
                            if cfg.stride == 1 {
                                for (d, v) in
                                    dst[iy * w + ix0..iy * w + ix0 + r.len()].iter_mut().zip(r)
                                {
                                    *d += v;
                                }
                            } else {
                                for (j, v) in r.iter().enumerate() {
                                    dst[iy * w + ix0 + j * cfg.stride] += v;
                                }
                            }
                        }
                    }
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((b, c, h, w))))
    }
}

/// Whether the conv is a plain per-pixel matmul (1×1, stride 1, no padding).
fn pointwise(kh: usize, kw: usize, cfg: ConvCfg) -> bool {
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
            // Σ_b g[b] (o, oh·ow) · cols[b]ᵀ (oh·ow, c·kh·kw)
            let per_image = g.matmul(&cols.transpose(1, 2)?)?;
            Some(
                per_image
                    .apply_op1_no_bwd(&ChannelSum {
                        c: o * c * kh * kw,
                        inner: 1,
                    })?
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
                    for (orow, yrow) in o.chunks_mut(c).zip(y.chunks(c)) {
                        for j in 0..c {
                            orow[j] = yrow[j] + b[j];
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
