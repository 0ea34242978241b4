// Shared command-line plumbing.
#include "launch/cli.h"

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <sstream>

#include "comm/mpi_communicator.h"
#include "comm/nccl_communicator.h"
#include "runtime/backend.h"
#ifdef MOERUN_WITH_CUDA_KERNELS
#include "model/ops_cuda.h"
#endif
#include "runtime/kernels.h"
#include "runtime/process.h"

namespace moerun {

void AddGlobalOptions(po::options_description* desc, GlobalOptions* o) {
  desc->add_options()  //
      ("threads", po::value<int>(&o->threads)->default_value(0)->notifier([](int v) {
        if (v < 0 || v > 1024) {
          throw po::error("--threads " + std::to_string(v) +
                          ": must be between 0 (this host's cores / its ranks) and 1024");
        }
      }),                                                                           //
       "threads per rank for BLAS and kernels (0: this host's cores / its ranks)")  //
      ("log-all-ranks", po::bool_switch(&o->log_all_ranks),                         //
       "print progress from every rank, not only rank 0")                           //
      ("watchdog-timeout", po::value<double>(&o->watchdog_timeout_s)->notifier([](double v) {
        if (!std::isfinite(v) || v < 0 || v > 1e6) {
          throw po::error(
              "--watchdog-timeout must be a number of seconds from 0 (off) to "
              "1e6");
        }
      }),  //
       "seconds a collective may make no progress before the job is aborted "
       "(default: the config's comm.watchdog_timeout_s, 300; 0 disables)")  //
      ("verbose,v", po::value<int>(&o->verbosity)->default_value(0),
       "glog verbosity (VLOG level)")  //
      ("device",
       po::value<std::string>(&o->device)->default_value("cpu")->notifier([](const std::string& v) {
         if (v != "cpu" && v != "cuda") throw po::error("--device " + v + ": use cpu or cuda");
       }),
       "where tensors and kernels live: cpu, or cuda (a GPU per local rank; needs the CUDA "
       "backend built and a visible GPU; `train` and `eval` (V-MoE and Mod-Squad), `dry-run`, "
       "`sweep`, `replay-moe`, `replay-modsquad`, `bench moe-layer`, `bench train`, `bench gemm`, "
       "`bench comm`, "
       "`bench checkpoint` and `bench soak` so far)")  //
      ("help,h", "show this help");
}

bool IsRankZeroFromEnvironment() { return DiscoverProcessFromEnvironment().rank == 0; }

void PrintError(const std::string& command_path, const std::string& message, bool all_ranks_same) {
  const ProcessInfo& p = Process();
  if (all_ranks_same && p.rank != 0) return;
  std::ostringstream s;
  s << command_path << ": ";
  if (!all_ranks_same && p.world_size > 1) s << "rank " << p.rank << " (host " << p.host << "): ";
  s << message << "\n";
  std::cerr << s.str() << std::flush;
}

std::optional<int> ParseArgs(const std::string& command_path, const std::string& synopsis,
                             const std::string& description, const std::vector<std::string>& args,
                             const po::options_description& desc,
                             const po::positional_options_description* positional,
                             po::variables_map* vm) {
  const bool root = IsRankZeroFromEnvironment();
  try {
    po::command_line_parser parser(args);
    parser.options(desc);
    if (positional != nullptr) parser.positional(*positional);
    po::store(parser.run(), *vm);
    if (vm->count("help")) {
      if (root) {
        std::cout << "Usage: " << synopsis << "\n\n" << description << "\n\n" << desc << std::flush;
      }
      return kExitOk;
    }
    po::notify(*vm);
  } catch (const po::error& e) {
    if (root) {
      std::cerr << command_path << ": " << e.what() << "\nUsage: " << synopsis << "\nSee '"
                << command_path << " --help'.\n"
                << std::flush;
    }
    return kExitUsage;
  }
  return std::nullopt;
}

Session::Session(int* argc, char*** argv, const GlobalOptions& options) : options_(options) {
  // The device first: a job that cannot run where it was asked to stops before MPI is up,
  // on every rank, with exit 3. A command without a CUDA path says so on any host (a GPU
  // would not help it).
  const bool unsupported = options.device == "cuda" && !options.cuda_supported;
  auto device =
      unsupported ? StatusOr<Device>(Status::Error(
                        "--device cuda: this command runs on the CPU backend only in this "
                        "version (on a GPU: `moerun train` / `eval` / `dry-run` / `sweep`, `moerun "
                        "replay-moe` / `replay-modsquad`, `moerun bench moe-layer`, `bench train`, "
                        "`bench gemm`, `bench "
                        "comm`, `bench checkpoint` and `bench soak`); use --device cpu"))
                  : ParseDevice(options.device);
  if (!device.ok()) {
    PrintError("moerun", device.status().message());
    std::exit(kExitUnavailable);
  }
  device_ = *device;
  // On a GPU job started by mpirun or Slurm, bind this rank's GPU from the launcher's local
  // rank before MPI_Init: a CUDA-aware MPI (UCX, ...) makes its CUDA context on the current
  // device during MPI_Init, which would otherwise be device 0 for every rank of the node.
  // MPI's own local rank is checked against it below.
  const ProcessInfo launcher = DiscoverProcessFromEnvironment();
  bool bound_early = false;
  if (device_ == Device::kCUDA && (launcher.launcher == "mpirun" || launcher.launcher == "slurm")) {
    bound_early = BindCudaDevice(launcher.local_rank).ok();
  }
  MpiOptions mpi_options;
  mpi_options.watchdog_timeout_s =
      options.watchdog_timeout_s >= 0 ? options.watchdog_timeout_s : 300.0;
  mpi_ = std::make_unique<MpiRuntime>(argc, argv, mpi_options);
  world_ = mpi_->World();
  LoggingOptions log;
  log.all_ranks = options.log_all_ranks;
  log.verbosity = options.verbosity;
  InitLogging((*argv)[0], log);  // again: the rank from MPI decides who prints
  const int threads =
      options.threads > 0 ? options.threads : DefaultThreadsPerRank(Process().local_size);
  SetNumThreads(threads);
  if (device_ == Device::kCUDA) {
    // One GPU per local rank: the launcher's (OMPI_COMM_WORLD_LOCAL_RANK / SLURM_LOCALID),
    // bound above before MPI_Init, else MPI's (MPI_Comm_split_type). Where the two disagree
    // MPI's wins (a launcher's variables can be a proxy's: a hydra-style launcher under
    // sbatch gives every rank of a node SLURM_LOCALID 0), so no two ranks share a GPU: the
    // rank binds again before the backend allocates anything. The early bind's context
    // stays on the launcher's device (a few hundred MB there; where GPUs are in
    // exclusive-process mode the rebind fails instead, with its message).
    const Status agree = CheckLocalRank(Process(), launcher);
    if (!agree.ok()) {
      LOG(WARNING) << agree.message() << "; this rank takes MPI's local rank "
                   << Process().local_rank << " for its GPU";
      bound_early = false;
    }
    if (!bound_early) {
      const Status bound = BindCudaDevice(Process().local_rank);
      CHECK(bound.ok()) << "--device cuda: " << bound.message();
    }
#ifdef MOERUN_WITH_CUDA_KERNELS
    RegisterCudaOps();
#endif
    LOG(INFO) << "local rank " << Process().local_rank << " of " << Process().local_size << " on "
              << RequireBackend(Device::kCUDA).Describe();
    if (world_->size() > 1) {
      // The device memory's collectives (dense gradients, expert rows): NCCL over the same
      // ranks, bootstrapped over MPI (collective: every rank gets here).
      const auto* mpi = dynamic_cast<const MpiCommunicator*>(world_.get());
      // Its watchdog follows the MPI one's, which the config may change later.
      auto nccl = mpi != nullptr ? CreateNcclCommunicator(*mpi, "world_nccl")
                                 : StatusOr<std::unique_ptr<Communicator>>(
                                       Status::Error("the world is not an MPI communicator"));
      if (nccl.ok()) {
        device_world_ = std::move(*nccl);
      } else {
        LOG(WARNING) << "no NCCL world: " << nccl.status().message();
      }
    }
  }
}

Session::~Session() {
  device_world_.reset();
  world_.reset();
  mpi_.reset();
}

Status Session::RequireDeviceWorld() {
  if (device_ == Device::kCPU || world_->size() == 1) return Status::Ok();
  const Status local =
      device_world_ != nullptr
          ? Status::Ok()
          : Status::Error("--device cuda over " + std::to_string(world_->size()) +
                          " ranks needs the NCCL communicator, which could not be created (see "
                          "the warning above); check NCCL and one GPU per rank");
  return AgreeOnStatus(*world_, local);
}

void Session::ApplyConfigWatchdog(double config_timeout_s) {
  if (options_.watchdog_timeout_s < 0) mpi_->SetWatchdogTimeout(config_timeout_s);
}

void PrintJsonLine(const nlohmann::json& j) { std::cout << j.dump() << "\n" << std::flush; }

StatusOr<int64_t> ParseByteSize(const std::string& text) {
  if (text.empty()) return Status::Error("empty size");
  size_t pos = 0;
  long long v = 0;
  try {
    v = std::stoll(text, &pos);
  } catch (...) {
    return Status::Error("'" + text + "' is not a size (examples: 4096, 4K, 64M)");
  }
  std::string unit = text.substr(pos);
  int64_t mult = 1;
  if (unit == "K" || unit == "KiB" || unit == "k") {
    mult = 1 << 10;
  } else if (unit == "M" || unit == "MiB") {
    mult = 1 << 20;
  } else if (unit == "G" || unit == "GiB") {
    mult = 1 << 30;
  } else if (!unit.empty() && unit != "B") {
    return Status::Error("'" + text + "' has an unknown unit (use K, M or G)");
  }
  if (v <= 0) return Status::Error("'" + text + "' must be positive");
  return static_cast<int64_t>(v) * mult;
}

StatusOr<std::vector<int64_t>> ParseIntList(const std::string& text) {
  std::vector<int64_t> out;
  std::stringstream ss(text);
  for (std::string item; std::getline(ss, item, ',');) {
    size_t pos = 0;
    long long v = 0;
    try {
      v = std::stoll(item, &pos);
    } catch (...) {
      pos = 0;
    }
    if (pos == 0 || pos != item.size() || v <= 0) {
      return Status::Error("'" + item + "' in '" + text + "' is not a positive integer");
    }
    out.push_back(v);
  }
  if (out.empty()) return Status::Error("empty list");
  return out;
}

StatusOr<std::vector<std::pair<int64_t, int64_t>>> ParseShapeList(const std::string& text) {
  std::vector<std::pair<int64_t, int64_t>> shapes;
  std::stringstream ss(text);
  for (std::string item; std::getline(ss, item, ',');) {
    const size_t x = item.find('x');
    auto dm = ParseIntList(x == std::string::npos ? std::string("bad")
                                                  : item.substr(0, x) + "," + item.substr(x + 1));
    if (!dm.ok() || dm->size() != 2) {
      return Status::Error("'" + item + "' is not DxM (e.g. 512x2048)");
    }
    shapes.emplace_back((*dm)[0], (*dm)[1]);
  }
  if (shapes.empty()) return Status::Error("empty list");
  return shapes;
}

}  // namespace moerun
