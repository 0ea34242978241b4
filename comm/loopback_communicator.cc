// LoopbackCommunicator: one real rank, the others simulated as copies of it.
#include "comm/loopback_communicator.h"

#include <glog/logging.h>

#include <cstring>
#include <vector>

#include "runtime/backend.h"
#include "runtime/process.h"

namespace moerun {

LoopbackCommunicator::LoopbackCommunicator(int rank, int size, std::string name, Device device)
    : rank_(rank), size_(size), name_(std::move(name)), device_(device) {
  CHECK(size >= 1 && rank >= 0 && rank < size) << "rank " << rank << " of " << size;
  if (device_ != Device::kCPU) (void)RequireBackend(device_);  // dies naming a missing backend
}

void* LoopbackCommunicator::stream() const {
  return device_ == Device::kCPU ? nullptr : RequireBackend(device_).stream();
}

void LoopbackCommunicator::Synchronize() {
  if (device_ != Device::kCPU) RequireBackend(device_).Synchronize();
}

void LoopbackCommunicator::Copy(void* dst, const void* src, size_t bytes) {
  if (device_ == Device::kCPU) {
    std::memcpy(dst, src, bytes);
  } else {
    RequireBackend(device_).CopyWithin(dst, src, bytes);
  }
}

void LoopbackCommunicator::AllToAllV(const void* send, const std::vector<int64_t>& send_counts,
                                     const std::vector<int64_t>& send_displs, void* recv,
                                     const std::vector<int64_t>& recv_counts,
                                     const std::vector<int64_t>& recv_displs, DType dtype) {
  CHECK_EQ(send_counts.size(), static_cast<size_t>(size_));
  CHECK_EQ(recv_counts.size(), static_cast<size_t>(size_));
  const size_t es = DTypeSize(dtype);
  const char* self = static_cast<const char*>(send) + send_displs[rank_] * es;
  const int64_t self_count = send_counts[rank_];
  for (int p = 0; p < size_; ++p) {
    char* dst = static_cast<char*>(recv) + recv_displs[p] * es;
    const int64_t n = recv_counts[p];
    if (p == rank_) {
      CHECK_EQ(n, self_count) << "all-to-all: this rank sends itself " << self_count
                              << " elements but expects " << n;
    } else {
      a2a_sent_ += send_counts[p] * static_cast<int64_t>(es);
      a2a_received_ += n * static_cast<int64_t>(es);
    }
    if (n == 0) continue;
    if (self_count == 0) {
      if (device_ == Device::kCPU) {
        std::memset(dst, 0, n * es);
      } else {
        RequireBackend(device_).SetZero(dst, n * es);
      }
      continue;
    }
    // The simulated peer's block: this rank's own block, repeated or cut to n elements.
    for (int64_t done = 0; done < n;) {
      const int64_t chunk = std::min(n - done, self_count);
      Copy(dst + done * es, self, chunk * es);
      done += chunk;
    }
  }
}

namespace {
template <typename T>
void Scale(void* buffer, int64_t count, int factor) {
  T* b = static_cast<T*>(buffer);
  for (int64_t i = 0; i < count; ++i) b[i] = static_cast<T>(b[i] * factor);
}
}  // namespace

void LoopbackCommunicator::AllReduce(void* buffer, int64_t count, DType dtype, ReduceOp op) {
  if (size_ > 1) {
    all_reduce_bytes_ += static_cast<int64_t>(2.0 * (size_ - 1) / size_ * count * DTypeSize(dtype));
  }
  if (op != ReduceOp::kSum || size_ == 1) return;
  if (device_ != Device::kCPU) {
    std::vector<char> host(count * DTypeSize(dtype));
    Backend& backend = RequireBackend(device_);
    backend.CopyToHost(host.data(), buffer, host.size());
    ScaleBy(host.data(), count, dtype);
    backend.CopyFromHost(buffer, host.data(), host.size());
    return;
  }
  ScaleBy(buffer, count, dtype);
}

void LoopbackCommunicator::ScaleBy(void* buffer, int64_t count, DType dtype) const {
  switch (dtype) {
    case DType::kF32:
      Scale<float>(buffer, count, size_);
      break;
    case DType::kF64:
      Scale<double>(buffer, count, size_);
      break;
    case DType::kI32:
      Scale<int32_t>(buffer, count, size_);
      break;
    case DType::kI64:
      Scale<int64_t>(buffer, count, size_);
      break;
    default:
      LOG(FATAL) << "loopback all-reduce (sum) of " << DTypeName(dtype) << " is not supported";
  }
}

void LoopbackCommunicator::Broadcast(void*, int64_t, DType, int root) {
  CHECK(root >= 0 && root < size_) << "broadcast root " << root << " of " << size_;
}

void LoopbackCommunicator::AllGather(const void* send, int64_t count, void* recv, DType dtype) {
  const size_t bytes = count * DTypeSize(dtype);
  for (int p = 0; p < size_; ++p) Copy(static_cast<char*>(recv) + p * bytes, send, bytes);
}

std::unique_ptr<Communicator> LoopbackCommunicator::Split(int, int, const std::string& name) {
  LOG(ERROR) << RankTag() << ": a simulated job cannot split its communicator ('" << name
             << "'): use a rank count no larger than the number of experts";
  AbortJob(2);
}

}  // namespace moerun
