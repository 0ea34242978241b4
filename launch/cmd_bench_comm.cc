// moerun bench comm: Communicator bandwidth beside a raw MPI loop on the same buffers, in
// the same run, rounds alternating between the two so drift hits both alike. Each
// result is verified after timing (nccl-tests style).
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <sstream>

#include "launch/commands.h"
#include "runtime/process.h"
#include "runtime/tensor.h"

namespace moerun {
namespace {

struct CommBenchOptions {
  int64_t min_bytes = 0, max_bytes = 0;
  int factor = 4;
  double seconds = 0.2;
  int rounds = 7;
  std::vector<std::string> ops;
  bool check = true;
};

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Runs `body` `iters` times between barriers; returns the slowest rank's seconds.
template <typename Body>
double TimeLoop(MPI_Comm comm, int iters, Body body) {
  MPI_Barrier(comm);
  const double t0 = MPI_Wtime();
  for (int i = 0; i < iters; ++i) body();
  double dt = MPI_Wtime() - t0;
  MPI_Allreduce(MPI_IN_PLACE, &dt, 1, MPI_DOUBLE, MPI_MAX, comm);
  return dt;
}

class CommBench {
 public:
  CommBench(Session& s, const CommBenchOptions& o) : s_(s), o_(o), p_(s.size()) {
    MOERUN_MPI_CHECK(MPI_Comm_dup(MPI_COMM_WORLD, &raw_));
    const int64_t max_elems = o.max_bytes / 4 * p_;
    send_ = Tensor::Zeros({max_elems});
    recv_ = Tensor::Zeros({max_elems});
  }
  ~CommBench() { MPI_Comm_free(&raw_); }

  double min_ratio() const { return min_ratio_; }

  void AllToAllV(int64_t bytes_per_peer) {
    const int64_t count = bytes_per_peer / 4;
    std::vector<int64_t> counts(p_, count), displs = PrefixDisplacements(counts);
    std::vector<int> icounts(p_, static_cast<int>(count)), idispls(p_);
    for (int i = 0; i < p_; ++i) idispls[i] = static_cast<int>(displs[i]);
    float* send = send_.data<float>();
    float* recv = recv_.data<float>();
    Communicator& comm = s_.world();
    auto ours = [&] { comm.AllToAllV(send, counts, displs, recv, counts, displs, DType::kF32); };
    auto raw = [&] {
      MPI_Alltoallv(send, icounts.data(), idispls.data(), MPI_FLOAT, recv, icounts.data(),
                    idispls.data(), MPI_FLOAT, raw_);
    };
    Measure("all_to_all_v", bytes_per_peer, static_cast<double>(bytes_per_peer) * p_,
            p_ > 1 ? (p_ - 1.0) / p_ : 1.0, ours, raw, [&] {
              const int r = s_.rank();
              for (int q = 0; q < p_; ++q) {
                for (int64_t i = 0; i < count; ++i) send[q * count + i] = PatternValue(r, q, i);
              }
              std::fill_n(recv, count * p_, -1.0f);
              ours();
              for (int q = 0; q < p_; ++q) {
                for (int64_t i = 0; i < count; ++i) {
                  if (recv[q * count + i] != PatternValue(q, r, i)) return false;
                }
              }
              return true;
            });
  }

  void AllReduce(int64_t bytes) {
    const int64_t count = bytes / 4;
    float* buf = send_.data<float>();
    std::fill_n(buf, count, 0.0f);  // sums of zeros stay finite however often repeated
    Communicator& comm = s_.world();
    auto ours = [&] { comm.AllReduce(buf, count, DType::kF32, ReduceOp::kSum); };
    auto raw = [&] {
      MPI_Allreduce(MPI_IN_PLACE, buf, static_cast<int>(count), MPI_FLOAT, MPI_SUM, raw_);
    };
    Measure("all_reduce", bytes, static_cast<double>(bytes), p_ > 1 ? 2.0 * (p_ - 1) / p_ : 1.0,
            ours, raw, [&] {
              const int r = s_.rank();
              for (int64_t i = 0; i < count; ++i) buf[i] = static_cast<float>(r + i % 5);
              ours();
              const float base = p_ * (p_ - 1) / 2.0f;
              for (int64_t i = 0; i < count; ++i) {
                if (buf[i] != base + p_ * static_cast<float>(i % 5)) return false;
              }
              return true;
            });
  }

 private:
  static float PatternValue(int from, int to, int64_t i) {
    return static_cast<float>(from * 1000 + to * 10 + i % 7);
  }

  template <typename Ours, typename Raw, typename Check>
  void Measure(const char* op, int64_t bytes_per_peer, double alg_bytes, double bus_factor,
               Ours ours, Raw raw, Check check) {
    // Calibrate: enough iterations for ~o_.seconds per timed loop.
    TimeLoop(raw_, 2, raw);
    const double one = std::max(1e-6, TimeLoop(raw_, 1, raw));
    const int iters = static_cast<int>(std::clamp(o_.seconds / one, 1.0, 10000.0));
    std::vector<double> t_ours, t_raw;
    for (int r = 0; r < o_.rounds; ++r) {
      // Alternate which side goes first, so neither always runs on a warmer cache.
      if (r % 2 == 0) t_raw.push_back(TimeLoop(raw_, iters, raw) / iters);
      t_ours.push_back(TimeLoop(raw_, iters, ours) / iters);
      if (r % 2 == 1) t_raw.push_back(TimeLoop(raw_, iters, raw) / iters);
    }
    const double ours_s = Median(t_ours), raw_s = Median(t_raw);
    int ok = !o_.check || check();
    MPI_Allreduce(MPI_IN_PLACE, &ok, 1, MPI_INT, MPI_MIN, raw_);
    const double gbps = alg_bytes * bus_factor / ours_s / 1e9;
    const double raw_gbps = alg_bytes * bus_factor / raw_s / 1e9;
    min_ratio_ = std::min(min_ratio_, gbps / raw_gbps);
    if (!s_.is_root()) return;
    PrintJsonLine({{"bench", "comm"},
                   {"op", op},
                   {"ranks", p_},
                   {"bytes_per_peer", bytes_per_peer},
                   {"iters", iters},
                   {"rounds", o_.rounds},
                   {"time_us", ours_s * 1e6},
                   {"raw_time_us", raw_s * 1e6},
                   {"gbps", gbps},
                   {"raw_mpi_gbps", raw_gbps},
                   {"ratio", gbps / raw_gbps},
                   {"verified", o_.check ? (ok ? "ok" : "FAILED") : "skipped"}});
    CHECK(ok) << op << " returned wrong data at " << bytes_per_peer << " bytes per peer";
  }

  Session& s_;
  CommBenchOptions o_;
  int p_;
  MPI_Comm raw_;
  Tensor send_, recv_;
  double min_ratio_ = 1e9;
};

}  // namespace

int RunBenchComm(const std::vector<std::string>& args, ProgramArgs program) {
  GlobalOptions global;
  CommBenchOptions o;
  std::string min_bytes, max_bytes, ops;
  bool no_check = false;
  po::options_description desc("Options");
  desc.add_options()                                                                          //
      ("min-bytes", po::value(&min_bytes)->default_value("4K"), "smallest message per peer")  //
      ("max-bytes", po::value(&max_bytes)->default_value("64M"), "largest message per peer")  //
      ("factor", po::value(&o.factor)->default_value(4),
       "size step: each size is factor x the last")  //
      ("ops", po::value(&ops)->default_value("all_to_all_v,all_reduce"),
       "collectives to measure")                                                               //
      ("seconds", po::value(&o.seconds)->default_value(0.2), "target seconds per timed loop")  //
      ("rounds", po::value(&o.rounds)->default_value(7),
       "timed loops per side; the median is reported")  //
      ("no-check", po::bool_switch(&no_check), "skip verifying the received data");
  AddGlobalOptions(&desc, &global);
  po::variables_map vm;
  if (auto done = ParseArgs(
          "moerun bench comm", "mpirun -np N moerun bench comm [options]",
          "Measures the Communicator's all_to_all_v and all_reduce over the world, beside a raw\n"
          "MPI_Alltoallv / MPI_Allreduce loop on the same buffers in the same run. One JSON line\n"
          "per (op, size): gbps (ours) and raw_mpi_gbps are nccl-tests bus bandwidth in GB/s:\n"
          "all_to_all_v moves (P-1)/P x P x bytes_per_peer per rank, all_reduce 2(P-1)/P x bytes\n"
          "(for all_reduce bytes_per_peer is the buffer size). Target: ratio >= 0.95.",
          args, desc, nullptr, &vm))
    return *done;
  auto lo = ParseByteSize(min_bytes), hi = ParseByteSize(max_bytes);
  std::string problem;
  if (!lo.ok())
    problem = "--min-bytes: " + lo.status().message();
  else if (!hi.ok())
    problem = "--max-bytes: " + hi.status().message();
  else if (*lo > *hi)
    problem = "--min-bytes is larger than --max-bytes";
  else if (*lo % 4 != 0 || *hi % 4 != 0)
    problem = "sizes must be multiples of 4 bytes (fp32)";
  else if (o.factor < 2)
    problem = "--factor must be at least 2";
  else if (o.rounds < 1 || o.seconds <= 0)
    problem = "--rounds and --seconds must be positive";
  std::stringstream ss(ops);
  for (std::string op; std::getline(ss, op, ',');) {
    if (op != "all_to_all_v" && op != "all_reduce") {
      problem = "--ops: unknown collective '" + op + "' (use all_to_all_v, all_reduce)";
    }
    o.ops.push_back(op);
  }
  if (!problem.empty()) {
    PrintError("moerun bench comm", problem);
    return kExitUsage;
  }
  o.min_bytes = *lo;
  o.max_bytes = *hi;
  o.check = !no_check;
  Session session(program.argc, program.argv, global);
  // Send and receive buffers of max-bytes per peer, and as much again for the raw MPI
  // comparison and the check, on every rank of this host.
  const Status fits = RequireHostBytes(
      4.0 * o.max_bytes * session.size() * std::max(1, Process().local_size),
      "--max-bytes " + max_bytes + " per peer over " + std::to_string(session.size()) + " rank(s)",
      "use a smaller --max-bytes");
  if (!fits.ok()) {
    if (session.is_root()) PrintError("moerun bench comm", fits.message());
    return kExitUsage;
  }
  if (session.is_root()) {
    LOG(INFO) << "bench comm: " << session.size() << " ranks, " << o.min_bytes << " to "
              << o.max_bytes << " bytes per peer";
  }
  CommBench bench(session, o);
  for (const std::string& op : o.ops) {
    for (int64_t b = o.min_bytes; b <= o.max_bytes; b *= o.factor) {
      if (op == "all_to_all_v")
        bench.AllToAllV(b);
      else
        bench.AllReduce(b);
    }
  }
  if (session.is_root()) {
    PrintJsonLine({{"bench", "comm"},
                   {"summary", true},
                   {"ranks", session.size()},
                   {"min_ratio", bench.min_ratio()},
                   {"target_ratio", 0.95}});
  }
  return kExitOk;
}

}  // namespace moerun
