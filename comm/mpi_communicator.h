// The MPI backend of the Communicator, and the process's MPI set-up (initialisation,
// error handlers that end the whole job, the collective watchdog).
#ifndef MOERUN_COMM_MPI_COMMUNICATOR_H_
#define MOERUN_COMM_MPI_COMMUNICATOR_H_

#include <mpi.h>

#include <memory>
#include <string>

#include "comm/communicator.h"

namespace moerun {

// Checks an MPI call; on failure writes "rank R (host H): MPI call <call> failed at
// file:line: <MPI's error string>" and aborts every rank of the job.
#define MOERUN_MPI_CHECK(call) ::moerun::internal::CheckMpiResult((call), #call, __FILE__, __LINE__)

namespace internal {
void CheckMpiResult(int result, const char* call, const char* file, int line);
}  // namespace internal

struct MpiOptions {
  double watchdog_timeout_s = 300;  // 0: no watchdog
};

// The job's collective watchdog timeout in seconds, as MpiRuntime last set it (0: none;
// 300 before any MpiRuntime).
double WatchdogTimeoutSeconds();

// Owns MPI for the life of the process (one per process, created first thing in main).
// Initialises MPI (MPI_THREAD_MULTIPLE when available, so the watchdog thread may abort),
// makes MPI errors return to MOERUN_MPI_CHECK instead of killing the process silently,
// makes glog FATAL / failed CHECKs abort all ranks, refines the process identity from
// MPI, and finalises MPI on destruction.
class MpiRuntime {
 public:
  MpiRuntime(int* argc, char*** argv, const MpiOptions& options);
  ~MpiRuntime();
  MpiRuntime(const MpiRuntime&) = delete;
  MpiRuntime& operator=(const MpiRuntime&) = delete;

  // Changes the watchdog timeout (e.g. after the config is read). Not during a collective.
  // NCCL communicators follow it too (WatchdogTimeoutSeconds).
  void SetWatchdogTimeout(double timeout_s);
  // The world communicator (each call returns a new handle onto a duplicate of it).
  std::unique_ptr<Communicator> World();
  // "Open MPI v4.1.4, ..." (first line of MPI_Get_library_version).
  static std::string LibraryVersion();
  int thread_level() const { return thread_level_; }

 private:
  int thread_level_ = MPI_THREAD_SINGLE;
};

// A Communicator over an MPI communicator it owns (freed on destruction).
class MpiCommunicator : public Communicator {
 public:
  MpiCommunicator(MPI_Comm comm, std::string name);
  ~MpiCommunicator() override;

  int rank() const override { return rank_; }
  int size() const override { return size_; }
  const std::string& name() const override { return name_; }
  MPI_Comm mpi_comm() const { return comm_; }

  void AllToAllV(const void* send, const std::vector<int64_t>& send_counts,
                 const std::vector<int64_t>& send_displs, void* recv,
                 const std::vector<int64_t>& recv_counts, const std::vector<int64_t>& recv_displs,
                 DType dtype) override;
  // MPI_Ialltoallv; progress happens in the collective's Test() and Wait().
  std::unique_ptr<PendingCollective> StartAllToAllV(
      const void* send, const std::vector<int64_t>& send_counts,
      const std::vector<int64_t>& send_displs, void* recv, const std::vector<int64_t>& recv_counts,
      const std::vector<int64_t>& recv_displs, DType dtype) override;
  void AllReduce(void* buffer, int64_t count, DType dtype, ReduceOp op) override;
  void Broadcast(void* buffer, int64_t count, DType dtype, int root) override;
  void AllGather(const void* send, int64_t count, void* recv, DType dtype) override;
  void Barrier() override;
  std::unique_ptr<Communicator> Split(int color, int key, const std::string& name) override;

 private:
  // Checks the four vectors have size() entries and narrows them to MPI's int.
  void ToIntCounts(const std::vector<int64_t>& send_counts, const std::vector<int64_t>& send_displs,
                   const std::vector<int64_t>& recv_counts, const std::vector<int64_t>& recv_displs,
                   std::vector<int>* sc, std::vector<int>* sd, std::vector<int>* rc,
                   std::vector<int>* rd) const;

  MPI_Comm comm_;
  std::string name_;
  int rank_ = 0;
  int size_ = 1;
  // Scratch for the int counts MPI takes, kept to avoid allocating per call.
  std::vector<int> send_counts_, send_displs_, recv_counts_, recv_displs_;
};

MPI_Datatype ToMpiType(DType dtype);

}  // namespace moerun

#endif  // MOERUN_COMM_MPI_COMMUNICATOR_H_
