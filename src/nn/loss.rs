//! Language-model losses: token log-probabilities (one node that never materialises the
//! log-softmax), next-token log-probs and cross-entropy, and the fused linear cross-entropy of a
//! frozen output layer that never holds the (N, V) logits.

use super::frozen::attach;
use super::kernels::{f32_slice, fast_exp, row_max};
use crate::{Error, Result};
use candle_core::{DType, Tensor, D};

/// Log-softmax over the last dimension (differentiable).
pub fn log_softmax(logits: &Tensor) -> Result<Tensor> {
    let m = logits.max_keepdim(D::Minus1)?.detach();
    let z = logits.broadcast_sub(&m)?;
    let lse = z.exp()?.sum_keepdim(D::Minus1)?.log()?;
    Ok(z.broadcast_sub(&lse)?)
}

/// Log-probabilities of `targets` under `logits` (..., V): `log_softmax(logits)[..., target]`,
/// one value per row, shaped like `logits` without its last dimension. On the CPU in f32 it is one
/// node that never materialises the log-softmax: the forward keeps a running max and sum per row,
/// the backward writes `g · (onehot − softmax)` straight into the logits' gradient (recomputing
/// the row's log-sum-exp). Elsewhere: log-softmax and gather. A target outside the vocabulary is
/// an error naming it.
pub fn token_logprobs(logits: &Tensor, targets: &[u32]) -> Result<Tensor> {
    let dims = logits.dims();
    let v = dims.last().copied().unwrap_or(0);
    let rows: usize = dims[..dims.len().saturating_sub(1)].iter().product();
    if dims.is_empty() || rows != targets.len() {
        return Err(crate::Error::Msg(format!(
            "{} targets for logits {:?}",
            targets.len(),
            dims
        )));
    }
    if let Some((i, t)) = targets.iter().enumerate().find(|(_, t)| **t as usize >= v) {
        return Err(crate::Error::Msg(format!(
            "target token {t} (row {i}) is outside the vocabulary of {v} logits"
        )));
    }
    let out_shape = &dims[..dims.len() - 1];
    if !logits.device().is_cpu() || logits.dtype() != DType::F32 {
        let lp = log_softmax(logits)?;
        let t = Tensor::from_vec(targets.to_vec(), out_shape, logits.device())?;
        return Ok(lp
            .gather(&t.unsqueeze(D::Minus1)?, D::Minus1)?
            .squeeze(D::Minus1)?);
    }
    let op = TokenLogprobOp {
        targets: std::sync::Arc::new(targets.to_vec()),
        lse: std::sync::Mutex::new(None),
    };
    Ok(logits.contiguous()?.apply_op1(op)?.reshape(out_shape)?)
}

fn row_lse(x: &[f32]) -> f32 {
    let m = row_max(x);
    let mut acc = [0f32; 16];
    let chunks = x.chunks_exact(16);
    let rem = chunks.remainder();
    for c in chunks {
        for i in 0..16 {
            acc[i] += fast_exp(c[i] - m);
        }
    }
    let mut s: f32 = acc.iter().sum();
    for v in rem {
        s += fast_exp(v - m);
    }
    m + s.ln()
}

struct TokenLogprobOp {
    targets: std::sync::Arc<Vec<u32>>,
    /// Each row's log-sum-exp, kept by the forward for the backward.
    lse: std::sync::Mutex<Option<std::sync::Arc<Vec<f32>>>>,
}

impl candle_core::CustomOp1 for TokenLogprobOp {
    fn name(&self) -> &'static str {
        "token-logprob"
    }
    fn cpu_fwd(
        &self,
        s: &candle_core::CpuStorage,
        l: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let x = f32_slice(s, l, "token-logprob")?;
        let d = l.shape().dims().last().copied().unwrap_or(1).max(1);
        let lse: Vec<f32> = x.par_chunks(d).map(row_lse).collect();
        let out: Vec<f32> = x
            .chunks(d)
            .zip(self.targets.iter())
            .zip(&lse)
            .map(|((row, &t), l)| row[t as usize] - l)
            .collect();
        if let Ok(mut g) = self.lse.lock() {
            *g = Some(std::sync::Arc::new(lse));
        }
        let n = out.len();
        Ok((
            candle_core::CpuStorage::F32(out),
            candle_core::Shape::from(n),
        ))
    }
    fn bwd(
        &self,
        arg: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let g = grad.flatten_all()?.contiguous()?;
        let lse = self.lse.lock().ok().and_then(|g| g.clone());
        Ok(Some(arg.contiguous()?.apply_op2_no_bwd(
            &g,
            &TokenLogprobBwd {
                targets: self.targets.clone(),
                lse,
            },
        )?))
    }
}

struct TokenLogprobBwd {
    targets: std::sync::Arc<Vec<u32>>,
    lse: Option<std::sync::Arc<Vec<f32>>>,
}

impl candle_core::CustomOp2 for TokenLogprobBwd {
    fn name(&self) -> &'static str {
        "token-logprob-bwd"
    }
    fn cpu_fwd(
        &self,
        sx: &candle_core::CpuStorage,
        lx: &candle_core::Layout,
        sg: &candle_core::CpuStorage,
        lg: &candle_core::Layout,
    ) -> candle_core::Result<(candle_core::CpuStorage, candle_core::Shape)> {
        use rayon::prelude::*;
        let (x, g) = (
            f32_slice(sx, lx, "token-logprob")?,
            f32_slice(sg, lg, "token-logprob")?,
        );
        let d = lx.shape().dims().last().copied().unwrap_or(1).max(1);
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(d)
            .zip(x.par_chunks(d))
            .zip(g.par_iter().zip(self.targets.par_iter()))
            .enumerate()
            .for_each(|(i, ((o, row), (&gi, &t)))| {
                if gi == 0.0 {
                    return;
                }
                let lse = match &self.lse {
                    Some(l) if l.len() > i => l[i],
                    _ => row_lse(row),
                };
                for (oo, xx) in o.iter_mut().zip(row) {
                    *oo = -gi * fast_exp(xx - lse);
                }
                o[t as usize] += gi;
            });
        Ok((candle_core::CpuStorage::F32(out), lx.shape().clone()))
    }
}

/// Next-token log-probs: for logits (B, T, V) and ids (B, T), `log p(ids[:, t + 1] | logits[:, t])`
/// for t < T − 1, shaped (B, T − 1), through the fused [`token_logprobs`] (no
/// copy of the logits, no log-softmax kept for the backward).
pub fn shifted_logprobs(logits: &Tensor, ids: &Tensor) -> Result<Tensor> {
    let (b, t, _) = logits.dims3()?;
    if ids.dims() != [b, t] || t < 2 {
        return Err(Error::Msg(format!(
            "logits {:?} and ids {:?} do not fit (or fewer than two tokens)",
            logits.dims(),
            ids.dims()
        )));
    }
    let targets = shift_left(&ids.to_dtype(DType::U32)?.to_vec2::<u32>()?, 0);
    Ok(token_logprobs(logits, &targets)?.narrow(1, 0, t - 1)?)
}

/// The rows of `rows` moved one place to the left and flattened, each row's last place set to
/// `fill`: what position t predicts (the value at t + 1), per position.
pub(crate) fn shift_left<T: Copy>(rows: &[Vec<T>], fill: T) -> Vec<T> {
    let mut out = Vec::with_capacity(rows.iter().map(Vec::len).sum());
    for row in rows {
        out.extend_from_slice(row.get(1..).unwrap_or_default());
        out.push(fill);
    }
    out
}

/// Mean next-token cross-entropy of `logits` (B, T, V) for `ids` (B, T), counting the targets whose
/// `weights` (B, T; 1 = counted) are nonzero: position t predicts token t + 1.
pub fn next_token_loss(logits: &Tensor, ids: &Tensor, weights: &Tensor) -> Result<Tensor> {
    let (b, t, _) = logits.dims3()?;
    if t < 2 {
        return Err(Error::Msg(
            "next-token loss needs at least two tokens".into(),
        ));
    }
    let picked = shifted_logprobs(logits, ids)?;
    let w = weights.narrow(1, 1, t - 1)?.to_dtype(DType::F32)?;
    let n = w.sum_all()?.to_scalar::<f32>()?;
    if n <= 0.0 {
        return Err(Error::Msg(format!(
            "no target token carries weight in a batch of {b}x{t}"
        )));
    }
    Ok(((picked * w)?.sum_all()? * (-1.0 / n as f64))?)
}

/// Logits that [`linear_cross_entropy`] holds at once: 8M values (32 MB in f32; 256 rows of a
/// 32K vocabulary). Smaller chunks make the output-layer matmuls repack the weight too often.
const LCE_CHUNK_VALUES: usize = 1 << 23;

/// Weighted mean cross-entropy of a frozen, bias-free output layer, straight from its input:
/// `−Σᵢ cᵢ · log_softmax(hᵢ · Wᵀ)[targetᵢ] / Σᵢ cᵢ` over the rows of `h` (N, D) with `W` (V, D),
/// targets and non-negative coefficients `c` (one per row). The same value as the output layer
/// followed by [`token_logprobs`], but the (N, V) logits are never held: rows go through in chunks
/// of [`LCE_CHUNK_VALUES`] logits, rows with `c = 0` are skipped (they cost no matmul), and when `h`
/// needs a gradient each chunk's `dL/dh = (c/Σc)·(softmax − onehot) · W` is computed while its
/// logits are at hand, so the backward is one scale of a stored (N, D) tensor: no second pass over
/// the vocabulary and no logits-sized gradient. `W` gets no gradient (it must be frozen). CPU f32.
pub fn linear_cross_entropy(
    h: &Tensor,
    w: &Tensor,
    targets: &[u32],
    coefs: &[f32],
) -> Result<Tensor> {
    linear_cross_entropy_chunked(h, w, targets, coefs, LCE_CHUNK_VALUES)
}

fn linear_cross_entropy_chunked(
    h: &Tensor,
    w: &Tensor,
    targets: &[u32],
    coefs: &[f32],
    chunk_values: usize,
) -> Result<Tensor> {
    use rayon::prelude::*;
    let (n, d) = h.dims2()?;
    let (v, dw) = w.dims2()?;
    if dw != d || targets.len() != n || coefs.len() != n {
        return Err(crate::Error::Msg(format!(
            "linear cross-entropy: hidden {:?}, output weight {:?}, {} targets and {} weights do not fit",
            h.dims(),
            w.dims(),
            targets.len(),
            coefs.len()
        )));
    }
    if !h.device().is_cpu() || h.dtype() != DType::F32 || w.dtype() != DType::F32 {
        return Err(crate::Error::Msg(
            "linear cross-entropy: CPU f32 only".into(),
        ));
    }
    if let Some((i, t)) = targets.iter().enumerate().find(|(_, t)| **t as usize >= v) {
        return Err(crate::Error::Msg(format!(
            "target token {t} (row {i}) is outside the vocabulary of {v} logits"
        )));
    }
    if let Some((i, c)) = coefs
        .iter()
        .enumerate()
        .find(|(_, c)| !(c.is_finite() && **c >= 0.0))
    {
        return Err(crate::Error::Msg(format!(
            "linear cross-entropy: weight {c} of row {i} is not a finite non-negative number"
        )));
    }
    let total: f64 = coefs.iter().map(|&c| c as f64).sum();
    if total <= 0.0 {
        return Err(crate::Error::Msg(format!(
            "no target token carries weight among {n} rows"
        )));
    }
    let rows: Vec<u32> = (0..n as u32).filter(|&i| coefs[i as usize] > 0.0).collect();
    let grad = h.track_op();
    let hd = h.detach();
    let wt = w.t()?;
    let chunk = (chunk_values / v.max(1)).max(1);
    let mut loss = 0f64;
    let mut gh: Vec<f32> = if grad { vec![0f32; n * d] } else { vec![] };
    for sel in rows.chunks(chunk) {
        let idx = Tensor::from_slice(sel, sel.len(), h.device())?;
        let hc = hd.index_select(&idx, 0)?;
        let z = hc.matmul(&wt)?.contiguous()?;
        let (zs, zl) = z.storage_and_layout();
        let candle_core::Storage::Cpu(zc) = &*zs else {
            return Err(crate::Error::Msg("linear cross-entropy: CPU only".into()));
        };
        let zv = f32_slice(zc, zl, "linear-cross-entropy")?;
        let tgt: Vec<usize> = sel.iter().map(|&i| targets[i as usize] as usize).collect();
        let lp: Vec<f32> = if grad {
            // dz = s · (softmax − onehot), written row by row; the row's log-prob comes with it.
            let scale: Vec<f32> = sel
                .iter()
                .map(|&i| (coefs[i as usize] as f64 / total) as f32)
                .collect();
            let mut dz = vec![0f32; sel.len() * v];
            let lp = dz
                .par_chunks_mut(v)
                .zip(zv.par_chunks(v))
                .enumerate()
                .map(|(r, (o, row))| {
                    let lse = row_lse(row);
                    let s = scale[r];
                    for (oo, &x) in o.iter_mut().zip(row) {
                        *oo = s * fast_exp(x - lse);
                    }
                    o[tgt[r]] -= s;
                    row[tgt[r]] - lse
                })
                .collect();
            drop(zs);
            drop(z);
            let g = Tensor::from_vec(dz, (sel.len(), v), h.device())?.matmul(w)?;
            let g = g.flatten_all()?.to_vec1::<f32>()?;
            for (k, &i) in sel.iter().enumerate() {
                gh[i as usize * d..(i as usize + 1) * d].copy_from_slice(&g[k * d..(k + 1) * d]);
            }
            lp
        } else {
            zv.par_chunks(v)
                .enumerate()
                .map(|(r, row)| row[tgt[r]] - row_lse(row))
                .collect()
        };
        loss -= lp
            .iter()
            .zip(sel)
            .map(|(&l, &i)| l as f64 * coefs[i as usize] as f64)
            .sum::<f64>();
    }
    let y = Tensor::new((loss / total) as f32, h.device())?;
    if !grad {
        return Ok(y);
    }
    let gh = Tensor::from_vec(gh, (n, d), h.device())?;
    Ok(attach(h, y, "linear-cross-entropy", move |g| {
        gh.broadcast_mul(g)
    })?)
}

#[cfg(test)]
mod linear_cross_entropy_tests {
    use super::*;
    use candle_core::{Device, Var};

    fn composite(h: &Tensor, w: &Tensor, t: &[u32], c: &[f32]) -> Tensor {
        let lp = token_logprobs(&h.matmul(&w.t().unwrap()).unwrap(), t).unwrap();
        let cw = Tensor::new(c, &Device::Cpu).unwrap();
        let n: f32 = c.iter().sum();
        ((lp * cw).unwrap().sum_all().unwrap() * (-1.0 / n as f64)).unwrap()
    }

    #[test]
    fn chunked_loss_and_input_gradient_equal_logits_then_log_softmax() {
        let dev = Device::Cpu;
        let (n, d, v) = (10, 6, 50);
        let hv = Var::from_tensor(&Tensor::randn(0f32, 1.0, (n, d), &dev).unwrap()).unwrap();
        let w = (Tensor::randn(0f32, 1.0, (v, d), &dev).unwrap() * 0.7).unwrap();
        let t: Vec<u32> = (0..n as u32).map(|i| (i * 7 + 3) % v as u32).collect();
        // Zero-weight rows (prompt tokens, padding) are skipped; weights need not be 0/1.
        let c = [1.0f32, 0.0, 2.0, 1.0, 0.0, 0.5, 1.0, 1.0, 0.0, 1.0];
        let want = composite(hv.as_tensor(), &w, &t, &c);
        let gw = want.backward().unwrap();
        let gw = gw.get(hv.as_tensor()).unwrap();
        for chunk_values in [3 * v, v, 1 << 22] {
            let got =
                linear_cross_entropy_chunked(hv.as_tensor(), &w, &t, &c, chunk_values).unwrap();
            let (a, b) = (
                got.to_scalar::<f32>().unwrap(),
                want.to_scalar::<f32>().unwrap(),
            );
            assert!((a - b).abs() < 1e-5 * b.abs(), "loss {a} vs {b}");
            let scaled = (got * 3.0).unwrap();
            let gg = scaled.backward().unwrap();
            let gg = (gg.get(hv.as_tensor()).unwrap() / 3.0).unwrap();
            let e = (&gg - gw)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(e < 1e-6, "chunk {chunk_values}: gradient differs by {e}");
            // Rows of weight 0 get exactly no gradient.
            let g4 = gg.get(4).unwrap().abs().unwrap().sum_all().unwrap();
            assert_eq!(g4.to_scalar::<f32>().unwrap(), 0.0);
            assert!(
                gg.get(0)
                    .unwrap()
                    .abs()
                    .unwrap()
                    .sum_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    > 0.0
            );
        }
        // Without a gradient the value is the same.
        let plain = linear_cross_entropy(&hv.as_tensor().detach(), &w, &t, &c).unwrap();
        let (a, b) = (
            plain.to_scalar::<f32>().unwrap(),
            want.to_scalar::<f32>().unwrap(),
        );
        assert!((a - b).abs() < 1e-5 * b.abs());
    }

    #[test]
    fn linear_cross_entropy_refuses_bad_input() {
        let dev = Device::Cpu;
        let h = Tensor::zeros((3, 4), DType::F32, &dev).unwrap();
        let w = Tensor::zeros((5, 4), DType::F32, &dev).unwrap();
        let e = linear_cross_entropy(&h, &w, &[0, 1, 7], &[1.0; 3]).unwrap_err();
        assert!(e.to_string().contains("target token 7"), "{e}");
        let e = linear_cross_entropy(&h, &w, &[0, 1, 2], &[0.0; 3]).unwrap_err();
        assert!(
            e.to_string().contains("no target token carries weight"),
            "{e}"
        );
        let e = linear_cross_entropy(&h, &w, &[0, 1, 2], &[1.0, f32::NAN, 1.0]).unwrap_err();
        assert!(e.to_string().contains("row 1"), "{e}");
        let w3 = Tensor::zeros((5, 3), DType::F32, &dev).unwrap();
        let e = linear_cross_entropy(&h, &w3, &[0, 1, 2], &[1.0; 3]).unwrap_err();
        assert!(e.to_string().contains("[5, 3]"), "{e}");
    }
}
