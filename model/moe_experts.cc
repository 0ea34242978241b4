// Expert GEMMs.
#include "model/moe_experts.h"

#include "model/moe_dispatch.h"
#include "runtime/kernels.h"

namespace moerun {

namespace {

// Rows [begin, begin + count) of every expert's block: x [El, R, in] -> y [El, R, out].
void LinearForwardRows(const Tensor& x, const Tensor& w, const Tensor* b, Tensor* y, int64_t begin,
                       int64_t count, double* gemm, double* act) {
  const int64_t el = x.dim(0), r = x.dim(1), in = x.dim(2), out = w.dim(1);
  if (count == 0) return;
  {
    ScopedTimer timer(gemm);
    GemmStridedBatched(false, true, count, out, in, 1.0f, x.data<float>() + begin * in, in, r * in,
                       w.data<float>(), in, out * in, 0.0f, y->data<float>() + begin * out, out,
                       r * out, el);
  }
  if (b == nullptr) return;
  ScopedTimer timer(act);
  for (int64_t e = 0; e < el; ++e) {
    AddBias(y->data<float>() + (e * r + begin) * out, b->data<float>() + e * out, count, out);
  }
}

// dW[e] += dy[e, rows]^T x[e, rows], db[e] += sum over the rows of dy, dx[e, rows] = dy W.
void LinearBackwardRows(const Tensor& x, const Tensor& w, const Tensor& dy, Tensor* dw, Tensor* db,
                        Tensor* dx, int64_t begin, int64_t count, double* gemm, double* act) {
  const int64_t el = x.dim(0), r = x.dim(1), in = x.dim(2), out = w.dim(1);
  if (count == 0) return;
  if (db != nullptr) {
    ScopedTimer timer(act);
    for (int64_t e = 0; e < el; ++e) {
      BiasBackward(dy.data<float>() + (e * r + begin) * out, db->data<float>() + e * out, count,
                   out);
    }
  }
  ScopedTimer timer(gemm);
  for (int64_t e = 0; e < el; ++e) {
    Gemm(true, false, out, in, count, 1.0f, dy.data<float>() + (e * r + begin) * out, out,
         x.data<float>() + (e * r + begin) * in, in, 1.0f, dw->data<float>() + e * out * in, in);
  }
  if (dx == nullptr) return;
  GemmStridedBatched(false, false, count, in, out, 1.0f, dy.data<float>() + begin * out, out,
                     r * out, w.data<float>(), in, out * in, 0.0f, dx->data<float>() + begin * in,
                     in, r * in, el);
}

}  // namespace

void BatchedLinearForward(const Tensor& x, const Tensor& w, const Tensor* b, Tensor* y,
                          double* gemm, double* act) {
  EnsureTensor(y, {x.dim(0), x.dim(1), w.dim(1)});
  LinearForwardRows(x, w, b, y, 0, x.dim(1), gemm, act);
}

void BatchedLinearBackward(const Tensor& x, const Tensor& w, const Tensor& dy, Tensor* dw,
                           Tensor* db, Tensor* dx, double* gemm, double* act) {
  if (dx != nullptr) EnsureTensor(dx, {x.dim(0), x.dim(1), x.dim(2)});
  LinearBackwardRows(x, w, dy, dw, db, dx, 0, x.dim(1), gemm, act);
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
  PrepareForward(in, out);
  ForwardRows(0, in.dim(1), timers);
}

void ExpertMlp::PrepareForward(const Tensor& in, Tensor* out) {
  const int64_t el = in.dim(0), r = in.dim(1);
  in_ = in;
  out_ = out;
  EnsureTensor(&hidden_, {el, r, m_});
  EnsureTensor(&act_, {el, r, m_});
  EnsureTensor(out, {el, r, d_});
}

void ExpertMlp::ForwardRows(int64_t begin, int64_t count, MoeTimers* timers) {
  const int64_t el = in_.dim(0), r = in_.dim(1);
  CHECK(begin >= 0 && count >= 0 && begin + count <= r) << "expert rows out of range";
  LinearForwardRows(in_, params_.fc1_weight, &params_.fc1_bias, &hidden_, begin, count,
                    &timers->expert, &timers->expert_act);
  {
    ScopedTimer timer(&timers->expert_act);
    // Whole blocks are one contiguous run; a row range is one run per expert.
    const bool whole = count == r;
    for (int64_t e = 0; e < (whole ? 1 : el); ++e) {
      const int64_t at = (e * r + begin) * m_;
      (gelu_tanh_ ? GeluTanhForward : GeluForward)(
          hidden_.data<float>() + at, act_.data<float>() + at, (whole ? el * r : count) * m_);
    }
  }
  LinearForwardRows(act_, params_.fc2_weight, &params_.fc2_bias, out_, begin, count,
                    &timers->expert, &timers->expert_act);
}

void ExpertMlp::Backward(const Tensor& d_out, Tensor* d_in, MoeTimers* timers) {
  PrepareBackward(d_out, d_in);
  BackwardRows(0, d_out.dim(1), timers);
}

void ExpertMlp::PrepareBackward(const Tensor& d_out, Tensor* d_in) {
  MOERUN_CHECK_SHAPE(d_out, {in_.dim(0), in_.dim(1), d_});
  d_out_ = d_out;
  d_in_ = d_in;
  EnsureTensor(&d_act_, hidden_.shape());
  EnsureTensor(d_in, in_.shape());
}

void ExpertMlp::BackwardRows(int64_t begin, int64_t count, MoeTimers* timers) {
  const int64_t el = in_.dim(0), r = in_.dim(1);
  CHECK(begin >= 0 && count >= 0 && begin + count <= r) << "expert rows out of range";
  LinearBackwardRows(act_, params_.fc2_weight, d_out_, &grads_.fc2_weight, &grads_.fc2_bias,
                     &d_act_, begin, count, &timers->bwd_expert, &timers->bwd_expert_act);
  {
    ScopedTimer timer(&timers->bwd_expert_act);
    const bool whole = count == r;
    for (int64_t e = 0; e < (whole ? 1 : el); ++e) {
      const int64_t at = (e * r + begin) * m_;
      (gelu_tanh_ ? GeluTanhBackward : GeluBackward)(
          hidden_.data<float>() + at, d_act_.data<float>() + at, d_act_.data<float>() + at,
          (whole ? el * r : count) * m_);
    }
  }
  LinearBackwardRows(in_, params_.fc1_weight, d_act_, &grads_.fc1_weight, &grads_.fc1_bias, d_in_,
                     begin, count, &timers->bwd_expert, &timers->bwd_expert_act);
}

}  // namespace moerun
