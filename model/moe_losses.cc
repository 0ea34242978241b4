// Auxiliary router losses and their gradients, in double precision.
#include "model/moe_losses.h"

#include <glog/logging.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "model/routing.h"

#if defined(__AVX512F__) && defined(MOERUN_HAVE_LIBMVEC)
#include <immintrin.h>
// glibc's vector math library (libmvec): erfc and exp of 8 doubles each, within 4 ulp.
extern "C" __m512d _ZGVeN8v_erfc(__m512d);
extern "C" __m512d _ZGVeN8v_exp(__m512d);
#define MOERUN_VECTOR_MATH 1
#endif

namespace moerun {
namespace {

constexpr double kInvSqrt2 = 0.70710678118654752440;

// The load loss's two transcendental steps over one token's experts, u = (tau - z) / sigma:
// clear[e] = (1 - erfc(-u / sqrt 2) / 2) / tokens (the probability that expert e's noisy
// logit clears tau, over the tokens), and phi[e] = exp(-u^2 / 2). With libmvec, 8 experts at
// a time (measured on 131072 values: erfc 1.6 -> 0.19 ms, exp 1.5 -> 0.09 ms; results
// within 2.3e-16 of the scalar ones). erfc's argument is held to [-27, 26], where it is
// already 2 or 0 within a double's rounding of 1 - erfc / 2. phi is 0 below exp(-460)
// (1e-200): the gradient terms it scales would be below any float, and left in, they
// underflow to subnormal doubles, whose arithmetic costs ~100x (measured: the backward
// 1.1 -> 4.0 ms per step in bench moe-layer with phi held at exp(-700) instead).
#if defined(MOERUN_VECTOR_MATH)
// GCC 12's masked loads pass an undefined vector as the masked-off source and then warn
// about it; nothing reads it.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#endif
void LoadTerms(const double* u, int64_t n, int64_t tokens, double* clear, double* phi) {
#if defined(MOERUN_VECTOR_MATH)
  const __m512d neg_inv_sqrt2 = _mm512_set1_pd(-kInvSqrt2), lo = _mm512_set1_pd(-27.0),
                hi = _mm512_set1_pd(26.0), one = _mm512_set1_pd(1.0), half = _mm512_set1_pd(0.5),
                neg_half = _mm512_set1_pd(-0.5), floor = _mm512_set1_pd(-460.0),
                count = _mm512_set1_pd(static_cast<double>(tokens));
  for (int64_t e = 0; e < n; e += 8) {
    const __mmask8 m = n - e >= 8 ? 0xFF : static_cast<__mmask8>((1u << (n - e)) - 1);
    const __m512d ue = _mm512_maskz_loadu_pd(m, u + e);
    if (clear != nullptr) {
      const __m512d a = _mm512_min_pd(_mm512_max_pd(_mm512_mul_pd(ue, neg_inv_sqrt2), lo), hi);
      const __m512d p = _mm512_sub_pd(one, _mm512_mul_pd(half, _ZGVeN8v_erfc(a)));
      _mm512_mask_storeu_pd(clear + e, m, _mm512_div_pd(p, count));
    }
    if (phi != nullptr) {
      const __m512d a = _mm512_mul_pd(_mm512_mul_pd(neg_half, ue), ue);
      const __mmask8 keep = _mm512_cmp_pd_mask(a, floor, _CMP_GE_OQ);
      _mm512_mask_storeu_pd(phi + e, m,
                            _mm512_maskz_mov_pd(keep, _ZGVeN8v_exp(_mm512_max_pd(a, floor))));
    }
  }
#else
  for (int64_t e = 0; e < n; ++e) {
    if (clear != nullptr) clear[e] = (1.0 - 0.5 * std::erfc(-u[e] * kInvSqrt2)) / tokens;
    if (phi != nullptr) phi[e] = std::exp(-0.5 * u[e] * u[e]);
  }
#endif
}
#if defined(MOERUN_VECTOR_MATH)
#pragma GCC diagnostic pop
#endif

// L = var(v) / mean(v)^2 over n values (population variance); writes dL/dv.
double SquaredCv(const std::vector<double>& v, std::vector<double>* dv) {
  const int n = static_cast<int>(v.size());
  double mean = 0;
  for (double x : v) mean += x;
  mean /= n;
  double var = 0;
  for (double x : v) var += (x - mean) * (x - mean);
  var /= n;
  dv->assign(n, 0.0);
  if (mean == 0) return 0;
  const double m2 = mean * mean;
  for (int i = 0; i < n; ++i) {
    (*dv)[i] = 2.0 * (v[i] - mean) / n / m2 - 2.0 * var / (m2 * mean) / n;
  }
  return var / m2;
}

}  // namespace

double ImportanceLoss(const float* p, int64_t tokens, int num_experts, float* grad, double scale) {
  std::vector<double> imp(num_experts, 0.0), dimp;
  for (int64_t s = 0; s < tokens; ++s) {
    for (int e = 0; e < num_experts; ++e) imp[e] += p[s * num_experts + e];
  }
  const double loss = SquaredCv(imp, &dimp);
  if (grad != nullptr) {
    for (int64_t s = 0; s < tokens; ++s) {
      for (int e = 0; e < num_experts; ++e) {
        grad[s * num_experts + e] += static_cast<float>(scale * dimp[e]);
      }
    }
  }
  return loss;
}

double GShardLoss(const float* p, int64_t tokens, int num_experts, float* grad, double scale) {
  std::vector<double> top1(num_experts, 0.0), mean_p(num_experts, 0.0);
  for (int64_t s = 0; s < tokens; ++s) {
    const float* ps = p + s * num_experts;
    top1[std::max_element(ps, ps + num_experts) - ps] += 1.0 / tokens;
    for (int e = 0; e < num_experts; ++e) mean_p[e] += ps[e] / tokens;
  }
  double loss = 0;
  for (int e = 0; e < num_experts; ++e) loss += top1[e] * mean_p[e];
  loss *= num_experts;  // E^2 * mean_e(...) = E * sum_e(...)
  if (grad != nullptr) {
    for (int64_t s = 0; s < tokens; ++s) {
      for (int e = 0; e < num_experts; ++e) {
        grad[s * num_experts + e] += static_cast<float>(scale * num_experts * top1[e] / tokens);
      }
    }
  }
  return loss;
}

void LoadLossForward(const float* z, const float* z_noisy, int64_t tokens, int num_experts, int k,
                     double sigma, LoadLossState* state) {
  const int64_t e_count = num_experts;
  // Per token (over the threads: each token's values depend on its row only): the k-th
  // noisy logit and each expert's probability of clearing it. Then the load, summed over
  // the tokens in order on one thread, so the bits are the same for any thread count.
  std::vector<int32_t>& kth = state->kth;
  kth.assign(tokens, 0);
  std::vector<double> p(tokens * e_count);
#pragma omp parallel if (tokens * e_count > 16384)
  {
    std::vector<int32_t> idx(k);
    std::vector<float> w(k);
    std::vector<double> u(e_count);
#pragma omp for schedule(static)
    for (int64_t s = 0; s < tokens; ++s) {
      TopK(z_noisy + s * e_count, 1, num_experts, k, idx.data(), w.data());
      kth[s] = idx[k - 1];
      const double tau = z_noisy[s * e_count + kth[s]];
      for (int64_t e = 0; e < e_count; ++e) u[e] = (tau - z[s * e_count + e]) / sigma;
      LoadTerms(u.data(), e_count, tokens, p.data() + s * e_count, nullptr);
    }
  }
  std::vector<double> load(e_count, 0.0);
  for (int64_t s = 0; s < tokens; ++s) {
    for (int64_t e = 0; e < e_count; ++e) load[e] += p[s * e_count + e];
  }
  state->loss = SquaredCv(load, &state->dload);
}

void LoadLossBackward(const LoadLossState& state, const float* z, const float* z_noisy,
                      int64_t tokens, int num_experts, double sigma, float* grad, double scale) {
  constexpr double kInvSqrt2Pi = 0.39894228040143267794;
  const int64_t e_count = num_experts;
  const std::vector<int32_t>& kth = state.kth;
  const std::vector<double>& dload = state.dload;
  CHECK_EQ(static_cast<int64_t>(kth.size()), tokens) << "load loss state of another group";
  // dLoss/dP per expert, the same for every token (as the product's leading factors).
  std::vector<double> coef(e_count);
  for (int64_t e = 0; e < e_count; ++e) coef[e] = scale * dload[e] / tokens * kInvSqrt2Pi;
#pragma omp parallel if (tokens * e_count > 16384)
  {
    std::vector<double> u(e_count), phi(e_count);
    // Each token's gradient touches its own row only.
#pragma omp for schedule(static)
    for (int64_t s = 0; s < tokens; ++s) {
      const double tau = z_noisy[s * e_count + kth[s]];
      for (int64_t e = 0; e < e_count; ++e) u[e] = (tau - z[s * e_count + e]) / sigma;
      LoadTerms(u.data(), e_count, tokens, nullptr, phi.data());
      double dtau = 0;
      for (int64_t e = 0; e < e_count; ++e) {
        // dP/dz = phi(u) / sigma, dP/dtau = -phi(u) / sigma.
        const double d = coef[e] * phi[e] / sigma;
        grad[s * e_count + e] += static_cast<float>(d);
        dtau -= d;
      }
      grad[s * e_count + kth[s]] += static_cast<float>(dtau);
    }
  }
}

double LoadLoss(const float* z, const float* z_noisy, int64_t tokens, int num_experts, int k,
                double sigma, float* grad, double scale) {
  LoadLossState state;
  LoadLossForward(z, z_noisy, tokens, num_experts, k, sigma, &state);
  if (grad != nullptr) LoadLossBackward(state, z, z_noisy, tokens, num_experts, sigma, grad, scale);
  return state.loss;
}

double ZLoss(const float* z, int64_t tokens, int num_experts, float* grad, double scale) {
  double loss = 0;
  for (int64_t s = 0; s < tokens; ++s) {
    const float* zs = z + s * num_experts;
    const double mx = *std::max_element(zs, zs + num_experts);
    double se = 0;
    for (int e = 0; e < num_experts; ++e) se += std::exp(zs[e] - mx);
    const double lse = mx + std::log(se);
    loss += lse * lse / tokens;
    if (grad != nullptr) {
      for (int e = 0; e < num_experts; ++e) {
        const double softmax = std::exp(zs[e] - lse);
        grad[s * num_experts + e] += static_cast<float>(scale * 2.0 * lse * softmax / tokens);
      }
    }
  }
  return loss;
}

double MutualInformationLoss(const double* a, const double* count, int tasks, int num_experts,
                             int k, double* grad_a) {
  constexpr double kEps = 1e-4;
  const int e_count = num_experts;
  double n = 0;
  for (int e = 0; e < e_count; ++e) n += count[e];
  n /= k;
  const double inv = 1.0 / (n + kEps);
  std::vector<double> pte(static_cast<size_t>(tasks) * e_count), pt(tasks, kEps), pe(e_count, kEps);
  for (int t = 0; t < tasks; ++t) {
    for (int e = 0; e < e_count; ++e) {
      const double v = a[t * e_count + e] * inv;
      pte[t * e_count + e] = v;
      pt[t] += v;
      pe[e] += v;
    }
  }
  // L = -sum P log(r + eps), r = P / (Pt Pe). With q = r / (r + eps):
  // dL/dP(t,e) = -log(r+eps) - q  (direct)  + sum_e' P(t,e') q(t,e') / Pt  (through Pt)
  //              + sum_t' P(t',e) q(t',e) / Pe  (through Pe).
  double loss = 0;
  std::vector<double> q(pte.size()), row(tasks, 0.0), col(e_count, 0.0);
  for (int t = 0; t < tasks; ++t) {
    for (int e = 0; e < e_count; ++e) {
      const double p = pte[t * e_count + e];
      const double r = p / (pt[t] * pe[e]);
      loss -= p * std::log(r + kEps);
      q[t * e_count + e] = r / (r + kEps);
      row[t] += p * q[t * e_count + e];
      col[e] += p * q[t * e_count + e];
    }
  }
  if (grad_a != nullptr) {
    for (int t = 0; t < tasks; ++t) {
      for (int e = 0; e < e_count; ++e) {
        const double p = pte[t * e_count + e];
        const double r = p / (pt[t] * pe[e]);
        const double dp =
            -std::log(r + kEps) - q[t * e_count + e] + row[t] / pt[t] + col[e] / pe[e];
        grad_a[t * e_count + e] = dp * inv;
      }
    }
  }
  return loss;
}

}  // namespace moerun
