// The arithmetic of one row, shared by the CUDA kernels and the host harness that tests it on the
// CPU against the Python reference. Free of CUDA and torch headers.
#pragma once

#include <cmath>

#ifdef __CUDACC__
#define ACN_HD __host__ __device__ __forceinline__
#else
#define ACN_HD inline
#endif

namespace acn {

// Activation codes, in the order of acn_kernels.reference.ACTIVATIONS. kSwiglu pairs two values of z
// (its gate and up halves) per output: see swiglu and swiglu_grads.
enum Activation : int { kRelu = 0, kGelu = 1, kGeluTanh = 2, kSilu = 3, kIdentity = 4, kSwiglu = 5 };

constexpr float kSqrtHalf = 0.7071067811865476f;
constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kGeluTanhCubic = 0.044715f;
constexpr float kInvSqrt2Pi = 0.3989422804014327f;

// 1 / sqrt(variance + eps), with variance the mean of the centered squares (the mean of squares
// for RMSNorm).
ACN_HD float inverse_std(float mean_of_squares, float eps) { return 1.0f / sqrtf(mean_of_squares + eps); }

ACN_HD float normalize(float v, float mean, float rstd) { return (v - mean) * rstd; }

// A running sum as hi + lo: TwoSum keeps each float32 add's rounding error in lo, so hi + lo follows
// the exact sum of every term added (or subtracted) to about 2^-48 of their size. A sum rebuilt by
// subtraction then rounds to the sum built by addition, however much its terms cancel.
ACN_HD void add_compensated(float& hi, float& lo, float x) {
  const float s = hi + x, b = s - hi;
  lo += (hi - (s - b)) + (x - b);
  hi = s;
}

ACN_HD float affine(float v_hat, float w, float b) { return v_hat * w + b; }

// dLoss/dv of one element of out = v_hat * w + b, given the two row terms
// proj = mean(w * dout * v_hat) and wdout_mean = mean(w * dout) (unused for RMSNorm).
ACN_HD float norm_input_grad(float wdout, float v_hat, float rstd, float proj, float wdout_mean,
                             bool is_layernorm) {
  float dv = wdout - v_hat * proj;
  if (is_layernorm) dv -= wdout_mean;
  return dv * rstd;
}

ACN_HD float sigmoid(float z) { return 1.0f / (1.0f + expf(-z)); }

ACN_HD float activation(float z, int act) {
  switch (act) {
    case kRelu: return z > 0.0f ? z : 0.0f;
    case kGelu: return 0.5f * z * (1.0f + erff(z * kSqrtHalf));
    case kGeluTanh: return 0.5f * z * (1.0f + tanhf(kSqrt2OverPi * (z + kGeluTanhCubic * z * z * z)));
    case kSilu: return z * sigmoid(z);
    default: return z;
  }
}

// act'(z) from what the forward keeps: z itself, or h for relu (h > 0 exactly where z > 0).
ACN_HD float activation_grad(float saved, int act) {
  switch (act) {
    case kRelu: return saved > 0.0f ? 1.0f : 0.0f;
    case kGelu:
      return 0.5f * (1.0f + erff(saved * kSqrtHalf)) + saved * kInvSqrt2Pi * expf(-0.5f * saved * saved);
    case kGeluTanh: {
      float t = tanhf(kSqrt2OverPi * (saved + kGeluTanhCubic * saved * saved * saved));
      return 0.5f * (1.0f + t) +
             0.5f * saved * (1.0f - t * t) * kSqrt2OverPi * (1.0f + 3.0f * kGeluTanhCubic * saved * saved);
    }
    case kSilu: {
      float s = sigmoid(saved);
      return s * (1.0f + saved * (1.0f - s));
    }
    default: return 1.0f;
  }
}

ACN_HD float swiglu(float gate, float up) { return gate * sigmoid(gate) * up; }

// The gradients of h = silu(gate) * up, given dh.
ACN_HD void swiglu_grads(float dh, float gate, float up, float& dgate, float& dup) {
  const float s = sigmoid(gate);
  dgate = dh * up * s * (1.0f + gate * (1.0f - s));
  dup = dh * gate * s;
}

// Cross-entropy over one row of logits (depth_cross_entropy.cu): a logit capped as Gemma 2 caps them
// (softcap 0: no cap), the row's loss from its log-sum-exp, target logit and mean logit (label
// smoothing s, z-loss weight z), and the loss's gradient with respect to a raw logit, from its capped
// value c: (p (1 + 2 z lse) - (1 - s) [target] - s / V) (1 - (c / softcap)^2), p = exp(c - lse).
ACN_HD float capped_logit(float raw, float softcap) { return softcap > 0.0f ? softcap * tanhf(raw / softcap) : raw; }

ACN_HD float cross_entropy_loss(float lse, float target_logit, float mean_logit, float label_smoothing,
                                float z_loss) {
  return (1.0f - label_smoothing) * (lse - target_logit) + label_smoothing * (lse - mean_logit) + z_loss * lse * lse;
}

ACN_HD float cross_entropy_logit_grad(float c, bool is_target, float lse, int vocab, float label_smoothing,
                                      float z_loss, float softcap) {
  // p - onehot first, then z-loss's p 2 z lse: p (1 + 2 z lse) - 1 would cancel where p is near 1
  const float p = expf(c - lse);
  float g = p - label_smoothing / vocab - (is_target ? 1.0f - label_smoothing : 0.0f) + p * (2.0f * z_loss * lse);
  if (softcap > 0.0f) {
    const float unit = c / softcap;
    g *= 1.0f - unit * unit;
  }
  return g;
}

}  // namespace acn
