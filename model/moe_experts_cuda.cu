// DeviceExpertMlp (model/expert_mlp_device.h) over cuBLAS on the CUDA backend's stream.
#include <cublasLt.h>
#include <cublas_v2.h>
#include <cuda_runtime_api.h>
#include <thrust/execution_policy.h>

#include <array>
#include <cstdint>
#include <map>
#include <utility>

#include "model/cuda_stream_policy.h"
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
  // cuBLAS's grouped GEMM documents bf16 x bf16 -> bf16 under CUBLAS_COMPUTE_32F, not the
  // fp32 output used here: where it refuses the call (logged once per process), each group
  // is one strided-batched GEMM of batch 1 (bf16 x bf16 -> fp32 is supported there).
  bool grouped_refused = false;
  void GroupedGemm(const std::vector<ColMajorGemm>& groups) {
    if (grouped_refused) {
      for (const ColMajorGemm& g : groups) Gemm(g);
      return;
    }
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
    const cublasStatus_t st = cublasGemmGroupedBatchedEx(
        handle, ta.data(), tb.data(), m.data(), nn.data(), k.data(), alpha.data(),
        const_cast<const void* const*>(dev), CUDA_R_16BF, lda.data(),
        const_cast<const void* const*>(dev + n), CUDA_R_16BF, ldb.data(), beta.data(), dev + 2 * n,
        CUDA_R_32F, ldc.data(), n, size.data(), CUBLAS_COMPUTE_32F);
    // ptrs is freed on return in stream order (after the GEMMs queued on the stream).
    if (st == CUBLAS_STATUS_NOT_SUPPORTED || st == CUBLAS_STATUS_INVALID_VALUE) {
      static bool logged = false;
      if (!logged) {
        LOG(WARNING) << "cublasGemmGroupedBatchedEx refused bf16 x bf16 -> fp32 ("
                     << cublasGetStatusString(st) << "); the dropless experts run one "
                     << "GEMM per expert instead";
        logged = true;
      }
      grouped_refused = true;
      for (const ColMajorGemm& g : groups) Gemm(g);
      return;
    }
    MOERUN_CUBLAS_CHECK(st);
  }
  // fc1 with cuBLASLt's GELU_AUX_BIAS epilogue: D = bf16 act = gelu(A B + bias), the aux
  // output = bf16(A B + bias), the pre-activation the backward reads; the bias is bf16 too
  // (cublasLt.h gives the GELU aux and the bias the output's type, fp8 kernels aside).
  // cuBLASLt's GELU is the tanh form, so the erf form is never fused. The first time
  // cuBLASLt has no algorithm for the shapes or refuses the call, fusion is switched off
  // for this MLP (logged once per process) and the caller's unfused GEMM + kernel run.
  cublasLtHandle_t lt = nullptr;
  bool lt_disabled = false;
  Tensor lt_workspace;
  static constexpr size_t kLtWorkspaceBytes = 32u << 20;
  std::map<std::array<int64_t, 18>, cublasLtMatmulHeuristicResult_t> lt_algos;

  bool GemmBiasGelu(const ColMajorGemm& g, const void* bias, int64_t bias_stride, bool tanh_form,
                    void* act, void* aux) {
    if (!tanh_form || lt_disabled || lt == nullptr) return false;
    // Nothing to compute: the caller's path (no call that cuBLASLt might refuse and so
    // switch fusion off for good).
    if (g.m == 0 || g.n == 0 || g.k == 0 || g.batch == 0) return false;
    // The GELU aux output's leading dimension and batch stride must be multiples of 8
    // (cublasLt.h, CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD / _BATCH_STRIDE): a shape that is
    // not takes the unfused path this time, without switching fusion off for other shapes.
    if (g.ldc % 8 != 0 || (g.batch > 1 && g.stride_c % 8 != 0)) return false;
    if (!lt_workspace.defined()) {
      lt_workspace =
          Tensor::Empty({static_cast<int64_t>(kLtWorkspaceBytes)}, DType::kU8, Device::kCUDA);
    }
    cublasLtMatmulDesc_t desc = nullptr;
    cublasLtMatrixLayout_t la = nullptr, lb = nullptr, ld = nullptr;
    cublasLtMatmulPreference_t pref = nullptr;
    bool ok =
        cublasLtMatmulDescCreate(&desc, CUBLAS_COMPUTE_32F, CUDA_R_32F) == CUBLAS_STATUS_SUCCESS;
    auto set = [&](cublasLtMatmulDescAttributes_t attr, const auto& value) {
      ok = ok && cublasLtMatmulDescSetAttribute(desc, attr, &value, sizeof(value)) ==
                     CUBLAS_STATUS_SUCCESS;
    };
    const cublasOperation_t ta = Op(g.trans_a), tb = Op(g.trans_b);
    const cublasLtEpilogue_t epilogue = CUBLASLT_EPILOGUE_GELU_AUX_BIAS;
    set(CUBLASLT_MATMUL_DESC_TRANSA, ta);
    set(CUBLASLT_MATMUL_DESC_TRANSB, tb);
    set(CUBLASLT_MATMUL_DESC_EPILOGUE, epilogue);
    // The bias and the aux take D's type (bf16) by default; the AUX_DATA_TYPE attribute is
    // documented for FP8 kernels, and a version that refuses it on bf16 would lose fusion.
    set(CUBLASLT_MATMUL_DESC_BIAS_POINTER, bias);
    set(CUBLASLT_MATMUL_DESC_BIAS_BATCH_STRIDE, bias_stride);
    set(CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_POINTER, aux);
    set(CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_LD, g.ldc);
    set(CUBLASLT_MATMUL_DESC_EPILOGUE_AUX_BATCH_STRIDE, g.stride_c);
    // Column-major layouts as stored: A is m x k (k x m transposed), B k x n (n x k).
    auto layout = [&](cublasLtMatrixLayout_t* l, uint64_t rows, uint64_t cols, int64_t lead,
                      int64_t stride) {
      ok = ok &&
           cublasLtMatrixLayoutCreate(l, CUDA_R_16BF, rows, cols, lead) == CUBLAS_STATUS_SUCCESS;
      const int32_t batch = I(g.batch);
      ok = ok &&
           cublasLtMatrixLayoutSetAttribute(*l, CUBLASLT_MATRIX_LAYOUT_BATCH_COUNT, &batch,
                                            sizeof(batch)) == CUBLAS_STATUS_SUCCESS &&
           cublasLtMatrixLayoutSetAttribute(*l, CUBLASLT_MATRIX_LAYOUT_STRIDED_BATCH_OFFSET,
                                            &stride, sizeof(stride)) == CUBLAS_STATUS_SUCCESS;
    };
    layout(&la, g.trans_a ? g.k : g.m, g.trans_a ? g.m : g.k, g.lda, g.stride_a);
    layout(&lb, g.trans_b ? g.n : g.k, g.trans_b ? g.k : g.n, g.ldb, g.stride_b);
    layout(&ld, g.m, g.n, g.ldc, g.stride_c);
    cublasLtMatmulHeuristicResult_t heuristic{};
    int found = 0;
    const size_t workspace = kLtWorkspaceBytes;
    ok = ok && cublasLtMatmulPreferenceCreate(&pref) == CUBLAS_STATUS_SUCCESS &&
         cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                                              &workspace,
                                              sizeof(workspace)) == CUBLAS_STATUS_SUCCESS;
    // The heuristic never sees A, B and D, and assumes 256-byte aligned pointers unless told
    // (CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_*_BYTES): tell it the pointers' real alignment, so
    // an operand at an offset does not get an algorithm the call then refuses.
    const auto alignment = [](const void* p) {
      const uint32_t low = static_cast<uint32_t>(reinterpret_cast<uintptr_t>(p) & 255u);
      return low == 0 ? 256u : (low & (~low + 1u));  // lowest set bit, at most 256
    };
    const std::pair<cublasLtMatmulPreferenceAttributes_t, uint32_t> aligned[] = {
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, alignment(g.a)},
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, alignment(g.b)},
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, alignment(act)},
        {CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, alignment(act)}};
    for (const auto& [attr, bytes] : aligned) {
      ok = ok && cublasLtMatmulPreferenceSetAttribute(pref, attr, &bytes, sizeof(bytes)) ==
                     CUBLAS_STATUS_SUCCESS;
    }
    // The heuristic's answer per shape and alignments, kept: asking costs tens of
    // microseconds of host time on every forward of every layer otherwise.
    const std::array<int64_t, 18> key = {g.trans_a,
                                         g.trans_b,
                                         g.m,
                                         g.n,
                                         g.k,
                                         g.lda,
                                         g.ldb,
                                         g.ldc,
                                         g.stride_a,
                                         g.stride_b,
                                         g.stride_c,
                                         g.batch,
                                         bias_stride,
                                         alignment(g.a),
                                         alignment(g.b),
                                         alignment(act),
                                         alignment(bias),
                                         alignment(aux)};
    const auto cached = lt_algos.find(key);
    if (ok && cached != lt_algos.end()) {
      heuristic = cached->second;
      found = 1;
    } else {
      ok = ok &&
           cublasLtMatmulAlgoGetHeuristic(lt, desc, la, lb, ld, ld, pref, 1, &heuristic, &found) ==
               CUBLAS_STATUS_SUCCESS &&
           found > 0;
      if (ok) lt_algos.emplace(key, heuristic);
    }
    ok = ok && found > 0;
    cublasStatus_t st = CUBLAS_STATUS_NOT_SUPPORTED;
    if (ok) {
      const float alpha = 1.0f, beta = 0.0f;
      st = cublasLtMatmul(lt, desc, &alpha, g.a, la, g.b, lb, &beta, act, ld, act, ld,
                          &heuristic.algo, lt_workspace.raw_data(), workspace, stream);
    }
    if (pref != nullptr) cublasLtMatmulPreferenceDestroy(pref);
    for (cublasLtMatrixLayout_t l : {la, lb, ld}) {
      if (l != nullptr) cublasLtMatrixLayoutDestroy(l);
    }
    if (desc != nullptr) cublasLtMatmulDescDestroy(desc);
    if (st == CUBLAS_STATUS_SUCCESS) return true;
    static bool logged = false;  // once per process, not per layer
    if (!logged) {
      LOG(WARNING) << "cuBLASLt GELU_AUX_BIAS epilogue unavailable for the expert fc1 ("
                   << (ok ? cublasGetStatusString(st) : "no algorithm or attribute refused")
                   << "); using the GEMM + bias/GELU kernel";
      logged = true;
    }
    lt_disabled = true;
    return false;
  }
  // par_nosync: the kernels only queue on the backend's stream (thrust::cuda::par would end
  // each one in a blocking cudaStreamSynchronize, which never returns behind an NCCL kernel
  // whose peer died); the host waits only in the backend's polling Synchronize.
  // Temporaries (the bias gradients' column sums) from the backend's pool.
  auto policy() const { return thrust::cuda::par_nosync(TempAllocator()).on(stream); }
  void Synchronize() { RequireBackend(Device::kCUDA).Synchronize(); }
};

CublasOps MakeCublasOps() {
  CublasOps ops;
  ops.stream = BackendStream();
  MOERUN_CUBLAS_CHECK(cublasCreate(&ops.handle));
  MOERUN_CUBLAS_CHECK(cublasSetStream(ops.handle, ops.stream));
  if (cublasLtCreate(&ops.lt) != CUBLAS_STATUS_SUCCESS) ops.lt = nullptr;  // then unfused
  return ops;
}

}  // namespace

struct CudaExpertMlp::Impl {
  Impl(int64_t el, int64_t d, int64_t m, bool gelu_tanh)
      : mlp(MakeCublasOps(), el, d, m, gelu_tanh) {}
  ~Impl() {
    // cublasDestroy waits for the whole device (cudaDeviceSynchronize), blocked in the
    // driver: wait for the backend's stream through the poll first, so a stuck collective
    // ends the job with its message instead of hanging here.
    RequireBackend(Device::kCUDA).Synchronize();
    cublasDestroy(mlp.ops().handle);
    if (mlp.ops().lt != nullptr) cublasLtDestroy(mlp.ops().lt);
  }
  DeviceExpertMlp<CublasOps> mlp;
};

CudaExpertMlp::CudaExpertMlp(int64_t el, int64_t d, int64_t m, bool gelu_tanh)
    : el_(el), d_(d), m_(m), impl_(new Impl(el, d, m, gelu_tanh)) {}
CudaExpertMlp::~CudaExpertMlp() = default;
void CudaExpertMlp::LoadParams(const ExpertMlpParams& host) { impl_->mlp.LoadParams(host); }
void CudaExpertMlp::StoreGrads(ExpertMlpParams* host) { impl_->mlp.StoreGrads(host); }
void CudaExpertMlp::CastWeights() { impl_->mlp.CastWeights(); }
void CudaExpertMlp::ZeroGradients() { impl_->mlp.ZeroGradients(); }
bool CudaExpertMlp::LastForwardFused() const { return impl_->mlp.fused(); }
bool CudaExpertMlp::GroupedGemmRefused() const { return impl_->mlp.ops().grouped_refused; }
void CudaExpertMlp::Forward(const Tensor& in, Tensor* out) { impl_->mlp.Forward(in, out); }
void CudaExpertMlp::Backward(const Tensor& d_out, Tensor* d_in) {
  impl_->mlp.Backward(d_out, d_in);
}
void CudaExpertMlp::ForwardGrouped(const Tensor& in, const std::vector<int64_t>& rows,
                                   Tensor* out) {
  impl_->mlp.ForwardGrouped(in, rows, out);
}

std::unique_ptr<FusedExperts> MakeCudaFusedExperts(const ExpertMlpParams& params,
                                                   const ExpertMlpParams& grads, bool gelu_tanh) {
  // One cuBLAS handle, cuBLASLt handle and epilogue workspace for every layer's experts: they
  // all queue on the backend's stream, one after another. Made once, never freed (the
  // process's; nothing to tear down after the backend at exit).
  static const CublasOps* shared = [] {
    auto* ops = new CublasOps(MakeCublasOps());
    if (ops->lt != nullptr) {
      ops->lt_workspace = Tensor::Empty({static_cast<int64_t>(CublasOps::kLtWorkspaceBytes)},
                                        DType::kU8, Device::kCUDA);
    }
    return ops;
  }();
  return std::make_unique<BoundDeviceExperts<CublasOps>>(*shared, params, grads, gelu_tanh);
}

void CudaCastToBF16(const float* src, uint16_t* dst, int64_t n) {
  thrust_experts::CastToBF16(BackendStreamPolicy::Get(), src, dst, n);
}

}  // namespace moerun
