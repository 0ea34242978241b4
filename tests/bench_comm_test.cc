// bench comm's measuring loop (launch/bench_comm.h) on both kinds of buffers: host memory
// over MPI, and device memory of the host stand-in backend (CI has no GPU) through a
// communicator that moves device memory, as the NCCL one does under --device cuda: the
// device path's copies, zeroing and waits run here. A transport that delivers one wrong
// value must fail the check on every rank. Under mpirun -np 1 and 2.
#include "launch/bench_comm.h"

#include <gtest/gtest.h>

#include <memory>
#include <sstream>
#include <string>

#include "runtime/backend.h"
#include "tests/counting_backend.h"
#include "tests/mpi_test_main.h"

namespace moerun {
namespace {

using testing::World;

// The world's MPI collectives on memory of `device` (the stand-in's is host memory), with
// the device ordering calls counted, and optionally one received value corrupted on the
// last rank.
class OnDevice final : public Communicator {
 public:
  OnDevice(Communicator& inner, Device device) : inner_(inner), device_(device) {}
  int rank() const override { return inner_.rank(); }
  int size() const override { return inner_.size(); }
  const std::string& name() const override { return name_; }
  Device device() const override { return device_; }
  void Synchronize() override { ++synchronized; }
  void AllToAllV(const void* send, const std::vector<int64_t>& send_counts,
                 const std::vector<int64_t>& send_displs, void* recv,
                 const std::vector<int64_t>& recv_counts, const std::vector<int64_t>& recv_displs,
                 DType dtype) override {
    inner_.AllToAllV(send, send_counts, send_displs, recv, recv_counts, recv_displs, dtype);
    if (corrupt && rank() == size() - 1) static_cast<float*>(recv)[0] += 1.0f;
  }
  void AllReduce(void* buffer, int64_t count, DType dtype, ReduceOp op) override {
    inner_.AllReduce(buffer, count, dtype, op);
  }
  void Broadcast(void* buffer, int64_t count, DType dtype, int root) override {
    inner_.Broadcast(buffer, count, dtype, root);
  }
  void AllGather(const void* send, int64_t count, void* recv, DType dtype) override {
    inner_.AllGather(send, count, recv, dtype);
  }
  void Barrier() override { inner_.Barrier(); }
  std::unique_ptr<Communicator> Split(int color, int key, const std::string& name) override {
    return inner_.Split(color, key, name);
  }

  int synchronized = 0;
  bool corrupt = false;

 private:
  Communicator& inner_;
  Device device_;
  std::string name_ = "on_device";
};

// The raw side, counting its waits for the device.
class CountingRaw final : public RawCollectives {
 public:
  explicit CountingRaw(std::unique_ptr<RawCollectives> inner) : inner_(std::move(inner)) {}
  const char* kind() const override { return inner_->kind(); }
  void AllToAll(const float* send, float* recv, int64_t count) override {
    inner_->AllToAll(send, recv, count);
  }
  void AllReduce(float* buffer, int64_t count) override { inner_->AllReduce(buffer, count); }
  void Finish() override {
    ++finished;
    inner_->Finish();
  }
  int finished = 0;

 private:
  std::unique_ptr<RawCollectives> inner_;
};

CommBenchOptions Small() {
  CommBenchOptions o;
  o.min_bytes = 4;
  o.max_bytes = 4096;  // 4, 16, 64, 256, 1024, 4096 bytes per peer
  o.seconds = 0.0005;
  o.rounds = 1;
  return o;
}

// RunCommBench with its JSON lines captured into *out.
CommBenchResult RunCaptured(Communicator& comm, RawCollectives& raw, Device device,
                            const CommBenchOptions& o, std::string* out) {
  ::testing::internal::CaptureStdout();
  const CommBenchResult r = RunCommBench(comm, raw, MPI_COMM_WORLD, device, o);
  *out = ::testing::internal::GetCapturedStdout();
  return r;
}

int Count(const std::string& text, const std::string& what) {
  int n = 0;
  for (size_t at = text.find(what); at != std::string::npos; at = text.find(what, at + 1)) ++n;
  return n;
}

TEST(BenchComm, HostBuffersOverMpiAreVerified) {
  auto raw = MakeRawMpiCollectives(MPI_COMM_WORLD);
  std::string out;
  const CommBenchResult r = RunCaptured(World(), *raw, Device::kCPU, Small(), &out);
  EXPECT_EQ(r.failure, "");
  EXPECT_TRUE(r.min_ratio > 0 && r.min_ratio < 1e9) << r.min_ratio;  // measured, finite
  if (World().rank() == 0) {
    EXPECT_EQ(Count(out, "\"verified\":\"ok\""), 12) << out;
    EXPECT_EQ(Count(out, "\"raw_mpi_gbps\""), 12) << out;
    EXPECT_EQ(Count(out, "\"device\":\"cpu\""), 12) << out;
  } else {
    EXPECT_EQ(out, "");
  }
}

// The device path: buffers from the (stand-in) CUDA backend, filled and read back through
// its copies (a memcpy on device pointers would work on the stand-in's host memory but not
// on a GPU: the copies are counted); data<T>() on them would die. Every timed loop ends in
// a wait for the device: ours in the communicator's Synchronize, the raw one in Finish (on
// a GPU the calls only queue).
TEST(BenchComm, DeviceBuffersGoThroughTheBackendAndWaitForTheStream) {
  std::unique_ptr<Backend> stand_in = NewHostStandInBackend(Device::kCUDA);
  CountingBackend counting(stand_in.get());
  Backend* before = SetBackendForTesting(Device::kCUDA, &counting);
  {
    OnDevice comm(World(), Device::kCUDA);
    CountingRaw raw(MakeRawMpiCollectives(MPI_COMM_WORLD));
    CommBenchOptions o = Small();
    o.rounds = 2;
    std::string out;
    const CommBenchResult r = RunCaptured(comm, raw, Device::kCUDA, o, &out);
    EXPECT_EQ(r.failure, "");
    // Per size: one wait per timed loop of ours (2 rounds) and one after the check.
    EXPECT_EQ(comm.synchronized, 12 * 3);
    // Per size: the raw side's two calibration loops and its 2 timed loops.
    EXPECT_EQ(raw.finished, 12 * 4);
    // The checks: all_to_all_v uploads what it sends and the -1s it overwrites and reads
    // back what arrived; all_reduce uploads its values and reads back the sums (6 sizes).
    EXPECT_EQ(counting.from_host, 6 * 2 + 6 * 1);
    EXPECT_EQ(counting.to_host, 6 + 6);
    EXPECT_GE(counting.zeros, 6);  // each all_reduce size starts from zeros
    if (World().rank() == 0) {
      EXPECT_EQ(Count(out, "\"verified\":\"ok\""), 12) << out;
      EXPECT_EQ(Count(out, "\"device\":\"cuda\""), 12) << out;
    }
  }
  SetBackendForTesting(Device::kCUDA, before);
}

TEST(BenchComm, OneWrongValueFailsTheCheckOnEveryRank) {
  OnDevice comm(World(), Device::kCPU);
  comm.corrupt = true;
  auto raw = MakeRawMpiCollectives(MPI_COMM_WORLD);
  CommBenchOptions o = Small();
  o.ops = {"all_to_all_v", "all_reduce"};
  std::string out;
  const CommBenchResult r = RunCaptured(comm, *raw, Device::kCPU, o, &out);
  // The first size fails, on every rank, and nothing after it is measured.
  EXPECT_EQ(r.failure, "all_to_all_v returned wrong data at 4 bytes per peer");
  if (World().rank() == 0) {
    EXPECT_EQ(Count(out, "\"verified\":\"FAILED\""), 1) << out;
    EXPECT_EQ(Count(out, "\"bench\":\"comm\""), 1) << out;
  }
}

// Without the check the same transport is only timed.
TEST(BenchComm, NoCheckSkipsTheVerification) {
  OnDevice comm(World(), Device::kCPU);
  comm.corrupt = true;
  auto raw = MakeRawMpiCollectives(MPI_COMM_WORLD);
  CommBenchOptions o = Small();
  o.check = false;
  std::string out;
  const CommBenchResult r = RunCaptured(comm, *raw, Device::kCPU, o, &out);
  EXPECT_EQ(r.failure, "");
  if (World().rank() == 0) {
    EXPECT_EQ(Count(out, "\"verified\":\"skipped\""), 12) << out;
  }
}

}  // namespace
}  // namespace moerun
