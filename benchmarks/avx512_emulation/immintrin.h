// Test-only: the real intrinsics, then plain-C emulations of the AVX-512 ones used by
// decode_avx512.cpp, so its logic can run on a CPU without AVX-512.
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
