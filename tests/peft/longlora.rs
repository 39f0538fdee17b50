//! LongLoRA on the Llama family: shifted sparse attention (S²-Attn) against a direct
//! group-by-group computation of the paper's algorithm (including padding keys and a length that
//! does not divide into the groups), gradients through it to every LoRA factor, full attention at
//! inference, trainable embeddings and norms, and position interpolation (linear RoPE scaling written into the config).

use crate::common::*;
use candle_core::{DType, Device, Tensor, D};
use postforge::models::llama::{Inputs, LlamaForCausalLM};
use postforge::nn::attention::shifted_sparse_attention;
use postforge::nn::loss::next_token_loss;
use postforge::peft::{Adapted, AdapterConfig, AdapterPlan, ForwardCtx, InitSpec};
use std::path::Path;

fn roll(x: &Tensor, shift: i64, dim: usize) -> Tensor {
    let n = x.dim(dim).unwrap() as i64;
    let s = shift.rem_euclid(n) as usize;
    if s == 0 {
        return x.clone();
    }
    let n = n as usize;
    Tensor::cat(
        &[
            x.narrow(dim, n - s, s).unwrap(),
            x.narrow(dim, 0, n - s).unwrap(),
        ],
        dim,
    )
    .unwrap()
}

/// The algorithm as the paper writes it, one group at a time (T divisible by the groups).
fn reference(q: &Tensor, k: &Tensor, v: &Tensor, groups: usize, valid: Option<&[u32]>) -> Tensor {
    let (b, nh, t, hd) = q.dims4().unwrap();
    let g = t / groups;
    let half = nh / 2;
    let mut halves = vec![];
    for (h0, h1, shift) in [(0, half, 0i64), (half, nh, (g / 2) as i64)] {
        let s = |x: &Tensor| roll(&x.narrow(1, h0, h1 - h0).unwrap(), -shift, 2);
        let (qs, ks, vs) = (s(q), s(k), s(v));
        let mut outs = vec![];
        for gi in 0..groups {
            let w = |x: &Tensor| x.narrow(2, gi * g, g).unwrap().contiguous().unwrap();
            let scores =
                (w(&qs).matmul(&w(&ks).t().unwrap()).unwrap() / (hd as f64).sqrt()).unwrap();
            let mut m = vec![0f32; b * g * g];
            for bi in 0..b {
                for i in 0..g {
                    for j in 0..g {
                        let orig = ((gi * g + j) as i64 + shift).rem_euclid(t as i64) as usize;
                        let ok = j <= i && valid.is_none_or(|v| v[bi * t + orig] != 0);
                        if !ok {
                            m[(bi * g + i) * g + j] = -1e30;
                        }
                    }
                }
            }
            let mask = Tensor::from_vec(m, (b, 1, g, g), &Device::Cpu).unwrap();
            let _ = &mask;
            let p =
                candle_nn::ops::softmax_last_dim(&scores.broadcast_add(&mask).unwrap()).unwrap();
            outs.push(p.matmul(&w(&vs)).unwrap());
        }
        let o = Tensor::cat(&outs, 2).unwrap(); // (b, h, t, hd)
        halves.push(roll(&o, shift, 2));
    }
    Tensor::cat(&halves, 1)
        .unwrap()
        .transpose(1, 2)
        .unwrap()
        .contiguous()
        .unwrap()
        .reshape((b, t, nh * hd))
        .unwrap()
}

#[test]
fn shifted_sparse_attention_follows_the_paper() {
    let (b, nh, t, hd) = (2, 4, 16, 8);
    let r = |n: &str| randn(&[b, nh, t, hd], 1.0, n);
    let (q, k, v) = (r("q"), r("k"), r("v"));
    let got = shifted_sparse_attention(&q, &k, &v, 0.25, None).unwrap();
    let want = reference(&q, &k, &v, 4, None);
    assert!(rel_err(&got, &want) < 1e-5, "{}", rel_err(&got, &want));
    // Padding keys (the second row ends with three pads) stay masked.
    let mut valid = vec![1u32; b * t];
    for p in valid[2 * t - 3..].iter_mut() {
        *p = 0;
    }
    let got = shifted_sparse_attention(&q, &k, &v, 0.25, Some(&valid)).unwrap();
    let want = reference(&q, &k, &v, 4, Some(&valid));
    assert!(rel_err(&got, &want) < 1e-5);
    // It is not full causal attention: information moves only within (shifted) groups.
    let full = {
        let s = (q.matmul(&k.t().unwrap()).unwrap() / (hd as f64).sqrt()).unwrap();
        let m: Vec<f32> = (0..t * t)
            .map(|i| if i % t <= i / t { 0.0 } else { -1e30 })
            .collect();
        let m = Tensor::from_vec(m, (1, 1, t, t), &Device::Cpu).unwrap();
        candle_nn::ops::softmax_last_dim(&s.broadcast_add(&m).unwrap())
            .unwrap()
            .matmul(&v)
            .unwrap()
            .transpose(1, 2)
            .unwrap()
            .reshape((b, t, nh * hd))
            .unwrap()
    };
    let got = shifted_sparse_attention(&q, &k, &v, 0.25, None).unwrap();
    assert!(rel_err(&got, &full) > 1e-2);
    // The first group of the unshifted heads sees the same keys as full attention does.
    let head0 = |x: &Tensor| x.narrow(1, 0, 4).unwrap().narrow(2, 0, hd).unwrap();
    assert!(rel_err(&head0(&got), &head0(&full)) < 1e-5);
    // A length that does not divide into 4 groups (15): padded internally, still finite, and
    // the padding never leaks (the same as attending over the 15 real tokens padded by hand).
    let cut = |x: &Tensor| x.narrow(2, 0, 15).unwrap();
    let odd = shifted_sparse_attention(&cut(&q), &cut(&k), &cut(&v), 0.25, None).unwrap();
    assert_eq!(odd.dims(), &[b, 15, nh * hd]);
    let sum = odd
        .abs()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap();
    assert!(sum.is_finite());
    let _ = DType::F32;
    let _ = D::Minus1;
}

#[test]
fn longlora_trains_through_s2_attn_and_keeps_full_attention_at_inference() {
    // The Qwen2 fixture: plain RoPE (the Llama one already has llama3 scaling).
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/llama/qwen2");
    let mut cfg = AdapterConfig::lora(4, 8.0, &["q_proj", "k_proj", "v_proj", "o_proj"]);
    cfg.init_lora_weights = InitSpec::Bool(false);
    // LongLoRA trains the embeddings and the norms in full (PEFT's `endswith` rule: `norm` also
    // names every `*_layernorm`).
    cfg.modules_to_save = Some(vec!["embed_tokens".into(), "norm".into()]);
    let mut m = LlamaForCausalLM::load(&dir, AdapterPlan::single(cfg, 2).unwrap()).unwrap();
    let ids = ids(&[2, 16], 60);
    let eval = m
        .forward(&ids, &Inputs::default(), &ForwardCtx::eval_with_grad())
        .unwrap();
    let train_full = m
        .forward(&ids, &Inputs::default(), &ForwardCtx::train(0, 0))
        .unwrap();
    m.set_shifted_sparse_attention(Some(0.25));
    // Inference still attends in full.
    let eval2 = m
        .forward(&ids, &Inputs::default(), &ForwardCtx::eval_with_grad())
        .unwrap();
    assert!(rel_err(&eval, &eval2) < 1e-6);
    let out = m
        .forward(&ids, &Inputs::default(), &ForwardCtx::train(0, 0))
        .unwrap();
    assert!(
        rel_err(&out, &train_full) > 1e-3,
        "S²-Attn changes training forwards"
    );
    let mask = Tensor::ones((2, 16), DType::U32, &Device::Cpu).unwrap();
    let grads = next_token_loss(&out, &ids, &mask)
        .unwrap()
        .backward()
        .unwrap();
    let vars = m.trainable();
    assert!(vars
        .iter()
        .any(|(n, _)| n.contains("embed_tokens.modules_to_save")));
    assert_all_trained(&grads, &vars, "LongLoRA");
    // Packed sequences and S²-Attn do not mix.
    let seg: Vec<u32> = (0..32).map(|i| (i % 16 >= 8) as u32).collect();
    let seg = Tensor::from_vec(seg, (2, 16), &Device::Cpu).unwrap();
    let e = m
        .forward(
            &ids,
            &Inputs {
                segment_ids: Some(&seg),
                ..Default::default()
            },
            &ForwardCtx::train(0, 0),
        )
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("packed"), "{e}");
    // One segment per row (unpacked SFT batches carry segment ids too) is fine.
    let one = Tensor::zeros((2, 16), DType::U32, &Device::Cpu).unwrap();
    let fine = m
        .forward(
            &ids,
            &Inputs {
                segment_ids: Some(&one),
                ..Default::default()
            },
            &ForwardCtx::train(0, 0),
        )
        .unwrap();
    assert!(rel_err(&fine, &out) < 1e-6);
    // Position interpolation: linear RoPE scaling, context × 4, in the saved config.
    m.set_position_interpolation(4.0).unwrap();
    let scaled = m
        .forward(&ids, &Inputs::default(), &ForwardCtx::eval_with_grad())
        .unwrap();
    assert!(rel_err(&scaled, &eval) > 1e-4);
    let tmp = tempfile::tempdir().unwrap();
    m.merge_adapters().unwrap();
    m.save_pretrained(tmp.path()).unwrap();
    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(tmp.path().join("config.json")).unwrap())
            .unwrap();
    assert_eq!(c["rope_scaling"]["type"], "linear");
    assert_eq!(c["rope_scaling"]["factor"], 4.0);
    assert_eq!(c["max_position_embeddings"], 256);
    assert!(m.set_position_interpolation(2.0).is_err(), "no stacking");
}
