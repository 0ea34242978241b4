// Counter-based router noise.
#include "model/router_noise.h"

#include <algorithm>

namespace moerun {

void AddRouterNoise(const NoiseKey& key, int64_t first_token, int64_t tokens, int num_experts,
                    float sigma, const float* z, float* zn) {
  // Every token's normals come from its own counters: the same for any thread count.
#pragma omp parallel for schedule(static) if (tokens * num_experts > 16384)
  for (int64_t t = 0; t < tokens; ++t) {
    AddTokenNoise(key, static_cast<uint64_t>(first_token + t), num_experts, sigma,
                  z + t * num_experts, zn + t * num_experts);
  }
}

void StandardNormalNoise(const NoiseKey& key, int64_t first_token, int64_t tokens, int num_experts,
                         float* out) {
  std::fill_n(out, tokens * num_experts, 0.0f);
  AddRouterNoise(key, first_token, tokens, num_experts, 1.0f, out, out);
}

}  // namespace moerun
