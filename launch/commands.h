// moerun's subcommands. Each takes the words after its name and returns an exit code.
#ifndef MOERUN_LAUNCH_COMMANDS_H_
#define MOERUN_LAUNCH_COMMANDS_H_

#include <functional>
#include <string>
#include <vector>

#include "launch/cli.h"
#include "runtime/config.pb.h"

namespace moerun {

int RunEnv(const std::vector<std::string>& args, ProgramArgs program);
int RunBenchComm(const std::vector<std::string>& args, ProgramArgs program);
int RunBenchGemm(const std::vector<std::string>& args, ProgramArgs program);
int RunBenchMoeLayer(const std::vector<std::string>& args, ProgramArgs program);
int RunBenchTrain(const std::vector<std::string>& args, ProgramArgs program);
int RunReplayMoe(const std::vector<std::string>& args, ProgramArgs program);
int RunReplayModSquad(const std::vector<std::string>& args, ProgramArgs program);
// train / eval / plan: load and validate the config, then run the command.
int RunModelCommand(const std::string& command, const std::vector<std::string>& args,
                    ProgramArgs program);

// checkpoint (info|verify), export, import, reshard (cmd_checkpoint.cc).
int RunCheckpointCommand(const std::string& command, const std::vector<std::string>& args,
                         ProgramArgs program);
int RunBenchCheckpoint(const std::vector<std::string>& args, ProgramArgs program);
int RunBenchSoak(const std::vector<std::string>& args, ProgramArgs program);
int RunSweep(const std::vector<std::string>& args, ProgramArgs program);
int RunDryRun(const std::vector<std::string>& args, ProgramArgs program);

// The best fp32 GFLOP/s of square GEMMs of these sizes with this rank's threads.
double MeasureGemmPeakGflops(const std::vector<int64_t>& sizes, double seconds);
// A square n x n x n fp32 GEMM with its operands made (and run once) now; each call of the
// result times one more product and returns its GFLOP/s: the peak sampled beside each timed
// step of a benchmark, on the same moment's clocks and neighbours.
std::function<double()> SquareGemmProbe(int64_t n);
// Seconds one expert MLP's six GEMMs (forward and both backward products, `rows` token rows,
// width d, hidden m) take alone, each the best of its timed loops: the layer's own GEMM
// shapes at the rate OpenBLAS runs them here, with nothing else in the step.
double MeasureExpertGemmSeconds(int64_t rows, int64_t d, int64_t m, double seconds);

// The training loop and evaluation, for a validated config (cmd_train.cc).
// until_step > 0: stop after that step (saving a checkpoint); the schedule spans train.steps.
int RunTrain(const Config& config, Session& session, int64_t until_step);
int RunEval(const Config& config, Session& session, const std::string& model_path,
            const std::vector<double>& capacity_factors, const std::vector<int>& bprs,
            bool exact_capacity);

// What this build can use of CUDA: "not built", or "built, N devices".
std::string CudaAvailability(int* device_count);
std::string NcclAvailability();

}  // namespace moerun

#endif  // MOERUN_LAUNCH_COMMANDS_H_
