// Router noise that does not depend on how tokens are spread over ranks: each value is a
// function of (seed, step, layer, global token index, expert) only, drawn with the
// counter-based Philox4x32-10 generator (Random123) and Box-Muller.
#ifndef MOERUN_MODEL_ROUTER_NOISE_H_
#define MOERUN_MODEL_ROUTER_NOISE_H_

#include <Random123/philox.h>
#include <math.h>

#include <Random123/uniform.hpp>
#include <cstdint>

#include "runtime/device_math.h"  // MOERUN_HD: the device's noise uses the same function

namespace moerun {

struct NoiseKey {
  uint64_t seed = 0;
  uint32_t step = 0;
  uint32_t layer = 0;
};

// Box-Muller on two 32-bit counters' outputs, as Random123's boxmuller (float) computes it
// on a host: (sin, cos)(pi u) * sqrt(-2 log v), u in (-1, 1), v in (0, 1]. Ours, because
// Random123's takes CUDA's sincospif whenever CUDA's headers came first, also on a host.
MOERUN_HD inline void BoxMuller(uint32_t u0, uint32_t u1, float* n0, float* n1) {
  float s, c;
  sincosf(3.1415926535897932f * r123::uneg11<float>(u0), &s, &c);
  const float r = sqrtf(-2.f * logf(r123::u01<float>(u1)));
  *n0 = s * r;
  *n1 = c * r;
}

// One token's noise added to its logits: zn[e] = z[e] + sigma * n[e] for e < num_experts
// (zn may alias z). One Philox block gives 4 normals, experts 4b .. 4b+3 of the token.
MOERUN_HD inline void AddTokenNoise(const NoiseKey& key, uint64_t token, int num_experts,
                                    float sigma, const float* z, float* zn) {
  using Rng = r123::Philox4x32;
  Rng rng;
  const Rng::key_type k = {
      {static_cast<uint32_t>(key.seed), static_cast<uint32_t>(key.seed >> 32)}};
  for (int b = 0; 4 * b < num_experts; ++b) {
    const Rng::ctr_type c = {{static_cast<uint32_t>(token),
                              static_cast<uint32_t>(token >> 32) ^ (static_cast<uint32_t>(b) << 8),
                              key.step, key.layer}};
    const Rng::ctr_type r = rng(c, k);
    float n[4];
    BoxMuller(r.v[0], r.v[1], &n[0], &n[1]);
    BoxMuller(r.v[2], r.v[3], &n[2], &n[3]);
    for (int j = 0; j < 4 && 4 * b + j < num_experts; ++j) {
      zn[4 * b + j] = z[4 * b + j] + sigma * n[j];
    }
  }
}

// zn[t, e] = z[t, e] + sigma * n[t, e] over global tokens first_token .. first_token +
// tokens - 1 (AddTokenNoise per token; zn may alias z): the CPU's add_router_noise.
void AddRouterNoise(const NoiseKey& key, int64_t first_token, int64_t tokens, int num_experts,
                    float sigma, const float* z, float* zn);

// out[t, e] = n[t, e], the standard normals alone.
void StandardNormalNoise(const NoiseKey& key, int64_t first_token, int64_t tokens, int num_experts,
                         float* out);

}  // namespace moerun

#endif  // MOERUN_MODEL_ROUTER_NOISE_H_
