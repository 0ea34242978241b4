// Waiting for queued device work without blocking forever. A plain cudaStreamSynchronize
// never returns when the stream holds an NCCL kernel whose peer rank died or never arrived
// (NCCL's kernels spin on the GPU). The device waits of moerun (the CUDA backend's
// Synchronize and blocking copies, the NCCL communicator's own waits) poll instead and, between
// polls, run the checks the communicators registered here: NCCL's asynchronous error and the
// watchdog timeout. A failed peer then ends the job with a message that names the rank.
// Host-only code, compiled and tested without a GPU.
#ifndef MOERUN_RUNTIME_DEVICE_WAIT_H_
#define MOERUN_RUNTIME_DEVICE_WAIT_H_

#include <functional>
#include <string>

namespace moerun {

// Runs between the polls of a device wait: `waited_s` is how long this wait has polled so far,
// `what` names what it waits for ("the device backend's stream"). Ends the job (LOG(FATAL))
// when what it watches failed or made no progress for too long; must not add or remove checks.
using DeviceWaitCheck = std::function<void(double waited_s, const std::string& what)>;

// Registers `check` for every device wait of this process (any thread); returns the id that
// RemoveDeviceWaitCheck takes. A communicator registers one for its lifetime.
int AddDeviceWaitCheck(DeviceWaitCheck check);
void RemoveDeviceWaitCheck(int id);
int DeviceWaitCheckCount();

// Polls `done` until it returns true: a few polls back to back, then one every 50 us, the
// registered checks run after each poll that found the work unfinished. `done` reports a
// device error itself (it ends the job naming `what`).
void PollDeviceWait(const std::function<bool()>& done, const std::string& what);

// PollDeviceWait over cudaStreamQuery of `stream` (a cudaStream_t); a CUDA error ends the job
// naming this rank and `what`. Defined by the CUDA backend (runtime/cuda_backend.cc); dies when
// CUDA was not built.
void WaitForCudaStream(void* stream, const std::string& what);

}  // namespace moerun

#endif  // MOERUN_RUNTIME_DEVICE_WAIT_H_
