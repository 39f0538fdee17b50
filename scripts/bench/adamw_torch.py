"""PyTorch's AdamW update time per parameter on this CPU, for the ratio against postforge's fused AdamW.

Same shapes as `cargo bench --bench adapters` (adamw/4.2M): 64 tensors, 4.2M parameters in all.
    python scripts/bench/adamw_torch.py [--threads 2]
"""
import argparse
import time

import torch

ap = argparse.ArgumentParser()
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--iters", type=int, default=50)
args = ap.parse_args()
torch.set_num_threads(args.threads)
n_tensors, per = 64, 4_200_000 // 64
params = [torch.nn.Parameter(torch.randn(per) * 0.1) for _ in range(n_tensors)]
for p in params:
    p.grad = torch.randn(per) * 0.1
for name, kw in [("foreach (default)", {}), ("fused", {"fused": True})]:
    try:
        opt = torch.optim.AdamW(params, lr=1e-3, **kw)
    except Exception as e:  # fused may be unavailable on CPU builds
        print(f"{name}: unavailable ({e})")
        continue
    for _ in range(5):
        opt.step()
    t0 = time.perf_counter()
    for _ in range(args.iters):
        opt.step()
    dt = (time.perf_counter() - t0) / args.iters
    print(f"torch {torch.__version__} AdamW {name}, {args.threads} threads: {dt*1e3:.2f} ms/step, "
          f"{dt / (n_tensors * per) * 1e9:.2f} ns/param")
