// The CUDA expert MLP (see moe_experts_cuda.h). Row-major tensors meet column-major cuBLAS
// by computing the transposed products: a row-major [R, N] result is a column-major
// [N, R] one, so y = x W^T is cuBLAS's y^T = W x^T with W as stored (op T).
#include "model/moe_experts_cuda.h"

#include <cublas_v2.h>
#include <cuda_runtime_api.h>
#include <glog/logging.h>

#include <cstdint>

#include "model/expert_kernels_cuda.h"
#include "runtime/backend.h"

namespace moerun {
namespace {

#define MOERUN_CUBLAS_CHECK(call)                                                           \
  do {                                                                                      \
    const cublasStatus_t st_ = (call);                                                      \
    CHECK(st_ == CUBLAS_STATUS_SUCCESS)                                                     \
        << #call << " failed: status " << st_ << " (" << cublasGetStatusString(st_) << ")"; \
  } while (0)

int I(int64_t v) {
  CHECK(v >= 0 && v <= INT32_MAX) << "GEMM dimension " << v << " does not fit cuBLAS's int";
  return static_cast<int>(v);
}

// C[b] (row-major [m_rows, n_cols], fp32) = alpha * op(A[b]) op(B[b]) + beta * C[b] for b in
// [0, batch), A and B bf16 row-major, in the row-major terms of runtime/kernels.h's Gemm:
// op(A) is [m_rows, k], op(B) is [k, n_cols].
void RowMajorGemmBF16(cublasHandle_t h, bool trans_a, bool trans_b, int64_t m_rows, int64_t n_cols,
                      int64_t k, const void* a, int64_t lda, int64_t stride_a, const void* b,
                      int64_t ldb, int64_t stride_b, float beta, float* c, int64_t ldc,
                      int64_t stride_c, int64_t batch) {
  const float alpha = 1.0f;
  // Row-major C = op(A) op(B)  <=>  column-major C^T = op(B)^T op(A)^T: swap the operands.
  MOERUN_CUBLAS_CHECK(cublasGemmStridedBatchedEx(
      h, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, I(n_cols),
      I(m_rows), I(k), &alpha, b, CUDA_R_16BF, I(ldb), stride_b, a, CUDA_R_16BF, I(lda), stride_a,
      &beta, c, CUDA_R_32F, I(ldc), stride_c, I(batch), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
}

Tensor DeviceZeros(const Shape& s) { return Tensor::Zeros(s, DType::kF32, Device::kCUDA); }

void Ensure(Tensor* t, const Shape& s, DType dtype) {
  if (!t->defined() || t->shape() != s || t->dtype() != dtype) {
    *t = Tensor::Empty(s, dtype, Device::kCUDA);
  }
}

uint16_t* Bits(const Tensor& t) {
  return reinterpret_cast<uint16_t*>(t.device_data<BF16>(Device::kCUDA));
}
float* F(const Tensor& t) { return t.device_data<float>(Device::kCUDA); }

}  // namespace

struct CudaExpertMlp::Blas {
  cublasHandle_t handle = nullptr;
  cudaStream_t stream = nullptr;
};

CudaExpertMlp::CudaExpertMlp(int64_t el, int64_t d, int64_t m, bool gelu_tanh)
    : el_(el), d_(d), m_(m), gelu_tanh_(gelu_tanh), blas_(new Blas()) {
  Backend& cuda = RequireBackend(Device::kCUDA);
  blas_->stream = static_cast<cudaStream_t>(cuda.stream());
  MOERUN_CUBLAS_CHECK(cublasCreate(&blas_->handle));
  MOERUN_CUBLAS_CHECK(cublasSetStream(blas_->handle, blas_->stream));
  for (ExpertMlpParams* p : {&master_, &grads_}) {
    p->fc1_weight = DeviceZeros({el, m, d});
    p->fc1_bias = DeviceZeros({el, m});
    p->fc2_weight = DeviceZeros({el, d, m});
    p->fc2_bias = DeviceZeros({el, d});
  }
  fc1_bf16_ = Tensor::Zeros({el, m, d}, DType::kBF16, Device::kCUDA);
  fc2_bf16_ = Tensor::Zeros({el, d, m}, DType::kBF16, Device::kCUDA);
}

CudaExpertMlp::~CudaExpertMlp() {
  if (blas_->handle != nullptr) cublasDestroy(blas_->handle);
}

void* CudaExpertMlp::stream() const { return blas_->stream; }

void CudaExpertMlp::LoadParams(const ExpertMlpParams& host) {
  master_.fc1_weight.CopyFrom(host.fc1_weight);
  master_.fc1_bias.CopyFrom(host.fc1_bias);
  master_.fc2_weight.CopyFrom(host.fc2_weight);
  master_.fc2_bias.CopyFrom(host.fc2_bias);
  CastWeights();
}

void CudaExpertMlp::StoreGrads(ExpertMlpParams* host) const {
  RequireBackend(Device::kCUDA).Synchronize();
  host->fc1_weight.CopyFrom(grads_.fc1_weight);
  host->fc1_bias.CopyFrom(grads_.fc1_bias);
  host->fc2_weight.CopyFrom(grads_.fc2_weight);
  host->fc2_bias.CopyFrom(grads_.fc2_bias);
}

void CudaExpertMlp::CastWeights() {
  CudaCastToBF16(F(master_.fc1_weight), Bits(fc1_bf16_), fc1_bf16_.numel(), blas_->stream);
  CudaCastToBF16(F(master_.fc2_weight), Bits(fc2_bf16_), fc2_bf16_.numel(), blas_->stream);
}

void CudaExpertMlp::ZeroGradients() {
  for (Tensor* t : {&grads_.fc1_weight, &grads_.fc1_bias, &grads_.fc2_weight, &grads_.fc2_bias}) {
    t->SetZero();
  }
}

void CudaExpertMlp::Forward(const Tensor& in, Tensor* out) {
  const int64_t r = in.dim(1);
  MOERUN_CHECK_SHAPE(in, {el_, r, d_});
  CHECK(in.dtype() == DType::kBF16 && in.device() == Device::kCUDA)
      << "CUDA experts take bf16 device rows, got " << in.ShapeString();
  rows_ = r;
  in_ = in;
  Ensure(&hidden_, {el_, r, m_}, DType::kF32);
  Ensure(&act_bf16_, {el_, r, m_}, DType::kBF16);
  Ensure(out, {el_, r, d_}, DType::kF32);
  // hidden = in fc1^T  ([r, d] x [d, m]), then + bias, GELU -> bf16 activation.
  RowMajorGemmBF16(blas_->handle, false, true, r, m_, d_, in.raw_data(), d_, r * d_,
                   fc1_bf16_.raw_data(), d_, m_ * d_, 0.0f, F(hidden_), m_, r * m_, el_);
  CudaBiasGeluForward(F(hidden_), F(master_.fc1_bias), el_, r, m_, gelu_tanh_, Bits(act_bf16_),
                      blas_->stream);
  // out = act fc2^T ([r, m] x [m, d]) + bias.
  RowMajorGemmBF16(blas_->handle, false, true, r, d_, m_, act_bf16_.raw_data(), m_, r * m_,
                   fc2_bf16_.raw_data(), m_, d_ * m_, 0.0f, F(*out), d_, r * d_, el_);
  CudaAddBias(F(*out), F(master_.fc2_bias), el_, r, d_, blas_->stream);
}

void CudaExpertMlp::Backward(const Tensor& d_out, Tensor* d_in) {
  const int64_t r = rows_;
  MOERUN_CHECK_SHAPE(d_out, {el_, r, d_});
  Ensure(&d_out_bf16_, {el_, r, d_}, DType::kBF16);
  Ensure(&d_act_, {el_, r, m_}, DType::kF32);
  Ensure(&d_hidden_bf16_, {el_, r, m_}, DType::kBF16);
  Ensure(d_in, {el_, r, d_}, DType::kF32);
  CudaBiasGrad(F(d_out), F(grads_.fc2_bias), el_, r, d_, blas_->stream);
  CudaCastToBF16(F(d_out), Bits(d_out_bf16_), d_out.numel(), blas_->stream);
  // d fc2 [d, m] += d_out^T act; d act [r, m] = d_out fc2.
  RowMajorGemmBF16(blas_->handle, true, false, d_, m_, r, d_out_bf16_.raw_data(), d_, r * d_,
                   act_bf16_.raw_data(), m_, r * m_, 1.0f, F(grads_.fc2_weight), m_, d_ * m_, el_);
  RowMajorGemmBF16(blas_->handle, false, false, r, m_, d_, d_out_bf16_.raw_data(), d_, r * d_,
                   fc2_bf16_.raw_data(), m_, d_ * m_, 0.0f, F(d_act_), m_, r * m_, el_);
  // d hidden = d act * gelu'(hidden); d fc1 bias += rows' sum.
  CudaGeluBackward(F(hidden_), F(d_act_), d_act_.numel(), gelu_tanh_, Bits(d_hidden_bf16_),
                   blas_->stream);
  CudaBiasGrad(F(d_act_), F(grads_.fc1_bias), el_, r, m_, blas_->stream);
  // d fc1 [m, d] += d_hidden^T in; d in [r, d] = d_hidden fc1.
  RowMajorGemmBF16(blas_->handle, true, false, m_, d_, r, d_hidden_bf16_.raw_data(), m_, r * m_,
                   in_.raw_data(), d_, r * d_, 1.0f, F(grads_.fc1_weight), d_, m_ * d_, el_);
  RowMajorGemmBF16(blas_->handle, false, false, r, d_, m_, d_hidden_bf16_.raw_data(), m_, r * m_,
                   fc1_bf16_.raw_data(), d_, m_ * d_, 0.0f, F(*d_in), d_, r * d_, el_);
}

void CudaExpertMlp::ForwardGrouped(const Tensor& in, const std::vector<int64_t>& rows,
                                   Tensor* out) {
  CHECK_EQ(static_cast<int64_t>(rows.size()), el_) << "one row count per local expert";
  int64_t total = 0;
  for (int64_t r : rows) total += r;
  MOERUN_CHECK_SHAPE(in, {total, d_});
  Ensure(out, {total, d_}, DType::kF32);
  Tensor hidden = Tensor::Empty({total, m_}, DType::kF32, Device::kCUDA);
  Tensor act = Tensor::Empty({total, m_}, DType::kBF16, Device::kCUDA);
  // Groups of one GEMM each, in cuBLAS's column-major terms (see RowMajorGemmBF16).
  auto grouped = [&](const void* x, int64_t in_w, const Tensor& w_bf16, float* y, int64_t out_w,
                     DType y_dtype) {
    // Experts without rows are left out (a group may not be empty).
    std::vector<int> m, n, k, lda, ldb, ldc;
    std::vector<const void*> host;  // A pointers, then B, then C
    std::vector<void*> c_ptrs;
    int64_t offset = 0;
    for (int64_t e = 0; e < el_; ++e) {
      if (rows[e] > 0) {
        m.push_back(I(out_w));
        n.push_back(I(rows[e]));
        k.push_back(I(in_w));
        lda.push_back(I(in_w));
        ldb.push_back(I(in_w));
        ldc.push_back(I(out_w));
      }
      offset += rows[e];
    }
    const int groups = static_cast<int>(m.size());
    if (groups == 0) return;
    host.resize(3 * groups);
    offset = 0;
    for (int64_t e = 0, g = 0; e < el_; ++e) {
      if (rows[e] > 0) {
        host[g] = static_cast<const char*>(w_bf16.raw_data()) + e * out_w * in_w * 2;
        host[groups + g] = static_cast<const char*>(x) + offset * in_w * 2;
        host[2 * groups + g] = y + offset * out_w;
        ++g;
      }
      offset += rows[e];
    }
    std::vector<cublasOperation_t> ta(groups, CUBLAS_OP_T), tb(groups, CUBLAS_OP_N);
    std::vector<int> size(groups, 1);
    std::vector<float> alpha(groups, 1.0f), beta(groups, 0.0f);
    // The pointer arrays live on the device.
    Tensor ptrs = Tensor::Empty({3 * groups}, DType::kI64, Device::kCUDA);
    RequireBackend(Device::kCUDA)
        .CopyFromHost(ptrs.raw_data(), host.data(), host.size() * sizeof(void*));
    auto** dev = static_cast<void**>(ptrs.raw_data());
    MOERUN_CUBLAS_CHECK(cublasGemmGroupedBatchedEx(
        blas_->handle, ta.data(), tb.data(), m.data(), n.data(), k.data(), alpha.data(),
        const_cast<const void* const*>(dev), CUDA_R_16BF, lda.data(),
        const_cast<const void* const*>(dev + groups), CUDA_R_16BF, ldb.data(), beta.data(),
        dev + 2 * groups, y_dtype == DType::kF32 ? CUDA_R_32F : CUDA_R_16BF, ldc.data(), groups,
        size.data(), CUBLAS_COMPUTE_32F));
    RequireBackend(Device::kCUDA).Synchronize();  // ptrs is freed on return
  };
  grouped(in.raw_data(), d_, fc1_bf16_, F(hidden), m_, DType::kF32);
  int64_t offset = 0;
  for (int64_t e = 0; e < el_; ++e) {  // bias + GELU per expert's rows
    CudaBiasGeluForward(F(hidden) + offset * m_, F(master_.fc1_bias) + e * m_, 1, rows[e], m_,
                        gelu_tanh_, Bits(act) + offset * m_, blas_->stream);
    offset += rows[e];
  }
  grouped(act.raw_data(), m_, fc2_bf16_, F(*out), d_, DType::kF32);
  offset = 0;
  for (int64_t e = 0; e < el_; ++e) {
    CudaAddBias(F(*out) + offset * d_, F(master_.fc2_bias) + e * d_, 1, rows[e], d_, blas_->stream);
    offset += rows[e];
  }
}

}  // namespace moerun
