// `moerun bench gemm`'s products, shared by its CPU path (cmd_bench_gemm.cc) and its CUDA
// path (cmd_bench_gemm_cuda.cc, built with the CUDA kernels).
#ifndef MOERUN_LAUNCH_BENCH_GEMM_H_
#define MOERUN_LAUNCH_BENCH_GEMM_H_

#include <cstdint>
#include <string>
#include <vector>

#include "launch/cli.h"

namespace moerun {

// Row-major C [m, n] = op(A) op(B), op transposing where ta / tb.
struct BenchGemmShape {
  std::string pass;
  bool ta, tb;
  int64_t m, n, k;
};

// One MLP's six products at `t` token rows, width d, hidden m: y1 = x W1^T (fc1),
// y2 = h W2^T (fc2); backward dX = dY W, dW = dY^T X.
std::vector<BenchGemmShape> MlpPasses(int64_t t, int64_t d, int64_t m);

// The CUDA path (one GPU: fp32, bf16 with casts, the bf16 GEMM alone, cuBLAS's FAST_16BF;
// rank 0 prints a JSON line per product); without the CUDA kernels, an error (exit 3).
int RunBenchGemmCuda(const std::vector<BenchGemmShape>& shapes, double seconds, Session& session);

}  // namespace moerun

#endif  // MOERUN_LAUNCH_BENCH_GEMM_H_
