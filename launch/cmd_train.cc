// moerun train and moerun eval: thin wrappers of the training loop (runtime/train_loop.h).
#include <google/protobuf/text_format.h>
#include <mpi.h>

#include <cmath>
#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <numeric>
#include <sstream>

#include "launch/commands.h"
#include "model/vit_spec.h"
#include "runtime/checkpoint.h"
#include "runtime/config.h"
#include "runtime/kernels.h"
#include "runtime/safetensors.h"
#include "runtime/train_loop.h"
#include "runtime/trainer.h"

namespace moerun {
namespace {

// Loads parameters from a checkpoint directory (or a run's checkpoint root with LATEST) or
// from one exported safetensors file (`moerun export`), checking the stored model config.
Status LoadModel(Trainer& trainer, const Config& config, const std::string& path) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec)) {
    auto dir = ResolveCheckpoint(path);
    if (!dir.ok()) return dir.status();
    auto manifest = ReadManifest(*dir);
    if (!manifest.ok()) return manifest.status();
    return trainer.Restore(*dir, *manifest, /*parameters_only=*/true);
  }
  auto reader = SafetensorsReader::Open(path);
  if (!reader.ok()) return reader.status();
  const auto stored = reader->metadata().find("moerun_config");
  if (stored != reader->metadata().end()) {
    CheckpointManifest m;
    m.set_config(stored->second);
    MOERUN_RETURN_IF_ERROR(CheckSameModel(m, config));
  }
  for (Param& p : trainer.params()) {
    auto t = reader->Get(p.name, DType::kF32, p.value.shape());
    if (!t.ok()) {
      return Status::Error(t.status().message() + " (was the model trained with this config?)");
    }
    p.value.CopyFrom(*t);
  }
  return Status::Ok();
}

}  // namespace

int RunTrain(const Config& config, Session& session, int64_t until_step) {
  session.ApplyConfigWatchdog(config.comm().watchdog_timeout_s());
  TrainLoopOptions options;
  options.until_step = until_step;
  options.device = session.device();
  options.device_world = session.device_world();
  const TrainLoopResult r = RunTrainingLoop(config, session.world(), options);
  if (r.exit_code != 0 && !r.error.empty()) PrintError("moerun train", r.error);
  if (session.is_root() && !r.final_line.is_null()) PrintJsonLine(r.final_line);
  return r.exit_code;
}

int RunEval(const Config& config, Session& session, const std::string& model_path,
            const std::vector<double>& capacity_factors, const std::vector<int>& bprs,
            bool exact_capacity) {
  Communicator& world = session.world();
  StatusOr<Dataset> test = LoadRunData(config, false);
  Status ok = AgreeOnStatus(world, test.status());
  if (!ok.ok()) {
    PrintError("moerun eval", ok.message());
    return kExitFailure;
  }
  Config c = config;
  // A training batch of whole routing groups per rank, as Evaluate's (only Trainer::Create
  // checks it).
  const int64_t p = world.size();
  c.mutable_train()->set_global_batch(static_cast<int32_t>(std::min<int64_t>(
      test->size / p * p,
      EvalImagesPerRank(config.model(), static_cast<int>(p), config.train().eval_batch()) * p)));
  auto created = Trainer::Create(c, &world, &*test, session.device(), session.device_world());
  ok = AgreeOnStatus(world, created.status());
  if (!ok.ok()) {
    PrintError("moerun eval", ok.message());
    return kExitUsage;
  }
  Trainer& trainer = **created;
  ok = AgreeOnStatus(world, LoadModel(trainer, config, model_path));
  if (!ok.ok()) {
    PrintError("moerun eval", ok.message());
    return kExitUsage;
  }
  const std::string bad = trainer.FirstNonFiniteParameter();
  ok = AgreeOnStatus(world, bad.empty() ? Status::Ok()
                                        : Status::Error(model_path + ": parameter '" + bad +
                                                        "' is not finite; nothing evaluated"));
  if (!ok.ok()) {
    PrintError("moerun eval", ok.message());
    return kExitFailure;
  }
  for (int bpr : bprs) {
    for (double cf : capacity_factors) {
      const EvalStats e =
          trainer.Evaluate(*test, config.train().eval_batch(), {cf, bpr, exact_capacity});
      if (!std::isfinite(e.loss)) {
        PrintError("moerun eval", "the test loss is not finite (capacity factor " +
                                      std::to_string(cf) + ", bpr " + std::to_string(bpr) + ")");
        return kExitFailure;
      }
      if (!session.is_root()) continue;
      nlohmann::json j = {{"event", "eval"},
                          {"model", model_path},
                          {"bpr", bpr},
                          {"test_accuracy", e.accuracy},
                          {"test_loss", e.loss},
                          {"examples", e.examples},
                          {"dropped_fraction", e.dropped_fraction}};
      if (cf >= 0) j["capacity_factor"] = cf;
      j["parameters"] = CountParameters(config.model()).total;
      if (!e.tasks.empty()) j["tasks"] = TasksJson(e.tasks);
      if (exact_capacity) j["exact_capacity"] = true;
      PrintJsonLine(j);
    }
  }
  return kExitOk;
}

}  // namespace moerun
