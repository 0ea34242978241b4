// The expert-parallel MoE layer (shared/specs/vmoe-routing.md), forward and backward:
// noisy top-k router -> per-group priority order and capacity -> pack [E, G*cap, D] ->
// all_to_all_v over the expert-parallel group -> expert MLPs as batched GEMMs over this
// rank's experts -> inverse all_to_all_v -> combine with the raw gates.
//
// Tokens: each rank passes its own T tokens (the r-th contiguous slice of the global
// batch); groups are `group_size` consecutive local tokens. For the same global batch the
// outputs, losses and gradients do not depend on the number of ranks.
//
// Experts: with P ranks and E % P == 0, rank r owns experts [r*E/P, (r+1)*E/P); with
// P % E == 0, rank r owns expert r % E, the all-to-all runs among ranks r / E * E ..
// + E - 1, and replicas of an expert sum their gradients (ReduceReplicaGradients).
#ifndef MOERUN_MODEL_MOE_LAYER_H_
#define MOERUN_MODEL_MOE_LAYER_H_

#include <memory>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "model/moe_aux.h"
#include "model/moe_device_routing.h"
#include "model/moe_dispatch.h"
#include "model/moe_experts.h"
#include "model/moe_plan.h"
#include "model/moe_router.h"
#include "runtime/config.pb.h"
#include "runtime/tensor.h"

namespace moerun {

struct MoeLayerConfig {
  int d = 0;  // model width
  int m = 0;  // expert hidden width
  int num_experts = 8;
  int k = 2;
  double capacity_factor = 1.05;  // 0: dropless
  int64_t capacity = 0;           // > 0: fixed capacity (capacity_factor ignored)
  int multiple_of = 4;
  bool round = false;  // round() instead of ceil() in the capacity
  bool bpr = true;
  // Overlap the dispatch all-to-alls (forward and backward) with the experts' work on the
  // rows already here (Dispatcher::ToExpertsOverlapped); off: one all-to-all, then the
  // experts. Changes only the summation order of the expert weight gradients.
  bool overlap_dispatch = false;
  int overlap_stages = 4;  // the overlapped dispatch's transfers at most (>= 1)
  // Where the layer's rows, experts, combine and router GEMMs live. On a device the router's
  // weight and its GEMMs (logits, and the backward's weight and input gradients) are there.
  // Without padding tokens or explicit noise, the noise, softmax (or Mod-Squad's task
  // softmax) and routing plan run there too (device routing, DeviceRouting): the router's
  // tables [T, E] and the plan's [T, K] come to the host in one copy for the auxiliary
  // losses, which the host computes while the device runs the experts (dropless: the host
  // waits for that copy before the rows, since the largest load sets the capacity), and the
  // backward has no host wait. Otherwise (padding, replay noise) only the logits come to
  // the host, where noise, softmax, the plan and the losses run, and d(logits) goes back. The rows,
  // the dispatch, the experts (fp32; under train.precision BF16 the table's FusedExperts where it
  // has them) and the combine run on the device's ops.
  Device device = Device::kCPU;
  int64_t group_size = 0;  // 0: all local tokens form one group
  bool gelu_tanh = false;  // the tanh approximation of GELU (V-MoE) instead of exact erf
  GateKind gate = GateKind::kNoisyTopK;
  int tasks = 1;           // task routers (kTaskSoftmax)
  double noise_std = 1.0;  // sigma = noise_std / E (kNoisyTopK)
  double importance_weight = 0.005;
  double load_weight = 0.005;
  double gshard_weight = 0;
  double z_loss_weight = 0;
  // Mod-Squad's mutual-information loss (kTaskSoftmax; added when tasks > 2, as the
  // reference does). mi_per_rank: each rank's own tokens (the reference) instead of the
  // all-reduced task x expert table (the default: independent of the rank count).
  double mi_weight = 0;
  bool mi_per_rank = false;

  CapacityRule capacity_rule() const;
  AuxWeights aux_weights() const;
  // tokens_per_image turns model.moe.group_images into a group size in tokens.
  static MoeLayerConfig FromProto(const MoeConfig& moe, int d, int m, int64_t tokens_per_image,
                                  bool gelu_tanh);
};

// The communicators a MoE layer uses, split once from the world and shared by layers.
class MoeGroups {
 public:
  // Fails (with the rank counts that would work) unless E % P == 0 or P % E == 0.
  // device_world: the same ranks over a communicator that moves a device's memory (NCCL);
  // given, the expert-parallel and replica groups (the rows and expert gradients) are split
  // from it, while world() (routing statistics: host scalars) stays `world`.
  static StatusOr<std::shared_ptr<MoeGroups>> Create(Communicator* world, int num_experts,
                                                     Communicator* device_world = nullptr);
  Communicator& world() const { return *world_; }
  Communicator& expert() const {
    return expert_ ? *expert_ : (device_world_ != nullptr ? *device_world_ : *world_);
  }
  // Ranks holding the same experts; null when each expert lives on one rank.
  Communicator* replicas() const { return replicas_.get(); }
  int num_experts() const { return num_experts_; }
  int first_local_expert() const { return first_local_expert_; }
  int local_experts() const { return local_experts_; }

 private:
  Communicator* world_ = nullptr;
  Communicator* device_world_ = nullptr;
  std::unique_ptr<Communicator> expert_, replicas_;
  int num_experts_ = 0, first_local_expert_ = 0, local_experts_ = 0;
};

// Views of the layer's parameters (or gradients): writing into them writes the layer's.
struct MoeParams {
  Tensor router_weight;  // [E, D] (kTaskSoftmax: [tasks, E, D]), replicated on every rank
  Tensor fc1_weight;     // [E_local, M, D]
  Tensor fc1_bias;       // [E_local, M]
  Tensor fc2_weight;     // [E_local, D, M]
  Tensor fc2_bias;       // [E_local, D]
};

struct MoeForwardArgs {
  bool training = true;           // noise (and the load loss) only when training and noise_std > 0
  NoiseKey noise_key;             // with first_token: keys the generated noise
  int64_t first_token = 0;        // global index of this rank's first token
  const Tensor* noise = nullptr;  // optional [T, E], already scaled, replaces the generator
  const int32_t* task = nullptr;  // [T] task of every token (kTaskSoftmax)
  // [T] or null: tokens with 0 are padding (evaluation's last batch): routed nowhere, they
  // take no expert capacity and their output is 0.
  const uint8_t* routed = nullptr;
};

class MoeLayer {
 public:
  MoeLayer(const MoeLayerConfig& config, std::shared_ptr<MoeGroups> groups);
  ~MoeLayer() { ResolveDeviceTimers(); }  // its timers' pending device time lands first

  const MoeLayerConfig& config() const { return config_; }
  // For inference-time routing overrides (capacity factor, BPR); not during a step.
  MoeLayerConfig& mutable_config() { return config_; }
  const MoeGroups& groups() const { return *groups_; }
  MoeParams& params() { return params_; }
  // Gradients, accumulated by Backward (zero them with ZeroGradients()).
  MoeParams& grads() { return grads_; }
  void ZeroGradients();

  // x, y: [T, D]. Returns an error (before any communication) when T is not a multiple
  // of the group size, the capacity is below 1 or a task id is out of range.
  Status Forward(const Tensor& x, const MoeForwardArgs& args, Tensor* y);
  // dy, dx: [T, D]; dx is overwritten, parameter gradients accumulate. The gradient of
  // the auxiliary loss (aux_total, as its share of the total loss) is included.
  void Backward(const Tensor& dy, Tensor* dx);
  // Sums expert gradients over replicas (P > E); no-op otherwise.
  void ReduceReplicaGradients();
  // Drops what Forward saved of its input x (the router's view of it): the caller's
  // activation arena can then merge its blocks. Backward needs a new Forward after it.
  void ReleaseInput() { router_.ReleaseInput(); }

  const MoeLosses& losses() const { return aux_.losses(); }
  const MoeMetrics& metrics() const { return aux_.metrics(); }
  const Router& router() const { return router_; }
  const RoutingPlan& plan() const { return plan_; }
  // Routing of the last forward, [T, K]: expert, raw slot (>= capacity: dropped), gate.
  const Tensor& expert_index() const { return plan_.expert_index; }
  const Tensor& slot() const { return plan_.slot; }
  const Tensor& combine_weight() const { return plan_.weight; }
  // The auxiliary losses and, for task gates, the step's task x expert statistics.
  const MoeAuxLosses& aux() const { return aux_; }
  // kTaskSoftmax: the usage EMA [tasks, E] (moe_aux.h), updated by training forwards.
  Tensor& usage() { return aux_.usage(); }
  // On a device, the times of device timers land at ResolveDeviceTimers().
  MoeTimers& timers() { return timers_; }
  // Whether the last forward routed on the device (MoeLayerConfig::device).
  bool routed_on_device() const { return device_routed_; }

 private:
  bool overlapped() const;  // overlap_dispatch and more than one expert-parallel rank
  bool local() const;       // one expert-parallel rank: the experts take dispatch_ as it is
  // The combine's input, [E, G*cap, D]: the experts' output itself when local().
  const Tensor& combined() const;

  MoeLayerConfig config_;
  std::shared_ptr<MoeGroups> groups_;
  Router router_;
  RoutingPlan plan_;
  Dispatcher dispatcher_;
  ExpertMlp experts_;
  MoeAuxLosses aux_;
  MoeParams params_, grads_;
  MoeTimers timers_;

  // Saved by Forward for Backward.
  RoutingPlan device_plan_;  // on a device: plan_ with its rows and weights copied there
  Tensor dispatch_;          // [E, G*cap, D]; in the backward d(combine_in), then d(dispatch)
  Tensor expert_in_;         // [E_local, R, D], R = P_ep*G*cap (unused when local())
  Tensor expert_out_;        // [E_local, R, D]
  Tensor combine_in_;        // [E, G*cap, D] (unused when local())
  Tensor d_expert_out_, d_expert_in_;
  Tensor d_weight_;  // [T, K] d(combine weight), from the combine backward
  // Whether the last forward routed on the device (MoeLayerConfig::device), and that routing.
  bool device_routed_ = false;
  DeviceRouting routing_;
};

}  // namespace moerun

#endif  // MOERUN_MODEL_MOE_LAYER_H_
