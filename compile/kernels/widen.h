// Shared by Kiln's cpu kernels: bfloat16 and float32 values read as float32, and the rows a thread takes.
#pragma once

#include <c10/util/BFloat16.h>

#include <cstdint>
#include <cstring>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace kiln {

// parallel_for's grain for rows of row_elements each: about 32K elements a thread, so a decode step's few rows
// stay on one thread (a fork costs more than they do).
inline int64_t row_grain(int64_t row_elements) {
  return row_elements >= (1 << 15) ? 1 : (1 << 15) / (row_elements > 0 ? row_elements : 1);
}

inline float widen(float x) { return x; }
inline float widen(c10::BFloat16 x) {  // bf16 is float32's upper half: a 16-bit shift
  const uint32_t bits = static_cast<uint32_t>(x.x) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// x rounded to the nearest bfloat16 (ties to even), as a float: bit arithmetic and a select that vectorise, where
// the scalar c10::BFloat16 conversion (a NaN branch) kept loops from vectorising. A NaN stays a quiet NaN (the
// rounding alone could carry some NaN payloads into infinity or zero).
inline float round_bf16(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) & 0xFFFF0000u;
  const uint32_t quiet_nan = (bits | 0x00400000u) & 0xFFFF0000u;
  bits = (bits & 0x7FFFFFFFu) > 0x7F800000u ? quiet_nan : rounded;
  float y;
  std::memcpy(&y, &bits, sizeof y);
  return y;
}

// Store x in the dtype of dst: float as is; bfloat16 rounded to nearest, ties to even (round_bf16).
inline void narrow_store(float* dst, float x) { *dst = x; }
inline void narrow_store(c10::BFloat16* dst, float x) {
  const float r = round_bf16(x);
  uint32_t bits;
  std::memcpy(&bits, &r, sizeof bits);
  dst->x = static_cast<uint16_t>(bits >> 16);
}

#if defined(__AVX512F__)
inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const c10::BFloat16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
#endif

}  // namespace kiln
