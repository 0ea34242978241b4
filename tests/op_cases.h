// The backend-op table's cases (model/ops.h), like ggml's test-backend-ops: each runs
// one op (or a forward/backward pair) through a table on fresh inputs and returns every
// output, so two tables can be compared. The buffers come from CaseAllocator: the host's
// heap by default; the CUDA test points it at managed memory, so the same cases run on the
// real CUDA table, and sets CaseSync to wait for the device before outputs are read.
#ifndef MOERUN_TESTS_OP_CASES_H_
#define MOERUN_TESTS_OP_CASES_H_

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <random>
#include <string>
#include <vector>

#include "model/ops.h"

namespace moerun {
namespace op_cases {

// Where case buffers live, and the wait before reading outputs (host: malloc, nothing).
inline void* (*g_case_alloc)(size_t bytes) = [](size_t bytes) { return std::malloc(bytes); };
inline void (*g_case_free)(void* p) = [](void* p) { std::free(p); };
inline void (*g_case_sync)() = [] {};

template <typename T>
struct CaseAllocator {
  using value_type = T;
  CaseAllocator() = default;
  template <typename U>
  CaseAllocator(const CaseAllocator<U>&) {}  // NOLINT: allocator rebinding
  T* allocate(size_t n) {
    void* p = g_case_alloc(std::max<size_t>(1, n) * sizeof(T));
    if (p == nullptr) throw std::bad_alloc();
    return static_cast<T*>(p);
  }
  void deallocate(T* p, size_t) { g_case_free(p); }
  template <typename U>
  bool operator==(const CaseAllocator<U>&) const {
    return true;
  }
  template <typename U>
  bool operator!=(const CaseAllocator<U>&) const {
    return false;
  }
};
using FVec = std::vector<float, CaseAllocator<float>>;
using IVec = std::vector<int32_t, CaseAllocator<int32_t>>;

inline FVec NormalV(int64_t n, float scale, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> n01;
  FVec v(n);
  for (float& x : v) x = scale * n01(rng);
  return v;
}

// The outputs, concatenated, read after the device (if any) has finished.
inline std::vector<float> Cat(std::initializer_list<const FVec*> parts) {
  g_case_sync();
  size_t total = 0;
  for (const FVec* p : parts) total += p->size();
  std::vector<float> all(total);
  auto at = all.begin();
  for (const FVec* p : parts) at = std::copy(p->begin(), p->end(), at);
  return all;
}

inline FVec AsFloats(const IVec& v) {
  g_case_sync();
  return FVec(v.begin(), v.end());
}

// --- model/ops.h's table: every entry of the Thrust table (the CUDA table's kernels, run
// on the host) against the CPU table, like ggml's test-backend-ops. Each case runs one op
// on fresh copies of the same inputs through both tables and compares every output:
// bitwise (tolerance 0) where both follow one order with one libm, else within `tol`
// relative to the output's largest magnitude.
struct OpCase {
  std::string name;
  float tol;
  // Runs the op through `t`; returns its outputs, concatenated.
  std::function<std::vector<float>(const OpsTable& t)> run;
};

// Mod-Squad's attention heads: 3 sequences of 9 tokens, k = 2, some choices dropped.
inline std::vector<float> ChoiceAttentionRun(const OpsTable& t) {
  const int64_t tokens = 27, k = 2, dh = 8, seq = 9;
  FVec q = NormalV(tokens * k * dh, 1, 20), kv = NormalV(tokens * 2 * dh, 1, 21),
       probs(tokens * k * seq, -1.0f), out(tokens * k * dh, -1.0f);
  IVec row(tokens * k);
  for (int64_t i = 0; i < tokens * k; ++i) row[i] = i % 5 == 3 ? -1 : i;
  t.choice_attention_forward(q.data(), kv.data(), row.data(), tokens, k, dh, seq, probs.data(),
                             out.data());
  FVec d_out = NormalV(tokens * k * dh, 1, 22), d_q(tokens * k * dh, -1.0f),
       d_kv(tokens * 2 * dh, -1.0f);
  t.choice_attention_backward(q.data(), kv.data(), row.data(), probs.data(), d_out.data(), tokens,
                              k, dh, seq, d_q.data(), d_kv.data());
  return Cat({&probs, &out, &d_q, &d_kv});
}

inline std::vector<OpCase> OpCases() {
  std::vector<OpCase> cases;
  const int64_t rows = 37, cols = 70, n = rows * cols;
  cases.push_back({"router_gemm", 0, [=](const OpsTable& t) {
                     // 19 columns: two blocks of the CPU's 8-column kernel and 3 alone.
                     FVec a = NormalV(rows * 45, 1, 1), b = NormalV(19 * 45, 1, 2), c(rows * 19);
                     t.router_gemm(a.data(), b.data(), c.data(), rows, 19, 45);
                     return Cat({&c});
                   }});
  cases.push_back({"add_bias", 0, [=](const OpsTable& t) {
                     FVec y = NormalV(n, 1, 3), b = NormalV(cols, 1, 4);
                     t.add_bias(y.data(), b.data(), rows, cols);
                     return Cat({&y});
                   }});
  cases.push_back({"bias_backward", 0, [=](const OpsTable& t) {
                     FVec dy = NormalV(n, 1, 5), db(cols, 0.0f);
                     t.bias_backward(dy.data(), db.data(), rows, cols);
                     return Cat({&db});
                   }});
  // Past 64 rows (thrust_experts::kColumnChunkRows) the Thrust table sums columns in blocks
  // of rows, then the blocks: another order than the CPU's row by row. 300 rows: four whole
  // blocks and a partial one, added to a nonzero gradient.
  const int64_t tall = 300;
  cases.push_back({"bias_backward, 300 rows", 2e-6f, [=](const OpsTable& t) {
                     FVec dy = NormalV(tall * cols, 1, 70), db = NormalV(cols, 1, 71);
                     t.bias_backward(dy.data(), db.data(), tall, cols);
                     return Cat({&db});
                   }});
  cases.push_back({"layer_norm_backward, 300 rows", 2e-6f, [=](const OpsTable& t) {
                     FVec x = NormalV(tall * cols, 3, 72), g = NormalV(cols, 1, 73),
                          b = NormalV(cols, 1, 74), y(tall * cols), mean(tall), rstd(tall);
                     t.layer_norm_forward(x.data(), g.data(), b.data(), y.data(), mean.data(),
                                          rstd.data(), tall, cols, 1e-6f);
                     FVec dy = NormalV(tall * cols, 1, 75), dx(tall * cols),
                          dg = NormalV(cols, 1, 76), dbeta = NormalV(cols, 1, 77);
                     t.layer_norm_backward(x.data(), g.data(), mean.data(), rstd.data(), dy.data(),
                                           dx.data(), dg.data(), dbeta.data(), tall, cols);
                     return Cat({&dx, &dg, &dbeta});
                   }});
  cases.push_back({"add", 0, [=](const OpsTable& t) {
                     FVec a = NormalV(n, 1, 6), b = NormalV(n, 1, 7), y(n);
                     t.add(a.data(), b.data(), y.data(), n);
                     return Cat({&y});
                   }});
  cases.push_back({"axpy", 0, [=](const OpsTable& t) {
                     FVec x = NormalV(n, 1, 8), y = NormalV(n, 1, 9);
                     t.axpy(-0.375f, x.data(), y.data(), n);
                     return Cat({&y});
                   }});
  // A parallel double sum in another order: equal to float precision, not bitwise.
  cases.push_back({"sum_of_squares", 1e-7f, [=](const OpsTable& t) {
                     const FVec x = NormalV(300000, 1, 27);
                     return std::vector<float>{
                         static_cast<float>(t.sum_of_squares(x.data(), 300000) / 300000),
                         static_cast<float>(t.sum_of_squares(x.data(), 0))};
                   }});
  // Arrays of 300000 floats (three levels of strided sums), one float, 5000 (two) and none.
  cases.push_back(
      {"sum_of_squares_many", 1e-7f, [=](const OpsTable& t) {
         const FVec a = NormalV(300000, 1, 78), b = NormalV(1, 3, 79), c = NormalV(5000, 2, 80);
         const float* x[4] = {a.data(), b.data(), c.data(), c.data()};
         const int64_t n[4] = {300000, 1, 5000, 0};
         double out[4] = {-1, -1, -1, -1};
         t.sum_of_squares_many(x, n, 4, out);
         return std::vector<float>{static_cast<float>(out[0] / 300000), static_cast<float>(out[1]),
                                   static_cast<float>(out[2] / 5000), static_cast<float>(out[3])};
       }});
  // AdamW over arrays of three chunks and a bit (runtime/adamw_thrust.h's kAdamWChunk
  // threads each), one element, one chunk exactly, none and 5000, decayed and not, over
  // three steps (warmup, a clipping scale), with fp32 and bf16 moments: array by array
  // (adamw_step), then all at once (adamw_step_many). Both give the CPU's bits.
  for (const bool bf16 : {false, true}) {
    cases.push_back(
        {bf16 ? "adamw_step/adamw_step_many, bf16 moments" : "adamw_step/adamw_step_many", 0.0f,
         [=](const OpsTable& t) {
           const int64_t sizes[5] = {3 * 4096 + 5, 1, 4096, 0, 5000};
           std::vector<float> out;
           for (const bool many : {false, true}) {
             std::vector<FVec> w, g, m, v;
             std::vector<AdamWArray> arrays;
             for (int i = 0; i < 5; ++i) {
               const int64_t words = bf16 ? (sizes[i] + 1) / 2 : sizes[i];
               w.push_back(NormalV(sizes[i], 1, 90 + i));
               g.push_back(NormalV(sizes[i], 0.1f, 95 + i));
               m.emplace_back(words, 0.0f);
               v.emplace_back(words, 0.0f);
             }
             for (int i = 0; i < 5; ++i) {
               arrays.push_back(
                   {w[i].data(), g[i].data(), m[i].data(), v[i].data(), sizes[i], i % 2 == 0});
             }
             for (int step = 0; step < 3; ++step) {
               const AdamWScalars s{0.9f,
                                    0.999f,
                                    static_cast<float>(1 / (1 - std::pow(0.9, step + 1))),
                                    static_cast<float>(1 / (1 - std::pow(0.999, step + 1))),
                                    1e-8f,
                                    1e-2f * (step + 1) / 2,
                                    0.1f,
                                    step == 1 ? 0.5f : 1.0f};
               if (many) {
                 t.adamw_step_many(s, arrays.data(), 5, bf16);
               } else {
                 for (const AdamWArray& a : arrays) {
                   t.adamw_step(s, a.decay, a.value, a.grad, a.m, a.v, a.n, bf16);
                 }
               }
             }
             g_case_sync();
             for (int i = 0; i < 5; ++i) {
               out.insert(out.end(), w[i].begin(), w[i].end());
               for (const FVec* moment : {&m[i], &v[i]}) {
                 if (!bf16) {
                   out.insert(out.end(), moment->begin(), moment->end());
                   continue;
                 }
                 const auto* bits = reinterpret_cast<const uint16_t*>(moment->data());
                 for (int64_t j = 0; j < sizes[i]; ++j) {
                   const uint32_t word = static_cast<uint32_t>(bits[j]) << 16;
                   float f;
                   std::memcpy(&f, &word, 4);
                   out.push_back(f);
                 }
               }
             }
           }
           return out;
         }});
  }
  // (The row kernels' cases: within 2e-7, as below.)
  cases.push_back({"softmax_forward/backward", 2e-7f, [=](const OpsTable& t) {
                     FVec x = NormalV(n, 4, 10), y(n), dy = NormalV(n, 1, 11), dx(n);
                     t.softmax_forward(x.data(), y.data(), rows, cols);
                     t.softmax_backward(y.data(), dy.data(), dx.data(), rows, cols);
                     return Cat({&y, &dx});
                   }});
  cases.push_back({"layer_norm_forward/backward", 2e-7f, [=](const OpsTable& t) {
                     FVec x = NormalV(n, 3, 12), g = NormalV(cols, 1, 13), b = NormalV(cols, 1, 14),
                          y(n), mean(rows), rstd(rows);
                     t.layer_norm_forward(x.data(), g.data(), b.data(), y.data(), mean.data(),
                                          rstd.data(), rows, cols, 1e-6f);
                     FVec dy = NormalV(n, 1, 15), dx(n), dg = NormalV(cols, 1, 16),
                          dbeta = NormalV(cols, 1, 17);
                     t.layer_norm_backward(x.data(), g.data(), mean.data(), rstd.data(), dy.data(),
                                           dx.data(), dg.data(), dbeta.data(), rows, cols);
                     return Cat({&y, &mean, &rstd, &dx, &dg, &dbeta});
                   }});
  // The Thrust table's rows run over 32 lanes (runtime/row_kernels.h): rows narrower than
  // the lanes (most lanes idle), a ViT's 197 tokens and 768 features (lanes of unequal and
  // equal length). The lanes' double sums meet in another order than the CPU's column order;
  // rounding to float hides it for these rows, but other data could round a sum the other
  // way: within 2e-7 (about an ulp of the largest output).
  for (const int64_t width : {5, 197, 768}) {
    const int64_t few = 6, m = few * width;
    const uint32_t seed = 100 + static_cast<uint32_t>(width);
    cases.push_back(
        {"softmax_forward/backward, " + std::to_string(width) + " cols", 0, [=](const OpsTable& t) {
           FVec x = NormalV(m, 6, seed), y(m), dy = NormalV(m, 1, seed + 1), dx(m);
           t.softmax_forward(x.data(), y.data(), few, width);
           t.softmax_backward(y.data(), dy.data(), dx.data(), few, width);
           return Cat({&y, &dx});
         }});
    cases.push_back(
        {"layer_norm_forward/backward, " + std::to_string(width) + " cols", 0,
         [=](const OpsTable& t) {
           FVec x = NormalV(m, 3, seed + 2), g = NormalV(width, 1, seed + 3),
                b = NormalV(width, 1, seed + 4), y(m), mean(few), rstd(few);
           for (int64_t j = 0; j < width; ++j) x[j] += 40.0f;  // a far mean
           t.layer_norm_forward(x.data(), g.data(), b.data(), y.data(), mean.data(), rstd.data(),
                                few, width, 1e-6f);
           FVec dy = NormalV(m, 1, seed + 5), dx(m), dg(width, 0.0f), dbeta(width, 0.0f);
           t.layer_norm_backward(x.data(), g.data(), mean.data(), rstd.data(), dy.data(), dx.data(),
                                 dg.data(), dbeta.data(), few, width);
           return Cat({&y, &mean, &rstd, &dx, &dg, &dbeta});
         }});
  }
  for (bool tanh_form : {false, true}) {
    // The CPU GELUs use vectorised exp / erf approximations (runtime/kernels.h).
    cases.push_back({tanh_form ? "gelu tanh" : "gelu erf", 2e-6f, [=](const OpsTable& t) {
                       FVec x = NormalV(n, 3, 18), y(n), dy = NormalV(n, 1, 19);
                       t.gelu_forward(x.data(), y.data(), n, tanh_form);
                       t.gelu_backward(x.data(), dy.data(), dy.data(), n, tanh_form);
                       return Cat({&y, &dy});
                     }});
  }
  cases.push_back({"tanh_forward/backward", 0, [=](const OpsTable& t) {
                     FVec x = NormalV(n, 2, 38), y(n), dy = NormalV(n, 1, 39), dx(n);
                     t.tanh_forward(x.data(), y.data(), n);
                     t.tanh_backward(y.data(), dy.data(), dx.data(), n);
                     t.tanh_forward(x.data(), x.data(), n);  // in place
                     t.tanh_backward(y.data(), dy.data(), dy.data(), n);
                     return Cat({&y, &dx, &x, &dy});
                   }});
  for (bool tanh_form : {false, true}) {
    cases.push_back({tanh_form ? "bias_gelu_forward/gelu_bias_backward tanh"
                               : "bias_gelu_forward/gelu_bias_backward erf",
                     2e-6f, [=](const OpsTable& t) {
                       FVec h = NormalV(n, 3, 28), b = NormalV(cols, 1, 29), act(n),
                            d = NormalV(n, 1, 30), db = NormalV(cols, 1, 31);
                       t.bias_gelu_forward(h.data(), b.data(), act.data(), rows, cols, tanh_form);
                       t.gelu_bias_backward(h.data(), d.data(), db.data(), rows, cols, tanh_form);
                       return Cat({&h, &act, &d, &db});
                     }});
  }
  cases.push_back({"choice_attention_forward/backward", 0, &ChoiceAttentionRun});
  cases.push_back({"zero_dropped_rows", 0, [](const OpsTable& t) {
                     FVec x = NormalV(n, 1, 24);
                     IVec row(rows);
                     for (int64_t i = 0; i < rows; ++i) row[i] = i % 4 == 1 ? -1 : 3 * i;
                     t.zero_dropped_rows(row.data(), x.data(), rows, cols);
                     return Cat({&x});
                   }});
  cases.push_back({"top_k", 0, [](const OpsTable& t) {
                     const int64_t tokens = 50;
                     FVec g = NormalV(tokens * 8, 1, 23), w(tokens * 2);
                     for (int64_t i = 0; i < tokens * 8; i += 3) g[i] = 0.5f;  // ties
                     IVec idx(tokens * 2);
                     t.top_k(g.data(), tokens, 8, 2, idx.data(), w.data());
                     FVec i = AsFloats(idx);
                     return Cat({&i, &w});
                   }});
  // 6 experts: a Philox block of 4 and one of 2; tokens from 2^32 - 3 (counters' high word).
  cases.push_back({"add_router_noise", 0, [](const OpsTable& t) {
                     const int64_t tokens = 41;
                     const NoiseKey key{0x123456789abcull, 17, 3};
                     FVec z = NormalV(tokens * 6, 1, 25), zn(tokens * 6), inplace = z;
                     t.add_router_noise(key, (int64_t{1} << 32) - 3, tokens, 6, 0.25f, z.data(),
                                        zn.data());
                     t.add_router_noise(key, 7, tokens, 6, 1.0f, inplace.data(), inplace.data());
                     return Cat({&zn, &inplace});
                   }});
  // Three groups of 40 tokens over 8 experts, k = 2: vanilla and BPR (with tied top-1
  // gates), then the plan's rows at capacity 9, and the router's d(logits) through them.
  cases.push_back(
      {"assign_slots/plan_rows/router_logits_backward", 0, [](const OpsTable& t) {
         const int64_t s = 40, groups = 3, tokens = s * groups, e = 8, k = 2, cap = 9;
         FVec g = NormalV(tokens * e, 1, 26), w(tokens * k);
         for (int64_t i = 0; i < tokens * e; i += 37) g[i] = 3.0f;  // tied top-1 gates
         IVec idx(tokens * k), slot(tokens * k), load(groups * e), row(tokens * k);
         t.top_k(g.data(), tokens, e, k, idx.data(), w.data());
         std::vector<float> out;
         for (const bool bpr : {false, true}) {
           t.assign_slots(idx.data(), w.data(), tokens, s, e, k, bpr, slot.data(), load.data());
           t.plan_rows(idx.data(), slot.data(), tokens, k, s, cap, groups * cap, row.data());
           for (const IVec* v : {&slot, &load, &row}) {
             const FVec f = AsFloats(*v);
             out.insert(out.end(), f.begin(), f.end());
           }
         }
         FVec y = NormalV(tokens * e, 0.2f, 27), dw = NormalV(tokens * k, 1, 28),
              dz_loss = NormalV(tokens * e, 0.01f, 29), dz(tokens * e);
         t.router_logits_backward(y.data(), idx.data(), row.data(), dw.data(), dz_loss.data(),
                                  dz.data(), tokens, e, k);
         const std::vector<float> last = Cat({&dz});
         out.insert(out.end(), last.begin(), last.end());
         // No tokens (a rank without images): no groups, nothing written.
         IVec untouched(e, -7);
         t.assign_slots(idx.data(), w.data(), 0, s, e, k, true, slot.data(), untouched.data());
         const FVec f = AsFloats(untouched);
         out.insert(out.end(), f.begin(), f.end());
         return out;
       }});
  cases.push_back(
      {"pack_rows/combine_rows/combine_rows_backward", 0, [](const OpsTable& t) {
         const int64_t tokens = 20, k = 2, w = 6, buf_rows = 48;
         IVec row(tokens * k);  // distinct rows, some dropped
         for (int64_t i = 0; i < tokens * k; ++i) row[i] = i % 7 == 2 ? -1 : i + 3;
         FVec x = NormalV(tokens * w, 1, 24), buf(buf_rows * w, 9.0f);
         t.pack_rows(row.data(), x.data(), tokens, k, w, buf.data(), buf_rows);
         FVec weight = NormalV(tokens * k, 1, 25), out(tokens * w);
         t.combine_rows(buf.data(), row.data(), weight.data(), tokens, k, w, out.data());
         FVec dy = NormalV(tokens * w, 1, 26), d_buf(buf_rows * w, 9.0f), d_weight(tokens * k);
         t.combine_rows_backward(buf.data(), row.data(), weight.data(), dy.data(), tokens, k, w,
                                 d_buf.data(), buf_rows, d_weight.data());
         return Cat({&buf, &out, &d_buf, &d_weight});
       }});
  // GEMMs (cuBLAS on a GPU, OpenBLAS on the host tables): every transpose pair, beta 0
  // and 1, and a strided batch with gaps between matrices.
  cases.push_back({"gemm/gemm_strided_batched", 1e-5f, [](const OpsTable& t) {
                     const int64_t m = 13, n = 19, k = 45, batch = 3;
                     FVec all;
                     for (int ta = 0; ta < 2; ++ta) {
                       for (int tb = 0; tb < 2; ++tb) {
                         FVec a = NormalV(m * k + 5, 1, 40 + ta),
                              b = NormalV(k * n + 7, 1, 42 + tb), c = NormalV(m * (n + 2), 1, 44);
                         // lda/ldb as stored: rows of op's source; ldc n + 2 (padded rows).
                         t.gemm(ta, tb, m, n, k, 0.75f, a.data(), ta ? m : k, b.data(), tb ? k : n,
                                ta == tb ? 1.0f : 0.0f, c.data(), n + 2);
                         const std::vector<float> got = Cat({&c});
                         all.resize(all.size() + got.size());
                         std::copy(got.begin(), got.end(), all.end() - got.size());
                       }
                     }
                     FVec a = NormalV(batch * (m * k + 3), 1, 46),
                          b = NormalV(batch * (n * k + 1), 1, 47),
                          c = NormalV(batch * m * n, 1, 48);
                     t.gemm_strided_batched(false, true, m, n, k, 1.0f, a.data(), k, m * k + 3,
                                            b.data(), k, n * k + 1, 0.5f, c.data(), n, m * n,
                                            batch);
                     return Cat({&all, &c});
                   }});
  return cases;
}

// Entries the Thrust table leaves to the device's own code (the composed self-attention):
// the CUDA test runs them against the CPU table; CI runs the cases over the CPU table.
inline std::vector<OpCase> AttentionCases() {
  std::vector<OpCase> cases;
  cases.push_back({"attention_forward/backward", 2e-5f, [](const OpsTable& t) {
                     const int64_t batch = 3, tokens = 17, heads = 4, dh = 8, d = heads * dh;
                     FVec qkv = NormalV(batch * tokens * 3 * d, 1.5f, 50),
                          dout = NormalV(batch * tokens * d, 1.0f, 51), out(batch * tokens * d),
                          probs(batch * heads * tokens * tokens), dqkv(qkv.size());
                     t.attention_forward(qkv.data(), out.data(), probs.data(), batch, tokens, heads,
                                         dh);
                     t.attention_backward(qkv.data(), probs.data(), dout.data(), dqkv.data(), batch,
                                          tokens, heads, dh);
                     return Cat({&out, &probs, &dqkv});
                   }});
  // A device's per-choice attention may be composed too (ops.h: the CUDA table's).
  cases.push_back({"choice_attention_forward/backward (device's)", 2e-5f, &ChoiceAttentionRun});
  return cases;
}

inline float MaxAbs(const std::vector<float>& v) {
  float m = 0;
  for (float x : v) m = std::max(m, std::fabs(x));
  return m;
}

inline void ExpectClose(const std::vector<float>& want, const std::vector<float>& got, float tol) {
  ASSERT_EQ(want.size(), got.size());
  if (tol == 0) {
    for (size_t i = 0; i < want.size(); ++i) {
      ASSERT_EQ(0, std::memcmp(&want[i], &got[i], sizeof(float)))
          << "not bit for bit at element " << i << " of " << want.size() << ": " << want[i]
          << " vs " << got[i];
    }
    return;
  }
  const float bound = tol * std::max(1.0f, MaxAbs(want));
  for (size_t i = 0; i < want.size(); ++i) {
    ASSERT_NEAR(want[i], got[i], bound) << "element " << i;
  }
}
}  // namespace op_cases
}  // namespace moerun

#endif  // MOERUN_TESTS_OP_CASES_H_
