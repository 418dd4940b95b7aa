// CPU decode kernel on Intel AMX (TDPBF16PS tiles): bf16, fp16 and fp8 (e4m3) caches.
//
// Sapphire Rapids and later cores have eight 1 KiB tile registers and a matrix unit whose
// TDPBF16PS multiplies a 16 x 32 bf16 tile by a 32 x 16 bf16 tile into a 16 x 16 fp32
// tile (16 K multiply-adds per instruction, ~16 cycles): an order of magnitude above the
// AVX-512 FMA rate. For one item (sequence, <= 64 query rows, a key range) the kernel walks
// the keys in blocks of kBlockKeys (64) and per block runs:
//
//   1. key tiles: for each 16 keys, the 16 cache rows (bf16, 576 values) as an AMX A
//      operand. A bf16 cache is loaded IN PLACE when the 16 rows are equally spaced (one
//      block-table block holds them: block sizes that are multiples of 16); otherwise the
//      rows are copied into a contiguous buffer. fp8 rows are widened to bf16 (exact)
//      into that buffer.
//   2. S^T[keys, rows] = K . Q^T (TDPBF16PS over 18 steps of 32 columns). Why transposed:
//      K is then the A operand and needs no repacking, while Q^T (the B operand, which must
//      be in AMX's "VNNI" layout: pairs of reduction rows interleaved) is built once per
//      item. Query rows are padded to a multiple of 16 (zero rows).
//   3. online softmax in AVX-512 fp32, one zmm = the same key for 16 query rows, so the
//      max / sum need no horizontal reductions. The accumulator is rescaled lazily: the
//      reference max of a row moves only when a block's max exceeds it by more than
//      2^kLazyRescale (P <= 256 meanwhile, harmless in fp32 and bf16), so the rescale
//      pass over O is rare after the first block.
//   4. P[rows, keys] for the A operand of P.V, as TWO bf16 parts P = hi + mid, mid rounded
//      from the exact fp32 residual P - hi: 16 significant bits, |P - hi - mid| <= 2^-16 P.
//      Why two: SPEC asks for "softmax and accumulation in fp32" and the contract tests hold
//      every CPU kernel to fp32-level output errors (2e-5 on O(1) values); P rounded to bf16
//      alone, as GPU kernels do, gave errors up to 2e-3, while a 2^-16 relative weight error
//      moves an output by at most 2^-16 max|V| and in practice (~1000 weights with random
//      rounding signs) ~1e-6. A third part bought nothing the tests or an fp32 kernel can
//      see and cost a third more P . V products. Pairs of keys are packed per row, then a
//      16 x 16 dword transpose per part (the softmax produced P^T).
//   5-6. O[rows, 512] += (P_mid + P_hi) . V, 32 output columns at a time: V (those columns of
//      the block's rows) is repacked into a 4 KB VNNI buffer (rows 2k and 2k+1 interleaved)
//      that stays in L1, then every row tile runs its products on it (pv_block). O lives in
//      scratch as whole 1 KB tiles, its columns in the order the cheap interleave makes;
//      both are undone once per item (unpermute_o).
//
// Queries: a bf16 query (bf16 cache) is used exactly. An fp32 query (fp8 caches) is split
// into three bf16 parts q = hi + mid + lo (24 significant bits, fp32's own precision), and
// each key tile meets all three, so the scores are as exact as an fp32 kernel's; when every
// value is a bf16 number (a bf16 query the glue widened for the fp8 cache: the usual case)
// mid and lo are zero and the item runs the one-part score product instead.
//
// fp16 caches ("amx-bf16x2"): every fp16 value is exactly hi + lo in bf16 (8 + at most 4
// significant bits), so K, V and the fp16 query are split once and the products run on the
// parts: scores K_hi q_hi + K_hi q_lo + K_lo q_hi + K_lo q_lo (exact), P . V with P_hi V_hi +
// P_hi V_lo + P_mid V_hi. fp32 caches are not handled here (a three-way split would cost 9
// products); decode.cpp gives them the avx512-fp32 kernel.
//
// The AMX intrinsics of GCC 12 do not tell the compiler that TILELOADD reads memory and
// LDTILECFG reads 64 bytes, so this file issues the instructions through inline assembly
// with "memory" clobbers (amx_tiles.h, shared with the sparse AMX kernel).
#include <immintrin.h>

#include <cstddef>
#include <cstdint>

#include "amx_tiles.h"
#include "decode_impl.h"

#if defined(__x86_64__) && defined(__GNUC__) && (defined(__clang__) || __GNUC__ >= 10)
#define MLA_HAVE_AMX_KERNEL 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vbmi")
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace mla::cpu {
namespace {

#include "decode_tile_loop.h"
#include "avx512_bf16_conversions.h"

namespace amx {

constexpr int kBlockKeys = 64;               // keys per block: 4 key tiles, 2 key-pair tiles
constexpr int kKeyTiles = kBlockKeys / 16;   // A tiles of the score product
constexpr int kPairTiles = kBlockKeys / 32;  // K-dimension tiles of the P.V product
constexpr int kChunks = kHeadDim / 32;       // 18 steps of 32 columns per score tile
constexpr int kPairs = kHeadDim / 2;         // 288 column pairs of a query row
constexpr int kColTiles = kLatentDim / 16;   // 32 output tiles of 16 columns
constexpr float kLazyRescale = 8.f;          // log2 units: P <= 2^8 between rescales
static_assert(kKeyTiles == 4 && kPairTiles == 2, "the tile kernels below are written for 64-key blocks");

// ---------------------------------------------------------------- AMX instructions
// (amx_tiles.h: inline assembly with memory clobbers, every tile 16 rows x 64 bytes)

inline void configure_tiles() { amx_tiles::configure_all_16x64(); }
inline void release_tiles() { amx_tiles::release(); }

// ---------------------------------------------------------------- scratch

inline int32_t pad16(int32_t rows) { return (rows + 15) / 16 * 16; }

// Byte offsets of the per-thread scratch areas (64-byte aligned), for mpad query rows.
struct Layout {
  size_t q_hi, q_mid, q_lo, kbuf, kbuf_lo, vbuf, vbuf_lo, st, p_hi, p_mid, obuf, ref_max, sum, limit, krow, krow_lo, zero, total;
  explicit Layout(int32_t max_rows) {
    const size_t mpad = static_cast<size_t>(pad16(max_rows));
    size_t o = 0;
    q_hi = o;  o = align64(o + sizeof(uint32_t) * kPairs * mpad);           // Q^T, VNNI: [288 pairs][mpad] dwords
    q_mid = o; o = align64(o + sizeof(uint32_t) * kPairs * mpad);           // fp32 q only: the residuals
    q_lo = o;  o = align64(o + sizeof(uint32_t) * kPairs * mpad);
    kbuf = o;  o = align64(o + sizeof(uint16_t) * kBlockKeys * kHeadDim);  // copied / widened key rows
    kbuf_lo = o; o = align64(o + sizeof(uint16_t) * kBlockKeys * kHeadDim); // fp16 only: their lo parts
    vbuf = o;  o = align64(o + sizeof(uint16_t) * kBlockKeys * 32);         // V chunk: [32 key pairs][32 x 2]
    vbuf_lo = o; o = align64(o + sizeof(uint16_t) * kBlockKeys * 32);       // fp16 only: lo parts
    st = o;    o = align64(o + sizeof(float) * kBlockKeys * mpad);          // S^T: [64 keys][mpad]
    p_hi = o;  o = align64(o + sizeof(uint16_t) * mpad * kBlockKeys);       // P: [mpad][64 keys] bf16
    p_mid = o; o = align64(o + sizeof(uint16_t) * mpad * kBlockKeys);       // P - P_hi in bf16
    obuf = o;  o = align64(o + sizeof(float) * mpad * kLatentDim);          // O, tiled (see o_tile)
    ref_max = o; o = align64(o + sizeof(float) * mpad);
    sum = o;   o = align64(o + sizeof(float) * mpad);
    limit = o; o = align64(o + sizeof(int32_t) * mpad);
    krow = o;  o = align64(o + sizeof(void*) * kBlockKeys);
    krow_lo = o; o = align64(o + sizeof(void*) * kBlockKeys);
    zero = o;  o = align64(o + sizeof(uint16_t) * kHeadDim);
    total = o;
  }
};

// ---------------------------------------------------------------- conversions

// The fp32 value of bf16 bits.
inline float bf16_value(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float x;
  __builtin_memcpy(&x, &u, 4);
  return x;
}

// One cache row as bf16 in dst (576 values): a copy (bf16) or the exact widening (fp8).
template <class CT>
inline void row_to_bf16(const typename CT::T* src, uint16_t* dst) {
  if constexpr (CT::kType == DType::kBFloat16) {
    for (int d = 0; d < kHeadDim; d += 32) _mm512_storeu_si512(dst + d, _mm512_loadu_si512(src + d));
  } else {
    static_assert(CT::kType == DType::kFloat8E4M3, "bf16 and fp8 caches only");
    for (int d = 0; d < kHeadDim; d += 64) fp8x64_to_bf16(src + d, dst + d);
  }
}

// 16 fp16 values -> their two bf16 parts x = hi + lo, exactly: fp16 has 11 significant bits,
// hi (round to nearest) takes 8 and leaves a residual of at most 4 bits, which fp32
// computes exactly and bf16 holds exactly (bf16's exponent range covers fp16's subnormals).
// inf: hi = inf and lo = 0 (inf - inf would be NaN); NaN stays NaN in hi.
inline void fp16x16_to_bf16_parts(const uint16_t* src, uint16_t* hi, uint16_t* lo) {
  const __m512 x = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)));
  const __m256i h = (__m256i)_mm512_cvtneps_pbh(x);
  const __m512 hx = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  const __mmask16 finite = _mm512_cmp_ps_mask(_mm512_abs_ps(x), _mm512_set1_ps(__builtin_inff()), _CMP_LT_OQ);
  const __m512 r = _mm512_maskz_sub_ps(finite, x, hx);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(hi), h);
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(lo), (__m256i)_mm512_cvtneps_pbh(r));
}

// The same for 32 values with integer work only (the float route cost most of an fp16
// block's conversion time). For an exponent field e in 1..30 and mantissa m (10 bits):
//   hi = x rounded to 7 mantissa bits: sign | (((x & 0x7fff) + 4) >> 3) + (112 << 7) (the
//        exponent rebias 15 -> 127; a mantissa carry moves into the exponent, as it must);
//   lo = x - hi = v 2^(e - 25), v = (m & 7) - (8 if m & 7 >= 4): the bf16 of v 2^-25 from a
//        16-entry table indexed by the sign of x and m & 7, e added to its exponent field.
// Any lane with e = 0 (zero, subnormal) or e = 31 (inf, NaN) sends the 32 values through
// the float route instead.
inline void fp16x32_to_bf16_parts(const uint16_t* src, uint16_t* hi, uint16_t* lo) {
  const __m512i x = _mm512_loadu_si512(src);
  const __m512i ebits = _mm512_and_si512(x, _mm512_set1_epi16(0x7c00));
  if (_mm512_cmpeq_epi16_mask(ebits, _mm512_setzero_si512()) |
      _mm512_cmpeq_epi16_mask(ebits, _mm512_set1_epi16(0x7c00))) {
    fp16x16_to_bf16_parts(src, hi, lo);
    fp16x16_to_bf16_parts(src + 16, hi + 16, lo + 16);
    return;
  }
  const __m512i sign = _mm512_and_si512(x, _mm512_set1_epi16(static_cast<short>(0x8000)));
  const __m512i mag = _mm512_xor_si512(x, sign);
  const __m512i h = _mm512_add_epi16(_mm512_srli_epi16(_mm512_add_epi16(mag, _mm512_set1_epi16(4)), 3),
                                     _mm512_set1_epi16(112 << 7));
  // bf16 bits of s v 2^-25 at index 8 (x < 0) + (m & 7), v = 0, 1, 2, 3, -4, -3, -2, -1.
  const __m512i table = _mm512_set_epi16(
      0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,                                  //
      0x3300, 0x3380, 0x33c0, 0x3400, static_cast<short>(0xb3c0), static_cast<short>(0xb380),  // x < 0
      static_cast<short>(0xb300), 0,                                                    //
      static_cast<short>(0xb300), static_cast<short>(0xb380), static_cast<short>(0xb3c0),   // x > 0
      static_cast<short>(0xb400), 0x33c0, 0x3380, 0x3300, 0);
  // idx = bit 15 of x at bit 3, m & 7 below: a bitwise select (mask ? x : x >> 12).
  const __m512i idx = _mm512_ternarylogic_epi32(_mm512_srli_epi16(x, 12), x, _mm512_set1_epi16(7), 0xd8);
  const __m512i v = _mm512_and_si512(x, _mm512_set1_epi16(7));
  __m512i l = _mm512_permutexvar_epi16(idx, table);
  l = _mm512_mask_add_epi16(l, _mm512_test_epi16_mask(v, v), l, _mm512_srli_epi16(ebits, 3));
  _mm512_storeu_si512(hi, _mm512_or_si512(h, sign));
  _mm512_storeu_si512(lo, l);
}

// One fp16 cache row (576 values) as two bf16 rows.
inline void row_to_bf16_parts(const uint16_t* src, uint16_t* hi, uint16_t* lo) {
  for (int d = 0; d < kHeadDim; d += 32) fp16x32_to_bf16_parts(src + d, hi + d, lo + d);
}

// 2^x for x <= ~kLazyRescale (or -inf -> 0): 2^round(x) via vscalefps times a degree-7
// Taylor polynomial of 2^f on [-0.5, 0.5] (relative error < 1e-8). NaN stays NaN.
inline __m512 exp2_ps(__m512 x) {
  x = _mm512_max_ps(_mm512_set1_ps(-200.f), x);  // -inf -> -200 (2^-200 = 0 in fp32); NaN kept
  const __m512 i = _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(x, i);
  __m512 p = _mm512_set1_ps(1.525273380405984e-05f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.5403530393381606e-04f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.3333558146428443e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618129107628477e-03f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550410866482158e-02f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402265069591007e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931471805599453e-01f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, i);
}

// In place: r[i] lane j <- r[j] lane i (a 16 x 16 transpose of dwords).
inline void transpose16x16(__m512i r[16]) {
  __m512i t[16];
  MLA_UNROLL
  for (int i = 0; i < 8; ++i) {
    t[2 * i] = _mm512_unpacklo_epi32(r[2 * i], r[2 * i + 1]);
    t[2 * i + 1] = _mm512_unpackhi_epi32(r[2 * i], r[2 * i + 1]);
  }
  // u[4g + c], 128-bit lane L: column 4L + c of rows 4g .. 4g + 3.
  __m512i u[16];
  MLA_UNROLL
  for (int g = 0; g < 4; ++g) {
    u[4 * g + 0] = _mm512_unpacklo_epi64(t[4 * g], t[4 * g + 2]);
    u[4 * g + 1] = _mm512_unpackhi_epi64(t[4 * g], t[4 * g + 2]);
    u[4 * g + 2] = _mm512_unpacklo_epi64(t[4 * g + 1], t[4 * g + 3]);
    u[4 * g + 3] = _mm512_unpackhi_epi64(t[4 * g + 1], t[4 * g + 3]);
  }
  // Column 4L + c gathers lane L of u[c], u[4 + c], u[8 + c], u[12 + c].
  MLA_UNROLL
  for (int c = 0; c < 4; ++c) {
    const __m512i v0 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0x44);
    const __m512i v1 = _mm512_shuffle_i32x4(u[c], u[4 + c], 0xee);
    const __m512i v2 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0x44);
    const __m512i v3 = _mm512_shuffle_i32x4(u[8 + c], u[12 + c], 0xee);
    r[c] = _mm512_shuffle_i32x4(v0, v2, 0x88);
    r[4 + c] = _mm512_shuffle_i32x4(v0, v2, 0xdd);
    r[8 + c] = _mm512_shuffle_i32x4(v1, v3, 0x88);
    r[12 + c] = _mm512_shuffle_i32x4(v1, v3, 0xdd);
  }
}

// ---------------------------------------------------------------- query

// Q^T is kept as whole B tiles, [row tile][18 chunks of 16 column pairs][16 pairs][16 rows]
// dwords, so each tile is 1 KB of consecutive bytes: with row-major Q^T ([288 pairs][mpad]
// rows) a tile's 16 rows lay mpad * 4 bytes apart, and 128 query rows (147 KB, in L2) made
// every score tile load 16 scattered lines. Index of pair i of query row r:
inline int64_t qt_index(int i, int r) {
  return ((static_cast<int64_t>(r / 16) * kChunks + i / 16) * 16 + i % 16) * 16 + r % 16;
}

// Q^T in the VNNI layout of a B operand: q_hi[qt_index(p, r)] = the bf16 pair (q[r][2p],
// q[r][2p + 1]) of query row r; rows >= rows are zero. Per row tile, the rows' parts are
// converted with vector code and turned into tile rows by 16 x 16 dword transposes (the
// scalar version cost an fp8 item of 64 rows and 512 keys as much as its keys did).
// An fp32 query is split into three
// bf16 parts, q = hi + mid + lo exactly up to 2^-24 |q| (8 + 8 + 8 significant bits).
// Returns whether some row needs mid / lo (false: every value of q is a bf16 number, as
// when the caller's query was bf16 and the glue widened it for an fp8 cache).
// An fp16 query (kFp16: QT holds fp16 bits) is split into two parts, hi and mid, exactly
// (fp16x16_to_bf16_parts); q_lo is left unused.
template <class QT, bool kFp16 = false>
bool load_q(const DecodeParams& p, int32_t seq, int32_t row_begin, int32_t rows, int32_t mpad, uint32_t* q_hi,
            uint32_t* q_mid, uint32_t* q_lo) {
  // Parts of the query: an fp32 query three, an fp16 one two (exact), a bf16 one itself.
  constexpr int kParts = sizeof(QT) == 4 ? 3 : (kFp16 ? 2 : 1);
  uint32_t* const dst[3] = {q_hi, q_mid, q_lo};
  // One row tile's parts, bf16, columns in order (55 KB at most). Pair i of row rr is the
  // dword at part[k][rr] + 2i: (q[rr][2i], q[rr][2i + 1]), low half first.
  alignas(64) uint16_t part[kParts][16][kHeadDim];
  uint32_t residual_bits = 0;
  for (int32_t r0 = 0; r0 < mpad; r0 += 16) {
    for (int rr = 0; rr < 16; ++rr) {
      const int32_t r = r0 + rr;
      if (r >= rows) {
        for (int k = 0; k < kParts; ++k) __builtin_memset(part[k][rr], 0, sizeof(part[k][rr]));
        continue;
      }
      const QueryRow<QT> src = query_row<QT>(p, seq, row_begin + r);
      if constexpr (kFp16) {
        for (int d = 0; d < kLatentDim; d += 16) fp16x16_to_bf16_parts(src.nope + d, part[0][rr] + d, part[1][rr] + d);
        for (int d = 0; d < kHeadDim - kLatentDim; d += 16)
          fp16x16_to_bf16_parts(src.pe + d, part[0][rr] + kLatentDim + d, part[1][rr] + kLatentDim + d);
      } else if constexpr (sizeof(QT) == 2) {
        __builtin_memcpy(part[0][rr], src.nope, sizeof(uint16_t) * kLatentDim);
        __builtin_memcpy(part[0][rr] + kLatentDim, src.pe, sizeof(uint16_t) * (kHeadDim - kLatentDim));
      } else {
        for (int d = 0; d < kLatentDim; d += 32)
          fp32x32_to_bf16_parts3(src.nope + d, part[0][rr] + d, part[1][rr] + d, part[2][rr] + d);
        for (int d = 0; d < kHeadDim - kLatentDim; d += 32)
          fp32x32_to_bf16_parts3(src.pe + d, part[0][rr] + kLatentDim + d, part[1][rr] + kLatentDim + d,
                                 part[2][rr] + kLatentDim + d);
      }
      for (int k = 1; k < kParts; ++k)
        for (int d = 0; d < kHeadDim; ++d) residual_bits |= part[k][rr][d] & 0x7fffu;  // -0 counts as zero
    }
    // Each 16 pairs x 16 rows: a 16 x 16 dword transpose gives the tile's 16 pair rows.
    for (int k = 0; k < kParts; ++k)
      for (int c = 0; c < kChunks; ++c) {
        __m512i t[16];
        for (int rr = 0; rr < 16; ++rr) t[rr] = _mm512_loadu_si512(part[k][rr] + 32 * c);
        transpose16x16(t);
        for (int j = 0; j < 16; ++j) _mm512_storeu_si512(dst[k] + qt_index(16 * c + j, r0), t[j]);
      }
  }
  return residual_bits != 0;
}

// ---------------------------------------------------------------- tile kernels

// Where key tile kt (16 cache rows as bf16) is: rows base + i * stride bytes.
struct KeyTiles {
  const uint16_t* base[kKeyTiles];
  long stride[kKeyTiles];
};

// S^T for one row tile and the 4 key tiles of a bf16 query: C(kt) = tmm kt, B (Q^T) =
// tmm4, A (keys) = tmm6 / 7 alternately.
inline void scores_1row(const KeyTiles& kt, const uint32_t* qh, long q_stride, float* st, long st_stride) {
  MLA_TILE_ZERO(0);
  MLA_TILE_ZERO(1);
  MLA_TILE_ZERO(2);
  MLA_TILE_ZERO(3);
  const long q_step = 16 * q_stride / 4;  // dwords per 16 pair rows
  for (int c = 0; c < kChunks; ++c) {
    MLA_TILE_LOAD(4, qh + c * q_step, q_stride);
    MLA_TILE_LOAD(6, kt.base[0] + 32 * c, kt.stride[0]);
    MLA_TILE_DP(0, 6, 4);
    MLA_TILE_LOAD(7, kt.base[1] + 32 * c, kt.stride[1]);
    MLA_TILE_DP(1, 7, 4);
    MLA_TILE_LOAD(6, kt.base[2] + 32 * c, kt.stride[2]);
    MLA_TILE_DP(2, 6, 4);
    MLA_TILE_LOAD(7, kt.base[3] + 32 * c, kt.stride[3]);
    MLA_TILE_DP(3, 7, 4);
  }
  MLA_TILE_STORE(0, st + 0 * 16 * st_stride / 4, st_stride);
  MLA_TILE_STORE(1, st + 1 * 16 * st_stride / 4, st_stride);
  MLA_TILE_STORE(2, st + 2 * 16 * st_stride / 4, st_stride);
  MLA_TILE_STORE(3, st + 3 * 16 * st_stride / 4, st_stride);
}

// The same for an fp32 query in three bf16 parts: B = tmm4 / 5 / 6 (hi, mid, lo), A = tmm7,
// each key tile meeting all three parts.
inline void scores_1row_split(const KeyTiles& kt, const uint32_t* qh, const uint32_t* qm, const uint32_t* ql,
                              long q_stride, float* st, long st_stride) {
  MLA_TILE_ZERO(0);
  MLA_TILE_ZERO(1);
  MLA_TILE_ZERO(2);
  MLA_TILE_ZERO(3);
  const long q_step = 16 * q_stride / 4;
  for (int c = 0; c < kChunks; ++c) {
    MLA_TILE_LOAD(4, qh + c * q_step, q_stride);
    MLA_TILE_LOAD(5, qm + c * q_step, q_stride);
    MLA_TILE_LOAD(6, ql + c * q_step, q_stride);
    MLA_TILE_LOAD(7, kt.base[0] + 32 * c, kt.stride[0]);
    MLA_TILE_DP(0, 7, 6);
    MLA_TILE_DP(0, 7, 5);
    MLA_TILE_DP(0, 7, 4);
    MLA_TILE_LOAD(7, kt.base[1] + 32 * c, kt.stride[1]);
    MLA_TILE_DP(1, 7, 6);
    MLA_TILE_DP(1, 7, 5);
    MLA_TILE_DP(1, 7, 4);
    MLA_TILE_LOAD(7, kt.base[2] + 32 * c, kt.stride[2]);
    MLA_TILE_DP(2, 7, 6);
    MLA_TILE_DP(2, 7, 5);
    MLA_TILE_DP(2, 7, 4);
    MLA_TILE_LOAD(7, kt.base[3] + 32 * c, kt.stride[3]);
    MLA_TILE_DP(3, 7, 6);
    MLA_TILE_DP(3, 7, 5);
    MLA_TILE_DP(3, 7, 4);
  }
  MLA_TILE_STORE(0, st + 0 * 16 * st_stride / 4, st_stride);
  MLA_TILE_STORE(1, st + 1 * 16 * st_stride / 4, st_stride);
  MLA_TILE_STORE(2, st + 2 * 16 * st_stride / 4, st_stride);
  MLA_TILE_STORE(3, st + 3 * 16 * st_stride / 4, st_stride);
}

// S^T for one row tile of an fp16 cache: K = K_hi + K_lo and q = q_hi + q_lo exactly (two
// bf16 parts each), so all four products run and the scores are exact products summed in
// fp32, as in an fp32 kernel. C = tmm0-3 (key tiles), B = tmm4 / 5 (q_hi / q_lo),
// A = tmm6 / 7 (K_hi / K_lo of one key tile). Without any q_lo bit (q_two_parts false) the
// q_lo products are skipped.
inline void scores_1row_fp16(const KeyTiles& hi, const KeyTiles& lo, const uint32_t* qh, const uint32_t* ql,
                             bool q_two_parts, long q_stride, float* st, long st_stride) {
  MLA_TILE_ZERO(0);
  MLA_TILE_ZERO(1);
  MLA_TILE_ZERO(2);
  MLA_TILE_ZERO(3);
  const long q_step = 16 * q_stride / 4;
#define MLA_FP16_KEY_TILE(k)                                \
  MLA_TILE_LOAD(6, hi.base[k] + 32 * c, hi.stride[k]);      \
  MLA_TILE_LOAD(7, lo.base[k] + 32 * c, lo.stride[k]);      \
  if (q_two_parts) {                                        \
    MLA_TILE_DP(k, 7, 5);                                   \
    MLA_TILE_DP(k, 6, 5);                                   \
  }                                                         \
  MLA_TILE_DP(k, 7, 4);                                     \
  MLA_TILE_DP(k, 6, 4);
  for (int c = 0; c < kChunks; ++c) {
    MLA_TILE_LOAD(4, qh + c * q_step, q_stride);
    if (q_two_parts) MLA_TILE_LOAD(5, ql + c * q_step, q_stride);
    MLA_FP16_KEY_TILE(0)
    MLA_FP16_KEY_TILE(1)
    MLA_FP16_KEY_TILE(2)
    MLA_FP16_KEY_TILE(3)
  }
#undef MLA_FP16_KEY_TILE
  MLA_TILE_STORE(0, st + 0 * 16 * st_stride / 4, st_stride);
  MLA_TILE_STORE(1, st + 1 * 16 * st_stride / 4, st_stride);
  MLA_TILE_STORE(2, st + 2 * 16 * st_stride / 4, st_stride);
  MLA_TILE_STORE(3, st + 3 * 16 * st_stride / 4, st_stride);
}

// S^T for two row tiles and two key tiles (k0, k0 + 1), bf16 q: C(k, r) = tmm 2k + r,
// B = tmm4 (row tile 0) / 5 (row tile 1), A = tmm6 / 7: each loaded tile feeds two products.
inline void scores_2x2(const KeyTiles& kt, int k0, const uint32_t* q0, const uint32_t* q1, long q_stride, float* st0,
                       float* st1, long st_stride) {
  MLA_TILE_ZERO(0);
  MLA_TILE_ZERO(1);
  MLA_TILE_ZERO(2);
  MLA_TILE_ZERO(3);
  const long q_step = 16 * q_stride / 4;
  const uint16_t* a0 = kt.base[k0];
  const uint16_t* a1 = kt.base[k0 + 1];
  for (int c = 0; c < kChunks; ++c) {
    MLA_TILE_LOAD(4, q0 + c * q_step, q_stride);
    MLA_TILE_LOAD(5, q1 + c * q_step, q_stride);
    MLA_TILE_LOAD(6, a0 + 32 * c, kt.stride[k0]);
    MLA_TILE_DP(0, 6, 4);
    MLA_TILE_DP(1, 6, 5);
    MLA_TILE_LOAD(7, a1 + 32 * c, kt.stride[k0 + 1]);
    MLA_TILE_DP(2, 7, 4);
    MLA_TILE_DP(3, 7, 5);
  }
  const long kstep = 16 * st_stride / 4;
  MLA_TILE_STORE(0, st0 + k0 * kstep, st_stride);
  MLA_TILE_STORE(1, st1 + k0 * kstep, st_stride);
  MLA_TILE_STORE(2, st0 + (k0 + 1) * kstep, st_stride);
  MLA_TILE_STORE(3, st1 + (k0 + 1) * kstep, st_stride);
}

// ---------------------------------------------------------------- block steps

// Prefetches the next block's cache rows (into L2) while the current block computes, a few
// lines per step: the rows of a block are scattered through the block table, so the
// hardware prefetchers cannot run ahead of the block. On a loaded 2-vCPU Xeon, single-
// thread A/B runs of L3-resident caches (b = 4 x 4096 and 1 x 32768 keys, h = 16) showed no
// difference beyond the noise between no prefetch, prefetcht0 and prefetcht1; prefetcht1 is
// kept for caches that live in DRAM (to be measured quiet).
struct BlockPrefetcher {
  const char* rows[kBlockKeys];
  int num_rows = 0, lines_per_row = 0, rows_per_step = 0, row = 0;
  void start(int n, int row_bytes, int steps) {
    num_rows = n;
    lines_per_row = row_bytes / 64;
    rows_per_step = steps > 0 ? (n + steps - 1) / steps : 0;
    row = 0;
  }
  // Whole rows per step: per-line bookkeeping (a counter pair per prefetch) cost a third of
  // a 16-row block's time.
  void step() {
    const int end = row + rows_per_step < num_rows ? row + rows_per_step : num_rows;
    for (; row < end; ++row)
      for (int l = 0; l < lines_per_row; ++l) __builtin_prefetch(rows[row] + 64 * l, 0, 2);  // into L2 (prefetcht1)
  }
};

// O lives in scratch as whole tiles, [row tile][32 column tiles][16 rows][16 fp32], so each
// tile is 1 KB of consecutive bytes: row-major O rows (2 KB apart) made every tile load and
// store touch 16 lines two sets apart in L1, and P . V ran at a quarter of the tile rate.
inline float* o_tile(float* o, int rt, int ct) { return o + (static_cast<int64_t>(rt) * (kLatentDim / 16) + ct) * 256; }

// Columns [c, c + 32) of key_pairs pairs of rows (krow[2k], krow[2k + 1]) into vbuf in the
// VNNI layout and unpack order that pv_block describes.
inline void repack_v_chunk(const uint16_t* const* krow, int c, int key_pairs, uint16_t* vbuf) {
  for (int k = 0; k < key_pairs; ++k) {
    const __m512i va = _mm512_loadu_si512(krow[2 * k] + c), vb = _mm512_loadu_si512(krow[2 * k + 1] + c);
    _mm512_storeu_si512(vbuf + k * 64, _mm512_unpacklo_epi16(va, vb));
    _mm512_storeu_si512(vbuf + k * 64 + 32, _mm512_unpackhi_epi16(va, vb));
  }
}

// O[rows, 512] += (P_hi + P_mid) . V over one block, 32 output columns at a time. Per chunk,
// V (those 32 columns of the block's 64 key rows, bf16) is first written into vbuf in the VNNI
// layout of a B operand, vbuf[k][2n + e] = V[2k + e][col(n)] (k = key pair), 4 KB that stay in
// L1; then every row tile runs its products on it. Why per chunk: a whole-block V buffer
// (64 KB) does not fit L1, and writing then re-reading it cost as much as the products.
// Columns are in the "unpack order": within a 32-column chunk the first 16-column tile holds
// columns {0-3, 8-11, 16-19, 24-27} and the second {4-7, 12-15, 20-23, 28-31}, which is what
// vpunpcklwd / vpunpckhwd (one cheap uop each) make of two rows, where the natural order needs
// vpermt2w (three uops). O's columns come out in that order; unpermute_o restores them once
// per item. Rows past the block's keys point at a zero row, so the products never meet an
// unset value.
// Tiles: C = tmm0 / 1 (the chunk's two O column tiles), A = tmm2 / 3 (P_hi / P_mid, key-pair
// tile 0) and tmm4 / 5 (key-pair tile 1), B = tmm6 / 7 (V). With one row tile the P tiles are
// loaded once per block.
inline void pv_block(const uint16_t* const* krow, const uint16_t* p_hi, const uint16_t* p_mid,
                                        int row_tiles, int pair_tiles, float* o, uint16_t* vbuf, BlockPrefetcher& pf) {
  constexpr long kPStride = kBlockKeys * 2, kVStride = 64 * 2, kOStride = 16 * 4;
  const auto load_p = [&](int rt) {
    const int64_t pr = static_cast<int64_t>(rt) * 16 * kBlockKeys;
    MLA_TILE_LOAD(2, p_hi + pr, kPStride);
    MLA_TILE_LOAD(3, p_mid + pr, kPStride);
    if (pair_tiles > 1) {
      MLA_TILE_LOAD(4, p_hi + pr + 32, kPStride);
      MLA_TILE_LOAD(5, p_mid + pr + 32, kPStride);
    }
  };
  if (row_tiles == 1) load_p(0);
  for (int c = 0; c < kLatentDim; c += 32) {
    repack_v_chunk(krow, c, 16 * pair_tiles, vbuf);
    pf.step();
    for (int rt = 0; rt < row_tiles; ++rt) {
      float* orow = o_tile(o, rt, c / 16);
      if (row_tiles > 1) load_p(rt);
      MLA_TILE_LOAD(0, orow, kOStride);
      MLA_TILE_LOAD(1, orow + 256, kOStride);
      MLA_TILE_LOAD(6, vbuf, kVStride);
      MLA_TILE_LOAD(7, vbuf + 32, kVStride);
      MLA_TILE_DP(0, 3, 6);
      MLA_TILE_DP(1, 3, 7);
      MLA_TILE_DP(0, 2, 6);
      MLA_TILE_DP(1, 2, 7);
      if (pair_tiles > 1) {
        MLA_TILE_LOAD(6, vbuf + 16 * 64, kVStride);
        MLA_TILE_LOAD(7, vbuf + 16 * 64 + 32, kVStride);
        MLA_TILE_DP(0, 5, 6);
        MLA_TILE_DP(1, 5, 7);
        MLA_TILE_DP(0, 4, 6);
        MLA_TILE_DP(1, 4, 7);
      }
      MLA_TILE_STORE(0, orow, kOStride);
      MLA_TILE_STORE(1, orow + 256, kOStride);
    }
  }
}

// pv_block for an fp16 cache: V = V_hi + V_lo (exact), and O += P_hi V_hi + P_hi V_lo +
// P_mid V_hi; P_mid V_lo (<= 2^-16 of P V, the size of P's own truncation) is left out.
// Tiles: C = tmm0 / 1, A = tmm2 / 3 (P_hi / P_mid of one key-pair tile, reloaded per chunk
// and pair tile from L1), B = tmm4 / 5 (V_hi) and tmm6 / 7 (V_lo) of the two column tiles.
inline void pv_block_fp16(const uint16_t* const* krow, const uint16_t* const* krow_lo, const uint16_t* p_hi,
                          const uint16_t* p_mid, int row_tiles, int pair_tiles, float* o, uint16_t* vbuf,
                          uint16_t* vbuf_lo, BlockPrefetcher& pf) {
  constexpr long kPStride = kBlockKeys * 2, kVStride = 64 * 2, kOStride = 16 * 4;
  for (int c = 0; c < kLatentDim; c += 32) {
    repack_v_chunk(krow, c, 16 * pair_tiles, vbuf);
    repack_v_chunk(krow_lo, c, 16 * pair_tiles, vbuf_lo);
    pf.step();
    for (int rt = 0; rt < row_tiles; ++rt) {
      float* orow = o_tile(o, rt, c / 16);
      const int64_t pr = static_cast<int64_t>(rt) * 16 * kBlockKeys;
      MLA_TILE_LOAD(0, orow, kOStride);
      MLA_TILE_LOAD(1, orow + 256, kOStride);
      for (int kk = 0; kk < pair_tiles; ++kk) {
        MLA_TILE_LOAD(2, p_hi + pr + 32 * kk, kPStride);
        MLA_TILE_LOAD(3, p_mid + pr + 32 * kk, kPStride);
        MLA_TILE_LOAD(4, vbuf + kk * 16 * 64, kVStride);
        MLA_TILE_LOAD(5, vbuf + kk * 16 * 64 + 32, kVStride);
        MLA_TILE_LOAD(6, vbuf_lo + kk * 16 * 64, kVStride);
        MLA_TILE_LOAD(7, vbuf_lo + kk * 16 * 64 + 32, kVStride);
        MLA_TILE_DP(0, 3, 4);
        MLA_TILE_DP(1, 3, 5);
        MLA_TILE_DP(0, 2, 6);
        MLA_TILE_DP(1, 2, 7);
        MLA_TILE_DP(0, 2, 4);
        MLA_TILE_DP(1, 2, 5);
      }
      MLA_TILE_STORE(0, orow, kOStride);
      MLA_TILE_STORE(1, orow + 256, kOStride);
    }
  }
}

// Where O holds column d (0..511) in the unpack order of pv_block.
inline int unpack_order_position(int d) {
  const int w = d % 32, lane = w / 8, half = (w % 8) / 4;
  return d - w + 16 * half + 4 * lane + w % 4;
}

// O (tiled, columns in the unpack order) -> dst [rows, 512] fp32, rows and columns in order.
inline void unpermute_o(float* o, float* dst, int32_t rows) {
  for (int32_t r = 0; r < rows; ++r) {
    for (int c = 0; c < kLatentDim; c += 32) {
      // lo = columns {0-3, 8-11, 16-19, 24-27}, hi = {4-7, 12-15, 20-23, 28-31}: 128-bit lanes.
      const __m512 lo = _mm512_loadu_ps(o_tile(o, r / 16, c / 16) + (r % 16) * 16);
      const __m512 hi = _mm512_loadu_ps(o_tile(o, r / 16, c / 16 + 1) + (r % 16) * 16);
      const __m512 first = _mm512_shuffle_f32x4(lo, hi, 0x44);   // lo0 lo1 hi0 hi1
      const __m512 second = _mm512_shuffle_f32x4(lo, hi, 0xee);  // lo2 lo3 hi2 hi3
      float* out = dst + static_cast<int64_t>(r) * kLatentDim + c;
      _mm512_storeu_ps(out, _mm512_shuffle_f32x4(first, first, 0xd8));        // lo0 hi0 lo1 hi1
      _mm512_storeu_ps(out + 16, _mm512_shuffle_f32x4(second, second, 0xd8));  // lo2 hi2 lo3 hi3
    }
  }
}

// Online softmax of one row tile (16 query rows = 16 lanes) over a block: S^T columns
// st[t * mpad], t < n (keys t0 + t). Masks keys a row does not see, moves the rows'
// reference max when the block's max exceeds it by more than kLazyRescale (and rescales
// their O rows and sums), writes P as three bf16 parts p_hi / p_mid / p_lo [row][key]
// (P = hi + mid + lo exactly up to 2^-24 P: fp32's own precision), for the 64 keys of the
// block (0 past n), and adds the fp32 P to the sums.
inline void softmax_tile(float* st, int mpad, int n, int32_t t0, const int32_t* limit, float s2scale, float* ref_max,
                         float* sum, uint16_t* p_hi, uint16_t* p_mid, float* o) {
  const __m512 ninf = _mm512_set1_ps(-__builtin_inff());
  const __m512i lim = _mm512_loadu_si512(limit);
  const __m512 scale = _mm512_set1_ps(s2scale);
  __m512 block_max = ninf;
  __mmask16 nan_rows = 0;
  for (int t = 0; t < n; ++t) {
    const __mmask16 vis = _mm512_cmpgt_epi32_mask(lim, _mm512_set1_epi32(t0 + t));
    const __m512 s = _mm512_mask_mul_ps(ninf, vis, _mm512_loadu_ps(st + t * mpad), scale);
    _mm512_storeu_ps(st + t * mpad, s);
    block_max = _mm512_max_ps(s, block_max);  // a NaN score is skipped here (its P is NaN below)
    nan_rows |= _mm512_cmp_ps_mask(s, s, _CMP_UNORD_Q);
  }
  // A row whose only visible scores are NaN still needs a finite max, so that its NaN P
  // reaches the output (as in the reference) instead of reading as "no key".
  block_max = _mm512_mask_mov_ps(block_max, nan_rows & _mm512_cmp_ps_mask(block_max, ninf, _CMP_EQ_OQ),
                                 _mm512_setzero_ps());
  const __m512 old_max = _mm512_loadu_ps(ref_max);
  __m512 vsum = _mm512_loadu_ps(sum);
  const __mmask16 move = _mm512_cmp_ps_mask(block_max, _mm512_add_ps(old_max, _mm512_set1_ps(kLazyRescale)), _CMP_GT_OQ);
  __m512 m = old_max;
  if (move) {
    m = _mm512_mask_mov_ps(old_max, move, block_max);
    // 0 where old = -inf; unmoved rows keep 1 (their old - new may be -inf - -inf).
    const __m512 corr = _mm512_mask_mov_ps(_mm512_set1_ps(1.f), move, exp2_ps(_mm512_sub_ps(old_max, m)));
    vsum = _mm512_mul_ps(vsum, corr);
    _mm512_storeu_ps(ref_max, m);
    alignas(64) float c[16];
    _mm512_store_ps(c, corr);
    // Rows that had seen keys (old max finite) scale their O row; others hold zeros.
    const __mmask16 scale_rows = move & _mm512_cmp_ps_mask(old_max, ninf, _CMP_NEQ_OQ);
    for (int r = 0; r < 16; ++r) {
      if (!(scale_rows >> r & 1)) continue;
      const __m512 cr = _mm512_set1_ps(c[r]);
      for (int ct = 0; ct < kLatentDim / 16; ++ct) {
        float* x = o_tile(o, 0, ct) + r * 16;
        _mm512_storeu_ps(x, _mm512_mul_ps(_mm512_loadu_ps(x), cr));
      }
    }
  }
  // P for pairs of keys: dword lane r = (bf16 p[r][2j], bf16 p[r][2j + 1]); 16 pairs per
  // transpose = one 16 x 32 A tile. Each part is rounded from the exact fp32 residual of
  // the parts before it.
  uint16_t* const parts_out[2] = {p_hi, p_mid};
  for (int kk = 0; kk < kPairTiles; ++kk) {
    __m512 p0[16], p1[16];
    for (int j = 0; j < 16; ++j) {
      const int t = kk * 32 + 2 * j;
      p0[j] = _mm512_setzero_ps();
      p1[j] = _mm512_setzero_ps();
      // s = -inf (masked) gives 0; a key the row sees holding NaN gives NaN, as in the reference.
      if (t < n) {
        const __m512 s = _mm512_loadu_ps(st + t * mpad);
        p0[j] = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(s, ninf, _CMP_NEQ_UQ), exp2_ps(_mm512_sub_ps(s, m)));
      }
      if (t + 1 < n) {
        const __m512 s = _mm512_loadu_ps(st + (t + 1) * mpad);
        p1[j] = _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(s, ninf, _CMP_NEQ_UQ), exp2_ps(_mm512_sub_ps(s, m)));
      }
      vsum = _mm512_add_ps(vsum, _mm512_add_ps(p0[j], p1[j]));
    }
    for (int part = 0; part < 2; ++part) {
      __m512i pairs[16];
      for (int j = 0; j < 16; ++j) {
        const __m512i b0 = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(p0[j]));
        const __m512i b1 = _mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(p1[j]));
        pairs[j] = _mm512_or_si512(b0, _mm512_slli_epi32(b1, 16));
        if (part == 0) {  // the residual, exact in fp32
          p0[j] = _mm512_sub_ps(p0[j], _mm512_castsi512_ps(_mm512_slli_epi32(b0, 16)));
          p1[j] = _mm512_sub_ps(p1[j], _mm512_castsi512_ps(_mm512_slli_epi32(b1, 16)));
        }
      }
      transpose16x16(pairs);
      for (int r = 0; r < 16; ++r) _mm512_storeu_si512(parts_out[part] + r * kBlockKeys + kk * 32, pairs[r]);
    }
  }
  _mm512_storeu_ps(sum, vsum);
}

// ---------------------------------------------------------------- item

// The query's element type: bf16 for a bf16 cache, fp16 for an fp16 cache, fp32 for an fp8 cache.
template <class CT>
struct QueryOf {
  using T = float;
};
template <>
struct QueryOf<CacheBF16> {
  using T = uint16_t;
};
template <>
struct QueryOf<CacheF16> {
  using T = uint16_t;  // fp16 bits
};

template <class CT>
void run_item(const DecodeParams& p, const DecodeItem& it, PartialOut out, void* scratch) {
  using T = typename CT::T;
  using QT = typename QueryOf<CT>::T;
  constexpr bool kSplitQ = sizeof(QT) == 4;
  constexpr bool kFp16 = CT::kType == DType::kFloat16;  // K, V and q in two bf16 parts each
  const int32_t rows = it.row_end - it.row_begin;
  const int32_t mpad = pad16(rows);
  const int32_t row_tiles = mpad / 16;
  const Layout lay(rows);
  char* base = static_cast<char*>(scratch);
  uint32_t* q_hi = reinterpret_cast<uint32_t*>(base + lay.q_hi);
  uint32_t* q_mid = reinterpret_cast<uint32_t*>(base + lay.q_mid);
  uint32_t* q_lo = reinterpret_cast<uint32_t*>(base + lay.q_lo);
  uint16_t* kbuf = reinterpret_cast<uint16_t*>(base + lay.kbuf);
  uint16_t* kbuf_lo = reinterpret_cast<uint16_t*>(base + lay.kbuf_lo);
  uint16_t* vbuf = reinterpret_cast<uint16_t*>(base + lay.vbuf);
  uint16_t* vbuf_lo = reinterpret_cast<uint16_t*>(base + lay.vbuf_lo);
  float* st = reinterpret_cast<float*>(base + lay.st);
  uint16_t* p_hi = reinterpret_cast<uint16_t*>(base + lay.p_hi);
  uint16_t* p_mid = reinterpret_cast<uint16_t*>(base + lay.p_mid);
  float* ref_max = reinterpret_cast<float*>(base + lay.ref_max);
  float* sum = reinterpret_cast<float*>(base + lay.sum);
  int32_t* limit = reinterpret_cast<int32_t*>(base + lay.limit);
  const uint16_t** krow = reinterpret_cast<const uint16_t**>(base + lay.krow);
  const uint16_t** krow_lo = reinterpret_cast<const uint16_t**>(base + lay.krow_lo);  // fp16 only
  uint16_t* zero = reinterpret_cast<uint16_t*>(base + lay.zero);
  float* o = reinterpret_cast<float*>(base + lay.obuf);  // tiled: o_tile

  for (int d = 0; d < kHeadDim; ++d) zero[d] = 0;
  for (int64_t i = 0; i < static_cast<int64_t>(mpad) * kLatentDim; ++i) o[i] = 0.f;
  const int32_t len = p.cache_seqlens[it.seq];
  int32_t min_limit = it.key_end;  // keys [min_limit, key_end) are masked for some rows (causal band)
  for (int32_t r = 0; r < mpad; ++r) {
    limit[r] = r < rows ? visible_keys(len, p.seqlen_q, (it.row_begin + r) / p.num_heads, p.causal) : 0;
    if (r < rows) min_limit = limit[r] < min_limit ? limit[r] : min_limit;
    ref_max[r] = -__builtin_inff();
    sum[r] = 0.f;
  }
  float s2scale = p.softmax_scale * kLog2e;
  if constexpr (CT::kType == DType::kFloat8E4M3) s2scale *= *p.kv_scale * kFp8TileScale;
  // Three-part scores only when the fp32 query has bits beyond bf16's (fp16: the q_lo products
  // only when q has bits beyond bf16's).
  const bool split_q = load_q<QT, kFp16>(p, it.seq, it.row_begin, rows, mpad, q_hi, q_mid, q_lo);

  CacheRowCursor<T> next_row(p, it.seq, it.key_begin);
  const long q_stride = 64;  // bytes per pair row of a Q^T tile (qt_index)
  const long st_stride = static_cast<long>(mpad) * 4;
  const T* raw[kBlockKeys];
  BlockPrefetcher pf;
  // Steps per block: one per score call, one per 32-column chunk of P . V.
  const int score_calls = split_q || kFp16 ? row_tiles : row_tiles / 2 * (kKeyTiles / 2) + row_tiles % 2;
  const int prefetch_steps = score_calls + kLatentDim / 32;
  int n_next = it.key_end - it.key_begin < kBlockKeys ? it.key_end - it.key_begin : kBlockKeys;
  for (int i = 0; i < n_next; ++i) pf.rows[i] = reinterpret_cast<const char*>(next_row());
  const uint16_t* bad_rows[kBlockKeys];  // band keys with a non-finite V value: original rows
  const uint16_t* bad_rows_lo[kBlockKeys];  // fp16: their lo parts
  int bad_keys[kBlockKeys];

  configure_tiles();
  for (int32_t t0 = it.key_begin; t0 < it.key_end; t0 += kBlockKeys) {
    const int n = n_next;
    for (int i = 0; i < n; ++i) raw[i] = reinterpret_cast<const T*>(pf.rows[i]);
    const int32_t after = it.key_end - t0 - n;
    n_next = after < kBlockKeys ? after : kBlockKeys;
    for (int i = 0; i < n_next; ++i) pf.rows[i] = reinterpret_cast<const char*>(next_row());
    pf.start(n_next, static_cast<int>(kHeadDim * sizeof(T)), prefetch_steps);

    // 1. Key tiles: in place when 16 bf16 rows are equally spaced, else copied / widened.
    KeyTiles kt, kt_lo;
    for (int k = 0; k < kKeyTiles; ++k) {
      const int i0 = 16 * k;
      const int cnt = n - i0 < 0 ? 0 : (n - i0 > 16 ? 16 : n - i0);
      bool in_place = false;
      if constexpr (CT::kType == DType::kBFloat16) {
        if (cnt == 16) {
          in_place = true;
          for (int i = 1; i < 16 && in_place; ++i) in_place = raw[i0 + i] == raw[i0] + static_cast<int64_t>(i) * p.cache_token_stride;
        }
      }
      kt_lo.base[k] = zero;
      kt_lo.stride[k] = 0;
      if (cnt == 0) {
        kt.base[k] = zero;  // stride 0: the zero row, 16 times
        kt.stride[k] = 0;
      } else if (kFp16) {
        for (int i = 0; i < cnt; ++i)
          row_to_bf16_parts(reinterpret_cast<const uint16_t*>(raw[i0 + i]), kbuf + (i0 + i) * kHeadDim,
                            kbuf_lo + (i0 + i) * kHeadDim);
        kt.base[k] = kbuf + i0 * kHeadDim;
        kt.stride[k] = kHeadDim * 2;
        kt_lo.base[k] = kbuf_lo + i0 * kHeadDim;
        kt_lo.stride[k] = kHeadDim * 2;
      } else if (in_place) {
        kt.base[k] = reinterpret_cast<const uint16_t*>(raw[i0]);
        kt.stride[k] = static_cast<long>(p.cache_token_stride) * 2;
      } else if constexpr (!kFp16) {
        // Rows past cnt keep whatever the buffer held: their scores are never used.
        for (int i = 0; i < cnt; ++i) row_to_bf16<CT>(raw[i0 + i], kbuf + (i0 + i) * kHeadDim);
        kt.base[k] = kbuf + i0 * kHeadDim;
        kt.stride[k] = kHeadDim * 2;
      }
      for (int i = 0; i < 16; ++i) {
        krow[i0 + i] = i >= cnt ? zero : (in_place ? reinterpret_cast<const uint16_t*>(raw[i0 + i]) : kbuf + (i0 + i) * kHeadDim);
        if (kFp16) krow_lo[i0 + i] = i >= cnt ? zero : kbuf_lo + (i0 + i) * kHeadDim;
      }
    }

    // 2. S^T = K . Q^T.
    int rt = 0;
    if constexpr (kFp16) {
      for (; rt < row_tiles; ++rt) {
        scores_1row_fp16(kt, kt_lo, q_hi + qt_index(0, 16 * rt), q_mid + qt_index(0, 16 * rt), split_q, q_stride,
                         st + rt * 16, st_stride);
        pf.step();
      }
    } else if (kSplitQ && split_q) {
      for (; rt < row_tiles; ++rt) {
        scores_1row_split(kt, q_hi + qt_index(0, 16 * rt), q_mid + qt_index(0, 16 * rt), q_lo + qt_index(0, 16 * rt), q_stride, st + rt * 16, st_stride);
        pf.step();
      }
    } else {
      for (; rt + 2 <= row_tiles; rt += 2)
        for (int k = 0; k < kKeyTiles; k += 2) {
          scores_2x2(kt, k, q_hi + qt_index(0, 16 * rt), q_hi + qt_index(0, 16 * rt + 16), q_stride, st + rt * 16, st + (rt + 1) * 16, st_stride);
          pf.step();
        }
      for (; rt < row_tiles; ++rt) {
        scores_1row(kt, q_hi + qt_index(0, 16 * rt), q_stride, st + rt * 16, st_stride);
        pf.step();
      }
    }

    // 3-4. Online softmax and P, per row tile.
    for (rt = 0; rt < row_tiles; ++rt)
      softmax_tile(st + rt * 16, mpad, n, t0, limit + rt * 16, s2scale, ref_max + rt * 16, sum + rt * 16,
                   p_hi + rt * 16 * kBlockKeys, p_mid + rt * 16 * kBlockKeys,
                   o_tile(o, rt, 0));

    // A masked key has P = 0, but 0 * inf / NaN is NaN: a key of the causal band whose V
    // holds a non-finite value leaves the tile product (its V row reads as zeros) and is
    // added below only to the rows that see it (rare; finite data never).
    int n_bad = 0;
    for (int i = min_limit > t0 ? min_limit - t0 : 0; i < n; ++i) {
      if (v_has_nonfinite<CacheBF16>(krow[i])) {  // fp16: inf and NaN stay so in the hi part
        bad_rows[n_bad] = krow[i];
        if (kFp16) bad_rows_lo[n_bad] = krow_lo[i];
        bad_keys[n_bad++] = i;
        krow[i] = zero;
        if (kFp16) krow_lo[i] = zero;
      }
    }

    // 5-6. O += P . V, V repacked per 32-column chunk.
    if constexpr (kFp16) pv_block_fp16(krow, krow_lo, p_hi, p_mid, row_tiles, (n + 31) / 32, o, vbuf, vbuf_lo, pf);
    else pv_block(krow, p_hi, p_mid, row_tiles, (n + 31) / 32, o, vbuf, pf);
    for (int b = 0; b < n_bad; ++b) {
      const int t = bad_keys[b];
      for (int32_t r = 0; r < rows; ++r) {
        if (t0 + t >= limit[r]) continue;
        const float pr = bf16_value(p_hi[r * kBlockKeys + t]) + bf16_value(p_mid[r * kBlockKeys + t]);
        for (int d = 0; d < kLatentDim; ++d) {
          const int pos = unpack_order_position(d);
          const float v = kFp16 ? bf16_value(bad_rows[b][d]) + bf16_value(bad_rows_lo[b][d]) : bf16_value(bad_rows[b][d]);
          o_tile(o, r / 16, pos / 16)[(r % 16) * 16 + pos % 16] += pr * v;
        }
      }
    }
  }
  release_tiles();

  unpermute_o(o, out.acc, rows);
  for (int32_t r = 0; r < rows; ++r) {
    out.max[r] = ref_max[r];
    out.sum[r] = sum[r];
  }
}

}  // namespace amx

bool amx_supports(DType t) { return t == DType::kBFloat16 || t == DType::kFloat8E4M3 || t == DType::kFloat16; }

size_t amx_scratch_bytes(int32_t max_rows) { return amx::Layout(max_rows).total; }

void amx_run_item(const DecodeParams& p, const DecodeItem& it, PartialOut out, void* scratch) {
  if (p.cache_dtype == DType::kBFloat16) amx::run_item<CacheBF16>(p, it, out, scratch);
  else if (p.cache_dtype == DType::kFloat16) amx::run_item<CacheF16>(p, it, out, scratch);
  else amx::run_item<CacheFP8>(p, it, out, scratch);
}

}  // namespace
}  // namespace mla::cpu

#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif

namespace mla::cpu {

const DecodeIsa* decode_isa_amx() {
#ifdef MLA_HAVE_AMX_KERNEL
  static const DecodeIsa isa{[](DType t) { return t == DType::kFloat16 ? "amx-bf16x2" : "amx-bf16"; }, &amx_supports, &amx_scratch_bytes, &amx_run_item};
  return &isa;
#else
  return nullptr;
#endif
}

}  // namespace mla::cpu
