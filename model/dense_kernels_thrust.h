// The dense ops of model/ops.h as Thrust algorithms with MOERUN_HD functors (the router's
// row-invariant GEMM, softmax and its backward, layer norm and its backward, GELU, bias,
// add, axpy, the MoE attention's per-choice attention), and ThrustOps<Policy>: those
// kernels, model/routing_thrust.h's top-k / pack / combine and runtime/adamw_thrust.h's
// AdamW as OpsTable entries. Like routing_thrust.h the same source compiles with nvcc for a
// CUDA device (the CUDA table, model/ops_cuda.cu) and with the host compiler against the
// CCCL headers, where tests/device_ops_test.cc runs every entry against the CPU table. The
// row kernels (softmax, layer norm) are runtime/row_kernels.h's lane forms, which sum in
// another order than the CPU's (within a few ulps); the rest matches runtime/kernels.h bit
// for bit wherever both use the same libm function.
#ifndef MOERUN_MODEL_DENSE_KERNELS_THRUST_H_
#define MOERUN_MODEL_DENSE_KERNELS_THRUST_H_

#include <thrust/fill.h>
#include <thrust/functional.h>
#include <thrust/transform_reduce.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "model/choice_attention.h"
#include "model/expert_kernels_thrust.h"
#include "model/ops.h"
#include "model/router_noise.h"
#include "model/routing_thrust.h"
#include "runtime/adamw_thrust.h"
#include "runtime/backend.h"
#include "runtime/device_math.h"
#include "runtime/device_table.h"
#include "runtime/row_kernels.h"
#include "runtime/tensor.h"

namespace moerun {
namespace thrust_dense {

// The row kernels in runtime/row_kernels.h's lane form, one row per index. `G` runs the
// lanes: rowwise::HostLanes (all in one thread, the host build's and the tests' table), or
// model/ops_cuda.cu's warp (the CUDA table launches those kernels itself, a warp per row).
template <typename G = rowwise::HostLanes>
struct SoftmaxRowFunctor {
  const float* x;
  float* y;
  int64_t cols;
  MOERUN_HD void operator()(int64_t r, const G& g = G()) const {
    rowwise::SoftmaxLanes(g, x + r * cols, y + r * cols, cols);
  }
};

template <typename G = rowwise::HostLanes>
struct SoftmaxBackwardRowFunctor {
  const float* y;
  const float* dy;
  float* dx;
  int64_t cols;
  MOERUN_HD void operator()(int64_t r, const G& g = G()) const {
    rowwise::SoftmaxBackwardLanes(g, y + r * cols, dy + r * cols, dx + r * cols, cols);
  }
};

template <typename G = rowwise::HostLanes>
struct LayerNormRowFunctor {
  const float *x, *gamma, *beta;
  float *y, *mean, *rstd;
  int64_t cols;
  float eps;
  MOERUN_HD void operator()(int64_t r, const G& g = G()) const {
    rowwise::LayerNormLanes(g, x + r * cols, gamma, beta, y + r * cols, mean + r, rstd + r, cols,
                            eps);
  }
};

template <typename G = rowwise::HostLanes>
struct LayerNormBackwardRowFunctor {
  const float *x, *gamma, *mean, *rstd, *dy;
  float* dx;
  int64_t cols;
  MOERUN_HD void operator()(int64_t r, const G& g = G()) const {
    rowwise::LayerNormBackwardLanes(g, x + r * cols, gamma, mean[r], rstd[r], dy + r * cols,
                                    dx + r * cols, cols);
  }
};

// Column j of dgamma and dbeta, its rows summed in row order (as the CPU kernel).
struct LayerNormParamGradFunctor {
  const float *x, *mean, *rstd, *dy;
  float *dgamma, *dbeta;
  int64_t rows, cols;
  MOERUN_HD void operator()(int64_t j) const {
    float g = dgamma[j], b = dbeta[j];
    for (int64_t r = 0; r < rows; ++r) {
      const float d = dy[r * cols + j];
      g += d * (x[r * cols + j] - mean[r]) * rstd[r];
      b += d;
    }
    dgamma[j] = g;
    dbeta[j] = b;
  }
};

// Sums of squares of many arrays without a host wait per array, in levels: the squares'
// level has ceil(n / kSquareChunk) threads, thread t summing elements t, t + T, ... in
// order in double (neighbouring threads read neighbouring floats); each next level sums
// the last one's partials the same way, until one thread writes the array's total. Every
// thread adds at most kSquareChunk values: a short chain on a GPU, in a fixed order, the
// same on every device and run.
constexpr int64_t kSquareChunk = 256;

inline int64_t StridedThreads(int64_t n) {
  return n <= 0 ? 0 : (n + kSquareChunk - 1) / kSquareChunk;
}

// The scratch doubles PlanSquareLevels needs for these arrays: every level's partials
// but the last (one value, written to the output).
inline int64_t SquareScratch(const int64_t* n, int64_t count) {
  int64_t s = 0;
  for (int64_t i = 0; i < count; ++i) {
    for (int64_t t = StridedThreads(n[i]); t > 1; t = StridedThreads(t)) s += t;
  }
  return s;
}

// partial[t] = the sum over j = t, t + threads, ... < n, in order and in double, of x[j]^2
// for floats (the squares' level) or of x[j] for doubles (the levels after it).
template <typename T>
struct StridedSumFunctor {
  const T* x;
  int64_t n, threads;
  double* partial;
  MOERUN_HD void operator()(int64_t t) const {
    double s = 0.0;
    for (int64_t j = t; j < n; j += threads) {
      const double v = static_cast<double>(x[j]);
      if constexpr (std::is_same_v<T, float>) {
        s += v * v;
      } else {
        s += v;
      }
    }
    partial[t] = s;
  }
};

// One level of the sums of squares of many arrays at once: segment s holds threads
// [first, first + threads) of the level, summing len values of src (floats at the first
// level, the previous level's partial sums after it) into dst[0, threads) (an array's last
// level: its total, one thread).
struct SquareSegment {
  const void* src;
  double* dst;
  int64_t len, threads, first;
};

// Every level's segments, level by level: level l's are segments[begin[l], begin[l + 1]),
// over threads[l] threads in all.
struct SquareLevels {
  std::vector<SquareSegment> segments;
  std::vector<int64_t> begin, threads;
};

// The levels for out[i] = the sum of squares of x[i][0, n[i]) (scratch: SquareScratch(n,
// count) doubles for the partial sums, on the device; an empty array's total is 0). Each
// array takes the same levels and partial sums, in the same order, as it would alone.
inline SquareLevels PlanSquareLevels(const float* const* x, const int64_t* n, int64_t count,
                                     double* scratch, double* out) {
  std::vector<std::vector<SquareSegment>> by_level;
  for (int64_t i = 0; i < count; ++i) {
    const void* src = x[i];
    int64_t len = n[i] > 0 ? n[i] : 0;
    for (size_t l = 0;; ++l) {
      const int64_t threads = len > 0 ? StridedThreads(len) : 1;
      double* dst = threads == 1 ? out + i : scratch;
      if (by_level.size() <= l) by_level.emplace_back();
      std::vector<SquareSegment>& level = by_level[l];
      const int64_t first = level.empty() ? 0 : level.back().first + level.back().threads;
      level.push_back({src, dst, len, threads, first});
      if (threads == 1) break;
      src = scratch;
      scratch += threads;
      len = threads;
    }
  }
  SquareLevels plan;
  for (const std::vector<SquareSegment>& level : by_level) {
    plan.begin.push_back(static_cast<int64_t>(plan.segments.size()));
    plan.threads.push_back(level.back().first + level.back().threads);
    plan.segments.insert(plan.segments.end(), level.begin(), level.end());
  }
  plan.begin.push_back(static_cast<int64_t>(plan.segments.size()));
  return plan;
}

// Thread t of a level: the segment holding it (the last whose first <= t), then that
// segment's StridedSumFunctor at t - first.
template <typename T>
struct SegmentedSumFunctor {
  const SquareSegment* segment;
  int64_t count;
  MOERUN_HD void operator()(int64_t t) const {
    int64_t lo = 0, hi = count - 1;
    while (lo < hi) {
      const int64_t mid = lo + (hi - lo + 1) / 2;
      if (segment[mid].first <= t) {
        lo = mid;
      } else {
        hi = mid - 1;
      }
    }
    const SquareSegment& s = segment[lo];
    StridedSumFunctor<T>{static_cast<const T*>(s.src), s.len, s.threads, s.dst}(t - s.first);
  }
};

// Queues the levels of `plan`, one launch each (the arrays' levels side by side), with its
// segments at `segments` on the policy's device: the sums PlanSquareLevels describes, the
// same bits as the arrays summed one by one.
template <typename Policy>
void QueueSquareLevels(const Policy& policy, const SquareLevels& plan,
                       const SquareSegment* segments) {
  for (size_t l = 0; l + 1 < plan.begin.size(); ++l) {
    const SquareSegment* level = segments + plan.begin[l];
    const int64_t count = plan.begin[l + 1] - plan.begin[l];
    if (l == 0) {
      ForIndices(policy, plan.threads[l], SegmentedSumFunctor<float>{level, count});
    } else {
      ForIndices(policy, plan.threads[l], SegmentedSumFunctor<double>{level, count});
    }
  }
}

// A device table's sum_of_squares_many (CUDA's; the tests' stand-in for it): the sums in the
// device's memory by QueueSquareLevels, then one copy of the totals to the host. Its partial
// sums and the level table stay on the device between calls: a training step sums the same
// gradients every time, so the table is uploaded again only when the arrays (or the
// scratch) move. Run one instance per host thread; free it while the device's backend is
// registered.
class DeviceSquareSums {
 public:
  template <typename Policy>
  void Run(const Policy& policy, Device device, const float* const* x, const int64_t* n,
           int64_t count, double* out) {
    if (count <= 0) return;
    const int64_t partials = SquareScratch(n, count);
    if (!sums_.defined() || sums_.numel() < partials + count) {
      sums_ = Tensor::Empty({partials + count}, DType::kF64, device);
    }
    double* s = sums_.device_data<double>(device);
    const SquareLevels plan = PlanSquareLevels(x, n, count, s, s + partials);
    const void* segments =
        segments_.Get(device, plan.segments.data(), plan.segments.size() * sizeof(SquareSegment));
    QueueSquareLevels(policy, plan, static_cast<const SquareSegment*>(segments));
    RequireBackend(device).CopyToHost(out, s + partials, count * sizeof(double));
  }

 private:
  Tensor sums_;
  DeviceTable segments_;
};

// Block c's sums for the layer norm's parameter gradients (see thrust_experts'
// ChunkColumnSumFunctor): partial_g[c * cols + j] = sum of dy (x - mean) rstd, partial_b[...]
// = sum of dy over the block's rows r.
struct LayerNormParamChunkFunctor {
  const float *x, *mean, *rstd, *dy;
  float *partial_g, *partial_b;
  int64_t rows, cols;
  MOERUN_HD void operator()(int64_t i) const {
    const int64_t j = i % cols, c = i / cols;
    const int64_t r0 = c * thrust_experts::kColumnChunkRows;
    const int64_t r1 =
        r0 + thrust_experts::kColumnChunkRows < rows ? r0 + thrust_experts::kColumnChunkRows : rows;
    float g = 0.0f, b = 0.0f;
    for (int64_t r = r0; r < r1; ++r) {
      const float d = dy[r * cols + j];
      g += d * (x[r * cols + j] - mean[r]) * rstd[r];
      b += d;
    }
    partial_g[i] = g;
    partial_b[i] = b;
  }
};

struct GeluFunctor {
  const float* x;
  float* y;
  bool tanh_form;
  MOERUN_HD void operator()(int64_t i) const { y[i] = thrust_experts::Gelu(x[i], tanh_form); }
};

struct TanhFunctor {
  const float* x;
  float* y;
  MOERUN_HD void operator()(int64_t i) const { y[i] = tanhf(x[i]); }
};

struct TanhGradFunctor {
  const float *y, *dy;
  float* dx;
  MOERUN_HD void operator()(int64_t i) const { dx[i] = dy[i] * (1.0f - y[i] * y[i]); }
};

struct GeluGradFunctor {
  const float *x, *dy;
  float* dx;
  bool tanh_form;
  MOERUN_HD void operator()(int64_t i) const {
    dx[i] = dy[i] * thrust_experts::GeluGrad(x[i], tanh_form);
  }
};

// Element i of [rows, cols]: h += bias[col]; act = gelu(h).
struct BiasGeluF32Functor {
  float* h;
  const float* bias;
  float* act;
  int64_t cols;
  bool tanh_form;
  MOERUN_HD void operator()(int64_t i) const {
    const float v = h[i] + bias[i % cols];
    h[i] = v;
    act[i] = thrust_experts::Gelu(v, tanh_form);
  }
};

struct RouterGemmFunctor {
  const float *a, *b;
  float* c;
  int64_t n, k;
  MOERUN_HD void operator()(int64_t i) const {
    c[i] = RowInvariantDot(a + (i / n) * k, b + (i % n) * k, k);
  }
};

struct AddFunctor {
  const float *a, *b;
  float* y;
  MOERUN_HD void operator()(int64_t i) const { y[i] = a[i] + b[i]; }
};

struct SquareFunctor {
  MOERUN_HD double operator()(float v) const { return static_cast<double>(v) * v; }
};

struct AxpyFunctor {
  float alpha;
  const float* x;
  float* y;
  MOERUN_HD void operator()(int64_t i) const { y[i] += alpha * x[i]; }
};

struct ZeroDroppedRowsFunctor {
  const int32_t* row;
  float* x;
  int64_t cols;
  MOERUN_HD void operator()(int64_t i) const {
    if (row[i / cols] < 0) x[i] = 0.0f;
  }
};

// The router's noise, one token per index (model/router_noise.h's AddTokenNoise).
struct RouterNoiseFunctor {
  NoiseKey key;
  int64_t first_token;
  int num_experts;
  float sigma;
  const float* z;
  float* zn;
  MOERUN_HD void operator()(int64_t t) const {
    AddTokenNoise(key, static_cast<uint64_t>(first_token + t), num_experts, sigma,
                  z + t * num_experts, zn + t * num_experts);
  }
};

// The router's d(logits), one token per index (rowwise::RouterLogitsBackward).
struct RouterLogitsBackwardFunctor {
  const float* y;
  const int32_t *expert_index, *row;
  const float *d_weight, *dz_loss;
  float* dz;
  int num_experts, k;
  MOERUN_HD void operator()(int64_t t) const {
    rowwise::RouterLogitsBackward(y + t * num_experts, expert_index + t * k, row + t * k,
                                  d_weight + t * k, dz_loss + t * num_experts, dz + t * num_experts,
                                  num_experts, k);
  }
};

struct ChoiceAttentionForwardFunctor {
  choice_attention::Shape shape;
  const float *q, *kv;
  const int32_t* row;
  float *probs, *out;
  MOERUN_HD void operator()(int64_t i) const {
    choice_attention::ForwardOne(shape, q, kv, row, probs, out, i);
  }
};

struct ChoiceAttentionBackwardFunctor {
  choice_attention::Shape shape;
  const float *q, *kv;
  const int32_t* row;
  const float *probs, *d_out;
  float *d_q, *d_kv;
  MOERUN_HD void operator()(int64_t b) const {
    choice_attention::BackwardSequence(shape, q, kv, row, probs, d_out, d_q, d_kv, b);
  }
};

using thrust_experts::ForIndices;

// thrust::device, the policy of the host build (THRUST_DEVICE_SYSTEM_CPP: the tests' table).
struct DevicePolicySource {
  static auto Get() { return thrust::device; }
};

// OpsTable entries over the execution policy `PolicySource::Get()` returns at each call
// (the tests': DevicePolicySource; the CUDA table's: its backend's stream without a host
// wait, model/ops_cuda.cu). GEMMs and self-attention are not here: the CUDA table takes
// cuBLAS and the composed attention (ops.h), the host tests OpenBLAS.
template <typename PolicySource>
struct ThrustOps {
  static void RouterGemm(const float* a, const float* b, float* c, int64_t rows, int64_t n,
                         int64_t k) {
    ForIndices(PolicySource::Get(), rows * n, RouterGemmFunctor{a, b, c, n, k});
  }
  static void AddBias(float* y, const float* bias, int64_t rows, int64_t cols) {
    thrust_experts::AddBias(PolicySource::Get(), y, bias, 1, rows, cols);
  }
  static void BiasBackward(const float* dy, float* dbias, int64_t rows, int64_t cols) {
    thrust_experts::BiasGrad(PolicySource::Get(), dy, dbias, 1, rows, cols);
  }
  static void Add(const float* a, const float* b, float* y, int64_t n) {
    ForIndices(PolicySource::Get(), n, AddFunctor{a, b, y});
  }
  static void Axpy(float alpha, const float* x, float* y, int64_t n) {
    ForIndices(PolicySource::Get(), n, AxpyFunctor{alpha, x, y});
  }
  static double SumOfSquares(const float* x, int64_t n) {
    if (n <= 0) return 0.0;
    return thrust::transform_reduce(PolicySource::Get(), x, x + n, SquareFunctor{}, 0.0,
                                    thrust::plus<double>());
  }
  static void SoftmaxForward(const float* x, float* y, int64_t rows, int64_t cols) {
    ForIndices(PolicySource::Get(), rows, SoftmaxRowFunctor<>{x, y, cols});
  }
  static void SoftmaxBackward(const float* y, const float* dy, float* dx, int64_t rows,
                              int64_t cols) {
    ForIndices(PolicySource::Get(), rows, SoftmaxBackwardRowFunctor<>{y, dy, dx, cols});
  }
  static void LayerNormForward(const float* x, const float* gamma, const float* beta, float* y,
                               float* mean, float* rstd, int64_t rows, int64_t cols, float eps) {
    ForIndices(PolicySource::Get(), rows,
               LayerNormRowFunctor<>{x, gamma, beta, y, mean, rstd, cols, eps});
  }
  static void LayerNormBackward(const float* x, const float* gamma, const float* mean,
                                const float* rstd, const float* dy, float* dx, float* dgamma,
                                float* dbeta, int64_t rows, int64_t cols) {
    ForIndices(PolicySource::Get(), rows,
               LayerNormBackwardRowFunctor<>{x, gamma, mean, rstd, dy, dx, cols});
    LayerNormParamGrads(x, mean, rstd, dy, dgamma, dbeta, rows, cols);
  }
  // dgamma and dbeta of LayerNormBackward (which the CUDA table's own row kernel calls).
  static void LayerNormParamGrads(const float* x, const float* mean, const float* rstd,
                                  const float* dy, float* dgamma, float* dbeta, int64_t rows,
                                  int64_t cols) {
    const auto policy = PolicySource::Get();
    // The parameter gradients are column sums: one pass over the rows in order, as the
    // CPU's, up to thrust_experts::kColumnChunkRows rows; two passes past that.
    const int64_t chunks = thrust_experts::ColumnChunks(rows);
    if (chunks <= 1) {
      ForIndices(policy, cols,
                 LayerNormParamGradFunctor{x, mean, rstd, dy, dgamma, dbeta, rows, cols});
      return;
    }
    thrust_experts::ScratchFloats<std::decay_t<decltype(policy)>> partial(policy,
                                                                          2 * chunks * cols);
    float *pg = partial.get(), *pb = pg + chunks * cols;
    ForIndices(policy, chunks * cols,
               LayerNormParamChunkFunctor{x, mean, rstd, dy, pg, pb, rows, cols});
    ForIndices(policy, cols, thrust_experts::BiasGradFunctor{pg, dgamma, chunks, cols});
    ForIndices(policy, cols, thrust_experts::BiasGradFunctor{pb, dbeta, chunks, cols});
  }
  static void GeluForward(const float* x, float* y, int64_t n, bool tanh_form) {
    ForIndices(PolicySource::Get(), n, GeluFunctor{x, y, tanh_form});
  }
  static void GeluBackward(const float* x, const float* dy, float* dx, int64_t n, bool tanh_form) {
    ForIndices(PolicySource::Get(), n, GeluGradFunctor{x, dy, dx, tanh_form});
  }
  static void TanhForward(const float* x, float* y, int64_t n) {
    ForIndices(PolicySource::Get(), n, TanhFunctor{x, y});
  }
  static void TanhBackward(const float* y, const float* dy, float* dx, int64_t n) {
    ForIndices(PolicySource::Get(), n, TanhGradFunctor{y, dy, dx});
  }
  static void BiasGeluForward(float* h, const float* bias, float* act, int64_t rows, int64_t cols,
                              bool tanh_form) {
    ForIndices(PolicySource::Get(), rows * cols, BiasGeluF32Functor{h, bias, act, cols, tanh_form});
  }
  static void GeluBiasBackward(const float* h, float* d, float* dbias, int64_t rows, int64_t cols,
                               bool tanh_form) {
    ForIndices(PolicySource::Get(), rows * cols, GeluGradFunctor{h, d, d, tanh_form});
    thrust_experts::BiasGrad(PolicySource::Get(), d, dbias, 1, rows, cols);
  }
  static void ChoiceAttentionForward(const float* q, const float* kv, const int32_t* row,
                                     int64_t tokens, int64_t k, int64_t head_dim, int64_t seq_len,
                                     float* probs, float* out) {
    ForIndices(
        PolicySource::Get(), tokens * k,
        ChoiceAttentionForwardFunctor{choice_attention::MakeShape(tokens, k, head_dim, seq_len), q,
                                      kv, row, probs, out});
  }
  static void ChoiceAttentionBackward(const float* q, const float* kv, const int32_t* row,
                                      const float* probs, const float* d_out, int64_t tokens,
                                      int64_t k, int64_t head_dim, int64_t seq_len, float* d_q,
                                      float* d_kv) {
    ForIndices(
        PolicySource::Get(), tokens / seq_len,
        ChoiceAttentionBackwardFunctor{choice_attention::MakeShape(tokens, k, head_dim, seq_len), q,
                                       kv, row, probs, d_out, d_q, d_kv});
  }
  static void ZeroDroppedRows(const int32_t* row, float* x, int64_t rows, int64_t cols) {
    ForIndices(PolicySource::Get(), rows * cols, ZeroDroppedRowsFunctor{row, x, cols});
  }
  static void TopK(const float* gates, int64_t tokens, int num_experts, int k,
                   int32_t* expert_index, float* weight) {
    thrust_routing::TopK(PolicySource::Get(), gates, tokens, num_experts, k, expert_index, weight);
  }
  static void AddRouterNoise(const NoiseKey& key, int64_t first_token, int64_t tokens,
                             int num_experts, float sigma, const float* z, float* zn) {
    ForIndices(PolicySource::Get(), tokens,
               RouterNoiseFunctor{key, first_token, num_experts, sigma, z, zn});
  }
  // Scratch of the policy's memory, kept (never freed: a device's would outlive its
  // context at exit) and grown to the largest call; one per calling thread.
  static void AssignSlots(const int32_t* expert_index, const float* weight, int64_t tokens,
                          int64_t group_size, int num_experts, int k, bool bpr, int32_t* slot,
                          int32_t* load) {
    struct Scratch {
      thrust::device_vector<int32_t> order, keys, rank, cumulative;
      thrust::device_vector<int64_t> visit;
      thrust::device_vector<float> keys_w;
    };
    thread_local Scratch* s = new Scratch();
    thrust_routing::AssignSlotsInGroups(
        PolicySource::Get(), expert_index, weight, tokens, group_size, num_experts, k, bpr, slot,
        load, nullptr, s->order, s->keys, s->rank, s->visit, s->keys_w, s->cumulative);
  }
  static void PlanRows(const int32_t* expert_index, const int32_t* slot, int64_t tokens, int64_t k,
                       int64_t group_size, int64_t capacity, int64_t rows_per_expert,
                       int32_t* row) {
    thrust_routing::PlanRows(PolicySource::Get(), expert_index, slot, tokens, k, group_size,
                             capacity, rows_per_expert, row);
  }
  static void RouterLogitsBackward(const float* y, const int32_t* expert_index, const int32_t* row,
                                   const float* d_weight, const float* dz_loss, float* dz,
                                   int64_t tokens, int num_experts, int k) {
    ForIndices(
        PolicySource::Get(), tokens,
        RouterLogitsBackwardFunctor{y, expert_index, row, d_weight, dz_loss, dz, num_experts, k});
  }
  static void PackRows(const int32_t* row, const float* x, int64_t tokens, int64_t k, int64_t w,
                       float* buf, int64_t buf_rows) {
    thrust::fill_n(PolicySource::Get(), buf, buf_rows * w, 0.0f);
    thrust_routing::PackRows(PolicySource::Get(), row, x, tokens, k, w, buf);
  }
  static void CombineRows(const float* buf, const int32_t* row, const float* weight, int64_t tokens,
                          int64_t k, int64_t w, float* out) {
    thrust_routing::GatherKeptRows(PolicySource::Get(), buf, row, weight, tokens, k, w, out);
  }
  static void CombineRowsBackward(const float* buf, const int32_t* row, const float* weight,
                                  const float* dy, int64_t tokens, int64_t k, int64_t w,
                                  float* d_buf, int64_t buf_rows, float* d_weight) {
    thrust::fill_n(PolicySource::Get(), d_buf, buf_rows * w, 0.0f);
    thrust_routing::GatherKeptRowsBackward(PolicySource::Get(), buf, row, weight, dy, tokens, k, w,
                                           d_buf, d_weight);
  }
  static void AdamW(const AdamWScalars& s, bool decay, float* value, const float* grad, void* m,
                    void* v, int64_t n, bool bf16_moments) {
    thrust_optim::AdamWStep(PolicySource::Get(), s, decay, value, grad, m, v, n, bf16_moments);
  }

  // A table of these entries named `name`, without GEMMs or self-attention.
  static OpsTable Table(const char* name) {
    OpsTable t{};
    t.name = name;
    t.router_gemm = &RouterGemm;
    t.add_bias = &AddBias;
    t.bias_backward = &BiasBackward;
    t.add = &Add;
    t.axpy = &Axpy;
    t.sum_of_squares = &SumOfSquares;
    // sum_of_squares_many is the device table's own (DeviceSquareSums: QueueSquareLevels, then a
    // copy of the sums to the host through its backend: CudaSumOfSquaresMany, the tests' host
    // copy).
    t.softmax_forward = &SoftmaxForward;
    t.softmax_backward = &SoftmaxBackward;
    t.layer_norm_forward = &LayerNormForward;
    t.layer_norm_backward = &LayerNormBackward;
    t.gelu_forward = &GeluForward;
    t.gelu_backward = &GeluBackward;
    t.tanh_forward = &TanhForward;
    t.tanh_backward = &TanhBackward;
    t.bias_gelu_forward = &BiasGeluForward;
    t.gelu_bias_backward = &GeluBiasBackward;
    t.choice_attention_forward = &ChoiceAttentionForward;
    t.choice_attention_backward = &ChoiceAttentionBackward;
    t.zero_dropped_rows = &ZeroDroppedRows;
    t.top_k = &TopK;
    t.add_router_noise = &AddRouterNoise;
    t.assign_slots = &AssignSlots;
    t.plan_rows = &PlanRows;
    t.router_logits_backward = &RouterLogitsBackward;
    t.pack_rows = &PackRows;
    t.combine_rows = &CombineRows;
    t.combine_rows_backward = &CombineRowsBackward;
    t.adamw_step = &AdamW;
    return t;
  }
};

}  // namespace thrust_dense
}  // namespace moerun

#endif  // MOERUN_MODEL_DENSE_KERNELS_THRUST_H_
