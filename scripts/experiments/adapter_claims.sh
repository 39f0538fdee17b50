#!/usr/bin/env bash
# The seed's adapter claims, checked on one task: teach tiny-chat the "largest number" task
# (assets/data/chat/max-train.jsonl; held-out loss on max-eval.jsonl, reference perplexity on
# general.jsonl for forgetting) with the same data, batch, schedule and steps for every method:
#   - full fine-tuning (every linear layer and the embeddings) at each rate of FULL_LRS; the best
#     held-out loss is the baseline;
#   - LoRA and DoRA at r = 4 and 8 (alpha = 2r): the share of the full fine-tuning gap each closes,
#     (base loss − method loss) / (base loss − full loss), on the held-out loss;
#   - PiSSA vs LoRA at r = 8: optimizer steps until the smoothed training loss (EMA 0.9) first
#     reaches each of TARGETS;
#   - QLoRA and QDoRA at r = 8 (NF4 base with double quantization) against full fine-tuning.
# Wall time, trainable parameters and base-weight bytes per parameter come from run_report.json.
#   bash scripts/experiments/adapter_claims.sh [OUT]
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release --quiet
B=target/release/postforge
D=assets/data/chat
OUT=${1:-runs/adapter-claims}
STEPS=${STEPS:-150}
LR=${LR:-1e-3}
FULL_LRS=${FULL_LRS:-"1e-4 3e-4 1e-3"}
TARGETS=${TARGETS:-"1.5 1.0 0.7"}
mkdir -p "$OUT"
common=(--model assets/models/tiny-chat --data $D/max-train.jsonl --eval-data $D/max-eval.jsonl
        --reference $D/general.jsonl --eval-steps 1000000 --packing --max-length 128
        --lr-scheduler-type cosine --warmup-steps 10 --max-steps "$STEPS"
        --per-device-train-batch-size 8 --seed 0 --overwrite-output-dir)
run() { # run NAME flags...
  local name=$1; shift
  echo "== $name"
  $B sft "${common[@]}" --output-dir "$OUT/$name" "$@" > "$OUT/$name.log" 2>&1
  tail -2 "$OUT/$name.log"
}
for lr in $FULL_LRS; do
  run "full-$lr" --full-finetune --learning-rate "$lr"
done
for r in 4 8; do
  a=$((2 * r))
  run "lora-r$r" --r $r --lora-alpha $a --learning-rate "$LR"
  run "dora-r$r" --r $r --lora-alpha $a --use-dora --learning-rate "$LR"
done
run pissa-r8 --r 8 --lora-alpha 16 --init-lora-weights pissa --learning-rate "$LR"
run qlora-r8 --r 8 --lora-alpha 16 --quantize nf4 --learning-rate "$LR"
run qdora-r8 --r 8 --lora-alpha 16 --quantize nf4 --use-dora --learning-rate "$LR"
python3 - "$OUT" "$TARGETS" $FULL_LRS <<'PY'
import json, sys, pathlib
out, targets, full_lrs = pathlib.Path(sys.argv[1]), [float(t) for t in sys.argv[2].split()], sys.argv[3:]
def read(name):
    d = out / name
    ev = [json.loads(l) for l in (d / "eval.jsonl").read_text().splitlines() if l.strip()]
    rep = json.loads((d / "run_report.json").read_text())
    losses = [json.loads(l)["loss"] for l in (d / "metrics.jsonl").read_text().splitlines() if l.strip()]
    ema, hit = None, {t: None for t in targets}
    for i, l in enumerate(losses, 1):
        ema = l if ema is None else 0.9 * ema + 0.1 * l
        for t in targets:
            if hit[t] is None and ema <= t:
                hit[t] = i
    log = (out / f"{name}.log").read_text()
    trainable = int(log.split(" trainable parameters")[0].split()[-1])
    return dict(base=ev[0]["eval_loss"], loss=ev[-1]["eval_loss"], ppl0=ev[0]["reference_ppl"],
                ppl=ev[-1]["reference_ppl"], secs=rep["seconds"], bpp=rep["base_bytes_per_param"],
                hit=hit, trainable=trainable)
names = [f"full-{lr}" for lr in full_lrs] + ["lora-r4", "dora-r4", "lora-r8", "dora-r8", "pissa-r8", "qlora-r8", "qdora-r8"]
rows = {n: read(n) for n in names}
best = min((n for n in names if n.startswith("full-")), key=lambda n: rows[n]["loss"])
full = rows[best]
steps_hdr = " | ".join(f"steps to {t:g}" for t in targets)
lines = [f"baseline: {best}", "",
         f"| method | trainable | base bytes/param | held-out loss | share of full-FT gap | ref. ppl (forgetting) | {steps_hdr} | wall s |",
         "|---|---|---|---|---|---|" + "---|" * len(targets) + "---|"]
for n in names:
    r = rows[n]
    share = (r["base"] - r["loss"]) / (full["base"] - full["loss"])
    hits = " | ".join(str(r["hit"][t] or "–") for t in targets)
    lines.append(f"| {n} | {r['trainable']} | {r['bpp']:.3f} | {r['base']:.3f} → {r['loss']:.3f} | {100*share:.1f}% | "
                 f"{r['ppl0']:.3f} → {r['ppl']:.3f} ({100*(r['ppl']/r['ppl0']-1):+.1f}%) | {hits} | {r['secs']:.1f} |")
text = "\n".join(lines)
(out / "table.md").write_text(text + "\n")
print(text)
PY
