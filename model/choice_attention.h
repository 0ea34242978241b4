// The MoE attention's attention step (Mod-Squad's mixture of attention heads): each kept
// choice i = token * k + j of a token has its own query q[i] (from its expert) and attends
// over the shared keys and values kv [tokens, 2 * dh] ([k | v]) of the token's sequence:
// probs[i] = softmax(q[i] . k_l / sqrt(dh)) over the sequence's tokens l, out[i] =
// sum_l probs[i, l] v_l. Dropped choices (row < 0) get zero probabilities and output.
// The bodies are MOERUN_HD functions of one choice (forward) or one sequence (backward, which
// accumulates into the sequence's d_kv rows), so the CPU loops (model/ops.cc) and the
// Thrust kernels (model/dense_kernels_thrust.h) run the same arithmetic in the same order.
#ifndef MOERUN_MODEL_CHOICE_ATTENTION_H_
#define MOERUN_MODEL_CHOICE_ATTENTION_H_

#include <cmath>
#include <cstdint>

#include "runtime/device_math.h"
#include "runtime/row_kernels.h"

namespace moerun {
namespace choice_attention {

struct Shape {
  int64_t tokens, k, head_dim, seq_len;
  float scale;  // 1 / sqrt(head_dim)
};

inline Shape MakeShape(int64_t tokens, int64_t k, int64_t head_dim, int64_t seq_len) {
  return {tokens, k, head_dim, seq_len, 1.0f / std::sqrt(static_cast<float>(head_dim))};
}

// probs [tokens, k, seq_len] and out [tokens, k, dh] of choice i.
MOERUN_HD inline void ForwardOne(const Shape& s, const float* q, const float* kv,
                                 const int32_t* row, float* probs, float* out, int64_t i) {
  const int64_t dh = s.head_dim, n = s.seq_len;
  const int64_t first = (i / s.k) / n * n;
  float* p = probs + i * n;
  float* a = out + i * dh;
  for (int64_t c = 0; c < dh; ++c) a[c] = 0.0f;
  if (row[i] < 0) {
    for (int64_t l = 0; l < n; ++l) p[l] = 0.0f;
    return;
  }
  const float* qi = q + i * dh;
  for (int64_t l = 0; l < n; ++l) {
    const float* key = kv + (first + l) * 2 * dh;
    float dot = 0;
    for (int64_t c = 0; c < dh; ++c) dot += qi[c] * key[c];
    p[l] = dot * s.scale;
  }
  rowwise::Softmax(p, p, n);
  for (int64_t l = 0; l < n; ++l) {
    const float* v = kv + (first + l) * 2 * dh + dh;
    for (int64_t c = 0; c < dh; ++c) a[c] += p[l] * v[c];
  }
}

// Sequence b: d_q of its choices (overwritten) and its rows of d_kv (overwritten), from
// d_out [tokens, k, dh]. dS = P * (dP - sum(P * dP)) / sqrt(dh), dP_l = d_out . v_l.
MOERUN_HD inline void BackwardSequence(const Shape& s, const float* q, const float* kv,
                                       const int32_t* row, const float* probs, const float* d_out,
                                       float* d_q, float* d_kv, int64_t b) {
  const int64_t dh = s.head_dim, n = s.seq_len, k = s.k, first = b * n;
  for (int64_t r = first * 2 * dh; r < (first + n) * 2 * dh; ++r) d_kv[r] = 0.0f;
  for (int64_t tok = first; tok < first + n; ++tok) {
    for (int64_t j = 0; j < k; ++j) {
      const int64_t i = tok * k + j;
      float* dq = d_q + i * dh;
      for (int64_t c = 0; c < dh; ++c) dq[c] = 0.0f;
      if (row[i] < 0) continue;
      const float* p = probs + i * n;
      const float* da = d_out + i * dh;
      const float* qi = q + i * dh;
      double sum = 0;
      for (int64_t l = 0; l < n; ++l) {
        const float* v = kv + (first + l) * 2 * dh + dh;
        float* dv = d_kv + (first + l) * 2 * dh + dh;
        float dot = 0;
        for (int64_t c = 0; c < dh; ++c) {
          dot += da[c] * v[c];
          dv[c] += p[l] * da[c];
        }
        sum += static_cast<double>(p[l]) * dot;
      }
      const float fsum = static_cast<float>(sum);
      for (int64_t l = 0; l < n; ++l) {
        const float* v = kv + (first + l) * 2 * dh + dh;
        float dot = 0;  // dP_l again, in the same order: no per-choice scratch
        for (int64_t c = 0; c < dh; ++c) dot += da[c] * v[c];
        const float ds = p[l] * (dot - fsum) * s.scale;
        const float* key = kv + (first + l) * 2 * dh;
        float* dkey = d_kv + (first + l) * 2 * dh;
        for (int64_t c = 0; c < dh; ++c) {
          dq[c] += ds * key[c];
          dkey[c] += ds * qi[c];
        }
      }
    }
  }
}

}  // namespace choice_attention
}  // namespace moerun

#endif  // MOERUN_MODEL_CHOICE_ATTENTION_H_
