// MOERUN_CUDA_CHECK(call): a CUDA runtime call that must succeed; otherwise the job ends
// naming the call and CUDA's error. For code built against the CUDA runtime only.
#ifndef MOERUN_RUNTIME_CUDA_CHECK_H_
#define MOERUN_RUNTIME_CUDA_CHECK_H_

#include <cuda_runtime_api.h>
#include <glog/logging.h>

#define MOERUN_CUDA_CHECK(call)                                                          \
  do {                                                                                   \
    const cudaError_t err_ = (call);                                                     \
    CHECK(err_ == cudaSuccess) << #call << " failed: " << cudaGetErrorName(err_) << " (" \
                               << cudaGetErrorString(err_) << ")";                       \
  } while (0)

#endif  // MOERUN_RUNTIME_CUDA_CHECK_H_
