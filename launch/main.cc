// moerun: entry point and subcommand dispatch.
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <iostream>
#include <string>
#include <vector>

#include "launch/commands.h"
#include "runtime/kernels.h"
#include "runtime/process.h"

namespace {

using moerun::ProgramArgs;

struct CommandEntry {
  const char* name;
  const char* summary;
  int (*run)(const std::vector<std::string>&, ProgramArgs);
};

int Train(const std::vector<std::string>& a, ProgramArgs p) {
  return moerun::RunModelCommand("train", a, p);
}
int Eval(const std::vector<std::string>& a, ProgramArgs p) {
  return moerun::RunModelCommand("eval", a, p);
}
int Plan(const std::vector<std::string>& a, ProgramArgs p) {
  return moerun::RunModelCommand("plan", a, p);
}
int Checkpoint(const std::vector<std::string>& a, ProgramArgs p) {
  return moerun::RunCheckpointCommand("checkpoint", a, p);
}
int Export(const std::vector<std::string>& a, ProgramArgs p) {
  return moerun::RunCheckpointCommand("export", a, p);
}
int Import(const std::vector<std::string>& a, ProgramArgs p) {
  return moerun::RunCheckpointCommand("import", a, p);
}
int Reshard(const std::vector<std::string>& a, ProgramArgs p) {
  return moerun::RunCheckpointCommand("reshard", a, p);
}
int Usage(const std::vector<std::string>& a, moerun::ProgramArgs p) {
  return moerun::RunCheckpointCommand("usage", a, p);
}
int Extract(const std::vector<std::string>& a, moerun::ProgramArgs p) {
  return moerun::RunCheckpointCommand("extract", a, p);
}

const CommandEntry kCommands[] = {
    {"env", "show world size, ranks, hosts, threads, BLAS, MPI and CUDA of this job",
     moerun::RunEnv},
    {"bench", "benchmarks printing JSON lines: comm, gemm, moe-layer, train, checkpoint, soak",
     nullptr},
    {"replay-moe", "run one MoE layer on a case file and write outputs and gradients",
     moerun::RunReplayMoe},
    {"replay-modsquad", "run one Mod-Squad MoE layer over one multi-task step from a case file",
     moerun::RunReplayModSquad},
    {"train", "train a model from a config (configs/*.pbtxt)", Train},
    {"eval", "evaluate a trained model, with routing overrides", Eval},
    {"sweep", "run an experiment grid (ranks x config fields): CSV and PNG plots, resumable",
     moerun::RunSweep},
    {"plan", "parameter count, per-rank memory and communication of a config", Plan},
    {"dry-run", "build one rank of a P-rank job and step it, peers simulated: memory vs plan",
     moerun::RunDryRun},
    {"checkpoint", "'checkpoint info PATH' (JSON summary), 'checkpoint verify PATH' (CRCs)",
     Checkpoint},
    {"export", "write a checkpoint's parameters as one safetensors file (global names)", Export},
    {"import", "make a checkpoint (step 0, fresh optimizer) from a safetensors file", Import},
    {"reshard", "rewrite a checkpoint as another rank count would have written it", Reshard},
    {"usage", "Mod-Squad expert usage heatmaps and task similarity of a checkpoint", Usage},
    {"extract", "cut a standalone single-task model out of a Mod-Squad checkpoint", Extract},
};

const CommandEntry kBenchTargets[] = {
    {"comm", "all_to_all_v and all_reduce bandwidth, ours beside raw MPI", moerun::RunBenchComm},
    {"gemm", "fp32 GEMM GFLOP/s at expert-MLP shapes beside the measured peak",
     moerun::RunBenchGemm},
    {"moe-layer", "forward+backward of one MoE layer: tokens/s and where the time goes",
     moerun::RunBenchMoeLayer},
    {"train", "training steps of a model config: images/s and model FLOPs utilisation",
     moerun::RunBenchTrain},
    {"checkpoint", "checkpoint save/load GB/s beside raw write+fsync/read, training stall",
     moerun::RunBenchCheckpoint},
    {"soak", "long training with checkpoints: resident memory and step time over time",
     moerun::RunBenchSoak},
};

template <size_t N>
void PrintTable(const char* title, const CommandEntry (&entries)[N]) {
  std::cout << title << "\n";
  size_t width = 0;
  for (const CommandEntry& c : entries) width = std::max(width, std::strlen(c.name));
  for (const CommandEntry& c : entries) {
    std::string name = c.name;
    name.resize(width + 2, ' ');
    std::cout << "  " << name << c.summary << "\n";
  }
}

void PrintUsage() {
  std::cout << "Usage: moerun <command> [options]\n"
               "       mpirun -np N moerun <command> [options]\n\n"
               "moerun trains Mixture-of-Experts vision transformers with expert parallelism\n"
               "over MPI.\n\n";
  PrintTable("Commands:", kCommands);
  std::cout << "\nRun 'moerun <command> --help' for the options of a command.\n" << std::flush;
}

template <size_t N>
const CommandEntry* Find(const CommandEntry (&entries)[N], const std::string& name) {
  for (const CommandEntry& c : entries) {
    if (name == c.name) return &c;
  }
  return nullptr;
}

// Results go to stdout: a write that failed there (a full disk, /dev/full, a closed pipe)
// fails the command.
int Finish(int code) {
  std::cout.flush();
  if (!std::cout) {
    std::cerr << "moerun: cannot write the results to standard output: " << std::strerror(errno)
              << "\n";
    return code == moerun::kExitOk ? moerun::kExitFailure : code;
  }
  return code;
}

}  // namespace

int main(int argc, char** argv) {
  // OpenBLAS fell back to a slow generic core on a CPU it does not recognise: run again with
  // the core the CPU supports (once; the variable stays set). A user's OPENBLAS_CORETYPE
  // wins.
  if (std::getenv("OPENBLAS_CORETYPE") == nullptr) {
    const std::string core = moerun::BlasCoreToRequest();
    if (!core.empty()) {
      setenv("MOERUN_BLAS_DETECTED_CORE", moerun::BlasDetectedCore().c_str(), 1);
      setenv("OPENBLAS_CORETYPE", core.c_str(), 1);
      execv("/proc/self/exe", argv);
      // exec failed (no /proc): carry on with the slow kernels.
      unsetenv("OPENBLAS_CORETYPE");
      unsetenv("MOERUN_BLAS_DETECTED_CORE");
    }
  }
  moerun::SetProcess(moerun::DiscoverProcessFromEnvironment());
  moerun::InitLogging(argv[0], {});
  moerun::InstallOutOfMemoryHandler();
  moerun::InstallUncaughtExceptionHandler();
  const bool root = moerun::Process().rank == 0;
  std::vector<std::string> args(argv + 1, argv + argc);
  if (args.empty() || args[0] == "--help" || args[0] == "-h" || args[0] == "help") {
    if (root) PrintUsage();
    return args.empty() ? moerun::kExitUsage : moerun::kExitOk;
  }
  if (args[0] == "--version") {
    if (root) std::cout << "moerun 0.1.0\n";
    return moerun::kExitOk;
  }
  const ProgramArgs program{&argc, &argv};
  const CommandEntry* command = Find(kCommands, args[0]);
  if (command == nullptr) {
    if (root) {
      std::cerr << "moerun: unknown command '" << args[0] << "'.\n\n";
      PrintUsage();
    }
    return moerun::kExitUsage;
  }
  args.erase(args.begin());
  if (command->run != nullptr) return Finish(command->run(args, program));

  // bench <target>
  if (args.empty() || args[0] == "--help" || args[0] == "-h") {
    if (root) {
      std::cout << "Usage: moerun bench <target> [options]\n\nBenchmarks print one JSON object "
                   "per line on stdout (rank 0), each figure beside its limit.\n\n";
      PrintTable("Targets:", kBenchTargets);
      std::cout << "\nRun 'moerun bench <target> --help' for its options.\n" << std::flush;
    }
    return args.empty() ? moerun::kExitUsage : moerun::kExitOk;
  }
  const CommandEntry* target = Find(kBenchTargets, args[0]);
  if (target == nullptr) {
    if (root) {
      std::cerr
          << "moerun bench: unknown target '" << args[0]
          << "'; targets are: comm, gemm, moe-layer, train, checkpoint, soak. See 'moerun bench "
             "--help'.\n";
    }
    return moerun::kExitUsage;
  }
  args.erase(args.begin());
  return Finish(target->run(args, program));
}
