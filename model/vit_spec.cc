// Model shape arithmetic.
#include "model/vit_spec.h"

#include <string>

namespace moerun {

bool IsMoeBlock(const ModelConfig& model, int block) {
  if (!model.has_moe()) return false;
  const MoeConfig& moe = model.moe();
  if (moe.placement() == MoeConfig::EVERY) return (block + 1) % moe.every_n() == 0;
  // Last-n: the last n odd blocks.
  if (block % 2 == 0) return false;
  const int odd_blocks = model.num_layers() / 2;
  return (block - 1) / 2 >= odd_blocks - moe.last_n();
}

std::vector<int> MoeBlocks(const ModelConfig& model) {
  std::vector<int> blocks;
  for (int b = 0; b < model.num_layers(); ++b) {
    if (IsMoeBlock(model, b)) blocks.push_back(b);
  }
  return blocks;
}

ParameterCounts CountParameters(const ModelConfig& m) {
  const int64_t d = m.hidden_size(), mlp = m.mlp_dim(), p = m.patch_size();
  const int64_t tokens = (m.image_size() / p) * (m.image_size() / p) + 1;
  ParameterCounts c;
  c.per_expert = d * mlp + mlp + mlp * d + d;
  int64_t dense = p * p * m.channels() * d + d  // patch embedding
                  + d                           // CLS token
                  + tokens * d;                 // position embeddings
  const int64_t attention = 2 * d + (d * 3 * d + 3 * d) + (d * d + d) + 2 * d;  // LN1 qkv out LN2
  for (int b = 0; b < m.num_layers(); ++b) {
    dense += attention;
    if (IsMoeBlock(m, b)) {
      dense += d * m.moe().num_experts();  // router, no bias
      c.expert += m.moe().num_experts() * c.per_expert;
      ++c.moe_layers;
    } else {
      dense += c.per_expert;
    }
  }
  dense += 2 * d;  // final layer norm
  int64_t head_in = d;
  if (m.pre_logits_size() > 0) {
    dense += d * m.pre_logits_size() + m.pre_logits_size();
    head_in = m.pre_logits_size();
  }
  dense += head_in * m.num_classes() + m.num_classes();
  c.dense = dense;
  c.total = c.dense + c.expert;
  return c;
}

StatusOr<ExpertPlacement> PlaceExperts(int num_experts, int ranks) {
  if (num_experts < 1 || ranks < 1) return Status::Error("experts and ranks must be positive");
  if (num_experts % ranks == 0) return ExpertPlacement{num_experts / ranks, 1};
  if (ranks % num_experts == 0) return ExpertPlacement{1, ranks / num_experts};
  std::string works;
  for (int p = 1; p <= 4 * num_experts && p <= 1024; ++p) {
    if (num_experts % p == 0 || p % num_experts == 0)
      works += (works.empty() ? "" : ", ") + std::to_string(p);
  }
  return Status::Error(std::to_string(ranks) + " expert-parallel ranks cannot hold " +
                       std::to_string(num_experts) +
                       " experts: the rank count must divide the expert count or be a "
                       "multiple of it. Rank counts that work: " +
                       works + ", ...");
}

}  // namespace moerun
