// Test-only: the real intrinsics, then plain-C emulations of the AVX-512 ones used by
// decode_avx512.cpp (and avx512_bf16_conversions.h), so its logic can run on a CPU without
// AVX-512. Each follows the instruction's definition in Intel's SDM, lane by lane.
#include_next <immintrin.h>
#include <cstring>
#include <cstdint>
typedef float emu_f16 __attribute__((vector_size(64)));
typedef int32_t emu_i16 __attribute__((vector_size(64)));
static inline __m512i emu_loadu_si512(const void* p) { __m512i r; memcpy(&r, p, 64); return r; }
static inline void emu_storeu_si512(void* p, __m512i v) { memcpy(p, &v, 64); }
static inline __m512 emu_loadu_ps(const float* p) { __m512 r; memcpy(&r, p, 64); return r; }
static inline void emu_storeu_ps(float* p, __m512 v) { memcpy(p, &v, 64); }
static inline __m512 emu_castsi512_ps(__m512i v) { __m512 r; memcpy(&r, &v, 64); return r; }
static inline __m512i emu_slli_epi32(__m512i v, int s) { emu_i16 x; memcpy(&x, &v, 64); x = x << s; __m512i r; memcpy(&r, &x, 64); return r; }
static inline __m512i emu_cvtepu16_epi32(__m256i v) { uint16_t a[16]; memcpy(a, &v, 32); emu_i16 x; for (int i = 0; i < 16; ++i) x[i] = a[i]; __m512i r; memcpy(&r, &x, 64); return r; }
static inline __m512 emu_setzero_ps() { emu_f16 x = {}; __m512 r; memcpy(&r, &x, 64); return r; }
static inline __m512 emu_set1_ps(float f) { emu_f16 x; for (int i = 0; i < 16; ++i) x[i] = f; __m512 r; memcpy(&r, &x, 64); return r; }
static inline __m512 emu_mul_ps(__m512 a, __m512 b) { emu_f16 x, y; memcpy(&x, &a, 64); memcpy(&y, &b, 64); x = x * y; __m512 r; memcpy(&r, &x, 64); return r; }
static inline __m512 emu_fmadd_ps(__m512 a, __m512 b, __m512 c) { emu_f16 x, y, z; memcpy(&x, &a, 64); memcpy(&y, &b, 64); memcpy(&z, &c, 64); for (int i = 0; i < 16; ++i) x[i] = __builtin_fmaf(x[i], y[i], z[i]); __m512 r; memcpy(&r, &x, 64); return r; }
static inline float emu_reduce_add_ps(__m512 a) { float x[16]; memcpy(x, &a, 64); float s = 0; for (int i = 0; i < 16; ++i) s += x[i]; return s; }
static inline float emu_bf(uint16_t b) { uint32_t u = uint32_t(b) << 16; float f; memcpy(&f, &u, 4); return f; }
// vdpbf16ps: dst[i] += a[2i]*b[2i] + a[2i+1]*b[2i+1] (products exact in fp32)
static inline __m512 emu_dpbf16_ps(__m512 acc, __m512bh a, __m512bh b) {
  float x[16]; uint16_t ua[32], ub[32]; memcpy(x, &acc, 64); memcpy(ua, &a, 64); memcpy(ub, &b, 64);
  for (int i = 0; i < 16; ++i) x[i] = x[i] + (emu_bf(ua[2*i]) * emu_bf(ub[2*i]) + emu_bf(ua[2*i+1]) * emu_bf(ub[2*i+1]));
  __m512 r; memcpy(&r, x, 64); return r;
}
// ---- byte / dword shuffles and constants (the fp8 widening, the even / odd P.V, finish)
typedef uint8_t emu_u8 __attribute__((vector_size(64)));
static inline __m512i emu_from_bytes(const uint8_t* b) { __m512i r; memcpy(&r, b, 64); return r; }
static inline __m512i emu_load_si512(const void* p) { return emu_loadu_si512(p); }
static inline __m512i emu_set_epi8(char e63, char e62, char e61, char e60, char e59, char e58, char e57, char e56,
                                   char e55, char e54, char e53, char e52, char e51, char e50, char e49, char e48,
                                   char e47, char e46, char e45, char e44, char e43, char e42, char e41, char e40,
                                   char e39, char e38, char e37, char e36, char e35, char e34, char e33, char e32,
                                   char e31, char e30, char e29, char e28, char e27, char e26, char e25, char e24,
                                   char e23, char e22, char e21, char e20, char e19, char e18, char e17, char e16,
                                   char e15, char e14, char e13, char e12, char e11, char e10, char e9, char e8,
                                   char e7, char e6, char e5, char e4, char e3, char e2, char e1, char e0) {
  const char hi_first[64] = {e63, e62, e61, e60, e59, e58, e57, e56, e55, e54, e53, e52, e51, e50, e49, e48,
                             e47, e46, e45, e44, e43, e42, e41, e40, e39, e38, e37, e36, e35, e34, e33, e32,
                             e31, e30, e29, e28, e27, e26, e25, e24, e23, e22, e21, e20, e19, e18, e17, e16,
                             e15, e14, e13, e12, e11, e10, e9, e8, e7, e6, e5, e4, e3, e2, e1, e0};
  uint8_t b[64]; for (int i = 0; i < 64; ++i) b[i] = uint8_t(hi_first[63 - i]);
  return emu_from_bytes(b);
}
static inline __m512i emu_set1_epi8(char c) { uint8_t b[64]; memset(b, (unsigned char)c, 64); return emu_from_bytes(b); }
static inline __m512i emu_set1_epi32(int v) { int32_t x[16]; for (int i = 0; i < 16; ++i) x[i] = v; __m512i r; memcpy(&r, x, 64); return r; }
static inline __m512i emu_setr_epi32(int e0, int e1, int e2, int e3, int e4, int e5, int e6, int e7, int e8, int e9,
                                     int e10, int e11, int e12, int e13, int e14, int e15) {
  const int32_t x[16] = {e0, e1, e2, e3, e4, e5, e6, e7, e8, e9, e10, e11, e12, e13, e14, e15};
  __m512i r; memcpy(&r, x, 64); return r;
}
static inline __m512i emu_and_si512(__m512i a, __m512i b) { emu_u8 x, y; memcpy(&x, &a, 64); memcpy(&y, &b, 64); x &= y; __m512i r; memcpy(&r, &x, 64); return r; }
static inline __m512i emu_or_si512(__m512i a, __m512i b) { emu_u8 x, y; memcpy(&x, &a, 64); memcpy(&y, &b, 64); x |= y; __m512i r; memcpy(&r, &x, 64); return r; }
// vpermb: dst[i] = a[idx[i] & 63]
static inline __m512i emu_permutexvar_epi8(__m512i idx, __m512i a) {
  uint8_t ix[64], x[64], d[64]; memcpy(ix, &idx, 64); memcpy(x, &a, 64);
  for (int i = 0; i < 64; ++i) d[i] = x[ix[i] & 63];
  return emu_from_bytes(d);
}
// vpermi2b / vpermt2b: dst[i] = (idx[i] & 64 ? b : a)[idx[i] & 63]
static inline __m512i emu_permutex2var_epi8(__m512i a, __m512i idx, __m512i b) {
  uint8_t ix[64], x[64], y[64], d[64]; memcpy(ix, &idx, 64); memcpy(x, &a, 64); memcpy(y, &b, 64);
  for (int i = 0; i < 64; ++i) d[i] = (ix[i] & 64) ? y[ix[i] & 63] : x[ix[i] & 63];
  return emu_from_bytes(d);
}
// vpunpck[lh]bw: per 128-bit lane L, bytes 8 (lo) or 8 + 8 (hi) of a and b interleaved
static inline __m512i emu_unpack_epi8(__m512i a, __m512i b, int half) {
  uint8_t x[64], y[64], d[64]; memcpy(x, &a, 64); memcpy(y, &b, 64);
  for (int L = 0; L < 4; ++L) for (int j = 0; j < 8; ++j) {
    d[16 * L + 2 * j] = x[16 * L + 8 * half + j]; d[16 * L + 2 * j + 1] = y[16 * L + 8 * half + j];
  }
  return emu_from_bytes(d);
}
static inline __m512i emu_unpacklo_epi8(__m512i a, __m512i b) { return emu_unpack_epi8(a, b, 0); }
static inline __m512i emu_unpackhi_epi8(__m512i a, __m512i b) { return emu_unpack_epi8(a, b, 1); }
// vpermt2ps: dst[i] = (idx[i] & 16 ? b : a)[idx[i] & 15]
static inline __m512 emu_permutex2var_ps(__m512 a, __m512i idx, __m512 b) {
  int32_t ix[16]; float x[16], y[16], d[16]; memcpy(ix, &idx, 64); memcpy(x, &a, 64); memcpy(y, &b, 64);
  for (int i = 0; i < 16; ++i) d[i] = (ix[i] & 16) ? y[ix[i] & 15] : x[ix[i] & 15];
  __m512 r; memcpy(&r, d, 64); return r;
}
static inline __m512 emu_sub_ps(__m512 a, __m512 b) { emu_f16 x, y; memcpy(&x, &a, 64); memcpy(&y, &b, 64); x = x - y; __m512 r; memcpy(&r, &x, 64); return r; }
static inline __m256i emu_castsi512_si256(__m512i a) { __m256i r; memcpy(&r, &a, 32); return r; }
static inline __m256i emu_extracti64x4_epi64(__m512i a, int imm) { __m256i r; memcpy(&r, reinterpret_cast<const char*>(&a) + 32 * (imm & 1), 32); return r; }
// vcvtne2ps2bf16 (SDM: round to nearest even, denormal inputs read as zero, NaN made quiet):
// the low 16 results from b, the high 16 from a.
static inline uint16_t emu_fp32_to_bf16_rne(float f) {
  uint32_t u; memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  if ((u & 0x7f800000u) == 0) return uint16_t((u >> 16) & 0x8000);
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}
static inline __m512bh emu_cvtne2ps_pbh(__m512 a, __m512 b) {
  float x[16], y[16]; uint16_t d[32]; memcpy(x, &a, 64); memcpy(y, &b, 64);
  for (int i = 0; i < 16; ++i) { d[i] = emu_fp32_to_bf16_rne(y[i]); d[16 + i] = emu_fp32_to_bf16_rne(x[i]); }
  __m512bh r; memcpy(&r, d, 64); return r;
}
#define _mm512_loadu_si512 emu_loadu_si512
#define _mm512_storeu_si512 emu_storeu_si512
#define _mm512_loadu_ps emu_loadu_ps
#define _mm512_storeu_ps emu_storeu_ps
#define _mm512_castsi512_ps emu_castsi512_ps
#define _mm512_slli_epi32 emu_slli_epi32
#define _mm512_cvtepu16_epi32 emu_cvtepu16_epi32
#define _mm512_setzero_ps emu_setzero_ps
#define _mm512_set1_ps emu_set1_ps
#define _mm512_mul_ps emu_mul_ps
#define _mm512_fmadd_ps emu_fmadd_ps
#define _mm512_reduce_add_ps emu_reduce_add_ps
#define _mm512_dpbf16_ps emu_dpbf16_ps
#undef _mm512_load_si512
#define _mm512_load_si512 emu_load_si512
#undef _mm512_set_epi8
#define _mm512_set_epi8 emu_set_epi8
#undef _mm512_set1_epi8
#define _mm512_set1_epi8 emu_set1_epi8
#undef _mm512_set1_epi32
#define _mm512_set1_epi32 emu_set1_epi32
#undef _mm512_setr_epi32
#define _mm512_setr_epi32 emu_setr_epi32
#undef _mm512_and_si512
#define _mm512_and_si512 emu_and_si512
#undef _mm512_or_si512
#define _mm512_or_si512 emu_or_si512
#undef _mm512_permutexvar_epi8
#define _mm512_permutexvar_epi8 emu_permutexvar_epi8
#undef _mm512_permutex2var_epi8
#define _mm512_permutex2var_epi8 emu_permutex2var_epi8
#undef _mm512_unpacklo_epi8
#define _mm512_unpacklo_epi8 emu_unpacklo_epi8
#undef _mm512_unpackhi_epi8
#define _mm512_unpackhi_epi8 emu_unpackhi_epi8
#undef _mm512_permutex2var_ps
#define _mm512_permutex2var_ps emu_permutex2var_ps
#undef _mm512_sub_ps
#define _mm512_sub_ps emu_sub_ps
#undef _mm512_castsi512_si256
#define _mm512_castsi512_si256 emu_castsi512_si256
#undef _mm512_extracti64x4_epi64
#define _mm512_extracti64x4_epi64 emu_extracti64x4_epi64
#undef _mm512_cvtne2ps_pbh
#define _mm512_cvtne2ps_pbh emu_cvtne2ps_pbh
