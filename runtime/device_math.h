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

// sum_i a[i] b[i] over 16 fixed lanes of partial sums, then the lanes in order: the
// summation order runtime/kernels.h's RowInvariantGemmNT promises, shared with its Thrust
// form so host and device follow one order.
MOERUN_HD inline float RowInvariantDot(const float* a, const float* b, int64_t k) {
  constexpr int kLanes = 16;
  float acc[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= k; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] += a[i + l] * b[i + l];
  }
  for (int l = 0; i < k; ++i, ++l) acc[l] += a[i] * b[i];
  float sum = 0.0f;
  for (int l = 0; l < kLanes; ++l) sum += acc[l];
  return sum;
}

// sum_i a[i] b[i] in double over 16 fixed lanes of partial sums (i mod 16), then the
// lanes in order. Each float product is exact in double, so only the additions round; the
// fixed lanes let the host compiler vectorise it (one serial chain of n additions took
// most of the MoE combine's backward).
MOERUN_HD inline double LaneDotF64(const float* a, const float* b, int64_t n) {
  constexpr int kLanes = 16;
  double acc[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) acc[l] += static_cast<double>(a[i + l]) * b[i + l];
  }
  for (int l = 0; i < n; ++i, ++l) acc[l] += static_cast<double>(a[i]) * b[i];
  double sum = 0.0;
  for (int l = 0; l < kLanes; ++l) sum += acc[l];
  return sum;
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
