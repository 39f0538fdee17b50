#!/usr/bin/env bash
# Builds postforge with the `cuda` feature on a machine without a CUDA toolkit or GPU driver, from
# PyPI's NVIDIA wheels (see scripts/gpu/README.md for what each step is for).
#   bash scripts/gpu/build_cuda.sh [TARGET_DIR]      (default target/cuda)
# Env: CUDA_COMPUTE_CAP (default 90 = H100; 80 = A100, 89 = L4/4090), VENV (default .venv-cuda).
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
target=${1:-$root/target/cuda}
venv=${VENV:-$root/.venv-cuda}
cap=${CUDA_COMPUTE_CAP:-90}

# 1. nvcc, the runtime / cuBLAS / cuRAND / NVRTC headers and libraries, all CUDA 13, from PyPI.
python3 -m venv "$venv"
"$venv/bin/pip" install -q nvidia-cuda-nvcc nvidia-cuda-runtime nvidia-cublas nvidia-curand \
  nvidia-cuda-nvrtc nvidia-cuda-cccl
cuda=$("$venv/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
lib=$cuda/lib

# 2. The linker wants unversioned names; the wheels ship only the versioned ones.
for l in libnvrtc.so.13 libcurand.so.10 libcublas.so.13 libcublasLt.so.13 libcudart.so.13; do
  ln -sf "$l" "$lib/${l%%.so.*}.so"
done

# 3. The driver (libcuda) comes with the GPU driver, not with any wheel. Link against a stand-in
#    whose soname is libcuda.so.1: every driver entry point cudarc, candle-core and candle-nn
#    reference returns CUDA_ERROR_STUB_LIBRARY (34); at run time the machine's real driver loads.
syms=$(mktemp)
cargo fetch --locked --manifest-path "$root/Cargo.toml" >/dev/null
first_try=0
CUDARC_CUDA_VERSION=13040 CUDA_ROOT=$cuda CUDA_PATH=$cuda PATH=$cuda/bin:$PATH \
  CUDA_COMPUTE_CAP=$cap cargo build --release --locked --features cuda \
  --manifest-path "$root/Cargo.toml" --target-dir "$target" --lib || first_try=$?
for f in "$target"/release/deps/lib{cudarc,candle_core,candle_nn}-*.rlib; do nm -u "$f" 2>/dev/null; done |
  awk '{print $2}' | grep -E '^cu[A-Z]' | sort -u > "$syms"
{
  echo "/* link-time stand-in for libcuda.so.1 (scripts/gpu/build_cuda.sh) */"
  while read -r s; do echo "int $s(void) { return 34; }"; done < "$syms"
} > "$target/libcuda_stub.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$lib/libcuda.so" "$target/libcuda_stub.c"
mkdir -p "$target/stub-run" && cp "$lib/libcuda.so" "$target/stub-run/libcuda.so.1"

# 4. The build: cudarc 0.19.10 knows CUDA up to 13.4 and refuses nvcc 13.5 unless told the version
#    (the driver API is the same); candle-kernels compiles its PTX for CUDA_COMPUTE_CAP.
CUDARC_CUDA_VERSION=13040 CUDA_ROOT=$cuda CUDA_PATH=$cuda PATH=$cuda/bin:$PATH \
  CUDA_COMPUTE_CAP=$cap cargo build --release --locked --features cuda \
  --manifest-path "$root/Cargo.toml" --target-dir "$target"
echo "built $target/release/postforge with --features cuda (library pass exit $first_try)"
echo "run it where there is no GPU driver with: LD_LIBRARY_PATH=$lib:$target/stub-run $target/release/postforge ..."
echo "on a GPU machine: LD_LIBRARY_PATH=$lib $target/release/postforge ... (the real libcuda.so.1 is found first)"
