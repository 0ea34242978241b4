// moerun train / eval / plan: the commands that take a model config.
#include <cmath>
#include <filesystem>
#include <iomanip>
#include <iostream>
#include <sstream>

#include "launch/commands.h"
#include "model/vit_spec.h"
#include "runtime/config.h"
#include "runtime/process.h"

namespace moerun {
namespace {

std::string WithCommas(int64_t v) {
  std::string s = std::to_string(v);
  for (int i = static_cast<int>(s.size()) - 3; i > (v < 0 ? 1 : 0); i -= 3) s.insert(i, ",");
  return s;
}

struct PlanOptions {
  int ranks = 1;
  int64_t micro_batch = 0;  // images per rank; 0: train.global_batch / ranks
  std::string precision = "fp32";
  double device_gib = 80;
  bool json = false;
  // The projection's assumed rates: achieved TFLOP/s per GPU, effective all-to-all GB/s per
  // GPU per named class, ring all-reduce bus GB/s.
  double tflops = 400;
  std::string a2a_gbps = "nccl=25,deepep=45";
  double allreduce_gbps = 40;
};

// "name=gbps,name=gbps" -> pairs; empty on a malformed list.
std::vector<std::pair<std::string, double>> ParseBandwidths(const std::string& text) {
  std::vector<std::pair<std::string, double>> out;
  std::stringstream in(text);
  for (std::string item; std::getline(in, item, ',');) {
    const size_t eq = item.find('=');
    if (eq == std::string::npos || eq == 0) return {};
    char* end = nullptr;
    const double v = std::strtod(item.c_str() + eq + 1, &end);
    if (*end != '\0' || !std::isfinite(v) || v <= 0 || v > 1e6) return {};
    out.push_back({item.substr(0, eq), v});
  }
  return out;
}

std::string GiB(int64_t bytes) { return GiBString(static_cast<double>(bytes)); }

int Plan(const Config& config, const std::string& config_path, const PlanOptions& o) {
  const ModelConfig& m = config.model();
  const ParameterCounts c = CountParameters(m);
  ExpertPlacement placement{0, 0};
  if (m.has_modsquad()) {
    const Status placed = CheckPlacement(m, o.ranks);
    if (!placed.ok()) {
      PrintError("moerun plan", "--ranks " + std::to_string(o.ranks) + ": " + placed.message());
      return kExitUsage;
    }
  } else if (m.has_moe()) {
    auto placed = PlaceExperts(m.moe().num_experts(), o.ranks);
    if (!placed.ok()) {
      PrintError("moerun plan",
                 "--ranks " + std::to_string(o.ranks) + ": " + placed.status().message());
      return kExitUsage;
    }
    placement = *placed;
  }
  const bool bf16 = o.precision == "bf16";
  // The micro-batch: fixed by --micro-batch, else the global batch split over the ranks
  // (which must split evenly), for --ranks and for every candidate of the fit list alike.
  const int64_t global = config.train().global_batch();
  const bool fixed_micro = o.micro_batch > 0;
  if (!fixed_micro && global % o.ranks != 0) {
    PrintError("moerun plan", "train.global_batch " + std::to_string(global) +
                                  " does not split over --ranks " + std::to_string(o.ranks) +
                                  "; use a rank count that divides it, or give --micro-batch");
    return kExitUsage;
  }
  const int64_t micro = fixed_micro ? o.micro_batch : global / o.ranks;
  const bool bf16_moments = config.train().optimizer_moments() == TrainConfig::BF16;
  const TrainingFootprint f = EstimateFootprint(m, o.ranks, micro, bf16, bf16_moments);
  // Rank counts (powers of two) that hold the experts, split the global batch (unless the
  // micro-batch is fixed) and fit the device memory.
  nlohmann::json fits = nlohmann::json::array();
  const double limit = o.device_gib * 1073741824.0;
  for (int p = 1; p <= 4096; p *= 2) {
    if (!CheckPlacement(m, p).ok()) continue;
    if (!fixed_micro && global % p != 0) continue;
    const int64_t micro_p = fixed_micro ? o.micro_batch : global / p;
    const TrainingFootprint g = EstimateFootprint(m, p, micro_p, bf16, bf16_moments);
    fits.push_back({{"ranks", p},
                    {"micro_batch", micro_p},
                    {"bytes_per_rank", g.bytes_per_rank},
                    {"fits", g.bytes_per_rank <= limit}});
  }
  // A projection of one step on GPUs from the plan's FLOPs and bytes and assumed rates.
  const auto classes = ParseBandwidths(o.a2a_gbps);
  const double grad_elem = bf16 ? 2 : 4;
  double reduce_bytes = 0;
  if (o.ranks > 1) {
    reduce_bytes = 2.0 * (o.ranks - 1) / o.ranks * c.dense * grad_elem;
    if (placement.replicas > 1) {
      reduce_bytes += 2.0 * (placement.replicas - 1) / placement.replicas * grad_elem *
                      c.moe_layers * placement.experts_per_rank * c.per_expert;
    }
  }
  const double compute_ms = f.flops_per_image * micro / (o.tflops * 1e12) * 1e3;
  const double reduce_ms = reduce_bytes / (o.allreduce_gbps * 1e9) * 1e3;
  nlohmann::json projection = {{"note", "a projection from assumed rates, not a measurement"},
                               {"tflops_assumed", o.tflops},
                               {"allreduce_gbps_assumed", o.allreduce_gbps},
                               {"compute_ms", compute_ms},
                               {"allreduce_bytes", reduce_bytes},
                               {"allreduce_ms", reduce_ms}};
  for (const auto& [name, gbps] : classes) {
    const double a2a_ms = f.a2a_bytes_per_step / (gbps * 1e9) * 1e3;
    projection["a2a"][name] = {{"gbps_assumed", gbps},
                               {"a2a_ms", a2a_ms},
                               {"step_ms_serial", compute_ms + a2a_ms + reduce_ms},
                               {"step_ms_overlapped", std::max(compute_ms, a2a_ms + reduce_ms)}};
  }
  if (o.json) {
    PrintJsonLine({{"config", config_path},
                   {"ranks", o.ranks},
                   {"precision", o.precision},
                   {"micro_batch", micro},
                   {"params_total", c.total},
                   {"params_dense", c.dense},
                   {"params_expert", c.expert},
                   {"moe_layers", c.moe_layers},
                   {"experts_per_rank", placement.experts_per_rank},
                   {"expert_replicas", placement.replicas},
                   {"params_per_rank", f.params_per_rank},
                   {"param_bytes_per_rank", f.param_bytes},
                   {"grad_bytes_per_rank", f.grad_bytes},
                   {"optimizer_bytes_per_rank", f.optimizer_bytes},
                   {"activation_bytes_per_rank", f.activation_bytes},
                   {"bytes_per_rank", f.bytes_per_rank},
                   {"train_flops_per_image", f.flops_per_image},
                   {"a2a_bytes_per_step_per_rank", f.a2a_bytes_per_step},
                   {"device_gib", o.device_gib},
                   {"micro_batch_fixed", fixed_micro},
                   {"ranks_that_fit", fits},
                   {"projection", projection}});
    return kExitOk;
  }
  std::cout << "config            " << config_path << " (" << m.name() << ")\n"
            << "parameters        " << WithCommas(c.total) << " total\n"
            << "  dense           " << WithCommas(c.dense) << " (replicated on every rank)\n"
            << "  experts         " << WithCommas(c.expert) << " (" << c.moe_layers
            << " MoE layers)\n"
            << "ranks             " << o.ranks;
  if (m.has_modsquad()) {
    std::cout << " (Mod-Squad: " << m.modsquad().tasks_size()
              << " tasks, every image passed once per task)";
  } else if (m.has_moe()) {
    std::cout << " (" << placement.experts_per_rank << " expert(s) per rank per layer, "
              << placement.replicas << " replica(s) of each)";
  }
  std::cout << "\nper rank          " << WithCommas(f.params_per_rank) << " parameters, "
            << o.precision << ", micro-batch " << micro << " images\n"
            << "  weights         " << GiB(f.param_bytes) << "\n"
            << "  gradients       " << GiB(f.grad_bytes) << "\n"
            << "  AdamW moments   " << GiB(f.optimizer_bytes) << (bf16_moments ? " (bf16)" : "")
            << "\n"
            << "  activations     " << GiB(f.activation_bytes) << "\n"
            << "  total           " << GiB(f.bytes_per_rank) << "\n"
            << "train FLOPs       " << std::scientific << std::setprecision(3) << f.flops_per_image
            << " per image (forward + backward)\n"
            << "all-to-all        " << GiB(f.a2a_bytes_per_step) << " sent per rank per step\n"
            << "fits " << std::fixed << std::setprecision(0) << o.device_gib << " GiB at ranks:";
  const char* basis = fixed_micro ? " (micro-batch fixed at --micro-batch)"
                                  : " (global batch fixed: micro-batch = global / ranks)";
  bool any = false;
  for (const auto& e : fits) {
    if (!e["fits"].get<bool>()) continue;
    std::cout << " " << e["ranks"].get<int>();
    any = true;
  }
  std::cout << (any ? "" : " none") << basis << "\n";
  std::cout << std::fixed << std::setprecision(1)
            << "projection        NOT A MEASUREMENT: one step on " << o.ranks
            << " GPUs, micro-batch " << micro << ", " << o.precision
            << ", from the figures above and assumed rates\n"
            << "  compute         " << std::scientific << std::setprecision(3)
            << f.flops_per_image * micro << " FLOP at " << std::fixed << std::setprecision(0)
            << o.tflops << " TFLOP/s achieved (--tflops) = " << std::setprecision(1) << compute_ms
            << " ms\n"
            << "  all-to-all      " << GiB(f.a2a_bytes_per_step) << ":";
  for (const auto& [name, gbps] : classes) {
    std::cout << " " << projection["a2a"][name]["a2a_ms"].get<double>() << " ms at "
              << std::setprecision(0) << gbps << " GB/s (" << name << ")" << std::setprecision(1)
              << ";";
  }
  std::cout << " (--a2a-gbps)\n"
            << "  grad all-reduce " << GiB(static_cast<int64_t>(reduce_bytes)) << " at "
            << std::setprecision(0) << o.allreduce_gbps
            << " GB/s (--allreduce-gbps) = " << std::setprecision(1) << reduce_ms << " ms\n"
            << "  step            ";
  for (size_t i = 0; i < classes.size(); ++i) {
    const nlohmann::json& a = projection["a2a"][classes[i].first];
    std::cout << (i ? "; " : "") << classes[i].first << " " << a["step_ms_serial"].get<double>()
              << " ms serial, " << a["step_ms_overlapped"].get<double>() << " ms overlapped";
  }
  std::cout << "\n" << std::flush;
  return kExitOk;
}

}  // namespace

int RunModelCommand(const std::string& command, const std::vector<std::string>& args,
                    ProgramArgs program) {
  GlobalOptions global;
  std::string config_path;
  std::vector<std::string> overrides;
  PlanOptions plan;
  po::options_description desc("Options");
  desc.add_options()                                                                      //
      ("config,c", po::value(&config_path)->required(), "config file (configs/*.pbtxt)")  //
      ("override,o", po::value(&overrides)->composing(),
       "key=value overriding a config field, e.g. train.steps=100 or model.moe.bpr=false "
       "(repeatable)");
  std::string model_path, capacity_text = "-1", bpr_text = "-1";
  bool exact_capacity = false;
  if (command == "eval") {
    desc.add_options()  //
        ("model", po::value(&model_path)->required(),
         "a checkpoint directory (runs/<name>/checkpoints, or one step_N in it) or a "
         "safetensors file written by 'moerun export'")  //
        ("capacity-factor", po::value(&capacity_text)->default_value("-1"),
         "comma-separated inference capacity factors (-1: as trained), e.g. 0.25,0.5,1.0")  //
        ("bpr", po::value(&bpr_text)->default_value("-1"),
         "comma-separated routing modes: 0 vanilla, 1 BPR, -1 as trained")  //
        ("exact-capacity", po::bool_switch(&exact_capacity),
         "capacity ceil(S K c / E) without rounding up to model.moe.multiple_of (V-MoE "
         "keeps the rounding, the default)");
  }
  std::string checkpoint_dir, resume;
  int64_t checkpoint_every = -1, keep = -1, until_step = 0;
  double checkpoint_minutes = -1;
  bool async_checkpoint = false;
  if (command == "train") {
    desc.add_options()  //
        ("checkpoint-dir", po::value(&checkpoint_dir),
         "checkpoint directory (train.checkpoint_dir; default <out_dir>/checkpoints)")  //
        ("checkpoint-every", po::value(&checkpoint_every),
         "save every N steps (train.checkpoint_every; 0: only at the end and when stopped)")  //
        ("checkpoint-every-minutes", po::value(&checkpoint_minutes),
         "also save every M minutes (train.checkpoint_every_minutes)")  //
        ("keep", po::value(&keep),
         "keep the newest K checkpoints (train.keep_checkpoints, default 3; 0: all)")  //
        ("resume", po::value(&resume),
         "auto (default: from <checkpoint-dir>/LATEST when present), never, or a checkpoint "
         "directory (also one written by another rank count, or by 'moerun import')")  //
        ("async-checkpoint", po::bool_switch(&async_checkpoint),
         "write checkpoints on a background thread from a host snapshot "
         "(train.checkpoint_async)")  //
        ("until-step", po::value(&until_step)->default_value(0),
         "stop after this step and save (the schedule still spans train.steps); 0: run to "
         "the end");
  }
  if (command == "plan") {
    desc.add_options()                                                                            //
        ("ranks", po::value(&plan.ranks)->default_value(1), "expert-parallel ranks to plan for")  //
        ("micro-batch", po::value(&plan.micro_batch)->default_value(0),
         "images per rank (0: train.global_batch / ranks)")                               //
        ("precision", po::value(&plan.precision)->default_value("fp32"), "fp32 or bf16")  //
        ("device-memory", po::value(&plan.device_gib)->default_value(80),
         "GiB per accelerator, for the list of rank counts that fit")   //
        ("json", po::bool_switch(&plan.json), "print one JSON object")  //
        ("tflops", po::value(&plan.tflops)->default_value(400),
         "projection: achieved TFLOP/s per GPU (400: about 40% of an H100's dense bf16 peak; "
         "measure yours with `moerun bench train` on the GPU)")  //
        ("a2a-gbps", po::value(&plan.a2a_gbps)->default_value("nccl=25,deepep=45"),
         "projection: effective all-to-all GB/s per GPU, name=GB/s,... (NCCL-class: about "
         "half of a 400 Gb/s NIC; DeepEP-class: its reported internode RDMA rates)")  //
        ("allreduce-gbps", po::value(&plan.allreduce_gbps)->default_value(40),
         "projection: gradient all-reduce bus bandwidth, GB/s");
  }
  AddGlobalOptions(&desc, &global);
  po::positional_options_description positional;
  positional.add("config", 1);
  po::variables_map vm;
  const std::string path = "moerun " + command;
  const std::string synopsis =
      command == "plan" ? "moerun plan --config C [--ranks P] [--micro-batch B] [--precision "
                          "fp32|bf16] [--json]"
      : command == "eval"
          ? "mpirun -np N moerun eval --config C --model M [--capacity-factor "
            "0.5,1.0] [--bpr 0,1]"
          : "mpirun -np N moerun train --config C [--override k=v ...] [--checkpoint-every N] "
            "[--resume auto|never|PATH]";
  const std::string about =
      command == "train"
          ? "Trains the model a config describes. Checkpoints go to <out_dir>/checkpoints\n"
            "(step_N/ with one safetensors shard per rank and a manifest); a run resumes\n"
            "from the newest one by default, on any rank count that holds the experts.\n"
            "SIGINT, SIGTERM and SIGUSR1 stop every rank at the next step and save."
      : command == "eval"
          ? "Evaluates a trained model, with routing overrides."
          : "Exact parameter counts of a config, and per rank: parameter, gradient,\n"
            "optimizer-state and activation memory, training FLOPs per image,\n"
            "all-to-all bytes per step, the rank counts that fit a device, and a\n"
            "projection (from assumed GPU and network rates) of the step time.";
  if (auto done = ParseArgs(path, synopsis, about, args, desc, &positional, &vm)) return *done;
  // Checkpoint flags are overrides of their train.* fields (applied after -o ones).
  if (vm.count("checkpoint-dir")) overrides.push_back("train.checkpoint_dir=" + checkpoint_dir);
  if (vm.count("checkpoint-every")) {
    overrides.push_back("train.checkpoint_every=" + std::to_string(checkpoint_every));
  }
  if (vm.count("checkpoint-every-minutes")) {
    std::ostringstream v;
    v << checkpoint_minutes;
    overrides.push_back("train.checkpoint_every_minutes=" + v.str());
  }
  if (vm.count("keep")) overrides.push_back("train.keep_checkpoints=" + std::to_string(keep));
  if (vm.count("resume")) overrides.push_back("train.resume=" + resume);
  if (async_checkpoint) overrides.push_back("train.checkpoint_async=true");
  StatusOr<Config> config = LoadConfig(config_path, overrides);
  if (!config.ok()) {
    PrintError(path, config.status().message());
    return kExitUsage;
  }
  if (command == "plan") {
    if (ParseBandwidths(plan.a2a_gbps).empty()) {
      PrintError(path, "--a2a-gbps '" + plan.a2a_gbps +
                           "': give name=GB/s pairs, e.g. nccl=25,deepep=45 (each > 0)");
      return kExitUsage;
    }
    if (!std::isfinite(plan.tflops) || plan.tflops <= 0 || plan.tflops > 1e6 ||
        !std::isfinite(plan.allreduce_gbps) || plan.allreduce_gbps <= 0 ||
        plan.allreduce_gbps > 1e6) {
      PrintError(path, "--tflops and --allreduce-gbps must be positive finite numbers");
      return kExitUsage;
    }
    if (plan.ranks < 1 || plan.micro_batch < 0 || plan.device_gib <= 0 ||
        (plan.precision != "fp32" && plan.precision != "bf16")) {
      PrintError(path,
                 "--ranks must be at least 1, --micro-batch >= 0, --device-memory > 0 "
                 "and --precision fp32 or bf16");
      return kExitUsage;
    }
    return IsRankZeroFromEnvironment() ? Plan(*config, config_path, plan) : kExitOk;
  }
  if (command == "train") {
    // Outputs never overwrite the config.
    const TrainConfig& tc = config->train();
    const std::string out_dir =
        tc.out_dir().empty() ? "runs/" + config->model().name() : tc.out_dir();
    const std::string metrics =
        tc.metrics_path().empty() ? out_dir + "/metrics.jsonl" : tc.metrics_path();
    std::error_code ec;
    for (const std::string& output : {metrics, out_dir, tc.checkpoint_dir()}) {
      if (!output.empty() && std::filesystem::equivalent(output, config_path, ec)) {
        PrintError(path, "'" + output +
                             "' is the config file itself: choose another "
                             "train.out_dir / train.metrics_path / train.checkpoint_dir");
        return kExitUsage;
      }
    }
    // Train (and eval, below) run a V-MoE on GPUs; bench moe-layer its layer.
    global.cuda_supported = true;
    Session session(program.argc, program.argv, global);
    if (until_step < 0) {
      PrintError(path, "--until-step must be >= 0");
      return kExitUsage;
    }
    return RunTrain(*config, session, until_step);
  }
  std::vector<double> factors;
  std::vector<int> bprs;
  try {
    std::stringstream a(capacity_text), b(bpr_text);
    for (std::string x; std::getline(a, x, ',');) {
      size_t used = 0;
      factors.push_back(std::stod(x, &used));
      const double f = factors.back();
      if (used != x.size() || !std::isfinite(f) || (f < 0 && f != -1) || f > 1000) {
        throw std::invalid_argument(x);
      }
    }
    for (std::string x; std::getline(b, x, ',');) {
      bprs.push_back(std::stoi(x));
      if (bprs.back() < -1 || bprs.back() > 1) throw std::invalid_argument(x);
    }
  } catch (const std::exception&) {
    PrintError(path,
               "--capacity-factor takes finite numbers from 0 (dropless) to 1000, or -1 (as "
               "trained), e.g. 0.5,1.0; --bpr takes -1, 0 or 1");
    return kExitUsage;
  }
  global.cuda_supported = true;  // V-MoE and Mod-Squad models evaluate on GPUs
  Session session(program.argc, program.argv, global);
  return RunEval(*config, session, model_path, factors, bprs, exact_capacity);
}

}  // namespace moerun
