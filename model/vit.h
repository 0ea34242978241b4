// A ViT / V-MoE classifier with explicit forward and backward (shared/specs/models.md):
// patch embedding, CLS token, learned position embeddings, pre-norm blocks (multi-head
// self-attention, then an MLP or a MoE layer), final layer norm on the CLS token, optional
// pre-logits (Dense + tanh), head, softmax cross-entropy.
//
// Each rank holds every dense parameter and its own experts. Parameters carry global,
// timm-like names ("blocks.1.attn.qkv.weight", "blocks.1.mlp.experts.17.fc1.weight") and
// are initialised from (seed, name) alone, so the model is the same for any rank count.
#ifndef MOERUN_MODEL_VIT_H_
#define MOERUN_MODEL_VIT_H_

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "model/init.h"
#include "model/moe_layer.h"
#include "model/ops.h"
#include "runtime/config.pb.h"
#include "runtime/tensor.h"

namespace moerun {

struct Param {
  std::string name;  // global name
  Tensor value, grad;
  bool expert = false;  // part of this rank's expert shard; else replicated on every rank
  bool decay = true;    // weight decay applies (not to biases, norms, embeddings)
  // Expert parameters: the communicators of their layer (replicas sum their gradients);
  // null: the model's only MoE groups.
  const MoeGroups* groups = nullptr;
};

struct VitBatch {
  const float* images = nullptr;    // [batch, C, H, W]
  const int32_t* labels = nullptr;  // [batch]; -1: ignored
  int64_t batch = 0;                // images on this rank
  int64_t global_batch = 0;         // images over all ranks (the loss is their mean)
  int64_t first_image = 0;          // global index of this rank's first image (noise keys)
  bool training = true;
  // Images [routed_images, batch) are padding (evaluation's last batch): their tokens take
  // no expert capacity. -1: no mask. Where any rank pads, every rank passes a mask (batch
  // when it has none of the padding): a masked layer routes on the host, and ranks must
  // route the same way (their collectives come in the same order).
  int64_t routed_images = -1;
  uint32_t step = 0;
  uint64_t seed = 0;
};

struct VitOutput {
  double loss_sum = 0;  // cross-entropy summed over this rank's labelled images
  int64_t correct = 0;  // argmax == label on this rank
  int64_t counted = 0;  // labelled images on this rank
  double aux_loss = 0;  // sum over MoE layers of their (global) weighted aux losses
};

class VitModel {
 public:
  // groups: the MoE communicators (required when the config has MoE layers).
  // device: where the parameters, gradients and activations live and the ops run (the
  // MoE layers' routing stays on the host: moe_layer.h). The images, labels and the loss
  // are host data; a device model copies the images over and the [batch, classes] logits
  // back.
  static StatusOr<std::unique_ptr<VitModel>> Create(const ModelConfig& config,
                                                    std::shared_ptr<MoeGroups> groups,
                                                    Device device = Device::kCPU);

  ~VitModel();
  const ModelConfig& config() const { return config_; }
  int64_t tokens() const { return tokens_; }
  // The activation arena's blocks: 1 in steady state (more after a step larger than any
  // before, until the next Forward merges them).
  int arena_blocks() const { return arena_.num_blocks(); }
  std::vector<Param>& params() { return params_; }
  // Replicated parameters' gradients, contiguous (one all_reduce covers them all).
  Tensor& dense_grads() { return dense_grad_flat_; }
  std::vector<MoeLayer*> moe_layers();
  std::vector<int> moe_blocks() const;

  // ViT initialisation from the seed (see vit.cc for the scheme).
  void Init(uint64_t seed);
  void ZeroGrads();

  Status Forward(const VitBatch& batch, VitOutput* out);
  // Gradients of (loss_sum / global_batch + aux losses), accumulated into the params' grads.
  void Backward();
  const Tensor& logits() const { return logits_; }

 private:
  VitModel() = default;
  struct Block;
  Tensor AddDense(const std::string& name, const Shape& shape, bool decay);
  // Drops the last forward's activations (Backward needs a new Forward after it).
  void ReleaseActivations();

  ModelConfig config_;
  std::shared_ptr<MoeGroups> groups_;
  int64_t tokens_ = 0, patches_ = 0, d_ = 0, heads_ = 0, head_dim_ = 0, mlp_ = 0;
  std::vector<Param> params_;
  std::vector<std::unique_ptr<Block>> blocks_;
  std::vector<std::unique_ptr<MoeLayer>> moe_;
  std::unique_ptr<DenseParamStore> dense_;
  Tensor dense_grad_flat_;
  // Parameters (views into the flat storage or the MoE layers).
  Tensor patch_w_, patch_b_, cls_, pos_, norm_w_, norm_b_, pre_w_, pre_b_, head_w_, head_b_;
  Tensor patch_gw_, patch_gb_, cls_g_, pos_g_, norm_gw_, norm_gb_, pre_gw_, pre_gb_, head_gw_,
      head_gb_;
  // Activations of the last forward.
  // The ops table of the model's device, looked up per call (train.precision can switch
  // the CPU's GEMMs to bf16).
  const OpsTable& ops() const { return Ops(device_); }
  // A tensor's data on the model's device; n floats copied within it; f run over a host
  // copy of t (read: with t's values) that is then copied back (t itself on the CPU).
  float* F(const Tensor& t) const;
  void CopyFloats(float* dst, const float* src, int64_t n) const;
  void OnHost(Tensor* t, bool read, const std::function<void(float*)>& f) const;
  Device device_ = Device::kCPU;
  Arena arena_;
  VitBatch batch_;
  Tensor patches_in_, x0_, cls_rows_, cls_norm_, norm_mean_, norm_rstd_, pre_out_, logits_, probs_;
  std::vector<Tensor> block_inputs_;
  const int32_t* labels_ = nullptr;
  std::vector<uint8_t> routed_;
};

}  // namespace moerun

#endif  // MOERUN_MODEL_VIT_H_
