//! The resnet node against its composition.

use super::*;
use crate::nn::test_util::rel_max_err as rel;
use candle_core::Var;

fn randn(shape: &[usize], seed: u64, std: f64) -> Tensor {
    crate::nn::test_util::randn("resnet-test", shape, seed, std)
}

fn conv_ref(x: &Tensor, p: &ConvPart) -> Tensor {
    let c = p.cfg;
    let mut y = x
        .conv2d(&p.weight, c.padding, c.stride, c.dilation, c.groups)
        .unwrap();
    if let Some(b) = &p.bias {
        y = y.broadcast_add(&b.reshape((1, (), 1, 1)).unwrap()).unwrap();
    }
    if let Some(l) = &p.lora {
        let h = x
            .conv2d(&l.a, c.padding, c.stride, c.dilation, c.groups)
            .unwrap();
        y = (y + (h.conv2d(&l.b, 0, 1, 1, 1).unwrap() * l.scale).unwrap()).unwrap();
    }
    y
}

fn block_ref(x: &Tensor, t: Option<&Tensor>, p: &ResnetParts) -> Tensor {
    let gn = |v: &Tensor, n: &NormPart| {
        crate::nn::norm::group_norm(v, n.groups, &n.weight, &n.bias, n.eps)
            .unwrap()
            .silu()
            .unwrap()
    };
    let mut h = conv_ref(&gn(x, &p.norm1), &p.conv1);
    if let Some(t) = t {
        h = h
            .broadcast_add(&t.unsqueeze(2).unwrap().unsqueeze(3).unwrap())
            .unwrap();
    }
    let h = conv_ref(&gn(&h, &p.norm2), &p.conv2);
    let s = match &p.shortcut {
        Some(sc) => conv_ref(x, sc),
        None => x.clone(),
    };
    ((s + h).unwrap() / p.out_scale).unwrap()
}

fn conv3(o: usize, c: usize, seed: u64) -> ConvPart {
    ConvPart {
        weight: randn(&[o, c, 3, 3], seed, 0.2),
        bias: Some(randn(&[o], seed + 1, 0.1)),
        cfg: ConvCfg {
            padding: 1,
            stride: 1,
            dilation: 1,
            groups: 1,
        },
        lora: None,
    }
}

/// One block: (images, channels in, out, (h, w)); with a time embedding; LoCon ranks on conv1,
/// conv2 and the shortcut (0: none); the output scale; whether x's gradient is asked.
fn check(
    (n, c, o, (h, w)): (usize, usize, usize, (usize, usize)),
    with_t: bool,
    ranks: [usize; 3],
    out_scale: f64,
    x_grad: bool,
) {
    use crate::nn::test_util::{compare, input};
    let (xv, x) = input("resnet-test", &[n, c, h, w], 1, x_grad);
    let (tv, t) = input("resnet-test", &[n, o], 2, with_t);
    let norm = |ch: usize, seed: u64| NormPart {
        weight: (randn(&[ch], seed, 0.3) + 1.0).unwrap(),
        bias: randn(&[ch], seed + 1, 0.2),
        groups: 2,
        eps: 1e-5,
    };
    let shortcut = (c != o).then(|| ConvPart {
        weight: randn(&[o, c, 1, 1], 50, 0.3),
        bias: Some(randn(&[o], 51, 0.1)),
        cfg: ConvCfg::default(),
        lora: None,
    });
    let (conv1, conv2) = (conv3(o, c, 20), conv3(o, o, 40));
    let mut parts = ResnetParts {
        norm1: norm(c, 10),
        conv1,
        norm2: norm(o, 30),
        conv2,
        shortcut,
        out_scale,
    };
    let mut vars = vec![];
    let convs = [
        Some(&mut parts.conv1),
        Some(&mut parts.conv2),
        parts.shortcut.as_mut(),
    ];
    for (j, (part, r)) in convs.into_iter().zip(ranks).enumerate() {
        let (Some(part), true) = (part, r > 0) else {
            continue;
        };
        let (inn, side) = (part.weight.dim(1).unwrap(), part.weight.dim(2).unwrap());
        let a = Var::from_tensor(&randn(&[r, inn, side, side], 60 + j as u64, 0.3)).unwrap();
        let b = Var::from_tensor(&randn(&[o, r, 1, 1], 70 + j as u64, 0.3)).unwrap();
        part.lora = Some(Locon {
            a: a.as_tensor().clone(),
            b: b.as_tensor().clone(),
            scale: 0.5 + j as f64,
        });
        vars.extend([a, b]);
    }
    let tt = with_t.then_some(&t);
    let fused = resnet_block(&x, tt, &parts).unwrap().unwrap();
    let composed = block_ref(&x, tt, &parts);
    let mut asked: Vec<(&str, &Var)> = vars.iter().map(|v| ("factor", v)).collect();
    let mut not_asked = vec![];
    for (what, v, fed, g) in [("x", &xv, &x, x_grad), ("t", &tv, &t, with_t)] {
        if g {
            asked.push((what, v))
        } else {
            not_asked.push(fed)
        }
    }
    let frozen = [
        &parts.norm1.weight,
        &parts.conv1.weight,
        &parts.conv2.weight,
    ];
    compare(&fused, &composed, &asked, &not_asked, &frozen, 80);
    // Without gradients: the same values, no graph.
    let mut p2 = parts.clone();
    for cp in [
        Some(&mut p2.conv1),
        Some(&mut p2.conv2),
        p2.shortcut.as_mut(),
    ]
    .into_iter()
    .flatten()
    {
        if let Some(l) = &mut cp.lora {
            (l.a, l.b) = (l.a.detach(), l.b.detach());
        }
    }
    let td = tt.map(Tensor::detach);
    let y = resnet_block(&x.detach(), td.as_ref(), &p2)
        .unwrap()
        .unwrap();
    assert!(!y.track_op());
    assert!(rel(&y, &fused) < 1e-6, "no-grad value");
}

/// The node equals the composition (candle's conv2d, the composed GroupNorm, SiLU, the time
/// add, the shortcut and the scale) in value and in the gradients of x, t and every LoCon
/// factor, over blocks with and without a shortcut, time embedding, LoCons and output scale;
/// frozen norms and kernels get no gradient, and without gradients it records no graph.
#[test]
fn the_resnet_node_equals_the_composition_in_value_and_every_gradient() {
    check((3, 4, 6, (5, 7)), true, [2, 3, 1], 1.0, true);
    check((2, 4, 4, (6, 6)), false, [0, 2, 0], 2.0, true);
    check((1, 6, 4, (4, 3)), true, [0, 0, 0], 1.0, true);
    check((2, 4, 4, (3, 5)), true, [3, 0, 0], 1.0, true);
    // Factors (and t) only, as LoRA training asks for them; a LoCon only on the shortcut.
    check((2, 4, 6, (4, 4)), false, [0, 0, 2], 1.0, false);
    check((3, 6, 4, (3, 4)), true, [2, 2, 2], 1.0, false);
}

/// Misfit parts are refused with the shapes named; other devices' and dtypes' calls fall back.
#[test]
fn misfits_name_the_shapes_and_unsupported_calls_fall_back() {
    let x = randn(&[1, 4, 5, 5], 1, 1.0);
    let norm = |ch: usize| NormPart {
        weight: Tensor::ones(ch, DType::F32, &Device::Cpu).unwrap(),
        bias: Tensor::zeros(ch, DType::F32, &Device::Cpu).unwrap(),
        groups: 2,
        eps: 1e-5,
    };
    let parts = ResnetParts {
        norm1: norm(4),
        conv1: conv3(6, 4, 1),
        norm2: norm(6),
        conv2: conv3(6, 6, 2),
        shortcut: None,
        out_scale: 1.0,
    };
    let e = resnet_block(&x, None, &parts).unwrap_err().to_string();
    assert!(
        e.contains("no shortcut") && e.contains("[1, 4, 5, 5]"),
        "{e}"
    );
    let mut p = parts.clone();
    p.shortcut = Some(ConvPart {
        weight: randn(&[6, 4, 1, 1], 3, 0.3),
        bias: None,
        cfg: ConvCfg::default(),
        lora: None,
    });
    let t = randn(&[1, 5], 4, 1.0);
    let e = resnet_block(&x, Some(&t), &p).unwrap_err().to_string();
    assert!(e.contains("t [1, 5]") || e.contains("Some([1, 5])"), "{e}");
    let mut bad = p.clone();
    bad.conv1.lora = Some(Locon {
        a: randn(&[2, 4, 3, 3], 5, 0.3),
        b: randn(&[5, 2, 1, 1], 6, 0.3),
        scale: 1.0,
    });
    let e = resnet_block(&x, None, &bad).unwrap_err().to_string();
    assert!(
        e.contains("LoCon factors") && e.contains("[5, 2, 1, 1]"),
        "{e}"
    );
    // bf16 input: not this node's.
    let xb = x.to_dtype(DType::BF16).unwrap();
    assert!(resnet_block(&xb, None, &p).unwrap().is_none());
    // A trained kernel: not this node's.
    let mut trained = p.clone();
    trained.conv2.weight = Var::from_tensor(&p.conv2.weight)
        .unwrap()
        .as_tensor()
        .clone();
    assert!(resnet_block(&x, None, &trained).unwrap().is_none());
    assert!(resnet_block(&x, None, &p).unwrap().is_some());
    // Convs that change the grid, even to as many pixels (2×15 → 3×10), or a zero stride: not a
    // resnet's, so not this node's (and no panic).
    let x2 = randn(&[1, 4, 2, 15], 7, 1.0);
    let mut regrid = p.clone();
    regrid.conv1 = ConvPart {
        weight: randn(&[6, 4, 1, 1], 8, 0.3),
        bias: None,
        cfg: ConvCfg {
            padding: 2,
            stride: 2,
            dilation: 1,
            groups: 1,
        },
        lora: None,
    };
    assert!(resnet_block(&x2, None, &regrid).unwrap().is_none());
    let mut stride0 = p.clone();
    stride0.conv2.cfg.stride = 0;
    assert!(resnet_block(&x, None, &stride0).unwrap().is_none());
}
