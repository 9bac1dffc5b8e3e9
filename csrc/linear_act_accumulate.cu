// linear_act_accumulate, the parts around the GEMM (the GEMM is cuBLAS or cuBLASLt through ATen, in
// the binding): the epilogue h = act(z), y_out = y + h (only y_out when h is null: the GEMM's own
// epilogue applied act already), and the backward's dz = (dh + dy_out) * act'(z), each one
// elementwise pass with 16-byte accesses where the buffers allow. swiglu reads (writes, backward)
// each output's gate and up values glu_width apart in z's rows (dz's). Math in row_math.h.
#include "device_utils.cuh"
#include "row_math.h"

namespace acn {
namespace {

// Where output element i's gate value is in z (its up value is glu_width further): i itself, or its
// place in the (rows, 2 * glu_width) z of a gated activation.
__device__ __forceinline__ int64_t gate_index(int64_t i, int64_t glu_width) {
  return glu_width ? (i / glu_width) * 2 * glu_width + i % glu_width : i;
}

template <typename T, typename TY, int VEC>
__global__ void activation_epilogue_kernel(const T* __restrict__ z, const TY* __restrict__ y, T* __restrict__ h,
                                           TY* __restrict__ y_out, int64_t n, int act, int64_t glu_width) {
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x * VEC) {
    float v[VEC];
    const int64_t at = gate_index(i, glu_width);
    load_floats<T, VEC>(z + at, v);
    if (glu_width) {
      float up[VEC];
      load_floats<T, VEC>(z + at + glu_width, up);
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[j] = to_float(from_float<T>(swiglu(v[j], up[j])));  // h as stored
    } else {
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[j] = to_float(from_float<T>(activation(v[j], act)));
    }
    if (h != nullptr) store_floats<T, VEC>(h + i, v);
    if (y != nullptr) {
      float s[VEC];
      load_floats<TY, VEC>(y + i, s);
#pragma unroll
      for (int j = 0; j < VEC; ++j) s[j] += v[j];
      store_floats<TY, VEC>(y_out + i, s);
    }
  }
}

template <typename T, typename TY, int VEC>
__global__ void activation_backward_kernel(const T* __restrict__ dh, const TY* __restrict__ dy_out,
                                           const T* __restrict__ saved, T* __restrict__ dz, int64_t n, int act,
                                           int64_t glu_width) {
  for (int64_t i = (static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x) * VEC; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x * VEC) {
    float g[VEC] = {}, part[VEC];
    if (dh != nullptr) {
      load_floats<T, VEC>(dh + i, part);
#pragma unroll
      for (int j = 0; j < VEC; ++j) g[j] += part[j];
    }
    if (dy_out != nullptr) {
      load_floats<TY, VEC>(dy_out + i, part);
#pragma unroll
      for (int j = 0; j < VEC; ++j) g[j] += part[j];
    }
    if (glu_width) {
      const int64_t at = gate_index(i, glu_width);
      float up[VEC], dup[VEC];
      load_floats<T, VEC>(saved + at, part);
      load_floats<T, VEC>(saved + at + glu_width, up);
#pragma unroll
      for (int j = 0; j < VEC; ++j) swiglu_grads(g[j], part[j], up[j], g[j], dup[j]);
      store_floats<T, VEC>(dz + at, g);
      store_floats<T, VEC>(dz + at + glu_width, dup);
    } else {
      if (saved != nullptr) {
        load_floats<T, VEC>(saved + i, part);
#pragma unroll
        for (int j = 0; j < VEC; ++j) g[j] *= activation_grad(part[j], act);
      }
      store_floats<T, VEC>(dz + i, g);
    }
  }
}

constexpr int kThreads = 256;

int elementwise_blocks(int64_t n, int vec) {
  const int64_t blocks = (n / vec + kThreads - 1) / kThreads;
  return static_cast<int>(blocks < 1 ? 1 : (blocks > 65535 ? 65535 : blocks));
}

// 16 bytes of T per access when n, a gated activation's row width and every pointer allow (a float32 y
// under 16-bit T: 32 bytes).
template <typename T>
bool vectorizable(int64_t n, int64_t glu_width, DType y_dtype, std::initializer_list<const void*> pointers) {
  constexpr int vec = 16 / sizeof(T);
  const int bytes = 16 * (y_dtype == DType::kFloat32 ? 4 / static_cast<int>(sizeof(T)) : 1);
  if (n % vec != 0 || glu_width % vec != 0) return false;
  for (const void* p : pointers)
    if (!aligned(p, bytes)) return false;
  return true;
}

}  // namespace

void activation_epilogue(DType dtype, DType y_dtype, const void* z, const void* y, void* h, void* y_out,
                         int64_t n, int act, int64_t glu_width, cudaStream_t stream) {
  if (n == 0) return;
  ACN_DISPATCH_FLOAT(dtype, T, {
    auto launch = [&](auto y_type) {
      using TY = decltype(y_type);
      constexpr int VEC = 16 / sizeof(T);
      if (vectorizable<T>(n, glu_width, y_dtype, {z, y, h, y_out}))
        ACN_LAUNCH(elementwise_blocks(n, VEC), kThreads, 0, stream, activation_epilogue_kernel<T, TY, VEC>)(
            static_cast<const T*>(z), static_cast<const TY*>(y), static_cast<T*>(h), static_cast<TY*>(y_out), n, act,
            glu_width);
      else
        ACN_LAUNCH(elementwise_blocks(n, 1), kThreads, 0, stream, activation_epilogue_kernel<T, TY, 1>)(
            static_cast<const T*>(z), static_cast<const TY*>(y), static_cast<T*>(h), static_cast<TY*>(y_out), n, act,
            glu_width);
    };
    if (y_dtype == dtype) launch(T{}); else launch(float{});
  });
}

void activation_backward(DType dtype, DType y_dtype, const void* dh, const void* dy_out, const void* saved,
                         void* dz, int64_t n, int act, int64_t glu_width, cudaStream_t stream) {
  if (n == 0) return;
  ACN_DISPATCH_FLOAT(dtype, T, {
    auto launch = [&](auto y_type) {
      using TY = decltype(y_type);
      constexpr int VEC = 16 / sizeof(T);
      if (vectorizable<T>(n, glu_width, y_dtype, {dh, dy_out, saved, dz}))
        ACN_LAUNCH(elementwise_blocks(n, VEC), kThreads, 0, stream, activation_backward_kernel<T, TY, VEC>)(
            static_cast<const T*>(dh), static_cast<const TY*>(dy_out), static_cast<const T*>(saved),
            static_cast<T*>(dz), n, act, glu_width);
      else
        ACN_LAUNCH(elementwise_blocks(n, 1), kThreads, 0, stream, activation_backward_kernel<T, TY, 1>)(
            static_cast<const T*>(dh), static_cast<const TY*>(dy_out), static_cast<const T*>(saved),
            static_cast<T*>(dz), n, act, glu_width);
    };
    if (y_dtype == dtype) launch(T{}); else launch(float{});
  });
}

}  // namespace acn
