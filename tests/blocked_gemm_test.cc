// BlockedGemm (runtime/blocked_gemm.h) against the order it documents, written out here as
// scalar fused multiply-adds (bit for bit), and against a double-precision product.
#include "runtime/blocked_gemm.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <random>
#include <tuple>
#include <vector>

#include "runtime/kernels.h"

namespace moerun {
namespace {

std::vector<float> Random(int64_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = u(rng);
  return v;
}

struct Case {
  bool ta, tb;
  int64_t m, n, k;
  bool accumulate;
};

float A(const Case& s, const std::vector<float>& a, int64_t i, int64_t p) {
  return s.ta ? a[p * s.m + i] : a[i * s.k + p];
}
float B(const Case& s, const std::vector<float>& b, int64_t p, int64_t j) {
  return s.tb ? b[j * s.k + p] : b[p * s.n + j];
}

// The documented order: per element, over k in blocks of `block`, the block's products
// from zero in k order with one rounding each (fmaf), then the block's sum added to C.
std::vector<float> OrderedReference(const Case& s, int64_t block, const std::vector<float>& a,
                                    const std::vector<float>& b, std::vector<float> c) {
  for (int64_t i = 0; i < s.m; ++i) {
    for (int64_t j = 0; j < s.n; ++j) {
      float out = s.accumulate ? c[i * s.n + j] : 0.0f;
      for (int64_t k0 = 0; k0 < s.k; k0 += block) {
        float sum = 0.0f;
        for (int64_t p = k0; p < std::min(s.k, k0 + block); ++p) {
          sum = std::fma(A(s, a, i, p), B(s, b, p, j), sum);
        }
        out = (k0 == 0 && !s.accumulate) ? sum : sum + out;
      }
      c[i * s.n + j] = out;
    }
  }
  return c;
}

std::vector<float> RunBlocked(const Case& s, const std::vector<float>& a,
                              const std::vector<float>& b, std::vector<float> c) {
  BlockedGemm(s.ta, s.tb, s.m, s.n, s.k, a.data(), s.ta ? s.m : s.k, b.data(), s.tb ? s.k : s.n,
              s.accumulate, c.data(), s.n);
  return c;
}

class BlockedGemmTest : public ::testing::TestWithParam<Case> {
 protected:
  void TearDown() override { SetNumThreads(1); }
};

TEST_P(BlockedGemmTest, MatchesTheDocumentedOrderAndDoublePrecision) {
  const Case s = GetParam();
  const auto a = Random(s.m * s.k, 1), b = Random(s.k * s.n, 2), c0 = Random(s.m * s.n, 3);
  SetNumThreads(1);
  const std::vector<float> got = RunBlocked(s, a, b, c0);
  if (BlockedGemmAvailable()) {
    const std::vector<float> want = OrderedReference(s, BlockedGemmKBlock(s.k), a, b, c0);
    int64_t differ = 0;
    for (size_t i = 0; i < got.size(); ++i) differ += std::memcmp(&got[i], &want[i], 4) != 0;
    EXPECT_EQ(differ, 0) << "elements whose bits differ from the documented order";
  }
  // Whatever the order, the product itself (in double, with the operands' own values).
  double worst = 0;
  for (int64_t i = 0; i < s.m; ++i) {
    for (int64_t j = 0; j < s.n; ++j) {
      double want = s.accumulate ? c0[i * s.n + j] : 0.0;
      for (int64_t p = 0; p < s.k; ++p) want += double(A(s, a, i, p)) * B(s, b, p, j);
      worst = std::max(worst, std::abs(got[i * s.n + j] - want));
    }
  }
  EXPECT_LT(worst, 2e-6 * (s.k + 1)) << "m=" << s.m << " n=" << s.n << " k=" << s.k;
}

TEST_P(BlockedGemmTest, TwoThreadsGiveTheBitsOfOne) {
  if (!BlockedGemmAvailable()) GTEST_SKIP() << "built without AVX-512: BlockedGemm is OpenBLAS";
  const Case s = GetParam();
  const auto a = Random(s.m * s.k, 4), b = Random(s.k * s.n, 5), c0 = Random(s.m * s.n, 6);
  SetNumThreads(1);
  const std::vector<float> one = RunBlocked(s, a, b, c0);
  SetNumThreads(2);
  const std::vector<float> two = RunBlocked(s, a, b, c0);
  EXPECT_EQ(0, std::memcmp(one.data(), two.data(), one.size() * sizeof(float)));
}

// Every transpose, row counts around the 12-row tile, column counts around the 32-column
// panel and the 16 x 16 transposes that pack B^T, k around those transposes and over one
// block (several blocks at 1000), and the experts' shapes (a capacity of 269 tokens) in
// small.
INSTANTIATE_TEST_SUITE_P(
    Shapes, BlockedGemmTest,
    ::testing::Values(Case{false, true, 1, 1, 1, false}, Case{false, true, 13, 33, 17, false},
                      Case{false, true, 12, 64, 400, true}, Case{false, true, 269, 96, 512, false},
                      Case{false, false, 11, 31, 15, false},
                      Case{false, false, 25, 100, 1000, true},
                      Case{false, false, 269, 64, 130, false}, Case{true, false, 7, 40, 269, true},
                      Case{true, false, 100, 48, 269, false}, Case{true, true, 13, 70, 1000, false},
                      Case{true, true, 24, 32, 16, true}, Case{false, true, 5, 200, 0, true},
                      Case{false, true, 5, 20, 0, false}, Case{false, true, 40, 25, 100, true},
                      Case{false, true, 16, 12, 16, false}, Case{false, true, 17, 7, 33, false},
                      Case{false, true, 64, 1, 48, true}));

// A row's values do not depend on the rows beside it (the experts' capacity changes with the
// batch): one row of a 269-row product equals the same row computed alone.
TEST(BlockedGemm, ARowAloneGivesItsBitsAmongOthers) {
  if (!BlockedGemmAvailable()) GTEST_SKIP() << "built without AVX-512: BlockedGemm is OpenBLAS";
  SetNumThreads(1);
  const int64_t m = 269, n = 160, k = 530;
  const auto a = Random(m * k, 7), b = Random(n * k, 8);
  std::vector<float> all(m * n), one(n);
  BlockedGemm(false, true, m, n, k, a.data(), k, b.data(), k, false, all.data(), n);
  for (int64_t row : {0, 11, 12, 268}) {
    BlockedGemm(false, true, 1, n, k, a.data() + row * k, k, b.data(), k, false, one.data(), n);
    EXPECT_EQ(0, std::memcmp(one.data(), all.data() + row * n, n * sizeof(float))) << row;
  }
}

}  // namespace
}  // namespace moerun
