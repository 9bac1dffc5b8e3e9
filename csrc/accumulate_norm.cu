// accumulate_norm: y_out = y + x and out = norm(x or y_out), one block per row; the backward adds
// the gradient fan-out dy_out in the same pass. Math in row_math.h; see acn_kernels/ops/accumulate_norm.py.
//
// A block walks its row in packs of VEC elements (16-byte accesses when the row allows), three
// passes forward (sum, centered squares, output) and two backward (row terms, gradient); the re-reads
// of a row hit L1/L2. dweight/dbias: each backward block owns a float32 partial row.
#include "device_utils.cuh"
#include "row_math.h"

namespace acn {
namespace {

template <typename T, typename TY, int VEC>
__global__ void accumulate_norm_fwd_kernel(const T* __restrict__ x, const TY* __restrict__ y,
                                           const float* __restrict__ w, const float* __restrict__ b,
                                           TY* __restrict__ y_out, T* __restrict__ out, float* __restrict__ mean_out,
                                           float* __restrict__ rstd_out, int dim, float eps, bool normalize_sum) {
  const int64_t base = static_cast<int64_t>(blockIdx.x) * dim;
  const bool is_layernorm = mean_out != nullptr;
  const bool sum_is_source = y != nullptr && normalize_sum;
  float v[VEC];
  float row_sum = 0.0f;
  for (int i = threadIdx.x * VEC; i < dim; i += blockDim.x * VEC) {
    load_floats<T, VEC>(x + base + i, v);
    if (y != nullptr) {
      float s[VEC];
      load_floats<TY, VEC>(y + base + i, s);
#pragma unroll
      for (int j = 0; j < VEC; ++j) s[j] += v[j];
      store_floats<TY, VEC>(y_out + base + i, s);
      if (sum_is_source) load_floats<TY, VEC>(y_out + base + i, v);  // the rounded sum, as stored
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) row_sum += v[j];
  }
  const float mean = is_layernorm ? block_sum(row_sum) / dim : 0.0f;
  float squares = 0.0f;
  for (int i = threadIdx.x * VEC; i < dim; i += blockDim.x * VEC) {
    if (sum_is_source) load_floats<TY, VEC>(y_out + base + i, v); else load_floats<T, VEC>(x + base + i, v);
#pragma unroll
    for (int j = 0; j < VEC; ++j) squares += (v[j] - mean) * (v[j] - mean);
  }
  const float rstd = inverse_std(block_sum(squares) / dim, eps);
  for (int i = threadIdx.x * VEC; i < dim; i += blockDim.x * VEC) {
    if (sum_is_source) load_floats<TY, VEC>(y_out + base + i, v); else load_floats<T, VEC>(x + base + i, v);
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[j] = affine(normalize(v[j], mean, rstd), w[i + j], b ? b[i + j] : 0.0f);
    store_floats<T, VEC>(out + base + i, v);
  }
  if (threadIdx.x == 0) {
    if (is_layernorm) mean_out[blockIdx.x] = mean;
    rstd_out[blockIdx.x] = rstd;
  }
}

template <typename T, typename TY, typename TV, int VEC>
__global__ void accumulate_norm_bwd_kernel(const T* __restrict__ dout, const TY* __restrict__ dy_out,
                                           const TV* __restrict__ normalized, const float* __restrict__ w,
                                           const float* __restrict__ mean_in, const float* __restrict__ rstd_in,
                                           T* __restrict__ dx, TY* __restrict__ dy, float* __restrict__ dw_partial,
                                           float* __restrict__ db_partial, int64_t rows, int dim) {
  const bool is_layernorm = mean_in != nullptr;
  float* dw_row = dw_partial + static_cast<int64_t>(blockIdx.x) * dim;
  float* db_row = db_partial ? db_partial + static_cast<int64_t>(blockIdx.x) * dim : nullptr;
  float v[VEC], d[VEC];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t base = row * dim;
    const float mean = is_layernorm ? mean_in[row] : 0.0f, rstd = rstd_in[row];
    float proj = 0.0f, wdout_sum = 0.0f;
    for (int i = threadIdx.x * VEC; i < dim; i += blockDim.x * VEC) {
      load_floats<TV, VEC>(normalized + base + i, v);
      load_floats<T, VEC>(dout + base + i, d);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        proj += w[i + j] * d[j] * normalize(v[j], mean, rstd);
        wdout_sum += w[i + j] * d[j];
      }
    }
    proj = block_sum(proj) / dim;
    const float wdout_mean = block_sum(wdout_sum) / dim;
    for (int i = threadIdx.x * VEC; i < dim; i += blockDim.x * VEC) {
      load_floats<TV, VEC>(normalized + base + i, v);
      load_floats<T, VEC>(dout + base + i, d);
      float g[VEC];
      if (dy_out != nullptr) load_floats<TY, VEC>(dy_out + base + i, g);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float v_hat = normalize(v[j], mean, rstd);
        const float dv = norm_input_grad(w[i + j] * d[j], v_hat, rstd, proj, wdout_mean, is_layernorm);
        g[j] = dy_out != nullptr ? g[j] + dv : dv;
        dw_row[i + j] += d[j] * v_hat;  // this thread owns column i + j of the block's partial row
        if (db_row != nullptr) db_row[i + j] += d[j];
      }
      store_floats<T, VEC>(dx + base + i, g);
      if (dy != nullptr) store_floats<TY, VEC>(dy + base + i, g);
    }
  }
}

template <typename T>
constexpr int pack_of() { return 16 / sizeof(T); }

// The widest pack every pointer and the row width allow: 16 bytes of the activation type, or 1.
template <typename T>
int pack_width(int dim, std::initializer_list<const void*> pointers, int bytes_per_pack) {
  if (dim % pack_of<T>() != 0) return 1;
  for (const void* p : pointers)
    if (!aligned(p, bytes_per_pack)) return 1;
  return pack_of<T>();
}

}  // namespace

void accumulate_norm_forward(DType x_dtype, DType y_dtype, const void* x, const void* y, const float* w,
                             const float* b, void* y_out, void* out, float* mean, float* rstd, int64_t rows,
                             int dim, float eps, bool normalize_sum, cudaStream_t stream) {
  if (rows == 0) return;
  ACN_DISPATCH_FLOAT(x_dtype, T, {
    auto launch = [&](auto y_type, auto vec) {
      using TY = decltype(y_type);
      constexpr int VEC = decltype(vec)::value;
      ACN_LAUNCH(rows, row_threads(dim / VEC), 0, stream, accumulate_norm_fwd_kernel<T, TY, VEC>)(
          static_cast<const T*>(x), static_cast<const TY*>(y), w, b, static_cast<TY*>(y_out),
          static_cast<T*>(out), mean, rstd, dim, eps, normalize_sum);
    };
    // A float32 y under a 16-bit x takes twice the bytes per element: align for both.
    const int vec = pack_width<T>(dim, {x, y, y_out, out}, 16 * (y_dtype == DType::kFloat32 ? 4 / sizeof(T) : 1));
    if (y_dtype == x_dtype) {
      if (vec > 1) launch(T{}, std::integral_constant<int, pack_of<T>()>{}); else launch(T{}, std::integral_constant<int, 1>{});
    } else {
      if (vec > 1) launch(float{}, std::integral_constant<int, pack_of<T>()>{}); else launch(float{}, std::integral_constant<int, 1>{});
    }
  });
}

void accumulate_norm_backward(DType x_dtype, DType y_dtype, const void* dout, const void* dy_out,
                              const void* normalized, bool v_is_y, const float* w, const float* mean,
                              const float* rstd, void* dx, void* dy, float* dw_partial, float* db_partial,
                              int64_t rows, int dim, int programs, cudaStream_t stream) {
  if (rows == 0) return;
  ACN_DISPATCH_FLOAT(x_dtype, T, {
    auto launch = [&](auto y_type, auto v_type, auto vec) {
      using TY = decltype(y_type);
      using TV = decltype(v_type);
      constexpr int VEC = decltype(vec)::value;
      ACN_LAUNCH(programs, row_threads(dim / VEC), 0, stream, accumulate_norm_bwd_kernel<T, TY, TV, VEC>)(
          static_cast<const T*>(dout), static_cast<const TY*>(dy_out), static_cast<const TV*>(normalized), w, mean,
          rstd, static_cast<T*>(dx), static_cast<TY*>(dy), dw_partial, db_partial, rows, dim);
    };
    const int vec = pack_width<T>(dim, {dout, dy_out, normalized, dx, dy},
                                  16 * (y_dtype == DType::kFloat32 ? 4 / sizeof(T) : 1));
    auto with_vec = [&](auto y_type, auto v_type) {
      if (vec > 1) launch(y_type, v_type, std::integral_constant<int, pack_of<T>()>{});
      else launch(y_type, v_type, std::integral_constant<int, 1>{});
    };
    if (y_dtype == x_dtype) with_vec(T{}, T{});
    else if (v_is_y) with_vec(float{}, float{});
    else with_vec(float{}, T{});
  });
}

}  // namespace acn
