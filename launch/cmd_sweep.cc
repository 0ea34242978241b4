// moerun sweep: runs a grid of training runs (rank counts x config overrides), one job per
// point through mpirun (or srun inside a Slurm allocation), evaluates each trained model
// at several inference capacity factors, and writes one CSV row per point plus PNG plots.
// A sweep directory is resumable: finished points are kept, an interrupted point resumes
// from its own checkpoints.
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cmath>
#include <filesystem>
#include <fstream>
#include <iomanip>
#include <iostream>
#include <map>
#include <sstream>

#include "launch/commands.h"
#include "model/vit_spec.h"
#include "runtime/backend.h"
#include "runtime/config.h"

namespace moerun {
namespace {

namespace fs = std::filesystem;

struct Axis {
  std::string key;  // "ranks" or a config field path
  std::vector<std::string> values;
};

struct Point {
  int index = 0;
  int ranks = 1;
  std::vector<std::pair<std::string, std::string>> overrides;  // config axes of this point
  std::string id() const {
    std::ostringstream o;
    o << "p" << std::setw(3) << std::setfill('0') << index;
    return o.str();
  }
  std::string label() const {
    std::string s = "ranks=" + std::to_string(ranks);
    for (const auto& [k, v] : overrides) s += " " + k + "=" + v;
    return s;
  }
};

std::string Trim(const std::string& s) {
  const size_t a = s.find_first_not_of(" \t\r"), b = s.find_last_not_of(" \t\r");
  return a == std::string::npos ? "" : s.substr(a, b - a + 1);
}

// Items of a `sep`-separated list, trimmed; empty items left out.
std::vector<std::string> SplitList(const std::string& s, char sep) {
  std::vector<std::string> out;
  std::string cur;
  std::istringstream in(s);
  while (std::getline(in, cur, sep)) {
    if (!Trim(cur).empty()) out.push_back(Trim(cur));
  }
  return out;
}

// "key=v1,v2,v3"
StatusOr<Axis> ParseAxis(const std::string& text, const std::string& where) {
  const size_t eq = text.find('=');
  if (eq == std::string::npos || Trim(text.substr(0, eq)).empty()) {
    return Status::Error(where + "'" + text +
                         "': a grid axis is key=v1,v2,... (e.g. ranks=1,2,4 "
                         "or model.moe.capacity_factor=0.5,1,1.25)");
  }
  Axis a;
  a.key = Trim(text.substr(0, eq));
  a.values = SplitList(text.substr(eq + 1), ',');
  if (a.values.empty()) return Status::Error(where + "'" + text + "': the axis has no values");
  for (size_t i = 0; i < a.values.size(); ++i) {
    for (size_t j = 0; j < i; ++j) {
      if (a.values[i] == a.values[j]) {
        return Status::Error(where + "'" + text + "': value '" + a.values[i] + "' is repeated");
      }
    }
  }
  if (a.key == "ranks") {
    for (const std::string& v : a.values) {
      char* end = nullptr;
      const long r = std::strtol(v.c_str(), &end, 10);
      if (*end != '\0' || r < 1 || r > 4096) {
        return Status::Error(where + "ranks value '" + v + "': must be a whole number 1..4096");
      }
    }
  }
  return a;
}

// One argument for /bin/sh.
std::string ShellQuote(const std::string& s) {
  std::string out = "'";
  for (char c : s) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

std::string Join(const std::vector<std::string>& v) {
  std::string s;
  for (const std::string& a : v) s += (s.empty() ? "" : " ") + ShellQuote(a);
  return s;
}

// Runs `argv` with stdout to `out_path` and stderr to `err_path` (the same file when
// equal); returns the exit code (128 + signal when killed).
int RunProcess(const std::vector<std::string>& argv, const std::string& out_path,
               const std::string& err_path) {
  std::string cmd = Join(argv) + " >" + ShellQuote(out_path);
  cmd += err_path == out_path ? " 2>&1" : " 2>" + ShellQuote(err_path);
  const int status = std::system(cmd.c_str());
  if (status == -1) return 127;
  if (WIFEXITED(status)) return WEXITSTATUS(status);
  if (WIFSIGNALED(status)) return 128 + WTERMSIG(status);
  return 1;
}

std::string SelfPath() {
  std::error_code ec;
  fs::path p = fs::read_symlink("/proc/self/exe", ec);
  return ec ? std::string("moerun") : p.string();
}

// The launcher prefix a point's job starts with ("-np P" / "-n P" is appended).
std::vector<std::string> LauncherPrefix(const std::string& launcher, const std::string& self,
                                        std::string* described) {
  if (launcher != "auto") {
    *described = launcher;
    return SplitList(launcher, ' ');
  }
  if (std::getenv("SLURM_JOB_ID") != nullptr) {
    *described = "srun (inside Slurm allocation " + std::string(std::getenv("SLURM_JOB_ID")) + ")";
    return {"srun", "--mpi=pmix", "--kill-on-bad-exit=1"};
  }
  // build/moerun -> cluster/mpirun-local of the same source tree.
  const fs::path local = fs::path(self).parent_path().parent_path() / "cluster" / "mpirun-local";
  if (fs::exists(local)) {
    *described = local.string();
    return {local.string()};
  }
  *described = "mpirun --oversubscribe";
  return {"mpirun", "--oversubscribe"};
}

std::string PlotScript(const std::string& self) {
  const fs::path p = fs::path(self).parent_path().parent_path() / "launch" / "sweep_plots.py";
  return fs::exists(p) ? p.string() : "";
}

StatusOr<nlohmann::json> ReadJson(const std::string& path) {
  std::ifstream in(path);
  if (!in) return Status::Error("cannot read " + path);
  nlohmann::json j = nlohmann::json::parse(in, nullptr, false);
  if (j.is_discarded()) return Status::Error(path + " is not valid JSON");
  return j;
}

Status WriteFileAtomic(const std::string& path, const std::string& text) {
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp, std::ios::trunc);
    out << text;
    out.flush();
    if (!out) return Status::Error("cannot write " + tmp + ": " + std::strerror(errno));
  }
  std::error_code ec;
  fs::rename(tmp, path, ec);
  if (ec) return Status::Error("cannot rename " + tmp + " to " + path + ": " + ec.message());
  return Status::Ok();
}

// The last "final" and "train" events of a metrics.jsonl.
void ReadMetrics(const std::string& path, nlohmann::json* final_line, nlohmann::json* last_train) {
  std::ifstream in(path);
  for (std::string line; std::getline(in, line);) {
    nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
    if (j.is_discarded() || !j.is_object()) continue;
    const std::string e = j.value("event", "");
    if (e == "final") *final_line = j;
    if (e == "train") *last_train = j;
  }
}

std::string Num(const nlohmann::json& j, const char* key, int precision = 6) {
  if (!j.is_object() || !j.contains(key) || !j[key].is_number()) return "";
  std::ostringstream o;
  o << std::setprecision(precision) << j[key].get<double>();
  return o.str();
}

std::string CsvField(const std::string& s) {
  if (s.find_first_of(",\"\n") == std::string::npos) return s;
  std::string q = "\"";
  for (char c : s) q += c == '"' ? std::string("\"\"") : std::string(1, c);
  return q + "\"";
}

// sweep.csv and eval_capacity.csv from every finished point's result.json.
Status WriteCsvs(const std::string& out, const std::vector<Point>& points,
                 const std::vector<Axis>& axes) {
  std::ostringstream csv, ev;
  std::vector<std::string> keys;
  for (const Axis& a : axes) {
    if (a.key != "ranks") keys.push_back(a.key);
  }
  csv << "point,status,ranks";
  ev << "point,ranks";
  for (const std::string& k : keys) csv << "," << CsvField(k), ev << "," << CsvField(k);
  csv << ",steps,global_batch,images_per_s,tokens_per_s,step_ms,router_ms,dispatch_a2a_ms,"
         "experts_ms,combine_ms,dense_ms,grad_reduce_ms,optimizer_ms,data_ms,dropped_fraction,"
         "peak_rss_mib,train_loss,test_accuracy,test_loss,train_s\n";
  ev << ",eval_capacity_factor,test_accuracy,test_loss,dropped_fraction\n";
  for (const Point& p : points) {
    const std::string path = out + "/points/" + p.id() + "/result.json";
    if (!fs::exists(path)) continue;
    StatusOr<nlohmann::json> r = ReadJson(path);
    if (!r.ok()) return r.status();
    const nlohmann::json& f = (*r)["final"];
    const nlohmann::json& ms =
        f.is_object() && f.contains("step_ms") ? f["step_ms"] : nlohmann::json();
    csv << p.id() << "," << r->value("status", "?") << "," << p.ranks;
    for (const auto& [k, v] : p.overrides) csv << "," << CsvField(v);
    csv << "," << Num(f, "steps") << "," << Num(*r, "global_batch") << "," << Num(f, "images_per_s")
        << "," << Num(f, "tokens_per_s") << "," << Num(ms, "total") << "," << Num(ms, "router")
        << "," << Num(ms, "dispatch_a2a") << "," << Num(ms, "experts") << "," << Num(ms, "combine")
        << "," << Num(ms, "dense") << "," << Num(ms, "grad_reduce") << "," << Num(ms, "optimizer")
        << "," << Num(ms, "data") << "," << Num(f, "dropped_fraction") << ","
        << Num(f, "peak_rss_mib") << "," << Num((*r)["last_train"], "loss") << ","
        << Num(f, "test_accuracy") << "," << Num(f, "test_loss") << "," << Num(f, "train_s")
        << "\n";
    if (r->contains("evals")) {
      for (const nlohmann::json& e : (*r)["evals"]) {
        double dropped = 0;
        if (e.contains("dropped_fraction") && e["dropped_fraction"].is_array() &&
            !e["dropped_fraction"].empty()) {
          for (const auto& d : e["dropped_fraction"]) dropped += d.get<double>();
          dropped /= e["dropped_fraction"].size();
        }
        ev << p.id() << "," << p.ranks;
        for (const auto& [k, v] : p.overrides) ev << "," << CsvField(v);
        ev << "," << Num(e, "capacity_factor") << "," << Num(e, "test_accuracy") << ","
           << Num(e, "test_loss") << "," << std::setprecision(6) << dropped << "\n";
      }
    }
  }
  MOERUN_RETURN_IF_ERROR(WriteFileAtomic(out + "/sweep.csv", csv.str()));
  return WriteFileAtomic(out + "/eval_capacity.csv", ev.str());
}

int Plots(const std::string& self, const std::string& out, const std::string& script_flag) {
  const std::string script = script_flag.empty() ? PlotScript(self) : script_flag;
  if (script.empty()) {
    std::cerr << "moerun sweep: warning: launch/sweep_plots.py not found next to this binary; "
                 "no plots (the CSVs are in "
              << out << "; give --plot-script)\n";
    return kExitOk;
  }
  // The first Python that has Matplotlib: $MOERUN_PYTHON, python3 on PATH, Debian's own.
  std::string python = "python3";
  std::vector<std::string> candidates = {"python3", "/usr/bin/python3"};
  if (const char* env = std::getenv("MOERUN_PYTHON")) candidates.insert(candidates.begin(), env);
  for (const std::string& c : candidates) {
    if (RunProcess({c, "-c", "import matplotlib"}, "/dev/null", "/dev/null") == 0) {
      python = c;
      break;
    }
  }
  const int rc = RunProcess({python, script, out}, out + "/plots.log", out + "/plots.log");
  std::ifstream log(out + "/plots.log");
  std::cerr << log.rdbuf();
  if (rc != 0) {
    std::cerr << "moerun sweep: warning: plotting failed (exit " << rc
              << "; see above; Matplotlib comes with the Debian package python3-matplotlib or "
                 "'pip install matplotlib'); the CSVs are complete\n";
  }
  return kExitOk;
}

}  // namespace

int RunSweep(const std::vector<std::string>& args, ProgramArgs program) {
  (void)program;
  std::string config_path, spec_path, out, launcher = "auto", eval_list, plot_script,
                                           device = "cpu";
  std::vector<std::string> grids, overrides;
  int64_t steps = 0;
  bool dry = false, plots_only = false;
  po::options_description desc("Options");
  desc.add_options()                                                              //
      ("config,c", po::value(&config_path), "the base config (configs/*.pbtxt)")  //
      ("grid,g", po::value(&grids)->composing(),
       "an axis key=v1,v2,... (repeatable): 'ranks' or any config field, e.g. "
       "model.moe.capacity_factor=0.5,1,1.25; points are the product of the axes")  //
      ("spec", po::value(&spec_path),
       "a file of axes, one key=v1,v2,... per line ('#' comments), instead of / beside --grid")  //
      ("override,o", po::value(&overrides)->composing(),
       "key=value applied to every point (repeatable)")  //
      ("steps", po::value(&steps)->default_value(0),
       "training steps per point (0: the config's)")  //
      ("eval-capacities", po::value(&eval_list),
       "comma-separated inference capacity factors each trained model is evaluated at, e.g. "
       "0.25,0.5,1,1.5 (test accuracy vs capacity, vanilla vs BPR)")                     //
      ("out", po::value(&out), "the sweep directory (default runs/sweep_<model name>)")  //
      ("launcher", po::value(&launcher)->default_value("auto"),
       "what starts a point's ranks, '-np P' appended: auto = srun inside a Slurm "
       "allocation, else cluster/mpirun-local of this source tree, else mpirun")  //
      ("plot-script", po::value(&plot_script),
       "the plotting script (default launch/sweep_plots.py)")  //
      ("plots-only", po::bool_switch(&plots_only),
       "redraw the CSVs and plots of --out and stop")  //
      ("device", po::value(&device)->default_value("cpu"),
       "where every point's train and eval run: cpu, or cuda (passed on as --device cuda: a "
       "GPU per rank)")                                                                       //
      ("dry-run", po::bool_switch(&dry), "print the points and their commands, run nothing")  //
      ("help,h", "show this help");
  po::positional_options_description positional;
  positional.add("config", 1);
  po::variables_map vm;
  if (auto done = ParseArgs(
          "moerun sweep",
          "moerun sweep --config C --grid ranks=1,2 --grid model.moe.capacity_factor=0.5,1 "
          "[--steps N] [--eval-capacities 0.5,1] [--out DIR]",
          "Runs an experiment grid: one training job per point (the product of the axes; "
          "'ranks' starts\nthat many ranks), each evaluated at --eval-capacities, and writes "
          "DIR/sweep.csv (one row per\npoint: inputs, images/s, tokens/s, step time split into "
          "router / dispatch all-to-all /\nexperts / combine / dense / gradient reduce / "
          "optimizer / data, drop rate, peak memory, loss,\naccuracy), DIR/eval_capacity.csv "
          "and PNG plots (DIR/*.png, Matplotlib). Rerunning the same\ncommand resumes: finished "
          "points are kept, an interrupted point resumes from its checkpoints.",
          args, desc, &positional, &vm))
    return *done;
  const std::string cmd = "moerun sweep";
  if (device != "cpu" && device != "cuda") {
    PrintError(cmd, "--device " + device + ": use cpu or cuda");
    return kExitUsage;
  }
  // Axes from --spec and --grid.
  std::vector<Axis> axes;
  if (!spec_path.empty()) {
    std::ifstream in(spec_path);
    if (!in) {
      PrintError(cmd, "cannot read --spec " + spec_path + ": " + std::strerror(errno));
      return kExitUsage;
    }
    int n = 0;
    for (std::string line; std::getline(in, line);) {
      ++n;
      const size_t hash = line.find('#');
      if (hash != std::string::npos) line.resize(hash);
      if (line.find_first_not_of(" \t\r") == std::string::npos) continue;
      StatusOr<Axis> a =
          ParseAxis(SplitList(line, '\r')[0], spec_path + ":" + std::to_string(n) + ": ");
      if (!a.ok()) {
        PrintError(cmd, a.status().message());
        return kExitUsage;
      }
      axes.push_back(*a);
    }
  }
  for (const std::string& g : grids) {
    StatusOr<Axis> a = ParseAxis(g, "--grid ");
    if (!a.ok()) {
      PrintError(cmd, a.status().message());
      return kExitUsage;
    }
    axes.push_back(*a);
  }
  for (size_t i = 0; i < axes.size(); ++i) {
    for (size_t j = 0; j < i; ++j) {
      if (axes[i].key == axes[j].key) {
        PrintError(cmd, "axis '" + axes[i].key + "' is given twice; give each axis once");
        return kExitUsage;
      }
    }
  }
  if (config_path.empty()) {
    PrintError(cmd, "--config is required");
    return kExitUsage;
  }
  if (steps < 0) {
    PrintError(cmd, "--steps must be >= 0");
    return kExitUsage;
  }
  std::vector<double> eval_cfs;
  for (const std::string& v : SplitList(eval_list, ',')) {
    char* end = nullptr;
    const double c = std::strtod(v.c_str(), &end);
    if (*end != '\0' || !std::isfinite(c) || c <= 0 || c > 1000) {
      PrintError(cmd, "--eval-capacities value '" + v + "': must be a number in (0, 1000]");
      return kExitUsage;
    }
    eval_cfs.push_back(c);
  }
  std::vector<std::string> base_overrides = overrides;
  if (steps > 0) base_overrides.push_back("train.steps=" + std::to_string(steps));

  // The points, each checked as a config before anything runs.
  std::vector<Point> points(1);
  for (const Axis& a : axes) {
    std::vector<Point> next;
    for (const Point& p : points) {
      for (const std::string& v : a.values) {
        Point q = p;
        if (a.key == "ranks") {
          q.ranks = std::stoi(v);
        } else {
          q.overrides.push_back({a.key, v});
        }
        next.push_back(q);
      }
    }
    points = std::move(next);
  }
  std::string model_name;
  std::vector<int64_t> global_batch(points.size());
  for (size_t i = 0; i < points.size(); ++i) {
    Point& p = points[i];
    p.index = static_cast<int>(i) + 1;
    std::vector<std::string> o = base_overrides;
    for (const auto& [k, v] : p.overrides) o.push_back(k + "=" + v);
    StatusOr<Config> c = LoadConfig(config_path, o);
    if (!c.ok()) {
      PrintError(cmd, "point " + p.label() + ": " + c.status().message());
      return kExitUsage;
    }
    Status placed = CheckPlacement(c->model(), p.ranks);
    if (placed.ok() && c->train().global_batch() % p.ranks != 0) {
      placed = Status::Error("train.global_batch " + std::to_string(c->train().global_batch()) +
                             " does not split over " + std::to_string(p.ranks) + " ranks");
    }
    if (!placed.ok()) {
      PrintError(cmd, "point " + p.label() + ": " + placed.message());
      return kExitUsage;
    }
    model_name = c->model().name();
    global_batch[i] = c->train().global_batch();
  }
  if (out.empty()) out = "runs/sweep_" + model_name;
  const std::string self = SelfPath();
  std::string launcher_text;
  const std::vector<std::string> prefix = LauncherPrefix(launcher, self, &launcher_text);
  const bool slurm = !prefix.empty() && prefix[0] == "srun";
  // Points started here need a GPU here; srun's land on the allocation's nodes, which the
  // points themselves check (exit 3). A dry run only prints.
  if (device == "cuda" && !slurm && !dry && CudaDeviceCount() == 0) {
    PrintError(cmd, "--device cuda: this host has no visible CUDA device (" + CudaBackendSummary() +
                        "); run the sweep on a GPU node (or inside a Slurm allocation with "
                        "GPUs), or use --device cpu");
    return kExitUnavailable;
  }

  // What defines the sweep: a rerun must match it.
  nlohmann::json def = {{"config", fs::absolute(config_path).string()},
                        {"overrides", base_overrides},
                        {"eval_capacities", eval_cfs}};
  if (device != "cpu") def["device"] = device;  // absent on cpu: earlier sweeps still resume
  nlohmann::json jaxes = nlohmann::json::array();
  for (const Axis& a : axes) jaxes.push_back({{"key", a.key}, {"values", a.values}});
  def["axes"] = jaxes;
  {
    std::ifstream cf(config_path);
    std::stringstream text;
    text << cf.rdbuf();
    def["config_text"] = text.str();
  }

  auto command_for = [&](const Point& p, bool train_cmd) {
    std::vector<std::string> argv = prefix;
    argv.push_back(slurm ? "-n" : "-np");
    argv.push_back(std::to_string(p.ranks));
    argv.push_back(self);
    argv.push_back(train_cmd ? "train" : "eval");
    if (device != "cpu") argv.push_back("--device"), argv.push_back(device);
    argv.push_back("--config");
    argv.push_back(fs::absolute(config_path).string());
    std::vector<std::string> o = base_overrides;
    for (const auto& [k, v] : p.overrides) o.push_back(k + "=" + v);
    const std::string dir = fs::absolute(out).string() + "/points/" + p.id();
    o.push_back("train.out_dir=" + dir + "/run");
    for (const std::string& x : o) argv.push_back("-o"), argv.push_back(x);
    if (!train_cmd) {
      argv.push_back("--model");
      argv.push_back(dir + "/run/checkpoints");
      std::string list;
      for (double c : eval_cfs) {
        std::ostringstream s;
        s << c;
        list += (list.empty() ? "" : ",") + s.str();
      }
      argv.push_back("--capacity-factor");
      argv.push_back(list);
    }
    return argv;
  };

  if (dry) {
    std::cout << points.size() << " point(s); launcher " << launcher_text << "; out " << out
              << "\n";
    for (const Point& p : points) {
      std::cout << p.id() << "  " << p.label() << "\n  " << Join(command_for(p, true)) << "\n";
      if (!eval_cfs.empty()) std::cout << "  " << Join(command_for(p, false)) << "\n";
    }
    return kExitOk;
  }

  std::error_code ec;
  fs::create_directories(out + "/points", ec);
  if (ec) {
    PrintError(cmd, "cannot create " + out + "/points: " + ec.message());
    return kExitFailure;
  }
  const std::string def_path = out + "/sweep.json";
  if (fs::exists(def_path)) {
    StatusOr<nlohmann::json> old = ReadJson(def_path);
    if (!old.ok() || *old != def) {
      PrintError(
          cmd,
          out + " holds a sweep with other settings (" + def_path +
              " differs: config, its text, axes, --override/--steps, "
              "--eval-capacities or --device); rerun with the same arguments to resume it, or give "
              "another --out");
      return kExitUsage;
    }
  } else {
    Status s = WriteFileAtomic(def_path, def.dump(2) + "\n");
    if (!s.ok()) {
      PrintError(cmd, s.message());
      return kExitFailure;
    }
  }
  if (plots_only) {
    Status s = WriteCsvs(out, points, axes);
    if (!s.ok()) {
      PrintError(cmd, s.message());
      return kExitFailure;
    }
    return Plots(self, out, plot_script);
  }

  std::cerr << "moerun sweep: " << points.size() << " point(s) of " << config_path << ", launcher "
            << launcher_text << ", results in " << out << "\n";
  int failed = 0, skipped = 0;
  const auto sweep_start = std::chrono::steady_clock::now();
  for (size_t i = 0; i < points.size(); ++i) {
    const Point& p = points[i];
    const std::string dir = out + "/points/" + p.id();
    const std::string tag = "[" + std::to_string(p.index) + "/" + std::to_string(points.size()) +
                            "] " + p.id() + " " + p.label();
    if (fs::exists(dir + "/result.json")) {
      StatusOr<nlohmann::json> r = ReadJson(dir + "/result.json");
      if (r.ok() && r->value("status", "") == "ok") {
        std::cerr << tag << ": done in an earlier run, kept\n";
        ++skipped;
        continue;
      }
    }
    fs::create_directories(dir, ec);
    const auto t0 = std::chrono::steady_clock::now();
    nlohmann::json result = {
        {"point", p.id()}, {"ranks", p.ranks}, {"global_batch", global_batch[i]}};
    for (const auto& [k, v] : p.overrides) result["inputs"][k] = v;
    nlohmann::json final_line, last_train;
    int rc = 0;
    // Training finished in an earlier run (stopped before its evaluation): keep it.
    StatusOr<nlohmann::json> trained = ReadJson(dir + "/train_final.json");
    if (fs::exists(dir + "/train_final.json") && trained.ok()) {
      std::cerr << tag << ": trained in an earlier run; evaluating\n" << std::flush;
      final_line = (*trained)["final"];
      last_train = (*trained)["last_train"];
    } else {
      std::cerr << tag << ": training (log " << dir << "/train.log)\n" << std::flush;
      rc = RunProcess(command_for(p, true), dir + "/train.log", dir + "/train.log");
      ReadMetrics(dir + "/run/metrics.jsonl", &final_line, &last_train);
      if (rc == 0 && final_line.is_object() && !final_line.value("interrupted", false)) {
        const nlohmann::json t = {{"final", final_line}, {"last_train", last_train}};
        Status s = WriteFileAtomic(dir + "/train_final.json", t.dump(2) + "\n");
        if (!s.ok()) {
          PrintError(cmd, s.message());
          return kExitFailure;
        }
      }
    }
    if (rc == 0 && final_line.is_object() && !final_line.value("interrupted", false)) {
      result["final"] = final_line;
      result["last_train"] = last_train;
      result["status"] = "ok";
      if (!eval_cfs.empty()) {
        const int erc = RunProcess(command_for(p, false), dir + "/eval.jsonl", dir + "/eval.log");
        nlohmann::json evals = nlohmann::json::array();
        std::ifstream in(dir + "/eval.jsonl");
        for (std::string line; std::getline(in, line);) {
          nlohmann::json j = nlohmann::json::parse(line, nullptr, false);
          if (!j.is_discarded() && j.value("event", "") == "eval") evals.push_back(j);
        }
        result["evals"] = evals;
        if (erc != 0) result["status"] = "eval failed (exit " + std::to_string(erc) + ")";
      }
    } else if (final_line.is_object() && final_line.value("interrupted", false)) {
      std::cerr << tag << ": interrupted (" << final_line.value("signal", "signal")
                << "); its checkpoint is kept: rerun the same command to resume the sweep\n";
      return kExitFailure;
    } else {
      result["status"] = "train failed (exit " + std::to_string(rc) + ")";
    }
    const double secs =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    result["wall_s"] = secs;
    Status s = WriteFileAtomic(dir + "/result.json", result.dump(2) + "\n");
    if (s.ok()) s = WriteCsvs(out, points, axes);
    if (!s.ok()) {
      PrintError(cmd, s.message());
      return kExitFailure;
    }
    if (result["status"] != "ok") {
      ++failed;
      std::cerr << tag << ": " << result["status"].get<std::string>() << "; the end of " << dir
                << "/train.log:\n";
      // The log's last lines, without mpirun's boxed notices (between lines of dashes).
      std::ifstream log(dir + "/train.log");
      std::vector<std::string> lines;
      bool boxed = false;
      for (std::string line; std::getline(log, line);) {
        if (line.rfind("-----", 0) == 0) {
          boxed = !boxed;
          continue;
        }
        if (!boxed && !Trim(line).empty()) lines.push_back(line);
      }
      for (size_t k = lines.size() > 8 ? lines.size() - 8 : 0; k < lines.size(); ++k) {
        std::cerr << "    " << lines[k] << "\n";
      }
      continue;
    }
    std::ostringstream o;
    o << std::fixed << std::setprecision(0) << secs
      << " s: " << final_line.value("images_per_s", 0.0) << " img/s, test " << std::setprecision(2)
      << 100 * final_line.value("test_accuracy", 0.0) << "%, dropped " << std::setprecision(1)
      << 100 * final_line.value("dropped_fraction", 0.0) << "%";
    if (!eval_cfs.empty()) o << ", " << result["evals"].size() << " evaluation(s)";
    const double done_s =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - sweep_start).count();
    const size_t ran = i + 1 - skipped;
    o << "; about " << std::setprecision(0) << done_s / ran * (points.size() - i - 1) << " s left";
    std::cerr << tag << ": " << o.str() << "\n" << std::flush;
  }
  const int plot_rc = Plots(self, out, plot_script);
  std::cerr << "moerun sweep: " << points.size() - failed << "/" << points.size()
            << " point(s) ok (" << skipped << " from an earlier run); " << out << "/sweep.csv, "
            << out << "/eval_capacity.csv\n";
  PrintJsonLine({{"event", "sweep"},
                 {"points", points.size()},
                 {"failed", failed},
                 {"kept", skipped},
                 {"csv", out + "/sweep.csv"},
                 {"eval_csv", out + "/eval_capacity.csv"}});
  if (failed > 0) return kExitFailure;
  return plot_rc;
}

}  // namespace moerun
