// accumulate_norm: y_out = y + x and out = norm(x or y_out), one block per row; the backward adds
// the gradient fan-out dy_out in the same pass. Math in row_math.h; see acn_kernels/ops/accumulate_norm.py.
//
// Rows that fit (up to kMaxPacks packs of VEC elements per thread, kMaxRowThreads threads: forward
// 8192 float32 or 16384 16-bit elements with 16-byte packs, backward 8192 of either) live in registers: every input element is
// read once from global memory, the statistics come from warp shuffles and one shared exchange, and
// the backward keeps its dweight/dbias partial sums in registers across all the rows a block walks,
// writing its partial row once. Wider rows take the *_wide kernels: three passes forward (sum,
// centered squares, output) and two backward, the re-reads hitting L1/L2, the partial row updated
// in place after the block zeroes it.
#include "device_utils.cuh"
#include "row_math.h"

namespace acn {
namespace {

constexpr int kMaxPacks = 4;
constexpr int kMaxRowThreads = 512;  // 128 registers a thread
// Row elements a thread holds: the forward keeps one value each, the backward about five (v_hat,
// dout, and the dweight/dbias sums): the most each allows without spilling (cuda-report).
constexpr int kFwdElements = 32;
constexpr int kBwdElements = 16;

// Column of pack p of this thread: packs interleave across the block, so a warp's accesses are
// contiguous.
template <int VEC>
__device__ __forceinline__ int pack_column(int p) { return (p * blockDim.x + threadIdx.x) * VEC; }

template <typename T, typename TY, int VEC, int PACKS>
__global__ void __launch_bounds__(kMaxRowThreads) accumulate_norm_fwd_kernel(const T* __restrict__ x, const TY* __restrict__ y,
                                           const float* __restrict__ w, const float* __restrict__ b,
                                           TY* __restrict__ y_out, T* __restrict__ out, float* __restrict__ mean_out,
                                           float* __restrict__ rstd_out, int dim, float eps, bool normalize_sum) {
  const int64_t base = static_cast<int64_t>(blockIdx.x) * dim;
  const bool is_layernorm = mean_out != nullptr;
  float v[PACKS][VEC];
  float row_sum = 0.0f;
#pragma unroll
  for (int p = 0; p < PACKS; ++p) {
    const int i = pack_column<VEC>(p);
    if (i >= dim) continue;
    load_floats<T, VEC>(x + base + i, v[p]);
    if (y != nullptr) {
      float s[VEC];
      load_floats<TY, VEC>(y + base + i, s);
#pragma unroll
      for (int j = 0; j < VEC; ++j) s[j] += v[p][j];
      store_floats<TY, VEC>(y_out + base + i, s);
      if (normalize_sum) {
#pragma unroll
        for (int j = 0; j < VEC; ++j) v[p][j] = to_float(from_float<TY>(s[j]));  // the sum as stored
      }
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) row_sum += v[p][j];
  }
  const float mean = is_layernorm ? block_sum(row_sum) / dim : 0.0f;
  float squares = 0.0f;
#pragma unroll
  for (int p = 0; p < PACKS; ++p) {
    if (pack_column<VEC>(p) >= dim) continue;
#pragma unroll
    for (int j = 0; j < VEC; ++j) squares += (v[p][j] - mean) * (v[p][j] - mean);
  }
  const float rstd = inverse_std(block_sum(squares) / dim, eps);
#pragma unroll
  for (int p = 0; p < PACKS; ++p) {
    const int i = pack_column<VEC>(p);
    if (i >= dim) continue;
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[p][j] = affine(normalize(v[p][j], mean, rstd), w[i + j], b ? b[i + j] : 0.0f);
    store_floats<T, VEC>(out + base + i, v[p]);
  }
  if (threadIdx.x == 0) {
    if (is_layernorm) mean_out[blockIdx.x] = mean;
    rstd_out[blockIdx.x] = rstd;
  }
}

template <typename T, typename TY, int VEC>
__global__ void accumulate_norm_fwd_wide_kernel(const T* __restrict__ x, const TY* __restrict__ y,
                                                const float* __restrict__ w, const float* __restrict__ b,
                                                TY* __restrict__ y_out, T* __restrict__ out,
                                                float* __restrict__ mean_out, float* __restrict__ rstd_out, int dim,
                                                float eps, bool normalize_sum) {
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

template <typename T, typename TY, typename TV, int VEC, int PACKS>
__global__ void __launch_bounds__(kMaxRowThreads) accumulate_norm_bwd_kernel(const T* __restrict__ dout, const TY* __restrict__ dy_out,
                                           const TV* __restrict__ normalized, const float* __restrict__ w,
                                           const float* __restrict__ mean_in, const float* __restrict__ rstd_in,
                                           T* __restrict__ dx, TY* __restrict__ dy, float* __restrict__ dw_partial,
                                           float* __restrict__ db_partial, int64_t rows, int dim) {
  const bool is_layernorm = mean_in != nullptr;
  float dw[PACKS][VEC] = {}, db[PACKS][VEC] = {};  // this block's partial sums, over every row it walks
  float v_hat[PACKS][VEC], d[PACKS][VEC];
  for (int64_t row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t base = row * dim;
    const float mean = is_layernorm ? mean_in[row] : 0.0f, rstd = rstd_in[row];
    float proj = 0.0f, wdout_sum = 0.0f;
#pragma unroll
    for (int p = 0; p < PACKS; ++p) {
      const int i = pack_column<VEC>(p);
      if (i >= dim) continue;
      load_floats<TV, VEC>(normalized + base + i, v_hat[p]);
      load_floats<T, VEC>(dout + base + i, d[p]);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        v_hat[p][j] = normalize(v_hat[p][j], mean, rstd);
        proj += w[i + j] * d[p][j] * v_hat[p][j];
        wdout_sum += w[i + j] * d[p][j];
      }
    }
    proj = block_sum(proj) / dim;
    const float wdout_mean = block_sum(wdout_sum) / dim;
#pragma unroll
    for (int p = 0; p < PACKS; ++p) {
      const int i = pack_column<VEC>(p);
      if (i >= dim) continue;
      float g[VEC];
      if (dy_out != nullptr) load_floats<TY, VEC>(dy_out + base + i, g);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float dv = norm_input_grad(w[i + j] * d[p][j], v_hat[p][j], rstd, proj, wdout_mean, is_layernorm);
        g[j] = dy_out != nullptr ? g[j] + dv : dv;
        dw[p][j] += d[p][j] * v_hat[p][j];
        db[p][j] += d[p][j];
      }
      store_floats<T, VEC>(dx + base + i, g);
      if (dy != nullptr) store_floats<TY, VEC>(dy + base + i, g);
    }
  }
  const int64_t partial = static_cast<int64_t>(blockIdx.x) * dim;
#pragma unroll
  for (int p = 0; p < PACKS; ++p) {
    const int i = pack_column<VEC>(p);
    if (i >= dim) continue;
    store_floats<float, VEC>(dw_partial + partial + i, dw[p]);
    if (db_partial != nullptr) store_floats<float, VEC>(db_partial + partial + i, db[p]);
  }
}

template <typename T, typename TY, typename TV, int VEC>
__global__ void accumulate_norm_bwd_wide_kernel(const T* __restrict__ dout, const TY* __restrict__ dy_out,
                                                const TV* __restrict__ normalized, const float* __restrict__ w,
                                                const float* __restrict__ mean_in, const float* __restrict__ rstd_in,
                                                T* __restrict__ dx, TY* __restrict__ dy,
                                                float* __restrict__ dw_partial, float* __restrict__ db_partial,
                                                int64_t rows, int dim) {
  const bool is_layernorm = mean_in != nullptr;
  float* dw_row = dw_partial + static_cast<int64_t>(blockIdx.x) * dim;
  float* db_row = db_partial ? db_partial + static_cast<int64_t>(blockIdx.x) * dim : nullptr;
  for (int i = threadIdx.x * VEC; i < dim; i += blockDim.x * VEC) {  // the columns this thread updates below
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      dw_row[i + j] = 0.0f;
      if (db_row != nullptr) db_row[i + j] = 0.0f;
    }
  }
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

// Packs per thread for a row of `groups` packs held in registers (1, 2 or 4, at most `most`), or 0:
// too wide.
int packs_per_thread(int groups, int most) {
  for (int packs = 1; packs <= kMaxPacks && packs <= most; packs *= 2)
    if (groups <= packs * kMaxRowThreads) return packs;
  return 0;
}

// Calls launch(vec, packs, threads) with compile-time pack width (16 bytes or 1 element) and packs
// per thread (0: the wide kernels; never more than ELEMENTS a thread), and the threads a block needs.
template <typename T, int ELEMENTS, typename Launch>
void with_row_shape(int dim, int vec, Launch&& launch) {
  const int groups = dim / vec, packs = packs_per_thread(groups, ELEMENTS / vec);
  const int threads = packs ? row_threads((groups + packs - 1) / packs) : row_threads(groups);
  auto by_packs = [&](auto v) {
    switch (packs) {
      case 1: launch(v, std::integral_constant<int, 1>{}, threads); break;
      case 2: launch(v, std::integral_constant<int, 2>{}, threads); break;
      case 4: launch(v, std::integral_constant<int, 4>{}, threads); break;
      default: launch(v, std::integral_constant<int, 0>{}, threads);
    }
  };
  if (vec > 1) by_packs(std::integral_constant<int, pack_of<T>()>{}); else by_packs(std::integral_constant<int, 1>{});
}

// A float32 y under a 16-bit x takes twice the bytes per element: the pack alignment holds for both.
template <typename T>
int pack_bytes(DType y_dtype) { return 16 * (y_dtype == DType::kFloat32 ? 4 / static_cast<int>(sizeof(T)) : 1); }

}  // namespace

void accumulate_norm_forward(DType x_dtype, DType y_dtype, const void* x, const void* y, const float* w,
                             const float* b, void* y_out, void* out, float* mean, float* rstd, int64_t rows,
                             int dim, float eps, bool normalize_sum, cudaStream_t stream) {
  if (rows == 0) return;
  ACN_DISPATCH_FLOAT(x_dtype, T, {
    auto with_y = [&](auto y_type) {
      using TY = decltype(y_type);
      with_row_shape<T, kFwdElements>(dim, pack_width<T>(dim, {x, y, y_out, out}, pack_bytes<T>(y_dtype)),
                                      [&](auto vec, auto packs, int threads) {
        constexpr int VEC = decltype(vec)::value, PACKS = decltype(packs)::value;
        if constexpr (PACKS == 0 || PACKS * VEC > kFwdElements) {
          ACN_LAUNCH(rows, threads, 0, stream, accumulate_norm_fwd_wide_kernel<T, TY, VEC>)(
              static_cast<const T*>(x), static_cast<const TY*>(y), w, b, static_cast<TY*>(y_out),
              static_cast<T*>(out), mean, rstd, dim, eps, normalize_sum);
        } else {
          ACN_LAUNCH(rows, threads, 0, stream, accumulate_norm_fwd_kernel<T, TY, VEC, PACKS>)(
              static_cast<const T*>(x), static_cast<const TY*>(y), w, b, static_cast<TY*>(y_out),
              static_cast<T*>(out), mean, rstd, dim, eps, normalize_sum);
        }
      });
    };
    if (y_dtype == x_dtype) with_y(T{}); else with_y(float{});
  });
}

void accumulate_norm_backward(DType x_dtype, DType y_dtype, const void* dout, const void* dy_out,
                              const void* normalized, bool v_is_y, const float* w, const float* mean,
                              const float* rstd, void* dx, void* dy, float* dw_partial, float* db_partial,
                              int64_t rows, int dim, int programs, cudaStream_t stream) {
  if (rows == 0) return;
  ACN_DISPATCH_FLOAT(x_dtype, T, {
    auto with_types = [&](auto y_type, auto v_type) {
      using TY = decltype(y_type);
      using TV = decltype(v_type);
      with_row_shape<T, kBwdElements>(dim, pack_width<T>(dim, {dout, dy_out, normalized, dx, dy},
                                                          pack_bytes<T>(y_dtype)),
                                      [&](auto vec, auto packs, int threads) {
        constexpr int VEC = decltype(vec)::value, PACKS = decltype(packs)::value;
        if constexpr (PACKS == 0 || PACKS * VEC > kBwdElements) {
          ACN_LAUNCH(programs, threads, 0, stream, accumulate_norm_bwd_wide_kernel<T, TY, TV, VEC>)(
              static_cast<const T*>(dout), static_cast<const TY*>(dy_out), static_cast<const TV*>(normalized), w,
              mean, rstd, static_cast<T*>(dx), static_cast<TY*>(dy), dw_partial, db_partial, rows, dim);
        } else {
          ACN_LAUNCH(programs, threads, 0, stream, accumulate_norm_bwd_kernel<T, TY, TV, VEC, PACKS>)(
              static_cast<const T*>(dout), static_cast<const TY*>(dy_out), static_cast<const TV*>(normalized), w,
              mean, rstd, static_cast<T*>(dx), static_cast<TY*>(dy), dw_partial, db_partial, rows, dim);
        }
      });
    };
    if (y_dtype == x_dtype) with_types(T{}, T{});
    else if (v_is_y) with_types(float{}, float{});
    else with_types(float{}, T{});
  });
}

}  // namespace acn
