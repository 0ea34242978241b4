// Mod-Squad's mixture of attention heads (shared/specs/models.md), expert-parallel through
// the same router, routing plan and dispatcher as the MoE MLP:
//   - a task gate per token (p = softmax(x W_task^T) + 1e-4) picks k = heads experts;
//   - expert e owns a query projection Wq_e [dh, D] and an output projection Wo_e [D, dh]
//     (no biases); one shared key/value projection kv = x Wkv^T + b [T, 2 dh] (multi-query);
//   - each kept choice j of token s gives the query q = Wq_e x_s (computed on e's rank),
//     which attends over the keys of s's own sequence (L tokens) on s's rank:
//     a = softmax(q K^T / sqrt(dh)) V; then o = Wo_e a (on e's rank again);
//   - y_s = sum over kept choices of p[s, e_j] * o_j.
// So a forward is two round trips: x out / q back, a out / o back (four all-to-alls), and
// the backward the same in reverse. Choices dropped by the capacity contribute nothing.
// Everything but the router runs on the ops of config.device (model/ops.h).
#ifndef MOERUN_MODEL_MOE_ATTENTION_H_
#define MOERUN_MODEL_MOE_ATTENTION_H_

#include <memory>

#include "model/moe_aux.h"
#include "model/moe_device_routing.h"
#include "model/moe_dispatch.h"
#include "model/moe_layer.h"
#include "model/moe_plan.h"
#include "model/moe_router.h"

namespace moerun {

struct MoeAttentionConfig {
  int d = 0;         // model width
  int head_dim = 0;  // dh
  int num_experts = 0;
  int k = 0;  // heads per token
  int tasks = 1;
  CapacityRule capacity;
  AuxWeights aux;  // importance / gshard / z / mi (no noise, so no load loss)
  // Where the projections, rows, per-choice attention and router GEMMs live. On a device,
  // without padding tokens or given noise, the task softmax and the plan run there too
  // (DeviceRouting, as MoeLayerConfig::device): the host computes the auxiliary losses from
  // one copy of the tables, once the forward is queued (dropless: it waits for the copy
  // before the rows), and the backward has no host wait. Otherwise the gates and plan are
  // the host's.
  Device device = Device::kCPU;
};

struct MoeAttentionParams {
  Tensor router_weight;  // [tasks, E, D], replicated
  Tensor q_weight;       // [E_local, dh, D]
  Tensor o_weight;       // [E_local, D, dh]
  Tensor kv_weight;      // [2 dh, D], replicated: rows 0..dh-1 keys, dh..2dh-1 values
  Tensor kv_bias;        // [2 dh]
};

class MoeAttention {
 public:
  MoeAttention(const MoeAttentionConfig& config, std::shared_ptr<MoeGroups> groups);
  ~MoeAttention() { ResolveDeviceTimers(); }  // as MoeLayer's

  const MoeAttentionConfig& config() const { return config_; }
  MoeAttentionConfig& mutable_config() { return config_; }
  MoeAttentionParams& params() { return params_; }
  MoeAttentionParams& grads() { return grads_; }
  void ZeroGradients();
  // Drops the saved input x (as MoeLayer::ReleaseInput).
  void ReleaseInput() {
    x_ = Tensor();
    router_.ReleaseInput();
  }

  // x, y: [T, D], T = sequences x seq_len; args.task gives every token's task. An error
  // (before any communication) for a bad group size, capacity or task id.
  Status Forward(const Tensor& x, int64_t seq_len, const MoeForwardArgs& args, Tensor* y);
  // dx overwritten; parameter gradients (and the auxiliary losses') accumulate.
  void Backward(const Tensor& dy, Tensor* dx);
  void ReduceReplicaGradients();

  const MoeLosses& losses() const { return aux_.losses(); }
  const MoeMetrics& metrics() const { return aux_.metrics(); }
  const MoeAuxLosses& aux() const { return aux_; }
  const Router& router() const { return router_; }
  const RoutingPlan& plan() const { return plan_; }
  // Of the last forward: [T, K, dh] per-choice queries and attention outputs (zero for
  // dropped choices).
  const Tensor& queries() const { return q_tok_; }
  const Tensor& head_outputs() const { return a_tok_; }
  // The usage EMA [tasks, E] (moe_aux.h), updated by training forwards.
  Tensor& usage() { return aux_.usage(); }
  // On a device, the times of device timers land at ResolveDeviceTimers().
  MoeTimers& timers() { return timers_; }
  // Whether the last forward routed on the device (MoeAttentionConfig::device).
  bool routed_on_device() const { return device_routed_; }

 private:
  MoeAttentionConfig config_;
  std::shared_ptr<MoeGroups> groups_;
  Router router_;
  RoutingPlan plan_;
  RoutingPlan device_plan_;  // plan_ with its rows and weights on the layer's device
  Dispatcher dispatcher_;
  MoeAuxLosses aux_;
  MoeAttentionParams params_, grads_;
  MoeTimers timers_;
  // Saved by Forward.
  Tensor x_;
  int64_t seq_len_ = 0;
  Tensor kv_;                     // [T, 2 dh]
  Tensor send_, x_exp_;           // [E, R, .] staging; [E_local, R', D] x at the experts
  Tensor q_exp_, q_buf_;          // [E_local, R', dh]; [E, R, dh]
  Tensor q_tok_, a_tok_;          // [T, K, dh]
  Tensor probs_;                  // [T, K, L]
  Tensor a_exp_, o_exp_, o_buf_;  // [E_local, R', dh]; [E_local, R', D]; [E, R, D]
  Tensor d_weight_;               // [T, K] d combine weights, on the device
  bool device_routed_ = false;    // the last forward's routing, on the device or not
  DeviceRouting routing_;
};

}  // namespace moerun

#endif  // MOERUN_MODEL_MOE_ATTENTION_H_
