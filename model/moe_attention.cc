// Mixture of attention heads: forward and backward.
#include "model/moe_attention.h"

#include <string>
#include <vector>

#include "model/layers.h"
#include "model/moe_experts.h"
#include "model/ops.h"
#include "runtime/kernels.h"

namespace moerun {

MoeAttention::MoeAttention(const MoeAttentionConfig& config, std::shared_ptr<MoeGroups> groups)
    : config_(config),
      groups_(std::move(groups)),
      router_(GateKind::kTaskSoftmax, config.tasks, config.num_experts, config.d, 0.0),
      dispatcher_(groups_.get()),
      aux_(config.aux) {
  CHECK_EQ(config_.num_experts, groups_->num_experts()) << "MoE attention and groups disagree on E";
  CHECK(config_.k >= 1 && config_.k <= config_.num_experts) << "k " << config_.k;
  const int64_t el = groups_->local_experts(), d = config_.d, dh = config_.head_dim;
  aux_.InitUsage(config_.tasks, config_.num_experts);
  params_.router_weight = router_.weight();
  grads_.router_weight = router_.grad();
  for (MoeAttentionParams* p : {&params_, &grads_}) {
    p->q_weight = Tensor::Zeros({el, dh, d});
    p->o_weight = Tensor::Zeros({el, d, dh});
    p->kv_weight = Tensor::Zeros({2 * dh, d});
    p->kv_bias = Tensor::Zeros({2 * dh});
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
  MOERUN_CHECK_SHAPE(x, {t, d});
  MOERUN_CHECK_SHAPE(*y, {t, d});
  if (seq_len < 1 || t % seq_len != 0) {
    return Status::Error("MoE attention: " + std::to_string(t) +
                         " tokens are not whole sequences of " + std::to_string(seq_len));
  }
  int64_t s = 0;
  auto fixed = CheckGroupsAndCapacity(config_.capacity, t, config_.num_experts, k, &s);
  if (!fixed.ok()) return fixed.status();
  x_ = x;
  seq_len_ = seq_len;
  {
    ScopedTimer timer(&timers_.router);
    RouterInputs in;
    in.training = args.training;
    in.task = args.task;
    in.noise = args.noise;
    MOERUN_RETURN_IF_ERROR(router_.Forward(x, in));
  }
  {
    ScopedTimer timer(&timers_.routing);
    PlanRouting(router_.gates(), config_.capacity, static_cast<int>(k), s, *fixed, groups_->world(),
                &plan_, args.routed);
    aux_.Compute(router_, plan_, groups_->world());
    if (args.training) aux_.UpdateUsage();
  }
  // Shared keys and values.
  const OpsTable& ops = Ops(params_.kv_weight.device());
  EnsureTensor(&kv_, {t, 2 * dh});
  LinearForward(ops, x.data<float>(), params_.kv_weight.data<float>(),
                params_.kv_bias.data<float>(), kv_.data<float>(), t, d, 2 * dh);
  // Round trip 1: x to the experts, queries back.
  {
    ScopedTimer timer(&timers_.pack);
    PackRows(plan_, x.data<float>(), d, &send_);
  }
  dispatcher_.ToExperts(send_, &x_exp_, &timers_.all_to_all, &timers_.pack);
  BatchedLinearForward(x_exp_, params_.q_weight, nullptr, &q_exp_, &timers_.expert,
                       &timers_.expert_act);
  dispatcher_.FromExperts(q_exp_, &q_buf_, &timers_.all_to_all, &timers_.pack);
  EnsureTensor(&q_tok_, {t, k, dh});
  GatherChoiceRows(plan_, q_buf_, dh, q_tok_.data<float>());
  // Attention of every kept query over its own sequence.
  {
    ScopedTimer timer(&timers_.combine);
    EnsureTensor(&probs_, {t, k, seq_len});
    EnsureTensor(&a_tok_, {t, k, dh});
    MOERUN_OP(ops, choice_attention_forward)
    (q_tok_.data<float>(), kv_.data<float>(), plan_.row.data<int32_t>(), t, k, dh, seq_len,
     probs_.data<float>(), a_tok_.data<float>());
  }
  // Round trip 2: head outputs to the experts, projected outputs back; combine.
  {
    ScopedTimer timer(&timers_.pack);
    ScatterChoiceRows(plan_, a_tok_.data<float>(), dh, &send_);
  }
  dispatcher_.ToExperts(send_, &a_exp_, &timers_.all_to_all, &timers_.pack);
  BatchedLinearForward(a_exp_, params_.o_weight, nullptr, &o_exp_, &timers_.expert,
                       &timers_.expert_act);
  dispatcher_.FromExperts(o_exp_, &o_buf_, &timers_.all_to_all, &timers_.pack);
  ScopedTimer timer(&timers_.combine);
  GatherKeptRows(o_buf_.data<float>(), plan_.row.data<int32_t>(), plan_.weight.data<float>(), t, k,
                 d, y->data<float>());
  return Status::Ok();
}

void MoeAttention::Backward(const Tensor& dy, Tensor* dx) {
  const int64_t t = plan_.tokens, d = config_.d, dh = config_.head_dim, k = config_.k;
  const int64_t seq_len = seq_len_;
  MOERUN_CHECK_SHAPE(dy, {t, d});
  MOERUN_CHECK_SHAPE(*dx, {t, d});
  const int32_t* row = plan_.row.data<int32_t>();
  std::vector<float> d_weight(t * k, 0.0f);
  Tensor d_buf, d_exp, d_in_exp;
  // Combine: d gate and d(projected outputs).
  {
    ScopedTimer timer(&timers_.bwd_combine);
    EnsureTensor(&d_buf, o_buf_.shape());
    GatherKeptRowsBackward(o_buf_.data<float>(), row, plan_.weight.data<float>(), dy.data<float>(),
                           t, k, d, &d_buf, d_weight.data());
  }
  dispatcher_.ToExperts(d_buf, &d_exp, &timers_.bwd_all_to_all, &timers_.bwd_pack);
  BatchedLinearBackward(a_exp_, params_.o_weight, d_exp, &grads_.o_weight, nullptr, &d_in_exp,
                        &timers_.bwd_expert, &timers_.bwd_expert_act);
  dispatcher_.FromExperts(d_in_exp, &d_buf, &timers_.bwd_all_to_all, &timers_.bwd_pack);
  Tensor d_a = Tensor::Empty({t, k, dh});
  GatherChoiceRows(plan_, d_buf, dh, d_a.data<float>());
  // Attention backward: d queries per choice; d keys / values per sequence.
  const OpsTable& ops = Ops(params_.kv_weight.device());
  Tensor d_q = Tensor::Empty({t, k, dh});
  Tensor d_kv = Tensor::Empty({t, 2 * dh});
  {
    ScopedTimer timer(&timers_.bwd_combine);
    MOERUN_OP(ops, choice_attention_backward)
    (q_tok_.data<float>(), kv_.data<float>(), row, probs_.data<float>(), d_a.data<float>(), t, k,
     dh, seq_len, d_q.data<float>(), d_kv.data<float>());
  }
  // Round trip 1 backward: d queries to the experts, d x back.
  {
    ScopedTimer timer(&timers_.bwd_pack);
    ScatterChoiceRows(plan_, d_q.data<float>(), dh, &d_buf);
  }
  dispatcher_.ToExperts(d_buf, &d_exp, &timers_.bwd_all_to_all, &timers_.bwd_pack);
  BatchedLinearBackward(x_exp_, params_.q_weight, d_exp, &grads_.q_weight, nullptr, &d_in_exp,
                        &timers_.bwd_expert, &timers_.bwd_expert_act);
  dispatcher_.FromExperts(d_in_exp, &d_buf, &timers_.bwd_all_to_all, &timers_.bwd_pack);
  {
    ScopedTimer timer(&timers_.bwd_dispatch);
    GatherKeptRows(d_buf.data<float>(), row, nullptr, t, k, d, dx->data<float>());
  }
  // Shared key / value projection.
  Tensor dx_kv = Tensor::Empty({t, d});
  LinearBackward(ops, x_.data<float>(), params_.kv_weight.data<float>(), d_kv.data<float>(),
                 dx_kv.data<float>(), grads_.kv_weight.data<float>(), grads_.kv_bias.data<float>(),
                 t, d, 2 * dh);
  MOERUN_OP(ops, axpy)(1.0f, dx_kv.data<float>(), dx->data<float>(), t * d);
  ScopedTimer timer(&timers_.bwd_router);
  aux_.RouterBackward(&router_, plan_, d_weight.data(), groups_->world().size(), dx->data<float>());
}

void MoeAttention::ReduceReplicaGradients() {
  Communicator* replicas = groups_->replicas();
  if (replicas == nullptr || replicas->size() == 1) return;
  for (Tensor* g : {&grads_.q_weight, &grads_.o_weight}) {
    replicas->AllReduce(g->raw_data(), g->numel(), DType::kF32, ReduceOp::kSum);
  }
}

}  // namespace moerun
