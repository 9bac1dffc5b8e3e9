// The host entry points of kernels.h with C linkage, for tools/cuda_host_check.py (ctypes): the
// same functions the extension calls, so the host execution launches exactly what a GPU would.
#include "kernels.h"
#include "launch_plan.h"

using acn::DType;

extern "C" {

// launch_plan.h, for the Python mirror of bindings.cpp's allocations (tools/cuda_host_check.py).
int acn_plan_reduction_programs(long long rows, int sms) { return acn::plan::reduction_programs(rows, sms); }
long long acn_plan_partial_width(long long dim, int has_bias, int scalars) {
  return acn::plan::partial_width(dim, has_bias != 0, scalars);
}
long long acn_plan_partial_sums(long long dim, int has_bias, int scalars) {
  return acn::plan::partial_sums(dim, has_bias != 0, scalars);
}
long long acn_plan_probe_scratch_floats(int dim, int backward, long long shared_opt_in_bytes) {
  return acn::plan::probe_scratch_floats(dim, backward != 0, shared_opt_in_bytes);
}

void acn_host_accumulate_norm_forward(int x_dtype, int y_dtype, const void* x, const void* y, const float* w,
                                      const float* b, void* y_out, void* out, float* mean, float* rstd,
                                      long long rows, int dim, float eps, int normalize_sum) {
  acn::accumulate_norm_forward(DType(x_dtype), DType(y_dtype), x, y, w, b, y_out, out, mean, rstd, rows, dim, eps,
                               normalize_sum != 0, nullptr);
}

void acn_host_accumulate_norm_backward(int x_dtype, int y_dtype, const void* dout, const void* dy_out,
                                       const void* normalized, int v_is_y, const float* w, const float* mean,
                                       const float* rstd, void* dx, void* dy, float* dw_partial, float* db_partial,
                                       long long partial_stride, long long rows, int dim, int programs) {
  acn::accumulate_norm_backward(DType(x_dtype), DType(y_dtype), dout, dy_out, normalized, v_is_y != 0, w, mean, rstd,
                                dx, dy, dw_partial, db_partial, partial_stride, rows, dim, programs, nullptr);
}

void acn_host_hybrid_accumulate_norm_forward(int x_dtype, int y_dtype, const void* short_in, const void* x,
                                             const void* y, const float* gate, const float* long_weight,
                                             const float* w, const float* b, void* short_out, void* y_out, void* out,
                                             float* mean, float* rstd, long long rows, int dim, float eps) {
  acn::hybrid_accumulate_norm_forward(DType(x_dtype), DType(y_dtype), short_in, x, y, gate, long_weight, w, b,
                                      short_out, y_out, out, mean, rstd, rows, dim, eps, nullptr);
}

void acn_host_hybrid_accumulate_norm_backward(int x_dtype, int y_dtype, const void* dout, const void* dshort_out,
                                              const void* dy_out, const void* short_in, const void* x,
                                              const void* normalized, const float* gate, const float* long_weight,
                                              const float* w, const float* mean, const float* rstd, void* dshort,
                                              void* dx, float* partials, long long partial_stride, int has_bias,
                                              long long rows, int dim, int programs) {
  acn::hybrid_accumulate_norm_backward(DType(x_dtype), DType(y_dtype), dout, dshort_out, dy_out, short_in, x,
                                       normalized, gate, long_weight, w, mean, rstd, dshort, dx, partials,
                                       partial_stride, has_bias != 0, rows, dim, programs, nullptr);
}

void acn_host_probe_norm_forward(int dtype, const void* xs, const float* w, const float* b, void* out, float* mean,
                                 float* rstd, int depth, long long rows, int dim, float eps, float* scratch,
                                 int programs) {
  acn::probe_norm_forward(DType(dtype), xs, w, b, out, mean, rstd, depth, rows, dim, eps, scratch, programs, nullptr);
}

void acn_host_probe_norm_backward(int dtype, const void* dout, const void* xs, const float* w, const float* mean,
                                  const float* rstd, void* dxs, float* dw_partial, float* db_partial,
                                  long long partial_stride, int depth, long long rows, int dim, int programs,
                                  float* scratch) {
  acn::probe_norm_backward(DType(dtype), dout, xs, w, mean, rstd, dxs, dw_partial, db_partial, partial_stride, depth,
                           rows, dim, programs, scratch, nullptr);
}

void acn_host_activation_epilogue(int dtype, int y_dtype, const void* z, const void* y, void* h, void* y_out,
                                  long long n, int activation, long long glu_width) {
  acn::activation_epilogue(DType(dtype), DType(y_dtype), z, y, h, y_out, n, activation, glu_width, nullptr);
}

void acn_host_activation_backward(int dtype, int y_dtype, const void* dh, const void* dy_out, const void* saved,
                                  void* dz, long long n, int activation, long long glu_width) {
  acn::activation_backward(DType(dtype), DType(y_dtype), dh, dy_out, saved, dz, n, activation, glu_width, nullptr);
}

void acn_host_cross_entropy_rows(float* logits, long long stride, const long long* targets, const float* scale,
                                 float* loss, float* lse, long long rows, int vocab, long long ignore_index,
                                 float label_smoothing, float z_loss, float softcap, int needs_grad) {
  acn::cross_entropy_rows(logits, stride, reinterpret_cast<const int64_t*>(targets), scale, loss, lse, rows, vocab,
                          ignore_index, label_smoothing, z_loss, softcap, needs_grad != 0, nullptr);
}

void acn_host_cross_entropy_statistics(const float* logits, long long stride, const long long* targets, float* stats,
                                       long long* argmax, long long rows, int vocab, float softcap) {
  acn::cross_entropy_statistics(logits, stride, reinterpret_cast<const int64_t*>(targets), stats,
                                reinterpret_cast<int64_t*>(argmax), rows, vocab, softcap, nullptr);
}

void acn_host_cross_entropy_gradient(float* logits, long long stride, const long long* targets, const float* scale,
                                     const float* lse, long long rows, int vocab, int vocab_size,
                                     float label_smoothing, float z_loss, float softcap) {
  acn::cross_entropy_gradient(logits, stride, reinterpret_cast<const int64_t*>(targets), scale, lse, rows, vocab,
                              vocab_size, label_smoothing, z_loss, softcap, nullptr);
}

}  // extern "C"
