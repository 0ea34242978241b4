// The MoE layer under mpirun -np 1, 2, 4 and 8: expert-parallel invariance against a
// single-rank run of the same global case, edge cases, and finite-difference gradients.
#include "model/moe_layer.h"

#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "runtime/gradcheck.h"
#include "tests/mpi_test_main.h"

namespace moerun {
namespace {

using testing::World;

// One global MoE case: the whole batch and all experts, as every rank sees it.
struct Case {
  MoeLayerConfig config;
  int64_t tokens = 0;
  std::vector<float> x, dy, router, fc1_w, fc1_b, fc2_w, fc2_b, noise;
  std::vector<int32_t> task;  // per token, for task gates
};

// Turns a case into a Mod-Squad one: `tasks` task routers (kTaskSoftmax), tokens in runs of
// `run` tokens per task (run 0: a random task per token), MI loss weight `mi`.
void MakeTaskGated(Case* c, int tasks, int64_t run, double mi, uint32_t seed) {
  c->config.gate = GateKind::kTaskSoftmax;
  c->config.tasks = tasks;
  c->config.importance_weight = 0;
  c->config.load_weight = 0;
  c->config.mi_weight = mi;
  std::mt19937 rng(seed);
  std::normal_distribution<float> n01(0.0f, 1.0f);
  const int64_t d = c->config.d, e = c->config.num_experts;
  c->router.resize(tasks * e * d);
  for (float& w : c->router) w = 2.0f * n01(rng) / std::sqrt(static_cast<float>(d));
  c->task.resize(c->tokens);
  for (int64_t s = 0; s < c->tokens; ++s) {
    c->task[s] = run > 0 ? static_cast<int32_t>((s / run) % tasks)
                         : static_cast<int32_t>(rng() % static_cast<uint32_t>(tasks));
  }
}

Case MakeCase(uint32_t seed, int64_t tokens, int d, int m, int e, int k) {
  Case c;
  c.config.d = d;
  c.config.m = m;
  c.config.num_experts = e;
  c.config.k = k;
  c.tokens = tokens;
  std::mt19937 rng(seed);
  std::normal_distribution<float> n01(0.0f, 1.0f);
  auto fill = [&](std::vector<float>* v, int64_t n, float scale) {
    v->resize(n);
    for (float& x : *v) x = scale * n01(rng);
  };
  fill(&c.x, tokens * d, 1.0f);
  fill(&c.dy, tokens * d, 1.0f);
  fill(&c.router, int64_t{e} * d, 1.0f / std::sqrt(static_cast<float>(d)));
  fill(&c.fc1_w, int64_t{e} * m * d, 1.0f / std::sqrt(static_cast<float>(d)));
  fill(&c.fc1_b, int64_t{e} * m, 0.1f);
  fill(&c.fc2_w, int64_t{e} * d * m, 1.0f / std::sqrt(static_cast<float>(m)));
  fill(&c.fc2_b, int64_t{e} * d, 0.1f);
  return c;
}

struct Result {
  std::vector<float> y, dx, weight, router_grad, fc1_w_grad, fc1_b_grad, fc2_w_grad, fc2_b_grad;
  std::vector<int32_t> expert, slot;
  MoeLosses losses;
  MoeMetrics metrics;
};

// Gathers every rank's equal-size slice into the whole.
template <typename T>
std::vector<T> Gather(Communicator& comm, const T* local, int64_t n) {
  std::vector<T> all(n * comm.size());
  comm.AllGather(local, n, all.data(), DTypeOf<T>::value);
  return all;
}

// Runs forward + backward of the case on `comm` (each rank its slice of the tokens and its
// experts) and assembles the global results on every rank.
Result RunLayer(Communicator& comm, const Case& c, bool training = true) {
  auto groups = MoeGroups::Create(&comm, c.config.num_experts);
  EXPECT_TRUE(groups.ok()) << groups.status().message();
  MoeLayer layer(c.config, *groups);
  const int64_t d = c.config.d, m = c.config.m, e = c.config.num_experts, k = c.config.k;
  const int64_t el = layer.groups().local_experts(), e0 = layer.groups().first_local_expert();
  MoeParams& p = layer.params();
  std::copy(c.router.begin(), c.router.end(), p.router_weight.data<float>());
  std::copy_n(c.fc1_w.data() + e0 * m * d, el * m * d, p.fc1_weight.data<float>());
  std::copy_n(c.fc1_b.data() + e0 * m, el * m, p.fc1_bias.data<float>());
  std::copy_n(c.fc2_w.data() + e0 * d * m, el * d * m, p.fc2_weight.data<float>());
  std::copy_n(c.fc2_b.data() + e0 * d, el * d, p.fc2_bias.data<float>());
  const int64_t t = c.tokens / comm.size(), first = comm.rank() * t;
  Tensor x = Tensor::Empty({t, d}), y = Tensor::Empty({t, d}), dy = Tensor::Empty({t, d});
  Tensor dx = Tensor::Empty({t, d});
  std::copy_n(c.x.data() + first * d, t * d, x.data<float>());
  std::copy_n(c.dy.data() + first * d, t * d, dy.data<float>());
  MoeForwardArgs args;
  args.training = training;
  args.first_token = first;
  args.noise_key = {7, 2, 1};
  if (!c.task.empty()) args.task = c.task.data() + first;
  Tensor noise;
  if (!c.noise.empty()) {
    noise = Tensor::Empty({t, e});
    std::copy_n(c.noise.data() + first * e, t * e, noise.data<float>());
    args.noise = &noise;
  }
  const Status s = layer.Forward(x, args, &y);
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
  r.weight = Gather(comm, layer.combine_weight().data<float>(), t * k);
  r.expert = Gather(comm, layer.expert_index().data<int32_t>(), t * k);
  r.slot = Gather(comm, layer.slot().data<int32_t>(), t * k);
  r.losses = layer.losses();
  r.metrics = layer.metrics();
  MoeParams& g = layer.grads();
  const int64_t router_size = g.router_weight.numel();
  r.router_grad.assign(g.router_weight.data<float>(), g.router_weight.data<float>() + router_size);
  comm.AllReduce(r.router_grad.data(), router_size, DType::kF32, ReduceOp::kSum);
  // Experts in rank order; with replicas (P > E) the first E ranks hold experts 0..E-1.
  auto experts = [&](const Tensor& grad, int64_t per_expert) {
    std::vector<float> all = Gather(comm, grad.data<float>(), el * per_expert);
    all.resize(e * per_expert);
    return all;
  };
  r.fc1_w_grad = experts(g.fc1_weight, m * d);
  r.fc1_b_grad = experts(g.fc1_bias, m);
  r.fc2_w_grad = experts(g.fc2_weight, d * m);
  r.fc2_b_grad = experts(g.fc2_bias, d);
  return r;
}

// Every rank computes the single-rank answer on a communicator of its own.
Result RunSingleRank(const Case& c, bool training = true) {
  auto self = World().Split(World().rank(), 0, "self");
  return RunLayer(*self, c, training);
}

// Relative closeness of two float vectors: max |a-b| / max(1, max |b|).
double MaxRelDiff(const std::vector<float>& a, const std::vector<float>& b) {
  EXPECT_EQ(a.size(), b.size());
  double diff = 0, scale = 1;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    diff = std::max(diff, static_cast<double>(std::fabs(a[i] - b[i])));
    scale = std::max(scale, static_cast<double>(std::fabs(b[i])));
  }
  return diff / scale;
}

// The tolerance policy: routing exactly equal; outputs, losses and gradients equal up to
// float summation order (partial sums over ranks), 1e-5 of the largest magnitude.
constexpr double kTol = 1e-5;

void ExpectSameResults(const Result& got, const Result& want) {
  EXPECT_EQ(got.expert, want.expert);
  EXPECT_EQ(got.slot, want.slot);
  EXPECT_EQ(got.weight, want.weight) << "gates are per token: bitwise equal";
  EXPECT_LE(MaxRelDiff(got.y, want.y), kTol);
  EXPECT_LE(MaxRelDiff(got.dx, want.dx), kTol);
  EXPECT_LE(MaxRelDiff(got.router_grad, want.router_grad), kTol);
  EXPECT_LE(MaxRelDiff(got.fc1_w_grad, want.fc1_w_grad), kTol);
  EXPECT_LE(MaxRelDiff(got.fc1_b_grad, want.fc1_b_grad), kTol);
  EXPECT_LE(MaxRelDiff(got.fc2_w_grad, want.fc2_w_grad), kTol);
  EXPECT_LE(MaxRelDiff(got.fc2_b_grad, want.fc2_b_grad), kTol);
  for (auto [a, b] : {std::pair{got.losses.value("importance"), want.losses.value("importance")},
                      {got.losses.value("load"), want.losses.value("load")},
                      {got.losses.value("gshard"), want.losses.value("gshard")},
                      {got.losses.value("mi"), want.losses.value("mi")},
                      {got.losses.aux_total, want.losses.aux_total}}) {
    EXPECT_NEAR(a, b, 1e-12 * std::max(1.0, std::fabs(b)));
  }
  EXPECT_EQ(got.metrics.tokens_per_expert, want.metrics.tokens_per_expert);
  EXPECT_EQ(got.metrics.capacity, want.metrics.capacity);
}

// Expert counts that fit the current world: E % P == 0 or P % E == 0.
int ExpertsFor(int wanted) {
  const int p = World().size();
  return (wanted % p == 0 || p % wanted == 0) ? wanted : p;
}

TEST(MoeLayerTest, ExpertParallelInvarianceVanillaAndBpr) {
  for (bool bpr : {false, true}) {
    Case c = MakeCase(11, 64, 12, 16, ExpertsFor(8), 2);
    c.config.bpr = bpr;
    c.config.capacity_factor = 1.0;
    c.config.group_size = 8;
    c.config.gshard_weight = 0.01;
    c.config.z_loss_weight = 0.001;
    const Result want = RunSingleRank(c);
    const Result got = RunLayer(World(), c);
    SCOPED_TRACE(bpr ? "bpr" : "vanilla");
    ExpectSameResults(got, want);
    EXPECT_GT(want.metrics.dropped_fraction[1], 0.0) << "the case should drop some choices";
  }
}

// The overlapped dispatch (moe.overlap_dispatch) computes each expert's rows in pieces while
// the all-to-alls run: the same results as the single-rank layer, on any rank count
// (including replicas, where the expert-parallel group is smaller than the world), with
// one transfer (overlap_stages 1), two and four (8 ranks: stages of 1, 2, 2 and 2 peers;
// 4 ranks: 3 stages, one per other rank) and 100 (at most one per other rank).
TEST(MoeLayerTest, OverlappedDispatchGivesTheSameResults) {
  for (int e : {ExpertsFor(8), 2}) {
    if (e % World().size() != 0 && World().size() % e != 0) continue;
    Case c = MakeCase(23, 128, 12, 20, e, 2);
    c.config.capacity_factor = 1.0;
    c.config.group_size = 8;
    const Result want = RunSingleRank(c);
    c.config.overlap_dispatch = true;
    for (const int stages : {1, 2, 4, 100}) {
      c.config.overlap_stages = stages;
      const Result got = RunLayer(World(), c);
      SCOPED_TRACE("E " + std::to_string(e) + ", " + std::to_string(stages) + " stages");
      ExpectSameResults(got, want);
    }
  }
}

TEST(MoeLayerTest, InvarianceWithGeneratedNoise) {
  // No noise tensor: the counter-based generator keyed by the global token index.
  Case c = MakeCase(12, 32, 8, 8, ExpertsFor(4), 2);
  c.config.group_size = 4;
  c.config.noise_std = 1.0;
  const Result want = RunSingleRank(c);
  ExpectSameResults(RunLayer(World(), c), want);
  EXPECT_GT(want.losses.value("load"), 0.0);
  // At eval there is no noise and no load loss.
  const Result eval = RunSingleRank(c, /*training=*/false);
  EXPECT_EQ(eval.losses.value("load"), 0.0);
  ExpectSameResults(RunLayer(World(), c, false), eval);
}

TEST(MoeLayerTest, ReplicasWhenMoreRanksThanExperts) {
  // With -np 8 this is P = 8, E = 4: two replicas of each expert.
  Case c = MakeCase(13, 32, 8, 8, ExpertsFor(4), 2);
  c.config.group_size = 4;
  ExpectSameResults(RunLayer(World(), c), RunSingleRank(c));
}

TEST(MoeLayerTest, DroplessCapacityIsTheLargestLoad) {
  Case c = MakeCase(14, 32, 8, 8, ExpertsFor(4), 2);
  c.config.capacity_factor = 0;  // dropless
  c.config.group_size = 4;
  const Result want = RunSingleRank(c);
  const Result got = RunLayer(World(), c);
  ExpectSameResults(got, want);
  for (double f : got.metrics.dropped_fraction) EXPECT_EQ(f, 0.0);
  int64_t max_load = 0;  // recount from the routing: the largest per-expert load of a group
  for (int64_t g = 0; g < 32 / 4; ++g) {
    std::vector<int64_t> load(c.config.num_experts, 0);
    for (int64_t i = g * 4 * 2; i < (g + 1) * 4 * 2; ++i) ++load[got.expert[i]];
    max_load = std::max(max_load, *std::max_element(load.begin(), load.end()));
  }
  EXPECT_EQ(got.metrics.capacity, max_load);
}

// All tokens prefer expert 0 strongly: a large router row 0 aligned with every token.
Case AllToOneExpert(int e, int k) {
  Case c = MakeCase(15, 32, 8, 8, e, k);
  for (int64_t s = 0; s < c.tokens; ++s) c.x[s * 8] = 3.0f + std::fabs(c.x[s * 8]);
  for (int j = 0; j < 8; ++j) c.router[j] = j == 0 ? 10.0f : 0.0f;
  return c;
}

TEST(MoeLayerTest, EveryTokenChoosesOneExpert) {
  Case c = AllToOneExpert(ExpertsFor(4), 1);
  c.config.group_size = 4;
  c.config.capacity_factor = 1.0;
  c.config.multiple_of = 0;  // cap = ceil(4 * 1 / E)
  const Result want = RunSingleRank(c);
  const Result got = RunLayer(World(), c);
  ExpectSameResults(got, want);
  const int64_t groups = 32 / 4;
  const int64_t cap = (4 + c.config.num_experts - 1) / c.config.num_experts;
  EXPECT_EQ(got.metrics.capacity, cap);
  EXPECT_EQ(got.metrics.tokens_per_expert[0], cap * groups) << "exactly cap kept per group";
  // Tokens past the capacity get output 0.
  for (int64_t s = 0; s < c.tokens; ++s) {
    if (got.slot[s] >= cap) {
      for (int j = 0; j < 8; ++j) ASSERT_EQ(got.y[s * 8 + j], 0.0f) << "token " << s;
    }
  }
}

TEST(MoeLayerTest, ExpertsThatReceiveNoTokens) {
  // K = 1 and every token on expert 0: every other expert (and with P > 1 every other
  // rank's experts) receives nothing; their gradients are exactly zero.
  Case c = AllToOneExpert(ExpertsFor(4), 1);
  c.config.capacity_factor = 4.0;  // no drops
  c.config.group_size = 4;
  const Result got = RunLayer(World(), c);
  ExpectSameResults(got, RunSingleRank(c));
  const int64_t d = 8, m = 8;
  for (int64_t i = m * d; i < static_cast<int64_t>(got.fc1_w_grad.size()); ++i) {
    ASSERT_EQ(got.fc1_w_grad[i], 0.0f);
  }
  for (int64_t i = d; i < static_cast<int64_t>(got.fc2_b_grad.size()); ++i) {
    ASSERT_EQ(got.fc2_b_grad[i], 0.0f);
  }
}

TEST(MoeLayerTest, KEqualsEAndKEqualsOne) {
  for (int k : {1, ExpertsFor(4)}) {
    Case c = MakeCase(16, 32, 8, 8, ExpertsFor(4), k);
    c.config.group_size = 4;
    SCOPED_TRACE("k=" + std::to_string(k));
    ExpectSameResults(RunLayer(World(), c), RunSingleRank(c));
  }
}

TEST(MoeLayerTest, CapacityOneAndGroupsOfOneToken) {
  Case c = MakeCase(17, 32, 8, 8, ExpertsFor(4), 2);
  c.config.capacity = 1;
  c.config.capacity_factor = 0;
  c.config.group_size = 4;
  Result got = RunLayer(World(), c);
  ExpectSameResults(got, RunSingleRank(c));
  EXPECT_EQ(got.metrics.capacity, 1);
  c = MakeCase(18, 32, 8, 8, ExpertsFor(4), 2);
  c.config.group_size = 1;  // cap = ceil(2 * 1.05 / E) -> 1, then multiple_of 4 -> 4
  got = RunLayer(World(), c);
  ExpectSameResults(got, RunSingleRank(c));
  EXPECT_EQ(got.metrics.capacity, 4);
  for (double f : got.metrics.dropped_fraction) EXPECT_EQ(f, 0.0);
}

TEST(MoeLayerTest, TokensWhoseEveryChoiceIsDropped) {
  Case c = AllToOneExpert(ExpertsFor(4), 2);
  // Make every token's second choice expert 1, then capacity 1 per expert per group.
  for (int j = 0; j < 8; ++j) c.router[8 + j] = j == 0 ? 9.0f : 0.0f;
  c.config.capacity = 1;
  c.config.capacity_factor = 0;
  c.config.group_size = 4;
  const Result got = RunLayer(World(), c);
  ExpectSameResults(got, RunSingleRank(c));
  int fully_dropped = 0;
  for (int64_t s = 0; s < c.tokens; ++s) {
    if (got.slot[s * 2] >= 1 && got.slot[s * 2 + 1] >= 1) {
      ++fully_dropped;
      for (int j = 0; j < 8; ++j) ASSERT_EQ(got.y[s * 8 + j], 0.0f);
    }
  }
  // Per group of 4, round 1 keeps token 0 on expert 0 and round 2 keeps token 0's second
  // choice on expert 1: the other 3 tokens lose every choice.
  EXPECT_EQ(fully_dropped, 8 * 3);
}

TEST(MoeLayerTest, BadGroupSizeIsAnErrorNotACrash) {
  Case c = MakeCase(19, 8 * World().size(), 8, 8, ExpertsFor(4), 2);
  c.config.group_size = 3;
  auto groups = MoeGroups::Create(&World(), c.config.num_experts);
  ASSERT_TRUE(groups.ok());
  MoeLayer layer(c.config, *groups);
  Tensor x = Tensor::Zeros({8, 8}), y = Tensor::Zeros({8, 8});
  const Status s = layer.Forward(x, {}, &y);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("group_size 3 does not divide the 8 tokens"), std::string::npos);
}

// Padding tokens (evaluation's last batch) take no capacity: 4 real tokens followed by 4
// copies of token 0 marked as padding route exactly as the 4 real tokens alone, and the
// padding's output is 0.
TEST(MoeLayerTest, PaddingTokensTakeNoCapacity) {
  auto self = World().Split(World().rank(), 0, "self");
  Case c = MakeCase(41, 4, 6, 8, 4, 2);
  c.config.capacity = 1;
  c.config.capacity_factor = 0;
  c.config.bpr = true;
  c.config.noise_std = 0;
  auto groups = MoeGroups::Create(self.get(), 4);
  ASSERT_TRUE(groups.ok());
  auto run = [&](int64_t tokens, const uint8_t* routed, std::vector<int32_t>* slots) {
    MoeLayerConfig cfg = c.config;
    cfg.group_size = tokens;
    MoeLayer layer(cfg, *groups);
    MoeParams& p = layer.params();
    std::copy(c.router.begin(), c.router.end(), p.router_weight.data<float>());
    std::copy(c.fc1_w.begin(), c.fc1_w.end(), p.fc1_weight.data<float>());
    std::copy(c.fc1_b.begin(), c.fc1_b.end(), p.fc1_bias.data<float>());
    std::copy(c.fc2_w.begin(), c.fc2_w.end(), p.fc2_weight.data<float>());
    std::copy(c.fc2_b.begin(), c.fc2_b.end(), p.fc2_bias.data<float>());
    Tensor x = Tensor::Empty({tokens, 6}), y = Tensor::Empty({tokens, 6});
    for (int64_t t = 0; t < tokens; ++t) {
      std::copy_n(c.x.data() + (t < 4 ? t : 0) * 6, 6, x.data<float>() + t * 6);
    }
    MoeForwardArgs args;
    args.training = false;
    args.routed = routed;
    EXPECT_TRUE(layer.Forward(x, args, &y).ok());
    slots->assign(layer.slot().data<int32_t>(), layer.slot().data<int32_t>() + tokens * 2);
    return std::vector<float>(y.data<float>(), y.data<float>() + tokens * 6);
  };
  std::vector<int32_t> alone_slots, padded_slots;
  const std::vector<float> alone = run(4, nullptr, &alone_slots);
  const uint8_t routed[8] = {1, 1, 1, 1, 0, 0, 0, 0};
  const std::vector<float> padded = run(8, routed, &padded_slots);
  for (int i = 0; i < 8; ++i) EXPECT_EQ(padded_slots[i], alone_slots[i]) << i;
  for (int i = 0; i < 24; ++i) EXPECT_EQ(padded[i], alone[i]) << i;
  for (int i = 24; i < 48; ++i) EXPECT_EQ(padded[i], 0.0f) << i;
}

// Mod-Squad task gates through the same dispatch: the gates are softmax + 1e-4 of the
// token's own task router, and results (the all-reduced MI loss included) do not depend
// on the rank count, dropless or under a capacity with BPR.
TEST(TaskGatedMoeLayerTest, ExpertParallelInvariance) {
  for (double capacity_factor : {0.0, 1.0}) {
    for (int64_t run : {int64_t{16}, int64_t{0}}) {
      Case c = MakeCase(31, 64, 12, 16, ExpertsFor(8), 3);
      MakeTaskGated(&c, 4, run, 0.05, 32);
      c.config.capacity_factor = capacity_factor;
      c.config.group_size = 8;
      const Result want = RunSingleRank(c);
      SCOPED_TRACE("capacity_factor " + std::to_string(capacity_factor) + " run " +
                   std::to_string(run));
      ExpectSameResults(RunLayer(World(), c), want);
      EXPECT_LT(want.losses.value("mi"), 0.0);
      EXPECT_NEAR(want.losses.aux_total, 0.05 * want.losses.value("mi"), 1e-12);
      if (capacity_factor > 0) {
        EXPECT_GT(want.metrics.dropped_fraction[2], 0.0);
      }
    }
  }
}

TEST(TaskGatedMoeLayerTest, GatesAreTheTaskSoftmaxPlusEpsilon) {
  auto self = World().Split(World().rank(), 0, "self");
  Case c = MakeCase(33, 8, 6, 8, 4, 2);
  MakeTaskGated(&c, 3, 0, 0.0, 34);
  auto groups = MoeGroups::Create(self.get(), 4);
  ASSERT_TRUE(groups.ok());
  MoeLayer layer(c.config, *groups);
  std::copy(c.router.begin(), c.router.end(), layer.params().router_weight.data<float>());
  Tensor x = Tensor::Wrap(c.x.data(), {8, 6}, DType::kF32), y = Tensor::Empty({8, 6});
  MoeForwardArgs args;
  args.task = c.task.data();
  ASSERT_TRUE(layer.Forward(x, args, &y).ok());
  for (int s = 0; s < 8; ++s) {
    double z[4], mx = -1e30, sum = 0;
    for (int e = 0; e < 4; ++e) {
      z[e] = 0;
      for (int j = 0; j < 6; ++j)
        z[e] += double{c.x[s * 6 + j]} * c.router[(c.task[s] * 4 + e) * 6 + j];
      mx = std::max(mx, z[e]);
    }
    for (int e = 0; e < 4; ++e) sum += std::exp(z[e] - mx);
    for (int e = 0; e < 4; ++e) {
      EXPECT_NEAR(layer.router().gates().data<float>()[s * 4 + e], std::exp(z[e] - mx) / sum + 1e-4,
                  1e-6);
    }
  }
  // Three tasks: the MI term is reported even at weight 0, and not added.
  EXPECT_NE(layer.losses().value("mi"), 0.0);
  EXPECT_EQ(layer.losses().aux_total, 0.0);
}

// mi_per_rank: each rank's loss is the MI of its own tokens (the reference's estimate); the
// layer reports their mean.
TEST(TaskGatedMoeLayerTest, PerRankMutualInformation) {
  Case c = MakeCase(35, 32, 8, 8, ExpertsFor(4), 2);
  MakeTaskGated(&c, 3, 0, 0.1, 36);
  c.config.capacity_factor = 0;
  c.config.mi_per_rank = true;
  const Result got = RunLayer(World(), c);
  // Every rank's own slice as a single-rank case.
  const int64_t t = c.tokens / World().size();
  Case mine = c;
  mine.tokens = t;
  const int64_t first = World().rank() * t, d = c.config.d;
  mine.x.assign(c.x.begin() + first * d, c.x.begin() + (first + t) * d);
  mine.dy.assign(c.dy.begin() + first * d, c.dy.begin() + (first + t) * d);
  mine.task.assign(c.task.begin() + first, c.task.begin() + first + t);
  double own = RunSingleRank(mine).losses.value("mi");
  World().AllReduce(&own, 1, DType::kF64, ReduceOp::kSum);
  EXPECT_NEAR(got.losses.value("mi"), own / World().size(), 1e-12);
}

TEST(TaskGatedMoeLayerTest, TaskIdOutOfRangeIsAnError) {
  auto self = World().Split(World().rank(), 0, "self");
  Case c = MakeCase(37, 8, 6, 8, 4, 2);
  MakeTaskGated(&c, 3, 0, 0.0, 38);
  c.task[5] = 3;
  auto groups = MoeGroups::Create(self.get(), 4);
  ASSERT_TRUE(groups.ok());
  MoeLayer layer(c.config, *groups);
  Tensor x = Tensor::Wrap(c.x.data(), {8, 6}, DType::kF32), y = Tensor::Empty({8, 6});
  MoeForwardArgs args;
  args.task = c.task.data();
  const Status s = layer.Forward(x, args, &y);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("token 5 has task id 3, outside 0..2"), std::string::npos)
      << s.message();
}

// Finite differences of L = <y, dy> + aux_total over every parameter and the input, on one
// rank, with drops and without. The noise is a fixed tensor so L is a function of the
// parameters; loss weights are raised so the auxiliary terms matter.
void CheckLayerGradients(double capacity_factor, bool bpr, bool task_gate = false) {
  auto self = World().Split(World().rank(), 0, "self");
  Case c = MakeCase(21, 8, 6, 8, 4, 2);
  if (task_gate) MakeTaskGated(&c, 3, 0, 0.5, 22);
  c.config.capacity_factor = capacity_factor;
  c.config.multiple_of = 0;
  c.config.bpr = bpr;
  c.config.importance_weight = 0.1;
  c.config.load_weight = task_gate ? 0.0 : 0.1;
  c.config.gshard_weight = 0.1;
  c.config.z_loss_weight = 0.01;
  auto groups = MoeGroups::Create(self.get(), 4);
  ASSERT_TRUE(groups.ok());
  MoeLayer layer(c.config, *groups);
  MoeParams& p = layer.params();
  std::copy(c.router.begin(), c.router.end(), p.router_weight.data<float>());
  std::copy(c.fc1_w.begin(), c.fc1_w.end(), p.fc1_weight.data<float>());
  std::copy(c.fc1_b.begin(), c.fc1_b.end(), p.fc1_bias.data<float>());
  std::copy(c.fc2_w.begin(), c.fc2_w.end(), p.fc2_weight.data<float>());
  std::copy(c.fc2_b.begin(), c.fc2_b.end(), p.fc2_bias.data<float>());
  Tensor x = Tensor::Empty({8, 6}), y = Tensor::Empty({8, 6}), dx = Tensor::Empty({8, 6});
  Tensor noise = Tensor::Empty({8, 4});
  std::copy(c.x.begin(), c.x.end(), x.data<float>());
  std::mt19937 rng(5);
  std::normal_distribution<float> n01;
  for (int i = 0; i < 32; ++i) noise.data<float>()[i] = 0.25f * n01(rng);
  MoeForwardArgs args;
  args.noise = &noise;
  if (task_gate) args.task = c.task.data();
  auto loss = [&] {
    EXPECT_TRUE(layer.Forward(x, args, &y).ok());
    return DotDouble(y.data<float>(), c.dy.data(), 8 * 6) + layer.losses().aux_total;
  };
  loss();
  const std::vector<int32_t> slots(layer.slot().data<int32_t>(), layer.slot().data<int32_t>() + 16);
  int dropped = 0;
  for (int32_t s : slots) dropped += s >= layer.metrics().capacity;
  if (capacity_factor < 1) {
    EXPECT_GT(dropped, 0);
  } else {
    EXPECT_EQ(dropped, 0);
  }
  layer.ZeroGradients();
  Tensor dy = Tensor::Wrap(c.dy.data(), {8, 6}, DType::kF32);
  layer.Backward(dy, &dx);
  MoeParams& g = layer.grads();
  GradCheckOptions opt;
  opt.rel_eps = 1e-3;
  opt.abs_eps = 2e-3;
  const GradCheckResult r =
      CheckGradients(loss,
                     {{"x", x.data<float>(), dx.data<float>(), 48},
                      {"router.weight", p.router_weight.data<float>(),
                       g.router_weight.data<float>(), p.router_weight.numel()},
                      {"fc1.weight", p.fc1_weight.data<float>(), g.fc1_weight.data<float>(), 192},
                      {"fc1.bias", p.fc1_bias.data<float>(), g.fc1_bias.data<float>(), 32},
                      {"fc2.weight", p.fc2_weight.data<float>(), g.fc2_weight.data<float>(), 192},
                      {"fc2.bias", p.fc2_bias.data<float>(), g.fc2_bias.data<float>(), 24}},
                     opt);
  EXPECT_TRUE(r.ok) << r.report << "worst: " << r.worst;
  // Routing must not have changed under the perturbations (else the check is void).
  loss();
  for (int i = 0; i < 16; ++i) ASSERT_EQ(layer.slot().data<int32_t>()[i], slots[i]);
}

TEST(MoeLayerGradientTest, WithoutDrops) { CheckLayerGradients(2.0, false); }
TEST(MoeLayerGradientTest, WithDropsAndBpr) { CheckLayerGradients(0.5, true); }
TEST(MoeLayerGradientTest, WithDropsVanilla) { CheckLayerGradients(0.5, false); }
TEST(MoeLayerGradientTest, TaskGatesWithMutualInformation) { CheckLayerGradients(2.0, true, true); }
TEST(MoeLayerGradientTest, TaskGatesWithDrops) { CheckLayerGradients(0.5, true, true); }

}  // namespace
}  // namespace moerun
