// The row math of row_math.h run serially on the CPU, for tests/test_cuda_row_math.py (ctypes).
// Rows are float32, contiguous; the reductions follow the kernels: the mean first, then the
// centered squares, then the output.
#include "row_math.h"

extern "C" {

void acn_norm_forward_rows(const float* v, const float* w, const float* b, int rows, int dim, float eps,
                           int is_layernorm, float* out, float* mean, float* rstd) {
  for (int r = 0; r < rows; ++r) {
    const float* row = v + static_cast<long>(r) * dim;
    float m = 0.0f;
    if (is_layernorm) {
      for (int i = 0; i < dim; ++i) m += row[i];
      m /= dim;
    }
    float squares = 0.0f;
    for (int i = 0; i < dim; ++i) squares += (row[i] - m) * (row[i] - m);
    float s = acn::inverse_std(squares / dim, eps);
    for (int i = 0; i < dim; ++i)
      out[static_cast<long>(r) * dim + i] = acn::affine(acn::normalize(row[i], m, s), w[i], b ? b[i] : 0.0f);
    mean[r] = m;
    rstd[r] = s;
  }
}

void acn_norm_backward_rows(const float* dout, const float* v, const float* w, const float* mean,
                            const float* rstd, int rows, int dim, int is_layernorm, float* dv, float* dw,
                            float* db) {
  for (int i = 0; i < dim; ++i) dw[i] = db[i] = 0.0f;
  for (int r = 0; r < rows; ++r) {
    const long base = static_cast<long>(r) * dim;
    float proj = 0.0f, wdout_mean = 0.0f;
    for (int i = 0; i < dim; ++i) {
      float v_hat = acn::normalize(v[base + i], mean[r], rstd[r]);
      proj += w[i] * dout[base + i] * v_hat;
      wdout_mean += w[i] * dout[base + i];
    }
    proj /= dim;
    wdout_mean /= dim;
    for (int i = 0; i < dim; ++i) {
      float v_hat = acn::normalize(v[base + i], mean[r], rstd[r]);
      dv[base + i] = acn::norm_input_grad(w[i] * dout[base + i], v_hat, rstd[r], proj, wdout_mean, is_layernorm);
      dw[i] += dout[base + i] * v_hat;
      db[i] += dout[base + i];
    }
  }
}

void acn_activation(const float* z, long n, int act, float* h) {
  for (long i = 0; i < n; ++i) h[i] = acn::activation(z[i], act);
}

void acn_activation_grad(const float* saved, long n, int act, float* grad) {
  for (long i = 0; i < n; ++i) grad[i] = acn::activation_grad(saved[i], act);
}

}  // extern "C"
