// depth_cross_entropy: the row work of the chunked multi-exit cross-entropy (acn_kernels/ops/
// depth_cross_entropy.py) on one chunk of float32 logits that cuBLAS wrote: per row, the capped
// logits' log-sum-exp, the target logit, the mean logit and the loss; with needs_grad, the gradient of
// scale x loss with respect to the raw logits, written over them. Math in row_math.h.
//
// A block per row. The first walk keeps each thread's running max and exp-sum (online, a pack at a
// time), merged by a block max and a block sum; the second walk re-reads the row (from L2: a GPT-2
// row is 201 KB) and writes the gradient. Bytes per logit: 4 read, or 8 read and 4 written with the
// gradient; 16-byte packs where the rows allow them (vocab and stride multiples of 4, aligned).
#include "device_utils.cuh"
#include "row_math.h"

namespace acn {
namespace {

constexpr int kMaxThreads = 1024;

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
  float running_max = -INFINITY, exp_sum = 0.0f, total = 0.0f;
  for (int i = threadIdx.x * N; i < vocab; i += blockDim.x * N) {
    float c[N];
    load_floats<float, N>(row + i, c);
    float pack_max = -INFINITY;
#pragma unroll
    for (int j = 0; j < N; ++j) {
      c[j] = capped_logit(c[j], softcap);
      pack_max = fmaxf(pack_max, c[j]);
      total += c[j];
    }
    const float new_max = fmaxf(running_max, pack_max);
    exp_sum *= expf(running_max - new_max);
#pragma unroll
    for (int j = 0; j < N; ++j) exp_sum += expf(c[j] - new_max);
    running_max = new_max;
  }
  const float row_max = block_max(running_max);  // finite: vocab >= 1
  const float lse = row_max + logf(block_sum(exp_sum * expf(running_max - row_max)));  // idle threads add 0
  const float mean_logit = label_smoothing > 0.0f ? block_sum(total) / vocab : 0.0f;
  if (threadIdx.x == 0) {
    loss[blockIdx.x] = counted ? cross_entropy_loss(lse, target_logit, mean_logit, label_smoothing, z_loss) : 0.0f;
    lse_out[blockIdx.x] = lse;
  }
  if (!needs_grad) return;
  const float row_scale = counted ? scale[blockIdx.x] : 0.0f;
  for (int i = threadIdx.x * N; i < vocab; i += blockDim.x * N) {
    float g[N];
    load_floats<float, N>(row + i, g);
#pragma unroll
    for (int j = 0; j < N; ++j)
      g[j] = row_scale * cross_entropy_logit_grad(capped_logit(g[j], softcap), i + j == target, lse, vocab,
                                                  label_smoothing, z_loss, softcap);
    store_floats<float, N>(row + i, g);
  }
}

}  // namespace

void cross_entropy_rows(float* logits, int64_t stride, const int64_t* targets, const float* scale, float* loss,
                        float* lse, int64_t rows, int vocab, int64_t ignore_index, float label_smoothing, float z_loss,
                        float softcap, bool needs_grad, cudaStream_t stream) {
  if (rows == 0) return;
  const bool packed = vocab % 4 == 0 && stride % 4 == 0 && aligned(logits, 16);
  const int per_thread = packed ? 4 : 1;
  const int threads = row_threads((vocab + per_thread - 1) / per_thread);
  if (packed)
    ACN_LAUNCH(rows, threads, 0, stream, cross_entropy_rows_kernel<4>)(
        logits, stride, targets, scale, loss, lse, vocab, ignore_index, label_smoothing, z_loss, softcap, needs_grad);
  else
    ACN_LAUNCH(rows, threads, 0, stream, cross_entropy_rows_kernel<1>)(
        logits, stride, targets, scale, loss, lse, vocab, ignore_index, label_smoothing, z_loss, softcap, needs_grad);
}

}  // namespace acn
