// Element types and devices a Tensor can hold, and bf16 <-> fp32 conversion.
#ifndef MOERUN_RUNTIME_DTYPE_H_
#define MOERUN_RUNTIME_DTYPE_H_

#include <cstddef>
#include <cstdint>
#include <cstring>

namespace moerun {

enum class DType : uint8_t { kF32, kBF16, kF64, kI32, kI64, kU8 };
enum class Device : uint8_t { kCPU, kCUDA };

constexpr size_t DTypeSize(DType t) {
  switch (t) {
    case DType::kF32:
    case DType::kI32:
      return 4;
    case DType::kBF16:
      return 2;
    case DType::kF64:
    case DType::kI64:
      return 8;
    case DType::kU8:
      return 1;
  }
  return 0;
}

// Names as safetensors writes them ("F32", "BF16", ...).
const char* DTypeName(DType t);
const char* DeviceName(Device d);

// bf16 storage: the upper 16 bits of an IEEE fp32. Conversion rounds to nearest even;
// NaN stays NaN (quiet).
struct BF16 {
  uint16_t bits;
};

inline BF16 FloatToBF16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu) != 0) {
    return BF16{static_cast<uint16_t>((u >> 16) | 0x0040u)};  // quiet NaN
  }
  const uint32_t rounding_bias = 0x7fffu + ((u >> 16) & 1u);
  return BF16{static_cast<uint16_t>((u + rounding_bias) >> 16)};
}

inline float BF16ToFloat(BF16 b) {
  const uint32_t u = static_cast<uint32_t>(b.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
}

template <typename T>
struct DTypeOf;
template <>
struct DTypeOf<float> {
  static constexpr DType value = DType::kF32;
};
template <>
struct DTypeOf<BF16> {
  static constexpr DType value = DType::kBF16;
};
template <>
struct DTypeOf<double> {
  static constexpr DType value = DType::kF64;
};
template <>
struct DTypeOf<int32_t> {
  static constexpr DType value = DType::kI32;
};
template <>
struct DTypeOf<int64_t> {
  static constexpr DType value = DType::kI64;
};
template <>
struct DTypeOf<uint8_t> {
  static constexpr DType value = DType::kU8;
};

}  // namespace moerun

#endif  // MOERUN_RUNTIME_DTYPE_H_
