#!/usr/bin/env bash
# CI run of the C++ benchmarks on the CPU: builds bench/cpp without CUDA, then
#   tr_bench --quick                 every CPU kernel against a naive loop, then timed (seconds);
#   tr_cuda_check_emulated --quick   every CUDA kernel against its CPU kernel under the host
#                                    emulation (about a minute on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT_DIR:-build/ci-bench}
cmake -S bench/cpp -B "$out" -G Ninja -DCMAKE_BUILD_TYPE=Release -DTR_BENCH_CUDA=OFF > /dev/null
cmake --build "$out"
"$out/tr_bench" --quick
"$out/tr_cuda_check_emulated" --quick
