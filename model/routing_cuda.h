// The routing steps on a CUDA device: model/routing_thrust.h compiled by nvcc
// (model/routing_cuda.cu). Built when CMake finds the CUDA toolkit (MOERUN_WITH_CUDA);
// pointers are device pointers, semantics are model/routing.h's bit for bit.
#ifndef MOERUN_MODEL_ROUTING_CUDA_H_
#define MOERUN_MODEL_ROUTING_CUDA_H_

#include <cstdint>
#include <memory>

namespace moerun {

// Device scratch reused across calls (order, sort keys, ranks).
class CudaRoutingScratch {
 public:
  CudaRoutingScratch();
  ~CudaRoutingScratch();
  struct Impl;
  Impl* impl() { return impl_.get(); }

 private:
  std::unique_ptr<Impl> impl_;
};

void CudaTopK(const float* gates, int64_t tokens, int num_experts, int k, int32_t* expert_index,
              float* weight);
// group_size: groups of that many consecutive tokens at once (0: one group), load
// [groups, num_experts].
void CudaAssignSlots(const int32_t* expert_index, const float* weight, int64_t tokens,
                     int num_experts, int k, bool bpr, int32_t* slot, int32_t* load,
                     const uint8_t* routed, CudaRoutingScratch* scratch, int64_t group_size = 0);

void CudaPlanRows(const int32_t* expert_index, const int32_t* slot, int64_t tokens, int64_t k,
                  int64_t group_size, int64_t capacity, int64_t rows_per_expert, int32_t* row);
// buf must be zeroed by the caller.
void CudaPackRows(const int32_t* row, const float* x, int64_t tokens, int64_t k, int64_t w,
                  float* buf);
void CudaGatherKeptRows(const float* buf, const int32_t* row, const float* weight, int64_t tokens,
                        int64_t k, int64_t w, float* out);

// d_buf must be zeroed by the caller (see thrust_routing::GatherKeptRowsBackward).
void CudaGatherKeptRowsBackward(const float* buf, const int32_t* row, const float* weight,
                                const float* dy, int64_t tokens, int64_t k, int64_t w, float* d_buf,
                                float* d_weight);

}  // namespace moerun

#endif  // MOERUN_MODEL_ROUTING_CUDA_H_
