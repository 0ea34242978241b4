// Process identity, rank-tagged logging and job-wide fatal handling.
#include "runtime/process.h"

#include <glog/logging.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <exception>
#include <fstream>
#include <iomanip>
#include <mutex>
#include <new>
#include <string>
#include <vector>

namespace moerun {
namespace {

ProcessInfo g_process;
FatalHandler g_fatal_handler = nullptr;

int EnvInt(const char* name, int fallback) {
  const char* v = std::getenv(name);
  if (v == nullptr || *v == '\0') return fallback;
  char* end = nullptr;
  long x = std::strtol(v, &end, 10);
  return (end != nullptr && *end == '\0') ? static_cast<int>(x) : fallback;
}

void RankPrefix(std::ostream& s, const google::LogMessageInfo& l, void*) {
  s << "[r" << g_process.rank << ' ' << g_process.host << "] " << l.severity[0] << std::setw(2)
    << std::setfill('0') << 1 + l.time.month() << std::setw(2) << l.time.day() << ' '
    << std::setw(2) << l.time.hour() << ':' << std::setw(2) << l.time.min() << ':' << std::setw(2)
    << l.time.sec() << ' ' << l.filename << ':' << l.line_number << ']';
}

void GlogFailure() {
  std::fflush(stderr);
  AbortJob(134);
}

}  // namespace

ProcessInfo DiscoverProcessFromEnvironment() {
  ProcessInfo info;
  char host[256] = {0};
  if (gethostname(host, sizeof(host) - 1) == 0) info.host = host;
  if (std::getenv("OMPI_COMM_WORLD_RANK") != nullptr) {
    info.launcher = "mpirun";
    info.rank = EnvInt("OMPI_COMM_WORLD_RANK", 0);
    info.world_size = EnvInt("OMPI_COMM_WORLD_SIZE", 1);
    info.local_rank = EnvInt("OMPI_COMM_WORLD_LOCAL_RANK", 0);
    info.local_size = EnvInt("OMPI_COMM_WORLD_LOCAL_SIZE", 1);
  } else if (std::getenv("SLURM_PROCID") != nullptr) {
    info.launcher = "slurm";
    info.rank = EnvInt("SLURM_PROCID", 0);
    info.world_size = EnvInt("SLURM_NTASKS", 1);
    info.local_rank = EnvInt("SLURM_LOCALID", 0);
    info.local_size = EnvInt("SLURM_NTASKS_PER_NODE", EnvInt("SLURM_TASKS_PER_NODE", 1));
  } else if (std::getenv("PMIX_RANK") != nullptr) {
    info.launcher = "pmix";
    info.rank = EnvInt("PMIX_RANK", 0);
  } else {
    info.launcher = "single";
  }
  return info;
}

const ProcessInfo& Process() { return g_process; }

Status CheckLocalRank(const ProcessInfo& mpi, const ProcessInfo& launcher) {
  if (launcher.launcher != "mpirun" && launcher.launcher != "slurm") return Status::Ok();
  // Only the rank: launchers report the ranks per node in forms MPI does not (Slurm's
  // "2(x3)"), and the rank is what picks the GPU.
  if (mpi.local_rank == launcher.local_rank) return Status::Ok();
  return Status::Error(
      "rank " + std::to_string(mpi.rank) + ": MPI places this rank at local rank " +
      std::to_string(mpi.local_rank) + " of " + std::to_string(mpi.local_size) + " on " + mpi.host +
      ", the launcher (" + launcher.launcher + ") at " + std::to_string(launcher.local_rank) +
      " of " + std::to_string(launcher.local_size) +
      "; GPUs are bound by MPI's local rank, so check the launcher's placement (ranks per node, "
      "--ntasks-per-node) or two ranks may share a GPU");
}
void SetProcess(const ProcessInfo& info) { g_process = info; }

std::string RankTag() {
  return "rank " + std::to_string(g_process.rank) + " (host " + g_process.host + ")";
}

void SetFatalHandler(FatalHandler handler) { g_fatal_handler = handler; }

void AbortJob(int exit_code) {
  static std::once_flag once;
  std::call_once(once, [&] {
    if (g_fatal_handler != nullptr) g_fatal_handler(exit_code);
  });
  std::_Exit(exit_code);
}

std::string GiBString(double bytes) {
  char buf[64];
  std::snprintf(buf, sizeof(buf), "%.2f GiB", bytes / 1073741824.0);
  return buf;
}

double ProcessMemoryBytes(const std::string& field) {
  std::ifstream in("/proc/self/status");
  const std::string key = field + ":";
  for (std::string line; std::getline(in, line);) {
    if (line.rfind(key, 0) == 0) return std::stod(line.substr(key.size())) * 1024.0;
  }
  return 0;
}

int64_t AvailableHostBytes() {
  std::ifstream in("/proc/meminfo");
  std::string key, unit;
  int64_t kib = 0;
  while (in >> key >> kib >> unit) {
    if (key == "MemAvailable:") return kib * 1024;
  }
  return -1;
}

Status RequireHostBytes(double bytes, const std::string& what, const std::string& advice) {
  const int64_t available = AvailableHostBytes();
  if (available < 0 || bytes <= static_cast<double>(available)) return Status::Ok();
  char buf[256];
  std::snprintf(buf, sizeof(buf), " needs %.2f GiB but this host has %.2f GiB available; ",
                bytes / 1073741824.0, available / 1073741824.0);
  return Status::Error(what + buf + advice);
}

namespace {
thread_local std::vector<std::string>* t_labels = nullptr;
std::mutex g_plan_mutex;
std::string g_memory_plan;
}  // namespace

AllocationLabel::AllocationLabel(std::string what) {
  if (t_labels == nullptr) t_labels = new std::vector<std::string>();
  t_labels->push_back(std::move(what));
}

AllocationLabel::~AllocationLabel() { t_labels->pop_back(); }

std::string AllocationContext() {
  std::string s;
  if (t_labels == nullptr) return s;
  for (const std::string& l : *t_labels) s += (s.empty() ? "" : " / ") + l;
  return s;
}

void SetMemoryPlan(const std::string& summary) {
  std::lock_guard<std::mutex> lock(g_plan_mutex);
  g_memory_plan = summary;
}

void OutOfHostMemory(size_t bytes, const std::string& detail) {
  // Builds the message in a fixed buffer: the heap is what just ran out.
  static char buf[4096];
  const int64_t available = AvailableHostBytes();
  std::string context;
  try {
    context = AllocationContext();
  } catch (...) {
  }
  int n = std::snprintf(buf, sizeof(buf), "%s: out of host memory allocating ", RankTag().c_str());
  if (bytes > 0) {
    n += std::snprintf(buf + n, sizeof(buf) - n, "%zu bytes (%.2f GiB)", bytes,
                       bytes / 1073741824.0);
  } else {
    n += std::snprintf(buf + n, sizeof(buf) - n, "memory");
  }
  if (!detail.empty()) n += std::snprintf(buf + n, sizeof(buf) - n, " for a %s", detail.c_str());
  n += std::snprintf(buf + n, sizeof(buf) - n, " in %s",
                     context.empty() ? "(no label)" : context.c_str());
  if (available >= 0) {
    n += std::snprintf(buf + n, sizeof(buf) - n, "; this host has %.2f GiB available",
                       available / 1073741824.0);
  }
  {
    std::lock_guard<std::mutex> lock(g_plan_mutex);
    if (!g_memory_plan.empty()) {
      n += std::snprintf(buf + n, sizeof(buf) - n, "; the plan: %s", g_memory_plan.c_str());
    }
  }
  std::snprintf(buf + n, sizeof(buf) - n,
                ". `moerun plan --config C --ranks P` shows what a rank needs; use more ranks, "
                "a smaller batch or a smaller model (a ulimit -v or cgroup limit below the "
                "host's memory also ends here).");
  std::fprintf(stderr, "%s\n", buf);
  std::fflush(stderr);
  AbortJob(1);
}

void InstallOutOfMemoryHandler() {
  std::set_new_handler([] { OutOfHostMemory(0, ""); });
}

void InstallUncaughtExceptionHandler() {
  std::set_terminate([] {
    std::string what = "std::terminate without an exception";
    if (const std::exception_ptr e = std::current_exception()) {
      try {
        std::rethrow_exception(e);
      } catch (const std::exception& x) {
        what = std::string("uncaught exception: ") + x.what();
      } catch (...) {
        what = "uncaught exception of a type not derived from std::exception";
      }
    }
    std::fprintf(stderr, "%s: %s\n", RankTag().c_str(), what.c_str());
    std::fflush(stderr);
    AbortJob(134);
  });
}

void InitLogging(const char* argv0, const LoggingOptions& options) {
  FLAGS_logtostderr = true;
  FLAGS_colorlogtostderr = false;
  FLAGS_v = options.verbosity;
  FLAGS_minloglevel =
      (g_process.rank == 0 || options.all_ranks) ? google::GLOG_INFO : google::GLOG_WARNING;
  static bool initialised = false;
  if (!initialised) {
    google::InitGoogleLogging(argv0, &RankPrefix, nullptr);
    google::InstallFailureFunction(&GlogFailure);
    initialised = true;
  }
}

}  // namespace moerun
