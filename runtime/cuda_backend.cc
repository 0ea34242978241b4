// The CUDA backend: device memory from the stream-ordered allocator (cudaMallocAsync on the
// device's default memory pool, kept cached: the pool's release threshold is raised so freed
// blocks are reused instead of returned to the driver), copies on one stream (blocking: ordered
// with the legacy default stream), waits that poll (runtime/device_wait.h).
#include "runtime/cuda_backend.h"

#include <glog/logging.h>

#include <algorithm>
#include <atomic>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "runtime/backend.h"
#include "runtime/block_cache.h"
#include "runtime/device_wait.h"
#include "runtime/process.h"

#ifdef MOERUN_WITH_CUDA
#include <cuda_runtime_api.h>

#include <cstdint>

#include "runtime/cuda_check.h"
#endif

namespace moerun {

#ifdef MOERUN_WITH_CUDA
namespace {

std::atomic<int> bound_device{-1};
std::atomic<int> backend_device{-1};  // where CudaBackendOrNull made the backend, once made

// Waits, through the polling device wait (runtime/device_wait.h), until `query` (a stream's
// or an event's) stops answering cudaErrorNotReady; any other error ends the job naming it.
void PollCuda(const std::function<cudaError_t()>& query, const std::string& what) {
  PollDeviceWait(
      [&] {
        const cudaError_t q = query();
        if (q == cudaErrorNotReady) {
          cudaGetLastError();  // not an error: leave no trace for the next launch's check
          return false;
        }
        CHECK(q == cudaSuccess) << RankTag() << ": CUDA error while waiting for " << what << ": "
                                << cudaGetErrorName(q) << " (" << cudaGetErrorString(q) << ")";
        return true;
      },
      what);
}

class CudaBackend final : public Backend {
 public:
  explicit CudaBackend(int device) : device_(device) {
    MOERUN_CUDA_CHECK(cudaSetDevice(device_));
    // A blocking stream: it orders with the legacy default stream, which Thrust's
    // thrust::device and plain cudaMemcpy use, so work queued either way stays in order.
    MOERUN_CUDA_CHECK(cudaStreamCreateWithFlags(&stream_, cudaStreamDefault));
    // Stream-ordered allocation where the device (and its driver, or a sandbox such as
    // gVisor) supports memory pools; else plain cudaMalloc / cudaFree.
    int pools = 0;
    if (cudaDeviceGetAttribute(&pools, cudaDevAttrMemoryPoolsSupported, device_) != cudaSuccess) {
      cudaGetLastError();
      pools = 0;
    }
    pools_ = pools != 0;
    if (pools_) {
      cudaMemPool_t pool;
      MOERUN_CUDA_CHECK(cudaDeviceGetDefaultMemPool(&pool, device_));
      uint64_t keep = UINT64_MAX;  // a caching pool: never hand freed memory back mid-run
      MOERUN_CUDA_CHECK(cudaMemPoolSetAttribute(pool, cudaMemPoolAttrReleaseThreshold, &keep));
    } else {
      // cudaMalloc / cudaFree behind a cache of freed blocks (runtime/block_cache.h): a
      // free keeps the block for the next allocation on this stream, and only an
      // allocation that finds the device full hands the cached blocks back (cudaFree waits
      // for the device: through the poll first).
      cache_ = std::make_unique<BlockCache>(
          [](size_t n) -> void* {
            void* p = nullptr;
            if (cudaMalloc(&p, n) != cudaSuccess) {
              cudaGetLastError();
              return nullptr;
            }
            return p;
          },
          [](void* p) { MOERUN_CUDA_CHECK(cudaFree(p)); }, [this] { Synchronize(); });
      LOG(WARNING) << "cuda:" << device_ << " has no stream-ordered memory pools: using "
                   << "cudaMalloc behind a cache of freed blocks";
    }
    description_ = DescribeDevice(device_);
    wait_name_ = "the device backend's stream on " + description_;
  }
  static std::string DescribeDevice(int device) {
    cudaDeviceProp prop;
    MOERUN_CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
    return "cuda:" + std::to_string(device) + " (" + prop.name + ", " +
           std::to_string(prop.totalGlobalMem >> 30) + " GiB, sm_" + std::to_string(prop.major) +
           std::to_string(prop.minor) + ")";
  }
  Device device() const override { return Device::kCUDA; }
  std::string Describe() const override { return description_; }
  void* Allocate(size_t bytes) override {
    void* p = TryAllocate(bytes);
    if (p == nullptr && pools_) {
      // The pool keeps what was freed (release threshold: all), which allocations outside
      // it (cuBLAS workspaces, NCCL buffers, Thrust temporaries) cannot use, nor a request
      // larger than its free blocks: hand the unused memory back and try once more.
      Synchronize();
      // The frees' completion observed by the host as cudaMemPoolTrimTo documents it (the
      // poll above only queried): the stream is idle, so this returns at once.
      MOERUN_CUDA_CHECK(cudaStreamSynchronize(stream_));
      cudaMemPool_t pool;
      MOERUN_CUDA_CHECK(cudaDeviceGetDefaultMemPool(&pool, device_));
      MOERUN_CUDA_CHECK(cudaMemPoolTrimTo(pool, 0));
      p = TryAllocate(bytes);
    }
    if (p == nullptr) return nullptr;  // out of memory, reported by the caller
    const size_t now = allocated_.fetch_add(bytes) + bytes;
    size_t peak = peak_.load();
    while (now > peak && !peak_.compare_exchange_weak(peak, now)) {
    }
    return p;
  }
  void Free(void* p, size_t bytes) override {
    if (p == nullptr) return;
    if (pools_) {
      MOERUN_CUDA_CHECK(cudaFreeAsync(p, stream_));
    } else {
      cache_->Free(p);  // reused in stream order by a later allocation
    }
    allocated_.fetch_sub(bytes);
  }
  void SetZero(void* p, size_t bytes) override {
    MOERUN_CUDA_CHECK(cudaMemsetAsync(p, 0, bytes, stream_));
  }
  // Both wait for the stream through the poll before the copy: with pageable host memory
  // the driver may wait for the stream inside cudaMemcpyAsync, where an NCCL kernel spinning
  // on a dead peer would hang the call with no word. Polled, the communicators' checks run
  // meanwhile and end the job naming the peer; the copy itself then finds the stream idle.
  void CopyFromHost(void* dst, const void* src, size_t bytes) override {
    Synchronize();
    MOERUN_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_));
    // The host buffer may be pageable and reused at once: wait for the copy.
    Synchronize();
  }
  void CopyToHost(void* dst, const void* src, size_t bytes) override {
    Synchronize();
    MOERUN_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream_));
    Synchronize();
  }
  void CopyWithin(void* dst, const void* src, size_t bytes) override {
    MOERUN_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToDevice, stream_));
  }
  void CopyWithin2D(void* dst, size_t dst_pitch, const void* src, size_t src_pitch,
                    size_t row_bytes, size_t rows) override {
    // cudaMemcpy2DAsync takes pitches up to cudaDevAttrMaxPitch (2^31 - 1 bytes on current
    // GPUs); wider ones go row by row.
    constexpr size_t kMaxPitch = 2147483647u;
    if (rows <= 1 || dst_pitch > kMaxPitch || src_pitch > kMaxPitch) {
      Backend::CopyWithin2D(dst, dst_pitch, src, src_pitch, row_bytes, rows);
      return;
    }
    MOERUN_CUDA_CHECK(cudaMemcpy2DAsync(dst, dst_pitch, src, src_pitch, row_bytes, rows,
                                        cudaMemcpyDeviceToDevice, stream_));
  }
  // Polls instead of cudaStreamSynchronize: NCCL collectives are queued on this stream, and a
  // peer that died leaves them spinning; the communicators' checks end the job meanwhile.
  void Synchronize() override { WaitForCudaStream(stream_, wait_name_); }
  void* stream() const override { return stream_; }
  size_t allocated_bytes() const override { return allocated_.load(); }
  size_t peak_allocated_bytes() const override { return peak_.load(); }
  void* RecordTimingEvent() override {
    cudaEvent_t e = nullptr;
    {
      std::lock_guard<std::mutex> lock(events_mu_);
      if (!free_events_.empty()) {
        e = free_events_.back();
        free_events_.pop_back();
      }
    }
    if (e == nullptr) {
      MOERUN_CUDA_CHECK(cudaSetDevice(device_));  // events belong to the current device
      MOERUN_CUDA_CHECK(cudaEventCreate(&e));
    }
    MOERUN_CUDA_CHECK(cudaEventRecord(e, stream_));
    return e;
  }
  void* AllocateStagingHost(size_t bytes) override {
    void* p = nullptr;
    MOERUN_CUDA_CHECK(cudaMallocHost(&p, std::max<size_t>(bytes, 1)));
    return p;
  }
  void FreeStagingHost(void* p) override {
    if (p == nullptr) return;
    Synchronize();  // cudaFreeHost may wait for the device: wait here first, through the poll
    MOERUN_CUDA_CHECK(cudaFreeHost(p));
  }
  void* CopyFromStagingAsync(void* dst, const void* src, size_t bytes) override {
    MOERUN_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice, stream_));
    return RecordTimingEvent();  // an event of the pool, recorded after the copy
  }
  void* CopyToStagingAsync(void* dst, const void* src, size_t bytes) override {
    MOERUN_CUDA_CHECK(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDeviceToHost, stream_));
    return RecordTimingEvent();
  }
  void WaitForCopy(void* event) override {
    if (event == nullptr) return;
    const auto e = static_cast<cudaEvent_t>(event);
    PollCuda([&] { return cudaEventQuery(e); }, wait_name_);
    std::lock_guard<std::mutex> lock(events_mu_);
    free_events_.push_back(e);
  }
  double ElapsedSecondsAndRelease(void* start, void* stop) override {
    const auto a = static_cast<cudaEvent_t>(start), b = static_cast<cudaEvent_t>(stop);
    PollCuda([&] { return cudaEventQuery(b); }, wait_name_);
    float ms = 0;
    MOERUN_CUDA_CHECK(cudaEventElapsedTime(&ms, a, b));
    std::lock_guard<std::mutex> lock(events_mu_);
    free_events_.push_back(a);
    free_events_.push_back(b);
    return ms * 1e-3;
  }
  DeviceMemory Memory() const override {
    DeviceMemory m;
    size_t free = 0, total = 0;
    if (cudaSetDevice(device_) == cudaSuccess && cudaMemGetInfo(&free, &total) == cudaSuccess) {
      m.free_bytes = static_cast<int64_t>(free);
      m.total_bytes = static_cast<int64_t>(total);
    }
    cudaMemPool_t pool;
    uint64_t high = 0, reserved = 0, used = 0;
    if (pools_ && cudaDeviceGetDefaultMemPool(&pool, device_) == cudaSuccess) {
      if (cudaMemPoolGetAttribute(pool, cudaMemPoolAttrUsedMemHigh, &high) == cudaSuccess) {
        m.pool_used_high_bytes = static_cast<int64_t>(high);
      }
      if (cudaMemPoolGetAttribute(pool, cudaMemPoolAttrReservedMemCurrent, &reserved) ==
              cudaSuccess &&
          cudaMemPoolGetAttribute(pool, cudaMemPoolAttrUsedMemCurrent, &used) == cudaSuccess) {
        m.pool_free_bytes = static_cast<int64_t>(reserved >= used ? reserved - used : 0);
      }
    }
    if (cache_ != nullptr) m.pool_free_bytes = static_cast<int64_t>(cache_->cached_bytes());
    cudaGetLastError();  // a failed query is not sticky
    return m;
  }

 private:
  // From the stream-ordered pool, or cudaMalloc without one; nullptr when it fails (the
  // error is not sticky: cleared).
  void* TryAllocate(size_t bytes) {
    if (!pools_) return cache_->Allocate(bytes);
    void* p = nullptr;
    if (cudaMallocAsync(&p, std::max<size_t>(bytes, 1), stream_) != cudaSuccess) {
      cudaGetLastError();
      return nullptr;
    }
    return p;
  }

  int device_;
  bool pools_ = true;                  // stream-ordered allocation (cudaMallocAsync) supported
  std::unique_ptr<BlockCache> cache_;  // without pools: cudaMalloc behind a cache
  cudaStream_t stream_ = nullptr;
  std::string description_, wait_name_;
  std::atomic<size_t> allocated_{0}, peak_{0};
  std::mutex events_mu_;
  std::vector<cudaEvent_t> free_events_;  // recorded and timed: reusable
};

}  // namespace

void WaitForCudaStream(void* stream, const std::string& what) {
  const auto s = static_cast<cudaStream_t>(stream);
  PollCuda([&] { return cudaStreamQuery(s); }, what);
}

bool CudaBackendBuilt() { return true; }

// cudaGetDeviceCount's answer, with its error: without a GPU (or driver) it returns an
// error, which is zero devices, not a failure; the error is kept for the messages, since
// an error other than "no device" (a driver older than this CUDA runtime, say) is what a
// user on a GPU node must see.
int CudaDeviceCount(cudaError_t* error) {
  int n = 0;
  *error = cudaGetDeviceCount(&n);
  if (*error != cudaSuccess) {
    cudaGetLastError();
    n = 0;
  }
  return n;
}

int CudaDeviceCount() {
  cudaError_t error;
  return CudaDeviceCount(&error);
}

std::string CudaBackendSummary() {
  int runtime = 0, driver = 0;
  cudaRuntimeGetVersion(&runtime);
  cudaDriverGetVersion(&driver);  // 0 where no driver is installed
  cudaError_t error;
  const int n = CudaDeviceCount(&error);
  auto version = [](int v) {
    return std::to_string(v / 1000) + "." + std::to_string(v % 1000 / 10);
  };
  std::string s =
      "built (CUDA runtime " + version(runtime) +
      (driver > 0 ? ", driver supports " + version(driver) : std::string(", no driver")) + "), " +
      std::to_string(n) + " device(s)";
  if (error != cudaSuccess && error != cudaErrorNoDevice && driver > 0) {
    s += std::string(": cudaGetDeviceCount failed with ") + cudaGetErrorName(error) + " (" +
         cudaGetErrorString(error) + ")";
    if (error == cudaErrorInsufficientDriver) {
      s += "; the GPU driver is older than the CUDA runtime this moerun was built with: "
           "update the driver or build against an older CUDA toolkit";
    }
  }
  return s;
}

std::string CudaDeviceDescription(int local_rank) {
  const int n = CudaDeviceCount();
  return n == 0 ? std::string() : CudaBackend::DescribeDevice(local_rank % n);
}

Status BindCudaDevice(int local_rank) {
  const int n = CudaDeviceCount();
  if (n == 0) return Status::Error("no CUDA device is visible to this process");
  const int device = local_rank % n;
  const int made = backend_device.load();
  if (made >= 0 && made != device) {
    // Its stream, handles and pool are device `made`'s: kernels would go there.
    return Status::Error("the CUDA backend was made on device " + std::to_string(made) +
                         " before this process was bound to device " + std::to_string(device) +
                         " (bind first)");
  }
  // Until the backend is made, a later bind replaces an earlier one (the launcher's local
  // rank before MPI_Init, MPI's after it where the two disagree); the device is recorded
  // only once it is set.
  const cudaError_t set = cudaSetDevice(device);
  if (set != cudaSuccess) {
    cudaGetLastError();
    return Status::Error("cudaSetDevice(" + std::to_string(device) + ") failed: " +
                         cudaGetErrorName(set) + " (" + cudaGetErrorString(set) + ")");
  }
  bound_device.store(device);
  return Status::Ok();
}

Backend* CudaBackendOrNull() {
  static std::once_flag once;
  static CudaBackend* backend = nullptr;
  std::call_once(once, [] {
    if (CudaDeviceCount() == 0) return;
    int device = bound_device.load();
    if (device < 0) device = 0;
    backend = new CudaBackend(device);  // never destroyed: tensors may outlive main
    backend_device.store(device);
  });
  return backend;
}

#else  // !MOERUN_WITH_CUDA

void WaitForCudaStream(void*, const std::string& what) {
  LOG(FATAL) << "waiting for " << what << ": this moerun was built without the CUDA backend";
}
bool CudaBackendBuilt() { return false; }
int CudaDeviceCount() { return 0; }
std::string CudaBackendSummary() {
  return "not built (configure with the CUDA toolkit present, MOERUN_CUDA=AUTO/ON)";
}
std::string CudaDeviceDescription(int) { return ""; }
Status BindCudaDevice(int) {
  return Status::Error("this moerun was built without the CUDA backend");
}
Backend* CudaBackendOrNull() { return nullptr; }

#endif

}  // namespace moerun
