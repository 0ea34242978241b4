// The GPU backend's Thrust routing kernels (model/routing_thrust.h) against the CPU
// reference (model/routing.h), bit for bit. On CI the Thrust source runs on the host
// (THRUST_DEVICE_SYSTEM_CPP); with nvcc the same table runs on a CUDA device.
#include <gtest/gtest.h>
#include <thrust/device_vector.h>
#include <thrust/execution_policy.h>
#include <thrust/host_vector.h>

#include <random>
#include <string>
#include <vector>

#include "model/routing.h"
#include "model/routing_thrust.h"

namespace moerun {
namespace {

struct Case {
  int64_t tokens;
  int experts, k;
  bool bpr, padding;
  int levels;  // gates quantised to this many values (ties), 0: continuous
};

std::string Name(const Case& c) {
  return "S=" + std::to_string(c.tokens) + " E=" + std::to_string(c.experts) +
         " k=" + std::to_string(c.k) + (c.bpr ? " bpr" : " vanilla") +
         (c.padding ? " padded" : "") + " levels=" + std::to_string(c.levels);
}

std::vector<float> Gates(const Case& c, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(0.f, 1.f);
  std::vector<float> g(c.tokens * c.experts);
  for (float& v : g) v = c.levels > 0 ? std::floor(u(rng) * c.levels) / c.levels : u(rng);
  return g;
}

TEST(ThrustRouting, TopKAndSlotsMatchTheCpuReference) {
  const std::vector<Case> cases = {
      {1, 2, 1, false, false, 0},    {17, 4, 2, false, false, 0},  {17, 4, 2, true, false, 0},
      {136, 8, 2, true, false, 0},   {136, 8, 2, false, false, 3}, {136, 8, 2, true, false, 3},
      {257, 32, 2, true, true, 0},   {300, 8, 1, true, true, 2},   {300, 8, 3, false, true, 4},
      {1000, 16, 4, true, false, 5}, {64, 3, 3, true, false, 1},   {5000, 64, 2, true, true, 0},
  };
  uint32_t seed = 1;
  for (const Case& c : cases) {
    SCOPED_TRACE(Name(c));
    const std::vector<float> gates = Gates(c, seed++);
    std::vector<uint8_t> routed(c.tokens, 1);
    if (c.padding) {
      for (int64_t s = 0; s < c.tokens; ++s) routed[s] = (s % 7 == 3) ? 0 : 1;
    }
    // CPU reference.
    std::vector<int32_t> idx(c.tokens * c.k), slot(c.tokens * c.k), load(c.experts), order;
    std::vector<float> w(c.tokens * c.k);
    TopK(gates.data(), c.tokens, c.experts, c.k, idx.data(), w.data());
    AssignSlots(idx.data(), w.data(), c.tokens, c.experts, c.k, c.bpr, slot.data(), load.data(),
                &order, c.padding ? routed.data() : nullptr);
    // Thrust, in the device system's memory.
    thrust::device_vector<float> d_gates(gates.begin(), gates.end()), d_w(c.tokens * c.k), keys_w;
    thrust::device_vector<int32_t> d_idx(c.tokens * c.k), d_slot(c.tokens * c.k, -1),
        d_load(c.experts, -1), s_order, s_keys, s_rank, s_cum;
    thrust::device_vector<int64_t> s_visit;
    thrust::device_vector<uint8_t> d_routed(routed.begin(), routed.end());
    thrust_routing::TopK(thrust::device, thrust::raw_pointer_cast(d_gates.data()), c.tokens,
                         c.experts, c.k, thrust::raw_pointer_cast(d_idx.data()),
                         thrust::raw_pointer_cast(d_w.data()));
    thrust_routing::AssignSlots(thrust::device, thrust::raw_pointer_cast(d_idx.data()),
                                thrust::raw_pointer_cast(d_w.data()), c.tokens, c.experts, c.k,
                                c.bpr, thrust::raw_pointer_cast(d_slot.data()),
                                thrust::raw_pointer_cast(d_load.data()),
                                c.padding ? thrust::raw_pointer_cast(d_routed.data()) : nullptr,
                                s_order, s_keys, s_rank, s_visit, keys_w, s_cum);
    const thrust::host_vector<int32_t> h_idx = d_idx, h_slot = d_slot, h_load = d_load;
    const thrust::host_vector<float> h_w = d_w;
    EXPECT_EQ(std::vector<int32_t>(h_idx.begin(), h_idx.end()), idx);
    EXPECT_EQ(std::vector<float>(h_w.begin(), h_w.end()), w);
    EXPECT_EQ(std::vector<int32_t>(h_slot.begin(), h_slot.end()), slot);
    EXPECT_EQ(std::vector<int32_t>(h_load.begin(), h_load.end()), load);
  }
}

}  // namespace
}  // namespace moerun
