// The shape of a ViT / V-MoE model as a config describes it: which blocks are MoE blocks,
// how experts map onto ranks, and exact parameter counts (shared/specs/models.md).
#ifndef MOERUN_MODEL_VIT_SPEC_H_
#define MOERUN_MODEL_VIT_SPEC_H_

#include <cstdint>
#include <string>
#include <vector>

#include "runtime/config.pb.h"
#include "runtime/status.h"

namespace moerun {

// True when block `block` (0-based) holds a MoE layer instead of a dense MLP:
// Every-n: blocks n-1, 2n-1, ...; Last-n: the last n odd blocks.
bool IsMoeBlock(const ModelConfig& model, int block);
std::vector<int> MoeBlocks(const ModelConfig& model);

struct ParameterCounts {
  int64_t total = 0;
  int64_t dense = 0;       // replicated on every rank: embeddings, attention, dense MLPs,
                           // routers, norms, head
  int64_t expert = 0;      // all experts of all MoE layers
  int64_t per_expert = 0;  // one expert MLP: D*M + M + M*D + D
  int moe_layers = 0;
};
ParameterCounts CountParameters(const ModelConfig& model);

// How E experts of a layer map onto P expert-parallel ranks: E % P == 0 gives E/P experts
// per rank; P % E == 0 gives P/E replicas of one expert per rank. Anything else is an
// error that names the rank counts (and expert counts) that would work.
struct ExpertPlacement {
  int experts_per_rank = 0;
  int replicas = 0;  // ranks holding each expert
};
StatusOr<ExpertPlacement> PlaceExperts(int num_experts, int ranks);

// Tokens of one image: patches + CLS.
int64_t TokensPerImage(const ModelConfig& model);
// Tokens per MoE routing group: model.moe.group_size, else group_images x tokens per
// image; 0 when a rank's whole micro-batch is one group (or the model has no MoE).
int64_t GroupTokens(const ModelConfig& model);
// The fewest images whose tokens make whole routing groups: V-MoE's (1 when GroupTokens is
// 0), or Mod-Squad's group_images under a capacity (1 when dropless or dense).
int64_t GroupStepImages(const ModelConfig& model);

// One parameter of the model as the whole job sees it: global (timm-like) name, global
// shape, whether weight decay applies, and the global expert id (-1: a dense parameter,
// replicated on every rank). VitModel registers exactly these (tests/vit_test.cc checks it);
// checkpoint resharding and export read them without building the model.
struct ParamSpec {
  std::string name;
  std::vector<int64_t> shape;
  bool decay = true;
  int expert = -1;
  int num_experts = 0;  // experts of the parameter's MoE layer (0: dense)
};
// Every parameter in the model's order (all experts of every MoE layer, by global id), for
// V-MoE and Mod-Squad (model.modsquad) models.
std::vector<ParamSpec> ParamSpecs(const ModelConfig& model);
// Mod-Squad's parameters (shared/specs/models.md, the reference's layout): patch embedding,
// CLS, position and task embeddings; per block LN1, then in even blocks MoE attention
// (attn.router [tasks, E_a, D], attn.kv, attn.experts.e.q [dh, D] / .o [D, dh]) and a dense
// MLP, in odd blocks dense attention (num_heads x head_dim) and a MoE MLP (mlp.router
// [tasks, E_m, D], mlp.experts.e.fc1 / fc2); final norm (dense tasks) and fc_norm
// (classification); per task heads.<name>.{norm, fc} or heads.<name>.fc; and, with
// uncertainty weighting, loss.task_uncertainty [tasks].
std::vector<ParamSpec> ModSquadParamSpecs(const ModelConfig& model);
// State saved with the parameters but not trained: Mod-Squad's expert usage EMAs
// "blocks.B.attn.usage" (even blocks) and "blocks.B.mlp.usage" (odd blocks), [tasks, E],
// replicated (empty for V-MoE and for the dense multi-task baseline).
std::vector<ParamSpec> BufferSpecs(const ModelConfig& model);
// Experts of Mod-Squad block `block`'s MoE layer (modsquad.layer_experts, else
// attention_experts in even and mlp_experts in odd blocks).
int ModSquadLayerExperts(const ModelConfig& model, int block);
// The distinct expert counts of a model's MoE layers, ascending (one for V-MoE; empty for
// a dense model).
std::vector<int> ExpertCounts(const ModelConfig& model);
// Every expert count of the model placed on `ranks` ranks (the first error, naming the
// layer kind, otherwise OK).
Status CheckPlacement(const ModelConfig& model, int ranks);
// The ranks of `ranks` that hold global expert `expert` (PlaceExperts must accept them):
// E % P == 0: rank e / (E/P); P % E == 0: ranks e, e + E, e + 2E, ...
std::vector<int> ExpertHolders(int num_experts, int ranks, int expert);

// Memory, FLOPs and communication of one training step on one rank of `ranks`, with
// `micro_batch` images per rank, fp32 or bf16 (bf16 weights and gradients plus fp32 master
// weights and AdamW moments). Parameter figures are exact; activation memory counts the
// tensors the backward keeps (estimates of the layout, not measurements).
struct TrainingFootprint {
  int64_t params_per_rank = 0;
  int64_t param_bytes = 0, grad_bytes = 0, optimizer_bytes = 0, activation_bytes = 0;
  int64_t bytes_per_rank = 0;
  double flops_per_image = 0;      // forward + backward (3x the forward's 2*MACs)
  int64_t a2a_bytes_per_step = 0;  // sent by one rank, all MoE layers, forward + backward
};
// bf16_moments: AdamW moments stored in bf16 (train.optimizer_moments: BF16), 4 bytes per
// parameter instead of 8.
TrainingFootprint EstimateFootprint(const ModelConfig& model, int ranks, int64_t micro_batch,
                                    bool bf16, bool bf16_moments = false);

}  // namespace moerun

#endif  // MOERUN_MODEL_VIT_SPEC_H_
