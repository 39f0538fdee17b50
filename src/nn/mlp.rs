//! The gated MLP block of Llama, Mistral and Qwen2, `down(silu(gate(x)) ⊙ up(x))`, with a plain
//! LoRA on each of its three projections, as one node with its own backward (Unsloth's idea, in our
//! code). The composed path is three LoRA nodes and a SwiGLU node; this node keeps for the backward
//! only the gate and up pre-activations and the three rank-r hiddens (not the (tokens, intermediate)
//! product that feeds the down projection, which the backward recomputes in one pass), and its input
//! gradient `dG·W_g + dU·W_u + ĝ_g·A_g + ĝ_u·A_u` is summed into one buffer in place. The six
//! factors enter as one packed vector (candle nodes take at most three inputs), so their gradients
//! flow back through the packing to each factor. Frozen bases may be dense or NF4 (QLoRA).

use super::frozen::{add_assign, take_result, Frozen};
use super::nf4::Nf4Tensor;
use candle_core::{CpuStorage, Layout, Result, Shape, Tensor};
use std::sync::{Arc, Mutex};

/// The frozen base of one projection.
#[derive(Clone)]
pub enum ProjBase {
    /// A dense f32 weight (out, in).
    Dense(Tensor),
    /// An NF4 weight (out, in).
    Nf4(Arc<Nf4Tensor>),
}

/// One projection: frozen base, LoRA factors A (r, in) and B (out, r), and the scale (α/r times
/// the adapter's gain).
#[derive(Clone)]
pub struct Proj {
    /// The frozen weight.
    pub base: ProjBase,
    /// A (r, in).
    pub a: Tensor,
    /// B (out, r).
    pub b: Tensor,
    /// s = α/r · gain.
    pub scale: f64,
}

struct Part {
    w: Frozen,
    a: Tensor,
    b: Tensor,
    scale: f64,
}

impl Part {
    fn of(p: &Proj, inn: usize, out: usize, what: &str) -> Result<Self> {
        let w = match &p.base {
            ProjBase::Dense(w) => Frozen::Dense(w.clone()),
            ProjBase::Nf4(q) => Frozen::nf4(q)?,
        };
        let r = p.a.dim(0)?;
        if w.out_in()? != (out, inn) || p.a.dims() != [r, inn] || p.b.dims() != [out, r] {
            candle_core::bail!(
                "gated MLP: {what} weight {:?}, A {:?}, B {:?} do not make a ({out}, {inn}) projection",
                w.out_in()?,
                p.a.dims(),
                p.b.dims()
            );
        }
        Ok(Self {
            w,
            a: p.a.detach(),
            b: p.b.detach(),
            scale: p.scale,
        })
    }

    /// (x·Wᵀ + s·(x·Aᵀ)·Bᵀ, x·Aᵀ) for x (tokens, in).
    fn forward(&self, x2: &Tensor) -> Result<(Tensor, Tensor)> {
        let h = x2.matmul(&self.a.t()?)?;
        let y = self.w.forward(x2)?;
        add_assign(&y, &(&h * self.scale)?.matmul(&self.b.t()?)?)?;
        Ok((y, h))
    }

    /// For the output gradient g (tokens, out) and the saved hidden h = x·Aᵀ: (ĝ = s·g·B, dB = s·gᵀ·h).
    fn hidden_grads(&self, g: &Tensor, h: &Tensor) -> Result<(Tensor, Tensor)> {
        Ok((
            (g.matmul(&self.b)? * self.scale)?,
            (g.t()?.matmul(h)? * self.scale)?,
        ))
    }
}

/// `down(silu(gate(x)) ⊙ up(x))` for x (..., hidden) with a LoRA on each projection (gate and up
/// (intermediate, hidden), down (hidden, intermediate)), as one node. CPU f32; the caller takes
/// the composed path elsewhere.
pub fn lora_swiglu_mlp(x: &Tensor, gate: &Proj, up: &Proj, down: &Proj) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let Some(&d) = dims.last() else {
        candle_core::bail!("gated MLP: the input must have a feature dimension");
    };
    let i = match &gate.base {
        ProjBase::Dense(w) => w.dim(0)?,
        ProjBase::Nf4(q) => q.shape.first().copied().unwrap_or(0),
    };
    let parts = [
        Part::of(gate, d, i, "gate")?,
        Part::of(up, d, i, "up")?,
        Part::of(down, i, d, "down")?,
    ];
    let lead: usize = dims[..dims.len() - 1].iter().product();
    let x2 = x.detach().contiguous()?.reshape((lead, d))?;
    let (g, hg) = parts[0].forward(&x2)?;
    let (u, hu) = parts[1].forward(&x2)?;
    let m = super::act::swiglu_values(&g, &u)?;
    let (y, hd) = parts[2].forward(&m)?;
    drop(m);
    let y = y.reshape(dims.as_slice())?;
    let factors: Vec<Tensor> = [gate, up, down]
        .iter()
        .flat_map(|p| [p.a.flatten_all(), p.b.flatten_all()])
        .collect::<Result<_>>()?;
    let sizes = factors.iter().map(Tensor::elem_count).collect();
    let packed = Tensor::cat(&factors, 0)?;
    let op = MlpOp {
        parts,
        sizes,
        saved: [g, u, hg, hu, hd],
        y: Mutex::new(Some(y)),
    };
    x.apply_op2_arc(&packed, Arc::new(Box::new(op)))
}

struct MlpOp {
    parts: [Part; 3],
    /// Element counts of A_g, B_g, A_u, B_u, A_d, B_d in the packed vector.
    sizes: Vec<usize>,
    /// G, U (tokens, intermediate) and the hiddens x·A_gᵀ, x·A_uᵀ, M·A_dᵀ.
    saved: [Tensor; 5],
    y: Mutex<Option<Tensor>>,
}

impl candle_core::CustomOp2 for MlpOp {
    fn name(&self) -> &'static str {
        "lora-swiglu-mlp"
    }

    fn cpu_fwd(
        &self,
        _: &CpuStorage,
        _: &Layout,
        _: &CpuStorage,
        _: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        take_result(&self.y, "lora-swiglu-mlp")
    }

    fn bwd(
        &self,
        x: &Tensor,
        _packed: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        let [pg, pu, pd] = &self.parts;
        let [g, u, hg, hu, hd] = &self.saved;
        let d = x.dim(x.rank() - 1)?;
        let lead = x.elem_count() / d.max(1);
        let g2 = grad.contiguous()?.reshape((lead, d))?;
        // Down: ĝ_d = s·dY·B_d, dB_d = s·dYᵀ·(M·A_dᵀ), dM = dY·W_d + ĝ_d·A_d, dA_d = ĝ_dᵀ·M.
        let (ghd, dbd) = pd.hidden_grads(&g2, hd)?;
        let dm = pd.w.input_grad(&g2)?;
        add_assign(&dm, &ghd.matmul(&pd.a)?)?;
        let dad = {
            let m = super::act::swiglu_values(g, u)?;
            ghd.t()?.matmul(&m)?
        };
        let (dg, du) = super::act::swiglu_grads(&dm, g, u)?;
        drop(dm);
        // Gate and up.
        let (ghg, dbg) = pg.hidden_grads(&dg, hg)?;
        let (ghu, dbu) = pu.hidden_grads(&du, hu)?;
        let x2 = x.detach().contiguous()?.reshape((lead, d))?;
        let dag = ghg.t()?.matmul(&x2)?;
        let dau = ghu.t()?.matmul(&x2)?;
        let dx = if x.track_op() {
            let dx = pg.w.input_grad(&dg)?;
            add_assign(&dx, &pu.w.input_grad(&du)?)?;
            add_assign(&dx, &ghg.matmul(&pg.a)?)?;
            add_assign(&dx, &ghu.matmul(&pu.a)?)?;
            Some(dx.reshape(x.dims())?)
        } else {
            None
        };
        let grads = [dag, dbg, dau, dbu, dad, dbd];
        for (t, n) in grads.iter().zip(&self.sizes) {
            if t.elem_count() != *n {
                candle_core::bail!(
                    "lora-swiglu-mlp: a factor gradient has {} values, not {n}",
                    t.elem_count()
                );
            }
        }
        let flat: Vec<Tensor> = grads
            .iter()
            .map(Tensor::flatten_all)
            .collect::<Result<_>>()?;
        Ok((dx, Some(Tensor::cat(&flat, 0)?)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Var;

    fn randn(shape: &[usize], seed: u64, std: f64) -> Tensor {
        crate::nn::test_util::randn("mlp-test", shape, seed, std)
    }

    fn lora_composed(x: &Tensor, w: &Tensor, a: &Tensor, b: &Tensor, s: f64) -> Tensor {
        let y = x.broadcast_matmul(&w.t().unwrap()).unwrap();
        let d = (x.broadcast_matmul(&a.t().unwrap()).unwrap() * s)
            .unwrap()
            .broadcast_matmul(&b.t().unwrap())
            .unwrap();
        (y + d).unwrap()
    }

    /// The node equals the composition (three LoRA linears, silu, product) in value and in the
    /// gradients of x and all six factors, with different ranks per projection, a dense and an
    /// NF4 base, and a 3-D input; the frozen weights get no gradient.
    #[test]
    fn the_mlp_node_equals_the_composition_in_value_and_every_gradient() {
        let (b, t, d, i) = (2, 5, 12, 20);
        for nf4 in [false, true] {
            let x = Var::from_tensor(&randn(&[b, t, d], 1, 1.0)).unwrap();
            let ws = [
                randn(&[i, d], 2, 0.3),
                randn(&[i, d], 3, 0.3),
                randn(&[d, i], 4, 0.3),
            ];
            // NF4: both paths use the dequantized weight as the base.
            let (bases, dense): (Vec<ProjBase>, Vec<Tensor>) = ws
                .iter()
                .map(|w| {
                    if nf4 {
                        let q = Arc::new(Nf4Tensor::quantize(w, 64, false).unwrap());
                        let deq = q.dequantize().unwrap();
                        (ProjBase::Nf4(q), deq)
                    } else {
                        (ProjBase::Dense(w.clone()), w.clone())
                    }
                })
                .unzip();
            let ranks = [4, 3, 2];
            let ins = [d, d, i];
            let outs = [i, i, d];
            let facs: Vec<(Var, Var)> = (0..3)
                .map(|k| {
                    (
                        Var::from_tensor(&randn(&[ranks[k], ins[k]], 10 + k as u64, 0.3)).unwrap(),
                        Var::from_tensor(&randn(&[outs[k], ranks[k]], 20 + k as u64, 0.3)).unwrap(),
                    )
                })
                .collect();
            let scales = [0.5, 2.0, 1.25];
            let projs: Vec<Proj> = (0..3)
                .map(|k| Proj {
                    base: bases[k].clone(),
                    a: facs[k].0.as_tensor().clone(),
                    b: facs[k].1.as_tensor().clone(),
                    scale: scales[k],
                })
                .collect();
            let fused = lora_swiglu_mlp(&x, &projs[0], &projs[1], &projs[2]).unwrap();
            let lin = |k: usize, inp: &Tensor| {
                lora_composed(inp, &dense[k], &facs[k].0, &facs[k].1, scales[k])
            };
            let composed = lin(2, &(lin(0, &x).silu().unwrap() * lin(1, &x)).unwrap());
            let diff = crate::nn::test_util::rel_max_err;
            assert_eq!(fused.dims(), &[b, t, d]);
            assert!(
                diff(&fused, &composed) < 1e-5,
                "nf4 {nf4}: value {}",
                diff(&fused, &composed)
            );
            let wgt = randn(&[b, t, d], 30, 1.0);
            let gf = (&fused * &wgt)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let gc = (&composed * &wgt)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            let mut vars: Vec<(&Var, String)> = vec![(&x, "x".into())];
            for (k, (a, bb)) in facs.iter().enumerate() {
                vars.push((a, format!("A{k}")));
                vars.push((bb, format!("B{k}")));
            }
            for (v, name) in vars {
                let (a, c) = (gf.get(v).unwrap(), gc.get(v).unwrap());
                assert_eq!(a.dims(), v.dims());
                let e = diff(a, c);
                assert!(e < 1e-4, "nf4 {nf4}: gradient of {name} differs by {e}");
                let n: f32 = a.abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
                assert!(n.is_finite() && n > 0.0, "{name}: {n}");
            }
            for w in &ws {
                assert!(gf.get(w).is_none());
            }
            // Bad shapes are refused with the projection named.
            let mut bad = projs[1].clone();
            bad.b = randn(&[i + 1, ranks[1]], 40, 1.0);
            let e = lora_swiglu_mlp(&x, &projs[0], &bad, &projs[2])
                .unwrap_err()
                .to_string();
            assert!(e.contains("up weight"), "{e}");
        }
    }
}
