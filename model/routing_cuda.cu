// nvcc instantiation of the Thrust routing kernels for CUDA devices.
#include <thrust/device_vector.h>
#include <thrust/execution_policy.h>

#include "model/ops_cuda.h"
#include "model/routing_cuda.h"
#include "model/routing_thrust.h"
#include "runtime/backend.h"

namespace moerun {
// Each entry point drains the backend's stream first (DrainCudaBackendStream: thrust::device
// ends in a blocking sync).

struct CudaRoutingScratch::Impl {
  thrust::device_vector<int32_t> order, keys, rank, cumulative;
  thrust::device_vector<int64_t> visit;
  thrust::device_vector<float> keys_w;
};

CudaRoutingScratch::CudaRoutingScratch() : impl_(new Impl()) {}
CudaRoutingScratch::~CudaRoutingScratch() = default;

void CudaTopK(const float* gates, int64_t tokens, int num_experts, int k, int32_t* expert_index,
              float* weight) {
  DrainCudaBackendStream();
  thrust_routing::TopK(thrust::device, gates, tokens, num_experts, k, expert_index, weight);
}

void CudaAssignSlots(const int32_t* expert_index, const float* weight, int64_t tokens,
                     int num_experts, int k, bool bpr, int32_t* slot, int32_t* load,
                     const uint8_t* routed, CudaRoutingScratch* scratch) {
  DrainCudaBackendStream();
  CudaRoutingScratch::Impl& s = *scratch->impl();
  thrust_routing::AssignSlots(thrust::device, expert_index, weight, tokens, num_experts, k, bpr,
                              slot, load, routed, s.order, s.keys, s.rank, s.visit, s.keys_w,
                              s.cumulative);
}

void CudaPlanRows(const int32_t* expert_index, const int32_t* slot, int64_t tokens, int64_t k,
                  int64_t group_size, int64_t capacity, int64_t rows_per_expert, int32_t* row) {
  DrainCudaBackendStream();
  thrust_routing::PlanRows(thrust::device, expert_index, slot, tokens, k, group_size, capacity,
                           rows_per_expert, row);
}

void CudaPackRows(const int32_t* row, const float* x, int64_t tokens, int64_t k, int64_t w,
                  float* buf) {
  DrainCudaBackendStream();
  thrust_routing::PackRows(thrust::device, row, x, tokens, k, w, buf);
}

void CudaGatherKeptRows(const float* buf, const int32_t* row, const float* weight, int64_t tokens,
                        int64_t k, int64_t w, float* out) {
  DrainCudaBackendStream();
  thrust_routing::GatherKeptRows(thrust::device, buf, row, weight, tokens, k, w, out);
}

void CudaGatherKeptRowsBackward(const float* buf, const int32_t* row, const float* weight,
                                const float* dy, int64_t tokens, int64_t k, int64_t w, float* d_buf,
                                float* d_weight) {
  DrainCudaBackendStream();
  thrust_routing::GatherKeptRowsBackward(thrust::device, buf, row, weight, dy, tokens, k, w, d_buf,
                                         d_weight);
}

}  // namespace moerun
