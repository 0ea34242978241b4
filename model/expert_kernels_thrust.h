// The elementwise and reduction steps of the device expert MLP (model/expert_mlp_device.h)
// as Thrust algorithms with MOERUN_HD functors: bias + GELU (kept pre-activation, bf16
// activation), bias add, GELU backward (fp32 and bf16 copies), bias gradients, fp32 ->
// bf16. Like model/routing_thrust.h the same source compiles with nvcc for a CUDA device
// and with the host compiler against the CCCL headers, where tests/device_ops_test.cc
// checks it against the CPU kernels (runtime/kernels.h). bf16 values are uint16 bit
// patterns, rounded to nearest even as FloatToBF16.
#ifndef MOERUN_MODEL_EXPERT_KERNELS_THRUST_H_
#define MOERUN_MODEL_EXPERT_KERNELS_THRUST_H_

#include <thrust/for_each.h>
#include <thrust/iterator/counting_iterator.h>
#include <thrust/memory.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <new>
#include <utility>

#include "runtime/device_math.h"

namespace moerun {
namespace thrust_experts {

// 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) or 0.5 x (1 + erf(x / sqrt 2)).
MOERUN_HD inline float Gelu(float x, bool tanh_form) {
  if (tanh_form) {
    const float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
    return 0.5f * x * (1.0f + tanhf(u));
  }
  return 0.5f * x * (1.0f + erff(x * 0.7071067811865476f));
}

MOERUN_HD inline float GeluGrad(float x, bool tanh_form) {
  if (tanh_form) {
    const float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
    const float t = tanhf(u);
    const float du = 0.7978845608028654f * (1.0f + 3.0f * 0.044715f * x * x);
    return 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * du;
  }
  const float cdf = 0.5f * (1.0f + erff(x * 0.7071067811865476f));
  return cdf + x * 0.3989422804014327f * expf(-0.5f * x * x);
}

struct CastFunctor {
  const float* src;
  uint16_t* dst;
  MOERUN_HD void operator()(int64_t i) const { dst[i] = ToBF16Bits(src[i]); }
};

// Element i of [experts, rows, cols]: h += bias[expert, col]; act = bf16(gelu(h)).
struct BiasGeluFunctor {
  float* h;
  const float* bias;
  int64_t rows, cols;
  bool tanh_form;
  uint16_t* act;
  MOERUN_HD void operator()(int64_t i) const {
    const float v = h[i] + bias[(i / (rows * cols)) * cols + i % cols];
    h[i] = v;
    act[i] = ToBF16Bits(Gelu(v, tanh_form));
  }
};

struct AddBiasFunctor {
  float* y;
  const float* bias;
  int64_t rows, cols;
  MOERUN_HD void operator()(int64_t i) const {
    y[i] += bias[(i / (rows * cols)) * cols + i % cols];
  }
};

struct GeluBackwardFunctor {
  const float* h;
  const uint16_t* h_bf16;  // instead of h when given: the pre-activation kept in bf16
  float* d;
  bool tanh_form;
  uint16_t* d_bf16;
  MOERUN_HD void operator()(int64_t i) const {
    const float x = h_bf16 != nullptr ? FromBF16Bits(h_bf16[i]) : h[i];
    const float g = d[i] * GeluGrad(x, tanh_form);
    d[i] = g;
    d_bf16[i] = ToBF16Bits(g);
  }
};

// One (expert, column): its rows summed in row order, added to dbias. Also the second pass
// of the column sums below, over the blocks' sums as rows.
struct BiasGradFunctor {
  const float* dy;
  float* dbias;
  int64_t rows, cols;
  MOERUN_HD void operator()(int64_t i) const {
    const int64_t e = i / cols, c = i % cols;
    const float* p = dy + e * rows * cols + c;
    float sum = 0.0f;
    for (int64_t r = 0; r < rows; ++r) sum += p[r * cols];
    dbias[i] += sum;
  }
};

template <typename Policy, typename F>
void ForIndices(const Policy& policy, int64_t n, F f) {
  if (n <= 0) return;
  thrust::for_each(policy, thrust::counting_iterator<int64_t>(0),
                   thrust::counting_iterator<int64_t>(n), f);
}

// n floats of temporary storage from the policy's system (through its allocator where it
// has one: the CUDA backend's pool), handed back on destruction.
template <typename Policy>
class ScratchFloats {
 public:
  ScratchFloats(const Policy& policy, int64_t n)
      : policy_(policy), buf_(thrust::get_temporary_buffer<float>(policy, n)) {
    if (buf_.second < n) throw std::bad_alloc();
  }
  ~ScratchFloats() { thrust::return_temporary_buffer(policy_, buf_.first, buf_.second); }
  ScratchFloats(const ScratchFloats&) = delete;
  ScratchFloats& operator=(const ScratchFloats&) = delete;
  float* get() const { return thrust::raw_pointer_cast(buf_.first); }

 private:
  const Policy& policy_;
  decltype(thrust::get_temporary_buffer<float>(std::declval<const Policy&>(), 0)) buf_;
};

// Column sums of a tall matrix in two passes, so that the device has more than one thread
// per column to run (a column's thread would otherwise loop over every row): each block of
// kColumnChunkRows rows sums its columns into a scratch row, then each column adds its
// blocks' sums, in block order, to the output. The order is fixed, not the device's: the
// same bits on every device and run. Up to kColumnChunkRows rows are one block, summed in
// row order as the CPU's kernels do.
constexpr int64_t kColumnChunkRows = 64;

inline int64_t ColumnChunks(int64_t rows) {
  return (rows + kColumnChunkRows - 1) / kColumnChunkRows;
}

// partial[(e * chunks + c) * cols + j] = the sum of x[e, r, j] over block c's rows r.
struct ChunkColumnSumFunctor {
  const float* x;
  float* partial;
  int64_t rows, cols, chunks;
  MOERUN_HD void operator()(int64_t i) const {
    const int64_t j = i % cols, c = (i / cols) % chunks, e = i / (cols * chunks);
    const int64_t r0 = c * kColumnChunkRows;
    const int64_t r1 = r0 + kColumnChunkRows < rows ? r0 + kColumnChunkRows : rows;
    const float* p = x + e * rows * cols + j;
    float s = 0.0f;
    for (int64_t r = r0; r < r1; ++r) s += p[r * cols];
    partial[i] = s;
  }
};

template <typename Policy>
void CastToBF16(const Policy& p, const float* src, uint16_t* dst, int64_t n) {
  ForIndices(p, n, CastFunctor{src, dst});
}
template <typename Policy>
void BiasGeluForward(const Policy& p, float* h, const float* bias, int64_t experts, int64_t rows,
                     int64_t cols, bool tanh_form, uint16_t* act) {
  ForIndices(p, experts * rows * cols, BiasGeluFunctor{h, bias, rows, cols, tanh_form, act});
}
template <typename Policy>
void AddBias(const Policy& p, float* y, const float* bias, int64_t experts, int64_t rows,
             int64_t cols) {
  ForIndices(p, experts * rows * cols, AddBiasFunctor{y, bias, rows, cols});
}
template <typename Policy>
void GeluBackward(const Policy& p, const float* h, float* d, int64_t n, bool tanh_form,
                  uint16_t* d_bf16) {
  ForIndices(p, n, GeluBackwardFunctor{h, nullptr, d, tanh_form, d_bf16});
}
// The same from a bf16 pre-activation (a fused GEMM epilogue's aux output).
template <typename Policy>
void GeluBackwardFromBF16(const Policy& p, const uint16_t* h_bf16, float* d, int64_t n,
                          bool tanh_form, uint16_t* d_bf16) {
  ForIndices(p, n, GeluBackwardFunctor{nullptr, h_bf16, d, tanh_form, d_bf16});
}
// dbias[e] += the sum over the rows of dy[e] (a column sum: two passes past
// kColumnChunkRows rows).
template <typename Policy>
void BiasGrad(const Policy& p, const float* dy, float* dbias, int64_t experts, int64_t rows,
              int64_t cols) {
  if (rows <= 0 || experts * cols <= 0) return;
  const int64_t chunks = ColumnChunks(rows);
  if (chunks == 1) {
    ForIndices(p, experts * cols, BiasGradFunctor{dy, dbias, rows, cols});
    return;
  }
  ScratchFloats<Policy> partial(p, experts * chunks * cols);
  ForIndices(p, experts * chunks * cols,
             ChunkColumnSumFunctor{dy, partial.get(), rows, cols, chunks});
  ForIndices(p, experts * cols, BiasGradFunctor{partial.get(), dbias, chunks, cols});
}

}  // namespace thrust_experts
}  // namespace moerun

#endif  // MOERUN_MODEL_EXPERT_KERNELS_THRUST_H_
