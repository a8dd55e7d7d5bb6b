#!/usr/bin/env bash
# Everything that needs an NVIDIA GPU, in one go (no internet needed; Python, a CUDA torch, nvcc,
# cmake, ninja and scikit-build-core must be there):
#   1. build the extension with CUDA (pip install --no-build-isolation --no-deps -e ., sm_90 only
#      unless TORCH_CUDA_ARCH_LIST says otherwise), and bench/cpp with CUDA, side by side;
#   2. the CUDA op tests and the transformers backend tests (pytest);
#   3. tr_cuda_check: every CUDA kernel against its CPU kernel, on the GPU;
#   4. tr_bench: C++ benchmarks (CPU and GPU), Llama-7B shapes;
#   5. bench/attention_vs_sdpa.py: tree attention vs transformers' sdpa path, bf16.
# Logs go to $OUT if set, else bench/out/gpu-<time>/. Each step has a time limit; the whole run
# takes about 6-8 minutes on an H100. Exit status: the number of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
logs=${OUT:-bench/out/gpu-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$logs"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
arch=${TORCH_CUDA_ARCH_LIST//./}
failed=0

# step NAME SECONDS COMMAND...: runs with a time limit, logs to $logs/NAME.log, records rc and time.
step() {
  local name=$1 limit=$2
  shift 2
  echo "== $name: $*"
  local start=$SECONDS
  timeout "$limit" "$@" > "$logs/$name.log" 2>&1
  local rc=$?
  printf '%-18s rc=%-3s %4ss\n' "$name" "$rc" "$((SECONDS - start))" | tee -a "$logs/summary.txt"
  tail -n 4 "$logs/$name.log"
  [ "$rc" -eq 0 ] || failed=$((failed + 1))
  return "$rc"
}

{ nvidia-smi; nvcc --version; "$PYTHON" -c 'import torch; print("torch", torch.__version__, torch.version.cuda)'; } \
  > "$logs/environment.txt" 2>&1
head -n 15 "$logs/environment.txt"

# The C++ benchmarks build on the CPU while the extension builds.
( cmake -S bench/cpp -B build/bench-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DTR_BENCH_CUDA=ON \
    -DCMAKE_CUDA_ARCHITECTURES="${arch%%;*}" && cmake --build build/bench-gpu ) > "$logs/bench_build.log" 2>&1 &
bench_build=$!
step build 300 "$PYTHON" -m pip install --no-build-isolation --no-deps -v -e .
"$PYTHON" -c 'import token_recycling as t; print("WITH_CUDA", t.WITH_CUDA)' | tee -a "$logs/summary.txt"

step tests 240 "$PYTHON" -m pytest -q -rs tests/test_ops_cuda.py tests/test_hf_attention.py
wait "$bench_build" && echo "bench_build        rc=0" >> "$logs/summary.txt" || { echo "bench_build failed"; failed=$((failed + 1)); }
if [ -x build/bench-gpu/tr_cuda_check ]; then
  step kernel_check 120 build/bench-gpu/tr_cuda_check
  step cpp_bench 180 build/bench-gpu/tr_bench
fi
step attention_vs_sdpa 120 "$PYTHON" bench/attention_vs_sdpa.py --json "$logs/attention_vs_sdpa.json"

echo
echo "== summary ($logs)"
cat "$logs/summary.txt"
if [ -f "$logs/cpp_bench.log" ]; then
  echo "-- C++ benchmarks, GPU rows"
  grep -E '^(device|cuda) ' "$logs/cpp_bench.log"
fi
if [ -f "$logs/attention_vs_sdpa.log" ]; then
  echo "-- tree attention vs sdpa"
  cat "$logs/attention_vs_sdpa.log"
fi
exit "$failed"
