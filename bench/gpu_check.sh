#!/usr/bin/env bash
# Everything that needs an NVIDIA GPU, in one go, built so that it cannot pass while testing nothing.
# No internet needed; Python 3 with a CUDA torch, nvcc, cmake, ninja and scikit-build-core must be there.
#   0. refuse at once (exit 2, a message saying why) without a GPU: no nvidia-smi, no GPU listed,
#      torch.cuda.is_available() false or a CPU torch, no nvcc;
#   1. build the extension with CUDA forced on (TOKEN_RECYCLING_CUDA=ON: the build fails, not falls back,
#      without CUDA) and check token_recycling.WITH_CUDA; bench/cpp with CUDA beside it;
#      then an error message with numbers in it must come out whole (a toolchain that links libstdc++
#      statically into the module broke exactly that), and the toolchain goes into environment.txt;
#   2. correctness, side by side (not timed):
#      - the CUDA op tests, the transformers backend tests and the one-sync / CUDA-graph step tests
#        (test_step_sync.py: no sync between step syncs, captured == uncaptured == greedy); any skip fails;
#      - bench/gpu_decode.py --parts lossless: the decode loop on the GPU == the GPU's own greedy
#        generate (fp32; dynamic / static cache, dense / tree attention, CUDA graphs, batch 3,
#        seeded sampling), and bf16 divergences with their top-2 logit gaps;
#   3. timings, one at a time: tr_bench (C++ benchmarks, CPU and GPU, Llama-7B shapes);
#      bench/attention_vs_sdpa.py (tree attention vs transformers' sdpa path and an unmasked
#      FlashAttention-class reference, bf16, L2 flushed, ms / % of HBM peak / TFLOP/s);
#      bench/gpu_decode.py --parts forward,overhead (1B- and 7B-shaped Llama, all layers, bf16:
#      forward of n = 1..128 tree tokens at prefix 512/2k/8k, time outside the forward with and
#      without CUDA graphs); bench/step_breakdown.py (2 layers, prefix 1k/4k/16k, syncs per step);
#   4. with the time left: tr_cuda_check (every CUDA kernel against its CPU kernel), then under
#      compute-sanitizer memcheck and racecheck (--quick shapes by default).
# Logs go to bench/out/gpu-<time>/; with $OUT set (the lent machine), the summary, the JSON files and a
# tarball of every log are copied there at the end. GPU_CHECK_BUDGET (seconds, default 540) bounds the
# whole run: each step's limit is cut to what is left, and a step with no time left counts as failed.
# For a rerun in a short lease: GPU_CHECK_SKIP=name,name skips steps (listed as skipped, not failed);
# KERNEL_CHECK_ARGS / RACECHECK_ARGS / MEMCHECK_ARGS replace tr_cuda_check's arguments (default
# --quick; "" for the full shapes; e.g. "--quick --only=tree_attention");
# GPU_CHECK_DEBUG_TEST=<pytest node id> also runs that test under cuda-gdb and logs a backtrace.
# Exit status: 2 when refused, else the number of failed steps.
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

logs=bench/out/gpu-$(date +%Y%m%d-%H%M%S)
mkdir -p "$logs"
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
arch=${TORCH_CUDA_ARCH_LIST//./}
BUDGET=${GPU_CHECK_BUDGET:-540}
jobs=$(nproc 2>/dev/null || echo 4)
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$jobs} PYTHONUNBUFFERED=1

# step NAME SECONDS COMMAND...: runs with a time limit (cut to the budget left), logs to $logs/NAME.log,
# appends "NAME rc=.. time" to summary.txt. Safe to run in the background (state lives in files).
step() {
  local name=$1 limit=$2
  shift 2
  if [[ ",${GPU_CHECK_SKIP:-}," == *",$name,"* ]]; then
    printf '%-18s skipped (GPU_CHECK_SKIP)\n' "$name" | tee -a "$logs/summary.txt"
    return 0
  fi
  local left=$((BUDGET - SECONDS))
  if [ "$left" -lt 15 ]; then
    printf '%-18s FAILED: no time left in the %ss budget\n' "$name" "$BUDGET" | tee -a "$logs/summary.txt"
    return 1
  fi
  [ "$limit" -le "$left" ] || limit=$left
  echo "== $name (limit ${limit}s): $*"
  local start=$SECONDS
  timeout "$limit" "$@" > "$logs/$name.log" 2>&1
  local rc=$?
  printf '%-18s rc=%-3s %4ss\n' "$name" "$rc" "$((SECONDS - start))" | tee -a "$logs/summary.txt"
  tail -n 4 "$logs/$name.log"
  return "$rc"
}
# record NAME OK MESSAGE: a check that is not a command.
record() {
  if [ "$2" = 1 ]; then printf '%-18s %s\n' "$1" "$3"; else printf '%-18s FAILED: %s\n' "$1" "$3"; fi \
    | tee -a "$logs/summary.txt"
}
finish() {
  echo
  echo "== summary ($logs)"
  cat "$logs/summary.txt"
  for name in cpp_bench attention_vs_sdpa gpu_decode_timing step_breakdown gpu_decode_lossless debug_test; do
    if [ -f "$logs/$name.log" ]; then
      echo "-- $name"
      if [ "$name" = cpp_bench ]; then grep -E '^(device|cuda) ' "$logs/$name.log"; else grep -v '^  ' "$logs/$name.log" | tail -n 60; fi
    fi
  done
  if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    cp "$logs/summary.txt" "$logs/environment.txt" "$OUT/" 2>/dev/null
    cp "$logs"/*.json "$OUT/" 2>/dev/null
    tar czf "$OUT/gpu_check_logs.tgz" -C "$logs" . 2>/dev/null
  fi
  # Failures: steps with rc != 0 and records marked FAILED.
  exit "$(grep -cE 'rc=[1-9]|FAILED' "$logs/summary.txt")"
}

{ echo "$gpus"; nvidia-smi; "$CUDACXX" --version; "$PYTHON" -c 'import torch; print("torch", torch.__version__, torch.version.cuda)'
  "$PYTHON" -c 'import transformers; print("transformers", transformers.__version__)'; nproc; } \
  > "$logs/environment.txt" 2>&1
head -n 15 "$logs/environment.txt"

# 1. Build. The C++ benchmarks build beside the extension.
( cmake -S bench/cpp -B build/bench-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DTR_BENCH_CUDA=ON \
    -DCMAKE_CUDA_COMPILER="$CUDACXX" -DCMAKE_CUDA_ARCHITECTURES="${arch%%;*}" && cmake --build build/bench-gpu ) \
  > "$logs/bench_build.log" 2>&1 &
bench_build=$!
step build 300 "$PYTHON" -m pip install --no-build-isolation --no-deps -v -e . \
  --config-settings=cmake.define.TOKEN_RECYCLING_CUDA=ON \
  --config-settings=cmake.define.CUDA_TOOLKIT_ROOT_DIR="$toolkit"
with_cuda=$("$PYTHON" -c 'import token_recycling as t; print(t.WITH_CUDA)' 2>&1 | tail -n 1)
if [ "$with_cuda" = "True" ]; then record with_cuda 1 "WITH_CUDA True"; else record with_cuda 0 "WITH_CUDA=$with_cuda"; fi
if wait "$bench_build"; then record bench_build 1 "rc=0"; else record bench_build 0 "bench_build.log"; fi
# The toolchain, and whether the module carries its own copy of C++ runtime code (a compiler that links
# libstdc++ statically: error messages with numbers then crashed, seen on an H200 machine's /opt/gcc).
so=$("$PYTHON" -c 'import token_recycling._C as c; print(c.__file__)' 2>/dev/null)
{ echo "== toolchain"; c++ --version | head -n 1; command -v c++ g++; ldd "$so" 2>&1 | grep -i 'stdc++'
  echo "C++ runtime functions defined in the module (want 0): $(nm -C --defined-only "$so" 2>/dev/null | grep -c ' std::basic_ostream')"
} >> "$logs/environment.txt" 2>&1
step error_message 60 "$PYTHON" -c '
import torch, token_recycling.ops as ops
try:
    ops.raise_device_errors(torch.zeros(5, dtype=torch.long))
except ValueError as e:
    assert "[6]" in str(e) and "got [5]" in str(e), f"a number is missing from the message: {e}"
    print("ok:", e)
else:
    raise SystemExit("no error raised")'

# 2. Correctness, side by side: the tests and the decode loop on the GPU. Tests: every skip is a failure
# here (a CUDA test that skips on a GPU machine tested nothing). pytest-xdist, where present, runs the
# files in worker processes: a crash fails one test, not the rest.
xdist=()
"$PYTHON" -c 'import xdist' 2> /dev/null && xdist=(-n 4 --dist loadfile)
(
  step tests 240 "$PYTHON" -m pytest -q -rs -p no:cacheprovider "${xdist[@]}" --junitxml="$logs/tests.xml" \
    tests/test_ops_cuda.py tests/test_hf_attention.py tests/test_tree_attention_generation.py \
    tests/test_two_part_attention.py tests/test_graph_step.py tests/test_emit.py tests/test_step_sync.py
  skips=$("$PYTHON" -c '
import sys, xml.etree.ElementTree as E
r = E.parse(sys.argv[1]).getroot()
print(sum(int(s.get("skipped", 0)) for s in r.iter("testsuite")), sum(int(s.get("tests", 0)) for s in r.iter("testsuite")))
' "$logs/tests.xml" 2>/dev/null || echo "? 0")
  read -r nskip ntests <<< "$skips"
  if [ "$nskip" = "0" ] && [ "${ntests:-0}" -gt 0 ]; then record test_skips 1 "0 of $ntests skipped"
  else record test_skips 0 "$nskip of ${ntests:-0} tests skipped (see tests.log)"; fi
) &
tests_job=$!
debug_job=
if [ -n "${GPU_CHECK_DEBUG_TEST:-}" ]; then
  ( step debug_test 150 cuda-gdb -q -batch -ex "set pagination off" -ex run -ex bt -ex "info sharedlibrary token" \
      --args "$PYTHON" -m pytest -q -x -p no:cacheprovider "$GPU_CHECK_DEBUG_TEST" ) &
  debug_job=$!
fi
step gpu_decode_lossless 200 "$PYTHON" bench/gpu_decode.py --parts lossless --json "$logs/gpu_decode_lossless.json"
wait "$tests_job" $debug_job

# 3. Timings, one at a time.
step gpu_decode_timing 200 "$PYTHON" bench/gpu_decode.py --parts forward,overhead --json "$logs/gpu_decode_timing.json"
step attention_vs_sdpa 120 "$PYTHON" bench/attention_vs_sdpa.py --json "$logs/attention_vs_sdpa.json"
[ -x build/bench-gpu/tr_bench ] && step cpp_bench 90 build/bench-gpu/tr_bench
step step_breakdown 120 "$PYTHON" bench/step_breakdown.py --json "$logs/step_breakdown.json"

# 4. Every CUDA kernel against its CPU kernel, then under the sanitizers, with the time that is left
# (single-threaded CPU references and the sanitizers are slow: about 90 s each for --quick on an H200
# machine, racecheck longer). stdbuf: each kernel's line reaches the log as it finishes.
if [ -x build/bench-gpu/tr_cuda_check ]; then
  # shellcheck disable=SC2086 # the *_ARGS are word lists
  step kernel_check 240 stdbuf -oL build/bench-gpu/tr_cuda_check ${KERNEL_CHECK_ARGS---quick}
  if [ -x "$SANITIZER" ]; then
    step memcheck 200 "$SANITIZER" --tool memcheck --error-exitcode 1 --leak-check full \
      stdbuf -oL build/bench-gpu/tr_cuda_check ${MEMCHECK_ARGS---quick}
    step racecheck 240 "$SANITIZER" --tool racecheck --error-exitcode 1 stdbuf -oL build/bench-gpu/tr_cuda_check \
      ${RACECHECK_ARGS---quick}
  else
    record sanitizer 0 "no compute-sanitizer (looked on PATH and in $toolkit/bin)"
  fi
else
  record kernel_check 0 "build/bench-gpu/tr_cuda_check was not built"
fi
finish
