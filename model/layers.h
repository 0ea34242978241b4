// Dense ViT layers with explicit forward and backward over plain row-major buffers:
// linear (y = x W^T + b, PyTorch's [out, in] weights), multi-head self-attention core,
// patch extraction. Backward functions accumulate (+=) parameter gradients and overwrite
// (or, where stated, accumulate into) input gradients.
#ifndef MOERUN_MODEL_LAYERS_H_
#define MOERUN_MODEL_LAYERS_H_

#include <cstdint>

namespace moerun {

// y[rows, out] = x[rows, in] W^T + b (b may be null).
void LinearForward(const float* x, const float* w, const float* b, float* y, int64_t rows,
                   int64_t in, int64_t out);
// dx = dy W (overwritten; skipped when dx is null), dW += dy^T x, db += sum_rows dy.
void LinearBackward(const float* x, const float* w, const float* dy, float* dx, float* dw,
                    float* db, int64_t rows, int64_t in, int64_t out);

// Self-attention over `batch` sequences of `tokens`, `heads` heads of width `head_dim`
// (D = heads * head_dim). qkv: [batch * tokens, 3D] laid out [q | k | v], head h in
// columns h*head_dim.. of each. out: [batch * tokens, D] = softmax(q k^T / sqrt(dh)) v per
// head (before the output projection). probs: [batch, heads, tokens, tokens], saved for
// the backward.
void AttentionForward(const float* qkv, float* out, float* probs, int64_t batch, int64_t tokens,
                      int64_t heads, int64_t head_dim);
// dqkv (overwritten) from dout.
void AttentionBackward(const float* qkv, const float* probs, const float* dout, float* dqkv,
                       int64_t batch, int64_t tokens, int64_t heads, int64_t head_dim);

// images [batch, C, H, W] -> patches [batch * (H/P) * (W/P), C * P * P], patches in raster
// order, each flattened (c, py, px) like a [D, C, P, P] convolution weight.
void ExtractPatches(const float* images, float* patches, int64_t batch, int64_t channels,
                    int64_t size, int64_t patch);

}  // namespace moerun

#endif  // MOERUN_MODEL_LAYERS_H_
