// The CUDA ops table: cuBLAS fp32 GEMMs on the backend's stream, the composed
// self-attention and per-choice attention, warp-per-row softmax and layer norm,
// model/dense_kernels_thrust.h's kernels for the rest (the same stream).
#include <cublas_v2.h>
#include <cuda_runtime_api.h>
#include <thrust/execution_policy.h>

#include <cstdint>

#include "model/adamw_cuda.h"
#include "model/cuda_stream_policy.h"
#include "model/dense_kernels_thrust.h"
#include "model/moe_experts_cuda.h"
#include "model/ops.h"
#include "model/ops_cuda.h"
#include "model/routing_cuda.h"
#include "runtime/backend.h"
#include "runtime/process.h"
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

// train.precision BF16: both operands cast to bf16 (nearest even; the whole strided
// region up to the last element, gaps between rows included), then one bf16 x bf16 -> fp32 batched
// GEMM with fp32 accumulation on the tensor cores.
void CudaBf16GemmStridedBatched(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
                                float alpha, const float* a, int64_t lda, int64_t stride_a,
                                const float* b, int64_t ldb, int64_t stride_b, float beta, float* c,
                                int64_t ldc, int64_t stride_c, int64_t batch) {
  if (m == 0 || n == 0 || batch == 0) return;
  if (k == 0) {  // no operand to round (and its span would be negative): C = beta C
    CudaGemmStridedBatched(trans_a, trans_b, m, n, k, alpha, a, lda, stride_a, b, ldb, stride_b,
                           beta, c, ldc, stride_c, batch);
    return;
  }
  // The elements the operands span as stored: up to the last row's last column.
  const int64_t a_rows = trans_a ? k : m, a_cols = trans_a ? m : k;
  const int64_t b_rows = trans_b ? n : k, b_cols = trans_b ? k : n;
  const int64_t a_span = (stride_a == 0 ? 0 : (batch - 1) * stride_a) + (a_rows - 1) * lda + a_cols;
  const int64_t b_span = (stride_b == 0 ? 0 : (batch - 1) * stride_b) + (b_rows - 1) * ldb + b_cols;
  Tensor ra = Tensor::Empty({a_span}, DType::kBF16, Device::kCUDA);
  Tensor rb = Tensor::Empty({b_span}, DType::kBF16, Device::kCUDA);
  CudaCastToBF16(a, reinterpret_cast<uint16_t*>(ra.raw_data()), a_span);
  CudaCastToBF16(b, reinterpret_cast<uint16_t*>(rb.raw_data()), b_span);
  const cublasStatus_t st = cublasGemmStridedBatchedEx(
      Handle(), Op(trans_b), Op(trans_a), Int(n), Int(m), Int(k), &alpha, rb.raw_data(),
      CUDA_R_16BF, Int(ldb), stride_b, ra.raw_data(), CUDA_R_16BF, Int(lda), stride_a, &beta, c,
      CUDA_R_32F, Int(ldc), stride_c, Int(batch), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
  CHECK(st == CUBLAS_STATUS_SUCCESS)
      << "cublasGemmStridedBatchedEx (bf16) failed: " << cublasGetStatusString(st);
  // ra and rb are freed on return without a wait: the backend frees in stream order (after
  // the GEMM queued on its stream), or waits itself where it has no memory pools.
}

void CudaBf16Gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                  const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
                  int64_t ldc) {
  CudaBf16GemmStridedBatched(trans_a, trans_b, m, n, k, alpha, a, lda, 0, b, ldb, 0, beta, c, ldc,
                             0, 1);
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
  ComposedAttentionBackward(CudaTable(), Device::kCUDA, qkv, probs, dout, dqkv, batch, tokens,
                            heads, head_dim);
}

// The MoE attention's per-choice attention as batched GEMMs per sequence (ops.h's composed
// form): the Thrust kernels' one thread per choice, or per sequence in the backward, would
// leave a GPU nearly idle.
void CudaChoiceAttentionForward(const float* q, const float* kv, const int32_t* row, int64_t tokens,
                                int64_t k, int64_t head_dim, int64_t seq_len, float* probs,
                                float* out) {
  ComposedChoiceAttentionForward(CudaTable(), q, kv, row, tokens, k, head_dim, seq_len, probs, out);
}

void CudaChoiceAttentionBackward(const float* q, const float* kv, const int32_t* row,
                                 const float* probs, const float* d_out, int64_t tokens, int64_t k,
                                 int64_t head_dim, int64_t seq_len, float* d_q, float* d_kv) {
  ComposedChoiceAttentionBackward(CudaTable(), Device::kCUDA, q, kv, row, probs, d_out, tokens, k,
                                  head_dim, seq_len, d_q, d_kv);
}

// The one entry whose result comes back to the host: drained first, so the reduction's own
// wait finds only its kernels on the stream; its temporaries come from the backend's pool.
double CudaSumOfSquares(const float* x, int64_t n) {
  if (n <= 0) return 0.0;
  DrainCudaBackendStream();
  return thrust::transform_reduce(BackendStreamPolicy::Get(), x, x + n,
                                  thrust_dense::SquareFunctor{}, 0.0, thrust::plus<double>());
}

// Every array's kernels queued, then one wait: the copy of the sums to the host.
// One launch per level for all the arrays (a training step's gradients: a few launches, not
// one or more per parameter), the level table uploaded only when the arrays move. Kept per
// host thread, never freed (it would outlive the CUDA context at exit).
void CudaSumOfSquaresMany(const float* const* x, const int64_t* n, int64_t count, double* out) {
  thread_local thrust_dense::DeviceSquareSums* sums = new thrust_dense::DeviceSquareSums();
  sums->Run(BackendStreamPolicy::Get(), Device::kCUDA, x, n, count, out);
}

// --- The row kernels (softmax, layer norm and their backward): a warp per row, lane l of the
// warp taking columns l, l + 32, ... (runtime/row_kernels.h's lane forms), so a warp reads
// and writes neighbouring floats. The host build runs the same forms with rowwise::HostLanes
// and its butterfly order: the same bits for the same libm (tests/device_ops_cuda_test.cc).
static_assert(rowwise::kLanes == 32, "a row's lanes are a warp");

struct WarpLanes {
  int lane;
  template <typename F>
  __device__ void ForLanes(const F& f) const {
    f(lane);
  }
  template <typename F>
  __device__ float Max(const F& f) const {
    float v = f(lane);
    for (int off = rowwise::kLanes / 2; off > 0; off /= 2) {
      const float o = __shfl_xor_sync(0xffffffffu, v, off);
      v = v < o ? o : v;
    }
    return v;
  }
  __device__ static double Shuffle(double v, int off) {
    return __shfl_xor_sync(0xffffffffu, v, off);
  }
  __device__ static rowwise::DoublePair Shuffle(rowwise::DoublePair v, int off) {
    return {Shuffle(v.a, off), Shuffle(v.b, off)};
  }
  template <typename F>
  __device__ auto Sum(const F& f) const {
    auto v = f(lane);
    for (int off = rowwise::kLanes / 2; off > 0; off /= 2) v = v + Shuffle(v, off);
    return v;
  }
};

constexpr int kRowsPerBlock = 8;  // 256 threads

// Every thread of a warp has the same row, so a warp returns whole (the shuffles' full mask).
template <typename RowFunctor>
__global__ void WarpPerRowKernel(RowFunctor f, int64_t rows) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / 32;
  if (row >= rows) return;
  f(row, WarpLanes{static_cast<int>(threadIdx.x % 32)});
}

template <typename RowFunctor>
void LaunchWarpPerRow(const RowFunctor& f, int64_t rows) {
  if (rows <= 0) return;
  const int64_t blocks = (rows + kRowsPerBlock - 1) / kRowsPerBlock;
  CHECK(blocks <= INT32_MAX) << rows << " rows exceed one launch of the row kernels";
  WarpPerRowKernel<<<static_cast<unsigned>(blocks), kRowsPerBlock * 32, 0, BackendStream()>>>(f,
                                                                                              rows);
  const cudaError_t err = cudaGetLastError();
  CHECK(err == cudaSuccess) << RankTag() << ": row kernel launch failed, or an earlier kernel "
                            << "on the stream did: " << cudaGetErrorName(err) << " ("
                            << cudaGetErrorString(err) << ")";
}

void CudaSoftmaxForward(const float* x, float* y, int64_t rows, int64_t cols) {
  LaunchWarpPerRow(thrust_dense::SoftmaxRowFunctor<WarpLanes>{x, y, cols}, rows);
}

void CudaSoftmaxBackward(const float* y, const float* dy, float* dx, int64_t rows, int64_t cols) {
  LaunchWarpPerRow(thrust_dense::SoftmaxBackwardRowFunctor<WarpLanes>{y, dy, dx, cols}, rows);
}

void CudaLayerNormForward(const float* x, const float* gamma, const float* beta, float* y,
                          float* mean, float* rstd, int64_t rows, int64_t cols, float eps) {
  LaunchWarpPerRow(
      thrust_dense::LayerNormRowFunctor<WarpLanes>{x, gamma, beta, y, mean, rstd, cols, eps}, rows);
}

void CudaLayerNormBackward(const float* x, const float* gamma, const float* mean, const float* rstd,
                           const float* dy, float* dx, float* dgamma, float* dbeta, int64_t rows,
                           int64_t cols) {
  LaunchWarpPerRow(
      thrust_dense::LayerNormBackwardRowFunctor<WarpLanes>{x, gamma, mean, rstd, dy, dx, cols},
      rows);
  thrust_dense::ThrustOps<BackendStreamPolicy>::LayerNormParamGrads(x, mean, rstd, dy, dgamma,
                                                                    dbeta, rows, cols);
}

// AssignSlots with one scratch per host thread, kept (never freed: it would outlive the
// CUDA context at exit).
void CudaTableAssignSlots(const int32_t* expert_index, const float* weight, int64_t tokens,
                          int64_t group_size, int num_experts, int k, bool bpr, int32_t* slot,
                          int32_t* load) {
  thread_local CudaRoutingScratch* scratch = new CudaRoutingScratch();
  CudaAssignSlots(expert_index, weight, tokens, num_experts, k, bpr, slot, load, nullptr, scratch,
                  group_size);
}

OpsTable MakeCudaTable() {
  // Every other entry only queues on the backend's stream (model/cuda_stream_policy.h).
  OpsTable t = thrust_dense::ThrustOps<BackendStreamPolicy>::Table("cuda");
  t.softmax_forward = &CudaSoftmaxForward;
  t.softmax_backward = &CudaSoftmaxBackward;
  t.layer_norm_forward = &CudaLayerNormForward;
  t.layer_norm_backward = &CudaLayerNormBackward;
  t.sum_of_squares = &CudaSumOfSquares;
  t.sum_of_squares_many = &CudaSumOfSquaresMany;
  t.gemm = &CudaGemm;
  t.gemm_strided_batched = &CudaGemmStridedBatched;
  t.attention_forward = &CudaAttentionForward;
  t.attention_backward = &CudaAttentionBackward;
  t.choice_attention_forward = &CudaChoiceAttentionForward;
  t.choice_attention_backward = &CudaChoiceAttentionBackward;
  t.adamw_step = &CudaAdamWStep;
  t.adamw_step_many = &CudaAdamWStepMany;
  t.assign_slots = &CudaTableAssignSlots;
  return t;
}

const OpsTable& CudaTable() {
  static const OpsTable table = MakeCudaTable();
  return table;
}

const OpsTable& CudaBf16Table() {
  static const OpsTable table = [] {
    OpsTable t = CudaTable();
    t.name = "cuda-bf16";
    t.gemm = &CudaBf16Gemm;
    t.gemm_strided_batched = &CudaBf16GemmStridedBatched;
    // The experts as bench moe-layer --device cuda measures them: bf16 weight copies once
    // per forward, cuBLASLt's fused bias + GELU, no cast per GEMM.
    t.make_fused_experts = &MakeCudaFusedExperts;
    return t;
  }();
  return table;
}

}  // namespace

void DrainCudaBackendStream() { RequireBackend(Device::kCUDA).Synchronize(); }

void RegisterCudaOps() {
  RegisterOps(Device::kCUDA, &CudaTable());
  RegisterBf16GemmOps(Device::kCUDA, &CudaTable(), &CudaBf16Table());
}

}  // namespace moerun
