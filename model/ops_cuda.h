// The CUDA table of model/ops.h (built with nvcc: model/ops_cuda.cu).
#ifndef MOERUN_MODEL_OPS_CUDA_H_
#define MOERUN_MODEL_OPS_CUDA_H_

namespace moerun {

// Installs the CUDA implementations of model/ops.h's ops: fp32 cuBLAS GEMMs (row-major
// over column-major cuBLAS), the composed self-attention over them, the Thrust kernels of
// model/dense_kernels_thrust.h for the rest, AdamW on the backend's stream.
void RegisterCudaOps();

// Waits for the CUDA backend's stream with its polling wait (runtime/device_wait.h). Run
// before a Thrust algorithm that hands a value back to the host (a reduction, copy_if's
// count): it ends in a blocking wait on its stream, where NCCL collectives are queued, and
// behind one whose peer died that wait would never return. After the drain it waits only on
// its own kernels. Algorithms that only queue (model/cuda_stream_policy.h) need no drain.
void DrainCudaBackendStream();

}  // namespace moerun

#endif  // MOERUN_MODEL_OPS_CUDA_H_
