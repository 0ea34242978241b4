// The CUDA table of model/ops.h (built with nvcc: model/ops_cuda.cu).
#ifndef MOERUN_MODEL_OPS_CUDA_H_
#define MOERUN_MODEL_OPS_CUDA_H_

namespace moerun {

// Installs the CUDA implementations of model/ops.h's ops: fp32 cuBLAS GEMMs (row-major
// over column-major cuBLAS), the composed self-attention over them, the Thrust kernels of
// model/dense_kernels_thrust.h for the rest, AdamW on the backend's stream.
void RegisterCudaOps();

// Waits for the CUDA backend's stream with its polling wait (runtime/device_wait.h). Run
// before thrust::device algorithms: they end in a blocking sync on the legacy default stream,
// which waits for the backend's (blocking) stream, where NCCL collectives are queued; behind
// one whose peer died that sync would never return. After the drain, Thrust waits only on its
// own kernels. The CUDA ops table's before_op.
void DrainCudaBackendStream();

}  // namespace moerun

#endif  // MOERUN_MODEL_OPS_CUDA_H_
