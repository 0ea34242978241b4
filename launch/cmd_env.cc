// moerun env: what this job looks like from every rank.
#include <sched.h>

#include <cstdlib>
#include <iostream>
#include <string>

#include "launch/commands.h"
#include "runtime/backend.h"
#include "runtime/kernels.h"
#include "runtime/process.h"

#ifdef MOERUN_WITH_NCCL
#include <nccl.h>
#endif

namespace moerun {

std::string NcclAvailability() {
#ifdef MOERUN_WITH_NCCL
  int v = 0;
  ncclGetVersion(&v);
  return "built (NCCL " + std::to_string(v / 10000) + "." + std::to_string(v % 10000 / 100) + "." +
         std::to_string(v % 100) + ")";
#else
  return "not built";
#endif
}

namespace {
std::string JoinNames(const std::vector<std::string>& names) {
  std::string out;
  for (const auto& n : names) out += (out.empty() ? "" : ", ") + n;
  return out;
}
}  // namespace

int RunEnv(const std::vector<std::string>& args, ProgramArgs program) {
  GlobalOptions global;
  bool json = false;
  po::options_description desc("Options");
  desc.add_options()("json", po::bool_switch(&json), "one JSON object per rank instead of text");
  AddGlobalOptions(&desc, &global);
  po::variables_map vm;
  if (auto done =
          ParseArgs("moerun env", "[mpirun -np N] moerun env [--json]",
                    "Shows the job as each rank sees it: world size, rank, local rank, host, "
                    "threads,\nBLAS, MPI library, CUDA and NCCL availability.",
                    args, desc, nullptr, &vm))
    return *done;
  Session session(program.argc, program.argv, global);
  const ProcessInfo& p = Process();
  // The CPUs this rank may run on (the launcher's binding): "0-1", "0", ...
  std::string cpus;
  int cpu_count = 0;
  cpu_set_t set;
  CPU_ZERO(&set);
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    for (int c = 0; c < CPU_SETSIZE; ++c) {
      if (!CPU_ISSET(c, &set)) continue;
      int end = c;
      while (end + 1 < CPU_SETSIZE && CPU_ISSET(end + 1, &set)) ++end;
      cpus += (cpus.empty() ? "" : ",") + std::to_string(c) +
              (end > c ? "-" + std::to_string(end) : "");
      cpu_count += end - c + 1;
      c = end;
    }
  }
  nlohmann::json j = {{"rank", p.rank},
                      {"cpus", cpus},
                      {"cpu_count", cpu_count},
                      {"world_size", p.world_size},
                      {"local_rank", p.local_rank},
                      {"local_size", p.local_size},
                      {"host", p.host},
                      {"launcher", p.launcher},
                      {"threads", NumThreads()},
                      {"omp_wait_policy", std::getenv("OMP_WAIT_POLICY") != nullptr
                                              ? std::string(std::getenv("OMP_WAIT_POLICY"))
                                              : std::string("unset")},
                      {"blas", BlasDescription()},
                      {"mpi", MpiRuntime::LibraryVersion()},
                      {"mpi_thread_multiple", session.mpi().thread_level() == MPI_THREAD_MULTIPLE},
                      {"backends", BuiltBackends()},
                      {"cuda", CudaBackendSummary()},
                      {"cuda_devices", CudaDeviceCount()},
                      {"cuda_device", CudaDeviceDescription(p.local_rank)},
                      {"nccl", NcclAvailability()}};
  // Gather every rank's line to rank 0 in fixed-size slots.
  constexpr int kSlot = 1024;
  std::string mine = j.dump();
  mine.resize(kSlot, '\0');
  std::string all(static_cast<size_t>(kSlot) * session.size(), '\0');
  session.world().AllGather(mine.data(), kSlot, all.data(), DType::kU8);
  if (!session.is_root()) return kExitOk;
  for (int r = 0; r < session.size(); ++r) {
    const nlohmann::json e = nlohmann::json::parse(std::string(all.c_str() + r * kSlot));
    if (json) {
      PrintJsonLine(e);
      continue;
    }
    if (r == 0) {
      std::cout << "world size   " << e["world_size"]
                << " (launcher: " << e["launcher"].get<std::string>() << ")\n"
                << "MPI          " << e["mpi"].get<std::string>()
                << (e["mpi_thread_multiple"].get<bool>() ? " (MPI_THREAD_MULTIPLE)" : "") << "\n"
                << "BLAS         " << e["blas"].get<std::string>() << "\n"
                << "backends     " << JoinNames(e["backends"].get<std::vector<std::string>>())
                << " (--device cpu" << (e["cuda_devices"].get<int>() > 0 ? " or cuda" : "") << ")\n"
                << "CUDA         " << e["cuda"].get<std::string>() << "\n"
                << "NCCL         " << e["nccl"].get<std::string>() << "\n";
    }
    std::cout << "rank " << r << "       host " << e["host"].get<std::string>() << ", local rank "
              << e["local_rank"] << " of " << e["local_size"] << ", " << e["threads"]
              << " thread(s) on CPUs " << e["cpus"].get<std::string>() << " (" << e["cpu_count"]
              << "), OMP_WAIT_POLICY " << e["omp_wait_policy"].get<std::string>() << ", "
              << e["cuda_devices"] << " CUDA device(s)"
              << (e["cuda_device"].get<std::string>().empty()
                      ? std::string()
                      : ", binds " + e["cuda_device"].get<std::string>())
              << "\n";
  }
  std::cout << std::flush;
  return kExitOk;
}

}  // namespace moerun
