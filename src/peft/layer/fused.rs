//! The adapted layer as a part of a block-level fused node (`nn::block`, `nn::resnet`): its frozen
//! base and the one plain LoRA that runs in this forward, when that is all it runs.

use super::{AdaptedLayer, BaseKind, BaseWeight};
use crate::peft::lora::Lora;
use crate::peft::ForwardCtx;

impl AdaptedLayer {
    /// What runs in this layer's forward when a block-level fused node may take it: `Some(None)`
    /// for no live adapter, `Some(Some((lora, gain)))` for exactly one plain LoRA (unrouted, no
    /// DoRA, no dropout in play), `None` for anything else (a trainable copy, a routed adapter, a
    /// merged one that is routed (its forward raises the error), several adapters, another method).
    fn sole_plain_lora(&self, ctx: &ForwardCtx) -> Option<Option<(&Lora, f64)>> {
        if self.saved.is_some() || self.merged.iter().any(|m| ctx.is_routed(&m.name)) {
            return None;
        }
        let live = self.live();
        let (name, s) = match live.as_slice() {
            [] => return Some(None),
            [(name, s)] => (name, s),
            _ => return None,
        };
        if ctx.is_routed(name) || s.adapter.module_dropout() > 0.0 {
            return None;
        }
        let a: &dyn std::any::Any = s.adapter.as_ref();
        let l = a.downcast_ref::<Lora>()?;
        if l.magnitude.is_some() || (ctx.train && l.dropout > 0.0) {
            return None;
        }
        Some(Some((l, s.gain)))
    }

    /// This linear layer as a projection of the block-level nodes ([`crate::nn::block`]):
    /// its frozen weight (dense or NF4) and bias and the one plain LoRA that runs in this forward, if any.
    /// `None` when the layer needs its own forward.
    pub fn plain_linear(&self, ctx: &ForwardCtx) -> Option<crate::nn::block::LinearPart> {
        if self.kind() != BaseKind::Linear {
            return None;
        }
        let base = match self.base.weight() {
            BaseWeight::Dense(w) => crate::nn::block::ProjBase::Dense(w.clone()),
            BaseWeight::Nf4(q) => crate::nn::block::ProjBase::Nf4(q.clone()),
        };
        let lora = match self.sole_plain_lora(ctx)? {
            None => None,
            Some((l, gain)) => {
                let (a, b) = (ctx.read(&l.a), ctx.read(&l.b));
                if a.rank() != 2 || b.rank() != 2 {
                    return None;
                }
                Some(crate::nn::block::LoraFactors {
                    a,
                    b,
                    scale: l.scale * gain,
                })
            }
        };
        Some(crate::nn::block::LinearPart {
            base,
            bias: self.base.bias.clone(),
            lora,
        })
    }

    /// This conv layer as a part of a block-level fused node ([`crate::nn::resnet`]): its frozen
    /// dense kernel and bias and the one plain LoCon that runs in this forward, if any. `None` when
    /// the layer needs its own forward.
    pub fn plain_conv(&self, ctx: &ForwardCtx) -> Option<crate::nn::resnet::ConvPart> {
        let (BaseKind::Conv2d(cfg), BaseWeight::Dense(w)) = (self.kind(), self.base.weight())
        else {
            return None;
        };
        let lora = match self.sole_plain_lora(ctx)? {
            None => None,
            Some((l, gain)) => {
                let (a, b) = (ctx.read(&l.a), ctx.read(&l.b));
                if a.rank() != 4 || b.rank() != 4 {
                    return None;
                }
                Some(crate::nn::resnet::Locon {
                    a,
                    b,
                    scale: l.scale * gain,
                })
            }
        };
        Some(crate::nn::resnet::ConvPart {
            weight: w.clone(),
            bias: self.base.bias.clone(),
            cfg,
            lora,
        })
    }
}
