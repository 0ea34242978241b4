// Who this process is (rank, host, ...) and the process-wide set-up that depends on it:
// glog with the rank in every line, and fatal errors that end the whole job, not one rank.
#ifndef MOERUN_RUNTIME_PROCESS_H_
#define MOERUN_RUNTIME_PROCESS_H_

#include <string>

#include "runtime/status.h"

namespace moerun {

struct ProcessInfo {
  int rank = 0;        // rank in the world communicator
  int world_size = 1;  // ranks in the job
  int local_rank = 0;  // rank among the ranks on this host
  int local_size = 1;  // ranks on this host
  std::string host;
  std::string launcher;  // "mpirun", "slurm", "pmix" or "single"
};

// Reads rank / local rank / host from the launcher's environment (Open MPI, PMIx, Slurm),
// before or without MPI. Fields the environment does not give keep their single-process
// defaults.
ProcessInfo DiscoverProcessFromEnvironment();

// The process identity used by log prefixes and error messages. Set once at start-up,
// refined after MPI is up.
const ProcessInfo& Process();
// Compares MPI's local rank (`mpi`, from MPI_Comm_split_type) with the launcher's
// (`launcher`, from OMPI_COMM_WORLD_LOCAL_RANK / SLURM_LOCALID); OK when they agree or the
// launcher sets none, else an error naming both and the consequence (GPU sharing).
Status CheckLocalRank(const ProcessInfo& mpi, const ProcessInfo& launcher);
void SetProcess(const ProcessInfo& info);

// "rank 3 (host node7)": how every message names this process.
std::string RankTag();

// Called on a fatal error (glog FATAL, failed CHECK, MPI/CUDA error) after the message is
// written. The communication layer installs one that aborts every rank (MPI_Abort); the
// default aborts this process.
using FatalHandler = void (*)(int exit_code);
void SetFatalHandler(FatalHandler handler);
[[noreturn]] void AbortJob(int exit_code);

// A byte figure of /proc/self/status: "VmRSS" (resident now), "VmHWM" (peak resident);
// 0 when unknown.
double ProcessMemoryBytes(const std::string& field);

// "1.23 GiB": how messages and tables print a byte count.
std::string GiBString(double bytes);

// Bytes this host can still give (MemAvailable of /proc/meminfo), or -1 when unknown.
int64_t AvailableHostBytes();
// OK unless `bytes` is more than the host has available; the error names `what`, both
// sizes and `advice`.
Status RequireHostBytes(double bytes, const std::string& what, const std::string& advice);

// What this thread is allocating for, named in the out-of-memory message ("parameters of
// blocks.3.mlp", "AdamW moments"). Labels nest; the message names the innermost ones.
class AllocationLabel {
 public:
  explicit AllocationLabel(std::string what);
  ~AllocationLabel();
  AllocationLabel(const AllocationLabel&) = delete;
  AllocationLabel& operator=(const AllocationLabel&) = delete;
};
// The labels in force on this thread, outermost first, joined by " / "; "" when none.
std::string AllocationContext();
// The plan's memory figures for this job (set once the trainer has computed them); the
// out-of-memory message quotes them.
void SetMemoryPlan(const std::string& summary);
// Ends the job (exit 1) after a message naming `bytes` (0: unknown), `detail` (the tensor's
// shape and type, or ""), the allocation context, what the host has and the plan.
[[noreturn]] void OutOfHostMemory(size_t bytes, const std::string& detail);
// Makes a failed operator new (std::vector, std::string, ...) end the job through
// OutOfHostMemory instead of an uncaught std::bad_alloc.
void InstallOutOfMemoryHandler();
// Makes an uncaught exception (a Thrust or CUDA library error, a JSON or filesystem error
// nothing handled) end the job through AbortJob (every rank, under MPI) after a message
// naming this rank and the exception, instead of std::terminate's bare abort.
void InstallUncaughtExceptionHandler();

struct LoggingOptions {
  bool all_ranks = false;  // INFO from every rank, not only rank 0
  int verbosity = 0;       // glog VLOG level
};
// glog to stderr, each line prefixed "[r<rank> <host>] I1122 23:40:01.123 file:line]".
// Ranks other than 0 write warnings and errors only unless options.all_ranks.
void InitLogging(const char* argv0, const LoggingOptions& options);

}  // namespace moerun

#endif  // MOERUN_RUNTIME_PROCESS_H_
