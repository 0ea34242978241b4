// moerun bench gemm: fp32 GEMM throughput at the shapes an expert MLP runs (forward and
// both backward products), beside this machine's peak measured the same way (the best of
// large square GEMMs), with the thread count every rank of the job uses.
#include <mpi.h>

#include <algorithm>
#include <functional>
#include <memory>
#include <random>

#include "launch/bench_gemm.h"
#include "launch/commands.h"
#include "runtime/kernels.h"
#include "runtime/process.h"

namespace moerun {
namespace {

using GemmShape = BenchGemmShape;

// A GEMM's operands: a and b uniform in [-1, 1), c zero.
struct GemmOperands {
  Tensor a, b, c;
};

GemmOperands MakeOperands(const GemmShape& g) {
  const int64_t a_rows = g.ta ? g.k : g.m, a_cols = g.ta ? g.m : g.k;
  const int64_t b_rows = g.tb ? g.n : g.k, b_cols = g.tb ? g.k : g.n;
  GemmOperands o{Tensor::Empty({a_rows, a_cols}), Tensor::Empty({b_rows, b_cols}),
                 Tensor::Zeros({g.m, g.n})};
  std::mt19937 rng(7);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (int64_t i = 0; i < o.a.numel(); ++i) o.a.data<float>()[i] = u(rng);
  for (int64_t i = 0; i < o.b.numel(); ++i) o.b.data<float>()[i] = u(rng);
  return o;
}

void RunGemm(const GemmShape& g, GemmOperands* o) {
  Gemm(g.ta, g.tb, g.m, g.n, g.k, 1.0f, o->a.data<float>(), g.ta ? g.m : g.k, o->b.data<float>(),
       g.tb ? g.k : g.n, 0.0f, o->c.data<float>(), g.n);
}

// Seconds per GEMM, timed over repetitions lasting at least `seconds`, best of 3 loops.
double TimeGemm(const GemmShape& g, double seconds) {
  GemmOperands o = MakeOperands(g);
  auto run = [&] { RunGemm(g, &o); };
  run();  // warm-up: page in, let BLAS spin up its threads
  double t0 = MPI_Wtime();
  run();
  const double one = std::max(1e-6, MPI_Wtime() - t0);
  const int iters = static_cast<int>(std::clamp(seconds / one, 1.0, 1000.0));
  double best = 1e30;
  for (int loop = 0; loop < 3; ++loop) {
    t0 = MPI_Wtime();
    for (int i = 0; i < iters; ++i) run();
    best = std::min(best, (MPI_Wtime() - t0) / iters);
  }
  return best;
}

double Gflops(const GemmShape& g, double s) { return 2.0 * g.m * g.n * g.k / s / 1e9; }

}  // namespace

std::vector<BenchGemmShape> MlpPasses(int64_t t, int64_t d, int64_t m) {
  return {{"fc1_fwd", false, true, t, m, d}, {"fc1_dx", false, false, t, d, m},
          {"fc1_dw", true, false, m, d, t},  {"fc2_fwd", false, true, t, d, m},
          {"fc2_dx", false, false, t, m, d}, {"fc2_dw", true, false, d, m, t}};
}

#ifndef MOERUN_WITH_CUDA_KERNELS
int RunBenchGemmCuda(const std::vector<BenchGemmShape>&, double, Session&) {
  PrintError("moerun bench gemm",
             "--device cuda: this moerun was built without the CUDA kernels (nvcc was not found "
             "at configure time); use --device cpu");
  return kExitUnavailable;
}
#endif

double MeasureExpertGemmSeconds(int64_t rows, int64_t d, int64_t m, double seconds) {
  double total = 0;
  for (const GemmShape& g : MlpPasses(rows, d, m)) total += TimeGemm(g, seconds);
  return total;
}

std::function<double()> SquareGemmProbe(int64_t n) {
  const GemmShape g{"probe", false, false, n, n, n};
  auto o = std::make_shared<GemmOperands>(MakeOperands(g));
  RunGemm(g, o.get());  // warm-up
  return [g, o] {
    const double t0 = MPI_Wtime();
    RunGemm(g, o.get());
    return Gflops(g, std::max(1e-9, MPI_Wtime() - t0));
  };
}

double MeasureGemmPeakGflops(const std::vector<int64_t>& sizes, double seconds) {
  double peak = 0;
  for (int64_t n : sizes) {
    const GemmShape g{"peak", false, false, n, n, n};
    peak = std::max(peak, Gflops(g, TimeGemm(g, seconds)));
  }
  return peak;
}

int RunBenchGemm(const std::vector<std::string>& args, ProgramArgs program) {
  GlobalOptions global;
  global.cuda_supported = true;
  std::string rows_text, shapes_text, peak_text;
  double seconds = 0.3;
  po::options_description desc("Options");
  desc.add_options()                                                                            //
      ("rows", po::value(&rows_text)->default_value("1024,4096,16384"), "token rows per GEMM")  //
      ("shapes", po::value(&shapes_text)->default_value("512x2048,768x3072"),
       "expert MLP shapes DxM (model width x hidden width)")  //
      ("peak-sizes", po::value(&peak_text)->default_value("1024,2048,3072"),
       "square sizes whose best GFLOP/s is the measured peak")  //
      ("seconds", po::value(&seconds)->default_value(0.3), "target seconds per timed loop");
  AddGlobalOptions(&desc, &global);
  po::variables_map vm;
  if (auto done =
          ParseArgs("moerun bench gemm", "[mpirun -np N] moerun bench gemm [options]",
                    "fp32 GEMM GFLOP/s for the expert-MLP shapes (fc1 and fc2, forward, input "
                    "gradient\nand weight gradient), beside the machine's peak measured the "
                    "same way. Every rank\nruns at once with its thread share; rank 0 prints. "
                    "JSON fields: bench, pass, m, n, k,\ngflops, peak_gflops, threads, ranks.\n"
                    "--device cuda (one rank): each product on the GPU four ways, tflops of fp32, "
                    "bf16 (train.precision\nBF16's: operands cast on every call), bf16_gemm (the "
                    "GEMM alone on operands cast before)\nand fast16bf (cuBLAS's "
                    "COMPUTE_32F_FAST_16BF on fp32 operands), with cast_share and the\nproducts' "
                    "relative differences; defaults: 6304 rows (V-MoE-B/16 at 32 images), shapes "
                    "768x3072,768x2304.",
                    args, desc, nullptr, &vm))
    return *done;
  auto rows = ParseIntList(rows_text);
  auto peak_sizes = ParseIntList(peak_text);
  auto shapes = ParseShapeList(shapes_text);
  std::string problem;
  if (!rows.ok()) problem = "--rows: " + rows.status().message();
  if (!peak_sizes.ok()) problem = "--peak-sizes: " + peak_sizes.status().message();
  if (!shapes.ok()) problem = "--shapes: " + shapes.status().message();
  if (seconds <= 0) problem = "--seconds must be positive";
  if (!problem.empty()) {
    PrintError("moerun bench gemm", problem);
    return kExitUsage;
  }
  Session session(program.argc, program.argv, global);
  if (session.device() == Device::kCUDA) {
    if (session.size() > 1) {
      if (session.is_root()) {
        PrintError("moerun bench gemm",
                   "--device cuda runs on one rank (one GPU); run it without mpirun");
      }
      return kExitUsage;
    }
    // Default: the dense products of V-MoE-B/16 at 32 images (6304 token rows): the MLP
    // (768 x 3072), and the attention's qkv (768 -> 2304) with a 2304 -> 768 product.
    const std::vector<int64_t> cuda_rows =
        vm["rows"].defaulted() ? std::vector<int64_t>{6304} : *rows;
    const std::vector<std::pair<int64_t, int64_t>> cuda_shapes =
        vm["shapes"].defaulted()
            ? std::vector<std::pair<int64_t, int64_t>>{{768, 3072}, {768, 2304}}
            : *shapes;
    std::vector<BenchGemmShape> products;
    for (auto [d, m] : cuda_shapes) {
      for (int64_t t : cuda_rows) {
        for (const BenchGemmShape& g : MlpPasses(t, d, m)) products.push_back(g);
      }
    }
    return RunBenchGemmCuda(products, seconds, session);
  }
  // The largest GEMM's three matrices, on every rank of this host.
  double largest = 0;
  for (int64_t t : *rows) {
    for (auto [d, m] : *shapes) {
      largest = std::max(largest, 4.0 * (static_cast<double>(t) * d + static_cast<double>(d) * m +
                                         static_cast<double>(t) * m));
    }
  }
  for (int64_t n : *peak_sizes) largest = std::max(largest, 12.0 * n * n);
  const Status fits = RequireHostBytes(largest * std::max(1, Process().local_size),
                                       "the largest GEMM of --rows x --shapes (or --peak-sizes)",
                                       "use smaller --rows, --shapes or --peak-sizes");
  if (!fits.ok()) {
    if (session.is_root()) PrintError("moerun bench gemm", fits.message());
    return kExitUsage;
  }
  const int threads = NumThreads();
  double peak = 0;
  for (int64_t n : *peak_sizes) {
    const GemmShape g{"peak", false, false, n, n, n};
    const double gf = Gflops(g, TimeGemm(g, seconds));
    peak = std::max(peak, gf);
    if (session.is_root()) {
      PrintJsonLine({{"bench", "gemm"},
                     {"pass", "square"},
                     {"m", n},
                     {"n", n},
                     {"k", n},
                     {"gflops", gf},
                     {"threads", threads},
                     {"ranks", session.size()}});
    }
  }
  for (auto [d, m] : *shapes) {
    for (int64_t t : *rows) {
      for (const GemmShape& g : MlpPasses(t, d, m)) {
        const double gf = Gflops(g, TimeGemm(g, seconds));
        if (!session.is_root()) continue;
        PrintJsonLine({{"bench", "gemm"},
                       {"pass", g.pass},
                       {"d", d},
                       {"mlp", m},
                       {"rows", t},
                       {"m", g.m},
                       {"n", g.n},
                       {"k", g.k},
                       {"gflops", gf},
                       {"peak_gflops", peak},
                       {"fraction_of_peak", gf / peak},
                       {"threads", threads},
                       {"ranks", session.size()}});
      }
    }
  }
  return kExitOk;
}

}  // namespace moerun
