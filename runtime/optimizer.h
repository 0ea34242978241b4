// AdamW with decoupled weight decay, the learning-rate schedule (linear warmup, then cosine
// or linear decay to 0) and gradient clipping by a global norm the caller computes.
// The optimizer's whole state is the step counter the caller passes plus the two moment
// buffers, which are exposed for checkpointing.
#ifndef MOERUN_RUNTIME_OPTIMIZER_H_
#define MOERUN_RUNTIME_OPTIMIZER_H_

#include <cstdint>
#include <string>
#include <vector>

#include "runtime/dtype.h"
#include "runtime/tensor.h"

namespace moerun {

struct OptimizerConfig {
  double learning_rate = 1e-3;
  double weight_decay = 0.0;
  double beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  int64_t warmup_steps = 0;
  int64_t total_steps = 1;
  std::string schedule = "cosine";  // or "linear"
  // Storage of the two moments: kF32, or kBF16 (half the optimizer memory; each update is
  // computed in fp32 and rounded to nearest even when stored).
  DType moments = DType::kF32;
};

// Learning rate at 0-based `step`: lr * (step + 1) / warmup during warmup, then decayed to
// 0 at total_steps (cosine or linear).
double LearningRate(const OptimizerConfig& config, int64_t step);

struct AdamWScalars;

// One parameter array's buffers for an update of many arrays at once: n elements of value
// and grad (fp32) and of the moments m and v (fp32, or bf16 when the update's bf16_moments),
// on one device; `decay`: whether weight decay applies.
struct AdamWArray {
  float* value;
  const float* grad;
  void* m;
  void* v;
  int64_t n;
  bool decay;
};
// The AdamW update of `count` arrays with one step's constants (a device's: one launch for
// all of them, model/ops.h's adamw_step_many entry).
using AdamWUpdateManyFn = void (*)(const AdamWScalars& s, const AdamWArray* arrays, int64_t count,
                                   bool bf16_moments);

struct OptimizerParam {
  std::string name;
  float* value;
  const float* grad;
  int64_t size;
  bool decay;  // apply weight decay
  // Where value and grad live (the moments are kept there too), and that device's update of
  // many arrays (model/ops.h's adamw_step_many entry); null: AdamWUpdate array by array (the
  // CPU's). AdamW::Step updates the parameters of one device in one call.
  Device device = Device::kCPU;
  AdamWUpdateManyFn update = nullptr;
};

// The per-step constants of an AdamW update (what a device kernel needs besides the
// buffers): bias corrections c1 = 1 / (1 - b1^t), c2 = 1 / (1 - b2^t), the step's learning
// rate; weight decay is per parameter (0 for undecayed ones).
struct AdamWScalars {
  float b1, b2, c1, c2, eps, lr, weight_decay, grad_scale;
};

// The update of one parameter's n elements with the step's constants (AdamW::Step's loop;
// the CPU implementation of ops::AdamWStep). m and v hold fp32, or bf16 when bf16_moments.
void AdamWUpdate(const AdamWScalars& s, bool decay, float* value, const float* grad, void* m,
                 void* v, int64_t n, bool bf16_moments);
// AdamWUpdate over each of `count` arrays in turn (the CPU's adamw_step_many).
void AdamWUpdateMany(const AdamWScalars& s, const AdamWArray* arrays, int64_t count,
                     bool bf16_moments);

class AdamW {
 public:
  AdamW(const OptimizerConfig& config, std::vector<OptimizerParam> params);
  // One update at 0-based `step` with gradients multiplied by grad_scale (the clipping
  // coefficient): m = b1 m + (1-b1) g; v = b2 v + (1-b2) g^2; p -= lr (m^ / (sqrt(v^) + eps)
  // + wd p) with bias-corrected m^, v^ (t = step + 1).
  void Step(int64_t step, float grad_scale);
  // Step's constants at `step` (weight_decay: the config's; use 0 for undecayed params).
  AdamWScalars Scalars(int64_t step, float grad_scale) const;
  const OptimizerConfig& config() const { return config_; }
  const std::vector<OptimizerParam>& params() const { return params_; }
  // Parameter i's first / second moment storage (params()[i].size elements of
  // config().moments), for checkpointing.
  // On the parameter's device.
  void* first_moment(size_t i) { return m_[i].raw_data(); }
  void* second_moment(size_t i) { return v_[i].raw_data(); }
  void ZeroMoments();

 private:
  OptimizerConfig config_;
  std::vector<OptimizerParam> params_;
  // Raw storage on the parameter's device, 4-byte words: one float, or two bf16 values,
  // per word.
  std::vector<Tensor> m_, v_;
};

// min(1, max_norm / norm); 1 when max_norm <= 0 (no clipping).
float ClipCoefficient(double norm, double max_norm);

}  // namespace moerun

#endif  // MOERUN_RUNTIME_OPTIMIZER_H_
