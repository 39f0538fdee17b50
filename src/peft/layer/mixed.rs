//! Mixed precision in the adapted layer: a half-precision base with f32 adapters.

use super::{AdaptedLayer, BaseKind};
use crate::peft::ForwardCtx;
use crate::Result;
use candle_core::Tensor;

impl AdaptedLayer {
    /// Mixed precision as PEFT runs it: the base in its own dtype (bf16 / f16) on the input cast
    /// to it, every adapter in f32 on the input cast to f32, each delta cast back and added; the
    /// output is in the base's dtype. Adapters and their gradients stay f32. Methods that rescale
    /// the base (DoRA, IA3) and trainable full copies are refused by name on such a base.
    pub(super) fn forward_mixed(
        &self,
        x: &Tensor,
        ctx: &ForwardCtx,
        bd: candle_core::DType,
    ) -> Result<Tensor> {
        use candle_core::DType;
        let emb = self.kind() == BaseKind::Embedding;
        if self.saved.is_some() && self.enabled {
            return Err(self.err(format!(
                "modules_to_save (a trainable full copy) on a {bd:?} base is not supported; load the model in f32 (--dtype f32)"
            )));
        }
        let xb = if emb { x.clone() } else { x.to_dtype(bd)? };
        let wx = self.base.forward_nobias(&xb)?;
        let y0 = self.base.add_bias(wx.clone(), self.base.bias.as_ref())?;
        let live = self.live();
        if live.is_empty() {
            return Ok(y0);
        }
        let x32 = if emb {
            x.clone()
        } else {
            x.to_dtype(DType::F32)?
        };
        let (wx32, y032) = (wx.to_dtype(DType::F32)?, y0.to_dtype(DType::F32)?);
        let mut y = y0;
        for (name, s) in live {
            let a = &s.adapter;
            if a.rescales_weight() || a.rescale(&self.base, s.gain, ctx)?.is_some() {
                return Err(self.err(format!(
                    "adapter `{name}` ({:?}{}) rescales the base, which is not supported on a {bd:?} base; load the model in f32 (--dtype f32)",
                    a.method(),
                    if a.rescales_weight() { ", DoRA" } else { "" }
                )));
            }
            if let Some(d) = self.adapter_delta(name, s, &x32, &wx32, &y032, ctx)? {
                y = (y + d.to_dtype(bd)?)?;
            }
        }
        Ok(y)
    }
}
