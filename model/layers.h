// Dense ViT layers with explicit forward and backward over plain row-major buffers:
// linear (y = x W^T + b, PyTorch's [out, in] weights), multi-head self-attention core,
// patch extraction. Backward functions accumulate (+=) parameter gradients and overwrite
// (or, where stated, accumulate into) input gradients.
#ifndef MOERUN_MODEL_LAYERS_H_
#define MOERUN_MODEL_LAYERS_H_

#include <cstdint>

#include "model/ops.h"
#include "runtime/tensor.h"

namespace moerun {

// The linear and dense sub-layers run on `ops` (model/ops.h): the table of the device their
// buffers live on; the dense sub-layers take it from their weights' device.

// y[rows, out] = x[rows, in] W^T + b (b may be null).
void LinearForward(const OpsTable& ops, const float* x, const float* w, const float* b, float* y,
                   int64_t rows, int64_t in, int64_t out);
// dx = dy W (overwritten; skipped when dx is null), dW += dy^T x, db += sum_rows dy.
void LinearBackward(const OpsTable& ops, const float* x, const float* w, const float* dy, float* dx,
                    float* dw, float* db, int64_t rows, int64_t in, int64_t out);

// The CPU kernels of the self-attention op (the CPU table's entries; other devices have
// their own or the composed form, model/ops.h). Self-attention over `batch` sequences of `tokens`,
// `heads` heads of width `head_dim` (D = heads * head_dim). qkv: [batch * tokens, 3D] laid out [q |
// k | v], head h in columns h*head_dim.. of each. out: [batch * tokens, D] = softmax(q k^T /
// sqrt(dh)) v per head (before the output projection). probs: [batch, heads, tokens, tokens], saved
// for the backward.
void AttentionForward(const float* qkv, float* out, float* probs, int64_t batch, int64_t tokens,
                      int64_t heads, int64_t head_dim);
// dqkv (overwritten) from dout.
void AttentionBackward(const float* qkv, const float* probs, const float* dout, float* dqkv,
                       int64_t batch, int64_t tokens, int64_t heads, int64_t head_dim);

// images [batch, C, H, W] -> patches [batch * (H/P) * (W/P), C * P * P], patches in raster
// order, each flattened (c, py, px) like a [D, C, P, P] convolution weight.
void ExtractPatches(const float* images, float* patches, int64_t batch, int64_t channels,
                    int64_t size, int64_t patch);

// The dense sub-layers both models' blocks use, with their parameters as views (value and
// gradient) into the model's flat storage.
struct DenseMlpWeights {
  Tensor fc1_w, fc1_b, fc2_w, fc2_b;          // [M, D], [M], [D, M], [D]
  Tensor g_fc1_w, g_fc1_b, g_fc2_w, g_fc2_b;  // their gradients
};
// y = fc2(GELU(fc1(x))) over rows of width d (hidden width m); hidden and act [rows, m] are
// kept for the backward (hidden: what BiasGeluSaving leaves, fc1's output or its GELU slope).
void DenseMlpForward(const DenseMlpWeights& w, const float* x, float* hidden, float* act, float* y,
                     int64_t rows, int64_t d, int64_t m, bool gelu_tanh);
// dx (overwritten) from dy; d_act [rows, m] is scratch; weight gradients accumulate.
void DenseMlpBackward(const DenseMlpWeights& w, const float* x, const float* hidden,
                      const float* act, const float* dy, float* d_act, float* dx, int64_t rows,
                      int64_t d, int64_t m, bool gelu_tanh);

struct DenseAttentionWeights {
  Tensor qkv_w, qkv_b, proj_w, proj_b;          // [3 H dh, D], [3 H dh], [D, H dh], [D]
  Tensor g_qkv_w, g_qkv_b, g_proj_w, g_proj_b;  // their gradients
};
// Multi-head self-attention with its output projection over `seqs` sequences of `tokens`:
// y = proj(attention(qkv(x))); qkv [rows, 3 H dh], probs [seqs, H, tokens, tokens] and att
// [rows, H dh] are kept for the backward.
void DenseAttentionForward(const DenseAttentionWeights& w, const float* x, float* qkv, float* probs,
                           float* att, float* y, int64_t seqs, int64_t tokens, int64_t d,
                           int64_t heads, int64_t head_dim);
// dx (overwritten) from dy; d_att [rows, H dh] and d_qkv [rows, 3 H dh] are scratch.
void DenseAttentionBackward(const DenseAttentionWeights& w, const float* x, const float* qkv,
                            const float* probs, const float* att, const float* dy, float* d_att,
                            float* d_qkv, float* dx, int64_t seqs, int64_t tokens, int64_t d,
                            int64_t heads, int64_t head_dim);

}  // namespace moerun

#endif  // MOERUN_MODEL_LAYERS_H_
