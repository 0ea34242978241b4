// Tensor: a typed, shaped view of memory (owning or not) on a device, and Arena: a bump
// allocator for per-step activations. Kernels take raw pointers; Tensor carries shape,
// strides and ownership between them and checks shapes at layer boundaries.
#ifndef MOERUN_RUNTIME_TENSOR_H_
#define MOERUN_RUNTIME_TENSOR_H_

#include <glog/logging.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "runtime/dtype.h"

namespace moerun {

using Shape = std::vector<int64_t>;

constexpr size_t kTensorAlignment = 64;

// A block of memory. Owning storage frees it when the last Tensor referring to it goes.
class Storage {
 public:
  // Allocates `bytes` (aligned, uninitialised) on `device` through its Backend.
  // When the device cannot give it, ends the job naming `detail` (what is allocated), the
  // current AllocationLabel and, on the host, the plan (OutOfHostMemory), exit 1.
  static std::shared_ptr<Storage> Allocate(size_t bytes, const std::string& detail = "",
                                           Device device = Device::kCPU);
  // Refers to memory owned elsewhere; the caller keeps it alive while tensors use it.
  static std::shared_ptr<Storage> Borrow(void* data, size_t bytes, Device device);
  ~Storage();
  Storage(const Storage&) = delete;
  Storage& operator=(const Storage&) = delete;

  void* data() const { return data_; }
  size_t bytes() const { return bytes_; }
  Device device() const { return device_; }
  bool owning() const { return owning_; }

 private:
  Storage(void* data, size_t bytes, Device device, bool owning)
      : data_(data), bytes_(bytes), device_(device), owning_(owning) {}
  void* data_;
  size_t bytes_;
  Device device_;
  bool owning_;
};

class Tensor {
 public:
  Tensor() = default;  // undefined: no storage, no shape

  // New owning, contiguous, aligned tensors on `device` (its Backend allocates).
  static Tensor Empty(const Shape& shape, DType dtype = DType::kF32, Device device = Device::kCPU);
  static Tensor Zeros(const Shape& shape, DType dtype = DType::kF32, Device device = Device::kCPU);
  static Tensor Full(const Shape& shape, float value);  // fp32
  // A contiguous view of external memory; `data` must outlive every use of the view.
  static Tensor Wrap(void* data, const Shape& shape, DType dtype, Device device = Device::kCPU);
  // A contiguous view at `byte_offset` into `storage` (used by Arena).
  static Tensor OnStorage(std::shared_ptr<Storage> storage, size_t byte_offset, const Shape& shape,
                          DType dtype);

  bool defined() const { return storage_ != nullptr; }
  const Shape& shape() const { return shape_; }
  const std::vector<int64_t>& strides() const { return strides_; }  // in elements
  int ndim() const { return static_cast<int>(shape_.size()); }
  int64_t dim(int i) const;                 // negative i counts from the end
  int64_t numel() const { return numel_; }  // 0 when undefined
  size_t nbytes() const { return static_cast<size_t>(numel()) * DTypeSize(dtype_); }
  DType dtype() const { return dtype_; }
  Device device() const { return storage_ ? storage_->device() : Device::kCPU; }
  bool is_contiguous() const;
  // True when this tensor's storage is its own (not borrowed external memory).
  bool owns_storage() const { return storage_ && storage_->owning(); }

  // The first element's address on the tensor's own device (for kernels, copies and
  // collectives of that device).
  void* raw_data() const;
  // Typed host access: fails loudly on a tensor that is not in host memory.
  template <typename T>
  T* data() const {
    CHECK(defined()) << "data() of an undefined tensor";
    CHECK(dtype_ == DTypeOf<T>::value)
        << "tensor holds " << DTypeName(dtype_) << ", asked for " << DTypeName(DTypeOf<T>::value);
    CHECK(device() == Device::kCPU)
        << "data() of " << ShapeString() << " on " << DeviceName(device())
        << ": host code cannot read device memory; use device_data() in a kernel of that "
           "device or copy it with To(Device::kCPU)";
    return static_cast<T*>(raw_data());
  }
  // Typed access for a kernel of `on`: fails loudly when the tensor lives elsewhere.
  template <typename T>
  T* device_data(Device on) const {
    CHECK(defined()) << "device_data() of an undefined tensor";
    CHECK(dtype_ == DTypeOf<T>::value)
        << "tensor holds " << DTypeName(dtype_) << ", asked for " << DTypeName(DTypeOf<T>::value);
    CHECK(device() == on) << "a " << DeviceName(on) << " kernel was given " << ShapeString()
                          << " on " << DeviceName(device());
    return static_cast<T*>(raw_data());
  }

  // Views (share storage).
  Tensor Slice(int dim, int64_t begin, int64_t end) const;  // [begin, end) along dim
  Tensor Reshape(const Shape& shape) const;                 // contiguous only; one -1 allowed
  Tensor Transpose(int dim_a, int dim_b) const;             // strided view

  // Copies.
  // A new owning contiguous copy on `device` (this tensor when already there). The only way
  // bytes cross between host and device, besides CopyFrom.
  Tensor To(Device device) const;
  Tensor Contiguous() const;       // this tensor if already contiguous, else a packed copy
  Tensor Clone() const;            // always a new owning contiguous copy
  Tensor Cast(DType dtype) const;  // fp32 <-> bf16 <-> f64 (new owning tensor)
  // Same shape and dtype. Host to host: any strides; across devices or on a device: both
  // contiguous.
  void CopyFrom(const Tensor& src);

  void Fill(float value);  // fp32, bf16 or f64 tensors
  void SetZero();

  std::string ShapeString() const;  // "[4, 197, 768] F32", "[4, 197, 768] BF16 cuda"

 private:
  std::shared_ptr<Storage> storage_;
  int64_t offset_ = 0;  // in elements
  Shape shape_;
  std::vector<int64_t> strides_;
  int64_t numel_ = 0;  // product of shape_, kept with it
  DType dtype_ = DType::kF32;
};

// Host memory of a device's backend for copies without a host wait (Backend::
// AllocateStagingHost: page-locked on CUDA), and the event of the copy in flight through it.
// It waits, frees and allocates through the backend BackendFor(device) gives at the time:
// a test that swaps in another backend must swap in one over the same memory and events.
class StagingBuffer {
 public:
  StagingBuffer() = default;
  StagingBuffer(const StagingBuffer&) = delete;
  StagingBuffer& operator=(const StagingBuffer&) = delete;
  ~StagingBuffer() { Release(); }  // waits for the copy in flight, frees the memory
  // At least `bytes` for copies with `device`, once the copy in flight is done (a polling
  // wait); a first or larger allocation waits for the device's stream first (page-locked
  // allocations may wait for the device inside the driver).
  char* Get(Device device, size_t bytes);
  // The event of the copy just queued through the buffer (Backend::CopyFrom/ToStaging...).
  void set_pending(void* event) { pending_ = event; }
  // Waits for the copy in flight.
  void Wait();
  const char* data() const { return data_; }

 private:
  void Release();
  Device device_ = Device::kCPU;
  char* data_ = nullptr;
  size_t bytes_ = 0;
  void* pending_ = nullptr;
};

// Uploads of host values to a device tensor without a host wait, through a StagingBuffer:
// the host waits only before it rewrites the staging, for the copy before (long done in a
// training step's rhythm).
class StagedUpload {
 public:
  // dst (contiguous, on a device) <- host (contiguous, on the CPU; same dtype and shape).
  // On the CPU: a plain copy.
  void Copy(const Tensor& host, Tensor* dst);

 private:
  StagingBuffer staging_;
};

// Copies each of `src` (contiguous, all on one device) into the host tensor `dst[i]` of
// the same dtype and size with one device-to-host copy, in two halves, so that the host can
// queue more device work before it waits: Start packs the sources on their device and
// queues the copy into staging host memory (no host wait on a device); Finish waits for it
// and fills the destinations.
class HostCopies {
 public:
  void Start(const std::vector<const Tensor*>& src, const std::vector<Tensor*>& dst);
  void Finish();
  bool started() const { return started_; }

 private:
  StagingBuffer staging_;
  std::vector<Tensor*> dst_;
  Tensor packed_;  // on the device, until the copy is done
  bool started_ = false;
};

std::string ShapeToString(const Shape& shape);
Shape ContiguousStrides(const Shape& shape);
int64_t NumElements(const Shape& shape);

// Checks a tensor's shape at a layer boundary; a mismatch is a programming error.
#define MOERUN_CHECK_SHAPE(tensor, ...)                                                      \
  CHECK((tensor).shape() == ::moerun::Shape(__VA_ARGS__))                                    \
      << #tensor " has shape " << ::moerun::ShapeToString((tensor).shape()) << ", expected " \
      << ::moerun::ShapeToString(::moerun::Shape(__VA_ARGS__))

// Bump allocator for activations that live for one step. Allocate() hands out views into
// large blocks, filling them in order; Reset() makes the whole space reusable. Tensors keep
// their block alive, so a tensor used after Reset() reads reused memory but never freed
// memory. When a step needs more than the arena holds, a new block is added; the next
// Reset() replaces all blocks by one block of the high-water size, so steady-state steps
// allocate nothing, but only when no tensor still holds an old block: else the old blocks
// would stay alive beside the new one (on a GPU, memory taken at once), so they are kept
// and reused as they are. Release the last step's tensors before Reset() to let it merge.
class Arena {
 public:
  explicit Arena(size_t initial_bytes = 0, Device device = Device::kCPU);
  Device device() const { return device_; }
  Tensor Allocate(const Shape& shape, DType dtype = DType::kF32);
  Tensor AllocateZeros(const Shape& shape, DType dtype = DType::kF32);
  void Reset();

  size_t used_bytes() const { return used_total_; }         // since the last Reset()
  size_t capacity_bytes() const;                            // all blocks
  size_t high_water_bytes() const { return high_water_; };  // max used over all steps
  int num_blocks() const { return static_cast<int>(blocks_.size()); }

 private:
  struct Block {
    std::shared_ptr<Storage> storage;
    size_t used = 0;
  };
  Device device_ = Device::kCPU;
  std::vector<Block> blocks_;
  size_t current_ = 0;  // the block Allocate() fills now
  size_t used_total_ = 0;
  size_t high_water_ = 0;
};

}  // namespace moerun

#endif  // MOERUN_RUNTIME_TENSOR_H_
