// The CUDA backend on a GPU: device tensors and copies, timers on CUDA events and the
// memory report, the cuBLAS bf16 expert MLP against the CPU ExpertMlp, its grouped
// (dropless) forward against the fixed-capacity one, and the NCCL communicator (one rank: NCCL
// refuses two ranks on one GPU). Runs under mpirun; without a GPU every test prints "skipped: no
// GPU" and is skipped.
#include <cuda_runtime_api.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <future>
#include <random>
#include <thread>

#include "comm/mpi_communicator.h"
#include "comm/nccl_communicator.h"
#include "model/moe_dispatch.h"
#include "model/moe_experts.h"
#include "model/moe_experts_cuda.h"
#include "runtime/backend.h"
#include "runtime/device_wait.h"
#include "runtime/tensor.h"
#include "tests/mpi_test_main.h"

namespace moerun {
namespace {

#define SKIP_WITHOUT_GPU()             \
  if (CudaDeviceCount() == 0) {        \
    std::printf("skipped: no GPU\n");  \
    GTEST_SKIP() << "skipped: no GPU"; \
  }

// Values exactly representable in bf16, so host and device see the same inputs.
void FillBF16Exact(Tensor* t, float scale, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> n01;
  float* p = t->data<float>();
  for (int64_t i = 0; i < t->numel(); ++i) p[i] = BF16ToFloat(FloatToBF16(scale * n01(rng)));
}

// max |a - b| / max |b|
double RelativeError(const Tensor& a, const Tensor& b) {
  const float* x = a.data<float>();
  const float* y = b.data<float>();
  double worst = 0, scale = 1e-30;
  for (int64_t i = 0; i < a.numel(); ++i) {
    worst = std::max(worst, static_cast<double>(std::fabs(x[i] - y[i])));
    scale = std::max(scale, static_cast<double>(std::fabs(y[i])));
  }
  return worst / scale;
}

TEST(CudaBackend, TensorsRoundTripThroughTheDevice) {
  SKIP_WITHOUT_GPU();
  Backend& cuda = RequireBackend(Device::kCUDA);
  const size_t before = cuda.allocated_bytes();
  Tensor host = Tensor::Empty({3, 5});
  for (int i = 0; i < 15; ++i) host.data<float>()[i] = 0.5f * i - 3;
  Tensor dev = host.To(Device::kCUDA);
  EXPECT_EQ(dev.device(), Device::kCUDA);
  EXPECT_GE(cuda.allocated_bytes(), before + 60);
  // (Host reads of device memory failing loudly is tests/tensor_test.cc's, with a stand-in
  // backend: a death test here would fork a process holding CUDA's and MPI's threads.)
  Tensor back = dev.Clone().To(Device::kCPU);
  for (int i = 0; i < 15; ++i) EXPECT_EQ(back.data<float>()[i], 0.5f * i - 3);
  dev.Fill(2.5f);
  back = dev.To(Device::kCPU);
  for (int i = 0; i < 15; ++i) EXPECT_EQ(back.data<float>()[i], 2.5f);
  dev.SetZero();
  back = dev.To(Device::kCPU);
  for (int i = 0; i < 15; ++i) EXPECT_EQ(back.data<float>()[i], 0.0f);
}

// Device timers on CUDA events: a timer around 64 MiB of copies on the stream gets their
// device time (more than zero, less than the wall time around it) only when resolved, and
// the pool's events are reused; the memory report is the driver's.
TEST(CudaBackend, TimersRecordEventsAndMemoryIsReported) {
  SKIP_WITHOUT_GPU();
  Backend& cuda = RequireBackend(Device::kCUDA);
  Tensor a = Tensor::Zeros({16, 1 << 20}, DType::kF32, Device::kCUDA);
  Tensor b = Tensor::Empty({16, 1 << 20}, DType::kF32, Device::kCUDA);
  cuda.Synchronize();
  double timed = 0;
  const auto t0 = std::chrono::steady_clock::now();
  {
    ScopedTimer timer(&timed, Device::kCUDA);
    for (int i = 0; i < 8; ++i) b.CopyFrom(a);
  }
  EXPECT_EQ(timed, 0.0) << "pending until resolved";
  ResolveDeviceTimers();
  const double wall = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  EXPECT_GT(timed, 0.0);
  EXPECT_LE(timed, wall);
  std::printf("8 x 64 MiB device copies: %.3f ms by events, %.3f ms wall\n", timed * 1e3,
              wall * 1e3);
  for (int i = 0; i < 100; ++i) {  // reused events: no growth, the same answers
    double t = 0;
    { ScopedTimer timer(&t, Device::kCUDA); }
    ResolveDeviceTimers();
    EXPECT_GE(t, 0.0);
  }
  const DeviceMemory mem = cuda.Memory();
  EXPECT_GT(mem.total_bytes, 0);
  EXPECT_GT(mem.free_bytes, 0);
  EXPECT_LE(mem.free_bytes, mem.total_bytes);
  if (mem.pool_used_high_bytes >= 0) {  // -1: no memory pools (plain cudaMalloc)
    EXPECT_GE(mem.pool_used_high_bytes, int64_t{128} << 20);
    EXPECT_GE(mem.pool_free_bytes, 0);
  }
}

// A pitched copy on the device (cudaMemcpy2DAsync, ops::CopyRows): rows land at the
// destination's pitch, and the gaps between them keep what was there.
TEST(CudaBackend, PitchedCopyMovesRowsAndLeavesTheGaps) {
  SKIP_WITHOUT_GPU();
  const int64_t rows = 5, width = 3, src_pitch = 4, dst_pitch = 7;
  Tensor src_h = Tensor::Empty({rows * src_pitch});
  for (int64_t i = 0; i < src_h.numel(); ++i) src_h.data<float>()[i] = static_cast<float>(i);
  const Tensor src = src_h.To(Device::kCUDA);
  Tensor dst = Tensor::Empty({rows * dst_pitch}, DType::kF32, Device::kCUDA);
  dst.Fill(-1.0f);
  RequireBackend(Device::kCUDA)
      .CopyWithin2D(dst.raw_data(), dst_pitch * sizeof(float), src.raw_data(),
                    src_pitch * sizeof(float), width * sizeof(float), rows);
  const Tensor got = dst.To(Device::kCPU);
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < dst_pitch; ++c) {
      const float want = c < width ? static_cast<float>(r * src_pitch + c) : -1.0f;
      EXPECT_EQ(got.data<float>()[r * dst_pitch + c], want) << r << "," << c;
    }
  }
}

struct ExpertCase {
  int64_t el, r, d, m;
  bool gelu_tanh;
};

// Holds the backend's stream with a host function (a stuck NCCL kernel's stand-in) until
// *release is true; release must outlive the stream's passing it.
void HoldStream(Backend& cuda, std::atomic<bool>* release) {
  ASSERT_EQ(cudaLaunchHostFunc(
                static_cast<cudaStream_t>(cuda.stream()),
                [](void* r) {
                  while (!static_cast<std::atomic<bool>*>(r)->load()) {
                    std::this_thread::sleep_for(std::chrono::microseconds(50));
                  }
                },
                release),
            cudaSuccess);
}

// A copy to or from the host never waits for the stream inside the driver, where a stuck
// NCCL kernel (a dead peer) would hang it with no word: it waits through the poll, whose
// registered checks run meanwhile. Here the stream is held by a host function that returns
// only once such a check has run; a copy that waited in the driver would never let it run
// (the test then releases the stream after 20 s and fails instead of hanging).
TEST(CudaBackend, HostCopiesWaitForTheStreamThroughThePoll) {
  SKIP_WITHOUT_GPU();
  Backend& cuda = RequireBackend(Device::kCUDA);
  // 64 MiB: more than the driver stages for a pageable host-to-device copy without waiting
  // for the stream.
  const int64_t n = int64_t{1} << 24;
  Tensor dev = Tensor::Zeros({n}, DType::kF32, Device::kCUDA);
  Tensor host = Tensor::Empty({n});
  for (const bool to_host : {true, false}) {
    SCOPED_TRACE(to_host ? "CopyToHost" : "CopyFromHost");
    host.Fill(1.5f);
    cuda.Synchronize();
    std::atomic<bool> release{false};
    std::atomic<int> checks{0};
    struct Registered {
      int id;
      ~Registered() { RemoveDeviceWaitCheck(id); }
    } check{AddDeviceWaitCheck([&](double, const std::string&) {
      ++checks;
      release = true;
    })};
    ASSERT_NO_FATAL_FAILURE(HoldStream(cuda, &release));
    std::future<void> copy = std::async(std::launch::async, [&] {
      if (to_host) {
        cuda.CopyToHost(host.raw_data(), dev.raw_data(), host.nbytes());
      } else {
        cuda.CopyFromHost(dev.raw_data(), host.raw_data(), host.nbytes());
      }
    });
    const bool done = copy.wait_for(std::chrono::seconds(20)) == std::future_status::ready;
    release = true;  // lets a copy that waited in the driver finish
    copy.get();
    EXPECT_TRUE(done) << "the copy waited for the stream in the driver, not through the poll";
    EXPECT_GT(checks.load(), 0) << "the poll's checks never ran";
    const Tensor back = dev.To(Device::kCPU);
    EXPECT_EQ(back.data<float>()[n - 7], to_host ? 0.0f : 1.5f);
    if (to_host) {
      EXPECT_EQ(host.data<float>()[n - 7], 0.0f);
    }
  }
}

// Uploads through page-locked staging (StagedUpload, the MoE layer's d(logits) of its
// losses): the copy is queued behind the stream's work and returns at once; the next upload
// waits for it before rewriting the staging, and each lands whole.
TEST(CudaBackend, StagedUploadsQueueWithoutAHostWait) {
  SKIP_WITHOUT_GPU();
  Backend& cuda = RequireBackend(Device::kCUDA);
  const int64_t n = int64_t{1} << 20;
  Tensor dev = Tensor::Zeros({n}, DType::kF32, Device::kCUDA);
  Tensor host = Tensor::Empty({n});
  StagedUpload upload;
  host.Fill(1.0f);
  upload.Copy(host, &dev);  // the first allocates the staging (after a wait for the stream)
  std::atomic<bool> release{false};
  ASSERT_NO_FATAL_FAILURE(HoldStream(cuda, &release));
  host.Fill(2.0f);
  // Queued behind the held stream: returns at once (a copy that waited would return only
  // once released, after 20 s).
  std::future<void> queued = std::async(std::launch::async, [&] { upload.Copy(host, &dev); });
  const bool at_once = queued.wait_for(std::chrono::seconds(20)) == std::future_status::ready;
  release = true;
  queued.get();
  EXPECT_TRUE(at_once) << "the upload waited for the stream";
  host.Fill(3.0f);  // the staging holds its own copy: this does not reach the first upload
  Tensor second = Tensor::Zeros({n}, DType::kF32, Device::kCUDA);
  EXPECT_EQ(dev.To(Device::kCPU).data<float>()[n - 1], 2.0f);
  upload.Copy(host, &second);
  EXPECT_EQ(second.To(Device::kCPU).data<float>()[n - 1], 3.0f);
  EXPECT_EQ(dev.To(Device::kCPU).data<float>()[0], 2.0f);
}

// The other way (HostCopies, the MoE layer's routing tables): Start packs the sources and
// queues one copy into staging behind the held stream and returns at once; work queued
// after it (here a zeroing of a source) does not reach what Finish hands over.
TEST(CudaBackend, HostCopiesStartWithoutAHostWaitAndFinishInStreamOrder) {
  SKIP_WITHOUT_GPU();
  Backend& cuda = RequireBackend(Device::kCUDA);
  Tensor a_host = Tensor::Empty({1000}), b_host = Tensor::Empty({37});
  a_host.Fill(4.0f);
  b_host.Fill(-1.5f);
  const Tensor a = a_host.To(Device::kCUDA), b = b_host.To(Device::kCUDA);
  Tensor a_out = Tensor::Empty({1000}), b_out = Tensor::Empty({37});
  HostCopies copies;
  copies.Start({&a, &b}, {&a_out, &b_out});  // allocates the staging (after a wait)
  copies.Finish();
  EXPECT_EQ(a_out.data<float>()[999], 4.0f);
  a_out.Fill(0.0f);
  b_out.Fill(0.0f);
  std::atomic<bool> release{false};
  ASSERT_NO_FATAL_FAILURE(HoldStream(cuda, &release));
  std::future<void> started = std::async(std::launch::async, [&] {
    copies.Start({&a, &b}, {&a_out, &b_out});
  });
  const bool at_once = started.wait_for(std::chrono::seconds(20)) == std::future_status::ready;
  release = true;
  started.get();
  EXPECT_TRUE(at_once) << "Start waited for the stream";
  Tensor zeroed = a;
  zeroed.SetZero();  // queued after the copy
  copies.Finish();
  EXPECT_EQ(a_out.data<float>()[0], 4.0f) << "the values at Start, in stream order";
  EXPECT_EQ(a_out.data<float>()[999], 4.0f);
  EXPECT_EQ(b_out.data<float>()[36], -1.5f);
  EXPECT_EQ(a.To(Device::kCPU).data<float>()[0], 0.0f);
}

TEST(CudaExperts, ForwardAndBackwardMatchTheCpuExpertsUpToBF16) {
  SKIP_WITHOUT_GPU();
  for (const ExpertCase& c : {ExpertCase{2, 48, 64, 256, false}, ExpertCase{4, 130, 96, 384, true},
                              ExpertCase{1, 8, 512, 2048, true}}) {
    SCOPED_TRACE("E_l " + std::to_string(c.el) + " R " + std::to_string(c.r));
    ExpertMlp cpu(c.el, c.d, c.m, c.gelu_tanh);
    FillBF16Exact(&cpu.params().fc1_weight, 1.0f / std::sqrt(c.d), 1);
    FillBF16Exact(&cpu.params().fc1_bias, 0.1f, 2);
    FillBF16Exact(&cpu.params().fc2_weight, 1.0f / std::sqrt(c.m), 3);
    FillBF16Exact(&cpu.params().fc2_bias, 0.1f, 4);
    Tensor x = Tensor::Empty({c.el, c.r, c.d}), dy = Tensor::Empty({c.el, c.r, c.d});
    FillBF16Exact(&x, 1.0f, 5);
    FillBF16Exact(&dy, 1.0f, 6);
    MoeTimers timers;
    Tensor y_cpu, dx_cpu;
    cpu.Forward(x, &y_cpu, &timers);
    cpu.Backward(dy, &dx_cpu, &timers);

    CudaExpertMlp gpu(c.el, c.d, c.m, c.gelu_tanh);
    gpu.LoadParams(cpu.params());
    Tensor y_dev, dx_dev;
    gpu.Forward(x.Cast(DType::kBF16).To(Device::kCUDA), &y_dev);
    // cuBLASLt's epilogue is the tanh GELU (the erf form is never offered to it): whether
    // cuBLASLt took the tanh cases goes into the run's record.
    std::printf("record: experts E_l %ld R %ld D %ld M %ld, %s GELU: fc1 bias + GELU %s\n",
                static_cast<long>(c.el), static_cast<long>(c.r), static_cast<long>(c.d),
                static_cast<long>(c.m), c.gelu_tanh ? "tanh" : "erf",
                gpu.LastForwardFused() ? "fused in cuBLASLt's epilogue" : "by the own kernel");
    gpu.Backward(dy.To(Device::kCUDA), &dx_dev);
    ExpertMlpParams g;
    g.fc1_weight = Tensor::Empty({c.el, c.m, c.d});
    g.fc1_bias = Tensor::Empty({c.el, c.m});
    g.fc2_weight = Tensor::Empty({c.el, c.d, c.m});
    g.fc2_bias = Tensor::Empty({c.el, c.d});
    gpu.StoreGrads(&g);
    // The GPU rounds the activation and the incoming gradients to bf16 (8 bits of
    // mantissa): errors of a few 2^-8 relative to the largest value.
    EXPECT_LT(RelativeError(y_dev.To(Device::kCPU), y_cpu), 2e-2);
    EXPECT_LT(RelativeError(dx_dev.To(Device::kCPU), dx_cpu), 2e-2);
    EXPECT_LT(RelativeError(g.fc1_weight, cpu.grads().fc1_weight), 2e-2);
    EXPECT_LT(RelativeError(g.fc1_bias, cpu.grads().fc1_bias), 2e-2);
    EXPECT_LT(RelativeError(g.fc2_weight, cpu.grads().fc2_weight), 2e-2);
    EXPECT_LT(RelativeError(g.fc2_bias, cpu.grads().fc2_bias), 1e-5);  // sums of exact fp32
  }
}

TEST(CudaExperts, GroupedDroplessForwardEqualsTheFixedCapacityRows) {
  SKIP_WITHOUT_GPU();
  const int64_t el = 3, r = 40, d = 64, m = 128;
  // The erf GELU: never fused, so both paths run the same bias + GELU kernel (the tanh form
  // would take cuBLASLt's epilogue on the fixed path only).
  ExpertMlp cpu(el, d, m, false);
  FillBF16Exact(&cpu.params().fc1_weight, 0.125f, 1);
  FillBF16Exact(&cpu.params().fc1_bias, 0.1f, 2);
  FillBF16Exact(&cpu.params().fc2_weight, 0.09f, 3);
  FillBF16Exact(&cpu.params().fc2_bias, 0.1f, 4);
  Tensor x = Tensor::Empty({el, r, d});
  FillBF16Exact(&x, 1.0f, 5);
  CudaExpertMlp gpu(el, d, m, false);
  gpu.LoadParams(cpu.params());
  Tensor y_fixed;
  gpu.Forward(x.Cast(DType::kBF16).To(Device::kCUDA), &y_fixed);
  Tensor fixed = y_fixed.To(Device::kCPU);
  // Expert e keeps its first rows[e] rows, packed one after another.
  const std::vector<int64_t> rows = {40, 0, 17};
  Tensor packed = Tensor::Empty({57, d});
  int64_t at = 0;
  for (int64_t e = 0; e < el; ++e) {
    std::copy_n(x.data<float>() + e * r * d, rows[e] * d, packed.data<float>() + at * d);
    at += rows[e];
  }
  Tensor y_grouped;
  gpu.ForwardGrouped(packed.Cast(DType::kBF16).To(Device::kCUDA), rows, &y_grouped);
  Tensor grouped = y_grouped.To(Device::kCPU);
  std::printf("record: dropless experts: %s\n",
              gpu.GroupedGemmRefused()
                  ? "cuBLAS refused the grouped GEMM (bf16 x bf16 -> fp32): one GEMM per expert"
                  : "one cublasGemmGroupedBatchedEx");
  at = 0;
  double worst = 0, scale = 0;
  for (int64_t e = 0; e < el; ++e) {
    for (int64_t i = 0; i < rows[e] * d; ++i) {
      const float want = fixed.data<float>()[e * r * d + i];
      worst =
          std::max(worst, static_cast<double>(std::fabs(grouped.data<float>()[at * d + i] - want)));
      scale = std::max(scale, static_cast<double>(std::fabs(want)));
    }
    at += rows[e];
  }
  // The two paths' GEMMs sum in different orders, so an activation can round to a
  // neighbouring bf16 (2^-8 relative): a few of those in a row, not more.
  EXPECT_LT(worst, 1e-2 * scale);
}

TEST(NcclCommunicator, OneRankCollectivesOnDeviceBuffers) {
  SKIP_WITHOUT_GPU();
  auto* world = dynamic_cast<MpiCommunicator*>(&testing::World());
  ASSERT_NE(world, nullptr);
  if (world->size() != 1) GTEST_SKIP() << "one GPU: NCCL runs one rank per GPU";
  if (!NcclBuilt()) GTEST_SKIP() << "built without NCCL";
  auto nccl = CreateNcclCommunicator(*world, "nccl_test");
  ASSERT_TRUE(nccl.ok()) << nccl.status().message();
  Communicator& c = **nccl;
  EXPECT_EQ(c.device(), Device::kCUDA);
  Tensor host = Tensor::Empty({8});
  for (int i = 0; i < 8; ++i) host.data<float>()[i] = static_cast<float>(i + 1);
  Tensor send = host.To(Device::kCUDA), recv = Tensor::Zeros({8}, DType::kF32, Device::kCUDA);
  c.AllToAllV(send.raw_data(), {8}, {0}, recv.raw_data(), {8}, {0}, DType::kF32);
  c.AllReduce(recv.raw_data(), 8, DType::kF32, ReduceOp::kSum);
  c.Synchronize();
  Tensor back = recv.To(Device::kCPU);
  for (int i = 0; i < 8; ++i) EXPECT_EQ(back.data<float>()[i], i + 1.0f);
  c.Barrier();
}

}  // namespace
}  // namespace moerun
