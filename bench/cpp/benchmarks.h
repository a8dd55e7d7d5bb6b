// The benchmark sections tr_bench runs.
#pragma once

#include "harness.h"

namespace bench {
void run_cpu_benchmarks(const Options& o);
void run_cuda_benchmarks(const Options& o);  // bench_cuda.cu, built when CUDA is on
}  // namespace bench
