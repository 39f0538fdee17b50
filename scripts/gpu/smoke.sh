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
