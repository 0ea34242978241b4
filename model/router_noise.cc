// Counter-based router noise.
#include "model/router_noise.h"

#include <Random123/philox.h>

#include <Random123/boxmuller.hpp>

namespace moerun {

void StandardNormalNoise(const NoiseKey& key, int64_t first_token, int64_t tokens, int num_experts,
                         float* out) {
  using Rng = r123::Philox4x32;
  Rng rng;
  const Rng::key_type k = {
      {static_cast<uint32_t>(key.seed), static_cast<uint32_t>(key.seed >> 32)}};
  // Every token's normals come from its own counters: the same for any thread count.
#pragma omp parallel for schedule(static) if (tokens * num_experts > 16384)
  for (int64_t t = 0; t < tokens; ++t) {
    const uint64_t token = static_cast<uint64_t>(first_token + t);
    // One Philox block gives 4 normals: experts 4b .. 4b+3 of this token.
    for (int b = 0; 4 * b < num_experts; ++b) {
      const Rng::ctr_type c = {
          {static_cast<uint32_t>(token),
           static_cast<uint32_t>(token >> 32) ^ (static_cast<uint32_t>(b) << 8), key.step,
           key.layer}};
      const Rng::ctr_type r = rng(c, k);
      const r123::float2 n01 = r123::boxmuller(r.v[0], r.v[1]);
      const r123::float2 n23 = r123::boxmuller(r.v[2], r.v[3]);
      const float n[4] = {n01.x, n01.y, n23.x, n23.y};
      for (int j = 0; j < 4 && 4 * b + j < num_experts; ++j) {
        out[t * num_experts + 4 * b + j] = n[j];
      }
    }
  }
}

}  // namespace moerun
