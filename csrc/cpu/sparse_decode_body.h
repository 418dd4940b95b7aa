// The sparse decode kernel body (no include guard on purpose): csrc/cpu/sparse_decode.cpp
// includes it twice, once plain (portable) and once under an AVX2 + FMA target pragma,
// each inside its own namespace, so the compiler vectorises the same C++ for both.
// Include only from sparse_decode.cpp, after its headers.

constexpr int kTile = 32;       // tokens dequantised together
constexpr int kHeadGroup = 64;  // at most this many heads share one dequantised tile
constexpr int kScaleOffset = kLatentDim;           // bytes: 4 float32 scales
constexpr int kRopeOffset = kLatentDim + 16;        // bytes: 64 bf16 rope values
constexpr int kQuantTile = 128;
constexpr int kChunk = 32;  // output columns kept in registers by the P . V loop (x 2 heads)
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

// 2^x in plain C++ that the compiler vectorises (no libm call): x = n + f, |f| <= 1/2,
// 2^f by its Taylor series to the 7th power (remainder ~5e-9, below fp32's half ulp),
// 2^n put into the exponent bits. x <= -127 (and -inf) gives 0.
inline float exp2_poly(float x) {
  x = x < -127.f ? -127.f : x;
  const float n = (x + 12582912.f) - 12582912.f;  // round to nearest (|x| < 2^22)
  const float f = x - n;
  float y = 1.525273380405984e-05f;
  y = y * f + 1.5403530393381606e-04f;
  y = y * f + 1.3333558146428443e-03f;
  y = y * f + 9.618129107628477e-03f;
  y = y * f + 5.550410866482158e-02f;
  y = y * f + 2.402265069591007e-01f;
  y = y * f + 6.931471805599453e-01f;
  y = y * f + 1.f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // n = -127: +0
  float pow2n;
  std::memcpy(&pow2n, &bits, sizeof pow2n);
  return y * pow2n;
}

inline float nan_to_zero(float v) { return v != v ? 0.f : v; }

void load_fp8_token(const uint8_t* tok, float* row) {
  const float* table = fp8_e4m3_table().value;
  float scales[4];
  std::memcpy(scales, tok + kScaleOffset, sizeof scales);
  for (int t = 0; t < 4; ++t) {
    const float s = scales[t];
    const uint8_t* codes = tok + t * kQuantTile;
    float* dst = row + t * kQuantTile;
    for (int i = 0; i < kQuantTile; ++i) dst[i] = nan_to_zero(table[codes[i]] * s);
  }
  const uint8_t* rope = tok + kRopeOffset;
  for (int i = 0; i < kRopeDim; ++i) {
    uint16_t bits;
    std::memcpy(&bits, rope + 2 * i, 2);
    const uint32_t wide = static_cast<uint32_t>(bits) << 16;
    float v;
    std::memcpy(&v, &wide, 4);
    row[kLatentDim + i] = nan_to_zero(v);
  }
}

template <typename T>
void load_plain_token(const uint8_t* tok, float* row) {
  const T* src = reinterpret_cast<const T*>(tok);
  for (int i = 0; i < kHeadDim; ++i) row[i] = nan_to_zero(static_cast<float>(src[i]));
}

void load_token(const SparseSource& s, int32_t token, float* row) {
  const uint8_t* tok = sparse_token_ptr(s, token);
  switch (s.dtype) {
    case DType::kFloat8E4M3: load_fp8_token(tok, row); break;
    case DType::kBFloat16: load_plain_token<c10::BFloat16>(tok, row); break;
    case DType::kFloat16: load_plain_token<c10::Half>(tok, row); break;
    case DType::kFloat32: load_plain_token<float>(tok, row); break;
  }
}

// Scores in base 2 (softmax_scale * log2 e folded in), m the running max in base 2.
void run_item(const SparseDecodeParams& p, int64_t bi, int64_t j, int h0, int h1, float* rows, float* kt, float* acc) {
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  const int nh = h1 - h0;
  float m[kHeadGroup], l[kHeadGroup], alpha[kHeadGroup];
  for (int h = 0; h < nh; ++h) { m[h] = kNegInf; l[h] = 0.f; }
  std::fill(acc, acc + static_cast<int64_t>(nh) * kLatentDim, 0.f);
  const float* q_base = p.q + ((bi * p.seqlen_q + j) * p.num_heads) * static_cast<int64_t>(kHeadDim);
  const float s2scale = p.softmax_scale * kLog2e;
  SparseSlotCursor cursor{p, bi, j};
  // Two slot buffers: the next tile's tokens are prefetched while this one is computed.
  const SparseSource* srcs[2][kTile];
  int32_t tokens[2][kTile];
  float sc[kHeadGroup][kTile];  // scores, then weights (0 past n)
  int cur = 0;
  int n = cursor.next(kTile, srcs[0], tokens[0]);
  while (n > 0) {
    const int n_next = cursor.next(kTile, srcs[cur ^ 1], tokens[cur ^ 1]);
    for (int t = 0; t < n_next; ++t) sparse_prefetch_token(*srcs[cur ^ 1][t], tokens[cur ^ 1][t]);
    for (int t = 0; t < n; ++t) load_token(*srcs[cur][t], tokens[cur][t], rows + t * kHeadDim);
    // K^T of the tile, tokens contiguous (columns past n are 0), for the Q . K^T loop below.
    // (d outer: the 32 source lines of a step stay in L1 for the next 15 steps.)
    for (int d = 0; d < kHeadDim; ++d)
      for (int t = 0; t < kTile; ++t) kt[d * kTile + t] = t < n ? rows[t * kHeadDim + d] : 0.f;
    // Scores of two heads at once: each K^T row is loaded once for both.
    for (int hp = 0; hp < nh; hp += 2) {
      const float* qa = q_base + static_cast<int64_t>(h0 + hp) * kHeadDim;
      const float* qb = hp + 1 < nh ? qa + kHeadDim : qa;
      float sa[kTile] = {}, sb[kTile] = {};
      for (int d = 0; d < kHeadDim; ++d) {
        const float xa = qa[d], xb = qb[d];
        const float* kr = kt + d * kTile;
        for (int t = 0; t < kTile; ++t) {
          sa[t] += xa * kr[t];
          sb[t] += xb * kr[t];
        }
      }
      for (int t = 0; t < kTile; ++t) {
        sc[hp][t] = s2scale * sa[t];
        if (hp + 1 < nh) sc[hp + 1][t] = s2scale * sb[t];
      }
    }
    // Online softmax per head: weights into sc, alpha = the rescale of acc. A head whose
    // every score so far is -inf stays empty (weights 0, alpha 1).
    for (int h = 0; h < nh; ++h) {
      float* w = sc[h];
      float tile_max = kNegInf;
      for (int t = 0; t < n; ++t) tile_max = std::max(tile_max, w[t]);
      const float m_new = std::max(m[h], tile_max);
      if (m_new == kNegInf) {
        for (int t = 0; t < kTile; ++t) w[t] = 0.f;
        alpha[h] = 1.f;
        continue;
      }
      alpha[h] = exp2_poly(m[h] - m_new);  // 0 on the first tile (m = -inf)
      float sum = 0.f;
      for (int t = 0; t < n; ++t) {
        w[t] = exp2_poly(w[t] - m_new);
        sum += w[t];
      }
      l[h] = l[h] * alpha[h] + sum;
      m[h] = m_new;
    }
    // acc = acc * alpha + w . V for two heads at a time, kChunk output columns of each kept
    // in registers across the tile's tokens (one load of V per two multiply-adds).
    for (int h = 0; h < nh; h += 2) {
      const int hb = h + 1 < nh ? h + 1 : h;  // an odd last head is computed twice (same values)
      float* a0 = acc + static_cast<int64_t>(h) * kLatentDim;
      float* a1 = acc + static_cast<int64_t>(hb) * kLatentDim;
      const float* w0 = sc[h];
      const float* w1 = sc[hb];
      for (int d0 = 0; d0 < kLatentDim; d0 += kChunk) {
        float r0[kChunk], r1[kChunk];
        for (int k = 0; k < kChunk; ++k) {
          r0[k] = a0[d0 + k] * alpha[h];
          r1[k] = a1[d0 + k] * alpha[hb];
        }
        for (int t = 0; t < n; ++t) {
          const float x0 = w0[t], x1 = w1[t];
          const float* v = rows + t * kHeadDim + d0;
          for (int k = 0; k < kChunk; ++k) {
            r0[k] += x0 * v[k];
            r1[k] += x1 * v[k];
          }
        }
        for (int k = 0; k < kChunk; ++k) a1[d0 + k] = r1[k];
        for (int k = 0; k < kChunk; ++k) a0[d0 + k] = r0[k];
      }
    }
    cur ^= 1;
    n = n_next;
  }
  const int64_t row0 = (bi * p.seqlen_q + j) * p.num_heads + h0;
  for (int h = 0; h < nh; ++h) {
    float* o = p.out + (row0 + h) * kLatentDim;
    if (m[h] == kNegInf) {  // no valid slot, or every valid score -inf: an empty row
      std::fill(o, o + kLatentDim, 0.f);
      p.lse[row0 + h] = std::numeric_limits<float>::infinity();
      continue;
    }
    const float lse = (m[h] + std::log2(l[h])) * kLn2;
    float factor = 1.f / l[h];
    if (p.attn_sink) factor *= 1.f / (1.f + std::exp(p.attn_sink[h0 + h] - lse));
    const float* a = acc + static_cast<int64_t>(h) * kLatentDim;
    for (int d = 0; d < kLatentDim; ++d) o[d] = a[d] * factor;
    p.lse[row0 + h] = lse;
  }
}

void run(const SparseDecodeParams& p) {
  // Head groups: at most kHeadGroup heads, and enough groups that every thread has an item
  // when there are few queries (groups of a multiple of 8 heads).
  const int64_t queries = static_cast<int64_t>(p.batch) * p.seqlen_q;
  const int64_t h = p.num_heads;
  const int64_t threads = at::get_num_threads();
  const int64_t min_groups = (h + kHeadGroup - 1) / kHeadGroup;
  const int64_t want = std::max(min_groups, std::min((threads + queries - 1) / queries, (h + 7) / 8));
  int64_t group = (h + want - 1) / want;
  group = std::min<int64_t>(kHeadGroup, (group + 7) / 8 * 8);
  const int64_t groups = (h + group - 1) / group;
  const int64_t items = queries * groups;
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> rows(static_cast<size_t>(kTile) * kHeadDim);
    std::vector<float> kt(static_cast<size_t>(kTile) * kHeadDim);
    std::vector<float> acc(static_cast<size_t>(kHeadGroup) * kLatentDim);
    for (int64_t it = begin; it < end; ++it) {
      const int64_t g = it % groups, bj = it / groups;
      const int h0 = static_cast<int>(g * group);
      const int h1 = static_cast<int>(std::min<int64_t>(h, h0 + group));
      run_item(p, bj / p.seqlen_q, bj % p.seqlen_q, h0, h1, rows.data(), kt.data(), acc.data());
    }
  });
}

