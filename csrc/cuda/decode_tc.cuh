// Absorbed MLA split-KV decode on tensor cores (sm_80+: mma.sync m16n8k16, ldmatrix,
// cp.async). Included by one .cu per element type.
//
// One CTA = (row block of kBlockM query rows, KV split, sequence). The query rows of a
// sequence are its M = s_q * h (query position, head) pairs, row r = j * h + head, so
// every cache row loaded into shared memory serves all heads and all MTP positions.
//
// Warps: kWarpsM x 2, warp = 2 wm + wn (the two warps of a row group sit on different SM
// sub-partitions, so with M = 16 rows -- decode-tp8 -- two tensor-core units work, not one).
// Warp (wm, wn) owns query rows [16 wm, 16 wm + 16) of the block.
//   S = Q K^T  : it computes the scores of its rows against half of the tile's keys
//                (keys [wn * kBlockN/2, (wn+1) * kBlockN/2)), Q and K from shared memory.
//   softmax    : row maxima of the two halves are exchanged through shared memory, so
//                both warps of a row group rescale with the same running max; each keeps
//                a partial row sum over its keys (added up once at the end).
//   O += P V   : P (16 x kBlockN, 16-bit) goes through shared memory; the warp multiplies
//                it by V = the first 512 columns of the same shared tile (ldmatrix.trans)
//                and accumulates output columns [256 wn, 256 wn + 256) in fp32 registers.
// Cache rows are gathered through the block table one key row at a time (any block_size)
// with cp.async into a kStages-deep ring of shared tiles; each cache row is read from
// global memory once per CTA, for both K and V.
//
// float8_e4m3fn cache (kFp8): the ring holds the raw fp8 rows (576 B, half the bytes of a
// bf16 row); after a tile lands, all threads convert it into ONE 16-bit tile in the padded
// layout above (exact: every e4m3 value is a bf16 / fp16 number), and the MMAs run as for a
// 16-bit cache. kv_scale is folded, never multiplied per element: q.(s x) = s (q.x), so the
// scores use softmax_scale * kv_scale, and sum_t p_t (s x_t) = s sum_t p_t x_t, so the
// output is scaled once in the epilogue; lse needs nothing more.
#pragma once
#include <type_traits>

#include "common.cuh"
#include "fp8.cuh"

namespace mla::cuda {

template <int BM, int BN, int STAGES, bool FP8 = false>
struct TcConfig {
  static constexpr bool kFp8 = FP8;
  static constexpr int kBlockM = BM;
  static constexpr int kBlockN = BN;
  static constexpr int kStages = STAGES;
  static constexpr int kWarpsM = BM / 16;
  static constexpr int kWarpsN = 2;
  static constexpr int kWarps = kWarpsM * kWarpsN;
  static constexpr int kThreads = kWarps * 32;
  static constexpr int kRowElems = kHeadDim + 8;   // padded shared row: 1168 B, rows 16 B apart mod 128
  static constexpr int kChunks = kHeadDim / 8;     // 16-byte chunks per cache / query row (72)
  static constexpr int kKeysPerWarp = BN / kWarpsN;
  static constexpr int kSTiles = kKeysPerWarp / 8;  // n8 score tiles per warp
  static constexpr int kOCols = kLatentDim / kWarpsN;
  static constexpr int kOTiles = kOCols / 8;        // n8 output tiles per warp
  static constexpr int kPRow = BN + 8;              // padded P row (elements)
  static constexpr int kLoadTPR = kThreads / BN;    // loader threads per key row
  // 16-byte chunks of one cache row: 72 (16-bit) or 36 (fp8); a thread loads every
  // kLoadTPR-th chunk of its row, kLoadChunks of them (the last one predicated for fp8).
  static constexpr int kRowChunks = FP8 ? kHeadDim / 16 : kChunks;
  static constexpr int kLoadChunks = (kRowChunks + kLoadTPR - 1) / kLoadTPR;
  static constexpr int kConvUnits = BN * kHeadDim / 8 / kThreads;  // fp8: 8-byte units converted per thread

  static constexpr size_t kQBytes = size_t(BM) * kRowElems * 2;
  static constexpr size_t kKVBytes = size_t(BN) * kRowElems * 2;   // one 16-bit tile (padded rows)
  static constexpr size_t kStageBytes = FP8 ? size_t(BN) * kHeadDim : kKVBytes;  // one ring slot
  static constexpr size_t kTileBytes = FP8 ? kKVBytes + STAGES * kStageBytes : STAGES * kKVBytes;
  static constexpr size_t kPBytes = size_t(BM) * kPRow * 2;
  static constexpr size_t kRedBytes = size_t(2) * kWarpsN * BM * sizeof(float);
  static constexpr size_t kSmemBytes = kQBytes + kTileBytes + kPBytes + kRedBytes;

  static_assert(BM % 16 == 0 && BN % 16 == 0, "tile sizes must be multiples of 16");
  static_assert(kKeysPerWarp % 8 == 0, "each warp needs whole n8 score tiles");
  static_assert(kThreads % BN == 0 && (FP8 || kChunks % kLoadTPR == 0), "loader layout");
  static_assert(!FP8 || (BN * kHeadDim / 8) % kThreads == 0, "fp8 conversion layout");
  static_assert(kOTiles % 2 == 0, "output tiles are loaded in pairs");
  static_assert(STAGES >= 2, "need at least double buffering");
};

// ---------------------------------------------------------------------------------------
// The kernel's phases. Each is force-inlined into decode_tc_kernel (one function for ptxas:
// registers are allocated across phases); the barriers between them stay in the kernel body.

// Shared memory of one CTA, carved from the dynamic allocation (Cfg::kSmemBytes).
template <typename T, typename Cfg>
struct TcShared {
  T* q;                  // [BM][RS]   the block's query rows, zero past M
  T* kv;                 // 16-bit cache: the ring [STAGES][BN][RS]; fp8: the converted tile [BN][RS]
  unsigned char* ring;   // fp8 cache only: the raw ring [STAGES][BN][576 bytes]
  T* p;                  // [BM][kPRow] P = exp2(s - max), 16-bit, the A operand of P.V
  float* row_max;        // [kWarpsN][BM] each key half's row maxima of the current tile
  float* row_sum;        // [kWarpsN][BM] each key half's row sums, once at the end

  __device__ __forceinline__ explicit TcShared(unsigned char* smem) {
    q = reinterpret_cast<T*>(smem);
    kv = reinterpret_cast<T*>(smem + Cfg::kQBytes);
    ring = smem + Cfg::kQBytes + (Cfg::kFp8 ? Cfg::kKVBytes : 0);
    p = reinterpret_cast<T*>(smem + Cfg::kQBytes + Cfg::kTileBytes);
    row_max = reinterpret_cast<float*>(smem + Cfg::kQBytes + Cfg::kTileBytes + Cfg::kPBytes);
    row_sum = row_max + Cfg::kWarpsN * Cfg::kBlockM;
  }
};

// What one CTA works on: rows [m0, m0 + BM) of sequence b (of M = s_q * h), the keys of one split.
struct TcBlock {
  int32_t b, h, M, m0, L;
  int32_t split;
  SplitRange range;       // tiles of this split; key_end = the last real row's visible keys
  int32_t block_min_lim;  // keys the block's first row sees: [block_min_lim, key_end) is the causal band
};

// One thread's two query rows: lane holds rows r_lo = lane / 4 and r_hi = r_lo + 8 of its
// warp's 16, with their key limits and online-softmax state (log2 units).
struct TcRows {
  int r_lo, r_hi;          // rows within the block
  int32_t lim_lo, lim_hi;  // keys visible to each row within this split's range (0 for padding rows)
  float m_lo, m_hi;        // running max of score * scale * log2 e
  float l_lo, l_hi;        // this thread's partial row sums
};

// Q block -> shared memory through cp.async (zero rows past M); joins the first commit group.
template <typename T, typename Cfg>
__device__ __forceinline__ void load_query_block(const DecodeParams& p, const TcShared<T, Cfg>& sh, const TcBlock& blk,
                                                 int tid) {
  const T* qn = static_cast<const T*>(p.q_nope);
  const T* qp = static_cast<const T*>(p.q_pe);
  for (int c = tid; c < Cfg::kBlockM * Cfg::kChunks; c += Cfg::kThreads) {
    const int row = c / Cfg::kChunks, ch = c % Cfg::kChunks;
    const int32_t r = blk.m0 + row;
    const T* src = qn;
    const bool valid = r < blk.M;
    if (valid) {
      const int32_t j = r / blk.h, head = r % blk.h;
      src = ch < kLatentDim / 8
                ? qn + blk.b * p.q_nope_batch_stride + j * p.q_nope_seq_stride + head * p.q_nope_head_stride + ch * 8
                : qp + blk.b * p.q_pe_batch_stride + j * p.q_pe_seq_stride + head * p.q_pe_head_stride +
                      (ch - kLatentDim / 8) * 8;
    }
    cp_async_16(sh.q + row * Cfg::kRowElems + ch * 8, src, valid);
  }
}

// Cache rows of key tile `tile` -> ring slot `stage`: kLoadTPR threads per key row, one
// block-table lookup per thread. Keys past the split's end or in a block outside
// [0, num_blocks) become zero rows (cp.async with source size 0: nothing is read).
template <typename T, typename Cfg>
__device__ __forceinline__ void load_kv_tile(const DecodeParams& p, const TcShared<T, Cfg>& sh, const TcBlock& blk,
                                             int tile, int stage, int tid) {
  using CacheT = std::conditional_t<Cfg::kFp8, uint8_t, T>;
  const int ld_row = tid / Cfg::kLoadTPR;
  const int ld_sub = tid % Cfg::kLoadTPR;
  const int32_t key = tile * Cfg::kBlockN + ld_row;
  const CacheT* src = nullptr;
  if (key < blk.range.key_end) src = cache_row<CacheT>(p, blk.b, key);  // nullptr: block id out of range
  const bool valid = src != nullptr;
  if (!valid) src = static_cast<const CacheT*>(p.cache);  // never read (source size 0): zero row
  constexpr int kChunkElems = 16 / sizeof(CacheT);
  unsigned char* dst = Cfg::kFp8 ? sh.ring + stage * Cfg::kStageBytes + ld_row * kHeadDim
                                 : reinterpret_cast<unsigned char*>(sh.kv + stage * (Cfg::kBlockN * Cfg::kRowElems) +
                                                                    ld_row * Cfg::kRowElems);
#pragma unroll
  for (int i = 0; i < Cfg::kLoadChunks; ++i) {
    const int ch = ld_sub + i * Cfg::kLoadTPR;
    if (Cfg::kRowChunks % Cfg::kLoadTPR == 0 || ch < Cfg::kRowChunks)
      cp_async_16(dst + ch * 16, src + (valid ? ch * kChunkElems : 0), valid);
  }
}

// fp8 ring slot -> the 16-bit tile: 8 bytes in, 16 bytes out per unit, units in row-major
// order (contiguous 8-byte loads, contiguous 16-byte stores within a row). Exact.
template <typename T, typename Cfg>
__device__ __forceinline__ void convert_fp8_tile(const TcShared<T, Cfg>& sh, int stage, int tid) {
  const unsigned char* ring = sh.ring + stage * Cfg::kStageBytes;
#pragma unroll
  for (int i = 0; i < Cfg::kConvUnits; ++i) {
    const int u = tid + i * Cfg::kThreads;
    const int row = u / (kHeadDim / 8), col = (u % (kHeadDim / 8)) * 8;
    const uint2 w = *reinterpret_cast<const uint2*>(ring + u * 8);
    uint4 v;
    e4m3x8_to<T>(w, v);
    *reinterpret_cast<uint4*>(sh.kv + row * Cfg::kRowElems + col) = v;
  }
}

// S = Q K^T for the warp's 16 rows x kKeysPerWarp keys (two accumulator chains per n8 tile).
template <typename T, typename Cfg>
__device__ __forceinline__ void compute_scores(const T* a_base, const T* sK, int wn, int lane, bool warp_active,
                                               float (&s)[Cfg::kSTiles][4]) {
  constexpr int RS = Cfg::kRowElems;
  float acc[2][Cfg::kSTiles][4];
#pragma unroll
  for (int c = 0; c < 2; ++c)
#pragma unroll
    for (int n = 0; n < Cfg::kSTiles; ++n) acc[c][n][0] = acc[c][n][1] = acc[c][n][2] = acc[c][n][3] = 0.f;
  if (warp_active) {
    const T* b_base = sK + (wn * Cfg::kKeysPerWarp + (lane & 7)) * RS + (lane >> 3) * 8;
#pragma unroll 6
    for (int k = 0; k < kHeadDim; k += 32) {
      uint32_t a0[4], a1[4];
      ldmatrix_x4(a0, a_base + k);
      ldmatrix_x4(a1, a_base + k + 16);
#pragma unroll
      for (int n = 0; n < Cfg::kSTiles; ++n) {
        uint32_t bf[4];  // keys n*8..+7, columns k..k+31: {0,1} = k-step k, {2,3} = k-step k+16
        ldmatrix_x4(bf, b_base + n * 8 * RS + k);
        mma_16816<T>(acc[0][n], a0, bf[0], bf[1]);
        mma_16816<T>(acc[1][n], a1, bf[2], bf[3]);
      }
    }
  }
#pragma unroll
  for (int n = 0; n < Cfg::kSTiles; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) s[n][e] = acc[0][n][e] + acc[1][n][e];
}

// Mask (causal limit, split end, padding rows) and scale the scores; the quad's row maxima of
// this warp's key half -> shared memory (the other half's warp reads them after a barrier).
template <typename Cfg>
__device__ __forceinline__ void mask_and_share_row_max(float (&s)[Cfg::kSTiles][4], const TcRows& rows,
                                                       int32_t key0, float scale_log2, float* row_max, int wn,
                                                       int lane) {
  float mx_lo = -INFINITY, mx_hi = -INFINITY;
#pragma unroll
  for (int n = 0; n < Cfg::kSTiles; ++n) {
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      const int32_t key = key0 + n * 8 + e;
      s[n][e] = key < rows.lim_lo ? s[n][e] * scale_log2 : -INFINITY;
      s[n][2 + e] = key < rows.lim_hi ? s[n][2 + e] * scale_log2 : -INFINITY;
      mx_lo = fmaxf(mx_lo, s[n][e]);
      mx_hi = fmaxf(mx_hi, s[n][2 + e]);
    }
  }
  mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, 1));
  mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, 2));
  mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, 1));
  mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, 2));
  if ((lane & 3) == 0) {
    row_max[wn * Cfg::kBlockM + rows.r_lo] = mx_lo;
    row_max[wn * Cfg::kBlockM + rows.r_hi] = mx_hi;
  }
}

// Online softmax (fp32): the tile's row max over both key halves, rescale of O and of the
// partial sums, and P -> shared memory as 16-bit.
template <typename T, typename Cfg>
__device__ __forceinline__ void softmax_update(const float (&s)[Cfg::kSTiles][4], TcRows& rows,
                                               const TcShared<T, Cfg>& sh, float (&o)[Cfg::kOTiles][4], int wn,
                                               int q8) {
  using Tr = TypeTraits<T>;
  float tmax_lo = sh.row_max[rows.r_lo], tmax_hi = sh.row_max[rows.r_hi];
#pragma unroll
  for (int w = 1; w < Cfg::kWarpsN; ++w) {
    tmax_lo = fmaxf(tmax_lo, sh.row_max[w * Cfg::kBlockM + rows.r_lo]);
    tmax_hi = fmaxf(tmax_hi, sh.row_max[w * Cfg::kBlockM + rows.r_hi]);
  }
  const float new_lo = fmaxf(rows.m_lo, tmax_lo), new_hi = fmaxf(rows.m_hi, tmax_hi);
  // Rows that have seen no key keep -inf: subtract 0 instead so exp2 gives 0, not NaN.
  const float use_lo = new_lo == -INFINITY ? 0.f : new_lo;
  const float use_hi = new_hi == -INFINITY ? 0.f : new_hi;
  const float alpha_lo = exp2f(rows.m_lo - use_lo), alpha_hi = exp2f(rows.m_hi - use_hi);
  rows.m_lo = new_lo;
  rows.m_hi = new_hi;
  float sum_lo = 0.f, sum_hi = 0.f;
  T* p_lo = sh.p + rows.r_lo * Cfg::kPRow + wn * Cfg::kKeysPerWarp + q8;
  T* p_hi = sh.p + rows.r_hi * Cfg::kPRow + wn * Cfg::kKeysPerWarp + q8;
#pragma unroll
  for (int n = 0; n < Cfg::kSTiles; ++n) {
    const float p0 = exp2f(s[n][0] - use_lo), p1 = exp2f(s[n][1] - use_lo);
    const float p2 = exp2f(s[n][2] - use_hi), p3 = exp2f(s[n][3] - use_hi);
    sum_lo += p0 + p1;
    sum_hi += p2 + p3;
    *reinterpret_cast<uint32_t*>(p_lo + n * 8) = Tr::pack2(p0, p1);
    *reinterpret_cast<uint32_t*>(p_hi + n * 8) = Tr::pack2(p2, p3);
  }
  rows.l_lo = rows.l_lo * alpha_lo + sum_lo;
  rows.l_hi = rows.l_hi * alpha_hi + sum_hi;
#pragma unroll
  for (int t = 0; t < Cfg::kOTiles; ++t) {
    o[t][0] *= alpha_lo;
    o[t][1] *= alpha_lo;
    o[t][2] *= alpha_hi;
    o[t][3] *= alpha_hi;
  }
}

// Whether V rows [row_lo, row_hi) of a shared tile hold an inf / NaN in the warp's output
// columns [col_begin, col_begin + kOCols); each lane checks every 32nd column.
template <typename Cfg, typename T>
__device__ __forceinline__ bool any_nonfinite(const T* tile, int row_lo, int row_hi, int col_begin, int lane) {
  bool bad = false;
  for (int r = row_lo; r < row_hi; ++r)
    for (int c = lane; c < Cfg::kOCols; c += 32) {
      const float v = TypeTraits<T>::to_float(tile[r * Cfg::kRowElems + col_begin + c]);
      bad |= (__float_as_uint(v) & 0x7f800000u) == 0x7f800000u;
    }
  return bad;
}

// O += P V for the warp's 16 rows and output columns [wn * kOCols, +kOCols); V = columns
// [0, 512) of the same shared tile as K.
//
// A masked (row, key) pair has P = 0, but an MMA still computes 0 * V, and 0 * inf or 0 * NaN
// is NaN: an inf / NaN in a key that only later query positions see would reach the rows that
// must not see it. So a 16-key chunk of the causal band [block_min_lim, key_end) (at most
// s_q - 1 keys) whose V holds a non-finite value takes a scalar path that skips masked pairs;
// finite values (always, in practice) keep the MMA.
template <typename T, typename Cfg>
__device__ __forceinline__ void accumulate_pv(const T* sK, const T* sP, const TcBlock& blk, const TcRows& rows,
                                              int tile, int wm, int wn, int lane, int q8,
                                              float (&o)[Cfg::kOTiles][4]) {
  using Tr = TypeTraits<T>;
  constexpr int BN = Cfg::kBlockN, RS = Cfg::kRowElems;
  const int32_t tile_key0 = tile * BN;
  const int32_t band_lo = max(blk.block_min_lim, tile_key0), band_hi = min(blk.range.key_end, tile_key0 + BN);
  bool band_nonfinite = false;
  if (band_lo < band_hi)  // uniform across the block
    band_nonfinite =
        __any_sync(0xffffffffu, any_nonfinite<Cfg>(sK, band_lo - tile_key0, band_hi - tile_key0, wn * Cfg::kOCols, lane));
  const int col0 = wn * Cfg::kOCols + q8;
#pragma unroll
  for (int ks = 0; ks < BN / 16; ++ks) {
    const int32_t chunk0 = tile_key0 + ks * 16;
    if (band_nonfinite && chunk0 < band_hi && chunk0 + 16 > band_lo) {
#pragma unroll 1
      for (int kk = 0; kk < 16; ++kk) {
        const int32_t key = chunk0 + kk;
        const T* v_row = sK + (ks * 16 + kk) * RS + col0;
        const T* p_col = sP + ks * 16 + kk;
        if (key < rows.lim_lo) {
          const float pv = Tr::to_float(p_col[rows.r_lo * Cfg::kPRow]);
#pragma unroll
          for (int t = 0; t < Cfg::kOTiles; ++t) {
            o[t][0] += pv * Tr::to_float(v_row[t * 8]);
            o[t][1] += pv * Tr::to_float(v_row[t * 8 + 1]);
          }
        }
        if (key < rows.lim_hi) {
          const float pv = Tr::to_float(p_col[rows.r_hi * Cfg::kPRow]);
#pragma unroll
          for (int t = 0; t < Cfg::kOTiles; ++t) {
            o[t][2] += pv * Tr::to_float(v_row[t * 8]);
            o[t][3] += pv * Tr::to_float(v_row[t * 8 + 1]);
          }
        }
      }
      continue;
    }
    uint32_t pa[4];
    ldmatrix_x4(pa, sP + (wm * 16 + (lane & 15)) * Cfg::kPRow + ks * 16 + (lane >> 4) * 8);
    const T* v_base = sK + (ks * 16 + (lane & 7) + ((lane >> 3) & 1) * 8) * RS + wn * Cfg::kOCols + (lane >> 4) * 8;
#pragma unroll
    for (int t = 0; t < Cfg::kOTiles; t += 2) {
      uint32_t vb[4];  // {0,1}: output columns t*8..+7, {2,3}: (t+1)*8..+7
      ldmatrix_x4_trans(vb, v_base + t * 8);
      mma_16816<T>(o[t], pa, vb[0], vb[1]);
      mma_16816<T>(o[t + 1], pa, vb[2], vb[3]);
    }
  }
}

// Normalised output rows (and lse) -> out / lse, or to the split's slot of the workspace.
// `inv` is kv_scale / row sum (0 for an empty row), `lse` natural log.
template <typename T, typename Cfg>
__device__ __forceinline__ void store_rows(const DecodeParams& p, const TcBlock& blk, int32_t row, int wn, int lane,
                                           int col0, const float (&o)[Cfg::kOTiles][4], int half, float inv,
                                           float lse) {
  using Tr = TypeTraits<T>;
  if (row >= blk.M) return;
  if (p.num_splits == 1) {
    T* dst = static_cast<T*>(p.out) + (static_cast<int64_t>(blk.b) * blk.M + row) * kLatentDim + col0;
#pragma unroll
    for (int t = 0; t < Cfg::kOTiles; ++t)
      *reinterpret_cast<uint32_t*>(dst + t * 8) = Tr::pack2(o[t][2 * half] * inv, o[t][2 * half + 1] * inv);
    if (wn == 0 && (lane & 3) == 0) p.lse[static_cast<int64_t>(blk.b) * blk.M + row] = lse;
  } else {
    const int64_t base = (static_cast<int64_t>(blk.b) * p.num_splits + blk.split) * blk.M;
    float* dst = p.o_accum + (base + row) * kLatentDim + col0;
#pragma unroll
    for (int t = 0; t < Cfg::kOTiles; ++t)
      *reinterpret_cast<float2*>(dst + t * 8) = make_float2(o[t][2 * half] * inv, o[t][2 * half + 1] * inv);
    if (wn == 0 && (lane & 3) == 0) p.lse_accum[base + row] = lse;
  }
}

// ---------------------------------------------------------------------------------------
// The kernel: Q block in, then per key tile: wait for its copies, prefetch a later tile,
// (fp8: convert), scores, row max across the key halves, softmax, P.V; then the epilogue.
template <typename T, typename Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1) decode_tc_kernel(const DecodeParams p) {
  constexpr int BM = Cfg::kBlockM, BN = Cfg::kBlockN, STAGES = Cfg::kStages;
  constexpr int RS = Cfg::kRowElems;

  const TcShared<T, Cfg> sh(dynamic_smem());
  const int tid = threadIdx.x;
  const int lane = tid & 31;
  const int warp = tid >> 5;
  const int wn = warp % Cfg::kWarpsN;
  const int wm = warp / Cfg::kWarpsN;
  const int q8 = (lane & 3) * 2;  // column pair within an n8 tile

  TcBlock blk;
  blk.b = blockIdx.y;
  blk.h = p.num_heads;
  blk.M = p.seqlen_q * blk.h;
  const int32_t m_blocks = ceil_div(blk.M, BM);
  blk.m0 = static_cast<int32_t>(blockIdx.x % m_blocks) * BM;
  blk.split = blockIdx.x / m_blocks;
  blk.L = clamped_seqlen(p, blk.b);
  {
    // Rows are ordered by query position j, so the block's last real row sees the most keys.
    const int32_t last_row = min(blk.m0 + BM, blk.M) - 1;
    const int32_t n_keys = visible_keys(blk.L, p.seqlen_q, last_row / blk.h, p.causal);
    blk.range = split_range(n_keys, BN, blk.split, p.num_splits);
    blk.block_min_lim = min(blk.range.key_end, visible_keys(blk.L, p.seqlen_q, blk.m0 / blk.h, p.causal));
  }

  // ---- Prologue: the Q block and the first STAGES - 1 key tiles in flight.
  load_query_block<T, Cfg>(p, sh, blk, tid);
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (blk.range.tile_begin + s < blk.range.tile_end) load_kv_tile<T, Cfg>(p, sh, blk, blk.range.tile_begin + s, s, tid);
    cp_async_commit();
  }

  TcRows rows;
  rows.r_lo = wm * 16 + (lane >> 2);
  rows.r_hi = rows.r_lo + 8;
  rows.lim_lo = blk.m0 + rows.r_lo < blk.M
                    ? min(blk.range.key_end, visible_keys(blk.L, p.seqlen_q, (blk.m0 + rows.r_lo) / blk.h, p.causal))
                    : 0;
  rows.lim_hi = blk.m0 + rows.r_hi < blk.M
                    ? min(blk.range.key_end, visible_keys(blk.L, p.seqlen_q, (blk.m0 + rows.r_hi) / blk.h, p.causal))
                    : 0;
  rows.m_lo = rows.m_hi = -INFINITY;
  rows.l_lo = rows.l_hi = 0.f;
  const bool warp_active = blk.m0 + wm * 16 < blk.M;  // warps holding only padding rows skip the MMAs
  // fp8: the dequantization scale, folded into the scores here and the output at the end.
  const float kv_scale = Cfg::kFp8 ? __ldg(p.kv_scale) : 1.f;
  const float scale_log2 = p.softmax_scale * kv_scale * kLog2e;

  float o[Cfg::kOTiles][4];
#pragma unroll
  for (int t = 0; t < Cfg::kOTiles; ++t) o[t][0] = o[t][1] = o[t][2] = o[t][3] = 0.f;
  const T* a_base = sh.q + (wm * 16 + (lane & 15)) * RS + (lane >> 4) * 8;  // ldmatrix A address (Q)

  for (int it = 0, tile = blk.range.tile_begin; tile < blk.range.tile_end; ++it, ++tile) {
    cp_async_wait<STAGES - 2>();
    __syncthreads();  // tile `tile` is in shared memory; the stage read last iteration is free
    {
      const int next = tile + STAGES - 1;
      if (next < blk.range.tile_end) load_kv_tile<T, Cfg>(p, sh, blk, next, (it + STAGES - 1) % STAGES, tid);
      cp_async_commit();
    }
    const T* sK;
    if constexpr (Cfg::kFp8) {
      // The previous tile's readers are done with the converted tile: they passed the barrier above.
      convert_fp8_tile<T, Cfg>(sh, it % STAGES, tid);
      __syncthreads();  // the converted tile is complete
      sK = sh.kv;
    } else {
      sK = sh.kv + (it % STAGES) * (BN * RS);
    }

    float s[Cfg::kSTiles][4];
    compute_scores<T, Cfg>(a_base, sK, wn, lane, warp_active, s);
    mask_and_share_row_max<Cfg>(s, rows, tile * BN + wn * Cfg::kKeysPerWarp + q8, scale_log2, sh.row_max, wn, lane);
    __syncthreads();  // both key halves' maxima are visible
    softmax_update<T, Cfg>(s, rows, sh, o, wn, q8);
    __syncthreads();  // P of all key halves is in shared memory
    if (warp_active) accumulate_pv<T, Cfg>(sK, sh.p, blk, rows, tile, wm, wn, lane, q8, o);
  }
  cp_async_wait<0>();

  // ---- Epilogue: full row sums (the quad's partial sums, then the other key half's).
  float l_lo = rows.l_lo, l_hi = rows.l_hi;
  l_lo += __shfl_xor_sync(0xffffffffu, l_lo, 1);
  l_lo += __shfl_xor_sync(0xffffffffu, l_lo, 2);
  l_hi += __shfl_xor_sync(0xffffffffu, l_hi, 1);
  l_hi += __shfl_xor_sync(0xffffffffu, l_hi, 2);
  if ((lane & 3) == 0) {
    sh.row_sum[wn * BM + rows.r_lo] = l_lo;
    sh.row_sum[wn * BM + rows.r_hi] = l_hi;
  }
  __syncthreads();
  float tot_lo = 0.f, tot_hi = 0.f;
#pragma unroll
  for (int w = 0; w < Cfg::kWarpsN; ++w) {
    tot_lo += sh.row_sum[w * BM + rows.r_lo];
    tot_hi += sh.row_sum[w * BM + rows.r_hi];
  }
  // A row that sees no key of this split gets out 0, lse -inf (fp8: the output times kv_scale).
  // Decided from the key ranges, not from the sum: an inf / NaN the row does see must show up
  // in its output as it does in the reference, never turn it into an "empty" row.
  const int32_t split_key0 = blk.range.tile_begin * BN;
  const bool empty_lo = rows.lim_lo <= split_key0, empty_hi = rows.lim_hi <= split_key0;
  const float inv_lo = empty_lo ? 0.f : kv_scale / tot_lo;
  const float inv_hi = empty_hi ? 0.f : kv_scale / tot_hi;
  const float lse_lo = empty_lo ? -INFINITY : (rows.m_lo + __log2f(tot_lo)) * kLn2;
  const float lse_hi = empty_hi ? -INFINITY : (rows.m_hi + __log2f(tot_hi)) * kLn2;
  const int col0 = wn * Cfg::kOCols + q8;
  store_rows<T, Cfg>(p, blk, blk.m0 + rows.r_lo, wn, lane, col0, o, 0, inv_lo, lse_lo);
  store_rows<T, Cfg>(p, blk, blk.m0 + rows.r_hi, wn, lane, col0, o, 1, inv_hi, lse_hi);
}

// Tile configurations, largest first; the planner picks the first whose shared memory
// fits the device (sm_90: 227 KB, sm_80: 163 KB, sm_86 / sm_89: 99 KB per block).
using TcConfigL = TcConfig<64, 32, 3>;  // 188.5 KB
using TcConfigM = TcConfig<64, 32, 2>;  // 152 KB
using TcConfigS = TcConfig<32, 16, 3>;  // 93 KB
// fp8 cache: the ring holds half-size slots, plus one converted 16-bit tile.
using TcFp8ConfigL = TcConfig<64, 32, 4, true>;  // 187.5 KB (sm_90): 3 tiles in flight
using TcFp8ConfigM = TcConfig<64, 32, 2, true>;  // 151.5 KB (sm_80)
using TcFp8ConfigS = TcConfig<32, 16, 4, true>;  // 92.75 KB (sm_86 / sm_89)

// DecodePlan::config for the tensor-core kernel: which of the configurations above runs.
enum TcConfigId : int32_t { kTcLarge = 0, kTcMedium = 1, kTcSmall = 2, kNumTcConfigs = 3 };

// What the planner needs of each configuration, indexed by TcConfigId.
struct TcConfigInfo {
  int32_t block_m, block_n;           // rows per CTA, keys per tile (the same for both cache types)
  size_t smem_16bit, smem_fp8;        // dynamic shared memory with a 16-bit / an fp8 cache
};
constexpr TcConfigInfo kTcConfigs[kNumTcConfigs] = {
    {TcConfigL::kBlockM, TcConfigL::kBlockN, TcConfigL::kSmemBytes, TcFp8ConfigL::kSmemBytes},
    {TcConfigM::kBlockM, TcConfigM::kBlockN, TcConfigM::kSmemBytes, TcFp8ConfigM::kSmemBytes},
    {TcConfigS::kBlockM, TcConfigS::kBlockN, TcConfigS::kSmemBytes, TcFp8ConfigS::kSmemBytes},
};
static_assert(TcFp8ConfigL::kBlockM == TcConfigL::kBlockM && TcFp8ConfigM::kBlockM == TcConfigM::kBlockM &&
                  TcFp8ConfigS::kBlockM == TcConfigS::kBlockM && TcFp8ConfigL::kBlockN == TcConfigL::kBlockN &&
                  TcFp8ConfigM::kBlockN == TcConfigM::kBlockN && TcFp8ConfigS::kBlockN == TcConfigS::kBlockN,
              "fp8 configurations share the tile shapes of the 16-bit ones (kTcConfigs lists one shape)");

// Launchers, one per (q, cache) element type pair (decode_tc_{bf16,fp16}.cu,
// decode_tc_fp8_{bf16,fp16}.cu); `config` is a TcConfigId.
cudaError_t launch_decode_tc_bf16(const DecodeParams& p, int config, cudaStream_t stream);
cudaError_t launch_decode_tc_fp16(const DecodeParams& p, int config, cudaStream_t stream);
cudaError_t launch_decode_tc_fp8_bf16(const DecodeParams& p, int config, cudaStream_t stream);
cudaError_t launch_decode_tc_fp8_fp16(const DecodeParams& p, int config, cudaStream_t stream);

template <typename T, typename Cfg>
cudaError_t launch_decode_tc_impl(const DecodeParams& p, cudaStream_t stream) {
  auto kernel = decode_tc_kernel<T, Cfg>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(Cfg::kSmemBytes));
  if (err != cudaSuccess) return err;
  const int32_t M = p.seqlen_q * p.num_heads;
  const dim3 grid(ceil_div(M, Cfg::kBlockM) * p.num_splits, p.batch);
  MLA_LAUNCH(kernel, grid, Cfg::kThreads, Cfg::kSmemBytes, stream, p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_decode_tc_config(const DecodeParams& p, int config, cudaStream_t stream) {
  switch (config) {
    case kTcLarge: return launch_decode_tc_impl<T, TcConfigL>(p, stream);
    case kTcMedium: return launch_decode_tc_impl<T, TcConfigM>(p, stream);
    case kTcSmall: return launch_decode_tc_impl<T, TcConfigS>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

template <typename T>
cudaError_t launch_decode_tc_fp8_config(const DecodeParams& p, int config, cudaStream_t stream) {
  if (p.kv_scale == nullptr) return cudaErrorInvalidValue;
  switch (config) {
    case kTcLarge: return launch_decode_tc_impl<T, TcFp8ConfigL>(p, stream);
    case kTcMedium: return launch_decode_tc_impl<T, TcFp8ConfigM>(p, stream);
    case kTcSmall: return launch_decode_tc_impl<T, TcFp8ConfigS>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace mla::cuda
