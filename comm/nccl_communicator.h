// The NCCL backend of the Communicator: collectives between GPUs, bootstrapped over MPI
// (rank 0's ncclUniqueId is broadcast on the MPI communicator), one GPU per rank (the
// Session binds each local rank to its GPU first). Built when CMake finds NCCL
// (MOERUN_WITH_NCCL); runs only where every rank has a GPU.
//
// Buffers are device memory of the rank's GPU. Collectives are queued on the
// communicator's stream and return at once (see Communicator's ordering notes);
// Synchronize() waits for them while polling NCCL's asynchronous error and the watchdog
// timeout, so a peer that fails or never arrives ends the job with a message naming this
// rank, the collective and the communicator instead of hanging.
#ifndef MOERUN_COMM_NCCL_COMMUNICATOR_H_
#define MOERUN_COMM_NCCL_COMMUNICATOR_H_

#include <memory>
#include <string>
#include <vector>

#include "comm/communicator.h"
#include "comm/mpi_communicator.h"

#ifdef MOERUN_WITH_NCCL
#include <nccl.h>
#endif

namespace moerun {

// True when this binary was built with NCCL.
bool NcclBuilt();

// Creates an NCCL communicator over the ranks of `bootstrap` (collective over it), ordered
// on `stream` (a cudaStream_t; nullptr: the CUDA backend's stream). The MPI communicator
// is duplicated and kept for Split. Fails when NCCL was not built or this rank has no GPU;
// when any rank's NCCL init fails, every rank returns an error (agreed over `bootstrap`).
// With more than one rank it connects to every peer before it returns (a one-element
// all-to-all and all-reduce), so NCCL's buffers are allocated before the model's.
// watchdog_timeout_s: no progress for this long in a device wait ends the job (0: never);
// < 0: the job's MPI watchdog timeout at each check, so that the config's
// comm.watchdog_timeout_s applies to NCCL too. Its Splits inherit it.
StatusOr<std::unique_ptr<Communicator>> CreateNcclCommunicator(const MpiCommunicator& bootstrap,
                                                               std::string name,
                                                               void* stream = nullptr,
                                                               double watchdog_timeout_s = -1);

#ifdef MOERUN_WITH_NCCL
// The NCCL communicator behind CreateNcclCommunicator, for a caller that drives NCCL's calls
// itself (bench comm's raw loops): over the ranks of `bootstrap` (collective over it), rank
// 0's unique id broadcast on it. When rank 0 cannot make the id every rank returns the error;
// when ncclCommInitRank fails, this rank does. `name` goes into the messages.
StatusOr<ncclComm_t> InitNcclComm(Communicator& bootstrap, const std::string& name);
// When `*comm` reports an asynchronous error (a peer failed): aborts it, sets it to nullptr
// and ends the job naming this rank and `name`. Nothing when *comm is nullptr.
void CheckNcclAsyncError(ncclComm_t* comm, const std::string& name);
#endif

}  // namespace moerun

#endif  // MOERUN_COMM_NCCL_COMMUNICATOR_H_
