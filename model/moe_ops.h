// The MoE layer's device-dependent steps behind one dispatch point each, in the spirit of
// ggml's backend ops: an op checks that its tensors live on one device and runs that
// device's implementation from a table. The CPU table (moe_dispatch.h's loops, AdamW's
// update) is always there; a device backend registers its own table (the CUDA kernels do,
// RegisterCudaMoeOps in model/routing_cuda.cu, when a job runs with --device cuda). An
// op on a device without a table, or whose table lacks the op, ends the job naming both.
#ifndef MOERUN_MODEL_MOE_OPS_H_
#define MOERUN_MODEL_MOE_OPS_H_

#include <cstdint>

#include "model/moe_plan.h"
#include "runtime/optimizer.h"
#include "runtime/tensor.h"

namespace moerun {

// Raw-pointer implementations of one device; pointers are in that device's memory. An
// entry may be null (not implemented on that device yet).
struct MoeOpsTable {
  const char* name;  // "cpu", "cuda"
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
  // One AdamW update of n elements (runtime/optimizer.h's semantics).
  void (*adamw_step)(const AdamWScalars& s, bool decay, float* value, const float* grad, void* m,
                     void* v, int64_t n, bool bf16_moments);
};

// Installs `table` for `device` (kept by pointer; lives for the process). Replaces an
// earlier table of that device.
void RegisterMoeOps(Device device, const MoeOpsTable* table);
// The table of `device`, or nullptr.
const MoeOpsTable* MoeOpsFor(Device device);

namespace ops {

// buf [E, rows_per_expert, w] on x's device (allocated if needed) <- x [T, w] per the plan.
// plan.row must be on x's device.
void PackRows(const RoutingPlan& plan, const Tensor& x, Tensor* buf);
// out [T, w] <- the weighted sum of each token's kept rows of buf (weight undefined: 1).
void CombineRows(const Tensor& buf, const Tensor& row, const Tensor& weight, Tensor* out);
// d_buf [like buf] and d_weight [T, k] from dy [T, w].
void CombineRowsBackward(const Tensor& buf, const Tensor& row, const Tensor& weight,
                         const Tensor& dy, Tensor* d_buf, Tensor* d_weight);
// AdamW on one parameter (value, grad, m, v on one device; m and v of `moments` dtype).
void AdamWStep(const AdamWScalars& s, bool decay, const Tensor& value, const Tensor& grad,
               const Tensor& m, const Tensor& v);

}  // namespace ops
}  // namespace moerun

#endif  // MOERUN_MODEL_MOE_OPS_H_
