// kiln::rms_norm: RMSNorm of each row in one pass, for the cpu target's CPU_ONEDNN graphs.
//
// Why a kernel: torch's CPU rms_norm for bf16 is a composite of eight ops (upcast, pow, mean, add, rsqrt,
// two muls, downcast): about 40 us per call at one row on the dev machine, 2.5 ms of a 20 ms SmolLM2 decode
// step (61 norms). Here one call reads the row, sums its squares in float32 and writes
//   y = x * rsqrt(mean(x^2) + eps) * (weight + add_one)      (add_one: Gemma's (1 + weight) norms)
// rounded to the dtype once, as compile/model.py OneDNNWeights.norm did with torch ops.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "widen.h"

#include <cmath>
#include <cstdint>

namespace {

using kiln::widen;

template <typename T, typename W>
void norm_rows(const T* x, const W* w, T* y, int64_t rows, int64_t h, int64_t x_stride, float eps, float add_one) {
  at::parallel_for(0, rows, kiln::row_grain(h), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const T* xr = x + r * x_stride;
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int64_t i = 0; i < h; ++i) {
        const float v = widen(xr[i]);
        sum += v * v;
      }
      const float inv = 1.f / std::sqrt(sum / static_cast<float>(h) + eps);
      T* yr = y + r * h;
#pragma omp simd
      for (int64_t i = 0; i < h; ++i) kiln::narrow_store(yr + i, widen(xr[i]) * inv * (widen(w[i]) + add_one));
    }
  });
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps, bool add_one) {
  TORCH_CHECK(x.dim() >= 1 && weight.dim() == 1 && weight.size(0) == x.size(-1),
              "kiln::rms_norm: weight must be [H] for x [..., H]");
  TORCH_CHECK(x.device().is_cpu() && weight.device().is_cpu(), "kiln::rms_norm runs on the cpu");
  const int64_t h = x.size(-1);
  // rows of x must sit at one stride apart (a contiguous tensor, or a column slice of one)
  const at::Tensor xs = (x.dim() == 1 || x.stride(-1) != 1 || (x.dim() > 2 && !x.is_contiguous())) ? x.contiguous() : x;
  const int64_t rows = h == 0 ? 0 : xs.numel() / h;
  const int64_t stride = xs.dim() == 1 ? h : xs.stride(-2);
  at::Tensor out = at::empty(x.sizes(), x.options());
  const at::Tensor w = weight.contiguous();
  const float e = static_cast<float>(eps), one = add_one ? 1.f : 0.f;
  if (x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kBFloat16) {
    norm_rows(xs.data_ptr<c10::BFloat16>(), w.data_ptr<c10::BFloat16>(), out.data_ptr<c10::BFloat16>(), rows, h, stride, e, one);
  } else if (x.scalar_type() == at::kBFloat16 && w.scalar_type() == at::kFloat) {
    norm_rows(xs.data_ptr<c10::BFloat16>(), w.data_ptr<float>(), out.data_ptr<c10::BFloat16>(), rows, h, stride, e, one);
  } else if (x.scalar_type() == at::kFloat && w.scalar_type() == at::kFloat) {
    norm_rows(xs.data_ptr<float>(), w.data_ptr<float>(), out.data_ptr<float>(), rows, h, stride, e, one);
  } else {
    TORCH_CHECK(false, "kiln::rms_norm: x bfloat16 or float32 with a weight of x's dtype or float32, got ",
                x.scalar_type(), " and ", w.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(kiln, m) { m.def("rms_norm(Tensor x, Tensor weight, float eps, bool add_one) -> Tensor"); }

TORCH_LIBRARY_IMPL(kiln, CPU, m) { m.impl("rms_norm", &rms_norm); }
