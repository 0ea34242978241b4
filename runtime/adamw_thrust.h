// The AdamW update (runtime/optimizer.h's AdamW::Step, fp32 or bf16 moments) as a Thrust
// algorithm for device-resident parameters: nvcc compiles it for the GPU
// (CudaAdamWStep), CI compiles it for the host and checks it against AdamW::Step bit for
// bit (tests/device_ops_test.cc). On the GPU nvcc may contract a*b+c into FMAs, so results
// there agree to rounding, not bitwise.
#ifndef MOERUN_RUNTIME_ADAMW_THRUST_H_
#define MOERUN_RUNTIME_ADAMW_THRUST_H_

#include <thrust/for_each.h>
#include <thrust/iterator/counting_iterator.h>

#include <cmath>
#include <cstdint>

#include "runtime/device_math.h"
#include "runtime/optimizer.h"

namespace moerun {
namespace thrust_optim {

// One element: g = grad * scale; m, v updated (stored as fp32, or as bf16 bits when
// bf16_moments); value -= lr (m^ / (sqrt(v^) + eps) + wd value).
struct AdamWFunctor {
  AdamWScalars s;
  float weight_decay;
  float* value;
  const float* grad;
  void* m;
  void* v;
  bool bf16_moments;
  MOERUN_HD void operator()(int64_t j) const {
    const float g = grad[j] * s.grad_scale;
    float mj, vj;
    if (bf16_moments) {
      uint16_t* mb = static_cast<uint16_t*>(m);
      uint16_t* vb = static_cast<uint16_t*>(v);
      mj = s.b1 * FromBF16Bits(mb[j]) + (1.0f - s.b1) * g;
      vj = s.b2 * FromBF16Bits(vb[j]) + (1.0f - s.b2) * g * g;
      mb[j] = ToBF16Bits(mj);
      vb[j] = ToBF16Bits(vj);
    } else {
      float* mf = static_cast<float*>(m);
      float* vf = static_cast<float*>(v);
      mj = s.b1 * mf[j] + (1.0f - s.b1) * g;
      vj = s.b2 * vf[j] + (1.0f - s.b2) * g * g;
      mf[j] = mj;
      vf[j] = vj;
    }
    const float update = (mj * s.c1) / (sqrtf(vj * s.c2) + s.eps);
    value[j] -= s.lr * (update + weight_decay * value[j]);
  }
};

// `decay`: whether weight decay applies to this parameter (AdamW's OptimizerParam::decay).
template <typename Policy>
void AdamWStep(const Policy& policy, const AdamWScalars& s, bool decay, float* value,
               const float* grad, void* m, void* v, int64_t n, bool bf16_moments) {
  if (n <= 0) return;
  thrust::for_each(policy, thrust::counting_iterator<int64_t>(0),
                   thrust::counting_iterator<int64_t>(n),
                   AdamWFunctor{s, decay ? s.weight_decay : 0.0f, value, grad, m, v, bf16_moments});
}

}  // namespace thrust_optim
}  // namespace moerun

#endif  // MOERUN_RUNTIME_ADAMW_THRUST_H_
