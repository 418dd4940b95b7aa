// Hopper (sm_90a) MLA decode, bf16 or fp16 query with a cache of the same type or fp8 (issue 11,
// stage 2). Torch-free; the same DecodeParams and split-KV partial format as the sm80 tensor-core
// kernel (decode_tc.cuh), but scheduled on the device: persistent CTAs walk the pieces that
// schedule.cuh's metadata kernel assigned from the actual seqlens, and combine.cuh merges the
// units that were cut.
//
// A piece = (row block of 64 query rows of a sequence, a range of its 64-key tiles); one CTA
// does its pieces in turn; rows r = j * h + head of the sequence's M = s_q * h, as in
// decode_tc.cuh. 384 threads, three warpgroups:
//   WG 0, WG 1  consumers. Each computes the whole S = Q K^T [64 x 64] of a key tile with
//               wgmma (A = Q, B = K, both K-major from shared memory), the online softmax in
//               registers, P -> bf16 registers, and O += P V with wgmma RS (A = P from
//               registers, B = V MN-major from the same shared tile) for ITS 256 output
//               columns: WG g owns columns [256 g, 256 g + 256), 128 fp32 accumulators.
//               512 columns in one warpgroup would be 256 accumulators per thread (more than
//               the 255-register limit), so the columns are split across two warpgroups; the
//               scores are computed by both (redundant tensor work, 576 of 1664 MACs per key
//               and row, but no cross-warpgroup softmax exchange: decode is bound by the
//               cache bytes, not by the tensor cores).
//   WG 2        producer: fills a 2-stage ring of 128-byte-swizzled [64 x 576] tiles, full /
//               empty mbarriers (full counts the 128 producer threads' arrivals + TMA bytes).
//               TMA (16-bit cache, block_size % 64 == 0, blocks evenly spaced: the host passes a
//               2-D tensor map of the cache's NB * BS rows of 576 elements, cache_tma): a tile
//               whose 64 keys are all valid (tile end <= the split's key_end) lies in ONE block
//               (tile starts are multiples of 64, so of no block boundary but block_size's), so
//               one elected thread issues 9 boxes [64 rows x 64 columns] (one per 128-byte
//               chunk, swizzled by the TMA unit exactly as swizzled_offset) with expect_tx of
//               the tile's 73728 bytes; the other 127 threads just arrive. An out-of-range block
//               id gets a box past the tensor's last row: zero-filled, like the gather's zero rows.
//               Every other tile (the partial last tile of a split / sequence, whose rows past
//               key_end are valid memory holding another sequence's or poisoned slots: TMA
//               zero-fills only at the tensor's edge; any block_size; the fp8 cache) is gathered
//               with 16-byte cp.async, rows past key_end zero-filled. So no tile ever holds a
//               NaN-poisoned unused slot and the consumers need no masking of P or V fix-up for
//               them: at most one tile per split takes the slower gather.
//               The fp8 cache stays on cp.async: its stage is half the bytes and the consumers'
//               conversion (not the copy) is its critical path; a TMA box of raw fp8 rows would
//               need a different raw layout (3 boxes of 192 bytes) for the same gain.
//
// Shared tiles (Q and each ring stage): 9 column chunks of [64 rows x 64 bf16 = 128 bytes],
// 8 KB each, 1024-aligned; element (r, c) at chunk c / 64, byte r * 128 + (16-byte unit ^ (r % 8))
// (the 128-byte swizzle acts on shared-address bits 4-6 ^ 7-9). The same bytes serve as
//   K (K-major B of Q K^T): chunk c, SBO 1024 (8-row groups), k-step +32 bytes;
//   V (MN-major B of P V):  chunks 4 g..4 g + 3 for WG g, LBO 8192 (64-column blocks),
//                           SBO 1024 (8-key groups), k-step (16 keys) +2048 bytes.
//
// A masked (row, key) pair has P = 0, but the P V wgmma still multiplies it by V, and 0 x inf /
// NaN is NaN. Unused (poisoned) slots are zero-filled, so this only concerns the causal band
// [band_lo, key_end) (keys some MTP rows of the block see and others must not; at most
// s_q - 1 keys): in a tile that holds band keys, after both consumers' S wgmmas are done, each
// consumer adds the non-finite V entries of the band keys in its columns by hand to the rows
// that see them, then zeroes those entries, so the wgmma adds 0 for every row.
//
// float8_e4m3fn cache (kFp8): the ring holds the raw fp8 rows (576 B, unswizzled: half the bytes
// of a bf16 stage); at each tile both consumers (after a named barrier: the previous tile's
// wgmmas are complete) convert the stage into ONE bf16 tile in the swizzled layout above
// (exact: every e4m3 value is a bf16 number), release the fp8 stage to the producer at once,
// and run the same wgmmas on the converted tile. kv_scale is folded as in decode_tc.cuh: into
// the score scale, and once into the output.
#pragma once
#include "ptx_sm90.cuh"
// (after ptx_sm90.cuh, which brings common.cuh: fp8.cuh builds on it)
#include "../fp8.cuh"
#include "../schedule.cuh"

namespace mla::cuda::sm90 {

using namespace ::mla::sm90;  // the PTX wrappers (ptx_sm90.cuh)

constexpr int kBlockM = 64;                       // query rows per CTA (one wgmma M)
constexpr int kBlockN = 64;                       // keys per tile
constexpr int kStages = 2;
constexpr int kThreads = 384;                     // WG 0, 1: consumers; WG 2: producer
constexpr int kChunkCols = 64;                    // bf16 columns per 128-byte swizzle row
constexpr int kChunks = kHeadDim / kChunkCols;    // 9
constexpr uint32_t kChunkBytes = 64 * 128;        // [64 rows x 128 B]
constexpr uint32_t kTileBytes = kChunks * kChunkBytes;  // 73728: Q or one ring stage
constexpr int kUnitsPerRow = kHeadDim / 8;        // 72 16-byte units per row
constexpr int kOCols = kLatentDim / 2;            // output columns per consumer warpgroup
constexpr uint32_t kFp8StageBytes = kBlockN * kHeadDim;  // 36864: one raw fp8 ring stage
// Dynamic shared memory: 1024 bytes of alignment slack, Q, the ring (fp8: the converted tile,
// then the 2 raw stages: the same bytes), 2 x kStages mbarriers.
static_assert(kTileBytes + kStages * kFp8StageBytes == kStages * kTileBytes, "fp8 layout reuses the bf16 one");
constexpr uint32_t kBarOffset = (1 + kStages) * kTileBytes;
constexpr size_t kSmemBytes = 1024 + kBarOffset + 2 * kStages * 8;  // 222240 (sm_90 opt-in: 232448)

// Byte offset of 16-byte unit `unit` (0..71) of row `row` in a swizzled tile.
__device__ __forceinline__ uint32_t swizzled_offset(int row, int unit) {
  return (unit / 8) * kChunkBytes + row * 128 + (((unit % 8) ^ (row % 8)) * 16);
}

// a[idx] for a register array without dynamic indexing (no local memory): a select chain.
template <int N>
__device__ __forceinline__ float pick(const float (&a)[N], int idx) {
  float v = 0.f;
#pragma unroll
  for (int i = 0; i < N; ++i) v = i == idx ? a[i] : v;
  return v;
}

// The value v of lane (lane & ~3) | q of this lane's quad (butterfly shuffles: uniform lane masks).
__device__ __forceinline__ float quad_get(float v, int q, int lane) {
  const float x1 = __shfl_xor_sync(0xffffffffu, v, 1), x2 = __shfl_xor_sync(0xffffffffu, v, 2);
  const float x3 = __shfl_xor_sync(0xffffffffu, x1, 2);
  const int d = (lane % 4) ^ q;
  return d == 0 ? v : d == 1 ? x1 : d == 2 ? x2 : x3;
}

__device__ __forceinline__ bool nonfinite(float x) { return (__float_as_uint(x) & 0x7f800000u) == 0x7f800000u; }

// Online-softmax state of one thread's two rows (r_lo, r_hi = r_lo + 8 of the block).
struct Sm90Rows {
  int r_lo, r_hi;
  int32_t lim_lo, lim_hi;  // keys visible within the split (0 for padding rows)
  float m_lo, m_hi;        // running max (log2 units)
  float l_lo, l_hi;        // this thread's partial row sums
};

// One piece of the schedule as the kernel sees it (uniform across the block).
struct Sm90Work {
  int32_t b, m0, L;  // sequence, first row of the row block, clamped cache length
  SplitRange range;  // the piece's key tiles, key_end = min(the block's keys, tile_end * kBlockN)
  int32_t slot;      // -1: the whole unit, written to out / lse; else its partial slot (schedule.cuh)
};

__device__ __forceinline__ Sm90Work sm90_work(const DecodeParams& p, const SchedPiece& piece, int32_t m_blocks) {
  Sm90Work w;
  w.b = piece.unit / m_blocks;
  w.m0 = (piece.unit % m_blocks) * kBlockM;
  w.L = clamped_seqlen(p, w.b);
  w.range.tile_begin = piece.tile_begin;
  w.range.tile_end = piece.tile_end;
  w.range.key_end = min(sched_unit_keys<kBlockM>(p, w.b, w.m0), piece.tile_end * kBlockN);
  w.slot = piece.slot;
  return w;
}

// The Q block of a piece, by the 256 consumer threads, between two consumer barriers (the
// previous piece's S wgmmas of both warpgroups are complete before Q is overwritten).
template <typename T>
__device__ __forceinline__ void load_q_block(const DecodeParams& p, unsigned char* q_tile, const Sm90Work& w) {
  const int32_t h = p.num_heads, M = p.seqlen_q * h, b = w.b, m0 = w.m0;
  named_barrier_sync(1, 256);
  // Rows past M are zero (their scores are masked anyway).
  {
    const T* qn = static_cast<const T*>(p.q_nope);
    const T* qp = static_cast<const T*>(p.q_pe);
    for (int c = threadIdx.x; c < kBlockM * kUnitsPerRow; c += 256) {
      const int row = c / kUnitsPerRow, unit = c % kUnitsPerRow;
      const int32_t r = m0 + row;
      const bool valid = r < M;
      const T* src = qn;
      if (valid) {
        const int32_t j = r / h, head = r % h;
        src = unit < kLatentDim / 8
                  ? qn + b * p.q_nope_batch_stride + j * p.q_nope_seq_stride + head * p.q_nope_head_stride + unit * 8
                  : qp + b * p.q_pe_batch_stride + j * p.q_pe_seq_stride + head * p.q_pe_head_stride +
                        (unit - kLatentDim / 8) * 8;
      }
      cp_async_16(q_tile + swizzled_offset(row, unit), src, valid);
    }
    cp_async_commit();
    cp_async_wait<0>();
    fence_proxy_async();  // the generic-proxy copies before the wgmmas' (async-proxy) reads
  }
  named_barrier_sync(1, 256);  // the whole Q block is in shared memory
}

// The consumer warpgroups' work on one piece: S = Q K^T, online softmax, O += P V over its
// tiles (`it` counts the ring's tiles across pieces), then the epilogue.
template <typename T, bool kFp8>
__device__ __forceinline__ void consume_piece(const DecodeParams& p, unsigned char* q_tile, unsigned char* conv,
                                              unsigned char* ring, uint64_t* full, uint64_t* empty,
                                              const Sm90Work& w, int& it) {
  const int32_t h = p.num_heads, M = p.seqlen_q * h, b = w.b, m0 = w.m0, L = w.L;
  const SplitRange range = w.range;
  const int wg = threadIdx.x / 128;  // output columns [256 wg, 256 wg + 256)
  const int warp = (threadIdx.x % 128) / 32, lane = threadIdx.x % 32;
  Sm90Rows rows;
  rows.r_lo = 16 * warp + lane / 4;
  rows.r_hi = rows.r_lo + 8;
  auto row_limit = [&](int r) {  // keys row r of the block sees within the split (0: padding row)
    return m0 + r < M ? min(range.key_end, visible_keys(L, p.seqlen_q, (m0 + r) / h, p.causal)) : 0;
  };
  rows.lim_lo = row_limit(rows.r_lo);
  rows.lim_hi = row_limit(rows.r_hi);
  rows.m_lo = rows.m_hi = -INFINITY;
  rows.l_lo = rows.l_hi = 0.f;
  // fp8: the dequantization scale, folded into the scores here and the output at the end.
  const float kv_scale = kFp8 ? __ldg(p.kv_scale) : 1.f;
  const float scale_log2 = p.softmax_scale * kv_scale * kLog2e;
  // The causal band: keys the block's first row does not see but its last row does.
  const int32_t band_lo = min(range.key_end, visible_keys(L, p.seqlen_q, m0 / h, p.causal)), band_hi = range.key_end;

  float o[kOCols / 2];  // O fragment, 64 x 256: value i at row 16 warp + lane / 4 + 8 ((i % 4) / 2),
                        // column 256 wg + 8 (i / 4) + 2 (lane % 4) + i % 2
#pragma unroll
  for (int i = 0; i < kOCols / 2; ++i) o[i] = 0.f;
  const uint64_t q_desc = make_smem_desc(q_tile, 16, 1024, Swizzle::k128B);

  for (int tile = range.tile_begin; tile < range.tile_end; ++it, ++tile) {
    const int s = it % kStages;
    mbarrier_wait_parity(&full[s], (it / kStages) & 1);
    unsigned char* kv = ring + s * kTileBytes;
    if constexpr (kFp8) {
      // Both consumers' wgmmas of the previous tile are complete (each waited before this
      // barrier): the converted tile may be overwritten. 18 units of 8 fp8 -> 8 bf16 per thread.
      named_barrier_sync(1, 256);
      const unsigned char* raw8 = ring + s * kFp8StageBytes;
#pragma unroll 2
      for (int c = threadIdx.x; c < kBlockN * kUnitsPerRow; c += 256) {
        const int row = c / kUnitsPerRow, unit = c % kUnitsPerRow;
        uint4 v;
        e4m3x8_to<T>(*reinterpret_cast<const uint2*>(raw8 + row * kHeadDim + unit * 8), v);
        *reinterpret_cast<uint4*>(conv + swizzled_offset(row, unit)) = v;
      }
      mbarrier_arrive(&empty[s]);  // the raw stage is consumed: the producer may refill it now
      fence_proxy_async();         // the converted tile (generic stores) before the wgmma reads
      named_barrier_sync(1, 256);
      kv = conv;
    }

    // S = Q K^T [64 x 64]: 9 chunks x 4 k-steps of 16.
    float sc[kBlockN / 2];
    const uint64_t k_desc = make_smem_desc(kv, 16, 1024, Swizzle::k128B);
    wgmma_fence_operand(sc);
    wgmma_fence();
#pragma unroll
    for (int c = 0; c < kChunks; ++c)
#pragma unroll
      for (int ks = 0; ks < 4; ++ks)
        wgmma_ss<T, kBlockN, 0, 0>(sc, desc_advance(q_desc, c * kChunkBytes + ks * 32),
                                   desc_advance(k_desc, c * kChunkBytes + ks * 32), c > 0 || ks > 0);
    wgmma_commit_group();
    wgmma_wait_group<0>();
    wgmma_fence_operand(sc);

    // Mask (causal limit, split end, padding rows), scale, row max over the quad.
    const int32_t key0 = tile * kBlockN + 2 * (lane % 4);
    float mx_lo = -INFINITY, mx_hi = -INFINITY;
#pragma unroll
    for (int i = 0; i < kBlockN / 2; ++i) {
      const int32_t key = key0 + 8 * (i / 4) + i % 2;
      const bool hi = (i % 4) >= 2;
      sc[i] = key < (hi ? rows.lim_hi : rows.lim_lo) ? sc[i] * scale_log2 : -INFINITY;
      if (hi) mx_hi = fmaxf(mx_hi, sc[i]);
      else mx_lo = fmaxf(mx_lo, sc[i]);
    }
    mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, 1));
    mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, 2));
    mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, 1));
    mx_hi = fmaxf(mx_hi, __shfl_xor_sync(0xffffffffu, mx_hi, 2));
    const float new_lo = fmaxf(rows.m_lo, mx_lo), new_hi = fmaxf(rows.m_hi, mx_hi);
    // Rows that have seen no key keep -inf: subtract 0 instead so exp2 gives 0, not NaN.
    const float use_lo = new_lo == -INFINITY ? 0.f : new_lo, use_hi = new_hi == -INFINITY ? 0.f : new_hi;
    const float alpha_lo = exp2f(rows.m_lo - use_lo), alpha_hi = exp2f(rows.m_hi - use_hi);
    rows.m_lo = new_lo;
    rows.m_hi = new_hi;

    // P = exp2(s - max) -> the bf16 A fragments of the 4 k-steps: k-step ks, register j holds
    // row r_lo (j even) / r_hi (j odd), keys 16 ks + 8 (j / 2) + 2 (lane % 4) and + 1, which are
    // score values i = 4 (2 ks + j / 2) + 2 (j % 2) and i + 1.
    uint32_t pa[kBlockN / 16][4];
    float sum_lo = 0.f, sum_hi = 0.f;
#pragma unroll
    for (int ks = 0; ks < kBlockN / 16; ++ks)
#pragma unroll
      for (int j = 0; j < 4; ++j) {
        const int i = 4 * (2 * ks + j / 2) + 2 * (j % 2);
        const float use = j % 2 ? use_hi : use_lo;
        const float p0 = exp2f(sc[i] - use), p1 = exp2f(sc[i + 1] - use);
        if (j % 2) sum_hi += p0 + p1;
        else sum_lo += p0 + p1;
        pa[ks][j] = TypeTraits<T>::pack2(p0, p1);
      }
    rows.l_lo = rows.l_lo * alpha_lo + sum_lo;
    rows.l_hi = rows.l_hi * alpha_hi + sum_hi;
#pragma unroll
    for (int i = 0; i < kOCols / 2; ++i) o[i] *= (i % 4) >= 2 ? alpha_hi : alpha_lo;

    // Band keys of this tile (uniform across the block): non-finite V entries by hand, then zeroed.
    const int32_t fix_lo = max(band_lo, tile * kBlockN), fix_hi = min(band_hi, (tile + 1) * kBlockN);
    if (fix_lo < fix_hi) {
      named_barrier_sync(1, 256);  // both consumers' S wgmmas are complete: V may change
      unsigned char* v_tile = kv;
#pragma unroll 1
      for (int32_t key = fix_lo; key < fix_hi; ++key) {
        const int kr = key - tile * kBlockN;
        // The scores of this key for my two rows sit with lane (kr % 8) / 2 of my quad.
        const float s_lo = quad_get(pick(sc, 4 * (kr / 8) + kr % 2), (kr % 8) / 2, lane);
        const float s_hi = quad_get(pick(sc, 4 * (kr / 8) + kr % 2 + 2), (kr % 8) / 2, lane);
        const bool see_lo = key < rows.lim_lo, see_hi = key < rows.lim_hi;
        const float p_lo = exp2f(s_lo - use_lo), p_hi = exp2f(s_hi - use_hi);
#pragma unroll
        for (int t = 0; t < kOCols / 8; ++t) {
          const T* v2 = reinterpret_cast<const T*>(v_tile + swizzled_offset(kr, 32 * wg + t) + 4 * (lane % 4));
          const float v0 = TypeTraits<T>::to_float(v2[0]), v1 = TypeTraits<T>::to_float(v2[1]);
          if (nonfinite(v0)) {
            if (see_lo) o[4 * t] += p_lo * v0;
            if (see_hi) o[4 * t + 2] += p_hi * v0;
          }
          if (nonfinite(v1)) {
            if (see_lo) o[4 * t + 1] += p_lo * v1;
            if (see_hi) o[4 * t + 3] += p_hi * v1;
          }
        }
      }
      named_barrier_sync(2 + wg, 128);  // this warpgroup has read its columns of the band keys
      if (warp == 0 && lane < 4) {      // lanes 0-3 of warp 0 cover the warpgroup's 256 columns
#pragma unroll 1
        for (int32_t key = fix_lo; key < fix_hi; ++key)
#pragma unroll 1
          for (int t = 0; t < kOCols / 8; ++t) {
            T* v2 = reinterpret_cast<T*>(v_tile + swizzled_offset(key - tile * kBlockN, 32 * wg + t) + 4 * lane);
            const float v0 = TypeTraits<T>::to_float(v2[0]), v1 = TypeTraits<T>::to_float(v2[1]);
            if (nonfinite(v0) || nonfinite(v1))  // finite entries are exact in T: repacked unchanged
              *reinterpret_cast<uint32_t*>(v2) = TypeTraits<T>::pack2(nonfinite(v0) ? 0.f : v0, nonfinite(v1) ? 0.f : v1);
          }
        fence_proxy_async();  // the generic-proxy stores before the wgmma (async proxy) reads
      }
      named_barrier_sync(2 + wg, 128);  // the zeroed entries are visible to the warpgroup's wgmma
    }

    // O += P V for this warpgroup's 256 columns.
    const uint64_t v_desc = make_smem_desc(kv + 4 * wg * kChunkBytes, 8192, 1024, Swizzle::k128B);
    wgmma_fence_operand(o);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < kBlockN / 16; ++ks)
      wgmma_rs<T, kOCols, 1>(o, pa[ks], desc_advance(v_desc, ks * 2048), true);
    wgmma_commit_group();
    wgmma_wait_group<0>();
    wgmma_fence_operand(o);
    if constexpr (!kFp8) mbarrier_arrive(&empty[s]);  // this thread's wgmmas no longer read stage s
  }

  // ---- Epilogue: full row sums over the quad; normalised rows (and lse) to out or the split's slot.
  float l_lo = rows.l_lo, l_hi = rows.l_hi;
  l_lo += __shfl_xor_sync(0xffffffffu, l_lo, 1);
  l_lo += __shfl_xor_sync(0xffffffffu, l_lo, 2);
  l_hi += __shfl_xor_sync(0xffffffffu, l_hi, 1);
  l_hi += __shfl_xor_sync(0xffffffffu, l_hi, 2);
  // A row that sees no key of this split: out 0, lse -inf, decided from the key ranges (a NaN
  // the row does see must stay NaN, never become an "empty" row).
  const int32_t split_key0 = range.tile_begin * kBlockN;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int32_t row = m0 + (half ? rows.r_hi : rows.r_lo);
    if (row >= M) continue;
    const bool empty_row = (half ? rows.lim_hi : rows.lim_lo) <= split_key0;
    const float tot = half ? l_hi : l_lo, mrow = half ? rows.m_hi : rows.m_lo;
    const float inv = empty_row ? 0.f : kv_scale / tot;
    const float lse = empty_row ? -INFINITY : (mrow + __log2f(tot)) * kLn2;
    const int col0 = kOCols * wg + 2 * (lane % 4);
    if (w.slot < 0) {
      T* dst = static_cast<T*>(p.out) + (static_cast<int64_t>(b) * M + row) * kLatentDim + col0;
#pragma unroll
      for (int t = 0; t < kOCols / 8; ++t)
        *reinterpret_cast<uint32_t*>(dst + 8 * t) =
            TypeTraits<T>::pack2(o[4 * t + 2 * half] * inv, o[4 * t + 2 * half + 1] * inv);
      if (wg == 0 && lane % 4 == 0) p.lse[static_cast<int64_t>(b) * M + row] = lse;
    } else {
      const int64_t base = static_cast<int64_t>(w.slot) * min(M, kBlockM) - m0;  // row m0 + i: slot row i
      float* dst = p.o_accum + (base + row) * kLatentDim + col0;
#pragma unroll
      for (int t = 0; t < kOCols / 8; ++t)
        *reinterpret_cast<float2*>(dst + 8 * t) = make_float2(o[4 * t + 2 * half] * inv, o[4 * t + 2 * half + 1] * inv);
      if (wg == 0 && lane % 4 == 0) p.lse_accum[base + row] = lse;
    }
  }
}

// T: the query / output / compute type (__nv_bfloat16 or __half: wgmma .bf16 / .f16, P rounded to
// T). kFp8 = false: a T cache; true: float8_e4m3fn cache (p.kv_scale), converted to T in shared
// memory (exact for both: every e4m3 value is a bf16 and an fp16 number).
// cache_map / cache_tma: the TMA view of the cache (decode_sm90.cu make_cache_map), used when
// cache_tma (never for kFp8).
template <typename T, bool kFp8>
__global__ void __launch_bounds__(kThreads, 1)
    decode_sm90_kernel(const DecodeParams p, const __grid_constant__ TensorMap cache_map, const bool cache_tma) {
#if defined(MLA_CUDA_EMULATION) || defined(__CUDA_ARCH_FEAT_SM90_ALL)
  static_assert(std::is_same<T, __nv_bfloat16>::value || std::is_same<T, __half>::value, "bf16 or fp16");
  unsigned char* raw = dynamic_smem();
  // 1024-align the tiles in the shared window (the swizzle acts on address bits 4-9).
  unsigned char* smem = raw + ((1024u - (smem_addr(raw) & 1023u)) & 1023u);
  unsigned char* q_tile = smem;                   // [64 x 576] swizzled
  // bf16: ring = [kStages][64 x 576] swizzled tiles. fp8: conv = the converted [64 x 576]
  // swizzled bf16 tile, ring = [kStages][64 rows x 576 bytes] raw fp8 rows.
  unsigned char* conv = smem + kTileBytes;
  unsigned char* ring = kFp8 ? conv + kTileBytes : conv;
  constexpr uint32_t kStageBytes = kFp8 ? kFp8StageBytes : kTileBytes;
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + kBarOffset);  // [kStages] the tile landed
  uint64_t* empty = full + kStages;                                  // [kStages] both consumers done

  // The schedule (schedule.cuh): this CTA's pieces, the same walk for both roles.
  const int32_t m_blocks = ceil_div(p.seqlen_q * p.num_heads, kBlockM);
  SchedCursor cursor(p, p.batch * m_blocks, static_cast<int32_t>(blockIdx.x));

  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbarrier_init(&full[s], 128);   // every producer thread (after its cp.async landed) + TMA bytes
      mbarrier_init(&empty[s], 256);  // every consumer thread, after its wgmmas read the stage
    }
    fence_mbarrier_init();
  }
  __syncthreads();  // the barriers are initialised

  // threadIdx.x is re-read after the barrier, not cached (docs/cuda-emulation.md: GCC would
  // otherwise thread the role branches through it).
  if (threadIdx.x >= 256) {
    // ---- Producer warpgroup: thread t loads half of key row t / 2 of each tile.
    setmaxnreg_dec<40>();
    const int t = threadIdx.x - 256;
    using CacheT = std::conditional_t<kFp8, uint8_t, T>;
    constexpr int kRowUnits = kHeadDim * sizeof(CacheT) / 16;  // 16-byte units per cache row: 72 / 36
    constexpr int kElemsPerUnit = 16 / sizeof(CacheT);
    const int row = t / 2, unit0 = (t % 2) * (kRowUnits / 2);
    int it = 0;  // tiles through the ring, across pieces
    for (SchedPiece piece; cursor.next(piece);) {
      const Sm90Work w = sm90_work(p, piece, m_blocks);
      const int32_t b = w.b;
      const SplitRange range = w.range;
      for (int tile = range.tile_begin; tile < range.tile_end; ++it, ++tile) {
        const int s = it % kStages;
        if (it >= kStages) mbarrier_wait_parity(&empty[s], ((it / kStages) - 1) & 1);
        if (!kFp8 && cache_tma && (tile + 1) * kBlockN <= range.key_end) {
          // TMA: 64 valid keys in one block (header comment); thread 0 issues, the others arrive.
          if (t == 0) {
            const int32_t key0 = tile * kBlockN;
            const int32_t block = p.block_table[static_cast<int64_t>(b) * p.block_table_batch_stride + key0 / p.block_size];
            const int32_t row0 = block >= 0 && block < p.num_blocks ? block * p.block_size + key0 % p.block_size
                                                                    : p.num_blocks * p.block_size;  // zero-filled
            mbarrier_arrive_expect_tx(&full[s], kTileBytes);
            for (int c = 0; c < kChunks; ++c)
              tma_load_2d(ring + s * kStageBytes + c * kChunkBytes, &cache_map, c * kChunkCols, row0, &full[s]);
          } else {
            mbarrier_arrive(&full[s]);
          }
          continue;
        }
        const int32_t key = tile * kBlockN + row;
        const CacheT* src = key < range.key_end ? cache_row<CacheT>(p, b, key) : nullptr;  // nullptr: bad block id too
        const bool valid = src != nullptr;
        if (!valid) src = static_cast<const CacheT*>(p.cache);  // never read (source size 0): a zero row
        unsigned char* dst = ring + s * kStageBytes;
        for (int u = unit0; u < unit0 + kRowUnits / 2; ++u) {
          const uint32_t off = kFp8 ? row * kHeadDim + u * 16 : swizzled_offset(row, u);  // fp8: raw rows
          cp_async_16(dst + off, src + (valid ? u * kElemsPerUnit : 0), valid);
        }
        cp_async_commit();
        cp_async_wait<0>();
        fence_proxy_async();
        mbarrier_arrive(&full[s]);
      }
    }
    return;
  }

  // ---- Consumer warpgroups.
  setmaxnreg_inc<232>();
  int it = 0;
  for (SchedPiece piece; cursor.next(piece);) {
    const Sm90Work w = sm90_work(p, piece, m_blocks);
    if (w.range.tile_begin < w.range.tile_end) load_q_block<T>(p, q_tile, w);  // (uniform)
    consume_piece<T, kFp8>(p, q_tile, conv, ring, full, empty, w, it);
  }
#else
  __trap();  // built without sm_90a (TORCH_CUDA_ARCH_LIST needs 9.0a): never dispatched silently
#endif
}

}  // namespace mla::cuda::sm90
