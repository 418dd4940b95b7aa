// Device-side split-KV schedule (issue 11): a metadata kernel reads cache_seqlens on the device
// and spreads the total work of a decode call evenly over a fixed number of persistent CTAs;
// each CTA then walks its share. Nothing here depends on a host copy of seqlens, and every
// grid and workspace size depends on shapes and the CTA count only: no host sync, and a
// captured CUDA graph stays valid when the lengths change. Torch-free.
//
// Work units: u = b * m_blocks + mb, one (sequence b, row block mb of BlockM rows); a unit
// holds n_u = ceil(keys / BlockN) key tiles, keys = what the block's last row sees (rows are
// ordered by query j, so the last sees the most). Each unit costs kSchedFixedCost + n_u on one
// axis of cost positions: [P_u, P_u + F) stands for the unit's fixed work (Q block, epilogue),
// tile t sits at P_u + F + t. CTA g owns the positions [g per, (g + 1) per), per = ceil(total
// / G) but at least kSchedMinCost, so every busy CTA gets the same cost (the last may get less),
// whatever the lengths.
//   - tile t of unit u is done by the CTA owning its position; a unit with n_u = 0 (nothing
//     visible) by the CTA owning P_u, which writes its rows out 0 / lse -inf;
//   - a unit whose tiles all fall to one CTA is written straight to out / lse;
//   - otherwise each CTA writes its piece as a normalised partial (the combine.cuh format) into
//     slot g if the unit goes on past the CTA's end, else into slot G + g (the unit's last
//     piece): a CTA cuts at most one unit at its end and one at its start, so 2 G slots of
//     min(BlockM, M) rows never collide, and the combine finds unit u's pieces at slots
//     g_first .. g_last - 1 and G + g_last, g_first / g_last = the CTAs of its first / last tile.
//
// Workspace (int32, sched_ints(U, G) of them): [0] per, [1] total cost, then P_0 .. P_U at
// kSchedHeader (P_U = total), then first_unit[g] for every CTA (the unit holding position g per).
#pragma once
#include "combine.cuh"
#include "common.cuh"

namespace mla::cuda {

constexpr int32_t kSchedFixedCost = 2;  // tiles' worth per unit: the Q block load and the epilogue
// The least cost a CTA takes: cutting a unit costs a partial write and its combine read (64 rows x
// 512 fp32 each way, ~3.6 tiles of bf16 cache bytes), so short calls use fewer CTAs instead.
constexpr int32_t kSchedMinCost = kSchedFixedCost + 6;
constexpr int kSchedHeader = 2;
constexpr int kSchedThreads = 256;

__host__ __device__ __forceinline__ int64_t sched_ints(int64_t units, int64_t ctas) {
  return kSchedHeader + units + 1 + ctas;
}

// Keys of unit u's row block the schedule counts (the block's last row's visible keys).
template <int BlockM>
__device__ __forceinline__ int32_t sched_unit_keys(const DecodeParams& p, int32_t b, int32_t m0) {
  const int32_t M = p.seqlen_q * p.num_heads;
  const int32_t last_row = min(m0 + BlockM, M) - 1;
  return visible_keys(clamped_seqlen(p, b), p.seqlen_q, last_row / p.num_heads, p.causal);
}

template <int BlockM, int BlockN>
__device__ __forceinline__ int32_t sched_unit_cost(const DecodeParams& p, int32_t u, int32_t m_blocks) {
  const int32_t b = u / m_blocks, m0 = (u % m_blocks) * BlockM;
  return kSchedFixedCost + ceil_div(sched_unit_keys<BlockM>(p, b, m0), BlockN);
}

// One CTA of kSchedThreads: per-thread runs of units, a block scan of the run sums in shared
// memory, the prefix P, then a binary search per CTA for its first unit. p.sched_ctas = G.
template <int BlockM, int BlockN>
__global__ void __launch_bounds__(kSchedThreads) schedule_kernel(const DecodeParams p) {
  int32_t* scan = reinterpret_cast<int32_t*>(dynamic_smem());  // [kSchedThreads]
  const int t = threadIdx.x;
  const int32_t m_blocks = ceil_div(p.seqlen_q * p.num_heads, BlockM);
  const int32_t U = p.batch * m_blocks, G = p.sched_ctas;
  const int32_t run = ceil_div(U, kSchedThreads);
  const int32_t u0 = min(U, t * run), u1 = min(U, u0 + run);
  int32_t sum = 0;
  for (int32_t u = u0; u < u1; ++u) sum += sched_unit_cost<BlockM, BlockN>(p, u, m_blocks);
  scan[t] = sum;
  __syncthreads();
  for (int off = 1; off < kSchedThreads; off *= 2) {  // inclusive scan (Hillis-Steele)
    const int32_t v = t >= off ? scan[t - off] : 0;
    __syncthreads();
    scan[t] += v;
    __syncthreads();
  }
  const int32_t total = scan[kSchedThreads - 1];
  const int32_t per = max(ceil_div(total, G), kSchedMinCost);
  int32_t* prefix = p.sched + kSchedHeader;
  int32_t pos = scan[t] - sum;
  for (int32_t u = u0; u < u1; ++u) {
    prefix[u] = pos;
    pos += sched_unit_cost<BlockM, BlockN>(p, u, m_blocks);
  }
  if (t == 0) {
    p.sched[0] = per;
    p.sched[1] = total;
    prefix[U] = total;
  }
  __syncthreads();  // the prefix (global memory) is complete for the whole block
  int32_t* first_unit = prefix + U + 1;
  for (int32_t g = t; g < G; g += kSchedThreads) {
    const int64_t lo = static_cast<int64_t>(g) * per;
    int32_t a = 0, z = U;  // the last u with P_u <= lo (U when lo is past the end)
    if (lo >= total) a = U;
    else
      while (z - a > 1) {
        const int32_t mid = (a + z) / 2;
        if (prefix[mid] <= lo) a = mid;
        else z = mid;
      }
    first_unit[g] = a;
  }
}

// What one CTA does next: a piece = tiles [tile_begin, tile_end) of unit `unit` (n_tiles in all);
// slot -1 = the whole unit (write out / lse), else the partial slot.
struct SchedPiece {
  int32_t unit, tile_begin, tile_end, n_tiles, slot;
};

// Walks CTA g's cost range [g per, (g + 1) per) over the units it touches.
struct SchedCursor {
  const int32_t* prefix;
  int32_t u, units, ctas, g, lo, hi;

  __device__ __forceinline__ SchedCursor(const DecodeParams& p, int32_t units_, int32_t g_) {
    const int32_t per = p.sched[0], total = p.sched[1];
    prefix = p.sched + kSchedHeader;
    units = units_;
    ctas = p.sched_ctas;
    g = g_;
    lo = static_cast<int32_t>(min(static_cast<int64_t>(g) * per, static_cast<int64_t>(total)));
    hi = static_cast<int32_t>(min(static_cast<int64_t>(g + 1) * per, static_cast<int64_t>(total)));
    u = prefix[units + 1 + g];  // first_unit[g]
  }

  __device__ __forceinline__ bool next(SchedPiece& w) {
    while (u < units) {
      const int32_t pu = prefix[u];
      if (pu >= hi) return false;
      const int32_t n = prefix[u + 1] - pu - kSchedFixedCost, t0 = pu + kSchedFixedCost;
      w.unit = u++;
      w.n_tiles = n;
      if (n == 0) {  // nothing visible: the owner of P_u writes the unit (out 0, lse -inf)
        if (pu < lo) continue;
        w.tile_begin = w.tile_end = 0;
        w.slot = -1;
        return true;
      }
      w.tile_begin = min(max(lo - t0, 0), n);
      w.tile_end = min(max(hi - t0, 0), n);
      if (w.tile_begin >= w.tile_end) continue;
      w.slot = w.tile_begin == 0 && w.tile_end == n ? -1 : (w.tile_end < n ? g : ctas + g);
      return true;
    }
    return false;
  }
};

// The combine's view of the schedule: rows r = b * M + m; a unit that one CTA covered (or with
// no tile) is not the combine's.
template <int BlockM>
struct ScheduledLayout {
  const int32_t* sched;
  int32_t M, m_blocks, ctas, slot_rows;

  __device__ __forceinline__ CombineRow row(int64_t r) const {
    const int64_t b = r / M;
    const int32_t m = static_cast<int32_t>(r - b * M), slot_row = m % BlockM;
    const int64_t u = b * m_blocks + m / BlockM;
    const int32_t* prefix = sched + kSchedHeader;
    const int32_t per = sched[0], t0 = prefix[u] + kSchedFixedCost, n = prefix[u + 1] - t0;
    const int32_t g_first = t0 / per, g_last = n > 0 ? (t0 + n - 1) / per : g_first;
    CombineRow c;
    c.n = g_last > g_first ? g_last - g_first + 1 : -1;  // uncut or no tile: written directly
    c.base = static_cast<int64_t>(g_first) * slot_rows + slot_row;  // slots g_first .. g_last - 1
    c.stride = slot_rows;
    c.last = (static_cast<int64_t>(ctas) + g_last) * slot_rows + slot_row;  // the last piece: slot G + g_last
    return c;
  }
};

// Host side: the workspace of a scheduled launch, from shapes and the CTA count only.
struct SchedSizes {
  int64_t units, sched_ints, slot_rows, partial_rows;  // partial_rows = 2 G slot_rows
};
inline SchedSizes sched_sizes(const DecodeParams& p, int block_m, int64_t ctas) {
  SchedSizes s;
  const int64_t M = static_cast<int64_t>(p.seqlen_q) * p.num_heads;
  s.units = static_cast<int64_t>(p.batch) * ((M + block_m - 1) / block_m);
  s.sched_ints = sched_ints(s.units, ctas);
  s.slot_rows = M < block_m ? M : block_m;
  s.partial_rows = 2 * ctas * s.slot_rows;
  return s;
}

// Launches the metadata kernel, then `decode_kernel_launch(p)`, then the combine over the
// scheduled partials. p.sched / o_accum / lse_accum hold the plan's workspace.
template <int BlockM, int BlockN, typename Launch>
cudaError_t run_scheduled(const DecodeParams& p, cudaStream_t stream, Launch&& decode_kernel_launch) {
  if (p.sched == nullptr || p.sched_ctas <= 0 || p.o_accum == nullptr || p.lse_accum == nullptr)
    return cudaErrorInvalidValue;
  auto meta = schedule_kernel<BlockM, BlockN>;
  MLA_LAUNCH(meta, dim3(1), kSchedThreads, kSchedThreads * sizeof(int32_t), stream, p);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  err = decode_kernel_launch(p, stream);
  if (err != cudaSuccess) return err;
  const int32_t M = p.seqlen_q * p.num_heads;
  const SchedSizes s = sched_sizes(p, BlockM, p.sched_ctas);
  const CombineArgs args{p.o_accum, p.lse_accum, p.out, p.lse, nullptr, static_cast<int64_t>(p.batch) * M,
                         p.num_heads, -INFINITY};
  const ScheduledLayout<BlockM> layout{p.sched, M, ceil_div(M, BlockM), p.sched_ctas,
                                       static_cast<int32_t>(s.slot_rows)};
  return launch_combine_for(p.q_dtype, args, layout, stream);
}

}  // namespace mla::cuda
