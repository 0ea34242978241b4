// The expert-parallel MoE layer.
#include "model/moe_layer.h"

#include <algorithm>
#include <chrono>
#include <cstring>

#include "model/moe_losses.h"
#include "model/routing.h"
#include "model/vit_spec.h"
#include "runtime/kernels.h"

namespace moerun {
namespace {

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// Adds the seconds since construction to `slot` when it goes out of scope.
class ScopedTimer {
 public:
  explicit ScopedTimer(double* slot) : slot_(slot), start_(Now()) {}
  ~ScopedTimer() { *slot_ += Now() - start_; }

 private:
  double* slot_;
  double start_;
};

// Reallocates `t` when its shape or dtype differs (buffers persist across steps).
void Ensure(Tensor* t, const Shape& shape, DType dtype = DType::kF32) {
  if (!t->defined() || t->shape() != shape || t->dtype() != dtype) *t = Tensor::Empty(shape, dtype);
}

// dst[b][a] = src[a][b] for blocks of `chunk` floats: [A][B][chunk] -> [B][A][chunk].
void SwapBlockAxes(const float* src, float* dst, int64_t a_count, int64_t b_count, int64_t chunk) {
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t a = 0; a < a_count; ++a) {
    for (int64_t b = 0; b < b_count; ++b) {
      std::memcpy(dst + (b * a_count + a) * chunk, src + (a * b_count + b) * chunk,
                  chunk * sizeof(float));
    }
  }
}

// out[t] = sum over kept choices j of weight[t, j] * buf[row[t, j]] (weight null: 1), for
// rows of d floats; row < 0 marks a dropped choice. The combine and the dispatch backward.
void GatherKeptRows(const float* buf, const int32_t* row, const float* weight, int64_t tokens,
                    int64_t k, int64_t d, float* out) {
#pragma omp parallel for schedule(static)
  for (int64_t tok = 0; tok < tokens; ++tok) {
    float* dst = out + tok * d;
    std::fill_n(dst, d, 0.0f);
    for (int64_t j = 0; j < k; ++j) {
      const int64_t i = tok * k + j;
      if (row[i] < 0) continue;
      const float* src = buf + static_cast<int64_t>(row[i]) * d;
      const float g = weight != nullptr ? weight[i] : 1.0f;
      for (int64_t c = 0; c < d; ++c) dst[c] += g * src[c];
    }
  }
}

}  // namespace

MoeLayerConfig MoeLayerConfig::FromProto(const MoeConfig& moe, int d, int m,
                                         int64_t tokens_per_image, bool gelu_tanh) {
  MoeLayerConfig c;
  c.d = d;
  c.m = m;
  c.num_experts = moe.num_experts();
  c.k = moe.k();
  c.capacity_factor = moe.capacity() > 0 ? 0.0 : moe.capacity_factor();
  c.capacity = moe.capacity();
  c.multiple_of = moe.multiple_of();
  c.round = moe.rounding() == MoeConfig::ROUND;
  c.bpr = moe.bpr();
  c.group_size = moe.group_size() > 0 ? moe.group_size() : moe.group_images() * tokens_per_image;
  c.gelu_tanh = gelu_tanh;
  c.noise_std = moe.noise_std();
  c.importance_weight = moe.importance_weight();
  c.load_weight = moe.load_weight();
  c.gshard_weight = moe.gshard_weight();
  c.z_loss_weight = moe.z_loss_weight();
  return c;
}

StatusOr<std::shared_ptr<MoeGroups>> MoeGroups::Create(Communicator* world, int num_experts) {
  const int p = world->size(), r = world->rank();
  auto placement = PlaceExperts(num_experts, p);
  if (!placement.ok()) return placement.status();
  auto g = std::make_shared<MoeGroups>();
  g->world_ = world;
  g->num_experts_ = num_experts;
  g->local_experts_ = placement->experts_per_rank;
  if (placement->replicas == 1) {
    g->first_local_expert_ = r * g->local_experts_;
  } else {
    // Replica set r / E holds every expert once; ranks r and r + E hold the same expert.
    g->first_local_expert_ = r % num_experts;
    g->expert_ = world->Split(r / num_experts, r, "expert_parallel");
    g->replicas_ = world->Split(r % num_experts, r, "expert_replicas");
  }
  return g;
}

MoeLayer::MoeLayer(const MoeLayerConfig& config, std::shared_ptr<MoeGroups> groups)
    : config_(config), groups_(std::move(groups)) {
  CHECK_EQ(config_.num_experts, groups_->num_experts()) << "MoE layer and groups disagree on E";
  CHECK(config_.k >= 1 && config_.k <= config_.num_experts) << "k " << config_.k;
  const int64_t el = groups_->local_experts(), d = config_.d, m = config_.m;
  for (MoeParams* p : {&params_, &grads_}) {
    p->router_weight = Tensor::Zeros({config_.num_experts, d});
    p->fc1_weight = Tensor::Zeros({el, m, d});
    p->fc1_bias = Tensor::Zeros({el, m});
    p->fc2_weight = Tensor::Zeros({el, d, m});
    p->fc2_bias = Tensor::Zeros({el, d});
  }
}

void MoeLayer::ZeroGradients() {
  for (Tensor* t : {&grads_.router_weight, &grads_.fc1_weight, &grads_.fc1_bias, &grads_.fc2_weight,
                    &grads_.fc2_bias}) {
    t->SetZero();
  }
}

void MoeLayer::AllToAll(const Tensor& send, Tensor* recv) {
  Communicator& ep = groups_->expert();
  const int pe = ep.size();
  const int64_t per_peer = send.numel() / pe;
  std::vector<int64_t> counts(pe, per_peer), displs = PrefixDisplacements(counts);
  if (pe == 1) {
    std::memcpy(recv->raw_data(), send.raw_data(), send.nbytes());
    return;
  }
  ep.AllToAllV(send.raw_data(), counts, displs, recv->raw_data(), counts, displs, DType::kF32);
}

Status MoeLayer::Forward(const Tensor& x, const MoeForwardArgs& args, Tensor* y) {
  const int64_t t = x.dim(0), d = config_.d, e_count = config_.num_experts, k = config_.k;
  MOERUN_CHECK_SHAPE(x, {t, d});
  MOERUN_CHECK_SHAPE(*y, {t, d});
  const int64_t s = config_.group_size > 0 ? config_.group_size : t;
  if (s == 0 || t % s != 0) {
    return Status::Error("group_size " + std::to_string(s) + " does not divide the " +
                         std::to_string(t) + " tokens this rank holds; choose a group size " +
                         "that divides the tokens per rank (images per rank x tokens per image)");
  }
  int64_t fixed_capacity = config_.capacity;
  if (fixed_capacity == 0 && config_.capacity_factor > 0) {
    auto cap = ComputeCapacity(s, static_cast<int>(e_count), static_cast<int>(k),
                               config_.capacity_factor, config_.round, config_.multiple_of);
    if (!cap.ok()) return cap.status();
    fixed_capacity = *cap;
  }
  x_ = x;
  tokens_ = t;
  group_size_ = s;
  groups_local_ = t / s;
  const int64_t g_count = groups_local_;
  noisy_ = args.training && config_.noise_std > 0;
  const double sigma = config_.noise_std / e_count;

  // 1. Router: logits, noise, softmax.
  {
    ScopedTimer timer(&timers_.router);
    Ensure(&logits_, {t, e_count});
    // Row-invariant: a token's logits (hence its routing) are bitwise the same for any
    // number of ranks.
    RowInvariantGemmNT(x.data<float>(), params_.router_weight.data<float>(), logits_.data<float>(),
                       t, e_count, d);
    Ensure(&gates_, {t, e_count});
    if (noisy_) {
      Ensure(&noisy_logits_, {t, e_count});
      float* zn = noisy_logits_.data<float>();
      const float* z = logits_.data<float>();
      if (args.noise != nullptr) {
        MOERUN_CHECK_SHAPE(*args.noise, {t, e_count});
        const float* n = args.noise->data<float>();
        for (int64_t i = 0; i < t * e_count; ++i) zn[i] = z[i] + n[i];
      } else {
        StandardNormalNoise(args.noise_key, args.first_token, t, static_cast<int>(e_count), zn);
        for (int64_t i = 0; i < t * e_count; ++i) zn[i] = z[i] + static_cast<float>(sigma) * zn[i];
      }
      SoftmaxForward(zn, gates_.data<float>(), t, e_count);
      Ensure(&clean_gates_, {t, e_count});
      SoftmaxForward(z, clean_gates_.data<float>(), t, e_count);
    } else {
      SoftmaxForward(logits_.data<float>(), gates_.data<float>(), t, e_count);
      clean_gates_ = gates_;
    }
  }

  // 2. Per group: top-k, priority order, slots; capacity; auxiliary losses.
  std::vector<int32_t> load(g_count * e_count);
  double local[4] = {0, 0, 0, 0};  // importance, load, gshard, z summed over local groups
  {
    ScopedTimer timer(&timers_.routing);
    Ensure(&expert_index_, {t, k}, DType::kI32);
    Ensure(&slot_, {t, k}, DType::kI32);
    Ensure(&weight_, {t, k});
    std::vector<int32_t> order;
    for (int64_t g = 0; g < g_count; ++g) {
      const int64_t off = g * s;
      TopK(gates_.data<float>() + off * e_count, s, static_cast<int>(e_count), static_cast<int>(k),
           expert_index_.data<int32_t>() + off * k, weight_.data<float>() + off * k);
      AssignSlots(expert_index_.data<int32_t>() + off * k, weight_.data<float>() + off * k, s,
                  static_cast<int>(e_count), static_cast<int>(k), config_.bpr,
                  slot_.data<int32_t>() + off * k, load.data() + g * e_count, &order);
      const float* zg = logits_.data<float>() + off * e_count;
      local[0] += ImportanceLoss(clean_gates_.data<float>() + off * e_count, s,
                                 static_cast<int>(e_count), nullptr, 0);
      if (noisy_) {
        local[1] += LoadLoss(zg, noisy_logits_.data<float>() + off * e_count, s,
                             static_cast<int>(e_count), static_cast<int>(k), sigma, nullptr, 0);
      }
      local[2] += GShardLoss(gates_.data<float>() + off * e_count, s, static_cast<int>(e_count),
                             nullptr, 0);
      if (config_.z_loss_weight > 0)
        local[3] += ZLoss(zg, s, static_cast<int>(e_count), nullptr, 0);
    }
    if (fixed_capacity > 0) {
      capacity_ = fixed_capacity;
    } else {  // dropless: the largest per-expert load of any group on any rank
      int64_t max_load = *std::max_element(load.begin(), load.end());
      groups_->world().AllReduce(&max_load, 1, DType::kI64, ReduceOp::kMax);
      capacity_ = std::max<int64_t>(max_load, 1);
    }
  }

  // Global losses and metrics: one all_reduce of [4 losses, kept per expert, dropped per k].
  {
    std::vector<double> totals(4 + e_count + k, 0.0);
    std::copy(local, local + 4, totals.begin());
    const int32_t* idx = expert_index_.data<int32_t>();
    const int32_t* sl = slot_.data<int32_t>();
    for (int64_t i = 0; i < t * k; ++i) {
      if (sl[i] < capacity_)
        totals[4 + idx[i]] += 1;
      else
        totals[4 + e_count + i % k] += 1;
    }
    groups_->world().AllReduce(totals.data(), static_cast<int64_t>(totals.size()), DType::kF64,
                               ReduceOp::kSum);
    const double g_total = static_cast<double>(g_count) * groups_->world().size();
    losses_.importance = totals[0] / g_total;
    losses_.load = totals[1] / g_total;
    losses_.gshard = totals[2] / g_total;
    losses_.z = totals[3] / g_total;
    losses_.aux_total = 0;
    if (config_.importance_weight > 0)
      losses_.aux_total += config_.importance_weight * losses_.importance;
    if (config_.load_weight > 0 && noisy_) losses_.aux_total += config_.load_weight * losses_.load;
    if (config_.gshard_weight > 0) losses_.aux_total += config_.gshard_weight * losses_.gshard;
    if (config_.z_loss_weight > 0) losses_.aux_total += config_.z_loss_weight * losses_.z;
    metrics_.capacity = capacity_;
    metrics_.tokens_per_expert.assign(e_count, 0);
    double kept = 0;
    for (int64_t e = 0; e < e_count; ++e) {
      metrics_.tokens_per_expert[e] = static_cast<int64_t>(totals[4 + e]);
      kept += totals[4 + e];
    }
    const double tokens_total = g_total * s;
    metrics_.dropped_fraction.assign(k, 0.0);
    for (int64_t j = 0; j < k; ++j)
      metrics_.dropped_fraction[j] = totals[4 + e_count + j] / tokens_total;
    metrics_.capacity_used = kept / (static_cast<double>(e_count) * capacity_ * g_total);
  }

  // 3. Pack kept tokens into [E, G*cap, D].
  const int64_t rows_per_expert = g_count * capacity_;
  {
    ScopedTimer timer(&timers_.pack);
    Ensure(&row_, {t, k}, DType::kI32);
    Ensure(&dispatch_, {e_count, rows_per_expert, d});
    dispatch_.SetZero();
    const int32_t* idx = expert_index_.data<int32_t>();
    const int32_t* sl = slot_.data<int32_t>();
    int32_t* row = row_.data<int32_t>();
    const float* xs = x.data<float>();
    float* buf = dispatch_.data<float>();
#pragma omp parallel for schedule(static)
    for (int64_t tok = 0; tok < t; ++tok) {
      const int64_t g = tok / s;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t i = tok * k + j;
        if (sl[i] >= capacity_) {
          row[i] = -1;
          continue;
        }
        row[i] = static_cast<int32_t>(idx[i] * rows_per_expert + g * capacity_ + sl[i]);
        std::memcpy(buf + static_cast<int64_t>(row[i]) * d, xs + tok * d, d * sizeof(float));
      }
    }
  }

  // 4. Dispatch to the experts' ranks, run the experts, bring the results back.
  const int64_t pe = groups_->expert().size(), el = groups_->local_experts();
  const int64_t r_rows = pe * rows_per_expert;
  {
    ScopedTimer timer(&timers_.all_to_all);
    Ensure(&recv_, {pe, el, rows_per_expert, d});
    AllToAll(dispatch_, &recv_);
  }
  {
    ScopedTimer timer(&timers_.pack);
    Ensure(&expert_in_, {el, r_rows, d});
    SwapBlockAxes(recv_.data<float>(), expert_in_.data<float>(), pe, el, rows_per_expert * d);
  }
  ExpertForward();
  {
    ScopedTimer timer(&timers_.pack);
    SwapBlockAxes(expert_out_.data<float>(), recv_.data<float>(), el, pe, rows_per_expert * d);
  }
  {
    ScopedTimer timer(&timers_.all_to_all);
    Ensure(&combine_in_, {e_count, rows_per_expert, d});
    AllToAll(recv_, &combine_in_);
  }

  // 5. Combine: y[s] = sum over kept choices of gate * expert output.
  {
    ScopedTimer timer(&timers_.combine);
    GatherKeptRows(combine_in_.data<float>(), row_.data<int32_t>(), weight_.data<float>(), t, k, d,
                   y->data<float>());
  }
  return Status::Ok();
}

void MoeLayer::ExpertForward() {
  const int64_t el = expert_in_.dim(0), r = expert_in_.dim(1), d = config_.d, m = config_.m;
  Ensure(&hidden_, {el, r, m});
  Ensure(&act_, {el, r, m});
  Ensure(&expert_out_, {el, r, d});
  {
    ScopedTimer timer(&timers_.expert);
    GemmStridedBatched(false, true, r, m, d, 1.0f, expert_in_.data<float>(), d, r * d,
                       params_.fc1_weight.data<float>(), d, m * d, 0.0f, hidden_.data<float>(), m,
                       r * m, el);
  }
  {
    ScopedTimer timer(&timers_.expert_act);
    for (int64_t e = 0; e < el; ++e) {
      AddBias(hidden_.data<float>() + e * r * m, params_.fc1_bias.data<float>() + e * m, r, m);
    }
    (config_.gelu_tanh ? GeluTanhForward : GeluForward)(hidden_.data<float>(), act_.data<float>(),
                                                        el * r * m);
  }
  {
    ScopedTimer timer(&timers_.expert);
    GemmStridedBatched(false, true, r, d, m, 1.0f, act_.data<float>(), m, r * m,
                       params_.fc2_weight.data<float>(), m, d * m, 0.0f, expert_out_.data<float>(),
                       d, r * d, el);
  }
  ScopedTimer timer(&timers_.expert_act);
  for (int64_t e = 0; e < el; ++e) {
    AddBias(expert_out_.data<float>() + e * r * d, params_.fc2_bias.data<float>() + e * d, r, d);
  }
}

void MoeLayer::ExpertBackward() {
  const int64_t el = expert_in_.dim(0), r = expert_in_.dim(1), d = config_.d, m = config_.m;
  Ensure(&d_act_, {el, r, m});
  Ensure(&d_expert_in_, {el, r, d});
  {
    ScopedTimer timer(&timers_.bwd_expert_act);
    for (int64_t e = 0; e < el; ++e) {
      BiasBackward(d_expert_out_.data<float>() + e * r * d, grads_.fc2_bias.data<float>() + e * d,
                   r, d);
    }
  }
  {
    ScopedTimer timer(&timers_.bwd_expert);
    // dW2 += dOut^T act; dAct = dOut W2.
    for (int64_t e = 0; e < el; ++e) {
      Gemm(true, false, d, m, r, 1.0f, d_expert_out_.data<float>() + e * r * d, d,
           act_.data<float>() + e * r * m, m, 1.0f, grads_.fc2_weight.data<float>() + e * d * m, m);
    }
    GemmStridedBatched(false, false, r, m, d, 1.0f, d_expert_out_.data<float>(), d, r * d,
                       params_.fc2_weight.data<float>(), m, d * m, 0.0f, d_act_.data<float>(), m,
                       r * m, el);
  }
  {
    ScopedTimer timer(&timers_.bwd_expert_act);
    (config_.gelu_tanh ? GeluTanhBackward : GeluBackward)(
        hidden_.data<float>(), d_act_.data<float>(), d_act_.data<float>(), el * r * m);
    for (int64_t e = 0; e < el; ++e) {
      BiasBackward(d_act_.data<float>() + e * r * m, grads_.fc1_bias.data<float>() + e * m, r, m);
    }
  }
  ScopedTimer timer(&timers_.bwd_expert);
  // dW1 += dH^T x; dX = dH W1.
  for (int64_t e = 0; e < el; ++e) {
    Gemm(true, false, m, d, r, 1.0f, d_act_.data<float>() + e * r * m, m,
         expert_in_.data<float>() + e * r * d, d, 1.0f, grads_.fc1_weight.data<float>() + e * m * d,
         d);
  }
  GemmStridedBatched(false, false, r, d, m, 1.0f, d_act_.data<float>(), m, r * m,
                     params_.fc1_weight.data<float>(), d, m * d, 0.0f, d_expert_in_.data<float>(),
                     d, r * d, el);
}

void MoeLayer::Backward(const Tensor& dy, Tensor* dx) {
  const int64_t t = tokens_, d = config_.d, e_count = config_.num_experts, k = config_.k;
  MOERUN_CHECK_SHAPE(dy, {t, d});
  MOERUN_CHECK_SHAPE(*dx, {t, d});
  const int64_t rows_per_expert = groups_local_ * capacity_;
  const int64_t pe = groups_->expert().size(), el = groups_->local_experts();
  const int32_t* row = row_.data<int32_t>();
  const float* w = weight_.data<float>();
  std::vector<float> d_weight(t * k, 0.0f);

  // 1. Combine backward: d gate = <dy, expert out>; d expert out = gate * dy.
  {
    ScopedTimer timer(&timers_.bwd_combine);
    // dispatch_ is free now: reuse it for d(combine_in).
    dispatch_.SetZero();
    float* dbuf = dispatch_.data<float>();
    const float* out = combine_in_.data<float>();
    const float* dys = dy.data<float>();
#pragma omp parallel for schedule(static)
    for (int64_t tok = 0; tok < t; ++tok) {
      const float* dyt = dys + tok * d;
      for (int64_t j = 0; j < k; ++j) {
        const int64_t i = tok * k + j;
        if (row[i] < 0) continue;
        const float* o = out + static_cast<int64_t>(row[i]) * d;
        float* dst = dbuf + static_cast<int64_t>(row[i]) * d;
        double dot = 0;
        for (int64_t c = 0; c < d; ++c) {
          dot += static_cast<double>(dyt[c]) * o[c];
          dst[c] = w[i] * dyt[c];
        }
        d_weight[i] = static_cast<float>(dot);
      }
    }
  }
  {
    ScopedTimer timer(&timers_.bwd_all_to_all);
    AllToAll(dispatch_, &recv_);
  }
  {
    ScopedTimer timer(&timers_.bwd_pack);
    Ensure(&d_expert_out_, {el, pe * rows_per_expert, d});
    SwapBlockAxes(recv_.data<float>(), d_expert_out_.data<float>(), pe, el, rows_per_expert * d);
  }
  ExpertBackward();
  {
    ScopedTimer timer(&timers_.bwd_pack);
    SwapBlockAxes(d_expert_in_.data<float>(), recv_.data<float>(), el, pe, rows_per_expert * d);
  }
  {
    ScopedTimer timer(&timers_.bwd_all_to_all);
    AllToAll(recv_, &dispatch_);
  }

  // 2. Dispatch backward: dx[s] = sum over kept choices of d(dispatched row).
  {
    ScopedTimer timer(&timers_.bwd_dispatch);
    GatherKeptRows(dispatch_.data<float>(), row, nullptr, t, k, d, dx->data<float>());
  }

  // 3. Router backward: gates (combine weights and losses) -> logits -> W_r and x.
  {
    ScopedTimer timer(&timers_.bwd_router);
    const double g_total = static_cast<double>(groups_local_) * groups_->world().size();
    const double sigma = config_.noise_std / e_count;
    const int e = static_cast<int>(e_count), kk = static_cast<int>(k);
    Ensure(&d_gates_, {t, e_count});
    d_gates_.SetZero();
    float* dg = d_gates_.data<float>();
    const int32_t* idx = expert_index_.data<int32_t>();
    for (int64_t i = 0; i < t * k; ++i) {
      if (row[i] >= 0) dg[(i / k) * e_count + idx[i]] += d_weight[i];
    }
    float* dclean = dg;
    if (noisy_) {
      Ensure(&d_clean_gates_, {t, e_count});
      d_clean_gates_.SetZero();
      dclean = d_clean_gates_.data<float>();
    }
    for (int64_t g = 0; g < groups_local_; ++g) {
      const int64_t off = g * group_size_ * e_count;
      if (config_.importance_weight > 0) {
        ImportanceLoss(clean_gates_.data<float>() + off, group_size_, e, dclean + off,
                       config_.importance_weight / g_total);
      }
      if (config_.gshard_weight > 0) {
        GShardLoss(gates_.data<float>() + off, group_size_, e, dg + off,
                   config_.gshard_weight / g_total);
      }
    }
    Ensure(&d_logits_, {t, e_count});
    float* dz = d_logits_.data<float>();
    SoftmaxBackward(gates_.data<float>(), dg, dz, t, e_count);
    if (noisy_) {
      // The clean softmax's gradient adds to the same logits.
      SoftmaxBackward(clean_gates_.data<float>(), dclean, dclean, t, e_count);
      Axpy(1.0f, dclean, dz, t * e_count);
    }
    for (int64_t g = 0; g < groups_local_; ++g) {
      const int64_t off = g * group_size_ * e_count;
      if (noisy_ && config_.load_weight > 0) {
        LoadLoss(logits_.data<float>() + off, noisy_logits_.data<float>() + off, group_size_, e, kk,
                 sigma, dz + off, config_.load_weight / g_total);
      }
      if (config_.z_loss_weight > 0) {
        ZLoss(logits_.data<float>() + off, group_size_, e, dz + off,
              config_.z_loss_weight / g_total);
      }
    }
    // dW_r += dz^T x; dx += dz W_r.
    Gemm(true, false, e_count, d, t, 1.0f, dz, e_count, x_.data<float>(), d, 1.0f,
         grads_.router_weight.data<float>(), d);
    Gemm(false, false, t, d, e_count, 1.0f, dz, e_count, params_.router_weight.data<float>(), d,
         1.0f, dx->data<float>(), d);
  }
}

void MoeLayer::ReduceReplicaGradients() {
  Communicator* replicas = groups_->replicas();
  if (replicas == nullptr || replicas->size() == 1) return;
  for (Tensor* g : {&grads_.fc1_weight, &grads_.fc1_bias, &grads_.fc2_weight, &grads_.fc2_bias}) {
    replicas->AllReduce(g->raw_data(), g->numel(), DType::kF32, ReduceOp::kSum);
  }
}

}  // namespace moerun
