// The routing plan of one MoE forward: for every token's k choices the expert, the slot
// in that expert's per-group buffer (vanilla or Batch Priority order, no back-filling),
// whether it was kept under the capacity, its combine weight (the raw gate) and its row in
// the [E, groups * capacity] dispatch buffers. The capacity is fixed per group
// (shared/specs/vmoe-routing.md) or, dropless, the largest per-expert load of any group
// on any rank (agreed over `world`).
#ifndef MOERUN_MODEL_MOE_PLAN_H_
#define MOERUN_MODEL_MOE_PLAN_H_

#include <cstdint>
#include <vector>

#include "comm/communicator.h"
#include "runtime/status.h"
#include "runtime/tensor.h"

namespace moerun {

struct CapacityRule {
  double capacity_factor = 1.05;  // 0: dropless
  int64_t capacity = 0;           // > 0: fixed capacity (capacity_factor ignored)
  int multiple_of = 4;
  bool round = false;  // round() instead of ceil()
  bool bpr = true;
  int64_t group_size = 0;  // 0: all local tokens form one group
};

struct RoutingPlan {
  int64_t tokens = 0, k = 0, num_experts = 0;
  int64_t group_size = 0, groups = 0;  // local groups of group_size tokens
  int64_t capacity = 0;                // per expert per group
  Tensor expert_index, slot;           // [T, K] int32; slot >= capacity: dropped
  Tensor weight;                       // [T, K] raw gate of each choice
  Tensor row;                          // [T, K] int32: row in [E, groups * capacity], -1 dropped
  std::vector<int32_t> load;           // [groups, E] visits before capacity
  const uint8_t* routed = nullptr;     // [T] or null: tokens with 0 are padding (never routed)

  int64_t rows_per_expert() const { return groups * capacity; }
};

// The group size and the fixed capacity (0 when dropless) for T local tokens; an error
// when the group size does not divide T or the capacity rounds below 1. Local: no
// communication, so ranks can agree on the status before any collective.
StatusOr<int64_t> CheckGroupsAndCapacity(const CapacityRule& rule, int64_t tokens, int num_experts,
                                         int k, int64_t* group_size);

// Builds the plan from gates [T, E]. Dropless plans all-reduce the largest load over
// `world` (every rank must call it).
// routed (optional, [T]): padding tokens (0) take no slot and are dropped (evaluation pads
// its last batch with them).
void PlanRouting(const Tensor& gates, const CapacityRule& rule, int k, int64_t group_size,
                 int64_t fixed_capacity, Communicator& world, RoutingPlan* plan,
                 const uint8_t* routed = nullptr);

// A dropless plan's capacity: the largest of the `n` per-(group, expert) loads on any rank
// (all-reduced over `world`: every rank must call it), at least 1.
int64_t DroplessCapacity(const int32_t* load, int64_t n, Communicator& world);

// Sets the plan's sizes: tokens, k, experts, groups of group_size tokens, capacity (its
// tables are left as they are).
void SetPlanLayout(RoutingPlan* plan, int64_t tokens, int64_t k, int64_t num_experts,
                   int64_t group_size, int64_t capacity);

// The plan's rows from its experts and slots [tokens, k]: row[i] = e * rows_per_expert +
// group * capacity + slot for a kept choice i of token i / k (group = token / group_size),
// -1 when slot >= capacity (dropped). The CPU's plan_rows op.
void PlanRows(const int32_t* expert_index, const int32_t* slot, int64_t tokens, int64_t k,
              int64_t group_size, int64_t capacity, int64_t rows_per_expert, int32_t* row);

}  // namespace moerun

#endif  // MOERUN_MODEL_MOE_PLAN_H_
