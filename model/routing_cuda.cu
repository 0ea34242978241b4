// nvcc instantiation of the Thrust routing kernels for CUDA devices.
#include <thrust/device_vector.h>
#include <thrust/execution_policy.h>

#include "model/routing_cuda.h"
#include "model/routing_thrust.h"

namespace moerun {

struct CudaRoutingScratch::Impl {
  thrust::device_vector<int32_t> order, keys, rank, cumulative;
  thrust::device_vector<int64_t> visit;
  thrust::device_vector<float> keys_w;
};

CudaRoutingScratch::CudaRoutingScratch() : impl_(new Impl()) {}
CudaRoutingScratch::~CudaRoutingScratch() = default;

void CudaTopK(const float* gates, int64_t tokens, int num_experts, int k, int32_t* expert_index,
              float* weight) {
  thrust_routing::TopK(thrust::device, gates, tokens, num_experts, k, expert_index, weight);
}

void CudaAssignSlots(const int32_t* expert_index, const float* weight, int64_t tokens,
                     int num_experts, int k, bool bpr, int32_t* slot, int32_t* load,
                     const uint8_t* routed, CudaRoutingScratch* scratch) {
  CudaRoutingScratch::Impl& s = *scratch->impl();
  thrust_routing::AssignSlots(thrust::device, expert_index, weight, tokens, num_experts, k, bpr,
                              slot, load, routed, s.order, s.keys, s.rank, s.visit, s.keys_w,
                              s.cumulative);
}

}  // namespace moerun
