// Mod-Squad's mixture of attention heads under mpirun -np 1, 2, 4: against an independent
// single-rank reference written here from models.md (double precision, no dispatch), rank
// count invariance dropless and under a capacity, and finite-difference gradients.
#include "model/moe_attention.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <random>

#include "runtime/gradcheck.h"
#include "tests/mpi_test_main.h"

namespace moerun {
namespace {

using testing::World;

struct Case {
  MoeAttentionConfig config;
  int64_t seqs = 0, len = 0;
  std::vector<float> x, dy, router, wq, wo, wkv, bkv;
  std::vector<int32_t> task;  // per token (one task per sequence)
};

Case MakeCase(uint32_t seed, int64_t seqs, int64_t len, int d, int dh, int e, int k, int tasks) {
  Case c;
  c.config.d = d;
  c.config.head_dim = dh;
  c.config.num_experts = e;
  c.config.k = k;
  c.config.tasks = tasks;
  c.config.capacity.capacity_factor = 0;  // dropless
  c.config.capacity.group_size = len;
  c.config.aux.mi = 0.05;
  c.seqs = seqs;
  c.len = len;
  std::mt19937 rng(seed);
  std::normal_distribution<float> n01(0.0f, 1.0f);
  auto fill = [&](std::vector<float>* v, int64_t n, float scale) {
    v->resize(n);
    for (float& x : *v) x = scale * n01(rng);
  };
  const int64_t t = seqs * len;
  fill(&c.x, t * d, 1.0f);
  fill(&c.dy, t * d, 1.0f);
  fill(&c.router, int64_t{tasks} * e * d, 2.0f / std::sqrt(static_cast<float>(d)));
  fill(&c.wq, int64_t{e} * dh * d, 1.0f / std::sqrt(static_cast<float>(d)));
  fill(&c.wo, int64_t{e} * d * dh, 1.0f / std::sqrt(static_cast<float>(dh)));
  fill(&c.wkv, 2 * dh * int64_t{d}, 1.0f / std::sqrt(static_cast<float>(d)));
  fill(&c.bkv, 2 * dh, 0.1f);
  for (int64_t s = 0; s < t; ++s) c.task.push_back(static_cast<int32_t>((s / len) % tasks));
  return c;
}

// y of the whole case, dropless, straight from the definition.
std::vector<double> Reference(const Case& c) {
  const int64_t d = c.config.d, dh = c.config.head_dim, e = c.config.num_experts, k = c.config.k;
  const int64_t t = c.seqs * c.len;
  std::vector<double> kv(t * 2 * dh), y(t * d, 0.0);
  for (int64_t s = 0; s < t; ++s) {
    for (int64_t o = 0; o < 2 * dh; ++o) {
      double v = c.bkv[o];
      for (int64_t i = 0; i < d; ++i) v += double{c.wkv[o * d + i]} * c.x[s * d + i];
      kv[s * 2 * dh + o] = v;
    }
  }
  for (int64_t s = 0; s < t; ++s) {
    std::vector<double> z(e), p(e);
    for (int64_t j = 0; j < e; ++j) {
      for (int64_t i = 0; i < d; ++i)
        z[j] += double{c.router[(c.task[s] * e + j) * d + i]} * c.x[s * d + i];
    }
    const double mx = *std::max_element(z.begin(), z.end());
    double sum = 0;
    for (int64_t j = 0; j < e; ++j) sum += std::exp(z[j] - mx);
    for (int64_t j = 0; j < e; ++j) p[j] = std::exp(z[j] - mx) / sum + 1e-4;
    std::vector<int> order(e);
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return p[a] > p[b]; });
    const int64_t first = s / c.len * c.len;
    for (int64_t h = 0; h < k; ++h) {
      const int ex = order[h];
      std::vector<double> q(dh, 0.0), a(dh, 0.0), sc(c.len);
      for (int64_t o = 0; o < dh; ++o) {
        for (int64_t i = 0; i < d; ++i)
          q[o] += double{c.wq[(ex * dh + o) * d + i]} * c.x[s * d + i];
      }
      double smx = -1e300, ssum = 0;
      for (int64_t l = 0; l < c.len; ++l) {
        sc[l] = 0;
        for (int64_t o = 0; o < dh; ++o) sc[l] += q[o] * kv[(first + l) * 2 * dh + o];
        sc[l] /= std::sqrt(static_cast<double>(dh));
        smx = std::max(smx, sc[l]);
      }
      for (int64_t l = 0; l < c.len; ++l) ssum += std::exp(sc[l] - smx);
      for (int64_t l = 0; l < c.len; ++l) {
        const double w = std::exp(sc[l] - smx) / ssum;
        for (int64_t o = 0; o < dh; ++o) a[o] += w * kv[(first + l) * 2 * dh + dh + o];
      }
      for (int64_t i = 0; i < d; ++i) {
        double v = 0;
        for (int64_t o = 0; o < dh; ++o) v += double{c.wo[(ex * d + i) * dh + o]} * a[o];
        y[s * d + i] += p[ex] * v;
      }
    }
  }
  return y;
}

struct Result {
  std::vector<float> y, dx, router_grad, wq_grad, wo_grad, wkv_grad, bkv_grad;
  std::vector<int32_t> expert;
  MoeLosses losses;
  MoeMetrics metrics;
};

template <typename T>
std::vector<T> Gather(Communicator& comm, const T* local, int64_t n) {
  std::vector<T> all(n * comm.size());
  comm.AllGather(local, n, all.data(), DTypeOf<T>::value);
  return all;
}

void LoadParams(const Case& c, MoeAttention* layer, int64_t e0) {
  const int64_t d = c.config.d, dh = c.config.head_dim;
  MoeAttentionParams& p = layer->params();
  const int64_t el = p.q_weight.dim(0);
  std::copy(c.router.begin(), c.router.end(), p.router_weight.data<float>());
  std::copy_n(c.wq.data() + e0 * dh * d, el * dh * d, p.q_weight.data<float>());
  std::copy_n(c.wo.data() + e0 * d * dh, el * d * dh, p.o_weight.data<float>());
  std::copy(c.wkv.begin(), c.wkv.end(), p.kv_weight.data<float>());
  std::copy(c.bkv.begin(), c.bkv.end(), p.kv_bias.data<float>());
}

Result RunLayer(Communicator& comm, const Case& c) {
  auto groups = MoeGroups::Create(&comm, c.config.num_experts);
  EXPECT_TRUE(groups.ok()) << groups.status().message();
  MoeAttention layer(c.config, *groups);
  const int64_t d = c.config.d, dh = c.config.head_dim, e = c.config.num_experts, k = c.config.k;
  const int64_t el = (*groups)->local_experts();
  LoadParams(c, &layer, (*groups)->first_local_expert());
  const int64_t t = c.seqs * c.len / comm.size(), first = comm.rank() * t;
  Tensor x = Tensor::Wrap(const_cast<float*>(c.x.data()) + first * d, {t, d}, DType::kF32);
  Tensor dy = Tensor::Wrap(const_cast<float*>(c.dy.data()) + first * d, {t, d}, DType::kF32);
  Tensor y = Tensor::Empty({t, d}), dx = Tensor::Empty({t, d});
  MoeForwardArgs args;
  args.task = c.task.data() + first;
  const Status s = layer.Forward(x, c.len, args, &y);
  if (!s.ok()) {
    ADD_FAILURE() << s.message();
    return {};
  }
  layer.ZeroGradients();
  layer.Backward(dy, &dx);
  layer.ReduceReplicaGradients();
  Result r;
  r.y = Gather(comm, y.data<float>(), t * d);
  r.dx = Gather(comm, dx.data<float>(), t * d);
  r.expert = Gather(comm, layer.plan().expert_index.data<int32_t>(), t * k);
  r.losses = layer.losses();
  r.metrics = layer.metrics();
  MoeAttentionParams& g = layer.grads();
  auto replicated = [&](const Tensor& grad) {
    std::vector<float> v(grad.data<float>(), grad.data<float>() + grad.numel());
    comm.AllReduce(v.data(), grad.numel(), DType::kF32, ReduceOp::kSum);
    return v;
  };
  r.router_grad = replicated(g.router_weight);
  r.wkv_grad = replicated(g.kv_weight);
  r.bkv_grad = replicated(g.kv_bias);
  auto experts = [&](const Tensor& grad, int64_t per_expert) {
    std::vector<float> all = Gather(comm, grad.data<float>(), el * per_expert);
    all.resize(e * per_expert);
    return all;
  };
  r.wq_grad = experts(g.q_weight, dh * d);
  r.wo_grad = experts(g.o_weight, d * dh);
  return r;
}

Result RunSingleRank(const Case& c) {
  auto self = World().Split(World().rank(), 0, "self");
  return RunLayer(*self, c);
}

double MaxRelDiff(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  double diff = 0, scale = 1;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    diff = std::max(diff, static_cast<double>(std::fabs(a[i] - b[i])));
    scale = std::max(scale, static_cast<double>(std::fabs(b[i])));
  }
  return diff / scale;
}

int ExpertsFor(int wanted) {
  const int p = World().size();
  return (wanted % p == 0 || p % wanted == 0) ? wanted : p;
}

TEST(MoeAttentionTest, MatchesTheDefinition) {
  const Case c = MakeCase(41, 4, 5, 12, 4, ExpertsFor(8), 3, 3);
  const Result got = RunLayer(World(), c);
  const std::vector<double> want = Reference(c);
  ASSERT_EQ(got.y.size(), want.size());
  double worst = 0;
  for (size_t i = 0; i < want.size(); ++i) worst = std::max(worst, std::fabs(got.y[i] - want[i]));
  EXPECT_LT(worst, 1e-5);
}

TEST(MoeAttentionTest, ExpertParallelInvariance) {
  for (double capacity_factor : {0.0, 1.0}) {
    Case c = MakeCase(42, 8, 4, 12, 4, ExpertsFor(8), 3, 4);
    c.config.capacity.capacity_factor = capacity_factor;
    c.config.capacity.multiple_of = 0;
    c.config.capacity.group_size = 8;
    const Result want = RunSingleRank(c);
    const Result got = RunLayer(World(), c);
    SCOPED_TRACE("capacity_factor " + std::to_string(capacity_factor));
    EXPECT_EQ(got.expert, want.expert);
    constexpr double kTol = 1e-5;
    EXPECT_LE(MaxRelDiff(got.y, want.y), kTol);
    EXPECT_LE(MaxRelDiff(got.dx, want.dx), kTol);
    EXPECT_LE(MaxRelDiff(got.router_grad, want.router_grad), kTol);
    EXPECT_LE(MaxRelDiff(got.wq_grad, want.wq_grad), kTol);
    EXPECT_LE(MaxRelDiff(got.wo_grad, want.wo_grad), kTol);
    EXPECT_LE(MaxRelDiff(got.wkv_grad, want.wkv_grad), kTol);
    EXPECT_LE(MaxRelDiff(got.bkv_grad, want.bkv_grad), kTol);
    EXPECT_NEAR(got.losses.value("mi"), want.losses.value("mi"), 1e-12);
    EXPECT_EQ(got.metrics.tokens_per_expert, want.metrics.tokens_per_expert);
    if (capacity_factor > 0) {
      EXPECT_GT(want.metrics.dropped_fraction[2], 0.0);
    }
  }
}

void CheckGradients(double capacity_factor) {
  auto self = World().Split(World().rank(), 0, "self");
  Case c = MakeCase(43, 2, 4, 6, 3, 4, 2, 3);
  c.config.capacity.capacity_factor = capacity_factor;
  c.config.capacity.multiple_of = 0;
  c.config.aux.mi = 0.5;
  c.config.aux.importance = 0.1;
  auto groups = MoeGroups::Create(self.get(), 4);
  ASSERT_TRUE(groups.ok());
  MoeAttention layer(c.config, *groups);
  LoadParams(c, &layer, 0);
  const int64_t t = 8, d = 6;
  Tensor x = Tensor::Empty({t, d}), y = Tensor::Empty({t, d}), dx = Tensor::Empty({t, d});
  std::copy(c.x.begin(), c.x.end(), x.data<float>());
  MoeForwardArgs args;
  args.task = c.task.data();
  auto loss = [&] {
    EXPECT_TRUE(layer.Forward(x, c.len, args, &y).ok());
    return DotDouble(y.data<float>(), c.dy.data(), t * d) + layer.losses().aux_total;
  };
  loss();
  const std::vector<int32_t> rows(layer.plan().row.data<int32_t>(),
                                  layer.plan().row.data<int32_t>() + t * 2);
  const int dropped = static_cast<int>(std::count(rows.begin(), rows.end(), -1));
  if (capacity_factor > 0) {
    EXPECT_GT(dropped, 0);
  } else {
    EXPECT_EQ(dropped, 0);
  }
  layer.ZeroGradients();
  Tensor dy = Tensor::Wrap(c.dy.data(), {t, d}, DType::kF32);
  layer.Backward(dy, &dx);
  MoeAttentionParams& p = layer.params();
  MoeAttentionParams& g = layer.grads();
  GradCheckOptions opt;
  opt.rel_eps = 1e-3;
  opt.abs_eps = 2e-3;
  const GradCheckResult r = moerun::CheckGradients(
      loss,
      {{"x", x.data<float>(), dx.data<float>(), t * d},
       {"router", p.router_weight.data<float>(), g.router_weight.data<float>(),
        p.router_weight.numel()},
       {"q", p.q_weight.data<float>(), g.q_weight.data<float>(), p.q_weight.numel()},
       {"o", p.o_weight.data<float>(), g.o_weight.data<float>(), p.o_weight.numel()},
       {"kv.weight", p.kv_weight.data<float>(), g.kv_weight.data<float>(), p.kv_weight.numel()},
       {"kv.bias", p.kv_bias.data<float>(), g.kv_bias.data<float>(), p.kv_bias.numel()}},
      opt);
  EXPECT_TRUE(r.ok) << r.report << "worst: " << r.worst;
  loss();
  for (int i = 0; i < t * 2; ++i) ASSERT_EQ(layer.plan().row.data<int32_t>()[i], rows[i]);
}

TEST(MoeAttentionGradientTest, Dropless) { CheckGradients(0.0); }
TEST(MoeAttentionGradientTest, WithDrops) { CheckGradients(0.6); }

TEST(MoeAttentionTest, PartialSequenceIsAnError) {
  auto self = World().Split(World().rank(), 0, "self");
  Case c = MakeCase(44, 2, 4, 6, 3, 4, 2, 3);
  auto groups = MoeGroups::Create(self.get(), 4);
  ASSERT_TRUE(groups.ok());
  MoeAttention layer(c.config, *groups);
  Tensor x = Tensor::Wrap(c.x.data(), {8, 6}, DType::kF32), y = Tensor::Empty({8, 6});
  MoeForwardArgs args;
  args.task = c.task.data();
  const Status s = layer.Forward(x, 3, args, &y);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("not whole sequences of 3"), std::string::npos) << s.message();
}

}  // namespace
}  // namespace moerun
