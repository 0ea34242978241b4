// DeviceExpertMlp (model/expert_mlp_device.h) over cuBLAS on the CUDA backend's stream.
#include <cublas_v2.h>
#include <cuda_runtime_api.h>
#include <thrust/execution_policy.h>

#include <cstdint>

#include "model/expert_mlp_device.h"
#include "model/moe_experts_cuda.h"
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

cublasOperation_t Op(bool t) { return t ? CUBLAS_OP_T : CUBLAS_OP_N; }

cudaStream_t BackendStream() {
  return static_cast<cudaStream_t>(RequireBackend(Device::kCUDA).stream());
}

// cuBLAS handle on the CUDA backend's stream; bf16 inputs, fp32 outputs and accumulation.
struct CublasOps {
  static constexpr Device kDevice = Device::kCUDA;
  cublasHandle_t handle = nullptr;
  cudaStream_t stream = nullptr;

  void Gemm(const ColMajorGemm& g) {
    const float alpha = 1.0f;
    MOERUN_CUBLAS_CHECK(cublasGemmStridedBatchedEx(
        handle, Op(g.trans_a), Op(g.trans_b), I(g.m), I(g.n), I(g.k), &alpha, g.a, CUDA_R_16BF,
        I(g.lda), g.stride_a, g.b, CUDA_R_16BF, I(g.ldb), g.stride_b, &g.beta, g.c, CUDA_R_32F,
        I(g.ldc), g.stride_c, I(g.batch), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
  }
  void GroupedGemm(const std::vector<ColMajorGemm>& groups) {
    const int n = static_cast<int>(groups.size());
    std::vector<cublasOperation_t> ta(n), tb(n);
    std::vector<int> m(n), nn(n), k(n), lda(n), ldb(n), ldc(n), size(n, 1);
    std::vector<float> alpha(n, 1.0f), beta(n);
    std::vector<const void*> host(3 * n);  // A pointers, then B, then C
    for (int i = 0; i < n; ++i) {
      const ColMajorGemm& g = groups[i];
      CHECK_EQ(g.batch, 1) << "grouped GEMM groups are single GEMMs";
      ta[i] = Op(g.trans_a);
      tb[i] = Op(g.trans_b);
      m[i] = I(g.m);
      nn[i] = I(g.n);
      k[i] = I(g.k);
      lda[i] = I(g.lda);
      ldb[i] = I(g.ldb);
      ldc[i] = I(g.ldc);
      beta[i] = g.beta;
      host[i] = g.a;
      host[n + i] = g.b;
      host[2 * n + i] = g.c;
    }
    // The pointer arrays live on the device.
    Tensor ptrs = Tensor::Empty({3 * n}, DType::kI64, Device::kCUDA);
    RequireBackend(Device::kCUDA)
        .CopyFromHost(ptrs.raw_data(), host.data(), host.size() * sizeof(void*));
    auto** dev = static_cast<void**>(ptrs.raw_data());
    MOERUN_CUBLAS_CHECK(cublasGemmGroupedBatchedEx(
        handle, ta.data(), tb.data(), m.data(), nn.data(), k.data(), alpha.data(),
        const_cast<const void* const*>(dev), CUDA_R_16BF, lda.data(),
        const_cast<const void* const*>(dev + n), CUDA_R_16BF, ldb.data(), beta.data(), dev + 2 * n,
        CUDA_R_32F, ldc.data(), n, size.data(), CUBLAS_COMPUTE_32F));
    Synchronize();  // ptrs is freed on return
  }
  auto policy() const { return thrust::cuda::par.on(stream); }
  void Synchronize() { CHECK(cudaStreamSynchronize(stream) == cudaSuccess); }
};

CublasOps MakeCublasOps() {
  CublasOps ops;
  ops.stream = BackendStream();
  MOERUN_CUBLAS_CHECK(cublasCreate(&ops.handle));
  MOERUN_CUBLAS_CHECK(cublasSetStream(ops.handle, ops.stream));
  return ops;
}

}  // namespace

struct CudaExpertMlp::Impl {
  Impl(int64_t el, int64_t d, int64_t m, bool gelu_tanh)
      : mlp(MakeCublasOps(), el, d, m, gelu_tanh) {}
  ~Impl() { cublasDestroy(mlp.ops().handle); }
  DeviceExpertMlp<CublasOps> mlp;
};

CudaExpertMlp::CudaExpertMlp(int64_t el, int64_t d, int64_t m, bool gelu_tanh)
    : el_(el), d_(d), m_(m), impl_(new Impl(el, d, m, gelu_tanh)) {}
CudaExpertMlp::~CudaExpertMlp() = default;
void CudaExpertMlp::LoadParams(const ExpertMlpParams& host) { impl_->mlp.LoadParams(host); }
void CudaExpertMlp::StoreGrads(ExpertMlpParams* host) { impl_->mlp.StoreGrads(host); }
void CudaExpertMlp::CastWeights() { impl_->mlp.CastWeights(); }
void CudaExpertMlp::ZeroGradients() { impl_->mlp.ZeroGradients(); }
void CudaExpertMlp::Forward(const Tensor& in, Tensor* out) { impl_->mlp.Forward(in, out); }
void CudaExpertMlp::Backward(const Tensor& d_out, Tensor* d_in) {
  impl_->mlp.Backward(d_out, d_in);
}
void CudaExpertMlp::ForwardGrouped(const Tensor& in, const std::vector<int64_t>& rows,
                                   Tensor* out) {
  impl_->mlp.ForwardGrouped(in, rows, out);
}

void CudaCastToBF16(const float* src, uint16_t* dst, int64_t n) {
  thrust_experts::CastToBF16(thrust::cuda::par.on(BackendStream()), src, dst, n);
}

}  // namespace moerun
