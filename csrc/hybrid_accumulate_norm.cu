// hybrid_accumulate_norm: the H-ACN boundary, short_out = gate * short + x, y_out = y + long_weight * x
// and out = norm(short_out), one block per row; the backward gives dshort = gate * dtotal and dx = dtotal
// + long_weight * dy_out (dtotal = the norm's gradient + dshort_out) with each block's dgate and
// dlong_weight sums beside its dweight/dbias partial row. The row kernels are boundary_norm.cuh's with
// the short path; see acn_kernels/ops/hybrid_accumulate_norm.py.
#include "boundary_norm.cuh"

namespace acn {

void hybrid_accumulate_norm_forward(DType x_dtype, DType y_dtype, const void* short_in, const void* x,
                                    const void* y, const float* gate, const float* long_weight, const float* w,
                                    const float* b, void* short_out, void* y_out, void* out, float* mean,
                                    float* rstd, int64_t rows, int dim, float eps, cudaStream_t stream) {
  if (rows == 0) return;
  ACN_DISPATCH_FLOAT(x_dtype, T, {
    const ShortPath<T> short_path{static_cast<const T*>(short_in), static_cast<T*>(short_out), gate, long_weight};
    launch_boundary_forward<true, T>(y_dtype, static_cast<const T*>(x), y, w, b, y_out, static_cast<T*>(out), mean,
                                     rstd, rows, dim, eps, false, short_path, stream);
  });
}

void hybrid_accumulate_norm_backward(DType x_dtype, DType y_dtype, const void* dout, const void* dshort_out,
                                     const void* dy_out, const void* short_in, const void* x,
                                     const void* normalized, const float* gate, const float* long_weight,
                                     const float* w, const float* mean, const float* rstd, void* dshort, void* dx,
                                     float* partials, int64_t partial_stride, bool has_bias, int64_t rows, int dim,
                                     int programs, cudaStream_t stream) {
  if (rows == 0) return;
  ACN_DISPATCH_FLOAT(x_dtype, T, {
    const ShortGrads<T> short_grads{static_cast<const T*>(dshort_out), static_cast<const T*>(short_in),
                                    static_cast<const T*>(x), static_cast<T*>(dshort), gate, long_weight,
                                    partials + (has_bias ? 2 : 1) * static_cast<int64_t>(dim)};
    launch_boundary_backward<true, T>(y_dtype, static_cast<const T*>(dout), dy_out, normalized, false, w, mean, rstd,
                                      static_cast<T*>(dx), nullptr, partials, has_bias ? partials + dim : nullptr,
                                      partial_stride, rows, dim, programs, short_grads, stream);
  });
}

}  // namespace acn
