// The model's device-dependent steps behind one dispatch point each, in the spirit of
// ggml's backend ops: a table of raw-pointer implementations per device (GEMM, batched
// GEMM, bias, softmax, layer norm, GELU, self-attention, the MoE attention's per-choice
// attention, top-k, pack / combine, AdamW). Model code takes the table of the device its
// tensors live on (OpsFor) and calls its entries; ops:: below adds the Tensor form that
// checks shapes and devices. The CPU table (runtime/kernels.h, moe_dispatch.h's loops,
// AdamW's update) is always there; a device backend registers its own (the CUDA build does,
// RegisterCudaOps in model/ops_cuda.cu, when a job runs with --device cuda). An op on
// a device without a table, or whose table lacks the op, ends the job naming both.
#ifndef MOERUN_MODEL_OPS_H_
#define MOERUN_MODEL_OPS_H_

#include <glog/logging.h>

#include <cstdint>
#include <functional>
#include <memory>

#include "model/moe_experts.h"
#include "model/moe_plan.h"
#include "model/router_noise.h"
#include "runtime/optimizer.h"
#include "runtime/tensor.h"

namespace moerun {

// Raw-pointer implementations of one device; pointers are in that device's memory, all
// matrices row-major. An entry may be null (not implemented on that device yet).
struct OpsTable {
  const char* name;  // "cpu", "cuda"
  // --- dense math, runtime/kernels.h's semantics ---
  // C[m,n] = alpha op(A) op(B) + beta C (lda/ldb/ldc: row strides as stored).
  void (*gemm)(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
               const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
               int64_t ldc);
  // `batch` GEMMs, matrix i at a + i * stride_a (etc.).
  void (*gemm_strided_batched)(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
                               float alpha, const float* a, int64_t lda, int64_t stride_a,
                               const float* b, int64_t ldb, int64_t stride_b, float beta, float* c,
                               int64_t ldc, int64_t stride_c, int64_t batch);
  // c[t, j] = <a[t], b[j]> in RowInvariantDot's fixed order (the router's logits: a row's
  // result does not depend on how rows are split over ranks).
  void (*router_gemm)(const float* a, const float* b, float* c, int64_t rows, int64_t n, int64_t k);
  void (*add_bias)(float* y, const float* bias, int64_t rows, int64_t cols);         // y[r] += b
  void (*bias_backward)(const float* dy, float* dbias, int64_t rows, int64_t cols);  // db += Σ dy
  void (*add)(const float* a, const float* b, float* y, int64_t n);                  // y = a + b
  void (*axpy)(float alpha, const float* x, float* y, int64_t n);                    // y += alpha x
  // sum_i x[i]^2 in double (the gradient norm; any order).
  double (*sum_of_squares)(const float* x, int64_t n);
  // out[i] = sum_j x[i][j]^2 in double for `count` arrays (x, n and out in host memory, the
  // arrays x[i] of n[i] floats on the table's device; any order within an array): the
  // gradient norm's squares of every parameter with one wait on a device, not one each.
  void (*sum_of_squares_many)(const float* const* x, const int64_t* n, int64_t count, double* out);
  void (*softmax_forward)(const float* x, float* y, int64_t rows, int64_t cols);
  void (*softmax_backward)(const float* y, const float* dy, float* dx, int64_t rows, int64_t cols);
  void (*layer_norm_forward)(const float* x, const float* gamma, const float* beta, float* y,
                             float* mean, float* rstd, int64_t rows, int64_t cols, float eps);
  void (*layer_norm_backward)(const float* x, const float* gamma, const float* mean,
                              const float* rstd, const float* dy, float* dx, float* dgamma,
                              float* dbeta, int64_t rows, int64_t cols);
  // Exact (erf) or tanh GELU; dx may alias dy.
  void (*gelu_forward)(const float* x, float* y, int64_t n, bool tanh_form);
  void (*gelu_backward)(const float* x, const float* dy, float* dx, int64_t n, bool tanh_form);
  // y = tanh(x) (y may alias x); dx = dy (1 - y^2) from the forward's y (dx may alias dy):
  // the V-MoE pre-logits.
  void (*tanh_forward)(const float* x, float* y, int64_t n);
  void (*tanh_backward)(const float* y, const float* dy, float* dx, int64_t n);
  // A linear layer's bias and GELU in one pass (runtime/kernels.h's BiasGeluForward):
  // h[r] += bias, act = gelu(h); and its backward: d *= gelu'(h), dbias += sum of d.
  void (*bias_gelu_forward)(float* h, const float* bias, float* act, int64_t rows, int64_t cols,
                            bool tanh_form);
  void (*gelu_bias_backward)(const float* h, float* d, float* dbias, int64_t rows, int64_t cols,
                             bool tanh_form);
  // Optional, as a pair (BiasGeluSaving below): bias_gelu_forward leaving gelu'(h) in h
  // (runtime/kernels.h's BiasGeluForwardKeepGrad), and the backward from it, d *= g,
  // dbias += sum of d (ScaleBiasBackward).
  void (*bias_gelu_forward_keep_grad)(float* h, const float* bias, float* act, int64_t rows,
                                      int64_t cols, bool tanh_form);
  void (*scale_bias_backward)(const float* g, float* d, float* dbias, int64_t rows, int64_t cols);
  // Multi-head self-attention core (model/layers.h's AttentionForward / Backward).
  void (*attention_forward)(const float* qkv, float* out, float* probs, int64_t batch,
                            int64_t tokens, int64_t heads, int64_t head_dim);
  void (*attention_backward)(const float* qkv, const float* probs, const float* dout, float* dqkv,
                             int64_t batch, int64_t tokens, int64_t heads, int64_t head_dim);
  // The MoE attention's per-choice attention (model/choice_attention.h).
  void (*choice_attention_forward)(const float* q, const float* kv, const int32_t* row,
                                   int64_t tokens, int64_t k, int64_t head_dim, int64_t seq_len,
                                   float* probs, float* out);
  void (*choice_attention_backward)(const float* q, const float* kv, const int32_t* row,
                                    const float* probs, const float* d_out, int64_t tokens,
                                    int64_t k, int64_t head_dim, int64_t seq_len, float* d_q,
                                    float* d_kv);
  // x[i] = 0 for every row i of x [rows, cols] with row[i] < 0 (a dropped choice's).
  void (*zero_dropped_rows)(const int32_t* row, float* x, int64_t rows, int64_t cols);
  // The k largest gates of each token, ties to the lower expert (model/routing.h's TopK).
  void (*top_k)(const float* gates, int64_t tokens, int num_experts, int k, int32_t* expert_index,
                float* weight);
  // --- the router and the routing plan on the layer's device (MoeLayer's device routing) ---
  // zn[t, e] = z[t, e] + sigma * n[t, e], n model/router_noise.h's standard normals of
  // global tokens first_token.. (zn may alias z).
  void (*add_router_noise)(const NoiseKey& key, int64_t first_token, int64_t tokens,
                           int num_experts, float sigma, const float* z, float* zn);
  // model/routing.h's AssignSlots for every group of group_size consecutive tokens (tokens
  // a multiple of it), without padding tokens: slot [tokens, k], load [groups, num_experts].
  void (*assign_slots)(const int32_t* expert_index, const float* weight, int64_t tokens,
                       int64_t group_size, int num_experts, int k, bool bpr, int32_t* slot,
                       int32_t* load);
  // The plan's rows (model/moe_plan.h): row[i] = e * rows_per_expert + group * capacity +
  // slot for a kept choice i of token i / k (group = token / group_size), -1 past capacity.
  void (*plan_rows)(const int32_t* expert_index, const int32_t* slot, int64_t tokens, int64_t k,
                    int64_t group_size, int64_t capacity, int64_t rows_per_expert, int32_t* row);
  // The router's d(logits) from the combine weights' gradient: per token,
  // dz = dz_loss + softmax_backward(y, dg), dg[e] = the sum of d_weight over the token's
  // kept choices (row >= 0) of expert e, y the softmax the choices were taken from.
  void (*router_logits_backward)(const float* y, const int32_t* expert_index, const int32_t* row,
                                 const float* d_weight, const float* dz_loss, float* dz,
                                 int64_t tokens, int num_experts, int k);
  // --- the MoE layer's rows ---
  // buf [E*R, w] zeroed, then row r of x [T, w] copied to every kept choice's plan row.
  void (*pack_rows)(const int32_t* row, const float* x, int64_t tokens, int64_t k, int64_t w,
                    float* buf, int64_t buf_rows);
  // out[t] = sum over kept choices of weight[t, j] * buf[row[t, j]] (weight null: 1).
  void (*combine_rows)(const float* buf, const int32_t* row, const float* weight, int64_t tokens,
                       int64_t k, int64_t w, float* out);
  // d_buf zeroed, then weight * dy at every kept row; d_weight[t, j] = <dy[t], buf[row]>.
  void (*combine_rows_backward)(const float* buf, const int32_t* row, const float* weight,
                                const float* dy, int64_t tokens, int64_t k, int64_t w, float* d_buf,
                                int64_t buf_rows, float* d_weight);
  // Optional (a device's bf16 variant): the expert MLP run whole by the device
  // (FusedExperts, model/moe_experts.h), bound to an ExpertMlp's fp32 parameters and
  // gradients. Null: ExpertMlp runs the GEMM, bias and GELU entries here.
  std::unique_ptr<FusedExperts> (*make_fused_experts)(const ExpertMlpParams& params,
                                                      const ExpertMlpParams& grads, bool gelu_tanh);
  // One AdamW update of n elements (runtime/optimizer.h's semantics).
  void (*adamw_step)(const AdamWScalars& s, bool decay, float* value, const float* grad, void* m,
                     void* v, int64_t n, bool bf16_moments);
  // adamw_step over `count` arrays (runtime/optimizer.h's AdamWArray): the CPU's one array at
  // a time; a device's in one launch (runtime/adamw_thrust.h's DeviceAdamWMany), the bits of
  // adamw_step's. AdamW::Step's update of a device's parameters.
  void (*adamw_step_many)(const AdamWScalars& s, const AdamWArray* arrays, int64_t count,
                          bool bf16_moments);
  // How the expert MLP runs its experts. Null: each step batched over all the rank's
  // experts (a GPU, where one batched GEMM fills the device). Else one expert at a time,
  // so an expert's hidden activations are still in cache when its bias + GELU pass reads
  // them (a CPU): runs body(expert, worker) for each of `experts` experts, possibly several
  // at once, each on one thread (worker 0: the first), every expert's GEMMs and element-wise
  // passes inside one core (the CPU's: ParallelOverItems).
  void (*for_each_expert)(int64_t experts, const std::function<void(int64_t, int)>& body);
  // The expert MLP's GEMMs, one expert's at a time, and the router's backward products
  // (alpha 1, beta 0 or 1): gemm's semantics
  // in an order of the entry's own, the same whatever the rows' count or the thread count
  // (the CPU's: BlockedGemm, runtime/blocked_gemm.h). Null: gemm / gemm_strided_batched.
  void (*expert_gemm)(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                      const float* a, int64_t lda, const float* b, int64_t ldb, float beta,
                      float* c, int64_t ldc);
};

// Self-attention composed from a table's batched GEMM and softmax entries (S = (q k^T) /
// sqrt(dh) for every image and head, one softmax over all of S's rows, out = P v), the form
// a device without its own attention kernel uses. The GEMMs run one batched call per head
// over the images (or per image over the heads, when images are fewer). The backward works
// through the batch `scratch_images` images at a time, with a [scratch_images, heads,
// tokens, tokens] scratch on the table's device (ComposedAttentionScratchImages: about 256
// MiB of it). Tested on CI over the CPU and Thrust tables.
void ComposedAttentionForward(const OpsTable& ops, const float* qkv, float* out, float* probs,
                              int64_t batch, int64_t tokens, int64_t heads, int64_t head_dim);
void ComposedAttentionBackward(const OpsTable& ops, const float* qkv, const float* probs,
                               const float* dout, float* dqkv, float* scratch,
                               int64_t scratch_images, int64_t batch, int64_t tokens, int64_t heads,
                               int64_t head_dim);
int64_t ComposedAttentionScratchImages(int64_t batch, int64_t tokens, int64_t heads);
// The backward with that scratch allocated on `device` (freed on return, in stream order on
// a GPU), and its bytes.
void ComposedAttentionBackward(const OpsTable& ops, Device device, const float* qkv,
                               const float* probs, const float* dout, float* dqkv, int64_t batch,
                               int64_t tokens, int64_t heads, int64_t head_dim);
int64_t ComposedAttentionScratchBytes(int64_t batch, int64_t tokens, int64_t heads);

// The MoE attention's per-choice attention (choice_attention_forward / backward's semantics)
// composed the same way, per sequence: S = Q K^T / sqrt(dh) for the sequence's tokens x k
// queries over its tokens' keys, softmax, dropped choices' rows zeroed, out = P V; one
// strided batched GEMM over the sequences each. The backward takes a [scratch_sequences,
// seq_len * k, seq_len] scratch (ComposedChoiceAttentionScratchSequences: about 256 MiB).
// Unlike the per-choice kernels it reads dropped choices' rows of q and d_out (times zero
// probabilities): they must be finite (the MoE attention's are zeros).
void ComposedChoiceAttentionForward(const OpsTable& ops, const float* q, const float* kv,
                                    const int32_t* row, int64_t tokens, int64_t k, int64_t head_dim,
                                    int64_t seq_len, float* probs, float* out);
void ComposedChoiceAttentionBackward(const OpsTable& ops, const float* q, const float* kv,
                                     const int32_t* row, const float* probs, const float* d_out,
                                     int64_t tokens, int64_t k, int64_t head_dim, int64_t seq_len,
                                     float* d_q, float* d_kv, float* scratch,
                                     int64_t scratch_sequences);
int64_t ComposedChoiceAttentionScratchSequences(int64_t sequences, int64_t k, int64_t seq_len);
// The backward with that scratch allocated on `device`, and its bytes.
void ComposedChoiceAttentionBackward(const OpsTable& ops, Device device, const float* q,
                                     const float* kv, const int32_t* row, const float* probs,
                                     const float* d_out, int64_t tokens, int64_t k,
                                     int64_t head_dim, int64_t seq_len, float* d_q, float* d_kv);
int64_t ComposedChoiceAttentionScratchBytes(int64_t sequences, int64_t k, int64_t seq_len);

// Installs `table` for `device` (kept by pointer; lives for the process). Replaces an
// earlier table of that device.
void RegisterOps(Device device, const OpsTable* table);
// The table of `device`, or nullptr.
const OpsTable* OpsFor(Device device);
// The table of `device`; dies naming the device when none is registered. Under bf16 GEMMs
// (SetBf16Gemms) the CPU's table is its bf16 variant (CpuBf16GemmOps).
const OpsTable& Ops(Device device);

// train.precision BF16: from now on, Ops(device)'s GEMM entries round both operands to
// bf16 (nearest even) and multiply them with fp32 sums and outputs, on every device with a
// bf16 variant of its registered table (the CPU's emulates it, CUDA's casts and runs bf16
// cuBLAS GEMMs); every other entry is the device table's. Process-wide (a process trains
// one model); the Trainer sets it for its lifetime. Returns the previous setting.
bool SetBf16Gemms(bool on);
// `bf16_variant` is `table` with bf16-operand GEMMs (used while `table` is registered).
void RegisterBf16GemmOps(Device device, const OpsTable* table, const OpsTable* bf16_variant);
// Whether `device`'s registered table has a bf16 variant.
bool HasBf16GemmOps(Device device);
// The CPU table with bf16-operand GEMMs (what Ops(kCPU) is under SetBf16Gemms(true)).
const OpsTable& CpuBf16GemmOps();
// `table`'s entry `entry`; dies naming the op and the table when it is null.
template <typename Fn>
Fn OpEntry(const OpsTable& table, Fn OpsTable::*entry, const char* op) {
  CHECK(table.*entry != nullptr) << "op " << op << " is not implemented on " << table.name
                                 << " yet";
  return table.*entry;
}
// MOERUN_OP(ops, gemm)(...): the checked call of one entry.
#define MOERUN_OP(table, entry) ::moerun::OpEntry((table), &::moerun::OpsTable::entry, #entry)
// The table's expert_gemm where it has one, else its gemm (the same signature), checked as
// OpEntry: for the products that run on the CPU's BlockedGemm (the experts', the router's
// backward).
inline decltype(OpsTable::gemm) ExpertGemmOrGemm(const OpsTable& table) {
  const bool own = table.expert_gemm != nullptr;
  return OpEntry(table, own ? &OpsTable::expert_gemm : &OpsTable::gemm,
                 own ? "expert_gemm" : "gemm");
}

// A linear layer's bias + GELU: h[r] += bias, act = gelu(h), leaving in h what
// GeluBiasBackwardFromSaved needs: gelu'(h) where the table has the keep-grad pair (the
// backward is then one product), else h. Both calls must see the same table.
void BiasGeluSaving(const OpsTable& table, float* h, const float* bias, float* act, int64_t rows,
                    int64_t cols, bool tanh_form);
// Its backward: d *= gelu'(h) in place, dbias += sum over rows of d; `saved` is the h that
// BiasGeluSaving left.
void GeluBiasBackwardFromSaved(const OpsTable& table, const float* saved, float* d, float* dbias,
                               int64_t rows, int64_t cols, bool tanh_form);

// n floats from src to dst, both in `device`'s memory.
void CopyFloats(Device device, float* dst, const float* src, int64_t n);
// `rows` rows of `row_floats` floats from src to dst, both in `device`'s memory, the rows
// `src_stride` and `dst_stride` floats apart (both >= row_floats; regions apart): one 2D copy
// on a device (Backend::CopyWithin2D) instead of one copy per row.
void CopyRows(Device device, float* dst, int64_t dst_stride, const float* src, int64_t src_stride,
              int64_t row_floats, int64_t rows);
// Runs `f` over t's floats on the host: t's own for a host tensor; for a device tensor a
// host copy (holding t's values when `read`), copied back into t afterwards. The models'
// host-side glue (losses, labels, small element-wise steps) reaches device tensors this way.
void WithHostFloats(Tensor* t, bool read, const std::function<void(float*)>& f);
// The embedded sequences: x [copies * images, tokens, d] (zeroed by the caller) gets, for
// sequence q, [cls + pos[0], emb[q % images] + pos[1:]] (emb [images, tokens - 1, d]): the
// patches' rows placed by one strided copy per copy of the batch, then one bias add of
// [cls + pos[0], pos[1:]] (into `scratch`: tokens * d floats) over every sequence, all on
// `device`; the same sums as two adds per sequence. The forward of AddSequenceSums.
void EmbedSequences(Device device, const float* cls, const float* pos, const float* emb,
                    int64_t images, int64_t copies, int64_t tokens, int64_t d, float* scratch,
                    float* x);
// The embeddings' shared gradients of `seqs` sequences of `tokens` x `d` (g, contiguous):
// pos_g[tokens * d] += sum over sequences, cls_g[d] += the sum of their first (class)
// tokens. One column-sum op over all sequences (into `scratch`: tokens * d zeroed floats)
// and two axpys, all on `device`, instead of per-sequence calls.
void AddSequenceSums(Device device, const float* g, int64_t seqs, int64_t tokens, int64_t d,
                     float* scratch, float* pos_g, float* cls_g);

namespace ops {

// buf [E, rows_per_expert, w] on x's device (allocated if needed) <- x [T, w] per the plan.
// plan.row must be on x's device.
void PackRows(const RoutingPlan& plan, const Tensor& x, Tensor* buf);
// out [T, w] <- the weighted sum of each token's kept rows of buf (weight undefined: 1).
void CombineRows(const Tensor& buf, const Tensor& row, const Tensor& weight, Tensor* out);
// d_buf [like buf] and d_weight [T, k] from dy [T, w].
void CombineRowsBackward(const Tensor& buf, const Tensor& row, const Tensor& weight,
                         const Tensor& dy, Tensor* d_buf, Tensor* d_weight);
// The MoE attention's per-choice rows (row [T, k] a plan's rows, on the tensors' device):
// buf [E, rows_per_expert, w] (allocated if needed) zeroed, then src [T, k, w]'s row
// (t, j) at plan row row[t, j] (pack_rows over T * k single choices);
void ScatterChoiceRows(const RoutingPlan& plan, const Tensor& src, Tensor* buf);
// and dst [T, k, w] (allocated if needed) <- buf's row row[t, j], zero for dropped choices
// (combine_rows over T * k single choices).
void GatherChoiceRows(const Tensor& buf, const Tensor& row, Tensor* dst);
// AdamW on one parameter (value, grad, m, v on one device; m and v of `moments` dtype).
void AdamWStep(const AdamWScalars& s, bool decay, const Tensor& value, const Tensor& grad,
               const Tensor& m, const Tensor& v);
// GFLOP/s of `device`'s gemm entry (the table in force: under SetBf16Gemms its bf16 variant)
// at n x n x n, the best of `iters` timed calls after one warm-up, each waited for (the
// backend's Synchronize). `c_out`, when given, receives C = A B for A = 0.5, B = 0.25.
double GemmGflops(Device device, int64_t n, int iters, Tensor* c_out = nullptr);

}  // namespace ops
}  // namespace moerun

#endif  // MOERUN_MODEL_OPS_H_
