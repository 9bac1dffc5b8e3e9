// depth_cross_entropy: the row work of the chunked multi-exit cross-entropy (acn_kernels/ops/
// depth_cross_entropy.py) on one chunk of float32 logits that cuBLAS wrote. Math in row_math.h.
//
// The fused pass (cross_entropy_rows, one process): per row, the capped logits' log-sum-exp, the
// target logit, the mean logit and the loss; with needs_grad, the gradient of scale x loss with
// respect to the raw logits, written over them. The split pass (a vocabulary split over ranks):
// cross_entropy_statistics reads a row once for its maximum, exp-sum, entropy sum, target logit, sum
// and first argmax, which the ranks combine; cross_entropy_gradient then writes the gradient from the
// whole vocabulary's lse.
//
// A block per row. A walk keeps each thread's running max and exp-sum (online, a pack at a time; with
// the statistics also its entropy sum and first maximum's column), merged by block reductions; the
// gradient walk re-reads the row (from L2: a GPT-2 row is 201 KB) and writes it. Bytes per logit: 4
// read for the loss or the statistics, 4 read and 4 written for the split gradient, 8 read and 4
// written for the fused pass with the gradient; 16-byte packs where the rows allow them (vocab and
// stride multiples of 4, aligned).
#include <type_traits>

#include "device_utils.cuh"
#include "row_math.h"

namespace acn {
namespace {

constexpr int kMaxThreads = 1024;

// One thread's share of a row's capped logits: max m, sum exp(c - m), sum c and, where kStatistics,
// sum exp(c - m)(c - m) (the entropy's) and the column of its first maximum.
struct RowShare {
  float max = -INFINITY, exp_sum = 0.0f, total = 0.0f, entropy = 0.0f;
  int best = 0;
};

template <int N, bool kStatistics>
__device__ __forceinline__ RowShare walk_row(const float* row, int vocab, float softcap) {
  RowShare s;
  for (int i = threadIdx.x * N; i < vocab; i += blockDim.x * N) {
    float c[N];
    load_floats<float, N>(row + i, c);
    float pack_max = -INFINITY;
    int pack_best = i;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      c[j] = capped_logit(c[j], softcap);
      if (kStatistics && c[j] > pack_max) pack_best = i + j;
      pack_max = fmaxf(pack_max, c[j]);
      s.total += c[j];
    }
    const float new_max = fmaxf(s.max, pack_max);
    const float rescale = expf(s.max - new_max);
    if (kStatistics) {  // where nothing is summed yet, (m_old - m_new) x 0 would be -inf x 0
      s.entropy = rescale * (s.entropy + (s.exp_sum > 0.0f ? (s.max - new_max) * s.exp_sum : 0.0f));
      if (pack_max > s.max) s.best = pack_best;
    }
    s.exp_sum *= rescale;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const float e = expf(c[j] - new_max);
      s.exp_sum += e;
      if (kStatistics) s.entropy += e * (c[j] - new_max);
    }
    s.max = new_max;
  }
  return s;
}

// The row's gradient written over its logits: scale x d loss / d raw logit, the target's column
// `target` (none where -1 or ignored), lse and the smoothing over the whole vocabulary of vocab_size.
template <int N>
__device__ __forceinline__ void write_row_gradient(float* row, int vocab, int64_t target, float lse, float scale,
                                                   int vocab_size, float label_smoothing, float z_loss,
                                                   float softcap) {
  for (int i = threadIdx.x * N; i < vocab; i += blockDim.x * N) {
    float g[N];
    load_floats<float, N>(row + i, g);
#pragma unroll
    for (int j = 0; j < N; ++j)
      g[j] = scale * cross_entropy_logit_grad(capped_logit(g[j], softcap), i + j == target, lse, vocab_size,
                                              label_smoothing, z_loss, softcap);
    store_floats<float, N>(row + i, g);
  }
}

template <int N>
__global__ void __launch_bounds__(kMaxThreads) cross_entropy_rows_kernel(
    float* __restrict__ logits, int64_t stride, const int64_t* __restrict__ targets, const float* __restrict__ scale,
    float* __restrict__ loss, float* __restrict__ lse_out, int vocab, int64_t ignore_index, float label_smoothing,
    float z_loss, float softcap, bool needs_grad) {
  float* row = logits + static_cast<int64_t>(blockIdx.x) * stride;
  const int64_t target = targets[blockIdx.x];
  const bool counted = target != ignore_index;
  // read before the block reductions' barriers, so before any thread overwrites it with its gradient
  const float target_logit = counted ? capped_logit(row[target], softcap) : 0.0f;
  const RowShare s = walk_row<N, false>(row, vocab, softcap);
  const float row_max = block_max(s.max);  // finite: vocab >= 1
  const float lse = row_max + logf(block_sum(s.exp_sum * expf(s.max - row_max)));  // idle threads add 0
  const float mean_logit = label_smoothing > 0.0f ? block_sum(s.total) / vocab : 0.0f;
  if (threadIdx.x == 0) {
    loss[blockIdx.x] = counted ? cross_entropy_loss(lse, target_logit, mean_logit, label_smoothing, z_loss) : 0.0f;
    lse_out[blockIdx.x] = lse;
  }
  if (needs_grad)
    write_row_gradient<N>(row, vocab, target, lse, counted ? scale[blockIdx.x] : 0.0f, vocab, label_smoothing, z_loss,
                          softcap);
}

template <int N>
__global__ void __launch_bounds__(kMaxThreads) cross_entropy_statistics_kernel(
    const float* __restrict__ logits, int64_t stride, const int64_t* __restrict__ targets, float* __restrict__ stats,
    int64_t* __restrict__ argmax, int vocab, float softcap) {
  const float* row = logits + static_cast<int64_t>(blockIdx.x) * stride;
  const int64_t target = targets[blockIdx.x];  // -1: not among these columns
  const RowShare s = walk_row<N, true>(row, vocab, softcap);
  const float row_max = block_max(s.max);
  const bool summed = s.exp_sum > 0.0f;  // an idle thread's max is -inf: its terms are none, not NaN
  const float rescale = summed ? expf(s.max - row_max) : 0.0f;
  const float exp_sum = block_sum(s.exp_sum * rescale);
  const float entropy = block_sum(summed ? rescale * (s.entropy + (s.max - row_max) * s.exp_sum) : 0.0f);
  const float total = block_sum(s.total);
  // the lowest column holding the maximum, as torch.argmax picks it (columns < 2^24: exact in float)
  const float best = block_min(summed && s.max == row_max ? static_cast<float>(s.best) : INFINITY);
  if (threadIdx.x == 0) {
    float* out = stats + static_cast<int64_t>(blockIdx.x) * 5;
    out[0] = row_max, out[1] = exp_sum, out[2] = entropy;
    out[3] = target >= 0 ? capped_logit(row[target], softcap) : 0.0f;
    out[4] = total;
    argmax[blockIdx.x] = static_cast<int64_t>(best);
  }
}

template <int N>
__global__ void __launch_bounds__(kMaxThreads) cross_entropy_gradient_kernel(
    float* __restrict__ logits, int64_t stride, const int64_t* __restrict__ targets, const float* __restrict__ scale,
    const float* __restrict__ lse, int vocab, int vocab_size, float label_smoothing, float z_loss, float softcap) {
  write_row_gradient<N>(logits + static_cast<int64_t>(blockIdx.x) * stride, vocab, targets[blockIdx.x],
                        lse[blockIdx.x], scale[blockIdx.x], vocab_size, label_smoothing, z_loss, softcap);
}

// launch(pack, threads) with pack std::integral_constant<int, 4> where the rows allow 16-byte packs,
// else <int, 1>, and the threads a row of those packs takes.
template <typename Launch>
void launch_rows(const float* logits, int64_t stride, int vocab, Launch launch) {
  if (vocab % 4 == 0 && stride % 4 == 0 && aligned(logits, 16))
    launch(std::integral_constant<int, 4>(), row_threads(vocab / 4));
  else
    launch(std::integral_constant<int, 1>(), row_threads(vocab));
}

}  // namespace

void cross_entropy_rows(float* logits, int64_t stride, const int64_t* targets, const float* scale, float* loss,
                        float* lse, int64_t rows, int vocab, int64_t ignore_index, float label_smoothing, float z_loss,
                        float softcap, bool needs_grad, cudaStream_t stream) {
  if (rows == 0) return;
  launch_rows(logits, stride, vocab, [&](auto pack, int threads) {
    ACN_LAUNCH(rows, threads, 0, stream, cross_entropy_rows_kernel<decltype(pack)::value>)(
        logits, stride, targets, scale, loss, lse, vocab, ignore_index, label_smoothing, z_loss, softcap, needs_grad);
  });
}

void cross_entropy_statistics(const float* logits, int64_t stride, const int64_t* targets, float* stats,
                              int64_t* argmax, int64_t rows, int vocab, float softcap, cudaStream_t stream) {
  if (rows == 0) return;
  launch_rows(logits, stride, vocab, [&](auto pack, int threads) {
    ACN_LAUNCH(rows, threads, 0, stream, cross_entropy_statistics_kernel<decltype(pack)::value>)(
        logits, stride, targets, stats, argmax, vocab, softcap);
  });
}

void cross_entropy_gradient(float* logits, int64_t stride, const int64_t* targets, const float* scale,
                            const float* lse, int64_t rows, int vocab, int vocab_size, float label_smoothing,
                            float z_loss, float softcap, cudaStream_t stream) {
  if (rows == 0) return;
  launch_rows(logits, stride, vocab, [&](auto pack, int threads) {
    ACN_LAUNCH(rows, threads, 0, stream, cross_entropy_gradient_kernel<decltype(pack)::value>)(
        logits, stride, targets, scale, lse, vocab, vocab_size, label_smoothing, z_loss, softcap);
  });
}

}  // namespace acn
