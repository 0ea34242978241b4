// moerun bench soak: trains a config for a long time (with background checkpoints) and
// prints resident memory and step time at every interval, so that growth or slow-down
// after warm-up shows.
#include <mpi.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "launch/commands.h"
#include "runtime/backend.h"
#include "runtime/checkpoint.h"
#include "runtime/config.h"
#include "runtime/process.h"
#include "runtime/train_loop.h"
#include "runtime/trainer.h"

namespace moerun {

int RunBenchSoak(const std::vector<std::string>& args, ProgramArgs program) {
  GlobalOptions global;
  std::string config_path, dir;
  std::vector<std::string> overrides;
  double minutes = 30, every_s = 60;
  int checkpoint_every = 500;
  po::options_description desc("Options");
  desc.add_options()                                                                       //
      ("config,c", po::value(&config_path)->required(), "model config (configs/*.pbtxt)")  //
      ("override,o", po::value(&overrides)->composing(), "key=value config override")      //
      ("minutes", po::value(&minutes)->default_value(30), "how long to train")             //
      ("report-every", po::value(&every_s)->default_value(60), "seconds between reports")  //
      ("checkpoint-every", po::value(&checkpoint_every)->default_value(500),
       "background checkpoint every N steps (0: none), the newest 2 kept")  //
      ("dir", po::value(&dir)->default_value("runs/bench_soak"),
       "where the checkpoints go (removed afterwards)");
  AddGlobalOptions(&desc, &global);
  global.cuda_supported = true;  // the Trainer on each rank's GPU
  po::positional_options_description positional;
  positional.add("config", 1);
  po::variables_map vm;
  if (auto done = ParseArgs(
          "moerun bench soak", "[mpirun -np P] moerun bench soak --config C [--minutes M]",
          "Trains a config (its own dataset; steps past train.steps wrap the schedule) with\n"
          "background checkpoints and prints one JSON line per interval: elapsed_s, steps,\n"
          "step_ms (mean over the interval), rss_mib (max over ranks). The last line sums\n"
          "up: rss_growth_mib and step_ms_ratio from the first interval (after warm-up) to\n"
          "the last. --device cuda: a GPU per rank; the lines add device_used_mib (the GPU's\n"
          "memory in use, max over ranks: the pool, cuBLAS's and NCCL's buffers) and the\n"
          "summary device_growth_mib.",
          args, desc, &positional, &vm))
    return *done;
  StatusOr<Config> loaded = LoadConfig(config_path, overrides);
  if (!loaded.ok()) {
    PrintError("moerun bench soak", loaded.status().message());
    return kExitUsage;
  }
  if (!(minutes > 0) || minutes > 10080 || !(every_s > 0) || every_s > 3600 ||
      checkpoint_every < 0) {
    PrintError("moerun bench soak",
               "--minutes must be in (0, 10080], --report-every in (0, 3600] seconds and "
               "--checkpoint-every >= 0");
    return kExitUsage;
  }
  Session session(program.argc, program.argv, global);
  if (const Status nccl = session.RequireDeviceWorld(); !nccl.ok()) {
    PrintError("moerun bench soak", nccl.message());
    return kExitUnavailable;
  }
  Communicator& world = session.world();
  const Device dev = session.device();
  const bool on_device = dev != Device::kCPU;
  const Config& c = *loaded;
  StatusOr<Dataset> data = LoadRunData(c, true);
  Status ok = AgreeOnStatus(world, data.status());
  if (!ok.ok()) {
    PrintError("moerun bench soak", ok.message());
    return kExitFailure;
  }
  auto created = Trainer::Create(c, &world, &*data, dev, session.device_world());
  ok = AgreeOnStatus(world, created.status());
  if (!ok.ok()) {
    PrintError("moerun bench soak", ok.message());
    return kExitUsage;
  }
  Trainer& trainer = **created;
  const std::string root = dir + "/checkpoints";
  if (session.is_root()) std::filesystem::remove_all(dir);
  world.Barrier();
  AsyncCheckpointer background(world, root, SaveOptions{2});
  const double start = MPI_Wtime();
  double window_start = start, first_rss = -1, first_ms = -1, last_rss = 0, last_ms = 0;
  double first_device = -1, last_device = -1;  // MiB in use on the GPU (max over ranks)
  int64_t window_steps = 0, steps = 0;
  bool done = false;
  while (!done) {
    int32_t not_ready = background.local_ready() ? 0 : 1;
    world.AllReduce(&not_ready, 1, DType::kI32, ReduceOp::kMax);
    ok = background.Poll(not_ready == 0, nullptr);
    if (!ok.ok()) {
      PrintError("moerun bench soak", ok.message());
      return kExitFailure;
    }
    if (trainer.step() >= c.train().steps()) trainer.set_step(0);  // wrap the schedule
    const StepStats st = trainer.Step();
    if (!st.finite) {
      PrintError("moerun bench soak", st.problem);
      return kExitFailure;
    }
    ++steps;
    ++window_steps;
    if (checkpoint_every > 0 && steps % checkpoint_every == 0) {
      CheckpointManifest m = trainer.StateManifest();
      m.set_step(steps);  // distinct directories even when the schedule wraps
      ok = background.Start(m, trainer.StateSlices(true));
      if (!ok.ok()) {
        PrintError("moerun bench soak", ok.message());
        return kExitFailure;
      }
    }
    // Rank 0's clock decides when to report and when to stop. (A step on a device returns
    // with work queued: at most one step's worth, against a window of many.)
    double now = MPI_Wtime();
    int32_t flags[2] = {now - window_start >= every_s ? 1 : 0, now - start >= 60 * minutes};
    world.Broadcast(flags, 2, DType::kI32, 0);
    if (!flags[0] && !flags[1]) continue;
    double rss = ProcessMemoryBytes("VmRSS") / 1048576.0;
    world.AllReduce(&rss, 1, DType::kF64, ReduceOp::kMax);
    double device = -1;
    if (on_device) {
      RequireBackend(dev).Synchronize();  // what the window queued is in use until it ran
      const DeviceMemory mem = RequireBackend(dev).Memory();
      if (mem.free_bytes >= 0 && mem.total_bytes >= 0) {
        device = static_cast<double>(mem.total_bytes - mem.free_bytes) / 1048576.0;
      }
      world.AllReduce(&device, 1, DType::kF64, ReduceOp::kMax);
    }
    const double ms = 1000 * (now - window_start) / std::max<int64_t>(1, window_steps);
    if (first_rss < 0) {
      first_rss = rss;
      first_ms = ms;
      first_device = device;
    }
    last_rss = rss;
    last_ms = ms;
    last_device = device;
    if (session.is_root()) {
      nlohmann::json line{{"bench", "soak"}, {"elapsed_s", now - start}, {"steps", steps},
                          {"step_ms", ms},   {"rss_mib", rss},           {"loss", st.loss}};
      if (on_device) line["device_used_mib"] = device >= 0 ? nlohmann::json(device) : nullptr;
      PrintJsonLine(line);
    }
    window_start = now;
    window_steps = 0;
    done = flags[1] != 0;
  }
  ok = background.Finish(nullptr);
  if (session.is_root()) {
    nlohmann::json line{{"bench", "soak"},
                        {"summary", true},
                        {"config", config_path},
                        {"ranks", world.size()},
                        {"device", DeviceName(dev)},
                        {"minutes", minutes},
                        {"steps", steps},
                        {"first_rss_mib", first_rss},
                        {"last_rss_mib", last_rss},
                        {"rss_growth_mib", last_rss - first_rss},
                        {"first_step_ms", first_ms},
                        {"last_step_ms", last_ms},
                        {"step_ms_ratio", last_ms / std::max(1e-9, first_ms)}};
    if (on_device) {
      const bool known = first_device >= 0 && last_device >= 0;
      line.update(
          {{"first_device_used_mib", known ? nlohmann::json(first_device) : nullptr},
           {"last_device_used_mib", known ? nlohmann::json(last_device) : nullptr},
           {"device_growth_mib", known ? nlohmann::json(last_device - first_device) : nullptr}});
    }
    PrintJsonLine(line);
  }
  world.Barrier();
  if (session.is_root()) std::filesystem::remove_all(dir);
  if (!ok.ok()) {
    PrintError("moerun bench soak", ok.message());
    return kExitFailure;
  }
  return kExitOk;
}

}  // namespace moerun
