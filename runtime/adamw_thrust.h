// The AdamW update (runtime/optimizer.h's AdamW::Step, fp32 or bf16 moments) as a Thrust
// algorithm for device-resident parameters: nvcc compiles it for the GPU
// (CudaAdamWStep, and CudaAdamWStepMany for many arrays in one launch), CI compiles it for
// the host and checks it against AdamW::Step bit for bit (tests/device_ops_test.cc). The CUDA
// kernels are built without FMA contraction (--fmad=false, model/CMakeLists.txt) and with
// IEEE division and sqrtf: the same bits on the GPU too (tests/device_ops_cuda_test.cc's
// op table checks them to 2e-5, printing whether they are bit for bit).
#ifndef MOERUN_RUNTIME_ADAMW_THRUST_H_
#define MOERUN_RUNTIME_ADAMW_THRUST_H_

#include <thrust/for_each.h>
#include <thrust/iterator/counting_iterator.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "runtime/device_math.h"
#include "runtime/device_table.h"
#include "runtime/optimizer.h"

namespace moerun {
namespace thrust_optim {

// One element: g = grad * scale; m, v updated (stored as fp32, or as bf16 bits when
// bf16_moments); value -= lr (m^ / (sqrt(v^) + eps) + wd value).
struct AdamWFunctor {
  AdamWScalars s;
  float weight_decay;
  float* value;
  const float* grad;
  void* m;
  void* v;
  bool bf16_moments;
  MOERUN_HD void operator()(int64_t j) const {
    const float g = grad[j] * s.grad_scale;
    float mj, vj;
    if (bf16_moments) {
      uint16_t* mb = static_cast<uint16_t*>(m);
      uint16_t* vb = static_cast<uint16_t*>(v);
      mj = s.b1 * FromBF16Bits(mb[j]) + (1.0f - s.b1) * g;
      vj = s.b2 * FromBF16Bits(vb[j]) + (1.0f - s.b2) * g * g;
      mb[j] = ToBF16Bits(mj);
      vb[j] = ToBF16Bits(vj);
    } else {
      float* mf = static_cast<float*>(m);
      float* vf = static_cast<float*>(v);
      mj = s.b1 * mf[j] + (1.0f - s.b1) * g;
      vj = s.b2 * vf[j] + (1.0f - s.b2) * g * g;
      mf[j] = mj;
      vf[j] = vj;
    }
    const float update = (mj * s.c1) / (sqrtf(vj * s.c2) + s.eps);
    value[j] -= s.lr * (update + weight_decay * value[j]);
  }
};

// `decay`: whether weight decay applies to this parameter (AdamW's OptimizerParam::decay).
template <typename Policy>
void AdamWStep(const Policy& policy, const AdamWScalars& s, bool decay, float* value,
               const float* grad, void* m, void* v, int64_t n, bool bf16_moments) {
  if (n <= 0) return;
  thrust::for_each(policy, thrust::counting_iterator<int64_t>(0),
                   thrust::counting_iterator<int64_t>(n),
                   AdamWFunctor{s, decay ? s.weight_decay : 0.0f, value, grad, m, v, bf16_moments});
}

// --- Many arrays in one launch (a training step's parameters: one launch, not one per
// array). The arrays' elements lie side by side in a thread space cut into chunks of
// kAdamWChunk threads, each array starting at a chunk boundary: thread t's chunk names its
// array (the chunk table, one read shared by the chunk's threads), t minus the array's first
// thread its element, and threads past an array's end do nothing. Every element takes the
// same AdamWFunctor as its array updated alone: the same bits.
constexpr int64_t kAdamWChunk = 4096;

// An array and its first thread. Every field is 8 bytes (no padding): a plan's segments are
// compared byte for byte with the uploaded ones.
struct AdamWSegment {
  float* value;
  const float* grad;
  void* m;
  void* v;
  int64_t n;
  int64_t first;
  int64_t decay;  // 1: weight decay applies
};
static_assert(sizeof(AdamWSegment) == 7 * 8, "AdamWSegment must have no padding bytes");

struct AdamWPlan {
  std::vector<AdamWSegment> segments;
  std::vector<int32_t> chunk_segment;  // chunk c's segment
  int64_t threads() const { return static_cast<int64_t>(chunk_segment.size()) * kAdamWChunk; }
};

inline std::vector<AdamWSegment> AdamWSegments(const AdamWArray* arrays, int64_t count) {
  std::vector<AdamWSegment> segments;
  int64_t first = 0;
  for (int64_t i = 0; i < count; ++i) {
    const AdamWArray& a = arrays[i];
    if (a.n <= 0) continue;
    segments.push_back({a.value, a.grad, a.m, a.v, a.n, first, a.decay ? 1 : 0});
    first += (a.n + kAdamWChunk - 1) / kAdamWChunk * kAdamWChunk;
  }
  return segments;
}

inline std::vector<int32_t> AdamWChunkSegments(const std::vector<AdamWSegment>& segments) {
  std::vector<int32_t> chunk_segment;
  for (size_t i = 0; i < segments.size(); ++i) {
    chunk_segment.insert(chunk_segment.end(), (segments[i].n + kAdamWChunk - 1) / kAdamWChunk,
                         static_cast<int32_t>(i));
  }
  return chunk_segment;
}

struct AdamWManyFunctor {
  AdamWScalars s;
  const AdamWSegment* segment;
  const int32_t* chunk_segment;
  bool bf16_moments;
  MOERUN_HD void operator()(int64_t t) const {
    const AdamWSegment& g = segment[chunk_segment[t / kAdamWChunk]];
    const int64_t j = t - g.first;
    if (j >= g.n) return;
    AdamWFunctor{
        s, g.decay != 0 ? s.weight_decay : 0.0f, g.value, g.grad, g.m, g.v, bf16_moments}(j);
  }
};

// One launch over `threads` threads (AdamWPlan::threads) for the segments and chunk table at
// `segment` and `chunk_segment`, on the policy's device.
template <typename Policy>
void QueueAdamWMany(const Policy& policy, const AdamWScalars& s, const AdamWSegment* segment,
                    const int32_t* chunk_segment, int64_t threads, bool bf16_moments) {
  if (threads <= 0) return;
  thrust::for_each(policy, thrust::counting_iterator<int64_t>(0),
                   thrust::counting_iterator<int64_t>(threads),
                   AdamWManyFunctor{s, segment, chunk_segment, bf16_moments});
}

// A device table's adamw_step_many (CUDA's; the tests' stand-in for it). The segments and
// chunk table stay on the device between calls: a training step updates the same arrays
// every time, so they are uploaded again only when the arrays move. Run one instance per
// host thread; free it while the device's backend is registered.
class DeviceAdamWMany {
 public:
  template <typename Policy>
  void Run(const Policy& policy, Device device, const AdamWScalars& s, const AdamWArray* arrays,
           int64_t count, bool bf16_moments) {
    const std::vector<AdamWSegment> segments = AdamWSegments(arrays, count);
    if (segments.empty()) return;
    const size_t bytes = segments.size() * sizeof(AdamWSegment);
    // The segments, then the chunk table (int32) made from them.
    const auto* table =
        static_cast<const unsigned char*>(table_.Get(device, segments.data(), bytes, [&] {
          const std::vector<int32_t> chunks = AdamWChunkSegments(segments);
          std::vector<unsigned char> host(bytes + chunks.size() * sizeof(int32_t));
          std::memcpy(host.data(), segments.data(), bytes);
          std::memcpy(host.data() + bytes, chunks.data(), chunks.size() * sizeof(int32_t));
          return host;
        }));
    const AdamWSegment& last = segments.back();
    const int64_t threads = last.first + (last.n + kAdamWChunk - 1) / kAdamWChunk * kAdamWChunk;
    QueueAdamWMany(policy, s, reinterpret_cast<const AdamWSegment*>(table),
                   reinterpret_cast<const int32_t*>(table + bytes), threads, bf16_moments);
  }

 private:
  DeviceTable table_;  // the segments, then the chunk table, on the device
};

}  // namespace thrust_optim
}  // namespace moerun

#endif  // MOERUN_RUNTIME_ADAMW_THRUST_H_
