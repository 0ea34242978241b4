// nvcc instantiation of the Thrust AdamW update on the CUDA backend's stream.
#include <thrust/execution_policy.h>

#include "model/adamw_cuda.h"
#include "model/cuda_stream_policy.h"
#include "runtime/adamw_thrust.h"
#include "runtime/backend.h"

namespace moerun {

void CudaAdamWStep(const AdamWScalars& s, bool decay, float* value, const float* grad, void* m,
                   void* v, int64_t n, bool bf16_moments) {
  // Queued only (model/cuda_stream_policy.h): the host waits in the backend's polling
  // Synchronize, never in a blocking one behind the gradients' NCCL all-reduce.
  thrust_optim::AdamWStep(BackendStreamPolicy::Get(), s, decay, value, grad, m, v, n, bf16_moments);
}

// One launch for a training step's parameters, the table uploaded only when they move. Kept
// per host thread, never freed (it would outlive the CUDA context at exit).
void CudaAdamWStepMany(const AdamWScalars& s, const AdamWArray* arrays, int64_t count,
                       bool bf16_moments) {
  thread_local thrust_optim::DeviceAdamWMany* many = new thrust_optim::DeviceAdamWMany();
  many->Run(BackendStreamPolicy::Get(), Device::kCUDA, s, arrays, count, bf16_moments);
}

}  // namespace moerun
