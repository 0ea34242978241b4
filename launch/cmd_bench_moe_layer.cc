// moerun bench moe-layer: forward + backward of one expert-parallel MoE layer at V-MoE
// shapes, with the time split into its parts, expert GEMM GFLOP/s beside the GEMM peak and
// all-to-all GB/s beside a raw MPI_Alltoallv of the same size, all measured in this run.
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <random>
#include <sstream>

#include "launch/bench_comm.h"
#include "launch/bench_moe_layer.h"
#include "launch/commands.h"
#include "model/moe_layer.h"
#include "runtime/backend.h"
#include "runtime/kernels.h"

namespace moerun {
namespace {

struct LayerShape {
  int64_t d, m;
};

// Fills t (on any device) with scale * N(0, 1) from `seed`.
void FillNormal(Tensor* t, float scale, uint32_t seed) {
  Tensor host = Tensor::Empty(t->shape());
  std::mt19937 rng(seed);
  std::normal_distribution<float> n01;
  float* p = host.data<float>();
  for (int64_t i = 0; i < host.numel(); ++i) p[i] = scale * n01(rng);
  if (t->device() == Device::kCPU) {
    std::copy(p, p + host.numel(), t->data<float>());
  } else {
    t->CopyFrom(host);
  }
}

}  // namespace

#ifndef MOERUN_WITH_CUDA_KERNELS
bool CudaMoeBenchBuilt() { return false; }
double CublasBf16PeakTflops(int64_t) { return 0; }
int RunBenchMoeLayerCuda(const MoeLayerBenchSpec&, Session&) {
  PrintError("moerun bench moe-layer",
             "--device cuda: this moerun was built without the CUDA kernels (nvcc was not found "
             "at configure time); use --device cpu");
  return kExitUnavailable;
}
#endif

std::string RunTorchPeer(const MoeLayerBenchSpec& spec, int64_t d, int64_t m, int64_t e,
                         int64_t capacity) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::path self = fs::read_symlink("/proc/self/exe", ec);
  const fs::path script = self.parent_path().parent_path() / "launch" / "moe_layer_torch.py";
  if (ec || !fs::exists(script)) return "";
  const char* py = std::getenv("MOERUN_PYTHON");
  const std::string cmd =
      std::string(py != nullptr ? py : "python3") + " '" + script.string() + "' --tokens " +
      std::to_string(spec.tokens) + " --d " + std::to_string(d) + " --m " + std::to_string(m) +
      " --e " + std::to_string(e) + " --k " + std::to_string(spec.k) + " --capacity " +
      std::to_string(capacity) + " --steps " + std::to_string(std::max(spec.steps, 3));
  // Only its stdout is read (JSON lines); its stderr (PyTorch's warnings, a traceback) goes
  // to ours as it is.
  std::string out;
  if (FILE* f = popen(cmd.c_str(), "r")) {
    char buf[4096];
    size_t n;
    while ((n = fread(buf, 1, sizeof(buf), f)) > 0) out.append(buf, n);
    if (const int status = pclose(f); status != 0) {
      out = nlohmann::json({{"bench", "moe-layer-torch"},
                            {"failed", "exit status " + std::to_string(status) +
                                           " (its stderr is in this command's stderr)"},
                            {"stdout", out}})
                .dump() +
            "\n";
    }
  }
  return out;
}

int RunBenchMoeLayer(const std::vector<std::string>& args, ProgramArgs program) {
  GlobalOptions global;
  global.cuda_supported = true;
  std::string shapes_text, experts_text, bpr_text, overlap_text;
  int64_t tokens = 4096;
  int k = 2, steps = 3, overlap_stages = 4;
  double capacity_factor = 1.05;
  po::options_description desc("Options");
  desc.add_options()                                                                      //
      ("tokens", po::value(&tokens)->default_value(4096), "tokens per rank (one group)")  //
      ("shapes", po::value(&shapes_text)->default_value("512x2048,768x3072"),
       "layer shapes DxM (model width x expert hidden width)")                                    //
      ("experts", po::value(&experts_text)->default_value("8,32"), "expert counts E")             //
      ("k", po::value(&k)->default_value(2), "experts per token")                                 //
      ("capacity-factor", po::value(&capacity_factor)->default_value(1.05), "capacity factor c")  //
      ("bpr", po::value(&bpr_text)->default_value("0,1"), "routing: 0 vanilla, 1 BPR, or both")   //
      ("overlap", po::value(&overlap_text)->default_value("0"),
       "overlap the dispatch all-to-alls with the experts (moe.overlap_dispatch): 0, 1, or 0,1 "
       "(both, and the gain of 1 over 0)")  //
      ("overlap-stages", po::value(&overlap_stages)->default_value(4),
       "the overlapped dispatch's transfers at most (moe.overlap_stages, >= 1)")  //
      ("steps", po::value(&steps)->default_value(3), "timed forward+backward steps per case");
  AddGlobalOptions(&desc, &global);
  po::variables_map vm;
  if (auto done = ParseArgs(
          "moerun bench moe-layer", "[mpirun -np P] moerun bench moe-layer [options]",
          "Forward + backward of one MoE layer per (shape, E, routing): tokens/s over all ranks,\n"
          "the time split (router, routing = priority + capacity, pack, all-to-all, expert GEMMs,\n"
          "combine, and the backward parts), expert GEMM GFLOP/s beside the square-GEMM peak and\n"
          "all-to-all GB/s beside a raw MPI_Alltoallv of the same size, both measured in this\n"
          "run. layer_fraction_of_gemm_limit: the expert FLOPs over the step at the square peak;\n"
          "layer_fraction_of_paired_peak: each step against a square GEMM run right after it on\n"
          "every rank (the median over the steps); layer_fraction_of_shape_gemm: the same GEMMs\n"
          "timed alone at the layer's shapes over the step; busy_ms_min/max: the ranks' time\n"
          "outside the all-to-alls (their spread: the imbalance waited out). --device cuda: one\n"
          "rank times the bf16 cuBLAS experts and the GPU routing kernels beside the cuBLAS peak\n"
          "and PyTorch; several ranks (one GPU each) time the training path's MoeLayer over\n"
          "NCCL: steps, the parts by CUDA events, a2a_gbps beside NCCL's own all-to-all (with\n"
          "--overlap 0,1: its gain).",
          args, desc, nullptr, &vm))
    return *done;
  auto experts = ParseIntList(experts_text);
  auto shapes = ParseShapeList(shapes_text);
  std::string problem;
  if (!experts.ok()) problem = "--experts: " + experts.status().message();
  if (!shapes.ok()) problem = "--shapes: " + shapes.status().message();
  std::vector<bool> bprs;
  if (bpr_text == "0" || bpr_text == "0,1") bprs.push_back(false);
  if (bpr_text == "1" || bpr_text == "0,1") bprs.push_back(true);
  if (bprs.empty()) problem = "--bpr must be 0, 1 or 0,1";
  std::vector<bool> overlaps;
  if (overlap_text == "0" || overlap_text == "0,1") overlaps.push_back(false);
  if (overlap_text == "1" || overlap_text == "0,1") overlaps.push_back(true);
  if (overlaps.empty()) problem = "--overlap must be 0, 1 or 0,1";
  if (overlap_stages < 1) problem = "--overlap-stages must be >= 1";
  if (tokens < 1 || steps < 1 || k < 1 || !(capacity_factor > 0) ||
      !std::isfinite(capacity_factor)) {
    problem = "--tokens, --steps, --k and --capacity-factor must be positive (and finite)";
  }
  if (tokens > (int64_t{1} << 24) || steps > 100000) {
    problem = "--tokens must be at most 16M and --steps at most 100000";
  }
  if (experts.ok()) {
    for (int64_t e : *experts) {
      if (e < 1 || e > 4096) problem = "--experts: each count must be between 1 and 4096";
      if (k > e) {
        problem = "--k " + std::to_string(k) + " is larger than the expert count " +
                  std::to_string(e) + "; --k must be at most every --experts value";
      }
    }
  }
  if (shapes.ok()) {
    for (const auto& [d, m] : *shapes) {
      if (d < 1 || m < 1 || d > 65536 || m > 262144) {
        problem = "--shapes: D and M must be between 1 and 65536 / 262144";
      }
    }
  }
  if (!problem.empty()) {
    PrintError("moerun bench moe-layer", problem);
    return kExitUsage;
  }
  Session session(program.argc, program.argv, global);
  const Device dev = session.device();
  const bool on_device = dev != Device::kCPU;
  if (on_device && (session.size() == 1 || !CudaMoeBenchBuilt())) {
    MoeLayerBenchSpec spec;
    spec.tokens = tokens;
    spec.shapes = *shapes;
    spec.experts = *experts;
    spec.bprs = bprs;
    spec.k = k;
    spec.steps = steps;
    spec.capacity_factor = capacity_factor;
    return RunBenchMoeLayerCuda(spec, session);
  }
  // Several GPUs: the training path's MoeLayer on each rank's GPU, its rows moved by NCCL.
  if (const Status nccl = session.RequireDeviceWorld(); !nccl.ok()) {
    PrintError("moerun bench moe-layer", nccl.message());
    return kExitUnavailable;
  }
  Communicator& world = session.world();
  // The raw all-to-all beside the layer's: MPI's on the host, NCCL's own calls on a second
  // NCCL communicator on GPUs (every rank makes it, or none).
  std::unique_ptr<RawCollectives> raw_a2a;
  if (!on_device) {
    raw_a2a = MakeRawMpiCollectives(MPI_COMM_WORLD);
  } else {
    auto made = MakeRawNcclCollectives(world);
    const Status ok = AgreeOnStatus(world, made.status());
    if (!ok.ok()) {
      if (session.is_root()) PrintError("moerun bench moe-layer", "--device cuda: " + ok.message());
      return kExitUnavailable;
    }
    raw_a2a = std::move(*made);
  }
  // The square-GEMM peak, measured again after each case (the same clocks and caches as the
  // case, every rank at once as in the layer); a case is reported against the best seen.
  double peak = on_device ? 0.0 : MeasureGemmPeakGflops({1024, 2048, 3072}, 0.3);
  const int64_t probe_n = 2048;
  std::function<double()> probe;
  if (!on_device) probe = SquareGemmProbe(probe_n);
  for (const auto& [shape_d, shape_m] : *shapes) {
    const LayerShape shape{shape_d, shape_m};
    for (int64_t e : *experts) {
      auto groups = MoeGroups::Create(&world, static_cast<int>(e), session.device_world());
      if (!groups.ok()) {
        PrintError("moerun bench moe-layer",
                   "E=" + std::to_string(e) + ": " + groups.status().message());
        return kExitUsage;
      }
      for (bool bpr : bprs) {
        double step_without_overlap = 0;
        for (bool overlap : overlaps) {
          MoeLayerConfig cfg;
          cfg.d = static_cast<int>(shape.d);
          cfg.m = static_cast<int>(shape.m);
          cfg.num_experts = static_cast<int>(e);
          cfg.k = k;
          cfg.capacity_factor = capacity_factor;
          cfg.bpr = bpr;
          cfg.overlap_dispatch = overlap;
          cfg.overlap_stages = overlap_stages;
          cfg.device = dev;
          MoeLayer layer(cfg, *groups);
          MoeParams& p = layer.params();
          FillNormal(&p.router_weight, 1.0f / std::sqrt(static_cast<float>(shape.d)), 1);
          FillNormal(&p.fc1_weight, 1.0f / std::sqrt(static_cast<float>(shape.d)),
                     2 + world.rank());
          FillNormal(&p.fc2_weight, 1.0f / std::sqrt(static_cast<float>(shape.m)),
                     3 + world.rank());
          const Shape rows_shape{tokens, shape.d};
          Tensor x = Tensor::Empty(rows_shape, DType::kF32, dev);
          Tensor y = Tensor::Empty(rows_shape, DType::kF32, dev);
          Tensor dy = Tensor::Empty(rows_shape, DType::kF32, dev);
          Tensor dx = Tensor::Empty(rows_shape, DType::kF32, dev);
          FillNormal(&x, 1.0f, 10 + world.rank());
          FillNormal(&dy, 1.0f, 20 + world.rank());
          MoeForwardArgs fwd;
          fwd.first_token = world.rank() * tokens;
          auto step = [&](int i) {
            fwd.noise_key.step = static_cast<uint32_t>(i);
            const Status s = layer.Forward(x, fwd, &y);
            CHECK(s.ok()) << s.message();
            layer.Backward(dy, &dx);
            layer.ReduceReplicaGradients();
          };
          // On a device the work is queued: wait for it around the timed steps, NCCL's
          // streams first (their wait polls for a failed or missing peer and the watchdog
          // timeout; the backend's would block).
          auto finish = [&] {
            if (!on_device) return;
            (*groups)->expert().Synchronize();
            if ((*groups)->replicas() != nullptr) (*groups)->replicas()->Synchronize();
            RequireBackend(dev).Synchronize();
          };
          step(0);  // warm-up: allocates the buffers
          finish();
          ResolveDeviceTimers();  // the warm-up's device times land before the reset
          layer.timers() = MoeTimers();
          // On the host every step is timed on its own, between barriers, and followed by a
          // square GEMM on every rank at once: the peak at that moment, so that a step is
          // set against the clocks it ran on (this host's speed drifts by tens of percent
          // within a minute on shared machines).
          std::vector<double> step_s, probe_gflops;
          double wall = 0, busy_min = 0, busy_max = 0;
          world.Barrier();
          if (on_device) {
            const double t0 = MPI_Wtime();
            for (int i = 1; i <= steps; ++i) step(i);
            finish();
            wall = (MPI_Wtime() - t0) / steps;
          } else {
            for (int i = 1; i <= steps; ++i) {
              world.Barrier();
              const double t0 = MPI_Wtime();
              step(i);
              step_s.push_back(MPI_Wtime() - t0);
              world.Barrier();
              probe_gflops.push_back(probe());
            }
            // This rank's time outside the all-to-alls: the ranks' spread is the imbalance
            // the fastest rank waits out inside its all-to-alls.
            const MoeTimers& t = layer.timers();
            double busy = -(t.all_to_all + t.bwd_all_to_all) / steps;
            for (double v : step_s) busy += v / steps;
            busy_min = busy_max = busy;
            world.AllReduce(&busy_min, 1, DType::kF64, ReduceOp::kMin);
            world.AllReduce(&busy_max, 1, DType::kF64, ReduceOp::kMax);
            // A step lasts until its slowest rank is done; the machine's peak at a moment
            // is the mean of every rank's (each rank's share of it).
            world.AllReduce(step_s.data(), steps, DType::kF64, ReduceOp::kMax);
            world.AllReduce(probe_gflops.data(), steps, DType::kF64, ReduceOp::kSum);
            for (double& g : probe_gflops) g /= world.size();
            for (double v : step_s) wall += v / steps;
          }
          world.AllReduce(&wall, 1, DType::kF64, ReduceOp::kMax);
          ResolveDeviceTimers();  // the parts' device times (CUDA events)
          const MoeTimers& tm = layer.timers();
          auto per_step = [&](double v) { return v / steps; };
          const double expert_s = per_step(tm.expert + tm.bwd_expert);
          const double a2a_s = per_step(tm.all_to_all + tm.bwd_all_to_all);
          const double other_s =
              per_step(tm.router + tm.routing + tm.pack + tm.combine + tm.bwd_combine +
                       tm.bwd_pack + tm.bwd_dispatch + tm.bwd_router);
          const int64_t el = (*groups)->local_experts(), pe = (*groups)->expert().size();
          const int64_t cap = layer.metrics().capacity, rows = pe * cap;  // one group per rank
          const double expert_flops = 12.0 * rows * shape.d * shape.m * el;
          // Four all-to-alls per step, each moving E_local*cap*D floats to every peer.
          const int64_t floats_per_peer = el * cap * shape.d;
          const double a2a_bytes = 4.0 * 4.0 * floats_per_peer * (pe - 1);
          if (!overlap) step_without_overlap = wall;
          // The fields naming the case, on both paths' lines.
          auto case_line = [&] {
            return nlohmann::json{{"bench", "moe-layer"},
                                  {"d", shape.d},
                                  {"m", shape.m},
                                  {"e", e},
                                  {"k", k},
                                  {"bpr", bpr},
                                  {"overlap", overlap},
                                  {"overlap_stages", overlap_stages},
                                  {"capacity_factor", capacity_factor},
                                  {"capacity", cap},
                                  {"ranks", world.size()},
                                  {"tokens_per_rank", tokens},
                                  {"step_ms", wall * 1e3},
                                  {"tokens_per_s", tokens * world.size() / wall}};
          };
          // Every rank, before rank 0 alone goes on to print.
          const double raw = pe > 1 && pe == world.size()
                                 ? RawAllToAllGbps(*raw_a2a, MPI_COMM_WORLD, dev, floats_per_peer,
                                                   static_cast<int>(pe), 4)
                                 : 0.0;
          if (on_device) {
            // The step, the expert FLOPs over it, and the parts as the device's events timed
            // them on rank 0 (the overlapped dispatch's all-to-all: its queueing only).
            if (!session.is_root()) continue;
            nlohmann::json line = case_line();
            line.update({{"device", RequireBackend(dev).Describe()},
                         {"precision", "fp32 (the training path's device experts)"},
                         {"layer_expert_tflops", expert_flops / wall / 1e12},
                         {"expert_ms", expert_s * 1e3},
                         {"all_to_all_ms", a2a_s * 1e3},
                         {"other_ms", other_s * 1e3},
                         // Without the overlap the all-to-alls are on the timed stream.
                         {"a2a_gbps", pe > 1 && !overlap && a2a_s > 0
                                          ? nlohmann::json(a2a_bytes / a2a_s / 1e9)
                                          : nlohmann::json(nullptr)},
                         {"raw_a2a_gbps", raw},
                         {"raw_a2a_kind", raw_a2a->kind()},
                         {"note",
                          "the MoeLayer of `train --device cuda` over NCCL; the parts timed by "
                          "CUDA events on rank 0, the overlapped all-to-all by its queueing"}});
            if (overlap && step_without_overlap > 0) {
              line["overlap_gain"] = step_without_overlap / wall - 1.0;
            }
            PrintJsonLine(line);
            continue;
          }
          peak = std::max(peak, MeasureGemmPeakGflops({1024, 2048, 3072}, 0.3));
          // The limit is every rank's share of the machine: the mean of the ranks' peaks
          // (each measured with every rank running at once, as in the layer).
          double mean_peak = peak;
          world.AllReduce(&mean_peak, 1, DType::kF64, ReduceOp::kSum);
          mean_peak /= world.size();
          // Each step against the peak probed right after it; the median over the steps.
          std::vector<double> paired;
          for (int i = 0; i < steps; ++i) {
            paired.push_back(expert_flops / step_s[i] / 1e9 / probe_gflops[i]);
          }
          auto median = [](std::vector<double> v) {
            std::sort(v.begin(), v.end());
            const size_t n = v.size();
            return n % 2 == 1 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
          };
          // The same GEMMs alone: this rank's experts' six products at the layer's shapes.
          double shape_s = el * MeasureExpertGemmSeconds(rows, shape.d, shape.m, 0.1);
          world.AllReduce(&shape_s, 1, DType::kF64, ReduceOp::kMax);
          if (!session.is_root()) continue;
          nlohmann::json line = case_line();
          line.update({{"threads", NumThreads()},
                       {"best_step_ms", *std::min_element(step_s.begin(), step_s.end()) * 1e3},
                       {"expert_gemm_gflops", expert_flops / expert_s / 1e9},
                       {"gemm_peak_gflops", mean_peak},
                       // The whole layer's step against the GEMM limit: the expert FLOPs
                       // over the step's wall time, as a fraction of the measured peak.
                       {"layer_fraction_of_gemm_limit", expert_flops / wall / 1e9 / mean_peak},
                       // The same, each step against the peak of its own moment.
                       {"paired_peak_gflops", median(probe_gflops)},
                       {"layer_fraction_of_paired_peak", median(paired)},
                       {"busy_ms_min", busy_min * 1e3},
                       {"busy_ms_max", busy_max * 1e3},
                       // The experts' GEMMs at these shapes, run alone, and the step
                       // against them: what the rest of the layer costs beside the
                       // GEMMs, apart from how well BLAS runs these shapes.
                       {"shape_gemm_gflops", expert_flops / shape_s / 1e9},
                       {"layer_fraction_of_shape_gemm", shape_s / wall},
                       {"a2a_gbps", pe > 1 ? a2a_bytes / a2a_s / 1e9 : 0.0},
                       {"raw_a2a_gbps", raw},
                       {"ms",
                        {{"router", per_step(tm.router) * 1e3},
                         {"routing", per_step(tm.routing) * 1e3},
                         {"pack", per_step(tm.pack) * 1e3},
                         {"all_to_all", per_step(tm.all_to_all) * 1e3},
                         {"expert", per_step(tm.expert) * 1e3},
                         {"expert_act", per_step(tm.expert_act) * 1e3},
                         {"combine", per_step(tm.combine) * 1e3},
                         {"bwd_combine", per_step(tm.bwd_combine) * 1e3},
                         {"bwd_pack", per_step(tm.bwd_pack) * 1e3},
                         {"bwd_all_to_all", per_step(tm.bwd_all_to_all) * 1e3},
                         {"bwd_expert", per_step(tm.bwd_expert) * 1e3},
                         {"bwd_expert_act", per_step(tm.bwd_expert_act) * 1e3},
                         {"bwd_dispatch", per_step(tm.bwd_dispatch) * 1e3},
                         {"bwd_router", per_step(tm.bwd_router) * 1e3}}},
                       {"expert_fraction", expert_s / wall},
                       {"a2a_fraction", a2a_s / wall},
                       {"other_fraction", other_s / wall}});
          if (overlap && step_without_overlap > 0) {
            line["overlap_gain"] = step_without_overlap / wall - 1.0;
          }
          PrintJsonLine(line);
        }
      }
    }
  }
  return kExitOk;
}

}  // namespace moerun
