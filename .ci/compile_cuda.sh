#!/usr/bin/env bash
# CI compile checks of the CUDA code, for machines without a GPU or a CUDA build of torch:
#   1. every csrc/cuda/*.cu compiles (nvcc -c, not linked) against the torch headers of $PYTHON
#      (a CPU torch ships the c10/cuda headers the adapters use), and registration_cuda.cpp with
#      the host compiler;
#   2. bench/cpp configures with CUDA on and builds (compile + link: tr_bench, tr_cuda_check).
# Exits 0 with "skipped" when there is no nvcc. ARCH (default 90) picks the one architecture
# compiled here: one instead of the package's two (80, 90) roughly halves the device-code time;
# the host-side torch headers dominate anyway. About 6 minutes on 2 cores.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
ARCH=${ARCH:-90}
NVCC=${NVCC:-nvcc}
out=${OUT_DIR:-build/ci-cuda}

if ! command -v "$NVCC" >/dev/null 2>&1; then
  echo "compile_cuda: no nvcc on PATH, skipped"
  exit 0
fi
# The nvcc on PATH may be a wrapper script; nvcc reports its own toolkit folder, and CMake wants
# the real compiler to find the toolkit.
toolkit=$("$NVCC" --dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -n 1)
real_nvcc=$(cd "$toolkit/bin" && pwd)/nvcc
echo "compile_cuda: $("$real_nvcc" --version | tail -n 1), sm_$ARCH"
mkdir -p "$out"

mapfile -t includes < <("$PYTHON" -c 'import torch.utils.cpp_extension as e; print("\n".join(e.include_paths()))')
abi=$("$PYTHON" -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')
defines=(-DUSE_CUDA -DTOKEN_RECYCLING_WITH_CUDA=1 "-D_GLIBCXX_USE_CXX11_ABI=$abi")
# A CPU torch lacks the generated c10/cuda/impl/cuda_cmake_macros.h; nothing used here needs it.
if [ ! -f "${includes[0]}/c10/cuda/impl/cuda_cmake_macros.h" ]; then
  defines+=(-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE)
fi

for src in csrc/cuda/*.cu; do
  echo "compile_cuda: nvcc -c $src"
  "$real_nvcc" -std=c++20 -O2 -gencode "arch=compute_$ARCH,code=sm_$ARCH" --expt-relaxed-constexpr \
    -Xcudafe --diag_suppress=186 "${defines[@]}" "${includes[@]/#/-I}" -c "$src" -o "$out/$(basename "$src").o"
done
for src in csrc/cuda/*.cpp; do
  echo "compile_cuda: c++ -fsyntax-only $src"
  "${CXX:-c++}" -std=c++20 -fsyntax-only "${defines[@]}" "${includes[@]/#/-I}" "$src"
done

echo "compile_cuda: bench/cpp with CUDA"
cmake -S bench/cpp -B "$out/bench" -G Ninja -DCMAKE_BUILD_TYPE=Release -DTR_BENCH_CUDA=ON \
  -DCMAKE_CUDA_COMPILER="$real_nvcc" -DCMAKE_CUDA_ARCHITECTURES="$ARCH" > "$out/bench-configure.log"
cmake --build "$out/bench"
echo "compile_cuda: ok"
