// AVX2 quantisation of latent rows into float8_e4m3fn: the same rounding as
// float_to_e4m3_saturate (fp8.h), 32 values per step. Compiled for AVX2 under a target
// pragma and called only when the CPU has it (cpu_features.h); nothing from torch or std
// is instantiated inside the pragma region.
#include <immintrin.h>

#include <cstdint>

#include "fp8_avx2.h"

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace mla::cpu {
namespace {

inline __m256 load8(const void* src, DType dtype, int i) {
  if (dtype == DType::kFloat32) return _mm256_loadu_ps(static_cast<const float*>(src) + i);
  const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(src) + i));
  if (dtype == DType::kFloat16) return _mm256_cvtph_ps(x);
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(x), 16));  // bf16
}

// 8 floats -> 8 e4m3fn codes in the low byte of each 32-bit lane.
inline __m256i quantize8(__m256 y) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 a = _mm256_and_ps(y, abs_mask);
  const __m256i sign = _mm256_srli_epi32(_mm256_castps_si256(_mm256_andnot_ps(abs_mask, y)), 24);  // 0x80 or 0
  // Normal range [2^-6, 448): round the 23-bit mantissa to 3 bits (ties to even), rebias.
  const __m256i bits = _mm256_castps_si256(a);
  const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 20), _mm256_set1_epi32(1));
  const __m256i rounded = _mm256_add_epi32(bits, _mm256_add_epi32(_mm256_set1_epi32(0x7ffff), odd));
  const __m256i normal = _mm256_sub_epi32(_mm256_srli_epi32(rounded, 20), _mm256_set1_epi32(120 << 3));
  // Subnormal range: steps of 2^-9, the conversion rounds half to even (default MXCSR).
  const __m256i subnormal = _mm256_cvtps_epi32(_mm256_mul_ps(a, _mm256_set1_ps(512.f)));
  __m256i code = _mm256_blendv_epi8(normal, subnormal,
                                    _mm256_castps_si256(_mm256_cmp_ps(a, _mm256_set1_ps(0.015625f), _CMP_LT_OQ)));
  code = _mm256_blendv_epi8(code, _mm256_set1_epi32(0x7e),
                            _mm256_castps_si256(_mm256_cmp_ps(a, _mm256_set1_ps(448.f), _CMP_GE_OQ)));
  code = _mm256_blendv_epi8(code, _mm256_set1_epi32(0x7f), _mm256_castps_si256(_mm256_cmp_ps(a, a, _CMP_UNORD_Q)));
  return _mm256_or_si256(code, sign);
}

}  // namespace

bool quantize_fp8_avx2_available() { return true; }

void quantize_fp8_row_avx2(const void* src, DType dtype, int n, float scale, uint8_t* dst) {
  const __m256 s = _mm256_set1_ps(scale);
  // packs interleave the 128-bit lanes; this permutation puts the 32 codes back in order.
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int i = 0; i < n; i += 32) {
    // True division, as the portable path: SPEC stores round(x / scale).
    const __m256i c0 = quantize8(_mm256_div_ps(load8(src, dtype, i), s));
    const __m256i c1 = quantize8(_mm256_div_ps(load8(src, dtype, i + 8), s));
    const __m256i c2 = quantize8(_mm256_div_ps(load8(src, dtype, i + 16), s));
    const __m256i c3 = quantize8(_mm256_div_ps(load8(src, dtype, i + 24), s));
    const __m256i bytes = _mm256_packus_epi16(_mm256_packus_epi32(c0, c1), _mm256_packus_epi32(c2, c3));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + i), _mm256_permutevar8x32_epi32(bytes, order));
  }
}

}  // namespace mla::cpu

#pragma GCC pop_options
#else
namespace mla::cpu {
bool quantize_fp8_avx2_available() { return false; }
void quantize_fp8_row_avx2(const void*, DType, int, float, uint8_t*) {}
}  // namespace mla::cpu
#endif
