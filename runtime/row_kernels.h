// One row of the row-wise kernels (softmax and its backward, layer norm and its backward)
// as MOERUN_HD functions: runtime/kernels.cc runs them over rows with OpenMP, the Thrust
// kernels (model/dense_kernels_thrust.h) one row per thread, so host and device share one
// formula and one summation order (double sums).
#ifndef MOERUN_RUNTIME_ROW_KERNELS_H_
#define MOERUN_RUNTIME_ROW_KERNELS_H_

#include <cmath>
#include <cstdint>

#include "runtime/device_math.h"

namespace moerun {
namespace rowwise {

// y = softmax(x) over `cols`; y may alias x.
MOERUN_HD inline void Softmax(const float* x, float* y, int64_t cols) {
  float mx = -INFINITY;
  for (int64_t j = 0; j < cols; ++j) mx = mx < x[j] ? x[j] : mx;
  double sum = 0.0;
  for (int64_t j = 0; j < cols; ++j) {
    y[j] = expf(x[j] - mx);
    sum += y[j];
  }
  const float inv = static_cast<float>(1.0 / sum);
  for (int64_t j = 0; j < cols; ++j) y[j] *= inv;
}

// dx = y * (dy - sum(dy * y)); dx may alias dy.
MOERUN_HD inline void SoftmaxBackward(const float* y, const float* dy, float* dx, int64_t cols) {
  double dot = 0.0;
  for (int64_t j = 0; j < cols; ++j) dot += static_cast<double>(y[j]) * dy[j];
  const float d = static_cast<float>(dot);
  for (int64_t j = 0; j < cols; ++j) dx[j] = y[j] * (dy[j] - d);
}

// y = (x - mean) * rstd * gamma + beta; writes the row's mean and rstd.
MOERUN_HD inline void LayerNorm(const float* x, const float* gamma, const float* beta, float* y,
                                float* mean, float* rstd, int64_t cols, float eps) {
  double s = 0.0;
  for (int64_t j = 0; j < cols; ++j) s += x[j];
  const double mu = s / cols;
  double v = 0.0;
  for (int64_t j = 0; j < cols; ++j) v += (x[j] - mu) * (x[j] - mu);
  const float rs = static_cast<float>(1.0 / sqrt(v / cols + eps));
  const float m = static_cast<float>(mu);
  for (int64_t j = 0; j < cols; ++j) y[j] = (x[j] - m) * rs * gamma[j] + beta[j];
  *mean = m;
  *rstd = rs;
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * gamma.
MOERUN_HD inline void LayerNormBackward(const float* x, const float* gamma, float mean, float rstd,
                                        const float* dy, float* dx, int64_t cols) {
  double sum_g = 0.0, sum_gx = 0.0;
  for (int64_t j = 0; j < cols; ++j) {
    const float xhat = (x[j] - mean) * rstd;
    const float g = dy[j] * gamma[j];
    sum_g += g;
    sum_gx += static_cast<double>(g) * xhat;
  }
  const float mg = static_cast<float>(sum_g / cols), mgx = static_cast<float>(sum_gx / cols);
  for (int64_t j = 0; j < cols; ++j) {
    const float xhat = (x[j] - mean) * rstd;
    dx[j] = rstd * (dy[j] * gamma[j] - mg - xhat * mgx);
  }
}

}  // namespace rowwise
}  // namespace moerun

#endif  // MOERUN_RUNTIME_ROW_KERNELS_H_
