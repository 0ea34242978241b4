// Mod-Squad expert usage (shared/specs/modsquad.md): per MoE layer and task the share of
// the selections that go to each expert (from the layers' usage EMAs), the task-similarity
// matrix, usage sharpness, and the report a user looks at: per layer a heatmap PNG (tasks x
// experts, percent, like the paper's Fig. 3) and a CSV, and the similarity matrix as PNG
// and CSV.
#ifndef MOERUN_RUNTIME_USAGE_H_
#define MOERUN_RUNTIME_USAGE_H_

#include <string>
#include <vector>

#include "runtime/config.pb.h"
#include "runtime/status.h"
#include "runtime/tensor.h"

namespace moerun {

struct LayerUsage {
  std::string layer;  // "blocks.0.attn", "blocks.1.mlp"
  int tasks = 0, experts = 0, k = 0;
  std::vector<double> percent;  // [tasks, experts]: u[t,e] = 100 freq[t,e] / sum_e freq[t,e]
};

// From the usage EMAs "blocks.B.attn.usage" / "blocks.B.mlp.usage" [tasks, E] (BufferSpecs
// order). A task whose EMA is all zero (never trained) gets 0 everywhere.
std::vector<LayerUsage> UsageFromBuffers(const ModelConfig& model,
                                         const std::vector<std::pair<std::string, Tensor>>& ema);

// S(i, j) = sum over layers, sum_e (u[i,e] / 100) (u[j,e] / 100); [tasks, tasks].
std::vector<double> TaskSimilarity(const std::vector<LayerUsage>& layers);

// The entropy in bits of task t's usage in a layer (log2 E when uniform, log2 k at best
// for k experts used evenly); MeanTaskEntropy averages it over tasks and layers.
double UsageEntropy(const LayerUsage& layer, int task);
double MeanTaskEntropy(const std::vector<LayerUsage>& layers);

// Writes into `dir` (created): usage_<layer>.csv and .png per layer, task_similarity.csv
// and .png. `written` (optional) receives the paths.
Status WriteUsageReport(const ModelConfig& model, const std::vector<LayerUsage>& layers,
                        const std::string& dir, std::vector<std::string>* written);

}  // namespace moerun

#endif  // MOERUN_RUNTIME_USAGE_H_
