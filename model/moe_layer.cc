// The expert-parallel MoE layer: router -> routing plan -> pack -> dispatcher -> expert MLPs
// -> dispatcher back -> combine, and the auxiliary losses as named terms.
#include "model/moe_layer.h"

#include <algorithm>
#include <cstring>

#include "model/moe_losses.h"
#include "model/ops.h"
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

AuxWeights MoeLayerConfig::aux_weights() const {
  AuxWeights w;
  w.importance = importance_weight;
  w.load = load_weight;
  w.gshard = gshard_weight;
  w.z = z_loss_weight;
  w.mi = mi_weight;
  w.mi_per_rank = mi_per_rank;
  return w;
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
  c.overlap_dispatch = moe.overlap_dispatch();
  c.overlap_stages = moe.overlap_stages();
  c.group_size = moe.group_size() > 0 ? moe.group_size() : moe.group_images() * tokens_per_image;
  c.gelu_tanh = gelu_tanh;
  c.noise_std = moe.noise_std();
  c.importance_weight = moe.importance_weight();
  c.load_weight = moe.load_weight();
  c.gshard_weight = moe.gshard_weight();
  c.z_loss_weight = moe.z_loss_weight();
  return c;
}

StatusOr<std::shared_ptr<MoeGroups>> MoeGroups::Create(Communicator* world, int num_experts,
                                                       Communicator* device_world) {
  const int p = world->size(), r = world->rank();
  if (device_world != nullptr && (device_world->size() != p || device_world->rank() != r)) {
    return Status::Error("the device communicator (" + std::to_string(device_world->size()) +
                         " ranks) is not over the world's " + std::to_string(p) + " ranks");
  }
  auto placement = PlaceExperts(num_experts, p);
  if (!placement.ok()) return placement.status();
  auto g = std::make_shared<MoeGroups>();
  g->world_ = world;
  g->num_experts_ = num_experts;
  g->local_experts_ = placement->experts_per_rank;
  g->device_world_ = device_world;
  Communicator* rows = device_world != nullptr ? device_world : world;
  if (placement->replicas == 1) {
    g->first_local_expert_ = r * g->local_experts_;
  } else {
    // Replica set r / E holds every expert once; ranks r and r + E hold the same expert.
    g->first_local_expert_ = r % num_experts;
    g->expert_ = rows->Split(r / num_experts, r, "expert_parallel");
    g->replicas_ = rows->Split(r % num_experts, r, "expert_replicas");
  }
  return g;
}

MoeLayer::MoeLayer(const MoeLayerConfig& config, std::shared_ptr<MoeGroups> groups)
    : config_(config),
      groups_(std::move(groups)),
      router_(config.gate, config.tasks, config.num_experts, config.d, config.noise_std,
              config.device),
      dispatcher_(groups_.get()),
      experts_(groups_->local_experts(), config.d, config.m, config.gelu_tanh, config.device),
      aux_(config.aux_weights()) {
  CHECK_EQ(config_.num_experts, groups_->num_experts()) << "MoE layer and groups disagree on E";
  CHECK(config_.k >= 1 && config_.k <= config_.num_experts) << "k " << config_.k;
  if (config_.gate == GateKind::kTaskSoftmax) aux_.InitUsage(config_.tasks, config_.num_experts);
  params_ = {router_.weight(), experts_.params().fc1_weight, experts_.params().fc1_bias,
             experts_.params().fc2_weight, experts_.params().fc2_bias};
  grads_ = {router_.grad(), experts_.grads().fc1_weight, experts_.grads().fc1_bias,
            experts_.grads().fc2_weight, experts_.grads().fc2_bias};
}

void MoeLayer::ZeroGradients() {
  router_.grad().SetZero();
  experts_.ZeroGradients();
}

Status MoeLayer::Forward(const Tensor& x, const MoeForwardArgs& args, Tensor* y) {
  const int64_t t = x.dim(0), d = config_.d;
  MOERUN_CHECK_SHAPE(x, {t, d});
  MOERUN_CHECK_SHAPE(*y, {t, d});
  const Device dev = config_.device;
  CHECK(x.device() == dev && y->device() == dev) << "MoE layer on " << DeviceName(dev) << " got "
                                                 << x.ShapeString() << " -> " << y->ShapeString();
  int64_t s = 0;
  auto fixed =
      CheckGroupsAndCapacity(config_.capacity_rule(), t, config_.num_experts, config_.k, &s);
  if (!fixed.ok()) return fixed.status();

  device_routed_ = DeviceRouting::Applies(dev, args.routed, args.noise);
  // 1. Router: gates for every token and expert.
  {
    ScopedTimer timer(&timers_.router, config_.device);
    RouterInputs in;
    in.training = args.training;
    in.noise_key = args.noise_key;
    in.first_token = args.first_token;
    in.noise = args.noise;
    in.task = args.task;
    MOERUN_RETURN_IF_ERROR(device_routed_ ? router_.ForwardOnDevice(x, in)
                                          : router_.Forward(x, in));
  }
  // 2. Routing plan (per group: top-k, priority order, slots; capacity) and losses.
  {
    ScopedTimer timer(&timers_.routing, config_.device);
    if (device_routed_) {
      // The plan on the device; its tables and the router's start their way to the host,
      // for the losses, which the host computes after the experts and combine are queued.
      routing_.Plan(&router_, config_.k, config_.bpr, s, *fixed, groups_->world(), &device_plan_,
                    &plan_);
    } else {
      RouteOnHost(router_, config_.capacity_rule(), config_.k, s, *fixed, groups_->world(),
                  args.routed, args.training, dev, &plan_, &aux_, &device_plan_);
    }
  }
  // 3. Pack kept tokens into [E, G*cap, D], send them to the experts' ranks, run the
  // experts, bring the results back.
  {
    ScopedTimer timer(&timers_.pack, config_.device);
    ops::PackRows(device_plan_, x, &dispatch_);
  }
  if (local()) {
    // One expert-parallel rank: [E, G*cap, D] is already the experts' [E_local, R, D] and
    // their output the combine's input; no all-to-all, no copies.
    experts_.Forward(dispatch_, &expert_out_, &timers_);
  } else if (overlapped()) {
    dispatcher_.PrepareExpertRows(dispatch_, &expert_in_);
    experts_.PrepareForward(expert_in_, &expert_out_);
    dispatcher_.ToExpertsOverlapped(
        dispatch_, &expert_in_,
        [&](int64_t begin, int64_t count) { experts_.ForwardRows(begin, count, &timers_); },
        &timers_.all_to_all, &timers_.pack, 4, config_.overlap_stages);
  } else {
    dispatcher_.ToExperts(dispatch_, &expert_in_, &timers_.all_to_all, &timers_.pack);
    experts_.Forward(expert_in_, &expert_out_, &timers_);
  }
  if (!local()) {
    dispatcher_.FromExperts(expert_out_, &combine_in_, &timers_.all_to_all, &timers_.pack);
  }
  // 4. Combine: y[s] = sum over kept choices of gate * expert output.
  {
    ScopedTimer timer(&timers_.combine, config_.device);
    ops::CombineRows(combined(), device_plan_.row, device_plan_.weight, y);
  }
  // 5. Device routing: the losses on the host while the device runs the experts, and the
  // losses' part of d(logits) to the device for the backward.
  if (device_routed_) {
    ScopedTimer timer(&timers_.routing, config_.device);
    routing_.Finish(&router_, &plan_, &aux_, groups_->world(), args.training);
  }
  return Status::Ok();
}

void MoeLayer::Backward(const Tensor& dy, Tensor* dx) {
  const int64_t t = plan_.tokens, d = config_.d;
  MOERUN_CHECK_SHAPE(dy, {t, d});
  MOERUN_CHECK_SHAPE(*dx, {t, d});
  // 1. Combine backward: d gate = <dy, expert out>; d expert out = gate * dy (into
  // dispatch_, free now; with one expert-parallel rank dispatch_ is the experts' saved
  // input, so straight into their d_expert_out_).
  {
    ScopedTimer timer(&timers_.bwd_combine, config_.device);
    ops::CombineRowsBackward(combined(), device_plan_.row, device_plan_.weight, dy,
                             local() ? &d_expert_out_ : &dispatch_, &d_weight_);
  }
  if (local()) {
    experts_.Backward(d_expert_out_, &d_expert_in_, &timers_);
  } else if (overlapped()) {
    dispatcher_.PrepareExpertRows(dispatch_, &d_expert_out_);
    experts_.PrepareBackward(d_expert_out_, &d_expert_in_);
    dispatcher_.ToExpertsOverlapped(
        dispatch_, &d_expert_out_,
        [&](int64_t begin, int64_t count) { experts_.BackwardRows(begin, count, &timers_); },
        &timers_.bwd_all_to_all, &timers_.bwd_pack, 4, config_.overlap_stages);
  } else {
    dispatcher_.ToExperts(dispatch_, &d_expert_out_, &timers_.bwd_all_to_all, &timers_.bwd_pack);
    experts_.Backward(d_expert_out_, &d_expert_in_, &timers_);
  }
  if (!local()) {
    dispatcher_.FromExperts(d_expert_in_, &dispatch_, &timers_.bwd_all_to_all, &timers_.bwd_pack);
  }

  // 2. Dispatch backward: dx[s] = sum over kept choices of d(dispatched row).
  {
    ScopedTimer timer(&timers_.bwd_dispatch, config_.device);
    ops::CombineRows(local() ? d_expert_in_ : dispatch_, device_plan_.row, Tensor(), dx);
  }

  // 3. Router backward: gates (combine weights and losses) -> logits -> W_r and x.
  ScopedTimer timer(&timers_.bwd_router, config_.device);
  if (!device_routed_) {
    aux_.RouterBackward(&router_, plan_, d_weight_, groups_->world().size(), dx);
    return;
  }
  routing_.Backward(&router_, plan_, device_plan_, aux_, d_weight_, groups_->world().size(), dx);
}

bool MoeLayer::local() const { return groups_->expert().size() == 1; }

const Tensor& MoeLayer::combined() const { return local() ? expert_out_ : combine_in_; }

bool MoeLayer::overlapped() const { return config_.overlap_dispatch && !local(); }

void MoeLayer::ReduceReplicaGradients() {
  Communicator* replicas = groups_->replicas();
  if (replicas == nullptr || replicas->size() == 1) return;
  for (Tensor* g : {&grads_.fc1_weight, &grads_.fc1_bias, &grads_.fc2_weight, &grads_.fc2_bias}) {
    replicas->AllReduce(g->raw_data(), g->numel(), DType::kF32, ReduceOp::kSum);
  }
}

}  // namespace moerun
