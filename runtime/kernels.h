// CPU fp32 kernels with explicit forward and backward, over plain row-major buffers.
// GEMMs go to OpenBLAS; row-wise kernels are parallel over rows with OpenMP. Backward
// functions that produce parameter gradients accumulate (+=) into them, so a gradient
// buffer zeroed once per step collects every use of the parameter.
#ifndef MOERUN_RUNTIME_KERNELS_H_
#define MOERUN_RUNTIME_KERNELS_H_

#include <cstdint>
#include <functional>
#include <string>

#include "runtime/tensor.h"

namespace moerun {

// Threads used by BLAS and the OpenMP kernels of this process. Set once at start-up.
void SetNumThreads(int threads);
int NumThreads();
// Runs body(i, worker) for i in [0, n): across the process's threads, each call on one
// thread with single-threaded BLAS inside it (worker: the thread, 0 the first), when n
// splits evenly over more than one thread; else one after another on this thread, worker 0.
// Each i's work then stays in one core's cache, and its GEMMs skip the threads'
// synchronisation inside each BLAS call. The calls must be independent of each other.
void ParallelOverItems(int64_t n, const std::function<void(int64_t, int)>& body);
// The default: this host's cores divided by the ranks on this host (at least 1).
int DefaultThreadsPerRank(int local_ranks);
// "OpenBLAS 0.3.21 ... (core Haswell, OpenMP, 2 threads)"
std::string BlasDescription();
// The threading of the OpenBLAS this process loaded: "OpenMP", "pthreads" or "sequential".
std::string BlasThreading();
// The threading this moerun was built to link (-DMOERUN_BLAS_THREADING): "OpenMP" or
// "pthreads". BlasThreading() differs when the loader found another build first
// (LD_LIBRARY_PATH, LD_PRELOAD, or a host without the linked build's folder).
std::string BlasThreadingBuilt();
// OpenBLAS (DYNAMIC_ARCH) picks its kernels from the CPU model when it loads; on CPUs it
// does not know (virtual machines reporting a generic model) it falls back to an SSE3-era
// core (Prescott), 5-8x slower than the AVX2 / AVX-512 kernels the CPU can run. Returns the
// OPENBLAS_CORETYPE this CPU should get ("SkylakeX", "Haswell") when the loaded core is
// such a fallback, else "". The core can only be chosen before OpenBLAS loads: main()
// re-executes moerun once with OPENBLAS_CORETYPE set.
std::string BlasCoreToRequest();
// The core OpenBLAS loaded ("Prescott", "SkylakeX").
std::string BlasDetectedCore();

// C[m,n] = alpha * op(A) op(B) + beta * C, all row-major; op(A) is [m,k], op(B) is [k,n].
// lda/ldb/ldc are the row strides of the matrices as stored.
void Gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
          int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc);
// `batch` independent GEMMs; matrix i starts at a + i*stride_a (etc.).
void GemmStridedBatched(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                        const float* a, int64_t lda, int64_t stride_a, const float* b, int64_t ldb,
                        int64_t stride_b, float beta, float* c, int64_t ldc, int64_t stride_c,
                        int64_t batch);
// Shape-checked GEMM over the last two dims of contiguous tensors (leading dims batch):
// c = alpha * op(a) op(b) + beta * c. b may be 2-D while a is 3-D (weights shared).
void Matmul(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, Tensor* c,
            float alpha = 1.0f, float beta = 0.0f);

// c[t,n] = sum_k a[t,k] * b[n,k] (c = a b^T), each element summed in a fixed order that
// depends on neither the row count, the row's position nor the thread count, so a row gives
// bitwise the same result however rows are split over ranks (BLAS does not promise this).
// For small n (the router: n = experts); slower than Gemm for large n.
void RowInvariantGemmNT(const float* a, const float* b, float* c, int64_t rows, int64_t n,
                        int64_t k);

// y[r,:] = softmax(x[r,:]); x and y may alias.
void SoftmaxForward(const float* x, float* y, int64_t rows, int64_t cols);
// dx = y * (dy - sum(dy * y)) per row; dx may alias dy.
void SoftmaxBackward(const float* y, const float* dy, float* dx, int64_t rows, int64_t cols);

// Softmax over each row in place, serial, with the vectorised exp below (within a few ulp
// of SoftmaxForward); for attention, where rows are short and many and the caller already
// runs in parallel.
void SoftmaxRowsInPlaceFast(float* x, int64_t rows, int64_t cols);

// The vectorised exp and erf the GELU kernels use, exposed for their accuracy tests.
float ExpForTest(float x);
float ErfForTest(float x);

// Exact GELU: 0.5 x (1 + erf(x / sqrt 2)), as ViT uses (not the tanh approximation); erf
// is evaluated by a vectorised rational approximation within 5e-7 of the true erf.
void GeluForward(const float* x, float* y, int64_t n);
// dx = dy * gelu'(x); dx may alias dy.
void GeluBackward(const float* x, const float* dy, float* dx, int64_t n);

// GELU's tanh approximation, 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), Flax's
// default nn.gelu and what V-MoE uses; tanh(u) = 1 - 2 / (1 + exp(2u)) with the vectorised
// exp.
void GeluTanhForward(const float* x, float* y, int64_t n);
// dx = dy * d/dx of the above; dx may alias dy.
void GeluTanhBackward(const float* x, const float* dy, float* dx, int64_t n);

// A linear layer's bias and GELU in one pass over its output: h[r, :] += bias, then
// act = gelu(h) (tanh_form: the tanh approximation), keeping h (the backward needs it).
// Equal bit for bit to AddBias followed by GeluForward / GeluTanhForward.
void BiasGeluForward(float* h, const float* bias, float* act, int64_t rows, int64_t cols,
                     bool tanh_form);
// The backward of the above in one pass: d = d * gelu'(h) in place, dbias += sum over rows
// of the new d (rows in order for any thread count). Equal bit for bit to GeluBackward /
// GeluTanhBackward followed by BiasBackward.
void GeluBiasBackward(const float* h, float* d, float* dbias, int64_t rows, int64_t cols,
                      bool tanh_form);
// BiasGeluForward that leaves in h what the backward needs, gelu'(h + bias), instead of
// h + bias: the GELU's erf (or tanh) is evaluated once for both, and the backward is then
// ScaleBiasBackward, a product at memory speed instead of the derivative again. act is
// equal bit for bit to BiasGeluForward's.
void BiasGeluForwardKeepGrad(float* h, const float* bias, float* act, int64_t rows, int64_t cols,
                             bool tanh_form);
// d *= g in place, dbias += sum over rows of the new d (rows in order for any thread count).
// With g from BiasGeluForwardKeepGrad, equal bit for bit to GeluBiasBackward on its h.
void ScaleBiasBackward(const float* g, float* d, float* dbias, int64_t rows, int64_t cols);

// ViT's (and Flax's nn.LayerNorm default) epsilon.
constexpr float kLayerNormEps = 1e-6f;
// y = (x - mean) * rstd * gamma + beta per row of `cols`; writes mean and rstd per row
// (needed by the backward).
void LayerNormForward(const float* x, const float* gamma, const float* beta, float* y, float* mean,
                      float* rstd, int64_t rows, int64_t cols, float eps = kLayerNormEps);
// Writes dx; accumulates dgamma and dbeta.
void LayerNormBackward(const float* x, const float* gamma, const float* mean, const float* rstd,
                       const float* dy, float* dx, float* dgamma, float* dbeta, int64_t rows,
                       int64_t cols);

// y[r,:] += bias (bias of `cols`).
void AddBias(float* y, const float* bias, int64_t rows, int64_t cols);
// dbias += sum over rows of dy.
void BiasBackward(const float* dy, float* dbias, int64_t rows, int64_t cols);
// y = a + b (y may alias a or b).
void Add(const float* a, const float* b, float* y, int64_t n);
// x *= s.
void Scale(float* x, float s, int64_t n);
// sum_i x[i]^2 in double (parallel; the order depends on the thread count).
double SumOfSquares(const float* x, int64_t n);
// y += alpha * x.
void Axpy(float alpha, const float* x, float* y, int64_t n);

// Mean softmax cross-entropy over rows whose label is >= 0 (label -1: ignored row).
// Writes the softmax probabilities (for the backward) and returns the mean loss; labels
// must be < classes. `valid_rows` (optional) receives the number of counted rows.
float CrossEntropyForward(const float* logits, const int32_t* labels, float* probs, int64_t rows,
                          int64_t classes, int64_t* valid_rows = nullptr);
// dlogits = (probs - onehot(label)) * scale for counted rows, 0 for ignored rows. For the
// gradient of the mean loss, scale = 1 / valid_rows.
void CrossEntropyBackward(const float* probs, const int32_t* labels, float* dlogits, int64_t rows,
                          int64_t classes, float scale);

}  // namespace moerun

#endif  // MOERUN_RUNTIME_KERNELS_H_
