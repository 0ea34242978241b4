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

#include "comm/loopback_communicator.h"
#include "model/moe_dispatch.h"
#include "model/moe_plan.h"
#include "model/routing.h"
#include "model/routing_thrust.h"
#include "runtime/tensor.h"

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

// Plan rows, pack and combine against the CPU plan and dispatch (moe_plan.cc,
// moe_dispatch.cc): groups, capacity drops, BPR, with and without combine weights.
TEST(ThrustRouting, RowsPackAndCombineMatchTheCpuReference) {
  struct Shape {
    int64_t tokens, group;
    int experts, k;
    double capacity_factor;
    bool bpr;
    int64_t w;
  };
  const Shape shapes[] = {{136, 68, 8, 2, 1.05, true, 16},
                          {136, 136, 8, 2, 0.5, false, 5},
                          {300, 100, 4, 3, 1.0, true, 33},
                          {514, 257, 32, 2, 1.25, true, 64}};
  LoopbackCommunicator one(0, 1);
  uint32_t seed = 100;
  for (const Shape& sh : shapes) {
    SCOPED_TRACE("T=" + std::to_string(sh.tokens) + " E=" + std::to_string(sh.experts) +
                 " k=" + std::to_string(sh.k) + " C=" + std::to_string(sh.capacity_factor));
    std::mt19937 rng(seed++);
    std::uniform_real_distribution<float> u(-1.f, 1.f);
    Tensor gates = Tensor::Empty({sh.tokens, sh.experts});
    for (int64_t i = 0; i < gates.numel(); ++i) gates.data<float>()[i] = 0.5f * (u(rng) + 1.f);
    CapacityRule rule;
    rule.capacity_factor = sh.capacity_factor;
    rule.bpr = sh.bpr;
    rule.group_size = sh.group;
    int64_t group = 0;
    StatusOr<int64_t> cap = CheckGroupsAndCapacity(rule, sh.tokens, sh.experts, sh.k, &group);
    ASSERT_TRUE(cap.ok()) << cap.status().message();
    RoutingPlan plan;
    PlanRouting(gates, rule, sh.k, group, *cap, one, &plan);
    const int64_t tk = sh.tokens * sh.k;
    // Rows from the CPU plan's experts and slots.
    const int32_t* idx = plan.expert_index.data<int32_t>();
    const int32_t* sl = plan.slot.data<int32_t>();
    thrust::device_vector<int32_t> d_idx(idx, idx + tk), d_slot(sl, sl + tk), d_row(tk, 7);
    thrust_routing::PlanRows(thrust::device, thrust::raw_pointer_cast(d_idx.data()),
                             thrust::raw_pointer_cast(d_slot.data()), sh.tokens, sh.k,
                             plan.group_size, plan.capacity, plan.rows_per_expert(),
                             thrust::raw_pointer_cast(d_row.data()));
    const int32_t* row = plan.row.data<int32_t>();
    const thrust::host_vector<int32_t> h_row = d_row;
    EXPECT_EQ(std::vector<int32_t>(h_row.begin(), h_row.end()),
              std::vector<int32_t>(row, row + tk));
    // Pack.
    std::vector<float> x(sh.tokens * sh.w);
    for (float& v : x) v = u(rng);
    Tensor buf;
    PackRows(plan, x.data(), sh.w, &buf);
    thrust::device_vector<float> d_x(x.begin(), x.end()), d_buf(buf.numel(), 0.0f);
    thrust_routing::PackRows(thrust::device, thrust::raw_pointer_cast(d_row.data()),
                             thrust::raw_pointer_cast(d_x.data()), sh.tokens, sh.k, sh.w,
                             thrust::raw_pointer_cast(d_buf.data()));
    const thrust::host_vector<float> h_buf = d_buf;
    EXPECT_EQ(std::vector<float>(h_buf.begin(), h_buf.end()),
              std::vector<float>(buf.data<float>(), buf.data<float>() + buf.numel()));
    // Combine of expert outputs (random rows), with the gate weights and without.
    std::vector<float> y(buf.numel());
    for (float& v : y) v = u(rng);
    thrust::device_vector<float> d_y(y.begin(), y.end()),
        d_w(plan.weight.data<float>(), plan.weight.data<float>() + tk);
    for (bool weighted : {true, false}) {
      std::vector<float> out(sh.tokens * sh.w, -1);
      GatherKeptRows(y.data(), row, weighted ? plan.weight.data<float>() : nullptr, sh.tokens, sh.k,
                     sh.w, out.data());
      thrust::device_vector<float> d_out(out.size(), -2);
      thrust_routing::GatherKeptRows(thrust::device, thrust::raw_pointer_cast(d_y.data()),
                                     thrust::raw_pointer_cast(d_row.data()),
                                     weighted ? thrust::raw_pointer_cast(d_w.data()) : nullptr,
                                     sh.tokens, sh.k, sh.w, thrust::raw_pointer_cast(d_out.data()));
      const thrust::host_vector<float> h_out = d_out;
      EXPECT_EQ(std::vector<float>(h_out.begin(), h_out.end()), out) << "weighted " << weighted;
    }
  }
}

}  // namespace
}  // namespace moerun
