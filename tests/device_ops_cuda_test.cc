// The nvcc-built routing kernels (model/routing_cuda.cu) on a CUDA device against the CPU
// reference, bit for bit, and the backend-op table (tests/op_cases.h) on the real CUDA
// table against the CPU table. Without a GPU every test is skipped with "skipped: no GPU".
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include "comm/loopback_communicator.h"
#include "model/moe_attention.h"
#include "model/moe_dispatch.h"
#include "model/moe_layer.h"
#include "model/moe_plan.h"
#include "model/ops.h"
#include "model/ops_cuda.h"
#include "model/routing.h"
#include "model/routing_cuda.h"
#include "runtime/row_kernels.h"
#include "runtime/tensor.h"
#include "tests/moe_pairs.h"
#include "tests/op_cases.h"

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

TEST(CudaRouting, RowsPackAndCombineMatchTheCpuReference) {
  if (!HaveGpu()) {
    std::printf("skipped: no GPU\n");
    GTEST_SKIP() << "skipped: no GPU";
  }
  const int64_t tokens = 2056, group = 257, w = 384;
  const int experts = 32, k = 2;
  std::mt19937 rng(11);
  std::uniform_real_distribution<float> u(0.f, 1.f);
  Tensor gates = Tensor::Empty({tokens, experts});
  for (int64_t i = 0; i < gates.numel(); ++i) gates.data<float>()[i] = u(rng);
  CapacityRule rule;
  rule.capacity_factor = 1.05;
  rule.group_size = group;
  int64_t g = 0;
  StatusOr<int64_t> cap = CheckGroupsAndCapacity(rule, tokens, experts, k, &g);
  ASSERT_TRUE(cap.ok());
  LoopbackCommunicator one(0, 1);
  RoutingPlan plan;
  PlanRouting(gates, rule, k, g, *cap, one, &plan);
  const int64_t tk = tokens * k;
  auto vec = [](const Tensor& t, auto* type) {
    using T = std::remove_pointer_t<decltype(type)>;
    return std::vector<T>(t.data<T>(), t.data<T>() + t.numel());
  };
  const std::vector<int32_t> idx = vec(plan.expert_index, static_cast<int32_t*>(nullptr));
  const std::vector<int32_t> sl = vec(plan.slot, static_cast<int32_t*>(nullptr));
  const std::vector<int32_t> row = vec(plan.row, static_cast<int32_t*>(nullptr));
  const std::vector<float> weight = vec(plan.weight, static_cast<float*>(nullptr));
  std::vector<float> x(tokens * w);
  for (float& v : x) v = u(rng);
  Tensor buf;
  PackRows(plan, x.data(), w, &buf);
  std::vector<float> out(tokens * w);
  GatherKeptRows(buf.data<float>(), row.data(), weight.data(), tokens, k, w, out.data());
  int32_t* d_idx = ToDevice(idx);
  int32_t* d_sl = ToDevice(sl);
  int32_t* d_row = ToDevice(std::vector<int32_t>(tk));
  float* d_x = ToDevice(x);
  float* d_w = ToDevice(weight);
  float* d_buf = ToDevice(std::vector<float>(buf.numel(), 0.0f));
  float* d_out = ToDevice(std::vector<float>(out.size()));
  CudaPlanRows(d_idx, d_sl, tokens, k, plan.group_size, plan.capacity, plan.rows_per_expert(),
               d_row);
  CudaPackRows(d_row, d_x, tokens, k, w, d_buf);
  CudaGatherKeptRows(d_buf, d_row, d_w, tokens, k, w, d_out);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  EXPECT_EQ(ToHost(d_row, row.size()), row);
  EXPECT_EQ(ToHost(d_buf, buf.numel()),
            std::vector<float>(buf.data<float>(), buf.data<float>() + buf.numel()));
  EXPECT_EQ(ToHost(d_out, out.size()), out);
  for (void* p : {static_cast<void*>(d_idx), static_cast<void*>(d_sl), static_cast<void*>(d_row),
                  static_cast<void*>(d_x), static_cast<void*>(d_w), static_cast<void*>(d_buf),
                  static_cast<void*>(d_out)}) {
    cudaFree(p);
  }
}

// While alive, tests/op_cases.h's buffers are managed memory, which the host and the GPU
// both read; the host's malloc again after.
struct ManagedCaseBuffers {
  ManagedCaseBuffers() {
    op_cases::g_case_alloc = [](size_t bytes) -> void* {
      // The host writes the new buffer next: wait for the kernels of the ops before (they
      // only queue), which a GPU without concurrentManagedAccess requires.
      if (cudaDeviceSynchronize() != cudaSuccess) return nullptr;
      void* p = nullptr;
      return cudaMallocManaged(&p, bytes) == cudaSuccess ? p : nullptr;
    };
    op_cases::g_case_free = [](void* p) { cudaFree(p); };
    op_cases::g_case_sync = [] { ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess); };
  }
  ~ManagedCaseBuffers() {
    op_cases::g_case_alloc = [](size_t bytes) { return std::malloc(bytes); };
    op_cases::g_case_free = [](void* p) { std::free(p); };
    op_cases::g_case_sync = [] {};
  }
};

// The backend-op table on the GPU: every case of tests/op_cases.h through the CUDA table
// (cuBLAS, the Thrust kernels built by nvcc, the composed attention) against the CPU table,
// the case buffers in managed memory. Device math (expf, erff, rsqrtf, cuBLAS's order)
// differs from the host's in the last bits, so every case gets at least 2e-5 of its
// output's largest magnitude; indices and slots (exact integers) still have to match. Each
// case's worst error is printed, for the record.
TEST(CudaOpsTable, EveryCaseMatchesTheCpuTable) {
  if (!HaveGpu()) {
    std::printf("skipped: no GPU\n");
    GTEST_SKIP() << "skipped: no GPU";
  }
  RegisterCudaOps();
  const OpsTable& cuda = Ops(Device::kCUDA);
  const OpsTable& cpu = Ops(Device::kCPU);
  const ManagedCaseBuffers managed;
  std::vector<op_cases::OpCase> cases = op_cases::OpCases();
  for (op_cases::OpCase& c : op_cases::AttentionCases()) cases.push_back(std::move(c));
  for (const op_cases::OpCase& c : cases) {
    SCOPED_TRACE(c.name);
    const std::vector<float> want = c.run(cpu);
    const std::vector<float> got = c.run(cuda);
    ASSERT_EQ(want.size(), got.size());
    float worst = 0;
    for (size_t i = 0; i < want.size(); ++i) worst = std::max(worst, std::fabs(want[i] - got[i]));
    std::printf("%-48s max |cuda - cpu| / max(1, max |cpu|) = %.3g%s\n", c.name.c_str(),
                worst / std::max(1.0f, op_cases::MaxAbs(want)), worst == 0 ? " (bit for bit)" : "");
    op_cases::ExpectClose(want, got, std::max(c.tol, 2e-5f));
  }
}

// train.precision BF16 on a GPU: the CUDA table's bf16 GEMM variant (operands cast to bf16,
// then cuBLAS with fp32 accumulation) against the CPU's (operands rounded to bf16, fp32
// products): the same rounded operands, so they agree to fp32 accumulation order; and both
// differ from the fp32 GEMMs by bf16's rounding, which shows the variant ran.
TEST(CudaOpsTable, Bf16GemmsMatchTheCpuBf16Table) {
  if (!HaveGpu()) {
    std::printf("skipped: no GPU\n");
    GTEST_SKIP() << "skipped: no GPU";
  }
  RegisterCudaOps();
  const ManagedCaseBuffers managed;
  std::vector<op_cases::OpCase> cases = op_cases::OpCases();
  const auto gemm_case = std::find_if(cases.begin(), cases.end(), [](const op_cases::OpCase& c) {
    return c.name == "gemm/gemm_strided_batched";
  });
  ASSERT_NE(gemm_case, cases.end());
  const std::vector<float> fp32 = gemm_case->run(Ops(Device::kCPU));
  const bool before = SetBf16Gemms(true);
  const OpsTable& cuda = Ops(Device::kCUDA);
  const OpsTable& cpu = Ops(Device::kCPU);
  EXPECT_STREQ(cuda.name, "cuda-bf16");
  EXPECT_STREQ(cpu.name, "cpu-bf16");
  const std::vector<float> want = gemm_case->run(cpu);
  const std::vector<float> got = gemm_case->run(cuda);
  SetBf16Gemms(before);
  op_cases::ExpectClose(want, got, 2e-5f);
  float worst = 0;
  for (size_t i = 0; i < want.size(); ++i) worst = std::max(worst, std::fabs(want[i] - fp32[i]));
  EXPECT_GT(worst, 1e-4f * op_cases::MaxAbs(fp32)) << "bf16's rounding shows against fp32";
}

// The CUDA table's row kernels (a warp per row, model/ops_cuda.cu) against the same lane forms
// run by rowwise::HostLanes here: the butterfly over the warp's shuffles must give the bits
// of the host's butterfly. Layer norm and softmax's backward use only IEEE +, *, / and sqrt:
// bit for bit. Softmax's forward adds expf, whose device and glibc forms differ in the last
// bits. Widths below, at and past a warp; 33 rows leave the last block of 8 rows partial.
// The attention runs both softmaxes in place (y over x, dx over dy): so do the second runs.
TEST(CudaOpsTable, RowKernelsRunTheHostLaneFormsBitForBit) {
  if (!HaveGpu()) {
    std::printf("skipped: no GPU\n");
    GTEST_SKIP() << "skipped: no GPU";
  }
  RegisterCudaOps();
  const OpsTable& cuda = Ops(Device::kCUDA);
  const rowwise::HostLanes host;
  const int64_t rows = 33;
  for (const int64_t cols : {1, 5, 32, 70, 197, 768, 1000}) {
    SCOPED_TRACE("cols " + std::to_string(cols));
    const int64_t n = rows * cols;
    std::mt19937 rng(static_cast<uint32_t>(cols));
    std::normal_distribution<float> normal(0.0f, 3.0f);
    std::vector<float> x(n), dy(n), gamma(cols), beta(cols);
    for (float& v : x) v = normal(rng) + 5.0f;
    for (float& v : dy) v = normal(rng);
    for (float& v : gamma) v = normal(rng);
    for (float& v : beta) v = normal(rng);
    // The host's lane forms.
    std::vector<float> y(n), mean(rows), rstd(rows), dx(n), p(n), dp(n);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t o = r * cols;
      rowwise::LayerNormLanes(host, &x[o], gamma.data(), beta.data(), &y[o], &mean[r], &rstd[r],
                              cols, 1e-6f);
      rowwise::LayerNormBackwardLanes(host, &x[o], gamma.data(), mean[r], rstd[r], &dy[o], &dx[o],
                                      cols);
      rowwise::SoftmaxLanes(host, &x[o], &p[o], cols);
      rowwise::SoftmaxBackwardLanes(host, &p[o], &dy[o], &dp[o], cols);
    }
    // The device's, from the host's inputs (softmax's backward from the host's p).
    float *d_x = ToDevice(x), *d_dy = ToDevice(dy), *d_g = ToDevice(gamma), *d_b = ToDevice(beta),
          *d_p = ToDevice(p);
    float *d_y = ToDevice(std::vector<float>(n)), *d_mean = ToDevice(std::vector<float>(rows)),
          *d_rstd = ToDevice(std::vector<float>(rows)), *d_dx = ToDevice(std::vector<float>(n)),
          *d_dg = ToDevice(std::vector<float>(cols)), *d_db = ToDevice(std::vector<float>(cols)),
          *d_q = ToDevice(std::vector<float>(n)), *d_dp = ToDevice(std::vector<float>(n));
    cuda.layer_norm_forward(d_x, d_g, d_b, d_y, d_mean, d_rstd, rows, cols, 1e-6f);
    cuda.layer_norm_backward(d_x, d_g, d_mean, d_rstd, d_dy, d_dx, d_dg, d_db, rows, cols);
    cuda.softmax_forward(d_x, d_q, rows, cols);
    cuda.softmax_backward(d_p, d_dy, d_dp, rows, cols);
    float *d_x2 = ToDevice(x), *d_dy2 = ToDevice(dy);
    cuda.softmax_forward(d_x2, d_x2, rows, cols);
    cuda.softmax_backward(d_p, d_dy2, d_dy2, rows, cols);
    ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
    const std::vector<float> q = ToHost(d_q, n), q2 = ToHost(d_x2, n);
    EXPECT_EQ(ToHost(d_y, n), y);
    EXPECT_EQ(ToHost(d_mean, rows), mean);
    EXPECT_EQ(ToHost(d_rstd, rows), rstd);
    EXPECT_EQ(ToHost(d_dx, n), dx);
    EXPECT_EQ(ToHost(d_dp, n), dp);
    EXPECT_EQ(ToHost(d_dy2, n), dp) << "softmax backward in place";
    EXPECT_EQ(q2, q) << "softmax forward in place";
    for (float* d : {d_x, d_dy, d_g, d_b, d_p, d_y, d_mean, d_rstd, d_dx, d_dg, d_db, d_q, d_dp,
                     d_x2, d_dy2}) {
      cudaFree(d);
    }
    // expf: CUDA's within 2 ulp, glibc's within 1, then the sum's inverse and the product:
    // a few ulp of each probability.
    float worst = 0.0f;
    for (int64_t i = 0; i < n; ++i) {
      worst = std::max(worst,
                       std::fabs(q[i] - p[i]) / std::max(p[i], std::numeric_limits<float>::min()));
    }
    EXPECT_LE(worst, 16 * std::numeric_limits<float>::epsilon()) << "relative, softmax forward";
  }
}

// A MoE layer that routes on the GPU (noise, softmaxes, top-k, BPR slots, rows, the
// router's backward there) against the CPU layer, one expert-parallel rank, two groups,
// noisy, not, and with task gates: the same routing (near-tied gates could differ: the device's
// expf, logf and sincosf round differently; these inputs have none), the losses, outputs and
// gradients to 1e-4.
// A host tensor of normal values.
Tensor RandomTensor(const Shape& shape, float scale, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> n01;
  Tensor t = Tensor::Empty(shape);
  for (int64_t i = 0; i < t.numel(); ++i) t.data<float>()[i] = scale * n01(rng);
  return t;
}

// A host tensor against another on any device.
void ExpectTensorClose(const Tensor& want, const Tensor& got_any, float tol) {
  const Tensor got = got_any.To(Device::kCPU);
  std::vector<float> a(want.data<float>(), want.data<float>() + want.numel());
  std::vector<float> b(got.data<float>(), got.data<float>() + got.numel());
  op_cases::ExpectClose(a, b, tol);
}

TEST(CudaMoeLayer, RoutesOnTheGpuAsTheCpuLayerRoutes) {
  if (!HaveGpu()) {
    std::printf("skipped: no GPU\n");
    GTEST_SKIP() << "skipped: no GPU";
  }
  RegisterCudaOps();
  // noise -1: Mod-Squad's task gates; capacity factor 0: dropless.
  for (const auto& [noise, capacity_factor] :
       {std::pair{1.0, 1.0}, std::pair{0.0, 1.0}, std::pair{-1.0, 1.0}, std::pair{1.0, 0.0},
        std::pair{-1.0, 0.0}}) {
    const bool task_gate = noise < 0;
    SCOPED_TRACE((task_gate ? "task gates" : "noise " + std::to_string(noise)) +
                 (capacity_factor == 0 ? ", dropless" : ""));
    LoopbackCommunicator host_one(0, 1);
    LoopbackCommunicator device_one(0, 1, "world", Device::kCUDA);
    MoeLayerConfig cfg;
    cfg.d = 64;
    cfg.m = 96;
    cfg.num_experts = 8;
    cfg.k = 2;
    cfg.capacity_factor = capacity_factor;
    cfg.group_size = 128;
    cfg.noise_std = task_gate ? 0.0 : noise;
    cfg.gate = task_gate ? GateKind::kTaskSoftmax : GateKind::kNoisyTopK;
    cfg.tasks = 3;
    cfg.mi_weight = 0.01;
    MoeLayer cpu(cfg, *MoeGroups::Create(&host_one, 8));
    cfg.device = Device::kCUDA;
    MoeLayer dev(cfg, *MoeGroups::Create(&device_one, 8));
    uint32_t seed = 100;
    MoeParams& p = cpu.params();
    MoeParams& q = dev.params();
    moe_pairs::SameRandom(moe_pairs::Pairs(p, q), seed, [](const Shape& shape, uint32_t sd) {
      return RandomTensor(shape, 0.3f, sd);
    });
    cpu.ZeroGradients();
    dev.ZeroGradients();
    const int64_t t = 256;
    const Tensor x = RandomTensor({t, cfg.d}, 1.0f, 110), dy = RandomTensor({t, cfg.d}, 1.0f, 111);
    MoeForwardArgs args;
    args.noise_key = {3, 7, 2};
    std::vector<int32_t> task(t);
    for (int64_t i = 0; i < t; ++i) task[i] = static_cast<int32_t>((i / 50) % 3);
    if (task_gate) args.task = task.data();
    Tensor y = Tensor::Empty({t, cfg.d}), dx = Tensor::Empty({t, cfg.d});
    ASSERT_TRUE(cpu.Forward(x, args, &y).ok());
    cpu.Backward(dy, &dx);
    Tensor y_d = Tensor::Empty({t, cfg.d}, DType::kF32, Device::kCUDA),
           dx_d = Tensor::Empty({t, cfg.d}, DType::kF32, Device::kCUDA);
    ASSERT_TRUE(dev.Forward(x.To(Device::kCUDA), args, &y_d).ok());
    dev.Backward(dy.To(Device::kCUDA), &dx_d);
    ASSERT_TRUE(dev.routed_on_device());
    SCOPED_TRACE(
        "the CPU gates' nearest tie: " +
        std::to_string(moe_pairs::NearestTie(cpu.router().gates(), cfg.group_size, cfg.k)) +
        " relative (moe_pairs::NearestTie)");
    moe_pairs::ExpectSameRouting(cpu.plan(), dev.plan(), cpu.aux(), dev.aux(), 1e-5);
    EXPECT_EQ(cpu.plan().capacity, dev.plan().capacity);
    if (task_gate) {
      EXPECT_NE(dev.losses().value("mi"), 0.0) << "an active MI term";
    }
    ExpectTensorClose(y, y_d, 1e-4f);
    ExpectTensorClose(dx, dx_d, 1e-4f);
    ExpectTensorClose(cpu.grads().router_weight, dev.grads().router_weight, 1e-4f);
    ExpectTensorClose(cpu.grads().fc1_weight, dev.grads().fc1_weight, 1e-4f);
  }
}

// Mod-Squad's mixture of attention heads routes on the GPU too (task softmax, plan, the
// losses from one copy of the tables), as the CPU layer routes; outputs and gradients.
TEST(CudaMoeAttention, RoutesOnTheGpuAsTheCpuLayerRoutes) {
  if (!HaveGpu()) {
    std::printf("skipped: no GPU\n");
    GTEST_SKIP() << "skipped: no GPU";
  }
  RegisterCudaOps();
  for (const double capacity_factor : {1.0, 0.0}) {  // 0: dropless
    SCOPED_TRACE("capacity factor " + std::to_string(capacity_factor));
    LoopbackCommunicator host_one(0, 1), job_one(0, 1);
    LoopbackCommunicator device_one(0, 1, "world", Device::kCUDA);
    MoeAttentionConfig cfg;
    cfg.d = 64;
    cfg.head_dim = 16;
    cfg.num_experts = 8;
    cfg.k = 4;
    cfg.tasks = 3;
    cfg.capacity.capacity_factor = capacity_factor;
    cfg.capacity.group_size = 64;
    cfg.aux.mi = 0.01;
    cfg.aux.z = 0.001;
    MoeAttention cpu(cfg, *MoeGroups::Create(&host_one, 8));
    cfg.device = Device::kCUDA;
    MoeAttention dev(cfg, *MoeGroups::Create(&job_one, 8, &device_one));
    uint32_t seed = 200;
    MoeAttentionParams& p = cpu.params();
    MoeAttentionParams& q = dev.params();
    moe_pairs::SameRandom(moe_pairs::Pairs(p, q), seed, [](const Shape& shape, uint32_t sd) {
      return RandomTensor(shape, 0.3f, sd);
    });
    cpu.ZeroGradients();
    dev.ZeroGradients();
    const int64_t t = 256, seq_len = 16;
    std::vector<int32_t> task(t);
    for (int64_t i = 0; i < t; ++i) task[i] = static_cast<int32_t>((i / 48) % 3);
    const Tensor x = RandomTensor({t, cfg.d}, 1.0f, 210), dy = RandomTensor({t, cfg.d}, 1.0f, 211);
    MoeForwardArgs args;
    args.task = task.data();
    Tensor y = Tensor::Empty({t, cfg.d}), dx = Tensor::Empty({t, cfg.d});
    ASSERT_TRUE(cpu.Forward(x, seq_len, args, &y).ok());
    cpu.Backward(dy, &dx);
    Tensor y_d = Tensor::Empty({t, cfg.d}, DType::kF32, Device::kCUDA),
           dx_d = Tensor::Empty({t, cfg.d}, DType::kF32, Device::kCUDA);
    ASSERT_TRUE(dev.Forward(x.To(Device::kCUDA), seq_len, args, &y_d).ok());
    dev.Backward(dy.To(Device::kCUDA), &dx_d);
    ASSERT_TRUE(dev.routed_on_device());
    SCOPED_TRACE("the CPU gates' nearest tie: " +
                 std::to_string(
                     moe_pairs::NearestTie(cpu.router().gates(), cfg.capacity.group_size, cfg.k)) +
                 " relative (moe_pairs::NearestTie)");
    moe_pairs::ExpectSameRouting(cpu.plan(), dev.plan(), cpu.aux(), dev.aux(), 1e-5);
    EXPECT_EQ(cpu.plan().capacity, dev.plan().capacity);
    EXPECT_NE(dev.losses().value("mi"), 0.0) << "an active MI term";
    EXPECT_EQ(cpu.aux().task_selections(), dev.aux().task_selections());
    ExpectTensorClose(y, y_d, 1e-4f);
    ExpectTensorClose(dx, dx_d, 1e-4f);
    ExpectTensorClose(cpu.grads().router_weight, dev.grads().router_weight, 1e-4f);
    ExpectTensorClose(cpu.grads().q_weight, dev.grads().q_weight, 1e-4f);
    ExpectTensorClose(cpu.grads().kv_weight, dev.grads().kv_weight, 1e-4f);
  }
}

}  // namespace
}  // namespace moerun
