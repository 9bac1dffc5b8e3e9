// The SIMT execution layer that runs the CUDA kernels of csrc/ on the CPU, unmodified
// (`python -m acn_kernels cuda-host-check`). Compiled with the host C++ compiler and
// -DACN_SIMT_HOST; csrc/host comes first on the include path, so <cuda_runtime.h> is this layer's.
//
// Model: one fiber per CUDA thread of a block, the blocks of a grid one after another in a scrambled
// order. A fiber runs until it reaches __syncthreads or a warp shuffle, so no two threads run in
// lockstep unless the kernel synchronizes them: code that leans on implicit warp synchrony fails.
// __syncthreads is a barrier of the block; a shuffle waits for every lane its mask names and checks
// that they all pass the same mask. __shared__ variables are static storage (blocks never overlap);
// dynamic shared memory is NaN-filled before every block. What CUDA leaves undefined (a barrier not
// reached by every thread, a mask that leaves out the caller or names lanes that do not exist, a
// deadlock, a launch beyond the hardware limits) is reported as an error, never run through.
#pragma once

#include <cuda_bf16.h>  // the real CUDA headers: __half, __nv_bfloat16 and their host conversions,
#include <cuda_fp16.h>  // dim3 and uint3, and host_defines.h (which empties __global__, __device__)
#include <driver_types.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>

namespace acn::simt {

const uint3& thread_index();
const uint3& block_index();
const dim3& block_dim();
const dim3& grid_dim();
void sync_threads();
// The 32-bit value of lane `source` among the lanes named by `mask` (the calling warp's exchange).
std::uint32_t exchange(unsigned mask, std::uint32_t bits, unsigned source, const char* what);
void* dynamic_shared();
void record_error(const char* format, ...);
cudaError_t set_max_dynamic_shared(const void* kernel, int bytes);
// Runs `body` once for every thread of every block; checks the launch against the hardware limits.
void run_grid(const char* name, const void* kernel, long long grid, unsigned block, std::size_t shared_bytes,
              const std::function<void()>& body);

// The lane that __shfl_*_sync reads: out of the caller's width-wide segment, the caller itself.
inline unsigned lane_of_thread() {
  const dim3& b = block_dim();
  const uint3& t = thread_index();
  return (t.x + b.x * (t.y + b.y * t.z)) % 32;
}

template <typename T>
T shuffle(unsigned mask, T value, unsigned source, const char* what) {
  static_assert(sizeof(T) == 4 && std::is_trivially_copyable<T>::value, "32-bit shuffles only");
  std::uint32_t bits;
  std::memcpy(&bits, &value, 4);
  bits = exchange(mask, bits, source, what);
  std::memcpy(&value, &bits, 4);
  return value;
}

template <typename Kernel>
struct Launch {
  const char* name;
  Kernel* kernel;
  long long grid;
  unsigned block;
  std::size_t shared;

  template <typename... Args>
  void operator()(const Args&... args) const {
    Kernel* k = kernel;
    run_grid(name, reinterpret_cast<const void*>(k), grid, block, shared, [&] { k(args...); });
  }
};

template <typename Kernel>
Launch<Kernel> launch(const char* name, long long grid, unsigned block, std::size_t shared, cudaStream_t,
                      Kernel* kernel) {
  return {name, kernel, grid, block, shared};
}

}  // namespace acn::simt

#define threadIdx (::acn::simt::thread_index())
#define blockIdx (::acn::simt::block_index())
#define blockDim (::acn::simt::block_dim())
#define gridDim (::acn::simt::grid_dim())

#undef __shared__
#define __shared__ static
#undef __launch_bounds__
#define __launch_bounds__(...)  // a register budget for ptxas; the host has none

inline void __syncthreads() { ::acn::simt::sync_threads(); }

template <typename T>
T __shfl_sync(unsigned mask, T value, int source, int width = 32) {
  const unsigned lane = ::acn::simt::lane_of_thread(), base = lane - lane % width;
  return ::acn::simt::shuffle(mask, value, base + static_cast<unsigned>(source) % width, "__shfl_sync");
}

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  const unsigned lane = ::acn::simt::lane_of_thread(), source = lane ^ static_cast<unsigned>(lane_mask);
  return ::acn::simt::shuffle(mask, value, source / width > lane / width ? lane : source, "__shfl_xor_sync");
}

template <typename T>
T __shfl_down_sync(unsigned mask, T value, unsigned delta, int width = 32) {
  const unsigned lane = ::acn::simt::lane_of_thread(), source = lane + delta;
  return ::acn::simt::shuffle(mask, value, source / width > lane / width ? lane : source, "__shfl_down_sync");
}

template <typename Kernel>
cudaError_t cudaFuncSetAttribute(Kernel* kernel, cudaFuncAttribute attribute, int value) {
  if (attribute != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaSuccess;
  return ::acn::simt::set_max_dynamic_shared(reinterpret_cast<const void*>(kernel), value);
}

// kernel<<<grid, block, shared, stream>>>(args) on the GPU; see device_utils.cuh.
#define ACN_LAUNCH(grid, block, shared_bytes, stream, ...) \
  ::acn::simt::launch(#__VA_ARGS__, grid, block, shared_bytes, stream, &__VA_ARGS__)
#define ACN_DYNAMIC_SHARED(T, name) T* name = static_cast<T*>(::acn::simt::dynamic_shared())
