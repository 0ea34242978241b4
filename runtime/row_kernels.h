// One row of the row-wise kernels (softmax and its backward, layer norm and its backward)
// as MOERUN_HD functions: runtime/kernels.cc runs them over rows with OpenMP (double sums in
// column order). Their lane forms further down are what the device runs.
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

// A router's d(logits) row from its combine weights' gradient: dz = dz_loss + y * (dg -
// sum(dg * y)), SoftmaxBackward's form, where dg[e] is the sum of d_weight[j] over the k
// choices with expert_index[j] == e that were kept (row[j] >= 0) and 0 elsewhere; the sum
// runs over the kept choices in choice order.
MOERUN_HD inline void RouterLogitsBackward(const float* y, const int32_t* expert_index,
                                           const int32_t* row, const float* d_weight,
                                           const float* dz_loss, float* dz, int num_experts,
                                           int k) {
  double dot = 0.0;
  for (int j = 0; j < k; ++j) {
    if (row[j] >= 0) dot += static_cast<double>(y[expert_index[j]]) * d_weight[j];
  }
  const float d = static_cast<float>(dot);
  for (int e = 0; e < num_experts; ++e) {
    float dg = 0.0f;
    for (int j = 0; j < k; ++j) {
      if (row[j] >= 0 && expert_index[j] == e) dg += d_weight[j];
    }
    dz[e] = dz_loss[e] + y[e] * (dg - d);
  }
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

// --- The same four rows over kLanes lanes, for a GPU: lane l takes columns l, l + kLanes,
// ..., so a warp's loads and stores are neighbouring floats (one thread per row reads rows
// `cols` floats apart), and the lanes' partial results meet in a butterfly (lane l adds lane
// l ^ 16, then l ^ 8, ..., l ^ 1: every lane ends with the same bits, sums being
// commutative). Each row is written once against a lane group G:
//   G::ForLanes(f)   runs f(lane) for each of the group's lanes;
//   G::Max(f)        the butterfly maximum of f(lane) over the lanes;
//   G::Sum(f)        the butterfly sum of f(lane) (a double, or a DoublePair);
// HostLanes below runs all lanes in one thread (the Thrust kernels' host build and tests);
// model/ops_cuda.cu's warp group runs lane l in a warp's thread l with __shfl_xor_sync, in
// the same order, so both give the same bits for the same libm. The sums are doubles, as
// above; only their order differs from the one-thread forms (within a few float ulps).
constexpr int kLanes = 32;

struct DoublePair {
  double a = 0.0, b = 0.0;
  MOERUN_HD DoublePair operator+(const DoublePair& o) const { return {a + o.a, b + o.b}; }
};

// One thread plays every lane: lane values in an array, combined in the warp's order.
struct HostLanes {
  template <typename F>
  MOERUN_HD static void ForLanes(const F& f) {
    for (int l = 0; l < kLanes; ++l) f(l);
  }
  template <typename F>
  MOERUN_HD static float Max(const F& f) {
    float v[kLanes];
    for (int l = 0; l < kLanes; ++l) v[l] = f(l);
    for (int off = kLanes / 2; off > 0; off /= 2) {
      float w[kLanes];
      for (int l = 0; l < kLanes; ++l) w[l] = v[l] < v[l ^ off] ? v[l ^ off] : v[l];
      for (int l = 0; l < kLanes; ++l) v[l] = w[l];
    }
    return v[0];
  }
  template <typename F>
  MOERUN_HD static auto Sum(const F& f) {
    using T = decltype(f(0));
    T v[kLanes];
    for (int l = 0; l < kLanes; ++l) v[l] = f(l);
    for (int off = kLanes / 2; off > 0; off /= 2) {
      T w[kLanes];
      for (int l = 0; l < kLanes; ++l) w[l] = v[l] + v[l ^ off];
      for (int l = 0; l < kLanes; ++l) v[l] = w[l];
    }
    return v[0];
  }
};

// y = softmax(x) over `cols`; y may alias x (each lane reads x[j] before it writes y[j]).
template <typename G>
MOERUN_HD inline void SoftmaxLanes(const G& g, const float* x, float* y, int64_t cols) {
  const float mx = g.Max([&](int l) {
    float m = -INFINITY;
    for (int64_t j = l; j < cols; j += kLanes) m = m < x[j] ? x[j] : m;
    return m;
  });
  const double sum = g.Sum([&](int l) {
    double s = 0.0;
    for (int64_t j = l; j < cols; j += kLanes) {
      y[j] = expf(x[j] - mx);
      s += y[j];
    }
    return s;
  });
  const float inv = static_cast<float>(1.0 / sum);
  g.ForLanes([&](int l) {
    for (int64_t j = l; j < cols; j += kLanes) y[j] *= inv;
  });
}

// dx = y * (dy - sum(dy * y)); dx may alias dy.
template <typename G>
MOERUN_HD inline void SoftmaxBackwardLanes(const G& g, const float* y, const float* dy, float* dx,
                                           int64_t cols) {
  const float d = static_cast<float>(g.Sum([&](int l) {
    double s = 0.0;
    for (int64_t j = l; j < cols; j += kLanes) s += static_cast<double>(y[j]) * dy[j];
    return s;
  }));
  g.ForLanes([&](int l) {
    for (int64_t j = l; j < cols; j += kLanes) dx[j] = y[j] * (dy[j] - d);
  });
}

// LayerNorm above over lanes; lane 0 writes the row's mean and rstd.
template <typename G>
MOERUN_HD inline void LayerNormLanes(const G& g, const float* x, const float* gamma,
                                     const float* beta, float* y, float* mean, float* rstd,
                                     int64_t cols, float eps) {
  const double mu = g.Sum([&](int l) {
    double s = 0.0;
    for (int64_t j = l; j < cols; j += kLanes) s += x[j];
    return s;
  }) / cols;
  const double v = g.Sum([&](int l) {
    double s = 0.0;
    for (int64_t j = l; j < cols; j += kLanes) s += (x[j] - mu) * (x[j] - mu);
    return s;
  });
  const float rs = static_cast<float>(1.0 / sqrt(v / cols + eps));
  const float m = static_cast<float>(mu);
  g.ForLanes([&](int l) {
    for (int64_t j = l; j < cols; j += kLanes) y[j] = (x[j] - m) * rs * gamma[j] + beta[j];
    if (l == 0) {
      *mean = m;
      *rstd = rs;
    }
  });
}

// LayerNormBackward above over lanes (dx only; the row may write dx over dy, but the op's
// parameter gradients read dy after it).
template <typename G>
MOERUN_HD inline void LayerNormBackwardLanes(const G& g, const float* x, const float* gamma,
                                             float mean, float rstd, const float* dy, float* dx,
                                             int64_t cols) {
  const DoublePair s = g.Sum([&](int l) {
    DoublePair p;
    for (int64_t j = l; j < cols; j += kLanes) {
      const float xhat = (x[j] - mean) * rstd;
      const float gj = dy[j] * gamma[j];
      p.a += gj;
      p.b += static_cast<double>(gj) * xhat;
    }
    return p;
  });
  const float mg = static_cast<float>(s.a / cols), mgx = static_cast<float>(s.b / cols);
  g.ForLanes([&](int l) {
    for (int64_t j = l; j < cols; j += kLanes) {
      const float xhat = (x[j] - mean) * rstd;
      dx[j] = rstd * (dy[j] * gamma[j] - mg - xhat * mgx);
    }
  });
}

}  // namespace rowwise
}  // namespace moerun

#endif  // MOERUN_RUNTIME_ROW_KERNELS_H_
