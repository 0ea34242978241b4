// Helpers of the tests that run one MoE layer (or MoE attention layer) on two devices and
// compare them: the stand-in tests of device_ops_test.cc and the GPU tests of
// device_ops_cuda_test.cc.
#ifndef MOERUN_TESTS_MOE_PAIRS_H_
#define MOERUN_TESTS_MOE_PAIRS_H_

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <tuple>
#include <utility>
#include <vector>

#include "model/moe_attention.h"
#include "model/moe_layer.h"
#include "model/moe_plan.h"
#include "tests/op_cases.h"

namespace moerun {
namespace moe_pairs {

using TensorPairs = std::vector<std::pair<Tensor*, Tensor*>>;

// The same parameter of two layers, pairwise.
inline TensorPairs Pairs(MoeParams& a, MoeParams& b) {
  return {{&a.router_weight, &b.router_weight},
          {&a.fc1_weight, &b.fc1_weight},
          {&a.fc1_bias, &b.fc1_bias},
          {&a.fc2_weight, &b.fc2_weight},
          {&a.fc2_bias, &b.fc2_bias}};
}
inline TensorPairs Pairs(MoeAttentionParams& a, MoeAttentionParams& b) {
  return {{&a.router_weight, &b.router_weight},
          {&a.q_weight, &b.q_weight},
          {&a.o_weight, &b.o_weight},
          {&a.kv_weight, &b.kv_weight},
          {&a.kv_bias, &b.kv_bias}};
}

// Both tensors of every pair get random(shape, seed) (a host tensor), with seed, seed + 1, ..
template <typename Random>
void SameRandom(const TensorPairs& pairs, uint32_t seed, const Random& random) {
  for (const auto& [a, b] : pairs) {
    a->CopyFrom(random(a->shape(), seed++));
    b->CopyFrom(*a);
  }
}

// The nearest tie in a layer's gates [T, E] (host), relative to the gate: the smallest gap
// between a token's k-th and (k+1)-th largest gate, and between two top-1 gates of one group
// of group_size tokens (0: all; BPR's priority order). A device whose expf / logf round otherwise
// than glibc's may order gates a few ulp (~1e-7 relative) apart the other way; a routing
// comparison that fails above that is not a near tie.
inline double NearestTie(const Tensor& gates, int64_t group_size, int k) {
  const int64_t t = gates.dim(0), e = gates.dim(1);
  const float* g = gates.data<float>();
  double nearest = INFINITY;
  auto gap = [](double a, double b) { return std::fabs(a - b) / std::max(std::fabs(a), 1e-30); };
  std::vector<float> row(e), top1;
  for (int64_t i = 0; i < t; ++i) {
    std::copy_n(g + i * e, e, row.begin());
    std::sort(row.begin(), row.end(), std::greater<float>());
    if (k < e) nearest = std::min(nearest, gap(row[k - 1], row[k]));
    top1.push_back(row[0]);
    if (static_cast<int64_t>(top1.size()) == (group_size > 0 ? group_size : t) || i + 1 == t) {
      std::sort(top1.begin(), top1.end());
      for (size_t j = 1; j < top1.size(); ++j)
        nearest = std::min(nearest, gap(top1[j], top1[j - 1]));
      top1.clear();
    }
  }
  return nearest;
}

// Two layers' routing (both plans' tables on the host): the same choices, slots, rows,
// loads and dropped fractions; the combine weights within `tol`; every loss term within
// `tol` of its own magnitude, and equally active.
inline void ExpectSameRouting(const RoutingPlan& want, const RoutingPlan& got,
                              const MoeAuxLosses& want_aux, const MoeAuxLosses& got_aux,
                              double tol) {
  for (const auto& [name, a, b] :
       {std::tuple{"expert", &want.expert_index, &got.expert_index},
        std::tuple{"slot", &want.slot, &got.slot}, std::tuple{"row", &want.row, &got.row}}) {
    SCOPED_TRACE(name);
    ASSERT_EQ(a->numel(), b->numel());
    for (int64_t i = 0; i < a->numel(); ++i) {
      ASSERT_EQ(a->data<int32_t>()[i], b->data<int32_t>()[i]) << i;
    }
  }
  EXPECT_EQ(want.load, got.load);
  EXPECT_EQ(want_aux.metrics().dropped_fraction, got_aux.metrics().dropped_fraction);
  const float* wc = want.weight.data<float>();
  const float* wd = got.weight.data<float>();
  op_cases::ExpectClose(std::vector<float>(wc, wc + want.weight.numel()),
                        std::vector<float>(wd, wd + got.weight.numel()), static_cast<float>(tol));
  const MoeLosses& a = want_aux.losses();
  const MoeLosses& b = got_aux.losses();
  ASSERT_EQ(a.terms.size(), b.terms.size());
  for (size_t i = 0; i < a.terms.size(); ++i) {
    SCOPED_TRACE(a.terms[i].name);
    EXPECT_NEAR(a.terms[i].value, b.terms[i].value, tol * std::fabs(a.terms[i].value));
    EXPECT_EQ(a.terms[i].active, b.terms[i].active);
  }
}

}  // namespace moe_pairs
}  // namespace moerun

#endif  // MOERUN_TESTS_MOE_PAIRS_H_
