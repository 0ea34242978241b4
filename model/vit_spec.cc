// Model shape arithmetic.
#include "model/vit_spec.h"

#include <algorithm>
#include <numeric>
#include <string>

#include "model/routing.h"

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
  if (m.has_modsquad()) {
    ParameterCounts c;
    for (const ParamSpec& p : ModSquadParamSpecs(m)) {
      int64_t n = 1;
      for (int64_t x : p.shape) n *= x;
      (p.expert >= 0 ? c.expert : c.dense) += n;
      if (p.name.size() > 13 && p.name.compare(p.name.size() - 13, 13, "router.weight") == 0) {
        ++c.moe_layers;
      }
    }
    c.total = c.dense + c.expert;
    return c;
  }
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

namespace {

// Mod-Squad: every image is passed once per task; parameters of rank 0 exactly (its
// experts of every layer), activations and FLOPs estimated per token as for V-MoE.
TrainingFootprint ModSquadFootprint(const ModelConfig& m, int ranks, int64_t micro, bool bf16,
                                    bool bf16_moments) {
  TrainingFootprint f;
  const ModSquadConfig& ms = m.modsquad();
  for (const ParamSpec& p : ModSquadParamSpecs(m)) {
    int64_t n = 1;
    for (int64_t x : p.shape) n *= x;
    if (p.expert < 0) {
      f.params_per_rank += n;
    } else if (PlaceExperts(p.num_experts, ranks).ok()) {
      const std::vector<int> holders = ExpertHolders(p.num_experts, ranks, p.expert);
      if (std::find(holders.begin(), holders.end(), 0) != holders.end()) f.params_per_rank += n;
    }
  }
  f.param_bytes = f.params_per_rank * (bf16 ? 2 + 4 : 4);
  f.grad_bytes = f.params_per_rank * (bf16 ? 2 : 4);
  f.optimizer_bytes = f.params_per_rank * (bf16_moments ? 4 : 8);
  const double d = m.hidden_size(), mlp = m.mlp_dim(), heads = m.num_heads(), dh = ms.head_dim();
  const double grid = m.image_size() / m.patch_size(), n = grid * grid + 1;
  const double hidden = ms.expert_hidden() > 0 ? ms.expert_hidden() : mlp / ms.mlp_k();
  const double tasks = ms.tasks_size(), cf = std::max(1.0, ms.capacity_factor());
  const int64_t act = bf16 ? 2 : 4;
  double per_token = 0, macs = 0, a2a_per_token = 0;
  for (int b = 0; b < m.num_layers(); ++b) {
    const double e = ms.moe() ? ModSquadLayerExperts(m, b) : 0;
    per_token += 6 * d;  // LN1, LN2, residuals, outputs
    if (ms.moe() && b % 2 == 0) {
      const double k = ms.attention_k();
      // Router, shared K/V, per-choice queries, probabilities and outputs, dispatch buffers.
      per_token += 2 * e + 2 * dh + k * (3 * dh + n) + k * cf * (2 * d + 2 * dh);
      macs += n * (d * e + 2 * dh * d + 2 * k * dh * d + 2 * k * n * dh);
      a2a_per_token += k * cf * (2 * d + 2 * dh);
    } else {
      per_token += 3 * heads * dh + heads * n;
      macs += n * (4 * heads * dh * d + 2 * n * heads * dh);
    }
    if (ms.moe() && b % 2 == 1) {
      const double k = ms.mlp_k();
      per_token += 2 * e + k * cf * (5 * d + 2 * hidden);
      macs += n * (d * e + 2 * k * d * hidden);
      a2a_per_token += k * cf * 2 * d;
    } else {
      per_token += 2 * mlp;
      macs += n * 2 * d * mlp;
    }
  }
  macs +=
      grid * grid * m.channels() * m.patch_size() * m.patch_size() * d / tasks;  // once per image
  f.activation_bytes = static_cast<int64_t>(per_token * n * tasks * micro * act);
  f.bytes_per_rank = f.param_bytes + f.grad_bytes + f.optimizer_bytes + f.activation_bytes;
  f.flops_per_image = 3.0 * 2.0 * macs * tasks;
  const std::vector<int> counts = ExpertCounts(m);
  const double ep = counts.empty() ? 1 : std::min<double>(ranks, counts.back());
  if (ep > 1) {
    // Forward and backward, each sending (P_ep - 1) / P_ep of this rank's rows.
    f.a2a_bytes_per_step =
        static_cast<int64_t>(2.0 * a2a_per_token * n * tasks * micro * act * (ep - 1) / ep);
  }
  return f;
}

}  // namespace

TrainingFootprint EstimateFootprint(const ModelConfig& m, int ranks, int64_t micro, bool bf16,
                                    bool bf16_moments) {
  if (m.has_modsquad()) return ModSquadFootprint(m, ranks, micro, bf16, bf16_moments);
  const ParameterCounts c = CountParameters(m);
  TrainingFootprint f;
  const int64_t d = m.hidden_size(), mlp = m.mlp_dim(), grid = m.image_size() / m.patch_size();
  const int64_t n = grid * grid + 1, heads = m.num_heads(), layers = m.num_layers();
  int64_t experts_per_rank = 0, ep_ranks = 1;
  if (m.has_moe()) {
    auto placed = PlaceExperts(m.moe().num_experts(), ranks);
    experts_per_rank = placed.ok() ? placed->experts_per_rank : 0;
    ep_ranks = std::min(ranks, m.moe().num_experts());
  }
  f.params_per_rank =
      c.dense + static_cast<int64_t>(c.moe_layers) * experts_per_rank * c.per_expert;
  // fp32: weights, gradients, AdamW moments. bf16: bf16 weights and gradients plus fp32
  // master weights and moments.
  f.param_bytes = f.params_per_rank * (bf16 ? 2 + 4 : 4);
  f.grad_bytes = f.params_per_rank * (bf16 ? 2 : 4);
  f.optimizer_bytes = f.params_per_rank * (bf16_moments ? 4 : 8);
  const int64_t act = bf16 ? 2 : 4;
  const double k = m.has_moe() ? m.moe().k() : 0;
  const double e = m.has_moe() ? m.moe().num_experts() : 0;
  // Rows of the dispatch buffers per image and MoE layer: E x capacity per group, with the
  // runtime's capacity formula (rounding and multiple_of included), or k per token when
  // dropless. Per-token buffers hold k rows per token at least.
  double rows = n * k;
  if (m.has_moe() && (m.moe().capacity_factor() > 0 || m.moe().capacity() > 0)) {
    const int64_t g = GroupTokens(m) > 0 ? GroupTokens(m) : micro * n;
    int64_t cap = m.moe().capacity();
    if (cap <= 0) {
      auto c = ComputeCapacity(g, m.moe().num_experts(), m.moe().k(), m.moe().capacity_factor(),
                               m.moe().rounding() == MoeConfig::ROUND, m.moe().multiple_of());
      cap = c.ok() ? *c : 0;
    }
    rows = e * cap * static_cast<double>(n) / g;
  }
  const double buffer_rows = std::max(rows, n * k);
  double per_image = 0, macs = grid * grid * m.channels() * m.patch_size() * m.patch_size() * d;
  for (int b = 0; b < layers; ++b) {
    // Saved for the backward: LN1, qkv, probabilities, attention out, residual, LN2, out.
    per_image += n * d * 6.0 + n * 3.0 * d + heads * n * n + 4.0 * n;
    macs += 4.0 * n * d * d + 2.0 * n * n * d;
    if (IsMoeBlock(m, b)) {
      // Dispatch / receive / expert in / out / combine buffers, hidden and GELU, router.
      per_image += buffer_rows * (5.0 * d + 2.0 * mlp) + 4.0 * n * e;
      macs += n * d * e + 2.0 * n * k * d * mlp;
    } else {
      per_image += 2.0 * n * mlp;
      macs += 2.0 * n * d * mlp;
    }
  }
  macs += d * (m.pre_logits_size() > 0 ? m.pre_logits_size() + m.num_classes() : m.num_classes());
  f.activation_bytes = static_cast<int64_t>(per_image * micro * act);
  f.bytes_per_rank = f.param_bytes + f.grad_bytes + f.optimizer_bytes + f.activation_bytes;
  f.flops_per_image = 3.0 * 2.0 * macs;
  // Four all-to-alls per MoE layer and step (dispatch, combine, and their gradients), each
  // sending (P_ep - 1) / P_ep of this rank's dispatched rows.
  if (ep_ranks > 1) {
    f.a2a_bytes_per_step = static_cast<int64_t>(4.0 * c.moe_layers * micro * rows * d * act *
                                                (ep_ranks - 1) / ep_ranks);
  }
  return f;
}

int64_t TokensPerImage(const ModelConfig& m) {
  const int64_t grid = m.image_size() / m.patch_size();
  return grid * grid + 1;
}

int64_t GroupTokens(const ModelConfig& m) {
  if (!m.has_moe()) return 0;
  return m.moe().group_size() > 0 ? m.moe().group_size()
                                  : m.moe().group_images() * TokensPerImage(m);
}

int64_t GroupStepImages(const ModelConfig& m) {
  if (m.has_modsquad()) {
    const ModSquadConfig& ms = m.modsquad();
    return ms.moe() && ms.capacity_factor() > 0 && ms.group_images() > 0 ? ms.group_images() : 1;
  }
  const int64_t g = GroupTokens(m);
  return g > 0 ? g / std::gcd(g, TokensPerImage(m)) : 1;
}

int ModSquadLayerExperts(const ModelConfig& m, int block) {
  const ModSquadConfig& ms = m.modsquad();
  if (block < ms.layer_experts_size()) return ms.layer_experts(block);
  return block % 2 == 0 ? ms.attention_experts() : ms.mlp_experts();
}

std::vector<int> ExpertCounts(const ModelConfig& m) {
  std::vector<int> counts;
  if (m.has_modsquad()) {
    if (!m.modsquad().moe()) return counts;
    for (int b = 0; b < m.num_layers(); ++b) counts.push_back(ModSquadLayerExperts(m, b));
  } else if (m.has_moe()) {
    counts.push_back(m.moe().num_experts());
  }
  std::sort(counts.begin(), counts.end());
  counts.erase(std::unique(counts.begin(), counts.end()), counts.end());
  return counts;
}

Status CheckPlacement(const ModelConfig& m, int ranks) {
  if (m.has_modsquad()) {
    if (!m.modsquad().moe()) return Status::Ok();
    for (int b = 0; b < m.num_layers(); ++b) {
      auto placed = PlaceExperts(ModSquadLayerExperts(m, b), ranks);
      if (!placed.ok()) {
        return Status::Error("block " + std::to_string(b) + "'s MoE " +
                             (b % 2 == 0 ? "attention" : "MLP") +
                             " layer: " + placed.status().message());
      }
    }
    return Status::Ok();
  }
  for (int count : ExpertCounts(m)) {
    auto placed = PlaceExperts(count, ranks);
    if (!placed.ok()) return placed.status();
  }
  return Status::Ok();
}

std::vector<ParamSpec> ParamSpecs(const ModelConfig& c) {
  if (c.has_modsquad()) return ModSquadParamSpecs(c);
  std::vector<ParamSpec> out;
  const int64_t d = c.hidden_size(), p = c.patch_size(), grid = c.image_size() / p;
  const int64_t m = c.mlp_dim();
  auto add = [&](const std::string& name, std::vector<int64_t> shape, bool decay, int e = -1) {
    out.push_back({name, std::move(shape), decay, e, e >= 0 ? c.moe().num_experts() : 0});
  };
  add("patch_embed.proj.weight", {d, c.channels(), p, p}, true);
  add("patch_embed.proj.bias", {d}, false);
  add("cls_token", {1, 1, d}, false);
  add("pos_embed", {1, grid * grid + 1, d}, false);
  for (int i = 0; i < c.num_layers(); ++i) {
    const std::string pre = "blocks." + std::to_string(i) + ".";
    add(pre + "norm1.weight", {d}, false);
    add(pre + "norm1.bias", {d}, false);
    add(pre + "attn.qkv.weight", {3 * d, d}, true);
    add(pre + "attn.qkv.bias", {3 * d}, false);
    add(pre + "attn.proj.weight", {d, d}, true);
    add(pre + "attn.proj.bias", {d}, false);
    add(pre + "norm2.weight", {d}, false);
    add(pre + "norm2.bias", {d}, false);
    if (IsMoeBlock(c, i)) {
      const int experts = c.moe().num_experts();
      add(pre + "mlp.router.weight", {experts, d}, true);
      for (int e = 0; e < experts; ++e) {
        const std::string ep = pre + "mlp.experts." + std::to_string(e) + ".";
        add(ep + "fc1.weight", {m, d}, true, e);
        add(ep + "fc1.bias", {m}, false, e);
        add(ep + "fc2.weight", {d, m}, true, e);
        add(ep + "fc2.bias", {d}, false, e);
      }
    } else {
      add(pre + "mlp.fc1.weight", {m, d}, true);
      add(pre + "mlp.fc1.bias", {m}, false);
      add(pre + "mlp.fc2.weight", {d, m}, true);
      add(pre + "mlp.fc2.bias", {d}, false);
    }
  }
  add("norm.weight", {d}, false);
  add("norm.bias", {d}, false);
  int64_t head_in = d;
  if (c.pre_logits_size() > 0) {
    add("pre_logits.fc.weight", {c.pre_logits_size(), d}, true);
    add("pre_logits.fc.bias", {c.pre_logits_size()}, false);
    head_in = c.pre_logits_size();
  }
  add("head.weight", {c.num_classes(), head_in}, true);
  add("head.bias", {c.num_classes()}, false);
  return out;
}

std::vector<ParamSpec> ModSquadParamSpecs(const ModelConfig& c) {
  std::vector<ParamSpec> out;
  const ModSquadConfig& ms = c.modsquad();
  const int64_t d = c.hidden_size(), p = c.patch_size(), grid = c.image_size() / p;
  const int64_t tasks = ms.tasks_size(), dh = ms.head_dim(), heads = c.num_heads();
  const int64_t hidden = ms.expert_hidden() > 0 ? ms.expert_hidden() : c.mlp_dim() / ms.mlp_k();
  auto add = [&](const std::string& name, std::vector<int64_t> shape, bool decay, int e = -1,
                 int experts = 0) {
    out.push_back({name, std::move(shape), decay, e, experts});
  };
  add("patch_embed.proj.weight", {d, c.channels(), p, p}, true);
  add("patch_embed.proj.bias", {d}, false);
  add("cls_token", {1, 1, d}, false);
  add("pos_embed", {1, grid * grid + 1, d}, false);
  add("task_embedding", {tasks, d}, false);
  for (int i = 0; i < c.num_layers(); ++i) {
    const std::string pre = "blocks." + std::to_string(i) + ".";
    const bool moe_attention = ms.moe() && i % 2 == 0, moe_mlp = ms.moe() && i % 2 == 1;
    add(pre + "norm1.weight", {d}, false);
    add(pre + "norm1.bias", {d}, false);
    if (moe_attention) {
      const int e_count = ModSquadLayerExperts(c, i);
      add(pre + "attn.router.weight", {tasks, e_count, d}, true);
      add(pre + "attn.kv.weight", {2 * dh, d}, true);
      add(pre + "attn.kv.bias", {2 * dh}, false);
      for (int e = 0; e < e_count; ++e) {
        const std::string ep = pre + "attn.experts." + std::to_string(e) + ".";
        add(ep + "q.weight", {dh, d}, true, e, e_count);
        add(ep + "o.weight", {d, dh}, true, e, e_count);
      }
    } else {
      add(pre + "attn.qkv.weight", {3 * heads * dh, d}, true);
      add(pre + "attn.qkv.bias", {3 * heads * dh}, false);
      add(pre + "attn.proj.weight", {d, heads * dh}, true);
      add(pre + "attn.proj.bias", {d}, false);
    }
    add(pre + "norm2.weight", {d}, false);
    add(pre + "norm2.bias", {d}, false);
    if (moe_mlp) {
      const int e_count = ModSquadLayerExperts(c, i);
      add(pre + "mlp.router.weight", {tasks, e_count, d}, true);
      for (int e = 0; e < e_count; ++e) {
        const std::string ep = pre + "mlp.experts." + std::to_string(e) + ".";
        add(ep + "fc1.weight", {hidden, d}, true, e, e_count);
        add(ep + "fc1.bias", {hidden}, false, e, e_count);
        add(ep + "fc2.weight", {d, hidden}, true, e, e_count);
        add(ep + "fc2.bias", {d}, false, e, e_count);
      }
    } else {
      add(pre + "mlp.fc1.weight", {c.mlp_dim(), d}, true);
      add(pre + "mlp.fc1.bias", {c.mlp_dim()}, false);
      add(pre + "mlp.fc2.weight", {d, c.mlp_dim()}, true);
      add(pre + "mlp.fc2.bias", {d}, false);
    }
  }
  add("norm.weight", {d}, false);
  add("norm.bias", {d}, false);
  add("fc_norm.weight", {d}, false);
  add("fc_norm.bias", {d}, false);
  for (const TaskHeadConfig& t : ms.tasks()) {
    const std::string hp = "heads." + t.name() + ".";
    if (t.kind() == TaskHeadConfig::CLASSIFICATION) {
      add(hp + "norm.weight", {d}, false);
      add(hp + "norm.bias", {d}, false);
      add(hp + "fc.weight", {t.outputs(), d}, true);
      add(hp + "fc.bias", {t.outputs()}, false);
    } else {
      add(hp + "fc.weight", {p * p * t.outputs(), d}, true);
      add(hp + "fc.bias", {p * p * t.outputs()}, false);
    }
  }
  if (ms.uncertainty_weighting()) add("loss.task_uncertainty", {tasks}, false);
  return out;
}

std::vector<ParamSpec> BufferSpecs(const ModelConfig& c) {
  std::vector<ParamSpec> out;
  if (!c.has_modsquad() || !c.modsquad().moe()) return out;
  const ModSquadConfig& ms = c.modsquad();
  for (int i = 0; i < c.num_layers(); ++i) {
    const bool attention = i % 2 == 0;
    out.push_back({"blocks." + std::to_string(i) + (attention ? ".attn.usage" : ".mlp.usage"),
                   {ms.tasks_size(), ModSquadLayerExperts(c, i)},
                   false});
  }
  return out;
}

std::vector<int> ExpertHolders(int num_experts, int ranks, int expert) {
  std::vector<int> out;
  if (num_experts % ranks == 0) {
    out.push_back(expert / (num_experts / ranks));
  } else {
    for (int r = expert; r < ranks; r += num_experts) out.push_back(r);
  }
  return out;
}

}  // namespace moerun
