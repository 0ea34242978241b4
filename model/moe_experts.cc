// Expert GEMMs, bias and GELU through the ops of the weights' device (model/ops.h).
#include "model/moe_experts.h"

#include "model/moe_dispatch.h"
#include "model/ops.h"

namespace moerun {

namespace {

// The experts [e0, e1) of a [El, R, w] tensor's rows [begin, begin + count).
struct ExpertRows {
  int64_t e0, e1, r, begin, count;
  int64_t experts() const { return e1 - e0; }
  // The first float of expert e's rows in a [El, R, w] tensor.
  int64_t at(int64_t e, int64_t w) const { return (e * r + begin) * w; }
};

// C_e = op(A_e) op(B_e) (beta 1: C_e += ...) for the experts e of `rows`, where A_e is at
// a + e * stride_a (etc.): one expert_gemm call per expert where the table has that entry;
// else one batched GEMM (`batched`) or one gemm call per expert.
void ExpertsGemm(const OpsTable& ops, const ExpertRows& rows, bool batched, bool trans_a,
                 bool trans_b, int64_t m, int64_t n, int64_t k, const float* a, int64_t lda,
                 int64_t stride_a, const float* b, int64_t ldb, int64_t stride_b, float beta,
                 float* c, int64_t ldc, int64_t stride_c) {
  const int64_t e0 = rows.e0;
  if (ops.expert_gemm == nullptr && batched) {
    MOERUN_OP(ops, gemm_strided_batched)
    (trans_a, trans_b, m, n, k, 1.0f, a + e0 * stride_a, lda, stride_a, b + e0 * stride_b, ldb,
     stride_b, beta, c + e0 * stride_c, ldc, stride_c, rows.experts());
    return;
  }
  for (int64_t e = e0; e < rows.e1; ++e) {
    ExpertGemmOrGemm(ops)(trans_a, trans_b, m, n, k, 1.0f, a + e * stride_a, lda, b + e * stride_b,
                          ldb, beta, c + e * stride_c, ldc);
  }
}

// y = x w^T for the experts of `rows` (x [El, R, in], w [El, out, in], y [El, R, out]).
void ExpertGemm(const OpsTable& ops, const Tensor& x, const Tensor& w, Tensor* y,
                const ExpertRows& rows, double* gemm) {
  const Device dev = w.device();
  const int64_t in = x.dim(2), out = w.dim(1), r = rows.r;
  ScopedTimer timer(gemm, dev);
  ExpertsGemm(ops, rows, /*batched=*/true, false, true, rows.count, out, in,
              x.device_data<float>(dev) + rows.at(0, in), in, r * in, w.device_data<float>(dev), in,
              out * in, 0.0f, y->device_data<float>(dev) + rows.at(0, out), out, r * out);
}

// dW[e] += dy[e, rows]^T x[e, rows] and, with dx, dx[e, rows] = dy W for the experts of
// `rows`.
void ExpertGemmBackward(const OpsTable& ops, const Tensor& x, const Tensor& w, const Tensor& dy,
                        Tensor* dw, Tensor* dx, const ExpertRows& rows, double* gemm) {
  const Device dev = w.device();
  const int64_t in = x.dim(2), out = w.dim(1), r = rows.r;
  const float* dyd = dy.device_data<float>(dev) + rows.at(0, out);
  ScopedTimer timer(gemm, dev);
  ExpertsGemm(ops, rows, /*batched=*/false, true, false, out, in, rows.count, dyd, out, r * out,
              x.device_data<float>(dev) + rows.at(0, in), in, r * in, 1.0f,
              dw->device_data<float>(dev), in, out * in);
  if (dx == nullptr) return;
  ExpertsGemm(ops, rows, /*batched=*/true, false, false, rows.count, in, out, dyd, out, r * out,
              w.device_data<float>(dev), in, out * in, 0.0f,
              dx->device_data<float>(dev) + rows.at(0, in), in, r * in);
}

// y[e, rows] += b[e] for the experts of `rows`.
void ExpertAddBias(const OpsTable& ops, const Tensor& b, Tensor* y, const ExpertRows& rows,
                   double* act) {
  const Device dev = b.device();
  const int64_t out = y->dim(2);
  ScopedTimer timer(act, dev);
  for (int64_t e = rows.e0; e < rows.e1; ++e) {
    MOERUN_OP(ops, add_bias)
    (y->device_data<float>(dev) + rows.at(e, out), b.device_data<float>(dev) + e * out, rows.count,
     out);
  }
}

// db[e] += the sum over the rows of dy[e] for the experts of `rows`.
void ExpertBiasBackward(const OpsTable& ops, const Tensor& dy, Tensor* db, const ExpertRows& rows,
                        double* act) {
  const Device dev = dy.device();
  const int64_t out = dy.dim(2);
  ScopedTimer timer(act, dev);
  for (int64_t e = rows.e0; e < rows.e1; ++e) {
    MOERUN_OP(ops, bias_backward)
    (dy.device_data<float>(dev) + rows.at(e, out), db->device_data<float>(dev) + e * out,
     rows.count, out);
  }
}

// Runs step(rows, gemm, act) over the experts [0, el) of rows [begin, begin + count): all
// together where the table has no for_each_expert, else one expert at a time through it
// (several at once, each on its own thread). The experts' wall time is then split between
// *gemm and *act in the proportion the first worker spent on each.
template <typename Step>
void OverExperts(const OpsTable& ops, int64_t el, int64_t r, int64_t begin, int64_t count,
                 double* gemm, double* act, const Step& step) {
  if (ops.for_each_expert == nullptr) {
    step(ExpertRows{0, el, r, begin, count}, gemm, act);
    return;
  }
  // The experts' slots below are locals: host timers only (a device timer's slot must
  // outlive ResolveDeviceTimers). The CPU's is the only table with for_each_expert.
  double first_gemm = 0, first_act = 0, wall = 0;
  {
    ScopedTimer timer(&wall);
    ops.for_each_expert(el, [&](int64_t e, int worker) {
      double g = 0, a = 0;
      step(ExpertRows{e, e + 1, r, begin, count}, &g, &a);
      if (worker == 0) {
        first_gemm += g;
        first_act += a;
      }
    });
  }
  const double busy = first_gemm + first_act;
  const double gemm_share = busy > 0 ? first_gemm / busy : 1.0;
  *gemm += wall * gemm_share;
  *act += wall * (1.0 - gemm_share);
}

}  // namespace

void BatchedLinearForward(const Tensor& x, const Tensor& w, const Tensor* b, Tensor* y,
                          double* gemm, double* act) {
  EnsureTensor(y, {x.dim(0), x.dim(1), w.dim(1)}, DType::kF32, x.device());
  const OpsTable& ops = Ops(w.device());
  if (x.dim(1) == 0) return;
  OverExperts(ops, x.dim(0), x.dim(1), 0, x.dim(1), gemm, act,
              [&](const ExpertRows& rows, double* gemm_s, double* act_s) {
                ExpertGemm(ops, x, w, y, rows, gemm_s);
                if (b != nullptr) ExpertAddBias(ops, *b, y, rows, act_s);
              });
}

void BatchedLinearBackward(const Tensor& x, const Tensor& w, const Tensor& dy, Tensor* dw,
                           Tensor* db, Tensor* dx, double* gemm, double* act) {
  if (dx != nullptr) EnsureTensor(dx, {x.dim(0), x.dim(1), x.dim(2)}, DType::kF32, x.device());
  const OpsTable& ops = Ops(w.device());
  if (x.dim(1) == 0) return;
  OverExperts(ops, x.dim(0), x.dim(1), 0, x.dim(1), gemm, act,
              [&](const ExpertRows& rows, double* gemm_s, double* act_s) {
                if (db != nullptr) ExpertBiasBackward(ops, dy, db, rows, act_s);
                ExpertGemmBackward(ops, x, w, dy, dw, dx, rows, gemm_s);
              });
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
  const OpsTable& ops = Ops(device_);
  fused_forward_ = ops.make_fused_experts != nullptr;
  if (fused_forward_) {
    CHECK(in.device() == device_) << "experts on " << DeviceName(device_) << " got rows "
                                  << in.ShapeString();
    if (fused_ == nullptr) fused_ = ops.make_fused_experts(params_, grads_, gelu_tanh_);
    ScopedTimer timer(&timers->expert, device_);
    fused_->Forward(in, out);
    return;
  }
  PrepareForward(in, out);
  ForwardRows(0, in.dim(1), timers);
}

void ExpertMlp::PrepareForward(const Tensor& in, Tensor* out) {
  fused_forward_ = false;
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
  if (count == 0) return;
  const OpsTable& ops = Ops(device_);
  const Device dev = device_;
  OverExperts(ops, el, r, begin, count, &timers->expert, &timers->expert_act,
              [&](const ExpertRows& rows, double* gemm, double* act) {
                ExpertGemm(ops, in_, params_.fc1_weight, &hidden_, rows, gemm);
                {
                  // fc1's bias and the GELU in one pass, while the expert's hidden rows are
                  // in cache.
                  ScopedTimer timer(act, dev);
                  for (int64_t e = rows.e0; e < rows.e1; ++e) {
                    BiasGeluSaving(ops, hidden_.device_data<float>(dev) + rows.at(e, m_),
                                   params_.fc1_bias.device_data<float>(dev) + e * m_,
                                   act_.device_data<float>(dev) + rows.at(e, m_), count, m_,
                                   gelu_tanh_);
                  }
                }
                ExpertGemm(ops, act_, params_.fc2_weight, out_, rows, gemm);
                ExpertAddBias(ops, params_.fc2_bias, out_, rows, act);
              });
}

void ExpertMlp::Backward(const Tensor& d_out, Tensor* d_in, MoeTimers* timers) {
  if (fused_forward_) {
    ScopedTimer timer(&timers->bwd_expert, device_);
    fused_->Backward(d_out, d_in);
    return;
  }
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
  if (count == 0) return;
  const OpsTable& ops = Ops(device_);
  const Device dev = device_;
  OverExperts(ops, el, r, begin, count, &timers->bwd_expert, &timers->bwd_expert_act,
              [&](const ExpertRows& rows, double* gemm, double* act) {
                ExpertBiasBackward(ops, d_out_, &grads_.fc2_bias, rows, act);
                ExpertGemmBackward(ops, act_, params_.fc2_weight, d_out_, &grads_.fc2_weight,
                                   &d_act_, rows, gemm);
                {
                  // The GELU's backward and fc1's bias gradient in one pass over d_act.
                  ScopedTimer timer(act, dev);
                  for (int64_t e = rows.e0; e < rows.e1; ++e) {
                    GeluBiasBackwardFromSaved(ops, hidden_.device_data<float>(dev) + rows.at(e, m_),
                                              d_act_.device_data<float>(dev) + rows.at(e, m_),
                                              grads_.fc1_bias.device_data<float>(dev) + e * m_,
                                              count, m_, gelu_tanh_);
                  }
                }
                ExpertGemmBackward(ops, in_, params_.fc1_weight, d_act_, &grads_.fc1_weight, d_in_,
                                   rows, gemm);
              });
}

}  // namespace moerun
