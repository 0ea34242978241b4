// moerun bench moe-layer --device cuda: one MoE layer on this rank's GPU. Routing (top-k,
// vanilla/BPR slots, rows), pack, bf16 cast, the expert MLP's cuBLAS GEMMs forward and
// backward, the combine and its backward, and the dispatch's backward, each timed with CUDA
// events; expert GEMM TFLOP/s beside the bf16
// cuBLAS peak measured in the same run (a large square GEMM), and, when PyTorch with CUDA
// is importable, a PyTorch index-dispatch layer of the same shape on the same GPU.
#include <cublas_v2.h>
#include <cuda_runtime_api.h>

#include <chrono>
#include <cmath>
#include <cstdio>
#include <random>
#include <sstream>
#include <string>

#include "launch/bench_moe_layer.h"
#include "launch/commands.h"
#include "model/moe_experts_cuda.h"
#include "model/moe_plan.h"
#include "model/routing_cuda.h"
#include "runtime/backend.h"
#include "runtime/cuda_check.h"

namespace moerun {
namespace {

// Every call checked: a failed record or wait would time nothing and print a number.
class EventTimer {
 public:
  explicit EventTimer(cudaStream_t s) : s_(s) {
    MOERUN_CUDA_CHECK(cudaEventCreate(&a_));
    MOERUN_CUDA_CHECK(cudaEventCreate(&b_));
  }
  ~EventTimer() {
    cudaEventDestroy(a_);
    cudaEventDestroy(b_);
  }
  void Start() { MOERUN_CUDA_CHECK(cudaEventRecord(a_, s_)); }
  // Milliseconds since Start (waits for the stream: single-rank, no collective behind it).
  double Stop() {
    MOERUN_CUDA_CHECK(cudaEventRecord(b_, s_));
    MOERUN_CUDA_CHECK(cudaEventSynchronize(b_));
    float ms = 0;
    MOERUN_CUDA_CHECK(cudaEventElapsedTime(&ms, a_, b_));
    return ms;
  }

 private:
  cudaStream_t s_;
  cudaEvent_t a_, b_;
};

void FillNormalHost(Tensor* t, float scale, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> n01;
  float* p = t->data<float>();
  for (int64_t i = 0; i < t->numel(); ++i) p[i] = scale * n01(rng);
}

}  // namespace

bool CudaMoeBenchBuilt() { return true; }

double CublasBf16PeakTflops(int64_t n) {
  auto stream = static_cast<cudaStream_t>(RequireBackend(Device::kCUDA).stream());
  // Random operands: on constant ones (zeros, or one value) the tensor cores draw less power
  // and the product runs ~10% faster than on real data, overstating the peak.
  auto random_bf16 = [n](uint64_t seed) {
    Tensor host = Tensor::Empty({n, n}, DType::kBF16);
    BF16* p = host.data<BF16>();
    uint64_t state = seed;
    for (int64_t i = 0; i < n * n; ++i) {
      state = state * 6364136223846793005ull + 1442695040888963407ull;  // an LCG: cheap
      p[i] = FloatToBF16(static_cast<float>(static_cast<int32_t>(state >> 40) - (1 << 23)) /
                         static_cast<float>(1 << 23));
    }
    return host.To(Device::kCUDA);
  };
  Tensor a = random_bf16(1), b = random_bf16(2);
  Tensor c = Tensor::Zeros({n, n}, DType::kF32, Device::kCUDA);
  // Every call checked: a refused GEMM would time nothing and report an absurd peak.
  auto check = [](cublasStatus_t st, const char* what) {
    CHECK(st == CUBLAS_STATUS_SUCCESS)
        << "bench peak: " << what << " failed: " << cublasGetStatusString(st);
  };
  cublasHandle_t h;
  check(cublasCreate(&h), "cublasCreate");
  check(cublasSetStream(h, stream), "cublasSetStream");
  const float alpha = 1, beta = 0;
  auto gemm = [&] {
    check(cublasGemmEx(h, CUBLAS_OP_N, CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(n),
                       static_cast<int>(n), &alpha, a.raw_data(), CUDA_R_16BF, static_cast<int>(n),
                       b.raw_data(), CUDA_R_16BF, static_cast<int>(n), &beta, c.raw_data(),
                       CUDA_R_32F, static_cast<int>(n), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
          "cublasGemmEx (bf16 x bf16 -> fp32)");
  };
  // Warm-up of at least ~200 ms (the clocks ramp up from idle), then the best of 3 timed
  // batches of 10.
  const int iters = 10;
  double best_ms = 0;
  {
    EventTimer warm(stream);
    double warmed_ms = 0;
    for (int round = 0; round < 100 && warmed_ms < 200; ++round) {
      warm.Start();
      for (int i = 0; i < iters; ++i) gemm();
      warmed_ms += warm.Stop();
    }
  }
  for (int batch = 0; batch < 3; ++batch) {
    EventTimer t(stream);
    t.Start();
    for (int i = 0; i < iters; ++i) gemm();
    const double ms = t.Stop();
    if (best_ms == 0 || ms < best_ms) best_ms = ms;
  }
  cublasDestroy(h);  // the timers waited for the stream: nothing left for its device wait
  return 2.0 * n * n * n * iters / (best_ms * 1e-3) / 1e12;
}

int RunBenchMoeLayerCuda(const MoeLayerBenchSpec& spec, Session& session) {
  if (session.size() != 1) {
    PrintError("moerun bench moe-layer",
               "--device cuda runs one rank (one GPU) in this version; run it without mpirun "
               "or with -np 1");
    return kExitUnavailable;
  }
  Backend& cuda = RequireBackend(Device::kCUDA);
  auto stream = static_cast<cudaStream_t>(cuda.stream());
  const double peak = CublasBf16PeakTflops(8192);
  const int64_t t = spec.tokens;
  for (const auto& [d, m] : spec.shapes) {
    for (int64_t e : spec.experts) {
      for (bool bpr : spec.bprs) {
        CapacityRule rule;
        rule.capacity_factor = spec.capacity_factor;
        rule.bpr = bpr;
        int64_t group = 0;
        auto cap_or = CheckGroupsAndCapacity(rule, t, static_cast<int>(e), spec.k, &group);
        if (!cap_or.ok()) {
          PrintError("moerun bench moe-layer", cap_or.status().message());
          return kExitUsage;
        }
        const int64_t cap = *cap_or, k = spec.k;
        // Inputs on the device: gates (a softmax-like positive table), tokens, gradients.
        Tensor gates_h = Tensor::Empty({t, e}), x_h = Tensor::Empty({t, d});
        FillNormalHost(&gates_h, 1.0f, 1);
        for (int64_t i = 0; i < gates_h.numel(); ++i) {
          gates_h.data<float>()[i] = std::fabs(gates_h.data<float>()[i]) / e;
        }
        FillNormalHost(&x_h, 1.0f, 2);
        Tensor gates = gates_h.To(Device::kCUDA), x = x_h.To(Device::kCUDA);
        Tensor idx = Tensor::Empty({t, k}, DType::kI32, Device::kCUDA);
        Tensor w = Tensor::Empty({t, k}, DType::kF32, Device::kCUDA);
        Tensor slot = Tensor::Empty({t, k}, DType::kI32, Device::kCUDA);
        Tensor row = Tensor::Empty({t, k}, DType::kI32, Device::kCUDA);
        Tensor load = Tensor::Empty({e}, DType::kI32, Device::kCUDA);
        Tensor packed = Tensor::Empty({e, cap, d}, DType::kF32, Device::kCUDA);
        Tensor packed_bf16 = Tensor::Empty({e, cap, d}, DType::kBF16, Device::kCUDA);
        Tensor y = Tensor::Empty({t, d}, DType::kF32, Device::kCUDA);
        // The layer's backward from dy [T, D] (as the PyTorch peer's y.backward()): the
        // combine's backward into d_buf [E, cap, D] and d_weight, the experts', the
        // dispatch's (a gather of d_in's kept rows into dx).
        // Random, as the data a layer sees (constant operands run the tensor cores ~10%
        // faster than the peak's random ones would allow).
        Tensor dy_h = Tensor::Empty({t, d});
        FillNormalHost(&dy_h, 0.01f, 5);
        Tensor dy = dy_h.To(Device::kCUDA);
        Tensor d_buf = Tensor::Empty({e, cap, d}, DType::kF32, Device::kCUDA);
        Tensor d_weight = Tensor::Empty({t, k}, DType::kF32, Device::kCUDA);
        Tensor dx = Tensor::Empty({t, d}, DType::kF32, Device::kCUDA);
        CudaRoutingScratch scratch;
        CudaExpertMlp experts(e, d, m, /*gelu_tanh=*/true);
        ExpertMlpParams host;
        host.fc1_weight = Tensor::Empty({e, m, d});
        host.fc1_bias = Tensor::Zeros({e, m});
        host.fc2_weight = Tensor::Empty({e, d, m});
        host.fc2_bias = Tensor::Zeros({e, d});
        FillNormalHost(&host.fc1_weight, 1.0f / std::sqrt(static_cast<float>(d)), 3);
        FillNormalHost(&host.fc2_weight, 1.0f / std::sqrt(static_cast<float>(m)), 4);
        experts.LoadParams(host);
        Tensor out, d_in;
        EventTimer timer(stream);
        double routing_ms = 0, pack_ms = 0, expert_ms = 0, bwd_expert_ms = 0, combine_ms = 0;
        double bwd_combine_ms = 0, bwd_dispatch_ms = 0, cast_ms = 0;
        // timed: the phases' times are added up (each phase waits for the GPU at its end);
        // otherwise nothing waits, as in training, for the whole-step timing.
        auto start = [&](bool timed) {
          if (timed) timer.Start();
        };
        auto stop = [&](bool timed) { return timed ? timer.Stop() : 0.0; };
        auto step = [&](bool timed) {
          // The bf16 copies of the fp32 master weights, as each training step makes them
          // after the optimizer (the peer casts under autocast inside its step).
          start(timed);
          experts.CastWeights();
          const double w_ms = stop(timed);
          start(timed);
          CudaTopK(gates.device_data<float>(Device::kCUDA), t, static_cast<int>(e),
                   static_cast<int>(k), idx.device_data<int32_t>(Device::kCUDA),
                   w.device_data<float>(Device::kCUDA));
          CudaAssignSlots(idx.device_data<int32_t>(Device::kCUDA),
                          w.device_data<float>(Device::kCUDA), t, static_cast<int>(e),
                          static_cast<int>(k), bpr, slot.device_data<int32_t>(Device::kCUDA),
                          load.device_data<int32_t>(Device::kCUDA), nullptr, &scratch);
          CudaPlanRows(idx.device_data<int32_t>(Device::kCUDA),
                       slot.device_data<int32_t>(Device::kCUDA), t, k, group, cap, cap,
                       row.device_data<int32_t>(Device::kCUDA));
          const double r_ms = stop(timed);
          start(timed);
          packed.SetZero();
          CudaPackRows(row.device_data<int32_t>(Device::kCUDA), x.device_data<float>(Device::kCUDA),
                       t, k, d, packed.device_data<float>(Device::kCUDA));
          CudaCastToBF16(packed.device_data<float>(Device::kCUDA),
                         reinterpret_cast<uint16_t*>(packed_bf16.device_data<BF16>(Device::kCUDA)),
                         packed.numel());
          const double p_ms = stop(timed);
          start(timed);
          experts.Forward(packed_bf16, &out);
          const double e_ms = stop(timed);
          start(timed);
          CudaGatherKeptRows(
              out.device_data<float>(Device::kCUDA), row.device_data<int32_t>(Device::kCUDA),
              w.device_data<float>(Device::kCUDA), t, k, d, y.device_data<float>(Device::kCUDA));
          const double c_ms = stop(timed);
          start(timed);
          d_buf.SetZero();
          CudaGatherKeptRowsBackward(
              out.device_data<float>(Device::kCUDA), row.device_data<int32_t>(Device::kCUDA),
              w.device_data<float>(Device::kCUDA), dy.device_data<float>(Device::kCUDA), t, k, d,
              d_buf.device_data<float>(Device::kCUDA), d_weight.device_data<float>(Device::kCUDA));
          const double cb_ms = stop(timed);
          start(timed);
          experts.Backward(d_buf, &d_in);
          const double b_ms = stop(timed);
          start(timed);
          CudaGatherKeptRows(d_in.device_data<float>(Device::kCUDA),
                             row.device_data<int32_t>(Device::kCUDA), nullptr, t, k, d,
                             dx.device_data<float>(Device::kCUDA));
          const double db_ms = stop(timed);
          if (!timed) return;
          cast_ms += w_ms;
          bwd_combine_ms += cb_ms;
          bwd_dispatch_ms += db_ms;
          routing_ms += r_ms;
          pack_ms += p_ms;
          expert_ms += e_ms;
          combine_ms += c_ms;
          bwd_expert_ms += b_ms;
        };
        // Warm-up: at least one step and ~200 ms (the GPU idled while the host drew this
        // case's weights, and its clocks ramp up from idle), as for the peak.
        {
          const auto t0 = std::chrono::steady_clock::now();
          for (int i = 0; i < 1000; ++i) {
            step(false);
            if (std::chrono::steady_clock::now() - t0 >= std::chrono::milliseconds(200)) break;
          }
          cuda.Synchronize();
        }
        for (int i = 0; i < spec.steps; ++i) step(true);
        const double n = spec.steps;
        const double phase_sum_ms = (cast_ms + routing_ms + pack_ms + expert_ms + combine_ms +
                                     bwd_combine_ms + bwd_expert_ms + bwd_dispatch_ms) /
                                    n;
        // The step as training runs it (and as the peer is timed): back to back, no wait
        // between the phases, gaps included.
        EventTimer whole(stream);
        whole.Start();
        for (int i = 0; i < spec.steps; ++i) step(false);
        const double step_ms = whole.Stop() / n;
        const double gemm_tflops =
            experts.FlopsPerStep(cap) / ((expert_ms + bwd_expert_ms) / n * 1e-3) / 1e12;
        nlohmann::json line = {{"bench", "moe-layer"},
                               {"device", cuda.Describe()},
                               {"d", d},
                               {"m", m},
                               {"e", e},
                               {"k", k},
                               {"bpr", bpr},
                               {"capacity", cap},
                               {"tokens_per_rank", t},
                               {"precision", "bf16 GEMMs, fp32 accumulation and master weights"},
                               {"step_ms", step_ms},
                               {"phase_sum_ms", phase_sum_ms},
                               {"tokens_per_s", t / (step_ms * 1e-3)},
                               {"expert_gemm_tflops", gemm_tflops},
                               {"cublas_bf16_peak_tflops", peak},
                               {"expert_gemm_fraction_of_peak", gemm_tflops / peak},
                               {"fused_bias_gelu", experts.LastForwardFused()},
                               {"ms",
                                {{"weight_cast", cast_ms / n},
                                 {"routing", routing_ms / n},
                                 {"pack", pack_ms / n},
                                 {"expert", expert_ms / n},
                                 {"combine", combine_ms / n},
                                 {"bwd_combine", bwd_combine_ms / n},
                                 {"bwd_expert", bwd_expert_ms / n},
                                 {"bwd_dispatch", bwd_dispatch_ms / n}}},
                               {"note",
                                "the gates are given, as to the PyTorch peer: the router GEMM "
                                "and its backward are not timed on either side; both "
                                "sides cast the fp32 weights to bf16 inside each step"}};
        // The PyTorch peer routes as vanilla (token order): run beside the vanilla case only,
        // its line first, and the ratio of the step times in this one.
        std::string torch;
        if (!bpr) {
          torch = RunTorchPeer(spec, d, m, e, cap);
          if (!torch.empty()) {
            std::printf("%s", torch.c_str());
            std::fflush(stdout);  // kept if the job is killed before the next line
          }
          std::istringstream lines(torch);
          for (std::string l; std::getline(lines, l);) {
            const nlohmann::json j = nlohmann::json::parse(l, nullptr, false);
            if (j.is_object() && j.contains("step_ms") && j["step_ms"].is_number()) {
              const double torch_ms = j["step_ms"].get<double>();
              line["torch_step_ms"] = torch_ms;
              line["speedup_vs_torch"] = torch_ms / step_ms;
            }
          }
        }
        PrintJsonLine(line);
      }
    }
  }
  return kExitOk;
}

}  // namespace moerun
