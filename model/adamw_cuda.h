// AdamW on device-resident parameters (runtime/adamw_thrust.h compiled by nvcc), on the
// CUDA backend's stream. Pointers are device pointers; m and v hold fp32 or bf16 moments.
#ifndef MOERUN_MODEL_ADAMW_CUDA_H_
#define MOERUN_MODEL_ADAMW_CUDA_H_

#include <cstdint>

#include "runtime/optimizer.h"

namespace moerun {

void CudaAdamWStep(const AdamWScalars& s, bool decay, float* value, const float* grad, void* m,
                   void* v, int64_t n, bool bf16_moments);
// All the arrays in one launch (thrust_optim::DeviceAdamWMany), the same bits as
// CudaAdamWStep array by array.
void CudaAdamWStepMany(const AdamWScalars& s, const AdamWArray* arrays, int64_t count,
                       bool bf16_moments);

}  // namespace moerun

#endif  // MOERUN_MODEL_ADAMW_CUDA_H_
