#!/usr/bin/env bash
# Everything that needs an NVIDIA GPU, in one run of at most 9 minutes (build included), built so
# that it cannot pass while testing nothing. On the lent GPU machine, from the repository root:
#
#     bash bench/gpu_check.sh          (device tool: command "bash bench/gpu_check.sh", timeout_s 570)
#
# Results land in $OUT (else bench/out/gpu-<time>/) AS SOON AS EACH STEP ENDS: one log per step, the
# JSON files, summary.txt (a line per step) and environment.txt; a run cut short keeps every result
# it reached. Most valuable first:
#   0. refuse at once (exit 2, a message saying why, nothing written) without a GPU: no nvidia-smi, no
#      GPU listed, torch.cuda.is_available() false or a CPU torch, no nvcc;
#   1. build the extension with CUDA forced on (TOKEN_RECYCLING_CUDA=ON: the build fails, not falls
#      back, without CUDA) and check token_recycling.WITH_CUDA; bench/cpp with CUDA beside it (waited
#      for before the timings); an error message with numbers in it must come out whole; the toolchain
#      goes into environment.txt;
#   2. attention: bench/attention_vs_sdpa.py, the attention table: ours (single kernel), two-part and
#      transformers' sdpa against the unmasked FA-class floor (torch flash SDPA, no mask), prefixes
#      1k-32k, GQA 32/8 and MHA 32/32, trees of 16/64/81/128 nodes, L2 flushed, ms / % of HBM peak /
#      TFLOP/s (attention.json), and the path table it implies (attention_paths.json: copy it to
#      python/token_recycling/attention_paths.json to route by it);
#   3. decode_timing: bench/gpu_decode.py --parts forward,overhead on a Llama-3-8B-shaped random-weight
#      model (GQA, bf16, all 32 layers) at prefixes 1k/4k/16k: forward cost t(n), n = 1..128 tree
#      tokens (dynamic cache + host prefix, static cache + host prefix, static cache + device prefix,
#      dense sdpa, greedy), and the time outside the forward per step with and without CUDA graphs
#      (gpu_decode_timing.json, rewritten after each prefix);
#   4. tests: the CUDA tests that have not run on a GPU yet (test_step_sync.py's no-sync-between-syncs
#      and graph-replay tests; test_two_part_attention.py's CUDA tests: two-part vs fp64, the rule's
#      routing, a device prefix in a large static capacity); any skip fails;
#   5. projection: bench/project_speedup.py from 3 and the CPU's acceptance figures
#      (bench/results/acceptance-by-tree/acceptance.json): projected speedup per tree size
#      (projection.log, projection.json);
#   6. with the time left: compute-sanitizer racecheck of tree_attention on small shapes
#      (tr_cuda_check --quick --small --only=tree_attention); then, still with time left, tr_bench's
#      CUDA rows (L2 flushed), every CUDA kernel against its CPU kernel (tr_cuda_check --quick) and the
#      decode loop lossless on the GPU (gpu_decode.py --parts lossless).
# Each step runs under `timeout` (its limit cut to the budget left) and writes its own log; a failed
# step does not stop the rest. GPU_CHECK_BUDGET (seconds, default 540) bounds the whole run: a step
# with no time left counts as failed, an optional one (6) is listed as not run.
# Needs: Python 3 with a CUDA torch and transformers, nvcc, cmake, ninja, scikit-build-core; no internet.
# For a rerun in a short lease: GPU_CHECK_SKIP=name,name skips steps (listed as skipped, not failed);
# RACECHECK_ARGS / KERNEL_CHECK_ARGS replace tr_cuda_check's arguments; DECODE_ARGS replaces
# gpu_decode.py's timing arguments (default: --shapes llama-8b --prefixes 1024,4096,16384).
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

# Every file is written straight into the output folder, so whatever exists when the run is cut short
# comes back.
if [ -n "${OUT:-}" ]; then logs=$OUT; else logs=bench/out/gpu-$(date +%Y%m%d-%H%M%S); fi
mkdir -p "$logs"
logs=$(cd "$logs" && pwd)
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
arch=${TORCH_CUDA_ARCH_LIST//./}
BUDGET=${GPU_CHECK_BUDGET:-540}
jobs=$(nproc 2>/dev/null || echo 4)
export CMAKE_BUILD_PARALLEL_LEVEL=${CMAKE_BUILD_PARALLEL_LEVEL:-$jobs} PYTHONUNBUFFERED=1
: > "$logs/summary.txt"

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
  echo "== $name (limit ${limit}s, ${SECONDS}s in): $*"
  local start=$SECONDS
  timeout -k 10 "$limit" "$@" > "$logs/$name.log" 2>&1
  local rc=$?
  local note=""
  [ "$rc" = 124 ] || [ "$rc" = 137 ] && note=" (timed out)"
  printf '%-18s rc=%-3s %4ss%s\n' "$name" "$rc" "$((SECONDS - start))" "$note" | tee -a "$logs/summary.txt"
  tail -n 4 "$logs/$name.log"
  return "$rc"
}
# optional NAME MIN_SECONDS LIMIT COMMAND...: a step that runs only with MIN_SECONDS of the budget left
# (else listed as not run, which is no failure).
optional() {
  local name=$1 need=$2
  shift 2
  if [ $((BUDGET - SECONDS)) -lt "$need" ]; then
    printf '%-18s not run: under %ss of the budget left\n' "$name" "$need" | tee -a "$logs/summary.txt"
    return 0
  fi
  step "$name" "$@"
}
# record NAME OK MESSAGE: a check that is not a command.
record() {
  if [ "$2" = 1 ]; then printf '%-18s %s\n' "$1" "$3"; else printf '%-18s FAILED: %s\n' "$1" "$3"; fi \
    | tee -a "$logs/summary.txt"
}
finish() {
  echo
  echo "== summary ($logs, ${SECONDS}s)"
  cat "$logs/summary.txt"
  for name in attention decode_timing projection cpp_bench; do
    if [ -f "$logs/$name.log" ]; then
      echo "-- $name"
      if [ "$name" = cpp_bench ]; then grep -E '^(device|cuda|\(cuda) ' "$logs/$name.log"; else grep -v '^  ' "$logs/$name.log" | tail -n 60; fi
    fi
  done
  # Failures: steps with rc != 0 and records marked FAILED.
  exit "$(grep -cE 'rc=[1-9]|FAILED' "$logs/summary.txt")"
}

{ echo "$gpus"; nvidia-smi; "$CUDACXX" --version; "$PYTHON" -c 'import torch; print("torch", torch.__version__, torch.version.cuda)'
  "$PYTHON" -c 'import transformers; print("transformers", transformers.__version__)'; nproc; } \
  > "$logs/environment.txt" 2>&1
head -n 15 "$logs/environment.txt"

# 1. Build. The C++ benchmarks and checks build beside the extension (bounded too), and are waited for
# before the timings, so that no compiler competes with them for the CPU.
( timeout -k 10 300 cmake -S bench/cpp -B build/bench-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DTR_BENCH_CUDA=ON \
    -DCMAKE_CUDA_COMPILER="$CUDACXX" -DCMAKE_CUDA_ARCHITECTURES="${arch%%;*}" &&
  timeout -k 10 300 cmake --build build/bench-gpu ) > "$logs/bench_build.log" 2>&1 &
bench_build=$!
step build 300 "$PYTHON" -m pip install --no-build-isolation --no-deps -v -e . \
  --config-settings=cmake.define.TOKEN_RECYCLING_CUDA=ON \
  --config-settings=cmake.define.CUDA_TOOLKIT_ROOT_DIR="$toolkit"
with_cuda=$("$PYTHON" -c 'import token_recycling as t; print(t.WITH_CUDA)' 2>&1 | tail -n 1)
if [ "$with_cuda" = "True" ]; then record with_cuda 1 "WITH_CUDA True"; else record with_cuda 0 "WITH_CUDA=$with_cuda"; fi
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
if wait "$bench_build"; then record bench_build 1 "rc=0"; else record bench_build 0 "bench_build.log"; fi

# 2-3. Timings, one at a time.
step attention 120 "$PYTHON" bench/attention_vs_sdpa.py --json "$logs/attention.json" \
  --rule-json "$logs/attention_paths.json"
# shellcheck disable=SC2086 # DECODE_ARGS is a word list
step decode_timing 220 "$PYTHON" bench/gpu_decode.py --parts forward,overhead \
  ${DECODE_ARGS---shapes llama-8b --prefixes 1024,4096,16384} --json "$logs/gpu_decode_timing.json"

# 4. The CUDA tests that have not run on a GPU yet. Every skip is a failure here (a CUDA test that
# skips on a GPU machine tested nothing).
step tests 150 "$PYTHON" -m pytest -q -rs -p no:cacheprovider --junitxml="$logs/tests.xml" -k "cuda or CUDA" \
  tests/test_step_sync.py tests/test_two_part_attention.py
skips=$("$PYTHON" -c '
import sys, xml.etree.ElementTree as E
r = E.parse(sys.argv[1]).getroot()
print(sum(int(s.get("skipped", 0)) for s in r.iter("testsuite")), sum(int(s.get("tests", 0)) for s in r.iter("testsuite")))
' "$logs/tests.xml" 2>/dev/null || echo "? 0")
read -r nskip ntests <<< "$skips"
if [ "${nskip:-?}" = "0" ] && [ "${ntests:-0}" -gt 0 ] 2>/dev/null; then record test_skips 1 "0 of $ntests skipped"
else record test_skips 0 "${nskip:-?} of ${ntests:-0} tests skipped (see tests.log)"; fi

# 5. The projection from 3 and the CPU's acceptance figures.
step projection 60 "$PYTHON" bench/project_speedup.py --timing "$logs/gpu_decode_timing.json" \
  --acceptance bench/results/acceptance-by-tree/acceptance.json --json "$logs/projection.json"

# 6. With the time left: racecheck of tree_attention on small shapes, then the rest.
if [ -x build/bench-gpu/tr_cuda_check ] && [ -x "$SANITIZER" ]; then
  # shellcheck disable=SC2086 # the *_ARGS are word lists
  optional racecheck 40 240 "$SANITIZER" --tool racecheck --error-exitcode 1 stdbuf -oL build/bench-gpu/tr_cuda_check \
    ${RACECHECK_ARGS---quick --small --only=tree_attention}
else
  record racecheck 0 "no build/bench-gpu/tr_cuda_check or no compute-sanitizer (looked on PATH and in $toolkit/bin)"
fi
[ -x build/bench-gpu/tr_bench ] && optional cpp_bench 40 90 build/bench-gpu/tr_bench --only=tree_attention
# shellcheck disable=SC2086
[ -x build/bench-gpu/tr_cuda_check ] && optional kernel_check 60 200 stdbuf -oL build/bench-gpu/tr_cuda_check \
  ${KERNEL_CHECK_ARGS---quick}
optional gpu_decode_lossless 90 200 "$PYTHON" bench/gpu_decode.py --parts lossless --json "$logs/gpu_decode_lossless.json"
finish
