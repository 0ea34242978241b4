// The parsed `moerun bench moe-layer` request, shared by its CPU path
// (cmd_bench_moe_layer.cc) and its CUDA path (cmd_bench_moe_layer_cuda.cc, built with the
// CUDA kernels).
#ifndef MOERUN_LAUNCH_BENCH_MOE_LAYER_H_
#define MOERUN_LAUNCH_BENCH_MOE_LAYER_H_

#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "launch/cli.h"

namespace moerun {

struct MoeLayerBenchSpec {
  int64_t tokens = 4096;
  std::vector<std::pair<int64_t, int64_t>> shapes;  // (D, M)
  std::vector<int64_t> experts;
  std::vector<bool> bprs;
  int k = 2, steps = 3;
  double capacity_factor = 1.05;
};

// False when the CUDA kernels were not built (no nvcc at configure time).
bool CudaMoeBenchBuilt();
int RunBenchMoeLayerCuda(const MoeLayerBenchSpec& spec, Session& session);
// bf16 GEMM TFLOP/s of cuBLAS at n x n x n (random bf16 operands in memory, fp32 accumulation;
// the best of 3 timed batches after a warm-up) on
// this process's GPU: the limit beside which bf16 GEMMs are reported. 0 without the CUDA
// kernels.
double CublasBf16PeakTflops(int64_t n);
// Runs launch/moe_layer_torch.py (next to this binary's source tree) with the same shape
// on the same GPU; returns its JSON line, or "" when the script is not found.
std::string RunTorchPeer(const MoeLayerBenchSpec& spec, int64_t d, int64_t m, int64_t e,
                         int64_t capacity);

}  // namespace moerun

#endif  // MOERUN_LAUNCH_BENCH_MOE_LAYER_H_
