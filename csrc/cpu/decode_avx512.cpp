// CPU decode kernels for x86-64 with AVX-512 BF16 (Cooper Lake, Sapphire Rapids, Zen 4 and
// later): "avx512bf16" for bf16 caches (below) and fp8 caches (avx512fp8, on CPUs that also
// have AVX512-VBMI), and "avx512-fp32" for fp16 / fp32 caches (fp32 tiles as in the AVX2
// kernel, both GEMMs on 512-bit FMAs).
//
// Run on an AMX Xeon (under MLA_EXT_CPU_ISA=avx512bf16) and a Zen 5 for bf16 / fp16 / fp32;
// the fp8 path was written on an AVX2-only machine and checked under emulation only
// (benchmarks/avx512_emulation). The bf16 kernel mirrors the AVX2 one (avx2_kernels.h):
//   * the query stays in bf16 exactly as given (no rounding: q and cache share the dtype),
//     and softmax_scale * log2(e) multiplies the fp32 dot products instead of q;
//   * scores: vdpbf16ps straight on the bf16 cache rows (no widening of K): one
//     instruction = 32 bf16 products summed pairwise into 16 fp32 lanes; 4 query rows x
//     4 keys of accumulators, reduced horizontally once per 576 columns;
//   * the tile's first 512 columns (V) are widened to fp32 once per tile; the PV GEMM is
//     fp32 FMA on 16-lane vectors, 4 rows x 64 columns of accumulators, P stays fp32;
//   * the online softmax is the AVX2 one (16 keys = two ymm vectors).
// decode.cpp selects it only when cpuid reports AVX512F/BW/VL/DQ + AVX512_BF16 and the OS
// enables the ZMM state (avx512_supports adds VBMI for fp8); MLA_EXT_CPU_ISA=avx2 turns it off.
#include <immintrin.h>

#include <cstddef>
#include <cstdint>

#include "cpu_features.h"
#include "decode_impl.h"

#if defined(__x86_64__) && defined(__GNUC__) && (defined(__clang__) || __GNUC__ >= 10)
#define MLA_HAVE_AVX512BF16_KERNEL 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")
// GCC 12's own AVX-512 headers trip these (a known false positive on _mm512_undefined_*).
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace mla::cpu {
namespace {

#include "decode_tile_loop.h"
#include "avx2_kernels.h"

namespace avx512 {

constexpr int kScoreRB = 4;  // 16 accumulators + 4 key vectors + 1 query vector of 32 zmm
constexpr int kScoreKB = 4;
constexpr int kPvRB = 4;     // 16 accumulators + 4 value vectors + 1 broadcast
constexpr int kPvW = 4;      // 4 x 16 = 64 output columns per block
static_assert(kKeyTile % kScoreKB == 0 && kLatentDim % (16 * kPvW) == 0, "blocking must divide the tile");

inline __m512 widen_bf16(const uint16_t* src) {  // 16 bf16 -> 16 fp32 (exact)
  const __m256i x = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(x), 16));
}

// q rows as raw bf16: [rows, 576].
void load_q(const DecodeParams& p, int32_t seq, int32_t row_begin, int32_t rows, uint16_t* q) {
  for (int32_t r = 0; r < rows; ++r) {
    const QueryRow<uint16_t> src = query_row<uint16_t>(p, seq, row_begin + r);
    const uint16_t* qn = src.nope;
    const uint16_t* qp = src.pe;
    uint16_t* dst = q + static_cast<int64_t>(r) * kHeadDim;
    for (int d = 0; d < kLatentDim; d += 32)
      _mm512_storeu_si512(dst + d, _mm512_loadu_si512(qn + d));
    for (int d = 0; d < kRopeDim; d += 32)
      _mm512_storeu_si512(dst + kLatentDim + d, _mm512_loadu_si512(qp + d));
  }
}

// V = the first 512 columns of each tile row, widened to fp32 once per tile.
void prepare_tile(const uint16_t* const* raw, int n, float* kbuf, const float* zero, const float** kf) {
  for (int i = 0; i < n; ++i) {
    float* dst = kbuf + i * kHeadDim;
    for (int d = 0; d < kLatentDim; d += 32) {
      _mm512_storeu_ps(dst + d, widen_bf16(raw[i] + d));
      _mm512_storeu_ps(dst + d + 16, widen_bf16(raw[i] + d + 16));
    }
    kf[i] = dst;
  }
  for (int i = n; i < kKeyTile; ++i) kf[i] = zero;
}

// s[i][j] = s2scale * (q_i . k_j), bf16 inputs, fp32 accumulation. Query row i is kParts
// bf16 rows (q + i * kQRow + part * 576) whose products all go into the same accumulators:
// one for a bf16 query, up to three for an fp32 one (avx512fp8 below).
template <int RB, int kParts = 1, int kQRow = kHeadDim>
inline void score_block(const uint16_t* q, const uint16_t* const* k, float s2scale, float* s) {
  __m512 acc[RB][kScoreKB];
  MLA_UNROLL
  for (int i = 0; i < RB; ++i)
    MLA_UNROLL
    for (int j = 0; j < kScoreKB; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int d = 0; d < kHeadDim; d += 32) {  // 18 steps
    __m512i kv[kScoreKB];
    MLA_UNROLL
    for (int j = 0; j < kScoreKB; ++j) kv[j] = _mm512_loadu_si512(k[j] + d);
    MLA_UNROLL
    for (int i = 0; i < RB; ++i) {
      MLA_UNROLL
      for (int part = 0; part < kParts; ++part) {
        const __m512i qv = _mm512_loadu_si512(q + i * kQRow + part * kHeadDim + d);
        MLA_UNROLL
        for (int j = 0; j < kScoreKB; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], (__m512bh)qv, (__m512bh)kv[j]);
      }
    }
  }
  MLA_UNROLL
  for (int i = 0; i < RB; ++i)
    MLA_UNROLL
    for (int j = 0; j < kScoreKB; ++j) s[i * kScoreStride + j] = _mm512_reduce_add_ps(acc[i][j]) * s2scale;
}

template <int RB, int kParts = 1, int kQRow = kHeadDim>
inline void score_rows(const uint16_t* q, const uint16_t* const* raw, float s2scale, float* s, Prefetcher& pf) {
  for (int j0 = 0; j0 < kKeyTile; j0 += kScoreKB) {
    score_block<RB, kParts, kQRow>(q, raw + j0, s2scale, s + j0);
    pf.step();
  }
}

void scores(const uint16_t* q, int rows, const uint16_t* const* raw, float s2scale, float* s, Prefetcher& pf) {
  for_row_blocks<kScoreRB>(rows, [&](auto rb, int r) {
    score_rows<decltype(rb)::value>(q + r * kHeadDim, raw, s2scale, s + r * kScoreStride, pf);
  });
}

// acc[i][c0 .. c0 + 16W) = corr_i * acc + sum_t p[i][t] * v_t[c0 ..], RB rows.
template <int RB>
inline void pv_block(const float* p, const float* corr, const float* const* vf, int n, float* acc, int c0) {
  __m512 a[RB][kPvW];
  MLA_UNROLL
  for (int i = 0; i < RB; ++i) {
    const __m512 c = _mm512_set1_ps(corr[i]);
    MLA_UNROLL
    for (int w = 0; w < kPvW; ++w) a[i][w] = _mm512_mul_ps(_mm512_loadu_ps(acc + i * kLatentDim + c0 + 16 * w), c);
  }
  for (int t = 0; t < n; ++t) {
    __m512 vv[kPvW];
    MLA_UNROLL
    for (int w = 0; w < kPvW; ++w) vv[w] = _mm512_loadu_ps(vf[t] + c0 + 16 * w);
    MLA_UNROLL
    for (int i = 0; i < RB; ++i) {
      const __m512 pb = _mm512_set1_ps(p[i * kScoreStride + t]);
      MLA_UNROLL
      for (int w = 0; w < kPvW; ++w) a[i][w] = _mm512_fmadd_ps(pb, vv[w], a[i][w]);
    }
  }
  MLA_UNROLL
  for (int i = 0; i < RB; ++i)
    MLA_UNROLL
    for (int w = 0; w < kPvW; ++w) _mm512_storeu_ps(acc + i * kLatentDim + c0 + 16 * w, a[i][w]);
}

template <int RB>
inline void pv_rows(const float* p, const float* corr, const float* const* vf, int n, float* acc, Prefetcher& pf) {
  for (int c0 = 0; c0 < kLatentDim; c0 += 16 * kPvW) {
    pv_block<RB>(p, corr, vf, n, acc, c0);
    pf.step();
  }
}

void pv(const float* p, const float* corr, const float* const* vf, int n, int rows, float* acc, Prefetcher& pf) {
  for_row_blocks<kPvRB>(rows, [&](auto rb, int r) {
    pv_rows<decltype(rb)::value>(p + r * kScoreStride, corr + r, vf, n, acc + static_cast<int64_t>(r) * kLatentDim, pf);
  });
}

// The kernel interface of decode_tile_loop.h (instantiated for CacheBF16 only).
struct Kernel : KernelDefaults {
  using QElt = uint16_t;
  static constexpr int kQStride = kHeadDim;
  static int prefetch_steps(int rows) { return register_block_steps(rows, kScoreRB, kScoreKB, kPvRB, 16 * kPvW); }
  template <class CT>
  static void load_q(const DecodeParams& p, int32_t seq, int32_t r0, int32_t rows, float, uint16_t* q) {
    static_assert(CT::kType == DType::kBFloat16, "bf16 only");
    avx512::load_q(p, seq, r0, rows, q);
  }
  template <class CT>
  static void prepare_tile(const uint16_t* const* raw, int n, float* kbuf, const float* zero, const float** kf) {
    avx512::prepare_tile(raw, n, kbuf, zero, kf);
  }
  template <class CT>
  static void scores(const uint16_t* q, int rows, const uint16_t* const* raw, const float* const*, float s2scale,
                     float* s, Prefetcher& pf) {
    avx512::scores(q, rows, raw, s2scale, s, pf);
  }
  static void softmax_row(const float* s, int visible, float* max, float* sum, float* p, float* corr) {
    avx2::softmax_row(s, visible, max, sum, p, corr);
  }
  static void pv(const float* p, const float* corr, const float* const* vf, int n, int rows, float* acc,
                 Prefetcher& pf) {
    avx512::pv(p, corr, vf, n, rows, acc, pf);
  }
};

}  // namespace avx512

// fp16 and fp32 caches: fp32 tiles (fp16 widened with F16C, fp32 in place) as in the AVX2
// kernel, whose query loading, tile preparation and softmax this reuses; both GEMMs on
// 512-bit FMAs (twice the AVX2 kernel's width). Their precision is unchanged: no bf16
// rounding anywhere.
namespace avx512f32 {

constexpr int kScoreRB = 4;  // 16 accumulators + 4 key vectors + 1 query vector of 32 zmm
constexpr int kScoreKB = 4;

// s[i][j] = q_i . k_j over 576 fp32 columns (q pre-scaled by s2scale).
template <int RB>
inline void score_block(const float* q, const float* const* k, float* s) {
  __m512 acc[RB][kScoreKB];
  MLA_UNROLL
  for (int i = 0; i < RB; ++i)
    MLA_UNROLL
    for (int j = 0; j < kScoreKB; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int d = 0; d < kHeadDim; d += 16) {  // 36 steps
    __m512 kv[kScoreKB];
    MLA_UNROLL
    for (int j = 0; j < kScoreKB; ++j) kv[j] = _mm512_loadu_ps(k[j] + d);
    MLA_UNROLL
    for (int i = 0; i < RB; ++i) {
      const __m512 qv = _mm512_loadu_ps(q + i * kHeadDim + d);
      MLA_UNROLL
      for (int j = 0; j < kScoreKB; ++j) acc[i][j] = _mm512_fmadd_ps(qv, kv[j], acc[i][j]);
    }
  }
  MLA_UNROLL
  for (int i = 0; i < RB; ++i)
    MLA_UNROLL
    for (int j = 0; j < kScoreKB; ++j) s[i * kScoreStride + j] = _mm512_reduce_add_ps(acc[i][j]);
}

template <int RB>
inline void score_rows(const float* q, const float* const* kf, float* s, Prefetcher& pf) {
  for (int j0 = 0; j0 < kKeyTile; j0 += kScoreKB) {
    score_block<RB>(q, kf + j0, s + j0);
    pf.step();
  }
}

struct Kernel : KernelDefaults {
  using QElt = float;
  static constexpr int kQStride = kHeadDim;
  static int prefetch_steps(int rows) {
    return register_block_steps(rows, kScoreRB, kScoreKB, avx512::kPvRB, 16 * avx512::kPvW);
  }
  template <class CT>
  static void load_q(const DecodeParams& p, int32_t seq, int32_t r0, int32_t rows, float s2scale, float* q) {
    avx2::load_q<CT>(p, seq, r0, rows, s2scale, q);
  }
  template <class CT>
  static void prepare_tile(const typename CT::T* const* raw, int n, float* kbuf, const float* zero, const float** kf) {
    avx2::prepare_tile<CT>(raw, n, kbuf, zero, kf);
  }
  template <class CT>
  static void scores(const float* q, int rows, const typename CT::T* const*, const float* const* kf, float,
                     float* s, Prefetcher& pf) {
    for_row_blocks<kScoreRB>(rows, [&](auto rb, int r) {
      score_rows<decltype(rb)::value>(q + r * kHeadDim, kf, s + r * kScoreStride, pf);
    });
  }
  static void softmax_row(const float* s, int visible, float* max, float* sum, float* p, float* corr) {
    avx2::softmax_row(s, visible, max, sum, p, corr);
  }
  static void pv(const float* p, const float* corr, const float* const* vf, int n, int rows, float* acc,
                 Prefetcher& pf) {
    avx512::pv(p, corr, vf, n, rows, acc, pf);
  }
};

}  // namespace avx512f32

// fp8 e4m3 caches (the same "avx512bf16" kernel name), on CPUs that also have AVX512-VBMI:
// each tile's rows are widened once to bf16 by table (exact, value / 256, see kFp8TileScale)
// into the per-thread buffer, where every query row block meets them.
//   * scores: vdpbf16ps on those rows. The glue hands an fp8 cache an fp32 query; it is
//     split into up to three bf16 parts (exact, fp32x32_to_bf16_parts3) and each row keeps
//     how many it needs: one when every value is a bf16 number (the usual case: a bf16
//     model's query, widened by the glue), so such a query costs what it costs a bf16 cache.
//   * P.V reads the same bf16 rows, no fp32 copy: 32 bf16 loaded as 16 dwords give the 16
//     even columns (x << 16) and the 16 odd ones (x & 0xffff0000) as fp32 with one integer
//     op each, so the accumulators hold each 32 columns as [16 even | 16 odd]; `finish`
//     restores the natural order once per item (the AVX2 bf16 kernel's trick, 512 bits wide).
// Own target region: vpermi2b must not leak into the bf16 / fp32 kernels above, which also
// run on Cooper Lake (AVX512_BF16 without VBMI).
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vbmi")

#include "avx512_bf16_conversions.h"

namespace avx512fp8 {

// A prepared query row: its hi, mid and lo bf16 parts (576 values each), then the number of
// parts it needs in a 64-byte slot of its own.
constexpr int kQRow = 3 * kHeadDim + 32;
constexpr int kPartsSlot = 3 * kHeadDim;
constexpr int kPvRB = 4;     // 16 accumulators + 4 widened value vectors + 1 broadcast + the mask
constexpr int kPvCols = 64;  // two groups of 32 columns (16 even + 16 odd) per block

void load_q(const DecodeParams& p, int32_t seq, int32_t row_begin, int32_t rows, uint16_t* q) {
  for (int32_t r = 0; r < rows; ++r) {
    const QueryRow<float> src = query_row<float>(p, seq, row_begin + r);
    uint16_t* hi = q + static_cast<int64_t>(r) * kQRow;
    uint16_t* mid = hi + kHeadDim;
    uint16_t* lo = mid + kHeadDim;
    for (int d = 0; d < kLatentDim; d += 32) fp32x32_to_bf16_parts3(src.nope + d, hi + d, mid + d, lo + d);
    for (int d = 0; d < kRopeDim; d += 32)
      fp32x32_to_bf16_parts3(src.pe + d, hi + kLatentDim + d, mid + kLatentDim + d, lo + kLatentDim + d);
    unsigned mid_bits = 0, lo_bits = 0;  // magnitudes only: a -0 part adds nothing
    for (int d = 0; d < kHeadDim; ++d) {
      mid_bits |= mid[d] & 0x7fffu;
      lo_bits |= lo[d] & 0x7fffu;
    }
    hi[kPartsSlot] = static_cast<uint16_t>(lo_bits != 0 ? 3 : mid_bits != 0 ? 2 : 1);
  }
}

// kb[i] = tile row i as 576 bf16 values in kbuf ([16, 576] bf16, 18 KiB); padding -> zero.
void prepare_tile(const uint8_t* const* raw, int n, float* kbuf, const float* zero, const uint16_t** kb) {
  uint16_t* buf = reinterpret_cast<uint16_t*>(kbuf);
  for (int i = 0; i < n; ++i) {
    uint16_t* dst = buf + i * kHeadDim;
    for (int d = 0; d < kHeadDim; d += 64) fp8x64_to_bf16(raw[i] + d, dst + d);
    kb[i] = dst;
  }
  for (int i = n; i < kKeyTile; ++i) kb[i] = reinterpret_cast<const uint16_t*>(zero);
}

void scores(const uint16_t* q, int rows, const uint16_t* const* kb, float s2scale, float* s, Prefetcher& pf) {
  for_row_blocks<avx512::kScoreRB>(rows, [&](auto rb, int r) {
    constexpr int RB = decltype(rb)::value;
    const uint16_t* qr = q + static_cast<int64_t>(r) * kQRow;
    int parts = 1;
    for (int i = 0; i < RB; ++i) parts = qr[i * kQRow + kPartsSlot] > parts ? qr[i * kQRow + kPartsSlot] : parts;
    float* sr = s + r * kScoreStride;
    if (parts == 1) avx512::score_rows<RB, 1, kQRow>(qr, kb, s2scale, sr, pf);
    else if (parts == 2) avx512::score_rows<RB, 2, kQRow>(qr, kb, s2scale, sr, pf);
    else avx512::score_rows<RB, 3, kQRow>(qr, kb, s2scale, sr, pf);
  });
}

// acc[i][c0 .. c0 + 64) (held as [even | odd] per 32 columns) = corr_i acc + sum_t p[i][t] v_t.
template <int RB>
inline void pv_block(const float* p, const float* corr, const uint16_t* const* vb, int n, float* acc, int c0) {
  __m512 a[RB][4];
  MLA_UNROLL
  for (int i = 0; i < RB; ++i) {
    const __m512 c = _mm512_set1_ps(corr[i]);
    MLA_UNROLL
    for (int w = 0; w < 4; ++w) a[i][w] = _mm512_mul_ps(_mm512_loadu_ps(acc + i * kLatentDim + c0 + 16 * w), c);
  }
  const __m512i high = _mm512_set1_epi32(static_cast<int>(0xffff0000u));
  // Pointer walks only (see avx2::pv_block: -fwrapv and int indices spill the accumulators).
  const uint16_t* const* const vend = vb + n;
  for (const uint16_t* const* vp = vb; vp != vend; ++vp, ++p) {
    const __m512i x0 = _mm512_loadu_si512(*vp + c0), x1 = _mm512_loadu_si512(*vp + c0 + 32);
    const __m512 v[4] = {_mm512_castsi512_ps(_mm512_slli_epi32(x0, 16)), _mm512_castsi512_ps(_mm512_and_si512(x0, high)),
                         _mm512_castsi512_ps(_mm512_slli_epi32(x1, 16)), _mm512_castsi512_ps(_mm512_and_si512(x1, high))};
    MLA_UNROLL
    for (int i = 0; i < RB; ++i) {
      const __m512 pb = _mm512_set1_ps(p[i * kScoreStride]);
      MLA_UNROLL
      for (int w = 0; w < 4; ++w) a[i][w] = _mm512_fmadd_ps(pb, v[w], a[i][w]);
    }
  }
  MLA_UNROLL
  for (int i = 0; i < RB; ++i)
    MLA_UNROLL
    for (int w = 0; w < 4; ++w) _mm512_storeu_ps(acc + i * kLatentDim + c0 + 16 * w, a[i][w]);
}

void pv(const float* p, const float* corr, const uint16_t* const* vb, int n, int rows, float* acc, Prefetcher& pf) {
  for_row_blocks<kPvRB>(rows, [&](auto rb, int r) {
    constexpr int RB = decltype(rb)::value;
    float* ar = acc + static_cast<int64_t>(r) * kLatentDim;
    for (int c0 = 0; c0 < kLatentDim; c0 += kPvCols) {
      pv_block<RB>(p + r * kScoreStride, corr + r, vb, n, ar, c0);
      pf.step();
    }
  });
}

// Per 32 columns [e0 .. e15 | o0 .. o15] -> e0 o0 e1 o1 ... e15 o15.
void finish(float* acc, int rows) {
  const __m512i first = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i second = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  for (int64_t g = 0; g < static_cast<int64_t>(rows) * kLatentDim; g += 32) {
    const __m512 e = _mm512_loadu_ps(acc + g), o = _mm512_loadu_ps(acc + g + 16);
    _mm512_storeu_ps(acc + g, _mm512_permutex2var_ps(e, first, o));
    _mm512_storeu_ps(acc + g + 16, _mm512_permutex2var_ps(e, second, o));
  }
}

// The kernel interface of decode_tile_loop.h (instantiated for CacheFP8 only).
struct Kernel {
  using QElt = uint16_t;
  static constexpr int kQStride = kQRow;
  template <class CT>
  using TileT = uint16_t;
  static int prefetch_steps(int rows) {
    return register_block_steps(rows, avx512::kScoreRB, avx512::kScoreKB, kPvRB, kPvCols);
  }
  template <class CT>
  static void load_q(const DecodeParams& p, int32_t seq, int32_t r0, int32_t rows, float, uint16_t* q) {
    static_assert(CT::kType == DType::kFloat8E4M3, "fp8 only");
    avx512fp8::load_q(p, seq, r0, rows, q);
  }
  template <class CT>
  static void prepare_tile(const uint8_t* const* raw, int n, float* kbuf, const float* zero, const uint16_t** kb) {
    avx512fp8::prepare_tile(raw, n, kbuf, zero, kb);
  }
  template <class CT>
  static void scores(const uint16_t* q, int rows, const uint8_t* const*, const uint16_t* const* kb, float s2scale,
                     float* s, Prefetcher& pf) {
    avx512fp8::scores(q, rows, kb, s2scale, s, pf);
  }
  static void softmax_row(const float* s, int visible, float* max, float* sum, float* p, float* corr) {
    avx2::softmax_row(s, visible, max, sum, p, corr);
  }
  static void pv(const float* p, const float* corr, const uint16_t* const* vb, int n, int rows, float* acc,
                 Prefetcher& pf) {
    avx512fp8::pv(p, corr, vb, n, rows, acc, pf);
  }
  template <class CT>
  static void finish(float* acc, int rows) {
    avx512fp8::finish(acc, rows);
  }
};

}  // namespace avx512fp8

void avx512_fp8_run_item(const DecodeParams& p, const DecodeItem& it, PartialOut out, void* scratch) {
  run_item_impl<avx512fp8::Kernel, CacheFP8>(p, it, out, scratch);
}

#pragma GCC pop_options

// fp8 needs AVX512-VBMI on top of what selected this kernel (decode.cpp checks avx512_bf16).
bool avx512_supports(DType t) {
  return t == DType::kBFloat16 || t == DType::kFloat16 || t == DType::kFloat32 ||
         (t == DType::kFloat8E4M3 && cpu_features().avx512_bf16_vbmi);
}

const char* avx512_name(DType t) {
  return t == DType::kBFloat16 || t == DType::kFloat8E4M3 ? "avx512bf16" : "avx512-fp32";
}

size_t avx512_scratch_bytes(int32_t max_rows) {
  const size_t a = scratch_bytes_impl<avx512::Kernel>(max_rows), b = scratch_bytes_impl<avx512f32::Kernel>(max_rows),
               c = scratch_bytes_impl<avx512fp8::Kernel>(max_rows);
  return a > b ? (a > c ? a : c) : (b > c ? b : c);
}

void avx512_run_item(const DecodeParams& p, const DecodeItem& it, PartialOut out, void* scratch) {
  switch (p.cache_dtype) {
    case DType::kBFloat16: run_item_impl<avx512::Kernel, CacheBF16>(p, it, out, scratch); break;
    case DType::kFloat8E4M3: avx512_fp8_run_item(p, it, out, scratch); break;
    case DType::kFloat16: run_item_impl<avx512f32::Kernel, CacheF16>(p, it, out, scratch); break;
    default: run_item_impl<avx512f32::Kernel, CacheF32>(p, it, out, scratch); break;
  }
}

}  // namespace
}  // namespace mla::cpu

#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif

namespace mla::cpu {

const DecodeIsa* decode_isa_avx512bf16() {
#ifdef MLA_HAVE_AVX512BF16_KERNEL
  static const DecodeIsa isa{&avx512_name, &avx512_supports, &avx512_scratch_bytes, &avx512_run_item};
  return &isa;
#else
  return nullptr;
#endif
}

}  // namespace mla::cpu
