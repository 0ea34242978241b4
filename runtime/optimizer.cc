// AdamW and the learning-rate schedule.
#include "runtime/optimizer.h"

#include <glog/logging.h>

#include <algorithm>
#include <cmath>

#include "runtime/process.h"

namespace moerun {

double LearningRate(const OptimizerConfig& c, int64_t step) {
  if (step < c.warmup_steps) return c.learning_rate * (step + 1) / c.warmup_steps;
  const int64_t decay_steps = std::max<int64_t>(1, c.total_steps - c.warmup_steps);
  const double progress = std::min(1.0, static_cast<double>(step - c.warmup_steps) / decay_steps);
  if (c.schedule == "linear") return c.learning_rate * (1.0 - progress);
  return c.learning_rate * 0.5 * (1.0 + std::cos(M_PI * progress));
}

AdamW::AdamW(const OptimizerConfig& config, std::vector<OptimizerParam> params)
    : config_(config), params_(std::move(params)) {
  AllocationLabel label("AdamW moments (2 x " + std::to_string(params_.size()) +
                        " parameter tensors)");
  const bool bf16 = config_.moments == DType::kBF16;
  for (const OptimizerParam& p : params_) {
    const int64_t words = bf16 ? (p.size + 1) / 2 : p.size;
    m_.push_back(Tensor::Zeros({words}, DType::kI32, p.device));
    v_.push_back(Tensor::Zeros({words}, DType::kI32, p.device));
  }
}

void AdamW::ZeroMoments() {
  for (Tensor& m : m_) m.SetZero();
  for (Tensor& v : v_) v.SetZero();
}

AdamWScalars AdamW::Scalars(int64_t step, float grad_scale) const {
  const double t = static_cast<double>(step + 1);
  AdamWScalars s;
  s.b1 = static_cast<float>(config_.beta1);
  s.b2 = static_cast<float>(config_.beta2);
  s.c1 = static_cast<float>(1.0 / (1.0 - std::pow(config_.beta1, t)));
  s.c2 = static_cast<float>(1.0 / (1.0 - std::pow(config_.beta2, t)));
  s.eps = static_cast<float>(config_.eps);
  s.lr = static_cast<float>(LearningRate(config_, step));
  s.weight_decay = static_cast<float>(config_.weight_decay);
  s.grad_scale = grad_scale;
  return s;
}

void AdamWUpdate(const AdamWScalars& s, bool decay, float* value, const float* grad, void* m_raw,
                 void* v_raw, int64_t n, bool bf16_moments) {
  const float c1 = s.c1, c2 = s.c2, b1 = s.b1, b2 = s.b2, eps = s.eps, flr = s.lr;
  const float grad_scale = s.grad_scale;
  const float wd = decay ? s.weight_decay : 0.0f;
  if (bf16_moments) {
    BF16* m = static_cast<BF16*>(m_raw);
    BF16* v = static_cast<BF16*>(v_raw);
#pragma omp parallel for simd schedule(static) if (n > 65536)
    for (int64_t j = 0; j < n; ++j) {
      const float g = grad[j] * grad_scale;
      const float mj = b1 * BF16ToFloat(m[j]) + (1.0f - b1) * g;
      const float vj = b2 * BF16ToFloat(v[j]) + (1.0f - b2) * g * g;
      m[j] = FloatToBF16(mj);
      v[j] = FloatToBF16(vj);
      const float update = (mj * c1) / (std::sqrt(vj * c2) + eps);
      value[j] -= flr * (update + wd * value[j]);
    }
    return;
  }
  float* m = static_cast<float*>(m_raw);
  float* v = static_cast<float*>(v_raw);
#pragma omp parallel for simd schedule(static) if (n > 65536)
  for (int64_t j = 0; j < n; ++j) {
    const float g = grad[j] * grad_scale;
    m[j] = b1 * m[j] + (1.0f - b1) * g;
    v[j] = b2 * v[j] + (1.0f - b2) * g * g;
    const float update = (m[j] * c1) / (std::sqrt(v[j] * c2) + eps);
    value[j] -= flr * (update + wd * value[j]);
  }
}

void AdamW::Step(int64_t step, float grad_scale) {
  const AdamWScalars s = Scalars(step, grad_scale);
  const bool bf16 = config_.moments == DType::kBF16;
  // Each device's arrays in one call (a device's: one launch for all of them), the devices
  // in the order their first parameters come.
  std::vector<Device> devices;
  for (const OptimizerParam& p : params_) {
    if (std::find(devices.begin(), devices.end(), p.device) == devices.end()) {
      devices.push_back(p.device);
    }
  }
  std::vector<AdamWArray> arrays;
  for (const Device device : devices) {
    arrays.clear();
    AdamWUpdateManyFn update = nullptr;
    for (size_t i = 0; i < params_.size(); ++i) {
      const OptimizerParam& p = params_[i];
      if (p.device != device) continue;
      CHECK(p.device == Device::kCPU || p.update != nullptr)
          << "AdamW: parameter " << p.name << " is on " << DeviceName(p.device)
          << " without that device's update";
      CHECK(arrays.empty() || p.update == update)
          << "AdamW: parameter " << p.name << " has another update than the other parameters on "
          << DeviceName(p.device);
      update = p.update;
      arrays.push_back({p.value, p.grad, m_[i].raw_data(), v_[i].raw_data(), p.size, p.decay});
    }
    if (arrays.empty()) continue;
    if (update != nullptr) {
      update(s, arrays.data(), static_cast<int64_t>(arrays.size()), bf16);
    } else {
      AdamWUpdateMany(s, arrays.data(), static_cast<int64_t>(arrays.size()), bf16);
    }
  }
}

void AdamWUpdateMany(const AdamWScalars& s, const AdamWArray* arrays, int64_t count,
                     bool bf16_moments) {
  for (int64_t i = 0; i < count; ++i) {
    const AdamWArray& a = arrays[i];
    AdamWUpdate(s, a.decay, a.value, a.grad, a.m, a.v, a.n, bf16_moments);
  }
}

float ClipCoefficient(double norm, double max_norm) {
  if (max_norm <= 0 || norm <= max_norm) return 1.0f;
  return static_cast<float>(max_norm / (norm + 1e-6));
}

}  // namespace moerun
