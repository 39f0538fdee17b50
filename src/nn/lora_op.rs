//! The fused LoRA node ([`lora_linear`], and [`qlora_linear`] over an NF4 base) and DoRA's column
//! scaling ([`scale_columns`]): they remove the output-sized intermediates that candle keeps per
//! elementwise node, in both passes. Each has a composite reference in the tests.

use super::frozen::{add_assign, take_result, Frozen};
use super::kernels::{check_rank, f32_slice, ROWS};
use super::nf4::Nf4Tensor;
use candle_core::{CpuStorage, CustomOp2, Layout, Result, Shape, Tensor};

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
    w: &std::sync::Arc<Nf4Tensor>,
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
