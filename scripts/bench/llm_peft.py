"""PyTorch + PEFT on this CPU for the ratios against `cargo bench --bench llm` (same config):
a LoRA r=16 (all-linear) SFT step of a Llama with hidden 512, 8 layers, sequence 256, batch 4,
vocabulary 32000, and greedy generation of 64 tokens (batch 1, KV cache).

    python scripts/bench/llm_peft.py --threads 2               # timings and peak RSS
    python scripts/bench/llm_peft.py --threads 2 --mode train  # peak RSS of the training step only
"""
import argparse
import resource
import statistics
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

ap = argparse.ArgumentParser()
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--mode", choices=["all", "train"], default="all")
args = ap.parse_args()
torch.set_num_threads(args.threads)
torch.manual_seed(0)
# The step's matrix products (see benches/llm.rs STEP_GEMMS) at torch.mm's speed on this CPU.
STEP_GEMMS = [(1024, 512, 512, 64), (1024, 512, 1376, 32), (1024, 1376, 512, 16),
              (256, 512, 32000, 8), (256, 64, 256, 8 * 4 * 8 * 7)]
limit, flops, parts = 0.0, 0.0, []
for m, k, n, c in STEP_GEMMS:
    a, b = torch.randn(m, k), torch.randn(k, n)
    reps = int(min(200, max(3, 2e9 / (2 * m * k * n))))
    a @ b
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = min(best, (time.perf_counter() - t0) / reps)
    g = 2 * m * k * n / best / 1e9
    parts.append(f"{m}x{k}x{n} {g:.0f} GFLOP/s")
    limit += c * 2 * m * k * n / (g * 1e9)
    flops += c * 2 * m * k * n
print(f"GEMM limit (torch.mm, f32): {'; '.join(parts)}; the step's {flops / 1e9:.0f} GFLOP at these speeds: "
      f"{limit * 1e3:.0f} ms ({flops / limit / 1e9:.0f} GFLOP/s)")
cfg = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1376, num_hidden_layers=8,
                  num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=512)
cfg._attn_implementation = "sdpa"
model = get_peft_model(LlamaForCausalLM(cfg), LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
model.train()
B, T = 4, 256
ids = torch.randint(3, 32000, (B, T))
times = []
for r in range(4):
    t0 = time.perf_counter()
    out = model(input_ids=ids, labels=ids)
    out.loss.backward()
    for p in model.parameters():
        p.grad = None
    if r > 0:
        times.append(time.perf_counter() - t0)
step = statistics.median(times)
print(f"LoRA r16 SFT step: {step * 1e3:.0f} ms, {B * T / step:.0f} tokens/s")
print(f"the step reaches {limit / step:.2f} of its GEMM limit ({limit * 1e3:.0f} ms)")
if args.mode == "all":
    model.eval()
    prompt = torch.arange(5, 21).unsqueeze(0)
    with torch.no_grad():
        model.generate(prompt, max_new_tokens=64, do_sample=False, min_new_tokens=64)
        t0 = time.perf_counter()
        g = model.generate(prompt, max_new_tokens=64, do_sample=False, min_new_tokens=64)
        dt = time.perf_counter() - t0
    n = g.shape[1] - prompt.shape[1]
    print(f"greedy generation: {n} tokens in {dt:.2f} s, {n / dt:.1f} tokens/s")
print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
