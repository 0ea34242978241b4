// nvcc instantiation of the Thrust routing kernels for CUDA devices, on the backend's stream
// without host waits (model/cuda_stream_policy.h). AssignSlots alone may wait: with padding
// its copy_if hands a count back to the host, and its scratch grows at first, so then it
// drains the stream first with the backend's polling wait; its sorts' temporaries come from
// the backend's pool.
#include <thrust/device_vector.h>
#include <thrust/execution_policy.h>

#include "model/cuda_stream_policy.h"
#include "model/ops_cuda.h"
#include "model/routing_cuda.h"
#include "model/routing_thrust.h"
#include "runtime/backend.h"

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
  thrust_routing::TopK(BackendStreamPolicy::Get(), gates, tokens, num_experts, k, expert_index,
                       weight);
}

void CudaAssignSlots(const int32_t* expert_index, const float* weight, int64_t tokens,
                     int num_experts, int k, bool bpr, int32_t* slot, int32_t* load,
                     const uint8_t* routed, CudaRoutingScratch* scratch, int64_t group_size) {
  CudaRoutingScratch::Impl& s = *scratch->impl();
  // The scratch vectors only grow (thrust_routing::GrowTo); growing runs cudaMalloc and
  // their construction on the legacy default stream (which the backend's blocking stream
  // is ordered with), waited for by Thrust in a plain blocking wait, and with padding
  // copy_if hands a count to the host: then drain the stream through the polling wait
  // first. Calls within the largest size so far, without padding, queue without a host
  // wait.
  if (routed != nullptr ||
      thrust_routing::AssignSlotsScratchGrows(tokens, num_experts, k, bpr, s.order, s.keys, s.rank,
                                              s.visit, s.keys_w, s.cumulative, group_size)) {
    DrainCudaBackendStream();
  }
  thrust_routing::AssignSlotsInGroups(BackendStreamPolicy::Get(), expert_index, weight, tokens,
                                      group_size, num_experts, k, bpr, slot, load, routed, s.order,
                                      s.keys, s.rank, s.visit, s.keys_w, s.cumulative);
}

void CudaPlanRows(const int32_t* expert_index, const int32_t* slot, int64_t tokens, int64_t k,
                  int64_t group_size, int64_t capacity, int64_t rows_per_expert, int32_t* row) {
  thrust_routing::PlanRows(BackendStreamPolicy::Get(), expert_index, slot, tokens, k, group_size,
                           capacity, rows_per_expert, row);
}

void CudaPackRows(const int32_t* row, const float* x, int64_t tokens, int64_t k, int64_t w,
                  float* buf) {
  thrust_routing::PackRows(BackendStreamPolicy::Get(), row, x, tokens, k, w, buf);
}

void CudaGatherKeptRows(const float* buf, const int32_t* row, const float* weight, int64_t tokens,
                        int64_t k, int64_t w, float* out) {
  thrust_routing::GatherKeptRows(BackendStreamPolicy::Get(), buf, row, weight, tokens, k, w, out);
}

void CudaGatherKeptRowsBackward(const float* buf, const int32_t* row, const float* weight,
                                const float* dy, int64_t tokens, int64_t k, int64_t w, float* d_buf,
                                float* d_weight) {
  thrust_routing::GatherKeptRowsBackward(BackendStreamPolicy::Get(), buf, row, weight, dy, tokens,
                                         k, w, d_buf, d_weight);
}

}  // namespace moerun
