// The CUDA backend's entry points for runtime/backend.cc (internal to runtime/). Always
// compiled; without MOERUN_WITH_CUDA they report "not built".
#ifndef MOERUN_RUNTIME_CUDA_BACKEND_H_
#define MOERUN_RUNTIME_CUDA_BACKEND_H_

namespace moerun {

class Backend;

bool CudaBackendBuilt();
// The process's CUDA backend on its bound device (BindCudaDevice, else device 0), created on
// first use; nullptr when not built or no device is visible.
Backend* CudaBackendOrNull();

}  // namespace moerun

#endif  // MOERUN_RUNTIME_CUDA_BACKEND_H_
