// A Mod-Squad multi-task ViT with explicit forward and backward (shared/specs/models.md,
// modsquad.md), expert-parallel: every image is passed once per task in one token stream
// (sequence t * B + b is image b under task t, and every token carries its task id); a
// learned task embedding is added to every token before every block; even blocks hold
// MoE attention (MoeAttention), odd blocks a MoE MLP (MoeLayer with task gates); per-task
// heads; the task losses combined with learned uncertainty weights, plus the MI loss of
// every MoE layer. With modsquad.moe = false it is the dense multi-task ViT of the same
// width (the baseline).
//
// Parameters carry the global names of ModSquadParamSpecs (vit_spec.h) and are initialised
// from (seed, name) alone, so the model is the same for any rank count.
#ifndef MOERUN_MODEL_MODSQUAD_H_
#define MOERUN_MODEL_MODSQUAD_H_

#include <map>
#include <memory>
#include <string>
#include <vector>

#include "model/init.h"
#include "model/moe_attention.h"
#include "model/moe_layer.h"
#include "model/ops.h"
#include "model/vit.h"
#include "runtime/config.pb.h"
#include "runtime/tensor.h"

namespace moerun {

// One step's (or one evaluation batch's) inputs on this rank.
struct MultiTaskBatch {
  const float* images = nullptr;  // [batch, C, H, W]
  int64_t batch = 0;              // images on this rank (padding included)
  int64_t counted = 0;            // the first `counted` count; the rest is padding
  int64_t global_counted = 0;     // counted images over all ranks (the losses' mean)
  // Per task (config order): classification labels [batch]; segmentation labels
  // [batch, H * W] (row-major pixels); regression targets [batch, H * W * outputs]
  // (pixels row-major, channels fastest). The unused pointer of a task stays null.
  std::vector<const int32_t*> labels;
  std::vector<const float*> targets;
  bool training = true;
};

// Per task, global over all ranks.
struct TaskResult {
  double loss = 0;    // mean cross-entropy (per image or per pixel) or mean L1
  double metric = 0;  // accuracy, mIoU or L1 (the same as the loss for regression)
  // Sums behind the metric, so batches can be merged: accuracy [correct, counted]; mIoU
  // [intersection per class, union per class]; L1 [abs error sum, values]; and the loss
  // sum with its count (the last two).
  std::vector<double> sums;
};

struct MultiTaskOutput {
  std::vector<TaskResult> tasks;
  double task_loss = 0;  // the weighted sum the optimiser sees (without aux)
  double aux_loss = 0;   // sum over MoE layers of their weighted auxiliary losses
};

// The metric of task `head` from its merged sums.
double TaskMetric(const TaskHeadConfig& head, const std::vector<double>& sums);

class ModSquadModel {
 public:
  // world: the ranks (data-parallel dense parameters, expert-parallel MoE layers; losses
  // are global means). Fails (naming the block) when an expert count does not fit them.
  // device: where the parameters, gradients and activations live; on a device the routers,
  // routing plans, aux losses and the task losses stay on the host (as for VitModel), and
  // with several ranks device_world (the same ranks over a communicator of device memory,
  // NCCL) moves the device's gradients and rows.
  static StatusOr<std::unique_ptr<ModSquadModel>> Create(const ModelConfig& config,
                                                         Communicator* world,
                                                         Device device = Device::kCPU,
                                                         Communicator* device_world = nullptr);
  ~ModSquadModel();

  const ModelConfig& config() const { return config_; }
  int tasks() const { return config_.modsquad().tasks_size(); }
  std::vector<Param>& params() { return params_; }
  // BufferSpecs (vit_spec.h): the usage EMAs of the MoE layers (value only, no gradient).
  std::vector<Param>& buffers() { return buffers_; }
  Tensor& dense_grads() { return dense_grad_flat_; }
  std::vector<MoeAttention*> moe_attention_layers();
  std::vector<MoeLayer*> moe_mlp_layers();
  // The MoE communicators of layers with `experts` experts (null when there are none).
  std::shared_ptr<MoeGroups> groups(int experts) const;

  void Init(uint64_t seed);
  void ZeroGrads();
  // Sums the replicated gradients over the world (routers included) and the experts'
  // over their replicas.
  void ReduceGradients();

  // Collective (MoE dispatch, global losses).
  Status Forward(const MultiTaskBatch& batch, MultiTaskOutput* out);
  // Gradients of task_loss + aux_loss, accumulated into the params' grads (this rank's
  // share: after ReduceGradients they are the global gradient).
  void Backward();

  Device device() const { return device_; }
  // The activation arena's blocks (as VitModel::arena_blocks).
  int arena_blocks() const { return arena_.num_blocks(); }
  // Of the last forward, on the host: [batch, outputs] logits of classification task t's
  // images; the dense tasks' [batch * patches, P * P * outputs] predictions.
  const Tensor& task_outputs(int t) const { return heads_a_[t].out_host; }

 private:
  ModSquadModel() = default;
  struct Block;
  Tensor AddDense(const std::string& name, const Shape& shape, bool decay);

  ModelConfig config_;
  Communicator* world_ = nullptr;
  Communicator* device_world_ = nullptr;  // null on the CPU or on one rank
  Device device_ = Device::kCPU;
  std::map<int, std::shared_ptr<MoeGroups>> groups_;  // by expert count
  int64_t tokens_ = 0, patches_ = 0, d_ = 0, heads_ = 0, head_dim_ = 0, mlp_ = 0;
  std::vector<Param> params_, buffers_;
  std::vector<std::unique_ptr<Block>> blocks_;
  std::vector<std::unique_ptr<MoeAttention>> moe_attention_;
  std::vector<std::unique_ptr<MoeLayer>> moe_mlp_;
  std::unique_ptr<DenseParamStore> dense_;
  Tensor dense_grad_flat_;
  Tensor patch_w_, patch_b_, cls_, pos_, task_emb_, norm_w_, norm_b_, fc_norm_w_, fc_norm_b_;
  Tensor patch_gw_, patch_gb_, cls_g_, pos_g_, task_emb_g_, norm_gw_, norm_gb_, fc_norm_gw_,
      fc_norm_gb_;
  Tensor uncertainty_, uncertainty_g_;
  // The forward's host copy of uncertainty_ (the task loss weights), which the backward
  // reuses (the values change only at the optimizer step).
  Tensor uncertainty_host_;
  // [patches] ones on the model's device: a classification head's mean over its patch
  // tokens is one strided-batched GEMM (ones^T x patches per image), not an axpy per token.
  Tensor patch_ones_;
  struct Head {
    Tensor norm_w, norm_b, fc_w, fc_b, g_norm_w, g_norm_b, g_fc_w, g_fc_b;
  };
  std::vector<Head> heads_p_;
  // The ops table of the device the model's tensors live on, looked up per call
  // (train.precision can switch the GEMMs to bf16), and a tensor's floats for it.
  const OpsTable& ops() const { return Ops(device_); }
  float* F(const Tensor& t) const { return t.device_data<float>(device_); }
  // Sums a gradient over the world (device_world_ for device memory); nothing on one rank.
  void SumOverRanks(Tensor* grad) const;
  // Activations of the last forward; dropped at the start of the next (so that the arena
  // can merge the blocks a larger step added).
  void ReleaseActivations();
  Arena arena_;
  MultiTaskBatch batch_;
  std::vector<int32_t> token_task_;
  Tensor patches_in_, x0_;
  // One task head's activations of the last forward (on the model's device, but for the
  // loss's host tensors).
  struct HeadActivations {
    Tensor in, mean, rstd, norm;  // pooled (classification) or patch rows; the first norm
    Tensor mean2, rstd2, norm2;   // classification: the head's own LN
    Tensor out;                   // logits / predictions
    // On the host: out's copy, the softmax, the labels / targets in the head's layout.
    Tensor out_host, probs, labels, targets;
  };
  std::vector<HeadActivations> heads_a_;
  std::vector<double> task_loss_, task_weight_;
};

}  // namespace moerun

#endif  // MOERUN_MODEL_MODSQUAD_H_
