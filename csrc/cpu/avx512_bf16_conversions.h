// AVX-512 conversions to bf16 shared by the AMX kernel (decode_amx.cpp) and the AVX-512 BF16
// one (decode_avx512.cpp): fp8 e4m3 cache codes -> bf16 by table, and fp32 -> three bf16 parts.
//
// Included INSIDE `namespace mla::cpu { namespace {` after decode_tile_loop.h (kFp8TileScale),
// in a region compiled with `#pragma GCC target(... avx512bf16, avx512vbmi)`: vpermi2b is
// AVX512-VBMI, which every AMX CPU and Zen 4 / 5 have (Cooper Lake does not: its fp8 caches
// take the AVX2 kernel, see cpu_features.h).

// The bf16 bits of (e4m3fn magnitude code c) / 256, exactly (see kFp8TileScale), c < 128:
//   exponent e > 0: 2^(e-7) (1 + m/8) / 256 -> bf16 exponent e + 112, mantissa m in its top
//                   3 bits: (c << 4) + (112 << 7);
//   e = 0: m 2^-17, a normal bf16 (exponent 110 + floor(log2 m));
//   0x7f: NaN.
constexpr uint16_t fp8_magnitude_bf16(int c) {
  if (c == 0x7f) return 0x7fc0;
  if (c >= 8) return static_cast<uint16_t>((c << 4) + (112 << 7));
  if (c == 0) return 0;
  int k = 0;  // floor(log2 m)
  while ((c >> (k + 1)) != 0) ++k;
  return static_cast<uint16_t>(((110 + k) << 7) | (((c << (7 - k)) & 0x7f)));  // m 2^-17 = (m / 2^k) 2^(k - 17)
}

struct Fp8Tables {
  alignas(64) uint8_t lo[128], hi[128];  // the two bytes of fp8_magnitude_bf16(c)
  constexpr Fp8Tables() : lo(), hi() {
    for (int c = 0; c < 128; ++c) {
      lo[c] = static_cast<uint8_t>(fp8_magnitude_bf16(c) & 0xff);
      hi[c] = static_cast<uint8_t>(fp8_magnitude_bf16(c) >> 8);
    }
  }
};
constexpr Fp8Tables kFp8Tables{};
static_assert(fp8_magnitude_bf16(1) == 0x3700 && fp8_magnitude_bf16(7) == 0x3860 && fp8_magnitude_bf16(8) == 0x3880,
              "subnormal e4m3 codes and the first normal one");

// 64 e4m3fn codes -> their bf16 bits (value / 256) in dst[0..63], by table: two 128-entry
// byte lookups (vpermi2b, the low and high byte of each result, NaN and subnormals included),
// the sign moved from bit 7 to bit 15, and the bytes paired into words with vpunpck[lh]bw.
// The unpacks pair bytes within 128-bit lanes, so the codes are first permuted (vpermb) such
// that the two results come out in natural order: lane L of the first holds codes 8L..8L+7,
// of the second codes 32+8L..32+8L+7.
inline void fp8x64_to_bf16(const uint8_t* src, uint16_t* dst) {
  const __m512i t_lo0 = _mm512_load_si512(kFp8Tables.lo), t_lo1 = _mm512_load_si512(kFp8Tables.lo + 64);
  const __m512i t_hi0 = _mm512_load_si512(kFp8Tables.hi), t_hi1 = _mm512_load_si512(kFp8Tables.hi + 64);
  // position 16L + j <- code 8L + j (j < 8), position 16L + 8 + j <- code 32 + 8L + j.
  const __m512i order = _mm512_set_epi8(63, 62, 61, 60, 59, 58, 57, 56, 31, 30, 29, 28, 27, 26, 25, 24,  //
                                        55, 54, 53, 52, 51, 50, 49, 48, 23, 22, 21, 20, 19, 18, 17, 16,  //
                                        47, 46, 45, 44, 43, 42, 41, 40, 15, 14, 13, 12, 11, 10, 9, 8,    //
                                        39, 38, 37, 36, 35, 34, 33, 32, 7, 6, 5, 4, 3, 2, 1, 0);
  const __m512i x = _mm512_permutexvar_epi8(order, _mm512_loadu_si512(src));
  const __m512i lo = _mm512_permutex2var_epi8(t_lo0, x, t_lo1);  // index bits 0-6: the magnitude
  __m512i hi = _mm512_permutex2var_epi8(t_hi0, x, t_hi1);
  hi = _mm512_or_si512(hi, _mm512_and_si512(x, _mm512_set1_epi8(static_cast<char>(0x80))));
  _mm512_storeu_si512(dst, _mm512_unpacklo_epi8(lo, hi));
  _mm512_storeu_si512(dst + 32, _mm512_unpackhi_epi8(lo, hi));
}

// 32 fp32 values -> three bf16 parts x = hi + mid + lo (up to 2^-24 |x|), each rounded from
// the exact fp32 residual of the ones before (round to nearest even), 32 lanes at a time.
inline void fp32x32_to_bf16_parts3(const float* src, uint16_t* hi, uint16_t* mid, uint16_t* lo) {
  __m512 x0 = _mm512_loadu_ps(src), x1 = _mm512_loadu_ps(src + 16);
  uint16_t* const out[3] = {hi, mid, lo};
  for (int part = 0; part < 3; ++part) {
    const __m512i b = (__m512i)_mm512_cvtne2ps_pbh(x1, x0);  // 32 bf16: x0's 16, then x1's
    _mm512_storeu_si512(out[part], b);
    if (part == 2) break;
    // The residual, exact in fp32.
    x0 = _mm512_sub_ps(x0, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(b)), 16)));
    x1 = _mm512_sub_ps(x1, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(b, 1)), 16)));
  }
}
