// moerun dry-run: builds rank R of a P-rank job in one process, exactly as the job would
// (the dense part and rank R's experts), and runs training steps with the other P - 1 ranks
// simulated by a LoopbackCommunicator (their tokens are copies of this rank's, with the
// shapes and byte counts of the real job). Prints the parameters, the measured peak memory
// and step time beside the plan's prediction.
#include <mpi.h>

#include <chrono>
#include <cmath>
#include <iomanip>
#include <iostream>
#include <memory>

#include "comm/loopback_communicator.h"
#include "launch/commands.h"
#include "model/vit_spec.h"
#include "runtime/backend.h"
#include "runtime/config.h"
#include "runtime/process.h"
#include "runtime/trainer.h"

namespace moerun {
int RunDryRun(const std::vector<std::string>& args, ProgramArgs program) {
  GlobalOptions global;
  std::string config_path;
  std::vector<std::string> overrides;
  int ranks = 0, rank = 0, steps = 2;
  int64_t micro = 0;
  po::options_description desc("Options");
  desc.add_options()                                                                          //
      ("config,c", po::value(&config_path)->required(), "model config (configs/*.pbtxt)")     //
      ("override,o", po::value(&overrides)->composing(), "key=value config override")         //
      ("ranks", po::value(&ranks)->required(), "ranks of the simulated job")                  //
      ("rank", po::value(&rank)->default_value(0), "the rank this process builds and steps")  //
      ("micro-batch", po::value(&micro)->default_value(0),
       "images per rank (0: train.global_batch / --ranks); the global batch becomes "
       "ranks x micro-batch")  //
      ("steps", po::value(&steps)->default_value(2),
       "training steps (the first includes first-touch page faults and buffer growth)");
  AddGlobalOptions(&desc, &global);
  global.cuda_supported = true;
  po::positional_options_description positional;
  positional.add("config", 1);
  po::variables_map vm;
  if (auto done = ParseArgs(
          "moerun dry-run",
          "moerun dry-run --config C --ranks P [--rank R] [--micro-batch B] [--steps S]",
          "Builds rank R of a P-rank job in this one process, exactly as the job would (the "
          "dense part and\nrank R's experts), and runs training steps on synthetic images with "
          "the other P - 1 ranks\nsimulated (their tokens are copies of this rank's, with the "
          "real job's shapes and byte counts).\nPrints parameters, measured peak resident "
          "memory and step time beside `moerun plan`'s figures\n(one JSON line). Run it "
          "without mpirun. For a model too big for this host: --micro-batch 1,\n-o "
          "train.optimizer_moments=BF16 (half the AdamW state). With --device cuda the rank is "
          "built on\nthis process's GPU (its peers' blocks copied on the device) and the line "
          "adds the device's\npeak allocation (peak_device_bytes), which is then what "
          "peak_over_plan compares, and the\ndriver's figures (device_pool_used_high_bytes, "
          "device_used_bytes of device_total_bytes).",
          args, desc, &positional, &vm))
    return *done;
  const std::string cmd = "moerun dry-run";
  if (ranks < 1 || ranks > 65536) {
    PrintError(cmd, "--ranks " + std::to_string(ranks) + ": must be between 1 and 65536");
    return kExitUsage;
  }
  if (rank < 0 || rank >= ranks) {
    PrintError(cmd, "--rank " + std::to_string(rank) + ": must be between 0 and --ranks - 1 (" +
                        std::to_string(ranks - 1) + ")");
    return kExitUsage;
  }
  if (micro < 0 || micro > 1 << 20 || steps < 1 || steps > 1000) {
    PrintError(cmd, "--micro-batch must be 0..1048576 and --steps 1..1000");
    return kExitUsage;
  }
  StatusOr<Config> loaded = LoadConfig(config_path, overrides);
  if (!loaded.ok()) {
    PrintError(cmd, loaded.status().message());
    return kExitUsage;
  }
  Config c = *loaded;
  ModelConfig& m = *c.mutable_model();
  if (m.has_modsquad()) {
    PrintError(cmd, "dry-run builds V-MoE configs (model.moe); this is a Mod-Squad config");
    return kExitUsage;
  }
  Status placed = CheckPlacement(m, ranks);
  if (placed.ok() && m.has_moe() && ranks > m.moe().num_experts()) {
    placed = Status::Error("a simulated job of more ranks than experts (" +
                           std::to_string(m.moe().num_experts()) +
                           ") would replicate experts over ranks; use --ranks <= experts");
  }
  if (!placed.ok()) {
    PrintError(cmd, "--ranks " + std::to_string(ranks) + ": " + placed.message());
    return kExitUsage;
  }
  if (micro == 0) {
    if (c.train().global_batch() % ranks != 0) {
      PrintError(cmd, "train.global_batch " + std::to_string(c.train().global_batch()) +
                          " does not split over --ranks " + std::to_string(ranks) +
                          "; give --micro-batch");
      return kExitUsage;
    }
    micro = c.train().global_batch() / ranks;
  }
  // Groups must be whole within the micro-batch: a smaller micro-batch routes in smaller
  // groups (said in the output).
  std::string group_note;
  if (m.has_moe() && m.moe().group_size() == 0 && m.moe().group_images() > 0 &&
      micro % m.moe().group_images() != 0) {
    group_note = "routing groups of " + std::to_string(micro) + " image(s) instead of the " +
                 "config's " + std::to_string(m.moe().group_images()) +
                 " so that the micro-batch holds whole groups";
    m.mutable_moe()->set_group_images(static_cast<int32_t>(micro));
  }
  c.mutable_train()->set_global_batch(static_cast<int32_t>(micro * ranks));
  // The training step's memory, the one the plan prints (a device job that evaluates also
  // needs its evaluation step's, train.eval_batch over the ranks: `moerun train` checks it).
  c.mutable_train()->set_eval_batch(c.train().global_batch());
  c.mutable_train()->set_steps(steps + 1);
  c.mutable_train()->set_warmup_steps(1);

  Session session(program.argc, program.argv, global);
  if (session.size() != 1) {
    PrintError(cmd, "run dry-run as one process (without mpirun): it simulates the other ranks");
    return kExitUsage;
  }
  const bool bf16_moments = c.train().optimizer_moments() == TrainConfig::BF16;
  const TrainingFootprint plan = EstimateFootprint(m, ranks, micro, false, bf16_moments);
  LOG(INFO) << "dry-run: rank " << rank << " of " << ranks << ", micro-batch " << micro
            << ", AdamW moments " << (bf16_moments ? "bf16" : "fp32")
            << "; the plan: " << GiBString(plan.bytes_per_rank) << " for " << plan.params_per_rank
            << " parameters" << (group_note.empty() ? "" : "; " + group_note);
  const double rss_start = ProcessMemoryBytes("VmRSS");
  const Dataset data =
      MakeSyntheticDataset(c.train().seed(), micro * ranks, m.channels(), m.image_size(),
                           m.image_size(), std::min(10, m.num_classes()));
  // On a device the expert all-to-alls and dense all-reduces move device memory: a second
  // loopback over the same simulated ranks does it there; host scalars keep the first.
  const Device device = session.device();
  LoopbackCommunicator host_world(rank, ranks);
  std::unique_ptr<LoopbackCommunicator> device_world;
  if (device != Device::kCPU) {
    device_world = std::make_unique<LoopbackCommunicator>(rank, ranks, "world", device);
  }
  LoopbackCommunicator& world = device_world ? *device_world : host_world;
  const auto t_build = std::chrono::steady_clock::now();
  auto trainer = Trainer::Create(c, &host_world, &data, device, device_world.get());
  if (!trainer.ok()) {
    PrintError(cmd, trainer.status().message());
    return kExitUsage;
  }
  const double build_s =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t_build).count();
  int64_t params = 0, expert_params = 0;
  for (const Param& p : (*trainer)->params()) {
    params += p.value.numel();
    if (p.name.find(".experts.") != std::string::npos) expert_params += p.value.numel();
  }
  LOG(INFO) << "dry-run: built " << params << " parameters (" << expert_params
            << " in this rank's experts) in " << std::fixed << std::setprecision(1) << build_s
            << " s";
  std::vector<double> step_s;
  StepStats st;
  for (int i = 0; i < steps; ++i) {
    const int64_t a2a_before = world.all_to_all_bytes_sent();
    const auto t0 = std::chrono::steady_clock::now();
    st = (*trainer)->Step();
    // On a device the step's last work (the optimizer's) is only queued: it is the step's.
    if (device != Device::kCPU) RequireBackend(device).Synchronize();
    step_s.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
    LOG(INFO) << "dry-run: step " << i + 1 << "/" << steps << ": " << std::setprecision(2)
              << step_s.back() << " s, loss " << std::setprecision(4) << st.loss << ", "
              << GiBString(static_cast<double>(world.all_to_all_bytes_sent() - a2a_before))
              << " sent by all-to-all";
    if (!st.finite) {
      PrintError(cmd, st.problem);
      return kExitFailure;
    }
  }
  const double peak_rss = ProcessMemoryBytes("VmHWM");
  // The plan's per-rank bytes are where the model lives: host memory, or the GPU's.
  const double peak_device =
      device == Device::kCPU ? 0.0
                             : static_cast<double>(RequireBackend(device).peak_allocated_bytes());
  const double peak = device == Device::kCPU ? peak_rss : peak_device;
  // Beside the backend's own count, the driver's: the pool's high-water mark (with Thrust's
  // temporaries and the pool's rounding) and the whole GPU's use now (with the CUDA context,
  // cuBLAS's workspaces and NCCL's buffers; other processes' too). -1 where unknown.
  const DeviceMemory mem =
      device == Device::kCPU ? DeviceMemory{} : RequireBackend(device).Memory();
  const int64_t device_used = mem.free_bytes < 0 ? -1 : mem.total_bytes - mem.free_bytes;
  const StepTimeSplit& ts = (*trainer)->time_split();
  const double per = 1000.0 / std::max<int64_t>(1, ts.steps);
  nlohmann::json step_ms = nlohmann::json::object();
  for (const auto& [name, seconds] : ts.Named()) step_ms[name] = seconds * per;
  const double ratio = peak / static_cast<double>(plan.bytes_per_rank);
  const int64_t a2a_per_step = world.all_to_all_bytes_sent() / steps;
  PrintJsonLine({{"event", "dry_run"},
                 {"config", config_path},
                 {"model", m.name()},
                 {"ranks", ranks},
                 {"rank", rank},
                 {"micro_batch", micro},
                 {"group_images", m.has_moe() ? m.moe().group_images() : 0},
                 {"optimizer_moments", bf16_moments ? "bf16" : "fp32"},
                 {"params_rank", params},
                 {"params_rank_experts", expert_params},
                 {"params_plan", plan.params_per_rank},
                 {"build_s", build_s},
                 {"step_s", step_s},
                 {"step_ms_split", step_ms},
                 {"loss", st.loss},
                 {"a2a_bytes_per_step", a2a_per_step},
                 {"a2a_bytes_per_step_plan", plan.a2a_bytes_per_step},
                 {"device", device == Device::kCPU ? "cpu" : RequireBackend(device).Describe()},
                 {"peak_rss_bytes", static_cast<int64_t>(peak_rss)},
                 {"peak_device_bytes", static_cast<int64_t>(peak_device)},
                 {"device_pool_used_high_bytes", mem.pool_used_high_bytes},
                 {"device_used_bytes", device_used},
                 {"device_total_bytes", mem.total_bytes},
                 {"rss_before_build_bytes", static_cast<int64_t>(rss_start)},
                 {"plan_bytes", plan.bytes_per_rank},
                 {"plan_param_bytes", plan.param_bytes},
                 {"plan_grad_bytes", plan.grad_bytes},
                 {"plan_optimizer_bytes", plan.optimizer_bytes},
                 {"plan_activation_bytes", plan.activation_bytes},
                 {"peak_over_plan", ratio},
                 {"within_10_percent", std::fabs(ratio - 1) <= 0.10},
                 {"note", group_note}});
  LOG(INFO) << "dry-run: peak " << (device == Device::kCPU ? "resident " : "device allocation ")
            << GiBString(peak) << " vs the plan's " << GiBString(plan.bytes_per_rank) << " ("
            << std::setprecision(1) << 100 * (ratio - 1) << "%); parameters "
            << (params == plan.params_per_rank ? "equal to" : "DIFFERENT FROM") << " the plan's";
  if (mem.pool_used_high_bytes >= 0 || device_used >= 0) {
    LOG(INFO) << "dry-run: the device's pool peaked at "
              << (mem.pool_used_high_bytes >= 0
                      ? GiBString(static_cast<double>(mem.pool_used_high_bytes))
                      : std::string("(unknown)"))
              << "; the GPU has "
              << (device_used >= 0 ? GiBString(static_cast<double>(device_used)) + " in use of " +
                                         GiBString(static_cast<double>(mem.total_bytes))
                                   : std::string("(unknown) in use"))
              << " (context, cuBLAS and NCCL included)";
  }
  if (params != plan.params_per_rank) {
    PrintError(cmd, "built " + std::to_string(params) + " parameters but the plan counts " +
                        std::to_string(plan.params_per_rank) + " (a bug: please report it)");
    return kExitFailure;
  }
  return kExitOk;
}

}  // namespace moerun
