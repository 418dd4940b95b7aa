// Decode planning and dispatch, the CUDA-core decode kernel (any dtype, any alignment)
// (the split-KV combine is combine.cuh's). The tensor-core kernel lives in decode_tc.cuh.
#include <algorithm>
#include <mutex>
#include <type_traits>

#include "combine.cuh"
#include "cuda_kernels.h"
#include "decode_tc.cuh"
#include "schedule.cuh"
#include "sm90/decode_sm90.h"

namespace mla::cuda {
namespace {

// ---------------------------------------------------------------------------------------
// CUDA-core decode: one CTA = (query row, split, sequence), 128 threads. Keys in tiles of
// kSimpleTile: each warp scores a quarter of the tile (lanes split the 576-dim dot
// product), then every thread updates the online softmax for its 4 output columns.
// T: q / out element type; C: cache element type (T, or uint8_t for float8_e4m3fn, whose
// kv_scale is folded into the scores and the output like in the tensor-core kernel).
constexpr int kSimpleThreads = 128;
constexpr int kSimpleTile = 32;

template <typename C>
__device__ __forceinline__ float cache_value(const C* row, int d) {
  if constexpr (std::is_same_v<C, uint8_t>) return e4m3_to_float(row[d]);
  else return TypeTraits<C>::to_float(row[d]);
}

template <typename C>
struct SimpleSmem {
  float q[kHeadDim];             // query row, pre-scaled by softmax_scale * log2 e (* kv_scale)
  float scores[kSimpleTile];     // scores of the tile (log2 units), -inf = masked
  const C* rows[kSimpleTile];    // cache rows of the tile, nullptr = zero row
};

template <typename T, typename C>
__global__ void __launch_bounds__(kSimpleThreads) decode_simple_kernel(const DecodeParams p) {
  using Tr = TypeTraits<T>;
  constexpr bool kFp8 = std::is_same_v<C, uint8_t>;
  SimpleSmem<C>& smem = *reinterpret_cast<SimpleSmem<C>*>(dynamic_smem());
  float* sq = smem.q;
  float* ss = smem.scores;
  const C** srow = smem.rows;

  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int32_t h = p.num_heads;
  const int32_t M = p.seqlen_q * h;
  const int32_t r = blockIdx.x % M;
  const int32_t split = blockIdx.x / M;
  const int32_t b = blockIdx.y;
  const int32_t j = r / h, head = r % h;

  const int32_t L = clamped_seqlen(p, b);
  const int32_t n_keys = visible_keys(L, p.seqlen_q, j, p.causal);
  const SplitRange range = split_range(n_keys, kSimpleTile, split, p.num_splits);
  const float kv_scale = kFp8 ? __ldg(p.kv_scale) : 1.f;
  const float scale_log2 = p.softmax_scale * kv_scale * kLog2e;

  {
    const T* qn = static_cast<const T*>(p.q_nope) + b * p.q_nope_batch_stride + j * p.q_nope_seq_stride +
                  head * p.q_nope_head_stride;
    const T* qp = static_cast<const T*>(p.q_pe) + b * p.q_pe_batch_stride + j * p.q_pe_seq_stride +
                  head * p.q_pe_head_stride;
    for (int d = tid; d < kHeadDim; d += kSimpleThreads)
      sq[d] = Tr::to_float(d < kLatentDim ? qn[d] : qp[d - kLatentDim]) * scale_log2;
  }

  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  float m = -INFINITY, l = 0.f;
  const int col = tid * 4;
  for (int tile = range.tile_begin; tile < range.tile_end; ++tile) {
    __syncthreads();  // previous tile's ss / srow fully consumed (and sq written, first time)
    if (tid < kSimpleTile) {
      const int32_t key = tile * kSimpleTile + tid;
      srow[tid] = key < range.key_end ? cache_row<C>(p, b, key) : nullptr;
    }
    __syncthreads();
    for (int k = warp; k < kSimpleTile; k += kSimpleThreads / 32) {
      const int32_t key = tile * kSimpleTile + k;
      const C* row = srow[k];
      float dot = 0.f;
      if (row != nullptr)
        for (int d = lane; d < kHeadDim; d += 32) dot += sq[d] * cache_value(row, d);
#pragma unroll
      for (int off = 16; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
      if (lane == 0) ss[k] = key < range.key_end ? dot : -INFINITY;  // missing block: a zero row
    }
    __syncthreads();
    float tmax = -INFINITY;
    for (int k = 0; k < kSimpleTile; ++k) tmax = fmaxf(tmax, ss[k]);
    const float m_new = fmaxf(m, tmax);
    const float m_use = m_new == -INFINITY ? 0.f : m_new;
    const float alpha = exp2f(m - m_use);
    m = m_new;
    l *= alpha;
#pragma unroll
    for (int c = 0; c < 4; ++c) acc[c] *= alpha;
    for (int k = 0; k < kSimpleTile; ++k) {
      if (ss[k] == -INFINITY) continue;  // masked or past the range: skipped, never 0 * V
      const float pk = exp2f(ss[k] - m_use);
      l += pk;
      const C* row = srow[k];
      if (row == nullptr) continue;  // zero row: contributes to the sum only
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[c] += pk * cache_value(row, col + c);
    }
  }

  // Empty (out 0, lse -inf) when this split holds none of the row's keys; decided from the
  // range, so an inf / NaN the row does see propagates as in the reference.
  const bool empty = range.key_end <= range.tile_begin * kSimpleTile;
  const float inv = empty ? 0.f : kv_scale / l;
  const float lse = empty ? -INFINITY : (m + __log2f(l)) * kLn2;
  if (p.num_splits == 1) {
    T* out = static_cast<T*>(p.out) + (static_cast<int64_t>(b) * M + r) * kLatentDim + col;
#pragma unroll
    for (int c = 0; c < 4; ++c) out[c] = Tr::from_float(acc[c] * inv);
    if (tid == 0) p.lse[static_cast<int64_t>(b) * M + r] = lse;
  } else {
    const int64_t idx = (static_cast<int64_t>(b) * p.num_splits + split) * M + r;
    *reinterpret_cast<float4*>(p.o_accum + idx * kLatentDim + col) =
        make_float4(acc[0] * inv, acc[1] * inv, acc[2] * inv, acc[3] * inv);
    if (tid == 0) p.lse_accum[idx] = lse;
  }
}

template <typename T>
cudaError_t launch_simple(const DecodeParams& p, cudaStream_t stream) {
  const dim3 grid(static_cast<uint32_t>(p.seqlen_q * p.num_heads * p.num_splits), p.batch);
  if (p.cache_dtype == DType::kFloat8E4M3) {
    if (p.kv_scale == nullptr) return cudaErrorInvalidValue;
    auto kernel = decode_simple_kernel<T, uint8_t>;
    MLA_LAUNCH(kernel, grid, kSimpleThreads, sizeof(SimpleSmem<uint8_t>), stream, p);
  } else {
    auto kernel = decode_simple_kernel<T, T>;
    MLA_LAUNCH(kernel, grid, kSimpleThreads, sizeof(SimpleSmem<T>), stream, p);
  }
  return cudaGetLastError();
}

// ---------------------------------------------------------------------------------------
// Planning.
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

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }
bool stride16(int64_t elems, int64_t elem_bytes) { return (elems * elem_bytes) % 16 == 0; }

// Splits per (sequence, row block) so that base_ctas * splits fills `slots` CTA slots
// well. Cost model: waves * (work per CTA + fixed per-CTA cost), work measured in
// KV tiles of the block table's capacity (a shape, not the runtime seqlens).
int32_t choose_splits(int64_t base_ctas, int64_t slots, int64_t capacity_tiles) {
  if (base_ctas <= 0 || slots <= 0 || base_ctas >= slots) return 1;
  constexpr int64_t kMaxSplits = 128;
  constexpr double kFixedTiles = 4.0;  // Q load, pipeline fill, partial write, combine share
  const int64_t max_splits = std::min<int64_t>(kMaxSplits, std::max<int64_t>(1, capacity_tiles / 4));
  int32_t best = 1;
  double best_cost = 0.0;
  for (int64_t s = 1; s <= max_splits; ++s) {
    const int64_t waves = (base_ctas * s + slots - 1) / slots;
    const double cost = static_cast<double>(waves) * (static_cast<double>(capacity_tiles) / s + kFixedTiles);
    if (s == 1 || cost < best_cost * 0.999) {
      best = static_cast<int32_t>(s);
      best_cost = cost;
    }
  }
  return best;
}

}  // namespace

DecodePlan plan_decode(const DecodeParams& p, int device, DecodeImpl requested) {
  const DeviceInfo info = device_info(device);
  const int64_t M = static_cast<int64_t>(p.seqlen_q) * p.num_heads;
  const int64_t capacity = static_cast<int64_t>(p.max_blocks_per_seq) * p.block_size;

  DecodePlan plan{};
  plan.impl = DecodeImpl::kSimple;
  plan.config = -1;
  const bool fp8 = p.cache_dtype == DType::kFloat8E4M3;
  const bool half_type = (p.q_dtype == DType::kBFloat16 || p.q_dtype == DType::kFloat16) &&
                         (p.q_dtype == p.cache_dtype || fp8);
  const int64_t cache_elt = fp8 ? 1 : 2;
  const bool aligned = aligned16(p.q_nope) && aligned16(p.q_pe) && aligned16(p.cache) &&
                       stride16(p.q_nope_batch_stride, 2) && stride16(p.q_nope_seq_stride, 2) &&
                       stride16(p.q_nope_head_stride, 2) && stride16(p.q_pe_batch_stride, 2) &&
                       stride16(p.q_pe_seq_stride, 2) && stride16(p.q_pe_head_stride, 2) &&
                       stride16(p.cache_block_stride, cache_elt) && stride16(p.cache_token_stride, cache_elt) &&
                       reinterpret_cast<uintptr_t>(p.out) % 4 == 0;  // the kernel stores column pairs
  // The sm90 kernel's schedule counts cost positions in int32 (schedule.cuh): bounded by shapes here.
  const int64_t sm90_units = static_cast<int64_t>(p.batch) * ((M + sm90::kDecodeBlockM - 1) / sm90::kDecodeBlockM);
  const bool sm90_fits = sm90_units * ((capacity + sm90::kDecodeBlockN - 1) / sm90::kDecodeBlockN + kSchedFixedCost) <
                         (int64_t{1} << 31);
  if (requested == DecodeImpl::kSm90 && aligned && half_type && sm90_fits &&
      sm90::kDecodeSmemBytes <= static_cast<size_t>(info.smem_optin)) {  // bf16 / fp16 q, same-type or fp8 cache
    plan.impl = DecodeImpl::kSm90;
  } else if (requested != DecodeImpl::kSimple && half_type && aligned) {
    for (int c = 0; c < kNumTcConfigs; ++c) {  // largest first
      const size_t smem = fp8 ? kTcConfigs[c].smem_fp8 : kTcConfigs[c].smem_16bit;
      if (smem <= static_cast<size_t>(info.smem_optin)) {
        plan.impl = DecodeImpl::kTensorCore;
        plan.config = c;
        break;
      }
    }
  }

  if (plan.impl == DecodeImpl::kSm90) {
    // Device-side schedule (schedule.cuh): one persistent CTA per SM (shared memory), 2 partial
    // slots each; every size from shapes and the SM count.
    plan.sched_ctas = std::max(1, info.sms);
    const SchedSizes s = sched_sizes(p, sm90::kDecodeBlockM, plan.sched_ctas);
    plan.num_splits = static_cast<int32_t>(2 * plan.sched_ctas);
    plan.workspace_sched = s.sched_ints;
    plan.workspace_o = s.partial_rows * kLatentDim;
    plan.workspace_lse = s.partial_rows;
    return plan;
  }
  int64_t base_ctas, slots, tile;
  if (plan.impl == DecodeImpl::kTensorCore) {
    const int64_t bm = kTcConfigs[plan.config].block_m;
    tile = kTcConfigs[plan.config].block_n;
    base_ctas = static_cast<int64_t>(p.batch) * ((M + bm - 1) / bm);
    slots = info.sms;  // every configuration holds one CTA per SM (shared memory, registers)
  } else {
    tile = kSimpleTile;
    base_ctas = static_cast<int64_t>(p.batch) * M;
    slots = static_cast<int64_t>(info.sms) * 8;
  }
  plan.num_splits = choose_splits(base_ctas, slots, (capacity + tile - 1) / tile);
  if (plan.num_splits > 1) {
    plan.workspace_o = static_cast<int64_t>(p.batch) * plan.num_splits * M * kLatentDim;
    plan.workspace_lse = static_cast<int64_t>(p.batch) * plan.num_splits * M;
  }
  return plan;
}

cudaError_t decode(const DecodeParams& params, const DecodePlan& plan, cudaStream_t stream) {
  if (params.batch == 0) return cudaSuccess;
  DecodeParams p = params;
  p.num_splits = plan.num_splits;
  cudaError_t err = cudaSuccess;
  if (plan.impl == DecodeImpl::kSm90) {
    // Metadata kernel, persistent decode kernel, combine: same stream, no host sync.
    p.sched_ctas = plan.sched_ctas;
    return run_scheduled<sm90::kDecodeBlockM, sm90::kDecodeBlockN>(p, stream, sm90::launch_decode_sm90);
  }
  if (plan.impl == DecodeImpl::kTensorCore) {
    const bool bf16 = p.q_dtype == DType::kBFloat16;
    if (p.cache_dtype == DType::kFloat8E4M3)
      err = bf16 ? launch_decode_tc_fp8_bf16(p, plan.config, stream) : launch_decode_tc_fp8_fp16(p, plan.config, stream);
    else
      err = bf16 ? launch_decode_tc_bf16(p, plan.config, stream) : launch_decode_tc_fp16(p, plan.config, stream);
  } else {
    switch (p.q_dtype) {
      case DType::kFloat32: err = launch_simple<float>(p, stream); break;
      case DType::kFloat16: err = launch_simple<__half>(p, stream); break;
      case DType::kBFloat16: err = launch_simple<__nv_bfloat16>(p, stream); break;
      default: return cudaErrorInvalidValue;
    }
  }
  if (err != cudaSuccess || p.num_splits == 1) return err;
  const int32_t M = p.seqlen_q * p.num_heads;
  const CombineArgs args{p.o_accum, p.lse_accum, p.out, p.lse, nullptr, static_cast<int64_t>(p.batch) * M,
                         p.num_heads, -INFINITY};
  return launch_combine_for(p.q_dtype, args, DenseSplitLayout{M, p.num_splits}, stream);
}

}  // namespace mla::cuda
