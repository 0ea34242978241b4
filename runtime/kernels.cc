// CPU kernels: OpenBLAS for GEMM, OpenMP over rows for the rest.
#include "runtime/kernels.h"

#include <cblas.h>
#include <glog/logging.h>
#include <omp.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <thread>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "runtime/device_math.h"
#include "runtime/row_kernels.h"

namespace moerun {
namespace {

int g_threads = 1;

inline CBLAS_TRANSPOSE Trans(bool t) { return t ? CblasTrans : CblasNoTrans; }

void CheckBlasDims(int64_t m, int64_t n, int64_t k, int64_t lda, int64_t ldb, int64_t ldc) {
  constexpr int64_t kMaxInt = 2147483647;
  CHECK(m >= 0 && n >= 0 && k >= 0) << "negative GEMM size " << m << "x" << n << "x" << k;
  CHECK(m <= kMaxInt && n <= kMaxInt && k <= kMaxInt && lda <= kMaxInt && ldb <= kMaxInt &&
        ldc <= kMaxInt)
      << "GEMM dims exceed 32-bit BLAS";
}

}  // namespace

void SetNumThreads(int threads) {
  CHECK_GE(threads, 1) << "thread count";
  g_threads = threads;
  openblas_set_num_threads(threads);
  omp_set_num_threads(threads);
}

int NumThreads() { return g_threads; }

void ParallelOverItems(int64_t n, const std::function<void(int64_t, int)>& body) {
  const int threads = g_threads;
  if (threads <= 1 || n < threads || n % threads != 0 || omp_in_parallel()) {
    for (int64_t i = 0; i < n; ++i) body(i, 0);
    return;
  }
  // BLAS calls made inside the region run on their caller's thread (OpenBLAS's pthreads
  // build would otherwise hand each to its own pool, which serves one call at a time).
  openblas_set_num_threads(1);
#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t i = 0; i < n; ++i) body(i, omp_get_thread_num());
  openblas_set_num_threads(threads);
}

int DefaultThreadsPerRank(int local_ranks) {
  const int cores = static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  return std::max(1, cores / std::max(1, local_ranks));
}

std::string BlasDescription() {
  std::string s = openblas_get_config();
  s += " (core ";
  s += openblas_get_corename();
  s += ", " + BlasThreading() + ", " + std::to_string(openblas_get_num_threads()) + " threads)";
  if (BlasThreading() != BlasThreadingBuilt()) {
    s += " [built for the " + BlasThreadingBuilt() +
         " OpenBLAS; the loader found this one: LD_LIBRARY_PATH, LD_PRELOAD, or the linked folder "
         "is missing]";
  }
  // Set by main() when it re-executed moerun to replace OpenBLAS's fallback core.
  if (const char* was = std::getenv("MOERUN_BLAS_DETECTED_CORE")) {
    s += std::string(" [OpenBLAS detected ") + was + " on this CPU; moerun set OPENBLAS_CORETYPE=" +
         (std::getenv("OPENBLAS_CORETYPE") ? std::getenv("OPENBLAS_CORETYPE") : "?") + "]";
  }
  return s;
}

std::string BlasThreading() {
  switch (openblas_get_parallel()) {
    case 0:
      return "sequential";
    case 1:
      return "pthreads";
    case 2:
      return "OpenMP";
    default:
      return "unknown";
  }
}

std::string BlasThreadingBuilt() {
#if defined(MOERUN_BLAS_THREADING_openmp)
  return "OpenMP";
#else
  return "pthreads";
#endif
}

std::string BlasDetectedCore() { return openblas_get_corename(); }

std::string BlasCoreToRequest() {
  std::string core = openblas_get_corename();
  std::transform(core.begin(), core.end(), core.begin(),
                 [](unsigned char c) { return static_cast<char>(std::tolower(c)); });
  static const char* const kFallbacks[] = {"prescott",  "core2",      "penryn", "dunnington",
                                           "nehalem",   "atom",       "katmai", "coppermine",
                                           "northwood", "sandybridge"};
  bool fallback = false;
  for (const char* f : kFallbacks) fallback = fallback || core == f;
  if (!fallback) return "";
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
      __builtin_cpu_supports("avx512cd")) {
    return "SkylakeX";
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return "Haswell";
  return "";
}

void Gemm(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
          int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  CheckBlasDims(m, n, k, lda, ldb, ldc);
  if (m == 0 || n == 0) return;
  if (k == 0) {  // BLAS leaves C untouched only when beta == 1; do it explicitly.
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t j = 0; j < n; ++j) c[i * ldc + j] = beta == 0.0f ? 0.0f : beta * c[i * ldc + j];
    }
    return;
  }
  cblas_sgemm(CblasRowMajor, Trans(trans_a), Trans(trans_b), static_cast<int>(m),
              static_cast<int>(n), static_cast<int>(k), alpha, a, static_cast<int>(lda), b,
              static_cast<int>(ldb), beta, c, static_cast<int>(ldc));
}

void GemmStridedBatched(bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha,
                        const float* a, int64_t lda, int64_t stride_a, const float* b, int64_t ldb,
                        int64_t stride_b, float beta, float* c, int64_t ldc, int64_t stride_c,
                        int64_t batch) {
  // OpenBLAS parallelises inside each GEMM; at the expert-MLP shapes each GEMM is large
  // enough for that to use every thread.
  for (int64_t i = 0; i < batch; ++i) {
    Gemm(trans_a, trans_b, m, n, k, alpha, a + i * stride_a, lda, b + i * stride_b, ldb, beta,
         c + i * stride_c, ldc);
  }
}

void Matmul(const Tensor& a, bool trans_a, const Tensor& b, bool trans_b, Tensor* c, float alpha,
            float beta) {
  CHECK(a.is_contiguous() && b.is_contiguous() && c->is_contiguous())
      << "Matmul needs contiguous tensors";
  CHECK(a.ndim() >= 2 && b.ndim() >= 2 && c->ndim() == a.ndim())
      << "Matmul of " << a.ShapeString() << " and " << b.ShapeString() << " into "
      << c->ShapeString();
  const int64_t ar = a.dim(-2), ac = a.dim(-1), br = b.dim(-2), bc = b.dim(-1);
  const int64_t m = trans_a ? ac : ar, k = trans_a ? ar : ac;
  const int64_t kb = trans_b ? bc : br, n = trans_b ? br : bc;
  const int64_t batch = a.numel() / (ar * ac);
  const bool b_shared = b.ndim() == 2;
  CHECK(k == kb && c->dim(-2) == m && c->dim(-1) == n && c->numel() == batch * m * n &&
        (b_shared || b.numel() == batch * br * bc))
      << "Matmul shapes: " << a.ShapeString() << (trans_a ? "^T" : "") << " x " << b.ShapeString()
      << (trans_b ? "^T" : "") << " -> " << c->ShapeString();
  if (b_shared && !trans_a) {  // one GEMM over all batch rows
    Gemm(false, trans_b, batch * m, n, k, alpha, a.data<float>(), ac, b.data<float>(), bc, beta,
         c->data<float>(), n);
    return;
  }
  GemmStridedBatched(trans_a, trans_b, m, n, k, alpha, a.data<float>(), ac, ar * ac,
                     b.data<float>(), bc, b_shared ? 0 : br * bc, beta, c->data<float>(), n, m * n,
                     batch);
}

namespace {

// c[j] = RowInvariantDot(a, b + j * k, k) for kCols columns of b at once: the same
// operations on every lane of every dot, in the same order (bit for bit the same), with
// kCols independent chains of additions instead of one, and each load of a used kCols times.
template <int kCols>
void RowInvariantDots(const float* __restrict a, const float* __restrict b, int64_t k,
                      float* __restrict c) {
  // RowInvariantDot's 16 lanes as one vector (GCC/Clang vector extension; split into
  // narrower registers where the CPU has no 16-float ones).
  typedef float Lanes __attribute__((vector_size(64)));
  constexpr int kLanes = 16;
  Lanes acc[kCols];
  for (int j = 0; j < kCols; ++j) acc[j] = Lanes{};
  int64_t i = 0;
  for (; i + kLanes <= k; i += kLanes) {
    Lanes av;
    std::memcpy(&av, a + i, sizeof(av));
    for (int j = 0; j < kCols; ++j) {
      Lanes bv;
      std::memcpy(&bv, b + j * k + i, sizeof(bv));
      acc[j] += av * bv;
    }
  }
  for (int j = 0; j < kCols; ++j) {
    float lanes[kLanes];
    std::memcpy(lanes, &acc[j], sizeof(lanes));
    for (int64_t ii = i, l = 0; ii < k; ++ii, ++l) lanes[l] += a[ii] * b[j * k + ii];
    float sum = 0.0f;
    for (int l = 0; l < kLanes; ++l) sum += lanes[l];
    c[j] = sum;
  }
}

}  // namespace

void RowInvariantGemmNT(const float* a, const float* b, float* c, int64_t rows, int64_t n,
                        int64_t k) {
  // Tiles of rows, and in each tile 8 columns of b at a time over all its rows: the 8
  // columns stay in L1 while the tile's rows stream past them.
  constexpr int kCols = 8;
  constexpr int64_t kTile = 32;
  const int64_t tiles = (rows + kTile - 1) / kTile;
#pragma omp parallel for schedule(static) if (rows * n * k > 262144)
  for (int64_t tile = 0; tile < tiles; ++tile) {
    const int64_t t0 = tile * kTile, t1 = std::min(rows, t0 + kTile);
    int64_t j = 0;
    for (; j + kCols <= n; j += kCols) {
      for (int64_t t = t0; t < t1; ++t)
        RowInvariantDots<kCols>(a + t * k, b + j * k, k, c + t * n + j);
    }
    for (; j < n; ++j) {
      for (int64_t t = t0; t < t1; ++t) c[t * n + j] = RowInvariantDot(a + t * k, b + j * k, k);
    }
  }
}

void SoftmaxForward(const float* x, float* y, int64_t rows, int64_t cols) {
#pragma omp parallel for schedule(static) if (rows * cols > 32768)
  for (int64_t r = 0; r < rows; ++r) rowwise::Softmax(x + r * cols, y + r * cols, cols);
}

void SoftmaxBackward(const float* y, const float* dy, float* dx, int64_t rows, int64_t cols) {
#pragma omp parallel for schedule(static) if (rows * cols > 32768)
  for (int64_t r = 0; r < rows; ++r) {
    rowwise::SoftmaxBackward(y + r * cols, dy + r * cols, dx + r * cols, cols);
  }
}

namespace {

// Cephes' exp: x clamped to [kExpMin, kExpMax], x = n ln2 + r (ln2 in two parts), then a
// degree-5 polynomial in r; and erf's rational form on [-4, 4] (odd degree-13 numerator over
// even degree-8 denominator in x^2, the form Eigen and XLA use). Coefficients highest degree
// first; the scalar forms here and the 16-float ones of the GELU kernels share them.
constexpr float kExpMax = 88.3762626647949f, kExpMin = -87.3365447504019f;
constexpr float kLog2e = 1.44269504088896341f, kLn2Hi = 0.693359375f, kLn2Lo = -2.12194440e-4f;
constexpr float kExpPoly[] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f,
                              4.1665795894e-2f, 1.6666665459e-1f, 5.0000001201e-1f};
constexpr float kErfMax = 4.0f;
constexpr float kErfNum[] = {-2.72614225801306e-10f, 2.77068142495902e-08f,  -2.10102402082508e-06f,
                             -5.69250639462346e-05f, -7.34990630326855e-04f, -2.95459980854025e-03f,
                             -1.60960333262415e-02f};
constexpr float kErfDen[] = {-1.45660718464996e-05f, -2.13374055278905e-04f, -1.68282697438203e-03f,
                             -7.37332916720468e-03f, -1.42647390514189e-02f};

// exp(x) for float, vectorisable, within 2 ulp of std::exp on [-87, 88]
// (tests/kernels_test.cc checks it).
inline float FastExp(float x) {
  x = x > kExpMax ? kExpMax : x;
  x = x < kExpMin ? kExpMin : x;
  const float n = std::floor(x * kLog2e + 0.5f);
  const float r = x - n * kLn2Hi - n * kLn2Lo;
  float p = kExpPoly[0];
  for (int i = 1; i < 6; ++i) p = p * r + kExpPoly[i];
  const float e = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  // A bit cast the vectoriser sees through (a memcpy through memory stops it).
  return e * __builtin_bit_cast(float, bits);
}

// erf(x) for float, vectorisable, within 5e-7 of erf.
inline float FastErf(float x) {
  x = x > kErfMax ? kErfMax : x;
  x = x < -kErfMax ? -kErfMax : x;
  const float x2 = x * x;
  float p = kErfNum[0];
  for (int i = 1; i < 7; ++i) p = p * x2 + kErfNum[i];
  p = p * x;
  float q = kErfDen[0];
  for (int i = 1; i < 5; ++i) q = q * x2 + kErfDen[i];
  return p / q;
}

}  // namespace

float ExpForTest(float x) { return FastExp(x); }

void SoftmaxRowsInPlaceFast(float* x, int64_t rows, int64_t cols) {
  constexpr int kLanes = 8;
  for (int64_t r = 0; r < rows; ++r) {
    float* __restrict xr = x + r * cols;
    float mx = -INFINITY;
    for (int64_t j = 0; j < cols; ++j) mx = std::max(mx, xr[j]);
#pragma omp simd
    for (int64_t j = 0; j < cols; ++j) xr[j] = FastExp(xr[j] - mx);
    // Fixed lanes of partial sums, so the loop vectorises without -ffast-math.
    float acc[kLanes] = {0};
    int64_t j = 0;
    for (; j + kLanes <= cols; j += kLanes) {
      for (int l = 0; l < kLanes; ++l) acc[l] += xr[j + l];
    }
    float sum = 0;
    for (; j < cols; ++j) sum += xr[j];
    for (int l = 0; l < kLanes; ++l) sum += acc[l];
    const float inv = 1.0f / sum;
    for (int64_t k = 0; k < cols; ++k) xr[k] *= inv;
  }
}
namespace {
constexpr float kInvSqrt2 = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constexpr float kGeluC = 0.7978845608028654f;  // sqrt(2 / pi)
constexpr float kGeluA = 0.044715f;

#if defined(__AVX512F__)
// GCC 12's masked loads pass an undefined vector as the masked-off source and then warn
// about it (-Wuninitialized); nothing here reads it.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// The GELU forms on 16 floats at a time, written with fused multiply-adds (FMA contraction
// is off in this build, so the scalar forms below would round every product). The same
// polynomials as FastExp and FastErf (the tables above); exp's 2^n by scalef. Measured against the
// scalar loops, vectorised by the compiler: forward 0.39 -> 0.29 ns and backward 0.85 -> 0.60 ns
// per element on one core with the data in cache (the erf form).
namespace v16 {
inline __m512 Set(float x) { return _mm512_set1_ps(x); }

inline __m512 Exp(__m512 x) {
  x = _mm512_min_ps(x, Set(kExpMax));
  x = _mm512_max_ps(x, Set(kExpMin));
  const __m512 n = _mm512_roundscale_ps(_mm512_fmadd_ps(x, Set(kLog2e), Set(0.5f)),
                                        _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, Set(kLn2Hi), x);
  r = _mm512_fnmadd_ps(n, Set(kLn2Lo), r);
  __m512 p = Set(kExpPoly[0]);
  for (int i = 1; i < 6; ++i) p = _mm512_fmadd_ps(p, r, Set(kExpPoly[i]));
  const __m512 e = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, Set(1.0f)));
  return _mm512_scalef_ps(e, n);
}

inline __m512 Erf(__m512 x) {
  x = _mm512_min_ps(x, Set(kErfMax));
  x = _mm512_max_ps(x, Set(-kErfMax));
  const __m512 x2 = _mm512_mul_ps(x, x);
  __m512 p = Set(kErfNum[0]);
  for (int i = 1; i < 7; ++i) p = _mm512_fmadd_ps(p, x2, Set(kErfNum[i]));
  p = _mm512_mul_ps(p, x);
  __m512 q = Set(kErfDen[0]);
  for (int i = 1; i < 5; ++i) q = _mm512_fmadd_ps(q, x2, Set(kErfDen[i]));
  return _mm512_div_ps(p, q);
}

// tanh(sqrt(2/pi) (v + 0.044715 v^3)) = 1 - 2 / (1 + exp(2u)).
inline __m512 TanhOfGeluArg(__m512 v) {
  const __m512 u = _mm512_mul_ps(_mm512_mul_ps(Set(kGeluC), v),
                                 _mm512_fmadd_ps(_mm512_mul_ps(Set(kGeluA), v), v, Set(1.0f)));
  const __m512 e = Exp(_mm512_add_ps(u, u));
  return _mm512_sub_ps(Set(1.0f), _mm512_div_ps(Set(2.0f), _mm512_add_ps(Set(1.0f), e)));
}
}  // namespace v16

// Each form: At (the GELU) and GradAt (its derivative) on a vector; every loop below uses
// them, 16 elements at a time with a masked tail, so an element's result does not depend on
// the loop it runs in (the fused kernels equal the separate ones bit for bit).
struct GeluErfForm {
  static __m512 At(__m512 v) {
    const __m512 hv = _mm512_mul_ps(v16::Set(0.5f), v);
    return _mm512_fmadd_ps(hv, v16::Erf(_mm512_mul_ps(v, v16::Set(kInvSqrt2))), hv);
  }
  static __m512 GradAt(__m512 v) {
    const __m512 half = v16::Set(0.5f);
    const __m512 cdf = _mm512_fmadd_ps(half, v16::Erf(_mm512_mul_ps(v, v16::Set(kInvSqrt2))), half);
    const __m512 pdf = _mm512_mul_ps(v16::Set(kInvSqrt2Pi),
                                     v16::Exp(_mm512_mul_ps(_mm512_mul_ps(v16::Set(-0.5f), v), v)));
    return _mm512_fmadd_ps(v, pdf, cdf);
  }
  // Both, for the forward that keeps the slope: the same expressions, so the same bits; the
  // compiler computes their shared erf once (one division per vector in the object code).
  static void AtAndGrad(__m512 v, __m512* at, __m512* grad) {
    *at = At(v);
    *grad = GradAt(v);
  }
};
struct GeluTanhForm {
  static __m512 At(__m512 v) {
    const __m512 hv = _mm512_mul_ps(v16::Set(0.5f), v);
    return _mm512_fmadd_ps(hv, v16::TanhOfGeluArg(v), hv);
  }
  static __m512 GradAt(__m512 v) {
    const __m512 half = v16::Set(0.5f);
    const __m512 t = v16::TanhOfGeluArg(v);
    const __m512 du = _mm512_mul_ps(
        v16::Set(kGeluC),
        _mm512_fmadd_ps(_mm512_mul_ps(v16::Set(3.0f * kGeluA), v), v, v16::Set(1.0f)));
    // 0.5 (1 + t) + 0.5 v (1 - t^2) du
    const __m512 slope =
        _mm512_mul_ps(_mm512_mul_ps(half, v), _mm512_fnmadd_ps(t, t, v16::Set(1.0f)));
    return _mm512_fmadd_ps(slope, du, _mm512_fmadd_ps(half, t, half));
  }
  static void AtAndGrad(__m512 v, __m512* at, __m512* grad) {
    *at = At(v);
    *grad = GradAt(v);
  }
};
// The "form" of a slope already computed (BiasGeluForwardKeepGrad's): GradAt is the value.
struct StoredSlope {
  static __m512 GradAt(__m512 g) { return g; }
};

// The passes below are bound by memory when their rows come from L3 (an expert's hidden
// rows are 2 MiB and more), and this machine's hardware prefetcher does not run far enough
// ahead: each vector step asks for the line one row (or kAhead floats) ahead. Measured on
// 272 x 2048 rows from L3, one thread: the erf form's backward 1.06 -> 0.64 ns per element,
// its forward 0.79 -> 0.61. always_inline: without it GCC 12 dropped the prefetches (the
// helper inlined into the always_inline loop bodies below emitted nothing).
constexpr int64_t kAhead = 1024;
__attribute__((always_inline)) inline void Prefetch(const float* p) {
  _mm_prefetch(reinterpret_cast<const char*>(p), _MM_HINT_T0);
}

// Runs body(j, mask) over [begin, end) 16 floats at a time: whole vectors with the mask a
// constant (plain loads and stores), then the tail under its mask.
template <typename Body>
inline void Over16(int64_t begin, int64_t end, const Body& body) {
  int64_t j = begin;
  for (; j + 16 <= end; j += 16) body(j, static_cast<__mmask16>(0xFFFF));
  if (j < end) body(j, static_cast<__mmask16>((1u << (end - j)) - 1));
}

// y = gelu(x) over [0, n), on the calling thread.
template <typename Form>
void GeluSpan(const float* x, float* y, int64_t n) {
  Over16(
      0, n, [&](int64_t j, __mmask16 m) __attribute__((always_inline)) {
        Prefetch(x + j + kAhead);
        Prefetch(y + j + kAhead);
        _mm512_mask_storeu_ps(y + j, m, Form::At(_mm512_maskz_loadu_ps(m, x + j)));
      });
}

// dx = dy * gelu'(x) over [0, n), on the calling thread; dx may alias dy.
template <typename Form>
void GeluGradSpan(const float* x, const float* dy, float* dx, int64_t n) {
  Over16(
      0, n, [&](int64_t j, __mmask16 m) __attribute__((always_inline)) {
        Prefetch(x + j + kAhead);
        Prefetch(dy + j + kAhead);
        if (dx != dy) Prefetch(dx + j + kAhead);
        const __m512 g = Form::GradAt(_mm512_maskz_loadu_ps(m, x + j));
        _mm512_mask_storeu_ps(dx + j, m, _mm512_mul_ps(_mm512_maskz_loadu_ps(m, dy + j), g));
      });
}

// h[r, :] += bias, act = gelu(h) over the columns [c0, c1) of `rows` rows; kKeepGrad: h
// keeps gelu'(h) instead.
template <typename Form, bool kKeepGrad>
void BiasGeluBlock(float* __restrict h, const float* __restrict bias, float* __restrict act,
                   int64_t rows, int64_t cols, int64_t c0, int64_t c1) {
  for (int64_t r = 0; r < rows; ++r) {
    float* hr = h + r * cols;
    float* ar = act + r * cols;
    Over16(
        c0, c1, [&](int64_t j, __mmask16 m) __attribute__((always_inline)) {
          Prefetch(hr + cols + j);
          Prefetch(ar + cols + j);
          const __m512 v =
              _mm512_add_ps(_mm512_maskz_loadu_ps(m, hr + j), _mm512_maskz_loadu_ps(m, bias + j));
          if constexpr (kKeepGrad) {
            __m512 at, grad;
            Form::AtAndGrad(v, &at, &grad);
            _mm512_mask_storeu_ps(hr + j, m, grad);
            _mm512_mask_storeu_ps(ar + j, m, at);
          } else {
            _mm512_mask_storeu_ps(hr + j, m, v);
            _mm512_mask_storeu_ps(ar + j, m, Form::At(v));
          }
        });
  }
}

// d *= gelu'(h), dbias += d over the columns [c0, c1), rows in order (StoredSlope: h holds
// gelu' already).
template <typename Form>
void GeluBiasGradBlock(const float* __restrict h, float* __restrict d, float* __restrict dbias,
                       int64_t rows, int64_t cols, int64_t c0, int64_t c1) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* hr = h + r * cols;
    float* dr = d + r * cols;
    Over16(
        c0, c1, [&](int64_t j, __mmask16 m) __attribute__((always_inline)) {
          Prefetch(hr + cols + j);
          Prefetch(dr + cols + j);
          const __m512 g = _mm512_mul_ps(_mm512_maskz_loadu_ps(m, dr + j),
                                         Form::GradAt(_mm512_maskz_loadu_ps(m, hr + j)));
          _mm512_mask_storeu_ps(dr + j, m, g);
          _mm512_mask_storeu_ps(dbias + j, m,
                                _mm512_add_ps(_mm512_maskz_loadu_ps(m, dbias + j), g));
        });
  }
}

#pragma GCC diagnostic pop

#else  // without AVX-512: scalar forms the compiler vectorises

inline float FastTanh(float u) { return 1.0f - 2.0f / (1.0f + FastExp(2.0f * u)); }

struct GeluErfForm {
  static float At(float v) { return 0.5f * v * (1.0f + FastErf(v * kInvSqrt2)); }
  static float GradAt(float v) {
    const float cdf = 0.5f * (1.0f + FastErf(v * kInvSqrt2));
    const float pdf = kInvSqrt2Pi * FastExp(-0.5f * v * v);
    return cdf + v * pdf;
  }
  static void AtAndGrad(float v, float* at, float* grad) {
    *at = At(v);
    *grad = GradAt(v);
  }
};
struct GeluTanhForm {
  static float At(float v) {
    return 0.5f * v * (1.0f + FastTanh(kGeluC * (v + kGeluA * v * v * v)));
  }
  static float GradAt(float v) {
    const float t = FastTanh(kGeluC * (v + kGeluA * v * v * v));
    const float du = kGeluC * (1.0f + 3.0f * kGeluA * v * v);
    return 0.5f * (1.0f + t) + 0.5f * v * (1.0f - t * t) * du;
  }
  static void AtAndGrad(float v, float* at, float* grad) {
    *at = At(v);
    *grad = GradAt(v);
  }
};
struct StoredSlope {
  static float GradAt(float g) { return g; }
};

template <typename Form>
void GeluSpan(const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] = Form::At(x[i]);
}

template <typename Form>
void GeluGradSpan(const float* x, const float* dy, float* dx, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) dx[i] = dy[i] * Form::GradAt(x[i]);
}

template <typename Form, bool kKeepGrad>
void BiasGeluBlock(float* __restrict h, const float* __restrict bias, float* __restrict act,
                   int64_t rows, int64_t cols, int64_t c0, int64_t c1) {
  for (int64_t r = 0; r < rows; ++r) {
    float* __restrict hr = h + r * cols;
    float* __restrict ar = act + r * cols;
#pragma omp simd
    for (int64_t j = c0; j < c1; ++j) {
      const float v = hr[j] + bias[j];
      if constexpr (kKeepGrad) {
        Form::AtAndGrad(v, &ar[j], &hr[j]);
      } else {
        hr[j] = v;
        ar[j] = Form::At(v);
      }
    }
  }
}

template <typename Form>
void GeluBiasGradBlock(const float* __restrict h, float* __restrict d, float* __restrict dbias,
                       int64_t rows, int64_t cols, int64_t c0, int64_t c1) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* __restrict hr = h + r * cols;
    float* __restrict dr = d + r * cols;
#pragma omp simd
    for (int64_t j = c0; j < c1; ++j) {
      const float g = dr[j] * Form::GradAt(hr[j]);
      dr[j] = g;
      dbias[j] += g;
    }
  }
}
#endif

// Runs block(c0, c1) over column blocks, one per thread when the matrix is large: each
// column's rows stay in one thread, in order, so the result is the same for any thread
// count.
template <typename Block>
void OverColumnBlocks(int64_t rows, int64_t cols, const Block& block) {
  if (rows * cols <= 65536) {
    block(0, cols);
    return;
  }
#pragma omp parallel
  {
    const int64_t threads = omp_get_num_threads(), t = omp_get_thread_num();
    // Blocks of whole 16-float (64-byte) lines, so threads never share a cache line.
    const int64_t lines = (cols + 15) / 16;
    const int64_t c0 = std::min(cols, lines * t / threads * 16);
    const int64_t c1 = std::min(cols, lines * (t + 1) / threads * 16);
    if (c0 < c1) block(c0, c1);
  }
}

// Runs span(begin, count) over [0, n) in whole 16-float lines, one range per thread when n
// is large (a matrix of one row, split as OverColumnBlocks splits columns).
template <typename Span>
void OverSpans(int64_t n, const Span& span) {
  OverColumnBlocks(1, n, [&](int64_t c0, int64_t c1) { span(c0, c1 - c0); });
}
}  // namespace

#if defined(__AVX512F__)
float ErfForTest(float x) {
  float out;
  _mm512_mask_storeu_ps(&out, 1, v16::Erf(_mm512_set1_ps(x)));
  return out;
}
#else
float ErfForTest(float x) { return FastErf(x); }
#endif

void GeluForward(const float* x, float* y, int64_t n) {
  OverSpans(n, [&](int64_t i, int64_t c) { GeluSpan<GeluErfForm>(x + i, y + i, c); });
}

void GeluBackward(const float* x, const float* dy, float* dx, int64_t n) {
  OverSpans(n, [&](int64_t i, int64_t c) { GeluGradSpan<GeluErfForm>(x + i, dy + i, dx + i, c); });
}

void GeluTanhForward(const float* x, float* y, int64_t n) {
  OverSpans(n, [&](int64_t i, int64_t c) { GeluSpan<GeluTanhForm>(x + i, y + i, c); });
}

void GeluTanhBackward(const float* x, const float* dy, float* dx, int64_t n) {
  OverSpans(n, [&](int64_t i, int64_t c) { GeluGradSpan<GeluTanhForm>(x + i, dy + i, dx + i, c); });
}

void BiasGeluForward(float* h, const float* bias, float* act, int64_t rows, int64_t cols,
                     bool tanh_form) {
  OverColumnBlocks(rows, cols, [&](int64_t c0, int64_t c1) {
    (tanh_form ? BiasGeluBlock<GeluTanhForm, false>
               : BiasGeluBlock<GeluErfForm, false>)(h, bias, act, rows, cols, c0, c1);
  });
}

void BiasGeluForwardKeepGrad(float* h, const float* bias, float* act, int64_t rows, int64_t cols,
                             bool tanh_form) {
  OverColumnBlocks(rows, cols, [&](int64_t c0, int64_t c1) {
    (tanh_form ? BiasGeluBlock<GeluTanhForm, true>
               : BiasGeluBlock<GeluErfForm, true>)(h, bias, act, rows, cols, c0, c1);
  });
}

void GeluBiasBackward(const float* h, float* d, float* dbias, int64_t rows, int64_t cols,
                      bool tanh_form) {
  OverColumnBlocks(rows, cols, [&](int64_t c0, int64_t c1) {
    (tanh_form ? GeluBiasGradBlock<GeluTanhForm>
               : GeluBiasGradBlock<GeluErfForm>)(h, d, dbias, rows, cols, c0, c1);
  });
}

void ScaleBiasBackward(const float* g, float* d, float* dbias, int64_t rows, int64_t cols) {
  OverColumnBlocks(rows, cols, [&](int64_t c0, int64_t c1) {
    GeluBiasGradBlock<StoredSlope>(g, d, dbias, rows, cols, c0, c1);
  });
}

void LayerNormForward(const float* x, const float* gamma, const float* beta, float* y, float* mean,
                      float* rstd, int64_t rows, int64_t cols, float eps) {
#pragma omp parallel for schedule(static) if (rows * cols > 32768)
  for (int64_t r = 0; r < rows; ++r) {
    rowwise::LayerNorm(x + r * cols, gamma, beta, y + r * cols, mean + r, rstd + r, cols, eps);
  }
}

void LayerNormBackward(const float* x, const float* gamma, const float* mean, const float* rstd,
                       const float* dy, float* dx, float* dgamma, float* dbeta, int64_t rows,
                       int64_t cols) {
#pragma omp parallel for schedule(static) if (rows * cols > 32768)
  for (int64_t r = 0; r < rows; ++r) {
    rowwise::LayerNormBackward(x + r * cols, gamma, mean[r], rstd[r], dy + r * cols, dx + r * cols,
                               cols);
  }
  // Parameter gradients: a column reduction, kept serial over rows for a fixed summation
  // order (the same result for any thread count).
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * cols;
    const float* dyr = dy + r * cols;
    for (int64_t j = 0; j < cols; ++j) {
      dgamma[j] += dyr[j] * (xr[j] - mean[r]) * rstd[r];
      dbeta[j] += dyr[j];
    }
  }
}

void AddBias(float* y, const float* bias, int64_t rows, int64_t cols) {
#pragma omp parallel for schedule(static) if (rows * cols > 65536)
  for (int64_t r = 0; r < rows; ++r) {
    float* yr = y + r * cols;
    for (int64_t j = 0; j < cols; ++j) yr[j] += bias[j];
  }
}

void BiasBackward(const float* dy, float* dbias, int64_t rows, int64_t cols) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* dyr = dy + r * cols;
    for (int64_t j = 0; j < cols; ++j) dbias[j] += dyr[j];
  }
}

void Add(const float* a, const float* b, float* y, int64_t n) {
#pragma omp parallel for schedule(static) if (n > 262144)
  for (int64_t i = 0; i < n; ++i) y[i] = a[i] + b[i];
}

void Scale(float* x, float s, int64_t n) {
#pragma omp parallel for schedule(static) if (n > 262144)
  for (int64_t i = 0; i < n; ++i) x[i] *= s;
}

double SumOfSquares(const float* x, int64_t n) {
  double s = 0;
#pragma omp parallel for simd reduction(+ : s) schedule(static) if (n > 65536)
  for (int64_t i = 0; i < n; ++i) s += static_cast<double>(x[i]) * x[i];
  return s;
}

void Axpy(float alpha, const float* x, float* y, int64_t n) {
#pragma omp parallel for schedule(static) if (n > 262144)
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

float CrossEntropyForward(const float* logits, const int32_t* labels, float* probs, int64_t rows,
                          int64_t classes, int64_t* valid_rows) {
  SoftmaxForward(logits, probs, rows, classes);
  double loss = 0.0;
  int64_t valid = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const int32_t y = labels[r];
    if (y < 0) continue;
    CHECK_LT(y, classes) << "label " << y << " of row " << r << " is out of range";
    // log p from the logits directly (log-sum-exp) for accuracy when p underflows.
    const float* lr = logits + r * classes;
    float mx = -INFINITY;
    for (int64_t j = 0; j < classes; ++j) mx = std::max(mx, lr[j]);
    double se = 0.0;
    for (int64_t j = 0; j < classes; ++j) se += std::exp(static_cast<double>(lr[j]) - mx);
    loss += (mx + std::log(se)) - lr[y];
    ++valid;
  }
  if (valid_rows != nullptr) *valid_rows = valid;
  return valid > 0 ? static_cast<float>(loss / valid) : 0.0f;
}

void CrossEntropyBackward(const float* probs, const int32_t* labels, float* dlogits, int64_t rows,
                          int64_t classes, float scale) {
  for (int64_t r = 0; r < rows; ++r) {
    float* d = dlogits + r * classes;
    const int32_t y = labels[r];
    if (y < 0) {
      std::fill_n(d, classes, 0.0f);
      continue;
    }
    const float* p = probs + r * classes;
    for (int64_t j = 0; j < classes; ++j) d[j] = p[j] * scale;
    d[y] -= scale;
  }
}

}  // namespace moerun
