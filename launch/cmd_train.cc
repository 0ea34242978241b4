// moerun train and moerun eval.
#include <google/protobuf/text_format.h>
#include <mpi.h>

#include <csignal>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <sstream>

#include "launch/commands.h"
#include "launch/trainer.h"
#include "model/vit_spec.h"
#include "runtime/config.h"
#include "runtime/kernels.h"
#include "runtime/safetensors.h"

namespace moerun {
namespace {

volatile std::sig_atomic_t g_interrupted = 0;
void OnSignal(int) { g_interrupted = 1; }

StatusOr<Dataset> LoadData(const Config& c, bool train) {
  const DataConfig& d = c.data();
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

std::string Duration(double s) {
  std::ostringstream o;
  const int64_t t = static_cast<int64_t>(s + 0.5);
  if (t >= 3600) o << t / 3600 << "h";
  if (t >= 60) o << (t % 3600) / 60 << "m";
  o << t % 60 << "s";
  return o.str();
}

nlohmann::json MoeJson(const VitModel& model, const StepStats& st) {
  nlohmann::json layers = nlohmann::json::array();
  const std::vector<int> blocks = model.moe_blocks();
  for (size_t i = 0; i < st.moe.size(); ++i) {
    layers.push_back({{"block", blocks[i]},
                      {"importance_loss", st.moe_losses[i].importance},
                      {"load_loss", st.moe_losses[i].load},
                      {"capacity", st.moe[i].capacity},
                      {"dropped_fraction", st.moe[i].dropped_fraction},
                      {"tokens_per_expert", st.moe[i].tokens_per_expert}});
  }
  return layers;
}

// Gathers every parameter to rank 0 and writes them under their global names.
Status SaveModel(Trainer& trainer, Communicator& world, const Config& config,
                 const std::string& path) {
  VitModel& model = trainer.model();
  SafetensorsWriter out;
  // Dense parameters are the same everywhere; expert parameters: gather each rank's shard
  // of each layer and keep the first replica of every expert.
  std::map<std::string, Tensor> expert_parts;
  for (Param& p : model.params()) {
    if (!p.expert) {
      out.Add(p.name, p.value);
      continue;
    }
    // All ranks hold the same number of expert tensors in the same order.
    Tensor all = Tensor::Empty({static_cast<int64_t>(world.size()), p.value.numel()});
    world.AllGather(p.value.Contiguous().raw_data(), p.value.numel(), all.raw_data(), DType::kF32);
    // The global expert id of this tensor on every rank.
    const size_t at = p.name.find(".experts.");
    const size_t id_end = p.name.find('.', at + 9);
    int32_t id = std::stoi(p.name.substr(at + 9, id_end - at - 9));
    std::vector<int32_t> ids(world.size());
    world.AllGather(&id, 1, ids.data(), DType::kI32);
    for (int r = 0; r < world.size(); ++r) {
      const std::string name =
          p.name.substr(0, at + 9) + std::to_string(ids[r]) + p.name.substr(id_end);
      if (expert_parts.count(name)) continue;
      expert_parts[name] = all.Slice(0, r, r + 1).Reshape(p.value.shape()).Clone();
    }
  }
  for (auto& [name, t] : expert_parts) out.Add(name, t);
  std::string text;
  google::protobuf::TextFormat::PrintToString(config, &text);
  out.SetMetadata("moerun_config", text);
  out.SetMetadata("step", std::to_string(trainer.step()));
  Status s = world.rank() == 0 ? out.Write(path) : Status::Ok();
  return AgreeOnStatus(world, s);
}

Status LoadModel(VitModel& model, const std::string& path) {
  auto reader = SafetensorsReader::Open(path);
  if (!reader.ok()) return reader.status();
  for (Param& p : model.params()) {
    auto t = reader->Get(p.name, DType::kF32, p.value.shape());
    if (!t.ok()) {
      return Status::Error(t.status().message() + " (was the model trained with this config?)");
    }
    p.value.CopyFrom(*t);
  }
  return Status::Ok();
}

std::string OutDir(const Config& c) {
  return c.train().out_dir().empty() ? "runs/" + c.model().name() : c.train().out_dir();
}

}  // namespace

int RunTrain(const Config& config, Session& session) {
  Communicator& world = session.world();
  const bool root = session.is_root();
  session.ApplyConfigWatchdog(config.comm().watchdog_timeout_s());
  StatusOr<Dataset> train = LoadData(config, true);
  StatusOr<Dataset> test = train.ok() ? LoadData(config, false) : train.status();
  Status ok = AgreeOnStatus(world, test.status());
  if (!ok.ok()) {
    PrintError("moerun train", ok.message());
    return kExitFailure;
  }
  auto created = Trainer::Create(config, &world, &*train);
  ok = AgreeOnStatus(world, created.status());
  if (!ok.ok()) {
    PrintError("moerun train", ok.message());
    return kExitUsage;
  }
  Trainer& trainer = **created;
  const TrainConfig& tc = config.train();
  const std::string out_dir = OutDir(config);
  const std::string metrics_path =
      tc.metrics_path().empty() ? out_dir + "/metrics.jsonl" : tc.metrics_path();
  std::ofstream metrics;
  if (root) {
    std::error_code ec;
    std::filesystem::create_directories(out_dir, ec);
    if (!std::filesystem::path(metrics_path).parent_path().empty()) {
      std::filesystem::create_directories(std::filesystem::path(metrics_path).parent_path(), ec);
    }
    metrics.open(metrics_path, std::ios::trunc);
  }
  ok = AgreeOnStatus(
      world, !root || metrics ? Status::Ok()
                              : Status::Error("cannot write metrics file '" + metrics_path + "'"));
  if (!ok.ok()) {
    PrintError("moerun train", ok.message());
    return kExitFailure;
  }
  auto emit = [&](const nlohmann::json& j) {
    if (root) metrics << j.dump() << "\n" << std::flush;
  };
  const int64_t params = CountParameters(config.model()).total;
  if (root) {
    LOG(INFO) << "train: " << config.model().name() << ", " << params << " parameters, "
              << world.size() << " rank(s) x " << NumThreads() << " thread(s), global batch "
              << tc.global_batch() << ", " << tc.steps() << " steps (" << std::fixed
              << std::setprecision(2)
              << static_cast<double>(tc.steps()) / trainer.sampler().steps_per_epoch()
              << " epochs of " << train->size << " images); metrics: " << metrics_path;
  }
  std::signal(SIGINT, OnSignal);
  std::signal(SIGTERM, OnSignal);
  const double start = MPI_Wtime();
  double window_start = start;
  int64_t window_images = 0;
  EvalStats last_eval;
  bool interrupted = false;
  const int64_t steps_per_epoch = trainer.sampler().steps_per_epoch();
  while (trainer.step() < tc.steps()) {
    // Stop together: a signal seen by any rank stops every rank at the same step.
    int32_t stop = g_interrupted;
    world.AllReduce(&stop, 1, DType::kI32, ReduceOp::kMax);
    if (stop) {
      interrupted = true;
      if (root) LOG(WARNING) << "interrupted: stopping at step " << trainer.step();
      break;
    }
    const StepStats st = trainer.Step();
    window_images += tc.global_batch();
    const int64_t done = trainer.step();
    if (done % tc.log_every() == 0 || done == tc.steps()) {
      const double now = MPI_Wtime();
      const double ips = window_images / std::max(1e-9, now - window_start);
      const double eta = (tc.steps() - done) * tc.global_batch() / std::max(1e-9, ips);
      double dropped = 0;
      for (const MoeMetrics& mm : st.moe) {
        for (double f : mm.dropped_fraction)
          dropped += f / (mm.dropped_fraction.size() * st.moe.size());
      }
      if (root) {
        std::ostringstream line;
        line << std::fixed << "step " << done << "/" << tc.steps() << "  epoch "
             << std::setprecision(2) << static_cast<double>(done) / steps_per_epoch << "  loss "
             << std::setprecision(4) << st.loss << "  acc " << std::setprecision(1)
             << 100 * st.accuracy << "%  aux " << std::setprecision(4) << st.aux_loss
             << "  dropped " << std::setprecision(1) << 100 * dropped << "%  lr " << std::scientific
             << std::setprecision(2) << st.learning_rate << std::fixed << "  "
             << std::setprecision(0) << ips << " img/s  ETA " << Duration(eta);
        LOG(INFO) << line.str();
      }
      emit({{"event", "train"},
            {"step", done},
            {"epoch", static_cast<double>(done) / steps_per_epoch},
            {"loss", st.loss},
            {"accuracy", st.accuracy},
            {"aux_loss", st.aux_loss},
            {"grad_norm", st.grad_norm},
            {"lr", st.learning_rate},
            {"images_per_s", ips},
            {"moe", MoeJson(trainer.model(), st)}});
      window_start = now;
      window_images = 0;
    }
    if (tc.eval_every() > 0 && done % tc.eval_every() == 0 && done < tc.steps()) {
      last_eval = trainer.Evaluate(*test, tc.eval_batch(), {});
      if (root) {
        LOG(INFO) << "eval at step " << done << ": test accuracy " << std::fixed
                  << std::setprecision(2) << 100 * last_eval.accuracy << "%, loss "
                  << std::setprecision(4) << last_eval.loss;
      }
      emit({{"event", "eval"},
            {"step", done},
            {"test_accuracy", last_eval.accuracy},
            {"test_loss", last_eval.loss}});
      window_start = MPI_Wtime();  // evaluation time is not training throughput
    }
  }
  const double train_wall = MPI_Wtime() - start;
  last_eval = trainer.Evaluate(*test, tc.eval_batch(), {});
  const std::string model_path = out_dir + "/model.safetensors";
  ok = SaveModel(trainer, world, config, model_path);
  if (!ok.ok()) {
    PrintError("moerun train", ok.message());
    return kExitFailure;
  }
  const double wall = MPI_Wtime() - start;
  const nlohmann::json final_line = {
      {"event", "final"},
      {"steps", trainer.step()},
      {"interrupted", interrupted},
      {"test_accuracy", last_eval.accuracy},
      {"test_loss", last_eval.loss},
      {"wall_s", wall},
      {"train_s", train_wall},
      {"images_per_s", trainer.step() * tc.global_batch() / std::max(1e-9, train_wall)},
      {"ranks", world.size()},
      {"model", model_path},
      {"metrics", metrics_path}};
  emit(final_line);
  if (root) {
    LOG(INFO) << "done: test accuracy " << std::fixed << std::setprecision(2)
              << 100 * last_eval.accuracy << "% after " << trainer.step() << " steps in "
              << Duration(wall) << "; model: " << model_path;
    PrintJsonLine(final_line);
  }
  return interrupted ? kExitFailure : kExitOk;
}

int RunEval(const Config& config, Session& session, const std::string& model_path,
            const std::vector<double>& capacity_factors, const std::vector<int>& bprs) {
  Communicator& world = session.world();
  StatusOr<Dataset> test = LoadData(config, false);
  Status ok = AgreeOnStatus(world, test.status());
  if (!ok.ok()) {
    PrintError("moerun eval", ok.message());
    return kExitFailure;
  }
  Config c = config;
  c.mutable_train()->set_global_batch(world.size());
  auto created = Trainer::Create(c, &world, &*test);
  ok = AgreeOnStatus(world, created.status());
  if (!ok.ok()) {
    PrintError("moerun eval", ok.message());
    return kExitUsage;
  }
  Trainer& trainer = **created;
  ok = AgreeOnStatus(world, LoadModel(trainer.model(), model_path));
  if (!ok.ok()) {
    PrintError("moerun eval", ok.message());
    return kExitUsage;
  }
  for (int bpr : bprs) {
    for (double cf : capacity_factors) {
      const EvalStats e = trainer.Evaluate(*test, config.train().eval_batch(), {cf, bpr});
      if (!session.is_root()) continue;
      nlohmann::json j = {{"event", "eval"},
                          {"model", model_path},
                          {"bpr", bpr},
                          {"test_accuracy", e.accuracy},
                          {"test_loss", e.loss},
                          {"examples", e.examples},
                          {"dropped_fraction", e.dropped_fraction}};
      if (cf >= 0) j["capacity_factor"] = cf;
      PrintJsonLine(j);
    }
  }
  return kExitOk;
}

}  // namespace moerun
