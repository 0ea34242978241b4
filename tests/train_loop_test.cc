// The training loop library (runtime/train_loop.h) under mpirun -np 1, 2: a run split by
// until_step equals a straight one, the stop hook saves at a step boundary, defaults.
#include "runtime/train_loop.h"

#include <gtest/gtest.h>
#include <unistd.h>

#include <csignal>
#include <cstring>
#include <filesystem>

#include "runtime/checkpoint.h"
#include "runtime/config.h"
#include "tests/mpi_test_main.h"

namespace moerun {
namespace {

namespace fs = std::filesystem;
using testing::World;

std::string SharedTempDir() { return testing::SharedTempDir("moerun-loop"); }

Config Tiny(const std::string& out, int steps) {
  auto c = LoadConfig(
      std::string(MOERUN_SOURCE_DIR) + "/configs/tiny_test.pbtxt",
      {"train.steps=" + std::to_string(steps), "train.out_dir=" + out, "train.eval_every=0",
       "data.synthetic_test_size=64", "train.eval_batch=64", "train.log_every=1"});
  CHECK(c.ok()) << c.status().message();
  return *c;
}

TEST(TrainLoop, DefaultsAndData) {
  Config c = Tiny("", 5);
  c.mutable_train()->clear_out_dir();
  EXPECT_EQ(RunOutDir(c), "runs/tiny_test");
  EXPECT_EQ(RunCheckpointDir(c), "runs/tiny_test/checkpoints");
  c.mutable_train()->set_checkpoint_dir("/x/y");
  EXPECT_EQ(RunCheckpointDir(c), "/x/y");
  auto train = LoadRunData(c, true), test = LoadRunData(c, false);
  ASSERT_TRUE(train.ok() && test.ok());
  EXPECT_EQ(train->size, c.data().synthetic_train_size());
  EXPECT_EQ(test->size, c.data().synthetic_test_size());
}

TEST(TrainLoop, SplitRunEqualsStraightRun) {
  const std::string dir = SharedTempDir();
  TrainLoopResult a = RunTrainingLoop(Tiny(dir + "/a", 6), World(), {});
  ASSERT_EQ(a.exit_code, 0) << a.error;
  TrainLoopResult b1 = RunTrainingLoop(Tiny(dir + "/b", 6), World(), {3});
  ASSERT_EQ(b1.exit_code, 0) << b1.error;
  TrainLoopResult b2 = RunTrainingLoop(Tiny(dir + "/b", 6), World(), {});
  ASSERT_EQ(b2.exit_code, 0) << b2.error;
  if (World().rank() == 0) {
    EXPECT_EQ(b1.final_line["steps"], 3);
    EXPECT_EQ(b2.final_line["resumed_from_step"], 3);
    EXPECT_EQ(b2.final_line["steps_this_run"], 3);
    EXPECT_EQ(a.final_line["test_loss"], b2.final_line["test_loss"]);  // bitwise, as doubles
  }
  auto ma = ReadManifest(dir + "/a/checkpoints/step_00000006");
  auto mb = ReadManifest(dir + "/b/checkpoints/step_00000006");
  ASSERT_TRUE(ma.ok() && mb.ok());
  for (const CheckpointTensor& t : ma->tensors()) {
    auto x = LoadTensor(dir + "/a/checkpoints/step_00000006", *ma, t.name());
    auto y = LoadTensor(dir + "/b/checkpoints/step_00000006", *mb, t.name());
    ASSERT_TRUE(x.ok() && y.ok());
    ASSERT_EQ(std::memcmp(x->raw_data(), y->raw_data(), x->nbytes()), 0) << t.name();
  }
  World().Barrier();
  if (World().rank() == 0) fs::remove_all(dir);
}

TEST(TrainLoop, StopRequestSavesAtAStepBoundary) {
  const std::string dir = SharedTempDir();
  RequestStop(SIGUSR1);
  TrainLoopResult r = RunTrainingLoop(Tiny(dir + "/s", 100), World(), {});
  RequestStop(0);
  EXPECT_EQ(r.exit_code, 1);
  if (World().rank() == 0) {
    EXPECT_EQ(r.final_line["interrupted"], true);
    EXPECT_EQ(r.final_line["signal"], "SIGUSR1");
  }
  auto latest = LatestCheckpoint(dir + "/s/checkpoints");
  ASSERT_TRUE(latest.ok());
  EXPECT_EQ(*latest, dir + "/s/checkpoints/step_00000000");
  // A second run resumes from it and finishes.
  TrainLoopResult again = RunTrainingLoop(Tiny(dir + "/s", 4), World(), {});
  EXPECT_EQ(again.exit_code, 0) << again.error;
  World().Barrier();
  if (World().rank() == 0) fs::remove_all(dir);
}

TEST(TrainLoop, BadResumePathIsAConfigError) {
  const std::string dir = SharedTempDir();
  Config c = Tiny(dir + "/run", 5);
  c.mutable_train()->set_resume("/nonexistent/checkpoint");
  TrainLoopResult r = RunTrainingLoop(c, World(), {});
  EXPECT_EQ(r.exit_code, 2);
  EXPECT_NE(r.error.find("/nonexistent/checkpoint: no such checkpoint directory"),
            std::string::npos)
      << r.error;
  EXPECT_FALSE(fs::exists(dir + "/run")) << "a refused run writes nothing";
  World().Barrier();
  if (World().rank() == 0) fs::remove_all(dir);
}

}  // namespace
}  // namespace moerun
