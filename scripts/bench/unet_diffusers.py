"""diffusers + PEFT on this CPU, for the ratios against `cargo bench --bench unet`.

Same U-Net configs, batch sizes, LoRA targets (r=8, alpha=8) and measurements as benches/unet.rs:
a training step (forward + backward of mean(y^2)) with a LoRA and with full training, and 20 CFG
sampling steps (batch doubled, no gradients). Run one case per process to read its peak memory:

    python scripts/bench/unet_diffusers.py --threads 2 --case 0 --mode lora   # peak RSS of a LoRA step
    python scripts/bench/unet_diffusers.py --threads 2                        # all timings
"""
import argparse
import resource
import statistics
import time

import torch
from diffusers import UNet2DConditionModel
from peft import LoraConfig, inject_adapter_in_model

ap = argparse.ArgumentParser()
ap.add_argument("--threads", type=int, default=2)
ap.add_argument("--case", type=int, default=None, help="only this case (0, 1, 2, 3)")
ap.add_argument("--mode", choices=["lora", "full", "all"], default="all")
ap.add_argument("--rounds", type=int, default=5)
args = ap.parse_args()
torch.set_num_threads(args.threads)
torch.manual_seed(0)

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"]


def config(boc, sample, ch, cross, low_attn=False):
    n = len(boc)
    down = ["CrossAttnDownBlock2D" if i + 1 < n else "DownBlock2D" for i in range(n)]
    up = ["UpBlock2D" if i == 0 else "CrossAttnUpBlock2D" for i in range(n)]
    if low_attn:
        down = ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"]
        up = ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"]
    return dict(sample_size=sample, in_channels=ch, out_channels=ch, block_out_channels=boc,
                layers_per_block=1, down_block_types=down, up_block_types=up,
                cross_attention_dim=cross, attention_head_dim=4, norm_num_groups=8,
                **({"use_linear_projection": True} if low_attn else {}))


CASES = [
    ("tiny-sd, attention at 16x16 and 8x8 only, batch 8", config([32, 64, 64], 32, 3, 64, True), 8, 32, 64),
    ("tiny-sd (32,64,64) @32x32, batch 8", config([32, 64, 64], 32, 3, 64), 8, 32, 64),
    ("mid (64,128,256) @32x32, batch 4", config([64, 128, 256], 32, 4, 128), 4, 32, 128),
    # the main job's adapter: LoCon r16 on the resnet and sampler convs (unet-convblock-only)
    ("main job: tiny-sd, LoCon r16 on the resnet and sampler convs, batch 8",
     config([32, 64, 64], 32, 3, 64, True), 8, 32, 64),
]
CONV_TARGETS = r".*\.(conv1|conv2|conv|conv_shortcut)$"

for ci, (name, cfg, batch, hw, cross) in enumerate(CASES):
    if args.case is not None and ci != args.case:
        continue
    models = {}
    if args.mode in ("lora", "all"):
        m = UNet2DConditionModel(**cfg)
        m.requires_grad_(False)
        lcfg = (LoraConfig(r=16, lora_alpha=16, target_modules=CONV_TARGETS) if ci == 3
                else LoraConfig(r=8, lora_alpha=8, target_modules=TARGETS))
        m = inject_adapter_in_model(lcfg, m)
        for n_, p in m.named_parameters():
            p.requires_grad_("lora_" in n_)
        models["LoRA"] = m.train()
    if args.mode in ("full", "all"):
        models["full"] = UNet2DConditionModel(**cfg).train()
    x = torch.randn(batch, cfg["in_channels"], hw, hw)
    c = torch.randn(batch, 8, cross)
    t = torch.full((batch,), 500.0)
    times = {k: [] for k in models}
    fwd = []
    for r in range(args.rounds):
        for k, m in models.items():
            t0 = time.perf_counter()
            y = m(x, t, encoder_hidden_states=c).sample
            f = time.perf_counter() - t0
            (y ** 2).mean().backward()
            for p in m.parameters():
                p.grad = None
            if r > 0:
                times[k].append(time.perf_counter() - t0)
                if k == "LoRA":
                    fwd.append(f)
    line = f"{name}: " + ", ".join(
        f"train step {k} {statistics.median(v) * 1e3:.0f} ms" for k, v in times.items())
    if fwd:
        line += f" (LoRA fwd {statistics.median(fwd) * 1e3:.0f} ms)"
    if args.mode == "all" and "LoRA" in models:
        m = models["LoRA"].eval()
        t0 = time.perf_counter()
        with torch.no_grad():
            for _ in range(20):
                m(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([c, c]))
        s = time.perf_counter() - t0
        line += f"; sampling 20 CFG steps for {batch} images {s:.2f} s ({batch / s:.1f} images/s)"
    print(line, flush=True)
print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
