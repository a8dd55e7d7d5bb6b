// The CUDA kernel checks of cuda_check.cu, built by the host compiler: kernels run under
// kernels/cuda/host_emulation.h, so their logic is checked on machines without a GPU.
#include "cuda_check.cu"
