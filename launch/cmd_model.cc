// moerun train / eval / plan: the commands that take a model config.
#include <iomanip>
#include <iostream>
#include <sstream>

#include "launch/commands.h"
#include "model/vit_spec.h"
#include "runtime/config.h"

namespace moerun {
namespace {

std::string WithCommas(int64_t v) {
  std::string s = std::to_string(v);
  for (int i = static_cast<int>(s.size()) - 3; i > (v < 0 ? 1 : 0); i -= 3) s.insert(i, ",");
  return s;
}

int Plan(const Config& config, const std::string& config_path, int ranks, bool json) {
  const ModelConfig& m = config.model();
  const ParameterCounts c = CountParameters(m);
  int64_t per_rank = c.total;
  ExpertPlacement placement{0, 0};
  if (m.has_moe()) {
    auto placed = PlaceExperts(m.moe().num_experts(), ranks);
    if (!placed.ok()) {
      PrintError("moerun plan",
                 "--ranks " + std::to_string(ranks) + ": " + placed.status().message());
      return kExitUsage;
    }
    placement = *placed;
    per_rank =
        c.dense + static_cast<int64_t>(c.moe_layers) * placement.experts_per_rank * c.per_expert;
  }
  // fp32 parameters, gradients and two AdamW moments: 16 bytes per parameter.
  const int64_t state_bytes = per_rank * 16;
  if (json) {
    PrintJsonLine({{"config", config_path},
                   {"ranks", ranks},
                   {"params_total", c.total},
                   {"params_dense", c.dense},
                   {"params_expert", c.expert},
                   {"moe_layers", c.moe_layers},
                   {"experts_per_rank", placement.experts_per_rank},
                   {"expert_replicas", placement.replicas},
                   {"params_per_rank", per_rank},
                   {"param_grad_adam_bytes_per_rank", state_bytes},
                   {"bytes_per_rank", state_bytes}});
    return kExitOk;
  }
  std::cout << "config            " << config_path << " (" << m.name() << ")\n"
            << "parameters        " << WithCommas(c.total) << " total\n"
            << "  dense           " << WithCommas(c.dense) << " (replicated on every rank)\n"
            << "  experts         " << WithCommas(c.expert) << " (" << c.moe_layers
            << " MoE layers)\n"
            << "ranks             " << ranks;
  if (m.has_moe()) {
    std::cout << " (" << placement.experts_per_rank << " expert(s) per rank per layer, "
              << placement.replicas << " replica(s) of each)";
  }
  std::cout << "\nper rank          " << WithCommas(per_rank) << " parameters, " << std::fixed
            << std::setprecision(2) << state_bytes / 1073741824.0
            << " GiB for fp32 weights + gradients + AdamW moments\n"
            << "(activation memory, FLOPs and all-to-all bytes per step are not yet computed)\n"
            << std::flush;
  return kExitOk;
}

}  // namespace

int RunModelCommand(const std::string& command, const std::vector<std::string>& args,
                    ProgramArgs program) {
  GlobalOptions global;
  std::string config_path;
  std::vector<std::string> overrides;
  int ranks = 1;
  bool json = false;
  po::options_description desc("Options");
  desc.add_options()                                                                      //
      ("config,c", po::value(&config_path)->required(), "config file (configs/*.pbtxt)")  //
      ("override,o", po::value(&overrides)->composing(),
       "key=value overriding a config field, e.g. train.steps=100 or model.moe.bpr=false "
       "(repeatable)");
  if (command == "plan") {
    desc.add_options()                                                                       //
        ("ranks", po::value(&ranks)->default_value(1), "expert-parallel ranks to plan for")  //
        ("json", po::bool_switch(&json), "print one JSON object");
  }
  AddGlobalOptions(&desc, &global);
  po::positional_options_description positional;
  positional.add("config", 1);
  po::variables_map vm;
  const std::string path = "moerun " + command;
  const std::string synopsis =
      command == "plan" ? "moerun plan --config C [--ranks P] [--json] [--override k=v ...]"
                        : "mpirun -np N moerun " + command + " --config C [--override k=v ...]";
  const std::string about = command == "train" ? "Trains the model a config describes."
                            : command == "eval"
                                ? "Evaluates a trained model, with routing overrides."
                                : "Exact parameter counts and per-rank memory of a config.";
  switch (ParseArgs(path, synopsis, about, args, desc, &positional, &vm)) {
    case ParseOutcome::kHelpShown:
      return kExitOk;
    case ParseOutcome::kError:
      return kExitUsage;
    case ParseOutcome::kRun:
      break;
  }
  StatusOr<Config> config = LoadConfig(config_path, overrides);
  if (!config.ok()) {
    PrintError(path, config.status().message());
    return kExitUsage;
  }
  if (command == "plan") {
    if (ranks < 1) {
      PrintError(path, "--ranks must be at least 1");
      return kExitUsage;
    }
    return IsRankZeroFromEnvironment() ? Plan(*config, config_path, ranks, json) : kExitOk;
  }
  (void)program;
  PrintError(path, "the config is valid, but '" + command +
                       "' is not in this build yet: the MoE layer and the training loop "
                       "arrive with the next milestones. 'moerun plan' and 'moerun bench' work "
                       "now.");
  return kExitUnavailable;
}

}  // namespace moerun
