// tr_bench: time per call and bandwidth (FLOP/s for attention) of every kernel, on the CPU always
// and on the GPU when built with CUDA. --quick: tiny shapes and few repetitions, for CI.
#include <cstdio>

#include "benchmarks.h"
#include "harness.h"

int main(int argc, char** argv) {
  const bench::Options opt = bench::parse_options(argc, argv);
  bench::seed(opt.seed);
  bench::print_header();
  bench::run_cpu_benchmarks(opt);
#if defined(TR_BENCH_WITH_CUDA)
  bench::run_cuda_benchmarks(opt);
#else
  std::printf("(CUDA benchmarks not built in this configuration)\n");
#endif
  return bench::exit_status();
}
