// What the models share about their parameters: initialisation (every tensor is filled
// from (seed, its global name) alone, so a model is the same for any rank count) and the
// flat storage of the replicated parameters.
#ifndef MOERUN_MODEL_INIT_H_
#define MOERUN_MODEL_INIT_H_

#include <functional>
#include <memory>
#include <string>

#include "runtime/tensor.h"

namespace moerun {

enum class InitKind { kZeros, kOnes, kNormal, kLecunNormal, kXavierUniform };

// Fills `t` ([.., out, in] for kernels: fan_in = last dim, fan_out = the one before) from
// (seed, name). kNormal uses `std`; kLecunNormal std sqrt(1/fan_in); kXavierUniform limit
// sqrt(6/(fan_in+fan_out)).
void InitParam(const std::string& name, Tensor* t, InitKind kind, uint64_t seed, float std = 0);

// The scheme both models share, by the parameter's role in its name: norms 1 (weight) / 0
// (bias); the patch embedding lecun-normal over fan_in C*P*P; routers lecun-normal; other
// kernels xavier-uniform; MLP and expert biases normal(1e-6); everything else 0.
void InitByRole(const std::string& name, Tensor* t, uint64_t seed);

// Runs `init` over the host floats of `t`: `t` itself on the host; for a device tensor a
// host tensor of its shape, copied to `t` afterwards (so a device model starts from the
// CPU model's numbers).
void InitOnHost(Tensor* t, const std::function<void(Tensor*)>& init);

// The replicated (dense) parameters of a model, values and gradients each in one zeroed flat
// buffer, every tensor 64-byte aligned, so one all-reduce covers all gradients.
class DenseParamStore {
 public:
  // Room for `numel` floats plus `tensors` tensors' alignment padding.
  DenseParamStore(int64_t numel, int64_t tensors, Device device = Device::kCPU);
  // Views of the next tensor's value and gradient (CHECK: room left).
  void Add(const std::string& name, const Shape& shape, Tensor* value, Tensor* grad);
  // Every gradient added so far, as one flat tensor.
  Tensor flat_grads() const;

 private:
  std::shared_ptr<Storage> values_, grads_;
  size_t offset_ = 0, bytes_ = 0;
};

}  // namespace moerun

#endif  // MOERUN_MODEL_INIT_H_
