// The ViT / V-MoE model and its training under mpirun -np 1, 2, 4: finite-difference
// gradients of a whole tiny model, expert-parallel invariance of training, overfitting.
#include "model/vit.h"

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <random>

#include "model/layers.h"
#include "model/ops.h"
#include "model/vit_spec.h"
#include "runtime/config.h"
#include "runtime/gradcheck.h"
#include "runtime/trainer.h"
#include "tests/mpi_test_main.h"

namespace moerun {
namespace {

using testing::World;

ModelConfig TinyModel(bool moe, bool pre_logits) {
  ModelConfig m;
  m.set_name("grad");
  m.set_image_size(8);
  m.set_channels(2);
  m.set_patch_size(4);
  m.set_hidden_size(8);
  m.set_mlp_dim(12);
  m.set_num_layers(2);
  m.set_num_heads(2);
  m.set_num_classes(5);
  if (pre_logits) m.set_pre_logits_size(6);
  if (moe) {
    MoeConfig* e = m.mutable_moe();
    e->set_num_experts(4);
    e->set_k(2);
    e->set_capacity_factor(2.0);  // no drops: the loss is smooth in every parameter
    e->set_importance_weight(0.05);
    e->set_load_weight(0.05);
    e->set_group_images(0);  // one group per rank's micro-batch (3 images in the gradient checks)
  }
  return m;
}

void CheckModelGradients(const ModelConfig& m) {
  auto self = World().Split(World().rank(), 0, "self");
  std::shared_ptr<MoeGroups> groups;
  if (m.has_moe()) groups = *MoeGroups::Create(self.get(), m.moe().num_experts());
  auto created = VitModel::Create(m, groups);
  ASSERT_TRUE(created.ok()) << created.status().message();
  VitModel& model = **created;
  model.Init(3);
  // Zero-initialised head and CLS would hide most gradients: randomise every parameter.
  std::mt19937 rng(4);
  std::normal_distribution<float> n01;
  for (Param& p : model.params()) {
    for (int64_t i = 0; i < p.value.numel(); ++i) p.value.data<float>()[i] = 0.3f * n01(rng);
  }
  const int64_t b = 3, numel = m.channels() * m.image_size() * m.image_size();
  std::vector<float> images(b * numel);
  for (float& x : images) x = n01(rng);
  std::vector<int32_t> labels = {1, 4, 0};
  VitBatch batch;
  batch.images = images.data();
  batch.labels = labels.data();
  batch.batch = b;
  batch.global_batch = b;
  batch.step = 2;
  auto loss = [&] {
    VitOutput out;
    EXPECT_TRUE(model.Forward(batch, &out).ok());
    return out.loss_sum / b + out.aux_loss;
  };
  loss();
  model.ZeroGrads();
  model.Backward();
  std::vector<GradCheckParam> params;
  for (Param& p : model.params()) {
    params.push_back({p.name, p.value.data<float>(), p.grad.data<float>(), p.value.numel()});
  }
  GradCheckOptions opt;
  opt.max_per_param = 12;
  opt.rel_eps = 1e-3;
  opt.abs_eps = 2e-3;
  const GradCheckResult r = CheckGradients(loss, params, opt);
  EXPECT_TRUE(r.ok) << r.report << "worst: " << r.worst;
  EXPECT_GT(r.checked, 200);
}

// softmax(q k^T / sqrt(w)) v per sequence and head, in double, straight from the formula.
std::vector<double> NaiveAttention(const std::vector<float>& qkv, int64_t batch, int64_t n,
                                   int64_t heads, int64_t w) {
  const int64_t d = heads * w, ld = 3 * d;
  std::vector<double> out(batch * n * d, 0.0);
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t h = 0; h < heads; ++h) {
      auto at = [&](int64_t part, int64_t t, int64_t c) {
        return static_cast<double>(qkv[(b * n + t) * ld + part * d + h * w + c]);
      };
      for (int64_t i = 0; i < n; ++i) {
        std::vector<double> s(n);
        double mx = -1e300;
        for (int64_t j = 0; j < n; ++j) {
          double dot = 0;
          for (int64_t c = 0; c < w; ++c) dot += at(0, i, c) * at(1, j, c);
          s[j] = dot / std::sqrt(static_cast<double>(w));
          mx = std::max(mx, s[j]);
        }
        double sum = 0;
        for (double& v : s) sum += (v = std::exp(v - mx));
        for (int64_t c = 0; c < w; ++c) {
          double o = 0;
          for (int64_t j = 0; j < n; ++j) o += s[j] / sum * at(2, j, c);
          out[(b * n + i) * d + h * w + c] = o;
        }
      }
    }
  }
  return out;
}

class AttentionTest : public ::testing::TestWithParam<std::tuple<int, int, int, int>> {};

TEST_P(AttentionTest, ForwardMatchesTheFormulaAndBackwardMatchesFiniteDifferences) {
  const auto [batch, n, heads, w] = GetParam();
  const int64_t d = heads * w;
  std::mt19937 gen(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> qkv(batch * n * 3 * d), out(batch * n * d), probs(batch * heads * n * n),
      r(batch * n * d), dqkv(qkv.size());
  for (float& v : qkv) v = normal(gen);
  for (float& v : r) v = normal(gen);
  AttentionForward(qkv.data(), out.data(), probs.data(), batch, n, heads, w);
  const std::vector<double> want = NaiveAttention(qkv, batch, n, heads, w);
  for (size_t i = 0; i < out.size(); ++i) ASSERT_NEAR(out[i], want[i], 2e-5) << "at " << i;
  for (int64_t row = 0; row < batch * heads * n; ++row) {
    double sum = 0;
    for (int64_t j = 0; j < n; ++j) sum += probs[row * n + j];
    ASSERT_NEAR(sum, 1.0, 1e-5);
  }
  AttentionBackward(qkv.data(), probs.data(), r.data(), dqkv.data(), batch, n, heads, w);
  auto loss = [&] {
    AttentionForward(qkv.data(), out.data(), probs.data(), batch, n, heads, w);
    return DotDouble(out.data(), r.data(), static_cast<int64_t>(out.size()));
  };
  GradCheckOptions options;
  options.max_per_param = 200;
  const GradCheckResult result = CheckGradients(
      loss, {{"qkv", qkv.data(), dqkv.data(), static_cast<int64_t>(qkv.size())}}, options);
  EXPECT_TRUE(result.ok) << result.report;
}

// Odd sizes exercise the loop tails; (2, 50, 4, 16) is the patch-4 Fashion-MNIST shape.
INSTANTIATE_TEST_SUITE_P(Shapes, AttentionTest,
                         ::testing::Values(std::make_tuple(1, 1, 1, 4),
                                           std::make_tuple(2, 13, 3, 5),
                                           std::make_tuple(2, 50, 4, 16),
                                           std::make_tuple(1, 17, 2, 64)));

TEST(VitGradientTest, DenseModel) { CheckModelGradients(TinyModel(false, true)); }
TEST(VitGradientTest, MoeModel) { CheckModelGradients(TinyModel(true, false)); }
TEST(VitGradientTest, MoeModelWithTanhGelu) {
  ModelConfig m = TinyModel(true, true);
  m.set_gelu(ModelConfig::TANH);
  CheckModelGradients(m);
}

// A CPU table whose entries count their calls and forward to the real CPU table: the
// model's arithmetic must go through the table of its device, not kernels of its own.
const OpsTable* g_real_cpu = nullptr;
template <typename Fn, Fn OpsTable::*Entry>
struct Counted;
template <typename... A, void (*OpsTable::*Entry)(A...)>
struct Counted<void (*)(A...), Entry> {
  static std::atomic<int> calls;  // the CPU table calls some entries from several threads
  static void Call(A... a) {
    ++calls;
    (g_real_cpu->*Entry)(a...);
  }
};
template <typename... A, void (*OpsTable::*Entry)(A...)>
std::atomic<int> Counted<void (*)(A...), Entry>::calls{0};
#define MOERUN_COUNTED(entry) Counted<decltype(OpsTable::entry), &OpsTable::entry>
#define MOERUN_CALLS(entry) (MOERUN_COUNTED(entry)::calls)

TEST(VitModel, ComputesThroughTheOpsTableOfItsDevice) {
  g_real_cpu = &Ops(Device::kCPU);
  OpsTable counting = *g_real_cpu;
  counting.name = "counting-cpu";
#define MOERUN_COUNT(entry) counting.entry = &MOERUN_COUNTED(entry)::Call
  MOERUN_COUNT(gemm);
  MOERUN_COUNT(gemm_strided_batched);
  MOERUN_COUNT(expert_gemm);
  MOERUN_COUNT(router_gemm);
  MOERUN_COUNT(add_bias);
  MOERUN_COUNT(bias_backward);
  MOERUN_COUNT(add);
  MOERUN_COUNT(softmax_forward);
  MOERUN_COUNT(softmax_backward);
  MOERUN_COUNT(layer_norm_forward);
  MOERUN_COUNT(layer_norm_backward);
  MOERUN_COUNT(gelu_forward);
  MOERUN_COUNT(gelu_backward);
  MOERUN_COUNT(bias_gelu_forward);
  MOERUN_COUNT(gelu_bias_backward);
  MOERUN_COUNT(bias_gelu_forward_keep_grad);
  MOERUN_COUNT(scale_bias_backward);
  MOERUN_COUNT(attention_forward);
  MOERUN_COUNT(attention_backward);
#undef MOERUN_COUNT
  RegisterOps(Device::kCPU, &counting);
  auto self = World().Split(World().rank(), 0, "self");
  const ModelConfig m = TinyModel(true, true);
  auto groups = *MoeGroups::Create(self.get(), m.moe().num_experts());
  auto created = VitModel::Create(m, groups);
  ASSERT_TRUE(created.ok()) << created.status().message();
  VitModel& model = **created;
  model.Init(3);
  const int64_t b = 2, numel = m.channels() * m.image_size() * m.image_size();
  std::vector<float> images(b * numel, 0.25f);
  std::vector<int32_t> labels = {1, 3};
  VitBatch batch;
  batch.images = images.data();
  batch.labels = labels.data();
  batch.batch = b;
  batch.global_batch = b;
  VitOutput out;
  ASSERT_TRUE(model.Forward(batch, &out).ok());
  model.ZeroGrads();
  model.Backward();
  RegisterOps(Device::kCPU, g_real_cpu);
  // 2 blocks (1 dense, 1 MoE): patch embedding, qkv, projection, dense MLP, pre-logits,
  // head; the experts' GEMMs (6 per expert, one expert at a time: fc1 and fc2 forward, and
  // backward each one's weight and input gradients) and the router's 2 backward products;
  // the router's GEMM and softmax; the norms.
  EXPECT_GE(MOERUN_CALLS(gemm), 8);
  EXPECT_EQ(MOERUN_CALLS(expert_gemm), 6 * m.moe().num_experts() + 2);
  EXPECT_GE(MOERUN_CALLS(router_gemm), 1);
  EXPECT_GE(MOERUN_CALLS(add_bias), 6);
  EXPECT_GE(MOERUN_CALLS(bias_backward), 6);
  EXPECT_GE(MOERUN_CALLS(add), 4);
  EXPECT_GE(MOERUN_CALLS(softmax_forward), 1);
  EXPECT_GE(MOERUN_CALLS(softmax_backward), 1);
  EXPECT_EQ(MOERUN_CALLS(layer_norm_forward), 5);  // 2 per block + the final norm
  EXPECT_EQ(MOERUN_CALLS(layer_norm_backward), 5);
  EXPECT_EQ(MOERUN_CALLS(attention_forward), 2);
  EXPECT_EQ(MOERUN_CALLS(attention_backward), 2);
  // The dense MLP (one call) and the experts (one per expert: the CPU runs them one at a
  // time) apply fc1's bias and the GELU in one pass, forward and backward, keeping gelu'
  // for the backward (the CPU table has the pair).
  const int64_t experts = m.moe().num_experts();
  EXPECT_EQ(MOERUN_CALLS(bias_gelu_forward_keep_grad), 1 + experts);
  EXPECT_EQ(MOERUN_CALLS(scale_bias_backward), 1 + experts);
  EXPECT_EQ(MOERUN_CALLS(bias_gelu_forward), 0);
  EXPECT_EQ(MOERUN_CALLS(gelu_bias_backward), 0);
  EXPECT_EQ(MOERUN_CALLS(gelu_forward), 0);
  EXPECT_EQ(MOERUN_CALLS(gelu_backward), 0);
}
#undef MOERUN_CALLS
#undef MOERUN_COUNTED

// The first step grows the activation arena block by block; the next forward drops the
// last one's activations (the MoE routers' saved inputs too) before the arena's Reset, so
// that the blocks merge into one: kept alive, they would sit beside the merged block (on a
// GPU, two copies of a step's activations at once), or, if the Reset left them, stay as
// they are.
TEST(VitModel, ReleasesItsActivationsSoTheArenaSettlesIntoOneBlock) {
  auto self = World().Split(World().rank(), 0, "self");
  ModelConfig m = TinyModel(true, true);
  m.set_hidden_size(32);
  m.set_mlp_dim(64);
  auto groups = *MoeGroups::Create(self.get(), m.moe().num_experts());
  auto created = VitModel::Create(m, groups);
  ASSERT_TRUE(created.ok()) << created.status().message();
  VitModel& model = **created;
  model.Init(3);
  const int64_t b = 128, numel = m.channels() * m.image_size() * m.image_size();
  std::vector<float> images(b * numel);
  std::vector<int32_t> labels(b);
  for (int64_t i = 0; i < b * numel; ++i) images[i] = 0.01f * static_cast<float>(i % 97);
  for (int64_t i = 0; i < b; ++i) labels[i] = static_cast<int32_t>(i % 5);
  VitBatch batch;
  batch.images = images.data();
  batch.labels = labels.data();
  batch.batch = b;
  batch.global_batch = b;
  for (int step = 0; step < 3; ++step) {
    VitOutput out;
    ASSERT_TRUE(model.Forward(batch, &out).ok());
    if (step == 0) {
      ASSERT_GT(model.arena_blocks(), 1) << "the first step should outgrow the first block";
    } else {
      EXPECT_EQ(model.arena_blocks(), 1) << "step " << step;
    }
    model.ZeroGrads();
    model.Backward();
  }
}

TEST(VitModelTest, ParameterNamesAndInitIgnoreTheRankCount) {
  // Parameter values depend on (seed, name) alone: rank r's experts equal the experts of
  // the same global id in a single-rank model.
  ModelConfig m = TinyModel(true, false);
  auto self = World().Split(World().rank(), 0, "self");
  auto whole = std::move(*VitModel::Create(m, *MoeGroups::Create(self.get(), 4)));
  auto shard = std::move(*VitModel::Create(m, *MoeGroups::Create(&World(), 4)));
  whole->Init(9);
  shard->Init(9);
  std::map<std::string, const Param*> by_name;
  for (const Param& p : whole->params()) by_name[p.name] = &p;
  int experts = 0;
  for (const Param& p : shard->params()) {
    ASSERT_TRUE(by_name.count(p.name)) << p.name;
    const Param& q = *by_name[p.name];
    ASSERT_EQ(p.value.shape(), q.value.shape()) << p.name;
    for (int64_t i = 0; i < p.value.numel(); ++i) {
      ASSERT_EQ(p.value.data<float>()[i], q.value.data<float>()[i]) << p.name;
    }
    experts += p.expert;
  }
  EXPECT_EQ(by_name.count("blocks.1.mlp.experts.3.fc2.bias"), 1u);
  EXPECT_EQ(by_name.count("blocks.0.attn.qkv.weight"), 1u);
  const int p = World().size();
  EXPECT_EQ(experts, 4 * (p <= 4 ? 4 / p : 1));  // 4 tensors per local expert
}

Config TrainingConfig(int steps) {
  auto c = ParseConfig(
      "model { name: 'inv' image_size: 8 channels: 1 patch_size: 4 hidden_size: 8 mlp_dim: 16 "
      "num_layers: 2 num_heads: 2 num_classes: 4 "
      "moe { num_experts: 4 k: 2 capacity_factor: 1.0 group_size: 10 } } "
      "data { dataset: 'synthetic' synthetic_train_size: 64 synthetic_test_size: 16 } "
      "train { seed: 5 global_batch: 8 steps: " +
          std::to_string(steps) + " learning_rate: 0.003 warmup_steps: 2 }",
      "inline", {});
  EXPECT_TRUE(c.ok()) << c.status().message();
  return *c;
}

struct TrainRun {
  std::vector<double> losses, aux;
  std::map<std::string, std::vector<float>> params;
};

TrainRun Train(Communicator& comm, const Config& config) {
  const Dataset data = MakeSyntheticDataset(5, config.data().synthetic_train_size(), 1, 8, 8, 4);
  auto trainer = Trainer::Create(config, &comm, &data);
  EXPECT_TRUE(trainer.ok()) << trainer.status().message();
  TrainRun run;
  for (int s = 0; s < config.train().steps(); ++s) {
    const StepStats st = (*trainer)->Step();
    run.losses.push_back(st.loss);
    run.aux.push_back(st.aux_loss);
  }
  for (Param& p : (*trainer)->model().params()) {
    run.params[p.name].assign(p.value.data<float>(), p.value.data<float>() + p.value.numel());
  }
  return run;
}

TEST(VitTrainingTest, ExpertParallelInvariance) {
  // 5 steps of a tiny V-MoE on the same global batches with P = 1 and P = world size:
  // the same losses and parameters (routing groups are fixed at 10 tokens = 2 images).
  const Config config = TrainingConfig(5);
  auto self = World().Split(World().rank(), 0, "self");
  const TrainRun want = Train(*self, config);
  const TrainRun got = Train(World(), config);
  ASSERT_EQ(got.losses.size(), 5u);
  for (int s = 0; s < 5; ++s) {
    EXPECT_NEAR(got.losses[s], want.losses[s], 1e-5 * std::max(1.0, want.losses[s])) << s;
    EXPECT_NEAR(got.aux[s], want.aux[s], 1e-6) << s;
  }
  // Every parameter this rank holds equals the single-rank run's, to a tolerance far
  // below one optimizer step (lr 3e-3).
  for (const auto& [name, values] : got.params) {
    const auto& ref = want.params.at(name);
    // The key bias is the one exception: softmax ignores a constant added to every key,
    // so its true gradient is exactly 0 and what reaches it is float rounding noise, which
    // Adam normalises into full-size steps in both runs alike. Its q and v parts count.
    const bool qkv_bias = name.find("attn.qkv.bias") != std::string::npos;
    const size_t d = values.size() / 3;
    double worst = 0;
    for (size_t i = 0; i < values.size(); ++i) {
      if (qkv_bias && i >= d && i < 2 * d) continue;
      worst = std::max(worst, static_cast<double>(std::fabs(values[i] - ref[i])));
    }
    EXPECT_LE(worst, 2e-5) << name << " (largest |value| "
                           << *std::max_element(ref.begin(), ref.end()) << ")";
  }
  EXPECT_LT(got.losses.back(), got.losses.front());
}

// train.precision BF16: the run's GEMMs take bf16-rounded operands (the table is swapped
// for the Trainer's lifetime); it trains, repeats exactly, and differs from fp32 only by
// bf16 rounding.
TEST(VitTrainingTest, Bf16PrecisionRoundsTheGemmOperands) {
  auto self = World().Split(World().rank(), 0, "self");
  const Config fp32 = TrainingConfig(5);
  Config bf16 = fp32;
  bf16.mutable_train()->set_precision(TrainConfig::BF16);
  const TrainRun want = Train(*self, fp32);
  EXPECT_STREQ(Ops(Device::kCPU).name, "cpu");
  const TrainRun got = Train(*self, bf16);
  EXPECT_STREQ(Ops(Device::kCPU).name, "cpu") << "the Trainer restores fp32 GEMMs";
  const TrainRun again = Train(*self, bf16);
  EXPECT_EQ(got.losses, again.losses) << "bf16 runs are deterministic";
  EXPECT_NE(got.losses, want.losses) << "bf16 rounding changed nothing";
  for (int s = 0; s < 5; ++s) {
    EXPECT_TRUE(std::isfinite(got.losses[s]));
    EXPECT_NEAR(got.losses[s], want.losses[s], 0.02 * want.losses[s]) << s;
  }
  EXPECT_LT(got.losses.back(), got.losses.front());
  {
    const Dataset data = MakeSyntheticDataset(5, 64, 1, 8, 8, 4);
    auto trainer = Trainer::Create(bf16, self.get(), &data);
    ASSERT_TRUE(trainer.ok());
    EXPECT_STREQ(Ops(Device::kCPU).name, "cpu-bf16");
  }
  EXPECT_STREQ(Ops(Device::kCPU).name, "cpu");
}

TEST(VitTrainingTest, OverfitsASmallBatch) {
  Config config = TrainingConfig(150);
  config.mutable_data()->set_synthetic_train_size(8);  // every step sees the same 8 images
  config.mutable_train()->set_learning_rate(0.01);
  config.mutable_train()->set_weight_decay(0);
  config.mutable_model()->mutable_moe()->set_capacity_factor(2.0);
  const TrainRun run = Train(World(), config);
  EXPECT_LT(run.losses.back(), 0.05) << "first " << run.losses.front();
}

// The one parameter description: every rank's model registers exactly the ParamSpecs it
// holds (ExpertHolders), in order, with the same shapes and decay flags.
TEST(VitModel, ParametersAreTheSpecsThisRankHolds) {
  for (bool pre_logits : {false, true}) {
    ModelConfig m = TinyModel(true, pre_logits);
    m.mutable_moe()->set_num_experts(World().size() <= 4 ? 4 : World().size());
    auto groups = MoeGroups::Create(&World(), m.moe().num_experts());
    ASSERT_TRUE(groups.ok());
    auto model = VitModel::Create(m, *groups);
    ASSERT_TRUE(model.ok());
    std::vector<ParamSpec> mine;
    for (const ParamSpec& p : ParamSpecs(m)) {
      if (p.expert < 0) {
        mine.push_back(p);
        continue;
      }
      const std::vector<int> h = ExpertHolders(m.moe().num_experts(), World().size(), p.expert);
      if (std::find(h.begin(), h.end(), World().rank()) != h.end()) mine.push_back(p);
    }
    const std::vector<Param>& params = (*model)->params();
    ASSERT_EQ(params.size(), mine.size());
    int64_t total = 0;
    for (size_t i = 0; i < mine.size(); ++i) {
      EXPECT_EQ(params[i].name, mine[i].name);
      EXPECT_EQ(params[i].value.shape(), mine[i].shape) << mine[i].name;
      EXPECT_EQ(params[i].decay, mine[i].decay) << mine[i].name;
      EXPECT_EQ(params[i].expert, mine[i].expert >= 0) << mine[i].name;
    }
    for (const ParamSpec& p : ParamSpecs(m)) total += NumElements(p.shape);
    EXPECT_EQ(total, CountParameters(m).total);
  }
}

}  // namespace
}  // namespace moerun
