// The CUDA table of model/ops.h (built with nvcc: model/ops_cuda.cu).
#ifndef MOERUN_MODEL_OPS_CUDA_H_
#define MOERUN_MODEL_OPS_CUDA_H_

namespace moerun {

// Installs the CUDA implementations of model/ops.h's ops: fp32 cuBLAS GEMMs (row-major
// over column-major cuBLAS), the composed self-attention over them, the Thrust kernels of
// model/dense_kernels_thrust.h for the rest, AdamW on the backend's stream.
void RegisterCudaOps();

}  // namespace moerun

#endif  // MOERUN_MODEL_OPS_CUDA_H_
