// Mixture of attention heads: forward and backward.
#include "model/moe_attention.h"

#include <string>

#include "model/layers.h"
#include "model/moe_experts.h"
#include "model/ops.h"
#include "runtime/kernels.h"

namespace moerun {

MoeAttention::MoeAttention(const MoeAttentionConfig& config, std::shared_ptr<MoeGroups> groups)
    : config_(config),
      groups_(std::move(groups)),
      router_(GateKind::kTaskSoftmax, config.tasks, config.num_experts, config.d, 0.0,
              config.device),
      dispatcher_(groups_.get()),
      aux_(config.aux) {
  CHECK_EQ(config_.num_experts, groups_->num_experts()) << "MoE attention and groups disagree on E";
  CHECK(config_.k >= 1 && config_.k <= config_.num_experts) << "k " << config_.k;
  const int64_t el = groups_->local_experts(), d = config_.d, dh = config_.head_dim;
  const Device dev = config_.device;
  aux_.InitUsage(config_.tasks, config_.num_experts);
  params_.router_weight = router_.weight();
  grads_.router_weight = router_.grad();
  for (MoeAttentionParams* p : {&params_, &grads_}) {
    p->q_weight = Tensor::Zeros({el, dh, d}, DType::kF32, dev);
    p->o_weight = Tensor::Zeros({el, d, dh}, DType::kF32, dev);
    p->kv_weight = Tensor::Zeros({2 * dh, d}, DType::kF32, dev);
    p->kv_bias = Tensor::Zeros({2 * dh}, DType::kF32, dev);
  }
}

void MoeAttention::ZeroGradients() {
  for (Tensor* t : {&grads_.router_weight, &grads_.q_weight, &grads_.o_weight, &grads_.kv_weight,
                    &grads_.kv_bias}) {
    t->SetZero();
  }
}

Status MoeAttention::Forward(const Tensor& x, int64_t seq_len, const MoeForwardArgs& args,
                             Tensor* y) {
  const int64_t t = x.dim(0), d = config_.d, dh = config_.head_dim, k = config_.k;
  const Device dev = config_.device;
  MOERUN_CHECK_SHAPE(x, {t, d});
  MOERUN_CHECK_SHAPE(*y, {t, d});
  CHECK(x.device() == dev && y->device() == dev)
      << "MoE attention on " << DeviceName(dev) << " got " << x.ShapeString() << " -> "
      << y->ShapeString();
  if (seq_len < 1 || t % seq_len != 0) {
    return Status::Error("MoE attention: " + std::to_string(t) +
                         " tokens are not whole sequences of " + std::to_string(seq_len));
  }
  int64_t s = 0;
  auto fixed = CheckGroupsAndCapacity(config_.capacity, t, config_.num_experts, k, &s);
  if (!fixed.ok()) return fixed.status();
  x_ = x;
  seq_len_ = seq_len;
  device_routed_ = DeviceRouting::Applies(dev, args.routed, args.noise);
  {
    ScopedTimer timer(&timers_.router, config_.device);
    RouterInputs in;
    in.training = args.training;
    in.task = args.task;
    in.noise = args.noise;
    MOERUN_RETURN_IF_ERROR(device_routed_ ? router_.ForwardOnDevice(x, in)
                                          : router_.Forward(x, in));
  }
  {
    ScopedTimer timer(&timers_.routing, config_.device);
    if (device_routed_) {
      // As the MoE layer's: the losses wait until the whole forward is queued.
      routing_.Plan(&router_, static_cast<int>(k), config_.capacity.bpr, s, *fixed,
                    groups_->world(), &device_plan_, &plan_);
    } else {
      RouteOnHost(router_, config_.capacity, static_cast<int>(k), s, *fixed, groups_->world(),
                  args.routed, args.training, dev, &plan_, &aux_, &device_plan_);
    }
  }
  // Shared keys and values.
  const OpsTable& ops = Ops(dev);
  EnsureTensor(&kv_, {t, 2 * dh}, DType::kF32, dev);
  LinearForward(ops, x.device_data<float>(dev), params_.kv_weight.device_data<float>(dev),
                params_.kv_bias.device_data<float>(dev), kv_.device_data<float>(dev), t, d, 2 * dh);
  // Round trip 1: x to the experts, queries back.
  {
    ScopedTimer timer(&timers_.pack, config_.device);
    ops::PackRows(device_plan_, x, &send_);
  }
  dispatcher_.ToExperts(send_, &x_exp_, &timers_.all_to_all, &timers_.pack);
  BatchedLinearForward(x_exp_, params_.q_weight, nullptr, &q_exp_, &timers_.expert,
                       &timers_.expert_act);
  dispatcher_.FromExperts(q_exp_, &q_buf_, &timers_.all_to_all, &timers_.pack);
  ops::GatherChoiceRows(q_buf_, device_plan_.row, &q_tok_);
  // Attention of every kept query over its own sequence.
  {
    ScopedTimer timer(&timers_.combine, config_.device);
    EnsureTensor(&probs_, {t, k, seq_len}, DType::kF32, dev);
    EnsureTensor(&a_tok_, {t, k, dh}, DType::kF32, dev);
    MOERUN_OP(ops, choice_attention_forward)
    (q_tok_.device_data<float>(dev), kv_.device_data<float>(dev),
     device_plan_.row.device_data<int32_t>(dev), t, k, dh, seq_len, probs_.device_data<float>(dev),
     a_tok_.device_data<float>(dev));
  }
  // Round trip 2: head outputs to the experts, projected outputs back; combine.
  {
    ScopedTimer timer(&timers_.pack, config_.device);
    ops::ScatterChoiceRows(device_plan_, a_tok_, &send_);
  }
  dispatcher_.ToExperts(send_, &a_exp_, &timers_.all_to_all, &timers_.pack);
  BatchedLinearForward(a_exp_, params_.o_weight, nullptr, &o_exp_, &timers_.expert,
                       &timers_.expert_act);
  dispatcher_.FromExperts(o_exp_, &o_buf_, &timers_.all_to_all, &timers_.pack);
  {
    ScopedTimer timer(&timers_.combine, config_.device);
    ops::CombineRows(o_buf_, device_plan_.row, device_plan_.weight, y);
  }
  if (device_routed_) {
    ScopedTimer timer(&timers_.routing, config_.device);
    routing_.Finish(&router_, &plan_, &aux_, groups_->world(), args.training);
  }
  return Status::Ok();
}

void MoeAttention::Backward(const Tensor& dy, Tensor* dx) {
  const int64_t t = plan_.tokens, d = config_.d, dh = config_.head_dim, k = config_.k;
  const int64_t seq_len = seq_len_;
  const Device dev = config_.device;
  MOERUN_CHECK_SHAPE(dy, {t, d});
  MOERUN_CHECK_SHAPE(*dx, {t, d});
  const Tensor& row = device_plan_.row;
  Tensor d_buf, d_exp, d_in_exp;
  // Combine: d gate and d(projected outputs).
  {
    ScopedTimer timer(&timers_.bwd_combine, config_.device);
    ops::CombineRowsBackward(o_buf_, row, device_plan_.weight, dy, &d_buf, &d_weight_);
  }
  dispatcher_.ToExperts(d_buf, &d_exp, &timers_.bwd_all_to_all, &timers_.bwd_pack);
  BatchedLinearBackward(a_exp_, params_.o_weight, d_exp, &grads_.o_weight, nullptr, &d_in_exp,
                        &timers_.bwd_expert, &timers_.bwd_expert_act);
  dispatcher_.FromExperts(d_in_exp, &d_buf, &timers_.bwd_all_to_all, &timers_.bwd_pack);
  Tensor d_a;
  ops::GatherChoiceRows(d_buf, row, &d_a);
  // Attention backward: d queries per choice; d keys / values per sequence.
  const OpsTable& ops = Ops(dev);
  Tensor d_q = Tensor::Empty({t, k, dh}, DType::kF32, dev);
  Tensor d_kv = Tensor::Empty({t, 2 * dh}, DType::kF32, dev);
  {
    ScopedTimer timer(&timers_.bwd_combine, config_.device);
    MOERUN_OP(ops, choice_attention_backward)
    (q_tok_.device_data<float>(dev), kv_.device_data<float>(dev), row.device_data<int32_t>(dev),
     probs_.device_data<float>(dev), d_a.device_data<float>(dev), t, k, dh, seq_len,
     d_q.device_data<float>(dev), d_kv.device_data<float>(dev));
  }
  // Round trip 1 backward: d queries to the experts, d x back.
  {
    ScopedTimer timer(&timers_.bwd_pack, config_.device);
    ops::ScatterChoiceRows(device_plan_, d_q, &d_buf);
  }
  dispatcher_.ToExperts(d_buf, &d_exp, &timers_.bwd_all_to_all, &timers_.bwd_pack);
  BatchedLinearBackward(x_exp_, params_.q_weight, d_exp, &grads_.q_weight, nullptr, &d_in_exp,
                        &timers_.bwd_expert, &timers_.bwd_expert_act);
  dispatcher_.FromExperts(d_in_exp, &d_buf, &timers_.bwd_all_to_all, &timers_.bwd_pack);
  {
    ScopedTimer timer(&timers_.bwd_dispatch, config_.device);
    ops::CombineRows(d_buf, row, Tensor(), dx);
  }
  // Shared key / value projection.
  Tensor dx_kv = Tensor::Empty({t, d}, DType::kF32, dev);
  LinearBackward(ops, x_.device_data<float>(dev), params_.kv_weight.device_data<float>(dev),
                 d_kv.device_data<float>(dev), dx_kv.device_data<float>(dev),
                 grads_.kv_weight.device_data<float>(dev), grads_.kv_bias.device_data<float>(dev),
                 t, d, 2 * dh);
  MOERUN_OP(ops, axpy)(1.0f, dx_kv.device_data<float>(dev), dx->device_data<float>(dev), t * d);
  // The router: gates -> logits (on the device with device routing, else on the host),
  // -> W_r and x on the device.
  ScopedTimer timer(&timers_.bwd_router, config_.device);
  if (device_routed_) {
    routing_.Backward(&router_, plan_, device_plan_, aux_, d_weight_, groups_->world().size(), dx);
  } else {
    aux_.RouterBackward(&router_, plan_, d_weight_, groups_->world().size(), dx);
  }
}

void MoeAttention::ReduceReplicaGradients() {
  Communicator* replicas = groups_->replicas();
  if (replicas == nullptr || replicas->size() == 1) return;
  for (Tensor* g : {&grads_.q_weight, &grads_.o_weight}) {
    replicas->AllReduce(g->raw_data(), g->numel(), DType::kF32, ReduceOp::kSum);
  }
}

}  // namespace moerun
