// What host and device code share: MOERUN_HD (functions for both under nvcc, plain host
// functions otherwise) and bf16 conversion usable in device code, bit for bit as
// FloatToBF16 / BF16ToFloat (runtime/dtype.h).
#ifndef MOERUN_RUNTIME_DEVICE_MATH_H_
#define MOERUN_RUNTIME_DEVICE_MATH_H_

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define MOERUN_HD __host__ __device__
#else
#define MOERUN_HD
#endif

namespace moerun {

// Round to nearest even; NaN stays a quiet NaN.
MOERUN_HD inline uint16_t ToBF16Bits(float f) {
#if defined(__CUDA_ARCH__)
  const uint32_t u = __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
#endif
  if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu) != 0) {
    return static_cast<uint16_t>((u >> 16) | 0x0040u);
  }
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// sum_i a[i] b[i] in T over 16 fixed lanes of partial sums (lane i mod 16), then the lanes
// in order: one order on host and device, and on the host the fixed lanes vectorise.
template <typename T>
MOERUN_HD inline T LaneDot(const float* a, const float* b, int64_t n) {
  constexpr int kLanes = 16;
  T acc[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] += static_cast<T>(a[i + l]) * b[i + l];
  }
  for (int l = 0; i < n; ++i, ++l) acc[l] += static_cast<T>(a[i]) * b[i];
  T sum = 0;
  for (int l = 0; l < kLanes; ++l) sum += acc[l];
  return sum;
}

// In float: the summation order runtime/kernels.h's RowInvariantGemmNT promises, shared
// with its Thrust form.
MOERUN_HD inline float RowInvariantDot(const float* a, const float* b, int64_t k) {
  return LaneDot<float>(a, b, k);
}

// In double: each float product is exact, so only the additions round (the MoE combine's
// gate gradient; one serial chain of n additions took most of its backward).
MOERUN_HD inline double LaneDotF64(const float* a, const float* b, int64_t n) {
  return LaneDot<double>(a, b, n);
}

MOERUN_HD inline float FromBF16Bits(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

}  // namespace moerun

#endif  // MOERUN_RUNTIME_DEVICE_MATH_H_
