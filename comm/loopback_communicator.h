// A Communicator for one rank of a job whose other ranks are simulated: `moerun dry-run`
// builds and steps rank R of a P-rank job in one process. Every simulated peer behaves
// like this rank (it sends what this rank sends to itself), so every collective returns
// data of the right shape and size without a network:
//   AllToAllV  the block from each peer is a copy of this rank's block to itself, repeated
//              or cut to the count expected from that peer (the byte counts of a real job);
//   AllReduce  sum: the value times size() (all ranks equal); max/min: the value;
//   Broadcast  a no-op (the root holds what this rank holds); AllGather: own block, size()
//              times; Barrier: a no-op.
// It counts the bytes a real job would send to and receive from other ranks. On a device
// (`dry-run --device cuda`) the buffers are that device's memory and every copy goes through
// its backend, in the order of its stream; a sum all-reduce scales on the host (a round
// trip: a dry-run's figures are memory and shapes, not all-reduce time).
#ifndef MOERUN_COMM_LOOPBACK_COMMUNICATOR_H_
#define MOERUN_COMM_LOOPBACK_COMMUNICATOR_H_

#include "comm/communicator.h"

namespace moerun {

class LoopbackCommunicator : public Communicator {
 public:
  LoopbackCommunicator(int rank, int size, std::string name = "world",
                       Device device = Device::kCPU);

  Device device() const override { return device_; }
  void* stream() const override;
  void Synchronize() override;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const std::string& name() const override { return name_; }

  void AllToAllV(const void* send, const std::vector<int64_t>& send_counts,
                 const std::vector<int64_t>& send_displs, void* recv,
                 const std::vector<int64_t>& recv_counts, const std::vector<int64_t>& recv_displs,
                 DType dtype) override;
  void AllReduce(void* buffer, int64_t count, DType dtype, ReduceOp op) override;
  void Broadcast(void* buffer, int64_t count, DType dtype, int root) override;
  void AllGather(const void* send, int64_t count, void* recv, DType dtype) override;
  void Barrier() override {}
  // Not supported: the colours of the simulated ranks are unknown. Callers (dry-run) keep
  // to layouts without splits (ranks <= experts); this ends the job with a message.
  std::unique_ptr<Communicator> Split(int color, int key, const std::string& name) override;

  // Bytes a real job would have moved to / from other ranks by all-to-alls and by
  // all-reduces (a ring all-reduce sends 2 (P-1)/P of the buffer).
  int64_t all_to_all_bytes_sent() const { return a2a_sent_; }
  int64_t all_to_all_bytes_received() const { return a2a_received_; }
  int64_t all_reduce_bytes() const { return all_reduce_bytes_; }

 private:
  // memcpy on the host, the device backend's copy elsewhere.
  void Copy(void* dst, const void* src, size_t bytes);
  // buffer *= size() (the sum over equal ranks), host memory.
  void ScaleBy(void* buffer, int64_t count, DType dtype) const;
  int rank_, size_;
  std::string name_;
  Device device_;
  int64_t a2a_sent_ = 0, a2a_received_ = 0, all_reduce_bytes_ = 0;
};

}  // namespace moerun

#endif  // MOERUN_COMM_LOOPBACK_COMMUNICATOR_H_
