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

/// Scaled dot-product attention over heads: q (B, H, Tq, D), k (B, KVH, Tk, D), v (B, KVH, Tk, Dv)
/// → (B, H, Tq, Dv), with the scale 1/√D and an optional additive mask (B or 1, 1, Tq, Tk) that
/// carries no gradient. KVH may divide H (grouped-query attention: query head i reads key/value
/// head i / (H / KVH)). On the CPU in f32 this is one tiled node ([`super::flash`]) that never
/// holds the Tq×Tk scores; elsewhere the composition on the fused masked softmax.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, mask: Option<&Tensor>) -> Result<Tensor> {
    let (b, h, tq, d) = q.dims4()?;
    let (kb, kvh, tk, kd) = k.dims4()?;
    let (vb, vh, vt, _) = v.dims4()?;
    if kb != b || vb != b || kd != d || vh != kvh || vt != tk || kvh == 0 || h % kvh != 0 {
        return Err(Error::Msg(format!(
            "attention: q {:?}, k {:?} and v {:?} do not fit together (batch, key/value heads dividing the query heads, key width)",
            q.dims(),
            k.dims(),
            v.dims()
        )));
    }
    if let Some(m) = mask {
        let (mb, mh, mq, mk) = m.dims4()?;
        if !(mb == b || mb == 1) || mh != 1 || mq != tq || mk != tk {
            return Err(Error::Msg(format!(
                "attention mask {:?} does not fit {b}×{h}×{tq}×{tk} scores",
                m.dims()
            )));
        }
    }
    let scale = 1.0 / (d as f64).sqrt();
    let miss = [q, k, v]
        .into_iter()
        .find_map(super::fallback::cpu_f32_miss);
    let miss = miss.or_else(|| (d == 0).then(|| "key width 0".to_string()));
    match miss {
        None => Ok(super::flash::tiled_attention(q, k, v, scale as f32, mask)?),
        Some(why) => {
            super::fallback::note(|| ("tiled attention".into(), why));
            attention_composed(q, k, v, mask)
        }
    }
}

/// [`attention`] as a composition: scores, the fused masked softmax, and the product with v. The
/// reference the tiled node is tested against, and its path on other devices and dtypes.
pub fn attention_composed(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
) -> Result<Tensor> {
    let d = q.dim(3)?;
    let rep = q.dim(1)? / k.dim(1)?.max(1);
    let (k, v) = (repeat_kv(k, rep)?, repeat_kv(v, rep)?);
    // The score matrix is the one allocation that grows with the square of the tokens (an image
    // model at a resolution it was not made for): refuse it with the estimate, not an abort.
    let (b, h, tq, tk) = (q.dim(0)?, q.dim(1)?, q.dim(2)?, k.dim(2)?);
    let floats = (b * h) as u128 * tq as u128 * tk as u128;
    crate::util::mem::ensure_fits(
        &format!("attention over {tq}×{tk} tokens"),
        floats * 4 * 2,
        &format!(
            "{b}×{h}×{tq}×{tk} scores and their softmax, {:?}",
            q.dtype()
        ),
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
        let inp = |shape: &[usize], seed| {
            crate::nn::test_util::input("attention-test", shape, seed, true)
        };
        let ((qv, q), (kv, k), (vv, v)) = (
            inp(&[b, h, t, d], 1),
            inp(&[b, h, past + t, d], 2),
            inp(&[b, h, past + t, d], 3),
        );
        let mask = causal_mask(t, past, &Device::Cpu).unwrap();
        let fused = attention(&q, &k, &v, Some(&mask)).unwrap();
        let s = (q.matmul(&k.t().unwrap()).unwrap() * (1.0 / (d as f64).sqrt())).unwrap();
        let composed = softmax_composite(&s.broadcast_add(&mask).unwrap())
            .unwrap()
            .matmul(&v)
            .unwrap();
        let asked = [("q", &qv), ("k", &kv), ("v", &vv)];
        crate::nn::test_util::compare(&fused, &composed, &asked, &[], &[], 4);
        // Query 0 sits at position `past`: it sees keys 0..=past and nothing after.
        let m = mask.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(m[past], 0.0);
        assert_eq!(m[past + 1], f32::NEG_INFINITY);
    }

    /// The tiled node equals the composition in value and in the gradients of q, k and v:
    /// grouped-query heads, a key width unlike the value width, query counts that leave a partial
    /// block (a strip of 65536 / Tk rows), cross-attention shapes (Tk ≪ Tq), a shared and a
    /// per-batch mask, and a padded row whose keys are all masked (it attends to nothing).
    #[test]
    fn the_tiled_node_equals_the_composition_in_value_and_every_gradient() {
        let cases: [(usize, usize, usize, usize, usize, usize, usize, u8); 7] = [
            // (b, h, kvh, tq, tk, d, dv, mask: 0 none, 1 causal shared, 2 per batch with a dead row)
            (2, 3, 3, 5, 7, 4, 6, 0),
            (2, 4, 2, 9, 9, 8, 8, 1),
            (1, 2, 1, 300, 8, 4, 4, 0),
            (2, 2, 2, 137, 600, 3, 5, 0),
            (3, 2, 1, 6, 6, 5, 5, 2),
            (1, 1, 1, 1, 0, 4, 4, 0),
            // 3: transformers-style finite masking (−1e30), with batch 0's first row fully masked.
            (2, 2, 1, 5, 5, 4, 4, 3),
        ];
        for (ci, &(b, h, kvh, tq, tk, d, dv, mk)) in cases.iter().enumerate() {
            let seed = 10 * ci as u64;
            let q = Var::from_tensor(&randn(&[b, h, tq, d], seed)).unwrap();
            let k = Var::from_tensor(&randn(&[b, kvh, tk, d], seed + 1)).unwrap();
            let v = Var::from_tensor(&randn(&[b, kvh, tk, dv], seed + 2)).unwrap();
            let w = randn(&[b, h, tq, dv], seed + 3);
            let mask = match mk {
                1 => Some(causal_mask(tq, tk - tq, &Device::Cpu).unwrap()),
                2 => {
                    let mut m = vec![0f32; b * tq * tk];
                    for bi in 0..b {
                        for qi in 0..tq {
                            for ki in 0..tk {
                                // Batch row bi masks its last bi keys; row 1 of batch 2 masks all.
                                if ki + bi >= tk || (bi == 2 && qi == 1) {
                                    m[(bi * tq + qi) * tk + ki] = f32::NEG_INFINITY;
                                }
                            }
                        }
                    }
                    Some(Tensor::from_vec(m, (b, 1, tq, tk), &Device::Cpu).unwrap())
                }
                3 => {
                    let m: Vec<f32> = (0..b * tq * tk)
                        .map(|i| {
                            let (bi, qi, ki) = (i / (tq * tk), (i / tk) % tq, i % tk);
                            if ki > qi || (bi == 0 && qi == 0) {
                                -1e30
                            } else {
                                0.0
                            }
                        })
                        .collect();
                    Some(Tensor::from_vec(m, (b, 1, tq, tk), &Device::Cpu).unwrap())
                }
                _ => None,
            };
            let tiled = attention(&q, &k, &v, mask.as_ref()).unwrap();
            let composed = attention_composed(&q, &k, &v, mask.as_ref()).unwrap();
            assert_eq!(tiled.dims(), &[b, h, tq, dv]);
            // The composition gives NaN on a row with every key masked; the tiled node gives 0.
            let finite = |t: &Tensor| -> Vec<f32> {
                t.flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .into_iter()
                    .map(|x| if x.is_nan() { 0.0 } else { x })
                    .collect()
            };
            let close = |a: &Tensor, c: &Tensor, what: &str| {
                let (a, c) = (finite(a), finite(c));
                assert_eq!(a.len(), c.len(), "case {ci} {what}: sizes");
                let worst = a
                    .iter()
                    .zip(&c)
                    .map(|(x, y)| (x - y).abs())
                    .fold(0f32, f32::max);
                assert!(worst < 2e-5, "case {ci} {what}: {worst:e}");
            };
            close(&tiled, &composed, "value");
            if tk == 0 {
                assert!(finite(&tiled).iter().all(|x| *x == 0.0));
                continue;
            }
            let lt = (&tiled * &w).unwrap().sum_all().unwrap();
            let gt = lt.backward().unwrap();
            // The composition's NaN rows would poison its gradients: weight them out.
            let wc = if mk == 2 {
                let keepm: Vec<f32> = finite(
                    &composed
                        .ne(&composed)
                        .unwrap()
                        .to_dtype(candle_core::DType::F32)
                        .unwrap(),
                )
                .into_iter()
                .map(|n| 1.0 - n)
                .collect();
                (&w * Tensor::from_vec(keepm, (b, h, tq, dv), &Device::Cpu).unwrap()).unwrap()
            } else {
                w.clone()
            };
            let gc = if mk == 2 {
                // Recompose without the dead row (batch 2, query 1), whose composed gradient is NaN.
                let alive = |t: &Tensor| t.narrow(0, 0, 2).unwrap();
                let m = mask.as_ref().unwrap().narrow(0, 0, 2).unwrap();
                let c = attention_composed(&alive(&q), &alive(&k), &alive(&v), Some(&m)).unwrap();
                let g = (c * alive(&wc))
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                // Batch 2 checked on its own: the live rows' gradients through row 0 and 2.. only.
                let row = |t: &Tensor| t.narrow(0, 2, 1).unwrap();
                let (qs, ks, vs) = (row(&q), row(&k), row(&v));
                let mut live_m = mask
                    .as_ref()
                    .unwrap()
                    .narrow(0, 2, 1)
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap();
                for x in live_m[tk..2 * tk].iter_mut() {
                    *x = 0.0;
                }
                let lm = Tensor::from_vec(live_m, (1, 1, tq, tk), &Device::Cpu).unwrap();
                let c2 = attention_composed(&qs, &ks, &vs, Some(&lm)).unwrap();
                let g2 = (c2 * row(&wc))
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap();
                for x in [&q, &k, &v] {
                    let a = gt.get(x).unwrap();
                    close(
                        &a.narrow(0, 0, 2).unwrap(),
                        &g.get(x).unwrap().narrow(0, 0, 2).unwrap(),
                        "gradient (batch 0-1)",
                    );
                    close(
                        &a.narrow(0, 2, 1).unwrap(),
                        &g2.get(x).unwrap().narrow(0, 2, 1).unwrap(),
                        &format!("gradient (batch 2) {:?}", x.dims()),
                    );
                }
                continue;
            } else {
                (&composed * &wc)
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .backward()
                    .unwrap()
            };
            for (x, name) in [(&q, "dq"), (&k, "dk"), (&v, "dv")] {
                let (a, c) = (gt.get(x).unwrap(), gc.get(x).unwrap());
                assert_eq!(a.dims(), x.dims());
                close(a, c, name);
                assert!(
                    finite(a).iter().any(|x| *x != 0.0),
                    "case {ci} {name} is zero"
                );
            }
        }
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
        let e = attention_composed(&q, &q, &q, None)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("attention over 2097152×2097152 tokens needs about"),
            "{e}"
        );
    }
}
