// The rank's expert MLPs on a CUDA device: E_l experts, each fc1 [M, D] -> GELU -> fc2
// [D, M], over fixed-capacity rows [E_l, R, D] (R = peers * capacity). bf16 GEMM inputs with
// fp32 accumulation and fp32 master weights (cublasGemmStridedBatchedEx over the experts),
// bias + GELU fused in one kernel, fp32 gradients accumulated across calls; the dropless
// forward (per-expert row counts) is one cublasGemmGroupedBatchedEx per layer where cuBLAS
// takes bf16 x bf16 -> fp32 (its documentation lists bf16 output only), else one GEMM per
// expert (GroupedGemmRefused says which ran).
// Tensors are the CUDA backend's (Device::kCUDA). Built with the CUDA toolkit
// (MOERUN_WITH_CUDA_KERNELS); semantics are ExpertMlp's (model/moe_experts.h) up to bf16.
#ifndef MOERUN_MODEL_MOE_EXPERTS_CUDA_H_
#define MOERUN_MODEL_MOE_EXPERTS_CUDA_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "model/moe_experts.h"
#include "runtime/tensor.h"

namespace moerun {

class CudaExpertMlp {
 public:
  CudaExpertMlp(int64_t el, int64_t d, int64_t m, bool gelu_tanh);
  ~CudaExpertMlp();
  CudaExpertMlp(const CudaExpertMlp&) = delete;
  CudaExpertMlp& operator=(const CudaExpertMlp&) = delete;

  // Host fp32 parameters (ExpertMlp's layout) -> device masters, and their bf16 copies.
  void LoadParams(const ExpertMlpParams& host);
  // Device fp32 gradients -> host tensors of ExpertMlp's layout (overwritten).
  void StoreGrads(ExpertMlpParams* host);
  // Re-makes the bf16 weight copies from the fp32 masters (after an optimizer step).
  void CastWeights();
  void ZeroGradients();

  // in: bf16 [E_l, R, D]; out: fp32 [E_l, R, D] (device tensors; out is (re)allocated).
  void Forward(const Tensor& in, Tensor* out);
  // d_out: fp32 [E_l, R, D] -> d_in fp32 [E_l, R, D]; parameter gradients accumulate.
  void Backward(const Tensor& d_out, Tensor* d_in);
  // Dropless forward: `rows[e]` rows of expert e packed one after another in `in` (bf16
  // [sum rows, D]); out fp32 [sum rows, D]. No backward state is kept.
  void ForwardGrouped(const Tensor& in, const std::vector<int64_t>& rows, Tensor* out);

  // Whether the last Forward fused fc1's bias + tanh GELU into cuBLASLt's epilogue (false:
  // the erf GELU, or cuBLASLt refused the shapes), and whether cuBLAS refused the grouped
  // GEMM of ForwardGrouped (which then ran one GEMM per expert): for the record of a run.
  bool LastForwardFused() const;
  bool GroupedGemmRefused() const;

  // FLOPs of one Forward + Backward at R rows per expert (2 GEMMs forward, 4 backward).
  double FlopsPerStep(int64_t rows) const { return 12.0 * el_ * rows * d_ * m_; }

 private:
  struct Impl;
  int64_t el_, d_, m_;
  std::unique_ptr<Impl> impl_;
};

// The CUDA bf16 table's make_fused_experts (model/ops.h): the experts above, bound to an
// ExpertMlp's fp32 parameters and gradients on the GPU (training under train.precision
// BF16 runs them).
std::unique_ptr<FusedExperts> MakeCudaFusedExperts(const ExpertMlpParams& params,
                                                   const ExpertMlpParams& grads, bool gelu_tanh);

// dst = bf16(src) on the CUDA backend's stream (rounded to nearest even, as FloatToBF16).
void CudaCastToBF16(const float* src, uint16_t* dst, int64_t n);

}  // namespace moerun

#endif  // MOERUN_MODEL_MOE_EXPERTS_CUDA_H_
