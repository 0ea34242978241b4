// Tensor, Arena and bf16 conversion.
#include "runtime/tensor.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <stdexcept>
#include <vector>

#include "runtime/backend.h"
#include "runtime/process.h"

namespace moerun {
namespace {

TEST(TensorTest, EmptyIsAlignedContiguousAndSized) {
  for (int n : {1, 3, 17, 1000}) {
    Tensor t = Tensor::Empty({n, 3});
    EXPECT_EQ(reinterpret_cast<uintptr_t>(t.raw_data()) % 64, 0u);
    EXPECT_TRUE(t.is_contiguous());
    EXPECT_EQ(t.numel(), n * 3);
    EXPECT_EQ(t.nbytes(), static_cast<size_t>(n * 3 * 4));
    EXPECT_EQ(t.strides(), (std::vector<int64_t>{3, 1}));
  }
  EXPECT_EQ(Tensor::Empty({2, 2}, DType::kBF16).nbytes(), 8u);
  EXPECT_FALSE(Tensor().defined());
}

TEST(TensorTest, ViewsShareStorage) {
  Tensor t = Tensor::Zeros({4, 6});
  for (int i = 0; i < 24; ++i) t.data<float>()[i] = static_cast<float>(i);
  Tensor rows = t.Slice(0, 1, 3);  // rows 1, 2
  EXPECT_EQ(rows.shape(), (Shape{2, 6}));
  EXPECT_EQ(rows.data<float>()[0], 6.0f);
  rows.data<float>()[0] = 100.0f;
  EXPECT_EQ(t.data<float>()[6], 100.0f);
  Tensor r = t.Reshape({2, -1, 3});
  EXPECT_EQ(r.shape(), (Shape{2, 4, 3}));
  EXPECT_EQ(r.raw_data(), t.raw_data());
}

TEST(TensorTest, TransposeIsStridedAndContiguousCopies) {
  Tensor t = Tensor::Empty({2, 3});
  for (int i = 0; i < 6; ++i) t.data<float>()[i] = static_cast<float>(i);
  Tensor tt = t.Transpose(0, 1);
  EXPECT_FALSE(tt.is_contiguous());
  EXPECT_EQ(tt.shape(), (Shape{3, 2}));
  Tensor c = tt.Contiguous();
  ASSERT_TRUE(c.is_contiguous());
  // c[i][j] = t[j][i]
  const float expected[] = {0, 3, 1, 4, 2, 5};
  for (int i = 0; i < 6; ++i) EXPECT_EQ(c.data<float>()[i], expected[i]);
  // A column slice is strided too.
  Tensor col = t.Slice(1, 1, 2).Contiguous();
  EXPECT_EQ(col.data<float>()[0], 1.0f);
  EXPECT_EQ(col.data<float>()[1], 4.0f);
}

TEST(TensorTest, WrapBorrowsExternalMemory) {
  float buf[6] = {1, 2, 3, 4, 5, 6};
  Tensor t = Tensor::Wrap(buf, {2, 3}, DType::kF32);
  EXPECT_FALSE(t.owns_storage());
  t.Fill(7.0f);
  EXPECT_EQ(buf[5], 7.0f);
  Tensor c = t.Clone();
  EXPECT_TRUE(c.owns_storage());
  EXPECT_NE(c.raw_data(), static_cast<void*>(buf));
}

TEST(TensorTest, WrongDtypeAccessDies) {
  Tensor t = Tensor::Empty({2}, DType::kI32);
  EXPECT_DEATH(t.data<float>(), "tensor holds I32");
}

// --- The device seam -------------------------------------------------------------------
// A tensor that claims to live on the GPU (the pointer is never dereferenced).
Tensor FakeCudaTensor(float* backing) {
  return Tensor::Wrap(backing, {2, 3}, DType::kF32, Device::kCUDA);
}

TEST(DeviceSeamTest, HostAccessToDeviceMemoryDies) {
  float backing[6];
  Tensor t = FakeCudaTensor(backing);
  EXPECT_EQ(t.device(), Device::kCUDA);
  EXPECT_EQ(t.ShapeString(), "[2, 3] F32 cuda");
  EXPECT_DEATH(t.data<float>(), "on cuda: host code cannot read device memory");
  EXPECT_EQ(t.device_data<float>(Device::kCUDA), backing);
  Tensor host = Tensor::Zeros({2, 3});
  EXPECT_DEATH(host.device_data<float>(Device::kCUDA),
               "a cuda kernel was given \\[2, 3\\] F32 on cpu");
  EXPECT_EQ(host.device_data<float>(Device::kCPU), host.data<float>());
  // Strided copies never cross devices implicitly.
  EXPECT_DEATH(t.CopyFrom(Tensor::Zeros({3, 2}).Transpose(0, 1)), "need contiguous tensors");
}

TEST(DeviceSeamTest, CpuBackendAllocatesThroughStorageAndCounts) {
  Backend& cpu = RequireBackend(Device::kCPU);
  EXPECT_EQ(cpu.device(), Device::kCPU);
  const size_t before = cpu.allocated_bytes();
  {
    Tensor t = Tensor::Zeros({1000}, DType::kF32, Device::kCPU);
    EXPECT_GE(cpu.allocated_bytes(), before + 4000);
    EXPECT_GE(cpu.peak_allocated_bytes(), before + 4000);
    EXPECT_EQ(reinterpret_cast<uintptr_t>(t.raw_data()) % 64, 0u);
    for (int i = 0; i < 1000; ++i) ASSERT_EQ(t.data<float>()[i], 0.0f);
    // To() the device it is on is the tensor itself; Clone() is a copy on the same device.
    EXPECT_EQ(t.To(Device::kCPU).raw_data(), t.raw_data());
  }
  EXPECT_EQ(cpu.allocated_bytes(), before);
}

TEST(DeviceSeamTest, CopyWithin2DCopiesPitchedRowsAndLeavesTheGapsAlone) {
  Backend& cpu = RequireBackend(Device::kCPU);
  // 3 rows of 2 floats from a source whose rows are 5 floats apart, into a destination whose
  // rows are 3 floats apart, starting one float into each.
  std::vector<float> src(20), dst(12, -1.0f);
  for (int i = 0; i < 20; ++i) src[i] = static_cast<float>(i);
  cpu.CopyWithin2D(dst.data() + 1, 3 * sizeof(float), src.data() + 1, 5 * sizeof(float),
                   2 * sizeof(float), 3);
  const std::vector<float> want = {-1, 1, 2, -1, 6, 7, -1, 11, 12, -1, -1, -1};
  EXPECT_EQ(dst, want);
  // A row wider than a pitch is a caller's bug, not a silent overlap.
  EXPECT_DEATH(cpu.CopyWithin2D(dst.data(), sizeof(float), src.data(), 5 * sizeof(float),
                                2 * sizeof(float), 2),
               "2D copy");
}

TEST(DeviceSeamTest, ParseDeviceNamesWhatIsMissing) {
  auto cpu = ParseDevice("cpu");
  ASSERT_TRUE(cpu.ok());
  EXPECT_EQ(*cpu, Device::kCPU);
  auto tpu = ParseDevice("tpu");
  ASSERT_FALSE(tpu.ok());
  EXPECT_NE(tpu.status().message().find("use cpu or cuda"), std::string::npos);
  auto cuda = ParseDevice("cuda");
  if (CudaDeviceCount() > 0) {
    EXPECT_TRUE(cuda.ok());
    return;
  }
  ASSERT_FALSE(cuda.ok());
  const std::string& m = cuda.status().message();
  const bool built =
      std::find(BuiltBackends().begin(), BuiltBackends().end(), "cuda") != BuiltBackends().end();
  EXPECT_NE(m.find(built ? "no CUDA device is visible" : "built without the CUDA backend"),
            std::string::npos)
      << m;
  EXPECT_NE(m.find("--device cpu"), std::string::npos) << m;
  EXPECT_EQ(BackendFor(Device::kCUDA), nullptr);
  EXPECT_DEATH(Tensor::Empty({4}, DType::kF32, Device::kCUDA), "no cuda backend in this process");
  EXPECT_FALSE(BindCudaDevice(0).ok());
}

TEST(DeviceSeamTest, LocalRankMustAgreeWithTheLauncher) {
  ProcessInfo mpi, env;
  mpi.rank = 5;
  mpi.host = "node7";
  mpi.local_rank = 1;
  mpi.local_size = 4;
  env.launcher = "single";  // no launcher variables: nothing to compare
  EXPECT_TRUE(CheckLocalRank(mpi, env).ok());
  env.launcher = "slurm";
  env.local_rank = 1;
  env.local_size = 4;
  EXPECT_TRUE(CheckLocalRank(mpi, env).ok());
  env.local_rank = 2;
  const Status s = CheckLocalRank(mpi, env);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("rank 5: MPI places this rank at local rank 1 of 4 on node7, the "
                             "launcher (slurm) at 2 of 4"),
            std::string::npos)
      << s.message();
  env.launcher = "mpirun";
  env.local_rank = 1;
  env.local_size = 2;  // sizes are not compared (Slurm writes them as "2(x3)")
  EXPECT_TRUE(CheckLocalRank(mpi, env).ok());
  env.local_rank = 0;
  EXPECT_FALSE(CheckLocalRank(mpi, env).ok());
}

// An exception nothing caught ends the process through AbortJob with a line naming the rank
// and the exception (under MPI the fatal handler then aborts every rank).
TEST(DeviceSeamTest, UncaughtExceptionsNameTheRank) {
  EXPECT_DEATH(
      {
        InstallUncaughtExceptionHandler();
        try {
          throw std::runtime_error("cudaErrorIllegalAddress from a Thrust kernel");
        } catch (...) {
          std::terminate();
        }
      },
      "rank [0-9]+ \\(host .*\\): uncaught exception: cudaErrorIllegalAddress from a Thrust "
      "kernel");
}

TEST(BF16Test, RoundsToNearestEven) {
  // Exact values survive.
  for (float f : {0.0f, 1.0f, -2.0f, 0.5f, 256.0f, 3.0f}) {
    EXPECT_EQ(BF16ToFloat(FloatToBF16(f)), f);
  }
  // 1 + 2^-8 lies halfway between bf16 neighbours 1 and 1 + 2^-7: ties to even (1).
  EXPECT_EQ(BF16ToFloat(FloatToBF16(1.0f + std::ldexp(1.0f, -8))), 1.0f);
  // 1 + 3*2^-8 lies halfway between 1+2^-7 and 1+2^-6: ties to even (1 + 2^-6).
  EXPECT_EQ(BF16ToFloat(FloatToBF16(1.0f + 3 * std::ldexp(1.0f, -8))), 1.0f + std::ldexp(1.0f, -6));
  // Just above the halfway point rounds up.
  EXPECT_EQ(BF16ToFloat(FloatToBF16(1.0f + std::ldexp(1.0f, -8) + std::ldexp(1.0f, -20))),
            1.0f + std::ldexp(1.0f, -7));
  EXPECT_TRUE(std::isnan(BF16ToFloat(FloatToBF16(std::numeric_limits<float>::quiet_NaN()))));
  EXPECT_TRUE(std::isinf(BF16ToFloat(FloatToBF16(std::numeric_limits<float>::infinity()))));
  EXPECT_EQ(FloatToBF16(1.0f).bits, 0x3f80);
}

TEST(BF16Test, CastRoundTripsThroughTensors) {
  Tensor t = Tensor::Empty({3});
  t.data<float>()[0] = 1.0f;
  t.data<float>()[1] = 3.14159265f;
  t.data<float>()[2] = -1e-3f;
  Tensor b = t.Cast(DType::kBF16);
  EXPECT_EQ(b.dtype(), DType::kBF16);
  EXPECT_EQ(b.nbytes(), 6u);
  Tensor back = b.Cast(DType::kF32);
  for (int i = 0; i < 3; ++i) {
    EXPECT_NEAR(back.data<float>()[i], t.data<float>()[i],
                std::fabs(t.data<float>()[i]) * std::ldexp(1.0, -8));
  }
}

TEST(ArenaTest, HandsOutAlignedDisjointTensors) {
  Arena arena(1 << 16);
  Tensor a = arena.Allocate({3});
  Tensor b = arena.Allocate({5, 5});
  EXPECT_EQ(reinterpret_cast<uintptr_t>(a.raw_data()) % 64, 0u);
  EXPECT_EQ(reinterpret_cast<uintptr_t>(b.raw_data()) % 64, 0u);
  EXPECT_GE(static_cast<char*>(b.raw_data()) - static_cast<char*>(a.raw_data()), 12);
  EXPECT_EQ(arena.used_bytes(), 64u + 128u);
}

TEST(ArenaTest, GrowsThenSettlesIntoOneBlock) {
  Arena arena(1024);
  for (int step = 0; step < 3; ++step) {
    {
      Tensor big = arena.AllocateZeros({1000, 100});  // 400 KB: more than the arena holds
      Tensor small = arena.Allocate({10});
      EXPECT_EQ(big.data<float>()[99999], 0.0f);
      if (step == 0) {
        EXPECT_GT(arena.num_blocks(), 1);
      } else {
        EXPECT_EQ(arena.num_blocks(), 1) << "step " << step;
      }
    }  // the step's tensors released
    arena.Reset();
    EXPECT_EQ(arena.used_bytes(), 0u);
  }
  EXPECT_GE(arena.capacity_bytes(), 400000u + 64u);
  EXPECT_EQ(arena.high_water_bytes(), 400000u + 64u);
}

// A Reset() while the last step's tensors still hold the blocks keeps and reuses them
// (merging would keep the old blocks alive beside the new one: on a GPU, two copies of the
// step's memory at once); once they are released, the next Reset() merges.
TEST(ArenaTest, MergesOnlyBlocksNothingHolds) {
  Arena arena(1024);
  std::vector<Tensor> held;
  auto step = [&] {
    held.clear();
    arena.Reset();
    for (int i = 0; i < 4; ++i) held.push_back(arena.Allocate({1000, 100}));  // 4 x 400 KB
  };
  step();
  const int grown = arena.num_blocks();
  const size_t capacity = arena.capacity_bytes();
  ASSERT_GT(grown, 1);
  std::vector<void*> first;
  for (const Tensor& t : held) first.push_back(t.raw_data());
  // Held across the Reset (as a model's saved activations are): no new block, the same
  // places as before.
  std::vector<Tensor> previous = held;
  arena.Reset();
  std::vector<Tensor> now;
  for (int i = 0; i < 4; ++i) now.push_back(arena.Allocate({1000, 100}));
  EXPECT_EQ(arena.num_blocks(), grown);
  EXPECT_EQ(arena.capacity_bytes(), capacity);
  for (int i = 0; i < 4; ++i) EXPECT_EQ(now[i].raw_data(), first[i]) << i;
  // Released: the next Reset merges into one block of the high-water size.
  previous.clear();
  now.clear();
  held.clear();
  arena.Reset();
  EXPECT_EQ(arena.num_blocks(), 1);
  EXPECT_EQ(arena.capacity_bytes(), arena.high_water_bytes());
  EXPECT_EQ(arena.high_water_bytes(), 4u * 400000u);
}

}  // namespace
}  // namespace moerun
