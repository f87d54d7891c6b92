// kiln::rope: rope over a layer's q and k heads in one pass, for the cpu target's CPU_ONEDNN graphs.
//
// Why a kernel: torch runs rope (compile/model.py apply_rope) as five ops (neg, cat, two muls, add), each a full
// pass over q and k with a new tensor allocated: measured 0.33 ms per layer on a 512-token packed prefill of
// SmolLM2 in bf16 (10 ms a call), against 0.10 ms here.
//
// The same numbers as those ops, bit for bit: x * cos and rotate_half(x) * sin are each rounded to the dtype, then
// their sum, as torch's separate ops round them; float32 is computed without fused multiply-adds for that reason.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "widen.h"

#include <cstdint>

// NOTE: no contraction of a * b + c into one fma: torch rounds each product first (see above).
#pragma GCC optimize("fp-contract=off")

namespace {

using kiln::widen;

inline float round_to(float x, c10::BFloat16*) { return kiln::round_bf16(x); }
inline float round_to(float x, float*) { return x; }

// out[t, n, :] = x * cos + rotate_half(x) * sin over heads n of token t; cos/sin [T, D] rows (one per token).
template <typename T>
void rope_rows(const T* x, int64_t xs0, int64_t xs1, const T* cos, int64_t cs0, const T* sin, int64_t ss0, T* out,
               int64_t tokens, int64_t heads, int64_t d) {
  const int64_t half = d / 2;
  at::parallel_for(0, tokens, kiln::row_grain(heads * d), [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const T* c = cos + t * cs0;
      const T* s = sin + t * ss0;
      for (int64_t n = 0; n < heads; ++n) {
        const T* xr = x + t * xs0 + n * xs1;
        T* o = out + (t * heads + n) * d;
#pragma omp simd
        for (int64_t i = 0; i < half; ++i) {  // rotate_half(x)[i] = -x[i + half]
          const float a = round_to(widen(xr[i]) * widen(c[i]), o);
          const float b = round_to(-widen(xr[i + half]) * widen(s[i]), o);
          kiln::narrow_store(o + i, a + b);  // the sum rounded to the dtype
        }
#pragma omp simd
        for (int64_t i = half; i < d; ++i) {  // rotate_half(x)[i] = x[i - half]
          const float a = round_to(widen(xr[i]) * widen(c[i]), o);
          const float b = round_to(widen(xr[i - half]) * widen(s[i]), o);
          kiln::narrow_store(o + i, a + b);  // the sum rounded to the dtype
        }
      }
    }
  });
}

at::Tensor rope(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin) {
  TORCH_CHECK(x.dim() == 3 && x.size(2) % 2 == 0, "kiln::rope: x must be [T, N, D] with D even");
  const int64_t T_ = x.size(0), N = x.size(1), D = x.size(2);
  TORCH_CHECK(cos.dim() == 3 && cos.size(0) == T_ && cos.size(1) == 1 && cos.size(2) == D && sin.sizes() == cos.sizes(),
              "kiln::rope: cos and sin must be [T, 1, D] of x's T and D (full rotary only)");
  for (const at::Tensor* t : {&x, &cos, &sin}) {
    TORCH_CHECK(t->scalar_type() == x.scalar_type(), "kiln::rope: x, cos and sin share one dtype");
    TORCH_CHECK(t->stride(-1) == 1, "kiln::rope: the last dim of every input must be dense");
    TORCH_CHECK(t->device().is_cpu(), "kiln::rope runs on the cpu");
  }
  at::Tensor out = at::empty({T_, N, D}, x.options());
  if (x.scalar_type() == at::kBFloat16) {
    using B = c10::BFloat16;
    rope_rows(x.data_ptr<B>(), x.stride(0), x.stride(1), cos.data_ptr<B>(), cos.stride(0), sin.data_ptr<B>(),
              sin.stride(0), out.data_ptr<B>(), T_, N, D);
  } else if (x.scalar_type() == at::kFloat) {
    rope_rows(x.data_ptr<float>(), x.stride(0), x.stride(1), cos.data_ptr<float>(), cos.stride(0),
              sin.data_ptr<float>(), sin.stride(0), out.data_ptr<float>(), T_, N, D);
  } else {
    TORCH_CHECK(false, "kiln::rope: bfloat16 or float32 only, got ", x.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kiln, m) { m.def("rope(Tensor x, Tensor cos, Tensor sin) -> Tensor"); }

TORCH_LIBRARY_IMPL(kiln, CPU, m) { m.impl("rope", &rope); }
