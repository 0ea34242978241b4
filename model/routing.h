// Routing of one group of tokens (shared/specs/vmoe-routing.md): top-k over the gates,
// per-expert capacity, K-major slot assignment in vanilla or Batch Priority order, no
// back-filling. Pure functions over plain buffers; the MoE layer calls them per group.
#ifndef MOERUN_MODEL_ROUTING_H_
#define MOERUN_MODEL_ROUTING_H_

#include <cstdint>
#include <vector>

#include "runtime/status.h"

namespace moerun {

// cap = ceil(S*K*c/E) (or round), error if < 1, then rounded up to a multiple of
// multiple_of (0: no rounding). Computed as (S*K*c)/E in double, the reference's order.
StatusOr<int64_t> ComputeCapacity(int64_t group_size, int num_experts, int k,
                                  double capacity_factor, bool round, int multiple_of);

// Per token s: the k largest gates in descending order, ties to the lower expert index.
// expert_index and weight are [S, K]; weight is the raw gate (not renormalised).
void TopK(const float* gates, int64_t tokens, int num_experts, int k, int32_t* expert_index,
          float* weight);

// Assigns slots for one group: round j = 0..K-1 visits every token's j-th choice in
// priority order (token order, or with bpr a stable sort on descending top-1 gate, i.e.
// weight[s*K]); a visit of expert e takes slot load[e] and increments it, kept or not.
// Writes slot [S, K] (raw: >= capacity means dropped) and load[e] = visits of e (all
// choices, before capacity). `order` is scratch (resized to S).
// routed (optional, [S]): tokens with 0 are padding: they take no slot (slot INT32_MAX,
// dropped) and do not count in load or in the priority order.
void AssignSlots(const int32_t* expert_index, const float* weight, int64_t tokens, int num_experts,
                 int k, bool bpr, int32_t* slot, int32_t* load, std::vector<int32_t>* order,
                 const uint8_t* routed = nullptr);

// Routing in groups of `group_size` consecutive tokens (the assign_slots entries'): a
// group_size of 0 or above the token count means one group of all the tokens.
inline int64_t RoutingGroupSize(int64_t tokens, int64_t group_size) {
  return group_size <= 0 || group_size > tokens ? (tokens > 0 ? tokens : 1) : group_size;
}
// The number of those groups: none without tokens.
inline int64_t RoutingGroups(int64_t tokens, int64_t group_size) {
  return tokens <= 0 ? 0 : tokens / RoutingGroupSize(tokens, group_size);
}

}  // namespace moerun

#endif  // MOERUN_MODEL_ROUTING_H_
