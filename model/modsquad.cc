// Mod-Squad forward and backward.
//
// Initialisation (the V-MoE scheme of vit.cc where the reference gives no other): patch
// embedding lecun-normal, attention / MLP / expert kernels xavier-uniform, routers
// lecun-normal, MLP biases normal(1e-6), other biases 0, position and task embeddings
// normal(0.02) (the reference draws the task embedding from N(0, 1); 0.02 keeps it on the
// scale of the position embedding), CLS 0, norms 1 / 0, head kernels and biases 0,
// uncertainty weights s_t = 1.
#include "model/modsquad.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <map>

#include "model/init.h"
#include "model/layers.h"
#include "model/vit_spec.h"
#include "runtime/kernels.h"
#include "runtime/process.h"

namespace moerun {

struct ModSquadModel::Block {
  int index = 0;
  MoeAttention* attn_layer = nullptr;
  MoeLayer* mlp_layer = nullptr;
  Tensor n1_w, n1_b, n2_w, n2_b, g_n1_w, g_n1_b, g_n2_w, g_n2_b;
  DenseAttentionWeights aw;
  DenseMlpWeights mw;
  // Activations.
  Tensor hin, ln1, mean1, rstd1, qkv, probs, att, attn_out, mid, ln2, mean2, rstd2, hidden, act,
      out;
  void ReleaseActivations() {
    for (Tensor* t : {&hin, &ln1, &mean1, &rstd1, &qkv, &probs, &att, &attn_out, &mid, &ln2, &mean2,
                      &rstd2, &hidden, &act, &out}) {
      *t = Tensor();
    }
  }
};

namespace {

bool EndsWith(const std::string& s, const std::string& suffix) {
  return s.size() >= suffix.size() &&
         s.compare(s.size() - suffix.size(), suffix.size(), suffix) == 0;
}

// The label (or target value) of output element `o` of patch `patch` of an image, in the
// per-patch Dense layout (j, k, c): pixel (gy * P + j, gx * P + k), channel c.
int64_t PixelIndex(int64_t patch, int64_t o, int64_t grid, int64_t p, int64_t channels) {
  const int64_t gy = patch / grid, gx = patch % grid;
  const int64_t c = o % channels, jk = o / channels, j = jk / p, k = jk % p;
  return ((gy * p + j) * grid * p + gx * p + k) * channels + c;
}

}  // namespace

double TaskMetric(const TaskHeadConfig& head, const std::vector<double>& s) {
  if (head.kind() == TaskHeadConfig::SEGMENTATION) {
    const int c = head.outputs();
    double sum = 0;
    int present = 0;
    for (int i = 0; i < c; ++i) {
      if (s[c + i] > 0) {
        sum += s[i] / s[c + i];
        ++present;
      }
    }
    return present > 0 ? sum / present : 0;
  }
  return s[1] > 0 ? s[0] / s[1] : 0;
}

ModSquadModel::~ModSquadModel() = default;

Tensor ModSquadModel::AddDense(const std::string& name, const Shape& shape, bool decay) {
  Param p;
  p.name = name;
  p.decay = decay;
  dense_->Add(name, shape, &p.value, &p.grad);
  params_.push_back(p);
  return p.value;
}

std::shared_ptr<MoeGroups> ModSquadModel::groups(int experts) const {
  auto it = groups_.find(experts);
  return it == groups_.end() ? nullptr : it->second;
}

StatusOr<std::unique_ptr<ModSquadModel>> ModSquadModel::Create(const ModelConfig& c,
                                                               Communicator* world, Device device,
                                                               Communicator* device_world) {
  const ModSquadConfig& ms = c.modsquad();
  MOERUN_RETURN_IF_ERROR(CheckPlacement(c, world->size()));
  if (device != Device::kCPU && world->size() > 1 &&
      (device_world == nullptr || device_world->device() != device)) {
    return Status::Error("a Mod-Squad model on " + std::string(DeviceName(device)) + " over " +
                         std::to_string(world->size()) +
                         " ranks needs a communicator of device memory (NCCL)");
  }
  std::unique_ptr<ModSquadModel> m(new ModSquadModel());
  m->config_ = c;
  m->world_ = world;
  m->device_ = device;
  m->device_world_ = device != Device::kCPU && world->size() > 1 ? device_world : nullptr;
  m->arena_ = Arena(0, device);
  for (int experts : ExpertCounts(c)) {
    auto g = MoeGroups::Create(world, experts, m->device_world_);
    if (!g.ok()) return g.status();
    m->groups_[experts] = *g;
  }
  const int64_t d = c.hidden_size(), p = c.patch_size(), grid = c.image_size() / p;
  m->d_ = d;
  m->heads_ = c.num_heads();
  m->head_dim_ = ms.head_dim();
  m->mlp_ = c.mlp_dim();
  m->patches_ = grid * grid;
  m->tokens_ = m->patches_ + 1;
  m->patch_ones_ = Tensor::Full({m->patches_}, 1.0f).To(device);
  const std::vector<ParamSpec> specs = ModSquadParamSpecs(c);
  int64_t dense_numel = 0, dense_tensors = 0;
  for (const ParamSpec& s : specs) {
    if (s.expert < 0) dense_numel += NumElements(s.shape), ++dense_tensors;
  }
  {
    AllocationLabel label("dense parameters and their gradients (" + std::to_string(dense_numel) +
                          " floats each)");
    m->dense_ = std::make_unique<DenseParamStore>(dense_numel, dense_tensors, device);
  }

  const int tasks = ms.tasks_size();
  const int64_t hidden = ms.expert_hidden() > 0 ? ms.expert_hidden() : c.mlp_dim() / ms.mlp_k();
  CapacityRule rule;
  rule.capacity_factor = ms.capacity_factor();
  rule.multiple_of = ms.multiple_of();
  rule.bpr = ms.bpr();
  // Groups matter only under a capacity; dropless, a rank's tokens are one group.
  rule.group_size =
      ms.capacity_factor() > 0 ? static_cast<int64_t>(ms.group_images()) * m->tokens_ : 0;
  AuxWeights aux;
  aux.mi = ms.mi_weight();
  aux.mi_per_rank = ms.mi_per_rank();

  // Registers the parameters in ModSquadParamSpecs order; MoE tensors live in their layers.
  std::map<std::string, std::pair<Tensor, Tensor>> by_name;
  MoeAttention* attn = nullptr;
  MoeLayer* mlp = nullptr;
  auto expert_view = [](Tensor& t, int local) {
    Tensor v = t.Slice(0, local, local + 1);
    return v.Reshape(Shape(v.shape().begin() + 1, v.shape().end()));
  };
  for (const ParamSpec& s : specs) {
    const Shape shape(s.shape.begin(), s.shape.end());
    if (EndsWith(s.name, "attn.router.weight")) {
      MoeAttentionConfig ac;
      ac.d = static_cast<int>(d);
      ac.head_dim = ms.head_dim();
      ac.num_experts = static_cast<int>(s.shape[1]);
      ac.k = ms.attention_k();
      ac.tasks = tasks;
      ac.capacity = rule;
      ac.aux = aux;
      ac.device = device;
      AllocationLabel label(s.name.substr(0, s.name.rfind(".attn.") + 5) +
                            " (this rank's experts)");
      m->moe_attention_.push_back(std::make_unique<MoeAttention>(ac, m->groups_[ac.num_experts]));
      attn = m->moe_attention_.back().get();
      m->params_.push_back(
          {s.name, attn->params().router_weight, attn->grads().router_weight, false, true});
    } else if (EndsWith(s.name, "attn.kv.weight")) {
      m->params_.push_back(
          {s.name, attn->params().kv_weight, attn->grads().kv_weight, false, true});
    } else if (EndsWith(s.name, "attn.kv.bias")) {
      m->params_.push_back({s.name, attn->params().kv_bias, attn->grads().kv_bias, false, false});
    } else if (EndsWith(s.name, "mlp.router.weight")) {
      MoeLayerConfig lc;
      lc.d = static_cast<int>(d);
      lc.m = static_cast<int>(hidden);
      lc.num_experts = static_cast<int>(s.shape[1]);
      lc.k = ms.mlp_k();
      lc.capacity_factor = rule.capacity_factor;
      lc.multiple_of = rule.multiple_of;
      lc.bpr = rule.bpr;
      lc.group_size = rule.group_size;
      lc.gelu_tanh = c.gelu() == ModelConfig::TANH;
      lc.gate = GateKind::kTaskSoftmax;
      lc.tasks = tasks;
      lc.importance_weight = 0;
      lc.load_weight = 0;
      lc.mi_weight = aux.mi;
      lc.mi_per_rank = aux.mi_per_rank;
      lc.device = device;
      AllocationLabel label(s.name.substr(0, s.name.rfind(".mlp.") + 4) + " (this rank's experts)");
      m->moe_mlp_.push_back(std::make_unique<MoeLayer>(lc, m->groups_[lc.num_experts]));
      mlp = m->moe_mlp_.back().get();
      m->params_.push_back(
          {s.name, mlp->params().router_weight, mlp->grads().router_weight, false, true});
    } else if (s.expert >= 0) {
      const bool in_attention = s.name.find(".attn.experts.") != std::string::npos;
      const MoeGroups& g = *m->groups_[s.num_experts];
      const int local = s.expert - g.first_local_expert();
      if (local < 0 || local >= g.local_experts()) continue;
      Tensor *value = nullptr, *grad = nullptr;
      if (in_attention) {
        const bool q = EndsWith(s.name, "q.weight");
        value = q ? &attn->params().q_weight : &attn->params().o_weight;
        grad = q ? &attn->grads().q_weight : &attn->grads().o_weight;
      } else {
        MoeParams &pv = mlp->params(), &pg = mlp->grads();
        if (EndsWith(s.name, "fc1.weight")) {
          value = &pv.fc1_weight, grad = &pg.fc1_weight;
        } else if (EndsWith(s.name, "fc1.bias")) {
          value = &pv.fc1_bias, grad = &pg.fc1_bias;
        } else if (EndsWith(s.name, "fc2.weight")) {
          value = &pv.fc2_weight, grad = &pg.fc2_weight;
        } else {
          value = &pv.fc2_bias, grad = &pg.fc2_bias;
        }
      }
      m->params_.push_back(
          {s.name, expert_view(*value, local), expert_view(*grad, local), true, s.decay, &g});
    } else {
      m->AddDense(s.name, shape, s.decay);
      by_name[s.name] = {m->params_.back().value, m->params_.back().grad};
    }
  }
  auto get = [&](const std::string& name, Tensor* v, Tensor* g) {
    auto it = by_name.find(name);
    CHECK(it != by_name.end()) << "no parameter " << name;
    *v = it->second.first;
    *g = it->second.second;
  };
  get("patch_embed.proj.weight", &m->patch_w_, &m->patch_gw_);
  get("patch_embed.proj.bias", &m->patch_b_, &m->patch_gb_);
  get("cls_token", &m->cls_, &m->cls_g_);
  get("pos_embed", &m->pos_, &m->pos_g_);
  get("task_embedding", &m->task_emb_, &m->task_emb_g_);
  get("norm.weight", &m->norm_w_, &m->norm_gw_);
  get("norm.bias", &m->norm_b_, &m->norm_gb_);
  get("fc_norm.weight", &m->fc_norm_w_, &m->fc_norm_gw_);
  get("fc_norm.bias", &m->fc_norm_b_, &m->fc_norm_gb_);
  if (ms.uncertainty_weighting())
    get("loss.task_uncertainty", &m->uncertainty_, &m->uncertainty_g_);
  size_t attn_i = 0, mlp_i = 0;
  for (int i = 0; i < c.num_layers(); ++i) {
    auto b = std::make_unique<Block>();
    b->index = i;
    const std::string pre = "blocks." + std::to_string(i) + ".";
    get(pre + "norm1.weight", &b->n1_w, &b->g_n1_w);
    get(pre + "norm1.bias", &b->n1_b, &b->g_n1_b);
    get(pre + "norm2.weight", &b->n2_w, &b->g_n2_w);
    get(pre + "norm2.bias", &b->n2_b, &b->g_n2_b);
    if (ms.moe() && i % 2 == 0) {
      b->attn_layer = m->moe_attention_[attn_i++].get();
    } else {
      get(pre + "attn.qkv.weight", &b->aw.qkv_w, &b->aw.g_qkv_w);
      get(pre + "attn.qkv.bias", &b->aw.qkv_b, &b->aw.g_qkv_b);
      get(pre + "attn.proj.weight", &b->aw.proj_w, &b->aw.g_proj_w);
      get(pre + "attn.proj.bias", &b->aw.proj_b, &b->aw.g_proj_b);
    }
    if (ms.moe() && i % 2 == 1) {
      b->mlp_layer = m->moe_mlp_[mlp_i++].get();
    } else {
      get(pre + "mlp.fc1.weight", &b->mw.fc1_w, &b->mw.g_fc1_w);
      get(pre + "mlp.fc1.bias", &b->mw.fc1_b, &b->mw.g_fc1_b);
      get(pre + "mlp.fc2.weight", &b->mw.fc2_w, &b->mw.g_fc2_w);
      get(pre + "mlp.fc2.bias", &b->mw.fc2_b, &b->mw.g_fc2_b);
    }
    m->blocks_.push_back(std::move(b));
  }
  for (const TaskHeadConfig& t : ms.tasks()) {
    Head h;
    const std::string hp = "heads." + t.name() + ".";
    if (t.kind() == TaskHeadConfig::CLASSIFICATION) {
      get(hp + "norm.weight", &h.norm_w, &h.g_norm_w);
      get(hp + "norm.bias", &h.norm_b, &h.g_norm_b);
    }
    get(hp + "fc.weight", &h.fc_w, &h.g_fc_w);
    get(hp + "fc.bias", &h.fc_b, &h.g_fc_b);
    m->heads_p_.push_back(h);
  }
  for (const ParamSpec& s : BufferSpecs(c)) {
    const int block = std::stoi(s.name.substr(7));
    Block& b = *m->blocks_[block];
    Param buf;
    buf.name = s.name;
    buf.value = b.attn_layer != nullptr && EndsWith(s.name, ".attn.usage") ? b.attn_layer->usage()
                                                                           : b.mlp_layer->usage();
    buf.decay = false;
    m->buffers_.push_back(buf);
  }
  m->dense_grad_flat_ = m->dense_->flat_grads();
  return m;
}

std::vector<MoeAttention*> ModSquadModel::moe_attention_layers() {
  std::vector<MoeAttention*> v;
  for (auto& l : moe_attention_) v.push_back(l.get());
  return v;
}

std::vector<MoeLayer*> ModSquadModel::moe_mlp_layers() {
  std::vector<MoeLayer*> v;
  for (auto& l : moe_mlp_) v.push_back(l.get());
  return v;
}

void ModSquadModel::Init(uint64_t seed) {
  for (Param& p : params_) {
    const std::string& n = p.name;
    InitOnHost(&p.value, [&](Tensor* v) {
      if (n == "cls_token" || (n.rfind("heads.", 0) == 0 && n.find(".fc.") != std::string::npos)) {
        InitParam(n, v, InitKind::kZeros, seed);
      } else if (n == "loss.task_uncertainty") {
        InitParam(n, v, InitKind::kOnes, seed);
      } else if (n == "pos_embed" || n == "task_embedding") {
        InitParam(n, v, InitKind::kNormal, seed, 0.02f);
      } else {
        InitByRole(n, v, seed);
      }
    });
  }
}

void ModSquadModel::ReleaseActivations() {
  for (auto& blk : blocks_) blk->ReleaseActivations();
  for (auto& layer : moe_attention_) layer->ReleaseInput();
  for (auto& layer : moe_mlp_) layer->ReleaseInput();
  patches_in_ = Tensor();
  x0_ = Tensor();
  heads_a_.clear();
}

void ModSquadModel::ZeroGrads() {
  dense_grad_flat_.SetZero();
  for (auto& l : moe_attention_) l->ZeroGradients();
  for (auto& l : moe_mlp_) l->ZeroGradients();
}

void ModSquadModel::SumOverRanks(Tensor* grad) const {
  if (world_->size() == 1) return;
  Communicator* comm = grad->device() == Device::kCPU ? world_ : device_world_;
  CHECK(comm != nullptr && comm->device() == grad->device())
      << "no communicator moves " << DeviceName(grad->device()) << " memory";
  comm->AllReduce(grad->raw_data(), grad->numel(), DType::kF32, ReduceOp::kSum);
}

void ModSquadModel::ReduceGradients() {
  SumOverRanks(&dense_grad_flat_);
  for (auto& l : moe_attention_) {
    // The router's and the shared key / value projection's (each on the model's device).
    for (Tensor* g : {&l->grads().router_weight, &l->grads().kv_weight, &l->grads().kv_bias}) {
      SumOverRanks(g);
    }
    l->ReduceReplicaGradients();
  }
  for (auto& l : moe_mlp_) {
    SumOverRanks(&l->grads().router_weight);
    l->ReduceReplicaGradients();
  }
}

Status ModSquadModel::Forward(const MultiTaskBatch& batch, MultiTaskOutput* out) {
  const ModelConfig& c = config_;
  const ModSquadConfig& ms = c.modsquad();
  const int64_t b = batch.batch, n = tokens_, d = d_, t_count = tasks();
  const int64_t seqs = t_count * b, rows = seqs * n, p = c.patch_size(), task_rows = b * n;
  const int64_t grid = c.image_size() / p, pixels = c.image_size() * c.image_size();
  if (static_cast<int64_t>(batch.labels.size()) != t_count ||
      static_cast<int64_t>(batch.targets.size()) != t_count) {
    return Status::Error("a multi-task batch needs labels / targets for each of the " +
                         std::to_string(t_count) + " tasks");
  }
  batch_ = batch;
  ReleaseActivations();
  arena_.Reset();
  token_task_.resize(rows);
  for (int64_t r = 0; r < rows; ++r) token_task_[r] = static_cast<int32_t>(r / task_rows);
  // Patch embedding (once per image), CLS, position embeddings; the same for every task.
  const int64_t patch_in = c.channels() * p * p;
  patches_in_ = arena_.Allocate({b * patches_, patch_in});
  WithHostFloats(&patches_in_, false, [&](float* patches) {
    ExtractPatches(batch.images, patches, b, c.channels(), c.image_size(), p);
  });
  Tensor emb = arena_.Allocate({b * patches_, d});
  LinearForward(ops(), F(patches_in_), F(patch_w_), F(patch_b_), F(emb), b * patches_, patch_in, d);
  // Sequence q = [cls + pos[0], emb[q % b] + pos[1:]], the same for every task.
  x0_ = arena_.AllocateZeros({rows, d});
  Tensor embed_bias = arena_.Allocate({n * d});
  EmbedSequences(device_, F(cls_), F(pos_), F(emb), b, t_count, n, d, F(embed_bias), F(x0_));
  MoeForwardArgs args;
  args.training = batch.training;
  args.task = token_task_.data();
  Tensor h = x0_;
  out->aux_loss = 0;
  const int64_t hd = heads_ * head_dim_;
  for (auto& blk : blocks_) {
    Block& k = *blk;
    // hin = h + the embedding of the row's task (task t's rows are one contiguous range).
    k.hin = arena_.Allocate({rows, d});
    for (int64_t t = 0; t < t_count; ++t) {
      float* dst = F(k.hin) + t * task_rows * d;
      CopyFloats(device_, dst, F(h) + t * task_rows * d, task_rows * d);
      MOERUN_OP(ops(), add_bias)(dst, F(task_emb_) + t * d, task_rows, d);
    }
    k.ln1 = arena_.Allocate({rows, d});
    k.mean1 = arena_.Allocate({rows});
    k.rstd1 = arena_.Allocate({rows});
    MOERUN_OP(ops(), layer_norm_forward)
    (F(k.hin), F(k.n1_w), F(k.n1_b), F(k.ln1), F(k.mean1), F(k.rstd1), rows, d, kLayerNormEps);
    k.attn_out = arena_.Allocate({rows, d});
    if (k.attn_layer != nullptr) {
      MOERUN_RETURN_IF_ERROR(k.attn_layer->Forward(k.ln1, n, args, &k.attn_out));
      out->aux_loss += k.attn_layer->losses().aux_total;
    } else {
      k.qkv = arena_.Allocate({rows, 3 * hd});
      k.probs = arena_.Allocate({seqs, heads_, n, n});
      k.att = arena_.Allocate({rows, hd});
      DenseAttentionForward(k.aw, F(k.ln1), F(k.qkv), F(k.probs), F(k.att), F(k.attn_out), seqs, n,
                            d, heads_, head_dim_);
    }
    k.mid = arena_.Allocate({rows, d});
    MOERUN_OP(ops(), add)(F(k.attn_out), F(k.hin), F(k.mid), rows * d);
    k.ln2 = arena_.Allocate({rows, d});
    k.mean2 = arena_.Allocate({rows});
    k.rstd2 = arena_.Allocate({rows});
    MOERUN_OP(ops(), layer_norm_forward)
    (F(k.mid), F(k.n2_w), F(k.n2_b), F(k.ln2), F(k.mean2), F(k.rstd2), rows, d, kLayerNormEps);
    k.out = arena_.Allocate({rows, d});
    if (k.mlp_layer != nullptr) {
      MOERUN_RETURN_IF_ERROR(k.mlp_layer->Forward(k.ln2, args, &k.out));
      out->aux_loss += k.mlp_layer->losses().aux_total;
    } else {
      k.hidden = arena_.Allocate({rows, mlp_});
      k.act = arena_.Allocate({rows, mlp_});
      DenseMlpForward(k.mw, F(k.ln2), F(k.hidden), F(k.act), F(k.out), rows, d, mlp_,
                      c.gelu() == ModelConfig::TANH);
    }
    MOERUN_OP(ops(), add)(F(k.out), F(k.mid), F(k.out), rows * d);
    h = k.out;
  }
  // Heads on the device; their losses and metrics on the host.
  heads_a_.assign(t_count, {});
  std::vector<std::vector<double>> sums(t_count);
  const int64_t counted = batch.counted;
  for (int64_t t = 0; t < t_count; ++t) {
    const TaskHeadConfig& head = ms.tasks(static_cast<int>(t));
    const Head& hp = heads_p_[t];
    HeadActivations& a = heads_a_[t];
    const float* ht = F(h) + t * task_rows * d;  // this task's sequences
    const int64_t outs = head.outputs();
    if (head.kind() == TaskHeadConfig::CLASSIFICATION) {
      // Mean of the patch tokens -> fc_norm -> LN -> Dense.
      // pooled[i] = (1/P) ones[1, P] x ht[i, 1:n] ([P, D]), one GEMM per image, batched; on
      // the device's own fp32 table (OpsFor), so train.precision BF16 leaves the mean fp32.
      a.in = arena_.Allocate({b, d});
      float* pooled = F(a.in);
      MOERUN_OP(*OpsFor(device_), gemm_strided_batched)
      (false, false, 1, d, patches_, 1.0f / patches_, F(patch_ones_), patches_, 0, ht + d, d, n * d,
       0.0f, pooled, d, d, b);
      a.norm = arena_.Allocate({b, d});
      a.mean = arena_.Allocate({b});
      a.rstd = arena_.Allocate({b});
      MOERUN_OP(ops(), layer_norm_forward)
      (pooled, F(fc_norm_w_), F(fc_norm_b_), F(a.norm), F(a.mean), F(a.rstd), b, d, kLayerNormEps);
      a.norm2 = arena_.Allocate({b, d});
      a.mean2 = arena_.Allocate({b});
      a.rstd2 = arena_.Allocate({b});
      MOERUN_OP(ops(), layer_norm_forward)
      (F(a.norm), F(hp.norm_w), F(hp.norm_b), F(a.norm2), F(a.mean2), F(a.rstd2), b, d,
       kLayerNormEps);
      a.out = arena_.Allocate({b, outs});
      LinearForward(ops(), F(a.norm2), F(hp.fc_w), F(hp.fc_b), F(a.out), b, d, outs);
      a.out_host = a.out.To(Device::kCPU);
      a.labels = Tensor::Empty({b}, DType::kI32);
      int32_t* lab = a.labels.data<int32_t>();
      for (int64_t i = 0; i < b; ++i) {
        lab[i] = i < counted && batch.labels[t] != nullptr ? batch.labels[t][i] : -1;
        if (lab[i] >= outs) return Status::Error("label out of range for task " + head.name());
      }
      a.probs = Tensor::Empty({b, outs});
      int64_t valid = 0;
      const float* logits = a.out_host.data<float>();
      const float mean = CrossEntropyForward(logits, lab, a.probs.data<float>(), b, outs, &valid);
      double correct = 0;
      for (int64_t i = 0; i < b; ++i) {
        if (lab[i] < 0) continue;
        const float* l = logits + i * outs;
        correct += (std::max_element(l, l + outs) - l) == lab[i];
      }
      sums[t] = {correct, static_cast<double>(valid), static_cast<double>(mean) * valid,
                 static_cast<double>(valid)};
      continue;
    }
    // Dense: norm over the patch tokens -> per token Dense(D -> P*P*outs).
    const int64_t prow = b * patches_, width = p * p * outs;
    a.in = arena_.Allocate({prow, d});
    CopyRows(device_, F(a.in), patches_ * d, ht + d, n * d, patches_ * d, b);
    a.norm = arena_.Allocate({prow, d});
    a.mean = arena_.Allocate({prow});
    a.rstd = arena_.Allocate({prow});
    MOERUN_OP(ops(), layer_norm_forward)
    (F(a.in), F(norm_w_), F(norm_b_), F(a.norm), F(a.mean), F(a.rstd), prow, d, kLayerNormEps);
    a.out = arena_.Allocate({prow, width});
    LinearForward(ops(), F(a.norm), F(hp.fc_w), F(hp.fc_b), F(a.out), prow, d, width);
    a.out_host = a.out.To(Device::kCPU);
    const float* o = a.out_host.data<float>();
    if (head.kind() == TaskHeadConfig::SEGMENTATION) {
      // Labels in the head's (patch, j, k) order; padding images -1.
      const int64_t cells = prow * p * p;
      a.labels = Tensor::Empty({cells}, DType::kI32);
      int32_t* lab = a.labels.data<int32_t>();
      for (int64_t i = 0; i < b; ++i) {
        for (int64_t q = 0; q < patches_; ++q) {
          for (int64_t jk = 0; jk < p * p; ++jk) {
            const int64_t cell = (i * patches_ + q) * p * p + jk;
            lab[cell] =
                i < counted ? batch.labels[t][i * pixels + PixelIndex(q, jk, grid, p, 1)] : -1;
            if (lab[cell] >= outs)
              return Status::Error("label out of range for task " + head.name());
          }
        }
      }
      a.probs = Tensor::Empty({cells, outs});
      int64_t valid = 0;
      const float mean = CrossEntropyForward(o, lab, a.probs.data<float>(), cells, outs, &valid);
      std::vector<double> s(2 * outs + 2, 0.0);
      for (int64_t cell = 0; cell < cells; ++cell) {
        if (lab[cell] < 0) continue;
        const float* l = o + cell * outs;
        const int64_t pred = std::max_element(l, l + outs) - l;
        if (pred == lab[cell]) {
          s[pred] += 1;
          s[outs + pred] += 1;
        } else {
          s[outs + pred] += 1;
          s[outs + lab[cell]] += 1;
        }
      }
      s[2 * outs] = static_cast<double>(mean) * valid;
      s[2 * outs + 1] = static_cast<double>(valid);
      sums[t] = s;
      continue;
    }
    // Regression: L1 against the targets in the head's order.
    a.targets = Tensor::Empty({prow, width});
    float* tg = a.targets.data<float>();
    double abs_sum = 0, values = 0;
    for (int64_t i = 0; i < b; ++i) {
      for (int64_t q = 0; q < patches_; ++q) {
        for (int64_t e = 0; e < width; ++e) {
          const int64_t cell = (i * patches_ + q) * width + e;
          tg[cell] = i < counted
                         ? batch.targets[t][i * pixels * outs + PixelIndex(q, e, grid, p, outs)]
                         : 0.0f;
          if (i < counted) {
            abs_sum += std::fabs(static_cast<double>(o[cell]) - tg[cell]);
            values += 1;
          }
        }
      }
    }
    sums[t] = {abs_sum, values, abs_sum, values};
  }
  // One all-reduce of every task's sums.
  std::vector<double> flat;
  for (const auto& s : sums) flat.insert(flat.end(), s.begin(), s.end());
  world_->AllReduce(flat.data(), static_cast<int64_t>(flat.size()), DType::kF64, ReduceOp::kSum);
  out->tasks.assign(t_count, {});
  task_loss_.assign(t_count, 0.0);
  task_weight_.assign(t_count, 1.0);
  out->task_loss = 0;
  uncertainty_host_ = uncertainty_.defined() ? uncertainty_.To(Device::kCPU) : Tensor();
  const Tensor& uncertainty = uncertainty_host_;
  size_t at = 0;
  for (int64_t t = 0; t < t_count; ++t) {
    TaskResult& r = out->tasks[t];
    r.sums.assign(flat.begin() + at, flat.begin() + at + sums[t].size());
    at += sums[t].size();
    const double loss_count = r.sums[r.sums.size() - 1];
    r.loss = loss_count > 0 ? r.sums[r.sums.size() - 2] / loss_count : 0;
    r.metric = TaskMetric(ms.tasks(static_cast<int>(t)), r.sums);
    task_loss_[t] = r.loss;
    if (uncertainty.defined()) {
      const double s = uncertainty.data<float>()[t];
      task_weight_[t] = 0.5 / (s * s);
      out->task_loss += task_weight_[t] * r.loss + std::log1p(s * s);
    } else {
      out->task_loss += r.loss;
    }
  }
  return Status::Ok();
}

void ModSquadModel::Backward() {
  const ModelConfig& c = config_;
  const ModSquadConfig& ms = c.modsquad();
  const int64_t b = batch_.batch, n = tokens_, d = d_, t_count = tasks();
  const int64_t seqs = t_count * b, rows = seqs * n, p = c.patch_size(), task_rows = b * n;
  const int64_t pixels = c.image_size() * c.image_size();
  const double global = static_cast<double>(std::max<int64_t>(1, batch_.global_counted));
  Tensor dh = arena_.AllocateZeros({rows, d});
  // The dense heads' input gradient spread to the tokens' rows (below): one buffer for every
  // dense task, its CLS rows zero throughout, the others overwritten by each task.
  Tensor spread;
  for (int64_t t = 0; t < t_count; ++t) {
    const TaskHeadConfig& head = ms.tasks(static_cast<int>(t));
    const Head& hp = heads_p_[t];
    HeadActivations& a = heads_a_[t];
    const int64_t outs = head.outputs();
    float* dht = F(dh) + t * task_rows * d;
    const float w = static_cast<float>(task_weight_[t]);
    if (head.kind() == TaskHeadConfig::CLASSIFICATION) {
      Tensor dlogits = arena_.Allocate({b, outs});
      WithHostFloats(&dlogits, false, [&](float* dl) {
        CrossEntropyBackward(a.probs.data<float>(), a.labels.data<int32_t>(), dl, b, outs,
                             static_cast<float>(w / global));
      });
      Tensor d2 = arena_.Allocate({b, d}), d1 = arena_.Allocate({b, d}),
             dp = arena_.Allocate({b, d});
      LinearBackward(ops(), F(a.norm2), F(hp.fc_w), F(dlogits), F(d2), F(hp.g_fc_w), F(hp.g_fc_b),
                     b, d, outs);
      MOERUN_OP(ops(), layer_norm_backward)
      (F(a.norm), F(hp.norm_w), F(a.mean2), F(a.rstd2), F(d2), F(d1), F(hp.g_norm_w),
       F(hp.g_norm_b), b, d);
      MOERUN_OP(ops(), layer_norm_backward)
      (F(a.in), F(fc_norm_w_), F(a.mean), F(a.rstd), F(d1), F(dp), F(fc_norm_gw_), F(fc_norm_gb_),
       b, d);
      // dht[i, 1:n] += (1/P) ones[P, 1] x dp[i] ([1, D]): the pooling's transpose, batched.
      MOERUN_OP(*OpsFor(device_), gemm_strided_batched)
      (false, false, patches_, d, 1, 1.0f / patches_, F(patch_ones_), 1, 0, F(dp), d, d, 1.0f,
       dht + d, d, n * d, b);
      continue;
    }
    const int64_t prow = b * patches_, width = p * p * outs;
    Tensor dout = arena_.Allocate({prow, width});
    if (head.kind() == TaskHeadConfig::SEGMENTATION) {
      WithHostFloats(&dout, false, [&](float* g) {
        CrossEntropyBackward(a.probs.data<float>(), a.labels.data<int32_t>(), g, prow * p * p, outs,
                             static_cast<float>(w / (global * pixels)));
      });
    } else {
      const float* o = a.out_host.data<float>();
      const float* tg = a.targets.data<float>();
      const float scale = static_cast<float>(w / (global * pixels * outs));
      WithHostFloats(&dout, false, [&](float* g) {
        for (int64_t i = 0; i < prow * width; ++i) {
          const bool real = i / (patches_ * width) < batch_.counted;
          g[i] = !real ? 0.0f : o[i] > tg[i] ? scale : o[i] < tg[i] ? -scale : 0.0f;
        }
      });
    }
    Tensor dn = arena_.Allocate({prow, d}), din = arena_.Allocate({prow, d});
    LinearBackward(ops(), F(a.norm), F(hp.fc_w), F(dout), F(dn), F(hp.g_fc_w), F(hp.g_fc_b), prow,
                   d, width);
    MOERUN_OP(ops(), layer_norm_backward)
    (F(a.in), F(norm_w_), F(a.mean), F(a.rstd), F(dn), F(din), F(norm_gw_), F(norm_gb_), prow, d);
    // dht[i, 1:n] += din[i]: din spread to the tokens' rows (the CLS rows zero), then one
    // axpy over the task's rows (the same sums as an axpy per image).
    if (!spread.defined()) spread = arena_.AllocateZeros({b * n, d});
    CopyRows(device_, F(spread) + d, n * d, F(din), patches_ * d, patches_ * d, b);
    MOERUN_OP(ops(), axpy)(1.0f, F(spread), dht, b * n * d);
  }
  // Uncertainty weights: d/ds (0.5 / s^2 L + log(1 + s^2)), this rank's share.
  // With the forward's weights; the step's share is added where the gradient lives.
  if (uncertainty_.defined()) {
    const double ranks = world_->size();
    const float* u = uncertainty_host_.data<float>();
    Tensor share = Tensor::Empty({t_count});
    for (int64_t t = 0; t < t_count; ++t) {
      const double s = u[t];
      share.data<float>()[t] =
          static_cast<float>((-task_loss_[t] / (s * s * s) + 2 * s / (1 + s * s)) / ranks);
    }
    const Tensor here = share.To(device_);
    MOERUN_OP(ops(), axpy)(1.0f, F(here), F(uncertainty_g_), t_count);
  }
  // Blocks in reverse; dh: gradient of the block's output.
  const int64_t hd = heads_ * head_dim_;
  Tensor d_ln = arena_.Allocate({rows, d});
  Tensor d_mid = arena_.Allocate({rows, d});
  Tensor d_tmp = arena_.Allocate({rows, d});
  for (auto it = blocks_.rbegin(); it != blocks_.rend(); ++it) {
    Block& k = **it;
    if (k.mlp_layer != nullptr) {
      k.mlp_layer->Backward(dh, &d_ln);
    } else {
      Tensor d_act = arena_.Allocate({rows, mlp_});
      DenseMlpBackward(k.mw, F(k.ln2), F(k.hidden), F(k.act), F(dh), F(d_act), F(d_ln), rows, d,
                       mlp_, c.gelu() == ModelConfig::TANH);
    }
    MOERUN_OP(ops(), layer_norm_backward)
    (F(k.mid), F(k.n2_w), F(k.mean2), F(k.rstd2), F(d_ln), F(d_mid), F(k.g_n2_w), F(k.g_n2_b), rows,
     d);
    MOERUN_OP(ops(), add)(F(d_mid), F(dh), F(d_mid), rows * d);
    if (k.attn_layer != nullptr) {
      k.attn_layer->Backward(d_mid, &d_ln);
    } else {
      Tensor d_att = arena_.Allocate({rows, hd});
      Tensor d_qkv = arena_.Allocate({rows, 3 * hd});
      DenseAttentionBackward(k.aw, F(k.ln1), F(k.qkv), F(k.probs), F(k.att), F(d_mid), F(d_att),
                             F(d_qkv), F(d_ln), seqs, n, d, heads_, head_dim_);
    }
    MOERUN_OP(ops(), layer_norm_backward)
    (F(k.hin), F(k.n1_w), F(k.mean1), F(k.rstd1), F(d_ln), F(d_tmp), F(k.g_n1_w), F(k.g_n1_b), rows,
     d);
    MOERUN_OP(ops(), add)(F(d_tmp), F(d_mid), F(dh), rows * d);
    // hin = h + task embedding of the row's task: each task's rows sum into its embedding.
    for (int64_t t = 0; t < t_count; ++t) {
      MOERUN_OP(ops(), bias_backward)
      (F(dh) + t * task_rows * d, F(task_emb_g_) + t * d, task_rows, d);
    }
  }
  // Embeddings: x0 = [cls; patches W^T + b] + pos, the same for every task.
  Tensor d_emb = arena_.AllocateZeros({b * patches_, d});
  Tensor sums = arena_.AllocateZeros({n * d});
  AddSequenceSums(device_, F(dh), seqs, n, d, F(sums), F(pos_g_), F(cls_g_));
  // d_emb[i] += dh[t * b + i][1:] task by task (the same order as per sequence): each
  // task's patch rows gathered by one strided copy, then one axpy.
  Tensor task_rows_g = arena_.Allocate({b * patches_, d});
  for (int64_t t = 0; t < t_count; ++t) {
    CopyRows(device_, F(task_rows_g), patches_ * d, F(dh) + t * task_rows * d + d, n * d,
             patches_ * d, b);
    MOERUN_OP(ops(), axpy)(1.0f, F(task_rows_g), F(d_emb), b * patches_ * d);
  }
  const int64_t patch_in = c.channels() * p * p;
  LinearBackward(ops(), F(patches_in_), F(patch_w_), F(d_emb), nullptr, F(patch_gw_), F(patch_gb_),
                 b * patches_, patch_in, d);
}

}  // namespace moerun
