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
#include <vector>

#include "comm/communicator.h"
#include "model/router_noise.h"
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
  int64_t group_size = 0;  // 0: all local tokens form one group
  bool gelu_tanh = false;  // the tanh approximation of GELU (V-MoE) instead of exact erf
  double noise_std = 1.0;  // sigma = noise_std / E
  double importance_weight = 0.005;
  double load_weight = 0.005;
  double gshard_weight = 0;
  double z_loss_weight = 0;

  // tokens_per_image turns model.moe.group_images into a group size in tokens.
  static MoeLayerConfig FromProto(const MoeConfig& moe, int d, int m, int64_t tokens_per_image,
                                  bool gelu_tanh);
};

// The communicators a MoE layer uses, split once from the world and shared by layers.
class MoeGroups {
 public:
  // Fails (with the rank counts that would work) unless E % P == 0 or P % E == 0.
  static StatusOr<std::shared_ptr<MoeGroups>> Create(Communicator* world, int num_experts);
  Communicator& world() const { return *world_; }
  Communicator& expert() const { return expert_ ? *expert_ : *world_; }
  // Ranks holding the same experts; null when each expert lives on one rank.
  Communicator* replicas() const { return replicas_.get(); }
  int num_experts() const { return num_experts_; }
  int first_local_expert() const { return first_local_expert_; }
  int local_experts() const { return local_experts_; }

 private:
  Communicator* world_ = nullptr;
  std::unique_ptr<Communicator> expert_, replicas_;
  int num_experts_ = 0, first_local_expert_ = 0, local_experts_ = 0;
};

struct MoeParams {
  Tensor router_weight;  // [E, D], replicated on every rank
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
};

// Global over all ranks and groups (means over groups, as the loss uses them).
struct MoeLosses {
  double importance = 0, load = 0, gshard = 0, z = 0;
  double aux_total = 0;  // weighted sum of the terms whose weight is > 0
};

struct MoeMetrics {
  int64_t capacity = 0;                    // per expert per group
  std::vector<int64_t> tokens_per_expert;  // kept assignments, all ranks
  std::vector<double> dropped_fraction;    // per choice rank (0 = first choice)
  double capacity_used = 0;                // kept / (E * cap * groups)
};

// Wall seconds accumulated per part since the last ResetTimers().
struct MoeTimers {
  // expert / bwd_expert: the expert GEMMs only; expert_act / bwd_expert_act: their bias
  // and GELU work.
  double router = 0, routing = 0, pack = 0, all_to_all = 0, expert = 0, expert_act = 0;
  double combine = 0, bwd_combine = 0, bwd_pack = 0, bwd_all_to_all = 0, bwd_expert = 0;
  double bwd_expert_act = 0, bwd_dispatch = 0, bwd_router = 0;
};

class MoeLayer {
 public:
  MoeLayer(const MoeLayerConfig& config, std::shared_ptr<MoeGroups> groups);

  const MoeLayerConfig& config() const { return config_; }
  // For inference-time routing overrides (capacity factor, BPR); not during a step.
  MoeLayerConfig& mutable_config() { return config_; }
  const MoeGroups& groups() const { return *groups_; }
  MoeParams& params() { return params_; }
  // Gradients, accumulated by Backward (zero them with ZeroGradients()).
  MoeParams& grads() { return grads_; }
  void ZeroGradients();

  // x, y: [T, D]. Returns an error (before any communication) when T is not a multiple
  // of the group size or the capacity is below 1.
  Status Forward(const Tensor& x, const MoeForwardArgs& args, Tensor* y);
  // dy, dx: [T, D]; dx is overwritten, parameter gradients accumulate. The gradient of
  // the auxiliary loss (aux_total, as its share of the total loss) is included.
  void Backward(const Tensor& dy, Tensor* dx);
  // Sums expert gradients over replicas (P > E); no-op otherwise.
  void ReduceReplicaGradients();

  const MoeLosses& losses() const { return losses_; }
  const MoeMetrics& metrics() const { return metrics_; }
  // Routing of the last forward, [T, K]: expert, raw slot (>= capacity: dropped), gate.
  const Tensor& expert_index() const { return expert_index_; }
  const Tensor& slot() const { return slot_; }
  const Tensor& combine_weight() const { return weight_; }
  MoeTimers& timers() { return timers_; }

 private:
  void ExpertForward();
  void ExpertBackward();
  void AllToAll(const Tensor& send, Tensor* recv);

  MoeLayerConfig config_;
  std::shared_ptr<MoeGroups> groups_;
  MoeParams params_, grads_;
  MoeLosses losses_;
  MoeMetrics metrics_;
  MoeTimers timers_;

  // Saved by Forward for Backward.
  Tensor x_;  // [T, D] (a view of the caller's input)
  int64_t tokens_ = 0, group_size_ = 0, groups_local_ = 0, capacity_ = 0;
  bool noisy_ = false;
  Tensor logits_, noisy_logits_;  // [T, E]
  Tensor gates_, clean_gates_;    // [T, E] softmax of noisy (or clean) and of clean logits
  Tensor expert_index_, slot_;    // [T, K] int32
  Tensor weight_;                 // [T, K] raw gate of each choice
  Tensor row_;                    // [T, K] int32: row in the [E, G*cap] buffers, -1 dropped
  Tensor dispatch_;               // [E, G*cap, D]
  Tensor recv_;                   // [P_ep, E_local, G*cap, D]
  Tensor expert_in_, hidden_, act_, expert_out_;  // [E_local, R, .], R = P_ep*G*cap
  Tensor combine_in_;                             // [E, G*cap, D]
  // Backward scratch.
  Tensor d_expert_out_, d_act_, d_expert_in_, d_gates_, d_clean_gates_, d_logits_;
};

}  // namespace moerun

#endif  // MOERUN_MODEL_MOE_LAYER_H_
