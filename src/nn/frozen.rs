//! Linear layers over frozen base weights, dense or NF4.
//!
//! candle's matmul backward always computes the weight gradient, even when the weight is a plain
//! (frozen) tensor: a weight-sized buffer per layer per step, for nothing. The ops here compute the
//! forward with ordinary candle kernels on a detached input, then attach a node (`attach`) whose
//! backward returns only the input gradient (`g · W` for a linear layer). No weight-sized gradient
//! is ever allocated. Each has a composite reference in the tests.

use super::kernels::check_rank;
use super::nf4::Nf4Tensor;
use candle_core::{backend::BackendStorage, CpuStorage, Layout, Result, Shape, Tensor};

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
pub(super) fn take_result(
    slot: &std::sync::Mutex<Option<Tensor>>,
    name: &str,
) -> Result<(CpuStorage, Shape)> {
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
    if let Some(y) = frozen_linear_bias(x, w, None)? {
        return Ok(y);
    }
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

/// `x · Wᵀ + b` for a frozen dense weight `w` (out, in) and an optional frozen bias `b` (out), as one
/// node: the output rows start as the bias and the product accumulates into them (no zero-filled
/// output, no second pass for the bias, no copy out of a candle tensor), and the backward writes
/// only dL/dx, straight into its buffer. `None` where the node does not apply: not CPU, not f32, or
/// a weight or bias that is itself trained (those take the composed path).
pub fn frozen_linear_bias(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Option<Tensor>> {
    check_rank(x, "frozen_linear")?;
    let f32_cpu = |t: &Tensor| t.device().is_cpu() && t.dtype() == candle_core::DType::F32;
    if !f32_cpu(x)
        || !f32_cpu(w)
        || w.track_op()
        || bias.is_some_and(|b| !f32_cpu(b) || b.track_op())
    {
        super::fallback::note(|| {
            let why = super::fallback::cpu_f32_miss(x)
                .or_else(|| super::fallback::cpu_f32_miss(w))
                .unwrap_or_else(|| "a trained weight or bias".into());
            ("frozen linear".into(), why)
        });
        return Ok(None);
    }
    let (out, inn) = w.dims2()?;
    let dims = x.dims();
    if dims[dims.len() - 1] != inn || bias.is_some_and(|b| b.dims() != [out]) {
        candle_core::bail!(
            "linear: input {:?} does not fit weight ({out}, {inn}){}",
            dims,
            bias.map(|b| format!(" and bias {:?}", b.dims()))
                .unwrap_or_default()
        );
    }
    let op = FrozenLinearOp {
        frozen: super::kernels::FrozenParams::new(w, bias)?,
        out,
        inn,
    };
    let x = x.contiguous()?;
    Ok(Some(if x.track_op() {
        x.apply_op1_arc(std::sync::Arc::new(Box::new(op)))?
    } else {
        x.apply_op1_no_bwd(&op)?
    }))
}

struct FrozenLinearOp {
    frozen: super::kernels::FrozenParams,
    out: usize,
    inn: usize,
}

impl candle_core::CustomOp1 for FrozenLinearOp {
    fn name(&self) -> &'static str {
        "frozen-linear-bias"
    }
    fn cpu_fwd(&self, sx: &CpuStorage, lx: &Layout) -> Result<(CpuStorage, Shape)> {
        use super::gemm::{gemm_into, Mat, Par};
        let x = super::kernels::f32_slice(sx, lx, "linear")?;
        let (out, inn) = (self.out, self.inn);
        let lead = x.len() / inn.max(1);
        let y = self.frozen.with(|w, bias| {
            let mut y = Vec::with_capacity(lead * out);
            match bias {
                Some(b) => (0..lead).for_each(|_| y.extend_from_slice(b)),
                None => y.resize(lead * out, 0.0),
            }
            let (lhs, rhs) = (Mat::rm(x, lead, inn), Mat::rm(w, out, inn).t());
            gemm_into(&mut y, lhs, rhs, 1.0, bias.is_some(), Par::all())?;
            Ok(y)
        })?;
        let mut dims = lx.dims().to_vec();
        if let Some(last) = dims.last_mut() {
            *last = out;
        }
        Ok((CpuStorage::F32(y), Shape::from(dims)))
    }
    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        use super::gemm::{gemm_into, Mat, Par};
        let (out, inn) = (self.out, self.inn);
        let grad = grad.contiguous()?;
        let (gs, gl) = grad.storage_and_layout();
        let gy = super::kernels::cpu_f32(&gs, gl)?;
        let lead = gy.len() / out.max(1);
        let mut dx = vec![0f32; lead * inn];
        self.frozen.with(|w, _| {
            gemm_into(
                &mut dx,
                Mat::rm(gy, lead, out),
                Mat::rm(w, out, inn),
                1.0,
                false,
                Par::all(),
            )
        })?;
        Ok(Some(Tensor::from_vec(dx, x.shape(), x.device())?))
    }
}

/// `x · Wᵀ` for a frozen NF4 weight (out, in) (QLoRA's base layer): the weight is dequantized a
/// block of output rows at a time (about 64K values, in parallel) and multiplied, in the forward
/// and again in the backward, which gives only dL/dx. No dense copy of the weight is ever alive.
pub fn nf4_linear(x: &Tensor, w: &std::sync::Arc<Nf4Tensor>) -> Result<Tensor> {
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
pub(super) enum Frozen {
    Dense(Tensor),
    Nf4 {
        w: std::sync::Arc<Nf4Tensor>,
        absmax: std::sync::Arc<Vec<f32>>,
    },
}

impl Frozen {
    pub(super) fn nf4(w: &std::sync::Arc<Nf4Tensor>) -> Result<Self> {
        if w.shape.len() != 2 {
            candle_core::bail!("NF4 linear: weight shape {:?} is not (out, in)", w.shape);
        }
        Ok(Frozen::Nf4 {
            w: w.clone(),
            absmax: std::sync::Arc::new(w.absmax_f32()),
        })
    }
    pub(super) fn out_in(&self) -> Result<(usize, usize)> {
        match self {
            Frozen::Dense(w) => w.dims2(),
            Frozen::Nf4 { w, .. } => Ok((w.shape[0], w.shape[1])),
        }
    }
    /// Output rows dequantized per block (about 64K values).
    fn rows_per_block(inn: usize, out: usize) -> usize {
        (65536 / inn.max(1)).clamp(1, out.max(1))
    }
    /// `x2 · Wᵀ` for x2 (tokens, in): a fresh contiguous (tokens, out) tensor. An NF4 weight is
    /// dequantized block by block, each block's product written into its columns of one output.
    pub(super) fn forward(&self, x2: &Tensor) -> Result<Tensor> {
        use super::gemm::{gemm_into_ld, Mat, Par};
        match self {
            Frozen::Dense(w) => x2.matmul(&w.t()?),
            Frozen::Nf4 { w, absmax } => {
                let (out, inn) = (w.shape[0], w.shape[1]);
                let rows = Self::rows_per_block(inn, out);
                let x2 = x2.contiguous()?;
                let tokens = x2.dim(0)?;
                let mut y = vec![0f32; tokens * out];
                if tokens > 0 {
                    let (xs, xl) = x2.storage_and_layout();
                    let xv = super::kernels::cpu_f32(&xs, xl)?;
                    for r0 in (0..out).step_by(rows) {
                        let n = rows.min(out - r0);
                        let wc = nf4_rows_vec(w, absmax, r0, n);
                        gemm_into_ld(
                            &mut y[r0..],
                            out,
                            Mat::rm(xv, tokens, inn),
                            Mat::rm(&wc, n, inn).t(),
                            1.0,
                            false,
                            Par::all(),
                        )?;
                    }
                }
                Tensor::from_vec(y, (tokens, out), &candle_core::Device::Cpu)
            }
        }
    }
    /// `g2 · W` for g2 (tokens, out): a fresh contiguous (tokens, in) tensor. An NF4 weight is
    /// dequantized block by block, each block's share accumulated into one buffer by the GEMM.
    pub(super) fn input_grad(&self, g2: &Tensor) -> Result<Tensor> {
        use super::gemm::{gemm_into, Mat, Par};
        match self {
            Frozen::Dense(w) => g2.matmul(w),
            Frozen::Nf4 { w, absmax } => {
                let (out, inn) = (w.shape[0], w.shape[1]);
                let rows = Self::rows_per_block(inn, out);
                let g2 = g2.contiguous()?;
                let tokens = g2.dim(0)?;
                let mut gx = vec![0f32; tokens * inn];
                if tokens > 0 {
                    let (gs, gl) = g2.storage_and_layout();
                    let gv = super::kernels::cpu_f32(&gs, gl)?;
                    for (bi, r0) in (0..out).step_by(rows).enumerate() {
                        let n = rows.min(out - r0);
                        let wc = nf4_rows_vec(w, absmax, r0, n);
                        gemm_into(
                            &mut gx,
                            Mat::strided(&gv[r0..], tokens, n, out, 1),
                            Mat::rm(&wc, n, inn),
                            1.0,
                            bi > 0,
                            Par::all(),
                        )?;
                    }
                }
                Tensor::from_vec(gx, (tokens, inn), &candle_core::Device::Cpu)
            }
        }
    }
}

/// Rows `r0..r0 + n` of an NF4 weight (out, in), dequantized into a row-major buffer.
fn nf4_rows_vec(w: &Nf4Tensor, absmax: &[f32], r0: usize, n: usize) -> Vec<f32> {
    use rayon::prelude::*;
    let inn = w.shape[1];
    let mut buf = vec![0f32; n * inn];
    buf.par_chunks_mut(inn)
        .enumerate()
        .for_each(|(i, row)| w.dequantize_into(absmax, (r0 + i) * inn, row));
    buf
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
