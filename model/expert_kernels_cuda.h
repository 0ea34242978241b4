// Elementwise and reduction kernels of the CUDA expert MLP (model/expert_kernels_cuda.cu),
// around its cuBLAS GEMMs. Device pointers; every launch is queued on `stream` (a
// cudaStream_t). bf16 values are raw uint16 bit patterns (the upper half of an fp32).
#ifndef MOERUN_MODEL_EXPERT_KERNELS_CUDA_H_
#define MOERUN_MODEL_EXPERT_KERNELS_CUDA_H_

#include <cstdint>

namespace moerun {

// dst = bf16(src), rounding to nearest even (as FloatToBF16).
void CudaCastToBF16(const float* src, uint16_t* dst, int64_t n, void* stream);
// Per expert e (of `experts`, each `rows` x `cols`): h += bias[e]; act = bf16(gelu(h)).
// gelu_tanh: the tanh approximation (Flax / V-MoE), else the exact erf form.
void CudaBiasGeluForward(float* h, const float* bias, int64_t experts, int64_t rows, int64_t cols,
                         bool gelu_tanh, uint16_t* act, void* stream);
// y += bias per expert (no activation).
void CudaAddBias(float* y, const float* bias, int64_t experts, int64_t rows, int64_t cols,
                 void* stream);
// dh = d_act * gelu'(h) (fp32, in place over d_act) and its bf16 copy.
void CudaGeluBackward(const float* h, float* d_act, int64_t n, bool gelu_tanh, uint16_t* dh_bf16,
                      void* stream);
// dbias[e, c] += sum over rows of dy[e, r, c].
void CudaBiasGrad(const float* dy, float* dbias, int64_t experts, int64_t rows, int64_t cols,
                  void* stream);

}  // namespace moerun

#endif  // MOERUN_MODEL_EXPERT_KERNELS_CUDA_H_
