// The expert MLPs of one rank as a device backend runs them, written once over an `Ops`
// type that supplies the GEMM and the Thrust execution policy: CublasOps (model/
// moe_experts_cuda.cu: cuBLAS strided-batched / grouped bf16 GEMMs on the CUDA stream) for
// the GPU, and a host Ops over OpenBLAS in tests/device_ops_test.cc, which runs this very
// code on CI against the CPU ExpertMlp. See moe_experts_cuda.h for the precision contract.
//
// Ops provides:
//   static constexpr Device kDevice;             where its tensors live
//   void Gemm(const ColMajorGemm& g);            bf16 A, B; fp32 C; fp32 accumulation
//   void GroupedGemm(const std::vector<ColMajorGemm>& groups);  each batch 1, one call
//       where the device takes it (cuBLAS may refuse fp32 output: then one GEMM each)
//   bool GemmBiasGelu(const ColMajorGemm& g, const void* bias_bf16, int64_t bias_stride,
//                     bool tanh_form, void* act, void* aux);
//       optional fusion (cuBLASLt's GELU_AUX_BIAS, whose aux and bias have the output's
//       type): pre = g's product + bias (bf16 bias[b * bias_stride + row], broadcast over
//       the columns) in fp32, then bf16 act = gelu(pre) and bf16 aux = pre, both laid out
//       as g's C (which is not written); false when not fused (the caller then runs the
//       GEMM into C and the Thrust bias + GELU, keeping pre in fp32)
//   auto policy();                               Thrust execution policy of its stream
//   void Synchronize();
#ifndef MOERUN_MODEL_EXPERT_MLP_DEVICE_H_
#define MOERUN_MODEL_EXPERT_MLP_DEVICE_H_

#include <glog/logging.h>

#include <cstdint>
#include <vector>

#include "model/expert_kernels_thrust.h"
#include "model/moe_experts.h"
#include "runtime/tensor.h"

namespace moerun {

// A column-major strided-batched GEMM as cuBLAS computes it:
// C[b] = op(A[b]) op(B[b]) + beta C[b], op(A) m x k, op(B) k x n, C m x n, column-major.
struct ColMajorGemm {
  bool trans_a = false, trans_b = false;
  int64_t m = 0, n = 0, k = 0;
  const void* a = nullptr;
  int64_t lda = 0, stride_a = 0;
  const void* b = nullptr;
  int64_t ldb = 0, stride_b = 0;
  float beta = 0;
  float* c = nullptr;
  int64_t ldc = 0, stride_c = 0;
  int64_t batch = 1;
};

// The row-major product C = op(A) op(B) (C [m_rows, n_cols], row strides lda/ldb/ldc, as
// runtime/kernels.h's Gemm) is the column-major C^T = op(B)^T op(A)^T: a row-major matrix
// read column-major is its transpose, so the operands swap and keep their own op.
inline ColMajorGemm RowMajorGemm(bool trans_a, bool trans_b, int64_t m_rows, int64_t n_cols,
                                 int64_t k, const void* a, int64_t lda, int64_t stride_a,
                                 const void* b, int64_t ldb, int64_t stride_b, float beta, float* c,
                                 int64_t ldc, int64_t stride_c, int64_t batch) {
  ColMajorGemm g;
  g.trans_a = trans_b;
  g.trans_b = trans_a;
  g.m = n_cols;
  g.n = m_rows;
  g.k = k;
  g.a = b;
  g.lda = ldb;
  g.stride_a = stride_b;
  g.b = a;
  g.ldb = lda;
  g.stride_b = stride_a;
  g.beta = beta;
  g.c = c;
  g.ldc = ldc;
  g.stride_c = stride_c;
  g.batch = batch;
  return g;
}

template <typename Ops>
class DeviceExpertMlp {
 public:
  DeviceExpertMlp(Ops ops, int64_t el, int64_t d, int64_t m, bool gelu_tanh)
      : ops_(std::move(ops)), el_(el), d_(d), m_(m), gelu_tanh_(gelu_tanh) {
    for (ExpertMlpParams* p : {&master_, &grads_}) {
      p->fc1_weight = Tensor::Zeros({el, m, d}, DType::kF32, Ops::kDevice);
      p->fc1_bias = Tensor::Zeros({el, m}, DType::kF32, Ops::kDevice);
      p->fc2_weight = Tensor::Zeros({el, d, m}, DType::kF32, Ops::kDevice);
      p->fc2_bias = Tensor::Zeros({el, d}, DType::kF32, Ops::kDevice);
    }
    fc1_bf16_ = Tensor::Zeros({el, m, d}, DType::kBF16, Ops::kDevice);
    fc2_bf16_ = Tensor::Zeros({el, d, m}, DType::kBF16, Ops::kDevice);
    fc1_bias_bf16_ = Tensor::Zeros({el, m}, DType::kBF16, Ops::kDevice);
  }

  // Bound to fp32 parameters and gradients kept elsewhere (an ExpertMlp's; shapes as
  // ExpertMlpParams): ForwardFp32 makes the bf16 weight copies from them at each call, and
  // the gradients accumulate into them.
  DeviceExpertMlp(Ops ops, const ExpertMlpParams& master, const ExpertMlpParams& grads,
                  bool gelu_tanh)
      : ops_(std::move(ops)),
        el_(master.fc1_weight.dim(0)),
        d_(master.fc1_weight.dim(2)),
        m_(master.fc1_weight.dim(1)),
        gelu_tanh_(gelu_tanh),
        master_(master),
        grads_(grads) {
    for (const ExpertMlpParams* p : {&master, &grads}) {
      CHECK(p->fc1_weight.device() == Ops::kDevice && p->fc2_bias.device() == Ops::kDevice)
          << "device experts bound to parameters on another device";
    }
    fc1_bf16_ = Tensor::Zeros({el_, m_, d_}, DType::kBF16, Ops::kDevice);
    fc2_bf16_ = Tensor::Zeros({el_, d_, m_}, DType::kBF16, Ops::kDevice);
    fc1_bias_bf16_ = Tensor::Zeros({el_, m_}, DType::kBF16, Ops::kDevice);
  }

  Ops& ops() { return ops_; }
  const ExpertMlpParams& master() const { return master_; }
  // Whether the last Forward ran fc1's bias + GELU in the GEMM's epilogue.
  bool fused() const { return fused_; }

  void LoadParams(const ExpertMlpParams& host) {
    master_.fc1_weight.CopyFrom(host.fc1_weight);
    master_.fc1_bias.CopyFrom(host.fc1_bias);
    master_.fc2_weight.CopyFrom(host.fc2_weight);
    master_.fc2_bias.CopyFrom(host.fc2_bias);
    CastWeights();
  }
  void StoreGrads(ExpertMlpParams* host) {
    ops_.Synchronize();
    host->fc1_weight.CopyFrom(grads_.fc1_weight);
    host->fc1_bias.CopyFrom(grads_.fc1_bias);
    host->fc2_weight.CopyFrom(grads_.fc2_weight);
    host->fc2_bias.CopyFrom(grads_.fc2_bias);
  }
  void CastWeights() {
    thrust_experts::CastToBF16(ops_.policy(), F(master_.fc1_weight), Bits(fc1_bf16_),
                               fc1_bf16_.numel());
    thrust_experts::CastToBF16(ops_.policy(), F(master_.fc2_weight), Bits(fc2_bf16_),
                               fc2_bf16_.numel());
    thrust_experts::CastToBF16(ops_.policy(), F(master_.fc1_bias), Bits(fc1_bias_bf16_),
                               fc1_bias_bf16_.numel());
  }
  void ZeroGradients() {
    for (Tensor* t : {&grads_.fc1_weight, &grads_.fc1_bias, &grads_.fc2_weight, &grads_.fc2_bias}) {
      t->SetZero();
    }
  }

  // in: fp32 [E_l, R, D] -> out: fp32 [E_l, R, D], with the bf16 weight copies made from the
  // masters first (they may have changed since the last call) and the rows cast to bf16.
  void ForwardFp32(const Tensor& in, Tensor* out) {
    CHECK(in.dtype() == DType::kF32 && in.device() == Ops::kDevice && in.ndim() == 3)
        << "device experts take fp32 rows [E_l, R, D] on " << DeviceName(Ops::kDevice) << ", got "
        << in.ShapeString();
    CastWeights();
    Ensure(&in_bf16_, in.shape(), DType::kBF16);
    thrust_experts::CastToBF16(ops_.policy(), F(in), Bits(in_bf16_), in.numel());
    Forward(in_bf16_, out);
  }

  // in: bf16 [E_l, R, D] -> out: fp32 [E_l, R, D].
  void Forward(const Tensor& in, Tensor* out) {
    const int64_t r = in.dim(1);
    MOERUN_CHECK_SHAPE(in, {el_, r, d_});
    CHECK(in.dtype() == DType::kBF16 && in.device() == Ops::kDevice)
        << "device experts take bf16 rows on " << DeviceName(Ops::kDevice) << ", got "
        << in.ShapeString();
    rows_ = r;
    in_ = in;
    Ensure(&hidden_, {el_, r, m_}, DType::kF32);
    Ensure(&act_bf16_, {el_, r, m_}, DType::kBF16);
    Ensure(out, {el_, r, d_}, DType::kF32);
    // The fused epilogue is the tanh GELU's only (cuBLASLt's GELU); its pre-activation is
    // kept in bf16.
    if (gelu_tanh_) Ensure(&hidden_bf16_, {el_, r, m_}, DType::kBF16);
    // hidden = in fc1^T ([r, d] x [d, m]) + bias; act = bf16(gelu(hidden)): one fused GEMM
    // where the backend has the epilogue (cuBLASLt's GELU_AUX_BIAS), else GEMM + kernel.
    const ColMajorGemm fc1 =
        RowMajorGemm(false, true, r, m_, d_, in.raw_data(), d_, r * d_, fc1_bf16_.raw_data(), d_,
                     m_ * d_, 0.0f, F(hidden_), m_, r * m_, el_);
    fused_ = gelu_tanh_ && ops_.GemmBiasGelu(fc1, fc1_bias_bf16_.raw_data(), m_, gelu_tanh_,
                                             act_bf16_.raw_data(), hidden_bf16_.raw_data());
    if (!fused_) {
      ops_.Gemm(fc1);
      thrust_experts::BiasGeluForward(ops_.policy(), F(hidden_), F(master_.fc1_bias), el_, r, m_,
                                      gelu_tanh_, Bits(act_bf16_));
    }
    // out = act fc2^T ([r, m] x [m, d]) + bias.
    ops_.Gemm(RowMajorGemm(false, true, r, d_, m_, act_bf16_.raw_data(), m_, r * m_,
                           fc2_bf16_.raw_data(), m_, d_ * m_, 0.0f, F(*out), d_, r * d_, el_));
    thrust_experts::AddBias(ops_.policy(), F(*out), F(master_.fc2_bias), el_, r, d_);
  }

  // d_out: fp32 [E_l, R, D] -> d_in: fp32 [E_l, R, D]; parameter gradients accumulate.
  void Backward(const Tensor& d_out, Tensor* d_in) {
    const int64_t r = rows_;
    MOERUN_CHECK_SHAPE(d_out, {el_, r, d_});
    Ensure(&d_out_bf16_, {el_, r, d_}, DType::kBF16);
    Ensure(&d_act_, {el_, r, m_}, DType::kF32);
    Ensure(&d_hidden_bf16_, {el_, r, m_}, DType::kBF16);
    Ensure(d_in, {el_, r, d_}, DType::kF32);
    thrust_experts::BiasGrad(ops_.policy(), F(d_out), F(grads_.fc2_bias), el_, r, d_);
    thrust_experts::CastToBF16(ops_.policy(), F(d_out), Bits(d_out_bf16_), d_out.numel());
    // d fc2 [d, m] += d_out^T act; d act [r, m] = d_out fc2.
    ops_.Gemm(RowMajorGemm(true, false, d_, m_, r, d_out_bf16_.raw_data(), d_, r * d_,
                           act_bf16_.raw_data(), m_, r * m_, 1.0f, F(grads_.fc2_weight), m_,
                           d_ * m_, el_));
    ops_.Gemm(RowMajorGemm(false, false, r, m_, d_, d_out_bf16_.raw_data(), d_, r * d_,
                           fc2_bf16_.raw_data(), m_, d_ * m_, 0.0f, F(d_act_), m_, r * m_, el_));
    // d hidden = d act * gelu'(hidden); d fc1 bias += its rows' sum.
    if (fused_) {
      thrust_experts::GeluBackwardFromBF16(ops_.policy(), Bits(hidden_bf16_), F(d_act_),
                                           d_act_.numel(), gelu_tanh_, Bits(d_hidden_bf16_));
    } else {
      thrust_experts::GeluBackward(ops_.policy(), F(hidden_), F(d_act_), d_act_.numel(), gelu_tanh_,
                                   Bits(d_hidden_bf16_));
    }
    thrust_experts::BiasGrad(ops_.policy(), F(d_act_), F(grads_.fc1_bias), el_, r, m_);
    // d fc1 [m, d] += d_hidden^T in; d in [r, d] = d_hidden fc1.
    ops_.Gemm(RowMajorGemm(true, false, m_, d_, r, d_hidden_bf16_.raw_data(), m_, r * m_,
                           in_.raw_data(), d_, r * d_, 1.0f, F(grads_.fc1_weight), d_, m_ * d_,
                           el_));
    ops_.Gemm(RowMajorGemm(false, false, r, d_, m_, d_hidden_bf16_.raw_data(), m_, r * m_,
                           fc1_bf16_.raw_data(), d_, m_ * d_, 0.0f, F(*d_in), d_, r * d_, el_));
  }

  // Dropless: rows[e] rows of expert e packed one after another (bf16 [sum, D]) -> fp32.
  void ForwardGrouped(const Tensor& in, const std::vector<int64_t>& rows, Tensor* out) {
    CHECK_EQ(static_cast<int64_t>(rows.size()), el_) << "one row count per local expert";
    int64_t total = 0;
    for (int64_t r : rows) total += r;
    MOERUN_CHECK_SHAPE(in, {total, d_});
    Ensure(out, {total, d_}, DType::kF32);
    Tensor hidden = Tensor::Empty({total, m_}, DType::kF32, Ops::kDevice);
    Tensor act = Tensor::Empty({total, m_}, DType::kBF16, Ops::kDevice);
    // One GEMM per expert with rows (an empty group is left out), all in one grouped call.
    auto grouped = [&](const void* x, int64_t in_w, const Tensor& w_bf16, float* y, int64_t out_w) {
      std::vector<ColMajorGemm> groups;
      int64_t offset = 0;
      for (int64_t e = 0; e < el_; ++e) {
        if (rows[e] > 0) {
          groups.push_back(RowMajorGemm(
              false, true, rows[e], out_w, in_w, static_cast<const char*>(x) + offset * in_w * 2,
              in_w, 0, static_cast<const char*>(w_bf16.raw_data()) + e * out_w * in_w * 2, in_w, 0,
              0.0f, y + offset * out_w, out_w, 0, 1));
        }
        offset += rows[e];
      }
      if (!groups.empty()) ops_.GroupedGemm(groups);
    };
    grouped(in.raw_data(), d_, fc1_bf16_, F(hidden), m_);
    int64_t offset = 0;
    for (int64_t e = 0; e < el_; ++e) {
      thrust_experts::BiasGeluForward(ops_.policy(), F(hidden) + offset * m_,
                                      F(master_.fc1_bias) + e * m_, 1, rows[e], m_, gelu_tanh_,
                                      Bits(act) + offset * m_);
      offset += rows[e];
    }
    grouped(act.raw_data(), m_, fc2_bf16_, F(*out), d_);
    offset = 0;
    for (int64_t e = 0; e < el_; ++e) {
      thrust_experts::AddBias(ops_.policy(), F(*out) + offset * d_, F(master_.fc2_bias) + e * d_, 1,
                              rows[e], d_);
      offset += rows[e];
    }
    // hidden and act are freed on return in stream order (after the GEMMs queued above): no
    // wait here.
  }

 private:
  static void Ensure(Tensor* t, const Shape& s, DType dtype) {
    if (!t->defined() || t->shape() != s || t->dtype() != dtype) {
      *t = Tensor::Empty(s, dtype, Ops::kDevice);
    }
  }
  static uint16_t* Bits(const Tensor& t) {
    return reinterpret_cast<uint16_t*>(t.device_data<BF16>(Ops::kDevice));
  }
  static float* F(const Tensor& t) { return t.device_data<float>(Ops::kDevice); }

  Ops ops_;
  int64_t el_, d_, m_;
  bool gelu_tanh_;
  ExpertMlpParams master_, grads_;  // fp32
  Tensor fc1_bf16_, fc2_bf16_;      // bf16 weight copies
  Tensor fc1_bias_bf16_;            // for the fused epilogue (its bias has the output's type)
  // Saved by Forward for Backward: the input, fc1 output + bias (pre-GELU: fp32, or bf16
  // when fused_), the bf16 activation.
  Tensor in_, hidden_, hidden_bf16_, act_bf16_;
  Tensor in_bf16_;  // ForwardFp32's rows in bf16
  bool fused_ = false;
  Tensor d_out_bf16_, d_act_, d_hidden_bf16_;
  int64_t rows_ = 0;
};

// FusedExperts (model/moe_experts.h) over DeviceExpertMlp<Ops>.
template <typename Ops>
class BoundDeviceExperts : public FusedExperts {
 public:
  BoundDeviceExperts(Ops ops, const ExpertMlpParams& params, const ExpertMlpParams& grads,
                     bool gelu_tanh)
      : mlp_(std::move(ops), params, grads, gelu_tanh) {}
  void Forward(const Tensor& in, Tensor* out) override { mlp_.ForwardFp32(in, out); }
  void Backward(const Tensor& d_out, Tensor* d_in) override { mlp_.Backward(d_out, d_in); }
  DeviceExpertMlp<Ops>& mlp() { return mlp_; }

 private:
  DeviceExpertMlp<Ops> mlp_;
};

}  // namespace moerun

#endif  // MOERUN_MODEL_EXPERT_MLP_DEVICE_H_
