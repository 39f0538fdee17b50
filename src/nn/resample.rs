//! Resampling: nearest-neighbour upsampling as one parallel node whose backward sums blocks.

use super::kernels::f32_slice;
use crate::Result;
use candle_core::{DType, Tensor};

/// Nearest-neighbour upsampling of (b, c, h, w) by an integer `scale` (diffusers' `Upsample2D`,
/// `F.interpolate(scale_factor=2, mode="nearest")`) as one parallel node. Its backward sums each
/// `scale`×`scale` block of the gradient; candle's own backward runs a grouped conv with one group
/// per channel. Falls back to candle off the CPU or for non-f32.
pub fn upsample_nearest(x: &Tensor, scale: usize) -> Result<Tensor> {
    let (_, _, h, w) = x.dims4()?;
    if scale == 0 || h == 0 || w == 0 {
        return Err(crate::Error::Msg(format!(
            "upsample_nearest: cannot upsample {:?} by {scale}",
            x.dims()
        )));
    }
    if !x.device().is_cpu() || x.dtype() != DType::F32 {
        return Ok(x.upsample_nearest2d(h * scale, w * scale)?);
    }
    Ok(x.contiguous()?.apply_op1(UpsampleOp { scale })?)
}

struct UpsampleOp {
    scale: usize,
}

impl candle_core::CustomOp1 for UpsampleOp {
    fn name(&self) -> &'static str {
        "upsample-nearest"
    }
    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let x = f32_slice(s, l, "upsample_nearest")?;
        let (b, c, h, w) = l.shape().dims4()?;
        let k = self.scale;
        let (oh, ow) = (h * k, w * k);
        let mut out = vec![0f32; b * c * oh * ow];
        out.par_chunks_mut(oh * ow)
            .zip(x.par_chunks(h * w))
            .for_each(|(o, x)| {
                for (i, row) in x.chunks(w).enumerate() {
                    let first = &mut o[i * k * ow..(i * k + 1) * ow];
                    for (j, v) in row.iter().enumerate() {
                        first[j * k..(j + 1) * k].fill(*v);
                    }
                    let (done, rest) = o[i * k * ow..(i + 1) * k * ow].split_at_mut(ow);
                    for r in rest.chunks_mut(ow) {
                        r.copy_from_slice(done);
                    }
                }
            });
        Ok((
            candle_core::CpuStorage::F32(out),
            candle_core::Shape::from((b, c, oh, ow)),
        ))
    }
    fn bwd(
        &self,
        _x: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        Ok(Some(
            grad.contiguous()?
                .apply_op1_no_bwd(&BlockSumOp { scale: self.scale })?,
        ))
    }
}

/// Sums each `scale`×`scale` block of (b, c, H, W) → (b, c, H/scale, W/scale).
struct BlockSumOp {
    scale: usize,
}

impl candle_core::CustomOp1 for BlockSumOp {
    fn name(&self) -> &'static str {
        "block-sum"
    }
    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let g = f32_slice(s, l, "block_sum")?;
        let (b, c, oh, ow) = l.shape().dims4()?;
        let k = self.scale;
        let (h, w) = (oh / k, ow / k);
        let mut out = vec![0f32; b * c * h * w];
        out.par_chunks_mut(h * w)
            .zip(g.par_chunks(oh * ow))
            .for_each(|(o, g)| {
                for (i, orow) in o.chunks_mut(w).enumerate() {
                    for r in 0..k {
                        let grow = &g[(i * k + r) * ow..(i * k + r + 1) * ow];
                        for (j, v) in orow.iter_mut().enumerate() {
                            *v += grow[j * k..(j + 1) * k].iter().sum::<f32>();
                        }
                    }
                }
            });
        Ok((
            candle_core::CpuStorage::F32(out),
            candle_core::Shape::from((b, c, h, w)),
        ))
    }
}
