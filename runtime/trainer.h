// Training and evaluation of a ViT / V-MoE over the ranks of a communicator (the one
// runtime/ library above model/ and data/: target moerun_train): data-parallel
// dense parameters (gradients all-reduced over all ranks), expert parameters owned by their
// rank(s), a fixed global batch split over the ranks, AdamW with global-norm clipping.
// The state that determines the run is explicit and small: the step (data position, noise
// and augmentation keys derive from it), the parameters and the optimizer moments.
#ifndef MOERUN_RUNTIME_TRAINER_H_
#define MOERUN_RUNTIME_TRAINER_H_

#include <memory>
#include <utility>
#include <vector>

#include "comm/communicator.h"
#include "data/dataset.h"
#include "data/multitask.h"
#include "model/modsquad.h"
#include "model/vit.h"
#include "runtime/checkpoint.h"
#include "runtime/config.pb.h"
#include "runtime/optimizer.h"

namespace moerun {

// One task of a multi-task (Mod-Squad) model, global over the batch or the eval set.
struct TaskStat {
  std::string name;
  std::string metric;  // "accuracy", "miou" or "l1"
  double loss = 0, value = 0;
};

struct StepStats {
  int64_t step = 0;  // the step just taken (0-based)
  double loss = 0;   // mean cross-entropy over the global batch
  double aux_loss = 0;
  double accuracy = 0;  // on the global batch, before the update
  double grad_norm = 0;
  double learning_rate = 0;
  // False when the loss or the gradient norm is not finite: then no update was made and
  // `problem` names the step and the first non-finite gradient.
  bool finite = true;
  std::string problem;
  std::vector<MoeMetrics> moe;  // per MoE layer
  std::vector<MoeLosses> moe_losses;
  std::vector<TaskStat> tasks;  // multi-task models: per task (loss: the task's own)
};

// Seconds spent in each part of the training steps taken by this trainer (this rank):
// trainer phases, and the MoE layers' parts (forward + backward) inside forward/backward.
struct StepTimeSplit {
  int64_t steps = 0;
  double data = 0, forward = 0, backward = 0, reduce = 0, optimizer = 0;
  double router = 0;        // router GEMM, softmax/top-k, capacity and slots, router backward
  double dispatch_a2a = 0;  // the all-to-alls (dispatch, combine and their gradients)
  double experts = 0;       // expert GEMMs, bias and activation, forward and backward
  double combine = 0;       // pack, unpack, combine and their backward
  // Forward + backward outside the MoE layers (attention, dense MLPs, norms, head, loss).
  double dense() const { return forward + backward - router - dispatch_a2a - experts - combine; }
  double total() const { return data + forward + backward + reduce + optimizer; }
  // Every figure under the name JSON lines give it (grad_reduce = reduce), dense and total
  // included.
  std::vector<std::pair<const char*, double>> Named() const {
    return {{"data", data},
            {"forward", forward},
            {"backward", backward},
            {"grad_reduce", reduce},
            {"optimizer", optimizer},
            {"router", router},
            {"dispatch_a2a", dispatch_a2a},
            {"experts", experts},
            {"combine", combine},
            {"dense", dense()},
            {"total", total()}};
  }
};

struct EvalStats {
  double loss = 0, accuracy = 0;
  int64_t examples = 0;
  std::vector<double> dropped_fraction;  // mean over MoE layers, per choice rank
  std::vector<TaskStat> tasks;           // multi-task models
};

// Routing at inference: < 0 / -1 keeps the trained setting.
// The capacity formula is V-MoE's, unchanged at inference: ceil(S K c / E) rounded up to
// model.moe.multiple_of. `exact_capacity` leaves out that rounding (for c < 1 it can hide
// most of the drops a small factor asks for).
struct RoutingOverride {
  double capacity_factor = -1;
  int bpr = -1;
  bool exact_capacity = false;
};

// OK when the checkpoint's stored model has the same parameters as `current`'s (every
// field but the name and the routing settings); else an error listing the fields.
Status CheckSameModel(const CheckpointManifest& manifest, const Config& current);

// OK when the memory the model lives in holds the plan's footprint (EstimateFootprint):
// on the CPU, this host's available memory (MemAvailable) that of every rank on it; on a
// device, the free memory of this rank's GPU (with what its pool holds for reuse) that of
// this rank. Else an error with the plan's figures. Where the memory is unknown (a backend
// that does not report it) it is OK.
// On a device the activations are those of the larger of the micro-batch and the
// evaluation step (eval_images per rank, EvalImagesPerRank of train.eval_batch): an
// evaluation's forward keeps the same activations per image, and the activation arena
// keeps its size afterwards.
Status CheckMemory(const Config& config, int ranks, int64_t micro_batch,
                   Device device = Device::kCPU, int64_t eval_images = 0);

// The images per rank of an evaluation step of global_batch images over `ranks` ranks:
// whole routing groups (V-MoE's group_size, Mod-Squad's group_images), at least one.
int64_t EvalImagesPerRank(const ModelConfig& model, int ranks, int64_t global_batch);

class Trainer {
 public:
  // Fails (with a message naming the setting) when the global batch does not split over
  // the ranks or the experts do not fit the rank count.
  // device: where the model computes (a V-MoE only). The optimizer runs there too;
  // checkpoints stage through host copies. A device job of several ranks needs
  // device_world, the same ranks over a communicator that moves that device's memory (NCCL
  // for CUDA): the dense gradients' all-reduce and the experts' all-to-all run over it,
  // host scalars over `world`.
  static StatusOr<std::unique_ptr<Trainer>> Create(const Config& config, Communicator* world,
                                                   const Dataset* train,
                                                   Device device = Device::kCPU,
                                                   Communicator* device_world = nullptr);
  // Restores the GEMM precision that was in force before Create (train.precision).
  ~Trainer();

  StepStats Step();
  // Where the time of the steps taken so far went (this rank).
  // Device timers resolved first (ResolveDeviceTimers: waits for the device's queued work).
  const StepTimeSplit& time_split() const;
  // global_batch: images per evaluation step over all ranks (train.eval_batch), as
  // EvalImagesPerRank per rank (the last step padded).
  EvalStats Evaluate(const Dataset& data, int64_t global_batch, const RoutingOverride& routing);

  // The run's whole state as named global tensors: every parameter under its global name
  // and, with `optimizer`, its AdamW moments as optimizer.m.<name> and optimizer.v.<name>
  // (views: saving reads, loading writes the live buffers).
  // On a device the slices are host copies; with `device_views`, the (device tensor, host
  // copy) pairs, for copying loaded values back.
  std::vector<CheckpointSlice> StateSlices(
      bool optimizer, std::vector<std::pair<Tensor, Tensor>>* device_views = nullptr);
  // The manifest's training state at the current step (tensors and files not filled).
  CheckpointManifest StateManifest() const;
  // Loads a checkpoint written by any rank count: parameters, and the optimizer moments
  // when the checkpoint has them (else they start at zero), and the step. Checks that the
  // stored model config is this one (naming the fields that differ). Local; agree on the
  // status with AgreeOnStatus.
  Status Restore(const std::string& checkpoint_dir, const CheckpointManifest& manifest,
                 bool parameters_only = false);

  // The first parameter (of this rank) that is not finite; "" when all are.
  std::string FirstNonFiniteParameter();

  // The V-MoE model (CHECK: not a multi-task run) or the Mod-Squad model (multitask()).
  VitModel& model() {
    CHECK(model_ != nullptr) << "not a V-MoE run";
    return *model_;
  }
  ModSquadModel& modsquad() {
    CHECK(modsquad_ != nullptr) << "not a Mod-Squad run";
    return *modsquad_;
  }
  bool multitask() const { return modsquad_ != nullptr; }
  std::vector<Param>& params() { return modsquad_ ? modsquad_->params() : model_->params(); }
  AdamW& optimizer() { return *optimizer_; }
  int64_t step() const { return step_; }
  void set_step(int64_t step) { step_ = step; }
  int64_t local_batch() const { return local_batch_; }
  const BatchSampler& sampler() const { return *sampler_; }

 private:
  Trainer() = default;
  double GlobalGradNorm();
  // With st's loss and gradient norm: the AdamW update and the next step, or (not finite)
  // no update, st->finite false and st->problem naming the first non-finite gradient.
  bool UpdateIfFinite(StepStats* st);
  Status CreateVit();
  Status CreateModSquad();
  StepStats MultiTaskStep();
  // The MoE layers' timers summed into the four MoE parts of a StepTimeSplit.
  StepTimeSplit MoeTimes();
  // Adds the MoE time since `before` (a MoeTimes() result) to time_split_.
  void AddMoeTimes(const StepTimeSplit& before);
  EvalStats EvaluateMultiTask(const Dataset& data, int64_t global_batch,
                              const RoutingOverride& routing);
  // The multi-task targets of `base` (derived once per dataset).
  const MultiTaskDataset& MultiTask(const Dataset& base);
  // The labels / targets of the config's tasks for dataset examples `indices` into the
  // step buffers, and their pointers in `batch`.
  void GatherTasks(const MultiTaskDataset& data, const std::vector<int64_t>& indices,
                   MultiTaskBatch* batch);

  Config config_;
  Device device_ = Device::kCPU;
  bool bf16_gemms_before_ = false;  // the process's GEMM precision before this Trainer
  Communicator* world_ = nullptr;
  Communicator* device_world_ = nullptr;  // device jobs of several ranks
  const Dataset* train_ = nullptr;
  std::shared_ptr<MoeGroups> groups_;
  std::unique_ptr<VitModel> model_;
  std::unique_ptr<ModSquadModel> modsquad_;
  std::vector<int> data_task_;  // per config task: its FashionMnistTasks() index
  std::vector<std::pair<const Dataset*, std::unique_ptr<MultiTaskDataset>>> multitask_;
  std::vector<std::vector<int32_t>> task_labels_;
  std::vector<std::vector<float>> task_targets_;
  std::unique_ptr<AdamW> optimizer_;
  std::unique_ptr<BatchSampler> sampler_;
  int64_t step_ = 0, local_batch_ = 0;
  StepTimeSplit time_split_;
  std::vector<float> images_;
  std::vector<int32_t> labels_;
  std::vector<int64_t> indices_;
};

}  // namespace moerun

#endif  // MOERUN_RUNTIME_TRAINER_H_
