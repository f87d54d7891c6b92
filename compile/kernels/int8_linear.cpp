// kiln::int8_linear: y = (x @ w^T) * scale for int8 weights [N, K] with one scale per output channel, for
// the few rows of a decode step on the cpu target (CPU_ONEDNN graphs, compile/model.py OneDNNWeights.linear).
//
// Why a kernel: a decode step at small batch streams the weights once and does little else, so int8 should
// cost about half of bf16. torch's _weight_int8pack_mm read SmolLM2's int8 projections at about 9 GB/s on
// the dev machine (12.1 ms against 19.2 ms for the bf16 ones): it is bound by its own arithmetic. This one
// widens 16 weights per instruction pair and does the rows' dot products in float32 with FMAs, so it runs
// at about the speed memory delivers the int8 bytes.
//   y[m, n] = scale[n] * sum_k x[m, k] * w[n, k]     (float32 sums, one rounding to x's dtype)
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "widen.h"

#include <cstdint>
#include <vector>

namespace {

using kiln::widen;

// Columns [n_begin, n_end) of y for M rows of x (already float32, [M, K] dense), NB weight rows at a time
// (each x chunk loaded once for NB rows). sums: [M, n_end - n_begin].
// NOTE: NB = 1 is what runs: NB = 4 was 1.3-1.6x slower at M = 1 on the dev machine (SmolLM2's projections).
template <int M, int NB>
void rows_out(const float* xf, const int8_t* w, int64_t k, int64_t n_begin, int64_t n_end, float* sums) {
  const int64_t width = n_end - n_begin;
  int64_t n = n_begin;
#if defined(__AVX512F__)
  for (; n + NB <= n_end && k % 16 == 0; n += NB) {
    __m512 acc[NB][M];
    for (int b = 0; b < NB; ++b)
      for (int m = 0; m < M; ++m) acc[b][m] = _mm512_setzero_ps();
    for (int64_t i = 0; i < k; i += 16) {
      __m512 wf[NB];
      for (int b = 0; b < NB; ++b)
        wf[b] = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w + (n + b) * k + i))));
      for (int m = 0; m < M; ++m) {
        const __m512 xv = _mm512_loadu_ps(xf + m * k + i);
        for (int b = 0; b < NB; ++b) acc[b][m] = _mm512_fmadd_ps(xv, wf[b], acc[b][m]);
      }
    }
    for (int b = 0; b < NB; ++b)
      for (int m = 0; m < M; ++m) sums[m * width + (n + b - n_begin)] = _mm512_reduce_add_ps(acc[b][m]);
  }
#endif
  for (; n < n_end; ++n) {  // the rest (and hosts without AVX-512)
    const int8_t* wr = w + n * k;
    for (int m = 0; m < M; ++m) {
      float s = 0.f;
      const float* xr = xf + m * k;
#pragma omp simd reduction(+ : s)
      for (int64_t i = 0; i < k; ++i) s += xr[i] * static_cast<float>(wr[i]);
      sums[m * width + (n - n_begin)] = s;
    }
  }
}

template <int M>
void run_rows(const float* xf, const int8_t* w, int64_t k, int64_t n_begin, int64_t n_end, float* sums) {
  rows_out<M, 1>(xf, w, k, n_begin, n_end, sums);
}

void dispatch_rows(int64_t rows, const float* xf, const int8_t* w, int64_t k, int64_t n0, int64_t n1, float* sums) {
  switch (rows) {
    case 1: return run_rows<1>(xf, w, k, n0, n1, sums);
    case 2: return run_rows<2>(xf, w, k, n0, n1, sums);
    case 3: return run_rows<3>(xf, w, k, n0, n1, sums);
    case 4: return run_rows<4>(xf, w, k, n0, n1, sums);
    case 5: return run_rows<5>(xf, w, k, n0, n1, sums);
    case 6: return run_rows<6>(xf, w, k, n0, n1, sums);
    case 7: return run_rows<7>(xf, w, k, n0, n1, sums);
    default: return run_rows<8>(xf, w, k, n0, n1, sums);
  }
}

template <typename T, typename S>
void int8_linear_impl(const at::Tensor& x, const at::Tensor& w, const at::Tensor& scale, at::Tensor& y) {
  const int64_t rows = x.size(0), k = x.size(1), n = w.size(0);
  const T* xp = x.data_ptr<T>();
  const int8_t* wp = w.data_ptr<int8_t>();
  const S* sp = scale.data_ptr<S>();
  T* yp = y.data_ptr<T>();
  std::vector<float> xf(rows * k);
  for (int64_t i = 0; i < rows * k; ++i) xf[i] = widen(xp[i]);
  // NOTE: split over output channels (each thread streams its own weight rows); 8 rows of x at a time
  // keep the accumulators in registers.
  at::parallel_for(0, n, 64, [&](int64_t n0, int64_t n1) {
    std::vector<float> sums(8 * (n1 - n0));
    for (int64_t r0 = 0; r0 < rows; r0 += 8) {
      const int64_t mr = std::min<int64_t>(8, rows - r0);
      dispatch_rows(mr, xf.data() + r0 * k, wp, k, n0, n1, sums.data());
      for (int64_t m = 0; m < mr; ++m)
        for (int64_t j = n0; j < n1; ++j)
          yp[(r0 + m) * n + j] = static_cast<T>(sums[m * (n1 - n0) + (j - n0)] * widen(sp[j]));
    }
  });
}

at::Tensor int8_linear(const at::Tensor& x_in, const at::Tensor& w_in, const at::Tensor& scale_in) {
  TORCH_CHECK(x_in.dim() == 2 && w_in.dim() == 2 && x_in.size(1) == w_in.size(1),
              "kiln::int8_linear: x [M, K] and weight [N, K]");
  TORCH_CHECK(w_in.scalar_type() == at::kChar, "kiln::int8_linear: the weight must be int8");
  TORCH_CHECK(scale_in.numel() == w_in.size(0), "kiln::int8_linear: one scale per output channel");
  TORCH_CHECK(x_in.device().is_cpu() && w_in.device().is_cpu() && scale_in.device().is_cpu(),
              "kiln::int8_linear runs on the cpu");
  const at::Tensor x = x_in.contiguous(), w = w_in.contiguous(), scale = scale_in.reshape(-1).contiguous();
  at::Tensor y = at::empty({x.size(0), w.size(0)}, x.options());
  const auto xt = x.scalar_type(), st = scale.scalar_type();
  if (xt == at::kBFloat16 && st == at::kBFloat16) {
    int8_linear_impl<c10::BFloat16, c10::BFloat16>(x, w, scale, y);
  } else if (xt == at::kBFloat16 && st == at::kFloat) {
    int8_linear_impl<c10::BFloat16, float>(x, w, scale, y);
  } else if (xt == at::kFloat && st == at::kFloat) {
    int8_linear_impl<float, float>(x, w, scale, y);
  } else {
    TORCH_CHECK(false, "kiln::int8_linear: x bfloat16 or float32, scales of x's dtype or float32; got ", xt,
                " and ", st);
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kiln, m) { m.def("int8_linear(Tensor x, Tensor weight, Tensor scale) -> Tensor"); }

TORCH_LIBRARY_IMPL(kiln, CPU, m) { m.impl("int8_linear", &int8_linear); }
