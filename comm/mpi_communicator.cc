// MPI backend: thin, checked wrappers over MPI collectives, plus job-wide failure handling.
#include "comm/mpi_communicator.h"

#include <glog/logging.h>

#include <array>
#include <atomic>
#include <chrono>
#include <climits>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <sstream>
#include <thread>
#include <vector>

#include "comm/watchdog.h"
#include "runtime/process.h"

namespace moerun {
namespace {

std::unique_ptr<Watchdog> g_watchdog;
std::atomic<double> g_watchdog_timeout_s{300};  // read by NCCL communicators' device waits

bool MpiActive() {
  int initialised = 0, finalised = 0;
  MPI_Initialized(&initialised);
  MPI_Finalized(&finalised);
  return initialised && !finalised;
}

void AbortAllRanks(int exit_code) {
  std::fflush(stdout);
  std::fflush(stderr);
  if (MpiActive()) MPI_Abort(MPI_COMM_WORLD, exit_code);
}

// Exit code of a job the watchdog ended.
constexpr int kWatchdogExitCode = 75;

// The watchdog's peer service over a communicator of its own (a duplicate of the world made
// at start-up): tag 1 asks "where are you?", tag 2 answers with the state, encoded as
// "in|<op>|<comm>|<seq>|<seconds>" or "out|<op>|<comm>|<seq>|<seconds>".
MPI_Comm g_watchdog_comm = MPI_COMM_NULL;
constexpr int kAskTag = 1, kAnswerTag = 2, kAnswerBytes = 512;

std::string Encode(const WatchdogState& s) {
  std::ostringstream o;
  o << (s.in_collective ? "in" : "out") << "|" << s.op << "|" << s.comm << "|" << s.seq << "|"
    << s.seconds;
  return o.str();
}

WatchdogState Decode(const std::string& text) {
  WatchdogState s;
  std::vector<std::string> f;
  std::stringstream in(text);
  for (std::string part; std::getline(in, part, '|');) f.push_back(part);
  if (f.size() != 5) return s;
  s.in_collective = f[0] == "in";
  s.op = f[1];
  s.comm = f[2];
  s.seq = std::strtoll(f[3].c_str(), nullptr, 10);
  s.seconds = std::strtod(f[4].c_str(), nullptr);
  return s;
}

class MpiPeerService : public PeerService {
 public:
  void Serve(const WatchdogState& mine) override {
    const std::string answer = Encode(mine);
    for (;;) {
      int flag = 0;
      MPI_Status status;
      if (MPI_Iprobe(MPI_ANY_SOURCE, kAskTag, g_watchdog_comm, &flag, &status) != MPI_SUCCESS ||
          !flag) {
        return;
      }
      int ask = 0;
      MPI_Recv(&ask, 1, MPI_INT, status.MPI_SOURCE, kAskTag, g_watchdog_comm, MPI_STATUS_IGNORE);
      char buf[kAnswerBytes] = {};
      std::snprintf(buf, sizeof(buf), "%s", answer.c_str());
      MPI_Send(buf, kAnswerBytes, MPI_CHAR, status.MPI_SOURCE, kAnswerTag, g_watchdog_comm);
    }
  }

  std::string AskPeers(const WatchdogState& mine, double grace_s) override {
    int me = 0, size = 1;
    MPI_Comm_rank(g_watchdog_comm, &me);
    MPI_Comm_size(g_watchdog_comm, &size);
    std::vector<MPI_Request> sends(size, MPI_REQUEST_NULL), recvs(size, MPI_REQUEST_NULL);
    std::vector<std::array<char, kAnswerBytes>> answers(size);
    std::vector<int> asks(size, 1);
    std::vector<bool> got(size, false);
    for (int p = 0; p < size; ++p) {
      if (p == me) continue;
      MPI_Irecv(answers[p].data(), kAnswerBytes, MPI_CHAR, p, kAnswerTag, g_watchdog_comm,
                &recvs[p]);
      MPI_Isend(&asks[p], 1, MPI_INT, p, kAskTag, g_watchdog_comm, &sends[p]);
    }
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(grace_s);
    int pending = size - 1;
    while (pending > 0 && std::chrono::steady_clock::now() < deadline) {
      Serve(mine);  // peers that time out too ask us
      for (int p = 0; p < size; ++p) {
        if (p == me || got[p]) continue;
        int done = 0;
        MPI_Test(&recvs[p], &done, MPI_STATUS_IGNORE);
        if (done) {
          got[p] = true;
          --pending;
        }
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
    std::ostringstream o;
    std::string missing;
    o << "Asked every rank where it is: ";
    for (int p = 0; p < size; ++p) {
      if (p == me) continue;
      o << "rank " << p << ": ";
      bool arrived = false;
      if (!got[p]) {
        o << "did not answer within " << grace_s << " s (stopped, dead, or hung outside MPI)";
      } else {
        const WatchdogState s = Decode(std::string(answers[p].data()));
        o << DescribeState(s);
        arrived = s.in_collective && s.seq == mine.seq && s.op == mine.op;
        if (s.in_collective && !arrived)
          o << " (another collective than this rank's #" << mine.seq << ")";
      }
      if (!arrived) missing += (missing.empty() ? "" : ", ") + std::to_string(p);
      o << "; ";
    }
    if (missing.empty()) {
      o << "every rank is in this collective (a communication failure?).";
    } else {
      o << "did not arrive: rank" << (missing.find(',') != std::string::npos ? "s " : " ")
        << missing << ".";
    }
    return o.str();
  }
};

void OnWatchdogTimeout(const std::string& message) {
  LOG(ERROR) << message;
  AbortJob(kWatchdogExitCode);
}

// A rank that calls exit() (or returns from main) while MPI is still up would leave its
// peers waiting in their next collective: end the job instead, naming the rank.
void AbortIfExitingWithMpiActive() {
  if (!MpiActive()) return;
  LOG(ERROR) << RankTag()
             << ": process is exiting without MPI_Finalize (exit() called while the job "
                "runs); aborting the job so that no other rank waits for it";
  AbortAllRanks(1);
}

int ToInt(int64_t v, const char* what, const std::string& comm) {
  CHECK(v >= 0 && v <= INT_MAX) << what << " " << v << " on communicator '" << comm
                                << "' does not fit MPI's int counts";
  return static_cast<int>(v);
}

MPI_Op ToMpiOp(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
      return MPI_SUM;
    case ReduceOp::kMax:
      return MPI_MAX;
    case ReduceOp::kMin:
      return MPI_MIN;
  }
  return MPI_SUM;
}

}  // namespace

namespace internal {
void CheckMpiResult(int result, const char* call, const char* file, int line) {
  if (result == MPI_SUCCESS) return;
  char text[MPI_MAX_ERROR_STRING] = {0};
  int len = 0;
  MPI_Error_string(result, text, &len);
  LOG(ERROR) << RankTag() << ": MPI call " << call << " failed at " << file << ":" << line << ": "
             << text << "; aborting the job";
  AbortJob(1);
}
}  // namespace internal

MPI_Datatype ToMpiType(DType dtype) {
  switch (dtype) {
    case DType::kF32:
      return MPI_FLOAT;
    case DType::kBF16:
      return MPI_UINT16_T;
    case DType::kF64:
      return MPI_DOUBLE;
    case DType::kI32:
      return MPI_INT32_T;
    case DType::kI64:
      return MPI_INT64_T;
    case DType::kU8:
      return MPI_UINT8_T;
  }
  return MPI_BYTE;
}

// ---------------------------------------------------------------------------------------
MpiRuntime::MpiRuntime(int* argc, char*** argv, const MpiOptions& options) {
  CHECK(!MpiActive()) << "MpiRuntime created twice";
  MOERUN_MPI_CHECK(MPI_Init_thread(argc, argv, MPI_THREAD_MULTIPLE, &thread_level_));
  MOERUN_MPI_CHECK(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN));
  ProcessInfo info = Process();
  if (info.host.empty()) info = DiscoverProcessFromEnvironment();
  MPI_Comm_rank(MPI_COMM_WORLD, &info.rank);
  MPI_Comm_size(MPI_COMM_WORLD, &info.world_size);
  MPI_Comm local;
  MOERUN_MPI_CHECK(
      MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, info.rank, MPI_INFO_NULL, &local));
  MPI_Comm_rank(local, &info.local_rank);
  MPI_Comm_size(local, &info.local_size);
  MPI_Comm_free(&local);
  SetProcess(info);
  SetFatalHandler(&AbortAllRanks);
  static bool exit_hook_installed = false;
  if (!exit_hook_installed) {
    std::atexit(&AbortIfExitingWithMpiActive);
    exit_hook_installed = true;
  }
  // Collective, once, at start-up: the watchdog's own communicator.
  MOERUN_MPI_CHECK(MPI_Comm_dup(MPI_COMM_WORLD, &g_watchdog_comm));
  MPI_Comm_set_errhandler(g_watchdog_comm, MPI_ERRORS_RETURN);
  SetWatchdogTimeout(options.watchdog_timeout_s);
}

MpiRuntime::~MpiRuntime() {
  g_watchdog.reset();
  if (g_watchdog_comm != MPI_COMM_NULL && MpiActive()) MPI_Comm_free(&g_watchdog_comm);
  g_watchdog_comm = MPI_COMM_NULL;
  if (MpiActive()) MPI_Finalize();
  SetFatalHandler(nullptr);
}

double WatchdogTimeoutSeconds() { return g_watchdog_timeout_s.load(); }

void MpiRuntime::SetWatchdogTimeout(double timeout_s) {
  g_watchdog_timeout_s.store(timeout_s > 0 ? timeout_s : 0);
  g_watchdog.reset();
  if (timeout_s <= 0) return;
  std::unique_ptr<PeerService> peers;
  if (g_watchdog_comm != MPI_COMM_NULL && thread_level_ == MPI_THREAD_MULTIPLE) {
    peers = std::make_unique<MpiPeerService>();
  }
  g_watchdog = std::make_unique<Watchdog>(timeout_s, &OnWatchdogTimeout, std::move(peers));
}

std::unique_ptr<Communicator> MpiRuntime::World() {
  MPI_Comm dup;
  MOERUN_MPI_CHECK(MPI_Comm_dup(MPI_COMM_WORLD, &dup));
  return std::make_unique<MpiCommunicator>(dup, "world");
}

std::string MpiRuntime::LibraryVersion() {
  char text[MPI_MAX_LIBRARY_VERSION_STRING] = {0};
  int len = 0;
  MPI_Get_library_version(text, &len);
  std::string s(text, len);
  const size_t nl = s.find_first_of("\n,");
  return nl == std::string::npos ? s : s.substr(0, nl);
}

// ---------------------------------------------------------------------------------------
MpiCommunicator::MpiCommunicator(MPI_Comm comm, std::string name)
    : comm_(comm), name_(std::move(name)) {
  MOERUN_MPI_CHECK(MPI_Comm_set_errhandler(comm_, MPI_ERRORS_RETURN));
  MOERUN_MPI_CHECK(MPI_Comm_rank(comm_, &rank_));
  MOERUN_MPI_CHECK(MPI_Comm_size(comm_, &size_));
  send_counts_.resize(size_);
  send_displs_.resize(size_);
  recv_counts_.resize(size_);
  recv_displs_.resize(size_);
}

MpiCommunicator::~MpiCommunicator() {
  if (MpiActive() && comm_ != MPI_COMM_NULL) MPI_Comm_free(&comm_);
}

void MpiCommunicator::ToIntCounts(const std::vector<int64_t>& send_counts,
                                  const std::vector<int64_t>& send_displs,
                                  const std::vector<int64_t>& recv_counts,
                                  const std::vector<int64_t>& recv_displs, std::vector<int>* sc,
                                  std::vector<int>* sd, std::vector<int>* rc,
                                  std::vector<int>* rd) const {
  CHECK(static_cast<int>(send_counts.size()) == size_ &&
        static_cast<int>(send_displs.size()) == size_ &&
        static_cast<int>(recv_counts.size()) == size_ &&
        static_cast<int>(recv_displs.size()) == size_)
      << "all_to_all_v on '" << name_ << "' needs " << size_ << " counts and displacements";
  for (std::vector<int>* v : {sc, sd, rc, rd}) v->resize(size_);
  for (int p = 0; p < size_; ++p) {
    (*sc)[p] = ToInt(send_counts[p], "send count", name_);
    (*sd)[p] = ToInt(send_displs[p], "send displacement", name_);
    (*rc)[p] = ToInt(recv_counts[p], "recv count", name_);
    (*rd)[p] = ToInt(recv_displs[p], "recv displacement", name_);
  }
}

void MpiCommunicator::AllToAllV(const void* send, const std::vector<int64_t>& send_counts,
                                const std::vector<int64_t>& send_displs, void* recv,
                                const std::vector<int64_t>& recv_counts,
                                const std::vector<int64_t>& recv_displs, DType dtype) {
  ToIntCounts(send_counts, send_displs, recv_counts, recv_displs, &send_counts_, &send_displs_,
              &recv_counts_, &recv_displs_);
  const MPI_Datatype type = ToMpiType(dtype);
  WatchdogScope watch(g_watchdog.get(), "all_to_all_v", &name_, size_);
  MOERUN_MPI_CHECK(MPI_Alltoallv(send, send_counts_.data(), send_displs_.data(), type, recv,
                                 recv_counts_.data(), recv_displs_.data(), type, comm_));
}

namespace {

class PendingMpiAllToAllV final : public PendingCollective {
 public:
  PendingMpiAllToAllV(const std::string* name, int size) : name_(name), size_(size) {}
  ~PendingMpiAllToAllV() override { Wait(); }
  bool Test() override {
    if (done_) return true;
    int flag = 0;
    MOERUN_MPI_CHECK(MPI_Test(&request_, &flag, MPI_STATUS_IGNORE));
    done_ = flag != 0;
    return done_;
  }
  void Wait() override {
    if (done_) return;
    WatchdogScope watch(g_watchdog.get(), "all_to_all_v (started earlier)", name_, size_);
    MOERUN_MPI_CHECK(MPI_Wait(&request_, MPI_STATUS_IGNORE));
    done_ = true;
  }

  MPI_Request request_ = MPI_REQUEST_NULL;
  std::vector<int> send_counts, send_displs, recv_counts, recv_displs;  // live until done

 private:
  const std::string* name_;
  int size_;
  bool done_ = false;
};

}  // namespace

std::unique_ptr<PendingCollective> MpiCommunicator::StartAllToAllV(
    const void* send, const std::vector<int64_t>& send_counts,
    const std::vector<int64_t>& send_displs, void* recv, const std::vector<int64_t>& recv_counts,
    const std::vector<int64_t>& recv_displs, DType dtype) {
  auto pending = std::make_unique<PendingMpiAllToAllV>(&name_, size_);
  ToIntCounts(send_counts, send_displs, recv_counts, recv_displs, &pending->send_counts,
              &pending->send_displs, &pending->recv_counts, &pending->recv_displs);
  const MPI_Datatype type = ToMpiType(dtype);
  MOERUN_MPI_CHECK(MPI_Ialltoallv(send, pending->send_counts.data(), pending->send_displs.data(),
                                  type, recv, pending->recv_counts.data(),
                                  pending->recv_displs.data(), type, comm_, &pending->request_));
  return pending;
}

void MpiCommunicator::AllReduce(void* buffer, int64_t count, DType dtype, ReduceOp op) {
  CHECK(dtype != DType::kBF16) << "all_reduce of bf16 is not supported on the MPI backend";
  const int n = ToInt(count, "all_reduce count", name_);
  WatchdogScope watch(g_watchdog.get(), "all_reduce", &name_, size_);
  MOERUN_MPI_CHECK(MPI_Allreduce(MPI_IN_PLACE, buffer, n, ToMpiType(dtype), ToMpiOp(op), comm_));
}

void MpiCommunicator::Broadcast(void* buffer, int64_t count, DType dtype, int root) {
  CHECK(root >= 0 && root < size_)
      << "broadcast root " << root << " on '" << name_ << "' of " << size_ << " ranks";
  const int n = ToInt(count, "broadcast count", name_);
  WatchdogScope watch(g_watchdog.get(), "broadcast", &name_, size_);
  MOERUN_MPI_CHECK(MPI_Bcast(buffer, n, ToMpiType(dtype), root, comm_));
}

void MpiCommunicator::AllGather(const void* send, int64_t count, void* recv, DType dtype) {
  const int n = ToInt(count, "all_gather count", name_);
  const MPI_Datatype type = ToMpiType(dtype);
  WatchdogScope watch(g_watchdog.get(), "all_gather", &name_, size_);
  MOERUN_MPI_CHECK(MPI_Allgather(send, n, type, recv, n, type, comm_));
}

void MpiCommunicator::Barrier() {
  WatchdogScope watch(g_watchdog.get(), "barrier", &name_, size_);
  MOERUN_MPI_CHECK(MPI_Barrier(comm_));
}

std::unique_ptr<Communicator> MpiCommunicator::Split(int color, int key, const std::string& name) {
  MPI_Comm sub;
  {
    WatchdogScope watch(g_watchdog.get(), "split", &name_, size_);
    MOERUN_MPI_CHECK(MPI_Comm_split(comm_, color, key, &sub));
  }
  return std::make_unique<MpiCommunicator>(sub, name);
}

}  // namespace moerun
