// The expert-parallel MoE layer: router -> routing plan -> pack -> dispatcher -> expert MLPs
// -> dispatcher back -> combine, and the auxiliary losses as named terms.
#include "model/moe_layer.h"

#include <algorithm>
#include <cstring>

#include "model/moe_losses.h"
#include "model/routing.h"
#include "model/vit_spec.h"
#include "runtime/kernels.h"

namespace moerun {

CapacityRule MoeLayerConfig::capacity_rule() const {
  CapacityRule r;
  r.capacity_factor = capacity_factor;
  r.capacity = capacity;
  r.multiple_of = multiple_of;
  r.round = round;
  r.bpr = bpr;
  r.group_size = group_size;
  return r;
}

MoeLayerConfig MoeLayerConfig::FromProto(const MoeConfig& moe, int d, int m,
                                         int64_t tokens_per_image, bool gelu_tanh) {
  MoeLayerConfig c;
  c.d = d;
  c.m = m;
  c.num_experts = moe.num_experts();
  c.k = moe.k();
  c.capacity_factor = moe.capacity() > 0 ? 0.0 : moe.capacity_factor();
  c.capacity = moe.capacity();
  c.multiple_of = moe.multiple_of();
  c.round = moe.rounding() == MoeConfig::ROUND;
  c.bpr = moe.bpr();
  c.group_size = moe.group_size() > 0 ? moe.group_size() : moe.group_images() * tokens_per_image;
  c.gelu_tanh = gelu_tanh;
  c.noise_std = moe.noise_std();
  c.importance_weight = moe.importance_weight();
  c.load_weight = moe.load_weight();
  c.gshard_weight = moe.gshard_weight();
  c.z_loss_weight = moe.z_loss_weight();
  return c;
}

double MoeLosses::value(const std::string& name) const {
  for (const AuxTerm& t : terms) {
    if (t.name == name) return t.value;
  }
  return 0;
}

StatusOr<std::shared_ptr<MoeGroups>> MoeGroups::Create(Communicator* world, int num_experts) {
  const int p = world->size(), r = world->rank();
  auto placement = PlaceExperts(num_experts, p);
  if (!placement.ok()) return placement.status();
  auto g = std::make_shared<MoeGroups>();
  g->world_ = world;
  g->num_experts_ = num_experts;
  g->local_experts_ = placement->experts_per_rank;
  if (placement->replicas == 1) {
    g->first_local_expert_ = r * g->local_experts_;
  } else {
    // Replica set r / E holds every expert once; ranks r and r + E hold the same expert.
    g->first_local_expert_ = r % num_experts;
    g->expert_ = world->Split(r / num_experts, r, "expert_parallel");
    g->replicas_ = world->Split(r % num_experts, r, "expert_replicas");
  }
  return g;
}

MoeLayer::MoeLayer(const MoeLayerConfig& config, std::shared_ptr<MoeGroups> groups)
    : config_(config),
      groups_(std::move(groups)),
      router_(config.gate, config.tasks, config.num_experts, config.d, config.noise_std),
      dispatcher_(groups_.get()),
      experts_(groups_->local_experts(), config.d, config.m, config.gelu_tanh) {
  CHECK_EQ(config_.num_experts, groups_->num_experts()) << "MoE layer and groups disagree on E";
  CHECK(config_.k >= 1 && config_.k <= config_.num_experts) << "k " << config_.k;
  params_ = {router_.weight(), experts_.params().fc1_weight, experts_.params().fc1_bias,
             experts_.params().fc2_weight, experts_.params().fc2_bias};
  grads_ = {router_.grad(), experts_.grads().fc1_weight, experts_.grads().fc1_bias,
            experts_.grads().fc2_weight, experts_.grads().fc2_bias};
}

void MoeLayer::ZeroGradients() {
  router_.grad().SetZero();
  experts_.ZeroGradients();
}

// The terms, in the order their values are reported and their gradients accumulated.
void MoeLayer::ComputeLosses(bool noisy, int64_t s) {
  const int64_t t = plan_.tokens, e_count = config_.num_experts, k = config_.k;
  const int e = static_cast<int>(e_count), kk = static_cast<int>(k);
  const bool task_gate = config_.gate == GateKind::kTaskSoftmax;
  const int tasks = router_.tasks();
  Communicator& world = groups_->world();
  // Per-group terms, summed over local groups: importance, load, gshard, z.
  double local[4] = {0, 0, 0, 0};
  for (int64_t g = 0; g < plan_.groups; ++g) {
    const int64_t off = g * s * e_count;
    const float* zg = router_.logits().data<float>() + off;
    local[0] += ImportanceLoss(router_.clean_gates().data<float>() + off, s, e, nullptr, 0);
    if (noisy) {
      local[1] += LoadLoss(zg, router_.noisy_logits().data<float>() + off, s, e, kk,
                           router_.sigma(), nullptr, 0);
    }
    local[2] += GShardLoss(router_.gates().data<float>() + off, s, e, nullptr, 0);
    if (config_.z_loss_weight > 0) local[3] += ZLoss(zg, s, e, nullptr, 0);
  }
  // One all_reduce: [4 losses, kept per expert, dropped per choice rank] and, for task
  // gates, [tasks x E gate sums, E selections] (all-reduced MI) or [local MI] (per rank).
  const size_t base = 4 + e_count + k;
  const size_t mi_size = !task_gate ? 0 : config_.mi_per_rank ? 1 : tasks * e_count + e_count;
  std::vector<double> totals(base + mi_size, 0.0);
  std::copy(local, local + 4, totals.begin());
  const int32_t* idx = plan_.expert_index.data<int32_t>();
  const int32_t* sl = plan_.slot.data<int32_t>();
  for (int64_t i = 0; i < t * k; ++i) {
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
    for (int64_t i = 0; i < t * k; ++i) selection_counts_[idx[i]] += 1;
    if (config_.mi_per_rank) {
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
  add("importance", config_.importance_weight, totals[0] / g_total, true);
  if (!task_gate) add("load", config_.load_weight, totals[1] / g_total, noisy);
  add("gshard", config_.gshard_weight, totals[2] / g_total, true);
  add("z", config_.z_loss_weight, totals[3] / g_total, true);
  if (task_gate) {
    double mi = 0;
    if (config_.mi_per_rank) {
      mi = totals[base] / world.size();  // the mean of the ranks' own MI losses
    } else {
      std::copy(totals.begin() + base, totals.begin() + base + tasks * e_count,
                task_gate_sums_.begin());
      std::copy(totals.begin() + base + tasks * e_count, totals.end(), selection_counts_.begin());
      mi_grad_.assign(tasks * e_count, 0.0);
      mi = MutualInformationLoss(task_gate_sums_.data(), selection_counts_.data(), tasks, e, kk,
                                 mi_grad_.data());
    }
    add("mi", config_.mi_weight, mi, tasks > 2);
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
  const double tokens_total = g_total * s;
  metrics_.dropped_fraction.assign(k, 0.0);
  for (int64_t j = 0; j < k; ++j)
    metrics_.dropped_fraction[j] = totals[4 + e_count + j] / tokens_total;
  metrics_.capacity_used = kept / (static_cast<double>(e_count) * plan_.capacity * g_total);
}

Status MoeLayer::Forward(const Tensor& x, const MoeForwardArgs& args, Tensor* y) {
  const int64_t t = x.dim(0), d = config_.d;
  MOERUN_CHECK_SHAPE(x, {t, d});
  MOERUN_CHECK_SHAPE(*y, {t, d});
  int64_t s = 0;
  auto fixed =
      CheckGroupsAndCapacity(config_.capacity_rule(), t, config_.num_experts, config_.k, &s);
  if (!fixed.ok()) return fixed.status();

  // 1. Router: gates for every token and expert.
  {
    ScopedTimer timer(&timers_.router);
    RouterInputs in;
    in.training = args.training;
    in.noise_key = args.noise_key;
    in.first_token = args.first_token;
    in.noise = args.noise;
    in.task = args.task;
    MOERUN_RETURN_IF_ERROR(router_.Forward(x, in));
  }
  // 2. Routing plan (per group: top-k, priority order, slots; capacity) and losses.
  {
    ScopedTimer timer(&timers_.routing);
    PlanRouting(router_.gates(), config_.capacity_rule(), config_.k, s, *fixed, groups_->world(),
                &plan_);
    ComputeLosses(router_.noisy(), s);
  }
  // 3. Pack kept tokens into [E, G*cap, D], send them to the experts' ranks, run the
  // experts, bring the results back.
  {
    ScopedTimer timer(&timers_.pack);
    PackRows(plan_, x.data<float>(), d, &dispatch_);
  }
  dispatcher_.ToExperts(dispatch_, &expert_in_, &timers_.all_to_all, &timers_.pack);
  experts_.Forward(expert_in_, &expert_out_, &timers_);
  dispatcher_.FromExperts(expert_out_, &combine_in_, &timers_.all_to_all, &timers_.pack);
  // 4. Combine: y[s] = sum over kept choices of gate * expert output.
  ScopedTimer timer(&timers_.combine);
  GatherKeptRows(combine_in_.data<float>(), plan_.row.data<int32_t>(), plan_.weight.data<float>(),
                 t, config_.k, d, y->data<float>());
  return Status::Ok();
}

void MoeLayer::LossGradients(float* dg, float* dclean, float* dz, bool logit_space) {
  const int64_t s = plan_.group_size, e_count = config_.num_experts;
  const int e = static_cast<int>(e_count), kk = static_cast<int>(config_.k);
  const double g_total = static_cast<double>(plan_.groups) * groups_->world().size();
  for (const AuxTerm& term : losses_.terms) {
    if (!term.active) continue;
    const double scale = term.weight / g_total;
    for (int64_t g = 0; g < plan_.groups; ++g) {
      const int64_t off = g * s * e_count;
      if (!logit_space && term.name == "importance") {
        ImportanceLoss(router_.clean_gates().data<float>() + off, s, e, dclean + off, scale);
      } else if (!logit_space && term.name == "gshard") {
        GShardLoss(router_.gates().data<float>() + off, s, e, dg + off, scale);
      } else if (logit_space && term.name == "load") {
        LoadLoss(router_.logits().data<float>() + off, router_.noisy_logits().data<float>() + off,
                 s, e, kk, router_.sigma(), dz + off, scale);
      } else if (logit_space && term.name == "z") {
        ZLoss(router_.logits().data<float>() + off, s, e, dz + off, scale);
      }
    }
    if (!logit_space && term.name == "mi") {
      // d(w * L)/dp[s, e] = w * dL/da[task(s), e], per rank divided by the rank count.
      const double w = term.weight / (config_.mi_per_rank ? groups_->world().size() : 1);
      const int32_t* task = router_.task();
      for (int64_t tok = 0; tok < plan_.tokens; ++tok) {
        const double* ga = mi_grad_.data() + task[tok] * e_count;
        for (int64_t j = 0; j < e_count; ++j)
          dg[tok * e_count + j] += static_cast<float>(w * ga[j]);
      }
    }
  }
}

void MoeLayer::Backward(const Tensor& dy, Tensor* dx) {
  const int64_t t = plan_.tokens, d = config_.d, e_count = config_.num_experts, k = config_.k;
  MOERUN_CHECK_SHAPE(dy, {t, d});
  MOERUN_CHECK_SHAPE(*dx, {t, d});
  const int32_t* row = plan_.row.data<int32_t>();
  std::vector<float> d_weight(t * k, 0.0f);

  // 1. Combine backward: d gate = <dy, expert out>; d expert out = gate * dy (into
  // dispatch_, free now).
  {
    ScopedTimer timer(&timers_.bwd_combine);
    GatherKeptRowsBackward(combine_in_.data<float>(), row, plan_.weight.data<float>(),
                           dy.data<float>(), t, k, d, &dispatch_, d_weight.data());
  }
  dispatcher_.ToExperts(dispatch_, &d_expert_out_, &timers_.bwd_all_to_all, &timers_.bwd_pack);
  experts_.Backward(d_expert_out_, &d_expert_in_, &timers_);
  dispatcher_.FromExperts(d_expert_in_, &dispatch_, &timers_.bwd_all_to_all, &timers_.bwd_pack);

  // 2. Dispatch backward: dx[s] = sum over kept choices of d(dispatched row).
  {
    ScopedTimer timer(&timers_.bwd_dispatch);
    GatherKeptRows(dispatch_.data<float>(), row, nullptr, t, k, d, dx->data<float>());
  }

  // 3. Router backward: gates (combine weights and losses) -> logits -> W_r and x.
  ScopedTimer timer(&timers_.bwd_router);
  float *dg = nullptr, *dclean = nullptr;
  router_.BeginBackward(&dg, &dclean);
  const int32_t* idx = plan_.expert_index.data<int32_t>();
  for (int64_t i = 0; i < t * k; ++i) {
    if (row[i] >= 0) dg[(i / k) * e_count + idx[i]] += d_weight[i];
  }
  LossGradients(dg, dclean, nullptr, false);
  float* dz = router_.GatesToLogits();
  LossGradients(nullptr, nullptr, dz, true);
  router_.LogitsToInputs(dx->data<float>());
}

void MoeLayer::ReduceReplicaGradients() {
  Communicator* replicas = groups_->replicas();
  if (replicas == nullptr || replicas->size() == 1) return;
  for (Tensor* g : {&grads_.fc1_weight, &grads_.fc1_bias, &grads_.fc2_weight, &grads_.fc2_bias}) {
    replicas->AllReduce(g->raw_data(), g->numel(), DType::kF32, ReduceOp::kSum);
  }
}

}  // namespace moerun
