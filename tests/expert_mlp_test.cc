// The CPU expert MLP against a double-precision reference written here, and its experts run
// across threads (runtime/kernels.h ParallelOverItems) against one expert after another.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <mutex>
#include <random>
#include <set>
#include <vector>

#include "model/moe_dispatch.h"
#include "model/moe_experts.h"
#include "runtime/kernels.h"

namespace moerun {
namespace {

// Restores the process's thread count when a test ends.
class ThreadCount {
 public:
  explicit ThreadCount(int threads) : before_(NumThreads()) { SetNumThreads(threads); }
  ~ThreadCount() { SetNumThreads(before_); }

 private:
  int before_;
};

TEST(ParallelOverItems, RunsEachItemOnceOnEveryThreadWhenTheItemsSplitEvenly) {
  ThreadCount threads(2);
  std::mutex mu;
  std::vector<int> runs(6, 0);
  std::set<int> workers;
  // Each item runs a GEMM on its own matrices: BLAS calls from both threads at once.
  const int n = 48;
  std::vector<std::vector<float>> a(6), c(6);
  for (int i = 0; i < 6; ++i) {
    a[i].assign(n * n, 0.0f);
    for (int j = 0; j < n; ++j) a[i][j * n + j] = static_cast<float>(i + 1);  // (i+1) I
    c[i].assign(n * n, -1.0f);
  }
  std::vector<float> b(n * n);
  for (int j = 0; j < n * n; ++j) b[j] = static_cast<float>(j % 7) - 3.0f;
  ParallelOverItems(6, [&](int64_t i, int worker) {
    Gemm(false, false, n, n, n, 1.0f, a[i].data(), n, b.data(), n, 0.0f, c[i].data(), n);
    std::lock_guard<std::mutex> lock(mu);
    ++runs[i];
    workers.insert(worker);
  });
  for (int i = 0; i < 6; ++i) {
    EXPECT_EQ(runs[i], 1) << i;
    for (int j = 0; j < n * n; ++j) ASSERT_EQ(c[i][j], (i + 1) * b[j]) << i << " " << j;
  }
  EXPECT_EQ(workers, (std::set<int>{0, 1}));
  // BLAS gets its threads back for the GEMMs outside.
  EXPECT_NE(BlasDescription().find(", 2 threads)"), std::string::npos) << BlasDescription();
}

TEST(ParallelOverItems, RunsItemsInOrderOnThisThreadWhenTheyDoNotSplitEvenly) {
  ThreadCount threads(2);
  std::vector<int64_t> order;
  ParallelOverItems(5, [&](int64_t i, int worker) {
    EXPECT_EQ(worker, 0);
    order.push_back(i);
  });
  EXPECT_EQ(order, (std::vector<int64_t>{0, 1, 2, 3, 4}));
}

std::vector<float> Normal(size_t n, float scale, uint32_t seed) {
  std::mt19937 gen(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = dist(gen);
  return v;
}

void Fill(Tensor* t, float scale, uint32_t seed) {
  const std::vector<float> v = Normal(static_cast<size_t>(t->numel()), scale, seed);
  std::memcpy(t->data<float>(), v.data(), v.size() * sizeof(float));
}

// Everything one forward + backward of the experts produces.
struct Results {
  std::vector<float> y, dx, w1, b1, w2, b2;
};

std::vector<float> Floats(const Tensor& t) {
  return std::vector<float>(t.data<float>(), t.data<float>() + t.numel());
}

Results RunExperts(int64_t el, int64_t r, int64_t d, int64_t m, MoeTimers* timers) {
  ExpertMlp mlp(el, d, m, /*gelu_tanh=*/false);
  Fill(&mlp.params().fc1_weight, 1.0f / std::sqrt(static_cast<float>(d)), 1);
  Fill(&mlp.params().fc1_bias, 0.1f, 2);
  Fill(&mlp.params().fc2_weight, 1.0f / std::sqrt(static_cast<float>(m)), 3);
  Fill(&mlp.params().fc2_bias, 0.1f, 4);
  Tensor x = Tensor::Empty({el, r, d}), dy = Tensor::Empty({el, r, d}), y, dx;
  Fill(&x, 1.0f, 5);
  Fill(&dy, 1.0f, 6);
  mlp.ZeroGradients();
  mlp.Forward(x, &y, timers);
  mlp.Backward(dy, &dx, timers);
  const ExpertMlpParams& g = mlp.grads();
  return {Floats(y),          Floats(dx),           Floats(g.fc1_weight),
          Floats(g.fc1_bias), Floats(g.fc2_weight), Floats(g.fc2_bias)};
}

// The experts in double precision, straight from the definitions: h = x W1^T + b1,
// a = gelu(h) (erf form), y = a W2^T + b2, and the chain rule back through them.
Results Reference(int64_t el, int64_t r, int64_t d, int64_t m) {
  const std::vector<float> w1 = Normal(el * m * d, 1.0f / std::sqrt(static_cast<float>(d)), 1);
  const std::vector<float> b1 = Normal(el * m, 0.1f, 2);
  const std::vector<float> w2 = Normal(el * d * m, 1.0f / std::sqrt(static_cast<float>(m)), 3);
  const std::vector<float> b2 = Normal(el * d, 0.1f, 4);
  const std::vector<float> x = Normal(el * r * d, 1.0f, 5), dy = Normal(el * r * d, 1.0f, 6);
  Results out;
  out.y.assign(el * r * d, 0);
  out.dx.assign(el * r * d, 0);
  out.w1.assign(el * m * d, 0);
  out.b1.assign(el * m, 0);
  out.w2.assign(el * d * m, 0);
  out.b2.assign(el * d, 0);
  for (int64_t e = 0; e < el; ++e) {
    for (int64_t t = 0; t < r; ++t) {
      const float* xt = &x[(e * r + t) * d];
      const float* dyt = &dy[(e * r + t) * d];
      std::vector<double> h(m), a(m), dh(m);
      for (int64_t j = 0; j < m; ++j) {
        double s = b1[e * m + j];
        for (int64_t i = 0; i < d; ++i) s += static_cast<double>(w1[(e * m + j) * d + i]) * xt[i];
        h[j] = s;
        a[j] = 0.5 * s * (1.0 + std::erf(s / std::sqrt(2.0)));
      }
      for (int64_t i = 0; i < d; ++i) {
        double s = b2[e * d + i];
        for (int64_t j = 0; j < m; ++j) s += static_cast<double>(w2[(e * d + i) * m + j]) * a[j];
        out.y[(e * r + t) * d + i] = static_cast<float>(s);
        out.b2[e * d + i] += dyt[i];
      }
      for (int64_t j = 0; j < m; ++j) {
        double da = 0;
        for (int64_t i = 0; i < d; ++i) {
          da += static_cast<double>(dyt[i]) * w2[(e * d + i) * m + j];
          out.w2[(e * d + i) * m + j] += static_cast<float>(dyt[i] * a[j]);
        }
        const double cdf = 0.5 * (1.0 + std::erf(h[j] / std::sqrt(2.0)));
        const double pdf = std::exp(-0.5 * h[j] * h[j]) / std::sqrt(2.0 * M_PI);
        dh[j] = da * (cdf + h[j] * pdf);
        out.b1[e * m + j] += static_cast<float>(dh[j]);
        for (int64_t i = 0; i < d; ++i)
          out.w1[(e * m + j) * d + i] += static_cast<float>(dh[j] * xt[i]);
      }
      for (int64_t i = 0; i < d; ++i) {
        double s = 0;
        for (int64_t j = 0; j < m; ++j) s += dh[j] * w1[(e * m + j) * d + i];
        out.dx[(e * r + t) * d + i] = static_cast<float>(s);
      }
    }
  }
  return out;
}

double MaxRelErr(const std::vector<float>& got, const std::vector<float>& want) {
  double err = 0, scale = 0;
  for (size_t i = 0; i < want.size(); ++i) {
    err = std::max(err, static_cast<double>(std::fabs(got[i] - want[i])));
    scale = std::max(scale, static_cast<double>(std::fabs(want[i])));
  }
  return err / scale;
}

// Four experts over two threads (two each, at once) against one after another, and both
// against the reference. Shapes all differ, so a swapped operand cannot pass.
TEST(ExpertMlpThreads, ExpertsAcrossThreadsMatchTheReferenceAndOneThreadBitForBit) {
  const int64_t el = 4, r = 37, d = 24, m = 40;
  Results one, two;
  {
    ThreadCount threads(1);
    MoeTimers timers;
    one = RunExperts(el, r, d, m, &timers);
  }
  MoeTimers timers;
  {
    ThreadCount threads(2);
    two = RunExperts(el, r, d, m, &timers);
  }
  const Results ref = Reference(el, r, d, m);
  auto check = [&](const char* name, const std::vector<float>& a, const std::vector<float>& b,
                   const std::vector<float>& want) {
    ASSERT_EQ(a.size(), want.size()) << name;
    EXPECT_EQ(0, std::memcmp(a.data(), b.data(), a.size() * sizeof(float))) << name;
    EXPECT_LT(MaxRelErr(b, want), 2e-5) << name;
  };
  check("y", one.y, two.y, ref.y);
  check("dx", one.dx, two.dx, ref.dx);
  check("fc1_weight grad", one.w1, two.w1, ref.w1);
  check("fc1_bias grad", one.b1, two.b1, ref.b1);
  check("fc2_weight grad", one.w2, two.w2, ref.w2);
  check("fc2_bias grad", one.b2, two.b2, ref.b2);
  // The time is split between the GEMMs and the element-wise work.
  EXPECT_GT(timers.expert, 0.0);
  EXPECT_GT(timers.expert_act, 0.0);
  EXPECT_GT(timers.bwd_expert, 0.0);
  EXPECT_GT(timers.bwd_expert_act, 0.0);
}

}  // namespace
}  // namespace moerun
