// The sparse decode kernel body (no include guard on purpose): csrc/cpu/sparse_decode.cpp
// includes it twice, once plain (portable) and once under an AVX2 + FMA target pragma,
// each inside its own namespace, so the compiler vectorises the same C++ for both.
// Include only from sparse_decode.cpp, after its headers.

constexpr int kTile = 32;       // tokens dequantised together
constexpr int kHeadGroup = 16;  // heads sharing one dequantised tile
constexpr int kScaleOffset = kLatentDim;           // bytes: 4 float32 scales
constexpr int kRopeOffset = kLatentDim + 16;        // bytes: 64 bf16 rope values
constexpr int kQuantTile = 128;
constexpr int kChunk = 32;  // output columns kept in registers by the P . V loop

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

void run_item(const SparseDecodeParams& p, int64_t bi, int64_t j, int h0, int h1, float* rows, float* kt, float* acc) {
  const int nh = h1 - h0;
  float m[kHeadGroup], l[kHeadGroup];
  for (int h = 0; h < nh; ++h) { m[h] = -std::numeric_limits<float>::infinity(); l[h] = 0.f; }
  std::fill(acc, acc + static_cast<int64_t>(nh) * kLatentDim, 0.f);
  const float* q_base = p.q + ((bi * p.seqlen_q + j) * p.num_heads) * static_cast<int64_t>(kHeadDim);
  SparseSlotCursor cursor{p, bi, j};
  const SparseSource* srcs[kTile];
  int32_t tokens[kTile];
  float sc[kHeadGroup][kTile];
  for (;;) {
    const int n = cursor.next(kTile, srcs, tokens);
    if (n == 0) break;
    for (int t = 0; t < n; ++t) load_token(*srcs[t], tokens[t], rows + t * kHeadDim);
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
        sc[hp][t] = p.softmax_scale * sa[t];
        if (hp + 1 < nh) sc[hp + 1][t] = p.softmax_scale * sb[t];
      }
    }
    for (int h = 0; h < nh; ++h) {
      const float* scores = sc[h];
      float tile_max = -std::numeric_limits<float>::infinity();
      for (int t = 0; t < n; ++t) tile_max = std::max(tile_max, scores[t]);
      const float m_new = std::max(m[h], tile_max);
      if (m_new == -std::numeric_limits<float>::infinity()) continue;  // every score so far -inf: stay empty
      const float alpha = std::exp(m[h] - m_new);  // 0 on the first tile (m = -inf)
      float* a = acc + static_cast<int64_t>(h) * kLatentDim;
      float w[kTile];
      float sum = 0.f;
      for (int t = 0; t < n; ++t) {
        w[t] = std::exp(scores[t] - m_new);
        sum += w[t];
      }
      // acc = acc * alpha + w . V, kChunk output columns at a time so that they stay in
      // registers across the tile's tokens (one load of V per multiply-add).
      for (int d0 = 0; d0 < kLatentDim; d0 += kChunk) {
        float r[kChunk];
        for (int k = 0; k < kChunk; ++k) r[k] = a[d0 + k] * alpha;
        for (int t = 0; t < n; ++t) {
          const float wt = w[t];
          const float* v = rows + t * kHeadDim + d0;
          for (int k = 0; k < kChunk; ++k) r[k] += wt * v[k];
        }
        for (int k = 0; k < kChunk; ++k) a[d0 + k] = r[k];
      }
      l[h] = l[h] * alpha + sum;
      m[h] = m_new;
    }
  }
  const int64_t row0 = (bi * p.seqlen_q + j) * p.num_heads + h0;
  for (int h = 0; h < nh; ++h) {
    float* o = p.out + (row0 + h) * kLatentDim;
    if (m[h] == -std::numeric_limits<float>::infinity()) {  // no valid slot, or every valid score -inf
      std::fill(o, o + kLatentDim, 0.f);
      p.lse[row0 + h] = std::numeric_limits<float>::infinity();
      continue;
    }
    const float lse = m[h] + std::log(l[h]);
    float factor = 1.f / l[h];
    if (p.attn_sink) factor *= 1.f / (1.f + std::exp(p.attn_sink[h0 + h] - lse));
    const float* a = acc + static_cast<int64_t>(h) * kLatentDim;
    for (int d = 0; d < kLatentDim; ++d) o[d] = a[d] * factor;
    p.lse[row0 + h] = lse;
  }
}

void run(const SparseDecodeParams& p) {
  const int64_t groups = (p.num_heads + kHeadGroup - 1) / kHeadGroup;
  const int64_t items = static_cast<int64_t>(p.batch) * p.seqlen_q * groups;
  at::parallel_for(0, items, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> rows(static_cast<size_t>(kTile) * kHeadDim);
    std::vector<float> kt(static_cast<size_t>(kTile) * kHeadDim);
    std::vector<float> acc(static_cast<size_t>(kHeadGroup) * kLatentDim);
    for (int64_t it = begin; it < end; ++it) {
      const int64_t g = it % groups, bj = it / groups;
      const int h0 = static_cast<int>(g * kHeadGroup);
      const int h1 = std::min<int>(p.num_heads, h0 + kHeadGroup);
      run_item(p, bj / p.seqlen_q, bj % p.seqlen_q, h0, h1, rows.data(), kt.data(), acc.data());
    }
  });
}

