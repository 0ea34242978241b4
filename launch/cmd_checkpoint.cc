// moerun checkpoint info|verify, export, import, reshard: offline tools over checkpoint
// directories (runtime/checkpoint.h). One process each; no MPI needed.
#include <google/protobuf/text_format.h>

#include <chrono>
#include <filesystem>
#include <iostream>
#include <map>

#include "launch/commands.h"
#include "model/vit_spec.h"
#include "runtime/checkpoint.h"
#include "runtime/config.h"
#include "runtime/safetensors.h"
#include "runtime/trainer.h"
#include "runtime/usage.h"

namespace moerun {
namespace {

constexpr const char* kOptimizerPrefixes[] = {"optimizer.m.", "optimizer.v."};

double Seconds() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

struct Opened {
  std::string dir;
  CheckpointManifest manifest;
  Config config;
};

StatusOr<Opened> Open(const std::string& path) {
  Opened o;
  auto dir = ResolveCheckpoint(path);
  if (!dir.ok()) return dir.status();
  o.dir = *dir;
  auto m = ReadManifest(o.dir);
  if (!m.ok()) return m.status();
  o.manifest = *m;
  if (!google::protobuf::TextFormat::ParseFromString(o.manifest.config(), &o.config)) {
    return Status::Error(o.dir + "/manifest.pb: the stored config does not parse");
  }
  return o;
}

// The ranks of `ranks` holding each parameter (dense: all), by global name.
StatusOr<std::map<std::string, std::vector<int>>> Holders(const ModelConfig& model, int ranks) {
  const Status placed = CheckPlacement(model, ranks);
  if (!placed.ok())
    return Status::Error("--ranks " + std::to_string(ranks) + ": " + placed.message());
  std::vector<int> all(ranks);
  for (int r = 0; r < ranks; ++r) all[r] = r;
  std::map<std::string, std::vector<int>> out;
  for (const ParamSpec& p : ParamSpecs(model)) {
    out[p.name] = p.expert < 0 ? all : ExpertHolders(p.num_experts, ranks, p.expert);
  }
  for (const ParamSpec& b : BufferSpecs(model)) out[b.name] = all;
  return out;
}

// The parameter a stored tensor belongs to (itself, or the one its optimizer state is of).
std::string ParameterOf(const std::string& name) {
  for (const char* prefix : kOptimizerPrefixes) {
    const std::string p = prefix;
    if (name.compare(0, p.size(), p) == 0) return name.substr(p.size());
  }
  return name;
}

void SetPlacement(const ModelConfig& model, int ranks, CheckpointManifest* m) {
  m->set_world_size(ranks);
  const std::vector<int> counts = ExpertCounts(model);
  if (!counts.empty()) {
    const int e = counts.back();  // Mod-Squad: the MLP layers' experts
    m->set_expert_parallel_size(std::min(ranks, e));
    m->set_expert_replicas(ranks > e ? ranks / e : 1);
  } else {
    m->set_expert_parallel_size(1);
    m->set_expert_replicas(1);
  }
}

// Writes `names` (each with shape and dtype) as a checkpoint of `ranks` shards under root.
Status WriteAsRanks(const std::string& root, const CheckpointManifest& state,
                    const ModelConfig& model, int ranks,
                    const std::vector<std::pair<std::string, std::pair<Shape, DType>>>& names,
                    const std::function<StatusOr<Tensor>(const std::string&)>& load,
                    SaveResult* result) {
  auto holders = Holders(model, ranks);
  if (!holders.ok()) return holders.status();
  std::vector<uint64_t> bytes;
  std::vector<std::vector<int>> who;
  for (const auto& [name, kind] : names) {
    auto it = holders->find(ParameterOf(name));
    if (it == holders->end()) {
      return Status::Error("tensor '" + name + "' is not a parameter of the model " + model.name() +
                           " (or its optimizer state)");
    }
    bytes.push_back(NumElements(kind.first) * DTypeSize(kind.second));
    who.push_back(it->second);
  }
  const std::vector<int> writers = AssignWriters(bytes, who, ranks);
  std::vector<OfflineTensor> tensors;
  for (size_t i = 0; i < names.size(); ++i) {
    tensors.push_back({names[i].first, names[i].second.first, names[i].second.second, writers[i]});
  }
  CheckpointManifest m = state;
  SetPlacement(model, ranks, &m);
  return WriteCheckpointOffline(root, m, ranks, tensors, load, result);
}

int Fail(const std::string& command, const std::string& message, int code) {
  PrintError(command, message);
  return code;
}

int Info(const std::string& path, bool show_config) {
  auto o = Open(path);
  if (!o.ok()) return Fail("moerun checkpoint info", o.status().message(), kExitFailure);
  const CheckpointManifest& m = o->manifest;
  int64_t params = 0, optimizer = 0;
  uint64_t bytes = 0;
  for (const CheckpointTensor& t : m.tensors()) {
    int64_t n = 1;
    for (int64_t d : t.shape()) n *= d;
    (ParameterOf(t.name()) == t.name() ? params : optimizer) += n;
    for (const CheckpointPiece& p : t.pieces()) bytes += p.end() - p.begin();
  }
  nlohmann::json files = nlohmann::json::array();
  for (const CheckpointFile& f : m.files())
    files.push_back({{"name", f.name()}, {"bytes", f.size()}});
  nlohmann::json j = {{"path", o->dir},
                      {"step", m.step()},
                      {"model", o->config.model().name()},
                      {"parameters", params},
                      {"optimizer_values", optimizer},
                      {"optimizer_state", m.optimizer_state()},
                      {"tensors", m.tensors_size()},
                      {"bytes", bytes},
                      {"files", files},
                      {"world_size", m.world_size()},
                      {"expert_parallel_size", m.expert_parallel_size()},
                      {"expert_replicas", m.expert_replicas()},
                      {"epoch", m.data().epoch()},
                      {"index_in_epoch", m.data().index_in_epoch()},
                      {"learning_rate", m.lr_schedule().learning_rate()},
                      {"total_steps", m.lr_schedule().total_steps()},
                      {"moerun_version", m.moerun_version()},
                      {"git_revision", m.git_revision()},
                      {"created_unix_s", m.created_unix_s()}};
  PrintJsonLine(j);
  if (show_config) std::cout << m.config() << std::flush;
  return kExitOk;
}

int Verify(const std::string& path) {
  const double t0 = Seconds();
  auto o = Open(path);
  if (!o.ok()) return Fail("moerun checkpoint verify", o.status().message(), kExitFailure);
  Status s = VerifyCheckpoint(o->dir, o->manifest);
  if (!s.ok()) return Fail("moerun checkpoint verify", s.message(), kExitFailure);
  uint64_t bytes = 0;
  for (const CheckpointFile& f : o->manifest.files()) bytes += f.size();
  PrintJsonLine({{"path", o->dir},
                 {"verified", "ok"},
                 {"files", o->manifest.files_size()},
                 {"tensors", o->manifest.tensors_size()},
                 {"bytes", bytes},
                 {"seconds", Seconds() - t0}});
  return kExitOk;
}

int Export(const std::string& in, const std::string& out, bool with_optimizer, bool force) {
  const std::string cmd = "moerun export";
  auto o = Open(in);
  if (!o.ok()) return Fail(cmd, o.status().message(), kExitFailure);
  std::error_code ec;
  if (std::filesystem::exists(out, ec) && !force) {
    return Fail(cmd, out + " exists; pass --force to replace it", kExitUsage);
  }
  const std::string abs_out = std::filesystem::weakly_canonical(out, ec).string();
  const std::string abs_dir = std::filesystem::weakly_canonical(o->dir, ec).string();
  if (abs_out.rfind(abs_dir + "/", 0) == 0) {
    return Fail(cmd,
                "--out " + out +
                    " is inside the checkpoint being exported; write it "
                    "elsewhere",
                kExitUsage);
  }
  SafetensorsWriter writer;
  int64_t params = 0;
  for (const CheckpointTensor& t : o->manifest.tensors()) {
    const bool param = ParameterOf(t.name()) == t.name();
    if (!param && !with_optimizer) continue;
    auto value = LoadTensor(o->dir, o->manifest, t.name());
    if (!value.ok()) return Fail(cmd, value.status().message(), kExitFailure);
    if (param) params += value->numel();
    writer.Add(t.name(), *value);
  }
  writer.SetMetadata("format", "pt");
  writer.SetMetadata("moerun_config", o->manifest.config());
  writer.SetMetadata("step", std::to_string(o->manifest.step()));
  writer.SetMetadata("source_checkpoint", o->dir);
  writer.SetMetadata("moerun_version", o->manifest.moerun_version());
  Status s = writer.Write(out);
  if (!s.ok()) return Fail(cmd, s.message(), kExitFailure);
  PrintJsonLine({{"event", "export"},
                 {"checkpoint", o->dir},
                 {"out", out},
                 {"tensors", writer.size()},
                 {"parameters", params},
                 {"step", o->manifest.step()}});
  return kExitOk;
}

int Import(const std::string& in, const std::string& config_path,
           const std::vector<std::string>& overrides, const std::string& out, int ranks) {
  const std::string cmd = "moerun import";
  auto config = LoadConfig(config_path, overrides);
  if (!config.ok()) return Fail(cmd, config.status().message(), kExitUsage);
  auto reader = SafetensorsReader::Open(in);
  if (!reader.ok()) return Fail(cmd, reader.status().message(), kExitFailure);
  std::vector<std::pair<std::string, std::pair<Shape, DType>>> names;
  std::map<std::string, bool> wanted;
  for (const ParamSpec& p : ParamSpecs(config->model())) {
    auto t = reader->Get(p.name, DType::kF32, p.shape);
    if (!t.ok()) {
      return Fail(cmd, t.status().message() + " (is " + config_path + " the model of that file?)",
                  kExitFailure);
    }
    names.push_back({p.name, {p.shape, DType::kF32}});
    wanted[p.name] = true;
  }
  for (const std::string& n : reader->names()) {
    if (!wanted.count(n)) {
      return Fail(cmd,
                  in + ": tensor '" + n + "' is not a parameter of " + config_path +
                      "'s model; nothing written",
                  kExitFailure);
    }
  }
  CheckpointManifest state;
  state.set_step(0);
  std::string text;
  google::protobuf::TextFormat::PrintToString(*config, &text);
  state.set_config(text);
  state.set_optimizer_state(false);
  state.set_moerun_version(MOERUN_VERSION);
  state.set_git_revision(MOERUN_GIT_REVISION);
  SaveResult r;
  Status s = WriteAsRanks(
      out, state, config->model(), ranks, names,
      [&](const std::string& name) { return reader->Get(name); }, &r);
  if (!s.ok()) return Fail(cmd, s.message(), kExitFailure);
  PrintJsonLine({{"event", "import"},
                 {"in", in},
                 {"checkpoint", r.path},
                 {"ranks", ranks},
                 {"tensors", names.size()},
                 {"bytes", r.total_bytes}});
  return kExitOk;
}

int Reshard(const std::string& in, int ranks, const std::string& out) {
  const std::string cmd = "moerun reshard";
  auto o = Open(in);
  if (!o.ok()) return Fail(cmd, o.status().message(), kExitFailure);
  std::error_code ec;
  const std::string abs_out = std::filesystem::weakly_canonical(out, ec).string();
  const std::string abs_in = std::filesystem::weakly_canonical(o->dir, ec).string();
  if (abs_in.rfind(abs_out + "/", 0) == 0 || abs_in == abs_out) {
    return Fail(cmd,
                "--out " + out +
                    " holds the checkpoint being resharded; write to another "
                    "directory",
                kExitUsage);
  }
  std::vector<std::pair<std::string, std::pair<Shape, DType>>> names;
  for (const CheckpointTensor& t : o->manifest.tensors()) {
    DType dtype;
    ParseDType(t.dtype(), &dtype);
    names.push_back({t.name(), {Shape(t.shape().begin(), t.shape().end()), dtype}});
  }
  CheckpointManifest state = o->manifest;
  state.clear_files();
  state.clear_tensors();
  SaveResult r;
  Status s = WriteAsRanks(
      out, state, o->config.model(), ranks, names,
      [&](const std::string& name) { return LoadTensor(o->dir, o->manifest, name); }, &r);
  if (!s.ok()) return Fail(cmd, s.message(), s.message().rfind("--ranks", 0) == 0 ? 2 : 1);
  PrintJsonLine({{"event", "reshard"},
                 {"in", o->dir},
                 {"checkpoint", r.path},
                 {"from_ranks", o->manifest.world_size()},
                 {"ranks", ranks},
                 {"tensors", names.size()},
                 {"bytes", r.total_bytes},
                 {"seconds", r.seconds}});
  return kExitOk;
}

// The Mod-Squad checkpoint `o` (an error naming what it holds otherwise).
Status RequireModSquad(const Opened& o, const std::string& what) {
  const ModelConfig& m = o.config.model();
  if (!m.has_modsquad()) {
    return Status::Error(o.dir + " holds a " + (m.has_moe() ? "V-MoE" : "dense ViT") + " model (" +
                         m.name() + "); " + what +
                         " needs a Mod-Squad checkpoint (model.modsquad)");
  }
  if (!m.modsquad().moe()) {
    return Status::Error(o.dir + " holds the dense multi-task baseline (modsquad.moe: false): it " +
                         "has no experts; " + what + " needs a Mod-Squad model with MoE layers");
  }
  return Status::Ok();
}

// The usage EMAs of a Mod-Squad checkpoint, in BufferSpecs order.
StatusOr<std::vector<std::pair<std::string, Tensor>>> LoadUsage(const Opened& o) {
  std::vector<std::pair<std::string, Tensor>> ema;
  for (const ParamSpec& b : BufferSpecs(o.config.model())) {
    auto t = LoadTensor(o.dir, o.manifest, b.name);
    if (!t.ok()) {
      return Status::Error(t.status().message() +
                           " (the checkpoint has no usage statistics: was it written by a moerun "
                           "that records them?)");
    }
    ema.push_back({b.name, *t});
  }
  return ema;
}

int Usage(const std::string& in, std::string out) {
  const std::string cmd = "moerun usage";
  auto o = Open(in);
  if (!o.ok()) return Fail(cmd, o.status().message(), kExitFailure);
  Status s = RequireModSquad(*o, "usage");
  if (!s.ok()) return Fail(cmd, s.message(), kExitUsage);
  auto ema = LoadUsage(*o);
  if (!ema.ok()) return Fail(cmd, ema.status().message(), kExitFailure);
  if (out.empty()) out = o->dir + "/usage";
  const std::vector<LayerUsage> layers = UsageFromBuffers(o->config.model(), *ema);
  std::vector<std::string> written;
  s = WriteUsageReport(o->config.model(), layers, out, &written);
  if (!s.ok()) return Fail(cmd, s.message(), kExitFailure);
  nlohmann::json entropy = nlohmann::json::object();
  for (const LayerUsage& l : layers) entropy[l.layer] = MeanTaskEntropy({l});
  PrintJsonLine({{"event", "usage"},
                 {"checkpoint", o->dir},
                 {"out", out},
                 {"files", written},
                 {"mean_task_entropy_bits", MeanTaskEntropy(layers)},
                 {"layer_entropy_bits", entropy}});
  return kExitOk;
}

// shared/specs/modsquad.md, "Extracting a single-task model".
int Extract(const std::string& in, const std::string& task_arg, const std::string& out,
            double thresh) {
  const std::string cmd = "moerun extract";
  auto o = Open(in);
  if (!o.ok()) return Fail(cmd, o.status().message(), kExitFailure);
  Status s = RequireModSquad(*o, "extract");
  if (!s.ok()) return Fail(cmd, s.message(), kExitUsage);
  const ModelConfig& full = o->config.model();
  const ModSquadConfig& ms = full.modsquad();
  // The task: by name, or by id.
  int task = -1;
  std::string names;
  for (int t = 0; t < ms.tasks_size(); ++t) {
    names += (t ? ", " : "") + ms.tasks(t).name();
    if (ms.tasks(t).name() == task_arg) task = t;
  }
  if (task < 0 && !task_arg.empty() &&
      task_arg.find_first_not_of("0123456789") == std::string::npos) {
    const long id = std::strtol(task_arg.c_str(), nullptr, 10);
    if (id >= ms.tasks_size()) {
      return Fail(cmd,
                  "task id " + task_arg + " is out of range: the model has " +
                      std::to_string(ms.tasks_size()) + " tasks (0.." +
                      std::to_string(ms.tasks_size() - 1) + ": " + names + ")",
                  kExitUsage);
    }
    task = static_cast<int>(id);
  }
  if (task < 0) {
    return Fail(cmd, "unknown task '" + task_arg + "'; the model's tasks are " + names, kExitUsage);
  }
  if (!(thresh >= 0)) return Fail(cmd, "--thresh must be >= 0", kExitUsage);
  std::error_code ec;
  if (std::filesystem::exists(out, ec)) {
    return Fail(cmd, "--out " + out + " exists; choose a new directory", kExitUsage);
  }
  auto ema = LoadUsage(*o);
  if (!ema.ok()) return Fail(cmd, ema.status().message(), kExitFailure);
  const std::vector<LayerUsage> usage = UsageFromBuffers(full, *ema);
  // Kept experts per block: u[t,e] > thresh / k, at least the k most used.
  std::vector<std::vector<int>> kept(full.num_layers());
  for (int b = 0; b < full.num_layers(); ++b) {
    const LayerUsage& l = usage[b];
    const double* u = l.percent.data() + task * l.experts;
    double total = 0;
    for (int e = 0; e < l.experts; ++e) total += u[e];
    if (total <= 0) {
      return Fail(cmd,
                  "task '" + ms.tasks(task).name() + "' has no recorded expert usage in " +
                      l.layer + " (was the model trained?)",
                  kExitFailure);
    }
    for (int e = 0; e < l.experts; ++e) {
      if (u[e] > thresh / l.k) kept[b].push_back(e);
    }
    if (static_cast<int>(kept[b].size()) < l.k) {
      std::vector<int> order(l.experts);
      for (int e = 0; e < l.experts; ++e) order[e] = e;
      std::stable_sort(order.begin(), order.end(), [&](int a, int c) { return u[a] > u[c]; });
      kept[b].assign(order.begin(), order.begin() + l.k);
      std::sort(kept[b].begin(), kept[b].end());
    }
  }
  // The single-task config.
  Config config = o->config;
  ModelConfig* m = config.mutable_model();
  m->set_name(full.name() + "_" + ms.tasks(task).name());
  ModSquadConfig* xs = m->mutable_modsquad();
  xs->clear_tasks();
  *xs->add_tasks() = ms.tasks(task);
  xs->clear_layer_experts();
  for (const auto& k : kept) xs->add_layer_experts(static_cast<int>(k.size()));
  // Where each new tensor comes from.
  auto source = [&](const std::string& name) -> StatusOr<Tensor> {
    auto take_rows = [&](const std::string& old_name, const std::vector<int>& rows,
                         int64_t row_size, int64_t first) -> StatusOr<Tensor> {
      auto t = LoadTensor(o->dir, o->manifest, old_name);
      if (!t.ok()) return t.status();
      Shape shape = t->shape();
      shape[0] = 1;
      if (shape.size() >= 2 && !rows.empty()) shape[1] = static_cast<int64_t>(rows.size());
      Tensor r = Tensor::Empty(shape, DType::kF32);
      const float* src = t->data<float>() + first;
      if (rows.empty()) {
        std::copy_n(src, r.numel(), r.data<float>());
      } else {
        for (size_t j = 0; j < rows.size(); ++j) {
          std::copy_n(src + rows[j] * row_size, row_size, r.data<float>() + j * row_size);
        }
      }
      return r;
    };
    const int64_t d = full.hidden_size();
    if (name == "task_embedding") return take_rows(name, {}, d, task * d);
    if (name == "loss.task_uncertainty") return take_rows(name, {}, 1, task);
    const size_t dot = name.find('.', 7);
    if (name.rfind("blocks.", 0) == 0 && dot != std::string::npos) {
      const int b = std::stoi(name.substr(7, dot - 7));
      const int e_full = usage[b].experts;
      const std::string pre = name.substr(0, dot + 1);
      for (const char* kind : {"attn.", "mlp."}) {
        const std::string router = pre + kind + "router.weight";
        if (name == router) return take_rows(name, kept[b], d, int64_t{task} * e_full * d);
        if (name == pre + kind + "usage")
          return take_rows(name, kept[b], 1, int64_t{task} * e_full);
        const std::string experts = pre + kind + "experts.";
        if (name.rfind(experts, 0) == 0) {
          const size_t end = name.find('.', experts.size());
          const int j = std::stoi(name.substr(experts.size(), end - experts.size()));
          return LoadTensor(o->dir, o->manifest,
                            experts + std::to_string(kept[b][j]) + name.substr(end));
        }
      }
    }
    return LoadTensor(o->dir, o->manifest, name);
  };
  std::vector<std::pair<std::string, std::pair<Shape, DType>>> tensors;
  for (const ParamSpec& p : ParamSpecs(*m))
    tensors.push_back({p.name, {Shape(p.shape.begin(), p.shape.end()), DType::kF32}});
  for (const ParamSpec& p : BufferSpecs(*m))
    tensors.push_back({p.name, {Shape(p.shape.begin(), p.shape.end()), DType::kF32}});
  CheckpointManifest state = o->manifest;
  state.clear_files();
  state.clear_tensors();
  std::string text;
  google::protobuf::TextFormat::PrintToString(config, &text);
  state.set_config(text);
  state.set_optimizer_state(false);
  SaveResult r;
  s = WriteAsRanks(out, state, *m, 1, tensors, source, &r);
  if (!s.ok()) return Fail(cmd, s.message(), kExitFailure);
  s = WriteFileAtomically(out + "/config.pbtxt", "# Extracted by moerun extract from " + o->dir +
                                                     ", task '" + ms.tasks(task).name() + "'.\n" +
                                                     text);
  if (!s.ok()) return Fail(cmd, s.message(), kExitFailure);
  const int64_t params = CountParameters(*m).total, full_params = CountParameters(full).total;
  nlohmann::json experts = nlohmann::json::array();
  for (int b = 0; b < full.num_layers(); ++b) {
    experts.push_back({{"layer", usage[b].layer}, {"kept", kept[b]}, {"of", usage[b].experts}});
  }
  PrintJsonLine({{"event", "extract"},
                 {"checkpoint", o->dir},
                 {"task", ms.tasks(task).name()},
                 {"out", r.path},
                 {"config", out + "/config.pbtxt"},
                 {"parameters", params},
                 {"full_parameters", full_params},
                 {"fraction", static_cast<double>(params) / full_params},
                 {"thresh", thresh},
                 {"experts", experts}});
  std::fprintf(stderr,
               "moerun extract: task '%s': %lld parameters (the full model: %lld, %.1f%%); "
               "evaluate with: moerun eval --config %s/config.pbtxt --model %s\n",
               ms.tasks(task).name().c_str(), static_cast<long long>(params),
               static_cast<long long>(full_params), 100.0 * params / full_params, out.c_str(),
               r.path.c_str());
  return kExitOk;
}

}  // namespace

int RunCheckpointCommand(const std::string& command, const std::vector<std::string>& args,
                         ProgramArgs program) {
  GlobalOptions global;
  po::options_description desc("Options");
  po::positional_options_description positional;
  po::variables_map vm;
  std::string path, in, out, config_path, action, task;
  double thresh = 3.0;
  std::vector<std::string> overrides;
  int ranks = 1;
  bool show_config = false, with_optimizer = false, force = false;
  std::string synopsis, about;
  if (command == "checkpoint") {
    desc.add_options()                                                                           //
        ("action", po::value(&action)->required(), "info or verify")                             //
        ("path", po::value(&path)->required(), "a checkpoint directory, or a root with LATEST")  //
        ("show-config", po::bool_switch(&show_config), "info: also print the stored config");
    positional.add("action", 1).add("path", 1);
    synopsis = "moerun checkpoint info|verify PATH [--show-config]";
    about =
        "info: one JSON line summarising a checkpoint (step, ranks, tensors, bytes, data\n"
        "position, versions). verify: re-reads every file and piece and checks sizes and\n"
        "CRC-32C checksums; exit 1 naming the first bad file and tensor.";
  } else if (command == "export") {
    desc.add_options()                                                                            //
        ("checkpoint", po::value(&in)->required(), "checkpoint directory (or root with LATEST)")  //
        ("out", po::value(&out)->required(), "the safetensors file to write")                     //
        ("with-optimizer", po::bool_switch(&with_optimizer),
         "also write the AdamW moments (optimizer.m.*, optimizer.v.*)")  //
        ("force", po::bool_switch(&force), "replace --out if it exists");
    synopsis = "moerun export --checkpoint D --out model.safetensors";
    about =
        "Writes one safetensors file with every parameter under its global name and the\n"
        "config in __metadata__ (loadable with Python's safetensors package).";
  } else if (command == "import") {
    desc.add_options()                                                                    //
        ("in", po::value(&in)->required(), "a safetensors file with global names")        //
        ("config", po::value(&config_path)->required(), "the model's config")             //
        ("override,o", po::value(&overrides)->composing(), "key=value config override")   //
        ("out", po::value(&out)->required(), "checkpoint root to write (step_00000000)")  //
        ("ranks", po::value(&ranks)->default_value(1), "shards to write (rank layout)");
    synopsis = "moerun import --in model.safetensors --config C --out D [--ranks Q]";
    about =
        "Makes a checkpoint (step 0, fresh optimizer) from a safetensors file, to train or\n"
        "fine-tune from with 'moerun train --resume D'.";
  } else if (command == "usage") {
    desc.add_options()                                                                            //
        ("checkpoint", po::value(&in)->required(), "checkpoint directory (or root with LATEST)")  //
        ("out", po::value(&out), "directory for the report (default <checkpoint>/usage)");
    synopsis = "moerun usage --checkpoint D [--out DIR]";
    about =
        "Mod-Squad expert usage from a checkpoint's usage statistics: per MoE layer a heatmap\n"
        "PNG (tasks x experts, percent) and a CSV, the task-similarity matrix (PNG, CSV), and\n"
        "one JSON line with the mean per-task usage entropy (bits; lower: sharper).";
  } else if (command == "extract") {
    desc.add_options()                                                                            //
        ("checkpoint", po::value(&in)->required(), "checkpoint directory (or root with LATEST)")  //
        ("task", po::value(&task)->required(), "the task's name (or its index)")                  //
        ("out", po::value(&out)->required(), "checkpoint directory to write (must not exist)")    //
        ("thresh", po::value(&thresh)->default_value(3.0),
         "keep expert e when its usage u[t,e] (percent) > thresh / k");
    synopsis = "moerun extract --checkpoint D --task T --out D2 [--thresh 3]";
    about =
        "Cuts a standalone single-task model out of a Mod-Squad checkpoint\n"
        "(shared/specs/modsquad.md): per MoE layer the experts the task uses (at least k),\n"
        "the task's router rows for them, its task embedding and head, all dense weights.\n"
        "Writes a 1-rank checkpoint and D2/config.pbtxt; evaluate it with\n"
        "'moerun eval --config D2/config.pbtxt --model D2'.";
  } else {
    desc.add_options()                                                                        //
        ("in", po::value(&in)->required(), "checkpoint directory (or root with LATEST)")      //
        ("ranks", po::value(&ranks)->required(), "the rank count to lay the shards out for")  //
        ("out", po::value(&out)->required(), "checkpoint root to write");
    synopsis = "moerun reshard --in D --ranks Q --out D2";
    about =
        "Rewrites a checkpoint as Q ranks would have written it (each rank's experts and its\n"
        "share of the dense tensors in its own shard). Any rank count that holds the\n"
        "experts can also load the original directly; this is for locality.";
  }
  AddGlobalOptions(&desc, &global);
  const std::string cmd = "moerun " + command;
  if (auto done = ParseArgs(cmd, synopsis, about, args, desc, &positional, &vm)) return *done;
  if (!IsRankZeroFromEnvironment()) return kExitOk;  // offline tools: one process does it
  if (command == "checkpoint") {
    if (action == "info") return Info(path, show_config);
    if (action == "verify") return Verify(path);
    return Fail(cmd, "unknown action '" + action + "'; use info or verify", kExitUsage);
  }
  if (command == "export") return Export(in, out, with_optimizer, force);
  if (command == "usage") return Usage(in, out);
  if (command == "extract") return Extract(in, task, out, thresh);
  if (ranks < 1) return Fail(cmd, "--ranks must be at least 1", kExitUsage);
  if (command == "import") return Import(in, config_path, overrides, out, ranks);
  return Reshard(in, ranks, out);
}

}  // namespace moerun
