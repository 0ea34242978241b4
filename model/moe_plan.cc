// Routing plan: top-k, slots, capacity, rows.
#include "model/moe_plan.h"

#include <algorithm>
#include <string>

#include "model/routing.h"

namespace moerun {
namespace {

void Ensure(Tensor* t, const Shape& shape, DType dtype) {
  if (!t->defined() || t->shape() != shape || t->dtype() != dtype) *t = Tensor::Empty(shape, dtype);
}

}  // namespace

StatusOr<int64_t> CheckGroupsAndCapacity(const CapacityRule& rule, int64_t t, int num_experts,
                                         int k, int64_t* group_size) {
  const int64_t s = rule.group_size > 0 ? rule.group_size : t;
  if (s == 0 || t % s != 0) {
    return Status::Error("group_size " + std::to_string(s) + " does not divide the " +
                         std::to_string(t) + " tokens this rank holds; choose a group size " +
                         "that divides the tokens per rank (images per rank x tokens per image)");
  }
  *group_size = s;
  if (rule.capacity > 0) return rule.capacity;
  if (rule.capacity_factor <= 0) return int64_t{0};
  return ComputeCapacity(s, num_experts, k, rule.capacity_factor, rule.round, rule.multiple_of);
}

void PlanRouting(const Tensor& gates, const CapacityRule& rule, int k, int64_t s,
                 int64_t fixed_capacity, Communicator& world, RoutingPlan* plan,
                 const uint8_t* routed) {
  const int64_t t = gates.dim(0), e_count = gates.dim(1);
  RoutingPlan& p = *plan;
  SetPlanLayout(&p, t, k, e_count, s, fixed_capacity);
  p.routed = routed;
  Ensure(&p.expert_index, {t, k}, DType::kI32);
  Ensure(&p.slot, {t, k}, DType::kI32);
  Ensure(&p.weight, {t, k}, DType::kF32);
  p.load.assign(p.groups * e_count, 0);
  std::vector<int32_t> order;
  for (int64_t g = 0; g < p.groups; ++g) {
    const int64_t off = g * s;
    TopK(gates.data<float>() + off * e_count, s, static_cast<int>(e_count), k,
         p.expert_index.data<int32_t>() + off * k, p.weight.data<float>() + off * k);
    AssignSlots(p.expert_index.data<int32_t>() + off * k, p.weight.data<float>() + off * k, s,
                static_cast<int>(e_count), k, rule.bpr, p.slot.data<int32_t>() + off * k,
                p.load.data() + g * e_count, &order, routed != nullptr ? routed + off : nullptr);
  }
  if (fixed_capacity > 0) {
    p.capacity = fixed_capacity;
  } else {
    p.capacity = DroplessCapacity(p.load.data(), static_cast<int64_t>(p.load.size()), world);
  }
  Ensure(&p.row, {t, k}, DType::kI32);
  PlanRows(p.expert_index.data<int32_t>(), p.slot.data<int32_t>(), t, k, s, p.capacity,
           p.rows_per_expert(), p.row.data<int32_t>());
}

int64_t DroplessCapacity(const int32_t* load, int64_t n, Communicator& world) {
  int64_t max_load = n > 0 ? *std::max_element(load, load + n) : 0;
  world.AllReduce(&max_load, 1, DType::kI64, ReduceOp::kMax);
  return std::max<int64_t>(max_load, 1);
}

void SetPlanLayout(RoutingPlan* plan, int64_t tokens, int64_t k, int64_t num_experts,
                   int64_t group_size, int64_t capacity) {
  plan->tokens = tokens;
  plan->k = k;
  plan->num_experts = num_experts;
  plan->group_size = group_size;
  plan->groups = tokens / group_size;
  plan->capacity = capacity;
}

void PlanRows(const int32_t* expert_index, const int32_t* slot, int64_t tokens, int64_t k,
              int64_t group_size, int64_t capacity, int64_t rows_per_expert, int32_t* row) {
  for (int64_t i = 0; i < tokens * k; ++i) {
    const int64_t g = (i / k) / group_size;
    row[i] = slot[i] >= capacity
                 ? -1
                 : static_cast<int32_t>(expert_index[i] * rows_per_expert + g * capacity + slot[i]);
  }
}

}  // namespace moerun
