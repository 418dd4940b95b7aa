// Sparse (top-k) MLA decode on CUDA, DeepSeek-V3.2's DSA: query (bi, j) attends to the
// tokens its indices name (main source, then the optional extra source), read from the
// 656-byte fp8 cache (512 e4m3 values, 4 fp32 power-of-two scales, 64 bf16 rope values) or a
// 16 / 32-bit cache of 576 values. Math: mla_ext/sparse.py (FlashMLA's reference): a slot
// that is -1 or at / past topk_length is skipped, a token named twice counts twice, NaN in a
// gathered value reads as 0, the attention sink scales out (not lse), a query with no valid
// slot gets out 0 and lse +inf.
//
// The slots of a query are numbered v = 0 .. n_main + n_extra - 1 (n_* = the source's
// topk clamped by its topk_length); a split covers a range of them in tiles. Per CTA
// = (head group, split, query j, sequence bi), every tile of slots is gathered once
// (cp.async, 16-byte chunks, invalid slots zero-filled without a read) and dequantised once
// into fp32 shared rows that all heads of the group use.
//
// Simple kernel (CUDA cores, fp32 throughout, any q / cache dtype): 256 threads, 16 heads,
// tiles of 8 slots, a 2-deep ring of raw tiles.
//   scores  : each warp takes (head, slot) pairs, lanes split the 576-dim dot product
//   softmax : thread h < 16 keeps head h's running max / sum, turns the tile's scores into P
//   P . V   : thread t owns output columns 2t, 2t + 1 of all 16 heads (32 fp32 accumulators)
// With num_splits > 1 each split writes a normalised partial (lse -inf when it saw no valid
// slot) and the shared combine (combine.cuh) merges them, applying the sink and the +inf convention.
#include <algorithm>
#include <mutex>
#include <type_traits>

#include "combine.cuh"
#include "common.cuh"
#include "decode_tc.cuh"  // TcConfig, TcRows, TcBlock, compute_scores, accumulate_pv
#include "fp8.cuh"
#include "sparse_kernels.h"

namespace mla::cuda {
namespace {

constexpr int kFp8TokenBytes = 656;  // 512 e4m3 + 4 fp32 scales + 64 bf16
constexpr int kFp8ScaleOffset = kLatentDim;
constexpr int kFp8RopeOffset = kLatentDim + 16;

// Bytes of one cache token: C = uint8_t stands for the 656-byte fp8 layout.
template <typename C>
constexpr int token_bytes() {
  return std::is_same_v<C, uint8_t> ? kFp8TokenBytes : kHeadDim * static_cast<int>(sizeof(C));
}

__device__ __forceinline__ bool is_nan_bits(float x) { return (__float_as_uint(x) & 0x7fffffffu) > 0x7f800000u; }
// FlashMLA's reference reads a NaN in a gathered value as 0 (torch.nan_to_num); inf stays.
__device__ __forceinline__ float nan_to_zero(float x) { return is_nan_bits(x) ? 0.f : x; }

// Valid slots of query (bi, *) in a source: its topk, clamped by topk_length[bi].
__device__ __forceinline__ int32_t source_limit(const SparseCudaSource& s, int32_t bi) {
  if (s.topk_length == nullptr) return s.topk;
  const int32_t n = s.topk_length[bi];
  return n < 0 ? 0 : (n > s.topk ? s.topk : n);
}

// The token slot v of query (bi, j) names, or nullptr when the slot is skipped (-1) or its
// index lies outside the cache (never read; the glue rejects such indices).
// v < n_main: main slot v; otherwise extra slot v - n_main. v < n_main + n_extra.
__device__ __forceinline__ const uint8_t* slot_token(const SparseCudaParams& p, int32_t bi, int32_t j, int32_t v,
                                                     int32_t n_main) {
  const bool in_main = v < n_main;
  const SparseCudaSource& s = in_main ? p.main : p.extra;
  const int32_t slot = in_main ? v : v - n_main;
  const int32_t t = s.indices[(static_cast<int64_t>(bi) * p.seqlen_q + j) * s.topk + slot];
  if (t < 0 || t >= s.num_tokens) return nullptr;
  const int32_t block = t / s.block_size;
  return s.cache + static_cast<int64_t>(block) * s.block_stride +
         static_cast<int64_t>(t - block * s.block_size) * s.token_stride;
}

// What one CTA works on.
struct SparseBlock {
  int32_t bi, j;          // sequence, query position
  int32_t head0;          // first head of the group
  int32_t split;
  int32_t n_main;         // valid-slot bound of the main source (slots past it belong to extra)
  SplitRange range;       // tiles of slots of this split; key_end = one past its last slot
};

// ---------------------------------------------------------------------------------------
// Gather + dequantise, shared by the kernels.

// Raw tokens of slot tile `tile` -> ring slot `raw` (kTile tokens of token_bytes<C>() each),
// one 16-byte cp.async per chunk; a skipped slot is zero-filled without a read. valid[k]
// records which slots hold a token (threads k < kTile write it).
template <typename C, int kTile, int kThreads>
__device__ __forceinline__ void gather_tile(const SparseCudaParams& p, const SparseBlock& blk, int tile,
                                            unsigned char* raw, int* valid, int tid) {
  constexpr int kChunks = token_bytes<C>() / 16;
  for (int c = tid; c < kTile * kChunks; c += kThreads) {
    const int k = c / kChunks, ch = c - k * kChunks;
    const int32_t v = tile * kTile + k;
    const uint8_t* tok = v < blk.range.key_end ? slot_token(p, blk.bi, blk.j, v, blk.n_main) : nullptr;
    const bool ok = tok != nullptr;
    cp_async_16(raw + k * token_bytes<C>() + ch * 16, ok ? tok + ch * 16 : p.main.cache, ok);  // no read when !ok
    if (ch == 0) valid[k] = ok ? 1 : 0;
  }
}

// Ring slot -> fp32 rows [kTile][kHeadDim] (NaN -> 0). fp8: value = e4m3 * its 128-value
// scale, exact in fp32 (a power-of-two scale); rope from bf16. Units of 4 raw bytes.
template <typename C, int kTile, int kThreads>
__device__ __forceinline__ void dequantize_tile(const unsigned char* raw, float* rows, int tid) {
  if constexpr (std::is_same_v<C, uint8_t>) {
    constexpr int kWords = kLatentDim / 4 + kRopeDim / 2;  // 128 words of 4 codes, 32 of 2 bf16
    for (int u = tid; u < kTile * kWords; u += kThreads) {
      const int k = u / kWords, w = u - k * kWords;
      const unsigned char* tok = raw + k * kFp8TokenBytes;
      float* row = rows + k * kHeadDim;
      if (w < kLatentDim / 4) {
        const uint32_t codes = *reinterpret_cast<const uint32_t*>(tok + 4 * w);
        const float scale = *reinterpret_cast<const float*>(tok + kFp8ScaleOffset + 4 * (w / 32));
#pragma unroll
        for (int e = 0; e < 4; ++e)
          row[4 * w + e] = nan_to_zero(e4m3_to_float(static_cast<uint8_t>(codes >> (8 * e))) * scale);
      } else {
        const int r = w - kLatentDim / 4;
        const uint32_t pair = *reinterpret_cast<const uint32_t*>(tok + kFp8RopeOffset + 4 * r);
        row[kLatentDim + 2 * r] = nan_to_zero(__uint_as_float(pair << 16));
        row[kLatentDim + 2 * r + 1] = nan_to_zero(__uint_as_float(pair & 0xffff0000u));
      }
    }
  } else {
    const C* src = reinterpret_cast<const C*>(raw);
    for (int i = tid; i < kTile * kHeadDim; i += kThreads) rows[i] = nan_to_zero(TypeTraits<C>::to_float(src[i]));
  }
}

// ---------------------------------------------------------------------------------------
// Simple kernel.
constexpr int kSimpleThreads = 256;
constexpr int kSimpleHeads = 16;  // heads per CTA
constexpr int kSimpleTile = 8;    // slots per tile
constexpr int kSimpleStages = 2;  // raw ring depth

template <typename C>
struct SimpleLayout {
  static constexpr size_t kRaw = size_t(kSimpleTile) * token_bytes<C>();  // one ring slot, 16-byte multiple
  static constexpr size_t kRingOff = 0;
  static constexpr size_t kQOff = kRingOff + kSimpleStages * kRaw;
  static constexpr size_t kRowsOff = kQOff + size_t(kSimpleHeads) * kHeadDim * 4;
  static constexpr size_t kScoresOff = kRowsOff + size_t(kSimpleTile) * kHeadDim * 4;
  static constexpr size_t kHeadOff = kScoresOff + size_t(kSimpleHeads) * kSimpleTile * 4;
  static constexpr size_t kValidOff = kHeadOff + 3 * kSimpleHeads * 4;
  static constexpr size_t kBytes = kValidOff + size_t(kSimpleStages) * kSimpleTile * 4;
  static_assert(kRaw % 16 == 0, "ring slots must keep 16-byte alignment");
};

template <typename T, typename C>
__global__ void __launch_bounds__(kSimpleThreads, 2) sparse_simple_kernel(const SparseCudaParams p) {
  using L = SimpleLayout<C>;
  unsigned char* smem = dynamic_smem();
  unsigned char* ring = smem + L::kRingOff;                       // [kStages][kTile][token bytes] raw tokens
  float* sq = reinterpret_cast<float*>(smem + L::kQOff);          // [kHeads][D] q * softmax_scale * log2 e
  float* rows = reinterpret_cast<float*>(smem + L::kRowsOff);     // [kTile][D] dequantised tile
  float* ss = reinterpret_cast<float*>(smem + L::kScoresOff);     // [kHeads][kTile] scores (log2), then P
  float* alpha = reinterpret_cast<float*>(smem + L::kHeadOff);    // [kHeads] rescale of this tile
  float* inv = alpha + kSimpleHeads;                              // [kHeads] epilogue factor
  float* lse_row = inv + kSimpleHeads;                            // [kHeads] epilogue lse
  int* valid = reinterpret_cast<int*>(smem + L::kValidOff);       // [kStages][kTile] slot holds a token

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int32_t groups = ceil_div(p.num_heads, kSimpleHeads);
  SparseBlock blk;
  blk.bi = blockIdx.z;
  blk.j = blockIdx.y;
  blk.head0 = static_cast<int32_t>(blockIdx.x % groups) * kSimpleHeads;
  blk.split = static_cast<int32_t>(blockIdx.x / groups);
  blk.n_main = source_limit(p.main, blk.bi);
  const int32_t n_slots = blk.n_main + (p.has_extra ? source_limit(p.extra, blk.bi) : 0);
  blk.range = split_range(n_slots, kSimpleTile, blk.split, p.num_splits);
  const int32_t heads = min(kSimpleHeads, p.num_heads - blk.head0);
  const int64_t row0 = (static_cast<int64_t>(blk.bi) * p.seqlen_q + blk.j) * p.num_heads + blk.head0;

  if (blk.range.tile_begin < blk.range.tile_end)
    gather_tile<C, kSimpleTile, kSimpleThreads>(p, blk, blk.range.tile_begin, ring, valid, tid);
  cp_async_commit();
  {
    const float scale_log2 = p.softmax_scale * kLog2e;
    const T* q = static_cast<const T*>(p.q) + row0 * kHeadDim;
    for (int i = tid; i < kSimpleHeads * kHeadDim; i += kSimpleThreads)
      sq[i] = i < heads * kHeadDim ? TypeTraits<T>::to_float(q[i]) * scale_log2 : 0.f;
  }

  float acc[kSimpleHeads][2];
#pragma unroll
  for (int h = 0; h < kSimpleHeads; ++h) acc[h][0] = acc[h][1] = 0.f;
  float m = -INFINITY, l = 0.f;  // head tid's running max (log2 units) and sum, threads tid < kHeads
  bool seen = false;             // some slot of this split holds a token (the same in every thread)
  const int col = 2 * tid;

  for (int it = 0, tile = blk.range.tile_begin; tile < blk.range.tile_end; ++it, ++tile) {
    cp_async_wait<0>();
    __syncthreads();  // tile `tile` landed; the previous tile's rows / scores / P are consumed
    if (tile + 1 < blk.range.tile_end)
      gather_tile<C, kSimpleTile, kSimpleThreads>(p, blk, tile + 1, ring + ((it + 1) % kSimpleStages) * L::kRaw,
                                                  valid + ((it + 1) % kSimpleStages) * kSimpleTile, tid);
    cp_async_commit();
    dequantize_tile<C, kSimpleTile, kSimpleThreads>(ring + (it % kSimpleStages) * L::kRaw, rows, tid);
    const int* tvalid = valid + (it % kSimpleStages) * kSimpleTile;
    __syncthreads();  // the tile's fp32 rows are complete
    for (int pair = warp; pair < kSimpleHeads * kSimpleTile; pair += kSimpleThreads / 32) {
      const int h = pair / kSimpleTile, k = pair % kSimpleTile;
      float dot = 0.f;
      for (int d = lane; d < kHeadDim; d += 32) dot += sq[h * kHeadDim + d] * rows[k * kHeadDim + d];
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
      if (lane == 0) ss[pair] = tvalid[k] ? dot : -INFINITY;
    }
    __syncthreads();  // scores of the tile are complete
    for (int k = 0; k < kSimpleTile; ++k) seen |= tvalid[k] != 0;
    if (tid < kSimpleHeads) {
      float* s = ss + tid * kSimpleTile;
      float tmax = -INFINITY;
      for (int k = 0; k < kSimpleTile; ++k) tmax = fmaxf(tmax, s[k]);
      const float m_new = fmaxf(m, tmax);
      const float m_use = m_new == -INFINITY ? 0.f : m_new;  // no valid slot yet: exp2(-inf - 0) = 0
      const float a = exp2f(m - m_use);
      float sum = 0.f;
      for (int k = 0; k < kSimpleTile; ++k) {
        const float pk = exp2f(s[k] - m_use);  // a skipped slot: exp2(-inf) = 0 (its row is zero-filled)
        s[k] = pk;
        sum += pk;
      }
      l = l * a + sum;
      m = m_new;
      alpha[tid] = a;
    }
    __syncthreads();  // P and the rescale factors are complete
#pragma unroll
    for (int h = 0; h < kSimpleHeads; ++h) {
      acc[h][0] *= alpha[h];
      acc[h][1] *= alpha[h];
    }
    for (int k = 0; k < kSimpleTile; ++k) {
      const float2 v = *reinterpret_cast<const float2*>(rows + k * kHeadDim + col);
#pragma unroll
      for (int h = 0; h < kSimpleHeads; ++h) {
        const float pk = ss[h * kSimpleTile + k];
        acc[h][0] += pk * v.x;
        acc[h][1] += pk * v.y;
      }
    }
  }
  cp_async_wait<0>();

  // Epilogue. `seen` is decided from the slots, not from l: a NaN score must propagate.
  if (tid < kSimpleHeads) {
    const float lse = (m + __log2f(l)) * kLn2;
    float factor = 1.f / l;
    if (p.num_splits == 1 && p.attn_sink != nullptr && tid < heads)
      factor *= 1.f / (1.f + exp2f((p.attn_sink[blk.head0 + tid] - lse) * kLog2e));
    inv[tid] = seen ? factor : 0.f;
    lse_row[tid] = seen ? lse : (p.num_splits == 1 ? INFINITY : -INFINITY);
  }
  __syncthreads();
  if (p.num_splits == 1) {
    T* out = static_cast<T*>(p.out) + row0 * kLatentDim + col;
#pragma unroll
    for (int h = 0; h < kSimpleHeads; ++h) {  // unrolled: acc stays in registers
      if (h >= heads) break;
      out[h * kLatentDim] = TypeTraits<T>::from_float(acc[h][0] * inv[h]);
      out[h * kLatentDim + 1] = TypeTraits<T>::from_float(acc[h][1] * inv[h]);
    }
    if (tid < heads) p.lse[row0 + tid] = lse_row[tid];
  } else {
    const int64_t rows_total = static_cast<int64_t>(p.batch) * p.seqlen_q * p.num_heads;
    const int64_t base = blk.split * rows_total + row0;
#pragma unroll
    for (int h = 0; h < kSimpleHeads; ++h) {
      if (h >= heads) break;
      *reinterpret_cast<float2*>(p.o_accum + (base + h) * kLatentDim + col) =
          make_float2(acc[h][0] * inv[h], acc[h][1] * inv[h]);
    }
    if (tid < heads) p.lse_accum[base + tid] = lse_row[tid];
  }
}

// ---------------------------------------------------------------------------------------
// Tensor-core kernel (bf16 q; fp8 or bf16 cache): the dense kernel's warp layout
// (decode_tc.cuh) on a gathered tile. CTA = (block of BM heads, split, query, sequence);
// warp (wm, wn) owns head rows [16 wm, 16 wm + 16) and, for S = Q K^T, the tile's slots
// [wn BN/2, (wn + 1) BN/2); P goes through shared memory and each warp accumulates output
// columns [256 wn, 256 wn + 256) of its rows (mma.sync m16n8k16, fp32 accumulators).
// Per tile: the raw tokens (cp.async, 2-deep ring) are dequantised ONCE into a bf16 tile
// (value * scale is exact in bf16: a power-of-two scale; NaN -> 0) that serves as K and V
// for all heads. compute_scores / accumulate_pv are decode_tc.cuh's; a sparse tile has no
// causal band, so accumulate_pv's masked-key path never runs (skipped slots are zero rows
// with P = 0, never 0 * NaN).
template <int BM, int BN>
struct SparseTcConfig : TcConfig<BM, BN, 2, false> {};

template <typename C, typename Cfg>
struct SparseTcLayout {
  static constexpr int BM = Cfg::kBlockM, BN = Cfg::kBlockN, RS = Cfg::kRowElems;
  static constexpr size_t kRaw = size_t(BN) * token_bytes<C>();     // one ring slot
  static constexpr size_t kRingOff = 0;                               // [2][BN][token bytes]
  static constexpr size_t kQOff = kRingOff + 2 * kRaw;                // [BM][RS] bf16
  static constexpr size_t kKVOff = kQOff + size_t(BM) * RS * 2;       // [BN][RS] bf16, dequantised
  static constexpr size_t kPOff = kKVOff + size_t(BN) * RS * 2;       // [BM][kPRow] bf16
  static constexpr size_t kMaxOff = kPOff + size_t(BM) * Cfg::kPRow * 2;  // [2][BM] fp32 row maxima
  static constexpr size_t kSumOff = kMaxOff + size_t(2) * BM * 4;     // [2][BM] fp32 row sums
  static constexpr size_t kValidOff = kSumOff + size_t(2) * BM * 4;   // [2][BN] int
  static constexpr size_t kBytes = kValidOff + size_t(2) * BN * 4;
  static_assert(kRaw % 16 == 0 && kQOff % 16 == 0 && kKVOff % 16 == 0 && kPOff % 16 == 0, "16-byte alignment");
};

// Ring slot -> bf16 tile [BN][RS]: units of 8 values (16 output bytes), 72 per token.
template <typename C, typename Cfg>
__device__ __forceinline__ void dequantize_tile_bf16(const unsigned char* raw, __nv_bfloat16* kv, int tid) {
  using Tr = TypeTraits<__nv_bfloat16>;
  constexpr int kUnits = kHeadDim / 8;
  for (int u = tid; u < Cfg::kBlockN * kUnits; u += Cfg::kThreads) {
    const int k = u / kUnits, c = u - k * kUnits;
    const unsigned char* tok = raw + k * token_bytes<C>();
    uint4 v;
    uint32_t* w = reinterpret_cast<uint32_t*>(&v);
    if (std::is_same_v<C, uint8_t> && c < kLatentDim / 8) {
      const uint2 codes = *reinterpret_cast<const uint2*>(tok + 8 * c);
      const float scale = *reinterpret_cast<const float*>(tok + kFp8ScaleOffset + 4 * (c / 16));
      uint4 exact;  // the 8 e4m3 values as bf16 pairs, exactly (NaN codes -> NaN), fp8.cuh
      e4m3x8_to<__nv_bfloat16>(codes, exact);
      const uint32_t* x = reinterpret_cast<const uint32_t*>(&exact);
#pragma unroll
      for (int e = 0; e < 4; ++e) {  // x fp32 scale, exact for a power of two; NaN -> 0
        const float lo = nan_to_zero(__uint_as_float(x[e] << 16) * scale);
        const float hi = nan_to_zero(__uint_as_float(x[e] & 0xffff0000u) * scale);
        w[e] = Tr::pack2(lo, hi);
      }
    } else {
      // 8 bf16 values as stored (the fp8 layout's rope, or a bf16 cache row): NaN -> 0.
      const unsigned char* src = std::is_same_v<C, uint8_t> ? tok + kFp8RopeOffset + 16 * (c - kLatentDim / 8)
                                                            : tok + 16 * c;
      v = *reinterpret_cast<const uint4*>(src);
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        if ((w[e] & 0x7fffu) > 0x7f80u) w[e] &= 0xffff0000u;
        if ((w[e] & 0x7fff0000u) > 0x7f800000u) w[e] &= 0x0000ffffu;
      }
    }
    *reinterpret_cast<uint4*>(kv + k * Cfg::kRowElems + c * 8) = v;
  }
}

template <typename C, typename Cfg>
__global__ void __launch_bounds__(Cfg::kThreads, 1) sparse_tc_kernel(const SparseCudaParams p) {
  using T = __nv_bfloat16;
  using Tr = TypeTraits<T>;
  using L = SparseTcLayout<C, Cfg>;
  constexpr int BM = Cfg::kBlockM, BN = Cfg::kBlockN, RS = Cfg::kRowElems;
  unsigned char* smem = dynamic_smem();
  unsigned char* ring = smem + L::kRingOff;
  T* sq = reinterpret_cast<T*>(smem + L::kQOff);
  T* kv = reinterpret_cast<T*>(smem + L::kKVOff);
  T* sp = reinterpret_cast<T*>(smem + L::kPOff);
  float* row_max = reinterpret_cast<float*>(smem + L::kMaxOff);
  float* row_sum = reinterpret_cast<float*>(smem + L::kSumOff);
  int* valid = reinterpret_cast<int*>(smem + L::kValidOff);

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wn = warp % Cfg::kWarpsN, wm = warp / Cfg::kWarpsN;
  const int q8 = (lane & 3) * 2;
  const int32_t groups = ceil_div(p.num_heads, BM);
  SparseBlock blk;
  blk.bi = blockIdx.z;
  blk.j = blockIdx.y;
  blk.head0 = static_cast<int32_t>(blockIdx.x % groups) * BM;
  blk.split = static_cast<int32_t>(blockIdx.x / groups);
  blk.n_main = source_limit(p.main, blk.bi);
  const int32_t n_slots = blk.n_main + (p.has_extra ? source_limit(p.extra, blk.bi) : 0);
  blk.range = split_range(n_slots, BN, blk.split, p.num_splits);
  const int32_t heads = min(BM, p.num_heads - blk.head0);
  const int64_t row0 = (static_cast<int64_t>(blk.bi) * p.seqlen_q + blk.j) * p.num_heads + blk.head0;

  // Q rows (zero past the last head) and the first tile, one commit group.
  {
    const T* q = static_cast<const T*>(p.q) + row0 * kHeadDim;
    for (int c = tid; c < BM * Cfg::kChunks; c += Cfg::kThreads) {
      const int r = c / Cfg::kChunks, ch = c - r * Cfg::kChunks;
      cp_async_16(sq + r * RS + ch * 8, r < heads ? q + r * kHeadDim + ch * 8 : q, r < heads);
    }
  }
  if (blk.range.tile_begin < blk.range.tile_end)
    gather_tile<C, BN, Cfg::kThreads>(p, blk, blk.range.tile_begin, ring, valid, tid);
  cp_async_commit();

  // The dense kernel's row bookkeeping: this lane's rows r_lo, r_hi of the warp's 16.
  TcRows rows;
  rows.r_lo = wm * 16 + (lane >> 2);
  rows.r_hi = rows.r_lo + 8;
  rows.m_lo = rows.m_hi = -INFINITY;
  rows.l_lo = rows.l_hi = 0.f;
  rows.lim_lo = rows.lim_hi = 0;  // only read by accumulate_pv's causal-band path, never taken here
  TcBlock band_free{};             // accumulate_pv's band [block_min_lim, key_end) is empty
  band_free.block_min_lim = band_free.range.key_end = 0;
  const bool warp_active = wm * 16 < heads;
  const float scale_log2 = p.softmax_scale * kLog2e;
  bool seen = false;

  float o[Cfg::kOTiles][4];
#pragma unroll
  for (int t = 0; t < Cfg::kOTiles; ++t) o[t][0] = o[t][1] = o[t][2] = o[t][3] = 0.f;
  const T* a_base = sq + (wm * 16 + (lane & 15)) * RS + (lane >> 4) * 8;

  for (int it = 0, tile = blk.range.tile_begin; tile < blk.range.tile_end; ++it, ++tile) {
    cp_async_wait<0>();
    __syncthreads();  // tile `tile` landed; the previous tile's K/V and P are consumed
    if (tile + 1 < blk.range.tile_end)
      gather_tile<C, BN, Cfg::kThreads>(p, blk, tile + 1, ring + ((it + 1) % 2) * L::kRaw, valid + ((it + 1) % 2) * BN,
                                        tid);
    cp_async_commit();
    dequantize_tile_bf16<C, Cfg>(ring + (it % 2) * L::kRaw, kv, tid);
    const int* tvalid = valid + (it % 2) * BN;
    __syncthreads();  // the bf16 tile is complete
    for (int k = 0; k < BN; ++k) seen |= tvalid[k] != 0;

    float s[Cfg::kSTiles][4];
    compute_scores<T, Cfg>(a_base, kv, wn, lane, warp_active, s);
    {
      // Skipped slots -> -inf; scale to log2 units; the quad's row maxima of this key half.
      float mx_lo = -INFINITY, mx_hi = -INFINITY;
#pragma unroll
      for (int n = 0; n < Cfg::kSTiles; ++n)
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          const bool ok = tvalid[wn * Cfg::kKeysPerWarp + n * 8 + q8 + e] != 0;
          s[n][e] = ok ? s[n][e] * scale_log2 : -INFINITY;
          s[n][2 + e] = ok ? s[n][2 + e] * scale_log2 : -INFINITY;
          mx_lo = fmaxf(mx_lo, s[n][e]);
          mx_hi = fmaxf(mx_hi, s[n][2 + e]);
        }
      mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, 1));
      mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, 2));
      mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, 1));
      mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, 2));
      if ((lane & 3) == 0) {
        row_max[wn * BM + rows.r_lo] = mx_lo;
        row_max[wn * BM + rows.r_hi] = mx_hi;
      }
    }
    __syncthreads();  // both key halves' row maxima are visible
    {
      const float tmax_lo = fmaxf(row_max[rows.r_lo], row_max[BM + rows.r_lo]);
      const float tmax_hi = fmaxf(row_max[rows.r_hi], row_max[BM + rows.r_hi]);
      const float new_lo = fmaxf(rows.m_lo, tmax_lo), new_hi = fmaxf(rows.m_hi, tmax_hi);
      const float use_lo = new_lo == -INFINITY ? 0.f : new_lo;  // nothing valid yet: exp2(-inf - 0) = 0
      const float use_hi = new_hi == -INFINITY ? 0.f : new_hi;
      const float alpha_lo = exp2f(rows.m_lo - use_lo), alpha_hi = exp2f(rows.m_hi - use_hi);
      rows.m_lo = new_lo;
      rows.m_hi = new_hi;
      float sum_lo = 0.f, sum_hi = 0.f;
      T* p_lo = sp + rows.r_lo * Cfg::kPRow + wn * Cfg::kKeysPerWarp + q8;
      T* p_hi = sp + rows.r_hi * Cfg::kPRow + wn * Cfg::kKeysPerWarp + q8;
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
    __syncthreads();  // P of both key halves is in shared memory
    if (warp_active) accumulate_pv<T, Cfg>(kv, sp, band_free, rows, tile, wm, wn, lane, q8, o);
  }
  cp_async_wait<0>();

  // Epilogue: full row sums (quad, then the other key half), then out / lse / the sink.
  float l_lo = rows.l_lo, l_hi = rows.l_hi;
  l_lo += __shfl_xor_sync(0xffffffffu, l_lo, 1);
  l_lo += __shfl_xor_sync(0xffffffffu, l_lo, 2);
  l_hi += __shfl_xor_sync(0xffffffffu, l_hi, 1);
  l_hi += __shfl_xor_sync(0xffffffffu, l_hi, 2);
  if ((lane & 3) == 0) {
    row_sum[wn * BM + rows.r_lo] = l_lo;
    row_sum[wn * BM + rows.r_hi] = l_hi;
  }
  __syncthreads();
  const int col0 = wn * Cfg::kOCols + q8;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = half ? rows.r_hi : rows.r_lo;
    if (r >= heads) continue;
    const float m = half ? rows.m_hi : rows.m_lo;
    const float tot = row_sum[r] + row_sum[BM + r];
    const float lse = (m + __log2f(tot)) * kLn2;
    float inv = 1.f / tot;
    if (p.num_splits == 1 && p.attn_sink != nullptr)
      inv *= 1.f / (1.f + exp2f((p.attn_sink[blk.head0 + r] - lse) * kLog2e));
    if (!seen) inv = 0.f;
    const float lse_out = seen ? lse : (p.num_splits == 1 ? INFINITY : -INFINITY);
    if (p.num_splits == 1) {
      T* dst = static_cast<T*>(p.out) + (row0 + r) * kLatentDim + col0;
#pragma unroll
      for (int t = 0; t < Cfg::kOTiles; ++t)
        *reinterpret_cast<uint32_t*>(dst + t * 8) = Tr::pack2(o[t][2 * half] * inv, o[t][2 * half + 1] * inv);
      if (wn == 0 && (lane & 3) == 0) p.lse[row0 + r] = lse_out;
    } else {
      const int64_t rows_total = static_cast<int64_t>(p.batch) * p.seqlen_q * p.num_heads;
      const int64_t idx = blk.split * rows_total + row0 + r;
      float* dst = p.o_accum + idx * kLatentDim + col0;
#pragma unroll
      for (int t = 0; t < Cfg::kOTiles; ++t)
        *reinterpret_cast<float2*>(dst + t * 8) = make_float2(o[t][2 * half] * inv, o[t][2 * half + 1] * inv);
      if (wn == 0 && (lane & 3) == 0) p.lse_accum[idx] = lse_out;
    }
  }
}

// Tensor-core configurations (heads per CTA, slots per tile), largest first; the planner
// takes the first whose shared memory fits the device.
using SparseTcL = SparseTcConfig<64, 32>;  // fp8: 156.8 KB (sm_80, sm_90); bf16 cache: 187.8 KB (sm_90)
using SparseTcM = SparseTcConfig<32, 32>;  // fp8: 117.0 KB; bf16 cache: 148.0 KB (sm_80)
using SparseTcS = SparseTcConfig<32, 16>;  // fp8: 77.4 KB; bf16 cache: 92.9 KB (sm_86 / sm_89: 99 KB)
constexpr int kSparseTcConfigs = 3;
constexpr int kSparseTcBlockM[kSparseTcConfigs] = {SparseTcL::kBlockM, SparseTcM::kBlockM, SparseTcS::kBlockM};
constexpr int kSparseTcBlockN[kSparseTcConfigs] = {SparseTcL::kBlockN, SparseTcM::kBlockN, SparseTcS::kBlockN};

template <typename C>
size_t sparse_tc_smem(int config) {
  switch (config) {
    case 0: return SparseTcLayout<C, SparseTcL>::kBytes;
    case 1: return SparseTcLayout<C, SparseTcM>::kBytes;
    default: return SparseTcLayout<C, SparseTcS>::kBytes;
  }
}

template <typename C, typename Cfg>
cudaError_t launch_tc(const SparseCudaParams& p, cudaStream_t stream) {
  auto kernel = sparse_tc_kernel<C, Cfg>;
  constexpr size_t smem = SparseTcLayout<C, Cfg>::kBytes;
  const cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  const dim3 grid(static_cast<uint32_t>(ceil_div(p.num_heads, Cfg::kBlockM) * p.num_splits),
                  static_cast<uint32_t>(p.seqlen_q), static_cast<uint32_t>(p.batch));
  MLA_LAUNCH(kernel, grid, Cfg::kThreads, smem, stream, p);
  return cudaGetLastError();
}

template <typename C>
cudaError_t launch_tc_config(const SparseCudaParams& p, int config, cudaStream_t stream) {
  switch (config) {
    case 0: return launch_tc<C, SparseTcL>(p, stream);
    case 1: return launch_tc<C, SparseTcM>(p, stream);
    case 2: return launch_tc<C, SparseTcS>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

// ---------------------------------------------------------------------------------------
// Launchers and planning.
template <typename T, typename C>
cudaError_t launch_simple(const SparseCudaParams& p, cudaStream_t stream) {
  auto kernel = sparse_simple_kernel<T, C>;
  constexpr size_t smem = SimpleLayout<C>::kBytes;
  if (smem > 48 * 1024) {
    const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (err != cudaSuccess) return err;
  }
  const dim3 grid(static_cast<uint32_t>(ceil_div(p.num_heads, kSimpleHeads) * p.num_splits),
                  static_cast<uint32_t>(p.seqlen_q), static_cast<uint32_t>(p.batch));
  MLA_LAUNCH(kernel, grid, kSimpleThreads, smem, stream, p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_simple_for_cache(const SparseCudaParams& p, cudaStream_t stream) {
  switch (p.cache_dtype) {
    case DType::kFloat8E4M3: return launch_simple<T, uint8_t>(p, stream);
    case DType::kBFloat16: return launch_simple<T, __nv_bfloat16>(p, stream);
    case DType::kFloat16: return launch_simple<T, __half>(p, stream);
    case DType::kFloat32: return launch_simple<T, float>(p, stream);
  }
  return cudaErrorInvalidValue;
}

struct DeviceInfo {
  int sms = 0;
  int smem_optin = 0;  // bytes of dynamic shared memory one block may opt into
};

DeviceInfo device_info(int device) {
  constexpr int kMaxDevices = 64;
  static DeviceInfo cache[kMaxDevices];
  static std::once_flag once[kMaxDevices];
  auto query = [device] {
    DeviceInfo d;
    cudaDeviceGetAttribute(&d.sms, cudaDevAttrMultiProcessorCount, device);
    cudaDeviceGetAttribute(&d.smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
    return d;
  };
  if (device < 0 || device >= kMaxDevices) return query();
  std::call_once(once[device], [&] { cache[device] = query(); });
  return cache[device];
}

// Splits so that base_ctas * splits covers `slots` CTA slots, each split keeping at least
// 4 tiles of `tile` slots of the topk capacity (a shape, never topk_length's values).
int32_t choose_splits(int64_t base_ctas, int64_t slots, int64_t capacity_slots, int tile) {
  if (base_ctas <= 0 || base_ctas >= slots) return 1;
  const int64_t by_work = (capacity_slots + tile - 1) / tile / 4;
  const int64_t want = std::min<int64_t>((slots + base_ctas - 1) / base_ctas, by_work);
  return static_cast<int32_t>(std::max<int64_t>(1, std::min<int64_t>(want, 64)));
}

}  // namespace

SparsePlan plan_sparse_decode(const SparseCudaParams& p, int device, SparseImpl requested) {
  const DeviceInfo info = device_info(device);
  SparsePlan plan{};
  plan.impl = SparseImpl::kSimple;
  plan.config = -1;
  const bool fp8 = p.cache_dtype == DType::kFloat8E4M3;
  const bool q_aligned = reinterpret_cast<uintptr_t>(p.q) % 16 == 0;  // Q rows arrive by 16-byte cp.async
  if (requested != SparseImpl::kSimple && p.q_dtype == DType::kBFloat16 && q_aligned &&
      (fp8 || p.cache_dtype == DType::kBFloat16)) {
    for (int c = 0; c < kSparseTcConfigs; ++c) {
      const size_t smem = fp8 ? sparse_tc_smem<uint8_t>(c) : sparse_tc_smem<__nv_bfloat16>(c);
      if (smem <= static_cast<size_t>(info.smem_optin)) {
        plan.impl = SparseImpl::kTensorCore;
        plan.config = c;
        break;
      }
    }
  }
  const int64_t capacity = static_cast<int64_t>(p.main.topk) + (p.has_extra ? p.extra.topk : 0);
  const int64_t bsq = static_cast<int64_t>(p.batch) * p.seqlen_q;
  const int sms = std::max(1, info.sms);
  if (plan.impl == SparseImpl::kTensorCore) {
    const int bm = kSparseTcBlockM[plan.config];
    plan.num_splits = choose_splits(bsq * ceil_div(p.num_heads, bm), sms, capacity, kSparseTcBlockN[plan.config]);
  } else {
    plan.num_splits = choose_splits(bsq * ceil_div(p.num_heads, kSimpleHeads), 2 * static_cast<int64_t>(sms),
                                    capacity, kSimpleTile);
  }
  if (plan.num_splits > 1) {
    const int64_t rows = bsq * p.num_heads;
    plan.workspace_o = plan.num_splits * rows * kLatentDim;
    plan.workspace_lse = plan.num_splits * rows;
  }
  return plan;
}

cudaError_t sparse_decode(const SparseCudaParams& params, const SparsePlan& plan, cudaStream_t stream) {
  if (static_cast<int64_t>(params.batch) * params.seqlen_q * params.num_heads == 0) return cudaSuccess;
  SparseCudaParams p = params;
  p.num_splits = plan.num_splits;
  if (p.num_splits > 1 && (p.o_accum == nullptr || p.lse_accum == nullptr)) return cudaErrorInvalidValue;
  cudaError_t err = cudaErrorInvalidValue;
  if (plan.impl == SparseImpl::kTensorCore) {
    if (p.q_dtype != DType::kBFloat16) return cudaErrorInvalidValue;
    if (p.cache_dtype == DType::kFloat8E4M3) err = launch_tc_config<uint8_t>(p, plan.config, stream);
    else if (p.cache_dtype == DType::kBFloat16) err = launch_tc_config<__nv_bfloat16>(p, plan.config, stream);
    else return cudaErrorInvalidValue;
  } else switch (p.q_dtype) {
    case DType::kBFloat16: err = launch_simple_for_cache<__nv_bfloat16>(p, stream); break;
    case DType::kFloat16: err = launch_simple_for_cache<__half>(p, stream); break;
    case DType::kFloat32: err = launch_simple_for_cache<float>(p, stream); break;
    default: return cudaErrorInvalidValue;
  }
  if (err != cudaSuccess || p.num_splits == 1) return err;
  // The shared combine (combine.cuh) with the sink and the sparse "no valid slot: lse +inf".
  const int64_t rows = static_cast<int64_t>(p.batch) * p.seqlen_q * p.num_heads;
  const CombineArgs args{p.o_accum, p.lse_accum, p.out, p.lse, p.attn_sink, rows, p.num_heads, INFINITY};
  return launch_combine_for(p.q_dtype, args, SparseSplitLayout{rows, p.num_splits}, stream);
}

}  // namespace mla::cuda
