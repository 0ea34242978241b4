// Thrust execution on the CUDA backend's stream (for nvcc translation units only).
//
// Work queued with BackendStreamPolicy::Get() only queues: no host wait follows a kernel
// (par_nosync), and it runs in order with the cuBLAS GEMMs, copies, frees and NCCL
// collectives of the same stream. thrust::device, by contrast, runs on the legacy default
// stream and ends each algorithm in a blocking synchronization, which costs a host round
// trip per op and never returns behind an NCCL kernel whose peer died. Algorithms that hand
// a value back to the host (reductions, copy_if's count) still wait for their stream: drain
// it first with the backend's polling Synchronize (runtime/device_wait.h). Temporaries
// (sorts, reductions, column sums' scratch) come from the backend's stream-ordered pool.
#ifndef MOERUN_MODEL_CUDA_STREAM_POLICY_H_
#define MOERUN_MODEL_CUDA_STREAM_POLICY_H_

#include <cuda_runtime_api.h>
#include <glog/logging.h>
#include <thrust/execution_policy.h>

#include <cstddef>

#include "runtime/backend.h"

namespace moerun {

inline cudaStream_t BackendStream() {
  return static_cast<cudaStream_t>(RequireBackend(Device::kCUDA).stream());
}

// Thrust's temporary storage from the CUDA backend (its stream-ordered pool): freeing a
// temporary does not wait for the device, as cudaFree would, and near a full GPU the
// temporaries can use what the pool holds. Stateless; thrust keeps a reference to it, so
// policies take the one TempAllocator() returns.
struct BackendTempAllocator {
  using value_type = char;
  char* allocate(std::ptrdiff_t n) {
    void* p = RequireBackend(Device::kCUDA).Allocate(static_cast<size_t>(n));
    CHECK(p != nullptr) << "out of GPU memory for a " << n
                        << "-byte temporary of a Thrust algorithm on "
                        << RequireBackend(Device::kCUDA).Describe();
    return static_cast<char*>(p);
  }
  void deallocate(char* p, size_t n) { RequireBackend(Device::kCUDA).Free(p, n); }
};

inline BackendTempAllocator& TempAllocator() {
  static BackendTempAllocator allocator;
  return allocator;
}

// A PolicySource for thrust_dense::ThrustOps: the backend's stream, no host wait, the
// temporaries from the backend's pool.
struct BackendStreamPolicy {
  static auto Get() { return thrust::cuda::par_nosync(TempAllocator()).on(BackendStream()); }
};

}  // namespace moerun

#endif  // MOERUN_MODEL_CUDA_STREAM_POLICY_H_
