#!/usr/bin/env bash
# On a GPU machine: build the `cuda` feature (scripts/gpu/build_cuda.sh) and check every
# differentiable op of postforge::nn on the GPU against the CPU (value and input gradient).
#   bash scripts/gpu/smoke.sh [cuda:N]
# Prints the GPU's name (nvidia-smi) and one line per op; exits non-zero on any failure.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
target=${TARGET_DIR:-$root/target/cuda}
dev=${1:-cuda:0}
bash "$root/scripts/gpu/build_cuda.sh" "$target"
venv=${VENV:-$root/.venv-cuda}
lib=$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))')
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
CUDARC_CUDA_VERSION=13040 CUDA_ROOT=$lib/.. PATH=$lib/../bin:$PATH \
  CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90} cargo build --release --locked --features cuda \
  --manifest-path "$root/Cargo.toml" --target-dir "$target" --example gpu_smoke
LD_LIBRARY_PATH=$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} "$target/release/examples/gpu_smoke" "$dev"

# Whole commands with --device: the same short LoRA training and greedy generation on the GPU and
# on the CPU. The losses agree to float tolerance and the generated text is the same.
CUDARC_CUDA_VERSION=13040 CUDA_ROOT=$lib/.. PATH=$lib/../bin:$PATH \
  CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90} cargo build --release --locked --features cuda \
  --manifest-path "$root/Cargo.toml" --target-dir "$target" --bin postforge
pf() { LD_LIBRARY_PATH=$lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH} "$target/release/postforge" "$@"; }
out=${OUT:-/tmp}/gpu-smoke
rm -rf "$out" && mkdir -p "$out"
for d in cpu "$dev"; do
  /usr/bin/time -f "$d train-diffusion: %e s, peak RSS %M kB" pf --device "$d" train-diffusion \
    --pretrained_model_name_or_path "$root/assets/models/tiny-sd" \
    --train_data_dir "$root/assets/data/styles/striped" --output_dir "$out/lora-${d%%:*}" \
    --resolution 32 --network_dim 8 --network_alpha 8 --max_train_steps 30 --train_batch_size 4 --seed 1 \
    --learning_rate 1e-3 2>&1 | tail -3
  pf --device "$d" generate --model "$root/assets/models/tiny-chat" \
    --prompt "What colour is the sky?" > "$out/gen-${d%%:*}.txt"
done
python3 - "$out" <<'PY'
import json, sys
out = sys.argv[1]
def losses(d):
    return [json.loads(l)["loss"] for l in open(f"{out}/lora-{d}/metrics.jsonl") if '"loss"' in l]
c, g = losses("cpu"), losses("cuda")
worst = max(abs(a - b) for a, b in zip(c, g))
print(f"train-diffusion loss, CPU vs GPU over {len(c)} logged steps: worst difference {worst:.2e}")
same = open(f"{out}/gen-cpu.txt").read() == open(f"{out}/gen-cuda.txt").read()
print(f"generate: GPU text {'equals' if same else 'DIFFERS FROM'} the CPU's")
sys.exit(0 if worst < 1e-2 and same else 1)
PY
