// Parameter initialisation shared by the models: every tensor is filled from (seed, its
// global name) alone, so a model is the same for any rank count.
#ifndef MOERUN_MODEL_INIT_H_
#define MOERUN_MODEL_INIT_H_

#include <string>

#include "runtime/tensor.h"

namespace moerun {

enum class InitKind { kZeros, kOnes, kNormal, kLecunNormal, kXavierUniform };

// Fills `t` ([.., out, in] for kernels: fan_in = last dim, fan_out = the one before) from
// (seed, name). kNormal uses `std`; kLecunNormal std sqrt(1/fan_in); kXavierUniform limit
// sqrt(6/(fan_in+fan_out)).
void InitParam(const std::string& name, Tensor* t, InitKind kind, uint64_t seed, float std = 0);

}  // namespace moerun

#endif  // MOERUN_MODEL_INIT_H_
