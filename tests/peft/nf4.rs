//! NF4 against bitsandbytes 0.50.2 (`scripts/fixtures/make_nf4_fixtures.py`): packed codes, absmax
//! (plain and double-quantized), maps and dequantized weights equal bitsandbytes'; the state dicts
//! transformers saves read back; bad state dicts are refused with the key named.

use candle_core::{DType, Device, Tensor};
use postforge::nn::nf4::{dynamic_map, Absmax, Nf4Tensor, NF4_CODE};
use std::collections::HashMap;
use std::path::Path;

fn fixtures() -> HashMap<String, Tensor> {
    candle_core::safetensors::load(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nf4/nf4.safetensors"),
        &Device::Cpu,
    )
    .unwrap()
}

fn f32s(t: &Tensor) -> Vec<f32> {
    t.to_dtype(DType::F32)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn quantization_equals_bitsandbytes() {
    let fx = fixtures();
    let file = Path::new("nf4.safetensors");
    for name in ["a", "b", "c", "d"] {
        let w = &fx[&format!("{name}.w")];
        for dq in [0, 1] {
            let prefix = format!("{name}.dq{dq}.weight");
            let q = Nf4Tensor::quantize(w, 64, dq == 1).unwrap();
            // Packed codes, byte for byte.
            let theirs: Vec<u8> = fx[&prefix].flatten_all().unwrap().to_vec1().unwrap();
            let differ = q.packed.iter().zip(&theirs).filter(|(a, b)| a != b).count();
            assert_eq!(q.packed.len(), theirs.len(), "{prefix}");
            assert_eq!(differ, 0, "{prefix}: {differ} packed bytes differ");
            assert_eq!(
                f32s(&fx[&format!("{prefix}.quant_map")]),
                NF4_CODE.to_vec(),
                "{prefix} quant_map"
            );
            match &q.absmax {
                Absmax::F32(a) => {
                    assert_eq!(
                        a,
                        &f32s(&fx[&format!("{prefix}.absmax")]),
                        "{prefix} absmax"
                    )
                }
                Absmax::Double {
                    codes,
                    nested_absmax,
                    nested_code,
                    offset,
                    ..
                } => {
                    // bitsandbytes' CPU 8-bit kernel (C; its source is not in the wheel) now and
                    // then sends a scale lying within a few millionths of the midpoint between
                    // two codes to the farther one (2 of the 378 scales here); every other code
                    // is the nearest one, as ours are. Where they differ, the value must be such
                    // a near tie.
                    let theirs: Vec<u8> = fx[&format!("{prefix}.absmax")].to_vec1().unwrap();
                    let plain = Nf4Tensor::quantize(w, 64, false).unwrap().absmax_f32();
                    for (i, (a, b)) in codes.iter().zip(&theirs).enumerate() {
                        if a == b {
                            continue;
                        }
                        let x = (plain[i] - offset) / nested_absmax[i / 256];
                        let mid = (nested_code[*a as usize] + nested_code[*b as usize]) / 2.0;
                        assert!(
                            a.abs_diff(*b) == 1 && (x - mid).abs() < 1e-4,
                            "{prefix} scale {i}: code {a} here, {b} in bitsandbytes ({x} vs midpoint {mid})"
                        );
                    }
                    let na = f32s(&fx[&format!("{prefix}.nested_absmax")]);
                    assert!(
                        max_diff(nested_absmax, &na) <= 1e-6 * na[0].abs(),
                        "{prefix}"
                    );
                    let map = f32s(&fx[&format!("{prefix}.nested_quant_map")]);
                    assert!(max_diff(nested_code, &map) < 1e-7, "{prefix} dynamic map");
                    let state: serde_json::Value = serde_json::from_slice(
                        &fx[&format!("{prefix}.quant_state.bitsandbytes__nf4")]
                            .to_vec1::<u8>()
                            .unwrap(),
                    )
                    .unwrap();
                    let off = state["nested_offset"].as_f64().unwrap() as f32;
                    assert!((offset - off).abs() <= 1e-6 * off.abs(), "{prefix} offset");
                }
            }
            // Dequantized: ours from our quantization, and ours from their state dict, both equal
            // bitsandbytes' dequantization (so the round-trip error is theirs).
            let deq = f32s(&fx[&format!("{name}.dq{dq}.deq")]);
            let mine = f32s(&q.dequantize().unwrap());
            let scale = deq.iter().fold(0f32, |a, v| a.max(v.abs()));
            let tol = if dq == 0 { 1e-6 } else { 5e-3 * scale };
            assert!(
                max_diff(&mine, &deq) <= tol,
                "{prefix}: dequantized differs"
            );
            let read = Nf4Tensor::from_state_dict(|k| fx.get(k), &prefix, file).unwrap();
            let from_file = f32s(&read.dequantize().unwrap());
            assert!(
                max_diff(&from_file, &deq) <= 1e-6,
                "{prefix}: read back differs"
            );
            assert_eq!(read.shape, w.dims());
            // Our state dict holds the same tensors under the same names.
            for (k, t) in q.to_state_dict(&prefix).unwrap() {
                let theirs = &fx[&k];
                assert_eq!(t.dims(), theirs.dims(), "{k}: {t:?}");
                if k.ends_with("bitsandbytes__nf4") {
                    let parse = |t: &Tensor| -> serde_json::Value {
                        serde_json::from_slice(&t.to_vec1::<u8>().unwrap()).unwrap()
                    };
                    let (mut a, mut b) = (parse(&t), parse(theirs));
                    for v in [&mut a, &mut b] {
                        v.as_object_mut().unwrap().remove("nested_offset");
                    }
                    assert_eq!(a, b, "{k}");
                } else if t.dtype() == DType::U8 && k.ends_with(".absmax") {
                    continue; // the 8-bit scale codes, compared above
                } else if t.dtype() == DType::U8 {
                    assert_eq!(
                        t.flatten_all().unwrap().to_vec1::<u8>().unwrap(),
                        theirs.flatten_all().unwrap().to_vec1::<u8>().unwrap(),
                        "{k}"
                    );
                } else {
                    assert!(max_diff(&f32s(&t), &f32s(theirs)) <= 1e-6, "{k}");
                }
            }
        }
    }
    // The round-trip error of a heavy-tailed weight is what NF4 gives: small against its scale.
    let w = f32s(&fx["c.w"]);
    let deq = f32s(&fx["c.dq1.deq"]);
    let rms = |v: &[f32]| (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt();
    let err: Vec<f32> = w.iter().zip(&deq).map(|(a, b)| a - b).collect();
    assert!(rms(&err) < 0.15 * rms(&w), "{} vs {}", rms(&err), rms(&w));
}

#[test]
fn double_quantization_stores_about_half_a_byte_per_parameter() {
    let w = Tensor::randn(0f32, 0.02, (512, 1024), &Device::Cpu).unwrap();
    let plain = Nf4Tensor::quantize(&w, 64, false).unwrap();
    let dq = Nf4Tensor::quantize(&w, 64, true).unwrap();
    let per = |q: &Nf4Tensor| q.storage_bytes() as f64 / q.len() as f64;
    assert!(
        (per(&plain) - (0.5 + 4.0 / 64.0)).abs() < 0.001,
        "{}",
        per(&plain)
    );
    assert!(
        (per(&dq) - (0.5 + 1.0 / 64.0)).abs() < 0.003,
        "{}",
        per(&dq)
    );
    // Double quantization changes the scales only slightly.
    let (a, b) = (plain.absmax_f32(), dq.absmax_f32());
    assert!(max_diff(&a, &b) < 0.01 * a.iter().cloned().fold(0.0, f32::max));
    assert_eq!(dynamic_map().len(), 256);
}

#[test]
fn bad_state_dicts_are_refused_with_the_key_named() {
    let mut fx = fixtures();
    let file = Path::new("model.safetensors");
    fx.remove("a.dq1.weight.nested_absmax");
    let e = Nf4Tensor::from_state_dict(|k| fx.get(k), "a.dq1.weight", file)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("a.dq1.weight.nested_absmax") && e.contains("model.safetensors"),
        "{e}"
    );
    let short = fx["a.dq0.weight"].narrow(0, 0, 100).unwrap();
    fx.insert("a.dq0.weight".into(), short);
    let e = Nf4Tensor::from_state_dict(|k| fx.get(k), "a.dq0.weight", file)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("100 packed bytes") && e.contains("[48, 80]"),
        "{e}"
    );
    let e = Nf4Tensor::from_state_dict(|k| fx.get(k), "zzz.weight", file)
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("zzz.weight.quant_state.bitsandbytes__nf4"),
        "{e}"
    );
}

#[test]
fn nf4_linear_matches_the_dense_dequantized_layer_and_trains_a_lora_on_top() {
    use postforge::nn::frozen::{frozen_linear, nf4_linear, plain_linear};
    use std::sync::Arc;
    let dev = Device::Cpu;
    // 300 output rows: several row blocks and a short last one (in = 320 → 204 rows a block).
    let w = Tensor::randn(0f32, 0.05, (300, 320), &dev).unwrap();
    let q = Arc::new(Nf4Tensor::quantize(&w, 64, true).unwrap());
    let wd = q.dequantize().unwrap();
    let xv = candle_core::Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 5, 320), &dev).unwrap())
        .unwrap();
    let a =
        candle_core::Var::from_tensor(&Tensor::randn(0f32, 0.1, (4, 320), &dev).unwrap()).unwrap();
    let b =
        candle_core::Var::from_tensor(&Tensor::randn(0f32, 0.1, (300, 4), &dev).unwrap()).unwrap();
    let g = Tensor::randn(0f32, 1.0, (2, 5, 300), &dev).unwrap();
    let lora = |x: &Tensor| {
        (plain_linear(&plain_linear(x, a.as_tensor()).unwrap(), b.as_tensor()).unwrap() * 2.0)
            .unwrap()
    };
    let y1 = (nf4_linear(xv.as_tensor(), &q).unwrap() + lora(xv.as_tensor())).unwrap();
    let y2 = (frozen_linear(xv.as_tensor(), &wd).unwrap() + lora(xv.as_tensor())).unwrap();
    assert_eq!(y1.dims(), [2, 5, 300]);
    let (v1, v2) = (f32s(&y1), f32s(&y2));
    assert!(max_diff(&v1, &v2) < 1e-5, "forward {}", max_diff(&v1, &v2));
    let g1 = (&y1 * &g).unwrap().sum_all().unwrap().backward().unwrap();
    let g2 = (&y2 * &g).unwrap().sum_all().unwrap().backward().unwrap();
    for (name, v) in [("x", &xv), ("lora_A", &a), ("lora_B", &b)] {
        let (d1, d2) = (
            f32s(g1.get(v.as_tensor()).unwrap()),
            f32s(g2.get(v.as_tensor()).unwrap()),
        );
        assert!(
            d1.iter().all(|x| x.is_finite()) && d1.iter().any(|x| *x != 0.0),
            "{name}"
        );
        assert!(max_diff(&d1, &d2) < 1e-4, "d{name}: {}", max_diff(&d1, &d2));
    }
    // The quantized weight never enters the graph: no weight-sized gradient exists.
    assert!(g1.get(&wd).is_none());
    let bad = Tensor::zeros((3, 7), DType::F32, &dev).unwrap();
    assert!(nf4_linear(&bad, &q).is_err());
}
