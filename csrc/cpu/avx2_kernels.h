// AVX2 + FMA (+ F16C) micro-kernels of the CPU decode.
//
// Included INSIDE `namespace mla::cpu { namespace {` after a `#pragma GCC target` that
// enables at least "avx2,fma,f16c" (decode_avx2.cpp, and decode_avx512.cpp which reuses
// the softmax and the fp16/fp32 paths). No includes here: <immintrin.h> comes first.
//
// Register budget (16 ymm registers):
//   score block  kScoreRB query rows x kScoreKB keys: RB*KB accumulators + KB key vectors
//                + 1 query vector, each accumulator a partial dot product over 8 lanes of
//                the 576 columns, reduced horizontally at the end.
//   PV block     kPvRB rows x kPvW vectors (8*W output columns): RB*W accumulators + W value
//                vectors + 1 broadcast probability; the accumulator block is loaded (and
//                rescaled by corr) once per tile and stored once per tile.

#ifndef MLA_SCORE_RB
#define MLA_SCORE_RB 3
#endif
#ifndef MLA_SCORE_KB
#define MLA_SCORE_KB 4
#endif
#ifndef MLA_PV_RB
#define MLA_PV_RB 4
#endif
#ifndef MLA_PV_W
#define MLA_PV_W 2
#endif

namespace avx2 {

constexpr int kScoreRB = MLA_SCORE_RB;
constexpr int kScoreKB = MLA_SCORE_KB;
constexpr int kPvRB = MLA_PV_RB;
constexpr int kPvW = MLA_PV_W;
static_assert(kKeyTile % kScoreKB == 0 || kKeyTile + kScoreKB <= kPtrSlots, "key blocks must stay in the pointer slots");
static_assert(kLatentDim % (8 * kPvW) == 0, "PV column chunks must divide 512");

// ---------------------------------------------------------------- conversions

inline __m256 load8_bf16(const uint16_t* src) {
  const __m128i x = _mm_loadu_si128(reinterpret_cast<const __m128i*>(src));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(x), 16));
}
inline __m256 load8_f16(const uint16_t* src) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(src)));
}
template <class CT>
inline __m256 load8(const typename CT::T* src) {
  if constexpr (CT::kType == DType::kFloat32) return _mm256_loadu_ps(src);
  else if constexpr (CT::kType == DType::kFloat16) return load8_f16(src);
  else {
    // fp8 tiles go to the bf16 kernel (avx2_bf16::fp8x16_to_bf16), never through here.
    static_assert(CT::kType == DType::kBFloat16, "fp32, fp16 or bf16 elements only");
    return load8_bf16(src);
  }
}

// ---------------------------------------------------------------- reductions, exp2

inline float hsum(__m256 v) {
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  x = _mm_add_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}
inline float hmax(__m256 v) {
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  x = _mm_max_ss(x, _mm_movehdup_ps(x));
  return _mm_cvtss_f32(x);
}
// [sum a, sum b, sum c, sum d]
inline __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 ab = _mm256_hadd_ps(a, b);  // a01 a23 b01 b23 | a45 a67 b45 b67
  const __m256 cd = _mm256_hadd_ps(c, d);
  const __m256 abcd = _mm256_hadd_ps(ab, cd);  // a0-3 b0-3 c0-3 d0-3 | a4-7 b4-7 c4-7 d4-7
  return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

// 2^x for x <= 0: 2^round(x) through the exponent bits times a degree-6 polynomial of the
// fraction f in [-0.5, 0.5] (Taylor series of e^(f ln 2); relative error ~1.2e-7).
// x below -126 gives ~2^-126 (callers zero the masked lanes); NaN stays NaN.
inline __m256 exp2_ps(__m256 x) {
  x = _mm256_max_ps(_mm256_set1_ps(-126.f), x);  // operand order: a NaN x is returned as is
  const __m256 xi = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 f = _mm256_sub_ps(x, xi);
  __m256 y = _mm256_set1_ps(1.5403530393381608e-4f);
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.3333558146428443e-3f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(9.6181291076284772e-3f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(5.5504108664821580e-2f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(2.4022650695910071e-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(6.9314718055994531e-1f));
  y = _mm256_fmadd_ps(y, f, _mm256_set1_ps(1.f));
  const __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(xi), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

// ---------------------------------------------------------------- query, tile

// q rows in fp32, pre-multiplied by softmax_scale * log2(e): [rows, 576].
template <class CT>
void load_q(const DecodeParams& p, int32_t seq, int32_t row_begin, int32_t rows, float s2scale, float* q) {
  using QC = typename CT::Q;
  const __m256 sc = _mm256_set1_ps(s2scale);
  for (int32_t r = 0; r < rows; ++r) {
    const QueryRow<typename QC::T> src = query_row<typename QC::T>(p, seq, row_begin + r);
    float* dst = q + static_cast<int64_t>(r) * kHeadDim;
    for (int d = 0; d < kLatentDim; d += 8) _mm256_storeu_ps(dst + d, _mm256_mul_ps(load8<QC>(src.nope + d), sc));
    for (int d = 0; d < kRopeDim; d += 8)
      _mm256_storeu_ps(dst + kLatentDim + d, _mm256_mul_ps(load8<QC>(src.pe + d), sc));
  }
}

// fp32 rows of the tile: an fp32 cache is used in place; bf16 / fp16 rows are widened once
// into kbuf ([16, 576], 36 KiB) and then serve all query rows, as K and as V.
template <class CT>
void prepare_tile(const typename CT::T* const* raw, int n, float* kbuf, const float* zero, const float** kf) {
  if constexpr (CT::kType == DType::kFloat32) {
    for (int i = 0; i < kKeyTile; ++i) kf[i] = raw[i];  // padding rows already point at `zero`
  } else {
    for (int i = 0; i < n; ++i) {
      const typename CT::T* src = raw[i];
      float* dst = kbuf + i * kHeadDim;
      for (int d = 0; d < kHeadDim; d += 32) {
        _mm256_storeu_ps(dst + d, load8<CT>(src + d));
        _mm256_storeu_ps(dst + d + 8, load8<CT>(src + d + 8));
        _mm256_storeu_ps(dst + d + 16, load8<CT>(src + d + 16));
        _mm256_storeu_ps(dst + d + 24, load8<CT>(src + d + 24));
      }
      kf[i] = dst;
    }
    for (int i = n; i < kKeyTile; ++i) kf[i] = zero;
  }
}

// ---------------------------------------------------------------- score GEMM

// s[i][j] = q_i . k_j for RB query rows x KB keys, over all 576 columns.
template <int RB, int KB>
inline void score_block(const float* q, const float* const* kf, float* s) {
  __m256 acc[RB][KB];
  MLA_UNROLL
  for (int i = 0; i < RB; ++i)
    MLA_UNROLL
    for (int j = 0; j < KB; ++j) acc[i][j] = _mm256_setzero_ps();
  const float* k[KB];
  MLA_UNROLL
  for (int j = 0; j < KB; ++j) k[j] = kf[j];
  for (int d = 0; d < kHeadDim; d += 8) {
    __m256 kv[KB];
    MLA_UNROLL
    for (int j = 0; j < KB; ++j) kv[j] = _mm256_loadu_ps(k[j] + d);
    MLA_UNROLL
    for (int i = 0; i < RB; ++i) {
      const __m256 qv = _mm256_loadu_ps(q + i * kHeadDim + d);
      MLA_UNROLL
      for (int j = 0; j < KB; ++j) acc[i][j] = _mm256_fmadd_ps(qv, kv[j], acc[i][j]);
    }
  }
  MLA_UNROLL
  for (int i = 0; i < RB; ++i) {
    if constexpr (KB == 4) {
      _mm_storeu_ps(s + i * kScoreStride, hsum4(acc[i][0], acc[i][1], acc[i][2], acc[i][3]));
    } else {
      MLA_UNROLL
      for (int j = 0; j < KB; ++j) s[i * kScoreStride + j] = hsum(acc[i][j]);
    }
  }
}

template <int RB>
inline void score_rows(const float* q, const float* const* kf, float* s, Prefetcher& pf) {
  for (int j0 = 0; j0 < kKeyTile; j0 += kScoreKB) {
    score_block<RB, kScoreKB>(q, kf + j0, s + j0);
    pf.step();
  }
}

template <class CT>
void scores(const float* q, int rows, const typename CT::T* const* /*raw*/, const float* const* kf,
            float /*s2scale: folded into q*/, float* s, Prefetcher& pf) {
  for_row_blocks<kScoreRB>(rows, [&](auto rb, int r) {
    score_rows<decltype(rb)::value>(q + r * kHeadDim, kf, s + r * kScoreStride, pf);
  });
}

// ---------------------------------------------------------------- online softmax

// One query row of one tile: keys >= visible are masked. Updates the running max / sum,
// writes the probabilities p[0..16) (zero where masked) and corr = 2^(old max - new max).
inline void softmax_row(const float* s, int visible, float* max, float* sum, float* p, float* corr) {
  static_assert(kKeyTile == 16, "softmax_row handles a tile as two vectors");
  if (visible <= 0) {  // the row sees none of this tile (causal): leave its state alone
    _mm256_storeu_ps(p, _mm256_setzero_ps());
    _mm256_storeu_ps(p + 8, _mm256_setzero_ps());
    *corr = 1.f;
    return;
  }
  const __m256 idx0 = _mm256_setr_ps(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256 idx1 = _mm256_setr_ps(8, 9, 10, 11, 12, 13, 14, 15);
  const __m256 vis = _mm256_set1_ps(static_cast<float>(visible));
  const __m256 keep0 = _mm256_cmp_ps(idx0, vis, _CMP_LT_OQ);
  const __m256 keep1 = _mm256_cmp_ps(idx1, vis, _CMP_LT_OQ);
  const __m256 ninf = _mm256_set1_ps(-__builtin_inff());
  const __m256 s0 = _mm256_blendv_ps(ninf, _mm256_loadu_ps(s), keep0);
  const __m256 s1 = _mm256_blendv_ps(ninf, _mm256_loadu_ps(s + 8), keep1);
  const float tile_max = hmax(_mm256_max_ps(s0, s1));
  const float old_max = *max;
  const float new_max = old_max > tile_max ? old_max : tile_max;
  const float c = __builtin_exp2f(old_max - new_max);  // 0 on the first visible tile (old = -inf)
  const __m256 m = _mm256_set1_ps(new_max);
  const __m256 p0 = _mm256_and_ps(exp2_ps(_mm256_sub_ps(s0, m)), keep0);
  const __m256 p1 = _mm256_and_ps(exp2_ps(_mm256_sub_ps(s1, m)), keep1);
  _mm256_storeu_ps(p, p0);
  _mm256_storeu_ps(p + 8, p1);
  *sum = *sum * c + hsum(_mm256_add_ps(p0, p1));
  *max = new_max;
  *corr = c;
}

// ---------------------------------------------------------------- PV GEMM

// acc[i][c0 .. c0 + 8W) = corr_i * acc + sum_t p[i][t] * v_t[c0 ..], RB rows.
template <int RB, int W>
inline void pv_block(const float* p, const float* corr, const float* const* vf, int n, float* acc, int c0) {
  // Pointer / int64 arithmetic only: with int indices and -fwrapv (in Python's CFLAGS,
  // hence in every torch extension build) GCC keeps the accumulators on the stack.
  __m256 a[RB][W];
  float* out = acc + c0;
  MLA_UNROLL
  for (int i = 0; i < RB; ++i) {
    const __m256 c = _mm256_set1_ps(corr[i]);
    MLA_UNROLL
    for (int w = 0; w < W; ++w) a[i][w] = _mm256_mul_ps(_mm256_loadu_ps(out + i * kLatentDim + 8 * w), c);
  }
  const float* const* const vend = vf + n;
  for (const float* const* vp = vf; vp != vend; ++vp, ++p) {
    const float* v = *vp + c0;
    __m256 vv[W];
    MLA_UNROLL
    for (int w = 0; w < W; ++w) vv[w] = _mm256_loadu_ps(v + 8 * w);
    MLA_UNROLL
    for (int i = 0; i < RB; ++i) {
      const __m256 pb = _mm256_broadcast_ss(p + i * kScoreStride);
      MLA_UNROLL
      for (int w = 0; w < W; ++w) a[i][w] = _mm256_fmadd_ps(pb, vv[w], a[i][w]);
    }
  }
  MLA_UNROLL
  for (int i = 0; i < RB; ++i)
    MLA_UNROLL
    for (int w = 0; w < W; ++w) _mm256_storeu_ps(out + i * kLatentDim + 8 * w, a[i][w]);
}

template <int RB>
inline void pv_rows(const float* p, const float* corr, const float* const* vf, int n, float* acc, Prefetcher& pf) {
  for (int c0 = 0; c0 < kLatentDim; c0 += 8 * kPvW) {
    pv_block<RB, kPvW>(p, corr, vf, n, acc, c0);
    pf.step();
  }
}

inline void pv(const float* p, const float* corr, const float* const* vf, int n, int rows, float* acc,
               Prefetcher& pf) {
  for_row_blocks<kPvRB>(rows, [&](auto rb, int r) {
    pv_rows<decltype(rb)::value>(p + r * kScoreStride, corr + r, vf, n, acc + static_cast<int64_t>(r) * kLatentDim, pf);
  });
}

// The kernel interface of decode_tile_loop.h.
struct Kernel : KernelDefaults {
  using QElt = float;
  static constexpr int kQStride = kHeadDim;
  static int prefetch_steps(int rows) { return register_block_steps(rows, kScoreRB, kScoreKB, kPvRB, 8 * kPvW); }
  template <class CT>
  static void load_q(const DecodeParams& p, int32_t seq, int32_t r0, int32_t rows, float s2scale, float* q) {
    avx2::load_q<CT>(p, seq, r0, rows, s2scale, q);
  }
  template <class CT>
  static void prepare_tile(const typename CT::T* const* raw, int n, float* kbuf, const float* zero, const float** kf) {
    avx2::prepare_tile<CT>(raw, n, kbuf, zero, kf);
  }
  template <class CT>
  static void scores(const float* q, int rows, const typename CT::T* const* raw, const float* const* kf, float sc,
                     float* s, Prefetcher& pf) {
    avx2::scores<CT>(q, rows, raw, kf, sc, s, pf);
  }
  static void softmax_row(const float* s, int visible, float* max, float* sum, float* p, float* corr) {
    avx2::softmax_row(s, visible, max, sum, p, corr);
  }
  static void pv(const float* p, const float* corr, const float* const* vf, int n, int rows, float* acc,
                 Prefetcher& pf) {
    avx2::pv(p, corr, vf, n, rows, acc, pf);
  }
};

}  // namespace avx2
