// The routing steps (top-k of the gates, capacity slots in vanilla or Batch Priority order,
// plan rows) and the pack / combine of token rows as Thrust algorithms with MOERUN_HD functors, for
// the GPU backend. The same source compiles with nvcc for a CUDA device and with the host compiler
// against the CCCL headers (THRUST_DEVICE_SYSTEM=THRUST_DEVICE_SYSTEM_CPP or _OMP), where
// tests/device_ops_test.cc checks it bit for bit against model/routing.h, the CPU
// reference. Semantics are routing.h's exactly:
//   TopK: per token the k largest gates in descending order, ties to the lower expert.
//   AssignSlots: round j = 0..k-1 visits every routed token's j-th choice in priority order
//     (token order, or with BPR a stable sort on descending top-1 gate); a visit of expert e
//     takes slot load[e] and increments it. Padding tokens (routed[s] == 0) take no slot
//     (INT32_MAX) and do not count. load[e] = visits of e. AssignSlotsInGroups does the
//     same for every group of group_size consecutive tokens at once (one sort over all of
//     them), load [groups, E].
// Arguments are pointers in the policy's memory space (device pointers on a GPU); the
// vectors are scratch of that space (thrust::device_vector), reused across calls.
#ifndef MOERUN_MODEL_ROUTING_THRUST_H_
#define MOERUN_MODEL_ROUTING_THRUST_H_

#include <thrust/adjacent_difference.h>
#include <thrust/binary_search.h>
#include <thrust/copy.h>
#include <thrust/device_vector.h>
#include <thrust/fill.h>
#include <thrust/for_each.h>
#include <thrust/functional.h>
#include <thrust/gather.h>
#include <thrust/iterator/constant_iterator.h>
#include <thrust/iterator/counting_iterator.h>
#include <thrust/iterator/transform_iterator.h>
#include <thrust/scan.h>
#include <thrust/scatter.h>
#include <thrust/sequence.h>
#include <thrust/sort.h>
#include <thrust/transform.h>

#include <cstdint>

#include "model/routing.h"        // RoutingGroups
#include "runtime/device_math.h"  // MOERUN_HD: functors for the device under nvcc

namespace moerun {
namespace thrust_routing {

// One token's k largest gates by insertion (k is small: 1-8).
struct TopKFunctor {
  const float* gates;
  int num_experts, k;
  int32_t* expert_index;
  float* weight;
  MOERUN_HD void operator()(int64_t s) const {
    const float* g = gates + s * num_experts;
    int32_t* idx = expert_index + s * k;
    float* w = weight + s * k;
    int filled = 0;
    for (int e = 0; e < num_experts; ++e) {
      const float v = g[e];
      // Strictly greater moves ahead: an equal gate stays behind the lower expert index.
      int pos = filled < k ? filled : k;
      while (pos > 0 && v > w[pos - 1]) --pos;
      if (pos >= k) continue;
      const int last = filled < k ? filled : k - 1;
      for (int q = last; q > pos; --q) {
        w[q] = w[q - 1];
        idx[q] = idx[q - 1];
      }
      w[pos] = v;
      idx[pos] = e;
      if (filled < k) ++filled;
    }
  }
};

template <typename Policy>
void TopK(const Policy& policy, const float* gates, int64_t tokens, int num_experts, int k,
          int32_t* expert_index, float* weight) {
  thrust::for_each(policy, thrust::counting_iterator<int64_t>(0),
                   thrust::counting_iterator<int64_t>(tokens),
                   TopKFunctor{gates, num_experts, k, expert_index, weight});
}

struct Top1Key {
  const float* weight;
  int k;
  MOERUN_HD float operator()(int32_t s) const { return weight[static_cast<int64_t>(s) * k]; }
};

// Visit v = j * n + i (round j, i-th token in priority order): its expert.
struct VisitExpert {
  const int32_t* order;
  const int32_t* expert_index;
  int64_t n;
  int k;
  MOERUN_HD int32_t operator()(int64_t v) const {
    const int64_t j = v / n, s = order[v % n];
    return expert_index[s * k + j];
  }
};

// The same visit's key when groups are assigned at once: group * E + expert, with the
// token's group from its index.
struct VisitGroupExpert {
  const int32_t* order;
  const int32_t* expert_index;
  int64_t n;
  int k;
  int64_t group_size;
  int num_experts;
  MOERUN_HD int32_t operator()(int64_t v) const {
    const int64_t j = v / n, s = order[v % n];
    return static_cast<int32_t>((s / group_size) * num_experts + expert_index[s * k + j]);
  }
};

// Visit v -> its place in the [S, K] slot array.
struct VisitSlotIndex {
  const int32_t* order;
  int64_t n;
  int k;
  MOERUN_HD int64_t operator()(int64_t v) const {
    return static_cast<int64_t>(order[v % n]) * k + v / n;
  }
};

struct IsRouted {
  const uint8_t* routed;
  MOERUN_HD bool operator()(int32_t s) const { return routed[s] != 0; }
};

// Scratch vectors only grow (a vector that grows constructs its new elements, on a CUDA
// device with a blocking wait; see routing_cuda.cu): the algorithms take their first n.
template <typename Vec>
void GrowTo(Vec& v, int64_t n) {
  if (static_cast<int64_t>(v.size()) < n) v.resize(n);
}

// Whether AssignSlotsInGroups over `tokens` tokens in groups of `group_size` (0: one group)
// would grow any of its scratch vectors.
template <typename Vec32, typename Vec64, typename VecF>
bool AssignSlotsScratchGrows(int64_t tokens, int num_experts, int k, bool bpr, const Vec32& order,
                             const Vec32& keys_e, const Vec32& rank, const Vec64& visit,
                             const VecF& keys_w, const Vec32& cumulative, int64_t group_size = 0) {
  const auto small = [](const auto& v, int64_t n) { return static_cast<int64_t>(v.size()) < n; };
  const int64_t groups = RoutingGroups(tokens, group_size);
  return small(order, tokens) || small(keys_e, tokens * k) || small(rank, tokens * k) ||
         small(visit, tokens * k) || (bpr && small(keys_w, tokens)) ||
         small(cumulative, groups * num_experts);
}

// AssignSlots for every group of `group_size` consecutive tokens (0: one group of all;
// tokens a multiple of it), load [groups, E], in one pass: the routed tokens in token order
// (with BPR stably sorted on descending top-1 gate) give every visit its round-major place,
// and the visits of one (group, expert) key keep that order, which restricted to the
// group's tokens is the group's own priority order.
template <typename Policy, typename Vec32, typename Vec64, typename VecF>
void AssignSlotsInGroups(const Policy& policy, const int32_t* expert_index, const float* weight,
                         int64_t tokens, int64_t group_size, int num_experts, int k, bool bpr,
                         int32_t* slot, int32_t* load, const uint8_t* routed, Vec32& order,
                         Vec32& keys_e, Vec32& rank, Vec64& visit, VecF& keys_w,
                         Vec32& cumulative) {
  const int64_t groups = RoutingGroups(tokens, group_size);
  group_size = RoutingGroupSize(tokens, group_size);
  const int64_t keys = groups * num_experts;
  // The routed tokens in token order.
  GrowTo(order, tokens);
  int64_t n = tokens;
  if (routed != nullptr) {
    thrust::fill(policy, slot, slot + tokens * k, INT32_MAX);
    auto end = thrust::copy_if(policy, thrust::counting_iterator<int32_t>(0),
                               thrust::counting_iterator<int32_t>(static_cast<int32_t>(tokens)),
                               order.begin(), IsRouted{routed});
    n = end - order.begin();
  } else {
    thrust::sequence(policy, order.begin(), order.begin() + tokens);
  }
  thrust::fill(policy, load, load + keys, 0);
  if (n == 0) return;
  int32_t* ord = thrust::raw_pointer_cast(order.data());
  GrowTo(keys_e, tokens * k);
  if (bpr) {
    // Stable sort on descending top-1 gate: equal gates keep token order.
    GrowTo(keys_w, tokens);
    thrust::transform(policy, order.begin(), order.begin() + n, keys_w.begin(), Top1Key{weight, k});
    thrust::stable_sort_by_key(policy, keys_w.begin(), keys_w.begin() + n, order.begin(),
                               thrust::greater<float>());
  }
  // Visits in round-major priority order, stably grouped by (group, expert): a visit's slot
  // is its rank within its key's visits.
  const int64_t visits = n * k;
  GrowTo(visit, tokens * k);
  GrowTo(rank, tokens * k);
  const auto keys_end = keys_e.begin() + visits;
  if (groups > 1) {
    thrust::transform(policy, thrust::counting_iterator<int64_t>(0),
                      thrust::counting_iterator<int64_t>(visits), keys_e.begin(),
                      VisitGroupExpert{ord, expert_index, n, k, group_size, num_experts});
  } else {
    thrust::transform(policy, thrust::counting_iterator<int64_t>(0),
                      thrust::counting_iterator<int64_t>(visits), keys_e.begin(),
                      VisitExpert{ord, expert_index, n, k});
  }
  thrust::sequence(policy, visit.begin(), visit.begin() + visits);
  thrust::stable_sort_by_key(policy, keys_e.begin(), keys_end, visit.begin());
  thrust::exclusive_scan_by_key(policy, keys_e.begin(), keys_end,
                                thrust::make_constant_iterator<int32_t>(1), rank.begin());
  // slot[order[v % n] * k + v / n] = rank.
  thrust::scatter(policy, rank.begin(), rank.begin() + visits,
                  thrust::make_transform_iterator(visit.begin(), VisitSlotIndex{ord, n, k}), slot);
  // load[key] = the number of visits of key: differences of the upper bounds of
  // 0..keys-1 in the sorted keys.
  GrowTo(cumulative, keys);
  thrust::upper_bound(policy, keys_e.begin(), keys_end, thrust::counting_iterator<int32_t>(0),
                      thrust::counting_iterator<int32_t>(static_cast<int32_t>(keys)),
                      cumulative.begin());
  thrust::adjacent_difference(policy, cumulative.begin(), cumulative.begin() + keys, load);
}

// One group of all `tokens`: load [E].
template <typename Policy, typename Vec32, typename Vec64, typename VecF>
void AssignSlots(const Policy& policy, const int32_t* expert_index, const float* weight,
                 int64_t tokens, int num_experts, int k, bool bpr, int32_t* slot, int32_t* load,
                 const uint8_t* routed, Vec32& order, Vec32& keys_e, Vec32& rank, Vec64& visit,
                 VecF& keys_w, Vec32& cumulative) {
  AssignSlotsInGroups(policy, expert_index, weight, tokens, tokens, num_experts, k, bpr, slot, load,
                      routed, order, keys_e, rank, visit, keys_w, cumulative);
}

// Plan rows: row[i] = e * rows_per_expert + group * capacity + slot for a kept choice i of
// token i / k (group = token / group_size), -1 when slot >= capacity (moe_plan.cc).
struct RowFunctor {
  const int32_t* expert_index;
  const int32_t* slot;
  int64_t k, group_size, capacity, rows_per_expert;
  int32_t* row;
  MOERUN_HD void operator()(int64_t i) const {
    const int64_t g = (i / k) / group_size;
    row[i] = slot[i] >= capacity
                 ? -1
                 : static_cast<int32_t>(expert_index[i] * rows_per_expert + g * capacity + slot[i]);
  }
};

template <typename Policy>
void PlanRows(const Policy& policy, const int32_t* expert_index, const int32_t* slot,
              int64_t tokens, int64_t k, int64_t group_size, int64_t capacity,
              int64_t rows_per_expert, int32_t* row) {
  thrust::for_each(policy, thrust::counting_iterator<int64_t>(0),
                   thrust::counting_iterator<int64_t>(tokens * k),
                   RowFunctor{expert_index, slot, k, group_size, capacity, rows_per_expert, row});
}

// Pack: buf row row[i] = x[i / k] for every kept choice (the caller zeroes buf first).
// One work item per (choice, column).
struct PackFunctor {
  const int32_t* row;
  const float* x;
  int64_t k, w;
  float* buf;
  MOERUN_HD void operator()(int64_t e) const {
    const int64_t i = e / w, c = e % w;
    const int32_t r = row[i];
    if (r >= 0) buf[static_cast<int64_t>(r) * w + c] = x[(i / k) * w + c];
  }
};

template <typename Policy>
void PackRows(const Policy& policy, const int32_t* row, const float* x, int64_t tokens, int64_t k,
              int64_t w, float* buf) {
  thrust::for_each(policy, thrust::counting_iterator<int64_t>(0),
                   thrust::counting_iterator<int64_t>(tokens * k * w),
                   PackFunctor{row, x, k, w, buf});
}

// Combine: out[t, c] = sum over kept choices j (in order) of weight[t, j] * buf[row[t, j], c]
// (weight null: 1); 0 for a token with no kept choice. One work item per (token, column).
struct CombineFunctor {
  const float* buf;
  const int32_t* row;
  const float* weight;
  int64_t k, w;
  float* out;
  MOERUN_HD void operator()(int64_t e) const {
    const int64_t t = e / w, c = e % w;
    float acc = 0.0f;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t i = t * k + j;
      if (row[i] < 0) continue;
      const float g = weight != nullptr ? weight[i] : 1.0f;
      acc += g * buf[static_cast<int64_t>(row[i]) * w + c];
    }
    out[e] = acc;
  }
};

template <typename Policy>
void GatherKeptRows(const Policy& policy, const float* buf, const int32_t* row, const float* weight,
                    int64_t tokens, int64_t k, int64_t w, float* out) {
  thrust::for_each(policy, thrust::counting_iterator<int64_t>(0),
                   thrust::counting_iterator<int64_t>(tokens * w),
                   CombineFunctor{buf, row, weight, k, w, out});
}

// Combine backward (the caller zeroes d_buf first): per kept choice i = (t, j),
// d_buf[row[i]] = weight[i] * dy[t] and d_weight[i] = <dy[t], buf[row[i]]> summed in double
// (LaneDotF64's order); d_weight[i] = 0 for a dropped choice. Two passes: d_buf one work
// item per (choice, column), so that neighbouring items write neighbouring floats (on a GPU,
// one row per item would scatter each warp's stores over 32 rows); then d_weight one item
// per choice. Kept rows are distinct, so no two items write the same d_buf float.
struct CombineBackwardRowsFunctor {
  const int32_t* row;
  const float* weight;
  const float* dy;
  int64_t k, w;
  float* d_buf;
  MOERUN_HD void operator()(int64_t e) const {
    const int64_t i = e / w, c = e % w;
    if (row[i] < 0) return;
    d_buf[static_cast<int64_t>(row[i]) * w + c] = weight[i] * dy[(i / k) * w + c];
  }
};

struct CombineBackwardWeightFunctor {
  const float* buf;
  const int32_t* row;
  const float* dy;
  int64_t k, w;
  float* d_weight;
  MOERUN_HD void operator()(int64_t i) const {
    d_weight[i] = row[i] < 0 ? 0.0f
                             : static_cast<float>(LaneDotF64(
                                   dy + (i / k) * w, buf + static_cast<int64_t>(row[i]) * w, w));
  }
};

template <typename Policy>
void GatherKeptRowsBackward(const Policy& policy, const float* buf, const int32_t* row,
                            const float* weight, const float* dy, int64_t tokens, int64_t k,
                            int64_t w, float* d_buf, float* d_weight) {
  thrust::for_each(policy, thrust::counting_iterator<int64_t>(0),
                   thrust::counting_iterator<int64_t>(tokens * k * w),
                   CombineBackwardRowsFunctor{row, weight, dy, k, w, d_buf});
  thrust::for_each(policy, thrust::counting_iterator<int64_t>(0),
                   thrust::counting_iterator<int64_t>(tokens * k),
                   CombineBackwardWeightFunctor{buf, row, dy, k, w, d_weight});
}

}  // namespace thrust_routing
}  // namespace moerun

#endif  // MOERUN_MODEL_ROUTING_THRUST_H_
