// Multi-rank tests of the MPI Communicator (run by CTest under mpirun -np 1, 2 and 4).
#include <gtest/gtest.h>

#include <numeric>

#include "comm/communicator.h"
#include "comm/loopback_communicator.h"
#include "comm/nccl_communicator.h"
#include "runtime/backend.h"
#include "tests/mpi_test_main.h"

namespace moerun {
namespace {

using testing::World;

// Value rank `from` sends to rank `to` as its i-th element.
float Sent(int from, int to, int64_t i) { return static_cast<float>(from * 10000 + to * 100 + i); }

// Rank r sends (r + q) % 3 elements to peer q: uneven, with zero counts.
int64_t UnevenCount(int from, int to) { return (from + to) % 3; }

TEST(CommTest, AllToAllVUnevenWithZeroCounts) {
  Communicator& c = World();
  const int p = c.size(), r = c.rank();
  std::vector<int64_t> sc(p), rc(p);
  for (int q = 0; q < p; ++q) {
    sc[q] = UnevenCount(r, q);
    rc[q] = UnevenCount(q, r);
  }
  const std::vector<int64_t> sd = PrefixDisplacements(sc), rd = PrefixDisplacements(rc);
  std::vector<float> send(std::accumulate(sc.begin(), sc.end(), int64_t{0}));
  std::vector<float> recv(std::accumulate(rc.begin(), rc.end(), int64_t{0}), -1.0f);
  for (int q = 0; q < p; ++q) {
    for (int64_t i = 0; i < sc[q]; ++i) send[sd[q] + i] = Sent(r, q, i);
  }
  c.AllToAllV(send.data(), sc, sd, recv.data(), rc, rd, DType::kF32);
  for (int q = 0; q < p; ++q) {
    for (int64_t i = 0; i < rc[q]; ++i) EXPECT_EQ(recv[rd[q] + i], Sent(q, r, i)) << "from " << q;
  }
}

// The non-blocking form: the same data once Wait() returns, Test() true after it; the
// caller's count vectors may go out of scope right after the start.
TEST(CommTest, StartAllToAllVCompletesWithTheSameData) {
  Communicator& c = World();
  const int p = c.size(), r = c.rank();
  std::vector<float> send, recv;
  std::unique_ptr<PendingCollective> pending;
  std::vector<int64_t> rc(p), rd;
  {
    std::vector<int64_t> sc(p);
    for (int q = 0; q < p; ++q) {
      sc[q] = 1000 + UnevenCount(r, q);
      rc[q] = 1000 + UnevenCount(q, r);
    }
    const std::vector<int64_t> sd = PrefixDisplacements(sc);
    rd = PrefixDisplacements(rc);
    send.resize(std::accumulate(sc.begin(), sc.end(), int64_t{0}));
    recv.assign(std::accumulate(rc.begin(), rc.end(), int64_t{0}), -1.0f);
    for (int q = 0; q < p; ++q) {
      for (int64_t i = 0; i < sc[q]; ++i) send[sd[q] + i] = Sent(r, q, i);
    }
    pending = c.StartAllToAllV(send.data(), sc, sd, recv.data(), rc, rd, DType::kF32);
  }
  for (int i = 0; i < 3; ++i) pending->Test();  // drives progress; may or may not be done
  pending->Wait();
  EXPECT_TRUE(pending->Test());
  for (int q = 0; q < p; ++q) {
    for (int64_t i = 0; i < rc[q]; ++i) {
      ASSERT_EQ(recv[rd[q] + i], Sent(q, r, i)) << "from " << q << " element " << i;
    }
  }
  // A collective after it still matches on every rank.
  double one = 1;
  c.AllReduce(&one, 1, DType::kF64, ReduceOp::kSum);
  EXPECT_EQ(one, p);
}

TEST(CommTest, AllToAllVRankThatSendsNothing) {
  Communicator& c = World();
  const int p = c.size(), r = c.rank();
  // The last rank sends nothing to anyone; every other rank sends 5 elements to each peer.
  auto count = [&](int from) -> int64_t { return from == p - 1 ? 0 : 5; };
  std::vector<int64_t> sc(p, count(r)), rc(p);
  for (int q = 0; q < p; ++q) rc[q] = count(q);
  const std::vector<int64_t> sd = PrefixDisplacements(sc), rd = PrefixDisplacements(rc);
  std::vector<int32_t> send(count(r) * p), recv(rd.back() + rc.back() + 1, -7);
  for (int q = 0; q < p; ++q) {
    for (int64_t i = 0; i < sc[q]; ++i) send[sd[q] + i] = r * 100 + q * 10 + static_cast<int>(i);
  }
  c.AllToAllV(send.data(), sc, sd, recv.data(), rc, rd, DType::kI32);
  for (int q = 0; q < p; ++q) {
    for (int64_t i = 0; i < rc[q]; ++i) {
      EXPECT_EQ(recv[rd[q] + i], q * 100 + r * 10 + static_cast<int>(i));
    }
  }
  EXPECT_EQ(recv.back(), -7) << "wrote past the received data";
}

TEST(CommTest, AllToAllVMovesBf16AndLargeMessages) {
  Communicator& c = World();
  const int p = c.size(), r = c.rank();
  const int64_t n = 300000;  // > 512 KiB per peer: past MPI's eager protocol
  std::vector<int64_t> counts(p, n), displs = PrefixDisplacements(counts);
  std::vector<BF16> send(n * p), recv(n * p);
  for (int q = 0; q < p; ++q) {
    for (int64_t i = 0; i < n; ++i)
      send[q * n + i] = FloatToBF16(static_cast<float>(r + q + i % 50));
  }
  c.AllToAllV(send.data(), counts, displs, recv.data(), counts, displs, DType::kBF16);
  for (int q = 0; q < p; ++q) {
    for (int64_t i = 0; i < n; i += 997) {
      EXPECT_EQ(BF16ToFloat(recv[q * n + i]), static_cast<float>(q + r + i % 50));
    }
  }
}

TEST(CommTest, AllReduceSumMaxMin) {
  Communicator& c = World();
  const int p = c.size(), r = c.rank();
  std::vector<float> v = {1.0f * r, 2.0f, -1.0f * r};
  c.AllReduce(v.data(), 3, DType::kF32, ReduceOp::kSum);
  EXPECT_EQ(v[0], p * (p - 1) / 2.0f);
  EXPECT_EQ(v[1], 2.0f * p);
  double m = r * 1.5;
  c.AllReduce(&m, 1, DType::kF64, ReduceOp::kMax);
  EXPECT_EQ(m, (p - 1) * 1.5);
  int64_t mn = 100 - r;
  c.AllReduce(&mn, 1, DType::kI64, ReduceOp::kMin);
  EXPECT_EQ(mn, 100 - (p - 1));
}

TEST(CommTest, BroadcastFromEveryRoot) {
  Communicator& c = World();
  for (int root = 0; root < c.size(); ++root) {
    std::vector<int32_t> v(4, c.rank() == root ? 40 + root : -1);
    c.Broadcast(v.data(), 4, DType::kI32, root);
    for (int32_t x : v) EXPECT_EQ(x, 40 + root);
  }
}

TEST(CommTest, AllGather) {
  Communicator& c = World();
  const int64_t n = 3;
  std::vector<double> mine(n), all(n * c.size());
  for (int64_t i = 0; i < n; ++i) mine[i] = c.rank() + 0.25 * i;
  c.AllGather(mine.data(), n, all.data(), DType::kF64);
  for (int q = 0; q < c.size(); ++q) {
    for (int64_t i = 0; i < n; ++i) EXPECT_EQ(all[q * n + i], q + 0.25 * i);
  }
}

TEST(CommTest, SplitIntoEvenAndOddGroups) {
  Communicator& c = World();
  const int r = c.rank(), p = c.size();
  // Keys reversed: the new ranks count down.
  auto sub = c.Split(r % 2, -r, "parity");
  const int members = (p - r % 2 + 1) / 2;
  EXPECT_EQ(sub->size(), members);
  EXPECT_EQ(sub->name(), "parity");
  EXPECT_EQ(sub->rank(), members - 1 - r / 2);
  int32_t sum = r;
  sub->AllReduce(&sum, 1, DType::kI32, ReduceOp::kSum);
  int32_t expected = 0;
  for (int q = r % 2; q < p; q += 2) expected += q;
  EXPECT_EQ(sum, expected);
  // The subgroup's all_to_all_v stays inside it.
  std::vector<int64_t> counts(sub->size(), 1), displs = PrefixDisplacements(counts);
  std::vector<int32_t> send(sub->size(), r), recv(sub->size(), -1);
  sub->AllToAllV(send.data(), counts, displs, recv.data(), counts, displs, DType::kI32);
  for (int q = 0; q < sub->size(); ++q) EXPECT_EQ(recv[q] % 2, r % 2);
  sub->Barrier();
}

TEST(CommTest, ExpertAndDataParallelGroupsFromSplit) {
  // The layout the MoE layer uses when P > E: ranks r and r + E hold the same experts.
  Communicator& c = World();
  const int p = c.size(), r = c.rank();
  const int e = p >= 2 ? p / 2 : 1;  // experts (a divisor of p)
  auto ep = c.Split(r / e, r, "expert_parallel");
  auto dp = c.Split(r % e, r, "expert_data_parallel");
  EXPECT_EQ(ep->size(), e);
  EXPECT_EQ(dp->size(), p / e);
  int32_t owner = r % e;  // replicas of one expert agree on which expert they hold
  dp->AllReduce(&owner, 1, DType::kI32, ReduceOp::kMax);
  EXPECT_EQ(owner, r % e);
}

TEST(CommTest, AgreeOnStatusReportsLowestFailingRank) {
  Communicator& c = World();
  EXPECT_TRUE(AgreeOnStatus(c, Status::Ok()).ok());
  const int p = c.size();
  const int failing = p - 1;  // the last rank fails, and (when p > 2) also rank 1
  Status local = Status::Ok();
  if (c.rank() == failing || (p > 2 && c.rank() == 1)) {
    local = Status::Error("disk full on rank " + std::to_string(c.rank()));
  }
  const Status agreed = AgreeOnStatus(c, local);
  ASSERT_FALSE(agreed.ok());
  const int first = p > 2 ? 1 : failing;
  const std::string expected = "disk full on rank " + std::to_string(first);
  EXPECT_EQ(agreed.message(), p > 1 ? "rank " + std::to_string(first) + ": " + expected : expected);
  // Agreed again (every rank now fails with it): it still names the rank that failed first.
  EXPECT_EQ(AgreeOnStatus(c, agreed).message(), agreed.message());
}

}  // namespace
// The simulated peers of dry-run: each sends what this rank sends itself.
TEST(LoopbackTest, PeersMirrorThisRank) {
  LoopbackCommunicator c(2, 4);
  EXPECT_EQ(c.rank(), 2);
  EXPECT_EQ(c.size(), 4);
  // This rank sends 1, 2, 3, 2 elements to ranks 0..3 and expects 2, 1, 3, 5 back.
  const std::vector<float> send = {10, 20, 21, 30, 31, 32, 40, 41};
  const std::vector<int64_t> sc = {1, 2, 3, 2}, rc = {2, 1, 3, 5};
  std::vector<float> recv(11, -1);
  c.AllToAllV(send.data(), sc, PrefixDisplacements(sc), recv.data(), rc, PrefixDisplacements(rc),
              DType::kF32);
  // Self block {30, 31, 32}, repeated or cut to each peer's count.
  const std::vector<float> want = {30, 31, 30, 30, 31, 32, 30, 31, 32, 30, 31};
  EXPECT_EQ(recv, want);
  EXPECT_EQ(c.all_to_all_bytes_sent(), (1 + 2 + 2) * 4);
  EXPECT_EQ(c.all_to_all_bytes_received(), (2 + 1 + 5) * 4);
  double sum[2] = {1.5, -2}, mx[1] = {7};
  c.AllReduce(sum, 2, DType::kF64, ReduceOp::kSum);
  c.AllReduce(mx, 1, DType::kF64, ReduceOp::kMax);
  EXPECT_EQ(sum[0], 6.0);
  EXPECT_EQ(sum[1], -8.0);
  EXPECT_EQ(mx[0], 7.0);
  int32_t own = 9, all[4] = {0, 0, 0, 0};
  c.AllGather(&own, 1, all, DType::kI32);
  for (int v : all) EXPECT_EQ(v, 9);
  EXPECT_TRUE(AgreeOnStatus(c, Status::Ok()).ok());
  const Status failed = AgreeOnStatus(c, Status::Error("boom"));
  EXPECT_FALSE(failed.ok());
  EXPECT_EQ(failed.message(), "rank 2: boom");
  EXPECT_EQ(AgreeOnStatus(c, failed).message(), "rank 2: boom");
  EXPECT_EQ(AgreeOnStatus(c, Status::Error("rank x: boom")).message(), "rank 2: rank x: boom");
}

// Without a GPU on any rank (CI), CreateNcclCommunicator returns on every rank, each with
// the error (agreed over the ranks: none is left waiting in NCCL's init for another).
TEST(NcclCommunicatorTest, NoGpuFailsOnEveryRankWithoutHanging) {
  if (!NcclBuilt()) GTEST_SKIP() << "built without NCCL";
  if (CudaDeviceCount() > 0) GTEST_SKIP() << "a GPU is visible: NCCL's own tests cover it";
  auto* world = dynamic_cast<MpiCommunicator*>(&testing::World());
  ASSERT_NE(world, nullptr);
  auto nccl = CreateNcclCommunicator(*world, "no_gpu");
  ASSERT_FALSE(nccl.ok());
  EXPECT_NE(nccl.status().message().find("NCCL communicator 'no_gpu'"), std::string::npos)
      << nccl.status().message();
  EXPECT_NE(nccl.status().message().find("has no CUDA device"), std::string::npos)
      << nccl.status().message();
  // The ranks go on together afterwards.
  int one = 1;
  world->AllReduce(&one, 1, DType::kI32, ReduceOp::kSum);
  EXPECT_EQ(one, world->size());
}

}  // namespace moerun
