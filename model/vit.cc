// ViT / V-MoE forward and backward.
//
// Initialisation (as the ViT / V-MoE reference code does it, normal in place of truncated
// normal): patch embedding and pre-logits kernels lecun-normal (std sqrt(1/fan_in)), their
// biases 0; attention and MLP / expert kernels xavier-uniform (limit sqrt(6/(in+out))),
// attention biases 0, MLP biases normal(1e-6); router kernels lecun-normal; position
// embeddings normal(0.02); CLS token 0; layer norms 1 and 0; head kernel and bias 0.
#include "model/vit.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <random>

#include "model/init.h"
#include "model/layers.h"
#include "model/vit_spec.h"
#include "runtime/backend.h"
#include "runtime/hash.h"
#include "runtime/kernels.h"
#include "runtime/process.h"

namespace moerun {

struct VitModel::Block {
  bool moe = false;
  MoeLayer* moe_layer = nullptr;
  int index = 0;
  Tensor n1_w, n1_b, n2_w, n2_b, g_n1_w, g_n1_b, g_n2_w, g_n2_b;
  DenseAttentionWeights aw;
  DenseMlpWeights mw;
  // Activations.
  Tensor ln1, mean1, rstd1, qkv, probs, attn, mid, ln2, mean2, rstd2, hidden, act, out;
  void ReleaseActivations() {
    for (Tensor* t : {&ln1, &mean1, &rstd1, &qkv, &probs, &attn, &mid, &ln2, &mean2, &rstd2,
                      &hidden, &act, &out}) {
      *t = Tensor();
    }
  }
};

VitModel::~VitModel() = default;

float* VitModel::F(const Tensor& t) const { return t.device_data<float>(device_); }

void VitModel::CopyFloats(float* dst, const float* src, int64_t n) const {
  moerun::CopyFloats(device_, dst, src, n);
}

void VitModel::OnHost(Tensor* t, bool read, const std::function<void(float*)>& f) const {
  WithHostFloats(t, read, f);
}

Tensor VitModel::AddDense(const std::string& name, const Shape& shape, bool decay) {
  Param p;
  p.name = name;
  p.decay = decay;
  dense_->Add(name, shape, &p.value, &p.grad);
  params_.push_back(p);
  return p.value;
}

StatusOr<std::unique_ptr<VitModel>> VitModel::Create(const ModelConfig& c,
                                                     std::shared_ptr<MoeGroups> groups,
                                                     Device device) {
  std::unique_ptr<VitModel> m(new VitModel());
  m->config_ = c;
  m->device_ = device;
  m->arena_ = Arena(0, device);
  m->groups_ = groups;
  const int64_t d = c.hidden_size(), p = c.patch_size(), grid = c.image_size() / p;
  m->d_ = d;
  m->heads_ = c.num_heads();
  m->head_dim_ = d / c.num_heads();
  m->mlp_ = c.mlp_dim();
  m->patches_ = grid * grid;
  m->tokens_ = m->patches_ + 1;
  if (c.has_moe() && groups == nullptr) return Status::Error("MoE model without MoE groups");
  const ParameterCounts counts = CountParameters(c);
  const int64_t tensors = 16 * (c.num_layers() + 2);
  {
    AllocationLabel label("dense parameters and their gradients (" + std::to_string(counts.dense) +
                          " floats each)");
    m->dense_ = std::make_unique<DenseParamStore>(counts.dense, tensors, device);
  }

  // The gradient of the parameter AddDense just made.
  auto last_grad = [&] { return m->params_.back().grad; };
  m->patch_w_ = m->AddDense("patch_embed.proj.weight", {d, c.channels(), p, p}, true);
  m->patch_gw_ = last_grad();
  m->patch_b_ = m->AddDense("patch_embed.proj.bias", {d}, false);
  m->patch_gb_ = last_grad();
  m->cls_ = m->AddDense("cls_token", {1, 1, d}, false);
  m->cls_g_ = last_grad();
  m->pos_ = m->AddDense("pos_embed", {1, m->tokens_, d}, false);
  m->pos_g_ = last_grad();
  for (int i = 0; i < c.num_layers(); ++i) {
    auto b = std::make_unique<Block>();
    b->index = i;
    const std::string pre = "blocks." + std::to_string(i) + ".";
    b->n1_w = m->AddDense(pre + "norm1.weight", {d}, false);
    b->g_n1_w = last_grad();
    b->n1_b = m->AddDense(pre + "norm1.bias", {d}, false);
    b->g_n1_b = last_grad();
    b->aw.qkv_w = m->AddDense(pre + "attn.qkv.weight", {3 * d, d}, true);
    b->aw.g_qkv_w = last_grad();
    b->aw.qkv_b = m->AddDense(pre + "attn.qkv.bias", {3 * d}, false);
    b->aw.g_qkv_b = last_grad();
    b->aw.proj_w = m->AddDense(pre + "attn.proj.weight", {d, d}, true);
    b->aw.g_proj_w = last_grad();
    b->aw.proj_b = m->AddDense(pre + "attn.proj.bias", {d}, false);
    b->aw.g_proj_b = last_grad();
    b->n2_w = m->AddDense(pre + "norm2.weight", {d}, false);
    b->g_n2_w = last_grad();
    b->n2_b = m->AddDense(pre + "norm2.bias", {d}, false);
    b->g_n2_b = last_grad();
    b->moe = IsMoeBlock(c, i);
    if (b->moe) {
      AllocationLabel label(pre + "mlp (the " + std::to_string(groups->local_experts()) +
                            " experts of this rank, their gradients and buffers)");
      MoeLayerConfig lc = MoeLayerConfig::FromProto(c.moe(), static_cast<int>(d), c.mlp_dim(),
                                                    m->tokens_, c.gelu() == ModelConfig::TANH);
      lc.device = device;
      auto layer = std::make_unique<MoeLayer>(lc, groups);
      MoeParams& lp = layer->params();
      MoeParams& lg = layer->grads();
      m->params_.push_back(
          {pre + "mlp.router.weight", lp.router_weight, lg.router_weight, false, true});
      const int el = groups->local_experts(), e0 = groups->first_local_expert();
      for (int e = 0; e < el; ++e) {
        const std::string ep = pre + "mlp.experts." + std::to_string(e0 + e) + ".";
        const std::pair<const char*, std::pair<Tensor*, Tensor*>> parts[] = {
            {"fc1.weight", {&lp.fc1_weight, &lg.fc1_weight}},
            {"fc1.bias", {&lp.fc1_bias, &lg.fc1_bias}},
            {"fc2.weight", {&lp.fc2_weight, &lg.fc2_weight}},
            {"fc2.bias", {&lp.fc2_bias, &lg.fc2_bias}}};
        for (const auto& [suffix, tensors] : parts) {
          Tensor v = tensors.first->Slice(0, e, e + 1);
          Tensor g = tensors.second->Slice(0, e, e + 1);
          Shape shape(v.shape().begin() + 1, v.shape().end());
          m->params_.push_back({ep + suffix, v.Reshape(shape), g.Reshape(shape), true,
                                std::string(suffix).find("weight") != std::string::npos});
        }
      }
      b->moe_layer = layer.get();
      m->moe_.push_back(std::move(layer));
    } else {
      b->mw.fc1_w = m->AddDense(pre + "mlp.fc1.weight", {c.mlp_dim(), d}, true);
      b->mw.g_fc1_w = last_grad();
      b->mw.fc1_b = m->AddDense(pre + "mlp.fc1.bias", {c.mlp_dim()}, false);
      b->mw.g_fc1_b = last_grad();
      b->mw.fc2_w = m->AddDense(pre + "mlp.fc2.weight", {d, c.mlp_dim()}, true);
      b->mw.g_fc2_w = last_grad();
      b->mw.fc2_b = m->AddDense(pre + "mlp.fc2.bias", {d}, false);
      b->mw.g_fc2_b = last_grad();
    }
    m->blocks_.push_back(std::move(b));
  }
  m->norm_w_ = m->AddDense("norm.weight", {d}, false);
  m->norm_gw_ = last_grad();
  m->norm_b_ = m->AddDense("norm.bias", {d}, false);
  m->norm_gb_ = last_grad();
  int64_t head_in = d;
  if (c.pre_logits_size() > 0) {
    m->pre_w_ = m->AddDense("pre_logits.fc.weight", {c.pre_logits_size(), d}, true);
    m->pre_gw_ = last_grad();
    m->pre_b_ = m->AddDense("pre_logits.fc.bias", {c.pre_logits_size()}, false);
    m->pre_gb_ = last_grad();
    head_in = c.pre_logits_size();
  }
  m->head_w_ = m->AddDense("head.weight", {c.num_classes(), head_in}, true);
  m->head_gw_ = last_grad();
  m->head_b_ = m->AddDense("head.bias", {c.num_classes()}, false);
  m->head_gb_ = last_grad();
  m->dense_grad_flat_ = m->dense_->flat_grads();
  return m;
}

std::vector<MoeLayer*> VitModel::moe_layers() {
  std::vector<MoeLayer*> v;
  for (auto& l : moe_) v.push_back(l.get());
  return v;
}

std::vector<int> VitModel::moe_blocks() const { return MoeBlocks(config_); }

void VitModel::Init(uint64_t seed) {
  for (Param& p : params_) {
    const std::string& n = p.name;
    // On a device: initialised on the host, then copied (the same numbers as on the CPU).
    InitOnHost(&p.value, [&](Tensor* v) {
      if (n == "cls_token" || n.rfind("head.", 0) == 0) {
        InitParam(n, v, InitKind::kZeros, seed);
      } else if (n == "pos_embed") {
        InitParam(n, v, InitKind::kNormal, seed, 0.02f);
      } else if (n == "pre_logits.fc.weight") {
        InitParam(n, v, InitKind::kLecunNormal, seed);
      } else {
        InitByRole(n, v, seed);
      }
    });
  }
}

void VitModel::ReleaseActivations() {
  for (auto& blk : blocks_) blk->ReleaseActivations();
  for (auto& layer : moe_) layer->ReleaseInput();
  for (Tensor* t : {&patches_in_, &x0_, &cls_rows_, &cls_norm_, &norm_mean_, &norm_rstd_, &pre_out_,
                    &logits_, &probs_}) {
    *t = Tensor();
  }
  block_inputs_.clear();
}

void VitModel::ZeroGrads() {
  dense_grad_flat_.SetZero();
  for (auto& l : moe_) l->ZeroGradients();
}

Status VitModel::Forward(const VitBatch& batch, VitOutput* out) {
  const ModelConfig& c = config_;
  const int64_t b = batch.batch, n = tokens_, d = d_, rows = b * n;
  batch_ = batch;
  labels_ = batch.labels;
  ReleaseActivations();  // so that the arena can merge the blocks a larger step added
  arena_.Reset();
  // Patch embedding, CLS, position embeddings.
  const int64_t patch_in = c.channels() * c.patch_size() * c.patch_size();
  patches_in_ = arena_.Allocate({b * patches_, patch_in});
  OnHost(&patches_in_, false, [&](float* patches) {
    ExtractPatches(batch.images, patches, b, c.channels(), c.image_size(), c.patch_size());
  });
  Tensor emb = arena_.Allocate({b * patches_, d});
  LinearForward(ops(), F(patches_in_), F(patch_w_), F(patch_b_), F(emb), b * patches_, patch_in, d);
  // x[i] = [cls + pos[0], emb[i] + pos[1:]].
  x0_ = arena_.AllocateZeros({rows, d});
  Tensor embed_bias = arena_.Allocate({n * d});
  EmbedSequences(device_, F(cls_), F(pos_), F(emb), b, 1, n, d, F(embed_bias), F(x0_));
  // Blocks.
  Tensor h = x0_;
  out->aux_loss = 0;
  for (auto& blk : blocks_) {
    Block& k = *blk;
    k.ln1 = arena_.Allocate({rows, d});
    k.mean1 = arena_.Allocate({rows});
    k.rstd1 = arena_.Allocate({rows});
    MOERUN_OP(ops(), layer_norm_forward)
    (F(h), F(k.n1_w), F(k.n1_b), F(k.ln1), F(k.mean1), F(k.rstd1), rows, d, kLayerNormEps);
    k.qkv = arena_.Allocate({rows, 3 * d});
    k.probs = arena_.Allocate({b, heads_, n, n});
    k.attn = arena_.Allocate({rows, d});
    k.mid = arena_.Allocate({rows, d});
    DenseAttentionForward(k.aw, F(k.ln1), F(k.qkv), F(k.probs), F(k.attn), F(k.mid), b, n, d,
                          heads_, head_dim_);
    MOERUN_OP(ops(), add)(F(k.mid), F(h), F(k.mid), rows * d);
    k.ln2 = arena_.Allocate({rows, d});
    k.mean2 = arena_.Allocate({rows});
    k.rstd2 = arena_.Allocate({rows});
    MOERUN_OP(ops(), layer_norm_forward)
    (F(k.mid), F(k.n2_w), F(k.n2_b), F(k.ln2), F(k.mean2), F(k.rstd2), rows, d, kLayerNormEps);
    k.out = arena_.Allocate({rows, d});
    if (k.moe) {
      MoeForwardArgs args;
      args.training = batch.training;
      args.first_token = batch.first_image * n;
      args.noise_key = {batch.seed, batch.step, static_cast<uint32_t>(k.index)};
      if (batch.routed_images >= 0) {
        routed_.assign(rows, 0);
        std::fill_n(routed_.begin(), batch.routed_images * n, 1);
        args.routed = routed_.data();
      }
      MOERUN_RETURN_IF_ERROR(k.moe_layer->Forward(k.ln2, args, &k.out));
      out->aux_loss += k.moe_layer->losses().aux_total;
    } else {
      k.hidden = arena_.Allocate({rows, mlp_});
      k.act = arena_.Allocate({rows, mlp_});
      DenseMlpForward(k.mw, F(k.ln2), F(k.hidden), F(k.act), F(k.out), rows, d, mlp_,
                      config_.gelu() == ModelConfig::TANH);
    }
    MOERUN_OP(ops(), add)(F(k.out), F(k.mid), F(k.out), rows * d);
    h = k.out;
  }
  // Final norm on the CLS rows only (the only rows the head reads), pre-logits, head.
  cls_rows_ = arena_.Allocate({b, d});
  moerun::CopyRows(device_, F(cls_rows_), d, F(h), n * d, d, b);
  cls_norm_ = arena_.Allocate({b, d});
  norm_mean_ = arena_.Allocate({b});
  norm_rstd_ = arena_.Allocate({b});
  MOERUN_OP(ops(), layer_norm_forward)
  (F(cls_rows_), F(norm_w_), F(norm_b_), F(cls_norm_), F(norm_mean_), F(norm_rstd_), b, d,
   kLayerNormEps);
  Tensor head_in = cls_norm_;
  int64_t head_dim = d;
  if (c.pre_logits_size() > 0) {
    head_dim = c.pre_logits_size();
    pre_out_ = arena_.Allocate({b, head_dim});
    LinearForward(ops(), F(cls_norm_), F(pre_w_), F(pre_b_), F(pre_out_), b, d, head_dim);
    MOERUN_OP(ops(), tanh_forward)(F(pre_out_), F(pre_out_), b * head_dim);
    head_in = pre_out_;
  }
  logits_ = arena_.Allocate({b, c.num_classes()});
  LinearForward(ops(), F(head_in), F(head_w_), F(head_b_), F(logits_), b, head_dim,
                c.num_classes());
  // The loss and accuracy on the host ([b, classes]: small).
  const Tensor logits = device_ == Device::kCPU ? logits_ : logits_.To(Device::kCPU);
  probs_ = Tensor::Empty({b, c.num_classes()});
  out->loss_sum = 0;
  out->correct = 0;
  out->counted = 0;
  if (batch.labels != nullptr) {
    int64_t valid = 0;
    const float mean = CrossEntropyForward(logits.data<float>(), batch.labels, probs_.data<float>(),
                                           b, c.num_classes(), &valid);
    out->loss_sum = static_cast<double>(mean) * valid;
    out->counted = valid;
    for (int64_t i = 0; i < b; ++i) {
      if (batch.labels[i] < 0) continue;
      const float* l = logits.data<float>() + i * c.num_classes();
      out->correct += (std::max_element(l, l + c.num_classes()) - l) == batch.labels[i];
    }
  }
  return Status::Ok();
}

void VitModel::Backward() {
  const ModelConfig& c = config_;
  const int64_t b = batch_.batch, n = tokens_, d = d_, rows = b * n, classes = c.num_classes();
  CHECK(labels_ != nullptr) << "Backward needs a labelled forward";
  Tensor dlogits = arena_.Allocate({b, classes});
  OnHost(&dlogits, false, [&](float* dl) {
    CrossEntropyBackward(probs_.data<float>(), labels_, dl, b, classes,
                         1.0f / static_cast<float>(batch_.global_batch));
  });
  // Head and pre-logits.
  Tensor d_head_in;
  Tensor d_cls_norm = arena_.Allocate({b, d});
  if (c.pre_logits_size() > 0) {
    const int64_t pd = c.pre_logits_size();
    d_head_in = arena_.Allocate({b, pd});
    LinearBackward(ops(), F(pre_out_), F(head_w_), F(dlogits), F(d_head_in), F(head_gw_),
                   F(head_gb_), b, pd, classes);
    float* dh = F(d_head_in);
    MOERUN_OP(ops(), tanh_backward)(F(pre_out_), dh, dh, b * pd);
    LinearBackward(ops(), F(cls_norm_), F(pre_w_), dh, F(d_cls_norm), F(pre_gw_), F(pre_gb_), b, d,
                   pd);
  } else {
    LinearBackward(ops(), F(cls_norm_), F(head_w_), F(dlogits), F(d_cls_norm), F(head_gw_),
                   F(head_gb_), b, d, classes);
  }
  Tensor d_cls = arena_.Allocate({b, d});
  MOERUN_OP(ops(), layer_norm_backward)
  (F(cls_rows_), F(norm_w_), F(norm_mean_), F(norm_rstd_), F(d_cls_norm), F(d_cls), F(norm_gw_),
   F(norm_gb_), b, d);
  Tensor dx = arena_.AllocateZeros({rows, d});
  moerun::CopyRows(device_, F(dx), n * d, F(d_cls), d, d, b);
  // Blocks in reverse. dx: gradient of the block's output.
  Tensor d_ln = arena_.Allocate({rows, d});
  Tensor d_mid = arena_.Allocate({rows, d});
  Tensor d_qkv = arena_.Allocate({rows, 3 * d});
  Tensor d_attn = arena_.Allocate({rows, d});
  Tensor d_tmp = arena_.Allocate({rows, d});
  for (auto it = blocks_.rbegin(); it != blocks_.rend(); ++it) {
    Block& k = **it;
    const Tensor& input = k.index == 0 ? x0_ : blocks_[k.index - 1]->out;
    // MLP / MoE: out = mid + mlp(ln2(mid)).
    if (k.moe) {
      k.moe_layer->Backward(dx, &d_ln);
    } else {
      Tensor d_act = arena_.Allocate({rows, mlp_});
      DenseMlpBackward(k.mw, F(k.ln2), F(k.hidden), F(k.act), F(dx), F(d_act), F(d_ln), rows, d,
                       mlp_, config_.gelu() == ModelConfig::TANH);
    }
    MOERUN_OP(ops(), layer_norm_backward)
    (F(k.mid), F(k.n2_w), F(k.mean2), F(k.rstd2), F(d_ln), F(d_mid), F(k.g_n2_w), F(k.g_n2_b), rows,
     d);
    MOERUN_OP(ops(), add)(F(d_mid), F(dx), F(d_mid), rows * d);
    // Attention: mid = input + proj(attn(ln1(input))).
    DenseAttentionBackward(k.aw, F(k.ln1), F(k.qkv), F(k.probs), F(k.attn), F(d_mid), F(d_attn),
                           F(d_qkv), F(d_ln), b, n, d, heads_, head_dim_);
    MOERUN_OP(ops(), layer_norm_backward)
    (F(input), F(k.n1_w), F(k.mean1), F(k.rstd1), F(d_ln), F(d_tmp), F(k.g_n1_w), F(k.g_n1_b), rows,
     d);
    MOERUN_OP(ops(), add)(F(d_tmp), F(d_mid), F(dx), rows * d);
  }
  // Embeddings: x0 = [cls; patches W^T + b] + pos.
  const float* g = F(dx);
  float* gpos = F(pos_g_);
  float* gcls = F(cls_g_);
  Tensor d_emb = arena_.Allocate({b * patches_, d});
  Tensor sums = arena_.AllocateZeros({n * d});
  AddSequenceSums(device_, g, b, n, d, F(sums), gpos, gcls);
  moerun::CopyRows(device_, F(d_emb), patches_ * d, g + d, n * d, patches_ * d, b);
  const int64_t patch_in = c.channels() * c.patch_size() * c.patch_size();
  LinearBackward(ops(), F(patches_in_), F(patch_w_), F(d_emb), nullptr, F(patch_gw_), F(patch_gb_),
                 b * patches_, patch_in, d);
}

}  // namespace moerun
