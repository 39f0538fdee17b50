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

struct Case {
    n: usize,
    c: usize,
    o: usize,
    hw: (usize, usize),
    groups: usize,
    with_t: bool,
    ranks: [usize; 3],
    out_scale: f64,
    /// x carries a gradient (false: only the factors and t are asked for, as in LoRA training).
    x_grad: bool,
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

/// The node equals the composition (candle's conv2d, the composed GroupNorm, SiLU, the time
/// add, the shortcut and the scale) in value and in the gradients of x, t and every LoCon
/// factor, over blocks with and without a shortcut, time embedding, LoCons and output scale;
/// frozen norms and kernels get no gradient, and without gradients it records no graph.
#[test]
fn the_resnet_node_equals_the_composition_in_value_and_every_gradient() {
    let cases = [
        Case {
            n: 3,
            c: 4,
            o: 6,
            hw: (5, 7),
            groups: 2,
            with_t: true,
            ranks: [2, 3, 1],
            out_scale: 1.0,
            x_grad: true,
        },
        Case {
            n: 2,
            c: 4,
            o: 4,
            hw: (6, 6),
            groups: 2,
            with_t: false,
            ranks: [0, 2, 0],
            out_scale: 2.0,
            x_grad: true,
        },
        Case {
            n: 1,
            c: 6,
            o: 4,
            hw: (4, 3),
            groups: 2,
            with_t: true,
            ranks: [0, 0, 0],
            out_scale: 1.0,
            x_grad: true,
        },
        Case {
            n: 2,
            c: 4,
            o: 4,
            hw: (3, 5),
            groups: 2,
            with_t: true,
            ranks: [3, 0, 0],
            out_scale: 1.0,
            x_grad: true,
        },
        Case {
            n: 2,
            c: 4,
            o: 6,
            hw: (4, 4),
            groups: 2,
            with_t: false,
            ranks: [0, 0, 2],
            out_scale: 1.0,
            x_grad: false,
        },
        Case {
            n: 3,
            c: 6,
            o: 4,
            hw: (3, 4),
            groups: 2,
            with_t: true,
            ranks: [2, 2, 2],
            out_scale: 1.0,
            x_grad: false,
        },
    ];
    for (ci, k) in cases.iter().enumerate() {
        let (h, w) = k.hw;
        let xv = Var::from_tensor(&randn(&[k.n, k.c, h, w], 1, 1.0)).unwrap();
        let x = if k.x_grad {
            xv.as_tensor().clone()
        } else {
            xv.as_tensor().detach()
        };
        let t = Var::from_tensor(&randn(&[k.n, k.o], 2, 1.0)).unwrap();
        let norm = |ch: usize, seed: u64| NormPart {
            weight: (randn(&[ch], seed, 0.3) + 1.0).unwrap(),
            bias: randn(&[ch], seed + 1, 0.2),
            groups: k.groups,
            eps: 1e-5,
        };
        let mut parts = ResnetParts {
            norm1: norm(k.c, 10),
            conv1: conv3(k.o, k.c, 20),
            norm2: norm(k.o, 30),
            conv2: conv3(k.o, k.o, 40),
            shortcut: (k.c != k.o).then(|| ConvPart {
                weight: randn(&[k.o, k.c, 1, 1], 50, 0.3),
                bias: Some(randn(&[k.o], 51, 0.1)),
                cfg: ConvCfg::default(),
                lora: None,
            }),
            out_scale: k.out_scale,
        };
        let mut vars: Vec<(Var, String)> = vec![];
        let ins = [k.c, k.o, k.c];
        let kk = [9, 9, 1];
        for (j, &r) in k.ranks.iter().enumerate() {
            let part = match j {
                0 => Some(&mut parts.conv1),
                1 => Some(&mut parts.conv2),
                _ => parts.shortcut.as_mut(),
            };
            let (Some(part), true) = (part, r > 0) else {
                continue;
            };
            let side = if kk[j] == 9 { 3 } else { 1 };
            let a = Var::from_tensor(&randn(&[r, ins[j], side, side], 60 + j as u64, 0.3)).unwrap();
            let b = Var::from_tensor(&randn(&[k.o, r, 1, 1], 70 + j as u64, 0.3)).unwrap();
            part.lora = Some(Locon {
                a: a.as_tensor().clone(),
                b: b.as_tensor().clone(),
                scale: 0.5 + j as f64,
            });
            vars.push((a, format!("A{j}")));
            vars.push((b, format!("B{j}")));
        }
        let tt = k.with_t.then(|| t.as_tensor().clone());
        let fused = resnet_block(&x, tt.as_ref(), &parts).unwrap().unwrap();
        let composed = block_ref(&x, tt.as_ref(), &parts);
        assert_eq!(fused.dims(), composed.dims());
        let e = rel(&fused, &composed);
        assert!(e < 1e-5, "case {ci}: value differs by {e}");
        let wgt = randn(fused.dims(), 80, 1.0);
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
        if k.x_grad {
            vars.push((xv.clone(), "x".into()));
        } else {
            assert!(gf.get(&xv).is_none());
        }
        if k.with_t {
            vars.push((t.clone(), "t".into()));
        } else {
            assert!(gf.get(&t).is_none());
        }
        for (v, name) in &vars {
            let (a, c) = (gf.get(v).unwrap(), gc.get(v).unwrap());
            assert_eq!(a.dims(), v.dims(), "case {ci}: {name}");
            let e = rel(a, c);
            assert!(e < 1e-4, "case {ci}: gradient of {name} differs by {e}");
            let s: f32 = a.abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
            assert!(s.is_finite() && s > 0.0, "case {ci}: {name} {s}");
        }
        for frozen in [
            &parts.norm1.weight,
            &parts.conv1.weight,
            &parts.conv2.weight,
        ] {
            assert!(gf.get(frozen).is_none());
        }
        // Without gradients: the same values, no graph.
        let plain = x.detach();
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
                l.a = l.a.detach();
                l.b = l.b.detach();
            }
        }
        let td = tt.as_ref().map(Tensor::detach);
        let y = resnet_block(&plain, td.as_ref(), &p2).unwrap().unwrap();
        assert!(!y.track_op());
        assert!(rel(&y, &fused) < 1e-6, "case {ci}: no-grad value");
    }
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
