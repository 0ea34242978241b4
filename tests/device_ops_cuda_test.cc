// The nvcc-built routing kernels (model/routing_cuda.cu) on a CUDA device against the CPU
// reference, bit for bit. Without a GPU every test is skipped with "skipped: no GPU".
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <cmath>
#include <random>
#include <vector>

#include "model/routing.h"
#include "model/routing_cuda.h"

namespace moerun {
namespace {

bool HaveGpu() {
  int n = 0;
  // An error (no driver, no device) counts as zero devices.
  return cudaGetDeviceCount(&n) == cudaSuccess && n > 0;
}

template <typename T>
T* ToDevice(const std::vector<T>& v) {
  T* d = nullptr;
  EXPECT_EQ(cudaMalloc(reinterpret_cast<void**>(&d), std::max<size_t>(1, v.size()) * sizeof(T)),
            cudaSuccess);
  if (!v.empty()) cudaMemcpy(d, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice);
  return d;
}

template <typename T>
std::vector<T> ToHost(const T* d, size_t n) {
  std::vector<T> v(n);
  cudaMemcpy(v.data(), d, n * sizeof(T), cudaMemcpyDeviceToHost);
  return v;
}

TEST(CudaRouting, TopKAndSlotsMatchTheCpuReference) {
  if (!HaveGpu()) {
    std::printf("skipped: no GPU\n");
    GTEST_SKIP() << "skipped: no GPU";
  }
  struct Case {
    int64_t tokens;
    int experts, k;
    bool bpr, padding;
  };
  const Case cases[] = {{17, 4, 2, false, false},
                        {136, 8, 2, true, false},
                        {257, 32, 2, true, true},
                        {300, 8, 3, false, true},
                        {65536, 64, 2, true, false}};
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(0.f, 1.f);
  CudaRoutingScratch scratch;
  for (const Case& c : cases) {
    std::vector<float> gates(c.tokens * c.experts);
    for (float& g : gates) g = std::floor(u(rng) * 64) / 64;  // ties
    std::vector<uint8_t> routed(c.tokens, 1);
    if (c.padding) {
      for (int64_t s = 0; s < c.tokens; ++s) routed[s] = s % 5 == 2 ? 0 : 1;
    }
    std::vector<int32_t> idx(c.tokens * c.k), slot(c.tokens * c.k), load(c.experts), order;
    std::vector<float> w(c.tokens * c.k);
    TopK(gates.data(), c.tokens, c.experts, c.k, idx.data(), w.data());
    AssignSlots(idx.data(), w.data(), c.tokens, c.experts, c.k, c.bpr, slot.data(), load.data(),
                &order, c.padding ? routed.data() : nullptr);
    float* d_gates = ToDevice(gates);
    float* d_w = ToDevice(std::vector<float>(c.tokens * c.k));
    int32_t* d_idx = ToDevice(std::vector<int32_t>(c.tokens * c.k));
    int32_t* d_slot = ToDevice(std::vector<int32_t>(c.tokens * c.k));
    int32_t* d_load = ToDevice(std::vector<int32_t>(c.experts));
    uint8_t* d_routed = ToDevice(routed);
    CudaTopK(d_gates, c.tokens, c.experts, c.k, d_idx, d_w);
    CudaAssignSlots(d_idx, d_w, c.tokens, c.experts, c.k, c.bpr, d_slot, d_load,
                    c.padding ? d_routed : nullptr, &scratch);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    EXPECT_EQ(ToHost(d_idx, idx.size()), idx);
    EXPECT_EQ(ToHost(d_w, w.size()), w);
    EXPECT_EQ(ToHost(d_slot, slot.size()), slot);
    EXPECT_EQ(ToHost(d_load, load.size()), load);
    for (void* p :
         {static_cast<void*>(d_gates), static_cast<void*>(d_w), static_cast<void*>(d_idx),
          static_cast<void*>(d_slot), static_cast<void*>(d_load), static_cast<void*>(d_routed)}) {
      cudaFree(p);
    }
  }
}

}  // namespace
}  // namespace moerun
