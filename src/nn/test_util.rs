//! Helpers shared by the unit tests of the nodes.

use candle_core::{Tensor, Var};

/// Normal values with standard deviation `std`, drawn from the stream `label`/`seed`.
pub(crate) fn randn(label: &str, shape: &[usize], seed: u64, std: f64) -> Tensor {
    let mut rng = crate::rng::rng_for(seed, label);
    crate::rng::normal(shape, std, &mut rng).unwrap()
}

/// max |a − c| relative to max |c|.
pub(crate) fn rel_max_err(a: &Tensor, c: &Tensor) -> f32 {
    let max = |t: &Tensor| -> f32 { t.abs().unwrap().max_all().unwrap().to_scalar().unwrap() };
    max(&(a - c).unwrap()) / max(c).max(1e-6)
}

/// A random input as a Var, and the tensor a test feeds (detached unless its gradient is asked).
pub(crate) fn input(label: &str, shape: &[usize], seed: u64, grad: bool) -> (Var, Tensor) {
    let v = Var::from_tensor(&randn(label, shape, seed, 1.0)).unwrap();
    let t = if grad {
        v.as_tensor().clone()
    } else {
        v.as_tensor().detach()
    };
    (v, t)
}

/// A node's output equals the reference's in value (1e-5 relative) and in the gradient of every
/// asked Var (1e-4, each finite and non-zero) for a random weighting of the output; the inputs fed
/// without a gradient asked and the frozen tensors get none.
pub(crate) fn compare(
    node: &Tensor,
    want: &Tensor,
    asked: &[(&str, &Var)],
    not_asked: &[&Tensor],
    frozen: &[&Tensor],
    seed: u64,
) {
    assert_eq!(node.dims(), want.dims());
    let e = rel_max_err(node, want);
    assert!(e < 1e-5, "value: relative error {e:e}");
    let w = randn("compare", node.dims(), seed, 1.0);
    let gn = (node * &w).unwrap().sum_all().unwrap().backward().unwrap();
    let gr = (want * &w).unwrap().sum_all().unwrap().backward().unwrap();
    assert!(!asked.is_empty());
    for (i, (what, v)) in asked.iter().enumerate() {
        let a = gn
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{what} {i}: no node gradient"));
        let b = gr
            .get(v.as_tensor())
            .unwrap_or_else(|| panic!("{what} {i}: no reference gradient"));
        assert_eq!(a.dims(), v.dims(), "{what} {i}");
        let e = rel_max_err(a, b);
        assert!(e < 1e-4, "{what} {i}: gradient relative error {e:e}");
        let s: f32 = a.abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
        assert!(s.is_finite() && s > 0.0, "{what} {i}: gradient {s}");
    }
    for t in not_asked {
        assert!(gn.get(t).is_none(), "a gradient that was not asked for");
    }
    for t in frozen {
        assert!(gn.get(t).is_none(), "a frozen tensor got a gradient");
    }
}
