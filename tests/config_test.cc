// Config parsing, overrides and validation errors; model shape arithmetic against the
// parameter table of shared/specs/models.md.
#include "runtime/config.h"

#include <gtest/gtest.h>

#include <string>

#include "model/vit_spec.h"

namespace moerun {
namespace {

const std::string kConfigs = std::string(MOERUN_SOURCE_DIR) + "/configs/";

TEST(ConfigTest, UnknownFieldNamesFileLineAndField) {
  const auto c = ParseConfig("model {\n  hiden_size: 3\n}\n", "my.pbtxt", {});
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("my.pbtxt:2:"), std::string::npos) << c.status().message();
  EXPECT_NE(c.status().message().find("hiden_size"), std::string::npos);
}

TEST(ConfigTest, SyntaxErrorNamesLine) {
  const auto c = ParseConfig("train {\n  steps: 10\n  learning_rate: abc\n}\n", "x.pbtxt", {});
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("x.pbtxt:3:"), std::string::npos) << c.status().message();
}

TEST(ConfigTest, InvalidValueNamesWhereItWasSet) {
  const auto c = ParseConfig(
      "model {\n  num_layers: 4\n  moe {\n    num_experts: 4\n    k: 5\n  }\n}\n", "bad.pbtxt", {});
  ASSERT_FALSE(c.ok());
  const std::string& m = c.status().message();
  EXPECT_NE(m.find("bad.pbtxt:5:5: model.moe.k: 5 must be between 1 and num_experts (4)"),
            std::string::npos)
      << m;
}

TEST(ConfigTest, ReportsEveryInvalidField) {
  const auto c = ParseConfig("train { steps: 0 global_batch: -1 }", "t.pbtxt", {});
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("train.steps"), std::string::npos);
  EXPECT_NE(c.status().message().find("train.global_batch"), std::string::npos);
}

TEST(ConfigTest, CapacityAndCapacityFactorAreExclusive) {
  const auto c = ParseConfig("model { moe { capacity: 4 capacity_factor: 1.0 } }", "c.pbtxt", {});
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("not both"), std::string::npos);
}

TEST(ConfigTest, OverridesApplyInOrderAndNameTheirSource) {
  const auto c = ParseConfig("train { steps: 10 }", "o.pbtxt",
                             {"train.steps=20", "model.moe.bpr=false", "data.dataset=synthetic"});
  ASSERT_TRUE(c.ok()) << c.status().message();
  EXPECT_EQ(c->train().steps(), 20);
  EXPECT_FALSE(c->model().moe().bpr());
  EXPECT_EQ(c->data().dataset(), "synthetic");

  const auto bad = ParseConfig("", "o.pbtxt", {"train.steps=0"});
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("--override 'train.steps=0': train.steps"),
            std::string::npos)
      << bad.status().message();
}

TEST(ConfigTest, BadOverridesSayWhatWouldWork) {
  auto c = ParseConfig("", "o.pbtxt", {"train.stepz=3"});
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("has no field 'stepz'"), std::string::npos);
  EXPECT_NE(c.status().message().find("steps"), std::string::npos);  // lists the fields
  c = ParseConfig("", "o.pbtxt", {"train.steps"});
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("key=value"), std::string::npos);
  c = ParseConfig("", "o.pbtxt", {"train.steps=many"});
  ASSERT_FALSE(c.ok());
  c = ParseConfig("", "o.pbtxt", {"model=3"});
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("is a section"), std::string::npos);
}

TEST(ConfigTest, MissingFileSaysSo) {
  const auto c = LoadConfig("/nonexistent/x.pbtxt", {});
  ASSERT_FALSE(c.ok());
  EXPECT_NE(c.status().message().find("cannot read config '/nonexistent/x.pbtxt'"),
            std::string::npos);
}

TEST(ConfigTest, EveryShippedConfigLoads) {
  for (const char* name : {"tiny_test", "vmoe_s32_every2", "vmoe_b16_every2", "vmoe_l16_every2",
                           "vmoe_h14_every2", "vmoe_h14_last5", "vmoe_15b_every2"}) {
    const auto c = LoadConfig(kConfigs + name + ".pbtxt", {});
    EXPECT_TRUE(c.ok()) << name << ": " << c.status().message();
  }
}

// Exact totals from the table in shared/specs/models.md.
TEST(VitSpecTest, ParameterCountsEqualTheModelsTable) {
  const std::pair<const char*, int64_t> table[] = {
      {"vmoe_s32_every2", 296895347},  {"vmoe_b16_every2", 978974835},
      {"vmoe_l16_every2", 3445959539}, {"vmoe_h14_every2", 7160836211},
      {"vmoe_h14_last5", 2688648051},  {"vmoe_15b_every2", 14705071769}};
  for (const auto& [name, total] : table) {
    const auto c = LoadConfig(kConfigs + name + ".pbtxt", {});
    ASSERT_TRUE(c.ok()) << c.status().message();
    EXPECT_EQ(CountParameters(c->model()).total, total) << name;
  }
}

TEST(VitSpecTest, FifteenBillionSplitIntoDenseAndExperts) {
  // models.md: dense 857,872,025 and experts 13,847,199,744 for the 15B model.
  const auto c = LoadConfig(kConfigs + "vmoe_15b_every2.pbtxt", {});
  ASSERT_TRUE(c.ok());
  const ParameterCounts p = CountParameters(c->model());
  EXPECT_EQ(p.dense, 857872025);
  EXPECT_EQ(p.expert, 13847199744);
  EXPECT_EQ(p.moe_layers, 24);
}

TEST(VitSpecTest, MoePlacement) {
  ModelConfig m;
  m.set_num_layers(8);
  m.mutable_moe()->set_every_n(2);
  EXPECT_EQ(MoeBlocks(m), (std::vector<int>{1, 3, 5, 7}));
  m.mutable_moe()->set_placement(MoeConfig::LAST);
  m.mutable_moe()->set_last_n(2);
  EXPECT_EQ(MoeBlocks(m), (std::vector<int>{5, 7}));
  m.set_num_layers(32);
  m.mutable_moe()->set_last_n(5);
  EXPECT_EQ(MoeBlocks(m), (std::vector<int>{23, 25, 27, 29, 31}));
  m.clear_moe();
  EXPECT_TRUE(MoeBlocks(m).empty());
}

TEST(VitSpecTest, ExpertPlacementAcceptsDivisorsAndMultiples) {
  EXPECT_EQ(PlaceExperts(32, 4)->experts_per_rank, 8);
  EXPECT_EQ(PlaceExperts(4, 8)->replicas, 2);
  EXPECT_EQ(PlaceExperts(4, 8)->experts_per_rank, 1);
  const auto bad = PlaceExperts(8, 3);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.status().message().find("1, 2, 4, 8, 16, 24, 32"), std::string::npos)
      << bad.status().message();
}

}  // namespace
}  // namespace moerun
