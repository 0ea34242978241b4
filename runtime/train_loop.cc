// The training loop: resume, steps, logging, evaluation, checkpoints, stop signals.
#include "runtime/train_loop.h"

#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <csignal>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <sstream>
#include <thread>

#include "model/vit_spec.h"
#include "runtime/checkpoint.h"
#include "runtime/kernels.h"
#include "runtime/process.h"
#include "runtime/trainer.h"
#include "runtime/usage.h"

namespace moerun {
namespace fs = std::filesystem;

namespace {

volatile std::sig_atomic_t g_stop_signal = 0;
void OnStopSignal(int signal) { g_stop_signal = signal; }

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

std::string Duration(double s) {
  std::ostringstream o;
  const int64_t t = static_cast<int64_t>(s + 0.5);
  if (t >= 3600) o << t / 3600 << "h";
  if (t >= 60) o << (t % 3600) / 60 << "m";
  o << t % 60 << "s";
  return o.str();
}

std::string SignalName(int s) {
  switch (s) {
    case SIGINT:
      return "SIGINT";
    case SIGTERM:
      return "SIGTERM";
    case SIGUSR1:
      return "SIGUSR1";
    default:
      return "signal " + std::to_string(s);
  }
}

// The MoE layers' names, in StepStats order: V-MoE "blocks.B.mlp"; Mod-Squad the
// attention layers (even blocks, "blocks.B.attn") then the MLP layers (odd blocks).
std::vector<std::string> MoeLayerNames(const ModelConfig& m) {
  std::vector<std::string> names;
  if (m.has_modsquad()) {
    if (!m.modsquad().moe()) return names;
    for (int b = 0; b < m.num_layers(); b += 2)
      names.push_back("blocks." + std::to_string(b) + ".attn");
    for (int b = 1; b < m.num_layers(); b += 2)
      names.push_back("blocks." + std::to_string(b) + ".mlp");
    return names;
  }
  for (int b : MoeBlocks(m)) names.push_back("blocks." + std::to_string(b) + ".mlp");
  return names;
}

nlohmann::json MoeJson(const ModelConfig& m, const StepStats& st) {
  nlohmann::json layers = nlohmann::json::array();
  const std::vector<std::string> names = MoeLayerNames(m);
  for (size_t i = 0; i < st.moe.size(); ++i) {
    nlohmann::json layer = {{"layer", names[i]},
                            {"capacity", st.moe[i].capacity},
                            {"dropped_fraction", st.moe[i].dropped_fraction},
                            {"tokens_per_expert", st.moe[i].tokens_per_expert}};
    if (!m.has_modsquad()) layer["block"] = MoeBlocks(m)[i];
    for (const AuxTerm& t : st.moe_losses[i].terms) layer[t.name + "_loss"] = t.value;
    layers.push_back(layer);
  }
  return layers;
}

// "class 81.2%  segmentation mIoU 0.812  edges L1 0.0841".
std::string TasksLine(const std::vector<TaskStat>& tasks) {
  std::ostringstream o;
  o << std::fixed;
  for (const TaskStat& t : tasks) {
    if (t.metric == "accuracy") {
      o << "  " << t.name << " " << std::setprecision(1) << 100 * t.value << "%";
    } else if (t.metric == "miou") {
      o << "  " << t.name << " mIoU " << std::setprecision(3) << t.value;
    } else {
      o << "  " << t.name << " L1 " << std::setprecision(4) << t.value;
    }
  }
  return o.str();
}

// The test hook MOERUN_TEST_SAVE_PAUSE="STEP:SECONDS": every rank pauses that long after
// writing its shard of the checkpoint of step STEP (any step when STEP is -1), before the
// commit.
double TestPauseFor(int64_t step) {
  const char* v = std::getenv("MOERUN_TEST_SAVE_PAUSE");
  long long s = -1;
  double seconds = 0;
  if (v != nullptr && std::sscanf(v, "%lld:%lf", &s, &seconds) == 2 && (s == step || s < 0)) {
    return seconds;
  }
  return 0;
}

// Keeps the metrics lines of steps up to `step` (a resumed run continues the file without
// the lines of steps it will redo) and drops earlier "final" lines.
void TruncateMetrics(const std::string& path, int64_t step) {
  std::ifstream in(path);
  if (!in) return;
  std::ostringstream kept;
  for (std::string line; std::getline(in, line);) {
    auto j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.is_object()) continue;
    if (j.value("event", "") == "final") continue;
    if (j.contains("step") && j["step"].is_number() && j["step"].get<int64_t>() > step) continue;
    kept << line << "\n";
  }
  in.close();
  WriteFileAtomically(path, kept.str());
}

}  // namespace

void InstallStopSignalHandlers() {
  std::signal(SIGINT, OnStopSignal);
  std::signal(SIGTERM, OnStopSignal);
  std::signal(SIGUSR1, OnStopSignal);
}
int StopSignal() { return g_stop_signal; }
void RequestStop(int signal) { g_stop_signal = signal; }

nlohmann::json TasksJson(const std::vector<TaskStat>& tasks) {
  nlohmann::json j = nlohmann::json::object();
  for (const TaskStat& t : tasks) j[t.name] = {{"loss", t.loss}, {t.metric, t.value}};
  return j;
}

Status WriteTrainerUsageReport(Trainer& trainer, const std::string& dir, double* entropy) {
  ModSquadModel& model = trainer.modsquad();
  std::vector<std::pair<std::string, Tensor>> ema;
  for (Param& b : model.buffers()) ema.push_back({b.name, b.value});
  const std::vector<LayerUsage> layers = UsageFromBuffers(model.config(), ema);
  *entropy = MeanTaskEntropy(layers);
  return WriteUsageReport(model.config(), layers, dir, nullptr);
}

StatusOr<Dataset> LoadRunData(const Config& c, bool train) {
  const DataConfig& d = c.data();
  AllocationLabel label(std::string("the ") + (train ? "training" : "test") + " data (" +
                        d.dataset() + ")");
  if (d.dataset() == "synthetic") {
    // One synthetic set (the same class templates) cut into train and test examples.
    const ModelConfig& m = c.model();
    const int64_t n_train = d.synthetic_train_size(), n_test = d.synthetic_test_size();
    Dataset all =
        MakeSyntheticDataset(c.train().seed(), n_train + n_test, m.channels(), m.image_size(),
                             m.image_size(), std::min(10, m.num_classes()));
    const int64_t first = train ? 0 : n_train, count = train ? n_train : n_test;
    const int64_t numel = all.image_numel();
    all.images.erase(all.images.begin() + (first + count) * numel, all.images.end());
    all.images.erase(all.images.begin(), all.images.begin() + first * numel);
    all.labels.erase(all.labels.begin() + first + count, all.labels.end());
    all.labels.erase(all.labels.begin(), all.labels.begin() + first);
    all.size = count;
    return all;
  }
  return LoadFashionMnist(d.dir(), train);
}

std::string RunOutDir(const Config& c) {
  return c.train().out_dir().empty() ? "runs/" + c.model().name() : c.train().out_dir();
}

std::string RunCheckpointDir(const Config& c) {
  return c.train().checkpoint_dir().empty() ? RunOutDir(c) + "/checkpoints"
                                            : c.train().checkpoint_dir();
}

TrainLoopResult RunTrainingLoop(const Config& config, Communicator& world,
                                const TrainLoopOptions& options) {
  TrainLoopResult result;
  const bool root = world.rank() == 0;
  // First: a stop signal that arrives while data loads is kept, not fatal.
  InstallStopSignalHandlers();
  auto fail = [&](int code, const std::string& error) {
    result.exit_code = code;
    result.error = error;
    return result;
  };
  StatusOr<Dataset> train = LoadRunData(config, true);
  StatusOr<Dataset> test = train.ok() ? LoadRunData(config, false) : train.status();
  Status ok = AgreeOnStatus(world, test.status());
  if (!ok.ok()) return fail(1, ok.message());
  auto created = Trainer::Create(config, &world, &*train, options.device, options.device_world);
  ok = AgreeOnStatus(world, created.status());
  if (!ok.ok()) return fail(2, ok.message());
  Trainer& trainer = **created;
  const TrainConfig& tc = config.train();
  const std::string out_dir = RunOutDir(config), ckpt_dir = RunCheckpointDir(config);
  const std::string metrics_path =
      tc.metrics_path().empty() ? out_dir + "/metrics.jsonl" : tc.metrics_path();
  const int64_t last_step =
      options.until_step > 0 ? std::min<int64_t>(options.until_step, tc.steps()) : tc.steps();

  // Leftovers of crashed saves go first.
  if (root) {
    for (const std::string& name : RemoveUncommitted(ckpt_dir)) {
      LOG(WARNING) << "removed " << ckpt_dir << "/" << name
                   << ": an unfinished checkpoint (no manifest) of an earlier run";
    }
  }
  world.Barrier();
  std::string resume_from;
  Status found;
  if (tc.resume() == "auto") {
    auto latest = LatestCheckpoint(ckpt_dir);
    if (latest.ok()) {
      resume_from = *latest;
      const std::vector<std::string> committed = ListCheckpoints(ckpt_dir);
      if (resume_from.empty() && !committed.empty()) {
        // LATEST lost (deleted by hand?): the newest committed checkpoint is as good.
        resume_from = ckpt_dir + "/" + committed.back();
        if (root) LOG(WARNING) << ckpt_dir << " has no LATEST file; using " << committed.back();
      }
    } else {
      found = latest.status();
    }
  } else if (tc.resume() == "never") {
    const std::vector<std::string> existing = ListCheckpoints(ckpt_dir);
    if (!existing.empty()) {
      found = Status::Error("--resume never, but " + ckpt_dir + " already holds checkpoints " +
                            "(newest " + existing.back() +
                            "): use --resume auto to continue that run, or another "
                            "--checkpoint-dir (or delete it) to start over");
    }
  } else {
    auto resolved = ResolveCheckpoint(tc.resume());
    if (resolved.ok()) {
      resume_from = *resolved;
    } else {
      found = resolved.status();
    }
  }
  ok = AgreeOnStatus(world, found);
  if (!ok.ok()) return fail(2, ok.message());
  int64_t resumed_step = -1;
  if (!resume_from.empty()) {
    auto manifest = ReadManifest(resume_from);
    Status loaded = manifest.ok() ? trainer.Restore(resume_from, *manifest) : manifest.status();
    ok = AgreeOnStatus(world, loaded);
    if (!ok.ok()) return fail(2, "cannot resume from " + resume_from + ": " + ok.message());
    resumed_step = trainer.step();
    if (root && manifest->data().global_batch() != tc.global_batch()) {
      LOG(WARNING) << "the checkpoint was trained with train.global_batch "
                   << manifest->data().global_batch() << ", this run uses " << tc.global_batch()
                   << ": the data order from here on is not the one the first run would have seen";
    }
    if (root && manifest->data().shuffle_seed() != tc.seed()) {
      LOG(WARNING) << "the checkpoint was trained with train.seed "
                   << manifest->data().shuffle_seed() << ", this run uses " << tc.seed();
    }
    if (root) {
      LOG(INFO) << "resuming from " << resume_from << " (step " << manifest->step()
                << ", written by " << manifest->world_size() << " rank(s), now " << world.size()
                << "; " << (manifest->optimizer_state() ? "with" : "fresh") << " optimizer state)";
    }
  }

  // Everything the run writes must be writable before any work (a read-only checkpoint
  // directory found after hours of training loses them).
  Status writable;
  if (root) {
    std::error_code ec;
    fs::create_directories(ckpt_dir, ec);
    const std::string probe = ckpt_dir + "/.moerun-write-test";
    writable =
        ec ? Status::Error("cannot create checkpoint directory " + ckpt_dir + ": " + ec.message())
           : WriteFileAtomically(probe, "ok\n");
    fs::remove(probe, ec);
  }
  ok = AgreeOnStatus(world, writable);
  if (!ok.ok()) return fail(1, ok.message() + " (set train.checkpoint_dir / --checkpoint-dir)");

  std::ofstream metrics;
  if (root) {
    std::error_code ec;
    fs::create_directories(out_dir, ec);
    if (!fs::path(metrics_path).parent_path().empty()) {
      fs::create_directories(fs::path(metrics_path).parent_path(), ec);
    }
    if (resumed_step >= 0) TruncateMetrics(metrics_path, resumed_step);
    metrics.open(metrics_path, resumed_step >= 0 ? std::ios::app : std::ios::trunc);
  }
  ok = AgreeOnStatus(
      world, !root || metrics ? Status::Ok()
                              : Status::Error("cannot write metrics file '" + metrics_path + "'"));
  if (!ok.ok()) return fail(1, ok.message());
  bool metrics_failed = false;
  auto emit = [&](const nlohmann::json& j) {
    if (!root || metrics_failed) return;
    metrics << j.dump() << "\n" << std::flush;
    if (!metrics) {
      metrics_failed = true;
      LOG(ERROR) << "cannot write metrics file '" << metrics_path << "': " << std::strerror(errno);
    }
  };
  const int64_t params = CountParameters(config.model()).total;
  if (root) {
    LOG(INFO) << "train: " << config.model().name() << ", " << params << " parameters, "
              << world.size() << " rank(s) x " << NumThreads() << " thread(s), global batch "
              << tc.global_batch() << ", " << tc.steps() << " steps (" << std::fixed
              << std::setprecision(2)
              << static_cast<double>(tc.steps()) / trainer.sampler().steps_per_epoch()
              << " epochs of " << train->size << " images); metrics: " << metrics_path
              << "; checkpoints: " << ckpt_dir;
  }

  // Checkpoints.
  SaveOptions save_options;
  save_options.keep = tc.keep_checkpoints();
  int64_t last_saved = resumed_step;  // that step is on disk already
  double last_save_time = Now();
  std::string last_checkpoint = resume_from;
  AsyncCheckpointer background(world, ckpt_dir, save_options);
  double save_stall_s = 0;
  int saves = 0;
  auto report = [&](const SaveResult& r, bool async) {
    last_checkpoint = r.path;
    if (root) {
      LOG(INFO) << "checkpoint " << r.path << " committed (" << r.total_bytes << " bytes over "
                << world.size() << " rank(s), " << std::fixed << std::setprecision(2) << r.seconds
                << " s" << (async ? " in the background)" : ")");
      for (const std::string& gone : r.removed) LOG(INFO) << "removed old checkpoint " << gone;
    }
    emit({{"event", "checkpoint"},
          {"step", r.step},
          {"path", r.path},
          {"bytes", r.total_bytes},
          {"seconds", r.seconds},
          {"async", async}});
  };
  // Moves a background save on (collective, at step boundaries); `wait`: to its commit.
  // `all_ready`: every rank's part of the current stage is done (agreed by the caller).
  auto advance_background = [&](bool all_ready, bool wait = false) -> Status {
    std::vector<SaveResult> done;
    const double t0 = Now();
    Status s = wait ? background.Finish(&done) : background.Poll(all_ready, &done);
    save_stall_s += Now() - t0;
    for (const SaveResult& r : done) report(r, true);
    return s;
  };
  // Saves the current state (collective). `async`: snapshot now, write in the background.
  auto save = [&](bool async) -> Status {
    const int64_t step = trainer.step();
    if (step == last_saved) return Status::Ok();
    if (!async) MOERUN_RETURN_IF_ERROR(advance_background(true, true));
    const std::string bad = trainer.FirstNonFiniteParameter();
    MOERUN_RETURN_IF_ERROR(AgreeOnStatus(
        world, bad.empty() ? Status::Ok()
                           : Status::Error("parameter '" + bad + "' is not finite at step " +
                                           std::to_string(step) + "; nothing saved")));
    const double t0 = Now();
    CheckpointManifest manifest = trainer.StateManifest();
    save_options.pause_after_shard_s = TestPauseFor(step);
    last_saved = step;
    last_save_time = Now();
    ++saves;
    if (async) {
      Status s = background.Start(manifest, trainer.StateSlices(true));
      save_stall_s += Now() - t0;
      return s;  // a save Start had to commit first is reported by the next Poll
    }
    SaveResult r;
    Status s =
        SaveCheckpoint(world, ckpt_dir, manifest, trainer.StateSlices(true), save_options, &r);
    save_stall_s += Now() - t0;
    if (!s.ok()) return s;
    report(r, false);
    return Status::Ok();
  };
  // A failed save: stop (the default) or go on.
  auto save_failed = [&](const Status& s) {
    if (root) LOG(ERROR) << s.message();
    return tc.on_checkpoint_error() == "stop";
  };

  const double start = Now();
  double window_start = start;
  int64_t window_images = 0, steps_run = 0;
  double dropped_sum = 0;  // per step: the mean over MoE layers and choices
  EvalStats last_eval;
  int stopped_by = 0;
  const int64_t steps_per_epoch = trainer.sampler().steps_per_epoch();
  while (trainer.step() < last_step) {
    // Agreed at every step boundary: a stop signal on any rank, a time-based save due by
    // rank 0's clock, a metrics write error.
    // And whether some rank's part of a background save is still running.
    int32_t flags[4] = {static_cast<int32_t>(StopSignal()), 0, background.local_ready() ? 0 : 1,
                        metrics_failed ? 1 : 0};
    if (root && tc.checkpoint_every_minutes() > 0 &&
        Now() - last_save_time >= 60 * tc.checkpoint_every_minutes()) {
      flags[1] = 1;
    }
    world.AllReduce(flags, 4, DType::kI32, ReduceOp::kMax);
    if (flags[3]) return fail(1, "cannot write metrics file '" + metrics_path + "'; stopped");
    if (background.busy()) {
      Status s = advance_background(flags[2] == 0);
      if (!s.ok() && save_failed(s)) return fail(1, s.message());
    }
    if (flags[0]) {
      stopped_by = flags[0];
      if (root) {
        LOG(WARNING) << SignalName(stopped_by) << ": stopping at step " << trainer.step()
                     << " and saving a checkpoint";
      }
      break;
    }
    if (flags[1]) {
      Status s = save(tc.checkpoint_async());
      if (!s.ok() && save_failed(s)) return fail(1, s.message());
    }
    const StepStats st = trainer.Step();
    if (!st.finite) {
      advance_background(true, true);  // an earlier save in flight is still good
      return fail(1, st.problem);
    }
    ++steps_run;
    window_images += tc.global_batch();
    for (const MoeMetrics& mm : st.moe) {
      for (double f : mm.dropped_fraction) {
        dropped_sum += f / (mm.dropped_fraction.size() * st.moe.size());
      }
    }
    const int64_t done = trainer.step();
    if (done % tc.log_every() == 0 || done == last_step) {
      const double now = Now();
      const double ips = window_images / std::max(1e-9, now - window_start);
      const double eta = (last_step - done) * tc.global_batch() / std::max(1e-9, ips);
      double dropped = 0;
      for (const MoeMetrics& mm : st.moe) {
        for (double f : mm.dropped_fraction)
          dropped += f / (mm.dropped_fraction.size() * st.moe.size());
      }
      if (root) {
        std::ostringstream line;
        line << std::fixed << "step " << done << "/" << tc.steps() << "  epoch "
             << std::setprecision(2) << static_cast<double>(done) / steps_per_epoch << "  loss "
             << std::setprecision(4) << st.loss;
        if (st.tasks.empty()) {
          line << "  acc " << std::setprecision(1) << 100 * st.accuracy << "%";
        } else {
          line << TasksLine(st.tasks);
        }
        line << "  aux " << std::setprecision(4) << st.aux_loss << "  dropped "
             << std::setprecision(1) << 100 * dropped << "%  lr " << std::scientific
             << std::setprecision(2) << st.learning_rate << std::fixed << "  "
             << std::setprecision(0) << ips << " img/s  ETA " << Duration(eta);
        LOG(INFO) << line.str();
      }
      nlohmann::json train_line = {{"event", "train"},
                                   {"step", done},
                                   {"epoch", static_cast<double>(done) / steps_per_epoch},
                                   {"loss", st.loss},
                                   {"accuracy", st.accuracy},
                                   {"aux_loss", st.aux_loss},
                                   {"grad_norm", st.grad_norm},
                                   {"lr", st.learning_rate},
                                   {"images_per_s", ips},
                                   {"moe", MoeJson(config.model(), st)}};
      if (!st.tasks.empty()) train_line["tasks"] = TasksJson(st.tasks);
      emit(train_line);
      window_start = now;
      window_images = 0;
    }
    if (tc.eval_every() > 0 && done % tc.eval_every() == 0 && done < tc.steps()) {
      last_eval = trainer.Evaluate(*test, tc.eval_batch(), {});
      if (root && last_eval.tasks.empty()) {
        LOG(INFO) << "eval at step " << done << ": test accuracy " << std::fixed
                  << std::setprecision(2) << 100 * last_eval.accuracy << "%, loss "
                  << std::setprecision(4) << last_eval.loss;
      } else if (root) {
        LOG(INFO) << "eval at step " << done << ":" << TasksLine(last_eval.tasks);
      }
      nlohmann::json eval_line = {{"event", "eval"},
                                  {"step", done},
                                  {"test_accuracy", last_eval.accuracy},
                                  {"test_loss", last_eval.loss}};
      if (!last_eval.tasks.empty()) eval_line["tasks"] = TasksJson(last_eval.tasks);
      emit(eval_line);
      window_start = Now();  // evaluation time is not training throughput
    }
    if (tc.checkpoint_every() > 0 && done % tc.checkpoint_every() == 0 && done < last_step) {
      Status s = save(tc.checkpoint_async());
      if (!s.ok() && save_failed(s)) return fail(1, s.message());
      window_start = Now();
    }
  }
  const double train_wall = Now() - start;
  // The last state is always saved (synchronously): at the end, at --until-step, or when
  // stopped by a signal.
  Status s = advance_background(true, true);
  if (s.ok()) s = save(false);
  if (!s.ok()) return fail(1, s.message());
  if (metrics_failed) return fail(1, "cannot write metrics file '" + metrics_path + "'");
  last_eval = trainer.Evaluate(*test, tc.eval_batch(), {});
  const double wall = Now() - start;
  // Where the step time went (per step, mean over ranks) and the peak resident memory
  // (max over ranks).
  const auto named = trainer.time_split().Named();
  std::vector<double> split;
  for (const auto& [name, seconds] : named) split.push_back(seconds);
  world.AllReduce(split.data(), static_cast<int64_t>(split.size()), DType::kF64, ReduceOp::kSum);
  const double per = 1000.0 / (world.size() * std::max<int64_t>(1, trainer.time_split().steps));
  nlohmann::json step_ms = nlohmann::json::object();
  for (size_t i = 0; i < named.size(); ++i) step_ms[named[i].first] = split[i] * per;
  double peak_rss = ProcessMemoryBytes("VmHWM");
  world.AllReduce(&peak_rss, 1, DType::kF64, ReduceOp::kMax);
  const double tokens = static_cast<double>(TokensPerImage(config.model()));
  result.final_line = {
      {"event", "final"},
      {"steps", trainer.step()},
      {"steps_this_run", steps_run},
      {"interrupted", stopped_by != 0},
      {"test_accuracy", last_eval.accuracy},
      {"test_loss", last_eval.loss},
      {"wall_s", wall},
      {"train_s", train_wall},
      {"images_per_s", steps_run * tc.global_batch() / std::max(1e-9, train_wall)},
      {"tokens_per_s", tokens * steps_run * tc.global_batch() / std::max(1e-9, train_wall)},
      {"step_ms", step_ms},
      {"dropped_fraction", dropped_sum / std::max<int64_t>(1, steps_run)},
      {"peak_rss_mib", peak_rss / 1048576.0},
      {"ranks", world.size()},
      {"checkpoint", last_checkpoint},
      {"checkpoints_saved", saves},
      {"checkpoint_stall_s", save_stall_s},
      {"metrics", metrics_path}};
  if (resumed_step >= 0) result.final_line["resumed_from_step"] = resumed_step;
  if (!last_eval.tasks.empty()) result.final_line["tasks"] = TasksJson(last_eval.tasks);
  if (trainer.multitask() && !trainer.modsquad().buffers().empty() && root) {
    double entropy = 0;
    const std::string usage_dir = out_dir + "/usage";
    const Status u = WriteTrainerUsageReport(trainer, usage_dir, &entropy);
    if (u.ok()) {
      result.final_line["usage"] = usage_dir;
      result.final_line["usage_entropy_bits"] = entropy;
    } else {
      LOG(WARNING) << "usage report: " << u.message();
    }
  }
  if (stopped_by) result.final_line["signal"] = SignalName(stopped_by);
  emit(result.final_line);
  if (root && last_eval.tasks.empty()) {
    LOG(INFO) << "done: test accuracy " << std::fixed << std::setprecision(2)
              << 100 * last_eval.accuracy << "% after " << trainer.step() << " steps in "
              << Duration(wall) << "; checkpoint: " << last_checkpoint;
  } else if (root) {
    LOG(INFO) << "done after " << trainer.step() << " steps in " << Duration(wall)
              << "; test:" << TasksLine(last_eval.tasks) << "; checkpoint: " << last_checkpoint;
  }
  result.exit_code = stopped_by ? 1 : 0;
  return result;
}

}  // namespace moerun
