// `moerun bench comm`: the Communicator's collectives timed beside a raw loop of the same
// transport on the same buffers, in the same run. On the CPU the raw loop is MPI's
// (MPI_Alltoallv / MPI_Allreduce); with --device cuda it is NCCL's own calls on a second NCCL
// communicator (grouped ncclSend / ncclRecv, ncclAllReduce, as nccl-tests runs them), and
// the buffers are device memory.
#ifndef MOERUN_LAUNCH_BENCH_COMM_H_
#define MOERUN_LAUNCH_BENCH_COMM_H_

#include <mpi.h>

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "runtime/status.h"
#include "runtime/tensor.h"

namespace moerun {

struct CommBenchOptions {
  int64_t min_bytes = 4096, max_bytes = 4096;
  int factor = 4;
  double seconds = 0.2;
  int rounds = 7;
  std::vector<std::string> ops = {"all_to_all_v", "all_reduce"};
  bool check = true;
};

// The raw side: collectives over the same ranks as the Communicator measured, on buffers
// of its device. Calls may only queue (a device stream); Finish() waits for them.
class RawCollectives {
 public:
  virtual ~RawCollectives() = default;
  // "mpi" or "nccl": the JSON field is raw_<kind>_gbps.
  virtual const char* kind() const = 0;
  // Every rank sends `count` floats to each peer q from send + q * count and receives
  // peer q's into recv + q * count.
  virtual void AllToAll(const float* send, float* recv, int64_t count) = 0;
  virtual void AllReduce(float* buffer, int64_t count) = 0;
  virtual void Finish() = 0;
};

// MPI_Alltoallv / MPI_Allreduce on a duplicate of `comm` (host memory).
std::unique_ptr<RawCollectives> MakeRawMpiCollectives(MPI_Comm comm);
// A second NCCL communicator over the ranks of `bootstrap` (a host communicator; collective
// over it: comm/nccl_communicator.h's InitNcclComm), queued on the CUDA backend's stream;
// Finish() is the backend's polling Synchronize, which ends the job on this communicator's
// asynchronous error (a dead peer) too. An error when NCCL was not built or its setup failed
// on this rank.
StatusOr<std::unique_ptr<RawCollectives>> MakeRawNcclCollectives(Communicator& bootstrap);

// Times `comm`'s all_to_all_v and all_reduce for the option's sizes and ops beside `raw`,
// rounds alternating between the two, the slowest rank's time per call (MPI_Wtime between
// barriers on `timing`, after Finish / Synchronize). Buffers of max_bytes per peer on
// `device` (comm's device). Rank 0 of `timing` prints one JSON line per (op, size); the
// data is verified after timing unless options.check is off, and the first size that
// returned wrong data on any rank ends the measuring.
// nccl-tests bus GB/s of `raw`'s all-to-all over the ranks of `timing` with
// `floats_per_peer` floats to each of its `p` ranks, on buffers of `device`: one warm-up
// call, then `iters` calls and the wait for them, the slowest rank's time.
double RawAllToAllGbps(RawCollectives& raw, MPI_Comm timing, Device device, int64_t floats_per_peer,
                       int p, int iters);

struct CommBenchResult {
  double min_ratio = 0;  // the smallest ratio of ours to raw over the sizes
  std::string failure;   // empty, or the op and size that returned wrong data
};
CommBenchResult RunCommBench(Communicator& comm, RawCollectives& raw, MPI_Comm timing,
                             Device device, const CommBenchOptions& options);

}  // namespace moerun

#endif  // MOERUN_LAUNCH_BENCH_COMM_H_
