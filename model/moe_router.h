// The router of a MoE layer: gate values for every token and expert, and their backward.
// Two kinds, the two papers' gates:
//  - kNoisyTopK (V-MoE, shared/specs/vmoe-routing.md): logits z = x W^T with one router
//    W [E, D]; when training, z + sigma * noise (sigma = noise_std / E); gates =
//    softmax of the noisy (or clean) logits; the clean softmax is kept for the losses.
//  - kTaskSoftmax (Mod-Squad, shared/specs/modsquad.md): one router per task, W [tasks, E,
//    D]; token s of task t gets gates p = softmax(x_s W_t^T) + 1e-4. No noise (an explicit
//    noise tensor, for replay cases, is added to the logits before the softmax).
// Top-k selects on the gates and the raw gate is the combine weight (routing plan).
#ifndef MOERUN_MODEL_MOE_ROUTER_H_
#define MOERUN_MODEL_MOE_ROUTER_H_

#include <cstdint>
#include <vector>

#include "model/router_noise.h"
#include "runtime/status.h"
#include "runtime/tensor.h"

namespace moerun {

enum class GateKind { kNoisyTopK, kTaskSoftmax };

// Added to Mod-Squad's softmax (and to its MI loss terms).
constexpr float kTaskGateEpsilon = 1e-4f;

struct RouterInputs {
  bool training = true;           // noise only when training and noise_std > 0
  NoiseKey noise_key;             // with first_token: keys the generated noise
  int64_t first_token = 0;        // global index of this rank's first token
  const Tensor* noise = nullptr;  // optional [T, E], already scaled, replaces the generator
  const int32_t* task = nullptr;  // [T] task of every token (kTaskSoftmax)
};

class Router {
 public:
  // tasks: routers of a kTaskSoftmax gate (1 for kNoisyTopK). The weight, its gradient and
  // the logits' and inputs' GEMMs live on `device`; on a GPU only the logits [T, E] come to
  // the host (noise, softmax, routing and losses run there) and d(logits) goes back.
  Router(GateKind kind, int tasks, int num_experts, int d, double noise_std,
         Device device = Device::kCPU);

  GateKind kind() const { return kind_; }
  int tasks() const { return tasks_; }
  // [E, D] (kNoisyTopK) or [tasks, E, D].
  Tensor& weight() { return weight_; }
  Tensor& grad() { return grad_; }

  // Routes x [T, D] (on the router's device); an error for a task id out of range.
  Status Forward(const Tensor& x, const RouterInputs& in);

  // The same on the router's device, without explicit noise: the logits, noise and
  // softmaxes are computed there (device_gates(), device_choice_softmax()) and nothing
  // comes to the host by itself. The routing plan is then made on the device too
  // (MoeLayer's device routing).
  Status ForwardOnDevice(const Tensor& x, const RouterInputs& in);
  // After ForwardOnDevice: the device tensors whose host copies logits(), noisy_logits(),
  // gates() and clean_gates() are (the losses read those), appended to src with the host
  // tensors to copy them into appended to dst (HostCopies).
  void HostCopies(std::vector<const Tensor*>* src, std::vector<Tensor*>* dst);
  // The gates on the device, which the choices are taken from.
  const Tensor& device_gates() const { return device_gates_; }
  // The softmax whose Jacobian the combine weights' gradient goes through: the gates'
  // (noisy) softmax, or the clean one (the task gates' without their 1e-4).
  const Tensor& device_choice_softmax() const {
    return noisy_ ? device_gates_ : device_clean_gates_;
  }

  // Of the last forward, [T, E].
  const Tensor& gates() const { return gates_; }
  // The softmax of the clean logits: gates() for kNoisyTopK without noise, gates() - 1e-4
  // for kTaskSoftmax.
  const Tensor& clean_gates() const { return clean_gates_; }
  const Tensor& logits() const { return logits_; }
  const Tensor& noisy_logits() const { return noisy_logits_; }
  bool noisy() const { return noisy_; }
  double sigma() const { return sigma_; }
  const int32_t* task() const { return task_; }

  // Backward in two halves so that auxiliary losses can add their gradients where they
  // belong. BeginBackward zeroes and returns d(gates) and d(clean gates) (the same buffer
  // when !noisy(); the 1e-4 of kTaskSoftmax has no gradient); GatesToLogits turns them into
  // d(logits), returned for logit-space losses to add to; LogitsToInputs accumulates the router's
  // weight gradient and adds d(logits) W into dx (on the router's device).
  void BeginBackward(float** d_gates, float** d_clean_gates);
  float* GatesToLogits();
  // d(logits) [T, E] on the host, as GatesToLogits left it.
  const Tensor& d_logits() const { return d_logits_; }
  void LogitsToInputs(float* dx);
  // LogitsToInputs from d(logits) [T, E] already on the router's device (a layer whose
  // router backward runs there).
  void DeviceLogitsToInputs(const Tensor& d_logits, float* dx);
  // Drops the saved input (a view into the model's activation arena, which can then merge
  // its blocks); the next Forward saves a new one.
  void ReleaseInput() { x_ = Tensor(); }

 private:
  GateKind kind_;
  int tasks_, num_experts_, d_;
  double noise_std_;
  Device device_;
  Tensor weight_, grad_;
  // Saved by Forward.
  Tensor x_;
  const int32_t* task_ = nullptr;
  int64_t tokens_ = 0;
  bool noisy_ = false;
  double sigma_ = 0;
  Tensor logits_, noisy_logits_, gates_, clean_gates_;
  Tensor d_gates_, d_clean_gates_, d_logits_;
  Tensor device_logits_, device_d_logits_;  // on a device: the GEMMs' side of the copies
  // ForwardOnDevice's: the noisy logits and the gates (the clean gates: device_gates_
  // without noise).
  Tensor device_noisy_logits_, device_gates_, device_clean_gates_;

  Tensor device_epsilon_;  // [E] of kTaskGateEpsilon on the device (task gates)

  // z [tokens, E] = x W_r^T on the router's device (per run of one task's tokens with
  // `task`), in router_gemm's row-invariant order.
  void ComputeLogits(const float* x, float* z, int64_t tokens, const int32_t* task);
  // dW_r += dz^T x and dx += dz W_r with dz on the router's device.
  void ApplyLogitGradient(const float* dz, float* dx);
  // An error naming the first token whose task id is out of range (or no ids at all).
  Status CheckTasks(const int32_t* task, int64_t tokens) const;
};

}  // namespace moerun

#endif  // MOERUN_MODEL_MOE_ROUTER_H_
