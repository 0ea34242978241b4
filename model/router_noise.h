// Router noise that does not depend on how tokens are spread over ranks: each value is a
// function of (seed, step, layer, global token index, expert) only, drawn with the
// counter-based Philox4x32-10 generator and Box-Muller (Random123).
#ifndef MOERUN_MODEL_ROUTER_NOISE_H_
#define MOERUN_MODEL_ROUTER_NOISE_H_

#include <cstdint>

namespace moerun {

struct NoiseKey {
  uint64_t seed = 0;
  uint32_t step = 0;
  uint32_t layer = 0;
};

// out[t, e] = standard normal for global tokens first_token .. first_token + tokens - 1.
void StandardNormalNoise(const NoiseKey& key, int64_t first_token, int64_t tokens, int num_experts,
                         float* out);

}  // namespace moerun

#endif  // MOERUN_MODEL_ROUTER_NOISE_H_
