// Auxiliary losses of a MoE layer.
#include "model/moe_aux.h"

#include <algorithm>

#include "model/moe_losses.h"
#include "model/ops.h"

namespace moerun {

double MoeLosses::value(const std::string& name) const {
  for (const AuxTerm& t : terms) {
    if (t.name == name) return t.value;
  }
  return 0;
}

namespace {

// Adds every active term's gradient: gate-space terms into dg / dclean, or (logit_space)
// logit-space terms into dz.
void AddTermGradients(const MoeLosses& losses, const AuxWeights& weights,
                      const std::vector<double>& mi_grad,
                      const std::vector<LoadLossState>& load_states, const Router& router_,
                      const RoutingPlan& plan_, int world_size, float* dg, float* dclean, float* dz,
                      bool logit_space) {
  const int64_t s = plan_.group_size, e_count = plan_.num_experts;
  const int e = static_cast<int>(e_count);
  const double g_total = static_cast<double>(plan_.groups) * world_size;
  for (const AuxTerm& term : losses.terms) {
    if (!term.active) continue;
    const double scale = term.weight / g_total;
    for (int64_t g = 0; g < plan_.groups; ++g) {
      const int64_t off = g * s * e_count;
      if (!logit_space && term.name == "importance") {
        ImportanceLoss(router_.clean_gates().data<float>() + off, s, e, dclean + off, scale);
      } else if (!logit_space && term.name == "gshard") {
        GShardLoss(router_.gates().data<float>() + off, s, e, dg + off, scale);
      } else if (logit_space && term.name == "load") {
        LoadLossBackward(load_states.at(g), router_.logits().data<float>() + off,
                         router_.noisy_logits().data<float>() + off, s, e, router_.sigma(),
                         dz + off, scale);
      } else if (logit_space && term.name == "z") {
        ZLoss(router_.logits().data<float>() + off, s, e, dz + off, scale);
      }
    }
    if (!logit_space && term.name == "mi") {
      // d(w * L)/dp[s, e] = w * dL/da[task(s), e], per rank divided by the rank count.
      const double w = term.weight / (weights.mi_per_rank ? world_size : 1);
      const int32_t* task = router_.task();
      for (int64_t tok = 0; tok < plan_.tokens; ++tok) {
        const double* ga = mi_grad.data() + task[tok] * e_count;
        for (int64_t j = 0; j < e_count; ++j)
          dg[tok * e_count + j] += static_cast<float>(w * ga[j]);
      }
    }
  }
}

}  // namespace

// The terms, in the order their values are reported and their gradients accumulated.
void MoeAuxLosses::Compute(const Router& router_, const RoutingPlan& plan_, Communicator& world) {
  const bool noisy = router_.noisy();
  const int64_t s = plan_.group_size;
  const int64_t t = plan_.tokens, e_count = plan_.num_experts, k = plan_.k;
  const int e = static_cast<int>(e_count), kk = static_cast<int>(k);
  const bool task_gate = router_.kind() == GateKind::kTaskSoftmax;
  const int tasks = router_.tasks();
  // Per-group terms, summed over local groups: importance, load, gshard, z.
  double local[4] = {0, 0, 0, 0};
  load_states_.resize(noisy ? plan_.groups : 0);
  for (int64_t g = 0; g < plan_.groups; ++g) {
    const int64_t off = g * s * e_count;
    const float* zg = router_.logits().data<float>() + off;
    local[0] += ImportanceLoss(router_.clean_gates().data<float>() + off, s, e, nullptr, 0);
    if (noisy) {
      LoadLossForward(zg, router_.noisy_logits().data<float>() + off, s, e, kk, router_.sigma(),
                      &load_states_[g]);
      local[1] += load_states_[g].loss;
    }
    local[2] += GShardLoss(router_.gates().data<float>() + off, s, e, nullptr, 0);
    if (weights_.z > 0) local[3] += ZLoss(zg, s, e, nullptr, 0);
  }
  // One all_reduce: [4 losses, kept per expert, dropped per choice rank] and, for task
  // gates, [tasks x E gate sums, E selections] (all-reduced MI) or [local MI] (per rank).
  const size_t base = 4 + e_count + k;
  const size_t mi_size = !task_gate ? 0 : weights_.mi_per_rank ? 1 : tasks * e_count + e_count;
  // Task gates: then [tasks x E] selections per task (usage statistics), always global.
  const size_t usage_at = base + mi_size, usage_size = task_gate ? tasks * e_count : 0;
  // Last: the routed (not padding) tokens.
  std::vector<double> totals(base + mi_size + usage_size + 1, 0.0);
  totals.back() = static_cast<double>(t);
  std::copy(local, local + 4, totals.begin());
  const int32_t* idx = plan_.expert_index.data<int32_t>();
  const int32_t* sl = plan_.slot.data<int32_t>();
  for (int64_t i = 0; i < t * k; ++i) {
    if (plan_.routed != nullptr && !plan_.routed[i / k]) {
      if (i % k == 0) totals.back() -= 1;
      continue;  // padding
    }
    if (sl[i] < plan_.capacity)
      totals[4 + idx[i]] += 1;
    else
      totals[4 + e_count + i % k] += 1;
  }
  if (task_gate) {
    task_gate_sums_.assign(tasks * e_count, 0.0);
    selection_counts_.assign(e_count, 0.0);
    const float* p = router_.gates().data<float>();
    const int32_t* task = router_.task();
    for (int64_t tok = 0; tok < t; ++tok) {
      double* row = task_gate_sums_.data() + task[tok] * e_count;
      for (int64_t j = 0; j < e_count; ++j) row[j] += p[tok * e_count + j];
    }
    for (int64_t i = 0; i < t * k; ++i) {
      selection_counts_[idx[i]] += 1;
      totals[usage_at + task[i / k] * e_count + idx[i]] += 1;
    }
    if (weights_.mi_per_rank) {
      mi_grad_.assign(tasks * e_count, 0.0);
      totals[base] = MutualInformationLoss(task_gate_sums_.data(), selection_counts_.data(), tasks,
                                           e, kk, mi_grad_.data());
    } else {
      std::copy(task_gate_sums_.begin(), task_gate_sums_.end(), totals.begin() + base);
      std::copy(selection_counts_.begin(), selection_counts_.end(),
                totals.begin() + base + tasks * e_count);
    }
  }
  world.AllReduce(totals.data(), static_cast<int64_t>(totals.size()), DType::kF64, ReduceOp::kSum);
  const double g_total = static_cast<double>(plan_.groups) * world.size();
  losses_.terms.clear();
  auto add = [&](const char* name, double weight, double value, bool applies) {
    losses_.terms.push_back({name, weight, value, weight > 0 && applies});
  };
  add("importance", weights_.importance, totals[0] / g_total, true);
  if (!task_gate) add("load", weights_.load, totals[1] / g_total, noisy);
  add("gshard", weights_.gshard, totals[2] / g_total, true);
  add("z", weights_.z, totals[3] / g_total, true);
  if (task_gate) {
    double mi = 0;
    if (weights_.mi_per_rank) {
      mi = totals[base] / world.size();  // the mean of the ranks' own MI losses
    } else {
      std::copy(totals.begin() + base, totals.begin() + base + tasks * e_count,
                task_gate_sums_.begin());
      std::copy(totals.begin() + base + tasks * e_count, totals.begin() + usage_at,
                selection_counts_.begin());
      mi_grad_.assign(tasks * e_count, 0.0);
      mi = MutualInformationLoss(task_gate_sums_.data(), selection_counts_.data(), tasks, e, kk,
                                 mi_grad_.data());
    }
    add("mi", weights_.mi, mi, tasks > 2);
    task_selections_.assign(totals.begin() + usage_at, totals.end() - 1);
  }
  losses_.aux_total = 0;
  for (const AuxTerm& term : losses_.terms) {
    if (term.active) losses_.aux_total += term.weight * term.value;
  }
  metrics_.capacity = plan_.capacity;
  metrics_.tokens_per_expert.assign(e_count, 0);
  double kept = 0;
  for (int64_t j = 0; j < e_count; ++j) {
    metrics_.tokens_per_expert[j] = static_cast<int64_t>(totals[4 + j]);
    kept += totals[4 + j];
  }
  const double tokens_total = totals.back();
  metrics_.dropped_fraction.assign(k, 0.0);
  for (int64_t j = 0; j < k; ++j)
    metrics_.dropped_fraction[j] = totals[4 + e_count + j] / tokens_total;
  metrics_.capacity_used = kept / (static_cast<double>(e_count) * plan_.capacity * g_total);
}

void MoeAuxLosses::UpdateUsage() {
  if (task_selections_.empty() || !usage_.defined()) return;
  CHECK_EQ(usage_.numel(), static_cast<int64_t>(task_selections_.size()));
  float* u = usage_.data<float>();
  for (size_t i = 0; i < task_selections_.size(); ++i) {
    u[i] = static_cast<float>(0.95 * u[i] + 0.05 * task_selections_[i]);
  }
}

void MoeAuxLosses::RouterBackward(Router* router, const RoutingPlan& plan, const float* d_weight,
                                  int world_size, float* dx) const {
  const int64_t t = plan.tokens, k = plan.k, e_count = plan.num_experts;
  const int32_t* row = plan.row.data<int32_t>();
  float *dg = nullptr, *dclean = nullptr;
  router->BeginBackward(&dg, &dclean);
  const int32_t* idx = plan.expert_index.data<int32_t>();
  for (int64_t i = 0; i < t * k; ++i) {
    if (row[i] >= 0) dg[(i / k) * e_count + idx[i]] += d_weight[i];
  }
  AddLossesToLogits(router, plan, world_size, dg, dclean);
  router->LogitsToInputs(dx);
}

void MoeAuxLosses::LossLogitGradient(Router* router, const RoutingPlan& plan,
                                     int world_size) const {
  float *dg = nullptr, *dclean = nullptr;
  router->BeginBackward(&dg, &dclean);
  AddLossesToLogits(router, plan, world_size, dg, dclean);
}

float* MoeAuxLosses::AddLossesToLogits(Router* router, const RoutingPlan& plan, int world_size,
                                       float* dg, float* dclean) const {
  AddTermGradients(losses_, weights_, mi_grad_, load_states_, *router, plan, world_size, dg, dclean,
                   nullptr, false);
  float* dz = router->GatesToLogits();
  AddTermGradients(losses_, weights_, mi_grad_, load_states_, *router, plan, world_size, nullptr,
                   nullptr, dz, true);
  return dz;
}

void MoeAuxLosses::RouterBackward(Router* router, const RoutingPlan& plan, const Tensor& d_weight,
                                  int world_size, Tensor* dx) const {
  const Device dev = dx->device();
  if (dev == Device::kCPU) {
    RouterBackward(router, plan, d_weight.data<float>(), world_size, dx->data<float>());
    return;
  }
  // The combine weights' gradient [T, k] comes to the host (with the plan and the gates);
  // d(logits) [T, E] goes back to the router's GEMMs, which add into dx where it is.
  CHECK(router->weight().device() == dev) << "a router on " << DeviceName(router->weight().device())
                                          << " cannot add into dx on " << DeviceName(dev);
  const Tensor host_d_weight = d_weight.To(Device::kCPU);
  RouterBackward(router, plan, host_d_weight.data<float>(), world_size,
                 dx->device_data<float>(dev));
}

void RouteOnHost(const Router& router, const CapacityRule& rule, int k, int64_t group_size,
                 int64_t fixed_capacity, Communicator& world, const uint8_t* routed, bool training,
                 Device device, RoutingPlan* plan, MoeAuxLosses* aux, RoutingPlan* device_plan) {
  PlanRouting(router.gates(), rule, k, group_size, fixed_capacity, world, plan, routed);
  aux->Compute(router, *plan, world);
  if (training) aux->UpdateUsage();
  *device_plan = *plan;
  if (device != Device::kCPU) {
    device_plan->row = plan->row.To(device);
    device_plan->weight = plan->weight.To(device);
  }
}

}  // namespace moerun
