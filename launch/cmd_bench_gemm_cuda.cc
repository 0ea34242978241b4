// moerun bench gemm --device cuda: the dense GEMMs of a training step on one GPU, four ways
// per product, to decide how train.precision BF16 should run them:
//   fp32       the CUDA table's GEMM (cublasSgemm; no TF32: cuBLAS's default math mode)
//   bf16       the CUDA bf16 table's GEMM, what train.precision BF16 runs today: both
//              operands cast to bf16 (round to nearest even) on every call, then a bf16 x
//              bf16 -> fp32 cuBLAS GEMM
//   bf16_gemm  that GEMM alone, on operands cast once beforehand: the cost of the casts is
//              the difference (cast_share); bf16_gemm_vs_bf16 checks it computed the same
//              products (0, or fp32-accumulation size where cuBLAS picks another algorithm)
//   fast16bf   fp32 operands with CUBLAS_COMPUTE_32F_FAST_16BF (cuBLAS converts inside the
//              GEMM: no cast pass). Its rounding is not documented: fast16bf_vs_bf16 (its
//              largest difference from the bf16 products, over their largest magnitude) is at
//              fp32-accumulation size if it rounds to nearest as our casts do, at bf16 size
//              (~1e-3) if not; bf16_vs_fp32 is the bf16 size for comparison.
#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <functional>
#include <random>

#include "launch/bench_gemm.h"
#include "launch/commands.h"
#include "model/moe_experts_cuda.h"
#include "model/ops.h"
#include "runtime/backend.h"

namespace moerun {
namespace {

void Check(cublasStatus_t st, const char* what) {
  CHECK(st == CUBLAS_STATUS_SUCCESS)
      << "bench gemm --device cuda: " << what << " failed: " << cublasGetStatusString(st);
}

cublasOperation_t Op(bool t) { return t ? CUBLAS_OP_T : CUBLAS_OP_N; }

// Uniform [-1, 1) on the host, then on the GPU.
Tensor RandomDevice(int64_t rows, int64_t cols, uint32_t seed) {
  Tensor host = Tensor::Empty({rows, cols});
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (int64_t i = 0; i < host.numel(); ++i) host.data<float>()[i] = u(rng);
  return host.To(Device::kCUDA);
}

// max |a - b| / max |b| over two device tensors of one shape.
double RelativeDiff(const Tensor& a, const Tensor& b) {
  const Tensor ha = a.To(Device::kCPU), hb = b.To(Device::kCPU);
  double diff = 0, scale = 0;
  for (int64_t i = 0; i < ha.numel(); ++i) {
    diff =
        std::max(diff, std::fabs(static_cast<double>(ha.data<float>()[i]) - hb.data<float>()[i]));
    scale = std::max(scale, std::fabs(static_cast<double>(hb.data<float>()[i])));
  }
  return scale > 0 ? diff / scale : diff;
}

}  // namespace

int RunBenchGemmCuda(const std::vector<BenchGemmShape>& shapes, double seconds, Session& session) {
  Backend& backend = RequireBackend(Device::kCUDA);
  cublasHandle_t handle;
  Check(cublasCreate(&handle), "cublasCreate");
  Check(cublasSetStream(handle, static_cast<cudaStream_t>(backend.stream())), "cublasSetStream");
  // Seconds per call of `run`: calls queued back to back, then one (polling) wait; the best of
  // three loops of about `seconds` each, after a warm-up.
  auto time = [&](const std::function<void()>& run) {
    run();
    backend.Synchronize();
    auto t0 = std::chrono::steady_clock::now();
    run();
    backend.Synchronize();
    const double one = std::max(
        1e-6, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    const int iters = static_cast<int>(std::clamp(seconds / one, 1.0, 1000.0));
    double best = 1e30;
    for (int loop = 0; loop < 3; ++loop) {
      t0 = std::chrono::steady_clock::now();
      for (int i = 0; i < iters; ++i) run();
      backend.Synchronize();
      best = std::min(
          best,
          std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / iters);
    }
    return best;
  };
  for (const BenchGemmShape& g : shapes) {
    const int64_t a_rows = g.ta ? g.k : g.m, a_cols = g.ta ? g.m : g.k;
    const int64_t b_rows = g.tb ? g.n : g.k, b_cols = g.tb ? g.k : g.n;
    const int64_t lda = a_cols, ldb = b_cols, ldc = g.n;
    Tensor a = RandomDevice(a_rows, a_cols, 1), b = RandomDevice(b_rows, b_cols, 2);
    Tensor c32 = Tensor::Zeros({g.m, g.n}, DType::kF32, Device::kCUDA);
    Tensor c16 = Tensor::Zeros({g.m, g.n}, DType::kF32, Device::kCUDA);
    Tensor c16g = Tensor::Zeros({g.m, g.n}, DType::kF32, Device::kCUDA);
    Tensor cfast = Tensor::Zeros({g.m, g.n}, DType::kF32, Device::kCUDA);
    Tensor a16 = Tensor::Empty({a_rows, a_cols}, DType::kBF16, Device::kCUDA);
    Tensor b16 = Tensor::Empty({b_rows, b_cols}, DType::kBF16, Device::kCUDA);
    CudaCastToBF16(a.device_data<float>(Device::kCUDA), reinterpret_cast<uint16_t*>(a16.raw_data()),
                   a.numel());
    CudaCastToBF16(b.device_data<float>(Device::kCUDA), reinterpret_cast<uint16_t*>(b16.raw_data()),
                   b.numel());
    const float alpha = 1.0f, beta = 0.0f;
    // The table's GEMM in force (fp32, or under SetBf16Gemms the bf16 variant).
    auto table_gemm = [&](Tensor* c) {
      MOERUN_OP(Ops(Device::kCUDA), gemm)
      (g.ta, g.tb, g.m, g.n, g.k, 1.0f, a.device_data<float>(Device::kCUDA), lda,
       b.device_data<float>(Device::kCUDA), ldb, 0.0f, c->device_data<float>(Device::kCUDA), ldc);
    };
    // Row-major C = op(A) op(B) as column-major C^T = op(B)^T op(A)^T.
    auto cublas = [&](const void* pa, const void* pb, cudaDataType type,
                      cublasComputeType_t compute, Tensor* c) {
      return cublasGemmEx(handle, Op(g.tb), Op(g.ta), static_cast<int>(g.n), static_cast<int>(g.m),
                          static_cast<int>(g.k), &alpha, pb, type, static_cast<int>(ldb), pa, type,
                          static_cast<int>(lda), &beta, c->raw_data(), CUDA_R_32F,
                          static_cast<int>(ldc), compute, CUBLAS_GEMM_DEFAULT);
    };
    const bool bf16_before = SetBf16Gemms(false);
    const double t32 = time([&] { table_gemm(&c32); });
    SetBf16Gemms(true);
    const double t16 = time([&] { table_gemm(&c16); });
    SetBf16Gemms(bf16_before);
    const double t16_gemm = time([&] {
      Check(cublas(a16.raw_data(), b16.raw_data(), CUDA_R_16BF, CUBLAS_COMPUTE_32F, &c16g),
            "cublasGemmEx (bf16 x bf16 -> fp32)");
    });
    // FAST_16BF may be refused (a status, not a CUDA error): then its fields are null.
    const cublasStatus_t fast_status =
        cublas(a.raw_data(), b.raw_data(), CUDA_R_32F, CUBLAS_COMPUTE_32F_FAST_16BF, &cfast);
    const bool fast_ok = fast_status == CUBLAS_STATUS_SUCCESS;
    const double tfast = fast_ok ? time([&] {
      Check(cublas(a.raw_data(), b.raw_data(), CUDA_R_32F, CUBLAS_COMPUTE_32F_FAST_16BF, &cfast),
            "cublasGemmEx (fp32, COMPUTE_32F_FAST_16BF)");
    })
                                 : 0.0;
    const double flop = 2.0 * g.m * g.n * g.k;
    if (!session.is_root()) continue;
    const nlohmann::json null;
    PrintJsonLine({{"bench", "gemm"},
                   {"device", backend.Describe()},
                   {"pass", g.pass},
                   {"m", g.m},
                   {"n", g.n},
                   {"k", g.k},
                   {"tflops",
                    {{"fp32", flop / t32 / 1e12},
                     {"bf16", flop / t16 / 1e12},
                     {"bf16_gemm", flop / t16_gemm / 1e12},
                     {"fast16bf", fast_ok ? nlohmann::json(flop / tfast / 1e12) : null}}},
                   {"cast_share", 1.0 - t16_gemm / t16},
                   {"bf16_vs_fp32", RelativeDiff(c16, c32)},
                   {"bf16_gemm_vs_bf16", RelativeDiff(c16g, c16)},
                   {"fast16bf_vs_bf16", fast_ok ? nlohmann::json(RelativeDiff(cfast, c16)) : null},
                   {"fast16bf_vs_fp32", fast_ok ? nlohmann::json(RelativeDiff(cfast, c32)) : null},
                   {"fast16bf_status", cublasGetStatusString(fast_status)}});
  }
  backend.Synchronize();
  cublasDestroy(handle);  // the stream is drained: nothing left for its device wait
  return kExitOk;
}

}  // namespace moerun
