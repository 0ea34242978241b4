// nvcc instantiation of the Thrust AdamW update on the CUDA backend's stream.
#include <thrust/execution_policy.h>

#include "model/adamw_cuda.h"
#include "runtime/adamw_thrust.h"
#include "runtime/backend.h"

namespace moerun {

void CudaAdamWStep(const AdamWScalars& s, bool decay, float* value, const float* grad, void* m,
                   void* v, int64_t n, bool bf16_moments) {
  const auto stream = static_cast<cudaStream_t>(RequireBackend(Device::kCUDA).stream());
  // Queued only (par_nosync): the host waits in the backend's polling Synchronize, never in a
  // blocking one behind the gradients' NCCL all-reduce (see runtime/device_wait.h).
  thrust_optim::AdamWStep(thrust::cuda::par_nosync.on(stream), s, decay, value, grad, m, v, n,
                          bf16_moments);
}

}  // namespace moerun
