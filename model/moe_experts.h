// The experts of a MoE layer, run on the rows the dispatcher brought to this rank: every
// local expert's rows are one block of [E_local, R, width], so each expert is a GEMM over
// its block (GemmStridedBatched over the experts).
#ifndef MOERUN_MODEL_MOE_EXPERTS_H_
#define MOERUN_MODEL_MOE_EXPERTS_H_

#include <cstdint>
#include <memory>

#include "runtime/tensor.h"

namespace moerun {

struct MoeTimers;

// y[e] = x[e] W[e]^T (+ b[e]) for x [El, R, in], W [El, out, in], b [El, out] or null;
// y [El, R, out] overwritten. GEMM time into `gemm`, bias time into `act`.
void BatchedLinearForward(const Tensor& x, const Tensor& w, const Tensor* b, Tensor* y,
                          double* gemm, double* act);
// dW[e] += dy[e]^T x[e], db[e] += sum_rows dy[e] (db null: no bias), dx[e] = dy[e] W[e]
// (overwritten; dx null: skipped).
void BatchedLinearBackward(const Tensor& x, const Tensor& w, const Tensor& dy, Tensor* dw,
                           Tensor* db, Tensor* dx, double* gemm, double* act);

// Expert MLPs: Dense(D->M) + GELU + Dense(M->D), both with biases.
struct ExpertMlpParams {
  Tensor fc1_weight;  // [E_local, M, D]
  Tensor fc1_bias;    // [E_local, M]
  Tensor fc2_weight;  // [E_local, D, M]
  Tensor fc2_bias;    // [E_local, D]
};

// The expert MLP as a device runs it whole under train.precision BF16 (the CUDA backend's,
// model/moe_experts_cuda.h: bf16 weight copies made at each forward, bf16 GEMM inputs with
// fp32 accumulation, bias + GELU fused where cuBLASLt can), bound to an ExpertMlp's fp32
// parameters and gradients (gradients accumulate into them). Made by an ops table's
// make_fused_experts (model/ops.h).
class FusedExperts {
 public:
  virtual ~FusedExperts() = default;
  // in fp32 [El, R, D] -> out fp32 [El, R, D] (reallocated when its shape differs).
  virtual void Forward(const Tensor& in, Tensor* out) = 0;
  // d_out [El, R, D] -> d_in [El, R, D]; parameter gradients accumulate.
  virtual void Backward(const Tensor& d_out, Tensor* d_in) = 0;
};

class ExpertMlp {
 public:
  // Parameters, gradients and buffers on `device`; the arithmetic runs on its ops table
  // (model/ops.h), fp32 throughout, or the table's FusedExperts (above) where it has them.
  ExpertMlp(int64_t local_experts, int64_t d, int64_t m, bool gelu_tanh,
            Device device = Device::kCPU);
  ExpertMlpParams& params() { return params_; }
  ExpertMlpParams& grads() { return grads_; }
  void ZeroGradients();
  // in [El, R, D] -> out [El, R, D]; `in` is kept (as a view) for the backward. Where the
  // table of the experts' device makes FusedExperts (a GPU under train.precision BF16),
  // Forward and Backward run those, timed as the experts' GEMMs.
  void Forward(const Tensor& in, Tensor* out, MoeTimers* timers);
  // d_out [El, R, D] -> d_in [El, R, D]; parameter gradients accumulate.
  void Backward(const Tensor& d_out, Tensor* d_in, MoeTimers* timers);

  // The same in pieces, for overlapping the all-to-all: Prepare* binds the tensors (they
  // must stay alive and keep their shapes), then *Rows computes rows [begin, begin + count)
  // of every expert's block; every row computed once gives Forward's / Backward's result
  // (the weight gradients summed in row pieces). Always the table's GEMM entries.
  void PrepareForward(const Tensor& in, Tensor* out);
  void ForwardRows(int64_t begin, int64_t count, MoeTimers* timers);
  void PrepareBackward(const Tensor& d_out, Tensor* d_in);
  void BackwardRows(int64_t begin, int64_t count, MoeTimers* timers);

 private:
  int64_t d_, m_;
  bool gelu_tanh_;
  Device device_;
  ExpertMlpParams params_, grads_;
  Tensor in_, act_, d_act_, d_out_;
  Tensor hidden_;  // fc1's output, then what BiasGeluSaving leaves for the backward
  Tensor* out_ = nullptr;
  Tensor* d_in_ = nullptr;
  std::unique_ptr<FusedExperts> fused_;
  bool fused_forward_ = false;  // the last Forward ran fused_ (its Backward does too)
};

}  // namespace moerun

#endif  // MOERUN_MODEL_MOE_EXPERTS_H_
