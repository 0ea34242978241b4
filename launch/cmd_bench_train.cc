// moerun bench train: training throughput of a model config on synthetic data: images/s
// and achieved FLOP/s (model FLOPs from the plan's count) beside the GEMM peak measured in
// the same run (model FLOPs utilisation). --device cuda: the Trainer on each rank's GPU, beside
// that GPU's GEMM peak at the run's precision.
#include <mpi.h>

#include <algorithm>
#include <string>

#include "launch/bench_moe_layer.h"
#include "launch/commands.h"
#include "model/ops.h"
#include "model/vit_spec.h"
#include "runtime/backend.h"
#include "runtime/config.h"
#include "runtime/kernels.h"
#include "runtime/trainer.h"

namespace moerun {
int RunBenchTrain(const std::vector<std::string>& args, ProgramArgs program) {
  GlobalOptions global;
  std::string config_path;
  std::vector<std::string> overrides;
  int64_t batch = 8;
  int steps = 3;
  po::options_description desc("Options");
  desc.add_options()                                                                       //
      ("config,c", po::value(&config_path)->required(), "model config (configs/*.pbtxt)")  //
      ("override,o", po::value(&overrides)->composing(), "key=value config override")      //
      ("batch", po::value(&batch)->default_value(8), "images per rank per step")           //
      ("steps", po::value(&steps)->default_value(3), "timed steps (after two warm-up steps)");
  AddGlobalOptions(&desc, &global);
  global.cuda_supported = true;  // the Trainer on each rank's GPU
  po::positional_options_description positional;
  positional.add("config", 1);
  po::variables_map vm;
  if (auto done =
          ParseArgs("moerun bench train",
                    "[mpirun -np P] moerun bench train --config C [--batch B] [--steps S]",
                    "Times full training steps (forward, backward, all-reduce, AdamW) of a model "
                    "on synthetic\nimages of its shape. JSON fields: bench, config, ranks, "
                    "batch_per_rank, images_per_s,\ntrain_flops_per_image, achieved_gflops "
                    "(all ranks), gemm_peak_gflops (all ranks: the\nsquare-GEMM peak of one "
                    "rank x ranks, measured in this run), mfu. --device cuda: a GPU per\nrank; "
                    "the peak is that GPU's at the run's precision (train.precision FP32: the\n"
                    "device's fp32 GEMM; BF16: cuBLAS's bf16 GEMM), named by peak_kind.",
                    args, desc, &positional, &vm))
    return *done;
  StatusOr<Config> loaded = LoadConfig(config_path, overrides);
  if (!loaded.ok()) {
    PrintError("moerun bench train", loaded.status().message());
    return kExitUsage;
  }
  if (batch < 1 || steps < 1) {
    PrintError("moerun bench train", "--batch and --steps must be positive");
    return kExitUsage;
  }
  Session session(program.argc, program.argv, global);
  Communicator& world = session.world();
  const Device dev = session.device();
  const bool on_device = dev != Device::kCPU;
  if (const Status nccl = session.RequireDeviceWorld(); !nccl.ok()) {
    PrintError("moerun bench train", nccl.message());
    return kExitUnavailable;
  }
  Config c = *loaded;
  const ModelConfig& m = c.model();
  c.mutable_train()->set_global_batch(static_cast<int32_t>(batch * world.size()));
  // No evaluation here: the device memory check plans the training step alone (else it
  // would plan the config's evaluation step, train.eval_batch images).
  c.mutable_train()->set_eval_batch(c.train().global_batch());
  c.mutable_train()->set_steps(steps + 2);
  c.mutable_train()->set_warmup_steps(1);
  const Dataset data =
      MakeSyntheticDataset(1, batch * world.size() * 2, m.channels(), m.image_size(),
                           m.image_size(), std::min(10, m.num_classes()));
  auto trainer = Trainer::Create(c, &world, &data, dev, session.device_world());
  Status ok = AgreeOnStatus(world, trainer.status());
  if (!ok.ok()) {
    PrintError("moerun bench train", ok.message());
    return kExitUsage;
  }
  const bool bf16 = c.train().precision() == TrainConfig::BF16;
  std::string peak_kind = "cpu_fp32_square_gemm";
  double peak = 0;
  if (!on_device) {
    peak = MeasureGemmPeakGflops({1024, 2048}, 0.3);
  } else if (bf16) {
    peak = CublasBf16PeakTflops(8192) * 1e3;
    peak_kind = "cublas_bf16_square_gemm_8192";
  } else {
    peak = ops::GemmGflops(dev, 8192, 5);
    peak_kind = "device_fp32_square_gemm_8192";
  }
  // Warm-up: buffers, page faults, the arena settling into one block.
  for (int i = 0; i < 2; ++i) (*trainer)->Step();
  // A step on a device returns with work queued: wait for it on both sides of the timing.
  const auto drain = [&] {
    if (on_device) RequireBackend(dev).Synchronize();
  };
  drain();
  world.Barrier();
  const double t0 = MPI_Wtime();
  for (int i = 0; i < steps; ++i) (*trainer)->Step();
  drain();
  double dt = MPI_Wtime() - t0;
  world.AllReduce(&dt, 1, DType::kF64, ReduceOp::kMax);
  const TrainingFootprint f = EstimateFootprint(m, world.size(), batch, bf16);
  const double ips = static_cast<double>(batch) * world.size() * steps / dt;
  const double achieved = ips * f.flops_per_image / 1e9;
  const double peak_all = peak * world.size();
  if (session.is_root()) {
    nlohmann::json line{{"bench", "train"},
                        {"config", config_path},
                        {"model", m.name()},
                        {"params", CountParameters(m).total},
                        {"ranks", world.size()},
                        {"threads", NumThreads()},
                        {"batch_per_rank", batch},
                        {"step_s", dt / steps},
                        {"images_per_s", ips},
                        {"train_flops_per_image", f.flops_per_image},
                        {"achieved_gflops", achieved},
                        {"gemm_peak_gflops", peak_all},
                        {"peak_kind", peak_kind},
                        {"precision", bf16 ? "bf16" : "fp32"},
                        {"mfu", peak_all > 0 ? achieved / peak_all : 0.0}};
    if (on_device) line.update({{"device", RequireBackend(dev).Describe()}});
    PrintJsonLine(line);
  }
  return kExitOk;
}

}  // namespace moerun
