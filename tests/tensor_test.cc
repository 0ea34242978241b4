// Tensor, Arena and bf16 conversion.
#include "runtime/tensor.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <limits>

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
    Tensor big = arena.AllocateZeros({1000, 100});  // 400 KB: more than the arena holds
    Tensor small = arena.Allocate({10});
    EXPECT_EQ(big.data<float>()[99999], 0.0f);
    if (step == 0) {
      EXPECT_GT(arena.num_blocks(), 1);
    } else {
      EXPECT_EQ(arena.num_blocks(), 1) << "step " << step;
    }
    arena.Reset();
    EXPECT_EQ(arena.used_bytes(), 0u);
  }
  EXPECT_GE(arena.capacity_bytes(), 400000u + 64u);
  EXPECT_EQ(arena.high_water_bytes(), 400000u + 64u);
}

}  // namespace
}  // namespace moerun
