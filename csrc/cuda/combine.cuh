// The split-KV combine shared by every decode kernel (the dense CUDA-core and sm80 tensor-core
// kernels of decode.cu, the scheduled Hopper kernel, the sparse kernels of sparse_decode.cu).
// Each split (piece) of an output row wrote a normalised partial o_s [DC] and its lse_s
// (natural log, -inf = the piece saw no key); the row's result is
//   out = factor * sum_s w_s o_s,  w_s = exp(lse_s - max_s lse_s),  lse = max + log(sum_s w_s),
//   factor = 1 / sum_s w_s  (times the attention-sink factor 1 / (1 + exp(sink - lse)) if any).
// A piece with lse -inf is skipped; a NaN lse (the row saw a NaN) makes the row NaN, as in the
// reference; a row no piece saw gets out 0 and lse `empty_lse` (-inf dense, +inf sparse).
//
// One warp per output row, parallel over the pieces: lane i reads the lse of pieces i, i + 32, ...,
// the max, the "seen" vote and the weight sum are warp reductions; then every lane sweeps its 16
// of the 512 columns (4 float4, coalesced across the warp) over the pieces. Torch-free.
//
// A layout says where a row's pieces live: Layout::row(r) gives a CombineRow (resolved once per
// row, so the sweep over the pieces does no division).
#pragma once
#include "common.cuh"

namespace mla::cuda {

constexpr int kCombineWarps = 4;  // rows per CTA
constexpr int kCombineThreads = 32 * kCombineWarps;

struct CombineArgs {
  const float* o_accum;      // [pieces..., DC] fp32 partials
  const float* lse_accum;    // [pieces...] natural log, -inf = empty piece
  void* out;                 // [rows, DC] in T
  float* lse;                // [rows]
  const float* attn_sink;    // [num_heads] or nullptr (row r has head r % num_heads)
  int64_t rows;
  int32_t num_heads;
  float empty_lse;           // lse of a row no piece saw
};

// Where one output row's n pieces live: piece s < n - 1 at index base + s * stride, the last
// one at `last` (lse_accum[idx], o_accum[idx * DC]). n = -1: the row is not the combine's (its
// decode kernel wrote it directly).
struct CombineRow {
  int64_t base, stride, last;
  int32_t n;
  __device__ __forceinline__ int64_t piece(int32_t s) const { return s == n - 1 ? last : base + s * stride; }
};

// Dense split-KV (decode.cu): o_accum [b, S, M, DC], row r = b * M + m.
struct DenseSplitLayout {
  int32_t M, num_splits;
  __device__ __forceinline__ CombineRow row(int64_t r) const {
    const int64_t b = r / M, m = r - b * M;
    CombineRow c;
    c.base = b * num_splits * M + m;
    c.stride = M;
    c.last = c.base + (num_splits - 1) * c.stride;
    c.n = num_splits;
    return c;
  }
};

// Sparse split-topk (sparse_decode.cu): o_accum [S, rows, DC].
struct SparseSplitLayout {
  int64_t rows;
  int32_t num_splits;
  __device__ __forceinline__ CombineRow row(int64_t r) const {
    CombineRow c;
    c.base = r;
    c.stride = rows;
    c.last = r + (num_splits - 1) * rows;
    c.n = num_splits;
    return c;
  }
};

template <typename T, typename Layout>
__global__ void __launch_bounds__(kCombineThreads) combine_kernel(const CombineArgs a, const Layout layout) {
  const int lane = threadIdx.x % 32;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * kCombineWarps + threadIdx.x / 32;
  if (r >= a.rows) return;  // the whole warp
  const CombineRow row = layout.row(r);
  const int32_t n = row.n;
  if (n < 0) return;  // written by the decode kernel itself

  // Lanes over the pieces: max (fmaxf: a NaN lse is not the max; it poisons the weights below),
  // whether any piece saw a key, then the weight sum.
  float mx = -INFINITY;
  bool seen = false;
  for (int32_t s = lane; s < n; s += 32) {
    const float lse = a.lse_accum[row.piece(s)];
    seen |= lse != -INFINITY;  // NaN counts as seen and propagates
    mx = fmaxf(mx, lse);
  }
  seen = __any_sync(0xffffffffu, seen);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
  float wsum = 0.f;
  if (seen)
    for (int32_t s = lane; s < n; s += 32) {
      const float lse = a.lse_accum[row.piece(s)];
      if (lse != -INFINITY) wsum += exp2f((lse - mx) * kLog2e);
    }
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) wsum += __shfl_xor_sync(0xffffffffu, wsum, off);

  // Columns: lane owns 4 float4 at columns 4 lane + 128 k.
  float4 acc[4];
#pragma unroll
  for (int k = 0; k < 4; ++k) acc[k] = make_float4(0.f, 0.f, 0.f, 0.f);
  if (seen)
    for (int32_t s = 0; s < n; ++s) {
      const int64_t idx = row.piece(s);
      const float lse = a.lse_accum[idx];  // the same value for all lanes
      if (lse == -INFINITY) continue;      // empty piece: its o is never read
      const float w = exp2f((lse - mx) * kLog2e);
      const float4* o = reinterpret_cast<const float4*>(a.o_accum + idx * kLatentDim) + lane;
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const float4 v = o[32 * k];
        acc[k].x += w * v.x;
        acc[k].y += w * v.y;
        acc[k].z += w * v.z;
        acc[k].w += w * v.w;
      }
    }
  const float lse = mx + __logf(wsum);
  float factor = 1.f / wsum;
  if (a.attn_sink != nullptr) factor *= 1.f / (1.f + exp2f((a.attn_sink[r % a.num_heads] - lse) * kLog2e));
  if (!seen) factor = 0.f;
  T* out = static_cast<T*>(a.out) + r * kLatentDim + 4 * lane;
#pragma unroll
  for (int k = 0; k < 4; ++k) {
    out[128 * k + 0] = TypeTraits<T>::from_float(acc[k].x * factor);
    out[128 * k + 1] = TypeTraits<T>::from_float(acc[k].y * factor);
    out[128 * k + 2] = TypeTraits<T>::from_float(acc[k].z * factor);
    out[128 * k + 3] = TypeTraits<T>::from_float(acc[k].w * factor);
  }
  if (lane == 0) a.lse[r] = seen ? lse : a.empty_lse;
}

template <typename T, typename Layout>
cudaError_t launch_combine(const CombineArgs& a, const Layout& layout, cudaStream_t stream) {
  if (a.rows <= 0) return cudaSuccess;
  const int64_t blocks = (a.rows + kCombineWarps - 1) / kCombineWarps;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidValue;
  auto kernel = combine_kernel<T, Layout>;
  MLA_LAUNCH(kernel, dim3(static_cast<uint32_t>(blocks)), kCombineThreads, 0, stream, a, layout);
  return cudaGetLastError();
}

// The combine for a q dtype (out's element type).
template <typename Layout>
cudaError_t launch_combine_for(DType dtype, const CombineArgs& a, const Layout& layout, cudaStream_t stream) {
  switch (dtype) {
    case DType::kFloat32: return launch_combine<float>(a, layout, stream);
    case DType::kFloat16: return launch_combine<__half>(a, layout, stream);
    case DType::kBFloat16: return launch_combine<__nv_bfloat16>(a, layout, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace mla::cuda
