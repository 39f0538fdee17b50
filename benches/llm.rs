//! LoRA SFT step (tokens/s, peak memory) of a Llama config with hidden 512, 8 layers, sequence 256,
//! batch 4 (vocabulary 32000, LoRA r=16 on every linear), and greedy generation speed.
//! `cargo bench --bench llm`; compare with `python scripts/bench/llm_peft.py` (same config).
//! POSTFORGE_BENCH_MODE=train runs only the training step, so the printed peak RSS is its own.
//! POSTFORGE_BENCH_QUANT=nf4 puts the base's linear layers in NF4 (QLoRA), POSTFORGE_BENCH_DORA=1
//! trains DoRA instead of LoRA (QDoRA with both). The peak RSS is also given for the training
//! steps alone (the high-water mark is reset after the model is built, which frees the f32
//! weights it was quantized from). POSTFORGE_BENCH_LOSS=logits computes the loss from full logits
//! (`forward` + `next_token_loss`) instead of `LlamaForCausalLM::next_token_loss`, which never
//! materialises them.

use candle_core::{Device, Tensor};
use postforge::models::generate::GenerationConfig;
use postforge::models::llama::{Inputs, LlamaConfig, LlamaForCausalLM};
use postforge::models::Weights;
use postforge::nn::loss::next_token_loss;
use postforge::peft::{AdapterConfig, AdapterPlan, ForwardCtx, ModuleSpec};
use std::time::Instant;

/// The step's matrix products at the bench config, forward and backward (frozen base weights:
/// input gradients only), as (m, k, n, count): the q/k/v/o projections, the MLP's gate/up and
/// down, the output layer in 256-row chunks (forward and input gradient), and per head the five
/// attention products (scores, output; and in the backward scores again, dP, dS·K, dSᵀ·Q, Pᵀ·dO,
/// counted as 7). The LoRA products (rank 16, about 4 % of the FLOPs) are left out.
const STEP_GEMMS: [(usize, usize, usize, usize); 5] = [
    (1024, 512, 512, 8 * 4 * 2),
    (1024, 512, 1376, 8 * 2 * 2),
    (1024, 1376, 512, 8 * 2),
    (256, 512, 32000, 4 * 2),
    (256, 64, 256, 8 * 4 * 8 * 7),
];

/// f32 GFLOP/s of candle's matmul (contiguous operands, all pool threads) at (m, k) · (k, n).
fn gflops(m: usize, k: usize, n: usize) -> f64 {
    let mut rng = postforge::rng::rng_for(9, "gemm-limit");
    let a = postforge::rng::normal(&[m, k], 1.0, &mut rng).unwrap();
    let b = postforge::rng::normal(&[k, n], 1.0, &mut rng).unwrap();
    let reps = (2e9 / (2.0 * (m * k * n) as f64)).clamp(3.0, 200.0) as usize;
    let _ = a.matmul(&b).unwrap();
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t0 = Instant::now();
        for _ in 0..reps {
            let _ = a.matmul(&b).unwrap();
        }
        best = best.min(t0.elapsed().as_secs_f64() / reps as f64);
    }
    2.0 * (m * k * n) as f64 / best / 1e9
}

/// The GEMM limit of this machine for the step: each product class at candle's measured speed.
/// Returns the GEMM-bound step time in seconds.
fn gemm_limit() -> f64 {
    let mut total = 0.0;
    let mut line = String::from("GEMM limit (candle matmul, f32):");
    for (m, k, n, count) in STEP_GEMMS {
        let g = gflops(m, k, n);
        total += count as f64 * 2.0 * (m * k * n) as f64 / (g * 1e9);
        line += &format!(" {m}x{k}x{n} {g:.0} GFLOP/s;");
    }
    let flops: f64 = STEP_GEMMS
        .iter()
        .map(|&(m, k, n, c)| c as f64 * 2.0 * (m * k * n) as f64)
        .sum();
    eprintln!(
        "{line} the step's {:.0} GFLOP at these speeds: {:.0} ms ({:.0} GFLOP/s)",
        flops / 1e9,
        total * 1e3,
        flops / total / 1e9
    );
    total
}

fn main() {
    postforge::util::runtime::init();
    let limit = gemm_limit();
    let mode = std::env::var("POSTFORGE_BENCH_MODE").unwrap_or_else(|_| "all".into());
    let cfg: LlamaConfig = serde_json::from_value(serde_json::json!({
        "model_type": "llama", "vocab_size": 32000, "hidden_size": 512, "intermediate_size": 1376,
        "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 8,
        "max_position_embeddings": 512, "rope_theta": 10000.0
    }))
    .unwrap();
    let quant = std::env::var("POSTFORGE_BENCH_QUANT").unwrap_or_else(|_| "none".into());
    let quant = postforge::peft::quant::QuantSpec::parse(&quant).unwrap();
    let dora = std::env::var("POSTFORGE_BENCH_DORA").is_ok_and(|v| v == "1");
    // POSTFORGE_BENCH_LOSS=logits: the unfused loss (full logits, then the fused token log-probs).
    let unfused = std::env::var("POSTFORGE_BENCH_LOSS").is_ok_and(|v| v == "logits");
    let mut lora = AdapterConfig::lora(16, 32.0, &[]);
    lora.target_modules = Some(ModuleSpec::Regex("all-linear".into()));
    lora.use_dora = dora;
    let plan = AdapterPlan::single(lora, 0).unwrap().quantized(quant);
    let m = LlamaForCausalLM::new(&cfg, &Weights::fresh(1, plan)).unwrap();
    use postforge::peft::Adapted;
    let (bytes, params) = m
        .layers()
        .iter()
        .filter(|l| l.kind() == postforge::peft::BaseKind::Linear && l.path() != "lm_head")
        .fold((0usize, 0usize), |(b, n), l| {
            let w = l.base_weight();
            (
                b + w.storage_bytes(),
                n + w.dims().iter().product::<usize>(),
            )
        });
    eprintln!(
        "{} {}: decoder linear base weights {:.1} MB, {:.3} bytes per parameter",
        if quant.is_some() { "NF4" } else { "f32" },
        if dora { "DoRA" } else { "LoRA" },
        bytes as f64 / 1e6,
        bytes as f64 / params as f64
    );
    let hwm = || -> String {
        std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|st| {
                st.lines()
                    .find(|l| l.starts_with("VmHWM"))
                    .map(|l| l.trim_start_matches("VmHWM:").trim().to_string())
            })
            .unwrap_or_default()
    };
    let load_peak = hwm();
    let _ = std::fs::write("/proc/self/clear_refs", "5");
    let (b, t) = (4usize, 256usize);
    let mut rng = postforge::rng::rng_for(2, "llm-bench");
    use rand::Rng;
    let ids: Vec<u32> = (0..b * t).map(|_| rng.random_range(3..32000)).collect();
    let ids = Tensor::from_vec(ids, (b, t), &Device::Cpu).unwrap();
    let w = Tensor::ones((b, t), candle_core::DType::F32, &Device::Cpu).unwrap();
    let mut times = vec![];
    for round in 0..4 {
        let t0 = Instant::now();
        let loss = if unfused {
            let logits = m
                .forward(&ids, &Inputs::default(), &ForwardCtx::train(0, round))
                .unwrap();
            next_token_loss(&logits, &ids, &w).unwrap()
        } else {
            m.next_token_loss(&ids, &Inputs::default(), &w, &ForwardCtx::train(0, round))
                .unwrap()
        };
        let _ = loss.backward().unwrap();
        if round > 0 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let step = times[times.len() / 2];
    eprintln!(
        "{} r16 SFT step (hidden 512, 8 layers, seq 256, batch 4, vocab 32000): {:.0} ms, {:.0} tokens/s",
        match (quant.is_some(), dora) {
            (false, false) => "LoRA",
            (false, true) => "DoRA",
            (true, false) => "QLoRA",
            (true, true) => "QDoRA",
        },
        step * 1e3,
        (b * t) as f64 / step
    );
    eprintln!(
        "the step reaches {:.2} of the GEMM limit ({:.0} ms)",
        limit / step,
        limit * 1e3
    );
    eprintln!(
        "peak RSS while building the model: {load_peak}; over the training steps: {}",
        hwm()
    );
    if mode == "all" {
        let prompt: Vec<u32> = (0..16).map(|i| 5 + i).collect();
        let g = GenerationConfig {
            max_new_tokens: 64,
            ..Default::default()
        };
        let _ = m.generate(&prompt, &g).unwrap();
        let t0 = Instant::now();
        let out = m.generate(&prompt, &g).unwrap();
        let dt = t0.elapsed().as_secs_f64();
        eprintln!(
            "greedy generation (batch 1, 16-token prompt, KV cache): {} tokens in {:.2} s, {:.1} tokens/s",
            out.len(),
            dt,
            out.len() as f64 / dt
        );
    }
    if let Ok(st) = std::fs::read_to_string("/proc/self/status") {
        if let Some(l) = st.lines().find(|l| l.starts_with("VmHWM")) {
            eprintln!("peak RSS: {}", l.trim_start_matches("VmHWM:").trim());
        }
    }
}
