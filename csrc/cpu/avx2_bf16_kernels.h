// AVX2 + FMA micro-kernels that read bf16 tile rows directly (no fp32 copy of the tile).
//
// Included INSIDE `namespace mla::cpu { namespace {` after avx2_kernels.h (it reuses its
// query loader's conversions, the softmax and the horizontal sums).
//
// Why: the fp32 tile of the generic AVX2 kernel is 36 KiB, more than Zen 3's 32 KiB L1D, so
// every key vector of both GEMMs came from L2, and the widening pass itself cost ~20% of
// the time. A bf16 tile is 18 KiB and stays in L1 while all query rows use it.
//
// The trick: 16 bf16 values loaded as 8 32-bit lanes hold element 2k in the low half and
// element 2k+1 in the high half of lane k. `x << 16` is the even elements as fp32 and
// `x & 0xffff0000` the odd ones: two single-uop integer ops (which Zen / Intel schedule on
// ports the FMAs leave free) instead of a widening shuffle. A dot product does not care
// about the order of its terms, so the query is stored de-interleaved the same way (per
// 16 columns: the 8 even ones, then the 8 odd ones), and the PV accumulators hold their
// columns in that order too; `finish` restores the natural order once per item.
//
// fp8 caches use the same kernels: prepare_tile widens the e4m3 tile to bf16 (exact: 3
// mantissa bits, and value / 256 stays in bf16's normal range) into the per-thread buffer.

#ifndef MLA_BF16_SCORE_RB
#define MLA_BF16_SCORE_RB 2
#endif
#ifndef MLA_BF16_SCORE_KB
#define MLA_BF16_SCORE_KB 4
#endif
#ifndef MLA_BF16_PV_RB
#define MLA_BF16_PV_RB 6
#endif

namespace avx2_bf16 {

constexpr int kScoreRB = MLA_BF16_SCORE_RB;  // RB*KB accumulators + 2*RB query vectors + 2 temporaries
constexpr int kScoreKB = MLA_BF16_SCORE_KB;
constexpr int kPvRB = MLA_BF16_PV_RB;        // 2*RB accumulators + raw / even / odd + 1 broadcast
constexpr int kGroup = 16;                   // columns per de-interleaved group (one 32-byte bf16 load)
static_assert(kKeyTile % kScoreKB == 0, "key blocks must divide the tile");

inline __m256 even_lanes(__m256i x) { return _mm256_castsi256_ps(_mm256_slli_epi32(x, 16)); }
inline __m256 odd_lanes(__m256i x, __m256i high_mask) { return _mm256_castsi256_ps(_mm256_and_si256(x, high_mask)); }
inline __m256i load_bf16x16(const uint16_t* src) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src)); }

// q rows in fp32, times s2scale, de-interleaved per 16 columns: [rows, 576].
template <class CT>
void load_q(const DecodeParams& p, int32_t seq, int32_t row_begin, int32_t rows, float s2scale, float* q) {
  avx2::load_q<CT>(p, seq, row_begin, rows, s2scale, q);  // natural order first
  const __m256i even_idx = _mm256_setr_epi32(0, 2, 4, 6, 0, 2, 4, 6);
  const __m256i odd_idx = _mm256_setr_epi32(1, 3, 5, 7, 1, 3, 5, 7);
  for (int64_t g = 0; g < static_cast<int64_t>(rows) * kHeadDim; g += kGroup) {
    const __m256 a = _mm256_loadu_ps(q + g), b = _mm256_loadu_ps(q + g + 8);
    // even: a0 a2 a4 a6 b0 b2 b4 b6 (permutevar8x32 within each source, then 128-bit blend)
    const __m256 ae = _mm256_permutevar8x32_ps(a, even_idx), be = _mm256_permutevar8x32_ps(b, even_idx);
    const __m256 ao = _mm256_permutevar8x32_ps(a, odd_idx), bo = _mm256_permutevar8x32_ps(b, odd_idx);
    _mm256_storeu_ps(q + g, _mm256_blend_ps(ae, be, 0xf0));
    _mm256_storeu_ps(q + g + 8, _mm256_blend_ps(ao, bo, 0xf0));
  }
}

// 16 e4m3fn codes -> the bf16 bits of (value / 256), exactly (see kFp8TileScale), with
// integer ops only. Code = sign | e (4 bits) | m (3 bits), magnitude = code & 0x7f:
//   e > 0 : 2^(e-7) (1 + m/8) / 256 -> bf16 exponent e - 15 + 127, mantissa m in its top
//           3 bits: bits = (magnitude << 4) + (112 << 7);
//   e = 0 : m 2^-9 / 256 = m 2^-17, a normal bf16: 8 values, looked up with vpshufb;
//   0x7f  : NaN.
inline __m256i fp8x16_to_bf16(const uint8_t* src) {
  const __m256i x = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
  const __m256i mag = _mm256_and_si256(x, _mm256_set1_epi16(0x7f));
  const __m256i sign = _mm256_slli_epi16(_mm256_and_si256(x, _mm256_set1_epi16(0x80)), 8);
  const __m256i normal = _mm256_add_epi16(_mm256_slli_epi16(mag, 4), _mm256_set1_epi16(112 << 7));
  // bf16 of m 2^-17 for m = 0..7, split in low and high bytes (vpshufb looks up bytes; the
  // zero high byte of each 16-bit index picks entry 0 = 0 for the other half).
  const __m256i lut_lo = _mm256_setr_epi8(0x00, 0x00, static_cast<char>(0x80), static_cast<char>(0xc0), 0x00, 0x20,
                                          0x40, 0x60, 0, 0, 0, 0, 0, 0, 0, 0, 0x00, 0x00, static_cast<char>(0x80),
                                          static_cast<char>(0xc0), 0x00, 0x20, 0x40, 0x60, 0, 0, 0, 0, 0, 0, 0, 0);
  const __m256i lut_hi = _mm256_setr_epi8(0x00, 0x37, 0x37, 0x37, 0x38, 0x38, 0x38, 0x38, 0, 0, 0, 0, 0, 0, 0, 0,
                                          0x00, 0x37, 0x37, 0x37, 0x38, 0x38, 0x38, 0x38, 0, 0, 0, 0, 0, 0, 0, 0);
  const __m256i sub = _mm256_or_si256(_mm256_shuffle_epi8(lut_lo, mag),
                                      _mm256_slli_epi16(_mm256_shuffle_epi8(lut_hi, mag), 8));
  __m256i r = _mm256_blendv_epi8(normal, sub, _mm256_cmpgt_epi16(_mm256_set1_epi16(8), mag));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi16(0x7fc0), _mm256_cmpeq_epi16(mag, _mm256_set1_epi16(0x7f)));
  return _mm256_or_si256(r, sign);
}

// bf16 rows are used in place; fp8 rows are widened to bf16 into kbuf ([16, 576] bf16).
template <class CT>
void prepare_tile(const typename CT::T* const* raw, int n, float* kbuf, const float* zero, const uint16_t** kb) {
  if constexpr (CT::kType == DType::kBFloat16) {
    for (int i = 0; i < kKeyTile; ++i) kb[i] = raw[i];  // padding rows already point at `zero`
  } else {
    static_assert(CT::kType == DType::kFloat8E4M3, "bf16 and fp8 caches only");
    uint16_t* buf = reinterpret_cast<uint16_t*>(kbuf);
    for (int i = 0; i < n; ++i) {
      uint16_t* dst = buf + i * kHeadDim;
      for (int d = 0; d < kHeadDim; d += 16)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(dst + d), fp8x16_to_bf16(raw[i] + d));
      kb[i] = dst;
    }
    for (int i = n; i < kKeyTile; ++i) kb[i] = reinterpret_cast<const uint16_t*>(zero);
  }
}

// s[i][j] = q_i . k_j for RB query rows x KB keys over all 576 columns.
template <int RB, int KB>
inline void score_block(const float* q, const uint16_t* const* kb, float* s) {
  __m256 acc[RB][KB];
  MLA_UNROLL
  for (int i = 0; i < RB; ++i)
    MLA_UNROLL
    for (int j = 0; j < KB; ++j) acc[i][j] = _mm256_setzero_ps();
  const uint16_t* k[KB];
  MLA_UNROLL
  for (int j = 0; j < KB; ++j) k[j] = kb[j];
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  for (int d = 0; d < kHeadDim; d += kGroup) {
    __m256 qe[RB], qo[RB];
    MLA_UNROLL
    for (int i = 0; i < RB; ++i) {
      qe[i] = _mm256_loadu_ps(q + i * kHeadDim + d);
      qo[i] = _mm256_loadu_ps(q + i * kHeadDim + d + 8);
    }
    MLA_UNROLL
    for (int j = 0; j < KB; ++j) {
      const __m256i x = load_bf16x16(k[j] + d);
      const __m256 e = even_lanes(x);
      MLA_UNROLL
      for (int i = 0; i < RB; ++i) acc[i][j] = _mm256_fmadd_ps(qe[i], e, acc[i][j]);
      const __m256 o = odd_lanes(x, high);
      MLA_UNROLL
      for (int i = 0; i < RB; ++i) acc[i][j] = _mm256_fmadd_ps(qo[i], o, acc[i][j]);
    }
  }
  MLA_UNROLL
  for (int i = 0; i < RB; ++i) {
    if constexpr (KB == 4) {
      _mm_storeu_ps(s + i * kScoreStride, avx2::hsum4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]));
    } else {
      MLA_UNROLL
      for (int j = 0; j < KB; ++j) s[i * kScoreStride + j] = avx2::hsum(acc[i][j]);
    }
  }
}

template <int RB>
inline void score_rows(const float* q, const uint16_t* const* kb, float* s, Prefetcher& pf) {
  for (int j0 = 0; j0 < kKeyTile; j0 += kScoreKB) {
    score_block<RB, kScoreKB>(q, kb + j0, s + j0);
    pf.step();
  }
}

template <class CT>
void scores(const float* q, int rows, const typename CT::T* const* /*raw*/, const uint16_t* const* kb,
            float /*s2scale: folded into q*/, float* s, Prefetcher& pf) {
  for_row_blocks<kScoreRB>(rows, [&](auto rb, int r) {
    score_rows<decltype(rb)::value>(q + r * kHeadDim, kb, s + r * kScoreStride, pf);
  });
}

// acc[i][c0 .. c0 + 16) = corr_i * acc + sum_t p[i][t] * v_t[c0 ..] for RB rows, with the
// 16 columns held de-interleaved (8 even, 8 odd).
template <int RB>
inline void pv_block(const float* p, const float* corr, const uint16_t* const* vb, int n, float* acc, int c0) {
  __m256 ae[RB], ao[RB];
  float* out = acc + c0;
  MLA_UNROLL
  for (int i = 0; i < RB; ++i) {
    const __m256 c = _mm256_set1_ps(corr[i]);
    ae[i] = _mm256_mul_ps(_mm256_loadu_ps(out + i * kLatentDim), c);
    ao[i] = _mm256_mul_ps(_mm256_loadu_ps(out + i * kLatentDim + 8), c);
  }
  const __m256i high = _mm256_set1_epi32(static_cast<int>(0xffff0000u));
  // Pointer walks only (see avx2::pv_block: -fwrapv and int indices spill the accumulators).
  const uint16_t* const* const vend = vb + n;
  for (const uint16_t* const* vp = vb; vp != vend; ++vp, ++p) {
    const __m256i x = load_bf16x16(*vp + c0);
    const __m256 e = even_lanes(x), o = odd_lanes(x, high);
    MLA_UNROLL
    for (int i = 0; i < RB; ++i) {
      const __m256 pb = _mm256_broadcast_ss(p + i * kScoreStride);
      ae[i] = _mm256_fmadd_ps(pb, e, ae[i]);
      ao[i] = _mm256_fmadd_ps(pb, o, ao[i]);
    }
  }
  MLA_UNROLL
  for (int i = 0; i < RB; ++i) {
    _mm256_storeu_ps(out + i * kLatentDim, ae[i]);
    _mm256_storeu_ps(out + i * kLatentDim + 8, ao[i]);
  }
}

template <int RB>
inline void pv_rows(const float* p, const float* corr, const uint16_t* const* vb, int n, float* acc, Prefetcher& pf) {
  for (int c0 = 0; c0 < kLatentDim; c0 += kGroup) {
    pv_block<RB>(p, corr, vb, n, acc, c0);
    pf.step();
  }
}

inline void pv(const float* p, const float* corr, const uint16_t* const* vb, int n, int rows, float* acc,
               Prefetcher& pf) {
  for_row_blocks<kPvRB>(rows, [&](auto rb, int r) {
    pv_rows<decltype(rb)::value>(p + r * kScoreStride, corr + r, vb, n, acc + static_cast<int64_t>(r) * kLatentDim, pf);
  });
}

// The accumulators back in natural column order: per 16 columns [e0..e7 | o0..o7] ->
// e0 o0 e1 o1 ... e7 o7.
inline void finish(float* acc, int rows) {
  for (int64_t g = 0; g < static_cast<int64_t>(rows) * kLatentDim; g += kGroup) {
    const __m256 e = _mm256_loadu_ps(acc + g), o = _mm256_loadu_ps(acc + g + 8);
    const __m256 lo = _mm256_unpacklo_ps(e, o);  // e0 o0 e1 o1 | e4 o4 e5 o5
    const __m256 hi = _mm256_unpackhi_ps(e, o);  // e2 o2 e3 o3 | e6 o6 e7 o7
    _mm256_storeu_ps(acc + g, _mm256_permute2f128_ps(lo, hi, 0x20));
    _mm256_storeu_ps(acc + g + 8, _mm256_permute2f128_ps(lo, hi, 0x31));
  }
}

// The kernel interface of decode_tile_loop.h, for bf16 and fp8 caches.
struct Kernel {
  using QElt = float;
  static constexpr int kQStride = kHeadDim;
  template <class CT>
  using TileT = uint16_t;
  template <class CT>
  static void load_q(const DecodeParams& p, int32_t seq, int32_t r0, int32_t rows, float s2scale, float* q) {
    avx2_bf16::load_q<CT>(p, seq, r0, rows, s2scale, q);
  }
  template <class CT>
  static void prepare_tile(const typename CT::T* const* raw, int n, float* kbuf, const float* zero,
                           const uint16_t** kb) {
    avx2_bf16::prepare_tile<CT>(raw, n, kbuf, zero, kb);
  }
  template <class CT>
  static void scores(const float* q, int rows, const typename CT::T* const* raw, const uint16_t* const* kb, float sc,
                     float* s, Prefetcher& pf) {
    avx2_bf16::scores<CT>(q, rows, raw, kb, sc, s, pf);
  }
  static void softmax_row(const float* s, int visible, float* max, float* sum, float* p, float* corr) {
    avx2::softmax_row(s, visible, max, sum, p, corr);
  }
  static void pv(const float* p, const float* corr, const uint16_t* const* vb, int n, int rows, float* acc,
                 Prefetcher& pf) {
    avx2_bf16::pv(p, corr, vb, n, rows, acc, pf);
  }
  template <class CT>
  static void finish(float* acc, int rows) {
    avx2_bf16::finish(acc, rows);
  }
  static int prefetch_steps(int rows) { return register_block_steps(rows, kScoreRB, kScoreKB, kPvRB, kGroup); }
};

}  // namespace avx2_bf16
