// The Communicator: the only way model and runtime code talk to other ranks. Collectives
// must be called by every rank of the communicator in the same order; on host backends
// they complete before returning, on device backends they are queued on a stream (see
// "Ordering" below), and Start* forms return at once with a PendingCollective.
// Counts and displacements are in elements of `dtype`. Nothing here knows about models.
//
// Failure contract: a failed call or a peer that never arrives never hangs silently and
// never passes silently. Backends abort the whole job with a message naming the rank, host,
// call and source location; a collective that makes no progress for the watchdog timeout
// aborts the job naming the rank and the collective.
#ifndef MOERUN_COMM_COMMUNICATOR_H_
#define MOERUN_COMM_COMMUNICATOR_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "runtime/dtype.h"
#include "runtime/status.h"

namespace moerun {

enum class ReduceOp { kSum, kMax, kMin };

// A collective started by a Start* call. Until Wait() returns, its buffers and count
// vectors belong to the collective. Test() drives progress (host backends progress only
// inside MPI calls) and says whether it has completed; Wait() completes it (the watchdog
// timeout applies). Destroying a pending collective waits for it.
class PendingCollective {
 public:
  virtual ~PendingCollective() = default;
  virtual bool Test() = 0;
  virtual void Wait() = 0;
};

class Communicator {
 public:
  virtual ~Communicator() = default;

  virtual int rank() const = 0;
  virtual int size() const = 0;
  // A name for messages: "world", "expert_parallel", ...
  virtual const std::string& name() const = 0;

  // Ordering. Host backends (MPI, loopback) complete every collective before returning;
  // their buffers are host memory. A device backend (NCCL) takes buffers in its device's
  // memory and only queues each collective on its stream: later work on that stream sees
  // the result, the host sees it after Synchronize(). Code written for both calls
  // Synchronize() before the host reads a received buffer.
  virtual Device device() const { return Device::kCPU; }
  // The stream collectives are queued on (cudaStream_t), nullptr for host backends.
  virtual void* stream() const { return nullptr; }
  virtual void SetStream(void* stream) {}
  // Waits until every queued collective has completed; never hangs silently (the watchdog
  // timeout applies).
  virtual void Synchronize() {}

  // Rank r sends send_counts[p] elements starting at send + send_displs[p] to each peer p,
  // and receives recv_counts[p] elements from p at recv + recv_displs[p]. Any count may
  // be zero; recv_counts[p] must equal what p sends to this rank. Vectors have size().
  virtual void AllToAllV(const void* send, const std::vector<int64_t>& send_counts,
                         const std::vector<int64_t>& send_displs, void* recv,
                         const std::vector<int64_t>& recv_counts,
                         const std::vector<int64_t>& recv_displs, DType dtype) = 0;
  // AllToAllV that returns at once; the transfer proceeds while the caller computes (see
  // PendingCollective). The default runs AllToAllV and returns a completed collective.
  // Every rank starts the same collectives in the same order.
  virtual std::unique_ptr<PendingCollective> StartAllToAllV(
      const void* send, const std::vector<int64_t>& send_counts,
      const std::vector<int64_t>& send_displs, void* recv, const std::vector<int64_t>& recv_counts,
      const std::vector<int64_t>& recv_displs, DType dtype);
  // In place over `count` elements.
  virtual void AllReduce(void* buffer, int64_t count, DType dtype, ReduceOp op) = 0;
  virtual void Broadcast(void* buffer, int64_t count, DType dtype, int root) = 0;
  // recv holds size() * count elements, rank r's block at r * count.
  virtual void AllGather(const void* send, int64_t count, void* recv, DType dtype) = 0;
  virtual void Barrier() = 0;
  // Ranks with the same color form a new communicator, ordered by (key, rank). Collective
  // over this communicator.
  virtual std::unique_ptr<Communicator> Split(int color, int key, const std::string& name) = 0;
};

// Collective: every rank passes its own status; every rank gets back the error of the
// lowest failing rank (prefixed "rank R: " when the job has more than one rank, unless it
// names its rank already: a status agreed before, agreed again), or OK when no rank failed.
// Lets all ranks stop together, cleanly, on a recoverable error.
Status AgreeOnStatus(Communicator& comm, const Status& local);

// Convenience: all_to_all_v where displacements are the prefix sums of the counts.
std::vector<int64_t> PrefixDisplacements(const std::vector<int64_t>& counts);

}  // namespace moerun

#endif  // MOERUN_COMM_COMMUNICATOR_H_
