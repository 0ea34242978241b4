// Expert GEMMs.
#include "model/moe_experts.h"

#include "model/moe_dispatch.h"
#include "runtime/kernels.h"

namespace moerun {

void BatchedLinearForward(const Tensor& x, const Tensor& w, const Tensor* b, Tensor* y,
                          double* gemm, double* act) {
  const int64_t el = x.dim(0), r = x.dim(1), in = x.dim(2), out = w.dim(1);
  EnsureTensor(y, {el, r, out});
  {
    ScopedTimer timer(gemm);
    GemmStridedBatched(false, true, r, out, in, 1.0f, x.data<float>(), in, r * in, w.data<float>(),
                       in, out * in, 0.0f, y->data<float>(), out, r * out, el);
  }
  if (b == nullptr) return;
  ScopedTimer timer(act);
  for (int64_t e = 0; e < el; ++e) {
    AddBias(y->data<float>() + e * r * out, b->data<float>() + e * out, r, out);
  }
}

void BatchedLinearBackward(const Tensor& x, const Tensor& w, const Tensor& dy, Tensor* dw,
                           Tensor* db, Tensor* dx, double* gemm, double* act) {
  const int64_t el = x.dim(0), r = x.dim(1), in = x.dim(2), out = w.dim(1);
  if (db != nullptr) {
    ScopedTimer timer(act);
    for (int64_t e = 0; e < el; ++e) {
      BiasBackward(dy.data<float>() + e * r * out, db->data<float>() + e * out, r, out);
    }
  }
  ScopedTimer timer(gemm);
  for (int64_t e = 0; e < el; ++e) {
    Gemm(true, false, out, in, r, 1.0f, dy.data<float>() + e * r * out, out,
         x.data<float>() + e * r * in, in, 1.0f, dw->data<float>() + e * out * in, in);
  }
  if (dx == nullptr) return;
  EnsureTensor(dx, {el, r, in});
  GemmStridedBatched(false, false, r, in, out, 1.0f, dy.data<float>(), out, r * out,
                     w.data<float>(), in, out * in, 0.0f, dx->data<float>(), in, r * in, el);
}

ExpertMlp::ExpertMlp(int64_t el, int64_t d, int64_t m, bool gelu_tanh)
    : d_(d), m_(m), gelu_tanh_(gelu_tanh) {
  for (ExpertMlpParams* p : {&params_, &grads_}) {
    p->fc1_weight = Tensor::Zeros({el, m, d});
    p->fc1_bias = Tensor::Zeros({el, m});
    p->fc2_weight = Tensor::Zeros({el, d, m});
    p->fc2_bias = Tensor::Zeros({el, d});
  }
}

void ExpertMlp::ZeroGradients() {
  for (Tensor* t : {&grads_.fc1_weight, &grads_.fc1_bias, &grads_.fc2_weight, &grads_.fc2_bias}) {
    t->SetZero();
  }
}

void ExpertMlp::Forward(const Tensor& in, Tensor* out, MoeTimers* timers) {
  in_ = in;
  BatchedLinearForward(in, params_.fc1_weight, &params_.fc1_bias, &hidden_, &timers->expert,
                       &timers->expert_act);
  {
    ScopedTimer timer(&timers->expert_act);
    EnsureTensor(&act_, hidden_.shape());
    (gelu_tanh_ ? GeluTanhForward : GeluForward)(hidden_.data<float>(), act_.data<float>(),
                                                 hidden_.numel());
  }
  BatchedLinearForward(act_, params_.fc2_weight, &params_.fc2_bias, out, &timers->expert,
                       &timers->expert_act);
}

void ExpertMlp::Backward(const Tensor& d_out, Tensor* d_in, MoeTimers* timers) {
  BatchedLinearBackward(act_, params_.fc2_weight, d_out, &grads_.fc2_weight, &grads_.fc2_bias,
                        &d_act_, &timers->bwd_expert, &timers->bwd_expert_act);
  {
    ScopedTimer timer(&timers->bwd_expert_act);
    (gelu_tanh_ ? GeluTanhBackward : GeluBackward)(hidden_.data<float>(), d_act_.data<float>(),
                                                   d_act_.data<float>(), d_act_.numel());
  }
  BatchedLinearBackward(in_, params_.fc1_weight, d_act_, &grads_.fc1_weight, &grads_.fc1_bias, d_in,
                        &timers->bwd_expert, &timers->bwd_expert_act);
}

}  // namespace moerun
