// Kernels of the CUDA expert MLP: bias + GELU, GELU backward, bias gradients, fp32 -> bf16.
#include <cuda_runtime.h>

#include <cmath>

#include "model/expert_kernels_cuda.h"

namespace moerun {
namespace {

constexpr int kThreads = 256;

inline int Blocks(int64_t n) {
  const int64_t b = (n + kThreads - 1) / kThreads;
  return static_cast<int>(b < 65535 * 32 ? b : 65535 * 32);
}

inline cudaStream_t S(void* stream) { return static_cast<cudaStream_t>(stream); }

// Round to nearest even, NaN kept quiet: the same bits as FloatToBF16 on the host.
__device__ __forceinline__ uint16_t ToBF16Bits(float f) {
  const uint32_t u = __float_as_uint(f);
  if ((u & 0x7f800000u) == 0x7f800000u && (u & 0x007fffffu) != 0) {
    return static_cast<uint16_t>((u >> 16) | 0x0040u);
  }
  return static_cast<uint16_t>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

constexpr float kSqrt2OverPi = 0.7978845608028654f;
constexpr float kInvSqrt2 = 0.7071067811865476f;

__device__ __forceinline__ float Gelu(float x, bool tanh_form) {
  if (tanh_form) {
    const float u = kSqrt2OverPi * (x + 0.044715f * x * x * x);
    return 0.5f * x * (1.0f + tanhf(u));
  }
  return 0.5f * x * (1.0f + erff(x * kInvSqrt2));
}

__device__ __forceinline__ float GeluGrad(float x, bool tanh_form) {
  if (tanh_form) {
    const float u = kSqrt2OverPi * (x + 0.044715f * x * x * x);
    const float t = tanhf(u);
    const float du = kSqrt2OverPi * (1.0f + 3.0f * 0.044715f * x * x);
    return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * du;
  }
  const float cdf = 0.5f * (1.0f + erff(x * kInvSqrt2));
  const float pdf = 0.3989422804014327f * expf(-0.5f * x * x);
  return cdf + x * pdf;
}

__global__ void CastKernel(const float* src, uint16_t* dst, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    dst[i] = ToBF16Bits(src[i]);
  }
}

__global__ void BiasGeluKernel(float* h, const float* bias, int64_t rows, int64_t cols, int64_t n,
                               bool tanh_form, uint16_t* act) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t e = i / (rows * cols), c = i % cols;
    const float v = h[i] + bias[e * cols + c];
    h[i] = v;
    act[i] = ToBF16Bits(Gelu(v, tanh_form));
  }
}

__global__ void AddBiasKernel(float* y, const float* bias, int64_t rows, int64_t cols, int64_t n) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    y[i] += bias[(i / (rows * cols)) * cols + i % cols];
  }
}

__global__ void GeluBackwardKernel(const float* h, float* d, int64_t n, bool tanh_form,
                                   uint16_t* d_bf16) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float g = d[i] * GeluGrad(h[i], tanh_form);
    d[i] = g;
    d_bf16[i] = ToBF16Bits(g);
  }
}

// One thread per (expert, column), rows summed in order (coalesced across columns).
__global__ void BiasGradKernel(const float* dy, float* dbias, int64_t experts, int64_t rows,
                               int64_t cols) {
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= experts * cols) return;
  const int64_t e = i / cols, c = i % cols;
  const float* p = dy + e * rows * cols + c;
  float sum = 0.0f;
  for (int64_t r = 0; r < rows; ++r) sum += p[r * cols];
  dbias[i] += sum;
}

}  // namespace

void CudaCastToBF16(const float* src, uint16_t* dst, int64_t n, void* stream) {
  if (n > 0) CastKernel<<<Blocks(n), kThreads, 0, S(stream)>>>(src, dst, n);
}

void CudaBiasGeluForward(float* h, const float* bias, int64_t experts, int64_t rows, int64_t cols,
                         bool gelu_tanh, uint16_t* act, void* stream) {
  const int64_t n = experts * rows * cols;
  if (n > 0) {
    BiasGeluKernel<<<Blocks(n), kThreads, 0, S(stream)>>>(h, bias, rows, cols, n, gelu_tanh, act);
  }
}

void CudaAddBias(float* y, const float* bias, int64_t experts, int64_t rows, int64_t cols,
                 void* stream) {
  const int64_t n = experts * rows * cols;
  if (n > 0) AddBiasKernel<<<Blocks(n), kThreads, 0, S(stream)>>>(y, bias, rows, cols, n);
}

void CudaGeluBackward(const float* h, float* d_act, int64_t n, bool gelu_tanh, uint16_t* dh_bf16,
                      void* stream) {
  if (n > 0) {
    GeluBackwardKernel<<<Blocks(n), kThreads, 0, S(stream)>>>(h, d_act, n, gelu_tanh, dh_bf16);
  }
}

void CudaBiasGrad(const float* dy, float* dbias, int64_t experts, int64_t rows, int64_t cols,
                  void* stream) {
  const int64_t n = experts * cols;
  if (n > 0 && rows > 0) {
    BiasGradKernel<<<Blocks(n), kThreads, 0, S(stream)>>>(dy, dbias, experts, rows, cols);
  }
}

}  // namespace moerun
