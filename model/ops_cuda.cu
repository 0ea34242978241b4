// The CUDA ops table: cuBLAS fp32 GEMMs on the backend's stream, the composed
// self-attention, model/dense_kernels_thrust.h's kernels on the device.
#include <cublas_v2.h>
#include <cuda_runtime_api.h>
#include <thrust/execution_policy.h>

#include <cstdint>
#include <type_traits>

#include "model/adamw_cuda.h"
#include "model/dense_kernels_thrust.h"
#include "model/ops.h"
#include "model/ops_cuda.h"
#include "runtime/backend.h"
#include "runtime/tensor.h"

namespace moerun {
namespace {

int Int(int64_t v) {
  CHECK(v >= 0 && v <= INT32_MAX) << "GEMM dimension " << v << " does not fit cuBLAS's int";
  return static_cast<int>(v);
}

cublasOperation_t Op(bool t) { return t ? CUBLAS_OP_T : CUBLAS_OP_N; }

// One handle for the process, on the CUDA backend's stream (created on first use, after
// the job bound its GPU).
cublasHandle_t Handle() {
  static cublasHandle_t handle = [] {
    cublasHandle_t h = nullptr;
    const cublasStatus_t st = cublasCreate(&h);
    CHECK(st == CUBLAS_STATUS_SUCCESS) << "cublasCreate failed: " << cublasGetStatusString(st);
    CHECK(cublasSetStream(h, static_cast<cudaStream_t>(RequireBackend(Device::kCUDA).stream())) ==
          CUBLAS_STATUS_SUCCESS);
    return h;
  }();
  return handle;
}

// Row-major C = alpha op(A) op(B) + beta C is column-major C^T = op(B)^T op(A)^T: the
// operands swap, m and n swap, and the row strides are cuBLAS's leading dimensions.
void CudaGemmStridedBatched(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
                            float alpha, const float* a, int64_t lda, int64_t stride_a,
                            const float* b, int64_t ldb, int64_t stride_b, float beta, float* c,
                            int64_t ldc, int64_t stride_c, int64_t batch) {
  if (m == 0 || n == 0 || batch == 0) return;
  const cublasStatus_t st = cublasSgemmStridedBatched(
      Handle(), Op(trans_b), Op(trans_a), Int(n), Int(m), Int(k), &alpha, b, Int(ldb), stride_b, a,
      Int(lda), stride_a, &beta, c, Int(ldc), stride_c, Int(batch));
  CHECK(st == CUBLAS_STATUS_SUCCESS)
      << "cublasSgemmStridedBatched failed: " << cublasGetStatusString(st);
}

void CudaGemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
              const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
              int64_t ldc) {
  CudaGemmStridedBatched(trans_a, trans_b, m, n, k, alpha, a, lda, 0, b, ldb, 0, beta, c, ldc, 0,
                         1);
}

const OpsTable& CudaTable();

void CudaAttentionForward(const float* qkv, float* out, float* probs, int64_t batch, int64_t tokens,
                          int64_t heads, int64_t head_dim) {
  ComposedAttentionForward(CudaTable(), qkv, out, probs, batch, tokens, heads, head_dim);
}

void CudaAttentionBackward(const float* qkv, const float* probs, const float* dout, float* dqkv,
                           int64_t batch, int64_t tokens, int64_t heads, int64_t head_dim) {
  Tensor scratch = Tensor::Empty({heads, tokens, tokens}, DType::kF32, Device::kCUDA);
  ComposedAttentionBackward(CudaTable(), qkv, probs, dout, dqkv,
                            scratch.device_data<float>(Device::kCUDA), batch, tokens, heads,
                            head_dim);
  RequireBackend(Device::kCUDA).Synchronize();  // scratch is freed on return
}

using DevicePolicy = std::decay_t<decltype(thrust::device)>;

OpsTable MakeCudaTable() {
  OpsTable t = thrust_dense::ThrustOps<DevicePolicy>::Table("cuda");
  t.gemm = &CudaGemm;
  t.gemm_strided_batched = &CudaGemmStridedBatched;
  t.attention_forward = &CudaAttentionForward;
  t.attention_backward = &CudaAttentionBackward;
  t.adamw_step = &CudaAdamWStep;
  return t;
}

const OpsTable& CudaTable() {
  static const OpsTable table = MakeCudaTable();
  return table;
}

}  // namespace

void RegisterCudaOps() { RegisterOps(Device::kCUDA, &CudaTable()); }

}  // namespace moerun
