// Kernels that exercise the SIMT execution layer itself (tests/test_cuda_host_check.py): shuffle
// semantics, and what CUDA leaves undefined, which the layer must report rather than run through.
#include "device_utils.cuh"

namespace {

// out is (3, blockDim.x): a xor, a down and an indexed shuffle of each thread's index.
__global__ void shuffles(float* out) {
  const float v = static_cast<float>(threadIdx.x);
  out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, v, 5);
  out[blockDim.x + threadIdx.x] = __shfl_down_sync(0xffffffffu, v, 3);
  out[2 * blockDim.x + threadIdx.x] = __shfl_sync(0xffffffffu, v, 7, 16);
}

__global__ void barrier_in_a_branch(float* out) {
  if (threadIdx.x < 16) __syncthreads();
  out[threadIdx.x] = 1.0f;
}

__global__ void mask_without_the_caller(float* out) { out[threadIdx.x] = __shfl_xor_sync(0x1u, 1.0f, 1); }

__global__ void store_past_the_end(float* out) { out[threadIdx.x + 16] = 1.0f; }

__global__ void uses_dynamic_shared(float* out) {
  ACN_DYNAMIC_SHARED(float, shared);
  shared[threadIdx.x] = 1.0f;
  out[threadIdx.x] = shared[threadIdx.x];
}

// A launch with `bytes` of dynamic shared memory, opted in to first when `opt_in`.
void launch_with_shared(float* out, int threads, int bytes, bool opt_in) {
  if (opt_in) cudaFuncSetAttribute(uses_dynamic_shared, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  ACN_LAUNCH(1, threads, bytes, nullptr, uses_dynamic_shared)(out);
}

}  // namespace

extern "C" void acn_test_launch(int kernel, float* out, int threads) {
  switch (kernel) {
    case 0: ACN_LAUNCH(1, threads, 0, nullptr, shuffles)(out); break;
    case 1: ACN_LAUNCH(1, threads, 0, nullptr, barrier_in_a_branch)(out); break;
    case 2: ACN_LAUNCH(1, threads, 0, nullptr, mask_without_the_caller)(out); break;
    case 3: ACN_LAUNCH(1, threads, 0, nullptr, store_past_the_end)(out); break;
    case 5: launch_with_shared(out, threads, 64 * 1024, false); break;   // past 48 KB without opting in
    case 6: launch_with_shared(out, threads, 200 * 1024, true); break;   // within sm_90's opt-in, past sm_80's
    default: ACN_LAUNCH(1, 2048, 0, nullptr, shuffles)(out); break;  // more threads than a block may have
  }
}
