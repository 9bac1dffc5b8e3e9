// accumulate_norm: y_out = y + x and out = norm(x or y_out), one block per row; the backward adds the
// gradient fan-out dy_out in the same pass. The row kernels are boundary_norm.cuh's (without the
// hybrid's short path); see acn_kernels/ops/accumulate_norm.py.
#include "boundary_norm.cuh"

namespace acn {

void accumulate_norm_forward(DType x_dtype, DType y_dtype, const void* x, const void* y, const float* w,
                             const float* b, void* y_out, void* out, float* mean, float* rstd, int64_t rows,
                             int dim, float eps, bool normalize_sum, cudaStream_t stream) {
  if (rows == 0) return;
  ACN_DISPATCH_FLOAT(x_dtype, T, {
    launch_boundary_forward<false, T>(y_dtype, static_cast<const T*>(x), y, w, b, y_out, static_cast<T*>(out), mean,
                                      rstd, rows, dim, eps, normalize_sum, ShortPath<T>{}, stream);
  });
}

void accumulate_norm_backward(DType x_dtype, DType y_dtype, const void* dout, const void* dy_out,
                              const void* normalized, bool v_is_y, const float* w, const float* mean,
                              const float* rstd, void* dx, void* dy, float* dw_partial, float* db_partial,
                              int64_t partial_stride, int64_t rows, int dim, int programs, cudaStream_t stream) {
  if (rows == 0) return;
  ACN_DISPATCH_FLOAT(x_dtype, T, {
    launch_boundary_backward<false, T>(y_dtype, static_cast<const T*>(dout), dy_out, normalized, v_is_y, w, mean,
                                       rstd, static_cast<T*>(dx), dy, dw_partial, db_partial, partial_stride, rows,
                                       dim, programs, ShortGrads<T>{}, stream);
  });
}

}  // namespace acn
