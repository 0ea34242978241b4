// Expert GEMMs, bias and GELU through the ops of the weights' device (model/ops.h).
#include "model/moe_experts.h"

#include "model/moe_dispatch.h"
#include "model/ops.h"

namespace moerun {

namespace {

// Rows [begin, begin + count) of every expert's block: x [El, R, in] -> y [El, R, out].
void LinearForwardRows(const Tensor& x, const Tensor& w, const Tensor* b, Tensor* y, int64_t begin,
                       int64_t count, double* gemm, double* act) {
  const int64_t el = x.dim(0), r = x.dim(1), in = x.dim(2), out = w.dim(1);
  if (count == 0) return;
  const Device dev = w.device();
  const OpsTable& ops = Ops(dev);
  {
    ScopedTimer timer(gemm);
    MOERUN_OP(ops, gemm_strided_batched)
    (false, true, count, out, in, 1.0f, x.device_data<float>(dev) + begin * in, in, r * in,
     w.device_data<float>(dev), in, out * in, 0.0f, y->device_data<float>(dev) + begin * out, out,
     r * out, el);
  }
  if (b == nullptr) return;
  ScopedTimer timer(act);
  for (int64_t e = 0; e < el; ++e) {
    MOERUN_OP(ops, add_bias)
    (y->device_data<float>(dev) + (e * r + begin) * out, b->device_data<float>(dev) + e * out,
     count, out);
  }
}

// dW[e] += dy[e, rows]^T x[e, rows], db[e] += sum over the rows of dy, dx[e, rows] = dy W.
void LinearBackwardRows(const Tensor& x, const Tensor& w, const Tensor& dy, Tensor* dw, Tensor* db,
                        Tensor* dx, int64_t begin, int64_t count, double* gemm, double* act) {
  const int64_t el = x.dim(0), r = x.dim(1), in = x.dim(2), out = w.dim(1);
  if (count == 0) return;
  const Device dev = w.device();
  const OpsTable& ops = Ops(dev);
  if (db != nullptr) {
    ScopedTimer timer(act);
    for (int64_t e = 0; e < el; ++e) {
      MOERUN_OP(ops, bias_backward)
      (dy.device_data<float>(dev) + (e * r + begin) * out, db->device_data<float>(dev) + e * out,
       count, out);
    }
  }
  ScopedTimer timer(gemm);
  for (int64_t e = 0; e < el; ++e) {
    MOERUN_OP(ops, gemm)
    (true, false, out, in, count, 1.0f, dy.device_data<float>(dev) + (e * r + begin) * out, out,
     x.device_data<float>(dev) + (e * r + begin) * in, in, 1.0f,
     dw->device_data<float>(dev) + e * out * in, in);
  }
  if (dx == nullptr) return;
  MOERUN_OP(ops, gemm_strided_batched)
  (false, false, count, in, out, 1.0f, dy.device_data<float>(dev) + begin * out, out, r * out,
   w.device_data<float>(dev), in, out * in, 0.0f, dx->device_data<float>(dev) + begin * in, in,
   r * in, el);
}

}  // namespace

void BatchedLinearForward(const Tensor& x, const Tensor& w, const Tensor* b, Tensor* y,
                          double* gemm, double* act) {
  EnsureTensor(y, {x.dim(0), x.dim(1), w.dim(1)}, DType::kF32, x.device());
  LinearForwardRows(x, w, b, y, 0, x.dim(1), gemm, act);
}

void BatchedLinearBackward(const Tensor& x, const Tensor& w, const Tensor& dy, Tensor* dw,
                           Tensor* db, Tensor* dx, double* gemm, double* act) {
  if (dx != nullptr) EnsureTensor(dx, {x.dim(0), x.dim(1), x.dim(2)}, DType::kF32, x.device());
  LinearBackwardRows(x, w, dy, dw, db, dx, 0, x.dim(1), gemm, act);
}

ExpertMlp::ExpertMlp(int64_t el, int64_t d, int64_t m, bool gelu_tanh, Device device)
    : d_(d), m_(m), gelu_tanh_(gelu_tanh), device_(device) {
  for (ExpertMlpParams* p : {&params_, &grads_}) {
    p->fc1_weight = Tensor::Zeros({el, m, d}, DType::kF32, device);
    p->fc1_bias = Tensor::Zeros({el, m}, DType::kF32, device);
    p->fc2_weight = Tensor::Zeros({el, d, m}, DType::kF32, device);
    p->fc2_bias = Tensor::Zeros({el, d}, DType::kF32, device);
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
  CHECK(in.device() == device_) << "experts on " << DeviceName(device_) << " got rows "
                                << in.ShapeString();
  in_ = in;
  out_ = out;
  EnsureTensor(&hidden_, {el, r, m_}, DType::kF32, device_);
  EnsureTensor(&act_, {el, r, m_}, DType::kF32, device_);
  EnsureTensor(out, {el, r, d_}, DType::kF32, device_);
}

void ExpertMlp::ForwardRows(int64_t begin, int64_t count, MoeTimers* timers) {
  const int64_t el = in_.dim(0), r = in_.dim(1);
  CHECK(begin >= 0 && count >= 0 && begin + count <= r) << "expert rows out of range";
  LinearForwardRows(in_, params_.fc1_weight, &params_.fc1_bias, &hidden_, begin, count,
                    &timers->expert, &timers->expert_act);
  {
    ScopedTimer timer(&timers->expert_act);
    const Device dev = hidden_.device();
    const OpsTable& ops = Ops(dev);
    // Whole blocks are one contiguous run; a row range is one run per expert.
    const bool whole = count == r;
    for (int64_t e = 0; e < (whole ? 1 : el); ++e) {
      const int64_t at = (e * r + begin) * m_;
      MOERUN_OP(ops, gelu_forward)
      (hidden_.device_data<float>(dev) + at, act_.device_data<float>(dev) + at,
       (whole ? el * r : count) * m_, gelu_tanh_);
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
  EnsureTensor(&d_act_, hidden_.shape(), DType::kF32, device_);
  EnsureTensor(d_in, in_.shape(), DType::kF32, device_);
}

void ExpertMlp::BackwardRows(int64_t begin, int64_t count, MoeTimers* timers) {
  const int64_t el = in_.dim(0), r = in_.dim(1);
  CHECK(begin >= 0 && count >= 0 && begin + count <= r) << "expert rows out of range";
  LinearBackwardRows(act_, params_.fc2_weight, d_out_, &grads_.fc2_weight, &grads_.fc2_bias,
                     &d_act_, begin, count, &timers->bwd_expert, &timers->bwd_expert_act);
  {
    ScopedTimer timer(&timers->bwd_expert_act);
    const Device dev = hidden_.device();
    const OpsTable& ops = Ops(dev);
    const bool whole = count == r;
    for (int64_t e = 0; e < (whole ? 1 : el); ++e) {
      const int64_t at = (e * r + begin) * m_;
      MOERUN_OP(ops, gelu_backward)
      (hidden_.device_data<float>(dev) + at, d_act_.device_data<float>(dev) + at,
       d_act_.device_data<float>(dev) + at, (whole ? el * r : count) * m_, gelu_tanh_);
    }
  }
  LinearBackwardRows(in_, params_.fc1_weight, d_act_, &grads_.fc1_weight, &grads_.fc1_bias, d_in_,
                     begin, count, &timers->bwd_expert, &timers->bwd_expert_act);
}

}  // namespace moerun
