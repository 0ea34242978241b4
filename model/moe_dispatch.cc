// Pack, all-to-all and combine of routed rows.
#include "model/moe_dispatch.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <vector>

#include "model/moe_layer.h"

namespace moerun {
namespace {

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
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

}  // namespace

ScopedTimer::ScopedTimer(double* slot) : slot_(slot), start_(Now()) {}
ScopedTimer::~ScopedTimer() { *slot_ += Now() - start_; }

void EnsureTensor(Tensor* t, const Shape& shape, DType dtype) {
  if (!t->defined() || t->shape() != shape || t->dtype() != dtype) *t = Tensor::Empty(shape, dtype);
}

void PackRows(const RoutingPlan& plan, const float* x, int64_t w, Tensor* buf) {
  const int64_t t = plan.tokens, k = plan.k;
  EnsureTensor(buf, {plan.num_experts, plan.rows_per_expert(), w});
  buf->SetZero();
  const int32_t* row = plan.row.data<int32_t>();
  float* dst = buf->data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t tok = 0; tok < t; ++tok) {
    for (int64_t j = 0; j < k; ++j) {
      const int32_t r = row[tok * k + j];
      if (r >= 0) std::memcpy(dst + static_cast<int64_t>(r) * w, x + tok * w, w * sizeof(float));
    }
  }
}

void GatherKeptRows(const float* buf, const int32_t* row, const float* weight, int64_t tokens,
                    int64_t k, int64_t w, float* out) {
#pragma omp parallel for schedule(static)
  for (int64_t tok = 0; tok < tokens; ++tok) {
    float* dst = out + tok * w;
    std::fill_n(dst, w, 0.0f);
    for (int64_t j = 0; j < k; ++j) {
      const int64_t i = tok * k + j;
      if (row[i] < 0) continue;
      const float* src = buf + static_cast<int64_t>(row[i]) * w;
      const float g = weight != nullptr ? weight[i] : 1.0f;
      for (int64_t c = 0; c < w; ++c) dst[c] += g * src[c];
    }
  }
}

void GatherKeptRowsBackward(const float* buf, const int32_t* row, const float* weight,
                            const float* dy, int64_t tokens, int64_t k, int64_t w, Tensor* d_buf,
                            float* d_weight) {
  d_buf->SetZero();
  float* dbuf = d_buf->data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t tok = 0; tok < tokens; ++tok) {
    const float* dyt = dy + tok * w;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t i = tok * k + j;
      d_weight[i] = 0.0f;
      if (row[i] < 0) continue;
      const float* o = buf + static_cast<int64_t>(row[i]) * w;
      float* dst = dbuf + static_cast<int64_t>(row[i]) * w;
      double dot = 0;
      for (int64_t c = 0; c < w; ++c) {
        dot += static_cast<double>(dyt[c]) * o[c];
        dst[c] = weight[i] * dyt[c];
      }
      d_weight[i] = static_cast<float>(dot);
    }
  }
}

void ScatterChoiceRows(const RoutingPlan& plan, const float* src, int64_t w, Tensor* buf) {
  const int64_t n = plan.tokens * plan.k;
  EnsureTensor(buf, {plan.num_experts, plan.rows_per_expert(), w});
  buf->SetZero();
  const int32_t* row = plan.row.data<int32_t>();
  float* dst = buf->data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    if (row[i] >= 0)
      std::memcpy(dst + static_cast<int64_t>(row[i]) * w, src + i * w, w * sizeof(float));
  }
}

void GatherChoiceRows(const RoutingPlan& plan, const Tensor& buf, int64_t w, float* dst) {
  const int64_t n = plan.tokens * plan.k;
  const int32_t* row = plan.row.data<int32_t>();
  const float* src = buf.data<float>();
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; ++i) {
    if (row[i] >= 0) {
      std::memcpy(dst + i * w, src + static_cast<int64_t>(row[i]) * w, w * sizeof(float));
    } else {
      std::fill_n(dst + i * w, w, 0.0f);
    }
  }
}

void Dispatcher::AllToAll(const Tensor& send, Tensor* recv) {
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

void Dispatcher::ToExperts(const Tensor& send, Tensor* recv, double* a2a, double* pack) {
  const int64_t pe = groups_->expert().size(), el = groups_->local_experts();
  const int64_t r = send.dim(1), w = send.dim(2);
  {
    ScopedTimer timer(a2a);
    EnsureTensor(&staging_, {pe, el, r, w});
    AllToAll(send, &staging_);
  }
  ScopedTimer timer(pack);
  EnsureTensor(recv, {el, pe * r, w});
  SwapBlockAxes(staging_.data<float>(), recv->data<float>(), pe, el, r * w);
}

void Dispatcher::FromExperts(const Tensor& send, Tensor* recv, double* a2a, double* pack) {
  const int64_t pe = groups_->expert().size(), el = groups_->local_experts();
  const int64_t r = send.dim(1) / pe, w = send.dim(2);
  {
    ScopedTimer timer(pack);
    EnsureTensor(&staging_, {pe, el, r, w});
    SwapBlockAxes(send.data<float>(), staging_.data<float>(), el, pe, r * w);
  }
  ScopedTimer timer(a2a);
  EnsureTensor(recv, {groups_->num_experts(), r, w});
  AllToAll(staging_, recv);
}

}  // namespace moerun
