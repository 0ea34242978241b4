// Router forward and backward.
#include "model/moe_router.h"

#include <string>

#include "model/ops.h"
#include "runtime/kernels.h"

namespace moerun {
namespace {

// Reallocates `t` when its shape (or device) differs (buffers persist across steps).
void Ensure(Tensor* t, const Shape& shape, Device device = Device::kCPU) {
  if (!t->defined() || t->shape() != shape || t->device() != device) {
    *t = Tensor::Empty(shape, DType::kF32, device);
  }
}

// Ensure for the clean gates, [T, E] on `device`, in storage of their own: after a forward
// without noise they are the gates themselves (one tensor), and a noisy forward writing
// the clean softmax there would overwrite the noisy gates it routes on.
void EnsureCleanGates(Tensor* clean_gates, const Tensor& gates, const Shape& shape,
                      Device device = Device::kCPU) {
  if (clean_gates->defined() && gates.defined() && clean_gates->raw_data() == gates.raw_data()) {
    *clean_gates = Tensor();
  }
  Ensure(clean_gates, shape, device);
}

// Calls fn(task, first, count) for every run of consecutive tokens of one task.
template <typename Fn>
void ForEachTaskRun(const int32_t* task, int64_t tokens, Fn fn) {
  for (int64_t s = 0; s < tokens;) {
    int64_t e = s + 1;
    while (e < tokens && task[e] == task[s]) ++e;
    fn(task[s], s, e - s);
    s = e;
  }
}

}  // namespace

Router::Router(GateKind kind, int tasks, int num_experts, int d, double noise_std, Device device)
    : kind_(kind),
      tasks_(kind == GateKind::kNoisyTopK ? 1 : tasks),
      num_experts_(num_experts),
      d_(d),
      noise_std_(noise_std),
      device_(device) {
  CHECK_GE(tasks_, 1) << "router with no task";
  const Shape shape =
      kind_ == GateKind::kNoisyTopK ? Shape{num_experts, d} : Shape{tasks_, num_experts, d};
  weight_ = Tensor::Zeros(shape, DType::kF32, device);
  grad_ = Tensor::Zeros(shape, DType::kF32, device);
  if (kind_ == GateKind::kTaskSoftmax && device_ != Device::kCPU) {
    Tensor eps = Tensor::Empty({num_experts});
    eps.Fill(kTaskGateEpsilon);
    device_epsilon_ = eps.To(device_);  // the task gates' +1e-4 on the device
  }
}

Status Router::Forward(const Tensor& x, const RouterInputs& in) {
  CHECK(x.device() == device_) << "a router on " << DeviceName(device_) << " got "
                               << x.ShapeString() << " on " << DeviceName(x.device());
  // The GEMM on the router's device; softmax, noise and the rest on the host.
  const OpsTable& ops = Ops(Device::kCPU);
  const int64_t t = x.dim(0), e_count = num_experts_;
  x_ = x;
  tokens_ = t;
  task_ = in.task;
  Ensure(&logits_, {t, e_count});
  Ensure(&gates_, {t, e_count});
  if (device_ != Device::kCPU) Ensure(&device_logits_, {t, e_count}, device_);
  Tensor& z_out = device_ == Device::kCPU ? logits_ : device_logits_;
  const float* xs = x.device_data<float>(device_);
  float* zs = z_out.device_data<float>(device_);
  if (kind_ == GateKind::kTaskSoftmax) {
    MOERUN_RETURN_IF_ERROR(CheckTasks(in.task, t));
    noisy_ = false;
    sigma_ = 0;
    ComputeLogits(xs, zs, t, in.task);
    if (device_ != Device::kCPU) logits_.CopyFrom(device_logits_);
    Ensure(&clean_gates_, {t, e_count});
    if (in.noise != nullptr) {
      // Explicit noise (replay cases): added to the logits before the softmax.
      MOERUN_CHECK_SHAPE(*in.noise, {t, e_count});
      Ensure(&noisy_logits_, {t, e_count});
      const float* z = logits_.data<float>();
      const float* n = in.noise->data<float>();
      float* zn = noisy_logits_.data<float>();
      for (int64_t i = 0; i < t * e_count; ++i) zn[i] = z[i] + n[i];
      MOERUN_OP(ops, softmax_forward)(zn, clean_gates_.data<float>(), t, e_count);
    } else {
      MOERUN_OP(ops, softmax_forward)
      (logits_.data<float>(), clean_gates_.data<float>(), t, e_count);
    }
    const float* p = clean_gates_.data<float>();
    float* g = gates_.data<float>();
    for (int64_t i = 0; i < t * e_count; ++i) g[i] = p[i] + kTaskGateEpsilon;
    return Status::Ok();
  }
  noisy_ = in.training && noise_std_ > 0;
  sigma_ = noise_std_ / e_count;
  // Row-invariant: a token's logits (hence its routing) are bitwise the same for any
  // number of ranks.
  ComputeLogits(xs, zs, t, nullptr);
  if (device_ != Device::kCPU) logits_.CopyFrom(device_logits_);
  if (noisy_) {
    Ensure(&noisy_logits_, {t, e_count});
    float* zn = noisy_logits_.data<float>();
    const float* z = logits_.data<float>();
    if (in.noise != nullptr) {
      MOERUN_CHECK_SHAPE(*in.noise, {t, e_count});
      const float* n = in.noise->data<float>();
      for (int64_t i = 0; i < t * e_count; ++i) zn[i] = z[i] + n[i];
    } else {
      AddRouterNoise(in.noise_key, in.first_token, t, static_cast<int>(e_count),
                     static_cast<float>(sigma_), z, zn);
    }
    MOERUN_OP(ops, softmax_forward)(zn, gates_.data<float>(), t, e_count);
    EnsureCleanGates(&clean_gates_, gates_, {t, e_count});
    MOERUN_OP(ops, softmax_forward)(z, clean_gates_.data<float>(), t, e_count);
  } else {
    MOERUN_OP(ops, softmax_forward)(logits_.data<float>(), gates_.data<float>(), t, e_count);
    clean_gates_ = gates_;
  }
  return Status::Ok();
}

Status Router::ForwardOnDevice(const Tensor& x, const RouterInputs& in) {
  CHECK(device_ != Device::kCPU && in.noise == nullptr)
      << "device routing is for a router on a device without explicit noise";
  CHECK(x.device() == device_) << "a router on " << DeviceName(device_) << " got "
                               << x.ShapeString() << " on " << DeviceName(x.device());
  const OpsTable& ops = Ops(device_);
  const int64_t t = x.dim(0), e_count = num_experts_;
  const bool task_gate = kind_ == GateKind::kTaskSoftmax;
  if (task_gate) MOERUN_RETURN_IF_ERROR(CheckTasks(in.task, t));
  x_ = x;
  tokens_ = t;
  task_ = task_gate ? in.task : nullptr;
  noisy_ = !task_gate && in.training && noise_std_ > 0;
  sigma_ = task_gate ? 0.0 : noise_std_ / e_count;
  Ensure(&device_logits_, {t, e_count}, device_);
  Ensure(&device_gates_, {t, e_count}, device_);
  float* z = device_logits_.device_data<float>(device_);
  float* g = device_gates_.device_data<float>(device_);
  const float* xs = x.device_data<float>(device_);
  if (task_gate) {
    // gates = softmax(x W_task^T) + 1e-4, the clean softmax kept apart (as Forward).
    ComputeLogits(xs, z, t, in.task);
    EnsureCleanGates(&device_clean_gates_, device_gates_, {t, e_count}, device_);
    MOERUN_OP(ops, softmax_forward)
    (z, device_clean_gates_.device_data<float>(device_), t, e_count);
    device_gates_.CopyFrom(device_clean_gates_);
    MOERUN_OP(ops, add_bias)(g, device_epsilon_.device_data<float>(device_), t, e_count);
    return Status::Ok();
  }
  ComputeLogits(xs, z, t, nullptr);
  if (noisy_) {
    Ensure(&device_noisy_logits_, {t, e_count}, device_);
    EnsureCleanGates(&device_clean_gates_, device_gates_, {t, e_count}, device_);
    float* zn = device_noisy_logits_.device_data<float>(device_);
    MOERUN_OP(ops, add_router_noise)
    (in.noise_key, in.first_token, t, static_cast<int>(e_count), static_cast<float>(sigma_), z, zn);
    MOERUN_OP(ops, softmax_forward)(zn, g, t, e_count);
    MOERUN_OP(ops, softmax_forward)
    (z, device_clean_gates_.device_data<float>(device_), t, e_count);
  } else {
    MOERUN_OP(ops, softmax_forward)(z, g, t, e_count);
    device_clean_gates_ = device_gates_;
  }
  return Status::Ok();
}

void Router::ComputeLogits(const float* x, float* z, int64_t tokens, const int32_t* task) {
  const OpsTable& ops = Ops(device_);
  const int64_t e_count = num_experts_, d = d_;
  const float* w = weight_.device_data<float>(device_);
  // Row-invariant: a token's logits (hence its routing) are bitwise the same for any
  // number of ranks.
  if (task == nullptr) {
    MOERUN_OP(ops, router_gemm)(x, w, z, tokens, e_count, d);
    return;
  }
  ForEachTaskRun(task, tokens, [&](int32_t t, int64_t first, int64_t count) {
    MOERUN_OP(ops, router_gemm)
    (x + first * d, w + t * e_count * d, z + first * e_count, count, e_count, d);
  });
}

Status Router::CheckTasks(const int32_t* task, int64_t tokens) const {
  if (task == nullptr) return Status::Error("a task-routed MoE layer needs task ids");
  for (int64_t s = 0; s < tokens; ++s) {
    if (task[s] < 0 || task[s] >= tasks_) {
      return Status::Error("token " + std::to_string(s) + " has task id " +
                           std::to_string(task[s]) + ", outside 0.." + std::to_string(tasks_ - 1) +
                           " (the layer has " + std::to_string(tasks_) + " task routers)");
    }
  }
  return Status::Ok();
}

void Router::HostCopies(std::vector<const Tensor*>* src, std::vector<Tensor*>* dst) {
  const int64_t t = tokens_, e_count = num_experts_;
  Ensure(&logits_, {t, e_count});
  Ensure(&gates_, {t, e_count});
  src->insert(src->end(), {&device_logits_, &device_gates_});
  dst->insert(dst->end(), {&logits_, &gates_});
  if (noisy_ || kind_ == GateKind::kTaskSoftmax) {
    EnsureCleanGates(&clean_gates_, gates_, {t, e_count});
    src->push_back(&device_clean_gates_);
    dst->push_back(&clean_gates_);
  }
  if (noisy_) {
    Ensure(&noisy_logits_, {t, e_count});
    src->push_back(&device_noisy_logits_);
    dst->push_back(&noisy_logits_);
  } else if (kind_ == GateKind::kNoisyTopK) {
    clean_gates_ = gates_;
  }
}

void Router::BeginBackward(float** d_gates, float** d_clean_gates) {
  const int64_t t = tokens_, e_count = num_experts_;
  Ensure(&d_gates_, {t, e_count});
  d_gates_.SetZero();
  *d_gates = d_gates_.data<float>();
  *d_clean_gates = *d_gates;
  if (noisy_) {
    Ensure(&d_clean_gates_, {t, e_count});
    d_clean_gates_.SetZero();
    *d_clean_gates = d_clean_gates_.data<float>();
  }
}

float* Router::GatesToLogits() {
  const OpsTable& ops = Ops(Device::kCPU);
  const int64_t t = tokens_, e_count = num_experts_;
  Ensure(&d_logits_, {t, e_count});
  float* dz = d_logits_.data<float>();
  if (noisy_) {
    MOERUN_OP(ops, softmax_backward)(gates_.data<float>(), d_gates_.data<float>(), dz, t, e_count);
    // The clean softmax's gradient adds to the same logits.
    float* dclean = d_clean_gates_.data<float>();
    MOERUN_OP(ops, softmax_backward)(clean_gates_.data<float>(), dclean, dclean, t, e_count);
    MOERUN_OP(ops, axpy)(1.0f, dclean, dz, t * e_count);
  } else {
    MOERUN_OP(ops, softmax_backward)
    (clean_gates_.data<float>(), d_gates_.data<float>(), dz, t, e_count);
  }
  return dz;
}

void Router::LogitsToInputs(float* dx) {
  const float* dz = d_logits_.data<float>();
  if (device_ != Device::kCPU) {
    Ensure(&device_d_logits_, {tokens_, num_experts_}, device_);
    device_d_logits_.CopyFrom(d_logits_);
    dz = device_d_logits_.device_data<float>(device_);
  }
  ApplyLogitGradient(dz, dx);
}

void Router::DeviceLogitsToInputs(const Tensor& d_logits, float* dx) {
  MOERUN_CHECK_SHAPE(d_logits, {tokens_, static_cast<int64_t>(num_experts_)});
  ApplyLogitGradient(d_logits.device_data<float>(device_), dx);
}

void Router::ApplyLogitGradient(const float* dz, float* dx) {
  const OpsTable& ops = Ops(device_);
  const int64_t t = tokens_, e_count = num_experts_, d = d_;
  const float* xs = x_.device_data<float>(device_);
  const float* ws = weight_.device_data<float>(device_);
  float* gs = grad_.device_data<float>(device_);
  // On the experts' blocked GEMM where the table has one (alpha 1, beta 1 fit it); these
  // products are thin (32 rows, or a depth of 32), which OpenBLAS runs slowly: bench
  // moe-layer 512x2048 E=32, the router's backward 4.1 -> 3.6 ms at 1 rank x 2 threads and
  // 6.8 -> 5.4 ms at 2 ranks x 1 thread.
  if (kind_ == GateKind::kNoisyTopK) {
    // dW_r += dz^T x; dx += dz W_r.
    ExpertGemmOrGemm(ops)(true, false, e_count, d, t, 1.0f, dz, e_count, xs, d, 1.0f, gs, d);
    ExpertGemmOrGemm(ops)(false, false, t, d, e_count, 1.0f, dz, e_count, ws, d, 1.0f, dx, d);
    return;
  }
  ForEachTaskRun(task_, t, [&](int32_t task, int64_t first, int64_t count) {
    const int64_t w_off = static_cast<int64_t>(task) * e_count * d;
    ExpertGemmOrGemm(ops)(true, false, e_count, d, count, 1.0f, dz + first * e_count, e_count,
                          xs + first * d, d, 1.0f, gs + w_off, d);
    ExpertGemmOrGemm(ops)(false, false, count, d, e_count, 1.0f, dz + first * e_count, e_count,
                          ws + w_off, d, 1.0f, dx + first * d, d);
  });
}

}  // namespace moerun
