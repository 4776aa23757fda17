// Fused gather-and-attend decode attention over pages of a KV pool (CPU).
//
// One decode step: every row (one sequence x KV head) holds G queries (the query heads of its group) and attends to
// a list of pages of a pool of keys and values `(N, P, D)`, read in place: no copy of the selected pages is made.
// Pages are listed per row, either one list shared by the group (`S == 1`: Quest with one page set per KV head, a
// ragged row's own pages) or one list per query head (`S == G`: Quest per query head). Per query head lists are
// merged into their union, so a page chosen by several query heads of a group is read from memory once; each query
// head then attends exactly to its own pages.
//
// Numerics: float32 accumulation for float32 and bfloat16 storage; split-K over page chunks (flash-decoding's
// reduction) for parallelism, the chunks combined with the usual max-rescaling. Slots are masked by an optional
// additive bias `(N, P)` (-inf: empty slot) and by an optional slot limit of a row-major dense layout (slot `j` of
// page `p` exists iff `(p % per_row) * P + j < limit`).

#include <torch/extension.h>
#include <ATen/Parallel.h>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace {

constexpr float NEG_INF = -std::numeric_limits<float>::infinity();

// exp for float32, written so that the compiler vectorises it (Cephes' expf: range reduction by ln 2 and a degree-6
// polynomial; relative error about 1e-7); 0 for x below -87.3 (and for -inf).
inline float exp_f(float x) {
  const bool under = x < -87.3365447504f;
  x = std::min(std::max(x, -87.3365447504f), 88.0f);
  float fx = std::floor(x * 1.44269504088896341f + 0.5f);
  x = x - fx * 0.693359375f + fx * 2.12194440e-4f;
  const float z = x * x;
  float y = 1.9875691500e-4f;
  y = y * x + 1.3981999507e-3f;
  y = y * x + 8.3334519073e-3f;
  y = y * x + 4.1665795894e-2f;
  y = y * x + 1.6666665459e-1f;
  y = y * x + 5.0000001201e-1f;
  y = y * z + x + 1.0f;
  const int32_t e = (static_cast<int32_t>(fx) + 127) << 23;
  float scale;
  std::memcpy(&scale, &e, sizeof(float));
  return under ? 0.0f : y * scale;
}

#if defined(__AVX512F__)
// exp_f on 16 lanes (the same range reduction and polynomial, with fused multiply-adds).
inline __m512 exp16(__m512 x) {
  const __m512 lo = _mm512_set1_ps(-87.3365447504f);
  const __mmask16 under = _mm512_cmp_ps_mask(x, lo, _CMP_LT_OQ);
  x = _mm512_min_ps(_mm512_max_ps(x, lo), _mm512_set1_ps(88.0f));
  const __m512 fx = _mm512_roundscale_ps(_mm512_fmadd_ps(x, _mm512_set1_ps(1.44269504088896341f), _mm512_set1_ps(0.5f)),
                                         _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC);
  x = _mm512_fnmadd_ps(fx, _mm512_set1_ps(0.693359375f), x);
  x = _mm512_fmadd_ps(fx, _mm512_set1_ps(2.12194440e-4f), x);
  const __m512 z = _mm512_mul_ps(x, x);
  __m512 y = _mm512_set1_ps(1.9875691500e-4f);
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.3981999507e-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(8.3334519073e-3f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(4.1665795894e-2f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(1.6666665459e-1f));
  y = _mm512_fmadd_ps(y, x, _mm512_set1_ps(5.0000001201e-1f));
  y = _mm512_add_ps(_mm512_fmadd_ps(y, z, x), _mm512_set1_ps(1.0f));
  const __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvttps_epi32(fx), _mm512_set1_epi32(127)), 23);
  return _mm512_maskz_mov_ps(static_cast<__mmask16>(~under), _mm512_mul_ps(y, _mm512_castsi512_ps(e)));
}
#endif

// max of a[0:n]
inline float max_n(const float* a, int64_t n) {
#if defined(__AVX512F__)
  __m512 m = _mm512_set1_ps(NEG_INF);
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(a + j));
  if (j < n) m = _mm512_max_ps(m, _mm512_mask_loadu_ps(m, static_cast<__mmask16>((1u << (n - j)) - 1), a + j));
  return _mm512_reduce_max_ps(m);
#else
  float mx = NEG_INF;
#pragma omp simd reduction(max : mx)
  for (int64_t j = 0; j < n; ++j) mx = a[j] > mx ? a[j] : mx;
  return mx;
#endif
}

// a[j] = exp(a[j] - mn) for j < n; returns their sum
inline float exp_sum_n(float* a, int64_t n, float mn) {
#if defined(__AVX512F__)
  const __m512 M = _mm512_set1_ps(mn);
  __m512 sum = _mm512_setzero_ps();
  int64_t j = 0;
  for (; j + 16 <= n; j += 16) {
    const __m512 e = exp16(_mm512_sub_ps(_mm512_loadu_ps(a + j), M));
    _mm512_storeu_ps(a + j, e);
    sum = _mm512_add_ps(sum, e);
  }
  if (j < n) {
    const __mmask16 k = static_cast<__mmask16>((1u << (n - j)) - 1);
    const __m512 e = exp16(_mm512_sub_ps(_mm512_maskz_loadu_ps(k, a + j), M));
    _mm512_mask_storeu_ps(a + j, k, e);
    sum = _mm512_mask_add_ps(sum, k, sum, e);
  }
  return _mm512_reduce_add_ps(sum);
#else
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    const float e2 = exp_f(a[j] - mn);
    a[j] = e2;
    sum += e2;
  }
  return sum;
#endif
}

inline float to_float(float x) { return x; }
inline float to_float(c10::BFloat16 x) {
  uint32_t u = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(float));
  return f;
}

// A row of D values as float32: float32 storage is read in place, bfloat16 converted into `buf`.
inline const float* row_f32(const float* src, float*, int64_t) { return src; }
inline const float* row_f32(const c10::BFloat16* src, float* buf, int64_t D) {
  const uint16_t* s = reinterpret_cast<const uint16_t*>(src);
#pragma omp simd
  for (int64_t d = 0; d < D; ++d) {
    uint32_t u = static_cast<uint32_t>(s[d]) << 16;
    std::memcpy(&buf[d], &u, sizeof(float));
  }
  return buf;
}

// Four dot products with one key row at once: the row is loaded once, four vector accumulators, one horizontal sum
// each at the end (a dot product at a time is bound by its horizontal sums, not by memory).
inline void dot4(const float* q0, const float* q1, const float* q2, const float* q3, const float* k, int64_t D,
                 float* out) {
#if defined(__AVX512F__)
  if (D % 32 == 0) {  // eight accumulators (two per query head: independent chains of multiply-adds), then the
                      // four sums at once (a transpose of sums, not four reductions)
    __m512 a0 = _mm512_setzero_ps(), a1 = _mm512_setzero_ps(), a2 = _mm512_setzero_ps(), a3 = _mm512_setzero_ps();
    __m512 b0 = _mm512_setzero_ps(), b1 = _mm512_setzero_ps(), b2 = _mm512_setzero_ps(), b3 = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 32) {
      const __m512 kd = _mm512_loadu_ps(k + d), ke = _mm512_loadu_ps(k + d + 16);
      a0 = _mm512_fmadd_ps(_mm512_loadu_ps(q0 + d), kd, a0);
      a1 = _mm512_fmadd_ps(_mm512_loadu_ps(q1 + d), kd, a1);
      a2 = _mm512_fmadd_ps(_mm512_loadu_ps(q2 + d), kd, a2);
      a3 = _mm512_fmadd_ps(_mm512_loadu_ps(q3 + d), kd, a3);
      b0 = _mm512_fmadd_ps(_mm512_loadu_ps(q0 + d + 16), ke, b0);
      b1 = _mm512_fmadd_ps(_mm512_loadu_ps(q1 + d + 16), ke, b1);
      b2 = _mm512_fmadd_ps(_mm512_loadu_ps(q2 + d + 16), ke, b2);
      b3 = _mm512_fmadd_ps(_mm512_loadu_ps(q3 + d + 16), ke, b3);
    }
    a0 = _mm512_add_ps(a0, b0);
    a1 = _mm512_add_ps(a1, b1);
    a2 = _mm512_add_ps(a2, b2);
    a3 = _mm512_add_ps(a3, b3);
    // 128-bit lanes: [a0 halves summed, a1 halves summed], then one lane per accumulator, then within lanes
    const __m512 t0 = _mm512_add_ps(_mm512_shuffle_f32x4(a0, a1, _MM_SHUFFLE(1, 0, 1, 0)),
                                    _mm512_shuffle_f32x4(a0, a1, _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512 t1 = _mm512_add_ps(_mm512_shuffle_f32x4(a2, a3, _MM_SHUFFLE(1, 0, 1, 0)),
                                    _mm512_shuffle_f32x4(a2, a3, _MM_SHUFFLE(3, 2, 3, 2)));
    const __m512 u = _mm512_add_ps(_mm512_shuffle_f32x4(t0, t1, _MM_SHUFFLE(2, 0, 2, 0)),
                                   _mm512_shuffle_f32x4(t0, t1, _MM_SHUFFLE(3, 1, 3, 1)));
    const __m512 v = _mm512_add_ps(u, _mm512_permute_ps(u, _MM_SHUFFLE(2, 3, 0, 1)));
    const __m512 w = _mm512_add_ps(v, _mm512_permute_ps(v, _MM_SHUFFLE(1, 0, 3, 2)));
    alignas(64) float tmp[16];
    _mm512_store_ps(tmp, w);
    out[0] = tmp[0];
    out[1] = tmp[4];
    out[2] = tmp[8];
    out[3] = tmp[12];
    return;
  }
#endif
  float a0 = 0.0f, a1 = 0.0f, a2 = 0.0f, a3 = 0.0f;
#pragma omp simd reduction(+ : a0, a1, a2, a3)
  for (int64_t d = 0; d < D; ++d) {
    const float kd = k[d];
    a0 += q0[d] * kd;
    a1 += q1[d] * kd;
    a2 += q2[d] * kd;
    a3 += q3[d] * kd;
  }
  out[0] = a0;
  out[1] = a1;
  out[2] = a2;
  out[3] = a3;
}

// acc[0:W] += sum_j w[j] * V[j * D + 0:W] with the W accumulators held in registers across the rows.
template <int W>
inline void accumulate_block(float* acc, const float* w, const float* V, int64_t rows, int64_t D) {
  float t[W];
#pragma omp simd
  for (int x = 0; x < W; ++x) t[x] = acc[x];
  for (int64_t j = 0; j < rows; ++j) {
    const float wj = w[j];
    if (wj == 0.0f) continue;
    const float* vr = V + j * D;
#pragma omp simd
    for (int x = 0; x < W; ++x) t[x] += wj * vr[x];
  }
#pragma omp simd
  for (int x = 0; x < W; ++x) acc[x] = t[x];
}

inline void accumulate(float* acc, const float* w, const float* V, int64_t rows, int64_t D) {
  int64_t d0 = 0;
  for (; d0 + 64 <= D; d0 += 64) accumulate_block<64>(acc + d0, w, V + d0, rows, D);
  for (; d0 + 16 <= D; d0 += 16) accumulate_block<16>(acc + d0, w, V + d0, rows, D);
  for (; d0 < D; ++d0) accumulate_block<1>(acc + d0, w, V + d0, rows, D);
}

// accumulate() for four query heads at once: acc + g * D += sum_j w[g * ws + j] * V[j], g < 4. Each value row is
// loaded once for the four heads, and the sixteen accumulators of a 64-wide block are independent chains.
inline void accumulate4(float* acc, const float* w, int64_t ws, const float* V, int64_t rows, int64_t D) {
#if defined(__AVX512F__)
  if (D % 64 == 0) {
    for (int64_t d0 = 0; d0 < D; d0 += 64) {
      __m512 t[4][4];
      for (int g = 0; g < 4; ++g)
        for (int x = 0; x < 4; ++x) t[g][x] = _mm512_loadu_ps(acc + g * D + d0 + 16 * x);
      for (int64_t j = 0; j < rows; ++j) {
        // an empty slot (weight 0 for every head) is skipped: its value row may hold anything, NaN included
        if (w[j] == 0.0f && w[ws + j] == 0.0f && w[2 * ws + j] == 0.0f && w[3 * ws + j] == 0.0f) continue;
        const float* vr = V + j * D + d0;
        const __m512 v0 = _mm512_loadu_ps(vr), v1 = _mm512_loadu_ps(vr + 16), v2 = _mm512_loadu_ps(vr + 32),
                     v3 = _mm512_loadu_ps(vr + 48);
        for (int g = 0; g < 4; ++g) {
          const __m512 wg = _mm512_set1_ps(w[g * ws + j]);
          t[g][0] = _mm512_fmadd_ps(wg, v0, t[g][0]);
          t[g][1] = _mm512_fmadd_ps(wg, v1, t[g][1]);
          t[g][2] = _mm512_fmadd_ps(wg, v2, t[g][2]);
          t[g][3] = _mm512_fmadd_ps(wg, v3, t[g][3]);
        }
      }
      for (int g = 0; g < 4; ++g)
        for (int x = 0; x < 4; ++x) _mm512_storeu_ps(acc + g * D + d0 + 16 * x, t[g][x]);
    }
    return;
  }
#endif
  for (int g = 0; g < 4; ++g) accumulate(acc + g * D, w + g * ws, V, rows, D);
}

struct Lists {
  std::vector<int64_t> start;  // (R + 1,) offsets of each row's entries
  std::vector<int64_t> page;   // page ids, ascending within a row when merged from per-query-head lists
  std::vector<uint64_t> mask;  // which query heads of the group read the page (bit g)
};

// The pages each row reads: `pages` (R, S, W), -1 = no page. S == 1: the list as given, read by the whole group;
// S == G: the union of the group's lists, each page with the set of query heads that chose it.
Lists build_lists(const torch::Tensor& pages, int64_t G) {
  const int64_t R = pages.size(0), S = pages.size(1), W = pages.size(2);
  const int64_t* p = pages.data_ptr<int64_t>();
  const uint64_t all = G >= 64 ? ~uint64_t(0) : ((uint64_t(1) << G) - 1);
  std::vector<std::vector<int64_t>> rp(R);
  std::vector<std::vector<uint64_t>> rm(R);
  at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const int64_t* pr = p + r * S * W;
      if (S == 1) {
        for (int64_t w = 0; w < W; ++w)
          if (pr[w] >= 0) rp[r].push_back(pr[w]);
        std::sort(rp[r].begin(), rp[r].end());  // in memory order: kinder to the memory than a selection's order
        rm[r].assign(rp[r].size(), all);
        continue;
      }
      int64_t lo = std::numeric_limits<int64_t>::max(), hi = -1, n = 0;
      for (int64_t i = 0; i < S * W; ++i)
        if (pr[i] >= 0) {
          lo = std::min(lo, pr[i]);
          hi = std::max(hi, pr[i]);
          ++n;
        }
      if (n == 0) continue;
      if (hi - lo + 1 <= 64 * n + 1024) {  // a stamp array over the row's page range: linear time
        std::vector<uint64_t> stamp(hi - lo + 1, 0);
        for (int64_t s = 0; s < S; ++s)
          for (int64_t w = 0; w < W; ++w) {
            const int64_t q = pr[s * W + w];
            if (q >= 0) stamp[q - lo] |= uint64_t(1) << s;
          }
        for (int64_t i = 0; i < hi - lo + 1; ++i)
          if (stamp[i]) {
            rp[r].push_back(lo + i);
            rm[r].push_back(stamp[i]);
          }
      } else {  // pages spread over a wide range: sort the (page, head) pairs
        std::vector<std::pair<int64_t, int64_t>> pairs;
        pairs.reserve(n);
        for (int64_t s = 0; s < S; ++s)
          for (int64_t w = 0; w < W; ++w)
            if (pr[s * W + w] >= 0) pairs.emplace_back(pr[s * W + w], s);
        std::sort(pairs.begin(), pairs.end());
        for (const auto& pr2 : pairs) {
          if (rp[r].empty() || rp[r].back() != pr2.first) {
            rp[r].push_back(pr2.first);
            rm[r].push_back(0);
          }
          rm[r].back() |= uint64_t(1) << pr2.second;
        }
      }
    }
  });
  Lists out;
  out.start.assign(R + 1, 0);
  for (int64_t r = 0; r < R; ++r) out.start[r + 1] = out.start[r] + static_cast<int64_t>(rp[r].size());
  out.page.reserve(out.start[R]);
  out.mask.reserve(out.start[R]);
  for (int64_t r = 0; r < R; ++r) {
    out.page.insert(out.page.end(), rp[r].begin(), rp[r].end());
    out.mask.insert(out.mask.end(), rm[r].begin(), rm[r].end());
  }
  return out;
}

template <typename T>
void attend(const torch::Tensor& qf, const torch::Tensor& kpages, const torch::Tensor& vpages, const Lists& lists,
            const T* bias, int64_t per_row, int64_t limit, float scale, torch::Tensor& out) {
  const int64_t R = qf.size(0), G = qf.size(1), D = qf.size(2);
  const int64_t P = kpages.size(1);
  const float* q = qf.data_ptr<float>();
  const T* kp = kpages.data_ptr<T>();
  const T* vp = vpages.data_ptr<T>();
  const int64_t total = lists.start[R];
  const int64_t threads = at::get_num_threads();
  // work items: chunks of a row's pages (split-K), enough of them to keep every thread busy
  const int64_t chunk = std::max<int64_t>(8, (total + 4 * threads - 1) / (4 * threads));
  std::vector<int64_t> item_row, item_begin, item_end;
  for (int64_t r = 0; r < R; ++r)
    for (int64_t b = lists.start[r]; b < lists.start[r + 1]; b += chunk) {
      item_row.push_back(r);
      item_begin.push_back(b);
      item_end.push_back(std::min(b + chunk, lists.start[r + 1]));
    }
  const int64_t I = static_cast<int64_t>(item_row.size());
  std::vector<float> pm(I * G, NEG_INF), pl(I * G, 0.0f), pacc(I * G * D, 0.0f);
  const int64_t dist = std::max<int64_t>(1, std::min<int64_t>(8, 16384 / (2 * P * D * int64_t(sizeof(T)))));
  const int64_t GP = std::max<int64_t>(1, 64 / P), SP = GP * P;  // pages per softmax update, their slots
  at::parallel_for(0, I, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> s(G * SP), kbuf(D), vpage(std::is_same<T, float>::value ? 0 : P * D), dots(G + 4);
    std::vector<int64_t> lens(GP);
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t r = item_row[it];
      const float* qr = q + r * G * D;
      float* m = pm.data() + it * G;
      float* l = pl.data() + it * G;
      float* acc = pacc.data() + it * G * D;
      // pages are taken in groups of up to GP (64 slots): one softmax update per group, not per page
      for (int64_t e0 = item_begin[it]; e0 < item_end[it]; e0 += GP) {
        const int64_t ne = std::min(GP, item_end[it] - e0);
        uint64_t group_sel = 0;
        for (int64_t pi = 0; pi < ne; ++pi) {
          const int64_t e = e0 + pi;
          const int64_t pid = lists.page[e];
          const uint64_t sel = lists.mask[e];
          float* sp = s.data() + pi * P;  // this page's columns (row stride SP per query head)
          int64_t jmax = P;
          if (per_row > 0) jmax = std::max<int64_t>(0, std::min<int64_t>(P, limit - (pid % per_row) * P));
          lens[pi] = jmax;
          for (int64_t g = 0; g < G; ++g)
            for (int64_t j = jmax; j < P; ++j) sp[g * SP + j] = NEG_INF;
          if (jmax == 0) continue;
          group_sel |= sel;
          const T* K = kp + pid * P * D;
          const T* bp = bias ? bias + pid * P : nullptr;
          // the keys and values of the page about 16 KB ahead are fetched while this one is computed (pages are
          // scattered in the pool, so the hardware prefetcher would restart at every page)
          const int64_t ahead = std::min(e + dist, item_end[it] - 1) > e ? std::min(e + dist, item_end[it] - 1) : -1;
          const T* nK = ahead >= 0 ? kp + lists.page[ahead] * P * D : nullptr;
          const T* nV = nK ? vp + lists.page[ahead] * P * D : nullptr;
          constexpr int64_t LINE = 64 / sizeof(T);
          for (int64_t j = 0; j < jmax; ++j) {
            if (nK) {
              for (int64_t d = 0; d < D; d += LINE) {
                __builtin_prefetch(nK + j * D + d);
                __builtin_prefetch(nV + j * D + d);
              }
            }
            const float b = bp ? to_float(bp[j]) : 0.0f;
            if (b == NEG_INF) {
              for (int64_t g = 0; g < G; ++g) sp[g * SP + j] = NEG_INF;
              continue;
            }
            const float* kr = row_f32(K + j * D, kbuf.data(), D);
            for (int64_t g0 = 0; g0 < G; g0 += 4) {  // four query heads at a time (the last block repeats one)
              const float* q0 = qr + g0 * D;
              const float* q1 = qr + std::min(g0 + 1, G - 1) * D;
              const float* q2 = qr + std::min(g0 + 2, G - 1) * D;
              const float* q3 = qr + std::min(g0 + 3, G - 1) * D;
              dot4(q0, q1, q2, q3, kr, D, dots.data() + g0);
            }
            for (int64_t g = 0; g < G; ++g) sp[g * SP + j] = ((sel >> g) & 1) ? dots[g] * scale + b : NEG_INF;
          }
        }
        const int64_t n = ne * P;  // the group's columns (empty slots and unselected pages hold -inf)
        bool any = false;
        for (int64_t g = 0; g < G; ++g) {
          float* sg = s.data() + g * SP;
          if (!((group_sel >> g) & 1)) {
            std::fill(sg, sg + n, 0.0f);
            continue;
          }
          const float mx = max_n(sg, n);
          if (mx == NEG_INF) {
            std::fill(sg, sg + n, 0.0f);
            continue;
          }
          any = true;
          const float mn = std::max(m[g], mx);
          if (mn > m[g] && m[g] != NEG_INF) {
            const float c = exp_f(m[g] - mn);
            l[g] *= c;
            float* ag = acc + g * D;
#pragma omp simd
            for (int64_t d = 0; d < D; ++d) ag[d] *= c;
          }
          m[g] = mn;
          l[g] += exp_sum_n(sg, n, mn);
        }
        if (!any) continue;
        for (int64_t pi = 0; pi < ne; ++pi) {
          const int64_t jmax = lens[pi];
          const uint64_t sel = lists.mask[e0 + pi] & group_sel;
          if (jmax == 0 || !sel) continue;
          const T* V = vp + lists.page[e0 + pi] * P * D;
          const float* Vf;
          if constexpr (std::is_same<T, float>::value) {
            Vf = reinterpret_cast<const float*>(V);
          } else {
            for (int64_t j = 0; j < jmax; ++j) row_f32(V + j * D, vpage.data() + j * D, D);
            Vf = vpage.data();
          }
          // a head that did not choose this page has weight 0 on its slots, so four heads can be taken together
          int64_t g = 0;
          for (; g + 4 <= G; g += 4)
            if ((sel >> g) & 0xF) accumulate4(acc + g * D, s.data() + g * SP + pi * P, SP, Vf, jmax, D);
          for (; g < G; ++g)
            if ((sel >> g) & 1) accumulate(acc + g * D, s.data() + g * SP + pi * P, Vf, jmax, D);
        }
      }
    }
  });
  // combine each row's chunks
  std::vector<int64_t> first(R + 1, 0);
  for (int64_t it = 0; it < I; ++it) first[item_row[it] + 1]++;
  for (int64_t r = 0; r < R; ++r) first[r + 1] += first[r];
  float* o = out.data_ptr<float>();
  at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r)
      for (int64_t g = 0; g < G; ++g) {
        float* og = o + (r * G + g) * D;
        std::fill(og, og + D, 0.0f);
        float M = NEG_INF;
        for (int64_t it = first[r]; it < first[r + 1]; ++it) M = std::max(M, pm[it * G + g]);
        if (M == NEG_INF) continue;  // nothing to attend to: zeros
        float den = 0.0f;
        for (int64_t it = first[r]; it < first[r + 1]; ++it) {
          const float mi = pm[it * G + g];
          if (mi == NEG_INF) continue;
          const float c = exp_f(mi - M);
          den += pl[it * G + g] * c;
          const float* ai = pacc.data() + (it * G + g) * D;
#pragma omp simd
          for (int64_t d = 0; d < D; ++d) og[d] += c * ai[d];
        }
        const float inv = 1.0f / den;
#pragma omp simd
        for (int64_t d = 0; d < D; ++d) og[d] *= inv;
      }
  });
}

}  // namespace

// q (R, G, D); kpages, vpages (N, P, D) float32 or bfloat16, contiguous; pages (R, S, W) int64 (S == 1 or G);
// bias (N, P) of the pages' dtype or an empty tensor; per_row, limit: the dense layout's slot limit (per_row 0: none).
// Returns (out (R, G, D) in q's dtype, pages read per row (R,) int64: distinct pages, each read once).
std::vector<torch::Tensor> paged_attention(torch::Tensor q, torch::Tensor kpages, torch::Tensor vpages,
                                           torch::Tensor pages, torch::Tensor bias, int64_t per_row, int64_t limit,
                                           double scale) {
  TORCH_CHECK(q.dim() == 3 && kpages.dim() == 3 && vpages.dim() == 3 && pages.dim() == 3,
              "paged_attention: q (R, G, D), kpages/vpages (N, P, D), pages (R, S, W)");
  TORCH_CHECK(kpages.sizes() == vpages.sizes(), "paged_attention: kpages and vpages differ in shape");
  TORCH_CHECK(kpages.scalar_type() == vpages.scalar_type(), "paged_attention: kpages and vpages differ in dtype");
  TORCH_CHECK(kpages.is_contiguous() && vpages.is_contiguous(), "paged_attention: the page pools must be contiguous");
  TORCH_CHECK(q.size(2) == kpages.size(2), "paged_attention: head dims differ");
  TORCH_CHECK(pages.size(0) == q.size(0), "paged_attention: pages must list the pages of every row");
  const int64_t G = q.size(1);
  TORCH_CHECK(G <= 64, "paged_attention: at most 64 query heads per KV head");
  TORCH_CHECK(pages.size(1) == 1 || pages.size(1) == G, "paged_attention: one page list per row or per query head");
  const auto st = kpages.scalar_type();
  TORCH_CHECK(st == torch::kFloat32 || st == torch::kBFloat16, "paged_attention: float32 or bfloat16 pages");
  const bool has_bias = bias.numel() > 0;
  if (has_bias) {
    TORCH_CHECK(bias.scalar_type() == st && bias.is_contiguous() && bias.size(0) == kpages.size(0) &&
                    bias.size(1) == kpages.size(1),
                "paged_attention: bias must be (N, P), contiguous, of the pages' dtype");
  }
  auto pg = pages.to(torch::kInt64).contiguous();
  const int64_t N = kpages.size(0);
  if (pg.numel()) {
    TORCH_CHECK(pg.max().item<int64_t>() < N, "paged_attention: a page id is past the pool");
  }
  auto qf = q.to(torch::kFloat32).contiguous();
  Lists lists = build_lists(pg, G);
  auto out = torch::zeros({q.size(0), G, q.size(2)}, qf.options());
  if (st == torch::kFloat32) {
    attend<float>(qf, kpages, vpages, lists, has_bias ? bias.data_ptr<float>() : nullptr, per_row, limit,
                  static_cast<float>(scale), out);
  } else {
    attend<c10::BFloat16>(qf, kpages, vpages, lists, has_bias ? bias.data_ptr<c10::BFloat16>() : nullptr, per_row,
                          limit, static_cast<float>(scale), out);
  }
  auto counts = torch::empty({q.size(0)}, torch::kInt64);
  int64_t* c = counts.data_ptr<int64_t>();
  for (int64_t r = 0; r < q.size(0); ++r) c[r] = lists.start[r + 1] - lists.start[r];
  return {out.to(q.scalar_type()), counts};
}

namespace {

// Quest's bounds: out[g, x] = sum_d relu(q_gd) * meta[d, x] + q_gd * meta[D + d, x]. Blocks of 64 pages x 4 query
// heads are accumulated in registers down the 2D metadata rows, so each metadata value is read once and used by four
// query heads (the accumulators never go through memory).
inline float load_f(const float* p, int64_t i) { return p[i]; }
inline float load_f(const c10::BFloat16* p, int64_t i) {
  uint32_t u = static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(p)[i]) << 16;
  float f;
  std::memcpy(&f, &u, sizeof(float));
  return f;
}

template <typename T, int W>
inline void bounds_block(const float* c0, const float* c1, const float* c2, const float* c3, const T* meta,
                         int64_t rows, int64_t sD, float* o0, float* o1, float* o2, float* o3) {
  float t0[W] = {}, t1[W] = {}, t2[W] = {}, t3[W] = {};
  for (int64_t dd = 0; dd < rows; ++dd) {
    const T* mr = meta + dd * sD;
    const float a0 = c0[dd], a1 = c1[dd], a2 = c2[dd], a3 = c3[dd];
#pragma omp simd
    for (int x = 0; x < W; ++x) {
      const float m = load_f(mr, x);
      t0[x] += a0 * m;
      t1[x] += a1 * m;
      t2[x] += a2 * m;
      t3[x] += a3 * m;
    }
  }
  for (int x = 0; x < W; ++x) {
    o0[x] = t0[x];
    o1[x] = t1[x];
    o2[x] = t2[x];
    o3[x] = t3[x];
  }
}

template <typename T>
void bounds_impl(const float* q, const T* meta, int64_t R, int64_t G, int64_t D, int64_t cur, int64_t sR, int64_t sD,
                 float* out) {
  constexpr int64_t CH = 256;
  const int64_t nch = (cur + CH - 1) / CH;
  const int64_t G4 = (G + 3) / 4 * 4;
  at::parallel_for(0, R * nch, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> coef(G4 * 2 * D), tmp(G4 * CH);
    for (int64_t it = i0; it < i1; ++it) {
      const int64_t r = it / nch, c0 = (it % nch) * CH, n = std::min(CH, cur - c0);
      const float* qr = q + r * G * D;
      for (int64_t g = 0; g < G4; ++g)
        for (int64_t d = 0; d < D; ++d) {
          const float v = qr[std::min(g, G - 1) * D + d];
          coef[g * 2 * D + d] = std::max(v, 0.0f);
          coef[g * 2 * D + D + d] = v;
        }
      const T* mb = meta + r * sR + c0;
      for (int64_t g = 0; g < G4; g += 4) {
        const float* cg = coef.data() + g * 2 * D;
        float* tg = tmp.data() + g * CH;
        int64_t x = 0;
        for (; x + 64 <= n; x += 64)
          bounds_block<T, 64>(cg, cg + 2 * D, cg + 4 * D, cg + 6 * D, mb + x, 2 * D, sD, tg + x, tg + CH + x,
                              tg + 2 * CH + x, tg + 3 * CH + x);
        for (; x < n; ++x)
          bounds_block<T, 1>(cg, cg + 2 * D, cg + 4 * D, cg + 6 * D, mb + x, 2 * D, sD, tg + x, tg + CH + x,
                             tg + 2 * CH + x, tg + 3 * CH + x);
      }
      for (int64_t g = 0; g < G; ++g)
        std::copy(tmp.data() + g * CH, tmp.data() + g * CH + n, out + (r * G + g) * cur + c0);
    }
  });
}

}  // namespace

// q (R, G, D); meta (R, 2D, M) with rows [0, D) = M - m and [D, 2D) = m of each page's keys (last dim contiguous),
// float32 or bfloat16; cur <= M -> (R, G, cur) Quest bounds of the first `cur` pages, in the metadata's dtype
// (accumulated in float32).
torch::Tensor page_bounds(torch::Tensor q, torch::Tensor meta, int64_t cur) {
  TORCH_CHECK(q.dim() == 3 && meta.dim() == 3, "page_bounds: q (R, G, D), meta (R, 2D, M)");
  TORCH_CHECK(meta.size(0) == q.size(0) && meta.size(1) == 2 * q.size(2), "page_bounds: meta must be (R, 2D, M)");
  TORCH_CHECK(meta.stride(2) == 1, "page_bounds: the pages of meta must be contiguous");
  TORCH_CHECK(cur >= 0 && cur <= meta.size(2), "page_bounds: cur past the pages");
  const auto st = meta.scalar_type();
  TORCH_CHECK(st == torch::kFloat32 || st == torch::kBFloat16, "page_bounds: float32 or bfloat16 metadata");
  auto qf = q.to(torch::kFloat32).contiguous();
  const int64_t R = q.size(0), G = q.size(1), D = q.size(2);
  auto out = torch::empty({R, G, cur}, qf.options());
  if (cur == 0 || R == 0) return out;
  if (st == torch::kFloat32)
    bounds_impl<float>(qf.data_ptr<float>(), meta.data_ptr<float>(), R, G, D, cur, meta.stride(0), meta.stride(1),
                       out.data_ptr<float>());
  else
    bounds_impl<c10::BFloat16>(qf.data_ptr<float>(), meta.data_ptr<c10::BFloat16>(), R, G, D, cur, meta.stride(0),
                               meta.stride(1), out.data_ptr<float>());
  return out.to(st);  // rounded as a matmul in the metadata's dtype rounds: the same pages are chosen
}

// page_row (N,) int64: the row owning each page (-1: free) -> (rows, 1, W) int64 table of each row's pages in pool
// order, -1 past its pages (a counting sort: linear time).
torch::Tensor owner_table(torch::Tensor page_row, int64_t rows) {
  TORCH_CHECK(page_row.dim() == 1, "owner_table: page_row must be (N,)");
  auto pr = page_row.to(torch::kInt64).contiguous();
  const int64_t N = pr.size(0);
  const int64_t* p = pr.data_ptr<int64_t>();
  std::vector<int64_t> count(rows, 0);
  for (int64_t i = 0; i < N; ++i) {
    TORCH_CHECK(p[i] < rows, "owner_table: a page's row is past the rows");
    if (p[i] >= 0) count[p[i]]++;
  }
  int64_t W = 0;
  for (int64_t r = 0; r < rows; ++r) W = std::max(W, count[r]);
  auto table = torch::full({rows, 1, W}, -1, torch::kInt64);
  int64_t* t = table.data_ptr<int64_t>();
  std::vector<int64_t> fill(rows, 0);
  for (int64_t i = 0; i < N; ++i)
    if (p[i] >= 0) t[p[i] * W + fill[p[i]]++] = i;
  return table;
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_attention", &paged_attention, "fused gather-and-attend decode attention over pages");
  m.def("owner_table", &owner_table, "each row's pages in pool order");
  m.def("page_bounds", &page_bounds, "Quest's page bounds, the metadata read once");
}
