// Top-k, capacity and slot assignment for one routing group.
#include "model/routing.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <string>

namespace moerun {

StatusOr<int64_t> ComputeCapacity(int64_t group_size, int num_experts, int k,
                                  double capacity_factor, bool round, int multiple_of) {
  const double num_tokens = static_cast<double>(group_size * k);
  const double raw = num_tokens * capacity_factor / num_experts;
  int64_t cap = static_cast<int64_t>(round ? std::nearbyint(raw) : std::ceil(raw));
  if (cap < 1) {
    return Status::Error("capacity " + std::to_string(raw) + " = group_size " +
                         std::to_string(group_size) + " x k " + std::to_string(k) +
                         " x capacity_factor " + std::to_string(capacity_factor) +
                         " / num_experts " + std::to_string(num_experts) +
                         " rounds below 1; raise capacity_factor or group_size");
  }
  if (multiple_of > 0) cap += (multiple_of - cap % multiple_of) % multiple_of;
  return cap;
}

void TopK(const float* gates, int64_t tokens, int num_experts, int k, int32_t* expert_index,
          float* weight) {
  for (int64_t s = 0; s < tokens; ++s) {
    const float* g = gates + s * num_experts;
    int32_t* idx = expert_index + s * k;
    float* w = weight + s * k;
    // Insertion into a sorted list of k: strict '>' keeps the lower index on ties.
    int n = 0;
    for (int e = 0; e < num_experts; ++e) {
      const float v = g[e];
      if (n == k && !(v > w[k - 1])) continue;
      int pos = n < k ? n++ : k - 1;
      while (pos > 0 && v > w[pos - 1]) {
        w[pos] = w[pos - 1];
        idx[pos] = idx[pos - 1];
        --pos;
      }
      w[pos] = v;
      idx[pos] = e;
    }
  }
}

void AssignSlots(const int32_t* expert_index, const float* weight, int64_t tokens, int num_experts,
                 int k, bool bpr, int32_t* slot, int32_t* load, std::vector<int32_t>* order,
                 const uint8_t* routed) {
  order->resize(tokens);
  std::iota(order->begin(), order->end(), 0);
  if (routed != nullptr) {
    order->erase(
        std::remove_if(order->begin(), order->end(), [&](int32_t s) { return !routed[s]; }),
        order->end());
    for (int64_t s = 0; s < tokens; ++s) {
      if (!routed[s]) std::fill_n(slot + s * k, k, std::numeric_limits<int32_t>::max());
    }
  }
  if (bpr) {
    std::stable_sort(order->begin(), order->end(), [&](int32_t a, int32_t b) {
      return weight[static_cast<int64_t>(a) * k] > weight[static_cast<int64_t>(b) * k];
    });
  }
  std::fill_n(load, num_experts, 0);
  const int64_t visited = static_cast<int64_t>(order->size());
  for (int j = 0; j < k; ++j) {
    for (int64_t i = 0; i < visited; ++i) {
      const int64_t s = (*order)[i];
      const int32_t e = expert_index[s * k + j];
      slot[s * k + j] = load[e]++;
    }
  }
}

}  // namespace moerun
