// Dense ViT layers.
#include "model/layers.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "runtime/kernels.h"

namespace moerun {

void LinearForward(const float* x, const float* w, const float* b, float* y, int64_t rows,
                   int64_t in, int64_t out) {
  Gemm(false, true, rows, out, in, 1.0f, x, in, w, in, 0.0f, y, out);
  if (b != nullptr) AddBias(y, b, rows, out);
}

void LinearBackward(const float* x, const float* w, const float* dy, float* dx, float* dw,
                    float* db, int64_t rows, int64_t in, int64_t out) {
  if (dx != nullptr) Gemm(false, false, rows, in, out, 1.0f, dy, out, w, in, 0.0f, dx, in);
  Gemm(true, false, out, in, rows, 1.0f, dy, out, x, in, 1.0f, dw, in);
  if (db != nullptr) BiasBackward(dy, db, rows, out);
}

void AttentionForward(const float* qkv, float* out, float* probs, int64_t batch, int64_t tokens,
                      int64_t heads, int64_t head_dim) {
  const int64_t d = heads * head_dim, ld = 3 * d, n = tokens;
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t h = 0; h < heads; ++h) {
      const float* q = qkv + b * n * ld + h * head_dim;
      const float* k = q + d;
      const float* v = q + 2 * d;
      float* p = probs + (b * heads + h) * n * n;
      for (int64_t i = 0; i < n; ++i) {
        float* pi = p + i * n;
        for (int64_t j = 0; j < n; ++j) {
          float s = 0;
          for (int64_t c = 0; c < head_dim; ++c) s += q[i * ld + c] * k[j * ld + c];
          pi[j] = s * scale;
        }
      }
      SoftmaxForward(p, p, n, n);
      for (int64_t i = 0; i < n; ++i) {
        float* o = out + (b * n + i) * d + h * head_dim;
        std::fill_n(o, head_dim, 0.0f);
        for (int64_t j = 0; j < n; ++j) {
          const float pij = p[i * n + j];
          const float* vj = v + j * ld;
          for (int64_t c = 0; c < head_dim; ++c) o[c] += pij * vj[c];
        }
      }
    }
  }
}

void AttentionBackward(const float* qkv, const float* probs, const float* dout, float* dqkv,
                       int64_t batch, int64_t tokens, int64_t heads, int64_t head_dim) {
  const int64_t d = heads * head_dim, ld = 3 * d, n = tokens;
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t h = 0; h < heads; ++h) {
      const float* q = qkv + b * n * ld + h * head_dim;
      const float* k = q + d;
      const float* v = q + 2 * d;
      float* dq = dqkv + b * n * ld + h * head_dim;
      float* dk = dq + d;
      float* dv = dq + 2 * d;
      const float* p = probs + (b * heads + h) * n * n;
      std::vector<float> dp(n * n);
      for (int64_t i = 0; i < n; ++i) {
        std::fill_n(dq + i * ld, head_dim, 0.0f);
        std::fill_n(dk + i * ld, head_dim, 0.0f);
        std::fill_n(dv + i * ld, head_dim, 0.0f);
      }
      // dP = dO V^T; dV = P^T dO.
      for (int64_t i = 0; i < n; ++i) {
        const float* doi = dout + (b * n + i) * d + h * head_dim;
        for (int64_t j = 0; j < n; ++j) {
          const float* vj = v + j * ld;
          float s = 0;
          for (int64_t c = 0; c < head_dim; ++c) s += doi[c] * vj[c];
          dp[i * n + j] = s;
          const float pij = p[i * n + j];
          float* dvj = dv + j * ld;
          for (int64_t c = 0; c < head_dim; ++c) dvj[c] += pij * doi[c];
        }
      }
      // dS = softmax'(P) dP, then scaled: dQ = dS K * scale, dK = dS^T Q * scale.
      SoftmaxBackward(p, dp.data(), dp.data(), n, n);
      for (int64_t i = 0; i < n; ++i) {
        for (int64_t j = 0; j < n; ++j) {
          const float g = dp[i * n + j] * scale;
          const float* kj = k + j * ld;
          const float* qi = q + i * ld;
          float* dqi = dq + i * ld;
          float* dkj = dk + j * ld;
          for (int64_t c = 0; c < head_dim; ++c) {
            dqi[c] += g * kj[c];
            dkj[c] += g * qi[c];
          }
        }
      }
    }
  }
}

void ExtractPatches(const float* images, float* patches, int64_t batch, int64_t channels,
                    int64_t size, int64_t patch) {
  const int64_t grid = size / patch, per_patch = channels * patch * patch;
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t gy = 0; gy < grid; ++gy) {
      for (int64_t gx = 0; gx < grid; ++gx) {
        float* dst = patches + ((b * grid + gy) * grid + gx) * per_patch;
        for (int64_t c = 0; c < channels; ++c) {
          for (int64_t py = 0; py < patch; ++py) {
            const float* src =
                images + ((b * channels + c) * size + gy * patch + py) * size + gx * patch;
            std::copy_n(src, patch, dst + (c * patch + py) * patch);
          }
        }
      }
    }
  }
}

}  // namespace moerun
