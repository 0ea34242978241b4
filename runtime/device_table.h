// A host-made table kept on a device between calls: a kernel's per-call description (the
// arrays of a training step's parameters or gradients, say) that is the same every step is
// uploaded once, and again only when it changes.
#ifndef MOERUN_RUNTIME_DEVICE_TABLE_H_
#define MOERUN_RUNTIME_DEVICE_TABLE_H_

#include <cstring>
#include <functional>
#include <vector>

#include "runtime/backend.h"
#include "runtime/tensor.h"

namespace moerun {

class DeviceTable {
 public:
  // The device copy of the table `make` builds from `key` (host bytes that determine it,
  // compared byte for byte: no padding in them); made and uploaded only when the key
  // differs from the last call's. The old copy is freed in stream order. Free this object
  // while the device's backend is registered.
  const void* Get(Device device, const void* key, size_t key_bytes,
                  const std::function<std::vector<unsigned char>()>& make) {
    const auto* k = static_cast<const unsigned char*>(key);
    if (!table_.defined() || key_.size() != key_bytes ||
        std::memcmp(key_.data(), k, key_bytes) != 0) {
      const std::vector<unsigned char> host = make();
      table_ = Tensor::Empty({static_cast<int64_t>(host.size())}, DType::kU8, device);
      RequireBackend(device).CopyFromHost(table_.raw_data(), host.data(), host.size());
      key_.assign(k, k + key_bytes);
    }
    return table_.raw_data();
  }
  // The same where the key is the table itself.
  const void* Get(Device device, const void* bytes, size_t n) {
    return Get(device, bytes, n, [&] {
      const auto* b = static_cast<const unsigned char*>(bytes);
      return std::vector<unsigned char>(b, b + n);
    });
  }

 private:
  Tensor table_;
  std::vector<unsigned char> key_;
};

}  // namespace moerun

#endif  // MOERUN_RUNTIME_DEVICE_TABLE_H_
