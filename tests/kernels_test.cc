// CPU kernels against naive double-precision loops, known values, and the finite-difference
// gradient checker.
#include "runtime/kernels.h"

#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "runtime/gradcheck.h"

namespace moerun {
namespace {

std::vector<float> Random(int64_t n, uint32_t seed, float scale = 1.0f) {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-scale, scale);
  std::vector<float> v(n);
  for (float& x : v) x = u(rng);
  return v;
}

// Naive row-major C = op(A) op(B) in double.
std::vector<double> NaiveGemm(bool ta, bool tb, int m, int n, int k, const std::vector<float>& a,
                              const std::vector<float>& b) {
  std::vector<double> c(m * n, 0.0);
  for (int i = 0; i < m; ++i) {
    for (int j = 0; j < n; ++j) {
      double s = 0;
      for (int p = 0; p < k; ++p) {
        const double av = ta ? a[p * m + i] : a[i * k + p];
        const double bv = tb ? b[j * k + p] : b[p * n + j];
        s += av * bv;
      }
      c[i * n + j] = s;
    }
  }
  return c;
}

class GemmTest : public ::testing::TestWithParam<std::tuple<bool, bool>> {};

TEST_P(GemmTest, MatchesNaiveLoopsWithAlphaBeta) {
  const auto [ta, tb] = GetParam();
  const int m = 7, n = 5, k = 9;
  const auto a = Random(m * k, 1), b = Random(k * n, 2);
  std::vector<float> c = Random(m * n, 3);
  const std::vector<float> c0 = c;
  Gemm(ta, tb, m, n, k, 0.5f, a.data(), ta ? m : k, b.data(), tb ? k : n, 2.0f, c.data(), n);
  const auto ref = NaiveGemm(ta, tb, m, n, k, a, b);
  for (int i = 0; i < m * n; ++i) EXPECT_NEAR(c[i], 0.5 * ref[i] + 2.0 * c0[i], 1e-5) << i;
}

INSTANTIATE_TEST_SUITE_P(AllTransposes, GemmTest,
                         ::testing::Combine(::testing::Bool(), ::testing::Bool()));

// The OpenBLAS the loader found is the build CMake linked (its folder is in the RUNPATH,
// ahead of the system's alternatives link), and its GEMM threads follow SetNumThreads.
TEST(GemmTest, LoadsTheOpenBlasBuildItWasLinkedTo) {
  if (std::getenv("LD_LIBRARY_PATH") != nullptr &&
      std::string(std::getenv("LD_LIBRARY_PATH")).find("openblas") != std::string::npos) {
    GTEST_SKIP() << "LD_LIBRARY_PATH names an OpenBLAS folder";
  }
  EXPECT_EQ(BlasThreading(), BlasThreadingBuilt()) << BlasDescription();
  const int before = NumThreads();
  SetNumThreads(2);
  EXPECT_NE(BlasDescription().find(", 2 threads)"), std::string::npos) << BlasDescription();
  SetNumThreads(before);
}

// The router's GEMM: every element is the 16-lane fixed-order dot of runtime/device_math.h
// (written out here), whatever the column block it falls in, and a row gives the same bits
// alone as among others (the row invariance the routing's rank independence rests on).
TEST(RowInvariantGemmTest, EveryElementIsTheFixedOrderDotAndRowsAreInvariant) {
  for (int64_t k : {16, 45, 512}) {
    const int64_t rows = 33, n = 19;  // two 8-column blocks and 3 columns alone
    const std::vector<float> a = Random(rows * k, 1), b = Random(n * k, 2);
    std::vector<float> c(rows * n), one(n);
    SetNumThreads(2);
    RowInvariantGemmNT(a.data(), b.data(), c.data(), rows, n, k);
    SetNumThreads(1);
    for (int64_t t = 0; t < rows; ++t) {
      RowInvariantGemmNT(a.data() + t * k, b.data(), one.data(), 1, n, k);
      for (int64_t j = 0; j < n; ++j) {
        float lanes[16] = {0};
        for (int64_t i = 0; i < k; ++i) lanes[i % 16] += a[t * k + i] * b[j * k + i];
        float want = 0.0f;
        for (float l : lanes) want += l;
        ASSERT_EQ(c[t * n + j], want) << "k " << k << " row " << t << " col " << j;
        ASSERT_EQ(one[j], want) << "k " << k << " row " << t << " col " << j << " alone";
      }
    }
  }
}

TEST(GemmTest, ZeroInnerDimensionScalesC) {
  std::vector<float> c = {1, 2, 3, 4};
  Gemm(false, false, 2, 2, 0, 1.0f, nullptr, 1, nullptr, 2, 0.0f, c.data(), 2);
  for (float x : c) EXPECT_EQ(x, 0.0f);
}

TEST(GemmTest, StridedBatchedMatchesPerMatrixLoops) {
  const int batch = 3, m = 4, n = 6, k = 5;
  const auto a = Random(batch * m * k, 4), b = Random(batch * n * k, 5);
  std::vector<float> c(batch * m * n);
  GemmStridedBatched(false, true, m, n, k, 1.0f, a.data(), k, m * k, b.data(), k, n * k, 0.0f,
                     c.data(), n, m * n, batch);
  for (int i = 0; i < batch; ++i) {
    std::vector<float> ai(a.begin() + i * m * k, a.begin() + (i + 1) * m * k);
    std::vector<float> bi(b.begin() + i * n * k, b.begin() + (i + 1) * n * k);
    const auto ref = NaiveGemm(false, true, m, n, k, ai, bi);
    for (int j = 0; j < m * n; ++j) EXPECT_NEAR(c[i * m * n + j], ref[j], 1e-5);
  }
}

TEST(GemmTest, MatmulChecksShapesAndSharesWeights) {
  Tensor x = Tensor::Empty({2, 3, 4}), w = Tensor::Empty({5, 4}), y = Tensor::Zeros({2, 3, 5});
  const auto xv = Random(24, 6), wv = Random(20, 7);
  std::copy(xv.begin(), xv.end(), x.data<float>());
  std::copy(wv.begin(), wv.end(), w.data<float>());
  Matmul(x, false, w, true, &y);  // y = x W^T, W shared over the batch
  const auto ref = NaiveGemm(false, true, 6, 5, 4, xv, wv);
  for (int i = 0; i < 30; ++i) EXPECT_NEAR(y.data<float>()[i], ref[i], 1e-5);
  Tensor bad = Tensor::Zeros({2, 3, 4});
  EXPECT_DEATH(Matmul(x, false, w, true, &bad), "Matmul shapes");
}

TEST(SoftmaxTest, MatchesNaiveAndIsShiftInvariant) {
  const int rows = 3, cols = 7;
  auto x = Random(rows * cols, 8, 5.0f);
  x[0] = 80.0f;  // large logits must not overflow
  std::vector<float> y(rows * cols);
  SoftmaxForward(x.data(), y.data(), rows, cols);
  for (int r = 0; r < rows; ++r) {
    double mx = -1e30, s = 0;
    for (int j = 0; j < cols; ++j) mx = std::max<double>(mx, x[r * cols + j]);
    for (int j = 0; j < cols; ++j) s += std::exp(x[r * cols + j] - mx);
    for (int j = 0; j < cols; ++j) {
      EXPECT_NEAR(y[r * cols + j], std::exp(x[r * cols + j] - mx) / s, 1e-6);
    }
  }
}

TEST(SoftmaxTest, FastInPlaceRowsMatchTheFormula) {
  for (int cols : {1, 7, 8, 50, 197}) {
    const int rows = 4;
    auto x = Random(rows * cols, 9, 6.0f);
    x[0] = 85.0f;  // large logits must not overflow
    std::vector<float> y = x;
    SoftmaxRowsInPlaceFast(y.data(), rows, cols);
    for (int r = 0; r < rows; ++r) {
      double mx = -1e30, s = 0;
      for (int j = 0; j < cols; ++j) mx = std::max<double>(mx, x[r * cols + j]);
      for (int j = 0; j < cols; ++j) s += std::exp(static_cast<double>(x[r * cols + j]) - mx);
      for (int j = 0; j < cols; ++j) {
        const double want = std::exp(static_cast<double>(x[r * cols + j]) - mx) / s;
        EXPECT_NEAR(y[r * cols + j], want, 1e-6 + 1e-5 * want) << cols << " cols, row " << r;
      }
    }
  }
}

TEST(GeluTest, ExactErfFormKnownValues) {
  // 0.5 x (1 + erf(x / sqrt 2)) evaluated independently: Phi(1) = 0.8413447460685429.
  const std::vector<float> x = {0.0f, 1.0f, -1.0f, 3.0f};
  const double expected[] = {0.0, 0.8413447460685429, -0.15865525393145707, 2.995950350781427};
  std::vector<float> y(4);
  GeluForward(x.data(), y.data(), 4);
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(y[i], expected[i], 1e-6) << x[i];
}

TEST(GeluTest, TanhFormAgainstItsFormulaInDouble) {
  // 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), Flax's nn.gelu default, evaluated in
  // double with std::tanh; the derivative by its closed form.
  const double c = std::sqrt(2.0 / M_PI), a = 0.044715;
  double worst_y = 0, worst_d = 0;
  std::vector<float> x;
  for (float v = -12.0f; v < 12.0f; v += 0.00731f) x.push_back(v);
  std::vector<float> y(x.size()), one(x.size(), 1.0f), d(x.size());
  GeluTanhForward(x.data(), y.data(), static_cast<int64_t>(x.size()));
  GeluTanhBackward(x.data(), one.data(), d.data(), static_cast<int64_t>(x.size()));
  for (size_t i = 0; i < x.size(); ++i) {
    const double v = x[i], t = std::tanh(c * (v + a * v * v * v));
    const double ref_y = 0.5 * v * (1 + t);
    const double ref_d = 0.5 * (1 + t) + 0.5 * v * (1 - t * t) * c * (1 + 3 * a * v * v);
    worst_y = std::max(worst_y, std::fabs(y[i] - ref_y) / std::max(1.0, std::fabs(ref_y)));
    worst_d = std::max(worst_d, std::fabs(d[i] - ref_d));
  }
  EXPECT_LT(worst_y, 2e-6);
  EXPECT_LT(worst_d, 2e-6);
  // It differs from exact GELU by up to ~4.7e-4 (near |x| = 2): the two are not the same.
  std::vector<float> exact(x.size());
  GeluForward(x.data(), exact.data(), static_cast<int64_t>(x.size()));
  double gap = 0;
  for (size_t i = 0; i < x.size(); ++i) gap = std::max(gap, std::fabs(double(y[i]) - exact[i]));
  EXPECT_GT(gap, 1e-4);
  EXPECT_LT(gap, 1e-3);
}

TEST(GeluTest, ErfFormAgainstItsFormulaInDouble) {
  // 0.5 x (1 + erf(x / sqrt 2)) and its derivative Phi(x) + x phi(x), in double with
  // std::erf and std::exp, over odd lengths (the vector loops' masked tails) and both the
  // separate and the fused kernels.
  double worst_y = 0, worst_d = 0;
  std::vector<float> x;
  for (float v = -12.0f; v < 12.0f; v += 0.00731f) x.push_back(v);
  const int64_t n = static_cast<int64_t>(x.size());
  ASSERT_NE(n % 16, 0);
  std::vector<float> y(n), one(n, 1.0f), d(n);
  GeluForward(x.data(), y.data(), n);
  GeluBackward(x.data(), one.data(), d.data(), n);
  for (int64_t i = 0; i < n; ++i) {
    const double v = x[i], cdf = 0.5 * (1 + std::erf(v / std::sqrt(2.0)));
    const double ref_y = v * cdf;
    const double ref_d = cdf + v * std::exp(-0.5 * v * v) / std::sqrt(2 * M_PI);
    worst_y = std::max(worst_y, std::fabs(y[i] - ref_y) / std::max(1.0, std::fabs(ref_y)));
    worst_d = std::max(worst_d, std::fabs(d[i] - ref_d));
  }
  EXPECT_LT(worst_y, 2e-6);
  EXPECT_LT(worst_d, 2e-6);
  // dx may alias dy.
  std::vector<float> inplace(n, 1.0f);
  GeluBackward(x.data(), inplace.data(), inplace.data(), n);
  EXPECT_EQ(inplace, d);
}

TEST(GeluTest, VectorisedExpAndErfAreAccurate) {
  double worst_exp = 0, worst_erf = 0;
  for (float x = -87.0f; x < 88.0f; x += 0.0137f) {
    const double ref = std::exp(static_cast<double>(x));
    worst_exp = std::max(worst_exp, std::fabs(ExpForTest(x) - ref) / ref);
  }
  for (float x = -6.0f; x < 6.0f; x += 0.000731f) {
    worst_erf = std::max(worst_erf, std::fabs(ErfForTest(x) - std::erf(static_cast<double>(x))));
  }
  EXPECT_LT(worst_exp, 3e-7) << "about 2 ulp";
  EXPECT_LT(worst_erf, 5e-7);
}

TEST(LayerNormTest, MatchesNaive) {
  const int rows = 4, cols = 10;
  const auto x = Random(rows * cols, 9, 3.0f), g = Random(cols, 10), b = Random(cols, 11);
  std::vector<float> y(rows * cols), mean(rows), rstd(rows);
  LayerNormForward(x.data(), g.data(), b.data(), y.data(), mean.data(), rstd.data(), rows, cols,
                   1e-6f);
  for (int r = 0; r < rows; ++r) {
    double mu = 0, var = 0;
    for (int j = 0; j < cols; ++j) mu += x[r * cols + j];
    mu /= cols;
    for (int j = 0; j < cols; ++j) var += (x[r * cols + j] - mu) * (x[r * cols + j] - mu);
    var /= cols;
    for (int j = 0; j < cols; ++j) {
      const double ref = (x[r * cols + j] - mu) / std::sqrt(var + 1e-6) * g[j] + b[j];
      EXPECT_NEAR(y[r * cols + j], ref, 1e-5);
    }
  }
}

TEST(CrossEntropyTest, KnownValuesAndIgnoredRows) {
  const std::vector<float> logits = {0, 0, 0, 1, 2, 3, 5, 5, 5};
  const std::vector<int32_t> labels = {0, 2, -1};
  std::vector<float> probs(9);
  int64_t valid = 0;
  const float loss = CrossEntropyForward(logits.data(), labels.data(), probs.data(), 3, 3, &valid);
  // Row 0: ln 3; row 1: log(e + e^2 + e^3) - 3; row 2 ignored.
  const double r1 = std::log(std::exp(1.0) + std::exp(2.0) + std::exp(3.0)) - 3.0;
  EXPECT_EQ(valid, 2);
  EXPECT_NEAR(loss, (std::log(3.0) + r1) / 2, 1e-6);
  std::vector<float> d(9);
  CrossEntropyBackward(probs.data(), labels.data(), d.data(), 3, 3, 0.5f);
  EXPECT_NEAR(d[0], 0.5 * (1.0 / 3 - 1), 1e-6);
  EXPECT_EQ(d[6], 0.0f);
}

// ---------------------------------------------------------------------------------------
// Gradients against finite differences, L = <y, r> for a fixed random r.

TEST(GradCheckTest, SoftmaxBackward) {
  const int rows = 3, cols = 5;
  auto x = Random(rows * cols, 12, 2.0f);
  const auto r = Random(rows * cols, 13);
  std::vector<float> y(rows * cols), dx(rows * cols);
  auto loss = [&] {
    SoftmaxForward(x.data(), y.data(), rows, cols);
    return DotDouble(y.data(), r.data(), rows * cols);
  };
  loss();
  SoftmaxBackward(y.data(), r.data(), dx.data(), rows, cols);
  const auto res = CheckGradients(loss, {{"x", x.data(), dx.data(), rows * cols}});
  EXPECT_TRUE(res.ok) << res.report;
  EXPECT_EQ(res.checked, rows * cols);
}

TEST(GradCheckTest, GeluBackward) {
  const int n = 40;
  auto x = Random(n, 14, 3.0f);
  const auto r = Random(n, 15);
  std::vector<float> y(n), dx(n);
  auto loss = [&] {
    GeluForward(x.data(), y.data(), n);
    return DotDouble(y.data(), r.data(), n);
  };
  GeluBackward(x.data(), r.data(), dx.data(), n);
  const auto res = CheckGradients(loss, {{"x", x.data(), dx.data(), n}});
  EXPECT_TRUE(res.ok) << res.report;
}

TEST(GradCheckTest, GeluTanhBackward) {
  const int n = 40;
  auto x = Random(n, 16, 3.0f);
  const auto r = Random(n, 17);
  std::vector<float> y(n), dx(n);
  auto loss = [&] {
    GeluTanhForward(x.data(), y.data(), n);
    return DotDouble(y.data(), r.data(), n);
  };
  GeluTanhBackward(x.data(), r.data(), dx.data(), n);
  const auto res = CheckGradients(loss, {{"x", x.data(), dx.data(), n}});
  EXPECT_TRUE(res.ok) << res.report;
}

// The fused bias + GELU passes against the separate kernels they replace, bit for bit, on
// a matrix large enough to be split over threads (cols not a multiple of a cache line) and
// with a non-zero bias gradient to accumulate into; and the same under 1 and 2 threads.
// Also the pair that keeps gelu'(h) for the backward (BiasGeluForwardKeepGrad,
// ScaleBiasBackward), which must give the same results.
TEST(BiasGeluTest, FusedPassesEqualTheSeparateKernelsBitForBit) {
  const int64_t rows = 301, cols = 517, n = rows * cols;
  for (bool tanh_form : {false, true}) {
    SCOPED_TRACE(tanh_form ? "tanh" : "erf");
    const auto h0 = Random(n, 40, 3.0f), bias = Random(cols, 41), d0 = Random(n, 42);
    const auto db0 = Random(cols, 43);
    // Separate: AddBias, GELU; GELU backward, BiasBackward.
    std::vector<float> h_want = h0, act_want(n), d_want = d0, db_want = db0;
    AddBias(h_want.data(), bias.data(), rows, cols);
    (tanh_form ? GeluTanhForward : GeluForward)(h_want.data(), act_want.data(), n);
    (tanh_form ? GeluTanhBackward : GeluBackward)(h_want.data(), d_want.data(), d_want.data(), n);
    BiasBackward(d_want.data(), db_want.data(), rows, cols);
    for (int threads : {1, 2}) {
      SCOPED_TRACE(threads);
      const int before = omp_get_max_threads();
      omp_set_num_threads(threads);
      std::vector<float> h = h0, act(n), d = d0, db = db0;
      BiasGeluForward(h.data(), bias.data(), act.data(), rows, cols, tanh_form);
      GeluBiasBackward(h.data(), d.data(), db.data(), rows, cols, tanh_form);
      omp_set_num_threads(before);
      EXPECT_EQ(0, std::memcmp(h.data(), h_want.data(), n * sizeof(float)));
      EXPECT_EQ(0, std::memcmp(act.data(), act_want.data(), n * sizeof(float)));
      EXPECT_EQ(0, std::memcmp(d.data(), d_want.data(), n * sizeof(float)));
      EXPECT_EQ(0, std::memcmp(db.data(), db_want.data(), cols * sizeof(float)));
      // The keep-grad pair: the same act, d and dbias; h holds gelu'(h) in between.
      omp_set_num_threads(threads);
      std::vector<float> g = h0, act2(n), d2 = d0, db2 = db0, slope(n);
      BiasGeluForwardKeepGrad(g.data(), bias.data(), act2.data(), rows, cols, tanh_form);
      ScaleBiasBackward(g.data(), d2.data(), db2.data(), rows, cols);
      omp_set_num_threads(before);
      std::vector<float> ones(n, 1.0f);
      (tanh_form ? GeluTanhBackward : GeluBackward)(h_want.data(), ones.data(), slope.data(), n);
      EXPECT_EQ(0, std::memcmp(g.data(), slope.data(), n * sizeof(float)));
      EXPECT_EQ(0, std::memcmp(act2.data(), act_want.data(), n * sizeof(float)));
      EXPECT_EQ(0, std::memcmp(d2.data(), d_want.data(), n * sizeof(float)));
      EXPECT_EQ(0, std::memcmp(db2.data(), db_want.data(), cols * sizeof(float)));
    }
  }
}

TEST(GradCheckTest, LayerNormBackwardAllInputs) {
  const int rows = 3, cols = 8;
  auto x = Random(rows * cols, 16, 2.0f), g = Random(cols, 17), b = Random(cols, 18);
  const auto r = Random(rows * cols, 19);
  std::vector<float> y(rows * cols), mean(rows), rstd(rows), dx(rows * cols), dg(cols, 0.0f),
      db(cols, 0.0f);
  auto loss = [&] {
    LayerNormForward(x.data(), g.data(), b.data(), y.data(), mean.data(), rstd.data(), rows, cols);
    return DotDouble(y.data(), r.data(), rows * cols);
  };
  loss();
  LayerNormBackward(x.data(), g.data(), mean.data(), rstd.data(), r.data(), dx.data(), dg.data(),
                    db.data(), rows, cols);
  const auto res = CheckGradients(loss, {{"x", x.data(), dx.data(), rows * cols},
                                         {"gamma", g.data(), dg.data(), cols},
                                         {"beta", b.data(), db.data(), cols}});
  EXPECT_TRUE(res.ok) << res.report;
}

TEST(GradCheckTest, LinearLayerThroughGemmAndBias) {
  // y = x W^T + b; dx = dy W; dW = dy^T x; db = sum dy.
  const int t = 6, in = 5, out = 4;
  auto x = Random(t * in, 20), w = Random(out * in, 21), b = Random(out, 22);
  const auto r = Random(t * out, 23);
  std::vector<float> y(t * out), dx(t * in), dw(out * in, 0.0f), db(out, 0.0f);
  auto loss = [&] {
    Gemm(false, true, t, out, in, 1.0f, x.data(), in, w.data(), in, 0.0f, y.data(), out);
    AddBias(y.data(), b.data(), t, out);
    return DotDouble(y.data(), r.data(), t * out);
  };
  Gemm(false, false, t, in, out, 1.0f, r.data(), out, w.data(), in, 0.0f, dx.data(), in);
  Gemm(true, false, out, in, t, 1.0f, r.data(), out, x.data(), in, 1.0f, dw.data(), in);
  BiasBackward(r.data(), db.data(), t, out);
  const auto res = CheckGradients(loss, {{"x", x.data(), dx.data(), t * in},
                                         {"w", w.data(), dw.data(), out * in},
                                         {"b", b.data(), db.data(), out}});
  EXPECT_TRUE(res.ok) << res.report;
}

TEST(GradCheckTest, CrossEntropyBackward) {
  const int rows = 4, classes = 6;
  auto logits = Random(rows * classes, 24, 2.0f);
  const std::vector<int32_t> labels = {1, -1, 5, 0};
  std::vector<float> probs(rows * classes), d(rows * classes);
  auto loss = [&] {
    return static_cast<double>(
        CrossEntropyForward(logits.data(), labels.data(), probs.data(), rows, classes));
  };
  loss();
  CrossEntropyBackward(probs.data(), labels.data(), d.data(), rows, classes, 1.0f / 3);
  const auto res = CheckGradients(loss, {{"logits", logits.data(), d.data(), rows * classes}});
  EXPECT_TRUE(res.ok) << res.report;
}

TEST(GradCheckTest, CatchesAWrongGradient) {
  // The checker itself must fail on a gradient that is off: here GELU's derivative
  // without the x * pdf term.
  const int n = 20;
  auto x = Random(n, 25, 2.0f);
  const auto r = Random(n, 26);
  std::vector<float> y(n), dx(n);
  auto loss = [&] {
    GeluForward(x.data(), y.data(), n);
    return DotDouble(y.data(), r.data(), n);
  };
  for (int i = 0; i < n; ++i) dx[i] = r[i] * 0.5f * (1.0f + std::erf(x[i] / std::sqrt(2.0f)));
  const auto res = CheckGradients(loss, {{"x", x.data(), dx.data(), n}});
  EXPECT_FALSE(res.ok);
  EXPECT_GT(res.failed, n / 2);
}

}  // namespace
}  // namespace moerun
