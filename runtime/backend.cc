// The CPU backend and the registry of backends.
#include "runtime/backend.h"

#include <glog/logging.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>

#include "runtime/cuda_backend.h"

namespace moerun {

void Backend::CopyWithin2D(void* dst, size_t dst_pitch, const void* src, size_t src_pitch,
                           size_t row_bytes, size_t rows) {
  CHECK(row_bytes <= dst_pitch && row_bytes <= src_pitch)
      << "2D copy: rows of " << row_bytes << " bytes at pitches " << dst_pitch << " / "
      << src_pitch;
  for (size_t i = 0; i < rows; ++i) {
    CopyWithin(static_cast<char*>(dst) + i * dst_pitch,
               static_cast<const char*>(src) + i * src_pitch, row_bytes);
  }
}

namespace {

constexpr size_t kHostAlignment = 64;

class CpuBackend final : public Backend {
 public:
  // `as`: the device it reports (kCPU, or another for a host stand-in).
  explicit CpuBackend(Device as = Device::kCPU) : as_(as) {}
  Device device() const override { return as_; }
  std::string Describe() const override {
    return as_ == Device::kCPU ? "cpu" : std::string("host stand-in for ") + DeviceName(as_);
  }
  void* Allocate(size_t bytes) override {
    const size_t rounded =
        (std::max<size_t>(bytes, 1) + kHostAlignment - 1) / kHostAlignment * kHostAlignment;
    void* p = std::aligned_alloc(kHostAlignment, rounded);
    if (p != nullptr) {
      const size_t now = allocated_.fetch_add(rounded) + rounded;
      size_t peak = peak_.load();
      while (now > peak && !peak_.compare_exchange_weak(peak, now)) {
      }
    }
    return p;
  }
  void Free(void* p, size_t bytes) override {
    if (p == nullptr) return;
    std::free(p);
    allocated_.fetch_sub((std::max<size_t>(bytes, 1) + kHostAlignment - 1) / kHostAlignment *
                         kHostAlignment);
  }
  void SetZero(void* p, size_t bytes) override { std::memset(p, 0, bytes); }
  void CopyFromHost(void* dst, const void* src, size_t bytes) override {
    std::memmove(dst, src, bytes);
  }
  void CopyToHost(void* dst, const void* src, size_t bytes) override {
    std::memmove(dst, src, bytes);
  }
  void CopyWithin(void* dst, const void* src, size_t bytes) override {
    std::memmove(dst, src, bytes);
  }
  void Synchronize() override {}
  void* stream() const override { return nullptr; }
  size_t allocated_bytes() const override { return allocated_.load(); }
  size_t peak_allocated_bytes() const override { return peak_.load(); }

 private:
  Device as_;
  std::atomic<size_t> allocated_{0}, peak_{0};
};

CpuBackend& Cpu() {
  static CpuBackend* cpu = new CpuBackend();  // never destroyed: tensors may outlive main
  return *cpu;
}

std::array<Backend*, 2>& TestOverrides() {
  static std::array<Backend*, 2> overrides = {nullptr, nullptr};
  return overrides;
}

}  // namespace

Backend* SetBackendForTesting(Device device, Backend* backend) {
  Backend*& slot = TestOverrides()[static_cast<size_t>(device)];
  Backend* before = slot;
  slot = backend;
  return before;
}

std::unique_ptr<Backend> NewHostStandInBackend(Device device) {
  return std::make_unique<CpuBackend>(device);
}

void* Backend::AllocateStagingHost(size_t bytes) {
  const size_t rounded = (std::max<size_t>(bytes, 1) + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, rounded);
  CHECK(p != nullptr) << "out of host memory for a " << bytes << "-byte staging buffer";
  return p;
}

void Backend::FreeStagingHost(void* p) { std::free(p); }

void* Backend::CopyFromStagingAsync(void* device_dst, const void* staging_src, size_t bytes) {
  CopyFromHost(device_dst, staging_src, bytes);
  return nullptr;
}

void* Backend::CopyToStagingAsync(void* staging_dst, const void* device_src, size_t bytes) {
  CopyToHost(staging_dst, device_src, bytes);
  return nullptr;
}

void Backend::WaitForCopy(void* event) {
  CHECK(event == nullptr) << Describe() << " records no events";
}

double Backend::ElapsedSecondsAndRelease(void*, void*) {
  LOG(FATAL) << Describe() << " records no timing events";
  return 0.0;
}

Backend* BackendFor(Device device) {
  if (Backend* b = TestOverrides()[static_cast<size_t>(device)]) return b;
  switch (device) {
    case Device::kCPU:
      return &Cpu();
    case Device::kCUDA:
      return CudaBackendOrNull();
  }
  return nullptr;
}

Backend& RequireBackend(Device device) {
  Backend* b = BackendFor(device);
  if (b == nullptr) {
    auto parsed = ParseDevice(DeviceName(device));
    LOG(FATAL) << "no " << DeviceName(device) << " backend in this process: "
               << (parsed.ok() ? std::string("not initialised") : parsed.status().message());
  }
  return *b;
}

std::vector<std::string> BuiltBackends() {
  std::vector<std::string> v = {"cpu"};
  if (CudaBackendBuilt()) v.push_back("cuda");
  return v;
}

StatusOr<Device> ParseDevice(const std::string& text) {
  if (text == "cpu") return Device::kCPU;
  if (text != "cuda") {
    return Status::Error("unknown device '" + text + "': use cpu or cuda");
  }
  if (!CudaBackendBuilt()) {
    return Status::Error(
        "device cuda: this moerun was built without the CUDA backend; rebuild with the CUDA "
        "toolkit present (bash cluster/setup.sh -DMOERUN_CUDA=ON), or use --device cpu");
  }
  if (CudaDeviceCount() == 0) {
    return Status::Error("device cuda: no CUDA device is visible to this process (" +
                         CudaBackendSummary() +
                         "); run on a GPU node (check nvidia-smi and CUDA_VISIBLE_DEVICES), "
                         "or use --device cpu");
  }
  return Device::kCUDA;
}

}  // namespace moerun
