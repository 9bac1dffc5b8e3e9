// The one file that sees torch: registers the CUDA kernels as torch ops (acn_kernels_cuda::*, the
// same schemas as the Triton custom ops), checks every input with a message naming the op, the
// argument, what was expected and what was given, and runs the GEMMs of linear_act_accumulate
// through ATen (cuBLAS).
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/extension.h>

#include <string>

#include "kernels.h"
#include "launch_plan.h"
#include "row_math.h"

#ifndef ACN_CUDA_ARCHS
#define ACN_CUDA_ARCHS "unknown"
#endif

namespace {

using at::Tensor;
using OptionalTensor = std::optional<Tensor>;

acn::DType dtype_of(const Tensor& t, const char* op, const char* name) {
  switch (t.scalar_type()) {
    case at::kFloat: return acn::DType::kFloat32;
    case at::kHalf: return acn::DType::kFloat16;
    case at::kBFloat16: return acn::DType::kBFloat16;
    default: TORCH_CHECK(false, op, ": ", name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
  }
  return acn::DType::kFloat32;
}

void check_cuda(const Tensor& t, const char* op, const char* name) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got a tensor on ", t.device(),
              " (the CUDA backend runs on GPUs only; use backend='triton' or 'reference' elsewhere)");
}

void check_cuda(const OptionalTensor& t, const char* op, const char* name) {
  if (t) check_cuda(*t, op, name);
}

void check_rows(const Tensor& t, int64_t dim, const char* op, const char* name) {
  TORCH_CHECK(t.dim() >= 1 && t.size(-1) == dim, op, ": ", name, " must have last dimension ", dim, ", got shape ",
              t.sizes());
}

Tensor rows_of(const Tensor& t) {
  Tensor c = t.contiguous();
  return c.view({-1, c.size(-1)});
}


cudaStream_t stream() { return c10::cuda::getCurrentCUDAStream(); }

int device_attribute(cudaDeviceAttr attribute) {
  int device = 0, value = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&value, attribute, device));
  return value;
}

int reduction_programs(int64_t rows) {
  return acn::plan::reduction_programs(rows, device_attribute(cudaDevAttrMultiProcessorCount));
}

Tensor float_row(const Tensor& t) { return t.to(at::kFloat).contiguous(); }

std::tuple<Tensor, Tensor, Tensor, Tensor> accumulate_norm_fwd(const Tensor& x, const OptionalTensor& y,
                                                               const Tensor& weight, const OptionalTensor& bias,
                                                               double eps, bool is_layernorm, bool normalize_sum) {
  const char* op = "acn_kernels_cuda::accumulate_norm_fwd";
  check_cuda(x, op, "x"), check_cuda(y, op, "y"), check_cuda(weight, op, "weight"), check_cuda(bias, op, "bias");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t dim = x.size(-1);
  Tensor x2 = rows_of(x), w = float_row(weight), b = bias ? float_row(*bias) : Tensor();
  Tensor y2 = y ? rows_of(*y) : Tensor(), y_out = y ? at::empty_like(y2) : Tensor();
  if (y) check_rows(*y, dim, op, "y");
  Tensor out = at::empty_like(x2);
  const auto stats = x.options().dtype(at::kFloat);
  Tensor mean = at::empty({is_layernorm ? x2.size(0) : 0}, stats), rstd = at::empty({x2.size(0)}, stats);
  acn::accumulate_norm_forward(dtype_of(x, op, "x"), y ? dtype_of(*y, op, "y") : dtype_of(x, op, "x"), x2.data_ptr(),
                               y ? y2.data_ptr() : nullptr, w.data_ptr<float>(), bias ? b.data_ptr<float>() : nullptr,
                               y ? y_out.data_ptr() : nullptr, out.data_ptr(),
                               is_layernorm ? mean.data_ptr<float>() : nullptr, rstd.data_ptr<float>(), x2.size(0),
                               static_cast<int>(dim), static_cast<float>(eps), normalize_sum, stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {y ? y_out.view(x.sizes()) : at::empty({0}, x.options()), out.view(x.sizes()), mean, rstd};
}

Tensor new_partial_rows(int programs, int64_t width, const Tensor& like) {
  return at::empty({programs, width}, like.options().dtype(at::kFloat));
}

std::tuple<Tensor, Tensor, Tensor> accumulate_norm_bwd(const Tensor& dout, const OptionalTensor& dy_out,
                                                       const Tensor& normalized, const Tensor& weight,
                                                       const Tensor& mean, const Tensor& rstd, bool has_bias,
                                                       bool is_layernorm, std::optional<at::ScalarType> dy_dtype) {
  const char* op = "acn_kernels_cuda::accumulate_norm_bwd";
  check_cuda(dout, op, "dout"), check_cuda(dy_out, op, "dy_out"), check_cuda(normalized, op, "normalized");
  const c10::cuda::CUDAGuard guard(dout.device());
  const int64_t dim = normalized.size(-1);
  Tensor dout2 = rows_of(dout), v2 = rows_of(normalized), w = float_row(weight);
  Tensor dy_out2 = dy_out ? rows_of(*dy_out) : Tensor();
  const int64_t rows = v2.size(0);
  const int programs = reduction_programs(rows);
  Tensor dx = at::empty_like(dout2), dy = dy_dtype ? at::empty(v2.sizes(), dout.options().dtype(*dy_dtype)) : Tensor();
  const int64_t width = acn::plan::partial_width(dim, has_bias, 0);
  Tensor partials = new_partial_rows(programs, width, dout);
  float* base = partials.data_ptr<float>();
  const acn::DType x_dtype = dtype_of(dout, op, "dout");
  const acn::DType y_dtype = dy_out ? dtype_of(*dy_out, op, "dy_out") : (dy_dtype ? acn::DType::kFloat32 : x_dtype);
  acn::accumulate_norm_backward(x_dtype, y_dtype, dout2.data_ptr(), dy_out ? dy_out2.data_ptr() : nullptr,
                                v2.data_ptr(), normalized.scalar_type() != dout.scalar_type(), w.data_ptr<float>(),
                                is_layernorm ? mean.data_ptr<float>() : nullptr, rstd.data_ptr<float>(),
                                dx.data_ptr(), dy_dtype ? dy.data_ptr() : nullptr, base, has_bias ? base + dim : nullptr,
                                width, rows, static_cast<int>(dim), programs, stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const auto shape = normalized.sizes();
  return {dx.view(shape), dy_dtype ? dy.view(shape) : at::empty({0}, dout.options()),
          partials.sum(0)};
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> hybrid_accumulate_norm_fwd(
    const Tensor& x, const Tensor& f, const OptionalTensor& y, const Tensor& gate, const Tensor& weight,
    const OptionalTensor& bias, const OptionalTensor& long_weight, double eps, bool is_layernorm) {
  const char* op = "acn_kernels_cuda::hybrid_accumulate_norm_fwd";
  check_cuda(x, op, "x"), check_cuda(f, op, "f"), check_cuda(y, op, "y"), check_cuda(gate, op, "gate");
  check_cuda(weight, op, "weight"), check_cuda(bias, op, "bias"), check_cuda(long_weight, op, "long_weight");
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t dim = x.size(-1);
  check_rows(f, dim, op, "f");
  Tensor x2 = rows_of(x), f2 = rows_of(f), w = float_row(weight), b = bias ? float_row(*bias) : Tensor();
  Tensor g = float_row(gate), lw = long_weight ? float_row(*long_weight) : Tensor();
  Tensor y2 = y ? rows_of(*y) : Tensor();
  if (y) check_rows(*y, dim, op, "y");
  const bool stores_y = y || long_weight;
  Tensor y_out = stores_y ? at::empty(f2.sizes(), y ? y2.options() : f2.options()) : Tensor();
  Tensor x_next = at::empty_like(f2), out = at::empty_like(f2);
  const auto stats = x.options().dtype(at::kFloat);
  Tensor mean = at::empty({is_layernorm ? x2.size(0) : 0}, stats), rstd = at::empty({x2.size(0)}, stats);
  const acn::DType x_dtype = dtype_of(x, op, "x");
  acn::hybrid_accumulate_norm_forward(
      x_dtype, y ? dtype_of(*y, op, "y") : x_dtype, x2.data_ptr(), f2.data_ptr(), y ? y2.data_ptr() : nullptr,
      g.data_ptr<float>(), long_weight ? lw.data_ptr<float>() : nullptr, w.data_ptr<float>(),
      bias ? b.data_ptr<float>() : nullptr, x_next.data_ptr(), stores_y ? y_out.data_ptr() : nullptr, out.data_ptr(),
      is_layernorm ? mean.data_ptr<float>() : nullptr, rstd.data_ptr<float>(), x2.size(0), static_cast<int>(dim),
      static_cast<float>(eps), stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {x_next.view(x.sizes()), stores_y ? y_out.view(x.sizes()) : at::empty({0}, x.options()), out.view(x.sizes()),
          mean, rstd};
}

std::tuple<Tensor, Tensor, Tensor> hybrid_accumulate_norm_bwd(
    const Tensor& dout, const OptionalTensor& dx_next, const OptionalTensor& dy_out, const Tensor& x, const Tensor& f,
    const Tensor& x_next, const Tensor& gate, const Tensor& weight, const OptionalTensor& long_weight,
    const Tensor& mean, const Tensor& rstd, bool has_bias, bool is_layernorm) {
  const char* op = "acn_kernels_cuda::hybrid_accumulate_norm_bwd";
  check_cuda(dout, op, "dout"), check_cuda(dx_next, op, "dx_next"), check_cuda(dy_out, op, "dy_out");
  check_cuda(x, op, "x"), check_cuda(f, op, "f"), check_cuda(x_next, op, "x_next");
  const c10::cuda::CUDAGuard guard(dout.device());
  const int64_t dim = x_next.size(-1);
  Tensor dout2 = rows_of(dout), v2 = rows_of(x_next), x2 = rows_of(x), f2 = rows_of(f), w = float_row(weight);
  Tensor dx_next2 = dx_next ? rows_of(*dx_next) : Tensor(), dy_out2 = dy_out ? rows_of(*dy_out) : Tensor();
  Tensor g = float_row(gate), lw = long_weight ? float_row(*long_weight) : Tensor();
  const int64_t rows = v2.size(0);
  const int programs = reduction_programs(rows);
  const int64_t width = acn::plan::partial_width(dim, has_bias, long_weight ? 2 : 1);
  Tensor partials = new_partial_rows(programs, width, dout);
  Tensor dx = at::empty_like(x2), df = at::empty_like(f2);
  const acn::DType x_dtype = dtype_of(x_next, op, "x_next");
  acn::hybrid_accumulate_norm_backward(
      x_dtype, dy_out ? dtype_of(*dy_out, op, "dy_out") : x_dtype, dout2.data_ptr(),
      dx_next ? dx_next2.data_ptr() : nullptr, dy_out ? dy_out2.data_ptr() : nullptr, x2.data_ptr(), f2.data_ptr(),
      v2.data_ptr(), g.data_ptr<float>(), long_weight ? lw.data_ptr<float>() : nullptr, w.data_ptr<float>(),
      is_layernorm ? mean.data_ptr<float>() : nullptr, rstd.data_ptr<float>(), dx.data_ptr(), df.data_ptr(),
      partials.data_ptr<float>(), width, has_bias, rows, static_cast<int>(dim), programs, stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const int64_t sums = acn::plan::partial_sums(dim, has_bias, long_weight ? 2 : 1);
  return {dx.view(x.sizes()), df.view(f.sizes()), partials.narrow(1, 0, sums).sum(0)};
}

// The probe kernels' float rows in global memory (programs slices) where they do not fit this device's
// opt-in shared memory per block (sm_80: 163 KB, sm_90: 227 KB); undefined where they do.
Tensor probe_scratch(int64_t dim, bool backward, int programs, const Tensor& like) {
  const int64_t floats = acn::plan::probe_scratch_floats(static_cast<int>(dim), backward,
                                                         device_attribute(cudaDevAttrMaxSharedMemoryPerBlockOptin));
  return floats ? at::empty({programs, floats}, like.options().dtype(at::kFloat)) : Tensor();
}

float* scratch_ptr(Tensor& scratch) { return scratch.defined() ? scratch.data_ptr<float>() : nullptr; }

std::tuple<Tensor, Tensor, Tensor> probe_norm_fwd(const Tensor& xs, const Tensor& weight, const OptionalTensor& bias,
                                                  double eps, bool is_layernorm) {
  const char* op = "acn_kernels_cuda::probe_norm_fwd";
  check_cuda(xs, op, "xs"), check_cuda(weight, op, "weight"), check_cuda(bias, op, "bias");
  const c10::cuda::CUDAGuard guard(xs.device());
  TORCH_CHECK(xs.dim() >= 2, op, ": xs must have shape (L+1, ..., D), got ", xs.sizes());
  const int64_t depth = xs.size(0), dim = xs.size(-1), rows = xs.numel() / std::max<int64_t>(1, depth * dim);
  Tensor xs3 = xs.contiguous(), w = float_row(weight), b = bias ? float_row(*bias) : Tensor();
  const int programs = reduction_programs(rows);
  Tensor scratch = probe_scratch(dim, false, programs, xs), out = at::empty_like(xs3);
  const auto stats = xs.options().dtype(at::kFloat);
  Tensor mean = is_layernorm ? at::empty({depth, rows}, stats) : at::empty({0}, stats);
  Tensor rstd = at::empty({depth, rows}, stats);
  acn::probe_norm_forward(dtype_of(xs, op, "xs"), xs3.data_ptr(), w.data_ptr<float>(),
                          bias ? b.data_ptr<float>() : nullptr, out.data_ptr(),
                          is_layernorm ? mean.data_ptr<float>() : nullptr, rstd.data_ptr<float>(),
                          static_cast<int>(depth), rows, static_cast<int>(dim), static_cast<float>(eps),
                          scratch_ptr(scratch), programs, stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {out, mean, rstd};
}

std::tuple<Tensor, Tensor> probe_norm_bwd(const Tensor& dout, const Tensor& xs, const Tensor& weight,
                                          const Tensor& mean, const Tensor& rstd, bool has_bias, bool is_layernorm) {
  const char* op = "acn_kernels_cuda::probe_norm_bwd";
  check_cuda(dout, op, "dout"), check_cuda(xs, op, "xs");
  const c10::cuda::CUDAGuard guard(xs.device());
  const int64_t depth = xs.size(0), dim = xs.size(-1), rows = xs.numel() / std::max<int64_t>(1, depth * dim);
  Tensor xs3 = xs.contiguous(), dout3 = dout.contiguous().to(xs.scalar_type()), w = float_row(weight);
  const int programs = reduction_programs(rows);
  Tensor scratch = probe_scratch(dim, true, programs, xs);
  const int64_t width = acn::plan::partial_width(dim, has_bias, 0);
  Tensor dxs = at::empty_like(xs3), partials = new_partial_rows(programs, width, xs);
  float* base = partials.data_ptr<float>();
  acn::probe_norm_backward(dtype_of(xs, op, "xs"), dout3.data_ptr(), xs3.data_ptr(), w.data_ptr<float>(),
                           is_layernorm ? mean.data_ptr<float>() : nullptr, rstd.data_ptr<float>(), dxs.data_ptr(),
                           base, has_bias ? base + dim : nullptr, width, static_cast<int>(depth), rows,
                           static_cast<int>(dim), programs, scratch_ptr(scratch), stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {dxs, partials.sum(0)};
}

int activation_code(const std::string& name, const char* op) {
  static const char* names[] = {"relu", "gelu", "gelu_tanh", "silu", "identity", "swiglu"};
  for (int i = 0; i < 6; ++i)
    if (name == names[i]) return i;
  TORCH_CHECK(false, op, ": activation must be one of relu, gelu, gelu_tanh, silu, identity, swiglu, got '", name,
              "'");
  return -1;
}

bool needs_preactivation(int act) {
  return act == acn::kGelu || act == acn::kGeluTanh || act == acn::kSilu || act == acn::kSwiglu;
}

std::tuple<Tensor, Tensor, Tensor> linear_act_accumulate_fwd(const Tensor& x, const Tensor& weight,
                                                             const OptionalTensor& bias, const OptionalTensor& y,
                                                             std::string activation, bool store_h) {
  const char* op = "acn_kernels_cuda::linear_act_accumulate_fwd";
  check_cuda(x, op, "x"), check_cuda(weight, op, "weight"), check_cuda(bias, op, "bias"), check_cuda(y, op, "y");
  const c10::cuda::CUDAGuard guard(x.device());
  const int act = activation_code(activation, op);
  TORCH_CHECK(store_h || y, op, ": store_h=False needs y (only the running sum is returned then)");
  Tensor x2 = rows_of(x);
  Tensor y2 = y ? rows_of(*y) : Tensor(), y_out = y ? at::empty_like(y2) : Tensor();
  const acn::DType x_dtype = dtype_of(x, op, "x"), y_dtype = y ? dtype_of(*y, op, "y") : x_dtype;
  // Where the GEMM's own epilogue gives h (cuBLASLt's bias + ReLU, through ATen; identity: h is the
  // GEMM's output), the elementwise kernel only adds the running sum. Otherwise z comes from cuBLAS
  // and the kernel applies act too (cuBLASLt's GELU is the tanh form, and ATen does not return the
  // pre-activation that act' needs).
  // swiglu: z is (M, 2H), each row the gate projection's then the up projection's, h and y (M, H).
  const bool gemm_epilogue = act == acn::kIdentity || (act == acn::kRelu && bias);
  TORCH_CHECK(act != acn::kSwiglu || weight.size(0) % 2 == 0, op, ": swiglu's weight must have an even number of rows, "
              "got ", weight.sizes());
  Tensor z = act == acn::kRelu && bias ? at::_addmm_activation(*bias, x2, weight.t())
             : bias ? at::addmm(*bias, x2, weight.t()) : at::mm(x2, weight.t());
  const int64_t glu_width = act == acn::kSwiglu ? weight.size(0) / 2 : 0;
  const bool kernel_stores_h = store_h && !gemm_epilogue;
  Tensor h = gemm_epilogue ? z : (store_h ? at::empty({x2.size(0), glu_width ? glu_width : z.size(1)}, z.options())
                                          : Tensor());
  if (y || !gemm_epilogue) {
    acn::activation_epilogue(x_dtype, y_dtype, z.data_ptr(), y ? y2.data_ptr() : nullptr,
                             kernel_stores_h ? h.data_ptr() : nullptr, y ? y_out.data_ptr() : nullptr,
                             z.numel() / (glu_width ? 2 : 1), gemm_epilogue ? acn::kIdentity : act, glu_width,
                             stream());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  std::vector<int64_t> shape(x.sizes().begin(), x.sizes().end()), z_shape = shape;
  shape.back() = glu_width ? glu_width : weight.size(0);
  z_shape.back() = weight.size(0);
  // act' reads z for gelu, gelu_tanh and silu, and for relu where h is not returned (relu's z, or its
  // h from the cuBLASLt epilogue: the same sign).
  const bool keep_z = needs_preactivation(act) || (act == acn::kRelu && !store_h);
  return {store_h ? h.view(shape) : at::empty({0}, x.options()), y ? y_out.view(shape) : at::empty({0}, x.options()),
          keep_z ? z.view(z_shape) : at::empty({0}, x.options())};
}

Tensor activation_backward(const OptionalTensor& dh, const OptionalTensor& dy_out, const OptionalTensor& saved,
                           std::string activation, at::ScalarType dtype) {
  const char* op = "acn_kernels_cuda::activation_backward";
  check_cuda(dh, op, "dh"), check_cuda(dy_out, op, "dy_out"), check_cuda(saved, op, "saved");
  TORCH_CHECK(dh || dy_out, op, ": needs dh or dy_out, got neither");
  const Tensor& like = dh ? *dh : *dy_out;
  const c10::cuda::CUDAGuard guard(like.device());
  const int act = activation_code(activation, op);
  Tensor dh_c = dh ? dh->to(dtype).contiguous() : Tensor(), dy_c = dy_out ? dy_out->contiguous() : Tensor();
  Tensor saved_c = saved ? saved->contiguous() : Tensor();
  const int64_t glu_width = act == acn::kSwiglu ? like.size(-1) : 0;  // dz and z are then twice as wide
  TORCH_CHECK(!glu_width || (saved && saved->size(-1) == 2 * glu_width), op, ": swiglu's saved z must have last "
              "dimension ", 2 * glu_width, " (the gate's and the up projection's)");
  Tensor dz = at::empty(glu_width ? saved->sizes() : like.sizes(), like.options().dtype(dtype));
  const acn::DType x_dtype = dtype_of(dz, op, "dtype");
  acn::activation_backward(x_dtype, dy_out ? dtype_of(*dy_out, op, "dy_out") : x_dtype, dh ? dh_c.data_ptr() : nullptr,
                           dy_out ? dy_c.data_ptr() : nullptr, saved ? saved_c.data_ptr() : nullptr, dz.data_ptr(),
                           like.numel(), act, glu_width, stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return dz;
}

void check_logit_rows(const Tensor& logits, const char* op) {
  TORCH_CHECK(logits.scalar_type() == at::kFloat && logits.dim() == 2 && logits.stride(1) == 1, op,
              ": logits must be float32 rows (rows, vocab) with unit column stride, got ", logits.scalar_type(),
              " of shape ", logits.sizes(), " and strides ", logits.strides());
}

// depth_cross_entropy's row work, in place on a chunk of float32 logits (rows, vocab) with unit column
// stride: (loss per row, lse per row); with needs_grad the logits become their gradient.
std::tuple<Tensor, Tensor> cross_entropy_rows(Tensor logits, const Tensor& targets, const Tensor& scale,
                                              int64_t ignore_index, double label_smoothing, double z_loss,
                                              double softcap, bool needs_grad) {
  const char* op = "acn_kernels_cuda::cross_entropy_rows";
  check_cuda(logits, op, "logits"), check_cuda(targets, op, "targets"), check_cuda(scale, op, "scale");
  const c10::cuda::CUDAGuard guard(logits.device());
  check_logit_rows(logits, op);
  const int64_t rows = logits.size(0);
  TORCH_CHECK(targets.numel() == rows && scale.numel() == rows, op, ": targets and scale must have ", rows,
              " elements (one a row), got ", targets.numel(), " and ", scale.numel());
  Tensor targets_c = targets.to(at::kLong).contiguous(), scale_c = float_row(scale);
  const auto stats = logits.options();
  Tensor loss = at::empty({rows}, stats), lse = at::empty({rows}, stats);
  acn::cross_entropy_rows(logits.data_ptr<float>(), logits.stride(0), targets_c.data_ptr<int64_t>(),
                          scale_c.data_ptr<float>(), loss.data_ptr<float>(), lse.data_ptr<float>(), rows,
                          static_cast<int>(logits.size(1)), ignore_index, static_cast<float>(label_smoothing),
                          static_cast<float>(z_loss), static_cast<float>(softcap), needs_grad, stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {loss, lse};
}

// The split pass (a vocabulary over ranks) on float32 logits (rows, vocab) with unit column stride, targets
// the column here or -1: (stats (rows, 5), argmax (rows,)) as kernels.h states them.
std::tuple<Tensor, Tensor> cross_entropy_statistics(const Tensor& logits, const Tensor& targets, double softcap) {
  const char* op = "acn_kernels_cuda::cross_entropy_statistics";
  check_cuda(logits, op, "logits"), check_cuda(targets, op, "targets");
  const c10::cuda::CUDAGuard guard(logits.device());
  check_logit_rows(logits, op);
  const int64_t rows = logits.size(0);
  TORCH_CHECK(targets.numel() == rows, op, ": targets must have ", rows, " elements (one a row), got ",
              targets.numel());
  Tensor targets_c = targets.to(at::kLong).contiguous();
  Tensor stats = at::empty({rows, 5}, logits.options()), argmax = at::empty({rows}, targets_c.options());
  acn::cross_entropy_statistics(logits.data_ptr<float>(), logits.stride(0), targets_c.data_ptr<int64_t>(),
                                stats.data_ptr<float>(), argmax.data_ptr<int64_t>(), rows,
                                static_cast<int>(logits.size(1)), static_cast<float>(softcap), stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {stats, argmax};
}

// The split pass's gradient, in place on the logits, from each row's scale and the whole vocabulary's lse.
void cross_entropy_gradient(Tensor logits, const Tensor& targets, const Tensor& scale, const Tensor& lse,
                            int64_t vocab_size, double label_smoothing, double z_loss, double softcap) {
  const char* op = "acn_kernels_cuda::cross_entropy_gradient";
  check_cuda(logits, op, "logits"), check_cuda(targets, op, "targets"), check_cuda(scale, op, "scale");
  check_cuda(lse, op, "lse");
  const c10::cuda::CUDAGuard guard(logits.device());
  check_logit_rows(logits, op);
  const int64_t rows = logits.size(0);
  TORCH_CHECK(targets.numel() == rows && scale.numel() == rows && lse.numel() == rows, op,
              ": targets, scale and lse must have ", rows, " elements (one a row), got ", targets.numel(), ", ",
              scale.numel(), " and ", lse.numel());
  Tensor targets_c = targets.to(at::kLong).contiguous(), scale_c = float_row(scale), lse_c = float_row(lse);
  acn::cross_entropy_gradient(logits.data_ptr<float>(), logits.stride(0), targets_c.data_ptr<int64_t>(),
                              scale_c.data_ptr<float>(), lse_c.data_ptr<float>(), rows,
                              static_cast<int>(logits.size(1)), static_cast<int>(vocab_size),
                              static_cast<float>(label_smoothing), static_cast<float>(z_loss),
                              static_cast<float>(softcap), stream());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

TORCH_LIBRARY(acn_kernels_cuda, m) {
  m.def("accumulate_norm_fwd(Tensor x, Tensor? y, Tensor weight, Tensor? bias, float eps, bool is_layernorm, "
        "bool normalize_sum) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("accumulate_norm_bwd(Tensor dout, Tensor? dy_out, Tensor normalized, Tensor weight, Tensor mean, "
        "Tensor rstd, bool has_bias, bool is_layernorm, ScalarType? dy_dtype) -> (Tensor, Tensor, Tensor)");
  m.def("hybrid_accumulate_norm_fwd(Tensor x, Tensor f, Tensor? y, Tensor gate, Tensor weight, Tensor? bias, "
        "Tensor? long_weight, float eps, bool is_layernorm) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("hybrid_accumulate_norm_bwd(Tensor dout, Tensor? dx_next, Tensor? dy_out, Tensor x, Tensor f, Tensor x_next, "
        "Tensor gate, Tensor weight, Tensor? long_weight, Tensor mean, Tensor rstd, bool has_bias, bool is_layernorm) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("probe_norm_fwd(Tensor xs, Tensor weight, Tensor? bias, float eps, bool is_layernorm) "
        "-> (Tensor, Tensor, Tensor)");
  m.def("probe_norm_bwd(Tensor dout, Tensor xs, Tensor weight, Tensor mean, Tensor rstd, bool has_bias, "
        "bool is_layernorm) -> (Tensor, Tensor)");
  m.def("linear_act_accumulate_fwd(Tensor x, Tensor weight, Tensor? bias, Tensor? y, str activation, "
        "bool store_h=True) -> (Tensor, Tensor, Tensor)");
  m.def("activation_backward(Tensor? dh, Tensor? dy_out, Tensor? saved, str activation, ScalarType dtype) -> Tensor");
  m.def("cross_entropy_rows(Tensor(a!) logits, Tensor targets, Tensor scale, int ignore_index, float label_smoothing, "
        "float z_loss, float softcap, bool needs_grad) -> (Tensor, Tensor)");
  m.def("cross_entropy_statistics(Tensor logits, Tensor targets, float softcap) -> (Tensor, Tensor)");
  m.def("cross_entropy_gradient(Tensor(a!) logits, Tensor targets, Tensor scale, Tensor lse, int vocab_size, "
        "float label_smoothing, float z_loss, float softcap) -> ()");
}

// CUDA runs the kernels; CPU gets the same functions, whose checks reject CPU tensors by name.
#define ACN_REGISTER(m)                                             \
  m.impl("accumulate_norm_fwd", &accumulate_norm_fwd);              \
  m.impl("accumulate_norm_bwd", &accumulate_norm_bwd);              \
  m.impl("hybrid_accumulate_norm_fwd", &hybrid_accumulate_norm_fwd);  \
  m.impl("hybrid_accumulate_norm_bwd", &hybrid_accumulate_norm_bwd);  \
  m.impl("probe_norm_fwd", &probe_norm_fwd);                        \
  m.impl("probe_norm_bwd", &probe_norm_bwd);                        \
  m.impl("linear_act_accumulate_fwd", &linear_act_accumulate_fwd);  \
  m.impl("activation_backward", &activation_backward);              \
  m.impl("cross_entropy_rows", &cross_entropy_rows);                \
  m.impl("cross_entropy_statistics", &cross_entropy_statistics);    \
  m.impl("cross_entropy_gradient", &cross_entropy_gradient);

TORCH_LIBRARY_IMPL(acn_kernels_cuda, CUDA, m) { ACN_REGISTER(m) }
TORCH_LIBRARY_IMPL(acn_kernels_cuda, CPU, m) { ACN_REGISTER(m) }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("compiled_archs", [] { return std::string(ACN_CUDA_ARCHS); }, "The SM architectures this build targets, comma-separated.");
}
