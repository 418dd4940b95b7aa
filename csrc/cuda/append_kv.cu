// Latent-cache append: cache[slot] = [kv_c | k_pe], one pass. Each thread moves one
// vector (16 bytes when every row start is 16-byte aligned, else one element) of one
// token's 576-wide row; consecutive threads cover consecutive vectors of a row, so loads
// and stores are coalesced. Slots < 0 and slots past the cache are skipped.
//
// float8_e4m3fn cache: each thread quantizes 16 values (one 16-byte store) as
// e4m3(x / scale), the scale read from device memory (a captured graph keeps reading the
// current value), division and rounding bit-identical to the CPU kernel (fp8.cuh).
#include "common.cuh"
#include "cuda_kernels.h"
#include "fp8.cuh"

namespace mla::cuda {
namespace {

constexpr int kAppendThreads = 256;

// Element offset of `token`'s cache row, or -1 when its slot is padding (< 0) or beyond
// the cache: such rows are never written (the eager index check reports the latter).
__device__ __forceinline__ int64_t destination_row(const AppendParams& p, int64_t token) {
  const int64_t slot = p.slot_is_int64 ? static_cast<const int64_t*>(p.slot_mapping)[token]
                                       : static_cast<int64_t>(static_cast<const int32_t*>(p.slot_mapping)[token]);
  if (slot < 0 || slot >= p.num_blocks * p.block_size) return -1;
  const int64_t block = slot / p.block_size;
  return block * p.cache_block_stride + (slot - block * p.block_size) * p.cache_token_stride;
}

// One thread's share of the append: kElems consecutive values of one token's 576-wide row.
// Threads are numbered token-major; `active` is false past the last token and for rows
// that destination_row() skips.
template <typename T, int kElems>
struct AppendLane {
  bool active;
  int64_t row_offset;  // element offset of the destination cache row
  int column;          // first column of the row this thread writes
  const T* src;        // kElems input values: from kv_c (columns < 512) or k_pe

  __device__ __forceinline__ explicit AppendLane(const AppendParams& p) {
    constexpr int kRowVecs = kHeadDim / kElems;
    const int64_t idx = static_cast<int64_t>(blockIdx.x) * kAppendThreads + threadIdx.x;
    const int64_t token = idx / kRowVecs;
    column = static_cast<int>(idx - token * kRowVecs) * kElems;
    row_offset = token < p.num_tokens ? destination_row(p, token) : -1;
    active = row_offset >= 0;
    src = column < kLatentDim ? static_cast<const T*>(p.kv_c) + token * p.kv_c_row_stride + column
                              : static_cast<const T*>(p.k_pe) + token * p.k_pe_row_stride + (column - kLatentDim);
  }
};

template <typename T, typename Vec>
__global__ void __launch_bounds__(kAppendThreads) append_kv_kernel(const AppendParams p) {
  constexpr int kElems = sizeof(Vec) / sizeof(T);     // elements per vector
  const AppendLane<T, kElems> lane(p);
  if (!lane.active) return;
  T* row = static_cast<T*>(p.cache) + lane.row_offset;
  *reinterpret_cast<Vec*>(row + lane.column) = __ldg(reinterpret_cast<const Vec*>(lane.src));
}

template <typename T, typename Vec>
cudaError_t launch(const AppendParams& p, cudaStream_t stream) {
  constexpr int kRowVecs = kHeadDim / (sizeof(Vec) / sizeof(T));
  const int64_t total = p.num_tokens * kRowVecs;
  const int64_t blocks = (total + kAppendThreads - 1) / kAppendThreads;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  auto kernel = append_kv_kernel<T, Vec>;
  MLA_LAUNCH(kernel, static_cast<unsigned>(blocks), kAppendThreads, 0, stream, p);
  return cudaGetLastError();
}

bool aligned16(const void* ptr) { return reinterpret_cast<uintptr_t>(ptr) % 16 == 0; }

template <typename T, typename Scalar>
cudaError_t dispatch(const AppendParams& p, cudaStream_t stream) {
  constexpr int64_t e = sizeof(T);
  const bool vec = aligned16(p.kv_c) && aligned16(p.k_pe) && aligned16(p.cache) && (p.kv_c_row_stride * e) % 16 == 0 &&
                   (p.k_pe_row_stride * e) % 16 == 0 && (p.cache_block_stride * e) % 16 == 0 &&
                   (p.cache_token_stride * e) % 16 == 0;
  return vec ? launch<T, uint4>(p, stream) : launch<T, Scalar>(p, stream);
}

// ---- fp8 cache. kElems values per thread: 16 (16-byte store, 16-byte aligned inputs) or 1.
template <typename T, int kElems>
__global__ void __launch_bounds__(kAppendThreads) append_kv_fp8_kernel(const AppendParams p) {
  const AppendLane<T, kElems> lane(p);
  if (!lane.active) return;
  uint8_t* row = static_cast<uint8_t*>(p.cache) + lane.row_offset + lane.column;
  const T* src = lane.src;
  const float scale = __ldg(p.scale);
  if constexpr (kElems == 1) {
    row[0] = e4m3_quantize(TypeTraits<T>::to_float(src[0]), scale);
  } else {
    static_assert(kElems == 16, "16 values per 16-byte store");
    constexpr int kLoads = kElems * sizeof(T) / 16;  // 16-byte input loads: 1 per 8 (16-bit) or 4 (fp32) values
    constexpr int kPerLoad = 16 / sizeof(T);
    uint32_t packed[4] = {0u, 0u, 0u, 0u};
#pragma unroll
    for (int l = 0; l < kLoads; ++l) {
      const uint4 raw = __ldg(reinterpret_cast<const uint4*>(src) + l);
      const T* vals = reinterpret_cast<const T*>(&raw);
#pragma unroll
      for (int i = 0; i < kPerLoad; ++i) {
        const int e = l * kPerLoad + i;
        packed[e / 4] |= static_cast<uint32_t>(e4m3_quantize(TypeTraits<T>::to_float(vals[i]), scale)) << (8 * (e % 4));
      }
    }
    *reinterpret_cast<uint4*>(row) = make_uint4(packed[0], packed[1], packed[2], packed[3]);
  }
}

template <typename T, int kElems>
cudaError_t launch_fp8(const AppendParams& p, cudaStream_t stream) {
  constexpr int kRowVecs = kHeadDim / kElems;
  const int64_t total = p.num_tokens * kRowVecs;
  const int64_t blocks = (total + kAppendThreads - 1) / kAppendThreads;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  auto kernel = append_kv_fp8_kernel<T, kElems>;
  MLA_LAUNCH(kernel, static_cast<unsigned>(blocks), kAppendThreads, 0, stream, p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t dispatch_fp8(const AppendParams& p, cudaStream_t stream) {
  constexpr int64_t e = sizeof(T);
  const bool vec = aligned16(p.kv_c) && aligned16(p.k_pe) && aligned16(p.cache) && (p.kv_c_row_stride * e) % 16 == 0 &&
                   (p.k_pe_row_stride * e) % 16 == 0 && p.cache_block_stride % 16 == 0 && p.cache_token_stride % 16 == 0;
  return vec ? launch_fp8<T, 16>(p, stream) : launch_fp8<T, 1>(p, stream);
}

}  // namespace

cudaError_t append_kv(const AppendParams& p, cudaStream_t stream) {
  if (p.num_tokens == 0) return cudaSuccess;
  if (p.cache_dtype == DType::kFloat8E4M3) {
    if (p.scale == nullptr) return cudaErrorInvalidValue;
    switch (p.input_dtype) {
      case DType::kFloat32: return dispatch_fp8<float>(p, stream);
      case DType::kFloat16: return dispatch_fp8<__half>(p, stream);
      case DType::kBFloat16: return dispatch_fp8<__nv_bfloat16>(p, stream);
      default: return cudaErrorInvalidValue;
    }
  }
  if (p.input_dtype != p.cache_dtype) return cudaErrorInvalidValue;
  switch (p.cache_dtype) {
    case DType::kFloat32: return dispatch<float, float>(p, stream);
    case DType::kFloat16: return dispatch<__half, unsigned short>(p, stream);
    case DType::kBFloat16: return dispatch<__nv_bfloat16, unsigned short>(p, stream);
    default: return cudaErrorInvalidValue;
  }
}

}  // namespace mla::cuda
