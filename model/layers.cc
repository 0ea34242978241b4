// Dense ViT layers.
#include "model/layers.h"

#include <algorithm>
#include <cmath>
#include <vector>

#include "runtime/kernels.h"

namespace moerun {

void LinearForward(const OpsTable& ops, const float* x, const float* w, const float* b, float* y,
                   int64_t rows, int64_t in, int64_t out) {
  MOERUN_OP(ops, gemm)(false, true, rows, out, in, 1.0f, x, in, w, in, 0.0f, y, out);
  if (b != nullptr) MOERUN_OP(ops, add_bias)(y, b, rows, out);
}

void LinearBackward(const OpsTable& ops, const float* x, const float* w, const float* dy, float* dx,
                    float* dw, float* db, int64_t rows, int64_t in, int64_t out) {
  auto gemm = MOERUN_OP(ops, gemm);
  if (dx != nullptr) gemm(false, false, rows, in, out, 1.0f, dy, out, w, in, 0.0f, dx, in);
  gemm(true, false, out, in, rows, 1.0f, dy, out, x, in, 1.0f, dw, in);
  if (db != nullptr) MOERUN_OP(ops, bias_backward)(dy, db, rows, out);
}

namespace {

// c[m, n] = a[m, k] b[k, n], all contiguous row-major; the inner loop runs along a row of
// b and c, so it vectorises (n is the token count, k the head width or the token count).
void MatMul(const float* __restrict a, const float* __restrict b, float* __restrict c, int64_t m,
            int64_t n, int64_t k) {
  for (int64_t i = 0; i < m; ++i) {
    float* __restrict ci = c + i * n;
    std::fill_n(ci, n, 0.0f);
    const float* ai = a + i * k;
    int64_t p = 0;
    // Four rows of b per pass over c's row: a quarter of the loads and stores of c.
    for (; p + 4 <= k; p += 4) {
      const float a0 = ai[p], a1 = ai[p + 1], a2 = ai[p + 2], a3 = ai[p + 3];
      const float* __restrict b0 = b + p * n;
      const float* __restrict b1 = b0 + n;
      const float* __restrict b2 = b1 + n;
      const float* __restrict b3 = b2 + n;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j)
        ci[j] += (a0 * b0[j] + a1 * b1[j]) + (a2 * b2[j] + a3 * b3[j]);
    }
    for (; p < k; ++p) {
      const float aip = ai[p];
      const float* __restrict bp = b + p * n;
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) ci[j] += aip * bp[j];
    }
  }
}

// sum_j a[j] b[j] over fixed lanes of partial sums (vectorises without -ffast-math).
float DotLanes(const float* a, const float* b, int64_t n) {
  constexpr int kLanes = 8;
  float acc[kLanes] = {0};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] += a[j + l] * b[j + l];
  }
  float sum = 0;
  for (; j < n; ++j) sum += a[j] * b[j];
  for (int l = 0; l < kLanes; ++l) sum += acc[l];
  return sum;
}

// dst[cols, rows] = src[rows, cols]^T * scale, src rows `ld` apart.
void GatherTransposed(const float* src, int64_t ld, int64_t rows, int64_t cols, float scale,
                      float* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) dst[c * rows + r] = src[r * ld + c] * scale;
  }
}

// dst[rows, cols] (rows `ld` apart) = src[cols, rows]^T.
void ScatterTransposed(const float* src, int64_t rows, int64_t cols, int64_t ld, float* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) dst[r * ld + c] = src[c * rows + r];
  }
}

void GatherRows(const float* src, int64_t ld, int64_t rows, int64_t cols, float scale, float* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) dst[r * cols + c] = src[r * ld + c] * scale;
  }
}

}  // namespace

// Per (sequence, head), with n tokens and head width w: the head's q, k, v are copied into
// small contiguous blocks (some transposed) so every product is MatMul, whose
// inner loop runs over n. S = (q / sqrt(w)) k^T, P = softmax(S), out^T = v^T P^T.
void AttentionForward(const float* qkv, float* out, float* probs, int64_t batch, int64_t tokens,
                      int64_t heads, int64_t head_dim) {
  const int64_t d = heads * head_dim, ld = 3 * d, n = tokens, w = head_dim;
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
#pragma omp parallel
  {
    std::vector<float> q(n * w), kt(w * n), vt(w * n), pt(n * n), ot(w * n);
#pragma omp for collapse(2) schedule(static)
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t h = 0; h < heads; ++h) {
        const float* qs = qkv + b * n * ld + h * w;
        GatherRows(qs, ld, n, w, scale, q.data());
        GatherTransposed(qs + d, ld, n, w, 1.0f, kt.data());
        GatherTransposed(qs + 2 * d, ld, n, w, 1.0f, vt.data());
        float* p = probs + (b * heads + h) * n * n;
        MatMul(q.data(), kt.data(), p, n, n, w);
        SoftmaxRowsInPlaceFast(p, n, n);
        GatherTransposed(p, n, n, n, 1.0f, pt.data());
        MatMul(vt.data(), pt.data(), ot.data(), w, n, n);
        ScatterTransposed(ot.data(), n, w, d, out + b * n * d + h * w);
      }
    }
  }
}

// With dS = P * (dP - rowsum(P * dP)) / sqrt(w), dP = dO v^T:
// dv^T = dO^T P, dq^T = k^T dS^T, dk^T = q^T dS.
void AttentionBackward(const float* qkv, const float* probs, const float* dout, float* dqkv,
                       int64_t batch, int64_t tokens, int64_t heads, int64_t head_dim) {
  const int64_t d = heads * head_dim, ld = 3 * d, n = tokens, w = head_dim;
  const float scale = 1.0f / std::sqrt(static_cast<float>(head_dim));
#pragma omp parallel
  {
    std::vector<float> qt(w * n), kt(w * n), vt(w * n), dO(n * w), dOt(w * n), ds(n * n),
        dst(n * n), dqt(w * n), dkt(w * n), dvt(w * n);
#pragma omp for collapse(2) schedule(static)
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t h = 0; h < heads; ++h) {
        const float* qs = qkv + b * n * ld + h * w;
        const float* dos = dout + b * n * d + h * w;
        const float* p = probs + (b * heads + h) * n * n;
        GatherTransposed(qs, ld, n, w, 1.0f, qt.data());
        GatherTransposed(qs + d, ld, n, w, 1.0f, kt.data());
        GatherTransposed(qs + 2 * d, ld, n, w, 1.0f, vt.data());
        GatherRows(dos, d, n, w, 1.0f, dO.data());
        GatherTransposed(dos, d, n, w, 1.0f, dOt.data());
        // dP = dO v^T, into ds.
        MatMul(dO.data(), vt.data(), ds.data(), n, n, w);
        MatMul(dOt.data(), p, dvt.data(), w, n, n);
        for (int64_t i = 0; i < n; ++i) {
          const float* pi = p + i * n;
          float* si = ds.data() + i * n;
          const float dotf = DotLanes(pi, si, n);
#pragma omp simd
          for (int64_t j = 0; j < n; ++j) si[j] = pi[j] * (si[j] - dotf) * scale;
        }
        GatherTransposed(ds.data(), n, n, n, 1.0f, dst.data());
        MatMul(kt.data(), dst.data(), dqt.data(), w, n, n);
        MatMul(qt.data(), ds.data(), dkt.data(), w, n, n);
        float* dq = dqkv + b * n * ld + h * w;
        ScatterTransposed(dqt.data(), n, w, ld, dq);
        ScatterTransposed(dkt.data(), n, w, ld, dq + d);
        ScatterTransposed(dvt.data(), n, w, ld, dq + 2 * d);
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

void DenseMlpForward(const DenseMlpWeights& w, const float* x, float* hidden, float* act, float* y,
                     int64_t rows, int64_t d, int64_t m, bool gelu_tanh) {
  const Device dev = w.fc1_w.device();
  const OpsTable& ops = Ops(dev);
  LinearForward(ops, x, w.fc1_w.device_data<float>(dev), nullptr, hidden, rows, d, m);
  BiasGeluSaving(ops, hidden, w.fc1_b.device_data<float>(dev), act, rows, m, gelu_tanh);
  LinearForward(ops, act, w.fc2_w.device_data<float>(dev), w.fc2_b.device_data<float>(dev), y, rows,
                m, d);
}

void DenseMlpBackward(const DenseMlpWeights& w, const float* x, const float* hidden,
                      const float* act, const float* dy, float* d_act, float* dx, int64_t rows,
                      int64_t d, int64_t m, bool gelu_tanh) {
  const Device dev = w.fc1_w.device();
  const OpsTable& ops = Ops(dev);
  LinearBackward(ops, act, w.fc2_w.device_data<float>(dev), dy, d_act,
                 w.g_fc2_w.device_data<float>(dev), w.g_fc2_b.device_data<float>(dev), rows, m, d);
  GeluBiasBackwardFromSaved(ops, hidden, d_act, w.g_fc1_b.device_data<float>(dev), rows, m,
                            gelu_tanh);
  LinearBackward(ops, x, w.fc1_w.device_data<float>(dev), d_act, dx,
                 w.g_fc1_w.device_data<float>(dev), nullptr, rows, d, m);
}

void DenseAttentionForward(const DenseAttentionWeights& w, const float* x, float* qkv, float* probs,
                           float* att, float* y, int64_t seqs, int64_t tokens, int64_t d,
                           int64_t heads, int64_t head_dim) {
  const int64_t rows = seqs * tokens, hd = heads * head_dim;
  const Device dev = w.qkv_w.device();
  const OpsTable& ops = Ops(dev);
  LinearForward(ops, x, w.qkv_w.device_data<float>(dev), w.qkv_b.device_data<float>(dev), qkv, rows,
                d, 3 * hd);
  MOERUN_OP(ops, attention_forward)(qkv, att, probs, seqs, tokens, heads, head_dim);
  LinearForward(ops, att, w.proj_w.device_data<float>(dev), w.proj_b.device_data<float>(dev), y,
                rows, hd, d);
}

void DenseAttentionBackward(const DenseAttentionWeights& w, const float* x, const float* qkv,
                            const float* probs, const float* att, const float* dy, float* d_att,
                            float* d_qkv, float* dx, int64_t seqs, int64_t tokens, int64_t d,
                            int64_t heads, int64_t head_dim) {
  const int64_t rows = seqs * tokens, hd = heads * head_dim;
  const Device dev = w.qkv_w.device();
  const OpsTable& ops = Ops(dev);
  LinearBackward(ops, att, w.proj_w.device_data<float>(dev), dy, d_att,
                 w.g_proj_w.device_data<float>(dev), w.g_proj_b.device_data<float>(dev), rows, hd,
                 d);
  MOERUN_OP(ops, attention_backward)(qkv, probs, d_att, d_qkv, seqs, tokens, heads, head_dim);
  LinearBackward(ops, x, w.qkv_w.device_data<float>(dev), d_qkv, dx,
                 w.g_qkv_w.device_data<float>(dev), w.g_qkv_b.device_data<float>(dev), rows, d,
                 3 * hd);
}

}  // namespace moerun
