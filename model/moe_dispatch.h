// Moving routed rows between token owners and expert owners (the all-to-all of
// shared/specs/vmoe-routing.md), in both directions, for rows of any width.
//
// Token side: a buffer [E, R, w] holds, for every expert, the rows this rank sends it
// (R = groups * capacity, the plan's rows_per_expert). Expert side: [E_local, P_ep * R, w]
// holds every sender's rows for each local expert, senders in rank order. ToExperts and
// FromExperts are each other's inverse; the backward of a move is the move back.
#ifndef MOERUN_MODEL_MOE_DISPATCH_H_
#define MOERUN_MODEL_MOE_DISPATCH_H_

#include <cstdint>
#include <functional>

#include "model/moe_plan.h"
#include "runtime/backend.h"
#include "runtime/tensor.h"

namespace moerun {

class MoeGroups;

// Wall seconds accumulated per part since the last reset (zero the struct).
struct MoeTimers {
  // expert / bwd_expert: the expert GEMMs only; expert_act / bwd_expert_act: their bias
  // and activation work.
  double router = 0, routing = 0, pack = 0, all_to_all = 0, expert = 0, expert_act = 0;
  double combine = 0, bwd_combine = 0, bwd_pack = 0, bwd_all_to_all = 0, bwd_expert = 0;
  double bwd_expert_act = 0, bwd_dispatch = 0, bwd_router = 0;
};

// Adds the seconds since construction to `slot` when it goes out of scope. On a device the
// work it times is only queued when the host returns: with a `device` whose backend records
// timing events (a GPU), the timer records one on the device's stream when it starts and
// one when it stops, without waiting, and the device time between them is added to `slot`
// by the next ResolveDeviceTimers. Otherwise (the CPU, the host stand-in) it times on the
// host at once.
class ScopedTimer {
 public:
  explicit ScopedTimer(double* slot, Device device = Device::kCPU);
  ~ScopedTimer();
  ScopedTimer(const ScopedTimer&) = delete;
  ScopedTimer& operator=(const ScopedTimer&) = delete;

 private:
  double* slot_;
  Backend* backend_ = nullptr;  // with start_event_
  void* start_event_ = nullptr;
  double start_ = 0;
};

// Adds every stopped device timer's time to its slot, waiting (polling) for the device where
// its work has not finished. Readers of device times call it first (Trainer::time_split(),
// the Trainer after each backward and evaluation, bench moe-layer); so do the owners of
// slots before they go (MoeLayer's, MoeAttention's, the Trainer's destructors). A device
// timer's slot must outlive the next call: never a local.
void ResolveDeviceTimers();

// Reallocates `t` when its shape, dtype or device differs (buffers persist across steps).
void EnsureTensor(Tensor* t, const Shape& shape, DType dtype = DType::kF32,
                  Device device = Device::kCPU);

// Zeroes the rows of buf [buf_rows, w] that no kept choice of row [choices] (plan rows,
// -1: dropped) names, in parallel; the kept ones are left for their writer.
void ZeroRowsNotKept(const int32_t* row, int64_t choices, int64_t buf_rows, int64_t w, float* buf);
// buf [E, R, w] (zeroed first) gets row r of x [T, w] at every kept choice's plan row.
void PackRows(const RoutingPlan& plan, const float* x, int64_t w, Tensor* buf);
// out[t] = sum over kept choices j of weight[t, j] * buf[row[t, j]] (weight null: 1), for
// rows of w floats; out is overwritten. The combine, and the backward of PackRows.
void GatherKeptRows(const float* buf, const int32_t* row, const float* weight, int64_t tokens,
                    int64_t k, int64_t w, float* out);
// Backward of GatherKeptRows with weights: d_buf [E, R, w] gets weight * dy at every kept
// row and zeros elsewhere, and d_weight[t, j] = <dy[t], buf[row]> (0 when dropped), summed
// in double in LaneDotF64's order.
void GatherKeptRowsBackward(const float* buf, const int32_t* row, const float* weight,
                            const float* dy, int64_t tokens, int64_t k, int64_t w, Tensor* d_buf,
                            float* d_weight);

class Dispatcher {
 public:
  explicit Dispatcher(const MoeGroups* groups) : groups_(groups) {}
  // send [E, R, w] -> recv [E_local, P_ep * R, w]. Timed into `a2a` and `pack`.
  void ToExperts(const Tensor& send, Tensor* recv, double* a2a, double* pack);
  // send [E_local, P_ep * R, w] -> recv [E, R, w].
  void FromExperts(const Tensor& send, Tensor* recv, double* a2a, double* pack);
  // Allocates recv as ToExperts would: [E_local, P_ep * R, w] for send [E, R, w].
  void PrepareExpertRows(const Tensor& send, Tensor* recv) const;
  // ToExperts overlapped with the experts' work on what arrives, as a pipeline of up to
  // `max_stages` transfers (at most one per other peer) by peer distance: the rows this
  // rank sends itself are copied at once, and `compute(begin, count)` runs over them while
  // the first transfer travels (with one stage: every other peer's block; else the block of
  // the peer at distance 1); each later transfer (the next distances) travels while the
  // rows of the one before are computed; the last transfer's rows are computed after it.
  // On the CPU each computation runs in pieces of about 1 / `pieces` of a peer's rows,
  // driving the transfer between pieces (MPI progresses only inside its calls); on a device
  // (the NCCL communicator) the transfer runs on the communicator's second stream while the
  // rows are computed on its first. compute's rows index recv's second dim; recv must have
  // been prepared (PrepareExpertRows). Every row is computed exactly once, after it arrived.
  void ToExpertsOverlapped(const Tensor& send, Tensor* recv,
                           const std::function<void(int64_t, int64_t)>& compute, double* a2a,
                           double* pack, int pieces = 4, int max_stages = 4);

 private:
  void AllToAll(const Tensor& send, Tensor* recv);
  // Host rows between [E, R, w] and [E_local, P_ep * R, w] (to_experts: from the first to
  // the second), one all-to-all per local expert, each block straight into its place.
  void AllToAllInPlace(const Tensor& send, Tensor* recv, bool to_experts);
  const MoeGroups* groups_;
  Tensor staging_;  // [P_ep, E_local, R, w]: a device's all-to-all, the overlapped one
};

}  // namespace moerun

#endif  // MOERUN_MODEL_MOE_DISPATCH_H_
