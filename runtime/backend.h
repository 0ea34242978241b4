// Device backends: where a tensor's memory lives and how bytes move to, from and within it.
// One backend per Device kind, in the spirit of ggml's backend vtable: the CPU backend is
// always there (64-byte aligned host memory); the CUDA backend exists when moerun was built
// with the CUDA toolkit (MOERUN_WITH_CUDA) and a GPU is visible. Storage allocates through
// the backend of its device; Tensor::To and CopyFrom copy between devices explicitly.
#ifndef MOERUN_RUNTIME_BACKEND_H_
#define MOERUN_RUNTIME_BACKEND_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "runtime/dtype.h"
#include "runtime/status.h"

namespace moerun {

// A device's memory as its driver reports it; -1 where unknown.
struct DeviceMemory {
  int64_t free_bytes = -1, total_bytes = -1;
  // The most the backend's memory pool has held in use since it was created (CUDA:
  // cudaMemPoolAttrUsedMemHigh): allocations through the backend, Thrust's temporaries
  // included, with the pool's rounding; cuBLAS's and NCCL's own buffers are not in it.
  int64_t pool_used_high_bytes = -1;
  // Memory the pool holds for reuse, free for this process's allocations but not in
  // free_bytes (the pool keeps what was freed: cudaMemPoolAttrReservedMemCurrent - Used).
  int64_t pool_free_bytes = -1;
};

class Backend {
 public:
  virtual ~Backend() = default;
  virtual Device device() const = 0;
  // "cpu", "cuda:0 (NVIDIA H200, 139.8 GiB)"
  virtual std::string Describe() const = 0;

  // Uninitialised, 64-byte aligned (CUDA: 256); nullptr when the device has no room.
  virtual void* Allocate(size_t bytes) = 0;
  // `bytes` as passed to Allocate. In stream order: work already queued on this backend's
  // stream that uses p still runs on valid memory (CUDA: cudaFreeAsync on the stream).
  virtual void Free(void* p, size_t bytes) = 0;
  virtual void SetZero(void* p, size_t bytes) = 0;
  // Copies on this backend's stream; CopyToHost returns when the bytes are on the host.
  // Both return only through the polling wait (runtime/device_wait.h), never blocked in the
  // driver behind queued work: a dead peer's collective on the stream ends the job instead.
  virtual void CopyFromHost(void* device_dst, const void* host_src, size_t bytes) = 0;
  virtual void CopyToHost(void* host_dst, const void* device_src, size_t bytes) = 0;
  virtual void CopyWithin(void* dst, const void* src, size_t bytes) = 0;
  // `rows` rows of `row_bytes` each, the rows `src_pitch` bytes apart in src and `dst_pitch`
  // apart in dst (both >= row_bytes), in one call where the device has one
  // (cudaMemcpy2DAsync); regions must not overlap. The default copies row by row.
  virtual void CopyWithin2D(void* dst, size_t dst_pitch, const void* src, size_t src_pitch,
                            size_t row_bytes, size_t rows);
  // Uploads without a host wait. Host memory the device copies from asynchronously (CUDA:
  // page-locked, cudaMallocHost; the default: 64-byte aligned host memory), freed with
  // FreeStagingHost (after waiting for its last copy).
  virtual void* AllocateStagingHost(size_t bytes);
  virtual void FreeStagingHost(void* p);
  // Queues a copy from staging host memory and returns an event to pass to WaitForCopy
  // before the host writes that memory again (CUDA: returns at once); nullptr where the
  // copy is done when the call returns (the default: CopyFromHost).
  virtual void* CopyFromStagingAsync(void* device_dst, const void* staging_src, size_t bytes);
  // The same the other way: queues a copy into staging host memory, whose bytes the host
  // may read after WaitForCopy of the event (the default: CopyToHost, nullptr).
  virtual void* CopyToStagingAsync(void* staging_dst, const void* device_src, size_t bytes);
  // Waits (polling, runtime/device_wait.h) until the stream has passed `event`, and releases
  // it; nullptr: nothing to wait for.
  virtual void WaitForCopy(void* event);
  // Waits for all work queued on this backend's stream.
  virtual void Synchronize() = 0;
  // The stream work on this device is ordered on (cudaStream_t for CUDA, nullptr for CPU).
  virtual void* stream() const = 0;
  // Bytes allocated and not yet freed, and the high-water mark, through this backend.
  virtual size_t allocated_bytes() const = 0;
  virtual size_t peak_allocated_bytes() const = 0;
  // The device's free and total memory (CUDA: cudaMemGetInfo) and its pool's high-water
  // mark; all unknown (-1) by default, as for the CPU (see AvailableHostBytes).
  virtual DeviceMemory Memory() const { return {}; }
  // Timing on the device's own clock without a host wait: an event recorded on the stream
  // now (CUDA: a cudaEvent_t from a pool), or nullptr where the device has none (its work
  // is done when a call returns: time it on the host).
  virtual void* RecordTimingEvent() { return nullptr; }
  // Seconds between two such events, waiting (polling, runtime/device_wait.h) until `stop`
  // has happened; both events go back to the pool.
  virtual double ElapsedSecondsAndRelease(void* start, void* stop);
};

// The backend of `device`; nullptr when it was not built or no such device is visible.
Backend* BackendFor(Device device);
// Like BackendFor, but ends the job (LOG(FATAL)) naming why the device is unavailable.
Backend& RequireBackend(Device device);

// Tests: makes BackendFor(device) return `backend` (nullptr: back to the real one); returns
// the previous override. With NewHostStandInBackend, code meant for a GPU runs in CI on host
// memory that is still tagged with the device, so host code reading it (data<T>()) dies as
// it would on a GPU.
Backend* SetBackendForTesting(Device device, Backend* backend);
// Host memory (64-byte aligned, memmove copies) that reports itself as `device`.
std::unique_ptr<Backend> NewHostStandInBackend(Device device);

// Backends compiled into this binary ("cpu", "cuda"); CUDA devices this process sees (0 when
// CUDA was not built, or when cudaGetDeviceCount fails: no driver, no GPU).
std::vector<std::string> BuiltBackends();
int CudaDeviceCount();
// "built (CUDA runtime 13.0), 0 device(s)" or "not built (...)".
std::string CudaBackendSummary();
// The GPU local rank `local_rank` binds to (local_rank % devices): "cuda:1 (NVIDIA H200,
// 139 GiB, sm_90)"; empty when there is none.
std::string CudaDeviceDescription(int local_rank);

// Parses a --device / train.device value: "cpu" or "cuda". Checks that the device can be
// used here: "cuda" needs the CUDA backend built and at least one visible GPU; the error
// names what is missing and what to do instead (callers exit 3, kExitUnavailable).
StatusOr<Device> ParseDevice(const std::string& text);
// Selects the GPU of this local rank (local_rank % devices) for this process's CUDA
// backend; call once before the first CUDA allocation. Errors when CUDA is unavailable.
Status BindCudaDevice(int local_rank);

}  // namespace moerun

#endif  // MOERUN_RUNTIME_BACKEND_H_
