//! Adapter arithmetic against PEFT 0.21.2's `add_weighted_adapter` (fixtures from
//! `scripts/fixtures/make_combine_fixtures.py`): embedding, linear, 3x3 and 1x1 conv modules, three
//! adapters of ranks 4, 4 and 6 (one missing a module), every deterministic combination type. The
//! SVD variants are compared on B·A (singular vectors are defined up to sign), the others factor by
//! factor; `cat` is checked to be exact, the SVD clamp by its bound, and image-model LoRA files
//! (kohya) combine like PEFT folders.

use crate::common::*;
use candle_core::{DType, Device, Tensor};
use postforge::peft::combine::{combine, AdapterSet, Combination, CombineOptions, SignMethod};
use postforge::peft::formats::lora_file::{LoraFile, LoraFormat, ModuleLora};
use postforge::util::SafeTensors;
use std::path::{Path, PathBuf};

fn dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/combine")
        .join(name)
}

fn set(name: &str) -> AdapterSet {
    AdapterSet::read(&dir(name)).unwrap()
}

/// s·B·A as (out, in·kh·kw).
fn delta(m: &ModuleLora) -> Tensor {
    let a = m
        .down
        .to_dtype(DType::F32)
        .unwrap()
        .flatten_from(1)
        .unwrap();
    let b = m.up.to_dtype(DType::F32).unwrap().flatten_from(1).unwrap();
    (b.matmul(&a).unwrap() * (m.alpha / m.rank() as f64)).unwrap()
}

#[test]
fn combinations_match_peft() {
    let fx = SafeTensors::read(dir("combined.safetensors")).unwrap();
    let cases: Vec<(&str, Vec<(&str, f64)>, CombineOptions)> = {
        let o = |c: Combination| CombineOptions {
            combination: c,
            ..Default::default()
        };
        vec![
            ("cat", vec![("x", 0.7), ("z", -0.4)], o(Combination::Cat)),
            ("svd", vec![("x", 0.7), ("z", -0.4)], o(Combination::Svd)),
            (
                "svd_r3",
                vec![("x", 1.0), ("y", 0.5), ("z", 0.3)],
                CombineOptions {
                    svd_rank: Some(3),
                    ..o(Combination::Svd)
                },
            ),
            (
                "linear",
                vec![("x", 0.7), ("y", -0.4)],
                o(Combination::Linear),
            ),
            (
                "ties",
                vec![("x", 0.7), ("y", 0.5)],
                CombineOptions {
                    density: Some(0.5),
                    ..o(Combination::Ties)
                },
            ),
            (
                "ties_frequency",
                vec![("x", 0.7), ("y", 0.5)],
                CombineOptions {
                    density: Some(0.6),
                    majority_sign_method: SignMethod::Frequency,
                    ..o(Combination::Ties)
                },
            ),
            (
                "ties_svd",
                vec![("x", 0.7), ("z", 0.5)],
                CombineOptions {
                    density: Some(0.4),
                    ..o(Combination::TiesSvd)
                },
            ),
            (
                "magnitude_prune",
                vec![("x", 0.7), ("y", 0.5)],
                CombineOptions {
                    density: Some(0.3),
                    ..o(Combination::MagnitudePrune)
                },
            ),
            (
                "magnitude_prune_svd",
                vec![("x", 0.7), ("z", 0.5)],
                CombineOptions {
                    density: Some(0.3),
                    ..o(Combination::MagnitudePruneSvd)
                },
            ),
            (
                "dare_ties_d1",
                vec![("x", 0.7), ("y", 0.5)],
                CombineOptions {
                    density: Some(1.0),
                    ..o(Combination::DareTies)
                },
            ),
        ]
    };
    for (case, inputs, opts) in cases {
        let inputs: Vec<(AdapterSet, f64)> = inputs.iter().map(|(n, w)| (set(n), *w)).collect();
        let out = combine(&inputs, &opts).unwrap();
        assert_eq!(out.modules.len(), 4, "{case}");
        let cfg = out.config.as_ref().unwrap();
        assert_eq!(cfg.lora_alpha, cfg.r as f64, "{case}: scale 1");
        for (m, l) in &out.modules {
            let a = fx.get(&format!("{case}.{m}.lora_A")).unwrap();
            let b = fx.get(&format!("{case}.{m}.lora_B")).unwrap();
            assert_eq!(l.down.dims(), a.dims(), "{case} {m}: A shape");
            assert_eq!(l.up.dims(), b.dims(), "{case} {m}: B shape");
            if opts.combination == Combination::Svd
                || case.ends_with("_svd")
                || case.starts_with("svd")
            {
                let theirs = delta(&ModuleLora {
                    down: a,
                    up: b,
                    alpha: cfg.r as f64,
                    magnitude: None,
                });
                let e = rel_err(&delta(l), &theirs);
                assert!(e < 1e-4, "{case} {m}: B·A relative error {e:e}");
            } else {
                let (ea, eb) = (rel_err(&l.down, &a), rel_err(&l.up, &b));
                assert!(ea < 1e-5 && eb < 1e-5, "{case} {m}: A {ea:e}, B {eb:e}");
            }
        }
    }
}

#[test]
fn cat_is_exact_and_full_rank_svd_is_too() {
    let (x, z) = (set("x"), set("z"));
    let (wx, wz) = (0.7, -0.4);
    for (c, rank) in [(Combination::Cat, None), (Combination::Svd, Some(10))] {
        let opts = CombineOptions {
            combination: c,
            svd_rank: rank,
            ..Default::default()
        };
        let out = combine(&[(x.clone(), wx), (z.clone(), wz)], &opts).unwrap();
        for (m, l) in &out.modules {
            let want = ((delta(&x.modules[m]) * wx).unwrap()
                + (delta(&z.modules[m]) * wz).unwrap())
            .unwrap();
            let e = rel_err(&delta(l), &want);
            assert!(e < 1e-5, "{c:?} {m}: {e:e}");
        }
    }
}

#[test]
fn svd_clamp_bounds_the_factors_and_bad_requests_are_refused() {
    let (x, z) = (set("x"), set("z"));
    let free = combine(
        &[(x.clone(), 1.0), (z.clone(), 1.0)],
        &CombineOptions::default(),
    )
    .unwrap();
    let clamped = combine(
        &[(x.clone(), 1.0), (z.clone(), 1.0)],
        &CombineOptions {
            svd_clamp: Some(0.9),
            ..Default::default()
        },
    )
    .unwrap();
    for (m, l) in &clamped.modules {
        let f = &free.modules[m];
        let max = |t: &Tensor| {
            t.abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert!(max(&l.up) <= max(&f.up) + 1e-6 && max(&l.down) <= max(&f.down) + 1e-6);
        assert!(
            max(&l.up) < max(&f.up) || max(&l.down) < max(&f.down),
            "{m}: the 0.9 quantile clamps something"
        );
    }
    // Mixed ranks for linear, a missing density, and a PEFT folder with a LoRA file: refused.
    let e = combine(
        &[(x.clone(), 1.0), (z.clone(), 1.0)],
        &CombineOptions {
            combination: Combination::Linear,
            ..Default::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("one rank"), "{e}");
    let e = combine(
        &[(x.clone(), 1.0), (set("y"), 1.0)],
        &CombineOptions {
            combination: Combination::Ties,
            ..Default::default()
        },
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("density"), "{e}");
}

#[test]
fn image_lora_files_combine_and_dare_is_seeded() {
    let tmp = tempfile::tempdir().unwrap();
    let dev = Device::Cpu;
    let mk = |seed: u64| -> PathBuf {
        let mut f = LoraFile::default();
        let r = |shape: &[usize], k: u64| {
            let mut rng = postforge::rng::rng_for(seed * 10 + k, "lora");
            postforge::rng::normal(shape, 0.3, &mut rng).unwrap()
        };
        f.modules.insert(
            "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q".into(),
            ModuleLora {
                down: r(&[4, 16], 1),
                up: r(&[16, 4], 2),
                alpha: 2.0,
                magnitude: None,
            },
        );
        f.modules.insert(
            "unet.down_blocks.0.resnets.0.conv1".into(),
            ModuleLora {
                down: r(&[4, 8, 3, 3], 3),
                up: r(&[8, 4, 1, 1], 4),
                alpha: 4.0,
                magnitude: None,
            },
        );
        let p = tmp.path().join(format!("l{seed}.safetensors"));
        f.write(&p, LoraFormat::Kohya).unwrap();
        p
    };
    let (p1, p2) = (mk(1), mk(2));
    let (s1, s2) = (
        AdapterSet::read(&p1).unwrap(),
        AdapterSet::read(&p2).unwrap(),
    );
    let out = combine(
        &[(s1.clone(), 0.8), (s2.clone(), 0.6)],
        &CombineOptions {
            combination: Combination::Cat,
            ..Default::default()
        },
    )
    .unwrap();
    let path = tmp.path().join("both.safetensors");
    out.write(&path, None).unwrap();
    let back = AdapterSet::read(&path).unwrap();
    assert_eq!(back.format, Some(LoraFormat::Kohya));
    for (m, l) in &back.modules {
        let want = ((delta(&s1.modules[m]) * 0.8).unwrap()
            + (delta(&s2.modules[m]) * 0.6).unwrap())
        .unwrap();
        let e = rel_err(&delta(l), &want);
        assert!(e < 1e-5, "{m}: {e:e}");
    }
    // DARE: the same seed gives the same result, another seed another one.
    let dare = |seed| {
        combine(
            &[(s1.clone(), 0.8), (s2.clone(), 0.6)],
            &CombineOptions {
                combination: Combination::DareLinear,
                density: Some(0.5),
                seed,
                ..Default::default()
            },
        )
        .unwrap()
    };
    let (d1, d1b, d2) = (dare(1), dare(1), dare(2));
    for (m, l) in &d1.modules {
        assert_eq!(max_abs_diff(&l.down, &d1b.modules[m].down), 0.0);
        assert!(max_abs_diff(&l.down, &d2.modules[m].down) > 0.0);
    }
    let _ = dev;
}
