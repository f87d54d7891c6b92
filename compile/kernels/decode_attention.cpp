// kiln::decode_attention: one decode step's attention for the cpu target, read from the KV cache in place.
//
// Why a kernel: the op-by-op decode attention (compile/model.py appended_attention) copies every row's
// whole span bucket (torch.cat, and oneDNN's bmm wants dense batches anyway) and reads all of it, though a
// row's real context is usually about half its bucket. This kernel reads each row's cached positions only,
// straight from the strided cache view, and does the scores, softmax and weighted sum in float32 in one
// pass per (row, KV head): no copy, no mask tensor, no per-op dispatch.
//
// Math (the same as compile/model.py split_attention): for row b at position p (p tokens already cached)
// and query head group g of KV head h, the keys are the cached positions j < min(p, span) that the layer's
// window allows (j > p - window when window > 0), plus the row's own new key at p:
//   s_j = softcap(scale * q . k_j),   out = sum_j softmax(s)_j v_j   (softcap(x) = cap * tanh(x / cap); off at 0)
//
// Also here: kiln::packed_attention (a packed prefill: each token over its own prompt's tokens up to itself) and
// kiln::ragged_attention (a packed prefill whose segments may resume a prompt after the positions already in their
// cache slot: a prefix-cache hit's rest, or a later chunk of a long prompt).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "widen.h"

namespace {

using kiln::widen;
#if defined(__AVX512F__)
using kiln::load16;
#endif

// One row of D elements as float32 (bf16 widened by a shift; the loop vectorises).
template <typename T>
inline void load_row(const T* src, float* dst, int64_t d) {
  for (int64_t i = 0; i < d; ++i) dst[i] = widen(src[i]);
}

inline float dot(const float* a, const float* b, int64_t d) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < d; ++i) s += a[i] * b[i];
  return s;
}

// exp for x <= 0 (softmax after the max is taken out), vectorisable: 2^n * p(r) with x = n ln2 + r,
// |r| <= ln2 / 2, p the degree-6 Taylor polynomial (relative error below 2e-7 there).
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.f);  // exp(-87) ~ 1.6e-38: the smallest normal float
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = x - n * 0.693145751953125f - n * 1.428606765330187e-06f;
  float p = 1.f / 720;
  p = p * r + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

inline float score(float raw, float scale, float cap) {
  float s = raw * scale;
  return cap > 0.f ? cap * std::tanh(s / cap) : s;
}

// The largest of x[0..n-1], n >= 1. NOTE: std::max_element is a scalar chain of dependent maxes (4 cycles a
// key), which was 14% of this kernel's time on an AVX-512 host.
inline float max_of(const float* x, int64_t n) {
  int64_t j = 0;
  float m = x[0];
#if defined(__AVX512F__)
  if (n >= 16) {
    __m512 v = _mm512_loadu_ps(x);
    for (j = 16; j + 16 <= n; j += 16) v = _mm512_max_ps(v, _mm512_loadu_ps(x + j));
    m = _mm512_reduce_max_ps(v);
  }
#endif
  for (; j < n; ++j) m = std::max(m, x[j]);
  return m;
}

#if defined(__AVX512F__)
// Lane i of the result = the sum of v[i]'s 16 lanes: a tree of adds over 128-bit lanes (4 levels, 15 adds),
// then one permute that puts each sum at its vector's index.
inline __m512 sum16(const __m512* v) {
  __m512 t[8], u[4], w[2];
  for (int k = 0; k < 8; ++k)  // 128-bit lanes: [v_k 0+2, v_k 1+3, v_k+8 0+2, v_k+8 1+3]
    t[k] = _mm512_add_ps(_mm512_shuffle_f32x4(v[k], v[k + 8], 0x44), _mm512_shuffle_f32x4(v[k], v[k + 8], 0xEE));
  for (int k = 0; k < 4; ++k)  // 128-bit lanes: 4 partials each of v_k, v_k+8, v_k+4, v_k+12
    u[k] = _mm512_add_ps(_mm512_shuffle_f32x4(t[k], t[k + 4], 0x88), _mm512_shuffle_f32x4(t[k], t[k + 4], 0xDD));
  for (int k = 0; k < 2; ++k)  // in each 128-bit lane: 2 partials of u_k's vector there, 2 of u_k+2's
    w[k] = _mm512_add_ps(_mm512_shuffle_ps(u[k], u[k + 2], 0x44), _mm512_shuffle_ps(u[k], u[k + 2], 0xEE));
  // in each 128-bit lane L: the sums of the vectors u_0, u_2, u_1, u_3 hold there
  const __m512 x = _mm512_add_ps(_mm512_shuffle_ps(w[0], w[1], 0x88), _mm512_shuffle_ps(w[0], w[1], 0xDD));
  // lane 4L + p holds the sum of v[base[L] + order[p]]; gather each index's lane
  static const __m512i where = [] {
    const int base[4] = {0, 8, 4, 12}, order[4] = {0, 2, 1, 3};
    alignas(64) int32_t lanes[16];
    for (int L = 0; L < 4; ++L)
      for (int p = 0; p < 4; ++p) lanes[base[L] + order[p]] = 4 * L + p;
    return _mm512_load_si512(lanes);
  }();
  return _mm512_permutexvar_ps(where, x);
}

#endif

// Scores and weighted sums over a row's keys lo..hi-1 of a span, then its own new key (n = hi - lo + 1 in all).
// The vector paths take NG queries of a group per pass over the rows (AVX-512, head dims that are a multiple
// of 16): each K or V row is widened once for all NG, and q and the accumulators stay in registers.
// NOTE: one query per pass widened every row G times and cost 1.6x more at G = 3 (SmolLM2) on the dev machine.

#if defined(__AVX512F__)
// s[g * n + j] = score of query g (float32 [NG, D] at q) against key j.
template <typename T, int DIM, int NG>
void group_scores(const float* q, const T* keys, int64_t stride, int64_t lo, int64_t hi, const T* own, float scale,
                  float cap, float* s) {
  const int64_t n = hi - lo + 1;
  constexpr int C = DIM / 16;
  __m512 qv[NG][C];
#pragma GCC unroll 16
  for (int g = 0; g < NG; ++g)
#pragma GCC unroll 16
    for (int c = 0; c < C; ++c) qv[g][c] = _mm512_loadu_ps(q + g * DIM + 16 * c);
  // NOTE: 16 keys' partial dot products are summed together (sum16), not one horizontal sum per key: that
  // sum's latency, not memory, bounded this loop.
  alignas(64) float sums[16];
  __m512 part[NG][16];
  for (int64_t j0 = 0; j0 < n; j0 += 16) {
    const int64_t nb = std::min<int64_t>(16, n - j0);
    for (int64_t jj = 0; jj < 16; ++jj) {
      if (jj >= nb) {
#pragma GCC unroll 16
        for (int g = 0; g < NG; ++g) part[g][jj] = _mm512_setzero_ps();
        continue;
      }
      const int64_t j = j0 + jj;
      const T* key = j < n - 1 ? keys + (lo + j) * stride : own;
      __m512 kv[C];
#pragma GCC unroll 16
      for (int c = 0; c < C; ++c) kv[c] = load16(key + 16 * c);
#pragma GCC unroll 16
      for (int g = 0; g < NG; ++g) {
        __m512 acc = _mm512_mul_ps(qv[g][0], kv[0]);
#pragma GCC unroll 16
        for (int c = 1; c < C; ++c) acc = _mm512_fmadd_ps(qv[g][c], kv[c], acc);
        part[g][jj] = acc;
      }
    }
    const __mmask16 valid = static_cast<__mmask16>((1u << nb) - 1);
    for (int g = 0; g < NG; ++g) {
      const __m512 scaled = _mm512_mul_ps(sum16(part[g]), _mm512_set1_ps(scale));
      float* out = s + g * n + j0;
      if (cap <= 0.f) {  // NOTE: a masked store; a 16-float copy loop compiled to `rep movsq`, 7% of the kernel
        _mm512_mask_storeu_ps(out, valid, scaled);
        continue;
      }
      _mm512_store_ps(sums, scaled);
      for (int64_t jj = 0; jj < nb; ++jj) out[jj] = cap * std::tanh(sums[jj] / cap);
    }
  }
}

// out[g * D + i] = sum_j w[g * n + j] * value_j[i].
template <typename T, int DIM, int NG>
void group_values(const float* w, const T* values, int64_t stride, int64_t lo, int64_t n, const T* own, float* out) {
  constexpr int C = DIM / 16;
  __m512 acc[NG][C];
#pragma GCC unroll 16
  for (int g = 0; g < NG; ++g)
#pragma GCC unroll 16
    for (int c = 0; c < C; ++c) acc[g][c] = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; ++j) {
    const T* value = j < n - 1 ? values + (lo + j) * stride : own;
    __m512 vv[C];
#pragma GCC unroll 16
    for (int c = 0; c < C; ++c) vv[c] = load16(value + 16 * c);
#pragma GCC unroll 16
    for (int g = 0; g < NG; ++g) {
      const __m512 wj = _mm512_set1_ps(w[g * n + j]);
#pragma GCC unroll 16
      for (int c = 0; c < C; ++c) acc[g][c] = _mm512_fmadd_ps(wj, vv[c], acc[g][c]);
    }
  }
#pragma GCC unroll 16
  for (int g = 0; g < NG; ++g)
#pragma GCC unroll 16
    for (int c = 0; c < C; ++c) _mm512_storeu_ps(out + g * DIM + 16 * c, acc[g][c]);
}
#endif

// The largest group per pass (at most 4, what with_vector_group dispatches) that keeps q (or the accumulators)
// within 16 of the 32 vector registers: 16 x 16 floats. NOTE: this read 64 / DIM before, one query per pass at
// head dim 64; three per pass made SmolLM2's decode attention about 1.1x faster.
template <int DIM>
constexpr int group_size() { return DIM > 0 && DIM % 16 == 0 ? std::min(4, std::max(1, 256 / DIM)) : 1; }

// Calls f(std::integral_constant<int, ng>{}) when the AVX-512 path takes ng queries per pass at this head dim
// (DIM a multiple of 16, ng <= group_size<DIM>()), and says whether it did (callers build it only with AVX-512).
template <int DIM, typename F>
bool with_vector_group(int64_t ng, F&& f) {
  if constexpr (DIM > 0 && DIM % 16 == 0) {
    switch (ng) {
      case 1: f(std::integral_constant<int, 1>{}); return true;
      case 2: if constexpr (group_size<DIM>() >= 2) { f(std::integral_constant<int, 2>{}); return true; } break;
      case 3: if constexpr (group_size<DIM>() >= 3) { f(std::integral_constant<int, 3>{}); return true; } break;
      case 4: if constexpr (group_size<DIM>() >= 4) { f(std::integral_constant<int, 4>{}); return true; } break;
    }
  }
  return false;
}

// Scores of queries g0..g0+ng-1 (ng <= group_size<DIM>()): the vector path, else a scalar one for any D.
template <typename T, int DIM>
void scores_of(int64_t ng, const float* q, const T* keys, int64_t stride, int64_t lo, int64_t hi, const T* own,
               int64_t D, float scale, float cap, float* s) {
#if defined(__AVX512F__)
  if (with_vector_group<DIM>(ng, [&](auto NG) {
        group_scores<T, DIM, decltype(NG)::value>(q, keys, stride, lo, hi, own, scale, cap, s);
      }))
    return;
#endif
  const int64_t n = hi - lo + 1;
  std::vector<float> row(D);
  for (int64_t j = 0; j < n; ++j) {
    load_row(j < n - 1 ? keys + (lo + j) * stride : own, row.data(), D);
    for (int64_t g = 0; g < ng; ++g) s[g * n + j] = score(dot(q + g * D, row.data(), D), scale, cap);
  }
}

template <typename T, int DIM>
void values_of(int64_t ng, const float* w, const T* values, int64_t stride, int64_t lo, int64_t n, const T* own,
               int64_t D, float* out) {
#if defined(__AVX512F__)
  if (with_vector_group<DIM>(ng, [&](auto NG) {
        group_values<T, DIM, decltype(NG)::value>(w, values, stride, lo, n, own, out);
      }))
    return;
#endif
  std::vector<float> row(D);
  std::fill(out, out + ng * D, 0.f);
  for (int64_t j = 0; j < n; ++j) {
    load_row(j < n - 1 ? values + (lo + j) * stride : own, row.data(), D);
    for (int64_t g = 0; g < ng; ++g) {
      const float wj = w[g * n + j];
      float* o = out + g * D;
#pragma omp simd
      for (int64_t i = 0; i < D; ++i) o[i] += wj * row[i];
    }
  }
}

struct RowBuffers {
  std::vector<float> q, acc, scores;
};

// One (row, KV head): its G queries (q, g-th at q + g * q_stride) against keys lo..hi-1 (row stride kstride /
// vstride), then the row's own key and value; writes the G x D result at dst.
// DIM > 0: the head dim fixed at compile time, so the per-row loops unroll (3x faster at D = 64 than
// runtime-length loops, measured); DIM = 0: any head dim.
template <typename T, int DIM>
void attend_row(const T* q, int64_t q_stride, int64_t G, const T* keys, int64_t kstride, const T* values,
                int64_t vstride, int64_t lo, int64_t hi, const T* own_k, const T* own_v, int64_t D, float scale,
                float cap, T* dst, RowBuffers& buf) {
  const int64_t n = hi - lo + 1;  // keys in range, then the row's own key last
  buf.q.resize(G * D);
  buf.acc.resize(G * D);
  buf.scores.resize(G * n);
  for (int64_t g = 0; g < G; ++g) load_row(q + g * q_stride, buf.q.data() + g * D, D);
  constexpr int64_t GB = group_size<DIM>();
  for (int64_t g = 0; g < G; g += GB)
    scores_of<T, DIM>(std::min(GB, G - g), buf.q.data() + g * D, keys, kstride, lo, hi, own_k, D, scale, cap,
                      buf.scores.data() + g * n);
  for (int64_t g = 0; g < G; ++g) {  // softmax in place, normalised at the end
    float* s = buf.scores.data() + g * n;
    const float m = max_of(s, n);
    float total = 0.f;
#pragma omp simd reduction(+ : total)
    for (int64_t j = 0; j < n; ++j) total += (s[j] = exp_nonpositive(s[j] - m));
    const float inv = 1.f / total;
    for (int64_t j = 0; j < n; ++j) s[j] *= inv;
  }
  for (int64_t g = 0; g < G; g += GB)
    values_of<T, DIM>(std::min(GB, G - g), buf.scores.data() + g * n, values, vstride, lo, n, own_v, D,
                      buf.acc.data() + g * D);
  for (int64_t i = 0; i < G * D; ++i) kiln::narrow_store(dst + i, buf.acc[i]);
}

template <typename T, int DIM>
void attend(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_span,
            const at::Tensor& v_span, const at::Tensor& positions, double scale_d, int64_t window,
            double cap_d, at::Tensor& out) {
  const int64_t B = q.size(0), KV = q.size(1), G = q.size(2), span = k_span.size(2);
  const int64_t D = DIM > 0 ? DIM : q.size(3);
  const float scale = static_cast<float>(scale_d), cap = static_cast<float>(cap_d);
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const T* ksp = k_span.data_ptr<T>();
  const T* vsp = v_span.data_ptr<T>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  // strides in elements; the innermost dim of every tensor is dense (checked by the caller)
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), qs2 = q.stride(2);
  const int64_t ks0 = k.stride(0), ks1 = k.stride(1), vs0 = v.stride(0), vs1 = v.stride(1);
  const int64_t kss0 = k_span.stride(0), kss1 = k_span.stride(1), kss2 = k_span.stride(2);
  const int64_t vss0 = v_span.stride(0), vss1 = v_span.stride(1), vss2 = v_span.stride(2);

  at::parallel_for(0, B * KV, 1, [&](int64_t begin, int64_t end) {
    RowBuffers buf;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t b = item / KV, h = item % KV;
      const int64_t p = std::max<int64_t>(pos[b], 0);
      const int64_t hi = std::min(p, span);
      const int64_t lo = window > 0 ? std::min(hi, std::max<int64_t>(p - window + 1, 0)) : 0;
      attend_row<T, DIM>(qp + b * qs0 + h * qs1, qs2, G, ksp + b * kss0 + h * kss1, kss2, vsp + b * vss0 + h * vss1,
                         vss2, lo, hi, kp + b * ks0 + h * ks1, vp + b * vs0 + h * vs1, D, scale, cap,
                         op + (b * KV + h) * G * D, buf);
    }
  });
}

// A ragged prefill's cache (kiln::ragged_attention): each token's segment start and slot, and which tokens are
// one-token segments that resume (a decode row: its slot's cached positions, then itself).
struct RaggedRows {
  const int64_t* starts;
  const int64_t* slots;
  const uint8_t* single;
  const at::Tensor* k_cache;  // [rows, KV, positions, D]
  const at::Tensor* v_cache;
};

// Packed prefill: token t (at positions[t] of its prompt; a prompt's tokens sit together, positions 0, 1, ...)
// attends to its own prompt's tokens up to itself: rows t - positions[t] .. t of k and v.
// ragged (kiln::ragged_attention, else null): tokens of whole prompts (start 0) as above; a one-token segment that
// resumes attends to its slot's cached positions < start, then itself, as a decode row does (attend); tokens of
// longer resumed segments are left to attend_resumed.
template <typename T, int DIM>
void attend_packed(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& positions,
                   double scale_d, int64_t window, double cap_d, at::Tensor& out, const RaggedRows* ragged = nullptr) {
  const int64_t T_ = q.size(0), H = q.size(1), KV = k.size(1), G = H / KV;
  const int64_t D = DIM > 0 ? DIM : q.size(2);
  const float scale = static_cast<float>(scale_d), cap = static_cast<float>(cap_d);
  const T* qp = q.data_ptr<T>();
  const T* kp = k.data_ptr<T>();
  const T* vp = v.data_ptr<T>();
  const int64_t* pos = positions.data_ptr<int64_t>();
  T* op = out.data_ptr<T>();
  const int64_t qs0 = q.stride(0), qs1 = q.stride(1), ks0 = k.stride(0), ks1 = k.stride(1);
  const int64_t vs0 = v.stride(0), vs1 = v.stride(1);
  const T* kc = ragged ? ragged->k_cache->template data_ptr<T>() : nullptr;
  const T* vc = ragged ? ragged->v_cache->template data_ptr<T>() : nullptr;
  const int64_t kcs0 = ragged ? ragged->k_cache->stride(0) : 0, kcs1 = ragged ? ragged->k_cache->stride(1) : 0;
  const int64_t kcs2 = ragged ? ragged->k_cache->stride(2) : 0, vcs0 = ragged ? ragged->v_cache->stride(0) : 0;
  const int64_t vcs1 = ragged ? ragged->v_cache->stride(1) : 0, vcs2 = ragged ? ragged->v_cache->stride(2) : 0;
  at::parallel_for(0, T_ * KV, 1, [&](int64_t begin, int64_t end) {
    RowBuffers buf;
    for (int64_t item = begin; item < end; ++item) {
      const int64_t t = item / KV, h = item % KV;
      const T* q_row = qp + t * qs0 + h * G * qs1;
      const T* own_k = kp + t * ks0 + h * ks1;
      const T* own_v = vp + t * vs0 + h * vs1;
      T* dst = op + (t * H + h * G) * D;
      if (ragged != nullptr && ragged->starts[t] > 0) {
        if (!ragged->single[t]) continue;
        const int64_t p = pos[t], slot = ragged->slots[t];
        const int64_t lo = window > 0 ? std::max<int64_t>(p - window + 1, 0) : 0;
        attend_row<T, DIM>(q_row, qs1, G, kc + slot * kcs0 + h * kcs1, kcs2, vc + slot * vcs0 + h * vcs1, vcs2,
                           std::min(lo, p), p, own_k, own_v, D, scale, cap, dst, buf);
        continue;
      }
      const int64_t lo = window > 0 ? std::max(t - pos[t], t - window + 1) : t - pos[t];
      attend_row<T, DIM>(q_row, qs1, G, kp + h * ks1, ks0, vp + h * vs1, vs0, lo, t, own_k, own_v, D, scale, cap,
                         dst, buf);
    }
  });
}

template <typename T>
void dispatch_dim(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_span,
                  const at::Tensor& v_span, const at::Tensor& positions, double scale, int64_t window, double cap,
                  at::Tensor& out) {
  switch (q.size(3)) {
    case 64: return attend<T, 64>(q, k, v, k_span, v_span, positions, scale, window, cap, out);
    case 128: return attend<T, 128>(q, k, v, k_span, v_span, positions, scale, window, cap, out);
    case 256: return attend<T, 256>(q, k, v, k_span, v_span, positions, scale, window, cap, out);
    default: return attend<T, 0>(q, k, v, k_span, v_span, positions, scale, window, cap, out);
  }
}

template <typename T>
void dispatch_packed(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& positions,
                     double scale, int64_t window, double cap, at::Tensor& out, const RaggedRows* ragged = nullptr) {
  switch (q.size(2)) {
    case 64: return attend_packed<T, 64>(q, k, v, positions, scale, window, cap, out, ragged);
    case 128: return attend_packed<T, 128>(q, k, v, positions, scale, window, cap, out, ragged);
    case 256: return attend_packed<T, 256>(q, k, v, positions, scale, window, cap, out, ragged);
    default: return attend_packed<T, 0>(q, k, v, positions, scale, window, cap, out, ragged);
  }
}

// A ragged prefill's segment that resumes a prompt: its n tokens (rows t0.. of q, k, v, at positions start..)
// attend to the first `start` positions of their slot's cache rows, then to their own tokens up to themselves.
// The G queries of a KV head become G * n rows of one SDPA head, so the keys are never repeated per query head.
// NOTE: SDPA, not attend_row: its bf16 dot products run on the matrix units (oneDNN), about 400 GFLOP/s for 8
// rests of 56 tokens over a 1,000-token past on SmolLM2, where attend_row's float32 FMAs ran packed prefills at
// about 70 (so, estimated, 6x longer; docs/benchmarks.md).
void attend_resumed(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_rows,
                    const at::Tensor& v_rows, int64_t t0, int64_t n, int64_t start, double scale, int64_t window,
                    double cap, at::Tensor& out) {
  const int64_t H = q.size(1), KV = k.size(1), G = H / KV, D = q.size(2);
  const at::Tensor queries = q.narrow(0, t0, n).reshape({n, KV, G, D}).permute({1, 2, 0, 3}).reshape({1, KV, G * n, D});
  const at::Tensor keys = at::cat({k_rows.narrow(1, 0, start), k.narrow(0, t0, n).transpose(0, 1)}, 1).unsqueeze(0);
  const at::Tensor values = at::cat({v_rows.narrow(1, 0, start), v.narrow(0, t0, n).transpose(0, 1)}, 1).unsqueeze(0);
  const at::Tensor key_pos = at::arange(start + n, q.options().dtype(at::kLong)).unsqueeze(0);
  const at::Tensor query_pos = at::arange(start, start + n, q.options().dtype(at::kLong)).unsqueeze(1);
  at::Tensor allowed = key_pos <= query_pos;                         // [n, start + n]
  if (window > 0) allowed = allowed.logical_and(key_pos > query_pos - window);
  allowed = allowed.repeat({G, 1});                                 // row g * n + i: query head g, token i
  at::Tensor result;
  if (cap > 0) {  // attention soft-capping (Gemma 2): SDPA has none, so spelled out in float32
    at::Tensor scores = at::matmul(queries.to(at::kFloat), keys.to(at::kFloat).transpose(-1, -2)) * scale;
    scores = (scores / cap).tanh() * cap;
    scores = scores.masked_fill(allowed.logical_not(), -std::numeric_limits<float>::infinity());
    result = at::matmul(scores.softmax(-1), values.to(at::kFloat)).to(q.scalar_type());
  } else {
    result = at::scaled_dot_product_attention(queries, keys, values, allowed, 0.0, false, scale);
  }
  out.narrow(0, t0, n).view({n, KV, G, D}).permute({1, 2, 0, 3}).copy_(result.view({KV, G, n, D}));
}

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_span,
                            const at::Tensor& v_span, const at::Tensor& positions, double scale, int64_t window,
                            double softcap) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 3 && v.dim() == 3 && k_span.dim() == 4 && v_span.dim() == 4,
              "kiln::decode_attention: q [B, KV, G, D], k/v [B, KV, D], spans [B, KV, K, D]");
  const int64_t B = q.size(0), KV = q.size(1), D = q.size(3);
  TORCH_CHECK(k.size(0) == B && k.size(1) == KV && k.size(2) == D && v.sizes() == k.sizes(),
              "kiln::decode_attention: k/v must be [B, KV, D] of q's B, KV and D");
  TORCH_CHECK(k_span.size(0) == B && k_span.size(1) == KV && k_span.size(3) == D && v_span.sizes() == k_span.sizes(),
              "kiln::decode_attention: spans must be [B, KV, K, D] of q's B, KV and D");
  TORCH_CHECK(positions.dim() == 1 && positions.size(0) == B && positions.scalar_type() == at::kLong,
              "kiln::decode_attention: positions must be int64 [B]");
  for (const at::Tensor* t : {&q, &k, &v, &k_span, &v_span}) {
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "kiln::decode_attention: q, k, v and spans share one dtype");
    TORCH_CHECK(t->stride(-1) == 1, "kiln::decode_attention: the last dim of every input must be dense");
    TORCH_CHECK(t->device().is_cpu(), "kiln::decode_attention runs on the cpu");
  }
  const at::Tensor pos = positions.contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options());
  if (q.scalar_type() == at::kBFloat16) {
    dispatch_dim<c10::BFloat16>(q, k, v, k_span, v_span, pos, scale, window, softcap, out);
  } else if (q.scalar_type() == at::kFloat) {
    dispatch_dim<float>(q, k, v, k_span, v_span, pos, scale, window, softcap, out);
  } else {
    TORCH_CHECK(false, "kiln::decode_attention: bfloat16 or float32 only, got ", q.scalar_type());
  }
  return out;
}

at::Tensor packed_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& positions,
                            const at::Tensor& segments, double scale, int64_t window, double softcap) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.sizes() == k.sizes() && q.size(0) == k.size(0) &&
                  q.size(2) == k.size(2) && k.size(1) > 0 && q.size(1) % k.size(1) == 0,
              "kiln::packed_attention: q [T, H, D], k/v [T, KV, D] with H a multiple of KV");
  const int64_t T_ = q.size(0);
  TORCH_CHECK(positions.dim() == 1 && positions.size(0) == T_ && positions.scalar_type() == at::kLong &&
                  segments.sizes() == positions.sizes() && segments.scalar_type() == at::kLong,
              "kiln::packed_attention: positions and segments must be int64 [T]");
  for (const at::Tensor* t : {&q, &k, &v}) {
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "kiln::packed_attention: q, k and v share one dtype");
    TORCH_CHECK(t->stride(-1) == 1, "kiln::packed_attention: the last dim of every input must be dense");
    TORCH_CHECK(t->device().is_cpu(), "kiln::packed_attention runs on the cpu");
  }
  // The packing this kernel reads: a token at position p > 0 follows the token at p - 1 of its own segment, so
  // rows t - p .. t are its prompt's tokens up to itself, the keys the packed mask allows (compile/model.py
  // packed_prefill). Padding rows (position 0, a segment of their own) attend to themselves only, where the
  // mask lets them see each other: their outputs are never read.
  const at::Tensor pos = positions.contiguous(), seg = segments.contiguous();
  const int64_t* p = pos.data_ptr<int64_t>();
  const int64_t* sg = seg.data_ptr<int64_t>();
  for (int64_t t = 0; t < T_; ++t)
    TORCH_CHECK(p[t] >= 0 && (p[t] == 0 || (t > 0 && sg[t - 1] == sg[t] && p[t - 1] == p[t] - 1)),
                "kiln::packed_attention: token ", t, " is not packed (a prompt's tokens sit together at positions 0, 1, ...)");
  at::Tensor out = at::empty(q.sizes(), q.options());
  if (q.scalar_type() == at::kBFloat16) {
    dispatch_packed<c10::BFloat16>(q, k, v, pos, scale, window, softcap, out);
  } else if (q.scalar_type() == at::kFloat) {
    dispatch_packed<float>(q, k, v, pos, scale, window, softcap, out);
  } else {
    TORCH_CHECK(false, "kiln::packed_attention: bfloat16 or float32 only, got ", q.scalar_type());
  }
  return out.view({T_, q.size(1) * q.size(2)});
}

at::Tensor ragged_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& positions,
                            const at::Tensor& starts, const at::Tensor& slots, const at::Tensor& k_cache,
                            const at::Tensor& v_cache, double scale, int64_t window, double softcap) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.sizes() == k.sizes() && q.size(0) == k.size(0) &&
                  q.size(2) == k.size(2) && k.size(1) > 0 && q.size(1) % k.size(1) == 0,
              "kiln::ragged_attention: q [T, H, D], k/v [T, KV, D] with H a multiple of KV");
  const int64_t T_ = q.size(0);
  for (const at::Tensor* t : {&positions, &starts, &slots})
    TORCH_CHECK(t->dim() == 1 && t->size(0) == T_ && t->scalar_type() == at::kLong,
                "kiln::ragged_attention: positions, starts and slots must be int64 [T]");
  TORCH_CHECK(k_cache.dim() == 4 && v_cache.sizes() == k_cache.sizes() && k_cache.size(1) == k.size(1) &&
                  k_cache.size(3) == k.size(2),
              "kiln::ragged_attention: the cache must be [rows, KV, positions, D] of k's KV and D");
  for (const at::Tensor* t : {&q, &k, &v, &k_cache, &v_cache}) {
    TORCH_CHECK(t->scalar_type() == q.scalar_type(), "kiln::ragged_attention: q, k, v and the cache share one dtype");
    TORCH_CHECK(t->stride(-1) == 1, "kiln::ragged_attention: the last dim of every input must be dense");
    TORCH_CHECK(t->device().is_cpu(), "kiln::ragged_attention runs on the cpu");
  }
  TORCH_CHECK(q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kFloat,
              "kiln::ragged_attention: bfloat16 or float32 only, got ", q.scalar_type());
  // The packing (compile/model.py ragged_prefill): a segment's first token sits at its start (0 for a whole prompt,
  // else the cached positions of its slot it resumes after); every later token follows the one before it at the
  // next position, with the same start and slot. Padding tokens are segments of one token at position 0.
  const at::Tensor pos = positions.contiguous(), first = starts.contiguous(), slot = slots.contiguous();
  const int64_t* p = pos.data_ptr<int64_t>();
  const int64_t* st = first.data_ptr<int64_t>();
  const int64_t* sl = slot.data_ptr<int64_t>();
  for (int64_t t = 0; t < T_; ++t) {
    TORCH_CHECK(st[t] >= 0 && p[t] >= st[t] && p[t] < k_cache.size(2) && sl[t] >= 0 && sl[t] < k_cache.size(0),
                "kiln::ragged_attention: token ", t, " at position ", p[t], " (start ", st[t], ", slot ", sl[t],
                ") is outside the cache [", k_cache.size(0), " rows, ", k_cache.size(2), " positions]");
    TORCH_CHECK(p[t] == st[t] || (t > 0 && p[t - 1] == p[t] - 1 && st[t - 1] == st[t] && sl[t - 1] == sl[t]),
                "kiln::ragged_attention: token ", t, " is not packed (a segment's tokens sit together at positions "
                "start, start + 1, ...)");
  }
  at::Tensor out = at::empty(q.sizes(), q.options());
  std::vector<uint8_t> single(T_, 0);
  for (int64_t t0 = 0; t0 < T_;) {  // segments that resume after a cached past, longer than one token
    int64_t t1 = t0 + 1;
    while (t1 < T_ && p[t1] != st[t1]) ++t1;
    if (st[t0] > 0 && t1 - t0 > 1)
      attend_resumed(q, k, v, k_cache.select(0, sl[t0]), v_cache.select(0, sl[t0]), t0, t1 - t0, st[t0], scale,
                     window, softcap, out);
    single[t0] = t1 - t0 == 1;
    t0 = t1;
  }
  // whole prompts (each token over its own prompt only) and one-token resumed segments (decode rows)
  const RaggedRows ragged{st, sl, single.data(), &k_cache, &v_cache};
  if (q.scalar_type() == at::kBFloat16) {
    dispatch_packed<c10::BFloat16>(q, k, v, pos, scale, window, softcap, out, &ragged);
  } else {
    dispatch_packed<float>(q, k, v, pos, scale, window, softcap, out, &ragged);
  }
  return out.view({T_, q.size(1) * q.size(2)});
}

}  // namespace

TORCH_LIBRARY(kiln, m) {
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, Tensor k_span, Tensor v_span, Tensor positions, "
        "float scale, int window, float softcap) -> Tensor");
  m.def("packed_attention(Tensor q, Tensor k, Tensor v, Tensor positions, Tensor segments, float scale, int window, "
        "float softcap) -> Tensor");
  m.def("ragged_attention(Tensor q, Tensor k, Tensor v, Tensor positions, Tensor starts, Tensor slots, "
        "Tensor k_cache, Tensor v_cache, float scale, int window, float softcap) -> Tensor");
}

TORCH_LIBRARY_IMPL(kiln, CPU, m) {
  m.impl("decode_attention", &decode_attention);
  m.impl("packed_attention", &packed_attention);
  m.impl("ragged_attention", &ragged_attention);
}
