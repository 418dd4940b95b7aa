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
// slot) and sparse_combine_kernel merges them, applying the sink and the +inf convention.
#include <algorithm>
#include <mutex>
#include <type_traits>

#include "common.cuh"
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
__global__ void __launch_bounds__(kSimpleThreads) sparse_simple_kernel(const SparseCudaParams p) {
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
    for (int h = 0; h < heads; ++h) {
      out[h * kLatentDim] = TypeTraits<T>::from_float(acc[h][0] * inv[h]);
      out[h * kLatentDim + 1] = TypeTraits<T>::from_float(acc[h][1] * inv[h]);
    }
    if (tid < heads) p.lse[row0 + tid] = lse_row[tid];
  } else {
    const int64_t rows_total = static_cast<int64_t>(p.batch) * p.seqlen_q * p.num_heads;
    const int64_t base = blk.split * rows_total + row0;
    for (int h = 0; h < heads; ++h)
      *reinterpret_cast<float2*>(p.o_accum + (base + h) * kLatentDim + col) =
          make_float2(acc[h][0] * inv[h], acc[h][1] * inv[h]);
    if (tid < heads) p.lse_accum[base + tid] = lse_row[tid];
  }
}

// ---------------------------------------------------------------------------------------
// Combine: out = sum_s w_s o_s / sum_s w_s, w_s = exp(lse_s - max), lse = max + log(sum w);
// then the sink factor; a row no split saw gets out 0, lse +inf. One CTA of 128 threads per
// row, 4 columns a thread.
constexpr int kCombineThreads = 128;

template <typename T>
__global__ void __launch_bounds__(kCombineThreads) sparse_combine_kernel(const SparseCudaParams p) {
  const int64_t rows_total = static_cast<int64_t>(p.batch) * p.seqlen_q * p.num_heads;
  const int64_t r = blockIdx.x;
  const int32_t head = static_cast<int32_t>(r % p.num_heads);
  const int col = threadIdx.x * 4;
  float mx = -INFINITY;
  bool seen = false;
  for (int s = 0; s < p.num_splits; ++s) {
    const float lse = p.lse_accum[s * rows_total + r];
    seen |= lse != -INFINITY;  // a NaN lse counts as seen and propagates
    mx = lse > mx ? lse : mx;
  }
  float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
  float wsum = 0.f;
  if (seen) {
    for (int s = 0; s < p.num_splits; ++s) {
      const int64_t idx = s * rows_total + r;
      const float lse = p.lse_accum[idx];
      if (lse == -INFINITY) continue;
      const float w = exp2f((lse - mx) * kLog2e);
      const float4 v = *reinterpret_cast<const float4*>(p.o_accum + idx * kLatentDim + col);
      acc.x += w * v.x;
      acc.y += w * v.y;
      acc.z += w * v.z;
      acc.w += w * v.w;
      wsum += w;
    }
  }
  const float lse = mx + __logf(wsum);
  float factor = 1.f / wsum;
  if (p.attn_sink != nullptr) factor *= 1.f / (1.f + exp2f((p.attn_sink[head] - lse) * kLog2e));
  if (!seen) factor = 0.f;
  T* out = static_cast<T*>(p.out) + r * kLatentDim + col;
  out[0] = TypeTraits<T>::from_float(acc.x * factor);
  out[1] = TypeTraits<T>::from_float(acc.y * factor);
  out[2] = TypeTraits<T>::from_float(acc.z * factor);
  out[3] = TypeTraits<T>::from_float(acc.w * factor);
  if (threadIdx.x == 0) p.lse[r] = seen ? lse : INFINITY;
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

template <typename T>
cudaError_t launch_combine(const SparseCudaParams& p, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(p.batch) * p.seqlen_q * p.num_heads;
  auto kernel = sparse_combine_kernel<T>;
  MLA_LAUNCH(kernel, dim3(static_cast<uint32_t>(rows)), kCombineThreads, 0, stream, p);
  return cudaGetLastError();
}

int sm_count(int device) {
  constexpr int kMaxDevices = 64;
  static int cache[kMaxDevices];
  static std::once_flag once[kMaxDevices];
  auto query = [device] {
    int sms = 0;
    cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
    return sms;
  };
  if (device < 0 || device >= kMaxDevices) return query();
  std::call_once(once[device], [&] { cache[device] = query(); });
  return cache[device];
}

}  // namespace

SparsePlan plan_sparse_decode(const SparseCudaParams& p, int device, SparseImpl requested) {
  (void)requested;
  SparsePlan plan{};
  plan.impl = SparseImpl::kSimple;
  // Splits: enough CTAs for ~2 per SM, each split at least 4 tiles of slots (a shape: the
  // topk sizes, never topk_length's values).
  const int64_t base_ctas = static_cast<int64_t>(p.batch) * p.seqlen_q * ceil_div(p.num_heads, kSimpleHeads);
  const int64_t slots = 2 * static_cast<int64_t>(std::max(1, sm_count(device)));
  const int64_t capacity_tiles = ceil_div(static_cast<int64_t>(p.main.topk) + (p.has_extra ? p.extra.topk : 0),
                                          kSimpleTile);
  int64_t splits = 1;
  if (base_ctas > 0 && base_ctas < slots) splits = std::min<int64_t>((slots + base_ctas - 1) / base_ctas, capacity_tiles / 4);
  plan.num_splits = static_cast<int32_t>(std::max<int64_t>(1, std::min<int64_t>(splits, 64)));
  if (plan.num_splits > 1) {
    const int64_t rows = static_cast<int64_t>(p.batch) * p.seqlen_q * p.num_heads;
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
  switch (p.q_dtype) {
    case DType::kBFloat16: err = launch_simple_for_cache<__nv_bfloat16>(p, stream); break;
    case DType::kFloat16: err = launch_simple_for_cache<__half>(p, stream); break;
    case DType::kFloat32: err = launch_simple_for_cache<float>(p, stream); break;
    default: return cudaErrorInvalidValue;
  }
  if (err != cudaSuccess || p.num_splits == 1) return err;
  switch (p.q_dtype) {
    case DType::kBFloat16: return launch_combine<__nv_bfloat16>(p, stream);
    case DType::kFloat16: return launch_combine<__half>(p, stream);
    case DType::kFloat32: return launch_combine<float>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace mla::cuda
