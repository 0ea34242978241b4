// The dispatch points of ops.h, the CPU table and the composed attention.
#include "model/ops.h"

#include <glog/logging.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <vector>

#include "model/choice_attention.h"
#include "model/layers.h"
#include "model/moe_dispatch.h"
#include "model/routing.h"
#include "runtime/backend.h"
#include "runtime/blocked_gemm.h"
#include "runtime/dtype.h"
#include "runtime/kernels.h"
#include "runtime/row_kernels.h"

namespace moerun {
namespace {

void CpuPackRows(const int32_t* row, const float* x, int64_t tokens, int64_t k, int64_t w,
                 float* buf, int64_t buf_rows) {
  ZeroRowsNotKept(row, tokens * k, buf_rows, w, buf);  // the kept rows are copied below
#pragma omp parallel for schedule(static)
  for (int64_t tok = 0; tok < tokens; ++tok) {
    for (int64_t j = 0; j < k; ++j) {
      const int32_t r = row[tok * k + j];
      if (r >= 0) std::memcpy(buf + static_cast<int64_t>(r) * w, x + tok * w, w * sizeof(float));
    }
  }
}

void CpuCombineRowsBackward(const float* buf, const int32_t* row, const float* weight,
                            const float* dy, int64_t tokens, int64_t k, int64_t w, float* d_buf,
                            int64_t buf_rows, float* d_weight) {
  Tensor view = Tensor::Wrap(d_buf, {buf_rows, w}, DType::kF32);
  GatherKeptRowsBackward(buf, row, weight, dy, tokens, k, w, &view, d_weight);
}

void CpuLayerNormForward(const float* x, const float* gamma, const float* beta, float* y,
                         float* mean, float* rstd, int64_t rows, int64_t cols, float eps) {
  LayerNormForward(x, gamma, beta, y, mean, rstd, rows, cols, eps);
}

void CpuGeluForward(const float* x, float* y, int64_t n, bool tanh_form) {
  (tanh_form ? GeluTanhForward : GeluForward)(x, y, n);
}

void CpuGeluBackward(const float* x, const float* dy, float* dx, int64_t n, bool tanh_form) {
  (tanh_form ? GeluTanhBackward : GeluBackward)(x, dy, dx, n);
}

void CpuTanhForward(const float* x, float* y, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] = std::tanh(x[i]);
}

void CpuTanhBackward(const float* y, const float* dy, float* dx, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dx[i] = dy[i] * (1.0f - y[i] * y[i]);
}

void CpuChoiceAttentionForward(const float* q, const float* kv, const int32_t* row, int64_t tokens,
                               int64_t k, int64_t head_dim, int64_t seq_len, float* probs,
                               float* out) {
  const choice_attention::Shape shape = choice_attention::MakeShape(tokens, k, head_dim, seq_len);
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < tokens * k; ++i) {
    choice_attention::ForwardOne(shape, q, kv, row, probs, out, i);
  }
}

void CpuChoiceAttentionBackward(const float* q, const float* kv, const int32_t* row,
                                const float* probs, const float* d_out, int64_t tokens, int64_t k,
                                int64_t head_dim, int64_t seq_len, float* d_q, float* d_kv) {
  const choice_attention::Shape shape = choice_attention::MakeShape(tokens, k, head_dim, seq_len);
#pragma omp parallel for schedule(static)
  for (int64_t b = 0; b < tokens / seq_len; ++b) {
    choice_attention::BackwardSequence(shape, q, kv, row, probs, d_out, d_q, d_kv, b);
  }
}

void CpuZeroDroppedRows(const int32_t* row, float* x, int64_t rows, int64_t cols) {
  for (int64_t i = 0; i < rows; ++i) {
    if (row[i] < 0) std::fill_n(x + i * cols, cols, 0.0f);
  }
}

void CpuTopK(const float* gates, int64_t tokens, int num_experts, int k, int32_t* expert_index,
             float* weight) {
  TopK(gates, tokens, num_experts, k, expert_index, weight);
}

void CpuAssignSlots(const int32_t* expert_index, const float* weight, int64_t tokens,
                    int64_t group_size, int num_experts, int k, bool bpr, int32_t* slot,
                    int32_t* load) {
  thread_local std::vector<int32_t> order;
  group_size = RoutingGroupSize(tokens, group_size);
  for (int64_t g = 0; g * group_size < tokens; ++g) {
    const int64_t off = g * group_size * k;
    AssignSlots(expert_index + off, weight + off, group_size, num_experts, k, bpr, slot + off,
                load + g * num_experts, &order);
  }
}

void CpuRouterLogitsBackward(const float* y, const int32_t* expert_index, const int32_t* row,
                             const float* d_weight, const float* dz_loss, float* dz, int64_t tokens,
                             int num_experts, int k) {
#pragma omp parallel for schedule(static) if (tokens * num_experts > 32768)
  for (int64_t t = 0; t < tokens; ++t) {
    rowwise::RouterLogitsBackward(y + t * num_experts, expert_index + t * k, row + t * k,
                                  d_weight + t * k, dz_loss + t * num_experts, dz + t * num_experts,
                                  num_experts, k);
  }
}

void CpuExpertGemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                   const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
                   int64_t ldc) {
  CHECK(alpha == 1.0f && (beta == 0.0f || beta == 1.0f))
      << "expert_gemm takes alpha 1 and beta 0 or 1, got alpha " << alpha << " beta " << beta;
  BlockedGemm(trans_a, trans_b, m, n, k, a, lda, b, ldb, beta == 1.0f, c, ldc);
}

OpsTable MakeCpuOps() {
  OpsTable t{};
  t.name = "cpu";
  t.gemm = &Gemm;
  t.gemm_strided_batched = &GemmStridedBatched;
  t.router_gemm = &RowInvariantGemmNT;
  t.add_bias = &AddBias;
  t.bias_backward = &BiasBackward;
  t.add = &Add;
  t.axpy = &Axpy;
  t.sum_of_squares = &SumOfSquares;
  t.sum_of_squares_many = [](const float* const* x, const int64_t* n, int64_t count, double* out) {
    for (int64_t i = 0; i < count; ++i) out[i] = SumOfSquares(x[i], n[i]);
  };
  t.softmax_forward = &SoftmaxForward;
  t.softmax_backward = &SoftmaxBackward;
  t.layer_norm_forward = &CpuLayerNormForward;
  t.layer_norm_backward = &LayerNormBackward;
  t.gelu_forward = &CpuGeluForward;
  t.gelu_backward = &CpuGeluBackward;
  t.tanh_forward = &CpuTanhForward;
  t.tanh_backward = &CpuTanhBackward;
  t.bias_gelu_forward = &BiasGeluForward;
  t.gelu_bias_backward = &GeluBiasBackward;
  t.bias_gelu_forward_keep_grad = &BiasGeluForwardKeepGrad;
  t.scale_bias_backward = &ScaleBiasBackward;
  t.attention_forward = &AttentionForward;
  t.attention_backward = &AttentionBackward;
  t.choice_attention_forward = &CpuChoiceAttentionForward;
  t.choice_attention_backward = &CpuChoiceAttentionBackward;
  t.zero_dropped_rows = &CpuZeroDroppedRows;
  t.top_k = &CpuTopK;
  t.add_router_noise = &AddRouterNoise;
  t.assign_slots = &CpuAssignSlots;
  t.plan_rows = &PlanRows;
  t.router_logits_backward = &CpuRouterLogitsBackward;
  t.pack_rows = &CpuPackRows;
  t.combine_rows = &GatherKeptRows;
  t.combine_rows_backward = &CpuCombineRowsBackward;
  t.adamw_step = &AdamWUpdate;
  t.adamw_step_many = &AdamWUpdateMany;
  t.for_each_expert = &ParallelOverItems;
  t.expert_gemm = &CpuExpertGemm;
  return t;
}

const OpsTable kCpuOps = MakeCpuOps();

// dst [rows, cols] packed <- bf16-rounded src [rows, cols] with rows `ld` apart.
void RoundedCopy(const float* src, int64_t rows, int64_t cols, int64_t ld, float* dst) {
#pragma omp parallel for schedule(static) if (rows * cols > 65536)
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c)
      dst[r * cols + c] = BF16ToFloat(FloatToBF16(src[r * ld + c]));
  }
}

// `batch` matrices (stride 0: one shared) rounded into `buf`; returns the packed stride.
int64_t RoundedBatch(const float* src, int64_t rows, int64_t cols, int64_t ld, int64_t stride,
                     int64_t batch, std::vector<float>* buf) {
  const int64_t count = stride == 0 ? 1 : batch;
  buf->resize(static_cast<size_t>(count * rows * cols));
  for (int64_t i = 0; i < count; ++i) {
    RoundedCopy(src + i * stride, rows, cols, ld, buf->data() + i * rows * cols);
  }
  return stride == 0 ? 0 : rows * cols;
}

void CpuBf16GemmStridedBatched(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
                               float alpha, const float* a, int64_t lda, int64_t stride_a,
                               const float* b, int64_t ldb, int64_t stride_b, float beta, float* c,
                               int64_t ldc, int64_t stride_c, int64_t batch) {
  thread_local std::vector<float> ra, rb;
  const int64_t a_rows = trans_a ? k : m, a_cols = trans_a ? m : k;
  const int64_t b_rows = trans_b ? n : k, b_cols = trans_b ? k : n;
  const int64_t sa = RoundedBatch(a, a_rows, a_cols, lda, stride_a, batch, &ra);
  const int64_t sb = RoundedBatch(b, b_rows, b_cols, ldb, stride_b, batch, &rb);
  GemmStridedBatched(trans_a, trans_b, m, n, k, alpha, ra.data(), a_cols, sa, rb.data(), b_cols, sb,
                     beta, c, ldc, stride_c, batch);
}

void CpuBf16Gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                 const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
                 int64_t ldc) {
  CpuBf16GemmStridedBatched(trans_a, trans_b, m, n, k, alpha, a, lda, 0, b, ldb, 0, beta, c, ldc, 0,
                            1);
}

OpsTable MakeCpuBf16Ops() {
  OpsTable t = kCpuOps;
  t.name = "cpu-bf16";
  t.gemm = &CpuBf16Gemm;
  t.gemm_strided_batched = &CpuBf16GemmStridedBatched;
  t.expert_gemm = nullptr;  // the experts' GEMMs too take bf16-rounded operands
  return t;
}

bool& Bf16Gemms() {
  static bool on = false;
  return on;
}

std::array<const OpsTable*, 2>& Tables() {
  static std::array<const OpsTable*, 2> tables = {&kCpuOps, nullptr};
  return tables;
}

// Per device: the registered table whose bf16-GEMM variant is known, and that variant.
std::array<std::pair<const OpsTable*, const OpsTable*>, 2>& Bf16Variants() {
  static std::array<std::pair<const OpsTable*, const OpsTable*>, 2> variants = {
      {{&kCpuOps, &CpuBf16GemmOps()}, {nullptr, nullptr}}};
  return variants;
}

// The one device of an op's tensors (undefined ones skipped); dies naming a mismatch.
Device OneDevice(const char* op, std::initializer_list<const Tensor*> tensors) {
  const Tensor* first = nullptr;
  for (const Tensor* t : tensors) {
    if (t == nullptr || !t->defined()) continue;
    if (first == nullptr) {
      first = t;
    } else {
      CHECK(t->device() == first->device())
          << "ops::" << op << ": operands on different devices: " << first->ShapeString() << " ("
          << DeviceName(first->device()) << ") and " << t->ShapeString() << " ("
          << DeviceName(t->device()) << "); copy them to one device with To()";
    }
  }
  CHECK(first != nullptr) << "ops::" << op << " without tensors";
  return first->device();
}

// The implementation `entry` of `device`'s table; dies naming what is missing.
template <typename Fn>
Fn Impl(const char* op, Device device, Fn OpsTable::*entry) {
  return OpEntry(Ops(device), entry, op);
}

void EnsureOn(Tensor* t, const Shape& shape, Device device) {
  if (!t->defined() || t->shape() != shape || t->dtype() != DType::kF32 || t->device() != device) {
    *t = Tensor::Empty(shape, DType::kF32, device);
  }
}

}  // namespace

void RegisterOps(Device device, const OpsTable* table) {
  Tables()[static_cast<size_t>(device)] = table;
}

void RegisterBf16GemmOps(Device device, const OpsTable* table, const OpsTable* bf16_variant) {
  Bf16Variants()[static_cast<size_t>(device)] = {table, bf16_variant};
}

bool HasBf16GemmOps(Device device) {
  const auto& [base, variant] = Bf16Variants()[static_cast<size_t>(device)];
  return variant != nullptr && OpsFor(device) == base;
}

const OpsTable* OpsFor(Device device) { return Tables()[static_cast<size_t>(device)]; }

const OpsTable& CpuBf16GemmOps() {
  static const OpsTable table = MakeCpuBf16Ops();
  return table;
}

bool SetBf16Gemms(bool on) {
  const bool before = Bf16Gemms();
  Bf16Gemms() = on;
  return before;
}

const OpsTable& Ops(Device device) {
  if (Bf16Gemms() && HasBf16GemmOps(device)) {
    return *Bf16Variants()[static_cast<size_t>(device)].second;
  }
  const OpsTable* table = OpsFor(device);
  CHECK(table != nullptr) << "no " << DeviceName(device)
                          << " implementations are registered in this process (run with "
                             "--device "
                          << DeviceName(device) << " in a build with its kernels)";
  return *table;
}

namespace {

// What the composed attentions' backward scratch holds at most (at least one image's).
constexpr int64_t kComposedScratchBytes = int64_t{256} << 20;

// One operand of the attention's GEMMs: image i's head h at p + i * image + h * head, rows
// ld apart.
struct HeadOperand {
  const float* p;
  int64_t ld, image, head;
};

// C[i][h] = alpha op(A[i][h]) op(B[i][h]) for every image i < images and head h < heads: one
// strided batched GEMM per head over the images, or per image over the heads, whichever
// makes fewer calls (on a GPU, launches: a ViT's 12 heads rather than its batch's images).
void HeadGemms(const OpsTable& ops, bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha,
               HeadOperand a, HeadOperand b, float* c, int64_t ldc, int64_t c_image, int64_t c_head,
               int64_t images, int64_t heads) {
  auto gemm = MOERUN_OP(ops, gemm_strided_batched);
  if (images >= heads) {
    for (int64_t h = 0; h < heads; ++h) {
      gemm(ta, tb, m, n, k, alpha, a.p + h * a.head, a.ld, a.image, b.p + h * b.head, b.ld, b.image,
           0.0f, c + h * c_head, ldc, c_image, images);
    }
  } else {
    for (int64_t i = 0; i < images; ++i) {
      gemm(ta, tb, m, n, k, alpha, a.p + i * a.image, a.ld, a.head, b.p + i * b.image, b.ld, b.head,
           0.0f, c + i * c_image, ldc, c_head, heads);
    }
  }
}

// Of `items` items of `bytes` each, how many the composed backward's scratch holds at once.
int64_t ItemsInScratch(int64_t items, int64_t bytes) {
  return std::max<int64_t>(1, std::min(items, kComposedScratchBytes / std::max<int64_t>(1, bytes)));
}

}  // namespace

int64_t ComposedAttentionScratchImages(int64_t batch, int64_t tokens, int64_t heads) {
  return ItemsInScratch(batch, heads * tokens * tokens * 4);
}

int64_t ComposedAttentionScratchBytes(int64_t batch, int64_t tokens, int64_t heads) {
  return ComposedAttentionScratchImages(batch, tokens, heads) * heads * tokens * tokens * 4;
}

void ComposedAttentionForward(const OpsTable& ops, const float* qkv, float* out, float* probs,
                              int64_t batch, int64_t tokens, int64_t heads, int64_t head_dim) {
  const int64_t n = tokens, w = head_dim, d = heads * w, ld = 3 * d, nn = n * n;
  const float scale = 1.0f / std::sqrt(static_cast<float>(w));
  // S = scale q k^T per image and head (heads w columns apart in qkv's rows), into probs.
  HeadGemms(ops, false, true, n, n, w, scale, {qkv, ld, n * ld, w}, {qkv + d, ld, n * ld, w}, probs,
            n, heads * nn, nn, batch, heads);
  MOERUN_OP(ops, softmax_forward)(probs, probs, batch * heads * n, n);
  // out_h = P_h v_h, into the head's columns of the sequence's rows.
  HeadGemms(ops, false, false, n, w, n, 1.0f, {probs, n, heads * nn, nn},
            {qkv + 2 * d, ld, n * ld, w}, out, d, n * d, w, batch, heads);
}

void ComposedAttentionBackward(const OpsTable& ops, const float* qkv, const float* probs,
                               const float* dout, float* dqkv, float* scratch,
                               int64_t scratch_images, int64_t batch, int64_t tokens, int64_t heads,
                               int64_t head_dim) {
  CHECK_GE(scratch_images, 1) << "the attention's backward needs scratch for an image at least";
  const int64_t n = tokens, w = head_dim, d = heads * w, ld = 3 * d, nn = n * n;
  const float scale = 1.0f / std::sqrt(static_cast<float>(w));
  auto softmax_backward = MOERUN_OP(ops, softmax_backward);
  for (int64_t b0 = 0; b0 < batch; b0 += scratch_images) {
    const int64_t nb = std::min(scratch_images, batch - b0);
    const float* q = qkv + b0 * n * ld;
    const float* p = probs + b0 * heads * nn;
    const float* dO = dout + b0 * n * d;
    float* dq = dqkv + b0 * n * ld;
    // dP = dO v^T (into scratch), dv = P^T dO.
    HeadGemms(ops, false, true, n, n, w, 1.0f, {dO, d, n * d, w}, {q + 2 * d, ld, n * ld, w},
              scratch, n, heads * nn, nn, nb, heads);
    HeadGemms(ops, true, false, n, w, n, 1.0f, {p, n, heads * nn, nn}, {dO, d, n * d, w},
              dq + 2 * d, ld, n * ld, w, nb, heads);
    // dS = P (dP - rowsum(P dP)); dq = scale dS k, dk = scale dS^T q.
    softmax_backward(p, scratch, scratch, nb * heads * n, n);
    HeadGemms(ops, false, false, n, w, n, scale, {scratch, n, heads * nn, nn},
              {q + d, ld, n * ld, w}, dq, ld, n * ld, w, nb, heads);
    HeadGemms(ops, true, false, n, w, n, scale, {scratch, n, heads * nn, nn}, {q, ld, n * ld, w},
              dq + d, ld, n * ld, w, nb, heads);
  }
}

void ComposedAttentionBackward(const OpsTable& ops, Device device, const float* qkv,
                               const float* probs, const float* dout, float* dqkv, int64_t batch,
                               int64_t tokens, int64_t heads, int64_t head_dim) {
  const int64_t images = ComposedAttentionScratchImages(batch, tokens, heads);
  Tensor scratch = Tensor::Empty({images, heads, tokens, tokens}, DType::kF32, device);
  ComposedAttentionBackward(ops, qkv, probs, dout, dqkv, scratch.device_data<float>(device), images,
                            batch, tokens, heads, head_dim);
  // scratch is freed on return: on a GPU in stream order, after the GEMMs (Backend::Free).
}

int64_t ComposedChoiceAttentionScratchSequences(int64_t sequences, int64_t k, int64_t seq_len) {
  return ItemsInScratch(sequences, seq_len * k * seq_len * 4);
}

int64_t ComposedChoiceAttentionScratchBytes(int64_t sequences, int64_t k, int64_t seq_len) {
  return ComposedChoiceAttentionScratchSequences(sequences, k, seq_len) * seq_len * k * seq_len * 4;
}

// Per sequence b: Q_b [n k, dh] (its choices' queries, rows dh apart), K_b and V_b [n, dh]
// (its tokens' rows of kv, 2 dh apart), P_b [n k, n].
void ComposedChoiceAttentionForward(const OpsTable& ops, const float* q, const float* kv,
                                    const int32_t* row, int64_t tokens, int64_t k, int64_t head_dim,
                                    int64_t seq_len, float* probs, float* out) {
  const int64_t n = seq_len, dh = head_dim, nk = n * k, sequences = tokens / seq_len;
  const float scale = 1.0f / std::sqrt(static_cast<float>(dh));
  auto gemm = MOERUN_OP(ops, gemm_strided_batched);
  gemm(false, true, nk, n, dh, scale, q, dh, nk * dh, kv, 2 * dh, n * 2 * dh, 0.0f, probs, n,
       nk * n, sequences);
  MOERUN_OP(ops, softmax_forward)(probs, probs, tokens * k, n);
  MOERUN_OP(ops, zero_dropped_rows)(row, probs, tokens * k, n);
  gemm(false, false, nk, dh, n, 1.0f, probs, n, nk * n, kv + dh, 2 * dh, n * 2 * dh, 0.0f, out, dh,
       nk * dh, sequences);
}

// dP = d_out V^T, dS = P (dP - rowsum(P dP)) (zero on a dropped choice's row, as P is),
// d_q = scale dS K, d_k = scale dS^T Q, d_v = P^T d_out.
void ComposedChoiceAttentionBackward(const OpsTable& ops, const float* q, const float* kv,
                                     const int32_t* row, const float* probs, const float* d_out,
                                     int64_t tokens, int64_t k, int64_t head_dim, int64_t seq_len,
                                     float* d_q, float* d_kv, float* scratch,
                                     int64_t scratch_sequences) {
  CHECK_GE(scratch_sequences, 1) << "the choice attention's backward needs scratch for a sequence";
  (void)row;  // dropped choices' rows of P are zero (the forward's)
  const int64_t n = seq_len, dh = head_dim, nk = n * k, sequences = tokens / seq_len;
  const float scale = 1.0f / std::sqrt(static_cast<float>(dh));
  auto gemm = MOERUN_OP(ops, gemm_strided_batched);
  auto softmax_backward = MOERUN_OP(ops, softmax_backward);
  for (int64_t s0 = 0; s0 < sequences; s0 += scratch_sequences) {
    const int64_t ns = std::min(scratch_sequences, sequences - s0);
    const float* qs = q + s0 * nk * dh;
    const float* kvs = kv + s0 * n * 2 * dh;
    const float* ps = probs + s0 * nk * n;
    const float* dos = d_out + s0 * nk * dh;
    float* dqs = d_q + s0 * nk * dh;
    float* dkvs = d_kv + s0 * n * 2 * dh;
    gemm(false, true, nk, n, dh, 1.0f, dos, dh, nk * dh, kvs + dh, 2 * dh, n * 2 * dh, 0.0f,
         scratch, n, nk * n, ns);
    softmax_backward(ps, scratch, scratch, ns * nk, n);
    gemm(false, false, nk, dh, n, scale, scratch, n, nk * n, kvs, 2 * dh, n * 2 * dh, 0.0f, dqs, dh,
         nk * dh, ns);
    gemm(true, false, n, dh, nk, scale, scratch, n, nk * n, qs, dh, nk * dh, 0.0f, dkvs, 2 * dh,
         n * 2 * dh, ns);
    gemm(true, false, n, dh, nk, 1.0f, ps, n, nk * n, dos, dh, nk * dh, 0.0f, dkvs + dh, 2 * dh,
         n * 2 * dh, ns);
  }
}

void ComposedChoiceAttentionBackward(const OpsTable& ops, Device device, const float* q,
                                     const float* kv, const int32_t* row, const float* probs,
                                     const float* d_out, int64_t tokens, int64_t k,
                                     int64_t head_dim, int64_t seq_len, float* d_q, float* d_kv) {
  const int64_t sequences = ComposedChoiceAttentionScratchSequences(tokens / seq_len, k, seq_len);
  Tensor scratch = Tensor::Empty({sequences, seq_len * k, seq_len}, DType::kF32, device);
  ComposedChoiceAttentionBackward(ops, q, kv, row, probs, d_out, tokens, k, head_dim, seq_len, d_q,
                                  d_kv, scratch.device_data<float>(device), sequences);
}

namespace {
bool KeepsGrad(const OpsTable& table) {
  return table.bias_gelu_forward_keep_grad != nullptr && table.scale_bias_backward != nullptr;
}
}  // namespace

void BiasGeluSaving(const OpsTable& table, float* h, const float* bias, float* act, int64_t rows,
                    int64_t cols, bool tanh_form) {
  if (KeepsGrad(table)) {
    MOERUN_OP(table, bias_gelu_forward_keep_grad)(h, bias, act, rows, cols, tanh_form);
  } else {
    MOERUN_OP(table, bias_gelu_forward)(h, bias, act, rows, cols, tanh_form);
  }
}

void GeluBiasBackwardFromSaved(const OpsTable& table, const float* saved, float* d, float* dbias,
                               int64_t rows, int64_t cols, bool tanh_form) {
  if (KeepsGrad(table)) {
    MOERUN_OP(table, scale_bias_backward)(saved, d, dbias, rows, cols);
  } else {
    MOERUN_OP(table, gelu_bias_backward)(saved, d, dbias, rows, cols, tanh_form);
  }
}

void CopyFloats(Device device, float* dst, const float* src, int64_t n) {
  if (device == Device::kCPU) {
    std::copy_n(src, n, dst);
  } else {
    RequireBackend(device).CopyWithin(dst, src, n * sizeof(float));
  }
}

void CopyRows(Device device, float* dst, int64_t dst_stride, const float* src, int64_t src_stride,
              int64_t row_floats, int64_t rows) {
  CHECK(row_floats <= dst_stride && row_floats <= src_stride)
      << "rows of " << row_floats << " floats, strides " << dst_stride << " and " << src_stride;
  if (rows <= 0 || row_floats <= 0) return;
  if (device == Device::kCPU) {
    for (int64_t r = 0; r < rows; ++r) {
      std::copy_n(src + r * src_stride, row_floats, dst + r * dst_stride);
    }
    return;
  }
  const size_t f = sizeof(float);
  RequireBackend(device).CopyWithin2D(dst, dst_stride * f, src, src_stride * f, row_floats * f,
                                      rows);
}

void EmbedSequences(Device device, const float* cls, const float* pos, const float* emb,
                    int64_t images, int64_t copies, int64_t tokens, int64_t d, float* scratch,
                    float* x) {
  const OpsTable& ops = Ops(device);
  const int64_t patches = tokens - 1;
  MOERUN_OP(ops, add)(cls, pos, scratch, d);
  CopyFloats(device, scratch + d, pos + d, patches * d);
  for (int64_t c = 0; c < copies; ++c) {
    CopyRows(device, x + c * images * tokens * d + d, tokens * d, emb, patches * d, patches * d,
             images);
  }
  MOERUN_OP(ops, add_bias)(x, scratch, copies * images, tokens * d);
}

void AddSequenceSums(Device device, const float* g, int64_t seqs, int64_t tokens, int64_t d,
                     float* scratch, float* pos_g, float* cls_g) {
  const OpsTable& ops = Ops(device);
  MOERUN_OP(ops, bias_backward)(g, scratch, seqs, tokens * d);
  MOERUN_OP(ops, axpy)(1.0f, scratch, pos_g, tokens * d);
  MOERUN_OP(ops, axpy)(1.0f, scratch, cls_g, d);
}

void WithHostFloats(Tensor* t, bool read, const std::function<void(float*)>& f) {
  if (t->device() == Device::kCPU) {
    f(t->data<float>());
    return;
  }
  Tensor host = read ? t->To(Device::kCPU) : Tensor::Empty(t->shape());
  f(host.data<float>());
  t->CopyFrom(host);
}

namespace ops {

void PackRows(const RoutingPlan& plan, const Tensor& x, Tensor* buf) {
  const Tensor& row = plan.row;
  const Device device = OneDevice("PackRows", {&row, &x});
  const int64_t w = x.dim(1), rows = plan.num_experts * plan.rows_per_expert();
  MOERUN_CHECK_SHAPE(row, {plan.tokens, plan.k});
  EnsureOn(buf, {plan.num_experts, plan.rows_per_expert(), w}, device);
  Impl("PackRows", device, &OpsTable::pack_rows)(row.device_data<int32_t>(device),
                                                 x.device_data<float>(device), plan.tokens, plan.k,
                                                 w, buf->device_data<float>(device), rows);
}

void ScatterChoiceRows(const RoutingPlan& plan, const Tensor& src, Tensor* buf) {
  const Tensor& row = plan.row;
  const Device device = OneDevice("ScatterChoiceRows", {&row, &src});
  const int64_t w = src.dim(-1), rows = plan.num_experts * plan.rows_per_expert();
  MOERUN_CHECK_SHAPE(row, {plan.tokens, plan.k});
  MOERUN_CHECK_SHAPE(src, {plan.tokens, plan.k, w});
  EnsureOn(buf, {plan.num_experts, plan.rows_per_expert(), w}, device);
  Impl("ScatterChoiceRows", device, &OpsTable::pack_rows)(
      row.device_data<int32_t>(device), src.device_data<float>(device), plan.tokens * plan.k, 1, w,
      buf->device_data<float>(device), rows);
}

void GatherChoiceRows(const Tensor& buf, const Tensor& row, Tensor* dst) {
  const Device device = OneDevice("GatherChoiceRows", {&buf, &row});
  const int64_t tokens = row.dim(0), k = row.dim(1), w = buf.dim(-1);
  EnsureOn(dst, {tokens, k, w}, device);
  Impl("GatherChoiceRows", device, &OpsTable::combine_rows)(
      buf.device_data<float>(device), row.device_data<int32_t>(device), nullptr, tokens * k, 1, w,
      dst->device_data<float>(device));
}

void CombineRows(const Tensor& buf, const Tensor& row, const Tensor& weight, Tensor* out) {
  const Device device = OneDevice("CombineRows", {&buf, &row, &weight, out});
  const int64_t tokens = row.dim(0), k = row.dim(1), w = buf.dim(-1);
  MOERUN_CHECK_SHAPE(*out, {tokens, w});
  Impl("CombineRows", device, &OpsTable::combine_rows)(
      buf.device_data<float>(device), row.device_data<int32_t>(device),
      weight.defined() ? weight.device_data<float>(device) : nullptr, tokens, k, w,
      out->device_data<float>(device));
}

void CombineRowsBackward(const Tensor& buf, const Tensor& row, const Tensor& weight,
                         const Tensor& dy, Tensor* d_buf, Tensor* d_weight) {
  const Device device = OneDevice("CombineRowsBackward", {&buf, &row, &weight, &dy});
  const int64_t tokens = row.dim(0), k = row.dim(1), w = buf.dim(-1);
  MOERUN_CHECK_SHAPE(dy, {tokens, w});
  EnsureOn(d_buf, buf.shape(), device);
  EnsureOn(d_weight, {tokens, k}, device);
  Impl("CombineRowsBackward", device, &OpsTable::combine_rows_backward)(
      buf.device_data<float>(device), row.device_data<int32_t>(device),
      weight.device_data<float>(device), dy.device_data<float>(device), tokens, k, w,
      d_buf->device_data<float>(device), buf.numel() / w, d_weight->device_data<float>(device));
}

void AdamWStep(const AdamWScalars& s, bool decay, const Tensor& value, const Tensor& grad,
               const Tensor& m, const Tensor& v) {
  const Device device = OneDevice("AdamWStep", {&value, &grad, &m, &v});
  CHECK(m.dtype() == v.dtype() && (m.dtype() == DType::kF32 || m.dtype() == DType::kBF16))
      << "ops::AdamWStep: moments must both be F32 or BF16, got " << m.ShapeString() << " and "
      << v.ShapeString();
  CHECK(grad.numel() == value.numel() && m.numel() == value.numel() && v.numel() == value.numel())
      << "ops::AdamWStep: sizes differ";
  Impl("AdamWStep", device, &OpsTable::adamw_step)(
      s, decay, value.device_data<float>(device), grad.device_data<float>(device), m.raw_data(),
      v.raw_data(), value.numel(), m.dtype() == DType::kBF16);
}

double GemmGflops(Device device, int64_t n, int iters, Tensor* c_out) {
  const OpsTable& table = Ops(device);
  Tensor a = Tensor::Empty({n, n}, DType::kF32, device);
  Tensor b = Tensor::Empty({n, n}, DType::kF32, device);
  Tensor c = Tensor::Empty({n, n}, DType::kF32, device);
  a.Fill(0.5f);
  b.Fill(0.25f);
  Backend& backend = RequireBackend(device);
  const auto gemm = [&] {
    MOERUN_OP(table, gemm)
    (false, false, n, n, n, 1.0f, a.device_data<float>(device), n, b.device_data<float>(device), n,
     0.0f, c.device_data<float>(device), n);
  };
  gemm();
  backend.Synchronize();
  double best = 0;
  for (int i = 0; i < iters; ++i) {
    const auto t0 = std::chrono::steady_clock::now();
    gemm();
    backend.Synchronize();
    const double s = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    best = std::max(best, 2.0 * static_cast<double>(n) * n * n / std::max(1e-9, s) / 1e9);
  }
  if (c_out != nullptr) *c_out = c;
  return best;
}

}  // namespace ops
}  // namespace moerun
