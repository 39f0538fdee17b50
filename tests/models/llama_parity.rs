//! Llama-family parity with transformers 5.24.0 + PEFT 0.21.2 (fixtures from
//! `scripts/fixtures/make_llama_fixtures.py`): a tiny Llama (GQA, llama3 RoPE scaling) and a Qwen2
//! (q/k/v biases, tied embeddings). Logits with padding and with packed sequences, LoRA logits and
//! LoRA gradients of the next-token loss within 1e-4 relative.

use crate::common::*;
use postforge::models::llama::{Inputs, LlamaForCausalLM};
use postforge::nn::loss::next_token_loss;
use postforge::peft::{Adapted, AdapterConfig, AdapterPlan, ForwardCtx, InitSpec};
use postforge::util::SafeTensors;
use std::path::{Path, PathBuf};

fn dir(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/llama")
        .join(name)
}

#[test]
fn logits_match_transformers_with_padding_and_packing() {
    for name in ["llama", "qwen2"] {
        let io = SafeTensors::read(dir(name).join("io.safetensors")).unwrap();
        let m = LlamaForCausalLM::load(&dir(name), AdapterPlan::none()).unwrap();
        let mask = io.get("attention_mask").unwrap();
        let out = m
            .forward(
                &io.get("input_ids").unwrap(),
                &Inputs {
                    attention_mask: Some(&mask),
                    ..Default::default()
                },
                &ForwardCtx::eval_with_grad(),
            )
            .unwrap();
        let want = io.get("logits").unwrap();
        // Row 0 in full, row 1 without its two left pads.
        let e0 = rel_err(&out.get(0).unwrap(), &want.get(0).unwrap());
        let e1 = rel_err(
            &out.get(1).unwrap().narrow(0, 2, 7).unwrap(),
            &want.get(1).unwrap().narrow(0, 2, 7).unwrap(),
        );
        assert!(e0 < 1e-4 && e1 < 1e-4, "{name}: logits {e0:e} {e1:e}");
        let pos = io.get("position_ids").unwrap();
        let seg =
            candle_core::Tensor::new(&[[0u32, 0, 0, 0, 0, 1, 1, 1, 1]], &candle_core::Device::Cpu)
                .unwrap();
        let packed = m
            .forward(
                &io.get("packed_ids").unwrap(),
                &Inputs {
                    position_ids: Some(&pos),
                    segment_ids: Some(&seg),
                    ..Default::default()
                },
                &ForwardCtx::eval_with_grad(),
            )
            .unwrap();
        let e = rel_err(&packed, &io.get("packed_logits").unwrap());
        assert!(e < 1e-4, "{name}: packed logits {e:e}");
    }
}

#[test]
fn lora_logits_and_gradients_match_peft() {
    for name in ["llama", "qwen2"] {
        let io = SafeTensors::read(dir(name).join("io.safetensors")).unwrap();
        let mut cfg = AdapterConfig::lora(4, 8.0, &[]);
        cfg.target_modules = Some(postforge::peft::config::ModuleSpec::Regex(
            "all-linear".into(),
        ));
        cfg.init_lora_weights = InitSpec::Bool(false);
        let m = LlamaForCausalLM::load(&dir(name), AdapterPlan::single(cfg, 0).unwrap()).unwrap();
        let mut n = 0;
        for l in m.layers() {
            if let Some(ad) = l.lora("default") {
                ad.a.set(
                    &io.get(&format!("factor.{}.lora_A.weight", l.path()))
                        .unwrap(),
                )
                .unwrap();
                ad.b.set(
                    &io.get(&format!("factor.{}.lora_B.weight", l.path()))
                        .unwrap(),
                )
                .unwrap();
                n += 1;
            }
        }
        assert_eq!(n, 14, "{name}: 7 linears per layer, not lm_head");
        let mask = io.get("attention_mask").unwrap();
        let ids = io.get("input_ids").unwrap();
        let out = m
            .forward(
                &ids,
                &Inputs {
                    attention_mask: Some(&mask),
                    ..Default::default()
                },
                &ForwardCtx::train(0, 0),
            )
            .unwrap();
        let want = io.get("lora_logits").unwrap();
        let e = rel_err(&out.get(0).unwrap(), &want.get(0).unwrap());
        assert!(e < 1e-4, "{name}: LoRA logits {e:e}");
        let loss = next_token_loss(&out, &ids, &mask).unwrap();
        let lv = loss.to_scalar::<f32>().unwrap();
        let lw = io.get("loss").unwrap().to_vec1::<f32>().unwrap()[0];
        assert!(
            (lv - lw).abs() < 1e-4 * lw.abs(),
            "{name}: loss {lv} vs {lw}"
        );
        let grads = loss.backward().unwrap();
        for l in m.layers() {
            let Some(ad) = l.lora("default") else {
                continue;
            };
            for (which, v) in [("lora_A", &ad.a), ("lora_B", &ad.b)] {
                let key = format!("grad.{}.{which}.weight", l.path());
                let g = grads
                    .get(v.as_tensor())
                    .unwrap_or_else(|| panic!("no gradient for {key}"));
                let e = rel_err(g, &io.get(&key).unwrap());
                assert!(e < 1e-4, "{name}: {key} relative error {e:e}");
            }
        }
        // Frozen base weights get no gradient.
        for l in m.layers() {
            assert!(
                grads.get(&l.weight().unwrap()).is_none(),
                "{name}: {} got a gradient",
                l.path()
            );
        }
        // The fused loss (no logits tensor: lm_head is frozen) gives the same loss and gradients.
        assert!(
            m.lm_head_is_fused_in_the_loss(),
            "{name}: lm_head is a frozen plain linear"
        );
        let fused = m
            .next_token_loss(
                &ids,
                &Inputs {
                    attention_mask: Some(&mask),
                    ..Default::default()
                },
                &mask,
                &ForwardCtx::train(0, 0),
            )
            .unwrap();
        let fv = fused.to_scalar::<f32>().unwrap();
        assert!(
            (fv - lw).abs() < 1e-4 * lw.abs(),
            "{name}: fused loss {fv} vs {lw}"
        );
        let fg = fused.backward().unwrap();
        for l in m.layers() {
            if let Some(ad) = l.lora("default") {
                for (which, v) in [("lora_A", &ad.a), ("lora_B", &ad.b)] {
                    let key = format!("grad.{}.{which}.weight", l.path());
                    let g = fg
                        .get(v.as_tensor())
                        .unwrap_or_else(|| panic!("fused: no gradient for {key}"));
                    let e = rel_err(g, &io.get(&key).unwrap());
                    assert!(e < 1e-4, "{name}: fused {key} relative error {e:e}");
                }
            }
            assert!(
                fg.get(&l.weight().unwrap()).is_none(),
                "{name}: fused: {} got a gradient",
                l.path()
            );
        }
    }
}

#[test]
fn kv_cache_generation_equals_the_full_forward() {
    let m = LlamaForCausalLM::load(&dir("llama"), AdapterPlan::none()).unwrap();
    let io = SafeTensors::read(dir("llama").join("io.safetensors")).unwrap();
    let ids = io
        .get("input_ids")
        .unwrap()
        .get(0)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    let full = m
        .forward(&ids, &Inputs::default(), &ForwardCtx::eval_with_grad())
        .unwrap();
    let mut cache = m.cache();
    let first = m
        .forward_cached(
            &ids.narrow(1, 0, 6).unwrap(),
            &Inputs::default(),
            Some(&mut cache),
            &ForwardCtx::eval_with_grad(),
        )
        .unwrap();
    let mut parts = vec![first];
    for t in 6..9 {
        parts.push(
            m.forward_cached(
                &ids.narrow(1, t, 1).unwrap(),
                &Inputs::default(),
                Some(&mut cache),
                &ForwardCtx::eval_with_grad(),
            )
            .unwrap(),
        );
    }
    let stepwise = candle_core::Tensor::cat(&parts, 1).unwrap();
    assert!(rel_err(&stepwise, &full) < 1e-5);
    assert_eq!(cache.len, 9);
}

#[test]
fn fused_rms_norm_and_rope_match_the_composites() {
    use postforge::nn::norm::{rms_norm, rms_norm_composite};
    use postforge::nn::rope::rope;
    let xv = candle_core::Var::from_tensor(&randn(&[2, 3, 8], 1.5, "rx")).unwrap();
    let wv = candle_core::Var::from_tensor(&(randn(&[8], 0.2, "rw") + 1.0).unwrap()).unwrap();
    let g = randn(&[2, 3, 8], 1.0, "rg");
    let y1 = rms_norm(xv.as_tensor(), wv.as_tensor(), 1e-6).unwrap();
    let y2 = rms_norm_composite(xv.as_tensor(), wv.as_tensor(), 1e-6).unwrap();
    assert!(rel_err(&y1, &y2) < 1e-5);
    let g1 = (&y1 * &g).unwrap().sum_all().unwrap().backward().unwrap();
    let g2 = (&y2 * &g).unwrap().sum_all().unwrap().backward().unwrap();
    for v in [&xv, &wv] {
        let e = rel_err(
            g1.get(v.as_tensor()).unwrap(),
            g2.get(v.as_tensor()).unwrap(),
        );
        assert!(e < 1e-4, "rms_norm gradient {e}");
    }
    // RoPE is a rotation: its backward is the inverse rotation, so <rope(x), g> = <x, rope⁻¹(g)>.
    let x = candle_core::Var::from_tensor(&randn(&[2, 2, 5, 8], 1.0, "qx")).unwrap();
    let pos = candle_core::Tensor::new(
        &[[0u32, 1, 2, 3, 4], [7, 3, 0, 1, 2]],
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let inv: Vec<f32> = (0..4).map(|i| 1.0 / 100f32.powf(i as f32 / 4.0)).collect();
    let y = rope(x.as_tensor(), &pos, &inv).unwrap();
    let gy = randn(&[2, 2, 5, 8], 1.0, "qg");
    let gr = (&y * &gy).unwrap().sum_all().unwrap().backward().unwrap();
    let gx = gr.get(x.as_tensor()).unwrap();
    // Norms are preserved by a rotation.
    let n = |t: &candle_core::Tensor| {
        t.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    };
    assert!((n(&y) - n(x.as_tensor())).abs() < 1e-3 * n(&y));
    assert!((n(gx) - n(&gy)).abs() < 1e-3 * n(&gy));
    // Position 0 is the identity.
    let d0 = max_abs_diff(
        &y.get(0).unwrap().narrow(1, 0, 1).unwrap(),
        &x.as_tensor().get(0).unwrap().narrow(1, 0, 1).unwrap(),
    );
    assert!(d0 < 1e-6);
}

#[test]
fn greedy_generation_follows_the_argmax_and_sampling_is_seeded() {
    use postforge::models::generate::GenerationConfig;
    let m = LlamaForCausalLM::load(&dir("qwen2"), AdapterPlan::none()).unwrap();
    let prompt = [5u32, 9, 14, 3];
    let g = GenerationConfig {
        max_new_tokens: 6,
        ..Default::default()
    };
    let out = m.generate(&prompt, &g).unwrap();
    assert_eq!(out.len(), 6);
    // Each generated token is the argmax of the full forward over everything before it.
    let mut seq = prompt.to_vec();
    for &tok in &out {
        let ids =
            candle_core::Tensor::from_vec(seq.clone(), (1, seq.len()), &candle_core::Device::Cpu)
                .unwrap();
        let l = m
            .forward(&ids, &Inputs::default(), &ForwardCtx::eval_with_grad())
            .unwrap();
        let last = l
            .get(0)
            .unwrap()
            .get(seq.len() - 1)
            .unwrap()
            .argmax(0)
            .unwrap()
            .to_scalar::<u32>()
            .unwrap();
        assert_eq!(tok, last);
        seq.push(tok);
    }
    // Stop tokens end generation (and are kept).
    let stop = GenerationConfig {
        stop_token_ids: vec![out[2]],
        ..g.clone()
    };
    let s = m.generate(&prompt, &stop).unwrap();
    assert_eq!(s.last(), Some(&out[2]));
    assert!(s.len() <= 3);
    // Sampling: the same seed gives the same text, another seed (usually) not.
    let samp = GenerationConfig {
        do_sample: true,
        temperature: 1.5,
        top_p: 0.95,
        top_k: 40,
        seed: 3,
        max_new_tokens: 12,
        ..Default::default()
    };
    let a = m.generate(&prompt, &samp).unwrap();
    assert_eq!(a, m.generate(&prompt, &samp).unwrap());
    let others: Vec<Vec<u32>> = (4..8)
        .map(|s| {
            m.generate(
                &prompt,
                &GenerationConfig {
                    seed: s,
                    ..samp.clone()
                },
            )
            .unwrap()
        })
        .collect();
    assert!(others.iter().any(|o| *o != a));
}

#[test]
fn merged_save_pretrained_reloads_to_the_same_logits() {
    let io = SafeTensors::read(dir("qwen2").join("io.safetensors")).unwrap();
    let mut cfg = AdapterConfig::lora(4, 8.0, &[]);
    cfg.target_modules = Some(postforge::peft::config::ModuleSpec::Regex(
        "all-linear".into(),
    ));
    cfg.init_lora_weights = InitSpec::Bool(false);
    let m = LlamaForCausalLM::load(&dir("qwen2"), AdapterPlan::single(cfg, 0).unwrap()).unwrap();
    for l in m.layers() {
        if let Some(ad) = l.lora("default") {
            ad.a.set(
                &io.get(&format!("factor.{}.lora_A.weight", l.path()))
                    .unwrap(),
            )
            .unwrap();
            ad.b.set(
                &io.get(&format!("factor.{}.lora_B.weight", l.path()))
                    .unwrap(),
            )
            .unwrap();
        }
    }
    let ids = io.get("input_ids").unwrap();
    let want = m
        .forward(&ids, &Inputs::default(), &ForwardCtx::eval_with_grad())
        .unwrap();
    let d = tempfile::tempdir().unwrap();
    m.save_pretrained(d.path()).unwrap();
    let back = LlamaForCausalLM::load(d.path(), AdapterPlan::none()).unwrap();
    assert!(
        back.config().tie_word_embeddings,
        "no adapter on the embedding: still tied"
    );
    let got = back
        .forward(&ids, &Inputs::default(), &ForwardCtx::eval_with_grad())
        .unwrap();
    assert!(rel_err(&got, &want) < 1e-5);
    let names = SafeTensors::read(d.path().join("model.safetensors"))
        .unwrap()
        .into_tensors();
    assert!(!names.contains_key("lm_head.weight"));
    assert!(names.contains_key("model.layers.1.self_attn.q_proj.bias"));
}

#[test]
fn an_adapted_lm_head_takes_the_logits_path_with_the_same_loss_and_gradients() {
    // LoRA on lm_head too: the loss cannot skip the logits, and must equal forward + loss.
    let io = SafeTensors::read(dir("llama").join("io.safetensors")).unwrap();
    let mut cfg = AdapterConfig::lora(4, 8.0, &["q_proj", "lm_head"]);
    cfg.init_lora_weights = InitSpec::Bool(false);
    let m = LlamaForCausalLM::load(&dir("llama"), AdapterPlan::single(cfg, 0).unwrap()).unwrap();
    assert!(!m.lm_head_is_fused_in_the_loss());
    let plain = LlamaForCausalLM::load(&dir("llama"), AdapterPlan::none()).unwrap();
    assert!(plain.lm_head_is_fused_in_the_loss());
    let (ids, mask) = (
        io.get("input_ids").unwrap(),
        io.get("attention_mask").unwrap(),
    );
    let inputs = Inputs {
        attention_mask: Some(&mask),
        ..Default::default()
    };
    let ctx = ForwardCtx::train(0, 0);
    let a = m.next_token_loss(&ids, &inputs, &mask, &ctx).unwrap();
    let b = next_token_loss(&m.forward(&ids, &inputs, &ctx).unwrap(), &ids, &mask).unwrap();
    let (av, bv) = (a.to_scalar::<f32>().unwrap(), b.to_scalar::<f32>().unwrap());
    assert!((av - bv).abs() <= 1e-6 * bv.abs(), "{av} vs {bv}");
    let (ga, gb) = (a.backward().unwrap(), b.backward().unwrap());
    let head = m
        .layers()
        .into_iter()
        .find(|l| l.path() == "lm_head")
        .unwrap();
    let ad = head.lora("default").unwrap();
    for v in [&ad.a, &ad.b] {
        let e = rel_err(
            ga.get(v.as_tensor()).unwrap(),
            gb.get(v.as_tensor()).unwrap(),
        );
        assert!(e < 1e-6, "lm_head LoRA gradient {e:e}");
    }
    // Zero loss weight everywhere is refused on both paths.
    let zero = mask.zeros_like().unwrap();
    for model in [&m, &plain] {
        let e = model
            .next_token_loss(&ids, &inputs, &zero, &ForwardCtx::eval_with_grad())
            .unwrap_err();
        assert!(e.to_string().contains("carries weight"), "{e}");
    }
}
