// The GPU backend's device code run on the host against the CPU reference: the Thrust
// routing kernels (model/routing_thrust.h) against model/routing.h bit for bit, the
// expert MLP's Thrust kernels (model/expert_kernels_thrust.h) against runtime/kernels.h,
// and the device expert MLP itself (model/expert_mlp_device.h, the code the CUDA backend
// runs over cuBLAS) over an OpenBLAS column-major GEMM against the CPU ExpertMlp. On CI the
// Thrust source runs on the host (THRUST_DEVICE_SYSTEM_CPP); with nvcc the routing table
// runs on a CUDA device (device_ops_cuda_test.cc) and the experts in cuda_backend_test.cc.
#include <cblas.h>
#include <gtest/gtest.h>
#include <thrust/device_vector.h>
#include <thrust/execution_policy.h>
#include <thrust/host_vector.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <functional>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <tuple>
#include <type_traits>
#include <vector>

#include "comm/loopback_communicator.h"
#include "data/dataset.h"
#include "model/dense_kernels_thrust.h"
#include "model/expert_mlp_device.h"
#include "model/layers.h"
#include "model/modsquad.h"
#include "model/moe_attention.h"
#include "model/moe_dispatch.h"
#include "model/moe_layer.h"
#include "model/moe_plan.h"
#include "model/ops.h"
#include "model/routing.h"
#include "model/routing_thrust.h"
#include "model/vit.h"
#include "model/vit_spec.h"
#include "runtime/adamw_thrust.h"
#include "runtime/backend.h"
#include "runtime/checkpoint.h"
#include "runtime/config.h"
#include "runtime/kernels.h"
#include "runtime/optimizer.h"
#include "runtime/tensor.h"
#include "runtime/trainer.h"
#include "tests/counting_backend.h"
#include "tests/moe_pairs.h"
#include "tests/op_cases.h"

namespace moerun {
namespace {

using op_cases::ExpectClose;
using op_cases::MaxAbs;
using op_cases::OpCase;
using op_cases::OpCases;

struct Case {
  int64_t tokens;
  int experts, k;
  bool bpr, padding;
  int levels;  // gates quantised to this many values (ties), 0: continuous
};

std::string Name(const Case& c) {
  return "S=" + std::to_string(c.tokens) + " E=" + std::to_string(c.experts) +
         " k=" + std::to_string(c.k) + (c.bpr ? " bpr" : " vanilla") +
         (c.padding ? " padded" : "") + " levels=" + std::to_string(c.levels);
}

std::vector<float> Gates(const Case& c, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(0.f, 1.f);
  std::vector<float> g(c.tokens * c.experts);
  for (float& v : g) v = c.levels > 0 ? std::floor(u(rng) * c.levels) / c.levels : u(rng);
  return g;
}

TEST(ThrustRouting, TopKAndSlotsMatchTheCpuReference) {
  const std::vector<Case> cases = {
      {1, 2, 1, false, false, 0},    {17, 4, 2, false, false, 0},  {17, 4, 2, true, false, 0},
      {136, 8, 2, true, false, 0},   {136, 8, 2, false, false, 3}, {136, 8, 2, true, false, 3},
      {257, 32, 2, true, true, 0},   {300, 8, 1, true, true, 2},   {300, 8, 3, false, true, 4},
      {1000, 16, 4, true, false, 5}, {64, 3, 3, true, false, 1},   {5000, 64, 2, true, true, 0},
  };
  uint32_t seed = 1;
  // One scratch for all cases, as a layer keeps it: it only grows, and smaller calls use
  // its prefixes.
  thrust::device_vector<float> keys_w;
  thrust::device_vector<int32_t> s_order, s_keys, s_rank, s_cum;
  thrust::device_vector<int64_t> s_visit;
  int64_t most_tokens = 0;
  for (const Case& c : cases) {
    SCOPED_TRACE(Name(c));
    const auto grows = [&](int64_t tokens) {
      return thrust_routing::AssignSlotsScratchGrows(tokens, c.experts, c.k, c.bpr, s_order, s_keys,
                                                     s_rank, s_visit, keys_w, s_cum);
    };
    if (c.tokens > most_tokens) {
      EXPECT_TRUE(grows(c.tokens)) << "more tokens than ever";
    }
    const std::vector<float> gates = Gates(c, seed++);
    std::vector<uint8_t> routed(c.tokens, 1);
    if (c.padding) {
      for (int64_t s = 0; s < c.tokens; ++s) routed[s] = (s % 7 == 3) ? 0 : 1;
    }
    // CPU reference.
    std::vector<int32_t> idx(c.tokens * c.k), slot(c.tokens * c.k), load(c.experts), order;
    std::vector<float> w(c.tokens * c.k);
    TopK(gates.data(), c.tokens, c.experts, c.k, idx.data(), w.data());
    AssignSlots(idx.data(), w.data(), c.tokens, c.experts, c.k, c.bpr, slot.data(), load.data(),
                &order, c.padding ? routed.data() : nullptr);
    // Thrust, in the device system's memory.
    thrust::device_vector<float> d_gates(gates.begin(), gates.end()), d_w(c.tokens * c.k);
    thrust::device_vector<int32_t> d_idx(c.tokens * c.k), d_slot(c.tokens * c.k, -1),
        d_load(c.experts, -1);
    thrust::device_vector<uint8_t> d_routed(routed.begin(), routed.end());
    thrust_routing::TopK(thrust::device, thrust::raw_pointer_cast(d_gates.data()), c.tokens,
                         c.experts, c.k, thrust::raw_pointer_cast(d_idx.data()),
                         thrust::raw_pointer_cast(d_w.data()));
    thrust_routing::AssignSlots(thrust::device, thrust::raw_pointer_cast(d_idx.data()),
                                thrust::raw_pointer_cast(d_w.data()), c.tokens, c.experts, c.k,
                                c.bpr, thrust::raw_pointer_cast(d_slot.data()),
                                thrust::raw_pointer_cast(d_load.data()),
                                c.padding ? thrust::raw_pointer_cast(d_routed.data()) : nullptr,
                                s_order, s_keys, s_rank, s_visit, keys_w, s_cum);
    EXPECT_FALSE(grows(c.tokens)) << "the same call again needs no more scratch";
    EXPECT_FALSE(grows(std::min<int64_t>(c.tokens, most_tokens))) << "nor a smaller one";
    most_tokens = std::max(most_tokens, c.tokens);
    const thrust::host_vector<int32_t> h_idx = d_idx, h_slot = d_slot, h_load = d_load;
    const thrust::host_vector<float> h_w = d_w;
    EXPECT_EQ(std::vector<int32_t>(h_idx.begin(), h_idx.end()), idx);
    EXPECT_EQ(std::vector<float>(h_w.begin(), h_w.end()), w);
    EXPECT_EQ(std::vector<int32_t>(h_slot.begin(), h_slot.end()), slot);
    EXPECT_EQ(std::vector<int32_t>(h_load.begin(), h_load.end()), load);
  }
}

// Plan rows, pack, combine and its backward against the CPU plan and dispatch (moe_plan.cc,
// moe_dispatch.cc): groups, capacity drops, BPR, with and without combine weights.
TEST(ThrustRouting, RowsPackAndCombineMatchTheCpuReference) {
  struct Shape {
    int64_t tokens, group;
    int experts, k;
    double capacity_factor;
    bool bpr;
    int64_t w;
  };
  const Shape shapes[] = {{136, 68, 8, 2, 1.05, true, 16},
                          {136, 136, 8, 2, 0.5, false, 5},
                          {300, 100, 4, 3, 1.0, true, 33},
                          {514, 257, 32, 2, 1.25, true, 64}};
  LoopbackCommunicator one(0, 1);
  uint32_t seed = 100;
  for (const Shape& sh : shapes) {
    SCOPED_TRACE("T=" + std::to_string(sh.tokens) + " E=" + std::to_string(sh.experts) +
                 " k=" + std::to_string(sh.k) + " C=" + std::to_string(sh.capacity_factor));
    std::mt19937 rng(seed++);
    std::uniform_real_distribution<float> u(-1.f, 1.f);
    Tensor gates = Tensor::Empty({sh.tokens, sh.experts});
    for (int64_t i = 0; i < gates.numel(); ++i) gates.data<float>()[i] = 0.5f * (u(rng) + 1.f);
    CapacityRule rule;
    rule.capacity_factor = sh.capacity_factor;
    rule.bpr = sh.bpr;
    rule.group_size = sh.group;
    int64_t group = 0;
    StatusOr<int64_t> cap = CheckGroupsAndCapacity(rule, sh.tokens, sh.experts, sh.k, &group);
    ASSERT_TRUE(cap.ok()) << cap.status().message();
    RoutingPlan plan;
    PlanRouting(gates, rule, sh.k, group, *cap, one, &plan);
    const int64_t tk = sh.tokens * sh.k;
    // Rows from the CPU plan's experts and slots.
    const int32_t* idx = plan.expert_index.data<int32_t>();
    const int32_t* sl = plan.slot.data<int32_t>();
    thrust::device_vector<int32_t> d_idx(idx, idx + tk), d_slot(sl, sl + tk), d_row(tk, 7);
    thrust_routing::PlanRows(thrust::device, thrust::raw_pointer_cast(d_idx.data()),
                             thrust::raw_pointer_cast(d_slot.data()), sh.tokens, sh.k,
                             plan.group_size, plan.capacity, plan.rows_per_expert(),
                             thrust::raw_pointer_cast(d_row.data()));
    const int32_t* row = plan.row.data<int32_t>();
    const thrust::host_vector<int32_t> h_row = d_row;
    EXPECT_EQ(std::vector<int32_t>(h_row.begin(), h_row.end()),
              std::vector<int32_t>(row, row + tk));
    // Pack.
    std::vector<float> x(sh.tokens * sh.w);
    for (float& v : x) v = u(rng);
    Tensor buf;
    PackRows(plan, x.data(), sh.w, &buf);
    thrust::device_vector<float> d_x(x.begin(), x.end()), d_buf(buf.numel(), 0.0f);
    thrust_routing::PackRows(thrust::device, thrust::raw_pointer_cast(d_row.data()),
                             thrust::raw_pointer_cast(d_x.data()), sh.tokens, sh.k, sh.w,
                             thrust::raw_pointer_cast(d_buf.data()));
    const thrust::host_vector<float> h_buf = d_buf;
    EXPECT_EQ(std::vector<float>(h_buf.begin(), h_buf.end()),
              std::vector<float>(buf.data<float>(), buf.data<float>() + buf.numel()));
    // Combine of expert outputs (random rows), with the gate weights and without.
    std::vector<float> y(buf.numel());
    for (float& v : y) v = u(rng);
    thrust::device_vector<float> d_y(y.begin(), y.end()),
        d_w(plan.weight.data<float>(), plan.weight.data<float>() + tk);
    for (bool weighted : {true, false}) {
      std::vector<float> out(sh.tokens * sh.w, -1);
      GatherKeptRows(y.data(), row, weighted ? plan.weight.data<float>() : nullptr, sh.tokens, sh.k,
                     sh.w, out.data());
      thrust::device_vector<float> d_out(out.size(), -2);
      thrust_routing::GatherKeptRows(thrust::device, thrust::raw_pointer_cast(d_y.data()),
                                     thrust::raw_pointer_cast(d_row.data()),
                                     weighted ? thrust::raw_pointer_cast(d_w.data()) : nullptr,
                                     sh.tokens, sh.k, sh.w, thrust::raw_pointer_cast(d_out.data()));
      const thrust::host_vector<float> h_out = d_out;
      EXPECT_EQ(std::vector<float>(h_out.begin(), h_out.end()), out) << "weighted " << weighted;
    }
    // Combine backward: d expert rows and d gates, bit for bit.
    std::vector<float> dy(sh.tokens * sh.w), d_weight(tk, -1);
    for (float& v : dy) v = u(rng);
    Tensor d_buf_cpu = Tensor::Empty(buf.shape());
    GatherKeptRowsBackward(y.data(), row, plan.weight.data<float>(), dy.data(), sh.tokens, sh.k,
                           sh.w, &d_buf_cpu, d_weight.data());
    thrust::device_vector<float> d_dy(dy.begin(), dy.end()), d_dbuf(buf.numel(), 0.0f),
        d_dweight(tk, -3);
    thrust_routing::GatherKeptRowsBackward(
        thrust::device, thrust::raw_pointer_cast(d_y.data()),
        thrust::raw_pointer_cast(d_row.data()), thrust::raw_pointer_cast(d_w.data()),
        thrust::raw_pointer_cast(d_dy.data()), sh.tokens, sh.k, sh.w,
        thrust::raw_pointer_cast(d_dbuf.data()), thrust::raw_pointer_cast(d_dweight.data()));
    const thrust::host_vector<float> h_dbuf = d_dbuf, h_dweight = d_dweight;
    EXPECT_EQ(
        std::vector<float>(h_dbuf.begin(), h_dbuf.end()),
        std::vector<float>(d_buf_cpu.data<float>(), d_buf_cpu.data<float>() + d_buf_cpu.numel()));
    EXPECT_EQ(std::vector<float>(h_dweight.begin(), h_dweight.end()), d_weight);
  }
}

// --- The expert MLP's kernels and the device expert MLP ------------------------------

std::vector<float> Normal(int64_t n, float scale, uint32_t seed) {
  const op_cases::FVec v = op_cases::NormalV(n, scale, seed);
  return {v.begin(), v.end()};
}

float Bf16(uint16_t bits) { return BF16ToFloat(BF16{bits}); }

TEST(ThrustExperts, KernelsMatchTheCpuKernels) {
  for (bool tanh_form : {false, true}) {
    SCOPED_TRACE(tanh_form ? "tanh GELU" : "erf GELU");
    const int64_t el = 3, rows = 37, cols = 50, n = el * rows * cols;
    std::vector<float> x = Normal(n, 2.0f, 1), bias = Normal(el * cols, 0.5f, 2);
    x[5] = 0.0f;
    x[6] = -9.0f;
    x[7] = 9.0f;
    // fp32 -> bf16: FloatToBF16's bits exactly, NaN included.
    x[8] = std::numeric_limits<float>::quiet_NaN();
    std::vector<uint16_t> bits(n);
    thrust_experts::CastToBF16(thrust::device, x.data(), bits.data(), n);
    for (int64_t i = 0; i < n; ++i) ASSERT_EQ(bits[i], FloatToBF16(x[i]).bits) << i;
    x[8] = 0.25f;
    // Bias + GELU: the pre-activation exactly as AddBias, the activation within bf16
    // rounding of GeluForward / GeluTanhForward.
    std::vector<float> h = x, want_h = x, want_act(n);
    std::vector<uint16_t> act(n);
    thrust_experts::BiasGeluForward(thrust::device, h.data(), bias.data(), el, rows, cols,
                                    tanh_form, act.data());
    for (int64_t e = 0; e < el; ++e) {
      AddBias(want_h.data() + e * rows * cols, bias.data() + e * cols, rows, cols);
    }
    (tanh_form ? GeluTanhForward : GeluForward)(want_h.data(), want_act.data(), n);
    for (int64_t i = 0; i < n; ++i) {
      ASSERT_EQ(h[i], want_h[i]) << i;
      ASSERT_NEAR(Bf16(act[i]), want_act[i], 1e-5f + std::fabs(want_act[i]) * (1.0f / 256)) << i;
    }
    // GELU backward: within 1e-5 of GeluBackward / GeluTanhBackward.
    std::vector<float> dy = Normal(n, 1.0f, 3), d = dy, want_d(n);
    std::vector<uint16_t> d_bits(n);
    thrust_experts::GeluBackward(thrust::device, want_h.data(), d.data(), n, tanh_form,
                                 d_bits.data());
    (tanh_form ? GeluTanhBackward : GeluBackward)(want_h.data(), dy.data(), want_d.data(), n);
    for (int64_t i = 0; i < n; ++i) {
      ASSERT_NEAR(d[i], want_d[i], 1e-5f * (1.0f + std::fabs(want_d[i]))) << i;
      ASSERT_EQ(d_bits[i], FloatToBF16(d[i]).bits) << i;
    }
    // Bias gradients accumulate like BiasBackward.
    std::vector<float> db(el * cols, 1.0f), want_db(el * cols, 1.0f);
    thrust_experts::BiasGrad(thrust::device, dy.data(), db.data(), el, rows, cols);
    for (int64_t e = 0; e < el; ++e) {
      BiasBackward(dy.data() + e * rows * cols, want_db.data() + e * cols, rows, cols);
    }
    for (int64_t i = 0; i < el * cols; ++i) ASSERT_NEAR(db[i], want_db[i], 1e-4f) << i;
    std::vector<float> y = x, want_y = x;
    thrust_experts::AddBias(thrust::device, y.data(), bias.data(), el, rows, cols);
    for (int64_t e = 0; e < el; ++e) {
      AddBias(want_y.data() + e * rows * cols, bias.data() + e * cols, rows, cols);
    }
    EXPECT_EQ(y, want_y);
  }
}

// The cuBLAS stand-in: the column-major bf16 GEMM of a ColMajorGemm through OpenBLAS in fp32
// (bf16 inputs are exact in fp32), on host tensors, with Thrust's host policy.
struct HostBlasOps {
  static constexpr Device kDevice = Device::kCPU;
  int gemms = 0, grouped_calls = 0;

  static std::vector<float> Widen(const void* p, int64_t rows, int64_t cols, int64_t ld) {
    const auto* bits = static_cast<const uint16_t*>(p);
    std::vector<float> out((cols - 1) * ld + rows);
    for (size_t i = 0; i < out.size(); ++i) out[i] = Bf16(bits[i]);
    return out;
  }
  void Gemm(const ColMajorGemm& g) {
    ++gemms;
    for (int64_t b = 0; b < g.batch; ++b) {
      // Stored dims of A and B (column-major): op(A) is m x k, op(B) is k x n.
      const std::vector<float> a = Widen(static_cast<const uint16_t*>(g.a) + b * g.stride_a,
                                         g.trans_a ? g.k : g.m, g.trans_a ? g.m : g.k, g.lda);
      const std::vector<float> bb = Widen(static_cast<const uint16_t*>(g.b) + b * g.stride_b,
                                          g.trans_b ? g.n : g.k, g.trans_b ? g.k : g.n, g.ldb);
      cblas_sgemm(CblasColMajor, g.trans_a ? CblasTrans : CblasNoTrans,
                  g.trans_b ? CblasTrans : CblasNoTrans, g.m, g.n, g.k, 1.0f, a.data(), g.lda,
                  bb.data(), g.ldb, g.beta, g.c + b * g.stride_c, g.ldc);
    }
  }
  // The epilogue's contract (what cuBLASLt's GELU_AUX_BIAS must compute), when `fuse`:
  // pre = product + bf16 bias in fp32; act = bf16(gelu(pre)), aux = bf16(pre); C untouched
  // (poisoned here, so a reader of it fails).
  bool fuse = false;
  int fused = 0;
  bool GemmBiasGelu(const ColMajorGemm& g, const void* bias_bf16, int64_t bias_stride,
                    bool tanh_form, void* act, void* aux) {
    if (!fuse) return false;
    ++fused;
    Gemm(g);
    const auto* bias = static_cast<const uint16_t*>(bias_bf16);
    for (int64_t b = 0; b < g.batch; ++b) {
      for (int64_t j = 0; j < g.n; ++j) {
        for (int64_t i = 0; i < g.m; ++i) {
          const int64_t at = b * g.stride_c + j * g.ldc + i;
          const float pre = g.c[at] + FromBF16Bits(bias[b * bias_stride + i]);
          static_cast<uint16_t*>(act)[at] = ToBF16Bits(thrust_experts::Gelu(pre, tanh_form));
          static_cast<uint16_t*>(aux)[at] = ToBF16Bits(pre);
          g.c[at] = std::numeric_limits<float>::quiet_NaN();
        }
      }
    }
    return true;
  }
  void GroupedGemm(const std::vector<ColMajorGemm>& groups) {
    ++grouped_calls;
    for (const ColMajorGemm& g : groups) Gemm(g);
  }
  auto policy() const { return thrust::device; }
  void Synchronize() {}
};

// max |a - b| / max |b|; infinite where a value is NaN (std::max would skip it).
double RelErr(const Tensor& a, const Tensor& b) {
  double worst = 0, scale = 1e-30;
  for (int64_t i = 0; i < a.numel(); ++i) {
    const double diff = std::fabs(a.data<float>()[i] - b.data<float>()[i]);
    if (std::isnan(diff)) return std::numeric_limits<double>::infinity();
    worst = std::max(worst, diff);
    scale = std::max(scale, static_cast<double>(std::fabs(b.data<float>()[i])));
  }
  return worst / scale;
}

void FillExact(Tensor* t, float scale, uint32_t seed) {
  std::vector<float> v = Normal(t->numel(), scale, seed);
  for (int64_t i = 0; i < t->numel(); ++i) t->data<float>()[i] = BF16ToFloat(FloatToBF16(v[i]));
}

ExpertMlpParams HostParams(int64_t el, int64_t d, int64_t m) {
  ExpertMlpParams p;
  p.fc1_weight = Tensor::Empty({el, m, d});
  p.fc1_bias = Tensor::Empty({el, m});
  p.fc2_weight = Tensor::Empty({el, d, m});
  p.fc2_bias = Tensor::Empty({el, d});
  return p;
}

// The CUDA backend's expert MLP code, with OpenBLAS for cuBLAS: the GEMM operand mapping
// (row-major tensors, column-major BLAS), the bias/GELU kernels and the gradient
// accumulation against the fp32 CPU experts. Shapes are all different (E_l, R, D, M), so a
// swapped operand or transpose cannot pass.
TEST(DeviceExperts, ForwardAndBackwardMatchTheCpuExpertsUpToBF16) {
  struct Shape4 {
    int64_t el, r, d, m;
    bool tanh_form;
  };
  for (const Shape4& c :
       {Shape4{2, 48, 24, 40, false}, Shape4{3, 17, 64, 96, true}, Shape4{1, 130, 32, 20, true}}) {
    SCOPED_TRACE("E_l " + std::to_string(c.el) + " R " + std::to_string(c.r) + " D " +
                 std::to_string(c.d) + " M " + std::to_string(c.m));
    ExpertMlp cpu(c.el, c.d, c.m, c.tanh_form);
    FillExact(&cpu.params().fc1_weight, 1.0f / std::sqrt(static_cast<float>(c.d)), 1);
    FillExact(&cpu.params().fc1_bias, 0.1f, 2);
    FillExact(&cpu.params().fc2_weight, 1.0f / std::sqrt(static_cast<float>(c.m)), 3);
    FillExact(&cpu.params().fc2_bias, 0.1f, 4);
    Tensor x = Tensor::Empty({c.el, c.r, c.d}), dy = Tensor::Empty({c.el, c.r, c.d});
    FillExact(&x, 1.0f, 5);
    FillExact(&dy, 1.0f, 6);
    MoeTimers timers;
    Tensor y_cpu, dx_cpu;
    cpu.ZeroGradients();
    cpu.Forward(x, &y_cpu, &timers);
    cpu.Backward(dy, &dx_cpu, &timers);

    DeviceExpertMlp<HostBlasOps> dev(HostBlasOps{}, c.el, c.d, c.m, c.tanh_form);
    dev.LoadParams(cpu.params());
    Tensor y, dx;
    // Two backward calls accumulate twice the gradients.
    dev.Forward(x.Cast(DType::kBF16), &y);
    dev.Backward(dy, &dx);
    dev.Backward(dy, &dx);
    EXPECT_EQ(dev.ops().gemms, 2 + 4 + 4);
    ExpertMlpParams g = HostParams(c.el, c.d, c.m);
    dev.StoreGrads(&g);
    for (Tensor* t : {&g.fc1_weight, &g.fc1_bias, &g.fc2_weight, &g.fc2_bias})
      Scale(t->data<float>(), 0.5f, t->numel());
    // bf16 activations and incoming gradients: a few 2^-8 of the largest value.
    EXPECT_LT(RelErr(y, y_cpu), 2e-2);
    EXPECT_LT(RelErr(dx, dx_cpu), 2e-2);
    EXPECT_LT(RelErr(g.fc1_weight, cpu.grads().fc1_weight), 2e-2);
    EXPECT_LT(RelErr(g.fc1_bias, cpu.grads().fc1_bias), 2e-2);
    EXPECT_LT(RelErr(g.fc2_weight, cpu.grads().fc2_weight), 2e-2);
    EXPECT_LT(RelErr(g.fc2_bias, cpu.grads().fc2_bias), 1e-5);  // sums of the same fp32 rows
    // Not vacuous: a gradient is far from zero and from the forward's scale mix-ups.
    EXPECT_GT(RelErr(g.fc1_weight, Tensor::Zeros(g.fc1_weight.shape())), 0.5);
    // The fused fc1 (GEMM with a bias + GELU epilogue; the tanh form only): the same
    // output (the biases here are bf16 numbers, so the bf16 bias is exact), and gradients
    // from the bf16 pre-activation within bf16 of the CPU's.
    HostBlasOps fused_ops;
    fused_ops.fuse = true;
    DeviceExpertMlp<HostBlasOps> fused(fused_ops, c.el, c.d, c.m, c.tanh_form);
    fused.LoadParams(cpu.params());
    Tensor y2, dx2;
    fused.Forward(x.Cast(DType::kBF16), &y2);
    fused.ZeroGradients();
    fused.Backward(dy, &dx2);
    EXPECT_EQ(fused.ops().fused, c.tanh_form ? 1 : 0);
    EXPECT_EQ(fused.ops().gemms, 2 + 4);  // the stand-in's epilogue runs its GEMM too
    EXPECT_EQ(0, std::memcmp(y2.data<float>(), y.data<float>(), y.nbytes()));
    EXPECT_LT(RelErr(dx2, dx_cpu), 2e-2);
    ExpertMlpParams g2 = HostParams(c.el, c.d, c.m);
    fused.StoreGrads(&g2);
    EXPECT_LT(RelErr(g2.fc1_weight, cpu.grads().fc1_weight), 2e-2);
    EXPECT_LT(RelErr(g2.fc1_bias, cpu.grads().fc1_bias), 2e-2);
    if (!c.tanh_form) {  // not fused: the same bits as the first run
      EXPECT_EQ(0, std::memcmp(dx2.data<float>(), dx.data<float>(), dx.nbytes()));
    }
  }
}

TEST(DeviceExperts, GroupedDroplessForwardEqualsTheFixedCapacityRows) {
  const int64_t el = 3, r = 20, d = 24, m = 40;
  ExpertMlpParams p = HostParams(el, d, m);
  FillExact(&p.fc1_weight, 0.2f, 1);
  FillExact(&p.fc1_bias, 0.1f, 2);
  FillExact(&p.fc2_weight, 0.15f, 3);
  FillExact(&p.fc2_bias, 0.1f, 4);
  Tensor x = Tensor::Empty({el, r, d});
  FillExact(&x, 1.0f, 5);
  DeviceExpertMlp<HostBlasOps> dev(HostBlasOps{}, el, d, m, true);
  dev.LoadParams(p);
  Tensor fixed;
  dev.Forward(x.Cast(DType::kBF16), &fixed);
  const std::vector<int64_t> rows = {20, 0, 7};  // expert e keeps its first rows[e] rows
  Tensor packed = Tensor::Empty({27, d});
  int64_t at = 0;
  for (int64_t e = 0; e < el; ++e) {
    std::copy_n(x.data<float>() + e * r * d, rows[e] * d, packed.data<float>() + at * d);
    at += rows[e];
  }
  Tensor grouped;
  dev.ForwardGrouped(packed.Cast(DType::kBF16), rows, &grouped);
  EXPECT_EQ(dev.ops().grouped_calls, 2);
  at = 0;
  for (int64_t e = 0; e < el; ++e) {
    for (int64_t i = 0; i < rows[e] * d; ++i) {
      ASSERT_NEAR(grouped.data<float>()[at * d + i], fixed.data<float>()[e * r * d + i], 1e-5)
          << "expert " << e << " element " << i;
    }
    at += rows[e];
  }
}

// Warmup over 2 of 10 steps, weight decay 0.1.
OptimizerConfig TestAdamWConfig(DType moments) {
  OptimizerConfig cfg;
  cfg.learning_rate = 3e-3;
  cfg.weight_decay = 0.1;
  cfg.warmup_steps = 2;
  cfg.total_steps = 10;
  cfg.moments = moments;
  return cfg;
}

// The device AdamW update against AdamW::Step, bit for bit, with fp32 and bf16 moments,
// decayed and undecayed parameters, warmup, clipping scales and sign changes of the grads.
TEST(ThrustOptimizer, AdamWMatchesTheCpuOptimizerBitForBit) {
  for (DType moments : {DType::kF32, DType::kBF16}) {
    SCOPED_TRACE(DTypeName(moments));
    const OptimizerConfig cfg = TestAdamWConfig(moments);
    const int64_t n0 = 1000, n1 = 77;
    std::vector<float> w0 = Normal(n0, 1.0f, 1), w1 = Normal(n1, 0.5f, 2);
    std::vector<float> g0(n0), g1(n1);
    AdamW cpu(cfg,
              {{"w0", w0.data(), g0.data(), n0, true}, {"w1", w1.data(), g1.data(), n1, false}});
    std::vector<float> d0 = w0, d1 = w1;  // the device side's copies
    const size_t word = moments == DType::kBF16 ? 2 : 4;
    std::vector<uint8_t> m0(n0 * word, 0), v0(n0 * word, 0), m1(n1 * word, 0), v1(n1 * word, 0);
    for (int64_t step = 0; step < 6; ++step) {
      const std::vector<float> a = Normal(n0, step % 2 ? -1.0f : 1.0f, 10 + step);
      const std::vector<float> b = Normal(n1, 0.01f, 20 + step);
      std::copy(a.begin(), a.end(), g0.begin());
      std::copy(b.begin(), b.end(), g1.begin());
      const float scale = step == 3 ? 0.25f : 1.0f;
      cpu.Step(step, scale);
      const AdamWScalars s = cpu.Scalars(step, scale);
      thrust_optim::AdamWStep(thrust::device, s, true, d0.data(), g0.data(), m0.data(), v0.data(),
                              n0, moments == DType::kBF16);
      thrust_optim::AdamWStep(thrust::device, s, false, d1.data(), g1.data(), m1.data(), v1.data(),
                              n1, moments == DType::kBF16);
      ASSERT_EQ(0, std::memcmp(d0.data(), w0.data(), n0 * 4)) << "step " << step;
      ASSERT_EQ(0, std::memcmp(d1.data(), w1.data(), n1 * 4)) << "step " << step;
      ASSERT_EQ(0, std::memcmp(m0.data(), cpu.first_moment(0), n0 * word)) << "step " << step;
      ASSERT_EQ(0, std::memcmp(v1.data(), cpu.second_moment(1), n1 * word)) << "step " << step;
    }
    EXPECT_NE(d0, Normal(n0, 1.0f, 1)) << "the parameters moved";
  }
}

OpsTable HostThrustTable() {
  OpsTable t = thrust_dense::ThrustOps<thrust_dense::DevicePolicySource>::Table("thrust");
  t.gemm = &Gemm;  // cuBLAS on a GPU; OpenBLAS here
  t.gemm_strided_batched = &GemmStridedBatched;
  // The CUDA table's CudaSumOfSquaresMany with host memory for the device's: the same kernels.
  t.sum_of_squares_many = [](const float* const* x, const int64_t* n, int64_t count, double* out) {
    std::vector<double> scratch(thrust_dense::SquareScratch(n, count) + count);
    const thrust_dense::SquareLevels plan = thrust_dense::PlanSquareLevels(
        x, n, count, scratch.data(), scratch.data() + scratch.size() - count);
    thrust_dense::QueueSquareLevels(thrust::device, plan, plan.segments.data());
    std::copy_n(scratch.end() - count, count, out);
  };
  // The CUDA table's CudaAdamWStepMany with the segments and chunk table in host memory.
  t.adamw_step_many = [](const AdamWScalars& s, const AdamWArray* arrays, int64_t count,
                         bool bf16_moments) {
    const std::vector<thrust_optim::AdamWSegment> segments =
        thrust_optim::AdamWSegments(arrays, count);
    const std::vector<int32_t> chunks = thrust_optim::AdamWChunkSegments(segments);
    thrust_optim::QueueAdamWMany(thrust::device, s, segments.data(), chunks.data(),
                                 static_cast<int64_t>(chunks.size()) * thrust_optim::kAdamWChunk,
                                 bf16_moments);
  };
  return t;
}

// CudaSumOfSquaresMany on the stand-in: DeviceSquareSums, the sums in the device's memory,
// then one copy to the host through its backend (a blocking copy, as on a GPU); the
// fixture makes and frees it (while the stand-in backend is registered).
std::unique_ptr<thrust_dense::DeviceSquareSums> g_stand_in_sums;
void StandInSumOfSquaresMany(const float* const* x, const int64_t* n, int64_t count, double* out) {
  g_stand_in_sums->Run(thrust::device, Device::kCUDA, x, n, count, out);
}
// CudaAdamWStepMany on the stand-in: DeviceAdamWMany, its table uploaded through the backend.
std::unique_ptr<thrust_optim::DeviceAdamWMany> g_stand_in_adamw;
void StandInAdamWStepMany(const AdamWScalars& s, const AdamWArray* arrays, int64_t count,
                          bool bf16_moments) {
  g_stand_in_adamw->Run(thrust::device, Device::kCUDA, s, arrays, count, bf16_moments);
}

// The Thrust table with the self-attention the CUDA table composes over itself.
const OpsTable& ThrustTableWithComposedAttention() {
  static const OpsTable table = [] {
    OpsTable t = HostThrustTable();
    t.attention_forward = [](const float* qkv, float* out, float* probs, int64_t batch,
                             int64_t tokens, int64_t heads, int64_t head_dim) {
      ComposedAttentionForward(ThrustTableWithComposedAttention(), qkv, out, probs, batch, tokens,
                               heads, head_dim);
    };
    t.attention_backward = [](const float* qkv, const float* probs, const float* dout, float* dqkv,
                              int64_t batch, int64_t tokens, int64_t heads, int64_t head_dim) {
      ComposedAttentionBackward(ThrustTableWithComposedAttention(), Device::kCPU, qkv, probs, dout,
                                dqkv, batch, tokens, heads, head_dim);
    };
    t.choice_attention_forward = [](const float* q, const float* kv, const int32_t* row,
                                    int64_t tokens, int64_t k, int64_t dh, int64_t seq,
                                    float* probs, float* out) {
      ComposedChoiceAttentionForward(ThrustTableWithComposedAttention(), q, kv, row, tokens, k, dh,
                                     seq, probs, out);
    };
    t.choice_attention_backward = [](const float* q, const float* kv, const int32_t* row,
                                     const float* probs, const float* d_out, int64_t tokens,
                                     int64_t k, int64_t dh, int64_t seq, float* d_q, float* d_kv) {
      // Scratch for two sequences: the test's three in two chunks.
      std::vector<float> scratch(2 * seq * k * seq);
      ComposedChoiceAttentionBackward(ThrustTableWithComposedAttention(), q, kv, row, probs, d_out,
                                      tokens, k, dh, seq, d_q, d_kv, scratch.data(), 2);
    };
    return t;
  }();
  return table;
}

TEST(OpsTable, EveryThrustEntryMatchesTheCpuTable) {
  const OpsTable& cpu = Ops(Device::kCPU);
  const OpsTable thrust_table = HostThrustTable();
  for (const OpCase& c : OpCases()) {
    SCOPED_TRACE(c.name);
    const std::vector<float> want = c.run(cpu);
    EXPECT_GT(MaxAbs(want), 0.0f);
    ExpectClose(want, c.run(thrust_table), c.tol);
  }
  // The device's own entries (the CUDA test runs them on the GPU): here the composed
  // attention over the Thrust table, as the CUDA table composes it.
  for (const OpCase& c : op_cases::AttentionCases()) {
    SCOPED_TRACE(c.name);
    const std::vector<float> want = c.run(cpu);
    EXPECT_GT(MaxAbs(want), 0.0f);
    ExpectClose(want, c.run(ThrustTableWithComposedAttention()), c.tol);
  }
  // Every entry the CUDA table takes from ThrustOps is covered by a case above.
  const OpsTable bare = thrust_dense::ThrustOps<thrust_dense::DevicePolicySource>::Table("x");
  EXPECT_EQ(bare.gemm, nullptr);
  EXPECT_EQ(bare.attention_forward, nullptr);
  EXPECT_NE(bare.adamw_step, nullptr);  // ThrustOptimizer.AdamWMatchesTheCpuOptimizerBitForBit
}

void ComposedAttentionCase(int64_t batch, int64_t scratch_images) {
  const int64_t tokens = 17, heads = 4, dh = 8, d = heads * dh;
  const std::vector<float> qkv = Normal(batch * tokens * 3 * d, 1.5f, 30);
  const std::vector<float> dout = Normal(batch * tokens * d, 1.0f, 31);
  std::vector<float> out(batch * tokens * d), probs(batch * heads * tokens * tokens),
      dqkv(qkv.size());
  AttentionForward(qkv.data(), out.data(), probs.data(), batch, tokens, heads, dh);
  AttentionBackward(qkv.data(), probs.data(), dout.data(), dqkv.data(), batch, tokens, heads, dh);
  const OpsTable thrust_table = HostThrustTable();
  for (const OpsTable* t : {&Ops(Device::kCPU), &thrust_table}) {
    SCOPED_TRACE(t->name);
    std::vector<float> o(out.size(), -1.0f), p(probs.size(), -1.0f), dq(dqkv.size(), -1.0f),
        scratch(scratch_images * heads * tokens * tokens);
    ComposedAttentionForward(*t, qkv.data(), o.data(), p.data(), batch, tokens, heads, dh);
    ComposedAttentionBackward(*t, qkv.data(), p.data(), dout.data(), dq.data(), scratch.data(),
                              scratch_images, batch, tokens, heads, dh);
    ExpectClose(out, o, 2e-5f);
    ExpectClose(probs, p, 2e-5f);
    ExpectClose(dqkv, dq, 2e-5f);
  }
}

// The bound tests/device_ops_cuda_test.cc's Bf16GemmsMatchTheCpuBf16Table puts on the GEMM
// case, here on the CPU's tables: bf16-rounded operands move the products by more than
// 1e-3 of their largest magnitude.
TEST(OpsTable, Bf16GemmCaseShowsTheRounding) {
  std::vector<OpCase> cases = OpCases();
  const auto gemm_case = std::find_if(cases.begin(), cases.end(), [](const OpCase& c) {
    return c.name == "gemm/gemm_strided_batched";
  });
  ASSERT_NE(gemm_case, cases.end());
  const std::vector<float> fp32 = gemm_case->run(Ops(Device::kCPU));
  const std::vector<float> bf16 = gemm_case->run(CpuBf16GemmOps());
  float worst = 0;
  for (size_t i = 0; i < fp32.size(); ++i) worst = std::max(worst, std::fabs(bf16[i] - fp32[i]));
  EXPECT_GT(worst, 1e-3f * MaxAbs(fp32));
  EXPECT_LT(worst, 3e-2f * MaxAbs(fp32));
}

// The self-attention the CUDA table runs (batched GEMMs + softmax, ops.h's composed form)
// against the CPU attention kernel, over the CPU table and over the Thrust table: with more
// images than heads (a GEMM call per head) and fewer (a call per image), the backward's
// scratch holding one image, two (the last chunk partial) or all.
TEST(OpsTable, ComposedAttentionMatchesTheCpuAttentionKernel) {
  for (const int64_t batch : {5, 3}) {
    for (const int64_t scratch_images : {int64_t{1}, int64_t{2}, batch}) {
      SCOPED_TRACE(std::to_string(batch) + " images, scratch for " +
                   std::to_string(scratch_images));
      ComposedAttentionCase(batch, scratch_images);
    }
  }
  EXPECT_EQ(ComposedAttentionScratchImages(1024, 197, 12), 144);  // 256 MiB / (12 x 197^2 x 4)
  EXPECT_EQ(ComposedAttentionScratchImages(3, 197, 12), 3);
  EXPECT_EQ(ComposedAttentionScratchImages(8, 4096, 64), 1);  // an image's 4 GiB: at least 1
}

// --- A host stand-in for the GPU: host memory tagged as CUDA (runtime/backend.h) with the
// Thrust table (its kernels compiled for the host) registered as the CUDA ops, with the
// self-attention and per-choice attention composed over it as the CUDA table composes them.
// Code that is device-clean runs on it unchanged; host code reading its tensors (data<T>())
// dies as it would on a GPU. Each test installs it and restores the real (absent) CUDA
// backend.
void StandInAttentionForward(const float* qkv, float* out, float* probs, int64_t batch,
                             int64_t tokens, int64_t heads, int64_t head_dim) {
  ComposedAttentionForward(Ops(Device::kCUDA), qkv, out, probs, batch, tokens, heads, head_dim);
}
void StandInAttentionBackward(const float* qkv, const float* probs, const float* dout, float* dqkv,
                              int64_t batch, int64_t tokens, int64_t heads, int64_t head_dim) {
  ComposedAttentionBackward(Ops(Device::kCUDA), Device::kCUDA, qkv, probs, dout, dqkv, batch,
                            tokens, heads, head_dim);
}

void StandInChoiceAttentionForward(const float* q, const float* kv, const int32_t* row,
                                   int64_t tokens, int64_t k, int64_t dh, int64_t seq, float* probs,
                                   float* out) {
  ComposedChoiceAttentionForward(Ops(Device::kCUDA), q, kv, row, tokens, k, dh, seq, probs, out);
}
void StandInChoiceAttentionBackward(const float* q, const float* kv, const int32_t* row,
                                    const float* probs, const float* d_out, int64_t tokens,
                                    int64_t k, int64_t dh, int64_t seq, float* d_q, float* d_kv) {
  ComposedChoiceAttentionBackward(Ops(Device::kCUDA), Device::kCUDA, q, kv, row, probs, d_out,
                                  tokens, k, dh, seq, d_q, d_kv);
}

class StandInCuda : public ::testing::Test {
 protected:
  void SetUp() override {
    table_ = HostThrustTable();
    table_.name = "stand-in cuda";
    table_.attention_forward = &StandInAttentionForward;
    table_.attention_backward = &StandInAttentionBackward;
    table_.choice_attention_forward = &StandInChoiceAttentionForward;
    table_.choice_attention_backward = &StandInChoiceAttentionBackward;
    table_.sum_of_squares_many = &StandInSumOfSquaresMany;
    table_.adamw_step_many = &StandInAdamWStepMany;
    backend_ = NewHostStandInBackend(Device::kCUDA);
    before_backend_ = SetBackendForTesting(Device::kCUDA, backend_.get());
    before_ops_ = OpsFor(Device::kCUDA);
    RegisterOps(Device::kCUDA, &table_);
    g_stand_in_sums = std::make_unique<thrust_dense::DeviceSquareSums>();
    g_stand_in_adamw = std::make_unique<thrust_optim::DeviceAdamWMany>();
  }
  void TearDown() override {
    SetBackendForTesting(Device::kCUDA, backend_.get());  // its memory freed through it
    g_stand_in_sums.reset();
    g_stand_in_adamw.reset();
    // A test that registered a bf16 variant (or turned bf16 on) and failed before undoing
    // it leaves nothing behind: the variant lived on its stack.
    RegisterBf16GemmOps(Device::kCUDA, nullptr, nullptr);
    SetBf16Gemms(false);
    RegisterOps(Device::kCUDA, before_ops_);
    SetBackendForTesting(Device::kCUDA, before_backend_);
  }
  // A device copy of a host tensor, and a host copy of a device one.
  static Tensor Dev(const Tensor& host) { return host.To(Device::kCUDA); }
  static Tensor Host(const Tensor& dev) { return dev.To(Device::kCPU); }
  static Tensor Random(const Shape& shape, float scale, uint32_t seed) {
    Tensor t = Tensor::Empty(shape);
    const std::vector<float> v = Normal(t.numel(), scale, seed);
    std::copy(v.begin(), v.end(), t.data<float>());
    return t;
  }
  static void ExpectNear(const Tensor& want, const Tensor& got_device, float tol) {
    ASSERT_EQ(got_device.device(), Device::kCUDA);
    const Tensor got = Host(got_device);
    ExpectClose(std::vector<float>(want.data<float>(), want.data<float>() + want.numel()),
                std::vector<float>(got.data<float>(), got.data<float>() + got.numel()), tol);
  }

  OpsTable table_;
  std::unique_ptr<Backend> backend_;
  Backend* before_backend_ = nullptr;
  const OpsTable* before_ops_ = nullptr;
};

TEST_F(StandInCuda, TensorsAreDeviceTensorsThatHostCodeCannotRead) {
  Tensor t = Tensor::Zeros({3, 4}, DType::kF32, Device::kCUDA);
  EXPECT_EQ(t.device(), Device::kCUDA);
  EXPECT_DEATH(t.data<float>(), "host code cannot read device memory");
  EXPECT_STREQ(Ops(Device::kCUDA).name, "stand-in cuda");
}

// The ViT blocks' dense MLP and attention (model/layers.h) with weights and buffers on the
// device: the same numbers as on the CPU (bit for bit but for GELU's and the composed
// attention's rounding).
TEST_F(StandInCuda, DenseLayersRunOnTheTableOfTheirWeightsDevice) {
  const int64_t seqs = 2, tokens = 9, d = 16, m = 24, heads = 2, dh = 8, rows = seqs * tokens;
  const bool tanh_form = true;
  DenseMlpWeights cpu_mlp{Random({m, d}, 0.3f, 1), Random({m}, 0.1f, 2),  Random({d, m}, 0.3f, 3),
                          Random({d}, 0.1f, 4),    Tensor::Zeros({m, d}), Tensor::Zeros({m}),
                          Tensor::Zeros({d, m}),   Tensor::Zeros({d})};
  DenseMlpWeights dev_mlp{Dev(cpu_mlp.fc1_w),   Dev(cpu_mlp.fc1_b),   Dev(cpu_mlp.fc2_w),
                          Dev(cpu_mlp.fc2_b),   Dev(cpu_mlp.g_fc1_w), Dev(cpu_mlp.g_fc1_b),
                          Dev(cpu_mlp.g_fc2_w), Dev(cpu_mlp.g_fc2_b)};
  const Tensor x = Random({rows, d}, 1.0f, 5), dy = Random({rows, d}, 1.0f, 6);
  Tensor hidden = Tensor::Empty({rows, m}), act = Tensor::Empty({rows, m}),
         y = Tensor::Empty({rows, d}), d_act = Tensor::Empty({rows, m}),
         dx = Tensor::Empty({rows, d});
  DenseMlpForward(cpu_mlp, x.data<float>(), hidden.data<float>(), act.data<float>(),
                  y.data<float>(), rows, d, m, tanh_form);
  DenseMlpBackward(cpu_mlp, x.data<float>(), hidden.data<float>(), act.data<float>(),
                   dy.data<float>(), d_act.data<float>(), dx.data<float>(), rows, d, m, tanh_form);
  const Tensor x_d = Dev(x), dy_d = Dev(dy);
  Tensor hidden_d = Tensor::Empty({rows, m}, DType::kF32, Device::kCUDA),
         act_d = Tensor::Empty({rows, m}, DType::kF32, Device::kCUDA),
         y_d = Tensor::Empty({rows, d}, DType::kF32, Device::kCUDA),
         d_act_d = Tensor::Empty({rows, m}, DType::kF32, Device::kCUDA),
         dx_d = Tensor::Empty({rows, d}, DType::kF32, Device::kCUDA);
  auto D = [](const Tensor& t) { return t.device_data<float>(Device::kCUDA); };
  DenseMlpForward(dev_mlp, D(x_d), D(hidden_d), D(act_d), D(y_d), rows, d, m, tanh_form);
  DenseMlpBackward(dev_mlp, D(x_d), D(hidden_d), D(act_d), D(dy_d), D(d_act_d), D(dx_d), rows, d, m,
                   tanh_form);
  ExpectNear(y, y_d, 1e-5f);
  ExpectNear(dx, dx_d, 1e-5f);
  ExpectNear(cpu_mlp.g_fc1_w, dev_mlp.g_fc1_w, 1e-5f);
  ExpectNear(cpu_mlp.g_fc2_b, dev_mlp.g_fc2_b, 0);  // sums of the same rows in one order

  DenseAttentionWeights cpu_att{Random({3 * d, d}, 0.3f, 7), Random({3 * d}, 0.1f, 8),
                                Random({d, d}, 0.3f, 9),     Random({d}, 0.1f, 10),
                                Tensor::Zeros({3 * d, d}),   Tensor::Zeros({3 * d}),
                                Tensor::Zeros({d, d}),       Tensor::Zeros({d})};
  DenseAttentionWeights dev_att{Dev(cpu_att.qkv_w),    Dev(cpu_att.qkv_b),   Dev(cpu_att.proj_w),
                                Dev(cpu_att.proj_b),   Dev(cpu_att.g_qkv_w), Dev(cpu_att.g_qkv_b),
                                Dev(cpu_att.g_proj_w), Dev(cpu_att.g_proj_b)};
  Tensor qkv = Tensor::Empty({rows, 3 * d}), probs = Tensor::Empty({seqs, heads, tokens, tokens}),
         att = Tensor::Empty({rows, d}), d_att = Tensor::Empty({rows, d}),
         d_qkv = Tensor::Empty({rows, 3 * d});
  DenseAttentionForward(cpu_att, x.data<float>(), qkv.data<float>(), probs.data<float>(),
                        att.data<float>(), y.data<float>(), seqs, tokens, d, heads, dh);
  DenseAttentionBackward(cpu_att, x.data<float>(), qkv.data<float>(), probs.data<float>(),
                         att.data<float>(), dy.data<float>(), d_att.data<float>(),
                         d_qkv.data<float>(), dx.data<float>(), seqs, tokens, d, heads, dh);
  auto E = [](const Shape& s) { return Tensor::Empty(s, DType::kF32, Device::kCUDA); };
  Tensor qkv_d = E({rows, 3 * d}), probs_d = E({seqs, heads, tokens, tokens}), att_d = E({rows, d}),
         d_att_d = E({rows, d}), d_qkv_d = E({rows, 3 * d});
  DenseAttentionForward(dev_att, D(x_d), D(qkv_d), D(probs_d), D(att_d), D(y_d), seqs, tokens, d,
                        heads, dh);
  DenseAttentionBackward(dev_att, D(x_d), D(qkv_d), D(probs_d), D(att_d), D(dy_d), D(d_att_d),
                         D(d_qkv_d), D(dx_d), seqs, tokens, d, heads, dh);
  ExpectNear(y, y_d, 2e-5f);
  ExpectNear(probs, probs_d, 2e-5f);
  ExpectNear(dx, dx_d, 2e-5f);
  ExpectNear(cpu_att.g_qkv_w, dev_att.g_qkv_w, 2e-5f);
  ExpectNear(cpu_att.g_proj_b, dev_att.g_proj_b, 0);
}

// The fp32 expert MLP (model/moe_experts.h) with its parameters and buffers on the device.
TEST_F(StandInCuda, ExpertMlpRunsOnTheDeviceOfItsParameters) {
  const int64_t el = 3, r = 11, d = 16, m = 40;
  for (bool tanh_form : {false, true}) {
    SCOPED_TRACE(tanh_form ? "tanh GELU" : "erf GELU");
    ExpertMlp cpu(el, d, m, tanh_form), dev(el, d, m, tanh_form, Device::kCUDA);
    EXPECT_EQ(dev.params().fc1_weight.device(), Device::kCUDA);
    uint32_t seed = 20;
    ExpertMlpParams& p = cpu.params();
    for (Tensor* t : {&p.fc1_weight, &p.fc1_bias, &p.fc2_weight, &p.fc2_bias}) {
      *t = Random(t->shape(), 0.3f, seed++);
    }
    dev.params().fc1_weight.CopyFrom(p.fc1_weight);
    dev.params().fc1_bias.CopyFrom(p.fc1_bias);
    dev.params().fc2_weight.CopyFrom(p.fc2_weight);
    dev.params().fc2_bias.CopyFrom(p.fc2_bias);
    cpu.ZeroGradients();
    dev.ZeroGradients();
    const Tensor x = Random({el, r, d}, 1.0f, 30), dy = Random({el, r, d}, 1.0f, 31);
    MoeTimers timers;
    Tensor y, dx, y_d, dx_d;
    cpu.Forward(x, &y, &timers);
    cpu.Backward(dy, &dx, &timers);
    dev.Forward(Dev(x), &y_d, &timers);
    dev.Backward(Dev(dy), &dx_d, &timers);
    ExpectNear(y, y_d, 1e-5f);
    ExpectNear(dx, dx_d, 1e-5f);
    ExpectNear(cpu.grads().fc1_weight, dev.grads().fc1_weight, 1e-5f);
    ExpectNear(cpu.grads().fc2_weight, dev.grads().fc2_weight, 1e-5f);
    ExpectNear(cpu.grads().fc2_bias, dev.grads().fc2_bias, 0);
    EXPECT_DEATH(dev.Forward(x, &y_d, &timers), "experts on cuda got rows");
  }
}

// The cuBLAS stand-in on the stand-in device's memory, with the epilogue's contract (the
// tanh GELU's fc1 fused, as cuBLASLt runs it on a GPU).
struct StandInBlasOps : HostBlasOps {
  static constexpr Device kDevice = Device::kCUDA;
  StandInBlasOps() { fuse = true; }
};

int g_fused_experts_made = 0;
std::unique_ptr<FusedExperts> MakeStandInFusedExperts(const ExpertMlpParams& params,
                                                      const ExpertMlpParams& grads,
                                                      bool gelu_tanh) {
  ++g_fused_experts_made;
  return std::make_unique<BoundDeviceExperts<StandInBlasOps>>(StandInBlasOps{}, params, grads,
                                                              gelu_tanh);
}

// Under train.precision BF16 a device whose bf16 table makes fused experts (the CUDA one's,
// which bench moe-layer --device cuda measures) runs the ExpertMlp through them, bound to
// its parameters: the same bits as DeviceExpertMlp on the CPU from the same weights (its
// own copies), gradients into the ExpertMlp's, and the bf16 weight copies remade at each
// forward, so an update of the fp32 weights (the optimizer's) reaches the next one.
// The stand-in's bf16 variant, as the CUDA table's: bf16-rounded GEMMs and fused experts.
OpsTable StandInBf16Table(const OpsTable& base) {
  OpsTable bf16 = base;
  bf16.name = "stand-in cuda-bf16";
  bf16.gemm = CpuBf16GemmOps().gemm;
  bf16.gemm_strided_batched = CpuBf16GemmOps().gemm_strided_batched;
  bf16.make_fused_experts = &MakeStandInFusedExperts;
  return bf16;
}

TEST_F(StandInCuda, ExpertMlpRunsTheDevicesFusedExpertsUnderBf16) {
  const OpsTable bf16 = StandInBf16Table(table_);
  RegisterBf16GemmOps(Device::kCUDA, &table_, &bf16);
  const bool before = SetBf16Gemms(true);
  g_fused_experts_made = 0;
  const int64_t el = 3, r = 11, d = 16, m = 40;
  ExpertMlp dev(el, d, m, /*gelu_tanh=*/true, Device::kCUDA);
  HostBlasOps fused_ops;
  fused_ops.fuse = true;
  DeviceExpertMlp<HostBlasOps> ref(fused_ops, el, d, m, true);
  ExpertMlpParams host;
  host.fc1_weight = Random({el, m, d}, 0.3f, 20);
  host.fc1_bias = Random({el, m}, 0.3f, 21);
  host.fc2_weight = Random({el, d, m}, 0.3f, 22);
  host.fc2_bias = Random({el, d}, 0.3f, 23);
  auto load = [&] {
    ref.LoadParams(host);
    dev.params().fc1_weight.CopyFrom(host.fc1_weight);
    dev.params().fc1_bias.CopyFrom(host.fc1_bias);
    dev.params().fc2_weight.CopyFrom(host.fc2_weight);
    dev.params().fc2_bias.CopyFrom(host.fc2_bias);
  };
  load();
  dev.ZeroGradients();
  ref.ZeroGradients();
  MoeTimers timers;
  for (int round = 0; round < 2; ++round) {
    SCOPED_TRACE(round == 0 ? "first weights" : "after a weight update");
    const Tensor x = Random({el, r, d}, 1.0f, 30 + round),
                 dy = Random({el, r, d}, 1.0f, 40 + round);
    Tensor y_d, dx_d, y, dx;
    dev.Forward(Dev(x), &y_d, &timers);
    dev.Backward(Dev(dy), &dx_d, &timers);
    ref.Forward(x.Cast(DType::kBF16), &y);
    ref.Backward(dy, &dx);
    ExpectNear(y, y_d, 0);
    ExpectNear(dx, dx_d, 0);
    ExpertMlpParams ref_grads;
    ref_grads.fc1_weight = Tensor::Zeros({el, m, d});
    ref_grads.fc1_bias = Tensor::Zeros({el, m});
    ref_grads.fc2_weight = Tensor::Zeros({el, d, m});
    ref_grads.fc2_bias = Tensor::Zeros({el, d});
    ref.StoreGrads(&ref_grads);
    ExpectNear(ref_grads.fc1_weight, dev.grads().fc1_weight, 0);
    ExpectNear(ref_grads.fc1_bias, dev.grads().fc1_bias, 0);
    ExpectNear(ref_grads.fc2_weight, dev.grads().fc2_weight, 0);
    ExpectNear(ref_grads.fc2_bias, dev.grads().fc2_bias, 0);
    // The optimizer's step, as far as the experts see it: new fp32 weights and biases.
    host.fc1_weight = Random({el, m, d}, 0.3f, 50);
    host.fc1_bias = Random({el, m}, 0.3f, 52);
    host.fc2_weight = Random({el, d, m}, 0.3f, 51);
    load();
  }
  EXPECT_EQ(g_fused_experts_made, 1) << "made once, at the first forward";
  EXPECT_GT(ref.ops().fused, 0) << "the fused epilogue's path ran";
  SetBf16Gemms(before);
  RegisterBf16GemmOps(Device::kCUDA, nullptr, nullptr);
  // fp32 again: the table's GEMMs (no fused experts in the fp32 table).
  Tensor y_d;
  dev.Forward(Dev(Random({el, r, d}, 1.0f, 60)), &y_d, &timers);
  EXPECT_EQ(g_fused_experts_made, 1);
}

// The MoE layer with its rows, experts and combine on the device (router, plan and losses
// on the host): the same outputs, input gradients and parameter gradients as on the CPU,
// dropping by BPR at capacity factor 1, one expert-parallel rank.
// A loopback world (simulated peers) whose collectives move the stand-in device's memory
// through its backend, as the NCCL communicator moves a GPU's (dry-run --device cuda's).
class DeviceLoopback : public LoopbackCommunicator {
 public:
  DeviceLoopback(int rank, int size) : LoopbackCommunicator(rank, size, "world", Device::kCUDA) {}
};

// The sums of squares of a training step's gradients, every array's levels side by side
// (one launch per level): the same bits as the documented per-array levels, written out
// here (partial[t] = the sum over j = t, t + T, ... of the level's values, in order and in
// double, T = ceil(len / 256), until one value is left); the level table goes to the device
// once while the arrays stay where they are, and again when they move.
TEST_F(StandInCuda, SumsOfSquaresRunEveryArraysLevelsAtOnceBitForBit) {
  auto alone = [](const std::vector<float>& x) {
    std::vector<double> level(x.begin(), x.end());
    bool squares = true;
    for (;;) {
      const int64_t len = static_cast<int64_t>(level.size());
      const int64_t threads = len > 0 ? (len + 255) / 256 : 1;
      std::vector<double> next(threads, 0.0);
      for (int64_t t = 0; t < threads; ++t) {
        for (int64_t j = t; j < len; j += threads)
          next[t] += squares ? level[j] * level[j] : level[j];
      }
      squares = false;
      level = next;
      if (threads == 1) return level[0];
    }
  };
  const std::vector<int64_t> sizes = {0, 1, 255, 256, 257, 1000, 65536, 70001, 3 * 65536 + 5};
  std::vector<Tensor> arrays;
  std::vector<const float*> x;
  std::vector<double> want;
  for (size_t i = 0; i < sizes.size(); ++i) {
    const std::vector<float> v = Normal(sizes[i], 1.0f + static_cast<float>(i), 40 + i);
    Tensor host = Tensor::Empty({sizes[i]});
    std::copy(v.begin(), v.end(), host.data<float>());
    arrays.push_back(Dev(host));
    x.push_back(arrays.back().device_data<float>(Device::kCUDA));
    want.push_back(alone(v));
  }
  CountingBackend counting(backend_.get());
  SetBackendForTesting(Device::kCUDA, &counting);
  const int64_t count = static_cast<int64_t>(sizes.size());
  for (int call = 0; call < 3; ++call) {
    SCOPED_TRACE("call " + std::to_string(call));
    counting.from_host = 0;
    std::vector<double> got(count, -1.0);
    // The third call sums one array fewer: a new table.
    const int64_t c = call < 2 ? count : count - 1;
    Ops(Device::kCUDA).sum_of_squares_many(x.data(), sizes.data(), c, got.data());
    for (int64_t i = 0; i < c; ++i) EXPECT_EQ(got[i], want[i]) << "array of " << sizes[i];
    EXPECT_EQ(counting.from_host, call == 1 ? 0 : 1) << "the level table's uploads";
  }
  SetBackendForTesting(Device::kCUDA, backend_.get());
}

// AdamW::Step on a device updates all its arrays in one call (the table's adamw_step_many),
// the bits of the CPU's AdamW::Step: the arrays lie in one buffer with gaps between them,
// which keep their values (an array's chunk runs past its end: those threads write nothing).
// The arrays' table is uploaded at the first step and again only when the arrays move.
TEST_F(StandInCuda, AdamWUpdatesEveryArrayInOneCallBitForBit) {
  const std::vector<int64_t> sizes = {2 * 4096 + 1, 1, 4096, 0, 300, 4095};
  const int64_t gap = 7;
  int64_t total = gap;
  for (const int64_t n : sizes) total += n + gap;
  for (const DType moments : {DType::kF32, DType::kBF16}) {
    SCOPED_TRACE(DTypeName(moments));
    // A fresh cache: the last case's arrays are freed, and their addresses may come back.
    g_stand_in_adamw = std::make_unique<thrust_optim::DeviceAdamWMany>();
    const OptimizerConfig cfg = TestAdamWConfig(moments);
    Tensor host_w = Tensor::Empty({total}), host_g = Tensor::Empty({total});
    const std::vector<float> w0 = Normal(total, 1.0f, 3), g0 = Normal(total, 0.1f, 4);
    std::copy(w0.begin(), w0.end(), host_w.data<float>());
    std::copy(g0.begin(), g0.end(), host_g.data<float>());
    Tensor dev_w = Dev(host_w), dev_g = Dev(host_g);
    auto params = [&](Tensor& w, const Tensor& g, Device device, AdamWUpdateManyFn update) {
      std::vector<OptimizerParam> p;
      int64_t at = gap;
      for (size_t i = 0; i < sizes.size(); ++i) {
        p.push_back({"p" + std::to_string(i), w.device_data<float>(device) + at,
                     g.device_data<float>(device) + at, sizes[i], i % 2 == 0, device, update});
        at += sizes[i] + gap;
      }
      return p;
    };
    AdamW cpu(cfg, params(host_w, host_g, Device::kCPU, nullptr));
    AdamW dev(cfg, params(dev_w, dev_g, Device::kCUDA, Ops(Device::kCUDA).adamw_step_many));
    CountingBackend counting(backend_.get());
    SetBackendForTesting(Device::kCUDA, &counting);
    for (int64_t step = 0; step < 4; ++step) {
      SCOPED_TRACE("step " + std::to_string(step));
      const float scale = step == 2 ? 0.25f : 1.0f;
      cpu.Step(step, scale);
      counting.from_host = 0;
      dev.Step(step, scale);
      EXPECT_EQ(counting.from_host, step == 0 ? 1 : 0) << "the arrays' table's uploads";
      const Tensor got = dev_w.To(Device::kCPU);
      ASSERT_EQ(0, std::memcmp(got.data<float>(), host_w.data<float>(), total * 4));
      for (size_t i = 0; i < sizes.size(); ++i) {
        const size_t bytes = sizes[i] * DTypeSize(moments);
        if (bytes == 0) continue;
        std::vector<unsigned char> m(bytes), v(bytes);
        counting.CopyToHost(m.data(), dev.first_moment(i), bytes);
        counting.CopyToHost(v.data(), dev.second_moment(i), bytes);
        EXPECT_EQ(0, std::memcmp(m.data(), cpu.first_moment(i), bytes)) << "array " << i;
        EXPECT_EQ(0, std::memcmp(v.data(), cpu.second_moment(i), bytes)) << "array " << i;
      }
    }
    EXPECT_NE(0, std::memcmp(host_w.data<float>(), w0.data(), total * 4)) << "the arrays moved";
    // Another optimizer's arrays: a new table.
    Tensor other_w = Dev(host_w);
    AdamW moved(cfg, params(other_w, dev_g, Device::kCUDA, Ops(Device::kCUDA).adamw_step_many));
    counting.from_host = 0;
    moved.Step(0, 1.0f);
    EXPECT_EQ(counting.from_host, 1) << "the moved arrays' table";
    SetBackendForTesting(Device::kCUDA, backend_.get());
  }
}

// A MoE layer on a device moves only [T, E]- and [T, k]-sized tables between host and
// device: the router's logits and d(logits), the combine weights' gradient, the plan's rows
// and weights. Its input and input gradient [T, D] stay on the device (the router's GEMMs
// run there); before, x went to the host for the router and the router's dx came back.
TEST_F(StandInCuda, MoeLayerKeepsItsActivationsOnTheDeviceForTheRouter) {
  for (const GateKind gate : {GateKind::kNoisyTopK, GateKind::kTaskSoftmax}) {
    SCOPED_TRACE(gate == GateKind::kNoisyTopK ? "noisy top-k" : "task softmax");
    DeviceLoopback device_one(0, 1);
    auto groups = *MoeGroups::Create(&device_one, 4);
    MoeLayerConfig cfg;
    cfg.d = 64;
    cfg.m = 32;
    cfg.num_experts = 4;
    cfg.k = 2;
    cfg.capacity_factor = 1.0;
    cfg.noise_std = gate == GateKind::kNoisyTopK ? 1.0 : 0.0;
    cfg.gate = gate;
    cfg.tasks = 2;
    cfg.device = Device::kCUDA;
    MoeLayer layer(cfg, groups);
    layer.params().router_weight.CopyFrom(Random(layer.params().router_weight.shape(), 0.4f, 7));
    layer.ZeroGradients();
    const int64_t t = 40;
    const Tensor x = Dev(Random({t, cfg.d}, 1.0f, 8)), dy = Dev(Random({t, cfg.d}, 1.0f, 9));
    Tensor y = Tensor::Empty({t, cfg.d}, DType::kF32, Device::kCUDA),
           dx = Tensor::Empty({t, cfg.d}, DType::kF32, Device::kCUDA);
    std::vector<int32_t> task(t);
    for (int64_t i = 0; i < t; ++i) task[i] = static_cast<int32_t>(i / 20);
    MoeForwardArgs args;
    args.task = task.data();
    CountingBackend counting(backend_.get());
    SetBackendForTesting(Device::kCUDA, &counting);
    ASSERT_TRUE(layer.Forward(x, args, &y).ok());
    layer.Backward(dy, &dx);
    SetBackendForTesting(Device::kCUDA, backend_.get());
    const int64_t activation_bytes = t * cfg.d * 4;
    EXPECT_GT(counting.to_host_bytes, 0) << "the logits come to the host";
    EXPECT_LT(counting.to_host_bytes + counting.from_host_bytes, activation_bytes)
        << counting.to_host_bytes << " bytes to the host, " << counting.from_host_bytes
        << " back: an activation's worth or more";
    EXPECT_EQ(layer.grads().router_weight.device(), Device::kCUDA);
  }
}

// bench train's device peak: the device's gemm entry, each timed call waited for (a GPU's
// work is only queued when the host returns); its product is A B.
TEST_F(StandInCuda, GemmGflopsTimesTheDevicesGemmWaitingForEachCall) {
  CountingBackend counting(backend_.get());
  SetBackendForTesting(Device::kCUDA, &counting);
  Tensor c;
  const double gflops = ops::GemmGflops(Device::kCUDA, 32, 3, &c);
  EXPECT_EQ(counting.syncs, 4) << "the warm-up and each timed call";
  SetBackendForTesting(Device::kCUDA, backend_.get());
  EXPECT_GT(gflops, 0.0);
  ASSERT_EQ(c.device(), Device::kCUDA);
  const Tensor host = Host(c);
  for (int64_t i = 0; i < host.numel(); ++i)
    ASSERT_EQ(host.data<float>()[i], 0.5f * 0.25f * 32) << i;
}

// One step of a layer that routes on the device (after a first step, which allocated its
// staging), under a counting backend: the forward makes one staged copy each way (the
// tables to the host, the losses' d(logits) back), no blocking copy and no wait but the
// one for the tables: at a fixed capacity after the combine was queued (on the stand-in:
// has run; y_d holds NaN until the combine writes it), dropless before it (the capacity
// sets the rows); the backward copies nothing and waits for nothing.
void ExpectAStepWithoutHostWaits(Backend* backend, Tensor* y_d, bool dropless,
                                 const std::function<void()>& forward,
                                 const std::function<void()>& backward) {
  CountingBackend counting(backend);
  SetBackendForTesting(Device::kCUDA, &counting);
  static_cast<float*>(y_d->raw_data())[0] = std::nanf("");
  int waits = 0;
  bool combined_before_wait = false;
  counting.on_wait_to_host = [&] {
    ++waits;
    combined_before_wait = !std::isnan(static_cast<const float*>(y_d->raw_data())[0]);
  };
  forward();
  EXPECT_EQ(waits, 1);
  if (dropless) {
    EXPECT_FALSE(combined_before_wait) << "dropless: the capacity before the rows";
  } else {
    EXPECT_TRUE(combined_before_wait) << "the host waited for the tables before the combine";
  }
  EXPECT_EQ(counting.to_staging, 1) << "the router's and the plan's tables in one copy";
  EXPECT_EQ(counting.from_staging, 1) << "the losses' d(logits)";
  EXPECT_EQ(counting.to_host + counting.from_host, 0) << "no blocking copy";
  EXPECT_EQ(counting.syncs, 0) << "no wait for the device";
  backward();
  EXPECT_EQ(counting.to_staging + counting.to_host, 1) << "the backward brings nothing";
  EXPECT_EQ(counting.from_staging + counting.from_host, 1) << "nor sends anything";
  EXPECT_EQ(counting.syncs, 0) << "nor waits for the device";
  SetBackendForTesting(Device::kCUDA, backend);
}

// Device routing: a MoE layer at a fixed capacity makes its noise, softmaxes and
// routing plan on the device. Its forward brings the router's and the plan's tables to the
// host in one copy (for the losses) and sends the losses' d(logits) back in one; its
// backward moves nothing between host and device and waits for nothing. It agrees with the
// CPU layer: the same routing and losses, outputs and gradients to rounding, with and
// without noise, vanilla and BPR, over one and two groups, with Mod-Squad's task
// gates (and their MI loss), and dropless (the host waits for the tables before the rows:
// the largest load is the capacity). Padding tokens stay on the host path.
TEST_F(StandInCuda, MoeLayerRoutesOnTheDeviceWithoutAHostWaitInTheBackward) {
  struct Case {
    double noise;
    bool bpr;
    int64_t group;
    GateKind gate;
    double capacity_factor = 1.0;  // 0: dropless
  };
  for (const Case c :
       {Case{1.0, true, 0, GateKind::kNoisyTopK}, Case{1.0, false, 20, GateKind::kNoisyTopK},
        Case{0.0, true, 20, GateKind::kNoisyTopK}, Case{0.0, true, 20, GateKind::kTaskSoftmax},
        Case{1.0, true, 20, GateKind::kNoisyTopK, 0.0},
        Case{0.0, false, 0, GateKind::kTaskSoftmax, 0.0}}) {
    const bool task_gate = c.gate == GateKind::kTaskSoftmax;
    const bool dropless = c.capacity_factor == 0;
    SCOPED_TRACE("noise " + std::to_string(c.noise) + (c.bpr ? ", BPR" : ", vanilla") + ", group " +
                 std::to_string(c.group) + (task_gate ? ", task gates" : "") +
                 (dropless ? ", dropless" : ""));
    LoopbackCommunicator host_one(0, 1);
    DeviceLoopback device_one(0, 1);
    auto host_groups = *MoeGroups::Create(&host_one, 4);
    auto device_groups = *MoeGroups::Create(&device_one, 4);
    MoeLayerConfig cfg;
    cfg.d = 16;
    cfg.m = 24;
    cfg.num_experts = 4;
    cfg.k = 2;
    cfg.capacity_factor = c.capacity_factor;
    cfg.bpr = c.bpr;
    cfg.group_size = c.group;
    cfg.noise_std = c.noise;
    cfg.gshard_weight = 0.01;
    cfg.z_loss_weight = 0.001;
    cfg.gate = c.gate;
    cfg.tasks = 3;
    cfg.mi_weight = 0.01;
    MoeLayer cpu(cfg, host_groups);
    cfg.device = Device::kCUDA;
    MoeLayer dev(cfg, device_groups);
    uint32_t seed = 70;
    MoeParams& p = cpu.params();
    MoeParams& q = dev.params();
    moe_pairs::SameRandom(moe_pairs::Pairs(p, q), seed,
                          [](const Shape& shape, uint32_t sd) { return Random(shape, 0.4f, sd); });
    cpu.ZeroGradients();
    dev.ZeroGradients();
    const int64_t t = 40;
    const Tensor x = Random({t, cfg.d}, 1.0f, 80), dy = Random({t, cfg.d}, 1.0f, 81);
    MoeForwardArgs args;
    args.noise_key = {5, 2, 1};
    args.first_token = 120;
    std::vector<int32_t> task(t);
    for (int64_t i = 0; i < t; ++i) task[i] = static_cast<int32_t>((i / 7) % 3);
    if (task_gate) args.task = task.data();
    Tensor y = Tensor::Empty({t, cfg.d}), dx = Tensor::Empty({t, cfg.d});
    ASSERT_TRUE(cpu.Forward(x, args, &y).ok());
    cpu.Backward(dy, &dx);
    Tensor y_d = Tensor::Empty({t, cfg.d}, DType::kF32, Device::kCUDA),
           dx_d = Tensor::Empty({t, cfg.d}, DType::kF32, Device::kCUDA);
    const Tensor x_d = Dev(x), dy_d = Dev(dy);
    // A first step allocates the staging (after waiting for the stream); the second is
    // counted.
    ASSERT_TRUE(dev.Forward(x_d, args, &y_d).ok());
    dev.Backward(dy_d, &dx_d);
    dev.ZeroGradients();
    ExpectAStepWithoutHostWaits(
        backend_.get(), &y_d, dropless, [&] { ASSERT_TRUE(dev.Forward(x_d, args, &y_d).ok()); },
        [&] { dev.Backward(dy_d, &dx_d); });
    EXPECT_TRUE(dev.routed_on_device());
    ASSERT_TRUE(cpu.router().noisy() == (c.noise > 0) && dev.router().noisy() == (c.noise > 0));
    if (!task_gate) {
      EXPECT_EQ(cpu.router().noisy_logits().defined(), c.noise > 0);
    } else {
      EXPECT_EQ(cpu.aux().task_selections(), dev.aux().task_selections());
      EXPECT_NE(cpu.losses().value("mi"), 0.0) << "an active MI term";
    }
    moe_pairs::ExpectSameRouting(cpu.plan(), dev.plan(), cpu.aux(), dev.aux(), 1e-6);
    EXPECT_EQ(cpu.plan().capacity, dev.plan().capacity);
    if (dropless) {
      EXPECT_EQ(cpu.metrics().dropped_fraction.back(), 0.0);
      EXPECT_GT(dev.plan().capacity, 0);
    }
    EXPECT_GT(cpu.losses().aux_total, 0.0);
    ExpectNear(y, y_d, 1e-5f);
    ExpectNear(dx, dx_d, 1e-5f);
    ExpectNear(cpu.grads().router_weight, dev.grads().router_weight, 1e-5f);
    ExpectNear(cpu.grads().fc1_weight, dev.grads().fc1_weight, 1e-5f);
  }
  // Padding tokens (evaluation's last batch): routed on the host; and a task id out of
  // range is refused on the device path as on the host's.
  DeviceLoopback device_one(0, 1);
  MoeLayerConfig cfg;
  cfg.d = 16;
  cfg.m = 8;
  cfg.num_experts = 4;
  cfg.capacity_factor = 0;
  cfg.device = Device::kCUDA;
  MoeLayer padded(cfg, *MoeGroups::Create(&device_one, 4));
  MoeForwardArgs args;
  Tensor y = Tensor::Empty({8, cfg.d}, DType::kF32, Device::kCUDA);
  const Tensor x = Dev(Random({8, cfg.d}, 1.0f, 82));
  const std::vector<uint8_t> routed = {1, 1, 1, 1, 1, 1, 0, 0};
  args.routed = routed.data();
  ASSERT_TRUE(padded.Forward(x, args, &y).ok());
  EXPECT_FALSE(padded.routed_on_device());
  args.routed = nullptr;
  cfg.capacity_factor = 1.0;
  cfg.gate = GateKind::kTaskSoftmax;
  cfg.tasks = 2;
  MoeLayer task_layer(cfg, *MoeGroups::Create(&device_one, 4));
  std::vector<int32_t> task(8, 1);
  task[5] = 2;
  args.task = task.data();
  const Status s = task_layer.Forward(x, args, &y);
  EXPECT_TRUE(task_layer.routed_on_device()) << "refused on the device path";
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("token 5 has task id 2"), std::string::npos) << s.message();
}

// A timer on a device that records timing events (a GPU) waits for nothing: it records an
// event when it starts and one when it stops, and the device time between them reaches its
// slot at the next ResolveDeviceTimers. Without events (the stand-in, the CPU) it times on
// the host at once.
TEST_F(StandInCuda, DeviceTimersRecordEventsAndResolveLater) {
  CountingBackend counting(backend_.get());
  SetBackendForTesting(Device::kCUDA, &counting);
  double cpu = 0, host_timed = 0, dev = 0;
  { ScopedTimer timer(&cpu); }
  counting.sync_ms = 20;  // were a timer to wait, it would show
  {
    ScopedTimer timer(&host_timed, Device::kCUDA);
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  EXPECT_GE(host_timed, 0.005) << "no events: timed on the host";
  EXPECT_LT(host_timed, 0.015) << "without a wait";
  counting.events = true;
  counting.clock_s = 10.0;
  {
    ScopedTimer timer(&dev, Device::kCUDA);
    EXPECT_EQ(counting.recorded, 1);
    counting.clock_s = 10.25;  // the timed work's device time
  }
  EXPECT_EQ(counting.recorded, 2);
  EXPECT_EQ(dev, 0.0) << "pending until resolved";
  ResolveDeviceTimers();
  EXPECT_EQ(dev, 0.25);
  EXPECT_EQ(counting.timed, 1);
  ResolveDeviceTimers();
  EXPECT_EQ(dev, 0.25) << "each timing is added once";
  EXPECT_EQ(counting.syncs, 0) << "no timer waited for the stream";
  SetBackendForTesting(Device::kCUDA, backend_.get());
}

// A device loopback's collectives: the simulated peers' blocks, sums and gathers as on the
// host, every byte moved by the device's backend.
TEST_F(StandInCuda, DeviceLoopbackMovesDeviceMemoryThroughTheBackend) {
  auto dev = [](const std::vector<float>& v) {
    Tensor t = Tensor::Empty({static_cast<int64_t>(v.size())});
    std::copy(v.begin(), v.end(), t.data<float>());
    return Dev(t);
  };
  auto host = [](const Tensor& d, int64_t n) {
    const Tensor h = Host(d);
    return std::vector<float>(h.data<float>(), h.data<float>() + n);
  };
  CountingBackend counting(backend_.get());
  SetBackendForTesting(Device::kCUDA, &counting);
  DeviceLoopback world(1, 3);
  EXPECT_EQ(world.device(), Device::kCUDA);
  // All-to-all: this rank sends itself {10, 11}; peers' blocks are copies of it, cut or
  // repeated to the counts expected (1 from rank 0, 3 from rank 2).
  const Tensor send = dev({0, 10, 11, 0});
  Tensor recv = Tensor::Empty({6}, DType::kF32, Device::kCUDA);
  world.AllToAllV(send.raw_data(), {1, 2, 1}, {0, 1, 3}, recv.raw_data(), {1, 2, 3}, {0, 1, 3},
                  DType::kF32);
  const int within_before_read = counting.within;
  EXPECT_EQ(host(recv, 6), (std::vector<float>{10, 10, 11, 10, 11, 10}));
  EXPECT_EQ(counting.to_host, 1) << "only the test's read";
  EXPECT_GE(within_before_read, 4);
  // A peer expecting rows from a rank that sends itself none gets zeros.
  world.AllToAllV(send.raw_data(), {0, 0, 0}, {0, 0, 0}, recv.raw_data(), {0, 0, 2}, {0, 0, 0},
                  DType::kF32);
  EXPECT_EQ(counting.zeros, 1);
  EXPECT_EQ(host(recv, 2), (std::vector<float>{0, 0}));
  // Sum over three equal ranks: three times; max: itself.
  Tensor g = dev({1.5f, -2});
  world.AllReduce(g.raw_data(), 2, DType::kF32, ReduceOp::kSum);
  EXPECT_EQ(host(g, 2), (std::vector<float>{4.5f, -6}));
  world.AllReduce(g.raw_data(), 2, DType::kF32, ReduceOp::kMax);
  EXPECT_EQ(host(g, 2), (std::vector<float>{4.5f, -6}));
  Tensor all = Tensor::Empty({6}, DType::kF32, Device::kCUDA);
  world.AllGather(g.raw_data(), 2, all.raw_data(), DType::kF32);
  EXPECT_EQ(host(all, 6), (std::vector<float>{4.5f, -6, 4.5f, -6, 4.5f, -6}));
  SetBackendForTesting(Device::kCUDA, backend_.get());
}

// The layer over one rank and over two expert-parallel ranks (the second simulated): the
// all-to-all, the block swaps and the experts on the device.
TEST_F(StandInCuda, MoeLayerRunsItsRowsExpertsAndCombineOnTheDevice) {
  // Experts per rank below, equal to and above the rank count, so the block swaps run both
  // ways round (more peers than local experts, and fewer).
  struct Case {
    int ranks, experts;
    bool overlap;
  };
  for (const Case c : {Case{1, 4, false}, Case{2, 4, false}, Case{2, 4, true}, Case{4, 4, false},
                       Case{4, 4, true}, Case{2, 8, false}}) {
    const int ranks = c.ranks;
    const bool overlap = c.overlap;
    SCOPED_TRACE(std::to_string(ranks) + " expert-parallel rank(s), " + std::to_string(c.experts) +
                 " experts" + (overlap ? ", overlapped dispatch" : ""));
    LoopbackCommunicator host_world(0, ranks);
    DeviceLoopback device_world(0, ranks);
    auto host_groups = *MoeGroups::Create(&host_world, c.experts);
    auto device_groups = *MoeGroups::Create(&device_world, c.experts);
    MoeLayerConfig cfg;
    cfg.d = 16;
    cfg.m = 24;
    cfg.num_experts = c.experts;
    cfg.k = 2;
    cfg.capacity_factor = 1.0;
    cfg.bpr = true;
    cfg.gelu_tanh = true;
    cfg.noise_std = 0;
    cfg.overlap_dispatch = overlap;
    MoeLayer cpu(cfg, host_groups);
    cfg.device = Device::kCUDA;
    MoeLayer dev(cfg, device_groups);
    EXPECT_EQ(dev.params().fc1_weight.device(), Device::kCUDA);
    uint32_t seed = 40;
    MoeParams& p = cpu.params();
    for (Tensor* t : {&p.router_weight, &p.fc1_weight, &p.fc1_bias, &p.fc2_weight, &p.fc2_bias}) {
      const Tensor r = Random(t->shape(), 0.4f, seed++);
      t->CopyFrom(r);
    }
    MoeParams& q = dev.params();
    q.router_weight.CopyFrom(p.router_weight);
    q.fc1_weight.CopyFrom(p.fc1_weight);
    q.fc1_bias.CopyFrom(p.fc1_bias);
    q.fc2_weight.CopyFrom(p.fc2_weight);
    q.fc2_bias.CopyFrom(p.fc2_bias);
    cpu.ZeroGradients();
    dev.ZeroGradients();
    const int64_t t = 40;
    const Tensor x = Random({t, cfg.d}, 1.0f, 50), dy = Random({t, cfg.d}, 1.0f, 51);
    MoeForwardArgs args;
    Tensor y = Tensor::Empty({t, cfg.d}), dx = Tensor::Empty({t, cfg.d});
    ASSERT_TRUE(cpu.Forward(x, args, &y).ok());
    cpu.Backward(dy, &dx);
    Tensor y_d = Tensor::Empty({t, cfg.d}, DType::kF32, Device::kCUDA),
           dx_d = Tensor::Empty({t, cfg.d}, DType::kF32, Device::kCUDA);
    ASSERT_TRUE(dev.Forward(Dev(x), args, &y_d).ok());
    dev.Backward(Dev(dy), &dx_d);
    EXPECT_GT(cpu.metrics().dropped_fraction.back(), 0.0) << "capacity 1.0 with k = 2 drops";
    EXPECT_EQ(cpu.metrics().dropped_fraction, dev.metrics().dropped_fraction);
    EXPECT_EQ(cpu.losses().aux_total, dev.losses().aux_total);
    ExpectNear(y, y_d, 1e-5f);
    ExpectNear(dx, dx_d, 1e-5f);
    ExpectNear(cpu.grads().fc1_weight, dev.grads().fc1_weight, 1e-5f);
    ExpectNear(cpu.grads().fc2_bias, dev.grads().fc2_bias, 1e-5f);
    ASSERT_EQ(dev.grads().router_weight.device(), Device::kCUDA) << "the router's GEMMs too";
    ExpectNear(cpu.grads().router_weight, dev.grads().router_weight, 1e-5f);
    if (ranks > 1) {
      // Device rows over a host communicator: refused, naming the fix.
      MoeLayer wrong(cfg, host_groups);
      EXPECT_DEATH((void)wrong.Forward(Dev(x), args, &y_d), "needs the NCCL communicator");
    }
  }
}

// A device communicator whose StartAllToAllV is still in flight until Wait(), as NCCL's is
// on its second stream: Wait() writes what the (simulated) peers send, peer q's element i
// of its block for this rank being 1000 q + i. It logs "start to T.. from F..." (the peers
// with non-zero send and receive counts), "test" and "wait".
class DeferredDeviceComm : public LoopbackCommunicator {
 public:
  DeferredDeviceComm(int rank, int size, std::vector<std::string>* log)
      : LoopbackCommunicator(rank, size), log_(log) {}
  Device device() const override { return Device::kCUDA; }
  std::unique_ptr<PendingCollective> StartAllToAllV(const void*,
                                                    const std::vector<int64_t>& send_counts,
                                                    const std::vector<int64_t>&, void* recv,
                                                    const std::vector<int64_t>& recv_counts,
                                                    const std::vector<int64_t>& recv_displs,
                                                    DType dtype) override {
    std::string line = "start to";
    for (size_t q = 0; q < send_counts.size(); ++q) {
      if (send_counts[q] > 0) line += " " + std::to_string(q);
    }
    line += " from";
    for (size_t q = 0; q < recv_counts.size(); ++q) {
      if (recv_counts[q] > 0) line += " " + std::to_string(q);
    }
    log_->push_back(line);
    EXPECT_EQ(dtype, DType::kF32);
    EXPECT_EQ(send_counts[rank()], 0) << "the own block is not sent";
    EXPECT_EQ(recv_counts[rank()], 0);
    return std::make_unique<Pending>(this, static_cast<float*>(recv), recv_counts, recv_displs);
  }

 private:
  class Pending : public PendingCollective {
   public:
    Pending(DeferredDeviceComm* c, float* recv, std::vector<int64_t> counts,
            std::vector<int64_t> displs)
        : c_(c), recv_(recv), counts_(std::move(counts)), displs_(std::move(displs)) {}
    ~Pending() override { EXPECT_TRUE(done_) << "the dispatcher never waited"; }
    bool Test() override {
      c_->log_->push_back("test");
      return done_;
    }
    void Wait() override {
      c_->log_->push_back("wait");
      for (size_t q = 0; q < counts_.size(); ++q) {
        for (int64_t i = 0; i < counts_[q]; ++i) recv_[displs_[q] + i] = 1000.0f * q + i;
      }
      done_ = true;
    }

   private:
    DeferredDeviceComm* c_;
    float* recv_;
    std::vector<int64_t> counts_, displs_;
    bool done_ = false;
  };
  std::vector<std::string>* log_;
};

// The overlapped dispatch on a device, a pipeline: the own rows are computed, in one piece,
// while the first transfer (the peer at distance 1) travels; that peer's rows while the
// second (distance 2) travels; its rows last. Each row is computed once, and every row holds
// its sender's data when it is computed. Rank 1 of 3: rows lie before and after its own.
// Rank 2 of 5 with at most 2 stages: the first takes one peer, the second the other three
// (their rows two runs: peers 3..4 and 0).
TEST_F(StandInCuda, OverlappedDispatchComputesEachPeersRowsWhileTheNextTransferIsInFlight) {
  auto run = [&](int pe, int me, int max_stages, const std::vector<std::string>& order) {
    const int64_t el = 2, e_total = el * pe, r = 5, w = 3;
    std::vector<std::string> log;
    DeferredDeviceComm comm(me, pe, &log);
    auto groups = *MoeGroups::Create(&comm, static_cast<int>(e_total));
    ASSERT_EQ(groups->local_experts(), el);
    Dispatcher dispatcher(groups.get());
    const Tensor send_h = Random({e_total, r, w}, 1.0f, 7);
    const Tensor send = Dev(send_h);
    Tensor recv;
    dispatcher.PrepareExpertRows(send, &recv);
    ASSERT_EQ(recv.device(), Device::kCUDA);
    // What recv[e][q * r + i][c] must hold: the own block for q == me, else the peer's.
    auto want = [&](int64_t e, int64_t q, int64_t i, int64_t c) {
      if (q == me) return send_h.data<float>()[((me * el + e) * r + i) * w + c];
      return 1000.0f * q + static_cast<float>((e * r + i) * w + c);
    };
    std::vector<int> computed(pe * r, 0);
    auto compute = [&](int64_t begin, int64_t count) {
      log.push_back("compute " + std::to_string(begin) + " " + std::to_string(count));
      const Tensor now = Host(recv);
      for (int64_t row = begin; row < begin + count; ++row) {
        ++computed[row];
        for (int64_t e = 0; e < el; ++e) {
          for (int64_t c = 0; c < w; ++c) {
            ASSERT_EQ(now.data<float>()[(e * pe * r + row) * w + c], want(e, row / r, row % r, c))
                << "row " << row << " of expert " << e << " computed before it arrived";
          }
        }
      }
    };
    double a2a = 0, pack = 0;
    dispatcher.ToExpertsOverlapped(send, &recv, compute, &a2a, &pack, 4, max_stages);
    EXPECT_EQ(log, order);
    EXPECT_EQ(computed, std::vector<int>(pe * r, 1));
    const Tensor got = Host(recv);
    for (int64_t e = 0; e < el; ++e) {
      for (int64_t row = 0; row < pe * r; ++row) {
        for (int64_t c = 0; c < w; ++c) {
          EXPECT_EQ(got.data<float>()[(e * pe * r + row) * w + c], want(e, row / r, row % r, c));
        }
      }
    }
  };
  struct Schedule {
    int pe, me, max_stages;
    std::vector<std::string> order;
  };
  for (const Schedule& sc :
       {Schedule{3,
                 1,
                 4,
                 {"start to 2 from 0", "compute 5 5", "wait", "start to 0 from 2", "compute 0 5",
                  "wait", "compute 10 5"}},
        Schedule{5,
                 2,
                 2,
                 {"start to 3 from 1", "compute 10 5", "wait", "start to 0 1 4 from 0 3 4",
                  "compute 5 5", "wait", "compute 0 5", "compute 15 10"}}}) {
    SCOPED_TRACE("rank " + std::to_string(sc.me) + " of " + std::to_string(sc.pe));
    run(sc.pe, sc.me, sc.max_stages, sc.order);
  }
}

// Every device gradient against the CPU model's (relative tolerance 1e-4); returns how
// many of the device model's gradients live on the device.
int ExpectGradsClose(const std::vector<Param>& cpu, const std::vector<Param>& dev) {
  EXPECT_EQ(cpu.size(), dev.size());
  int on_device = 0;
  for (size_t i = 0; i < std::min(cpu.size(), dev.size()); ++i) {
    SCOPED_TRACE(cpu[i].name);
    on_device += dev[i].grad.device() == Device::kCUDA;
    const Tensor g = dev[i].grad.To(Device::kCPU);
    const float* want = cpu[i].grad.data<float>();
    ExpectClose(std::vector<float>(want, want + g.numel()),
                std::vector<float>(g.data<float>(), g.data<float>() + g.numel()), 1e-4f);
  }
  return on_device;
}

// The whole V-MoE model (patch embedding, blocks with dense and MoE MLPs, pre-logits, head)
// with its parameters, gradients and activations on the device: the CPU model's loss,
// accuracy and gradients.
TEST_F(StandInCuda, VitModelComputesOnItsDevice) {
  ModelConfig m;
  m.set_name("stand-in");
  m.set_image_size(8);
  m.set_channels(2);
  m.set_patch_size(4);
  m.set_hidden_size(8);
  m.set_mlp_dim(12);
  m.set_num_layers(2);
  m.set_num_heads(2);
  m.set_num_classes(5);
  m.set_pre_logits_size(6);
  m.set_gelu(ModelConfig::TANH);
  MoeConfig* e = m.mutable_moe();
  e->set_num_experts(4);
  e->set_k(2);
  e->set_capacity_factor(1.0);
  e->set_group_images(0);
  LoopbackCommunicator one(0, 1);
  auto groups = *MoeGroups::Create(&one, 4);
  auto cpu = VitModel::Create(m, groups);
  auto dev = VitModel::Create(m, groups, Device::kCUDA);
  ASSERT_TRUE(cpu.ok() && dev.ok());
  (*cpu)->Init(3);
  (*dev)->Init(3);
  const int64_t b = 3;
  const std::vector<float> images = Normal(b * 2 * 8 * 8, 1.0f, 60);
  const std::vector<int32_t> labels = {1, 4, 0};
  VitBatch batch;
  batch.images = images.data();
  batch.labels = labels.data();
  batch.batch = b;
  batch.global_batch = b;
  VitOutput want, got;
  ASSERT_TRUE((*cpu)->Forward(batch, &want).ok());
  ASSERT_TRUE((*dev)->Forward(batch, &got).ok());
  EXPECT_NEAR(got.loss_sum, want.loss_sum, 1e-5 * std::fabs(want.loss_sum));
  EXPECT_NEAR(got.aux_loss, want.aux_loss, 1e-7);
  EXPECT_EQ(got.correct, want.correct);
  (*cpu)->ZeroGrads();
  (*dev)->ZeroGrads();
  (*cpu)->Backward();
  (*dev)->Backward();
  const std::vector<Param>& pc = (*cpu)->params();
  EXPECT_EQ(ExpectGradsClose(pc, (*dev)->params()), static_cast<int>(pc.size()))
      << "every parameter on the device";
  // Evaluation: an all-real mask (a rank without padding when another rank pads) routes on
  // the host, as the padding rank's layers do, and gives the unmasked loss; without a mask
  // the layers route on the device.
  batch.training = false;
  batch.routed_images = b;
  VitOutput masked_cpu, masked_dev, unmasked_dev;
  ASSERT_TRUE((*cpu)->Forward(batch, &masked_cpu).ok());
  ASSERT_TRUE((*dev)->Forward(batch, &masked_dev).ok());
  for (MoeLayer* layer : (*dev)->moe_layers()) EXPECT_FALSE(layer->routed_on_device());
  batch.routed_images = -1;
  ASSERT_TRUE((*dev)->Forward(batch, &unmasked_dev).ok());
  for (MoeLayer* layer : (*dev)->moe_layers()) EXPECT_TRUE(layer->routed_on_device());
  EXPECT_NEAR(masked_dev.loss_sum, masked_cpu.loss_sum, 1e-5 * std::fabs(masked_cpu.loss_sum));
  EXPECT_NEAR(unmasked_dev.loss_sum, masked_cpu.loss_sum, 1e-5 * std::fabs(masked_cpu.loss_sum));
}

// A tiny V-MoE on 64 synthetic images, global batch 8, with `train` settings added.
StatusOr<Config> TinyTrainingConfig(const std::string& train) {
  return ParseConfig(
      "model { name: 'dev' image_size: 8 channels: 1 patch_size: 4 hidden_size: 8 mlp_dim: 16 "
      "num_layers: 2 num_heads: 2 num_classes: 4 gelu: TANH "
      "moe { num_experts: 4 k: 2 capacity_factor: 1.0 group_size: 10 } } "
      "data { dataset: 'synthetic' synthetic_train_size: 64 synthetic_test_size: 16 } "
      "train { seed: 5 global_batch: 8 learning_rate: 0.003 " +
          train + " }",
      "inline", {});
}

// Training on the device: a Trainer whose V-MoE, AdamW moments and updates live on the
// stand-in takes the CPU Trainer's steps (losses, gradient norms, parameters), and its
// checkpoint (saved from host copies) restores into another device Trainer.
TEST_F(StandInCuda, TrainerTrainsAndCheckpointsOnTheDevice) {
  auto config = TinyTrainingConfig("steps: 4 warmup_steps: 2 optimizer_moments: BF16");
  ASSERT_TRUE(config.ok()) << config.status().message();
  const Dataset data = MakeSyntheticDataset(5, 64, 1, 8, 8, 4);
  LoopbackCommunicator one(0, 1);
  auto cpu = Trainer::Create(*config, &one, &data);
  auto dev = Trainer::Create(*config, &one, &data, Device::kCUDA);
  ASSERT_TRUE(cpu.ok() && dev.ok()) << (dev.ok() ? cpu.status() : dev.status()).message();
  for (int step = 0; step < 4; ++step) {
    const StepStats a = (*cpu)->Step(), b = (*dev)->Step();
    ASSERT_TRUE(a.finite && b.finite);
    EXPECT_NEAR(b.loss, a.loss, 1e-5 * a.loss) << step;
    EXPECT_NEAR(b.grad_norm, a.grad_norm, 1e-4 * a.grad_norm) << step;
  }
  std::vector<Param>& pc = (*cpu)->params();
  std::vector<Param>& pd = (*dev)->params();
  for (size_t i = 0; i < pc.size(); ++i) {
    SCOPED_TRACE(pc[i].name);
    const Tensor v = pd[i].value.To(Device::kCPU);
    ExpectClose(
        std::vector<float>(pc[i].value.data<float>(), pc[i].value.data<float>() + v.numel()),
        std::vector<float>(v.data<float>(), v.data<float>() + v.numel()), 1e-4f);
  }
  EXPECT_EQ((*dev)->FirstNonFiniteParameter(), "");
  for (const RoutingOverride& routing : {RoutingOverride{}, RoutingOverride{0.5, 0, false}}) {
    const EvalStats a = (*cpu)->Evaluate(data, 16, routing),
                    b = (*dev)->Evaluate(data, 16, routing);
    EXPECT_EQ(a.examples, b.examples);
    EXPECT_EQ(a.accuracy, b.accuracy);
    EXPECT_NEAR(b.loss, a.loss, 1e-5 * a.loss);
    EXPECT_EQ(a.dropped_fraction, b.dropped_fraction);
  }
  // Save from host copies; restore into a fresh device Trainer.
  char tmpl[] = "/tmp/moerun_device_ckpt_XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  SaveResult saved;
  ASSERT_TRUE(
      SaveCheckpoint(one, tmpl, (*dev)->StateManifest(), (*dev)->StateSlices(true), {}, &saved)
          .ok());
  auto manifest = ReadManifest(saved.path);
  ASSERT_TRUE(manifest.ok()) << manifest.status().message();
  auto again = Trainer::Create(*config, &one, &data, Device::kCUDA);
  ASSERT_TRUE(again.ok());
  ASSERT_TRUE((*again)->Restore(saved.path, *manifest).ok());
  EXPECT_EQ((*again)->step(), 4);
  for (size_t i = 0; i < pd.size(); ++i) {
    const Tensor want = pd[i].value.To(Device::kCPU);
    const Tensor got = (*again)->params()[i].value.To(Device::kCPU);
    ASSERT_EQ(0, std::memcmp(want.data<float>(), got.data<float>(), want.nbytes())) << pd[i].name;
  }
  const StepStats next = (*dev)->Step(), resumed = (*again)->Step();
  EXPECT_EQ(next.loss, resumed.loss) << "the moments came back too";
  std::filesystem::remove_all(tmpl);
}

// train.precision BF16 on a device with fused experts (a GPU's): the Trainer's experts run
// them, and its steps stay within bf16's reach of the CPU's bf16 steps (whose experts round
// every GEMM operand the same way, through the table).
TEST_F(StandInCuda, TrainerUnderBf16RunsTheFusedExperts) {
  auto config = TinyTrainingConfig("steps: 3 warmup_steps: 1 precision: BF16");
  ASSERT_TRUE(config.ok()) << config.status().message();
  const OpsTable bf16 = StandInBf16Table(table_);
  RegisterBf16GemmOps(Device::kCUDA, &table_, &bf16);
  g_fused_experts_made = 0;
  const Dataset data = MakeSyntheticDataset(5, 64, 1, 8, 8, 4);
  LoopbackCommunicator one(0, 1);
  {
    auto cpu = Trainer::Create(*config, &one, &data);
    auto dev = Trainer::Create(*config, &one, &data, Device::kCUDA);
    ASSERT_TRUE(cpu.ok() && dev.ok()) << (dev.ok() ? cpu.status() : dev.status()).message();
    EXPECT_EQ(g_fused_experts_made, 0) << "made at the first forward";
    for (int step = 0; step < 3; ++step) {
      const StepStats a = (*cpu)->Step(), b = (*dev)->Step();
      ASSERT_TRUE(a.finite && b.finite);
      // The first step from the same weights; after it AdamW's first update (about lr times
      // the gradient's sign) carries the last bits' differences into the weights.
      EXPECT_NEAR(b.loss, a.loss, (step == 0 ? 1e-3 : 1e-2) * a.loss) << step;
      if (step == 0) {
        EXPECT_NEAR(b.grad_norm, a.grad_norm, 1e-2 * a.grad_norm);
      }
    }
    EXPECT_EQ(g_fused_experts_made, static_cast<int>((*dev)->model().moe_layers().size()))
        << "one per MoE layer";
    EXPECT_GT(g_fused_experts_made, 0);
  }
  RegisterBf16GemmOps(Device::kCUDA, nullptr, nullptr);
}

// Two expert-parallel ranks on devices (the peer simulated): the dense all-reduce and the
// expert all-to-all over a device communicator, host scalars over the host one; the CPU
// Trainer's steps.
TEST_F(StandInCuda, TrainerOverTwoRanksUsesTheDeviceCommunicatorForDeviceMemory) {
  auto config = TinyTrainingConfig("steps: 3 warmup_steps: 1");
  ASSERT_TRUE(config.ok()) << config.status().message();
  const Dataset data = MakeSyntheticDataset(5, 64, 1, 8, 8, 4);
  LoopbackCommunicator cpu_world(0, 2), host_world(0, 2);
  DeviceLoopback device_world(0, 2);
  auto cpu = Trainer::Create(*config, &cpu_world, &data);
  auto dev = Trainer::Create(*config, &host_world, &data, Device::kCUDA, &device_world);
  ASSERT_TRUE(cpu.ok() && dev.ok()) << (dev.ok() ? cpu.status() : dev.status()).message();
  EXPECT_EQ(&(*dev)->model().moe_layers()[0]->groups().expert(), &device_world);
  EXPECT_EQ(&(*dev)->model().moe_layers()[0]->groups().world(), &host_world);
  for (int step = 0; step < 3; ++step) {
    const StepStats a = (*cpu)->Step(), b = (*dev)->Step();
    ASSERT_TRUE(a.finite && b.finite);
    EXPECT_NEAR(b.loss, a.loss, 1e-5 * a.loss) << step;
    EXPECT_NEAR(b.grad_norm, a.grad_norm, 1e-4 * a.grad_norm) << step;
  }
}

TEST_F(StandInCuda, TrainerRefusesWhatTheDevicePathDoesNotCover) {
  auto config = TinyTrainingConfig("steps: 1");
  ASSERT_TRUE(config.ok());
  const Dataset data = MakeSyntheticDataset(5, 64, 1, 8, 8, 4);
  LoopbackCommunicator two(0, 2);
  auto t = Trainer::Create(*config, &two, &data, Device::kCUDA);
  ASSERT_FALSE(t.ok());
  EXPECT_NE(t.status().message().find("needs a communicator that moves cuda memory (NCCL)"),
            std::string::npos)
      << t.status().message();
}

// The Trainer resolves its device timers every step (after the backward): with events, at
// most the last step's reduce and optimizer timers are pending after a step, and none once
// the split is read; the split's parts are the devices' times.
TEST_F(StandInCuda, TrainerResolvesItsDeviceTimersEveryStep) {
  auto config = TinyTrainingConfig("steps: 3 warmup_steps: 1");
  ASSERT_TRUE(config.ok());
  const Dataset data = MakeSyntheticDataset(5, 64, 1, 8, 8, 4);
  LoopbackCommunicator one(0, 1);
  CountingBackend counting(backend_.get());
  SetBackendForTesting(Device::kCUDA, &counting);
  {
    auto t = Trainer::Create(*config, &one, &data, Device::kCUDA);
    ASSERT_TRUE(t.ok()) << t.status().message();
    counting.events = true;
    counting.clock_s = 1.0;  // every timing: 0 s, but counted
    for (int step = 0; step < 3; ++step) {
      ASSERT_TRUE((*t)->Step().finite);
      EXPECT_LE(counting.recorded - 2 * counting.timed, 4) << "step " << step;
    }
    EXPECT_GT(counting.timed, 3 * 4) << "the MoE parts' timers record events too";
    EXPECT_EQ((*t)->time_split().steps, 3);
    EXPECT_EQ(counting.recorded, 2 * counting.timed) << "all resolved once the split is read";
  }
  SetBackendForTesting(Device::kCUDA, backend_.get());
}

// On a device the plan's bytes are checked against the GPU's free memory (with what the
// process's pool holds for reuse), not the host's: one byte short is refused with the
// figures and what to change; enough, or a device that does not report its memory, is
// accepted.
TEST_F(StandInCuda, TrainerChecksThePlanAgainstTheDevicesFreeMemory) {
  auto config = TinyTrainingConfig("steps: 1 eval_batch: 8");
  ASSERT_TRUE(config.ok());
  const Dataset data = MakeSyntheticDataset(5, 64, 1, 8, 8, 4);
  LoopbackCommunicator one(0, 1);
  // The plan, and the composed attention's backward scratch (8 images of 2 heads x 5 x 5
  // tokens).
  const int64_t need =
      EstimateFootprint(config->model(), 1, 8, false, false).bytes_per_rank + 8 * 2 * 5 * 5 * 4;
  ASSERT_GT(need, 0);
  CountingBackend counting(backend_.get());
  SetBackendForTesting(Device::kCUDA, &counting);
  counting.memory.total_bytes = 4 * need;
  counting.memory.free_bytes = need - 1;
  auto refused = Trainer::Create(*config, &one, &data, Device::kCUDA);
  ASSERT_FALSE(refused.ok());
  const std::string& why = refused.status().message();
  EXPECT_NE(why.find("on " + counting.Describe()), std::string::npos) << why;
  EXPECT_NE(why.find("free of"), std::string::npos) << why;
  EXPECT_NE(why.find("the attention's backward scratch"), std::string::npos) << why;
  EXPECT_NE(why.find("train.optimizer_moments: BF16"), std::string::npos) << why;
  EXPECT_TRUE(Trainer::Create(*config, &one, &data).ok()) << "the CPU's plan is the host's";
  counting.memory.pool_free_bytes = 1;  // what the process's pool holds for reuse counts
  auto fits = Trainer::Create(*config, &one, &data, Device::kCUDA);
  EXPECT_TRUE(fits.ok()) << fits.status().message();
  // Under train.precision BF16 the experts' bf16 weight copies count too (half the weights'
  // fp32 bytes at most).
  auto bf16 = TinyTrainingConfig("steps: 1 eval_batch: 8 precision: BF16");
  ASSERT_TRUE(bf16.ok());
  auto short_of_copies = Trainer::Create(*bf16, &one, &data, Device::kCUDA);
  ASSERT_FALSE(short_of_copies.ok());
  EXPECT_NE(short_of_copies.status().message().find("the bf16 weight copies"), std::string::npos)
      << short_of_copies.status().message();
  counting.memory.pool_free_bytes =
      1 + EstimateFootprint(config->model(), 1, 8, false, false).param_bytes / 2;
  auto fits_copies = Trainer::Create(*bf16, &one, &data, Device::kCUDA);
  EXPECT_TRUE(fits_copies.ok()) << fits_copies.status().message();
  // An evaluation step larger than the micro-batch (train.eval_batch 64: 64 images against
  // 8) keeps its activations on the device too: the plan is that step's, and the message
  // names train.eval_batch.
  auto big_eval = TinyTrainingConfig("steps: 1 eval_batch: 64");
  ASSERT_TRUE(big_eval.ok());
  counting.memory.pool_free_bytes = 1;
  auto short_of_eval = Trainer::Create(*big_eval, &one, &data, Device::kCUDA);
  ASSERT_FALSE(short_of_eval.ok()) << "the training step's plan fits, the evaluation's not";
  const std::string& eval_why = short_of_eval.status().message();
  EXPECT_NE(eval_why.find("evaluation step 64 images per rank"), std::string::npos) << eval_why;
  EXPECT_NE(eval_why.find("a smaller train.eval_batch"), std::string::npos) << eval_why;
  // (The attention's backward scratch is the training step's: evaluation has no backward.)
  const int64_t eval_need =
      EstimateFootprint(big_eval->model(), 1, 64, false, false).bytes_per_rank + 8 * 2 * 5 * 5 * 4;
  counting.memory.free_bytes = eval_need - 1;
  counting.memory.pool_free_bytes = 0;
  EXPECT_FALSE(Trainer::Create(*big_eval, &one, &data, Device::kCUDA).ok()) << "one byte short";
  counting.memory.free_bytes = eval_need;
  auto fits_eval = Trainer::Create(*big_eval, &one, &data, Device::kCUDA);
  EXPECT_TRUE(fits_eval.ok()) << fits_eval.status().message();
  EXPECT_TRUE(Trainer::Create(*big_eval, &one, &data).ok()) << "the CPU's plan is the host's";
  counting.memory = DeviceMemory{};
  auto unknown = Trainer::Create(*config, &one, &data, Device::kCUDA);
  EXPECT_TRUE(unknown.ok()) << unknown.status().message();
  SetBackendForTesting(Device::kCUDA, backend_.get());
}

// A host world that logs its all-reduces beside the backend's log.
class LoggingLoopback : public LoopbackCommunicator {
 public:
  LoggingLoopback(int rank, int size, std::vector<std::string>* log)
      : LoopbackCommunicator(rank, size), log_(log) {}
  void AllReduce(void* buffer, int64_t count, DType dtype, ReduceOp op) override {
    log_->push_back("all_reduce");
    LoopbackCommunicator::AllReduce(buffer, count, dtype, op);
  }

 private:
  std::vector<std::string>* log_;
};

// Ranks that share a GPU each read its free memory before any of them allocates its model
// (a collective between the read and the first allocation): else a later rank would see an
// earlier one's model as used memory, and count it again in its plan. One rank short stops
// every rank, before the model's own collectives, with that rank's figures.
TEST_F(StandInCuda, TrainerReadsTheDevicesMemoryOnEveryRankBeforeAnyAllocates) {
  auto config = TinyTrainingConfig("steps: 1 eval_batch: 8");
  ASSERT_TRUE(config.ok());
  const Dataset data = MakeSyntheticDataset(5, 64, 1, 8, 8, 4);
  std::vector<std::string> log;
  LoggingLoopback host_world(0, 2, &log);
  DeviceLoopback device_world(0, 2);
  const int64_t need = EstimateFootprint(config->model(), 2, 4, false, false).bytes_per_rank;
  CountingBackend counting(backend_.get());
  counting.log = &log;
  counting.memory.total_bytes = 4 * need;
  counting.memory.free_bytes = 2 * need;
  SetBackendForTesting(Device::kCUDA, &counting);
  {
    auto t = Trainer::Create(*config, &host_world, &data, Device::kCUDA, &device_world);
    ASSERT_TRUE(t.ok()) << t.status().message();
    const auto read = std::find(log.begin(), log.end(), "memory");
    ASSERT_NE(read, log.end());
    const auto allocated = std::find(read, log.end(), "allocate");
    ASSERT_NE(allocated, log.end());
    EXPECT_TRUE(std::find(read, allocated, "all_reduce") != allocated)
        << "no collective between the memory's read and the model's first allocation";
  }
  counting.memory.free_bytes = need - 1;
  auto refused = Trainer::Create(*config, &host_world, &data, Device::kCUDA, &device_world);
  ASSERT_FALSE(refused.ok());
  EXPECT_EQ(refused.status().message().rfind("rank 0: the plan needs", 0), 0)
      << refused.status().message();
  SetBackendForTesting(Device::kCUDA, backend_.get());
}

// Mod-Squad's mixture of attention heads with its projections, rows and per-choice
// attention on the device (over one rank and two simulated expert-parallel ranks): the
// CPU layer's outputs and gradients; the router's GEMMs on the device too. It routes on the
// device as the MoE layer does (one wait per forward, for the tables: after the combine is
// queued at a fixed capacity, before the rows dropless; nothing in the backward), at a fixed
// capacity and dropless. With padding tokens, on the host.
TEST_F(StandInCuda, MoeAttentionRunsItsProjectionsAndRowsOnTheDevice) {
  for (const auto& [ranks, capacity_factor] :
       {std::pair{1, 1.0}, std::pair{2, 1.0}, std::pair{1, 0.0}, std::pair{2, 0.0}}) {
    const bool dropless = capacity_factor == 0;
    SCOPED_TRACE(std::to_string(ranks) + " expert-parallel rank(s)" +
                 (dropless ? ", dropless" : ""));
    // The device layer's as a job's: host statistics over the world, rows over the
    // device's communicator.
    LoopbackCommunicator host_world(0, ranks), device_job_world(0, ranks);
    DeviceLoopback device_world(0, ranks);
    auto host_groups = *MoeGroups::Create(&host_world, 4);
    auto device_groups = *MoeGroups::Create(&device_job_world, 4, &device_world);
    MoeAttentionConfig cfg;
    cfg.d = 16;
    cfg.head_dim = 4;
    cfg.num_experts = 4;
    cfg.k = 2;
    cfg.tasks = 3;
    cfg.capacity.capacity_factor = capacity_factor;
    cfg.capacity.multiple_of = 0;
    cfg.capacity.bpr = ranks == 1;
    cfg.aux.mi = 0.1;
    cfg.aux.z = 0.01;
    MoeAttention cpu(cfg, host_groups);
    cfg.device = Device::kCUDA;
    MoeAttention dev(cfg, device_groups);
    EXPECT_EQ(dev.params().q_weight.device(), Device::kCUDA);
    EXPECT_EQ(dev.params().kv_bias.device(), Device::kCUDA);
    uint32_t seed = 70;
    MoeAttentionParams& p = cpu.params();
    MoeAttentionParams& q = dev.params();
    moe_pairs::SameRandom(moe_pairs::Pairs(p, q), seed,
                          [](const Shape& shape, uint32_t sd) { return Random(shape, 0.4f, sd); });
    cpu.ZeroGradients();
    dev.ZeroGradients();
    const int64_t t = 40, seq_len = 8;
    std::vector<int32_t> task(t);
    for (int64_t i = 0; i < t; ++i) task[i] = static_cast<int32_t>(i / 16);  // 2, 2, 1 seqs
    const Tensor x = Random({t, cfg.d}, 1.0f, 80), dy = Random({t, cfg.d}, 1.0f, 81);
    MoeForwardArgs args;
    args.task = task.data();
    Tensor y = Tensor::Empty({t, cfg.d}), dx = Tensor::Empty({t, cfg.d});
    ASSERT_TRUE(cpu.Forward(x, seq_len, args, &y).ok());
    cpu.Backward(dy, &dx);
    Tensor y_d = Tensor::Empty({t, cfg.d}, DType::kF32, Device::kCUDA),
           dx_d = Tensor::Empty({t, cfg.d}, DType::kF32, Device::kCUDA);
    const Tensor x_d = Dev(x), dy_d = Dev(dy);
    // The first step allocates the staging; the second is counted.
    ASSERT_TRUE(dev.Forward(x_d, seq_len, args, &y_d).ok());
    dev.Backward(dy_d, &dx_d);
    dev.ZeroGradients();
    ExpectAStepWithoutHostWaits(
        backend_.get(), &y_d, dropless,
        [&] { ASSERT_TRUE(dev.Forward(x_d, seq_len, args, &y_d).ok()); },
        [&] { dev.Backward(dy_d, &dx_d); });
    EXPECT_TRUE(dev.routed_on_device());
    moe_pairs::ExpectSameRouting(cpu.plan(), dev.plan(), cpu.aux(), dev.aux(), 1e-6);
    EXPECT_EQ(cpu.plan().capacity, dev.plan().capacity);
    if (dropless) {
      EXPECT_EQ(cpu.metrics().dropped_fraction.back(), 0.0);
    } else {
      EXPECT_GT(cpu.metrics().dropped_fraction.back(), 0.0) << "capacity 1.0 with k = 2 drops";
    }
    EXPECT_EQ(cpu.aux().task_selections(), dev.aux().task_selections());
    EXPECT_NE(cpu.losses().value("mi"), 0.0) << "an active MI term";
    EXPECT_NE(cpu.losses().value("z"), 0.0) << "an active z term";
    ExpectNear(y, y_d, 1e-5f);
    ExpectNear(dx, dx_d, 1e-5f);
    ExpectNear(cpu.grads().q_weight, dev.grads().q_weight, 1e-5f);
    ExpectNear(cpu.grads().o_weight, dev.grads().o_weight, 1e-5f);
    ExpectNear(cpu.grads().kv_weight, dev.grads().kv_weight, 1e-5f);
    ExpectNear(cpu.grads().kv_bias, dev.grads().kv_bias, 1e-5f);
    ASSERT_EQ(dev.grads().router_weight.device(), Device::kCUDA) << "the router's GEMMs too";
    ExpectNear(cpu.grads().router_weight, dev.grads().router_weight, 1e-5f);

    // Padding tokens (evaluation's last batch): the host routes.
    MoeAttention padded(cfg, device_groups);
    std::vector<uint8_t> routed(t, 1);
    std::fill(routed.begin() + 32, routed.end(), 0);
    args.routed = routed.data();
    ASSERT_TRUE(padded.Forward(x_d, seq_len, args, &y_d).ok());
    EXPECT_FALSE(padded.routed_on_device());
  }
}

// A tiny Mod-Squad model (MoE attention, MoE MLP, dense blocks; a classification, a
// segmentation and a regression head; uncertainty weights and the MI loss).
ModelConfig StandInModSquad() {
  ModelConfig m;
  m.set_name("stand-in-modsquad");
  m.set_image_size(8);
  m.set_channels(1);
  m.set_patch_size(4);
  m.set_hidden_size(8);
  m.set_mlp_dim(16);
  m.set_num_layers(3);
  m.set_num_heads(2);
  m.set_gelu(ModelConfig::TANH);
  ModSquadConfig* ms = m.mutable_modsquad();
  ms->set_head_dim(4);
  ms->set_attention_experts(4);
  ms->set_attention_k(2);
  ms->set_mlp_experts(4);
  ms->set_mlp_k(2);
  ms->set_mi_weight(0.2);
  ms->set_capacity_factor(1.0);
  ms->set_group_images(0);
  for (auto [name, kind, outputs] : {std::tuple{"class", TaskHeadConfig::CLASSIFICATION, 3},
                                     {"segmentation", TaskHeadConfig::SEGMENTATION, 2},
                                     {"edges", TaskHeadConfig::REGRESSION, 1}}) {
    TaskHeadConfig* t = ms->add_tasks();
    t->set_name(name);
    t->set_kind(kind);
    t->set_outputs(outputs);
  }
  return m;
}

// The whole Mod-Squad model with its parameters, gradients and activations on the device
// (over one rank and two simulated ranks): the CPU model's task losses, metrics, aux loss
// and gradients, every parameter on the device (the routers' too).
TEST_F(StandInCuda, ModSquadModelComputesOnItsDevice) {
  const ModelConfig m = StandInModSquad();
  const int64_t b = 3;
  std::mt19937 rng(90);
  std::vector<int32_t> cls(b), seg(b * 64);
  for (int32_t& v : cls) v = static_cast<int32_t>(rng() % 3);
  for (int32_t& v : seg) v = static_cast<int32_t>(rng() % 2);
  const std::vector<float> images = Normal(b * 64, 1.0f, 91), edges = Normal(b * 64, 1.0f, 92);
  for (int ranks : {1, 2}) {
    SCOPED_TRACE(std::to_string(ranks) + " rank(s)");
    LoopbackCommunicator cpu_world(0, ranks), host_world(0, ranks);
    DeviceLoopback device_world(0, ranks);
    auto cpu = ModSquadModel::Create(m, &cpu_world);
    auto dev = ModSquadModel::Create(m, &host_world, Device::kCUDA, &device_world);
    ASSERT_TRUE(cpu.ok() && dev.ok()) << (dev.ok() ? cpu.status() : dev.status()).message();
    (*cpu)->Init(4);
    (*dev)->Init(4);
    MultiTaskBatch batch;
    batch.images = images.data();
    batch.batch = b;
    batch.counted = b - 1;  // the last image is padding
    batch.global_counted = ranks * (b - 1);
    batch.labels = {cls.data(), seg.data(), nullptr};
    batch.targets = {nullptr, nullptr, edges.data()};
    MultiTaskOutput want, got;
    ASSERT_TRUE((*cpu)->Forward(batch, &want).ok());
    ASSERT_TRUE((*dev)->Forward(batch, &got).ok());
    EXPECT_NEAR(got.task_loss, want.task_loss, 1e-5 * std::fabs(want.task_loss));
    EXPECT_NEAR(got.aux_loss, want.aux_loss, 1e-6);
    EXPECT_NE(want.aux_loss, 0.0) << "the MI loss is there";
    ASSERT_EQ(got.tasks.size(), 3u);
    for (size_t t = 0; t < 3; ++t) {
      EXPECT_NEAR(got.tasks[t].loss, want.tasks[t].loss, 1e-5 * std::fabs(want.tasks[t].loss)) << t;
      EXPECT_NEAR(got.tasks[t].metric, want.tasks[t].metric, 1e-6) << t;
    }
    EXPECT_EQ((*dev)->task_outputs(0).device(), Device::kCPU);
    (*cpu)->ZeroGrads();
    (*dev)->ZeroGrads();
    (*cpu)->Backward();
    (*dev)->Backward();
    (*cpu)->ReduceGradients();
    (*dev)->ReduceGradients();
    const std::vector<Param>& pc = (*cpu)->params();
    EXPECT_EQ(ExpectGradsClose(pc, (*dev)->params()), static_cast<int>(pc.size()))
        << "every parameter on the device, the MoE layers' routers too";
  }
}

// Training Mod-Squad on the device: a Trainer whose model, AdamW moments and updates live
// on the stand-in takes the CPU Trainer's steps and evaluates to its per-task metrics, on
// one rank and over two (the peer simulated, the device communicator moving device memory).
TEST_F(StandInCuda, TrainerTrainsModSquadOnTheDevice) {
  auto config = ParseConfig(
      "model { name: 'dev-modsquad' image_size: 8 channels: 1 patch_size: 4 hidden_size: 8 "
      "mlp_dim: 16 num_layers: 2 num_heads: 2 gelu: TANH "
      "modsquad { head_dim: 4 attention_experts: 4 attention_k: 2 mlp_experts: 4 mlp_k: 2 "
      "mi_weight: 0.01 capacity_factor: 1.0 group_images: 2 "
      "tasks { name: 'class' kind: CLASSIFICATION outputs: 10 } "
      "tasks { name: 'segmentation' kind: SEGMENTATION outputs: 2 } "
      "tasks { name: 'edges' kind: REGRESSION outputs: 1 } } } "
      "data { dataset: 'synthetic' synthetic_train_size: 64 synthetic_test_size: 16 } "
      "train { seed: 5 global_batch: 8 learning_rate: 0.003 steps: 3 warmup_steps: 1 }",
      "inline", {});
  ASSERT_TRUE(config.ok()) << config.status().message();
  const Dataset data = MakeSyntheticDataset(5, 64, 1, 8, 8, 10);
  for (int ranks : {1, 2}) {
    SCOPED_TRACE(std::to_string(ranks) + " rank(s)");
    LoopbackCommunicator cpu_world(0, ranks), host_world(0, ranks);
    DeviceLoopback device_world(0, ranks);
    auto cpu = Trainer::Create(*config, &cpu_world, &data);
    auto dev = Trainer::Create(*config, &host_world, &data, Device::kCUDA, &device_world);
    ASSERT_TRUE(cpu.ok() && dev.ok()) << (dev.ok() ? cpu.status() : dev.status()).message();
    for (int step = 0; step < 3; ++step) {
      const StepStats a = (*cpu)->Step(), b = (*dev)->Step();
      ASSERT_TRUE(a.finite && b.finite);
      EXPECT_NEAR(b.loss, a.loss, 1e-5 * std::fabs(a.loss)) << step;
      EXPECT_NEAR(b.grad_norm, a.grad_norm, 1e-4 * a.grad_norm) << step;
      ASSERT_EQ(a.tasks.size(), b.tasks.size());
    }
    int on_device = 0;
    for (const Param& p : (*dev)->params()) on_device += p.value.device() == Device::kCUDA;
    EXPECT_GT(on_device, 0);
    const EvalStats a = (*cpu)->Evaluate(data, 16, RoutingOverride{}),
                    b = (*dev)->Evaluate(data, 16, RoutingOverride{});
    ASSERT_EQ(a.tasks.size(), 3u);
    ASSERT_EQ(b.tasks.size(), 3u);
    for (size_t t = 0; t < 3; ++t) {
      EXPECT_NEAR(b.tasks[t].value, a.tasks[t].value, 1e-5) << a.tasks[t].name;
    }
    EXPECT_NEAR(b.loss, a.loss, 1e-5 * std::fabs(a.loss));
  }
}

}  // namespace
}  // namespace moerun
namespace moerun {
namespace {

// What one steady training step on a device waits for: no Synchronize; per MoE layer (MoE
// MLP or MoE attention) one staged copy each way and one wait, for its routing tables; and
// a fixed number of blocking copies (on a GPU each waits for the stream), whatever the
// depth: V-MoE's images and d(logits) in, its logits and the gradient norm's sums out (the
// pre-logits' tanh and its backward on the device); Mod-Squad's heads and uncertainty
// weights on the host. A host wait added to a layer, or a blocking copy in a block, shows
// here.
TEST_F(StandInCuda, TrainingStepWaitsOncePerMoeLayerAndCopiesAFixedAmountWhateverTheDepth) {
  const Dataset data = MakeSyntheticDataset(5, 64, 1, 8, 8, 10);
  for (const bool modsquad : {false, true}) {
    int blocking_to_host = -1, blocking_from_host = -1;
    for (const int layers : {4, 8}) {
      SCOPED_TRACE(std::string(modsquad ? "Mod-Squad" : "V-MoE") + ", " + std::to_string(layers) +
                   " blocks");
      const std::string model =
          modsquad ? "modsquad { head_dim: 4 attention_experts: 4 attention_k: 2 mlp_experts: 4 "
                     "mlp_k: 2 mi_weight: 0.01 group_images: 2 "
                     "tasks { name: 'class' kind: CLASSIFICATION outputs: 10 } "
                     "tasks { name: 'segmentation' kind: SEGMENTATION outputs: 2 } } "
                   : "num_classes: 10 pre_logits_size: 6 "
                     "moe { num_experts: 4 k: 2 capacity_factor: 1.0 group_size: 10 every_n: 2 } ";
      auto config = ParseConfig(
          "model { name: 'dev' image_size: 8 channels: 1 patch_size: 4 hidden_size: 8 "
          "mlp_dim: 16 num_heads: 2 gelu: TANH num_layers: " +
              std::to_string(layers) + " " + model +
              "} data { dataset: 'synthetic' synthetic_train_size: 64 synthetic_test_size: 16 } "
              "train { seed: 5 global_batch: 8 learning_rate: 0.003 steps: 5 warmup_steps: 1 }",
          "inline", {});
      ASSERT_TRUE(config.ok()) << config.status().message();
      LoopbackCommunicator one(0, 1);
      auto t = Trainer::Create(*config, &one, &data, Device::kCUDA);
      ASSERT_TRUE(t.ok()) << t.status().message();
      for (int i = 0; i < 2; ++i) ASSERT_TRUE((*t)->Step().finite);  // staging allocated
      CountingBackend counting(backend_.get());
      int waits = 0;
      counting.on_wait_to_host = [&] { ++waits; };
      SetBackendForTesting(Device::kCUDA, &counting);
      const bool finite = (*t)->Step().finite;
      SetBackendForTesting(Device::kCUDA, backend_.get());
      ASSERT_TRUE(finite);
      // V-MoE: a MoE MLP in every second block; Mod-Squad (dropless here, its default): MoE
      // attention and MoE MLPs in alternate blocks.
      const int moe_layers = modsquad ? layers : layers / 2;
      EXPECT_EQ(counting.syncs, 0);
      EXPECT_EQ(counting.to_staging, moe_layers);
      EXPECT_EQ(counting.from_staging, moe_layers);
      EXPECT_EQ(waits, moe_layers);
      if (!modsquad) {
        EXPECT_EQ(counting.to_host, 2) << "the logits, the gradient norm's sums";
        EXPECT_EQ(counting.from_host, 2) << "the images and d(logits)";
      } else {
        EXPECT_EQ(counting.to_host, 4)
            << "the two heads' outputs, the uncertainty weights, the gradient norm's sums";
        EXPECT_EQ(counting.from_host, 4)
            << "the images, the two heads' d(output), the uncertainty weights' gradient";
      }
      if (blocking_to_host >= 0) {
        EXPECT_EQ(counting.to_host, blocking_to_host) << "as many as at half the depth";
        EXPECT_EQ(counting.from_host, blocking_from_host) << "as many as at half the depth";
      }
      blocking_to_host = counting.to_host;
      blocking_from_host = counting.from_host;
    }
  }
}

}  // namespace
}  // namespace moerun
