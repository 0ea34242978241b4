// The tiles of blocked_gemm.h. Loops, outermost first: k in blocks of KBlock; columns in
// blocks that keep the packed B block within L2; rows in tiles of 12 (A read in place, or
// packed 12 rows at a time when transposed); columns in panels of 32 (two vectors), each a
// call of the register tile. The same loops run on every thread, over its own columns.
#include "runtime/blocked_gemm.h"

#include <glog/logging.h>
#include <omp.h>

#include <algorithm>
#include <cstring>

#include "runtime/kernels.h"
#include "runtime/tensor.h"

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace moerun {

int64_t BlockedGemmKBlock(int64_t k) {
  constexpr int64_t kMaxBlock = 384;
  const int64_t blocks = std::max<int64_t>(1, (k + kMaxBlock - 1) / kMaxBlock);
  const int64_t size = (k + blocks - 1) / blocks;
  return std::max<int64_t>(16, (size + 15) / 16 * 16);
}

#if defined(__AVX512F__)

bool BlockedGemmAvailable() { return true; }

namespace {

constexpr int kMr = 12;  // rows of a register tile
constexpr int kNr = 32;  // columns of a register tile: two 16-float vectors

// A per-thread buffer of at least `floats` floats (a host Tensor: 64-byte aligned, counted
// in the CPU backend's bytes).
float* ScratchBuffer(int slot, int64_t floats) {
  thread_local Tensor buffers[2];
  if (buffers[slot].numel() < floats) buffers[slot] = Tensor::Empty({floats});
  return buffers[slot].data<float>();
}

// The register tile: C[0:MR, cols] (+)= sum over kc of A(i, k) * Bp[k][0:32], where A(i, k)
// is a[i * lda + k] (kPacked false: rows read in place) or a[k * kMr + i] (packed), and Bp
// is a packed panel of 32 floats per k. The products of the block are summed from zero in
// k order (one fused multiply-add each), then added to C when `add_c`. Columns past `cols`
// (<= 32) are neither read nor written.
template <int MR, bool kPacked>
__attribute__((noinline)) void Tile(int64_t kc, const float* __restrict a, int64_t lda,
                                    const float* __restrict bp, float* c, int64_t ldc, int cols,
                                    bool add_c) {
  __m512 lo[MR], hi[MR];
  const __mmask16 mlo = cols >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << cols) - 1);
  const __mmask16 mhi =
      cols >= 32 ? 0xFFFF : (cols <= 16 ? 0 : static_cast<__mmask16>((1u << (cols - 16)) - 1));
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    lo[i] = _mm512_setzero_ps();
    hi[i] = _mm512_setzero_ps();
    _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc), _MM_HINT_T0);
    _mm_prefetch(reinterpret_cast<const char*>(c + i * ldc + 16), _MM_HINT_T0);
  }
  // One k step: the products of A(:, k) with the panel's row k (one FMA per element).
  auto step = [&](int64_t k) __attribute__((always_inline)) {
    const __m512 b0 = _mm512_load_ps(bp), b1 = _mm512_load_ps(bp + 16);
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const __m512 ai = _mm512_set1_ps(kPacked ? a[i] : a[i * lda + k]);
      lo[i] = _mm512_fmadd_ps(ai, b0, lo[i]);
      hi[i] = _mm512_fmadd_ps(ai, b1, hi[i]);
    }
    if (kPacked) a += kMr;
    bp += kNr;
  };
  // Eight steps per loop trip (measured 2-4% faster than one: less loop overhead per FMA),
  // then the rest; the order of k is the same.
  int64_t k = 0;
  for (; k + 8 <= kc; k += 8) {
#pragma GCC unroll 8
    for (int u = 0; u < 8; ++u) step(k + u);
  }
  for (; k < kc; ++k) step(k);
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    float* row = c + i * ldc;
    if (add_c) {
      lo[i] = _mm512_add_ps(lo[i], _mm512_maskz_loadu_ps(mlo, row));
      hi[i] = _mm512_add_ps(hi[i], _mm512_maskz_loadu_ps(mhi, row + 16));
    }
    _mm512_mask_storeu_ps(row, mlo, lo[i]);
    _mm512_mask_storeu_ps(row + 16, mhi, hi[i]);
  }
}

template <bool kPacked>
void TileRows(int rows, int64_t kc, const float* a, int64_t lda, const float* bp, float* c,
              int64_t ldc, int cols, bool add_c) {
  switch (rows) {
#define MOERUN_TILE_CASE(r)                                \
  case r:                                                  \
    Tile<r, kPacked>(kc, a, lda, bp, c, ldc, cols, add_c); \
    break;
    MOERUN_TILE_CASE(1)
    MOERUN_TILE_CASE(2)
    MOERUN_TILE_CASE(3)
    MOERUN_TILE_CASE(4)
    MOERUN_TILE_CASE(5)
    MOERUN_TILE_CASE(6)
    MOERUN_TILE_CASE(7)
    MOERUN_TILE_CASE(8)
    MOERUN_TILE_CASE(9)
    MOERUN_TILE_CASE(10)
    MOERUN_TILE_CASE(11)
    MOERUN_TILE_CASE(12)
#undef MOERUN_TILE_CASE
    default:
      LOG(FATAL) << "BlockedGemm: a tile of " << rows << " rows";
  }
}

// GCC 12's unpack and shuffle intrinsics pass an undefined vector as the masked-off source
// and then warn about it (-Wuninitialized); nothing here reads it.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// dst[k * ld_dst + j] = src[j * ld_src + k] for a 16 x 16 block.
inline void Transpose16(const float* src, int64_t ld_src, float* dst, int64_t ld_dst) {
  __m512 r[16], t[16];
  for (int j = 0; j < 16; ++j) r[j] = _mm512_loadu_ps(src + j * ld_src);
  for (int j = 0; j < 16; j += 2) {
    t[j] = _mm512_unpacklo_ps(r[j], r[j + 1]);
    t[j + 1] = _mm512_unpackhi_ps(r[j], r[j + 1]);
  }
  for (int j = 0; j < 16; j += 4) {
    r[j] = _mm512_shuffle_ps(t[j], t[j + 2], 0x44);
    r[j + 1] = _mm512_shuffle_ps(t[j], t[j + 2], 0xEE);
    r[j + 2] = _mm512_shuffle_ps(t[j + 1], t[j + 3], 0x44);
    r[j + 3] = _mm512_shuffle_ps(t[j + 1], t[j + 3], 0xEE);
  }
  for (int j = 0; j < 16; j += 8) {
    for (int q = 0; q < 4; ++q) {
      t[j + q] = _mm512_shuffle_f32x4(r[j + q], r[j + 4 + q], 0x88);
      t[j + 4 + q] = _mm512_shuffle_f32x4(r[j + q], r[j + 4 + q], 0xDD);
    }
  }
  for (int q = 0; q < 8; ++q) {
    r[q] = _mm512_shuffle_f32x4(t[q], t[q + 8], 0x88);
    r[q + 8] = _mm512_shuffle_f32x4(t[q], t[q + 8], 0xDD);
  }
  for (int k = 0; k < 16; ++k) _mm512_storeu_ps(dst + k * ld_dst, r[k]);
}
#pragma GCC diagnostic pop

// Packs op(B)[k0:k0+kc, j0:j0+nc] into panels of 32 columns, k-major (panel p at
// dst + p * kc * 32), zero past nc.
void PackB(bool trans_b, const float* b, int64_t ldb, int64_t k0, int64_t kc, int64_t j0,
           int64_t nc, float* dst) {
  if (!trans_b) {
    // Row by row: each source row's columns are read once and in order (a stream the
    // prefetcher follows; panel by panel, every k would start a new line at a stride of
    // ldb), its 32-float pieces stored to their panels.
    const int64_t full = nc / kNr * kNr;
    const int tail = static_cast<int>(nc - full);
    const __mmask16 tail_lo = tail >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << tail) - 1);
    const __mmask16 tail_hi = tail <= 16 ? 0 : static_cast<__mmask16>((1u << (tail - 16)) - 1);
    for (int64_t k = 0; k < kc; ++k) {
      const float* src = b + (k0 + k) * ldb + j0;
      float* out = dst + k * kNr;
      int64_t p = 0;
      for (; p < full; p += kNr, out += kc * kNr) {
        _mm512_store_ps(out, _mm512_loadu_ps(src + p));
        _mm512_store_ps(out + 16, _mm512_loadu_ps(src + p + 16));
      }
      if (tail > 0) {
        _mm512_store_ps(out, _mm512_maskz_loadu_ps(tail_lo, src + p));
        _mm512_store_ps(out + 16, _mm512_maskz_loadu_ps(tail_hi, src + p + 16));
      }
    }
    return;
  }
  for (int64_t p = 0; p < nc; p += kNr) {
    float* panel = dst + (p / kNr) * kc * kNr;
    const int64_t w = std::min<int64_t>(kNr, nc - p);
    // op(B)[k][j] = b[j][k]: 16 x 16 transposes where whole, element by element elsewhere.
    int64_t k = 0;
    if (w == kNr) {
      for (; k + 16 <= kc; k += 16) {
        for (int h = 0; h < 2; ++h) {
          Transpose16(b + (j0 + p + 16 * h) * ldb + k0 + k, ldb, panel + k * kNr + 16 * h, kNr);
        }
      }
    }
    for (; k < kc; ++k) {
      float* out = panel + k * kNr;
      for (int64_t j = 0; j < kNr; ++j) out[j] = j < w ? b[(j0 + p + j) * ldb + k0 + k] : 0.0f;
    }
  }
}

// The whole product over columns [n0, n1) on the calling thread.
void GemmColumns(bool trans_a, bool trans_b, int64_t m, int64_t n0, int64_t n1, int64_t k,
                 const float* a, int64_t lda, const float* b, int64_t ldb, bool accumulate,
                 float* c, int64_t ldc) {
  const int64_t kblock = BlockedGemmKBlock(k);
  // A packed B block of at most 256K floats (1 MiB) stays in L2 while every row tile
  // streams it.
  const int64_t nblock = std::max<int64_t>(kNr, (262144 / kblock) / kNr * kNr);
  float* bp = ScratchBuffer(0, kblock * std::min(nblock, (n1 - n0 + kNr - 1) / kNr * kNr));
  float* ap = trans_a ? ScratchBuffer(1, kblock * kMr) : nullptr;
  for (int64_t k0 = 0; k0 < k; k0 += kblock) {
    const int64_t kc = std::min(kblock, k - k0);
    const bool add_c = accumulate || k0 > 0;
    for (int64_t j0 = n0; j0 < n1; j0 += nblock) {
      const int64_t nc = std::min(nblock, n1 - j0);
      PackB(trans_b, b, ldb, k0, kc, j0, nc, bp);
      for (int64_t i0 = 0; i0 < m; i0 += kMr) {
        const int rows = static_cast<int>(std::min<int64_t>(kMr, m - i0));
        const float* at = a + i0 * lda + k0;
        if (trans_a) {
          // op(A)[i][k] = a[k][i]: 12 rows' values of each k side by side (one masked
          // vector each; a memcpy of `rows` floats is a library call per k).
          const __mmask16 mr = static_cast<__mmask16>((1u << rows) - 1);
          for (int64_t kk = 0; kk < kc; ++kk) {
            _mm512_mask_storeu_ps(ap + kk * kMr, mr,
                                  _mm512_maskz_loadu_ps(mr, a + (k0 + kk) * lda + i0));
          }
          at = ap;
        }
        for (int64_t p = 0; p < nc; p += kNr) {
          const int cols = static_cast<int>(std::min<int64_t>(kNr, nc - p));
          float* ct = c + i0 * ldc + j0 + p;
          const float* panel = bp + (p / kNr) * kc * kNr;
          if (trans_a) {
            TileRows<true>(rows, kc, at, kMr, panel, ct, ldc, cols, add_c);
          } else {
            TileRows<false>(rows, kc, at, lda, panel, ct, ldc, cols, add_c);
          }
        }
      }
    }
  }
}

}  // namespace

void BlockedGemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const float* a,
                 int64_t lda, const float* b, int64_t ldb, bool accumulate, float* c, int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  if (k <= 0) {
    if (!accumulate) {
      for (int64_t i = 0; i < m; ++i) std::memset(c + i * ldc, 0, n * sizeof(float));
    }
    return;
  }
  const int threads = NumThreads();
  const int64_t panels = (n + kNr - 1) / kNr;
  if (threads <= 1 || omp_in_parallel() || panels < 2) {
    GemmColumns(trans_a, trans_b, m, 0, n, k, a, lda, b, ldb, accumulate, c, ldc);
    return;
  }
  // Whole 32-column panels to each thread: the same tiles, so the same bits.
  const int parts = static_cast<int>(std::min<int64_t>(threads, panels));
#pragma omp parallel for schedule(static) num_threads(parts)
  for (int part = 0; part < parts; ++part) {
    const int64_t n0 = std::min(n, panels * part / parts * kNr);
    const int64_t n1 = std::min(n, panels * (part + 1) / parts * kNr);
    GemmColumns(trans_a, trans_b, m, n0, n1, k, a, lda, b, ldb, accumulate, c, ldc);
  }
}

#else  // no AVX-512 in this build

bool BlockedGemmAvailable() { return false; }

void BlockedGemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, const float* a,
                 int64_t lda, const float* b, int64_t ldb, bool accumulate, float* c, int64_t ldc) {
  Gemm(trans_a, trans_b, m, n, k, 1.0f, a, lda, b, ldb, accumulate ? 1.0f : 0.0f, c, ldc);
}

#endif

}  // namespace moerun
