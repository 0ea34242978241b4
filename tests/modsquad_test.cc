// The Mod-Squad model under mpirun -np 1, 2, 4: its parameters are exactly ModSquadParamSpecs
// (and the released builders' totals of shared/specs/models.md), finite-difference
// gradients of the whole multi-task loss (task losses with uncertainty weights + MI), and
// the same losses and gradients for any rank count.
#include "model/modsquad.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <random>

#include "model/vit_spec.h"
#include "runtime/config.h"
#include "runtime/gradcheck.h"
#include "runtime/usage.h"
#include "tests/mpi_test_main.h"

namespace moerun {
namespace {

using testing::World;

// 8x8 images, patch 4 (4 patches + CLS), two blocks (MoE attention, MoE MLP), three tasks:
// 3-way classification, 2-class segmentation, 1-channel regression.
ModelConfig TinyModSquad(bool moe = true) {
  ModelConfig m;
  m.set_name("tiny_modsquad");
  m.set_image_size(8);
  m.set_channels(1);
  m.set_patch_size(4);
  m.set_hidden_size(8);
  m.set_mlp_dim(16);
  m.set_num_layers(2);
  m.set_num_heads(2);
  ModSquadConfig* ms = m.mutable_modsquad();
  ms->set_moe(moe);
  ms->set_head_dim(4);
  ms->set_attention_experts(4);
  ms->set_attention_k(2);
  ms->set_mlp_experts(4);
  ms->set_mlp_k(2);
  ms->set_mi_weight(0.2);
  ms->set_group_images(0);
  auto task = [&](const char* name, TaskHeadConfig::Kind kind, int outputs) {
    TaskHeadConfig* t = ms->add_tasks();
    t->set_name(name);
    t->set_kind(kind);
    t->set_outputs(outputs);
  };
  task("class", TaskHeadConfig::CLASSIFICATION, 3);
  task("seg", TaskHeadConfig::SEGMENTATION, 2);
  task("reg", TaskHeadConfig::REGRESSION, 1);
  return m;
}

struct Data {
  int64_t batch = 0;
  std::vector<float> images, reg;
  std::vector<int32_t> cls, seg;
};

Data MakeData(int64_t batch, uint32_t seed) {
  Data d;
  d.batch = batch;
  std::mt19937 rng(seed);
  std::normal_distribution<float> n01;
  for (int64_t i = 0; i < batch * 64; ++i) {
    d.images.push_back(n01(rng));
    d.seg.push_back(static_cast<int32_t>(rng() % 2));
    d.reg.push_back(n01(rng));
  }
  for (int64_t i = 0; i < batch; ++i) d.cls.push_back(static_cast<int32_t>(rng() % 3));
  return d;
}

// This rank's slice [first, first + count) of the global data as a batch.
MultiTaskBatch Slice(const Data& d, int64_t first, int64_t count) {
  MultiTaskBatch b;
  b.images = d.images.data() + first * 64;
  b.batch = count;
  b.counted = count;
  b.global_counted = d.batch;
  b.labels = {d.cls.data() + first, d.seg.data() + first * 64, nullptr};
  b.targets = {nullptr, nullptr, d.reg.data() + first * 64};
  return b;
}

struct Built {
  std::shared_ptr<MoeGroups> attention, mlp;
  std::unique_ptr<ModSquadModel> model;
};

Built Build(const ModelConfig& m, Communicator* comm) {
  Built b;
  auto created = ModSquadModel::Create(m, comm);
  EXPECT_TRUE(created.ok()) << created.status().message();
  b.model = std::move(*created);
  b.attention = b.model->groups(m.modsquad().attention_experts());
  b.mlp = b.model->groups(m.modsquad().mlp_experts());
  return b;
}

TEST(ModSquadTest, ParametersAreTheSpecs) {
  const ModelConfig m = TinyModSquad();
  Built b = Build(m, &World());
  std::map<std::string, std::vector<int64_t>> got;
  for (Param& p : b.model->params()) got[p.name] = p.value.shape();
  int64_t expected = 0;
  for (const ParamSpec& s : ModSquadParamSpecs(m)) {
    bool mine = s.expert < 0;
    if (!mine) {
      const MoeGroups& g = s.name.find(".attn.") != std::string::npos ? *b.attention : *b.mlp;
      const int local = s.expert - g.first_local_expert();
      mine = local >= 0 && local < g.local_experts();
    }
    if (!mine) continue;
    ++expected;
    ASSERT_TRUE(got.count(s.name)) << s.name;
    EXPECT_EQ(got[s.name], s.shape) << s.name;
  }
  EXPECT_EQ(static_cast<int64_t>(b.model->params().size()), expected);
}

// shared/specs/models.md: the reference builders for 13 Taskonomy tasks.
TEST(ModSquadTest, ReleasedBuildersTotals) {
  for (auto [path, total] : {std::pair{"configs/modsquad_small_taskonomy.pbtxt", 55436245LL},
                             {"configs/modsquad_base_taskonomy.pbtxt", 206956117LL}}) {
    auto c = LoadConfig(std::string(MOERUN_SOURCE_DIR) + "/" + path, {});
    ASSERT_TRUE(c.ok()) << c.status().message();
    EXPECT_EQ(CountParameters(c->model()).total, total) << path;
  }
}

// configs/modsquad_fashion_mnist.pbtxt counted by hand (D 64, patch 7: 16 patches + CLS, 5
// tasks, 4 blocks, dense attention 4 x 16, 8 experts per MoE layer, expert hidden 128 / 2):
//   embeddings  49*64+64 + 64 + 17*64 + 5*64                         =   4,672
//   even block  LN 128, router 5*8*64 = 2,560, kv 64*32+32 = 2,080, experts 8*(16*64+64*16)
//               = 16,384, LN 128, MLP 64*128+128+128*64+64 = 16,576  =  37,856  (x2)
//   odd block   LN 128, qkv 64*192+192 = 12,480, proj 64*64+64 = 4,160, LN 128, router 2,560,
//               experts 8*(64*64+64+64*64+64) = 66,560               =  86,016  (x2)
//   norm + fc_norm                                                   =     256
//   heads       class 128+650, coarse 128+260, rotation 128+260, segmentation 49*2*64+98,
//               edges 49*64+49                                       =  11,109
//   uncertainty weights                                              =       5
TEST(ModSquadTest, FashionMnistConfigCountedByHand) {
  auto c = LoadConfig(std::string(MOERUN_SOURCE_DIR) + "/configs/modsquad_fashion_mnist.pbtxt", {});
  ASSERT_TRUE(c.ok()) << c.status().message();
  EXPECT_EQ(CountParameters(c->model()).total,
            4672 + 2 * 37856 + 2 * 86016 + 256 + 11109 + 5);  // 263,786
}

// configs/modsquad_small_taskonomy.pbtxt counted by hand (ViT-S: D 384, 12 blocks, 6 heads of
// 128, 224 px / 16 = 196 patches + CLS, 13 tasks; MoE attention 15 experts, MoE MLP 16 of
// hidden 384, dense MLP 1536):
//   embeddings  16*16*3*384+384 + 384 + 197*384 + 13*384                    =    376,320
//   even block  LN 768, router 13*15*384 = 74,880, kv 384*256+256 = 98,560, experts
//               15*2*128*384 = 1,474,560, LN 768, MLP 2*384*1536+1536+384 = 1,181,568
//                                                                          =  2,831,104 (x6)
//   odd block   LN 768, qkv 384*2304+2304 = 887,040, proj 768*384+384 = 295,296, LN 768,
//               router 13*16*384 = 79,872, experts 16*(2*384*384+384+384) = 4,730,880
//                                                                          =  5,994,624 (x6)
//   norm + fc_norm                                                         =      1,536
//   heads       LN + 384*1000+1000, LN + 384*365+365, 11 dense heads with 16 channels in
//               all: 384*256*16 + 256*16                                   =  2,104,021
TEST(ModSquadTest, SmallTaskonomyCountedByHand) {
  auto c =
      LoadConfig(std::string(MOERUN_SOURCE_DIR) + "/configs/modsquad_small_taskonomy.pbtxt", {});
  ASSERT_TRUE(c.ok()) << c.status().message();
  EXPECT_EQ(CountParameters(c->model()).total,
            376320 + 6 * 2831104 + 6 * 5994624 + 1536 + 2104021);  // 55,436,245
}

// Total loss of the tiny model on one rank, as a function of its parameters.
void CheckGradients(bool moe) {
  auto self = World().Split(World().rank(), 0, "self");
  ModelConfig m = TinyModSquad(moe);
  Built b = Build(m, self.get());
  ModSquadModel& model = *b.model;
  model.Init(5);
  std::mt19937 rng(6);
  std::normal_distribution<float> n01;
  for (Param& p : model.params()) {
    if (p.name == "loss.task_uncertainty") {
      for (int64_t i = 0; i < p.value.numel(); ++i) p.value.data<float>()[i] = 0.8f + 0.2f * i;
      continue;
    }
    for (int64_t i = 0; i < p.value.numel(); ++i) p.value.data<float>()[i] = 0.4f * n01(rng);
  }
  const Data data = MakeData(2, 7);
  const MultiTaskBatch batch = Slice(data, 0, 2);
  MultiTaskOutput out;
  auto loss = [&] {
    EXPECT_TRUE(model.Forward(batch, &out).ok());
    return out.task_loss + out.aux_loss;
  };
  loss();
  if (moe) {
    EXPECT_NE(out.aux_loss, 0.0);
  }
  model.ZeroGrads();
  model.Backward();
  std::vector<GradCheckParam> params;
  for (Param& p : model.params()) {
    params.push_back({p.name, p.value.data<float>(), p.grad.data<float>(), p.value.numel()});
  }
  GradCheckOptions opt;
  opt.rel_eps = 1e-3;
  opt.abs_eps = 1e-3;
  opt.max_per_param = 6;
  const GradCheckResult r = moerun::CheckGradients(loss, params, opt);
  EXPECT_TRUE(r.ok) << r.report << "worst: " << r.worst;
  EXPECT_GT(r.checked, 100);
}

TEST(ModSquadGradientTest, MixtureOfExperts) { CheckGradients(true); }
TEST(ModSquadGradientTest, DenseBaseline) { CheckGradients(false); }

// One global batch of 4 images: every rank count gives the same losses and gradients.
TEST(ModSquadTest, ExpertParallelInvariance) {
  for (double capacity_factor : {0.0, 1.0}) {
    ModelConfig m = TinyModSquad();
    m.mutable_modsquad()->set_capacity_factor(capacity_factor);
    m.mutable_modsquad()->set_multiple_of(0);
    m.mutable_modsquad()->set_group_images(1);
    const Data data = MakeData(4, 8);
    auto run = [&](Communicator* comm) {
      Built b = Build(m, comm);
      b.model->Init(9);
      const int64_t local = 4 / comm->size();
      MultiTaskOutput out;
      EXPECT_TRUE(b.model->Forward(Slice(data, comm->rank() * local, local), &out).ok());
      b.model->ZeroGrads();
      b.model->Backward();
      b.model->ReduceGradients();
      std::map<std::string, std::vector<float>> grads;
      for (Param& p : b.model->params()) {
        grads[p.name].assign(p.grad.data<float>(), p.grad.data<float>() + p.grad.numel());
      }
      return std::make_pair(out, grads);
    };
    auto self = World().Split(World().rank(), 0, "self");
    const auto [want, want_grads] = run(self.get());
    const auto [got, got_grads] = run(&World());
    SCOPED_TRACE("capacity_factor " + std::to_string(capacity_factor));
    EXPECT_NEAR(got.task_loss, want.task_loss, 1e-6);
    // The dense GEMMs (OpenBLAS) round a row differently for other row counts, so the
    // gates differ in their last bits: float-level agreement, not bitwise.
    EXPECT_NEAR(got.aux_loss, want.aux_loss, 1e-7);
    for (size_t t = 0; t < want.tasks.size(); ++t) {
      EXPECT_NEAR(got.tasks[t].loss, want.tasks[t].loss, 1e-6) << t;
      EXPECT_NEAR(got.tasks[t].metric, want.tasks[t].metric, 1e-9) << t;
    }
    for (const auto& [name, g] : got_grads) {
      const std::vector<float>& w = want_grads.at(name);
      ASSERT_EQ(g.size(), w.size()) << name;
      for (size_t i = 0; i < g.size(); ++i) {
        ASSERT_NEAR(g[i], w[i], 1e-5 * std::max(1.0f, std::fabs(w[i]))) << name << "[" << i << "]";
      }
    }
  }
}

TEST(ModSquadTest, MetricsFromSums) {
  TaskHeadConfig seg;
  seg.set_kind(TaskHeadConfig::SEGMENTATION);
  seg.set_outputs(2);
  // IoU 1/3 and 1/2: mIoU 5/12.
  EXPECT_NEAR(TaskMetric(seg, {1, 2, 3, 4, 0, 0}), 5.0 / 12, 1e-12);
  TaskHeadConfig cls;
  EXPECT_NEAR(TaskMetric(cls, {3, 4, 0, 0}), 0.75, 1e-12);
}

// As VitModel's: the second forward releases the first's activations (the MoE attention's
// and MLP routers' saved inputs too), so the arena merges its blocks into one.
TEST(ModSquadTest, ReleasesItsActivationsSoTheArenaSettlesIntoOneBlock) {
  auto self = World().Split(World().rank(), 0, "self");
  ModelConfig m = TinyModSquad();
  m.set_hidden_size(32);
  m.set_mlp_dim(64);
  Built b = Build(m, self.get());
  b.model->Init(5);
  const Data data = MakeData(64, 6);
  const MultiTaskBatch batch = Slice(data, 0, 64);
  for (int step = 0; step < 3; ++step) {
    MultiTaskOutput out;
    ASSERT_TRUE(b.model->Forward(batch, &out).ok());
    if (step == 0) {
      ASSERT_GT(b.model->arena_blocks(), 1) << "the first step should outgrow the first block";
    } else {
      EXPECT_EQ(b.model->arena_blocks(), 1) << "step " << step;
    }
    b.model->ZeroGrads();
    b.model->Backward();
  }
}

// The usage EMA after one training step: 0.05 x the selections, so each task's row sums to
// 0.05 x its tokens (all ranks) x k.
TEST(ModSquadTest, UsageEmaAfterOneStep) {
  const ModelConfig m = TinyModSquad();
  Built b = Build(m, &World());
  b.model->Init(11);
  const Data data = MakeData(4, 12);
  const int64_t local = 4 / World().size();
  MultiTaskOutput out;
  MultiTaskBatch batch = Slice(data, World().rank() * local, local);
  ASSERT_TRUE(b.model->Forward(batch, &out).ok());
  ASSERT_EQ(b.model->buffers().size(), 2u);
  for (Param& u : b.model->buffers()) {
    ASSERT_EQ(u.value.shape(), (Shape{3, 4})) << u.name;
    for (int t = 0; t < 3; ++t) {
      double sum = 0;
      for (int e = 0; e < 4; ++e) sum += u.value.data<float>()[t * 4 + e];
      EXPECT_NEAR(sum, 0.05 * 4 * 5 * 2, 1e-4)
          << u.name << " task " << t;  // 4 images x 5 tokens x k 2
    }
  }
  // Evaluation does not move it.
  const std::vector<float> before(b.model->buffers()[0].value.data<float>(),
                                  b.model->buffers()[0].value.data<float>() + 12);
  batch.training = false;
  ASSERT_TRUE(b.model->Forward(batch, &out).ok());
  for (int i = 0; i < 12; ++i) EXPECT_EQ(b.model->buffers()[0].value.data<float>()[i], before[i]);
}

// Hand-computed: percentages, task similarity, entropy (shared/specs/modsquad.md).
TEST(UsageTest, PercentSimilarityEntropy) {
  ModelConfig m = TinyModSquad();
  Tensor a = Tensor::Zeros({2, 3}), c = Tensor::Zeros({2, 3});
  const float ea[] = {1, 1, 2, 0, 0, 0}, ec[] = {2, 2, 0, 0, 3, 3};
  std::copy(ea, ea + 6, a.data<float>());
  std::copy(ec, ec + 6, c.data<float>());
  const std::vector<LayerUsage> layers =
      UsageFromBuffers(m, {{"blocks.0.attn.usage", a}, {"blocks.1.mlp.usage", c}});
  ASSERT_EQ(layers.size(), 2u);
  EXPECT_EQ(layers[0].layer, "blocks.0.attn");
  EXPECT_EQ(layers[0].percent, (std::vector<double>{25, 25, 50, 0, 0, 0}));
  EXPECT_EQ(layers[1].percent, (std::vector<double>{50, 50, 0, 0, 50, 50}));
  // S = sum over layers of u_i . u_j: layer 0 gives [.375 0; 0 0], layer 1 [.5 .25; .25 .5].
  const std::vector<double> s = TaskSimilarity(layers);
  ASSERT_EQ(s.size(), 4u);
  EXPECT_NEAR(s[0], 0.875, 1e-12);
  EXPECT_NEAR(s[1], 0.25, 1e-12);
  EXPECT_NEAR(s[2], 0.25, 1e-12);
  EXPECT_NEAR(s[3], 0.5, 1e-12);
  EXPECT_NEAR(UsageEntropy(layers[0], 0), 1.5, 1e-12);
  EXPECT_NEAR(UsageEntropy(layers[1], 1), 1.0, 1e-12);
  EXPECT_NEAR(MeanTaskEntropy(layers), (1.5 + 0 + 1 + 1) / 4, 1e-12);
}

}  // namespace
}  // namespace moerun
