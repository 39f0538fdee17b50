//! Custom ops for frozen base weights.
//!
//! candle's matmul and conv2d backward always compute the weight gradient, even when the weight is a
//! plain (frozen) tensor: a weight-sized buffer per layer per step, for nothing. The ops here compute
//! the forward with ordinary candle kernels on a detached input, then attach a node whose backward
//! returns only the input gradient (`g · W` for a linear layer, a transposed convolution for conv2d).
//! No weight-sized gradient is ever allocated.

use candle_core::{backend::BackendStorage, CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

/// Re-attaches a detached forward result `y` to the graph of the input `x`, with a backward that
/// only knows how to map the output gradient to the input gradient.
struct Attach<F: Fn(&Tensor) -> Result<Tensor> + Send + Sync> {
    name: &'static str,
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

impl<F: Fn(&Tensor) -> Result<Tensor> + Send + Sync> CustomOp2 for Attach<F> {
    fn name(&self) -> &'static str {
        self.name
    }
    fn cpu_fwd(
        &self,
        _x: &CpuStorage,
        _xl: &Layout,
        y: &CpuStorage,
        yl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        Ok((copy_contiguous(y, yl)?, yl.shape().clone()))
    }
    fn bwd(
        &self,
        _x: &Tensor,
        _y: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some((self.input_grad)(grad)?), None))
    }
}

fn attach<F>(x: &Tensor, y: Tensor, name: &'static str, input_grad: F) -> Result<Tensor>
where
    F: Fn(&Tensor) -> Result<Tensor> + Send + Sync + 'static,
{
    if !x.track_op() {
        // Nothing upstream needs a gradient: the plain result is enough.
        return Ok(y);
    }
    if !x.device().is_cpu() {
        // The copy-attach kernel is CPU only; elsewhere fall back to the differentiable path
        // (correct, at the cost of the weight gradient).
        return Err(candle_core::Error::Msg("frozen op: non-CPU device".into()));
    }
    x.apply_op2_arc(
        &y,
        std::sync::Arc::new(Box::new(Attach { name, input_grad })),
    )
}

/// `x · Wᵀ` for a frozen weight `w` of shape (out, in); `x` is (..., in). Backward gives only dL/dx.
pub fn frozen_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
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

/// `x · Wᵀ` through a 2-D matmul (the fast path for contiguous inputs of any rank).
pub fn plain_linear(x: &Tensor, w: &Tensor) -> Result<Tensor> {
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
