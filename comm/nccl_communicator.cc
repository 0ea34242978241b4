// The NCCL Communicator (see nccl_communicator.h).
#include "comm/nccl_communicator.h"

#include <glog/logging.h>

#include "runtime/backend.h"
#include "runtime/device_wait.h"
#include "runtime/process.h"

#ifdef MOERUN_WITH_NCCL
#include <cuda_runtime_api.h>
#include <nccl.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "runtime/tensor.h"
#endif

namespace moerun {

#ifdef MOERUN_WITH_NCCL
namespace {

ncclDataType_t ToNcclType(DType t) {
  switch (t) {
    case DType::kF32:
      return ncclFloat32;
    case DType::kBF16:
      return ncclBfloat16;
    case DType::kF64:
      return ncclFloat64;
    case DType::kI32:
      return ncclInt32;
    case DType::kI64:
      return ncclInt64;
    case DType::kU8:
      return ncclUint8;
  }
  return ncclUint8;
}

ncclRedOp_t ToNcclOp(ReduceOp op) {
  switch (op) {
    case ReduceOp::kSum:
      return ncclSum;
    case ReduceOp::kMax:
      return ncclMax;
    case ReduceOp::kMin:
      return ncclMin;
  }
  return ncclSum;
}

class NcclCommunicator final : public Communicator {
 public:
  NcclCommunicator(std::unique_ptr<Communicator> mpi, ncclComm_t comm, cudaStream_t stream,
                   std::string name, double timeout_s)
      : mpi_(std::move(mpi)),
        comm_(comm),
        stream_(stream),
        name_(std::move(name)),
        timeout_s_(timeout_s) {
    CudaCheck(cudaEventCreateWithFlags(&main_done_, cudaEventDisableTiming), "cudaEventCreate");
    // Every device wait of this process (the backend's Synchronize, a blocking copy) runs
    // this between its polls: this communicator's collectives may be what it waits for.
    wait_check_ = AddDeviceWaitCheck(
        [this](double waited_s, const std::string& what) { CheckProgress(waited_s, what); });
  }
  ~NcclCommunicator() override {
    // ncclCommDestroy flushes the outstanding work inside the driver, where a dead peer
    // would block it with no word: wait through the poll first (the check still
    // registered), so that a stuck collective ends the job with its message.
    if (comm_ != nullptr) Synchronize();
    RemoveDeviceWaitCheck(wait_check_);
    if (side_ != nullptr) {  // both return at once; CUDA frees them once their work is done
      cudaEventDestroy(side_ready_);
      cudaEventDestroy(side_done_);
      cudaStreamDestroy(side_);
    }
    if (main_done_ != nullptr) cudaEventDestroy(main_done_);
    if (comm_ != nullptr) ncclCommDestroy(comm_);
  }

  int rank() const override { return mpi_->rank(); }
  int size() const override { return mpi_->size(); }
  const std::string& name() const override { return name_; }
  Device device() const override { return Device::kCUDA; }
  void* stream() const override { return stream_; }
  void SetStream(void* stream) override { stream_ = static_cast<cudaStream_t>(stream); }

  void AllToAllV(const void* send, const std::vector<int64_t>& send_counts,
                 const std::vector<int64_t>& send_displs, void* recv,
                 const std::vector<int64_t>& recv_counts, const std::vector<int64_t>& recv_displs,
                 DType dtype) override {
    CheckNothingInFlight("all_to_all_v");
    EnqueueAllToAllV(send, send_counts, send_displs, recv, recv_counts, recv_displs, dtype,
                     stream_);
    MarkQueued();
  }
  // The transfer runs on a second stream of this communicator (created on first use), after
  // the work queued so far on the communicator's stream (the send buffer is ready), so the
  // work queued next on the communicator's stream (the experts on the rows already here)
  // runs beside it. Wait() makes the communicator's stream wait for it without blocking the
  // host; Test() asks whether it has completed. Nothing else is queued on this communicator
  // until Wait() (checked: the collectives of this communicator end the job if one is
  // called in between), nor on another communicator of this GPU (NCCL kernels of two
  // communicators running at once can deadlock): Dispatcher::ToExpertsOverlapped queues
  // only copies and expert GEMMs in between. The pending collective must not outlive the
  // communicator.
  std::unique_ptr<PendingCollective> StartAllToAllV(
      const void* send, const std::vector<int64_t>& send_counts,
      const std::vector<int64_t>& send_displs, void* recv, const std::vector<int64_t>& recv_counts,
      const std::vector<int64_t>& recv_displs, DType dtype) override {
    CheckNothingInFlight("the overlapped all_to_all_v");
    if (side_ == nullptr) {
      CudaCheck(cudaStreamCreateWithFlags(&side_, cudaStreamNonBlocking), "cudaStreamCreate");
      CudaCheck(cudaEventCreateWithFlags(&side_ready_, cudaEventDisableTiming), "cudaEventCreate");
      CudaCheck(cudaEventCreateWithFlags(&side_done_, cudaEventDisableTiming), "cudaEventCreate");
    }
    CudaCheck(cudaEventRecord(side_ready_, stream_), "cudaEventRecord");
    CudaCheck(cudaStreamWaitEvent(side_, side_ready_, 0), "cudaStreamWaitEvent");
    EnqueueAllToAllV(send, send_counts, send_displs, recv, recv_counts, recv_displs, dtype, side_);
    CudaCheck(cudaEventRecord(side_done_, side_), "cudaEventRecord");
    in_flight_ = true;
    return std::make_unique<Pending>(this);
  }

  void AllReduce(void* buffer, int64_t count, DType dtype, ReduceOp op) override {
    CheckNothingInFlight("all_reduce");
    Check(ncclAllReduce(buffer, buffer, static_cast<size_t>(count), ToNcclType(dtype), ToNcclOp(op),
                        comm_, stream_),
          "ncclAllReduce");
    MarkQueued();
  }
  void Broadcast(void* buffer, int64_t count, DType dtype, int root) override {
    CheckNothingInFlight("broadcast");
    Check(ncclBroadcast(buffer, buffer, static_cast<size_t>(count), ToNcclType(dtype), root, comm_,
                        stream_),
          "ncclBroadcast");
    MarkQueued();
  }
  void AllGather(const void* send, int64_t count, void* recv, DType dtype) override {
    CheckNothingInFlight("all_gather");
    Check(ncclAllGather(send, recv, static_cast<size_t>(count), ToNcclType(dtype), comm_, stream_),
          "ncclAllGather");
    MarkQueued();
  }
  void Barrier() override {
    Synchronize();
    mpi_->Barrier();
  }
  std::unique_ptr<Communicator> Split(int color, int key, const std::string& name) override {
    Synchronize();
    std::unique_ptr<Communicator> sub = mpi_->Split(color, key, name);
    auto* sub_mpi = dynamic_cast<MpiCommunicator*>(sub.get());
    CHECK(sub_mpi != nullptr) << "NCCL split of '" << name_ << "': bootstrap is not MPI";
    auto nccl = CreateNcclCommunicator(*sub_mpi, name, stream_, timeout_s_);
    CHECK(nccl.ok()) << nccl.status().message();
    return std::move(*nccl);
  }

  // Polls the stream instead of blocking in cudaStreamSynchronize, so that a peer's failure
  // (NCCL's asynchronous error) or a peer that never comes (the timeout) ends the job.
  // Both streams: the communicator's, and the side stream of StartAllToAllV.
  void Synchronize() override {
    WaitForStream(stream_, "collectives");
    if (side_ != nullptr) WaitForStream(side_, "the overlapped all_to_all_v");
  }

 private:
  void WaitForStream(cudaStream_t stream, const char* what) {
    WaitForCudaStream(stream, std::string("NCCL ") + what + " on '" + name_ + "'");
  }

  // The device-wait check: a peer's failure (NCCL's asynchronous error) or no progress for
  // longer than the watchdog timeout ends the job. Every communicator's check runs in every
  // device wait: past the timeout, the one with a collective still queued aborts and names
  // itself; one with none waits another timeout (for a busy one to speak first), then ends
  // the job saying the stuck work is not its collectives.
  void CheckProgress(double waited_s, const std::string& what) {
    CheckAsyncError();
    const double timeout_s = timeout_s_ >= 0 ? timeout_s_ : WatchdogTimeoutSeconds();
    if (comm_ == nullptr || timeout_s <= 0 || waited_s <= timeout_s) return;
    if (Busy()) {
      ncclCommAbort(comm_);
      comm_ = nullptr;
      LOG(FATAL) << RankTag() << ": waiting for " << what << " made no progress for " << waited_s
                 << " s while NCCL communicator '" << name_ << "' (" << size()
                 << " ranks) had a collective queued: a peer rank failed or never reached the "
                    "same collective (--watchdog-timeout)";
    }
    if (waited_s > 2 * timeout_s) {
      LOG(FATAL) << RankTag() << ": waiting for " << what << " made no progress for " << waited_s
                 << " s; NCCL communicator '" << name_
                 << "' has none of its collectives outstanding, so the stuck work is a kernel or "
                    "copy on this rank's GPU, or NCCL calls made outside it (--watchdog-timeout)";
    }
  }

  // A collective was queued on the communicator's stream: its completion is what Busy asks.
  void MarkQueued() { CudaCheck(cudaEventRecord(main_done_, stream_), "cudaEventRecord"); }
  // Whether a collective of this communicator has not completed (an event never recorded
  // counts as complete).
  bool Busy() {
    for (cudaEvent_t e : {main_done_, side_done_}) {
      if (e == nullptr) continue;
      const cudaError_t q = cudaEventQuery(e);
      if (q == cudaErrorNotReady) {
        cudaGetLastError();  // not an error: leave no trace
        return true;
      }
    }
    return false;
  }

  // The all-to-all on the side stream: done when its side_done_ record has been reached.
  class Pending final : public PendingCollective {
   public:
    explicit Pending(NcclCommunicator* owner) : owner_(owner) {}
    ~Pending() override { Wait(); }
    bool Test() override {
      if (waited_) return true;
      const cudaError_t q = cudaEventQuery(owner_->side_done_);
      if (q == cudaSuccess) return true;
      if (q == cudaErrorNotReady) cudaGetLastError();  // not an error: leave no trace
      owner_->CudaCheck(q == cudaErrorNotReady ? cudaSuccess : q, "the overlapped all_to_all_v");
      owner_->CheckAsyncError();
      return false;
    }
    void Wait() override {
      if (waited_) return;
      waited_ = true;
      owner_->in_flight_ = false;
      owner_->CudaCheck(cudaStreamWaitEvent(owner_->stream_, owner_->side_done_, 0),
                        "cudaStreamWaitEvent");
    }

   private:
    NcclCommunicator* owner_;
    bool waited_ = false;
  };

  void CheckNothingInFlight(const char* call) const {
    CHECK(!in_flight_) << RankTag() << ": " << call << " on '" << name_
                       << "' while an overlapped all_to_all_v is in flight (Wait() it first)";
  }

  void EnqueueAllToAllV(const void* send, const std::vector<int64_t>& send_counts,
                        const std::vector<int64_t>& send_displs, void* recv,
                        const std::vector<int64_t>& recv_counts,
                        const std::vector<int64_t>& recv_displs, DType dtype, cudaStream_t stream) {
    const int p = size();
    CHECK(static_cast<int>(send_counts.size()) == p && static_cast<int>(send_displs.size()) == p &&
          static_cast<int>(recv_counts.size()) == p && static_cast<int>(recv_displs.size()) == p)
        << "all_to_all_v on '" << name_ << "' needs " << p << " counts and displacements";
    const size_t es = DTypeSize(dtype);
    const ncclDataType_t type = ToNcclType(dtype);
    // One group of point-to-point calls: NCCL schedules them together, no deadlock whatever
    // the order (the all-to-all of NCCL's own examples and of DeepSpeed / Tutel).
    Check(ncclGroupStart(), "ncclGroupStart");
    for (int peer = 0; peer < p; ++peer) {
      if (send_counts[peer] > 0) {
        Check(ncclSend(static_cast<const char*>(send) + send_displs[peer] * es,
                       static_cast<size_t>(send_counts[peer]), type, peer, comm_, stream),
              "ncclSend");
      }
      if (recv_counts[peer] > 0) {
        Check(ncclRecv(static_cast<char*>(recv) + recv_displs[peer] * es,
                       static_cast<size_t>(recv_counts[peer]), type, peer, comm_, stream),
              "ncclRecv");
      }
    }
    Check(ncclGroupEnd(), "ncclGroupEnd (all_to_all_v)");
  }

  // Ends the job when NCCL reports an asynchronous error (a peer failed).
  void CheckAsyncError() { CheckNcclAsyncError(&comm_, name_); }
  void CudaCheck(cudaError_t e, const char* call) {
    CHECK(e == cudaSuccess) << RankTag() << ": " << call << " on '" << name_
                            << "' failed: " << cudaGetErrorString(e);
  }
  void Check(ncclResult_t r, const char* call) {
    CHECK(r == ncclSuccess || r == ncclInProgress)
        << RankTag() << ": " << call << " on '" << name_ << "' failed: " << ncclGetErrorString(r)
        << (r == ncclSystemError || r == ncclRemoteError ? " (a peer or the network failed)" : "");
  }

  std::unique_ptr<Communicator> mpi_;
  ncclComm_t comm_;
  cudaStream_t stream_;
  std::string name_;
  double timeout_s_;             // < 0: the job's (WatchdogTimeoutSeconds, as the config sets it)
  cudaStream_t side_ = nullptr;  // StartAllToAllV's stream
  cudaEvent_t side_ready_ = nullptr, side_done_ = nullptr;
  cudaEvent_t main_done_ = nullptr;  // recorded after each collective on stream_ (Busy)
  bool in_flight_ = false;           // a StartAllToAllV not yet waited for
  int wait_check_ = 0;               // this communicator's device-wait check
};

}  // namespace

bool NcclBuilt() { return true; }

StatusOr<std::unique_ptr<Communicator>> CreateNcclCommunicator(const MpiCommunicator& bootstrap,
                                                               std::string name, void* stream,
                                                               double watchdog_timeout_s) {
  Backend* cuda = BackendFor(Device::kCUDA);
  MPI_Comm dup;
  MOERUN_MPI_CHECK(MPI_Comm_dup(bootstrap.mpi_comm(), &dup));
  MOERUN_MPI_CHECK(MPI_Comm_set_errhandler(dup, MPI_ERRORS_RETURN));
  auto mpi = std::make_unique<MpiCommunicator>(dup, name + "/bootstrap");
  // A rank without a GPU stops every rank (the others would wait for it in NCCL's init).
  const Status have_gpu = AgreeOnStatus(
      *mpi, cuda != nullptr ? Status::Ok()
                            : Status::Error("NCCL communicator '" + name + "': " + RankTag() +
                                            " has no CUDA device (" + CudaBackendSummary() + ")"));
  if (!have_gpu.ok()) return have_gpu;
  StatusOr<ncclComm_t> comm = InitNcclComm(*mpi, name);
  // Every rank stops alike, before the warm-up's collectives, when one rank has no
  // communicator (the others would wait in them for it).
  const Status agreed = AgreeOnStatus(*mpi, comm.status());
  if (!agreed.ok()) {
    if (comm.ok()) ncclCommDestroy(*comm);  // nothing was queued on it
    return comm.ok() ? Status::Error("NCCL communicator '" + name + "': " + agreed.message())
                     : comm.status();
  }
  cudaStream_t s = static_cast<cudaStream_t>(stream != nullptr ? stream : cuda->stream());
  std::unique_ptr<Communicator> nccl(
      new NcclCommunicator(std::move(mpi), *comm, s, std::move(name), watchdog_timeout_s));
  const int p = nccl->size();
  if (p > 1) {
    // NCCL connects to a peer on the first send/recv with it (and, with NCCL_RUNTIME_CONNECT
    // on, a collective's algorithm on its first call), allocating outside the backend's pool,
    // which keeps what it freed: connect now, before the model's memory fills the pool, with
    // one element to and from every peer and a one-element all-reduce.
    Tensor buf = Tensor::Empty({2 * p}, DType::kF32, Device::kCUDA);
    buf.SetZero();
    cuda->Synchronize();  // allocated and zeroed on the backend's stream; s may be another
    const std::vector<int64_t> counts(p, 1), displs = PrefixDisplacements(counts);
    float* data = buf.device_data<float>(Device::kCUDA);
    nccl->AllToAllV(data, counts, displs, data + p, counts, displs, DType::kF32);
    nccl->AllReduce(data, 1, DType::kF32, ReduceOp::kSum);
    nccl->Synchronize();
  }
  return nccl;
}

StatusOr<ncclComm_t> InitNcclComm(Communicator& bootstrap, const std::string& name) {
  // Rank 0's result travels ahead of the id, so that every rank stops alike when it has none.
  ncclUniqueId id{};
  const ncclResult_t got = bootstrap.rank() == 0 ? ncclGetUniqueId(&id) : ncclSuccess;
  int32_t ok = got == ncclSuccess ? 1 : 0;
  bootstrap.Broadcast(&ok, 1, DType::kI32, 0);
  if (!ok) {
    return Status::Error(
        "NCCL communicator '" + name + "': ncclGetUniqueId failed on rank 0" +
        (bootstrap.rank() == 0 ? std::string(": ") + ncclGetErrorString(got) : std::string()));
  }
  bootstrap.Broadcast(&id, sizeof(id), DType::kU8, 0);
  // Every collective algorithm's connections at init (not at its first call, NCCL 2.22's
  // default), while the backend's pool, which keeps what it frees, is still small: more
  // memory up front (NVLS buffers on NVSwitch nodes), none failing mid-run. A value the user
  // set stays (NCCL_RUNTIME_CONNECT=1 saves that memory where the GPU is not full).
  setenv("NCCL_RUNTIME_CONNECT", "0", /*overwrite=*/0);
  ncclComm_t comm = nullptr;
  const ncclResult_t r = ncclCommInitRank(&comm, bootstrap.size(), id, bootstrap.rank());
  if (r != ncclSuccess) {
    return Status::Error(RankTag() + ": ncclCommInitRank for '" + name +
                         "' failed: " + ncclGetErrorString(r) +
                         " (one GPU per rank: check CUDA_VISIBLE_DEVICES and ranks per node)");
  }
  return comm;
}

void CheckNcclAsyncError(ncclComm_t* comm, const std::string& name) {
  if (*comm == nullptr) return;
  ncclResult_t async = ncclSuccess;
  ncclCommGetAsyncError(*comm, &async);
  if (async == ncclSuccess || async == ncclInProgress) return;
  ncclCommAbort(*comm);
  *comm = nullptr;
  LOG(FATAL) << RankTag() << ": NCCL failed on communicator '" << name
             << "': " << ncclGetErrorString(async);
}

#else  // !MOERUN_WITH_NCCL

bool NcclBuilt() { return false; }

StatusOr<std::unique_ptr<Communicator>> CreateNcclCommunicator(const MpiCommunicator&,
                                                               std::string name, void*, double) {
  return Status::Error("NCCL communicator '" + name +
                       "': this moerun was built without NCCL (needs the CUDA toolkit and NCCL "
                       "at configure time)");
}

#endif

}  // namespace moerun
