// The row kernels of a block boundary, shared by accumulate_norm.cu and hybrid_accumulate_norm.cu: one
// block per row, y_out = y + x and out = norm(x or y_out); the backward adds the gradient fan-out dy_out
// in the same pass. kHybrid adds the hybrid boundary's gated short path: short_out = gate * short + x is
// the row normalized, the sum takes long_weight * x, and the backward gives dshort = gate * dtotal and
// dx = dtotal + long_weight * dy_out (dtotal = the norm's gradient + dshort_out) with the dgate and
// dlong_weight sums. Math in row_math.h; see acn_kernels/ops/accumulate_norm.py.
//
// Rows that fit (up to kMaxPacks packs of VEC elements per thread, kMaxRowThreads threads: forward
// 8192 float32 or 16384 16-bit elements with 16-byte packs, backward 8192 of either) live in registers:
// every input element is read once from global memory, the statistics come from warp shuffles and one
// shared exchange, and the backward keeps its partial sums in registers across all the rows a block
// walks, writing its partial row once. Wider rows take the *_wide kernels: three passes forward (sum,
// centered squares, output) and two backward, the re-reads hitting L1/L2, the partial row updated in
// place after the block zeroes it. Partial rows: (programs, partial_stride) floats, a block's dweight
// sums at column 0, dbias's at D, the hybrid's dgate and dlong_weight in the scalar columns after them.
#pragma once

#include <initializer_list>
#include <type_traits>

#include "device_utils.cuh"
#include "row_math.h"

namespace acn {

// The hybrid boundary's inputs beyond accumulate_norm's (all null there). Row pointers are (rows, D)
// contiguous, like x.
template <typename T>
struct ShortPath {
  const T* in;                // the short state
  T* out;                     // gate * in + x, the row normalized
  const float* gate;          // 0-dim
  const float* long_weight;   // 0-dim, or null: 1
};

template <typename T>
struct ShortGrads {
  const T* dshort_out;        // the gradient of short_out, or null
  const T* in;                // the forward's short state (dgate's other factor)
  const T* x;                 // the forward's x (dlong_weight's other factor, with a long weight)
  T* dshort;                  // gate * dtotal
  const float* gate;
  const float* long_weight;   // null: 1, and no dlong_weight
  float* scalars_partial;     // each block's dgate (and dlong_weight) sums, in its partial row
};

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

template <typename T>
__device__ __forceinline__ float gate_of(const ShortPath<T>& s) { return s.gate ? *s.gate : 0.0f; }
template <typename S>
__device__ __forceinline__ float long_weight_of(const S& s) { return s.long_weight ? *s.long_weight : 1.0f; }

// The input stage of one pack at element `at`: v holds x on entry and the value normalized on return,
// as stored (rounded). y_out = y + long_weight * x where there is a y or a long weight; under kHybrid
// short_out = gate * short + x is what is normalized, otherwise x or (normalize_sum) y_out.
template <typename T, typename TY, int VEC, bool kHybrid>
__device__ __forceinline__ void boundary_inputs(float (&v)[VEC], int64_t at, const TY* y, TY* y_out,
                                                bool normalize_sum, const ShortPath<T>& short_path, float gate,
                                                float long_weight) {
  if (y != nullptr || (kHybrid && short_path.long_weight != nullptr)) {
    float s[VEC] = {};
    if (y != nullptr) load_floats<TY, VEC>(y + at, s);
#pragma unroll
    for (int j = 0; j < VEC; ++j) s[j] += long_weight * v[j];
    store_floats<TY, VEC>(y_out + at, s);
    if (normalize_sum) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) v[j] = to_float(from_float<TY>(s[j]));  // the sum as stored
    }
  }
  if constexpr (kHybrid) {
    float s[VEC];
    load_floats<T, VEC>(short_path.in + at, s);
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[j] = to_float(from_float<T>(gate * s[j] + v[j]));
    store_floats<T, VEC>(short_path.out + at, v);
  }
}

template <typename T, typename TY, int VEC, int PACKS, bool kHybrid>
__global__ void __launch_bounds__(kMaxRowThreads) boundary_fwd_kernel(
    const T* __restrict__ x, const TY* __restrict__ y, const float* __restrict__ w, const float* __restrict__ b,
    TY* __restrict__ y_out, T* __restrict__ out, float* __restrict__ mean_out, float* __restrict__ rstd_out, int dim,
    float eps, bool normalize_sum, ShortPath<T> short_path) {
  const int64_t base = static_cast<int64_t>(blockIdx.x) * dim;
  const bool is_layernorm = mean_out != nullptr;
  const float gate = kHybrid ? gate_of(short_path) : 0.0f, long_weight = kHybrid ? long_weight_of(short_path) : 1.0f;
  float v[PACKS][VEC];
  float row_sum = 0.0f;
#pragma unroll
  for (int p = 0; p < PACKS; ++p) {
    const int i = pack_column<VEC>(p);
    if (i >= dim) continue;
    load_floats<T, VEC>(x + base + i, v[p]);
    boundary_inputs<T, TY, VEC, kHybrid>(v[p], base + i, y, y_out, normalize_sum, short_path, gate, long_weight);
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

// The values the wide forward normalizes, re-read after its first pass stored them: short_out, y_out or x.
template <typename T, typename TY, int VEC, bool kHybrid>
__device__ __forceinline__ void load_normalized(float (&v)[VEC], int64_t at, const T* x, const TY* y_out,
                                                bool sum_is_source, const ShortPath<T>& short_path) {
  if (kHybrid) load_floats<T, VEC>(short_path.out + at, v);
  else if (sum_is_source) load_floats<TY, VEC>(y_out + at, v);
  else load_floats<T, VEC>(x + at, v);
}

template <typename T, typename TY, int VEC, bool kHybrid>
__global__ void boundary_fwd_wide_kernel(const T* __restrict__ x, const TY* __restrict__ y,
                                         const float* __restrict__ w, const float* __restrict__ b,
                                         TY* __restrict__ y_out, T* __restrict__ out, float* __restrict__ mean_out,
                                         float* __restrict__ rstd_out, int dim, float eps, bool normalize_sum,
                                         ShortPath<T> short_path) {
  const int64_t base = static_cast<int64_t>(blockIdx.x) * dim;
  const bool is_layernorm = mean_out != nullptr;
  const bool sum_is_source = y != nullptr && normalize_sum;
  const float gate = kHybrid ? gate_of(short_path) : 0.0f, long_weight = kHybrid ? long_weight_of(short_path) : 1.0f;
  float v[VEC];
  float row_sum = 0.0f;
  for (int i = threadIdx.x * VEC; i < dim; i += blockDim.x * VEC) {
    load_floats<T, VEC>(x + base + i, v);
    boundary_inputs<T, TY, VEC, kHybrid>(v, base + i, y, y_out, normalize_sum, short_path, gate, long_weight);
#pragma unroll
    for (int j = 0; j < VEC; ++j) row_sum += v[j];
  }
  const float mean = is_layernorm ? block_sum(row_sum) / dim : 0.0f;
  float squares = 0.0f;
  for (int i = threadIdx.x * VEC; i < dim; i += blockDim.x * VEC) {  // this thread's own stores, read back
    load_normalized<T, TY, VEC, kHybrid>(v, base + i, x, y_out, sum_is_source, short_path);
#pragma unroll
    for (int j = 0; j < VEC; ++j) squares += (v[j] - mean) * (v[j] - mean);
  }
  const float rstd = inverse_std(block_sum(squares) / dim, eps);
  for (int i = threadIdx.x * VEC; i < dim; i += blockDim.x * VEC) {
    load_normalized<T, TY, VEC, kHybrid>(v, base + i, x, y_out, sum_is_source, short_path);
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[j] = affine(normalize(v[j], mean, rstd), w[i + j], b ? b[i + j] : 0.0f);
    store_floats<T, VEC>(out + base + i, v);
  }
  if (threadIdx.x == 0) {
    if (is_layernorm) mean_out[blockIdx.x] = mean;
    rstd_out[blockIdx.x] = rstd;
  }
}

// The input gradients of one pack at element `at`, g holding the norm's gradient on entry: dx (= g on
// return) and dy. accumulate_norm: dx = g + dy_out. kHybrid: dtotal = g + dshort_out, dshort = gate *
// dtotal, dx = dtotal + long_weight * dy_out. Returns the pack's dgate and dlong_weight terms.
template <typename T, typename TY, int VEC, bool kHybrid>
__device__ __forceinline__ float2 boundary_input_grads(float (&g)[VEC], int64_t at, const TY* dy_out,
                                                       const ShortGrads<T>& short_grads, float gate,
                                                       float long_weight) {
  float2 terms = make_float2(0.0f, 0.0f);
  float t[VEC];
  if constexpr (kHybrid) {
    if (short_grads.dshort_out != nullptr) {
      load_floats<T, VEC>(short_grads.dshort_out + at, t);
#pragma unroll
      for (int j = 0; j < VEC; ++j) g[j] += t[j];
    }
#pragma unroll
    for (int j = 0; j < VEC; ++j) t[j] = gate * g[j];
    store_floats<T, VEC>(short_grads.dshort + at, t);
    load_floats<T, VEC>(short_grads.in + at, t);
#pragma unroll
    for (int j = 0; j < VEC; ++j) terms.x += g[j] * t[j];
  }
  if (dy_out == nullptr) return terms;
  float d[VEC];
  load_floats<TY, VEC>(dy_out + at, d);
  if (kHybrid && short_grads.long_weight != nullptr) {
    load_floats<T, VEC>(short_grads.x + at, t);
#pragma unroll
    for (int j = 0; j < VEC; ++j) terms.y += d[j] * t[j];
  }
#pragma unroll
  for (int j = 0; j < VEC; ++j) g[j] += long_weight * d[j];
  return terms;
}

// boundary_input_grads, then the pack's dx (and dy, where the op writes it) stored and its dgate and
// dlong_weight terms added to the thread's sums.
template <typename T, typename TY, int VEC, bool kHybrid>
__device__ __forceinline__ void store_input_grads(float (&g)[VEC], int64_t at, const TY* dy_out,
                                                  const ShortGrads<T>& short_grads, float gate, float long_weight,
                                                  T* dx, TY* dy, float& dgate, float& dlong_weight) {
  const float2 terms = boundary_input_grads<T, TY, VEC, kHybrid>(g, at, dy_out, short_grads, gate, long_weight);
  dgate += terms.x;
  dlong_weight += terms.y;
  store_floats<T, VEC>(dx + at, g);
  if (dy != nullptr) store_floats<TY, VEC>(dy + at, g);
}

// The hybrid's dgate and dlong_weight sums of this block, after its dweight and dbias partial sums.
template <typename T>
__device__ __forceinline__ void store_scalar_partials(const ShortGrads<T>& short_grads, float dgate,
                                                      float dlong_weight, int64_t partial_stride) {
  dgate = block_sum(dgate);
  dlong_weight = block_sum(dlong_weight);
  if (threadIdx.x != 0) return;
  float* row = short_grads.scalars_partial + static_cast<int64_t>(blockIdx.x) * partial_stride;
  row[0] = dgate;
  if (short_grads.long_weight != nullptr) row[1] = dlong_weight;
}

// At least one block per SM, not more: left to its sm_90 heuristics, ptxas squeezes the scalar-path
// hybrid instances to 32 registers (four blocks an SM) and spills.
template <typename T, typename TY, typename TV, int VEC, int PACKS, bool kHybrid>
__global__ void __launch_bounds__(kMaxRowThreads, 1) boundary_bwd_kernel(
    const T* __restrict__ dout, const TY* __restrict__ dy_out, const TV* __restrict__ normalized,
    const float* __restrict__ w, const float* __restrict__ mean_in, const float* __restrict__ rstd_in,
    T* __restrict__ dx, TY* __restrict__ dy, float* __restrict__ dw_partial, float* __restrict__ db_partial,
    int64_t partial_stride, int64_t rows, int dim, ShortGrads<T> short_grads) {
  const bool is_layernorm = mean_in != nullptr;
  const float gate = kHybrid ? *short_grads.gate : 0.0f;
  const float long_weight = kHybrid ? long_weight_of(short_grads) : 1.0f;
  float dw[PACKS][VEC] = {}, db[PACKS][VEC] = {};  // this block's partial sums, over every row it walks
  float dgate = 0.0f, dlong_weight = 0.0f;
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
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        g[j] = norm_input_grad(w[i + j] * d[p][j], v_hat[p][j], rstd, proj, wdout_mean, is_layernorm);
        dw[p][j] += d[p][j] * v_hat[p][j];
        db[p][j] += d[p][j];
      }
      store_input_grads<T, TY, VEC, kHybrid>(g, base + i, dy_out, short_grads, gate, long_weight, dx, dy, dgate,
                                             dlong_weight);
    }
  }
  const int64_t partial = static_cast<int64_t>(blockIdx.x) * partial_stride;
#pragma unroll
  for (int p = 0; p < PACKS; ++p) {
    const int i = pack_column<VEC>(p);
    if (i >= dim) continue;
    store_floats<float, VEC>(dw_partial + partial + i, dw[p]);
    if (db_partial != nullptr) store_floats<float, VEC>(db_partial + partial + i, db[p]);
  }
  if constexpr (kHybrid) store_scalar_partials(short_grads, dgate, dlong_weight, partial_stride);
}

template <typename T, typename TY, typename TV, int VEC, bool kHybrid>
__global__ void boundary_bwd_wide_kernel(const T* __restrict__ dout, const TY* __restrict__ dy_out,
                                         const TV* __restrict__ normalized, const float* __restrict__ w,
                                         const float* __restrict__ mean_in, const float* __restrict__ rstd_in,
                                         T* __restrict__ dx, TY* __restrict__ dy, float* __restrict__ dw_partial,
                                         float* __restrict__ db_partial, int64_t partial_stride, int64_t rows,
                                         int dim, ShortGrads<T> short_grads) {
  const bool is_layernorm = mean_in != nullptr;
  const float gate = kHybrid ? *short_grads.gate : 0.0f;
  const float long_weight = kHybrid ? long_weight_of(short_grads) : 1.0f;
  float* dw_row = dw_partial + static_cast<int64_t>(blockIdx.x) * partial_stride;
  float* db_row = db_partial ? db_partial + static_cast<int64_t>(blockIdx.x) * partial_stride : nullptr;
  for (int i = threadIdx.x * VEC; i < dim; i += blockDim.x * VEC) {  // the columns this thread updates below
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      dw_row[i + j] = 0.0f;
      if (db_row != nullptr) db_row[i + j] = 0.0f;
    }
  }
  float dgate = 0.0f, dlong_weight = 0.0f;
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
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float v_hat = normalize(v[j], mean, rstd);
        g[j] = norm_input_grad(w[i + j] * d[j], v_hat, rstd, proj, wdout_mean, is_layernorm);
        dw_row[i + j] += d[j] * v_hat;  // this thread owns column i + j of the block's partial row
        if (db_row != nullptr) db_row[i + j] += d[j];
      }
      store_input_grads<T, TY, VEC, kHybrid>(g, base + i, dy_out, short_grads, gate, long_weight, dx, dy, dgate,
                                             dlong_weight);
    }
  }
  if constexpr (kHybrid) store_scalar_partials(short_grads, dgate, dlong_weight, partial_stride);
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
inline int packs_per_thread(int groups, int most) {
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

// The forward launch of either boundary: the register or wide kernel for the row width and alignment.
template <bool kHybrid, typename T>
void launch_boundary_forward(DType y_dtype, const T* x, const void* y, const float* w, const float* b, void* y_out,
                             T* out, float* mean, float* rstd, int64_t rows, int dim, float eps, bool normalize_sum,
                             ShortPath<T> short_path, cudaStream_t stream) {
  auto with_y = [&](auto y_type) {
    using TY = decltype(y_type);
    const int vec = pack_width<T>(dim, {x, y, y_out, out, short_path.in, short_path.out}, pack_bytes<T>(y_dtype));
    with_row_shape<T, kFwdElements>(dim, vec, [&](auto v, auto packs, int threads) {
      constexpr int VEC = decltype(v)::value, PACKS = decltype(packs)::value;
      if constexpr (PACKS == 0 || PACKS * VEC > kFwdElements) {
        ACN_LAUNCH(rows, threads, 0, stream, boundary_fwd_wide_kernel<T, TY, VEC, kHybrid>)(
            x, static_cast<const TY*>(y), w, b, static_cast<TY*>(y_out), out, mean, rstd, dim, eps, normalize_sum,
            short_path);
      } else {
        ACN_LAUNCH(rows, threads, 0, stream, boundary_fwd_kernel<T, TY, VEC, PACKS, kHybrid>)(
            x, static_cast<const TY*>(y), w, b, static_cast<TY*>(y_out), out, mean, rstd, dim, eps, normalize_sum,
            short_path);
      }
    });
  };
  if (y_dtype == DType::kFloat32 && !std::is_same<T, float>::value) with_y(float{}); else with_y(T{});
}

// The backward launch of either boundary; `normalized` has y's dtype when v_is_y (normalize_sum).
template <bool kHybrid, typename T>
void launch_boundary_backward(DType y_dtype, const T* dout, const void* dy_out, const void* normalized, bool v_is_y,
                              const float* w, const float* mean, const float* rstd, T* dx, void* dy,
                              float* dw_partial, float* db_partial, int64_t partial_stride, int64_t rows, int dim,
                              int programs, ShortGrads<T> short_grads, cudaStream_t stream) {
  auto with_types = [&](auto y_type, auto v_type) {
    using TY = decltype(y_type);
    using TV = decltype(v_type);
    const int vec = pack_width<T>(dim, {dout, dy_out, normalized, dx, dy, short_grads.dshort_out, short_grads.in,
                                        short_grads.x, short_grads.dshort}, pack_bytes<T>(y_dtype));
    with_row_shape<T, kBwdElements>(dim, vec, [&](auto v, auto packs, int threads) {
      constexpr int VEC = decltype(v)::value, PACKS = decltype(packs)::value;
      if constexpr (PACKS == 0 || PACKS * VEC > kBwdElements) {
        ACN_LAUNCH(programs, threads, 0, stream, boundary_bwd_wide_kernel<T, TY, TV, VEC, kHybrid>)(
            dout, static_cast<const TY*>(dy_out), static_cast<const TV*>(normalized), w, mean, rstd, dx,
            static_cast<TY*>(dy), dw_partial, db_partial, partial_stride, rows, dim, short_grads);
      } else {
        ACN_LAUNCH(programs, threads, 0, stream, boundary_bwd_kernel<T, TY, TV, VEC, PACKS, kHybrid>)(
            dout, static_cast<const TY*>(dy_out), static_cast<const TV*>(normalized), w, mean, rstd, dx,
            static_cast<TY*>(dy), dw_partial, db_partial, partial_stride, rows, dim, short_grads);
      }
    });
  };
  const bool y_is_float = y_dtype == DType::kFloat32 && !std::is_same<T, float>::value;
  if (!y_is_float) with_types(T{}, T{});
  else if (v_is_y) with_types(float{}, float{});
  else with_types(float{}, T{});
}

}  // namespace
}  // namespace acn
