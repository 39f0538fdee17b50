//! The attention core every model family shares: heads split and merged, grouped-query key/value
//! heads repeated, causal masks, scaled dot-product attention `softmax(q·kᵀ/√d + mask)·v` on the
//! fused masked softmax (one node, neither the scaled nor the masked scores kept for the backward),
//! and LongLoRA's shifted sparse attention built on it.

use super::softmax::scaled_masked_softmax;
use crate::{Error, Result};
use candle_core::{Device, Tensor};

/// (B, N, H·D) → (B, H, N, D), contiguous.
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, n, c) = x.dims3()?;
    if heads == 0 || c % heads != 0 {
        return Err(Error::Msg(format!(
            "attention: width {c} does not split into {heads} heads"
        )));
    }
    Ok(x.reshape((b, n, heads, c / heads))?
        .transpose(1, 2)?
        .contiguous()?)
}

/// (B, H, N, D) → (B, N, H·D), contiguous.
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, n, d) = x.dims4()?;
    Ok(x.transpose(1, 2)?.contiguous()?.reshape((b, n, h * d))?)
}

/// Grouped-query attention: each of the (B, KVH, S, D) key/value heads repeated `rep` times in
/// place (head i of the result reads key head i / rep), as transformers' `repeat_kv`.
pub fn repeat_kv(x: &Tensor, rep: usize) -> Result<Tensor> {
    if rep == 1 {
        return Ok(x.clone());
    }
    let (b, kvh, s, d) = x.dims4()?;
    Ok(x.unsqueeze(2)?
        .broadcast_as((b, kvh, rep, s, d))?
        .reshape((b, kvh * rep, s, d))?)
}

/// The additive causal mask (1, 1, T, past + T): query i (at position past + i) sees keys 0..=past + i.
pub fn causal_mask(t: usize, past: usize, device: &Device) -> Result<Tensor> {
    let v: Vec<f32> = (0..t)
        .flat_map(|i| {
            (0..past + t).map(move |j| if j > past + i { f32::NEG_INFINITY } else { 0.0 })
        })
        .collect();
    Ok(Tensor::from_vec(v, (1, 1, t, past + t), device)?)
}

/// Scaled dot-product attention over heads: q (B, H, Tq, D), k (B, H, Tk, D), v (B, H, Tk, Dv) →
/// (B, H, Tq, Dv), with the scale 1/√D and an optional additive mask (B or 1, 1, Tq, Tk) that
/// carries no gradient.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let d = q.dim(3)?;
    // The score matrix is the one allocation that grows with the square of the tokens (an image
    // model at a resolution it was not made for): refuse it with the estimate, not an abort.
    let (b, h, tq, tk) = (q.dim(0)?, q.dim(1)?, q.dim(2)?, k.dim(2)?);
    let floats = (b * h) as u128 * tq as u128 * tk as u128;
    crate::util::mem::ensure_fits(
        &format!("attention over {tq}×{tk} tokens"),
        floats * 4 * 2,
        &format!("{b}×{h}×{tq}×{tk} scores and their softmax, f32"),
        "lower the resolution, the batch size or the sequence length",
    )?;
    // A contiguous k's transpose is a strided view the matmul reads as is (no copy).
    let scores = q.matmul(&k.contiguous()?.t()?)?;
    Ok(scaled_masked_softmax(&scores, 1.0 / (d as f64).sqrt(), mask)?.matmul(&v.contiguous()?)?)
}

/// `torch.roll(x, shift, dim)`: element i moves to (i + shift) mod n.
fn roll(x: &Tensor, shift: i64, dim: usize) -> Result<Tensor> {
    let n = x.dim(dim)? as i64;
    let s = shift.rem_euclid(n.max(1)) as usize;
    if s == 0 {
        return Ok(x.clone());
    }
    let n = n as usize;
    Ok(Tensor::cat(
        &[x.narrow(dim, n - s, s)?, x.narrow(dim, 0, n - s)?],
        dim,
    )?)
}

/// LongLoRA's shifted sparse attention (S²-Attn, Chen et al. 2024) over q, k, v (B, H, T, D):
/// the sequence is cut into `round(1/ratio)` groups that attend causally within themselves; the
/// second half of the heads works on the sequence rolled back by half a group (so information
/// flows between neighbouring groups), and its output is rolled forward again. As in the
/// official code the causal order is the order inside the group. A length that does not divide
/// into the groups is padded internally (padded keys are masked); `valid` (B·T, 1 = real token)
/// masks padding keys. Returns (B, T, H·D).
pub fn shifted_sparse_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    ratio: f64,
    valid: Option<&[u32]>,
) -> Result<Tensor> {
    let (b, nh, t, hd) = q.dims4()?;
    if !(ratio > 0.0 && ratio <= 1.0) {
        return Err(Error::Config(format!(
            "S²-Attn group size ratio {ratio} must be in (0, 1]"
        )));
    }
    let ng = ((1.0 / ratio).round() as usize).clamp(1, t.max(1));
    let g = t.div_ceil(ng);
    let tp = g * ng;
    let padt = |x: &Tensor| -> Result<Tensor> {
        Ok(if tp > t {
            x.pad_with_zeros(2, 0, tp - t)?
        } else {
            x.clone()
        })
    };
    let (q, k, v) = (padt(q)?, padt(k)?, padt(v)?);
    let half = nh / 2;
    let mut outs = vec![];
    for (h0, h1, shift) in [(0, half, 0usize), (half, nh, g / 2)] {
        if h0 == h1 {
            continue;
        }
        let nhh = h1 - h0;
        let sel = |x: &Tensor| -> Result<Tensor> {
            let x = x.narrow(1, h0, nhh)?;
            let x = roll(&x, -(shift as i64), 2)?;
            // (B, h, Tp, D) -> (B·groups, h, g, D)
            Ok(x.transpose(1, 2)?
                .contiguous()?
                .reshape((b * ng, g, nhh, hd))?
                .transpose(1, 2)?
                .contiguous()?)
        };
        let (qg, kg, vg) = (sel(&q)?, sel(&k)?, sel(&v)?);
        const NEG: f32 = -1e30;
        let mut m = vec![0f32; b * ng * g * g];
        for bi in 0..b {
            for gi in 0..ng {
                for i in 0..g {
                    for j in 0..g {
                        let orig = (gi * g + j + shift) % tp;
                        let ok = j <= i && orig < t && valid.is_none_or(|v| v[bi * t + orig] != 0);
                        if !ok {
                            m[((bi * ng + gi) * g + i) * g + j] = NEG;
                        }
                    }
                }
            }
        }
        let mask = Tensor::from_vec(m, (b * ng, 1, g, g), q.device())?;
        let a = attention(&qg, &kg, &vg, Some(&mask))?;
        // (B·groups, h, g, D) -> (B, Tp, h, D), rolled back.
        let a = a.transpose(1, 2)?.contiguous()?.reshape((b, tp, nhh, hd))?;
        outs.push(roll(&a, shift as i64, 1)?);
    }
    let a = Tensor::cat(&outs, 2)?;
    Ok(a.narrow(1, 0, t)?.contiguous()?.reshape((b, t, nh * hd))?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::nn::softmax::softmax_composite;
    use candle_core::Var;

    fn randn(shape: &[usize], seed: u64) -> Tensor {
        let mut rng = crate::rng::rng_for(seed, "attention-test");
        crate::rng::normal(shape, 1.0, &mut rng).unwrap()
    }

    /// The shared core equals softmax(q·kᵀ/√d + mask)·v composed from plain ops, in value and in
    /// the gradients of q, k and v, with a causal mask over a cached prefix.
    #[test]
    fn attention_equals_the_composition_in_value_and_gradient() {
        let (b, h, t, past, d) = (2, 3, 4, 2, 5);
        let q = Var::from_tensor(&randn(&[b, h, t, d], 1)).unwrap();
        let k = Var::from_tensor(&randn(&[b, h, past + t, d], 2)).unwrap();
        let v = Var::from_tensor(&randn(&[b, h, past + t, d], 3)).unwrap();
        let mask = causal_mask(t, past, &Device::Cpu).unwrap();
        let w = randn(&[b, h, t, d], 4);
        let fused = attention(&q, &k, &v, Some(&mask)).unwrap();
        let s = (q.matmul(&k.t().unwrap()).unwrap() * (1.0 / (d as f64).sqrt()))
            .unwrap()
            .broadcast_add(&mask)
            .unwrap();
        let composed = softmax_composite(&s).unwrap().matmul(&v).unwrap();
        let diff = |a: &Tensor, b: &Tensor| -> f32 {
            (a - b)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar()
                .unwrap()
        };
        assert!(diff(&fused, &composed) < 1e-5);
        let gf = (&fused * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        let gc = (&composed * &w)
            .unwrap()
            .sum_all()
            .unwrap()
            .backward()
            .unwrap();
        for x in [&q, &k, &v] {
            let (a, c) = (gf.get(x).unwrap(), gc.get(x).unwrap());
            assert!(diff(a, c) < 1e-5, "{}", diff(a, c));
            assert!(
                c.abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    > 0.0
            );
        }
        // Query 0 sits at position `past`: it sees keys 0..=past and nothing after.
        let m = mask.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(m[past], 0.0);
        assert_eq!(m[past + 1], f32::NEG_INFINITY);
    }

    #[test]
    fn heads_split_merge_and_repeat() {
        let x = randn(&[2, 3, 8], 5);
        let s = split_heads(&x, 4).unwrap();
        assert_eq!(s.dims(), &[2, 4, 3, 2]);
        let back = merge_heads(&s).unwrap();
        assert_eq!(back.to_vec3::<f32>().unwrap(), x.to_vec3::<f32>().unwrap());
        assert!(split_heads(&x, 3)
            .unwrap_err()
            .to_string()
            .contains("3 heads"));
        // repeat_kv: head i of the result is key head i / rep.
        let kv = randn(&[1, 2, 3, 4], 6);
        let r = repeat_kv(&kv, 3).unwrap();
        assert_eq!(r.dims(), &[1, 6, 3, 4]);
        for i in 0..6 {
            assert_eq!(
                r.narrow(1, i, 1)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap(),
                kv.narrow(1, i / 3, 1)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
            );
        }
    }

    #[test]
    fn an_attention_too_large_for_the_machine_is_refused_before_allocating() {
        if crate::util::mem::available_bytes().is_none() {
            return;
        }
        // 2^21 tokens: the scores would take 2^42 floats (16 TiB); q and k take 8 MiB each.
        let t = 1usize << 21;
        let q = Tensor::zeros((1, 1, t, 1), candle_core::DType::F32, &Device::Cpu).unwrap();
        let e = attention(&q, &q, &q, None).unwrap_err().to_string();
        assert!(
            e.contains("attention over 2097152×2097152 tokens needs about"),
            "{e}"
        );
    }
}
