// Parameter initialisation.
#include "model/init.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>

#include "runtime/hash.h"

namespace moerun {

void InitParam(const std::string& name, Tensor* t, InitKind kind, uint64_t seed, float std) {
  std::mt19937_64 rng(SplitMix64(seed ^ Fnv1a(name)));
  float* p = t->data<float>();
  const int64_t n = t->numel();
  const int64_t in = t->ndim() >= 2 ? t->dim(-1) : 1, out = t->ndim() >= 2 ? t->dim(-2) : n;
  switch (kind) {
    case InitKind::kZeros:
      std::fill_n(p, n, 0.0f);
      return;
    case InitKind::kOnes:
      std::fill_n(p, n, 1.0f);
      return;
    case InitKind::kNormal:
    case InitKind::kLecunNormal: {
      const float s = kind == InitKind::kNormal ? std : 1.0f / std::sqrt(static_cast<float>(in));
      std::normal_distribution<float> dist(0.0f, s);
      for (int64_t i = 0; i < n; ++i) p[i] = dist(rng);
      return;
    }
    case InitKind::kXavierUniform: {
      const float limit = std::sqrt(6.0f / static_cast<float>(in + out));
      std::uniform_real_distribution<float> dist(-limit, limit);
      for (int64_t i = 0; i < n; ++i) p[i] = dist(rng);
      return;
    }
  }
}

void InitByRole(const std::string& n, Tensor* t, uint64_t seed) {
  auto ends = [&](const std::string& s) {
    return n.size() >= s.size() && n.compare(n.size() - s.size(), s.size(), s) == 0;
  };
  if (n.find("norm") != std::string::npos) {
    InitParam(n, t, ends(".weight") ? InitKind::kOnes : InitKind::kZeros, seed);
  } else if (n == "patch_embed.proj.weight") {
    // fan_in = C*P*P: view as [D, C*P*P].
    Tensor flat = t->Reshape({t->dim(0), -1});
    InitParam(n, &flat, InitKind::kLecunNormal, seed);
  } else if (ends("router.weight")) {
    InitParam(n, t, InitKind::kLecunNormal, seed);
  } else if (ends(".weight")) {
    InitParam(n, t, InitKind::kXavierUniform, seed);
  } else if (n.find("mlp.") != std::string::npos) {
    InitParam(n, t, InitKind::kNormal, seed, 1e-6f);
  } else {
    InitParam(n, t, InitKind::kZeros, seed);
  }
}

void InitOnHost(Tensor* t, const std::function<void(Tensor*)>& init) {
  if (t->device() == Device::kCPU) {
    init(t);
    return;
  }
  Tensor host = Tensor::Empty(t->shape(), t->dtype());
  init(&host);
  t->CopyFrom(host);
}

DenseParamStore::DenseParamStore(int64_t numel, int64_t tensors, Device device)
    : bytes_((numel + tensors * (kTensorAlignment / sizeof(float))) * sizeof(float)) {
  values_ = Storage::Allocate(bytes_, "", device);
  grads_ = Storage::Allocate(bytes_, "", device);
  Tensor::OnStorage(values_, 0, {static_cast<int64_t>(bytes_ / sizeof(float))}, DType::kF32)
      .SetZero();
  Tensor::OnStorage(grads_, 0, {static_cast<int64_t>(bytes_ / sizeof(float))}, DType::kF32)
      .SetZero();
}

void DenseParamStore::Add(const std::string& name, const Shape& shape, Tensor* value,
                          Tensor* grad) {
  const size_t bytes = NumElements(shape) * sizeof(float);
  const size_t offset = offset_;
  offset_ = (offset + bytes + kTensorAlignment - 1) / kTensorAlignment * kTensorAlignment;
  CHECK_LE(offset_, bytes_) << "dense parameter space exhausted at " << name;
  *value = Tensor::OnStorage(values_, offset, shape, DType::kF32);
  *grad = Tensor::OnStorage(grads_, offset, shape, DType::kF32);
}

Tensor DenseParamStore::flat_grads() const {
  return Tensor::OnStorage(grads_, 0, {static_cast<int64_t>(offset_ / sizeof(float))}, DType::kF32);
}

}  // namespace moerun
