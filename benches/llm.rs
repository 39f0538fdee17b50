//! LoRA SFT step (tokens/s, peak memory) of a Llama config with hidden 512, 8 layers, sequence 256,
//! batch 4 (vocabulary 32000, LoRA r=16 on every linear), and greedy generation speed.
//! `cargo bench --bench llm`; compare with `python scripts/bench/llm_peft.py` (same config).
//! POSTFORGE_BENCH_MODE=train runs only the training step, so the printed peak RSS is its own.

use candle_core::{Device, Tensor};
use postforge::models::llama::{
    next_token_loss, GenerationConfig, Inputs, LlamaConfig, LlamaForCausalLM,
};
use postforge::models::Weights;
use postforge::peft::{AdapterConfig, AdapterPlan, ForwardCtx, ModuleSpec};
use std::time::Instant;

fn main() {
    let mode = std::env::var("POSTFORGE_BENCH_MODE").unwrap_or_else(|_| "all".into());
    let cfg: LlamaConfig = serde_json::from_value(serde_json::json!({
        "model_type": "llama", "vocab_size": 32000, "hidden_size": 512, "intermediate_size": 1376,
        "num_hidden_layers": 8, "num_attention_heads": 8, "num_key_value_heads": 8,
        "max_position_embeddings": 512, "rope_theta": 10000.0
    }))
    .unwrap();
    let mut lora = AdapterConfig::lora(16, 32.0, &[]);
    lora.target_modules = Some(ModuleSpec::Regex("all-linear".into()));
    let m = LlamaForCausalLM::new(
        &cfg,
        &Weights::fresh(1, AdapterPlan::single(lora, 0).unwrap()),
    )
    .unwrap();
    let (b, t) = (4usize, 256usize);
    let mut rng = postforge::peft::init::rng_for(2, "llm-bench");
    use rand::Rng;
    let ids: Vec<u32> = (0..b * t).map(|_| rng.random_range(3..32000)).collect();
    let ids = Tensor::from_vec(ids, (b, t), &Device::Cpu).unwrap();
    let w = Tensor::ones((b, t), candle_core::DType::F32, &Device::Cpu).unwrap();
    let mut times = vec![];
    for round in 0..4 {
        let t0 = Instant::now();
        let logits = m
            .forward(&ids, &Inputs::default(), &ForwardCtx::train(0, round))
            .unwrap();
        let loss = next_token_loss(&logits, &ids, &w).unwrap();
        let _ = loss.backward().unwrap();
        if round > 0 {
            times.push(t0.elapsed().as_secs_f64());
        }
    }
    times.sort_by(|a, b| a.total_cmp(b));
    let step = times[times.len() / 2];
    eprintln!(
        "LoRA r16 SFT step (hidden 512, 8 layers, seq 256, batch 4, vocab 32000): {:.0} ms, {:.0} tokens/s",
        step * 1e3,
        (b * t) as f64 / step
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
