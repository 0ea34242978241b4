// Process identity, rank-tagged logging and job-wide fatal handling.
#include "runtime/process.h"

#include <glog/logging.h>
#include <unistd.h>

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iomanip>
#include <mutex>

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
