// The training loop of `moerun train` as a library (target moerun_train): resume, steps,
// progress lines, evaluation, metrics, checkpoints (periodic, time-based, asynchronous, at
// the end and when stopped by a signal) and the stop signals. The CLI only parses and calls.
#ifndef MOERUN_RUNTIME_TRAIN_LOOP_H_
#define MOERUN_RUNTIME_TRAIN_LOOP_H_

#include <nlohmann/json.hpp>
#include <string>

#include "comm/communicator.h"
#include "data/dataset.h"
#include "runtime/config.pb.h"
#include "runtime/status.h"
#include "runtime/trainer.h"

namespace moerun {

// The training or test set a config names (a synthetic set is cut into both).
StatusOr<Dataset> LoadRunData(const Config& config, bool train);

// runs/<model.name> unless train.out_dir says otherwise.
std::string RunOutDir(const Config& config);
// <out_dir>/checkpoints unless train.checkpoint_dir says otherwise.
std::string RunCheckpointDir(const Config& config);

// SIGINT, SIGTERM and SIGUSR1 (what `sbatch --signal=USR1@T` and cluster/mpirun-local send)
// ask the loop to stop at the next step boundary, save a checkpoint and exit.
void InstallStopSignalHandlers();
// The signal received (0: none).
int StopSignal();
// For tests: as if `signal` had arrived.
void RequestStop(int signal);

struct TrainLoopOptions {
  // Run until this step (then save and end with exit 0); 0: train.steps. The schedule
  // always spans train.steps, so a run split this way equals one straight run.
  int64_t until_step = 0;
  // Where the model trains (`train --device`): the CPU, or a GPU per rank for a V-MoE
  // or a Mod-Squad job (Trainer::Create refuses several ranks without device_world).
  Device device = Device::kCPU;
  // A device job of several ranks: the same ranks over a device communicator (NCCL).
  Communicator* device_world = nullptr;
};

struct TrainLoopResult {
  int exit_code = 0;          // 0 done, 1 failed or stopped by a signal, 2 bad config / checkpoint
  std::string error;          // set when exit_code != 0 and something failed (printed by rank 0)
  nlohmann::json final_line;  // the "event": "final" line (rank 0), when training ran
};

// Trains `config` over `world`. Collective. Progress goes to the log (rank 0), metrics to
// the JSON lines file, checkpoints under RunCheckpointDir.
// {"class": {"loss": .., "accuracy": ..}, ...}: a multi-task model's per-task figures.
nlohmann::json TasksJson(const std::vector<TaskStat>& tasks);

// Mod-Squad: writes the usage report (runtime/usage.h) of the trainer's model into `dir`;
// the mean per-task usage entropy in bits through `entropy`. Local (call on one rank).
Status WriteTrainerUsageReport(Trainer& trainer, const std::string& dir, double* entropy);

TrainLoopResult RunTrainingLoop(const Config& config, Communicator& world,
                                const TrainLoopOptions& options);

}  // namespace moerun

#endif  // MOERUN_RUNTIME_TRAIN_LOOP_H_
