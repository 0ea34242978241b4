// The auxiliary losses of a MoE layer as a list of named terms over its router and its
// routing plan: V-MoE's importance, load, GShard and z losses per routing group
// (shared/specs/vmoe-routing.md), and Mod-Squad's mutual-information loss over the
// step's task x expert table (shared/specs/modsquad.md). One all-reduce per forward
// gives every term's global value and the layer's kept / dropped counts.
#ifndef MOERUN_MODEL_MOE_AUX_H_
#define MOERUN_MODEL_MOE_AUX_H_

#include <string>
#include <vector>

#include "comm/communicator.h"
#include "model/moe_losses.h"
#include "model/moe_plan.h"
#include "model/moe_router.h"

namespace moerun {

struct AuxWeights {
  double importance = 0, load = 0, gshard = 0, z = 0;
  // Mod-Squad (task gates only; added when there are more than two tasks, as the
  // reference does). mi_per_rank: each rank's own tokens (the reference) instead of the
  // all-reduced table (the default: independent of the rank count).
  double mi = 0;
  bool mi_per_rank = false;
};

// One named auxiliary loss of a layer: global over all ranks and groups (means over groups,
// as the loss uses them; the MI loss: one value per forward).
struct AuxTerm {
  std::string name;  // "importance", "load", "gshard", "z", "mi"
  double weight = 0;
  double value = 0;
  bool active = false;  // part of aux_total (weight > 0 and applicable)
};

struct MoeLosses {
  std::vector<AuxTerm> terms;
  double aux_total = 0;  // sum of weight * value over the active terms
  // The value of the term `name` (0 when the layer has no such term).
  double value(const std::string& name) const;
};

struct MoeMetrics {
  int64_t capacity = 0;                    // per expert per group
  std::vector<int64_t> tokens_per_expert;  // kept assignments, all ranks
  std::vector<double> dropped_fraction;    // per choice rank (0 = first choice)
  double capacity_used = 0;                // kept / (E * cap * groups)
};

class MoeAuxLosses {
 public:
  explicit MoeAuxLosses(const AuxWeights& weights) : weights_(weights) {}
  AuxWeights& weights() { return weights_; }

  // After the router and the plan of a forward: every term's value and the metrics.
  // Collective over `world`.
  void Compute(const Router& router, const RoutingPlan& plan, Communicator& world);
  // The router's backward with the losses: d(gates) from the combine weights' gradient
  // d_weight [T, K] (kept choices) plus every active term's gradient; then through the
  // softmax to the logits (plus logit-space terms) and into the router weight and dx.
  void RouterBackward(Router* router, const RoutingPlan& plan, const float* d_weight,
                      int world_size, float* dx) const;
  // The same for a layer on any device: d_weight [T, K] and dx [T, D] (accumulated into)
  // on the layer's device, where the router's GEMMs are: on a device d_weight comes to the
  // host, the losses' terms and the softmax run there, and d(logits) [T, E] goes back.
  void RouterBackward(Router* router, const RoutingPlan& plan, const Tensor& d_weight,
                      int world_size, Tensor* dx) const;

  // A layer that routes on its device: the active terms' part of d(logits) on the host,
  // from the forward's values alone (router->d_logits() after the call). The combine
  // weights' part is added on the device in the backward (ops' router_logits_backward);
  // together they are RouterBackward's d(logits), summed in another order.
  void LossLogitGradient(Router* router, const RoutingPlan& plan, int world_size) const;

  const MoeLosses& losses() const { return losses_; }
  const MoeMetrics& metrics() const { return metrics_; }
  // Task gates: [tasks, E] sums of the gates per task and [E] selection counts (all k
  // choices, before the capacity) of the last forward, over this rank's tokens
  // (mi_per_rank) or all ranks'.
  const std::vector<double>& task_gate_sums() const { return task_gate_sums_; }
  const std::vector<double>& selection_counts() const { return selection_counts_; }
  // Task gates: [tasks, E] selections of each task's tokens (all k choices), all ranks.
  const std::vector<double>& task_selections() const { return task_selections_; }

  // Mod-Squad's expert usage (shared/specs/modsquad.md): per task an exponential moving
  // average of the selections per expert, usage = 0.95 usage + 0.05 task_selections(),
  // never reset. [tasks, E], the same on every rank; training forwards call UpdateUsage.
  Tensor& usage() { return usage_; }
  void InitUsage(int tasks, int num_experts) { usage_ = Tensor::Zeros({tasks, num_experts}); }
  void UpdateUsage();

 private:
  AuxWeights weights_;
  MoeLosses losses_;
  MoeMetrics metrics_;
  std::vector<double> task_gate_sums_, selection_counts_, mi_grad_, task_selections_;
  // Per local group, the load loss's value and what its gradient needs, from Compute: the
  // backward adds the gradient without evaluating the loss again.
  std::vector<LoadLossState> load_states_;
  Tensor usage_;

  // Adds the active terms' gradients to the router's d(gates) dg and d(clean gates) dclean
  // (from BeginBackward), turns them into d(logits) and adds the logit-space terms there;
  // returns d(logits).
  float* AddLossesToLogits(Router* router, const RoutingPlan& plan, int world_size, float* dg,
                           float* dclean) const;
};

// A layer's routing on the host, after its router's forward: the plan from the router's
// gates (PlanRouting), the losses and metrics (and, training, the usage statistics), and
// `device_plan`: the plan, with its rows and weights copied to `device` unless the CPU.
void RouteOnHost(const Router& router, const CapacityRule& rule, int k, int64_t group_size,
                 int64_t fixed_capacity, Communicator& world, const uint8_t* routed, bool training,
                 Device device, RoutingPlan* plan, MoeAuxLosses* aux, RoutingPlan* device_plan);

}  // namespace moerun

#endif  // MOERUN_MODEL_MOE_AUX_H_
