// moerun bench checkpoint: save and load GB/s of a model's full training state beside a raw
// write + fsync and read of the same bytes in the same directory, and the training-step
// stall of saving every N steps (synchronous and asynchronous).
#include <fcntl.h>
#include <mpi.h>
#include <unistd.h>

#include <filesystem>
#include <thread>

#include "launch/commands.h"
#include "model/vit_spec.h"
#include "runtime/backend.h"
#include "runtime/checkpoint.h"
#include "runtime/config.h"
#include "runtime/trainer.h"

namespace moerun {
namespace {

// Writes n bytes to path and fsyncs (the raw peer of a shard write); seconds.
double RawWrite(const std::string& path, const std::vector<char>& buf) {
  const double t0 = MPI_Wtime();
  const int fd = ::open(path.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
  CHECK(fd >= 0) << "cannot create " << path;
  size_t done = 0;
  while (done < buf.size()) {
    const ssize_t n = ::write(fd, buf.data() + done, buf.size() - done);
    CHECK(n > 0) << "write to " << path << " failed";
    done += n;
  }
  CHECK(::fsync(fd) == 0);
  ::close(fd);
  return MPI_Wtime() - t0;
}

double RawRead(const std::string& path, std::vector<char>* buf) {
  const double t0 = MPI_Wtime();
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  CHECK(fd >= 0);
  size_t done = 0;
  while (done < buf->size()) {
    const ssize_t n = ::pread(fd, buf->data() + done, buf->size() - done, done);
    CHECK(n > 0);
    done += n;
  }
  ::close(fd);
  return MPI_Wtime() - t0;
}

double MaxOver(Communicator& world, double v) {
  world.AllReduce(&v, 1, DType::kF64, ReduceOp::kMax);
  return v;
}

}  // namespace

int RunBenchCheckpoint(const std::vector<std::string>& args, ProgramArgs program) {
  GlobalOptions global;
  std::string config_path, dir;
  std::vector<std::string> overrides;
  int rounds = 3, steps = 20, every = 5;
  po::options_description desc("Options");
  desc.add_options()                                                                       //
      ("config,c", po::value(&config_path)->required(), "model config (configs/*.pbtxt)")  //
      ("override,o", po::value(&overrides)->composing(), "key=value config override")      //
      ("dir", po::value(&dir)->default_value("runs/bench_checkpoint"),
       "directory to write in (removed afterwards)")                                           //
      ("rounds", po::value(&rounds)->default_value(3), "save/load rounds (best is reported)")  //
      ("steps", po::value(&steps)->default_value(20), "training steps per stall measurement")  //
      ("every", po::value(&every)->default_value(5), "save every N steps in the stall runs");
  AddGlobalOptions(&desc, &global);
  global.cuda_supported = true;  // the Trainer on each rank's GPU
  po::positional_options_description positional;
  positional.add("config", 1);
  po::variables_map vm;
  if (auto done = ParseArgs(
          "moerun bench checkpoint", "[mpirun -np P] moerun bench checkpoint --config C",
          "Saves and loads the full training state (parameters and AdamW moments) of a model\n"
          "on synthetic data of its shape. JSON lines: 'save'/'load' with gbps_per_rank and\n"
          "gbps_total beside raw_gbps_per_rank / raw_gbps_total (a plain write + fsync, or\n"
          "read, of the same bytes per rank in the same directory) and ratio; 'stall' with\n"
          "step_s, stall_per_save_s, stall_fraction_of_step and wall_delta_per_save_s for\n"
          "sync and async saves. --device cuda: the state on each rank's GPU; a save\n"
          "includes the copies to the host, a load the copies back, and the stall runs wait\n"
          "for each step's device work before the save (so the stall is the save's own).",
          args, desc, &positional, &vm))
    return *done;
  StatusOr<Config> loaded = LoadConfig(config_path, overrides);
  if (!loaded.ok()) {
    PrintError("moerun bench checkpoint", loaded.status().message());
    return kExitUsage;
  }
  if (rounds < 1 || steps < 1 || every < 1) {
    PrintError("moerun bench checkpoint", "--rounds, --steps and --every must be positive");
    return kExitUsage;
  }
  Session session(program.argc, program.argv, global);
  if (const Status nccl = session.RequireDeviceWorld(); !nccl.ok()) {
    PrintError("moerun bench checkpoint", nccl.message());
    return kExitUnavailable;
  }
  Communicator& world = session.world();
  const Device dev = session.device();
  // A step on a device returns with work queued: wait for it where the time is taken.
  const auto drain = [&] {
    if (dev != Device::kCPU) RequireBackend(dev).Synchronize();
  };
  Config c = *loaded;
  const ModelConfig& m = c.model();
  const int64_t batch = std::max<int64_t>(1, c.train().global_batch() / world.size());
  c.mutable_train()->set_global_batch(static_cast<int32_t>(batch * world.size()));
  const Dataset data =
      MakeSyntheticDataset(1, batch * world.size() * 2, m.channels(), m.image_size(),
                           m.image_size(), std::min(10, m.num_classes()));
  auto created = Trainer::Create(c, &world, &data, dev, session.device_world());
  Status ok = AgreeOnStatus(world, created.status());
  if (!ok.ok()) {
    PrintError("moerun bench checkpoint", ok.message());
    return kExitUsage;
  }
  Trainer& trainer = **created;
  trainer.Step();  // moments become non-zero
  drain();
  const std::string root = dir + "/ckpt";
  std::filesystem::remove_all(dir);
  std::filesystem::create_directories(root);
  world.Barrier();

  // Save vs raw write, load vs raw read, alternating rounds.
  double best_save = 1e30, best_raw_w = 1e30, best_load = 1e30, best_raw_r = 1e30;
  uint64_t local = 0, total = 0;
  std::vector<char> raw;
  const std::string raw_path = dir + "/raw-" + std::to_string(world.rank());
  for (int r = 0; r < rounds; ++r) {
    trainer.set_step(1000 + r);
    world.Barrier();
    const double t0 = MPI_Wtime();
    SaveResult res;
    Status s = SaveCheckpoint(world, root, trainer.StateManifest(), trainer.StateSlices(true),
                              SaveOptions{}, &res);
    CHECK(s.ok()) << s.message();
    best_save = std::min(best_save, MaxOver(world, MPI_Wtime() - t0));
    local = res.local_bytes;
    total = res.total_bytes;
    raw.assign(std::max<uint64_t>(1, local), static_cast<char>(r));
    world.Barrier();
    best_raw_w = std::min(best_raw_w, MaxOver(world, RawWrite(raw_path, raw)));
    // Load: every rank reads its own state back.
    auto manifest = ReadManifest(res.path);
    CHECK(manifest.ok());
    // On a device the slices are host copies: the load ends with the copies back.
    std::vector<std::pair<Tensor, Tensor>> device_views;
    std::vector<CheckpointSlice> slices = trainer.StateSlices(true, &device_views);
    world.Barrier();
    const double t1 = MPI_Wtime();
    s = LoadSlices(res.path, *manifest, &slices);
    CHECK(s.ok()) << s.message();
    for (auto& [device_tensor, host_copy] : device_views) device_tensor.CopyFrom(host_copy);
    drain();
    best_load = std::min(best_load, MaxOver(world, MPI_Wtime() - t1));
    // The raw peer reads what this rank loads: its whole state (params + moments).
    uint64_t state_bytes = 0;
    for (const CheckpointSlice& sl : slices) state_bytes += sl.local.nbytes();
    std::vector<char> back(state_bytes);
    if (raw.size() < state_bytes) raw.resize(state_bytes, 1);
    RawWrite(raw_path, raw);
    world.Barrier();
    best_raw_r = std::min(best_raw_r, MaxOver(world, RawRead(raw_path, &back)));
    if (r == rounds - 1) {
      const double gb = state_bytes / 1e9;
      if (session.is_root()) {
        PrintJsonLine({{"bench", "checkpoint"},
                       {"op", "load"},
                       {"model", m.name()},
                       {"device", DeviceName(dev)},
                       {"ranks", world.size()},
                       {"bytes_per_rank", state_bytes},
                       {"seconds", best_load},
                       {"gbps_per_rank", gb / best_load},
                       {"gbps_total", gb * world.size() / best_load},
                       {"raw_seconds", best_raw_r},
                       {"raw_gbps_per_rank", gb / best_raw_r},
                       {"raw_gbps_total", gb * world.size() / best_raw_r},
                       {"ratio", best_raw_r / best_load}});
      }
    }
  }
  if (session.is_root()) {
    const double gb = local / 1e9;
    PrintJsonLine({{"bench", "checkpoint"},
                   {"op", "save"},
                   {"model", m.name()},
                   {"device", DeviceName(dev)},
                   {"ranks", world.size()},
                   {"bytes_per_rank", local},
                   {"bytes_total", total},
                   {"seconds", best_save},
                   {"gbps_per_rank", gb / best_save},
                   {"gbps_total", total / 1e9 / best_save},
                   {"raw_seconds", best_raw_w},
                   {"raw_gbps_per_rank", gb / best_raw_w},
                   {"raw_gbps_total", gb * world.size() / best_raw_w},
                   {"ratio", best_raw_w / best_save}});
  }

  // Stall: steps with a save every `every` steps, synchronous and asynchronous. The stall is
  // the time the training loop spends in the save calls (for async: plan, snapshot and the
  // later commit), max over ranks; `wall_delta_s` is the extra wall time per save against a
  // run without saves (it also shows a background writer competing for the cores).
  auto run = [&](int mode, double* stall) {  // mode: 0 none, 1 sync, 2 async
    AsyncCheckpointer background(world, root, SaveOptions{3});
    double in_save = 0;
    world.Barrier();
    const double t0 = MPI_Wtime();
    for (int i = 1; i <= steps; ++i) {
      // What the training loop does at each step boundary: one small all-reduce of flags
      // (stop signal, save readiness, ...), in every mode, then moving a save on.
      int32_t flags[4] = {0, 0, background.local_ready() ? 0 : 1, 0};
      world.AllReduce(flags, 4, DType::kI32, ReduceOp::kMax);
      const double p0 = MPI_Wtime();
      if (mode == 2) CHECK(background.Poll(flags[2] == 0, nullptr).ok());
      in_save += MPI_Wtime() - p0;
      trainer.Step();
      drain();  // in every mode, so that the runs compare
      if (mode == 0 || i % every != 0) continue;
      const double s0 = MPI_Wtime();
      if (mode == 1) {
        CHECK(SaveCheckpoint(world, root, trainer.StateManifest(), trainer.StateSlices(true),
                             SaveOptions{3}, nullptr)
                  .ok());
      } else {
        CHECK(background.Start(trainer.StateManifest(), trainer.StateSlices(true)).ok());
      }
      in_save += MPI_Wtime() - s0;
    }
    CHECK(background.Finish(nullptr).ok());  // once per run, not per save: not counted
    if (stall != nullptr) *stall = MaxOver(world, in_save);
    return MaxOver(world, MPI_Wtime() - t0);
  };
  trainer.set_step(0);
  run(0, nullptr);  // warm-up
  const double base = run(0, nullptr);
  double stall_sync = 0, stall_async = 0;
  const double sync = run(1, &stall_sync);
  const double async = run(2, &stall_async);
  const double step_s = base / steps;
  const int saves = steps / every;
  if (session.is_root()) {
    for (int mode = 1; mode <= 2; ++mode) {
      const double t = mode == 1 ? sync : async;
      const double stall = (mode == 1 ? stall_sync : stall_async) / saves;
      PrintJsonLine({{"bench", "checkpoint"},
                     {"op", "stall"},
                     {"model", m.name()},
                     {"device", DeviceName(dev)},
                     {"ranks", world.size()},
                     {"async", mode == 2},
                     {"steps", steps},
                     {"saves", saves},
                     {"step_s", step_s},
                     {"stall_per_save_s", stall},
                     {"stall_fraction_of_step", stall / step_s},
                     {"wall_delta_per_save_s", (t - base) / saves}});
    }
  }
  world.Barrier();
  if (session.is_root()) std::filesystem::remove_all(dir);
  return kExitOk;
}

}  // namespace moerun
