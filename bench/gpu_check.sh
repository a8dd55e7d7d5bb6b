#!/usr/bin/env bash
# Everything that needs an NVIDIA GPU, in one go, built so that it cannot pass while testing nothing.
# No internet needed; Python 3 with a CUDA torch, nvcc, cmake, ninja and scikit-build-core must be there.
#   0. refuse at once (exit 2, a message saying why) without a GPU: no nvidia-smi, no GPU listed,
#      torch.cuda.is_available() false or a CPU torch, no nvcc;
#   1. build the extension with CUDA forced on (TOKEN_RECYCLING_CUDA=ON: the build fails, not falls back,
#      without CUDA) and check token_recycling.WITH_CUDA; bench/cpp with CUDA beside it;
#   2. the CUDA op tests, the transformers backend tests and the one-sync / CUDA-graph step tests
#      (test_step_sync.py: no sync between step syncs, captured == uncaptured == greedy); any skip fails;
#   3. tr_cuda_check (every CUDA kernel against its CPU kernel), plain, then under compute-sanitizer
#      memcheck and racecheck (--quick shapes);
#   4. tr_bench: C++ benchmarks (CPU and GPU), Llama-7B shapes;
#   5. bench/attention_vs_sdpa.py: tree attention vs transformers' sdpa path and an unmasked
#      FlashAttention-class reference, bf16, L2 flushed before every timed call; ms, % of HBM peak,
#      TFLOP/s per row;
#   6. bench/step_breakdown.py: one decode step of a random-weight Llama-7B-shaped model (2 layers)
#      at prefix 1k/4k/16k: forward vs everything else, host syncs per step.
# Everything goes under $OUT (else bench/out/gpu-<time>/). Each step has a time limit; the whole run
# is meant to fit 10 minutes on one H100. Exit status: 2 when refused, else the number of failed steps.
set -uo pipefail
cd "$(dirname "$0")/.."

refuse() {
  echo "gpu_check: REFUSED: $*" >&2
  echo "gpu_check: this script needs an NVIDIA GPU, its driver, nvcc and a CUDA build of torch; nothing was run" >&2
  exit 2
}

PYTHON=${PYTHON:-}
if [ -z "$PYTHON" ]; then
  PYTHON=$(command -v python3 || command -v python) || refuse "no python3 or python on PATH"
fi
command -v nvidia-smi > /dev/null 2>&1 || refuse "no nvidia-smi on PATH (no NVIDIA driver: no GPU here)"
gpus=$(timeout 20 nvidia-smi -L 2>/dev/null) || refuse "nvidia-smi -L failed (driver not loaded or no GPU)"
echo "$gpus" | grep -q '^GPU ' || refuse "nvidia-smi lists no GPU"
cuda_ok=$(timeout 120 "$PYTHON" -c '
import torch
print("yes" if torch.version.cuda and torch.cuda.is_available() else
      f"no: torch {torch.__version__}, torch.version.cuda={torch.version.cuda}, is_available={torch.cuda.is_available()}")
' 2>&1 | tail -n 1)
[ "$cuda_ok" = "yes" ] || refuse "torch cannot use a CUDA GPU ($cuda_ok)"
NVCC=${NVCC:-nvcc}
command -v "$NVCC" > /dev/null 2>&1 || refuse "no nvcc on PATH (set NVCC=)"
# The nvcc on PATH may be a wrapper script; CMake wants the real compiler to find the toolkit.
toolkit=$("$NVCC" --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)
toolkit=$(cd "${toolkit:-$(dirname "$(command -v "$NVCC")")/..}" && pwd)
export CUDACXX=$toolkit/bin/nvcc
SANITIZER=$(command -v compute-sanitizer || echo "$toolkit/bin/compute-sanitizer")

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
# record NAME OK MESSAGE: a check that is not a command.
record() {
  printf '%-18s %s\n' "$1" "$3" | tee -a "$logs/summary.txt"
  [ "$2" = 1 ] || failed=$((failed + 1))
}

{ echo "$gpus"; nvidia-smi; "$CUDACXX" --version; "$PYTHON" -c 'import torch; print("torch", torch.__version__, torch.version.cuda)'; } \
  > "$logs/environment.txt" 2>&1
head -n 15 "$logs/environment.txt"

# The C++ benchmarks build on the CPU while the extension builds.
( cmake -S bench/cpp -B build/bench-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DTR_BENCH_CUDA=ON \
    -DCMAKE_CUDA_COMPILER="$CUDACXX" -DCMAKE_CUDA_ARCHITECTURES="${arch%%;*}" && cmake --build build/bench-gpu ) \
  > "$logs/bench_build.log" 2>&1 &
bench_build=$!
step build 300 "$PYTHON" -m pip install --no-build-isolation --no-deps -v -e . \
  --config-settings=cmake.define.TOKEN_RECYCLING_CUDA=ON \
  --config-settings=cmake.define.CUDA_TOOLKIT_ROOT_DIR="$toolkit"
with_cuda=$("$PYTHON" -c 'import token_recycling as t; print(t.WITH_CUDA)' 2>&1 | tail -n 1)
if [ "$with_cuda" = "True" ]; then record with_cuda 1 "WITH_CUDA True"; else record with_cuda 0 "FAILED: WITH_CUDA=$with_cuda"; fi

# Tests: every skip is a failure here (a CUDA test that skips on a GPU machine tested nothing).
step tests 240 "$PYTHON" -m pytest -q -rs -p no:cacheprovider --junitxml="$logs/tests.xml" \
  tests/test_ops_cuda.py tests/test_hf_attention.py tests/test_tree_attention_generation.py \
  tests/test_two_part_attention.py tests/test_graph_step.py tests/test_emit.py tests/test_step_sync.py
skips=$("$PYTHON" -c '
import sys, xml.etree.ElementTree as E
r = E.parse(sys.argv[1]).getroot()
print(sum(int(s.get("skipped", 0)) for s in r.iter("testsuite")), sum(int(s.get("tests", 0)) for s in r.iter("testsuite")))
' "$logs/tests.xml" 2>/dev/null || echo "? 0")
read -r nskip ntests <<< "$skips"
if [ "$nskip" = "0" ] && [ "${ntests:-0}" -gt 0 ]; then record test_skips 1 "0 of $ntests skipped"
else record test_skips 0 "FAILED: $nskip of ${ntests:-0} tests skipped (see tests.log)"; fi

if wait "$bench_build"; then record bench_build 1 "rc=0"; else record bench_build 0 "FAILED (bench_build.log)"; fi
if [ -x build/bench-gpu/tr_cuda_check ]; then
  step kernel_check 120 build/bench-gpu/tr_cuda_check
  if [ -x "$SANITIZER" ]; then
    step memcheck 240 "$SANITIZER" --tool memcheck --error-exitcode 1 --leak-check full \
      build/bench-gpu/tr_cuda_check --quick
    step racecheck 240 "$SANITIZER" --tool racecheck --error-exitcode 1 build/bench-gpu/tr_cuda_check --quick
  else
    record sanitizer 0 "FAILED: no compute-sanitizer (looked on PATH and in $toolkit/bin)"
  fi
  step cpp_bench 150 build/bench-gpu/tr_bench
else
  record kernel_check 0 "FAILED: build/bench-gpu/tr_cuda_check was not built"
fi
step attention_vs_sdpa 150 "$PYTHON" bench/attention_vs_sdpa.py --json "$logs/attention_vs_sdpa.json"
step step_breakdown 200 "$PYTHON" bench/step_breakdown.py --json "$logs/step_breakdown.json"

echo
echo "== summary ($logs)"
cat "$logs/summary.txt"
if [ -f "$logs/cpp_bench.log" ]; then
  echo "-- C++ benchmarks, GPU rows"
  grep -E '^(device|cuda) ' "$logs/cpp_bench.log"
fi
for name in attention_vs_sdpa step_breakdown; do
  if [ -f "$logs/$name.log" ]; then
    echo "-- $name"
    cat "$logs/$name.log"
  fi
done
exit "$failed"
