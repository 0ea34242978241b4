// Command-line plumbing shared by moerun's subcommands: global options, parsing with
// errors that say what to do, the per-process session (MPI, logging, threads) and JSON
// output. Only rank 0 prints usage and results; every rank parses the same arguments.
#ifndef MOERUN_LAUNCH_CLI_H_
#define MOERUN_LAUNCH_CLI_H_

#include <boost/program_options.hpp>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "comm/mpi_communicator.h"
#include "runtime/status.h"

namespace moerun {

namespace po = boost::program_options;

// Exit codes of moerun.
constexpr int kExitOk = 0;
constexpr int kExitFailure = 1;      // the work failed (I/O, data, a check)
constexpr int kExitUsage = 2;        // bad command line or config
constexpr int kExitUnavailable = 3;  // the feature is not in this build yet

struct GlobalOptions {
  int threads = 0;  // 0: this host's cores / ranks on this host
  bool log_all_ranks = false;
  double watchdog_timeout_s = -1;  // < 0: the config's (or the default 300 s)
  int verbosity = 0;
  std::string device = "cpu";  // --device: cpu or cuda
  // Set by commands that have a CUDA path; the others refuse --device cuda (exit 3).
  bool cuda_supported = false;
};

// Options every subcommand accepts.
void AddGlobalOptions(po::options_description* desc, GlobalOptions* options);

// Parses `args` (the words after the command path) against `desc`. Prints help for
// --help; on a bad command line prints "moerun <command>: <problem>" and a pointer to
// --help. Prints only on rank 0 (from the environment; MPI is not up yet). Returns the exit
// code when the command should stop here (kExitOk after help, kExitUsage on an error),
// nothing when it should run:  if (auto done = ParseArgs(...)) return *done;
std::optional<int> ParseArgs(const std::string& command_path, const std::string& synopsis,
                             const std::string& description, const std::vector<std::string>& args,
                             const po::options_description& desc,
                             const po::positional_options_description* positional,
                             po::variables_map* vm);

bool IsRankZeroFromEnvironment();
// Writes a user-facing error (rank 0 only when `all_ranks_same`, else every rank with its
// rank named), e.g. "moerun train: invalid config: ...".
void PrintError(const std::string& command_path, const std::string& message,
                bool all_ranks_same = true);

// What a running subcommand has: MPI, the world communicator, logging and threads set up.
class Session {
 public:
  Session(int* argc, char*** argv, const GlobalOptions& options);
  ~Session();
  Communicator& world() { return *world_; }
  MpiRuntime& mpi() { return *mpi_; }
  int rank() const { return world_->rank(); }
  int size() const { return world_->size(); }
  bool is_root() const { return world_->rank() == 0; }
  // Applies a config's watchdog timeout unless --watchdog-timeout was given.
  void ApplyConfigWatchdog(double config_timeout_s);
  // --device, checked: kCUDA only when the command supports it and a GPU is visible (else
  // the constructor ended the job with exit 3). On kCUDA this rank's GPU is bound.
  Device device() const { return device_; }
  // On kCUDA with several ranks: the world's ranks over NCCL (the device memory's
  // collectives), or null when NCCL was not built or its setup failed (logged).
  Communicator* device_world() { return device_world_.get(); }
  // Ok, or, on kCUDA over several ranks where any rank has no device_world(), the error
  // that says so (the commands print it and exit 3). Collective over the world on kCUDA
  // with several ranks, so that every rank stops or none does.
  Status RequireDeviceWorld();

 private:
  GlobalOptions options_;
  Device device_ = Device::kCPU;
  std::unique_ptr<MpiRuntime> mpi_;
  std::unique_ptr<Communicator> world_;
  std::unique_ptr<Communicator> device_world_;
};

// Prints one JSON object as one line on stdout and flushes (rank 0's results).
void PrintJsonLine(const nlohmann::json& j);

// Parses sizes such as "4096", "4K", "64M", "1G" (powers of 1024).
StatusOr<int64_t> ParseByteSize(const std::string& text);
// Parses a comma-separated list of integers ("1024,4096").
StatusOr<std::vector<int64_t>> ParseIntList(const std::string& text);
// Parses a comma-separated list of DxM shapes ("512x2048,768x3072").
StatusOr<std::vector<std::pair<int64_t, int64_t>>> ParseShapeList(const std::string& text);

// Process-wide argc/argv, for subcommands that start the session.
struct ProgramArgs {
  int* argc;
  char*** argv;
};

}  // namespace moerun

#endif  // MOERUN_LAUNCH_CLI_H_
