// Sparse (top-k) MLA decode, AVX-512 BF16 build: bf16 queries over 656-byte fp8 or bf16
// caches. sparse_decode.cpp picks it when cpuid reports AVX-512 F/BW/VL/DQ + AVX512_BF16
// (ZMM state on) and every value it reads is exact in bf16 (see sparse_kernels.h).
//
// Work item = (sequence, query, group of up to 64 heads): the heads of one query share its
// indices, so each named token is gathered and dequantised ONCE per item and used by every
// head of the group. Per tile of up to 32 valid slots:
//   1. dequantise: fp8 code x its power-of-two scale (exact in fp32 and in bf16: e4m3 has 3
//      mantissa bits, bf16 7, and bf16 has fp32's exponent range), rope as stored; NaN reads
//      as 0 (FlashMLA's reference). Kept twice: bf16 rows [32][576] and fp32 V [32][512];
//   2. transpose the bf16 rows into 32-bit pairs kt[288][32] (16x16 blocks in registers):
//      one zmm = one pair of dims of 16 tokens, the layout of vdpbf16ps, so scores need no
//      horizontal sums;
//   3. scores: vdpbf16ps (broadcast q pair x 16 tokens), 8 heads x 32 tokens of fp32
//      accumulators, times softmax_scale * log2(e);
//   4. online softmax in base 2 with a vectorised exp2, P in fp32;
//   5. acc = corr * acc + P . V in fp32 FMA, 4 heads x 64 columns of accumulators.
// The AMX build (sparse_decode_amx) runs steps 3 and 5 on AMX tiles: scores = tdpbf16ps of
// 16 heads x 32 dims of q with 16 pairs x 16 tokens of kt (the same bf16 products, fp32
// accumulation); P . V = tdpbf16ps of P split into two bf16 parts (p_hi + p_lo = P to
// 2^-18) with V as token pairs (exact in bf16), fp32 accumulation.
// A row whose every valid score is -inf (or that has no valid slot) is empty: out 0, lse +inf.
#include "sparse_kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <new>

#include "amx_tiles.h"
#include "cpu_features.h"
#include "sparse_slots.h"

#if defined(__x86_64__) && defined(__GNUC__) && (defined(__clang__) || __GNUC__ >= 10)
#define MLA_HAVE_SPARSE_AVX512 1
#include <immintrin.h>
#pragma GCC push_options
#if __GNUC__ >= 11 || defined(__clang__)
#define MLA_HAVE_SPARSE_AMX 1
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,amx-tile,amx-bf16")
#else
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")
#endif
// GCC 12's own AVX-512 headers trip these (a known false positive on _mm512_undefined_*).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#define MLA_SPARSE_UNROLL _Pragma("GCC unroll 16")

namespace mla::cpu {
namespace {

constexpr int kTile = 32;              // tokens per tile: two zmm of scores per head
constexpr int kMaxGroup = 64;          // heads per work item
constexpr int kPairs = kHeadDim / 2;   // 288 bf16 pairs per token
constexpr int kScoreRB = 8;            // score block: 8 heads x 2 token vectors = 16 accumulators
constexpr int kPvRB = 4, kPvW = 4;     // PV block: 4 heads x 4 x 16 columns = 16 accumulators
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();
static_assert(kLatentDim % (16 * kPvW) == 0 && kPairs % 16 == 0, "blocking must divide the head dims");

// ------------------------------------------------------------------ per-thread scratch

// Kept between calls (decode steps repeat their shapes): a fresh allocation of this size
// would be a fresh mmap whose pages fault in again on every call.
struct Workspace {
  void* data = nullptr;
  size_t capacity = 0;
  void* get(size_t bytes) {
    if (bytes > capacity) {
      if (data) ::operator delete(data, std::align_val_t(64));
      data = ::operator new(bytes, std::align_val_t(64));
      capacity = bytes;
    }
    return data;
  }
  ~Workspace() {
    if (data) ::operator delete(data, std::align_val_t(64));
  }
};
thread_local Workspace tls_workspace;

struct Scratch {
  uint32_t* q;     // [group][288]  the group's query rows as bf16 pairs
  uint16_t* rows;  // [kTile][576]  the tile's tokens in bf16, row-major (transpose source)
  uint32_t* kt;    // [288][kTile]  pair d of token t at kt[d * kTile + t]
  float* v;        // [kTile][512]  the tile's V in fp32 (the same values)
  float* s;        // [group][kTile] scores, then probabilities
  float* acc;      // [group][512]  unnormalised output
  float* m;        // [group] running max (base 2)
  float* l;        // [group] running sum
  float* corr;     // [group] this tile's rescale of acc
  uint32_t* vt;    // [16][512]     AMX: V as pairs of tokens, pair k of column c at vt[k * 512 + c]
  uint16_t* p_hi;  // [group][kTile] AMX: P as bf16, and the bf16 of what that rounding left out
  uint16_t* p_lo;

  static size_t bytes() { return layout(nullptr).second; }
  static Scratch at(void* base) { return layout(static_cast<char*>(base)).first; }

 private:
  static std::pair<Scratch, size_t> layout(char* base) {
    size_t o = 0;
    auto take = [&](size_t n) {
      char* ptr = base ? base + o : nullptr;
      o += (n + 63) / 64 * 64;
      return ptr;
    };
    Scratch sc;
    sc.q = reinterpret_cast<uint32_t*>(take(sizeof(uint32_t) * kMaxGroup * kPairs));
    sc.rows = reinterpret_cast<uint16_t*>(take(sizeof(uint16_t) * kTile * kHeadDim));
    sc.kt = reinterpret_cast<uint32_t*>(take(sizeof(uint32_t) * kPairs * kTile));
    sc.v = reinterpret_cast<float*>(take(sizeof(float) * kTile * kLatentDim));
    sc.s = reinterpret_cast<float*>(take(sizeof(float) * kMaxGroup * kTile));
    sc.acc = reinterpret_cast<float*>(take(sizeof(float) * kMaxGroup * kLatentDim));
    sc.m = reinterpret_cast<float*>(take(sizeof(float) * kMaxGroup));
    sc.l = reinterpret_cast<float*>(take(sizeof(float) * kMaxGroup));
    sc.corr = reinterpret_cast<float*>(take(sizeof(float) * kMaxGroup));
    sc.vt = reinterpret_cast<uint32_t*>(take(sizeof(uint32_t) * (kTile / 2) * kLatentDim));
    sc.p_hi = reinterpret_cast<uint16_t*>(take(sizeof(uint16_t) * kMaxGroup * kTile));
    sc.p_lo = reinterpret_cast<uint16_t*>(take(sizeof(uint16_t) * kMaxGroup * kTile));
    return {sc, o};
  }
};

// ------------------------------------------------------------------ dequantisation

inline __m512 nan_to_zero(__m512 x) { return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, x, _CMP_ORD_Q), x); }

// 32 bf16 with every NaN replaced by +0.
inline __m512i bf16_nan_to_zero(__m512i x) {
  const __m512i mag = _mm512_and_si512(x, _mm512_set1_epi16(0x7fff));
  return _mm512_maskz_mov_epi16(_mm512_cmple_epu16_mask(mag, _mm512_set1_epi16(0x7f80)), x);
}

inline void store_bf16(uint16_t* dst, __m512 x) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst), (__m256i)_mm512_cvtneps_pbh(x));
}

// 32 e4m3fn codes -> their values in fp32 (two zmm), NaN codes as 0. The code's bits,
// moved into an fp16's sign / exponent / mantissa fields, are an fp16 of 2^-8 times the
// e4m3 value (bias 15 vs 7; e4m3 subnormals land on fp16 subnormals): exact both ways.
inline void e4m3x32_to_f32(const uint8_t* src, __m512& lo, __m512& hi) {
  const __m512i x = _mm512_cvtepu8_epi16(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
  const __m512i mag = _mm512_and_si512(x, _mm512_set1_epi16(0x7f));
  const __mmask32 finite = _mm512_cmpneq_epi16_mask(mag, _mm512_set1_epi16(0x7f));
  const __m512i sign = _mm512_slli_epi16(_mm512_and_si512(x, _mm512_set1_epi16(0x80)), 8);
  const __m512i h = _mm512_maskz_mov_epi16(finite, _mm512_or_si512(sign, _mm512_slli_epi16(mag, 7)));
  const __m512 k256 = _mm512_set1_ps(256.f);
  lo = _mm512_mul_ps(_mm512_cvtph_ps(_mm512_castsi512_si256(h)), k256);
  hi = _mm512_mul_ps(_mm512_cvtph_ps(_mm512_extracti64x4_epi64(h, 1)), k256);
}

// One 656-byte token -> bf16 row [576] and fp32 V [512].
inline void load_fp8_token(const uint8_t* tok, uint16_t* row, float* v) {
  float scales[4];
  std::memcpy(scales, tok + kLatentDim, sizeof scales);
  MLA_SPARSE_UNROLL
  for (int t = 0; t < 4; ++t) {
    const __m512 scale = _mm512_set1_ps(scales[t]);
    for (int i = 0; i < 128; i += 32) {
      const int d = 128 * t + i;
      __m512 lo, hi;
      e4m3x32_to_f32(tok + d, lo, hi);
      lo = nan_to_zero(_mm512_mul_ps(lo, scale));  // NaN / inf scales: as the reference reads them
      hi = nan_to_zero(_mm512_mul_ps(hi, scale));
      _mm512_store_ps(v + d, lo);
      _mm512_store_ps(v + d + 16, hi);
      store_bf16(row + d, lo);
      store_bf16(row + d + 16, hi);
    }
  }
  const uint8_t* rope = tok + kLatentDim + 16;
  for (int i = 0; i < kRopeDim; i += 32)
    _mm512_store_si512(row + kLatentDim + i, bf16_nan_to_zero(_mm512_loadu_si512(rope + 2 * i)));
}

// One bf16 token [576] -> bf16 row and fp32 V.
inline void load_bf16_token(const uint8_t* tok, uint16_t* row, float* v) {
  for (int d = 0; d < kHeadDim; d += 32) {
    const __m512i x = bf16_nan_to_zero(_mm512_loadu_si512(tok + 2 * d));
    _mm512_store_si512(row + d, x);
    if (d < kLatentDim) {
      _mm512_store_ps(v + d, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(x)), 16)));
      _mm512_store_ps(v + d + 16,
                      _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(x, 1)), 16)));
    }
  }
}

// ------------------------------------------------------------------ transpose

// In-register transpose of a 16 x 16 matrix of 32-bit lanes, r[i] = row i. Transposing
// swaps bit b of the row index with bit b of the lane index for b = 3, 2, 1, 0; stage b
// does it with two two-source permutes per pair of rows (r, r + 2^b).
struct Transpose16 {
  __m512i lo[4], hi[4];
  Transpose16() {
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int s = 0; s < 4; ++s) {
      const int B = 1 << s;
      const __mmask16 bit_set = _mm512_test_epi32_mask(lane, _mm512_set1_epi32(B));
      // Row r (bit b clear) keeps its lanes with bit b clear and takes lane c - B of row r + B.
      lo[s] = _mm512_mask_blend_epi32(bit_set, lane, _mm512_add_epi32(lane, _mm512_set1_epi32(16 - B)));
      // Row r + B takes lane c + B of row r and keeps its lanes with bit b set.
      hi[s] = _mm512_mask_blend_epi32(bit_set, _mm512_add_epi32(lane, _mm512_set1_epi32(B)),
                                      _mm512_add_epi32(lane, _mm512_set1_epi32(16)));
    }
  }
  inline void operator()(__m512i* r) const {
    MLA_SPARSE_UNROLL
    for (int s = 3; s >= 0; --s) {
      const int B = 1 << s;
      MLA_SPARSE_UNROLL
      for (int i = 0; i < 16; ++i) {
        if (i & B) continue;
        const __m512i a = r[i], b = r[i + B];
        r[i] = _mm512_permutex2var_epi32(a, lo[s], b);
        r[i + B] = _mm512_permutex2var_epi32(a, hi[s], b);
      }
    }
  }
};

// kt[d][16 h .. 16 h + 16) = pair d of tokens 16 h .. 16 h + 16 (rows in bf16, row-major).
inline void transpose_tile(const Transpose16& tr, const uint16_t* rows, int halves, uint32_t* kt) {
  for (int h = 0; h < halves; ++h) {
    const uint16_t* src = rows + static_cast<int64_t>(16 * h) * kHeadDim;
    for (int d0 = 0; d0 < kPairs; d0 += 16) {
      __m512i r[16];
      MLA_SPARSE_UNROLL
      for (int t = 0; t < 16; ++t) r[t] = _mm512_load_si512(src + t * kHeadDim + 2 * d0);
      tr(r);
      MLA_SPARSE_UNROLL
      for (int d = 0; d < 16; ++d) _mm512_store_si512(kt + (d0 + d) * kTile + 16 * h, r[d]);
    }
  }
}

// ------------------------------------------------------------------ scores

// s[i][0 .. 16 W) = s2scale * (q_i . k_t) for RB heads, W vectors of 16 tokens.
template <int RB, int W>
inline void score_block(const uint32_t* q, const uint32_t* kt, float s2scale, float* s) {
  __m512 acc[RB][W];
  MLA_SPARSE_UNROLL
  for (int i = 0; i < RB; ++i)
    MLA_SPARSE_UNROLL
    for (int w = 0; w < W; ++w) acc[i][w] = _mm512_setzero_ps();
  for (int d = 0; d < kPairs; ++d) {
    __m512i k[W];
    MLA_SPARSE_UNROLL
    for (int w = 0; w < W; ++w) k[w] = _mm512_load_si512(kt + d * kTile + 16 * w);
    MLA_SPARSE_UNROLL
    for (int i = 0; i < RB; ++i) {
      const __m512i qv = _mm512_set1_epi32(static_cast<int>(q[i * kPairs + d]));
      MLA_SPARSE_UNROLL
      for (int w = 0; w < W; ++w) acc[i][w] = _mm512_dpbf16_ps(acc[i][w], (__m512bh)qv, (__m512bh)k[w]);
    }
  }
  const __m512 sc = _mm512_set1_ps(s2scale);
  MLA_SPARSE_UNROLL
  for (int i = 0; i < RB; ++i)
    MLA_SPARSE_UNROLL
    for (int w = 0; w < W; ++w) _mm512_store_ps(s + i * kTile + 16 * w, _mm512_mul_ps(acc[i][w], sc));
}

template <int W>
void scores(const uint32_t* q, int nh, const uint32_t* kt, float s2scale, float* s) {
  int i = 0;
  for (; i + kScoreRB <= nh; i += kScoreRB) score_block<kScoreRB, W>(q + i * kPairs, kt, s2scale, s + i * kTile);
  const uint32_t* qr = q + i * kPairs;
  float* sr = s + i * kTile;
  switch (nh - i) {
    case 7: score_block<7, W>(qr, kt, s2scale, sr); break;
    case 6: score_block<6, W>(qr, kt, s2scale, sr); break;
    case 5: score_block<5, W>(qr, kt, s2scale, sr); break;
    case 4: score_block<4, W>(qr, kt, s2scale, sr); break;
    case 3: score_block<3, W>(qr, kt, s2scale, sr); break;
    case 2: score_block<2, W>(qr, kt, s2scale, sr); break;
    case 1: score_block<1, W>(qr, kt, s2scale, sr); break;
    default: break;
  }
}

// ------------------------------------------------------------------ AMX scores

#ifdef MLA_HAVE_SPARSE_AMX
// Tiles: 0 / 1 = scores of 16 heads x tokens 0-15 / 16-31 (fp32), 2 = 16 heads x 16 pairs
// of q (bf16), 3 / 4 = 16 pairs of dims x tokens 0-15 / 16-31: rows of kt, which already is
// the pair ("VNNI") layout tdpbf16ps wants for its B operand.
inline void amx_configure() { amx_tiles::configure_all_16x64(); }

// s[i][0 .. 16 halves) = s2scale * (q_i . k_t), 16 heads at a time (rows of q past nh are
// read but their scores land in rows of s nobody reads: both are sized for 64 heads).
void scores_amx(const uint32_t* q, int nh, const uint32_t* kt, int halves, float s2scale, float* s) {
  const __m512 sc = _mm512_set1_ps(s2scale);
  for (int h = 0; h < nh; h += 16) {
    MLA_TILE_ZERO(0);
    MLA_TILE_ZERO(1);
    const uint32_t* qh = q + h * kPairs;
    for (int d = 0; d < kPairs; d += 16) {
      MLA_TILE_LOAD(2, qh + d, kPairs * sizeof(uint32_t));
      MLA_TILE_LOAD(3, kt + d * kTile, kTile * sizeof(uint32_t));
      MLA_TILE_DP(0, 2, 3);
      if (halves == 2) {
        MLA_TILE_LOAD(4, kt + d * kTile + 16, kTile * sizeof(uint32_t));
        MLA_TILE_DP(1, 2, 4);
      }
    }
    float* sh = s + h * kTile;
    MLA_TILE_STORE(0, sh, kTile * sizeof(float));
    if (halves == 2) MLA_TILE_STORE(1, sh + 16, kTile * sizeof(float));
    const int rows = std::min(16, nh - h);
    for (int i = 0; i < rows; ++i)
      for (int w = 0; w < halves; ++w) _mm512_store_ps(sh + i * kTile + 16 * w, _mm512_mul_ps(_mm512_load_ps(sh + i * kTile + 16 * w), sc));
  }
}

// vt[k][c] = (v[2k][c], v[2k + 1][c]) for the 16 token pairs of a tile: the B operand of
// tdpbf16ps for P . V (rows are the tile's bf16 rows, all 32 of them valid or zero).
void pair_tokens(const uint16_t* rows, uint32_t* vt) {
  alignas(64) uint16_t lo_idx[32], hi_idx[32];
  for (int j = 0; j < 32; ++j) {
    lo_idx[j] = static_cast<uint16_t>((j & 1 ? 32 : 0) + j / 2);       // columns 0-15 of both rows
    hi_idx[j] = static_cast<uint16_t>((j & 1 ? 32 : 0) + 16 + j / 2);  // columns 16-31
  }
  const __m512i lo = _mm512_load_si512(lo_idx), hi = _mm512_load_si512(hi_idx);
  for (int k = 0; k < kTile / 2; ++k) {
    const uint16_t* a = rows + (2 * k) * kHeadDim;
    const uint16_t* b = a + kHeadDim;
    uint32_t* dst = vt + k * kLatentDim;
    for (int c = 0; c < kLatentDim; c += 32) {
      const __m512i x = _mm512_load_si512(a + c), y = _mm512_load_si512(b + c);
      _mm512_store_si512(dst + c, _mm512_permutex2var_epi16(x, lo, y));
      _mm512_store_si512(dst + c + 16, _mm512_permutex2var_epi16(x, hi, y));
    }
  }
}

// P (fp32, s) as p_hi + p_lo, both bf16: p_hi = bf16(P), p_lo = bf16(P - p_hi); their sum
// is P to 2^-18 relative (fp32 would be 2^-24), so P . V on bf16 tiles stays near fp32.
void split_p(const float* s, int nh, uint16_t* p_hi, uint16_t* p_lo) {
  for (int h = 0; h < nh; ++h)
    for (int w = 0; w < 2; ++w) {
      const __m512 x = _mm512_load_ps(s + h * kTile + 16 * w);
      const __m256i hi = (__m256i)_mm512_cvtneps_pbh(x);
      const __m512 back = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(hi), 16));
      const __m256i rest = (__m256i)_mm512_cvtneps_pbh(_mm512_sub_ps(x, back));
      _mm256_store_si256(reinterpret_cast<__m256i*>(p_hi + h * kTile + 16 * w), hi);
      _mm256_store_si256(reinterpret_cast<__m256i*>(p_lo + h * kTile + 16 * w), rest);
    }
}

// acc = corr * acc + P . V on tiles: 5 = 16 heads x 16 columns of acc (fp32), 6 / 7 = 16
// heads x 16 token pairs of p_hi / p_lo, 3 = 16 token pairs x 16 columns of vt.
void pv_amx(const uint16_t* p_hi, const uint16_t* p_lo, const float* corr, const uint32_t* vt, int nh, float* acc) {
  for (int h = 0; h < nh; ++h) {
    if (corr[h] == 1.f) continue;
    const __m512 c = _mm512_set1_ps(corr[h]);
    float* a = acc + h * kLatentDim;
    for (int d = 0; d < kLatentDim; d += 16) _mm512_store_ps(a + d, _mm512_mul_ps(_mm512_load_ps(a + d), c));
  }
  for (int h = 0; h < nh; h += 16) {
    MLA_TILE_LOAD(6, p_hi + h * kTile, kTile * sizeof(uint16_t));
    MLA_TILE_LOAD(7, p_lo + h * kTile, kTile * sizeof(uint16_t));
    float* a = acc + h * kLatentDim;
    for (int c = 0; c < kLatentDim; c += 16) {
      MLA_TILE_LOAD(5, a + c, kLatentDim * sizeof(float));
      MLA_TILE_LOAD(3, vt + c, kLatentDim * sizeof(uint32_t));
      MLA_TILE_DP(5, 6, 3);
      MLA_TILE_DP(5, 7, 3);
      MLA_TILE_STORE(5, a + c, kLatentDim * sizeof(float));
    }
  }
}
#endif

// ------------------------------------------------------------------ online softmax

// 2^x for 16 lanes: x = n + f, n = round(x), |f| <= 1/2; 2^f by its Taylor series to the
// 7th power (remainder < (ln 2 / 2)^8 / 8! ~ 5e-9, below fp32's half ulp), times 2^n by
// vscalefps (which also underflows to 0 cleanly). x <= -160 (and -inf) gives 0.
inline __m512 exp2_ps(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-160.f));
  const __m512 n = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, n);
  __m512 y = _mm512_set1_ps(1.525273380405984e-05f);
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.5403530393381606e-04f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.3333558146428443e-03f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(9.618129107628477e-03f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(5.550410866482158e-02f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(2.402265069591007e-01f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(6.931471805599453e-01f));
  y = _mm512_fmadd_ps(y, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(y, n);
}

inline __mmask16 first_lanes(int n) { return n >= 16 ? __mmask16(0xFFFF) : n <= 0 ? __mmask16(0) : __mmask16((1u << n) - 1); }

// One head, one tile of n valid tokens (s[0 .. n)): updates (m, l), writes the
// probabilities over s (0 past n) and the rescale of acc. While every score seen so far
// is -inf the head's state stays empty (m = -inf, l = 0) and nothing is added.
inline void softmax_head(float* s, int n, float& m, float& l, float& corr) {
  const __mmask16 k0 = first_lanes(n), k1 = first_lanes(n - 16);
  const __m512 ninf = _mm512_set1_ps(kNegInf);
  const __m512 s0 = _mm512_mask_load_ps(ninf, k0, s), s1 = _mm512_mask_load_ps(ninf, k1, s + 16);
  const float tile_max = _mm512_reduce_max_ps(_mm512_max_ps(s0, s1));
  const float new_max = std::max(m, tile_max);
  if (new_max == kNegInf) {
    _mm512_store_ps(s, _mm512_setzero_ps());
    _mm512_store_ps(s + 16, _mm512_setzero_ps());
    corr = 1.f;
    return;
  }
  const float c = std::exp2(m - new_max);  // 0 on the first non-empty tile (m = -inf)
  const __m512 mx = _mm512_set1_ps(new_max);
  const __m512 p0 = _mm512_maskz_mov_ps(k0, exp2_ps(_mm512_sub_ps(s0, mx)));
  const __m512 p1 = _mm512_maskz_mov_ps(k1, exp2_ps(_mm512_sub_ps(s1, mx)));
  _mm512_store_ps(s, p0);
  _mm512_store_ps(s + 16, p1);
  l = l * c + _mm512_reduce_add_ps(_mm512_add_ps(p0, p1));
  m = new_max;
  corr = c;
}

// ------------------------------------------------------------------ P . V

// acc[i][c0 .. c0 + 64) = corr_i * acc + sum_t p[i][t] * v[t][c0 ..] for RB heads.
template <int RB>
inline void pv_block(const float* p, const float* corr, const float* v, int n, float* acc, int c0) {
  __m512 a[RB][kPvW];
  MLA_SPARSE_UNROLL
  for (int i = 0; i < RB; ++i) {
    const __m512 c = _mm512_set1_ps(corr[i]);
    MLA_SPARSE_UNROLL
    for (int w = 0; w < kPvW; ++w) a[i][w] = _mm512_mul_ps(_mm512_load_ps(acc + i * kLatentDim + c0 + 16 * w), c);
  }
  const float* vt = v + c0;
  for (int t = 0; t < n; ++t, vt += kLatentDim) {
    __m512 vv[kPvW];
    MLA_SPARSE_UNROLL
    for (int w = 0; w < kPvW; ++w) vv[w] = _mm512_load_ps(vt + 16 * w);
    MLA_SPARSE_UNROLL
    for (int i = 0; i < RB; ++i) {
      const __m512 pb = _mm512_set1_ps(p[i * kTile + t]);
      MLA_SPARSE_UNROLL
      for (int w = 0; w < kPvW; ++w) a[i][w] = _mm512_fmadd_ps(pb, vv[w], a[i][w]);
    }
  }
  MLA_SPARSE_UNROLL
  for (int i = 0; i < RB; ++i)
    MLA_SPARSE_UNROLL
    for (int w = 0; w < kPvW; ++w) _mm512_store_ps(acc + i * kLatentDim + c0 + 16 * w, a[i][w]);
}

// Column blocks outer: one block of V (n x 64 fp32, <= 8 KiB) stays in L1 for every head.
void pv(const float* p, const float* corr, const float* v, int n, int nh, float* acc) {
  for (int c0 = 0; c0 < kLatentDim; c0 += 16 * kPvW) {
    int i = 0;
    for (; i + kPvRB <= nh; i += kPvRB) pv_block<kPvRB>(p + i * kTile, corr + i, v, n, acc + i * kLatentDim, c0);
    switch (nh - i) {
      case 3: pv_block<3>(p + i * kTile, corr + i, v, n, acc + i * kLatentDim, c0); break;
      case 2: pv_block<2>(p + i * kTile, corr + i, v, n, acc + i * kLatentDim, c0); break;
      case 1: pv_block<1>(p + i * kTile, corr + i, v, n, acc + i * kLatentDim, c0); break;
      default: break;
    }
  }
}

// ------------------------------------------------------------------ one work item

template <bool kAmx>
void run_item(const SparseDecodeParams& p, const Transpose16& tr, int64_t bi, int64_t j, int h0, int h1,
              const Scratch& sc) {
  const int nh = h1 - h0;
  const int64_t row0 = (bi * p.seqlen_q + j) * p.num_heads + h0;  // first output row of the group
  // The group's query rows as bf16 pairs (exact: the caller's q was bf16).
  for (int h = 0; h < nh; ++h) {
    const float* src = p.q + (row0 + h) * kHeadDim;
    uint16_t* dst = reinterpret_cast<uint16_t*>(sc.q + h * kPairs);
    for (int d = 0; d < kHeadDim; d += 16) store_bf16(dst + d, _mm512_loadu_ps(src + d));
  }
  for (int h = 0; h < nh; ++h) {
    sc.m[h] = kNegInf;
    sc.l[h] = 0.f;
  }
  std::fill(sc.acc, sc.acc + static_cast<int64_t>(nh) * kLatentDim, 0.f);
  const float s2scale = p.softmax_scale * kLog2e;
  SparseSlotCursor cursor{p, bi, j};
  // Two slot buffers: the next tile's tokens are prefetched while this one is computed.
  const SparseSource* srcs_buf[2][kTile];
  int32_t tokens_buf[2][kTile];
  int cur = 0;
  int n = cursor.next(kTile, srcs_buf[0], tokens_buf[0]);
  for (; n > 0; cur ^= 1) {
    const SparseSource* const* srcs = srcs_buf[cur];
    const int32_t* tokens = tokens_buf[cur];
    const int n_next = cursor.next(kTile, srcs_buf[cur ^ 1], tokens_buf[cur ^ 1]);
    for (int t = 0; t < n_next; ++t) sparse_prefetch_token(*srcs_buf[cur ^ 1][t], tokens_buf[cur ^ 1][t]);
    for (int t = 0; t < n; ++t) {
      const uint8_t* tok = sparse_token_ptr(*srcs[t], tokens[t]);
      uint16_t* row = sc.rows + t * kHeadDim;
      float* v = sc.v + t * kLatentDim;
      if (srcs[t]->dtype == DType::kFloat8E4M3) load_fp8_token(tok, row, v);
      else load_bf16_token(tok, row, v);
    }
    const int halves = n > 16 ? 2 : 1;
    // Rows past n of the last half: zero, so that their (masked) scores are finite.
    // (AMX: all 32, they are also V's token pairs, and 0 x inf would be NaN.)
    std::fill(sc.rows + static_cast<int64_t>(n) * kHeadDim,
              sc.rows + static_cast<int64_t>(kAmx ? kTile : 16 * halves) * kHeadDim, uint16_t(0));
    transpose_tile(tr, sc.rows, halves, sc.kt);
#ifdef MLA_HAVE_SPARSE_AMX
    if constexpr (kAmx) scores_amx(sc.q, nh, sc.kt, halves, s2scale, sc.s);
    else
#endif
    if (halves == 2) scores<2>(sc.q, nh, sc.kt, s2scale, sc.s);
    else scores<1>(sc.q, nh, sc.kt, s2scale, sc.s);
    for (int h = 0; h < nh; ++h) softmax_head(sc.s + h * kTile, n, sc.m[h], sc.l[h], sc.corr[h]);
#ifdef MLA_HAVE_SPARSE_AMX
    if constexpr (kAmx) {
      pair_tokens(sc.rows, sc.vt);
      split_p(sc.s, nh, sc.p_hi, sc.p_lo);
      pv_amx(sc.p_hi, sc.p_lo, sc.corr, sc.vt, nh, sc.acc);
    } else
#endif
      pv(sc.s, sc.corr, sc.v, n, nh, sc.acc);
    n = n_next;
  }
  for (int h = 0; h < nh; ++h) {
    float* o = p.out + (row0 + h) * kLatentDim;
    if (sc.m[h] == kNegInf) {  // no valid slot, or every valid score -inf: empty row
      std::fill(o, o + kLatentDim, 0.f);
      p.lse[row0 + h] = std::numeric_limits<float>::infinity();
      continue;
    }
    const float lse = (sc.m[h] + std::log2(sc.l[h])) * kLn2;
    float factor = 1.f / sc.l[h];
    if (p.attn_sink) factor /= 1.f + std::exp(p.attn_sink[h0 + h] - lse);
    const __m512 f = _mm512_set1_ps(factor);
    const float* a = sc.acc + static_cast<int64_t>(h) * kLatentDim;
    for (int d = 0; d < kLatentDim; d += 16) _mm512_storeu_ps(o + d, _mm512_mul_ps(_mm512_load_ps(a + d), f));
    p.lse[row0 + h] = lse;
  }
}

template <bool kAmx>
void run_all(const SparseDecodeParams& p) {
  // Head groups: at most 64 heads (the scratch), and enough groups that every thread has an
  // item when there are few queries; groups of a multiple of 8 heads (the score block).
  const int64_t queries = static_cast<int64_t>(p.batch) * p.seqlen_q;
  const int64_t h = p.num_heads;
  const int64_t threads = at::get_num_threads();
  const int64_t min_groups = (h + kMaxGroup - 1) / kMaxGroup;
  const int64_t want = std::max(min_groups, std::min((threads + queries - 1) / queries, (h + 7) / 8));
  int64_t group = (h + want - 1) / want;
  group = std::min<int64_t>(kMaxGroup, (group + 7) / 8 * 8);
  const int64_t groups = (h + group - 1) / group;
  at::parallel_for(0, queries * groups, 1, [&](int64_t begin, int64_t end) {
    const Scratch sc = Scratch::at(tls_workspace.get(Scratch::bytes()));
    const Transpose16 tr;
#ifdef MLA_HAVE_SPARSE_AMX
    if constexpr (kAmx) amx_configure();
#endif
    for (int64_t it = begin; it < end; ++it) {
      const int64_t g = it % groups, bj = it / groups;
      const int h0 = static_cast<int>(g * group);
      const int h1 = static_cast<int>(std::min<int64_t>(h, h0 + group));
      run_item<kAmx>(p, tr, bj / p.seqlen_q, bj % p.seqlen_q, h0, h1, sc);
    }
#ifdef MLA_HAVE_SPARSE_AMX
    if constexpr (kAmx) amx_tiles::release();
#endif
  });
}

}  // namespace

bool sparse_decode_avx512bf16_built() { return true; }

void sparse_decode_avx512bf16(const SparseDecodeParams& p) { run_all<false>(p); }

// AMX: as the dense kernel, cpuid AMX-BF16 + AMX-TILE, the tile state enabled by the OS and
// granted to this process (cpu_features).
bool sparse_decode_amx_usable() {
#ifdef MLA_HAVE_SPARSE_AMX
  return cpu_features().amx_bf16;  // detection and the Linux tile permission: cpu_features.cpp
#else
  return false;
#endif
}

void sparse_decode_amx(const SparseDecodeParams& p) { run_all<true>(p); }

}  // namespace mla::cpu

#pragma GCC diagnostic pop
#pragma GCC pop_options

#else  // no AVX-512 BF16 build with this compiler

namespace mla::cpu {
bool sparse_decode_avx512bf16_built() { return false; }
void sparse_decode_avx512bf16(const SparseDecodeParams&) {}
bool sparse_decode_amx_usable() { return false; }
void sparse_decode_amx(const SparseDecodeParams&) {}
}  // namespace mla::cpu

#endif
