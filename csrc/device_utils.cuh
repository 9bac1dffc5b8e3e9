// Device helpers shared by the kernels: element conversions, 16-byte packs, block reductions and
// dtype dispatch. CUDA headers only, no torch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "kernels.h"

#ifndef ACN_SIMT_HOST
// A launch and the dynamic shared memory, spelled so that the host execution layer
// (csrc/host/simt.h, `cuda-host-check`) can run the same source; for nvcc they are the plain CUDA.
#define ACN_LAUNCH(grid, block, shared_bytes, stream, ...) __VA_ARGS__<<<grid, block, shared_bytes, stream>>>
#define ACN_DYNAMIC_SHARED(T, name) extern __shared__ T name[]
#endif

namespace acn {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// N elements moved as one aligned access: 16 bytes for N = 16 / sizeof(T).
template <typename T, int N>
struct alignas(sizeof(T) * N) Pack {
  T v[N];
};

template <typename T, int N>
__device__ __forceinline__ void load_floats(const T* p, float (&out)[N]) {
  Pack<T, N> pack = *reinterpret_cast<const Pack<T, N>*>(p);
#pragma unroll
  for (int j = 0; j < N; ++j) out[j] = to_float(pack.v[j]);
}

template <typename T, int N>
__device__ __forceinline__ void store_floats(T* p, const float (&in)[N]) {
  Pack<T, N> pack;
#pragma unroll
  for (int j = 0; j < N; ++j) pack.v[j] = from_float<T>(in[j]);
  *reinterpret_cast<Pack<T, N>*>(p) = pack;
}

struct Add {
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};
struct Max {
  __device__ __forceinline__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct Min {
  __device__ __forceinline__ float operator()(float a, float b) const { return fminf(a, b); }
};

// `combine` over the block, in a fixed order (deterministic); every thread gets the result. `identity`
// fills the lanes of a last, partial warp.
template <typename Combine>
__device__ __forceinline__ float block_reduce(float v, float identity, Combine combine) {
  __shared__ float warp_results[32];
  __shared__ float total;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = combine(v, __shfl_xor_sync(0xffffffffu, v, offset));
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = (blockDim.x + 31) / 32;
  if (lane == 0) warp_results[warp] = v;
  __syncthreads();
  if (warp == 0) {
    float s = lane < warps ? warp_results[lane] : identity;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) s = combine(s, __shfl_xor_sync(0xffffffffu, s, offset));
    if (lane == 0) total = s;
  }
  __syncthreads();
  float result = total;
  __syncthreads();  // the shared slots are reused by the next call
  return result;
}

__device__ __forceinline__ float block_sum(float v) { return block_reduce(v, 0.0f, Add()); }
__device__ __forceinline__ float block_max(float v) { return block_reduce(v, -INFINITY, Max()); }
__device__ __forceinline__ float block_min(float v) { return block_reduce(v, INFINITY, Min()); }

__host__ __forceinline__ bool aligned(const void* p, int bytes) {
  return p == nullptr || reinterpret_cast<std::uintptr_t>(p) % bytes == 0;
}

// Threads for one row of `groups` packs: a warp for short rows, up to 1024.
__host__ __forceinline__ int row_threads(int groups) {
  int threads = ((groups + 31) / 32) * 32;
  return threads < 32 ? 32 : (threads > 1024 ? 1024 : threads);
}

}  // namespace acn

// Calls F<T>() with T the C++ type of an activation dtype.
#define ACN_DISPATCH_FLOAT(dtype, T, ...)                   \
  switch (dtype) {                                          \
    case ::acn::DType::kFloat32: { using T = float; __VA_ARGS__; break; }          \
    case ::acn::DType::kFloat16: { using T = __half; __VA_ARGS__; break; }         \
    case ::acn::DType::kBFloat16: { using T = __nv_bfloat16; __VA_ARGS__; break; } \
  }
