// A GEMM of our own for the experts' products on the host: C = op(A) op(B) (+ C), fp32,
// row-major, in tiles of 12 rows x 32 columns held in AVX-512 registers.
//
// Why not OpenBLAS here: an expert's GEMMs have few rows (a capacity of 269-1075 tokens)
// against wide weights, and OpenBLAS 0.3.21 loses 10-25% of its square-GEMM speed at those
// shapes. This one reads the token-side operand in place (no packing), packs only the
// operand the vectors stream (the weights, or the tokens in the weight gradient), and
// sums each element in one fixed order: over k in blocks, each block's products in k order
// and then added to C. An element's bits therefore depend on neither the row or column
// count, the element's position, nor the thread count.
#ifndef MOERUN_RUNTIME_BLOCKED_GEMM_H_
#define MOERUN_RUNTIME_BLOCKED_GEMM_H_

#include <cstdint>

namespace moerun {

// True when this build has the AVX-512 tiles (-march=native on an AVX-512 CPU); else
// BlockedGemm runs OpenBLAS, and the order and bit-for-bit promises above do not hold.
bool BlockedGemmAvailable();

// C[m,n] = op(A) op(B) (accumulate: C += op(A) op(B)); op(A) is [m,k], op(B) is [k,n],
// lda/ldb/ldc the row strides as stored. Inside an OpenMP region, or with one thread
// (SetNumThreads), it runs on the calling thread; else the columns are split over the
// process's threads, with the same bits.
void BlockedGemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const float* a,
                 int64_t lda, const float* b, int64_t ldb, bool accumulate, float* c, int64_t ldc);

// The k block: an element is summed over k in blocks of this many (the last may be
// shorter), each block's products in k order, each block's sum then added to C.
int64_t BlockedGemmKBlock(int64_t k);

}  // namespace moerun

#endif  // MOERUN_RUNTIME_BLOCKED_GEMM_H_
