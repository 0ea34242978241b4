// Pack, all-to-all and combine of routed rows.
#include "model/moe_dispatch.h"

#include <algorithm>
#include <chrono>
#include <cstring>
#include <mutex>
#include <vector>

#include "model/moe_layer.h"
#include "runtime/backend.h"
#include "runtime/device_math.h"

namespace moerun {
namespace {

double Now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
}

// dst[b][a] = src[a][b] for blocks of `chunk` floats: [A][B][chunk] -> [B][A][chunk], on
// the tensors' device (host: parallel memcpy; a device: its backend's copies).
void SwapBlockAxes(const Tensor& src_t, Tensor* dst_t, int64_t a_count, int64_t b_count,
                   int64_t chunk) {
  const Device dev = src_t.device();
  CHECK(dst_t->device() == dev) << "block swap across devices";
  const float* src = src_t.device_data<float>(dev);
  float* dst = dst_t->device_data<float>(dev);
  if (dev != Device::kCPU) {
    // One strided copy per index of the shorter axis (not a_count * b_count copies).
    Backend& backend = RequireBackend(dev);
    const size_t bytes = chunk * sizeof(float);
    if (a_count <= b_count) {
      for (int64_t a = 0; a < a_count; ++a) {  // rows b: dst pitch a_count, src pitch 1
        backend.CopyWithin2D(dst + a * chunk, a_count * bytes, src + a * b_count * chunk, bytes,
                             bytes, b_count);
      }
    } else {
      for (int64_t b = 0; b < b_count; ++b) {  // rows a: dst pitch 1, src pitch b_count
        backend.CopyWithin2D(dst + b * a_count * chunk, bytes, src + b * chunk, b_count * bytes,
                             bytes, a_count);
      }
    }
    return;
  }
#pragma omp parallel for collapse(2) schedule(static)
  for (int64_t a = 0; a < a_count; ++a) {
    for (int64_t b = 0; b < b_count; ++b) {
      std::memcpy(dst + (b * a_count + a) * chunk, src + (a * b_count + b) * chunk,
                  chunk * sizeof(float));
    }
  }
}

// dst = src (same element count and device), copied in parallel on the host.
void CopyRows(const Tensor& src, Tensor* dst) {
  const int64_t n = src.numel();
  const Device dev = src.device();
  CHECK(dst->device() == dev && dst->numel() == n) << "row copy across devices or sizes";
  if (dev != Device::kCPU) {
    RequireBackend(dev).CopyWithin(dst->raw_data(), src.raw_data(), n * sizeof(float));
    return;
  }
  const float* s = src.data<float>();
  float* d = dst->data<float>();
  constexpr int64_t kChunk = 1 << 16;
#pragma omp parallel for schedule(static)
  for (int64_t i = 0; i < n; i += kChunk) {
    std::memcpy(d + i, s + i, std::min(kChunk, n - i) * sizeof(float));
  }
}

}  // namespace

namespace {
struct PendingDeviceTime {
  double* slot;
  Backend* backend;
  void* start;
  void* stop;
};
std::mutex g_pending_mu;
std::vector<PendingDeviceTime>* g_pending = new std::vector<PendingDeviceTime>();  // never freed
}  // namespace

ScopedTimer::ScopedTimer(double* slot, Device device) : slot_(slot) {
  if (device != Device::kCPU) {
    backend_ = &RequireBackend(device);
    start_event_ = backend_->RecordTimingEvent();
  }
  if (start_event_ == nullptr) start_ = Now();
}

ScopedTimer::~ScopedTimer() {
  if (start_event_ == nullptr) {
    *slot_ += Now() - start_;
    return;
  }
  void* stop = backend_->RecordTimingEvent();
  std::lock_guard<std::mutex> lock(g_pending_mu);
  g_pending->push_back({slot_, backend_, start_event_, stop});
}

void ResolveDeviceTimers() {
  std::vector<PendingDeviceTime> pending;
  {
    std::lock_guard<std::mutex> lock(g_pending_mu);
    pending.swap(*g_pending);
  }
  for (const PendingDeviceTime& p : pending) {
    *p.slot += p.backend->ElapsedSecondsAndRelease(p.start, p.stop);
  }
}

void EnsureTensor(Tensor* t, const Shape& shape, DType dtype, Device device) {
  if (!t->defined() || t->shape() != shape || t->dtype() != dtype || t->device() != device) {
    *t = Tensor::Empty(shape, dtype, device);
  }
}

void ZeroRowsNotKept(const int32_t* row, int64_t choices, int64_t buf_rows, int64_t w, float* buf) {
  std::vector<uint8_t> kept(buf_rows, 0);
  for (int64_t i = 0; i < choices; ++i) {
    if (row[i] >= 0) {
      CHECK_LT(row[i], buf_rows) << "plan row out of the buffer";
      kept[row[i]] = 1;
    }
  }
#pragma omp parallel for schedule(static) if (buf_rows * w > 65536)
  for (int64_t r = 0; r < buf_rows; ++r) {
    if (kept[r] == 0) std::fill_n(buf + r * w, w, 0.0f);
  }
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
  float* dbuf = d_buf->data<float>();
  // Every kept row is written below; only the others need zeros.
  ZeroRowsNotKept(row, tokens * k, d_buf->numel() / w, w, dbuf);
#pragma omp parallel for schedule(static)
  for (int64_t tok = 0; tok < tokens; ++tok) {
    const float* dyt = dy + tok * w;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t i = tok * k + j;
      d_weight[i] = 0.0f;
      if (row[i] < 0) continue;
      const float* o = buf + static_cast<int64_t>(row[i]) * w;
      float* dst = dbuf + static_cast<int64_t>(row[i]) * w;
      for (int64_t c = 0; c < w; ++c) dst[c] = weight[i] * dyt[c];
      d_weight[i] = static_cast<float>(LaneDotF64(dyt, o, w));
    }
  }
}

void Dispatcher::AllToAll(const Tensor& send, Tensor* recv) {
  Communicator& ep = groups_->expert();
  const int pe = ep.size();
  const int64_t per_peer = send.numel() / pe;
  std::vector<int64_t> counts(pe, per_peer), displs = PrefixDisplacements(counts);
  if (pe == 1) {
    CopyRows(send, recv);
    return;
  }
  CHECK(ep.device() == send.device())
      << "the expert-parallel communicator moves " << DeviceName(ep.device())
      << " memory but the MoE rows are on " << DeviceName(send.device())
      << " (a GPU layer needs the NCCL communicator)";
  // The swaps around the transfer run on the device backend's stream: ordered with it only
  // when it is the communicator's.
  CHECK(send.device() == Device::kCPU || ep.stream() == RequireBackend(send.device()).stream())
      << "the expert-parallel communicator '" << ep.name()
      << "' queues on another stream than the device backend's";
  ep.AllToAllV(send.raw_data(), counts, displs, recv->raw_data(), counts, displs, DType::kF32);
}

void Dispatcher::AllToAllInPlace(const Tensor& send, Tensor* recv, bool to_experts) {
  Communicator& ep = groups_->expert();
  const int64_t pe = ep.size(), el = groups_->local_experts();
  const int64_t chunk = (to_experts ? send.dim(1) : recv->dim(1)) * send.dim(2);
  CHECK(send.device() == Device::kCPU && recv->device() == Device::kCPU && pe > 1);
  // Block (q, e): the rows of peer q for local expert e, at (q * E_local + e) in the
  // [E, R, w] side and at (e * P_ep + q) in the [E_local, P_ep * R, w] side.
  std::vector<int64_t> counts(pe, chunk), by_peer(pe), by_expert(pe);
  for (int64_t e = 0; e < el; ++e) {
    for (int64_t q = 0; q < pe; ++q) {
      by_peer[q] = (q * el + e) * chunk;
      by_expert[q] = (e * pe + q) * chunk;
    }
    ep.AllToAllV(send.raw_data(), counts, to_experts ? by_peer : by_expert, recv->raw_data(),
                 counts, to_experts ? by_expert : by_peer, DType::kF32);
  }
}

void Dispatcher::ToExperts(const Tensor& send, Tensor* recv, double* a2a, double* pack) {
  const int64_t pe = groups_->expert().size(), el = groups_->local_experts();
  const int64_t r = send.dim(1), w = send.dim(2);
  // [E, R, w] is already [E_local, 1 * R, w]: one copy, no staging. (MoeLayer skips the
  // dispatcher then; the MoE attention reuses its send buffers, so it needs the copy.)
  if (pe == 1) {
    ScopedTimer timer(pack, send.device());
    EnsureTensor(recv, {el, r, w}, DType::kF32, send.device());
    CopyRows(send, recv);
    return;
  }
  if (send.device() == Device::kCPU) {
    // The host: one all-to-all per local expert puts every block in place (no staging,
    // no block swap); a device keeps one all-to-all and swaps on the device (below).
    ScopedTimer timer(a2a);
    EnsureTensor(recv, {el, pe * r, w}, DType::kF32, send.device());
    AllToAllInPlace(send, recv, /*to_experts=*/true);
    return;
  }
  {
    ScopedTimer timer(a2a, send.device());
    EnsureTensor(&staging_, {pe, el, r, w}, DType::kF32, send.device());
    AllToAll(send, &staging_);
  }
  ScopedTimer timer(pack, send.device());
  EnsureTensor(recv, {el, pe * r, w}, DType::kF32, send.device());
  SwapBlockAxes(staging_, recv, pe, el, r * w);
}

void Dispatcher::FromExperts(const Tensor& send, Tensor* recv, double* a2a, double* pack) {
  const int64_t pe = groups_->expert().size(), el = groups_->local_experts();
  const int64_t r = send.dim(1) / pe, w = send.dim(2);
  if (pe == 1) {
    ScopedTimer timer(pack, send.device());
    EnsureTensor(recv, {groups_->num_experts(), r, w}, DType::kF32, send.device());
    CopyRows(send, recv);
    return;
  }
  if (send.device() == Device::kCPU) {  // as in ToExperts
    ScopedTimer timer(a2a);
    EnsureTensor(recv, {groups_->num_experts(), r, w}, DType::kF32, send.device());
    AllToAllInPlace(send, recv, /*to_experts=*/false);
    return;
  }
  {
    ScopedTimer timer(pack, send.device());
    EnsureTensor(&staging_, {pe, el, r, w}, DType::kF32, send.device());
    SwapBlockAxes(send, &staging_, el, pe, r * w);
  }
  ScopedTimer timer(a2a, send.device());
  EnsureTensor(recv, {groups_->num_experts(), r, w}, DType::kF32, send.device());
  AllToAll(staging_, recv);
}

void Dispatcher::PrepareExpertRows(const Tensor& send, Tensor* recv) const {
  EnsureTensor(recv,
               {groups_->local_experts(), groups_->expert().size() * send.dim(1), send.dim(2)},
               DType::kF32, send.device());
}

void Dispatcher::ToExpertsOverlapped(const Tensor& send, Tensor* recv,
                                     const std::function<void(int64_t, int64_t)>& compute,
                                     double* a2a, double* pack, int pieces, int max_stages) {
  Communicator& ep = groups_->expert();
  const int64_t pe = ep.size(), el = groups_->local_experts(), me = ep.rank();
  const int64_t r = send.dim(1), w = send.dim(2), block = el * r * w;
  const Device dev = send.device();
  CHECK(ep.device() == dev) << "the expert-parallel communicator moves " << DeviceName(ep.device())
                            << " memory but the MoE rows are on " << DeviceName(dev)
                            << " (a GPU layer needs the NCCL communicator)";
  CHECK_EQ(send.dim(0), pe * el) << "overlapped dispatch of " << send.ShapeString();
  // The copies below run on the device backend's stream, which Wait() orders after the
  // transfer only if it is the communicator's.
  CHECK(dev == Device::kCPU || ep.stream() == RequireBackend(dev).stream())
      << "the expert-parallel communicator '" << ep.name()
      << "' queues on another stream than the device backend's";
  EnsureTensor(&staging_, {pe, el, r, w}, DType::kF32, dev);
  MOERUN_CHECK_SHAPE(*recv, {el, pe * r, w});
  CHECK(recv->device() == dev) << "expert rows on " << DeviceName(recv->device())
                               << ", sent rows on " << DeviceName(dev);
  // staging_ and send hold peer q's block at q * block.
  const std::vector<int64_t> displs = PrefixDisplacements(std::vector<int64_t>(pe, block));
  // recv[e][q] = from[q][e] (blocks of r * w floats) for the peers q in `peers`.
  auto place = [&](const float* from, const std::vector<int64_t>& peers) {
    ScopedTimer timer(pack);
    float* dst = recv->device_data<float>(dev);
    const int64_t chunk = r * w, n = static_cast<int64_t>(peers.size());
    if (dev != Device::kCPU) {
      // One strided copy per peer: its E_local blocks, pe blocks apart in recv.
      Backend& backend = RequireBackend(dev);
      const size_t bytes = chunk * sizeof(float);
      for (int64_t q : peers) {
        backend.CopyWithin2D(dst + q * chunk, pe * bytes, from + q * el * chunk, bytes, bytes, el);
      }
      return;
    }
#pragma omp parallel for collapse(2) schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t e = 0; e < el; ++e) {
        const int64_t q = peers[i];
        std::memcpy(dst + (e * pe + q) * chunk, from + (q * el + e) * chunk, chunk * sizeof(float));
      }
    }
  };
  // compute over the rows of `peers` (runs of consecutive peers in one call each) while
  // `pending` travels: on the CPU in pieces of about r / pieces rows with a Test() between
  // (host MPI progresses only inside MPI calls); on a device in one call a run (the streams
  // overlap it with the transfer).
  auto compute_peers = [&](std::vector<int64_t> peers, PendingCollective* pending) {
    std::sort(peers.begin(), peers.end());
    const int64_t piece = std::max<int64_t>(1, (r + pieces - 1) / pieces);
    for (size_t i = 0; i < peers.size();) {
      size_t j = i + 1;
      while (j < peers.size() && peers[j] == peers[j - 1] + 1) ++j;
      const int64_t first = peers[i] * r, rows = static_cast<int64_t>(j - i) * r;
      if (dev != Device::kCPU || pending == nullptr) {
        compute(first, rows);
      } else {
        for (int64_t b = 0; b < rows; b += piece) {
          compute(first + b, std::min(piece, rows - b));
          ScopedTimer timer(a2a);
          pending->Test();
        }
      }
      i = j;
    }
  };
  place(send.device_data<float>(dev), {me});
  // The other peers by distance d = 1 .. pe - 1 (this rank sends to me + d and receives
  // from me - d), in `stages` runs of consecutive distances, one all-to-all each (only the
  // run's peers' counts non-zero: on NCCL point-to-point calls, with MPI an all-to-all of
  // mostly empty blocks). Stage s's transfer travels while the rows that arrived at stage
  // s - 1 are computed (the own rows at stage 0), so each peer's rows are computed as soon
  // as they are here, not after the whole exchange. The first stage takes one peer: its
  // transfer and the own rows' compute are the same size.
  // The timers here are host timers, also on a device (device events on the backend's
  // stream would not see the transfers, which run on the communicator's second stream): a2a
  // and pack are the enqueue times there, and the transfers' device time is in no part of
  // the split, only in the step's forward and backward.
  const int64_t stages = std::min<int64_t>(pe - 1, std::max(1, max_stages));
  std::vector<int64_t> ready = {me};
  for (int64_t s = 0; s < stages; ++s) {
    // Stage 0: distance 1; the other stages share distances 2 .. pe - 1 evenly.
    const int64_t d0 = s == 0 ? 1 : 2 + (s - 1) * (pe - 2) / (stages - 1);
    const int64_t d1 = stages == 1 ? pe : s == 0 ? 2 : 2 + s * (pe - 2) / (stages - 1);
    std::vector<int64_t> send_counts(pe, 0), recv_counts(pe, 0), arriving;
    for (int64_t d = d0; d < d1; ++d) {
      send_counts[(me + d) % pe] = block;
      recv_counts[(me - d + pe) % pe] = block;
      arriving.push_back((me - d + pe) % pe);
    }
    std::unique_ptr<PendingCollective> pending;
    {
      // On a device the transfer runs on the communicator's second stream, beside the
      // copies and experts queued below on its first (NcclCommunicator::StartAllToAllV).
      ScopedTimer timer(a2a);
      pending = ep.StartAllToAllV(send.raw_data(), send_counts, displs, staging_.raw_data(),
                                  recv_counts, displs, DType::kF32);
    }
    compute_peers(ready, pending.get());
    {
      ScopedTimer timer(a2a);
      pending->Wait();
    }
    place(staging_.device_data<float>(dev), arriving);
    ready = arriving;
  }
  compute_peers(ready, nullptr);
}

}  // namespace moerun
