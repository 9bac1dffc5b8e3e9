// Host entry points of the CUDA kernels, one group per op (one .cu file each). Free of torch
// headers: pointers, sizes, dtypes and a stream; tensors are (rows, D), contiguous rows.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace acn {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// accumulate_norm.cu. y, y_out, b, mean may be null (no running sum, no bias, RMSNorm).
void accumulate_norm_forward(DType x_dtype, DType y_dtype, const void* x, const void* y, const float* w,
                             const float* b, void* y_out, void* out, float* mean, float* rstd, int64_t rows,
                             int dim, float eps, bool normalize_sum, cudaStream_t stream);

// dy_out and dy may be null; dw_partial/db_partial are rows of a float32 (programs, partial_stride)
// buffer (its columns 0 and D), each element written once by the kernel; `normalized` has y's dtype
// when v_is_y.
void accumulate_norm_backward(DType x_dtype, DType y_dtype, const void* dout, const void* dy_out,
                              const void* normalized, bool v_is_y, const float* w, const float* mean,
                              const float* rstd, void* dx, void* dy, float* dw_partial, float* db_partial,
                              int64_t partial_stride, int64_t rows, int dim, int programs, cudaStream_t stream);

// hybrid_accumulate_norm.cu. short_out = gate * short_in + x (normalized), y_out = y + long_weight * x;
// y, long_weight, b, mean may be null (y_out is then long_weight * x, or not written without either).
void hybrid_accumulate_norm_forward(DType x_dtype, DType y_dtype, const void* short_in, const void* x,
                                    const void* y, const float* gate, const float* long_weight, const float* w,
                                    const float* b, void* short_out, void* y_out, void* out, float* mean,
                                    float* rstd, int64_t rows, int dim, float eps, cudaStream_t stream);
// dshort_out and dy_out may be null; x is read only with a long_weight. partials: float32 (programs,
// partial_stride), each block's row dweight (D), dbias (D, with has_bias), dgate, dlong_weight.
void hybrid_accumulate_norm_backward(DType x_dtype, DType y_dtype, const void* dout, const void* dshort_out,
                                     const void* dy_out, const void* short_in, const void* x,
                                     const void* normalized, const float* gate, const float* long_weight,
                                     const float* w, const float* mean, const float* rstd, void* dshort, void* dx,
                                     float* partials, int64_t partial_stride, bool has_bias, int64_t rows, int dim,
                                     int programs, cudaStream_t stream);

// probe_norm.cu. xs is (L+1, rows, D) contiguous; mean, rstd are (L+1, rows); mean null for RMSNorm.
// Each block keeps float rows of D (launch_plan.h's probe_storage_floats): in dynamic shared memory when
// scratch is null (the forward then runs a block per row), else in its slice of scratch, (programs,
// storage) floats of global memory (the forward's blocks then walk the rows too).
void probe_norm_forward(DType dtype, const void* xs, const float* w, const float* b, void* out, float* mean,
                        float* rstd, int depth, int64_t rows, int dim, float eps, float* scratch, int programs,
                        cudaStream_t stream);
void probe_norm_backward(DType dtype, const void* dout, const void* xs, const float* w, const float* mean,
                         const float* rstd, void* dxs, float* dw_partial, float* db_partial, int64_t partial_stride,
                         int depth, int64_t rows, int dim, int programs, float* scratch, cudaStream_t stream);

// linear_act_accumulate.cu: the elementwise parts around the GEMM. z is x @ W.T + b (from cuBLAS).
// h = act(z); y_out = y + h when y is given; h null: only y_out (z is h already, act identity). n is
// h's element count; for swiglu (glu_width W > 0) z is (n / W, 2W), each row its gate then up halves.
void activation_epilogue(DType dtype, DType y_dtype, const void* z, const void* y, void* h, void* y_out,
                         int64_t n, int activation, int64_t glu_width, cudaStream_t stream);
// dz = (dh + dy_out) * act'(saved); dh, dy_out, saved may be null (saved: identity). For swiglu saved
// and dz are (n / W, 2W), both halves of dz written.
void activation_backward(DType dtype, DType y_dtype, const void* dh, const void* dy_out, const void* saved,
                         void* dz, int64_t n, int activation, int64_t glu_width, cudaStream_t stream);

// depth_cross_entropy.cu: the row work on float32 logits (rows, stride), each row's first `vocab` the
// raw logits: loss and lse per row (loss 0 where targets[row] == ignore_index); with needs_grad the
// gradient of scale[row] x loss with respect to the raw logits, written over them. softcap 0: no cap.
void cross_entropy_rows(float* logits, int64_t stride, const int64_t* targets, const float* scale, float* loss,
                        float* lse, int64_t rows, int vocab, int64_t ignore_index, float label_smoothing, float z_loss,
                        float softcap, bool needs_grad, cudaStream_t stream);
// The split pass over a vocabulary shared by ranks, each row's first `vocab` columns of the vocab_size
// words; targets[row] the target's column here, -1 where another rank holds it. Statistics: per row
// the capped maximum m, sum exp(c - m), sum exp(c - m)(c - m), target logit (0 for -1) and sum of the
// capped logits into stats (rows, 5), the first maximum's column into argmax. Gradient: given the whole
// vocabulary's lse and each row's scale (0 for an ignored row), the gradient of scale x loss written
// over the logits.
void cross_entropy_statistics(const float* logits, int64_t stride, const int64_t* targets, float* stats,
                              int64_t* argmax, int64_t rows, int vocab, float softcap, cudaStream_t stream);
void cross_entropy_gradient(float* logits, int64_t stride, const int64_t* targets, const float* scale,
                            const float* lse, int64_t rows, int vocab, int vocab_size, float label_smoothing,
                            float z_loss, float softcap, cudaStream_t stream);

}  // namespace acn
