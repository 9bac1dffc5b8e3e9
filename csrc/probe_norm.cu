// probe_norm: norm(x_0 + ... + x_k) for every k, a block per row (a persistent loop over rows), the
// running sum kept as a compensated float32 pair; the backward walks k = L..0 with the running
// gradient beside it, rebuilding each y_k by subtraction exactly enough to round to the forward's, and
// keeps the block's dweight/dbias partial sums beside them, written to its partial row once. Math in
// row_math.h; see acn_kernels/ops/probe_norm.py.
//
// These float rows (2 forward, 5 backward: launch_plan.h's probe_storage_floats) live in dynamic shared memory
// where they fit the device's opt-in limit, else in `scratch`, a slice of global memory per block that
// its re-reads find in L2 (the binding chooses, from the device's limit). Each thread owns the same
// columns in every pass, so the kernels are the same either way and only the reductions synchronize.
#include "device_utils.cuh"
#include "launch_plan.h"
#include "row_math.h"

namespace acn {
namespace {

// This block's float rows: in dynamic shared memory, or its slice of the global scratch.
__device__ __forceinline__ float* block_storage(float* scratch, int rows_of_storage, int dim) {
  ACN_DYNAMIC_SHARED(float, shared);
  return scratch ? scratch + static_cast<int64_t>(blockIdx.x) * rows_of_storage * dim : shared;
}

template <typename T>
__global__ void probe_norm_fwd_kernel(const T* __restrict__ xs, const float* __restrict__ w,
                                      const float* __restrict__ b, T* __restrict__ out, float* __restrict__ mean_out,
                                      float* __restrict__ rstd_out, int depth, int64_t rows, int dim, float eps,
                                      float* __restrict__ scratch) {
  float* hi = block_storage(scratch, 2, dim);  // the running sum y_k = hi + lo (add_compensated)
  float* lo = hi + dim;
  const bool is_layernorm = mean_out != nullptr;
  const int64_t layer = rows * dim;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    for (int i = threadIdx.x; i < dim; i += blockDim.x) hi[i] = lo[i] = 0.0f;
    for (int k = 0; k < depth; ++k) {
      const int64_t base = k * layer + row * dim;
      float row_sum = 0.0f;
      for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        add_compensated(hi[i], lo[i], to_float(xs[base + i]));
        row_sum += hi[i] + lo[i];
      }
      const float mean = is_layernorm ? block_sum(row_sum) / dim : 0.0f;
      float squares = 0.0f;
      for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        const float centered = hi[i] + lo[i] - mean;
        squares += centered * centered;
      }
      const float rstd = inverse_std(block_sum(squares) / dim, eps);
      for (int i = threadIdx.x; i < dim; i += blockDim.x)
        out[base + i] = from_float<T>(affine(normalize(hi[i] + lo[i], mean, rstd), w[i], b ? b[i] : 0.0f));
      if (threadIdx.x == 0) {
        if (is_layernorm) mean_out[k * rows + row] = mean;
        rstd_out[k * rows + row] = rstd;
      }
    }
  }
}

template <typename T>
__global__ void probe_norm_bwd_kernel(const T* __restrict__ dout, const T* __restrict__ xs,
                                      const float* __restrict__ w, const float* __restrict__ mean_in,
                                      const float* __restrict__ rstd_in, T* __restrict__ dxs,
                                      float* __restrict__ dw_partial, float* __restrict__ db_partial,
                                      int64_t partial_stride, int depth, int64_t rows, int dim,
                                      float* __restrict__ scratch) {
  float* hi = block_storage(scratch, 5, dim);  // y_k = hi + lo, rebuilt as the forward built it, then
  float* lo = hi + dim;                         // y_{k-1} = y_k - x_k
  float* grad = hi + 2 * dim;
  float* dw = hi + 3 * dim;  // this block's dweight/dbias partial sums over every row it walks
  float* db = hi + 4 * dim;
  const bool is_layernorm = mean_in != nullptr;
  const int64_t layer = rows * dim;
  for (int i = threadIdx.x; i < dim; i += blockDim.x) dw[i] = db[i] = 0.0f;
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    for (int i = threadIdx.x; i < dim; i += blockDim.x) {
      hi[i] = lo[i] = grad[i] = 0.0f;
      for (int k = 0; k < depth; ++k) add_compensated(hi[i], lo[i], to_float(xs[k * layer + row * dim + i]));
    }
    for (int k = depth - 1; k >= 0; --k) {
      const int64_t base = k * layer + row * dim;
      const float mean = is_layernorm ? mean_in[k * rows + row] : 0.0f, rstd = rstd_in[k * rows + row];
      float proj = 0.0f, wdout_sum = 0.0f;
      for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        const float wd = w[i] * to_float(dout[base + i]);
        proj += wd * normalize(hi[i] + lo[i], mean, rstd);
        wdout_sum += wd;
      }
      proj = block_sum(proj) / dim;
      const float wdout_mean = block_sum(wdout_sum) / dim;
      for (int i = threadIdx.x; i < dim; i += blockDim.x) {
        const float d = to_float(dout[base + i]), v_hat = normalize(hi[i] + lo[i], mean, rstd);
        grad[i] += norm_input_grad(w[i] * d, v_hat, rstd, proj, wdout_mean, is_layernorm);
        dxs[base + i] = from_float<T>(grad[i]);
        dw[i] += d * v_hat;
        db[i] += d;
        add_compensated(hi[i], lo[i], -to_float(xs[base + i]));
      }
    }
  }
  const int64_t partial = static_cast<int64_t>(blockIdx.x) * partial_stride;  // written once, by the column's owner
  for (int i = threadIdx.x; i < dim; i += blockDim.x) {
    dw_partial[partial + i] = dw[i];
    if (db_partial != nullptr) db_partial[partial + i] = db[i];
  }
}

}  // namespace

void probe_norm_forward(DType dtype, const void* xs, const float* w, const float* b, void* out, float* mean,
                        float* rstd, int depth, int64_t rows, int dim, float eps, float* scratch, int programs,
                        cudaStream_t stream) {
  if (rows == 0) return;
  const int64_t shared = scratch ? 0 : 4 * plan::probe_storage_floats(dim, false);
  ACN_DISPATCH_FLOAT(dtype, T, {
    if (shared)
      cudaFuncSetAttribute(probe_norm_fwd_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(shared));
    ACN_LAUNCH(scratch ? programs : rows, row_threads(dim), shared, stream, probe_norm_fwd_kernel<T>)(
        static_cast<const T*>(xs), w, b, static_cast<T*>(out), mean, rstd, depth, rows, dim, eps, scratch);
  });
}

void probe_norm_backward(DType dtype, const void* dout, const void* xs, const float* w, const float* mean,
                         const float* rstd, void* dxs, float* dw_partial, float* db_partial, int64_t partial_stride,
                         int depth, int64_t rows, int dim, int programs, float* scratch, cudaStream_t stream) {
  if (rows == 0) return;
  const int64_t shared = scratch ? 0 : 4 * plan::probe_storage_floats(dim, true);
  ACN_DISPATCH_FLOAT(dtype, T, {
    if (shared)
      cudaFuncSetAttribute(probe_norm_bwd_kernel<T>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(shared));
    ACN_LAUNCH(programs, row_threads(dim), shared, stream, probe_norm_bwd_kernel<T>)(
        static_cast<const T*>(dout), static_cast<const T*>(xs), w, mean, rstd, static_cast<T*>(dxs), dw_partial,
        db_partial, partial_stride, depth, rows, dim, scratch);
  });
}

}  // namespace acn
