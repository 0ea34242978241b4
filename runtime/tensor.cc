// Tensor, Storage and Arena.
#include "runtime/tensor.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <sstream>

#include "runtime/backend.h"
#include "runtime/process.h"

namespace moerun {

const char* DTypeName(DType t) {
  switch (t) {
    case DType::kF32:
      return "F32";
    case DType::kBF16:
      return "BF16";
    case DType::kF64:
      return "F64";
    case DType::kI32:
      return "I32";
    case DType::kI64:
      return "I64";
    case DType::kU8:
      return "U8";
  }
  return "?";
}

const char* DeviceName(Device d) { return d == Device::kCPU ? "cpu" : "cuda"; }

// ---------------------------------------------------------------------------------------
std::shared_ptr<Storage> Storage::Allocate(size_t bytes, const std::string& detail, Device device) {
  Backend& backend = RequireBackend(device);
  void* p = backend.Allocate(bytes);
  if (p == nullptr) {
    if (device == Device::kCPU) OutOfHostMemory(bytes, detail);
    LOG(FATAL) << "out of " << backend.Describe() << " memory allocating " << bytes << " bytes ("
               << GiBString(static_cast<double>(bytes)) << ")"
               << (detail.empty() ? "" : " for " + detail) << AllocationContext() << "; "
               << GiBString(static_cast<double>(backend.allocated_bytes()))
               << " already allocated on the device: lower train.micro_batch or use more ranks";
  }
  return std::shared_ptr<Storage>(new Storage(p, bytes, device, /*owning=*/true));
}

std::shared_ptr<Storage> Storage::Borrow(void* data, size_t bytes, Device device) {
  return std::shared_ptr<Storage>(new Storage(data, bytes, device, /*owning=*/false));
}

Storage::~Storage() {
  if (owning_) BackendFor(device_)->Free(data_, bytes_);
}

// ---------------------------------------------------------------------------------------
std::string ShapeToString(const Shape& shape) {
  std::ostringstream s;
  s << '[';
  for (size_t i = 0; i < shape.size(); ++i) s << (i ? ", " : "") << shape[i];
  s << ']';
  return s.str();
}

Shape ContiguousStrides(const Shape& shape) {
  Shape strides(shape.size());
  int64_t s = 1;
  for (int i = static_cast<int>(shape.size()) - 1; i >= 0; --i) {
    strides[i] = s;
    s *= shape[i];
  }
  return strides;
}

int64_t NumElements(const Shape& shape) {
  int64_t n = 1;
  for (int64_t d : shape) {
    CHECK_GE(d, 0) << "negative dimension in shape " << ShapeToString(shape);
    n *= d;
  }
  return n;
}

Tensor Tensor::Empty(const Shape& shape, DType dtype, Device device) {
  const size_t bytes = NumElements(shape) * DTypeSize(dtype);
  return OnStorage(
      Storage::Allocate(bytes, std::string(DTypeName(dtype)) + " tensor " + ShapeToString(shape),
                        device),
      0, shape, dtype);
}

Tensor Tensor::Zeros(const Shape& shape, DType dtype, Device device) {
  Tensor t = Empty(shape, dtype, device);
  t.SetZero();
  return t;
}

Tensor Tensor::Full(const Shape& shape, float value) {
  Tensor t = Empty(shape, DType::kF32);
  t.Fill(value);
  return t;
}

Tensor Tensor::Wrap(void* data, const Shape& shape, DType dtype, Device device) {
  return OnStorage(Storage::Borrow(data, NumElements(shape) * DTypeSize(dtype), device), 0, shape,
                   dtype);
}

Tensor Tensor::OnStorage(std::shared_ptr<Storage> storage, size_t byte_offset, const Shape& shape,
                         DType dtype) {
  CHECK_EQ(byte_offset % DTypeSize(dtype), 0u) << "misaligned tensor offset";
  CHECK_LE(byte_offset + NumElements(shape) * DTypeSize(dtype), storage->bytes())
      << "tensor " << ShapeToString(shape) << " does not fit its storage";
  Tensor t;
  t.storage_ = std::move(storage);
  t.offset_ = static_cast<int64_t>(byte_offset / DTypeSize(dtype));
  t.shape_ = shape;
  t.strides_ = ContiguousStrides(shape);
  t.numel_ = NumElements(shape);
  t.dtype_ = dtype;
  return t;
}

int64_t Tensor::dim(int i) const {
  const int n = ndim();
  if (i < 0) i += n;
  CHECK(i >= 0 && i < n) << "dim " << i << " of a " << n << "-d tensor";
  return shape_[i];
}

bool Tensor::is_contiguous() const { return strides_ == ContiguousStrides(shape_); }

void* Tensor::raw_data() const {
  CHECK(defined()) << "raw_data() of an undefined tensor";
  return static_cast<char*>(storage_->data()) + offset_ * DTypeSize(dtype_);
}

Tensor Tensor::Slice(int d, int64_t begin, int64_t end) const {
  if (d < 0) d += ndim();
  CHECK(d >= 0 && d < ndim()) << "Slice dim " << d << " of " << ShapeString();
  CHECK(0 <= begin && begin <= end && end <= shape_[d])
      << "Slice [" << begin << ", " << end << ") of dim " << d << " of " << ShapeString();
  Tensor t = *this;
  t.offset_ += begin * strides_[d];
  t.shape_[d] = end - begin;
  t.numel_ = NumElements(t.shape_);
  return t;
}

Tensor Tensor::Reshape(const Shape& shape) const {
  CHECK(is_contiguous()) << "Reshape of a non-contiguous tensor " << ShapeString();
  Shape s = shape;
  int infer = -1;
  int64_t known = 1;
  for (size_t i = 0; i < s.size(); ++i) {
    if (s[i] == -1) {
      CHECK_EQ(infer, -1) << "Reshape with two -1 dims";
      infer = static_cast<int>(i);
    } else {
      known *= s[i];
    }
  }
  if (infer >= 0) {
    CHECK(known > 0 && numel() % known == 0) << "cannot reshape " << ShapeString();
    s[infer] = numel() / known;
  }
  CHECK_EQ(NumElements(s), numel())
      << "Reshape " << ShapeString() << " to " << ShapeToString(shape);
  Tensor t = *this;
  t.shape_ = s;
  t.strides_ = ContiguousStrides(s);
  return t;
}

Tensor Tensor::Transpose(int a, int b) const {
  if (a < 0) a += ndim();
  if (b < 0) b += ndim();
  CHECK(a >= 0 && a < ndim() && b >= 0 && b < ndim()) << "Transpose dims of " << ShapeString();
  Tensor t = *this;
  std::swap(t.shape_[a], t.shape_[b]);
  std::swap(t.strides_[a], t.strides_[b]);
  return t;
}

namespace {

// Calls fn(dst_offset, src_offset) for every element of a strided source in row-major order.
template <typename Fn>
void ForEachStrided(const Shape& shape, const std::vector<int64_t>& strides, Fn fn) {
  const int n = static_cast<int>(shape.size());
  const int64_t total = NumElements(shape);
  if (total == 0) return;
  std::vector<int64_t> index(n, 0);
  int64_t src = 0;
  for (int64_t dst = 0; dst < total; ++dst) {
    fn(dst, src);
    for (int d = n - 1; d >= 0; --d) {
      if (++index[d] < shape[d]) {
        src += strides[d];
        break;
      }
      src -= (shape[d] - 1) * strides[d];
      index[d] = 0;
    }
  }
}

}  // namespace

char* StagingBuffer::Get(Device device, size_t bytes) {
  if (data_ != nullptr && (device != device_ || bytes_ < bytes)) Release();
  Wait();
  if (data_ == nullptr) {
    Backend* backend = BackendFor(device);
    backend->Synchronize();
    device_ = device;
    data_ = static_cast<char*>(backend->AllocateStagingHost(bytes));
    bytes_ = bytes;
  }
  return data_;
}

void StagingBuffer::Wait() {
  if (pending_ == nullptr) return;
  // The backend of the device now (tests swap in wrappers of the same memory).
  BackendFor(device_)->WaitForCopy(pending_);
  pending_ = nullptr;
}

void StagingBuffer::Release() {
  if (data_ == nullptr) return;
  Wait();
  BackendFor(device_)->FreeStagingHost(data_);
  data_ = nullptr;
  bytes_ = 0;
}

void StagedUpload::Copy(const Tensor& host, Tensor* dst) {
  CHECK(host.device() == Device::kCPU && host.is_contiguous() && dst->is_contiguous() &&
        host.shape() == dst->shape() && host.dtype() == dst->dtype())
      << "StagedUpload: " << host.ShapeString() << " into " << dst->ShapeString();
  if (dst->device() == Device::kCPU) {
    dst->CopyFrom(host);
    return;
  }
  const size_t n = host.nbytes();
  char* staging = staging_.Get(dst->device(), n);  // the previous copy has read it
  std::memcpy(staging, host.raw_data(), n);
  staging_.set_pending(
      BackendFor(dst->device())->CopyFromStagingAsync(dst->raw_data(), staging, n));
}

void HostCopies::Start(const std::vector<const Tensor*>& src, const std::vector<Tensor*>& dst) {
  CHECK(!started_) << "HostCopies::Start twice without Finish";
  CHECK_EQ(src.size(), dst.size()) << "HostCopies: sources and destinations differ";
  started_ = true;
  dst_ = dst;
  if (src.empty()) return;
  const Device device = src[0]->device();
  size_t total = 0;
  for (size_t i = 0; i < src.size(); ++i) {
    CHECK(src[i]->device() == device && src[i]->is_contiguous())
        << "HostCopies: " << src[i]->ShapeString() << " is not contiguous on "
        << DeviceName(device);
    CHECK(dst[i]->device() == Device::kCPU && dst[i]->is_contiguous() &&
          dst[i]->dtype() == src[i]->dtype() && dst[i]->nbytes() == src[i]->nbytes())
        << "HostCopies: " << src[i]->ShapeString() << " into " << dst[i]->ShapeString();
    total += src[i]->nbytes();
  }
  if (device == Device::kCPU) {
    for (size_t i = 0; i < src.size(); ++i) dst[i]->CopyFrom(*src[i]);
    dst_.clear();
    return;
  }
  Backend* backend = BackendFor(device);
  packed_ = Tensor::Empty({static_cast<int64_t>(total)}, DType::kU8, device);
  char* at = static_cast<char*>(packed_.raw_data());
  for (const Tensor* t : src) {
    backend->CopyWithin(at, t->raw_data(), t->nbytes());
    at += t->nbytes();
  }
  char* staging = staging_.Get(device, total);
  staging_.set_pending(backend->CopyToStagingAsync(staging, packed_.raw_data(), total));
}

void HostCopies::Finish() {
  CHECK(started_) << "HostCopies::Finish without Start";
  started_ = false;
  if (dst_.empty()) return;
  staging_.Wait();
  packed_ = Tensor();
  const char* from = staging_.data();
  for (Tensor* t : dst_) {
    std::memcpy(t->raw_data(), from, t->nbytes());
    from += t->nbytes();
  }
  dst_.clear();
}

void Tensor::CopyFrom(const Tensor& src) {
  CHECK(shape_ == src.shape_) << "CopyFrom " << src.ShapeString() << " into " << ShapeString();
  CHECK(dtype_ == src.dtype_) << "CopyFrom " << src.ShapeString() << " into " << ShapeString();
  if (device() != Device::kCPU || src.device() != Device::kCPU) {
    CHECK(is_contiguous() && src.is_contiguous())
        << "CopyFrom " << src.ShapeString() << " into " << ShapeString()
        << ": copies to, from or on a device need contiguous tensors (Contiguous() first)";
    if (device() == src.device()) {
      BackendFor(device())->CopyWithin(raw_data(), src.raw_data(), nbytes());
    } else if (src.device() == Device::kCPU) {
      BackendFor(device())->CopyFromHost(raw_data(), src.raw_data(), nbytes());
    } else {
      CHECK(device() == Device::kCPU) << "CopyFrom between two different devices";
      BackendFor(src.device())->CopyToHost(raw_data(), src.raw_data(), nbytes());
    }
    return;
  }
  const size_t es = DTypeSize(dtype_);
  if (is_contiguous() && src.is_contiguous()) {
    std::memmove(raw_data(), src.raw_data(), nbytes());
    return;
  }
  CHECK(is_contiguous()) << "CopyFrom into a strided tensor";
  char* d = static_cast<char*>(raw_data());
  const char* s = static_cast<const char*>(src.raw_data());
  ForEachStrided(src.shape_, src.strides_,
                 [&](int64_t di, int64_t si) { std::memcpy(d + di * es, s + si * es, es); });
}

Tensor Tensor::To(Device to) const {
  CHECK(defined()) << "To() of an undefined tensor";
  if (device() == to) return *this;
  Tensor t = Empty(shape_, dtype_, to);
  t.CopyFrom(device() == Device::kCPU ? Contiguous() : *this);
  return t;
}

Tensor Tensor::Contiguous() const { return is_contiguous() ? *this : Clone(); }

Tensor Tensor::Clone() const {
  Tensor t = Empty(shape_, dtype_, device());
  t.CopyFrom(*this);
  return t;
}

Tensor Tensor::Cast(DType to) const {
  Tensor src = Contiguous();
  Tensor out = Empty(shape_, to);
  const int64_t n = numel();
  auto load = [&](int64_t i) -> double {
    switch (dtype_) {
      case DType::kF32:
        return src.data<float>()[i];
      case DType::kBF16:
        return BF16ToFloat(src.data<BF16>()[i]);
      case DType::kF64:
        return src.data<double>()[i];
      default:
        LOG(FATAL) << "Cast from " << DTypeName(dtype_) << " is not supported";
    }
    return 0;
  };
  for (int64_t i = 0; i < n; ++i) {
    const double v = load(i);
    switch (to) {
      case DType::kF32:
        out.data<float>()[i] = static_cast<float>(v);
        break;
      case DType::kBF16:
        out.data<BF16>()[i] = FloatToBF16(static_cast<float>(v));
        break;
      case DType::kF64:
        out.data<double>()[i] = v;
        break;
      default:
        LOG(FATAL) << "Cast to " << DTypeName(to) << " is not supported";
    }
  }
  return out;
}

void Tensor::Fill(float value) {
  CHECK(is_contiguous()) << "Fill of a strided tensor";
  if (device() != Device::kCPU) {  // filled on the host, then copied: not for hot loops
    Tensor host = Empty(shape_, dtype_);
    host.Fill(value);
    CopyFrom(host);
    return;
  }
  const int64_t n = numel();
  switch (dtype_) {
    case DType::kF32:
      std::fill_n(data<float>(), n, value);
      break;
    case DType::kBF16:
      std::fill_n(data<BF16>(), n, FloatToBF16(value));
      break;
    case DType::kF64:
      std::fill_n(data<double>(), n, static_cast<double>(value));
      break;
    default:
      LOG(FATAL) << "Fill of a " << DTypeName(dtype_) << " tensor";
  }
}

void Tensor::SetZero() {
  CHECK(is_contiguous()) << "SetZero of a strided tensor";
  BackendFor(device())->SetZero(raw_data(), nbytes());
}

std::string Tensor::ShapeString() const {
  if (!defined()) return "[undefined]";
  return ShapeToString(shape_) + " " + DTypeName(dtype_) +
         (device() == Device::kCPU ? "" : std::string(" ") + DeviceName(device()));
}

// ---------------------------------------------------------------------------------------
Arena::Arena(size_t initial_bytes, Device device) : device_(device) {
  if (initial_bytes > 0)
    blocks_.push_back({Storage::Allocate(initial_bytes, "activation arena block", device_), 0});
}

size_t Arena::capacity_bytes() const {
  size_t c = 0;
  for (const Block& b : blocks_) c += b.storage->bytes();
  return c;
}

Tensor Arena::Allocate(const Shape& shape, DType dtype) {
  const size_t bytes = NumElements(shape) * DTypeSize(dtype);
  const size_t padded = (bytes + kTensorAlignment - 1) / kTensorAlignment * kTensorAlignment;
  // The next block with room, in order (the blocks a Reset() kept are reused as they are).
  while (current_ < blocks_.size() &&
         blocks_[current_].used + padded > blocks_[current_].storage->bytes()) {
    ++current_;
  }
  if (current_ == blocks_.size()) {
    // Grow: at least double, so a step needs O(log) new blocks the first time only.
    const size_t size = std::max(padded, std::max<size_t>(capacity_bytes(), 1 << 20));
    blocks_.push_back({Storage::Allocate(size, "activation arena block", device_), 0});
  }
  Block* block = &blocks_[current_];
  Tensor t = Tensor::OnStorage(block->storage, block->used, shape, dtype);
  block->used += padded;
  used_total_ += padded;
  high_water_ = std::max(high_water_, used_total_);
  return t;
}

Tensor Arena::AllocateZeros(const Shape& shape, DType dtype) {
  Tensor t = Allocate(shape, dtype);
  t.SetZero();
  return t;
}

void Arena::Reset() {
  // Merge only blocks that nothing else holds: clearing them then frees them before the
  // merged block is allocated.
  const bool unheld = std::all_of(blocks_.begin(), blocks_.end(),
                                  [](const Block& b) { return b.storage.use_count() == 1; });
  if (blocks_.size() > 1 && unheld) {
    blocks_.clear();
    blocks_.push_back({Storage::Allocate(high_water_, "activation arena block", device_), 0});
  }
  for (Block& b : blocks_) b.used = 0;
  current_ = 0;
  used_total_ = 0;
}

}  // namespace moerun
