//! Mixed precision as PEFT runs it: a bf16 (and f16) base with f32 LoRA factors. The base computes
//! in its dtype, each adapter in f32 on the input cast to f32, the delta is cast back and added;
//! logits come out in f32. Against the f32 model: logits and LoRA gradients within bf16 rounding;
//! adapters and their gradients stay f32, frozen weights get none, and a method that rescales the
//! base (DoRA) is refused by name.

use crate::common::*;
use candle_core::{DType, Tensor};
use postforge::models::llama::{Inputs, LlamaConfig, LlamaForCausalLM};
use postforge::models::Weights;
use postforge::peft::{Adapted, AdapterConfig, AdapterPlan, ForwardCtx};
use std::path::{Path, PathBuf};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama/llama")
}

fn model(dtype: DType, dora: bool) -> postforge::Result<LlamaForCausalLM> {
    let cfg = LlamaConfig::from_file(&dir().join("config.json"))?;
    let mut lcfg = AdapterConfig::lora(4, 8.0, &[]);
    lcfg.target_modules = Some(postforge::peft::config::ModuleSpec::Regex(
        "all-linear".into(),
    ));
    lcfg.use_dora = dora;
    let plan = AdapterPlan::single(lcfg, 7)?;
    let w = Weights::from_files(&postforge::models::weights::weight_files(&dir())?, plan)?
        .with_dtype(dtype);
    LlamaForCausalLM::new(&cfg, &w)
}

#[test]
fn a_bf16_or_f16_base_with_f32_lora_matches_the_f32_model_within_rounding() {
    let io = postforge::util::SafeTensors::read(dir().join("io.safetensors")).unwrap();
    let ids = io.get("input_ids").unwrap();
    let mask = io.get("attention_mask").unwrap();
    let weights = mask.to_dtype(DType::F32).unwrap();
    let reference = model(DType::F32, false).unwrap();
    // The same non-zero B in every model, so that the adapters matter.
    let set_b = |m: &LlamaForCausalLM| {
        for (k, l) in m.layers().iter().enumerate() {
            if let Some(ad) = l.lora("default") {
                let mut rng = postforge::rng::rng_for(k as u64, "mixed-b");
                let b = postforge::rng::normal(ad.b.dims(), 0.05, &mut rng).unwrap();
                ad.b.set(&b).unwrap();
            }
        }
    };
    set_b(&reference);
    let inputs = Inputs {
        attention_mask: Some(&mask),
        ..Default::default()
    };
    let ctx = ForwardCtx::train(0, 0);
    let want = reference.forward(&ids, &inputs, &ctx).unwrap();
    let want_loss = reference
        .next_token_loss(&ids, &inputs, &weights, &ctx)
        .unwrap();
    let want_grads = want_loss.backward().unwrap();
    for (dtype, tol) in [(DType::BF16, 3e-2f32), (DType::F16, 5e-3)] {
        let m = model(dtype, false).unwrap();
        set_b(&m);
        let mut n = 0;
        for l in m.layers() {
            if l.kind() == postforge::peft::BaseKind::Linear && l.path() != "lm_head" {
                assert_eq!(l.base_weight().dtype(), dtype, "{}", l.path());
            }
            if let Some(ad) = l.lora("default") {
                assert_eq!(ad.a.dtype(), DType::F32);
                n += 1;
            }
        }
        assert_eq!(n, 14);
        let got = m.forward(&ids, &inputs, &ctx).unwrap();
        assert_eq!(got.dtype(), DType::F32, "logits come out in f32");
        // Compare the unpadded row 0.
        let e = rel_err(&got.get(0).unwrap(), &want.get(0).unwrap());
        assert!(
            e < tol,
            "{dtype:?}: logits differ by {e:e} (tolerance {tol:e})"
        );
        let loss = m.next_token_loss(&ids, &inputs, &weights, &ctx).unwrap();
        let (lv, lw) = (
            loss.to_scalar::<f32>().unwrap(),
            want_loss.to_scalar::<f32>().unwrap(),
        );
        assert!(
            (lv - lw).abs() < tol * lw.abs(),
            "{dtype:?}: loss {lv} vs {lw}"
        );
        let grads = loss.backward().unwrap();
        for (l, lr) in m.layers().iter().zip(reference.layers()) {
            assert!(
                grads.get(&l.weight().unwrap()).is_none(),
                "{} got a gradient",
                l.path()
            );
            let (Some(ad), Some(adr)) = (l.lora("default"), lr.lora("default")) else {
                continue;
            };
            for (v, vr, which) in [(&ad.a, &adr.a, "A"), (&ad.b, &adr.b, "B")] {
                let g = grads.get(v.as_tensor()).unwrap();
                assert_eq!(g.dtype(), DType::F32);
                let e = rel_err(g, want_grads.get(vr.as_tensor()).unwrap());
                assert!(
                    e < 4.0 * tol,
                    "{dtype:?}: {} {which} gradient differs by {e:e}",
                    l.path()
                );
            }
        }
    }
}

#[test]
fn the_base_runs_in_its_dtype_and_the_delta_in_f32_as_peft_does() {
    let m = model(DType::BF16, false).unwrap();
    let l = m
        .layers()
        .into_iter()
        .find(|l| l.path().ends_with("layers.0.self_attn.q_proj"))
        .unwrap();
    let ad = l.lora("default").unwrap();
    let mut rng = postforge::rng::rng_for(3, "mixed-x");
    ad.b.set(&postforge::rng::normal(ad.b.dims(), 0.1, &mut rng).unwrap())
        .unwrap();
    let x32 = postforge::rng::normal(&[2, 3, ad.a.dim(1).unwrap()], 1.0, &mut rng).unwrap();
    let x = x32.to_dtype(DType::BF16).unwrap();
    let y = l.forward(&x, &ForwardCtx::eval()).unwrap();
    assert_eq!(y.dtype(), DType::BF16);
    let w = l.weight().unwrap();
    let base = x.broadcast_matmul(&w.t().unwrap()).unwrap();
    let xf = x.to_dtype(DType::F32).unwrap();
    let delta = (xf
        .broadcast_matmul(&ad.a.as_tensor().t().unwrap())
        .unwrap()
        .broadcast_matmul(&ad.b.as_tensor().t().unwrap())
        .unwrap()
        * ad.scale)
        .unwrap();
    let want = (base + delta.to_dtype(DType::BF16).unwrap()).unwrap();
    let d: f32 = (y.to_dtype(DType::F32).unwrap() - want.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar()
        .unwrap();
    assert_eq!(d, 0.0, "the layer is base_bf16(x) + (f32 delta).to_bf16");
}

#[test]
fn dora_on_a_bf16_base_is_refused_by_name() {
    let m = model(DType::BF16, true).unwrap();
    let ids = Tensor::new(&[[1u32, 2, 3]], &candle_core::Device::Cpu).unwrap();
    let e = m
        .forward(&ids, &Inputs::default(), &ForwardCtx::eval())
        .unwrap_err()
        .to_string();
    assert!(e.contains("DoRA") && e.contains("--dtype f32"), "{e}");
}

/// QLoRA inside a half-precision model: the NF4 layers compute in f32 (their compute dtype) on
/// the bf16 activations and hand bf16 back; the result stays within bf16 rounding of the f32 model
/// with the same NF4 base.
#[test]
fn nf4_bases_run_inside_a_bf16_model() {
    let cfg = LlamaConfig::from_file(&dir().join("config.json")).unwrap();
    // The f32 reference is quantized from the bf16-rounded weights, so that both models hold the
    // same NF4 codes and differ only by the bf16 activations.
    let file = postforge::models::weights::weight_files(&dir()).unwrap()[0].clone();
    let rounded: std::collections::BTreeMap<String, Tensor> =
        postforge::util::SafeTensors::read(&file)
            .unwrap()
            .into_tensors()
            .into_iter()
            .map(|(k, t)| {
                let r = t
                    .to_dtype(DType::BF16)
                    .unwrap()
                    .to_dtype(DType::F32)
                    .unwrap();
                (k, r)
            })
            .collect();
    let build = |dtype: DType| {
        let mut lcfg = AdapterConfig::lora(4, 8.0, &[]);
        lcfg.target_modules = Some(postforge::peft::config::ModuleSpec::Regex(
            "all-linear".into(),
        ));
        let quant = postforge::peft::quant::QuantSpec::parse("nf4").unwrap();
        let plan = AdapterPlan::single(lcfg, 7).unwrap().quantized(quant);
        let w = Weights::new(rounded.clone(), &file, plan).with_dtype(dtype);
        LlamaForCausalLM::new(&cfg, &w).unwrap()
    };
    let (m32, m16) = (build(DType::F32), build(DType::BF16));
    let ids = Tensor::new(&[[5u32, 9, 2, 7, 1, 3]], &candle_core::Device::Cpu).unwrap();
    let w = Tensor::ones((1, 6), DType::F32, &candle_core::Device::Cpu).unwrap();
    let ctx = ForwardCtx::train(0, 0);
    let a = m32.forward(&ids, &Inputs::default(), &ctx).unwrap();
    let b = m16.forward(&ids, &Inputs::default(), &ctx).unwrap();
    let e = rel_err(&b, &a);
    assert!(e < 3e-2, "logits differ by {e:e}");
    let loss = m16
        .next_token_loss(&ids, &Inputs::default(), &w, &ctx)
        .unwrap();
    let grads = loss.backward().unwrap();
    let ad = m16
        .layers()
        .into_iter()
        .find_map(|l| l.lora("default").map(|a| a.b.clone()))
        .unwrap();
    let g = grads.get(ad.as_tensor()).unwrap();
    let n: f32 = g.abs().unwrap().sum_all().unwrap().to_scalar().unwrap();
    assert!(n.is_finite() && n > 0.0);
}
