// moerun bench comm: Communicator bandwidth beside a raw loop of the same transport on the
// same buffers (launch/bench_comm.h), in the same run, rounds alternating between the two
// so drift hits both alike. Each result is verified after timing (nccl-tests style).
#include <mpi.h>

#include <algorithm>
#include <cmath>
#include <sstream>

#include "comm/mpi_communicator.h"
#include "comm/nccl_communicator.h"
#include "launch/bench_comm.h"
#include "launch/commands.h"
#include "runtime/backend.h"
#include "runtime/device_wait.h"
#include "runtime/process.h"
#include "runtime/tensor.h"

namespace moerun {
namespace {

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// Runs `body` `iters` times between barriers, then `finish` (the wait for what the calls
// queued on a device); returns the slowest rank's seconds.
template <typename Body, typename Finish>
double TimeLoop(MPI_Comm comm, int iters, Body body, Finish finish) {
  MPI_Barrier(comm);
  const double t0 = MPI_Wtime();
  for (int i = 0; i < iters; ++i) body();
  finish();
  double dt = MPI_Wtime() - t0;
  MPI_Allreduce(MPI_IN_PLACE, &dt, 1, MPI_DOUBLE, MPI_MAX, comm);
  return dt;
}

class RawMpi final : public RawCollectives {
 public:
  explicit RawMpi(MPI_Comm comm) {
    MOERUN_MPI_CHECK(MPI_Comm_dup(comm, &comm_));
    MPI_Comm_size(comm_, &p_);
  }
  ~RawMpi() override { MPI_Comm_free(&comm_); }
  const char* kind() const override { return "mpi"; }
  void AllToAll(const float* send, float* recv, int64_t count) override {
    std::vector<int> counts(p_, static_cast<int>(count)), displs(p_);
    for (int q = 0; q < p_; ++q) displs[q] = static_cast<int>(q * count);
    MPI_Alltoallv(send, counts.data(), displs.data(), MPI_FLOAT, recv, counts.data(), displs.data(),
                  MPI_FLOAT, comm_);
  }
  void AllReduce(float* buffer, int64_t count) override {
    MPI_Allreduce(MPI_IN_PLACE, buffer, static_cast<int>(count), MPI_FLOAT, MPI_SUM, comm_);
  }
  void Finish() override {}

 private:
  MPI_Comm comm_;
  int p_ = 1;
};

#ifdef MOERUN_WITH_NCCL
class RawNccl final : public RawCollectives {
 public:
  // Collective over `bootstrap`; an error when the NCCL communicator could not be made here.
  static StatusOr<std::unique_ptr<RawCollectives>> Create(Communicator& bootstrap) {
    StatusOr<ncclComm_t> nccl = InitNcclComm(bootstrap, kName);
    if (!nccl.ok()) return nccl.status();
    return std::unique_ptr<RawCollectives>(new RawNccl(*nccl, bootstrap.size()));
  }
  ~RawNccl() override {
    Finish();
    RemoveDeviceWaitCheck(wait_check_);
    if (comm_ != nullptr) ncclCommDestroy(comm_);
  }
  const char* kind() const override { return "nccl"; }
  void AllToAll(const float* send, float* recv, int64_t count) override {
    Check(ncclGroupStart(), "ncclGroupStart");
    for (int q = 0; q < p_; ++q) {
      Check(ncclSend(send + q * count, static_cast<size_t>(count), ncclFloat32, q, comm_, stream_),
            "ncclSend");
      Check(ncclRecv(recv + q * count, static_cast<size_t>(count), ncclFloat32, q, comm_, stream_),
            "ncclRecv");
    }
    Check(ncclGroupEnd(), "ncclGroupEnd");
  }
  void AllReduce(float* buffer, int64_t count) override {
    Check(ncclAllReduce(buffer, buffer, static_cast<size_t>(count), ncclFloat32, ncclSum, comm_,
                        stream_),
          "ncclAllReduce");
  }
  // The backend's polling wait: the registered checks (this communicator's asynchronous
  // error, the measured one's and its watchdog) run between its polls, so a dead peer ends
  // the job here too.
  void Finish() override { RequireBackend(Device::kCUDA).Synchronize(); }

 private:
  RawNccl(ncclComm_t comm, int size)
      : comm_(comm),
        stream_(static_cast<cudaStream_t>(RequireBackend(Device::kCUDA).stream())),
        p_(size) {
    wait_check_ = AddDeviceWaitCheck(
        [this](double, const std::string&) { CheckNcclAsyncError(&comm_, kName); });
  }
  static constexpr const char* kName = "bench_comm_raw";
  static void Check(ncclResult_t r, const char* call) {
    CHECK(r == ncclSuccess) << RankTag() << ": bench comm's raw NCCL loop: " << call
                            << " failed: " << ncclGetErrorString(r);
  }
  ncclComm_t comm_ = nullptr;
  cudaStream_t stream_ = nullptr;
  int p_ = 1;
  int wait_check_ = 0;
};
#endif

class CommBench {
 public:
  CommBench(Communicator& comm, RawCollectives& raw, MPI_Comm timing, Device device,
            const CommBenchOptions& o)
      : comm_(comm), raw_(raw), timing_(timing), dev_(device), o_(o), p_(comm.size()) {
    CHECK(comm.device() == device)
        << "bench comm: communicator '" << comm.name() << "' moves " << DeviceName(comm.device())
        << " memory, the buffers are on " << DeviceName(device);
    MPI_Comm_rank(timing, &rank_);
    const int64_t max_elems = o.max_bytes / 4 * p_;
    send_ = Tensor::Zeros({max_elems}, DType::kF32, device);
    recv_ = Tensor::Zeros({max_elems}, DType::kF32, device);
  }

  double min_ratio() const { return min_ratio_; }
  // Empty, or which op and size returned wrong data (the same on every rank).
  const std::string& failure() const { return failure_; }

  void AllToAllV(int64_t bytes_per_peer) {
    const int64_t count = bytes_per_peer / 4;
    std::vector<int64_t> counts(p_, count), displs = PrefixDisplacements(counts);
    float* send = static_cast<float*>(send_.raw_data());
    float* recv = static_cast<float*>(recv_.raw_data());
    auto ours = [&] { comm_.AllToAllV(send, counts, displs, recv, counts, displs, DType::kF32); };
    auto raw = [&] { raw_.AllToAll(send, recv, count); };
    Measure("all_to_all_v", bytes_per_peer, static_cast<double>(bytes_per_peer) * p_,
            p_ > 1 ? (p_ - 1.0) / p_ : 1.0, ours, raw, [&] {
              // Through host tensors: CopyFrom is the backend's copy on a device.
              Tensor host = Tensor::Empty({count * p_});
              float* h = host.data<float>();
              for (int q = 0; q < p_; ++q) {
                for (int64_t i = 0; i < count; ++i) h[q * count + i] = PatternValue(rank_, q, i);
              }
              send_.Slice(0, 0, count * p_).CopyFrom(host);
              host.Fill(-1.0f);
              recv_.Slice(0, 0, count * p_).CopyFrom(host);
              ours();
              comm_.Synchronize();
              host.CopyFrom(recv_.Slice(0, 0, count * p_));
              for (int q = 0; q < p_; ++q) {
                for (int64_t i = 0; i < count; ++i) {
                  if (h[q * count + i] != PatternValue(q, rank_, i)) return false;
                }
              }
              return true;
            });
  }

  void AllReduce(int64_t bytes) {
    const int64_t count = bytes / 4;
    float* buf = static_cast<float*>(send_.raw_data());
    send_.Slice(0, 0, count).SetZero();  // sums of zeros stay finite however often repeated
    auto ours = [&] { comm_.AllReduce(buf, count, DType::kF32, ReduceOp::kSum); };
    auto raw = [&] { raw_.AllReduce(buf, count); };
    Measure("all_reduce", bytes, static_cast<double>(bytes), p_ > 1 ? 2.0 * (p_ - 1) / p_ : 1.0,
            ours, raw, [&] {
              Tensor host = Tensor::Empty({count});
              float* h = host.data<float>();
              for (int64_t i = 0; i < count; ++i) h[i] = static_cast<float>(rank_ + i % 5);
              send_.Slice(0, 0, count).CopyFrom(host);
              ours();
              comm_.Synchronize();
              host.CopyFrom(send_.Slice(0, 0, count));
              const float base = p_ * (p_ - 1) / 2.0f;
              for (int64_t i = 0; i < count; ++i) {
                if (h[i] != base + p_ * static_cast<float>(i % 5)) return false;
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
    auto ours_done = [&] { comm_.Synchronize(); };
    auto raw_done = [&] { raw_.Finish(); };
    // Calibrate: enough iterations for ~o_.seconds per timed loop.
    TimeLoop(timing_, 2, raw, raw_done);
    const double one = std::max(1e-6, TimeLoop(timing_, 1, raw, raw_done));
    const int iters = static_cast<int>(std::clamp(o_.seconds / one, 1.0, 10000.0));
    std::vector<double> t_ours, t_raw;
    for (int r = 0; r < o_.rounds; ++r) {
      // Alternate which side goes first, so neither always runs on a warmer cache.
      if (r % 2 == 0) t_raw.push_back(TimeLoop(timing_, iters, raw, raw_done) / iters);
      t_ours.push_back(TimeLoop(timing_, iters, ours, ours_done) / iters);
      if (r % 2 == 1) t_raw.push_back(TimeLoop(timing_, iters, raw, raw_done) / iters);
    }
    const double ours_s = Median(t_ours), raw_s = Median(t_raw);
    int ok = !o_.check || check();
    MPI_Allreduce(MPI_IN_PLACE, &ok, 1, MPI_INT, MPI_MIN, timing_);
    const double gbps = alg_bytes * bus_factor / ours_s / 1e9;
    const double raw_gbps = alg_bytes * bus_factor / raw_s / 1e9;
    min_ratio_ = std::min(min_ratio_, gbps / raw_gbps);
    if (rank_ == 0) {
      nlohmann::json line{{"bench", "comm"},
                          {"op", op},
                          {"ranks", p_},
                          {"device", DeviceName(dev_)},
                          {"bytes_per_peer", bytes_per_peer},
                          {"iters", iters},
                          {"rounds", o_.rounds},
                          {"time_us", ours_s * 1e6},
                          {"raw_time_us", raw_s * 1e6},
                          {"gbps", gbps},
                          {std::string("raw_") + raw_.kind() + "_gbps", raw_gbps},
                          {"ratio", gbps / raw_gbps},
                          {"verified", o_.check ? (ok ? "ok" : "FAILED") : "skipped"}};
      PrintJsonLine(line);
    }
    if (!ok) {
      failure_ = std::string(op) + " returned wrong data at " + std::to_string(bytes_per_peer) +
                 " bytes per peer";
    }
  }

  Communicator& comm_;
  RawCollectives& raw_;
  MPI_Comm timing_;
  Device dev_;
  CommBenchOptions o_;
  int p_;
  int rank_ = 0;
  Tensor send_, recv_;
  double min_ratio_ = 1e9;
  std::string failure_;
};

}  // namespace

std::unique_ptr<RawCollectives> MakeRawMpiCollectives(MPI_Comm comm) {
  return std::make_unique<RawMpi>(comm);
}

StatusOr<std::unique_ptr<RawCollectives>> MakeRawNcclCollectives(Communicator& bootstrap) {
#ifdef MOERUN_WITH_NCCL
  return RawNccl::Create(bootstrap);
#else
  (void)bootstrap;
  return Status::Error("this moerun was built without NCCL");
#endif
}

double RawAllToAllGbps(RawCollectives& raw, MPI_Comm timing, Device device, int64_t floats_per_peer,
                       int p, int iters) {
  const Tensor send = Tensor::Zeros({floats_per_peer * p}, DType::kF32, device);
  Tensor recv = Tensor::Empty({floats_per_peer * p}, DType::kF32, device);
  const auto* from = static_cast<const float*>(send.raw_data());
  auto* to = static_cast<float*>(recv.raw_data());
  auto call = [&] { raw.AllToAll(from, to, floats_per_peer); };
  auto done = [&] { raw.Finish(); };
  TimeLoop(timing, 1, call, done);
  const double s = TimeLoop(timing, iters, call, done) / iters;
  return 4.0 * floats_per_peer * (p - 1) / s / 1e9;
}

CommBenchResult RunCommBench(Communicator& comm, RawCollectives& raw, MPI_Comm timing,
                             Device device, const CommBenchOptions& options) {
  CommBench bench(comm, raw, timing, device, options);
  for (const std::string& op : options.ops) {
    for (int64_t b = options.min_bytes; b <= options.max_bytes && bench.failure().empty();
         b *= options.factor) {
      if (op == "all_to_all_v") {
        bench.AllToAllV(b);
      } else {
        bench.AllReduce(b);
      }
    }
  }
  return {bench.min_ratio(), bench.failure()};
}

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
  global.cuda_supported = true;  // the NCCL communicator beside raw NCCL calls
  po::variables_map vm;
  if (auto done = ParseArgs(
          "moerun bench comm", "mpirun -np N moerun bench comm [options]",
          "Measures the Communicator's all_to_all_v and all_reduce over the world, beside a raw\n"
          "MPI_Alltoallv / MPI_Allreduce loop on the same buffers in the same run. One JSON line\n"
          "per (op, size): gbps (ours) and raw_mpi_gbps are nccl-tests bus bandwidth in GB/s:\n"
          "all_to_all_v moves (P-1)/P x P x bytes_per_peer per rank, all_reduce 2(P-1)/P x bytes\n"
          "(for all_reduce bytes_per_peer is the buffer size). Target: ratio >= 0.95.\n"
          "--device cuda: a GPU per rank; ours is the NCCL communicator (with one rank, one made\n"
          "for the bench), the raw side NCCL's own calls on a second NCCL communicator\n"
          "(grouped ncclSend / ncclRecv, ncclAllReduce, as nccl-tests), on device buffers:\n"
          "raw_nccl_gbps.",
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
  o.ops.clear();
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
  const Device dev = session.device();
  const double buffers = 2.0 * o.max_bytes * session.size();  // send + receive, per rank
  const std::string what =
      "--max-bytes " + max_bytes + " per peer over " + std::to_string(session.size()) + " rank(s)";
  // On the CPU the buffers, and as much again for the raw MPI comparison and the check, on
  // every rank of this host; on a GPU the buffers there and the check's copies here.
  Status fits = RequireHostBytes(
      (dev == Device::kCPU ? 2.0 : 1.0) * buffers * std::max(1, Process().local_size), what,
      "use a smaller --max-bytes");
  if (fits.ok() && dev != Device::kCPU) {
    const DeviceMemory mem = RequireBackend(dev).Memory();
    if (mem.free_bytes >= 0 && buffers > static_cast<double>(mem.free_bytes)) {
      fits = Status::Error(what + " needs " + GiBString(buffers) + " on " +
                           RequireBackend(dev).Describe() + ", which has " +
                           GiBString(static_cast<double>(mem.free_bytes)) +
                           " free; use a smaller --max-bytes");
    }
  }
  fits = AgreeOnStatus(session.world(), fits);
  if (!fits.ok()) {
    if (session.is_root()) PrintError("moerun bench comm", fits.message());
    return kExitUsage;
  }
  Communicator* comm = &session.world();
  std::unique_ptr<Communicator> own;  // one rank on a GPU: the bench's NCCL communicator
  std::unique_ptr<RawCollectives> raw;
  if (dev == Device::kCPU) {
    raw = MakeRawMpiCollectives(MPI_COMM_WORLD);
  } else {
    comm = session.device_world();
    Status made;
    if (comm == nullptr && session.size() == 1) {
      // A one-rank world has no NCCL communicator (nothing to exchange); make one, so that
      // the same calls run on one GPU too.
      auto* mpi = dynamic_cast<MpiCommunicator*>(&session.world());
      auto nccl = mpi != nullptr ? CreateNcclCommunicator(*mpi, "bench_comm_nccl")
                                 : StatusOr<std::unique_ptr<Communicator>>(
                                       Status::Error("the world is not an MPI communicator"));
      if (nccl.ok()) {
        own = std::move(*nccl);
        comm = own.get();
      } else {
        made = Status::Error("--device cuda: " + nccl.status().message());
      }
    } else {
      made = session.RequireDeviceWorld();  // collective: every rank stops or none does
    }
    made = AgreeOnStatus(session.world(), made);
    if (made.ok()) {  // every rank makes the raw communicator, or none
      auto made_raw = MakeRawNcclCollectives(session.world());
      if (made_raw.ok()) {
        raw = std::move(*made_raw);
      } else {
        made = Status::Error("--device cuda: " + made_raw.status().message());
      }
      made = AgreeOnStatus(session.world(), made);
    }
    if (!made.ok()) {
      if (session.is_root()) {
        PrintError("moerun bench comm", made.message());
      }
      return kExitUnavailable;
    }
  }
  if (session.is_root()) {
    LOG(INFO) << "bench comm: " << session.size() << " ranks on " << DeviceName(dev) << ", "
              << o.min_bytes << " to " << o.max_bytes << " bytes per peer, beside raw "
              << raw->kind();
  }
  const CommBenchResult result = RunCommBench(*comm, *raw, MPI_COMM_WORLD, dev, o);
  raw.reset();
  if (!result.failure.empty()) {
    if (session.is_root()) {
      PrintError("moerun bench comm", result.failure + " (on " + DeviceName(dev) + " over " +
                                          std::to_string(session.size()) +
                                          " ranks): the transport is broken");
    }
    return kExitFailure;
  }
  if (session.is_root()) {
    PrintJsonLine({{"bench", "comm"},
                   {"summary", true},
                   {"ranks", session.size()},
                   {"device", DeviceName(dev)},
                   {"min_ratio", result.min_ratio},
                   {"target_ratio", 0.95}});
  }
  return kExitOk;
}

}  // namespace moerun
