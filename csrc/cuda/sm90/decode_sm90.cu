// Launcher of the Hopper decode kernel (decode_sm90.cuh, the design and its limits).
#include "decode_sm90.cuh"
#include "decode_sm90.h"
#include "tensor_map.cuh"

namespace mla::cuda::sm90 {

static_assert(kDecodeSmemBytes == kSmemBytes && kDecodeBlockM == kBlockM && kDecodeBlockN == kBlockN,
              "decode_sm90.h mirrors the kernel's configuration");

namespace {
// The TMA view of a 16-bit cache for the producer's box loads: [NB * BS rows][576 elements], boxes
// of 64 rows x 64 columns, 128-byte swizzle. Only when every tile of 64 keys lies in one block at
// evenly spaced rows: block_size % 64 == 0, blocks exactly block_size token strides apart (a padded
// block stride would need a 3-D map), 16-byte aligned base and stride (the planner's alignment),
// and row indices in int32. false: the kernel gathers every tile with cp.async.
bool make_cache_map(const DecodeParams& p, TensorMap* map) {
  if (p.cache_dtype == DType::kFloat8E4M3 || p.num_blocks <= 0 || p.block_size % kBlockN != 0 ||
      p.cache_block_stride != static_cast<int64_t>(p.block_size) * p.cache_token_stride ||
      p.cache_token_stride < kHeadDim || (static_cast<int64_t>(p.num_blocks) + 1) * p.block_size > 0x7fffffff)
    return false;
  // One map per (cache, shape) and thread: the encode is a host-only call, but a decode step
  // launches once per layer on the same cache tensor.
  struct Cached {
    const void* cache = nullptr;
    int64_t rows = -1, token_stride = -1;
    TensorMap map;
  };
  thread_local Cached cached;
  const int64_t rows = static_cast<int64_t>(p.num_blocks) * p.block_size;
  if (cached.cache != p.cache || cached.rows != rows || cached.token_stride != p.cache_token_stride) {
    cached.cache = nullptr;
    if (mla::sm90::make_tensor_map_2d(&cached.map, p.cache, kHeadDim, static_cast<uint64_t>(rows),
                                      static_cast<uint64_t>(p.cache_token_stride) * 2, kChunkCols, kBlockN,
                                      128) != cudaSuccess)
      return false;
    cached.cache = p.cache;
    cached.rows = rows;
    cached.token_stride = p.cache_token_stride;
  }
  *map = cached.map;
  return true;
}

template <typename T, bool kFp8>
cudaError_t launch(const DecodeParams& p, cudaStream_t stream) {
  auto kernel = decode_sm90_kernel<T, kFp8>;
  cudaError_t err =
      cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kSmemBytes));
  if (err != cudaSuccess) return err;
  TensorMap cache_map{};
  const bool cache_tma = !kFp8 && make_cache_map(p, &cache_map);
  // Persistent CTAs: the schedule (schedule.cuh, filled on the device) says what each one does.
  if (p.sched == nullptr || p.sched_ctas <= 0) return cudaErrorInvalidValue;
  MLA_LAUNCH(kernel, dim3(static_cast<uint32_t>(p.sched_ctas)), kThreads, kSmemBytes, stream, p, cache_map, cache_tma);
  return cudaGetLastError();
}
}  // namespace

cudaError_t launch_decode_sm90(const DecodeParams& p, cudaStream_t stream) {
  const bool fp8 = p.cache_dtype == DType::kFloat8E4M3 && p.kv_scale != nullptr;
  if (p.q_dtype == DType::kBFloat16) {
    if (p.cache_dtype == DType::kBFloat16) return launch<__nv_bfloat16, false>(p, stream);
    if (fp8) return launch<__nv_bfloat16, true>(p, stream);
  } else if (p.q_dtype == DType::kFloat16) {
    if (p.cache_dtype == DType::kFloat16) return launch<__half, false>(p, stream);
    if (fp8) return launch<__half, true>(p, stream);
  }
  return cudaErrorInvalidValue;
}

#if !defined(MLA_CUDA_EMULATION)
bool decode_sm90_available(int device) {
  int major = 0, minor = 0;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess ||
      cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device) != cudaSuccess || major != 9 ||
      minor != 0)
    return false;
  // The sm_90a body needs well over 100 registers; the stub another sm_90 image holds (the
  // kernel compiled without __CUDA_ARCH_FEAT_SM90_ALL) only traps and needs a handful.
  cudaFuncAttributes attr{};
  if (cudaFuncGetAttributes(&attr, decode_sm90_kernel<__nv_bfloat16, false>) != cudaSuccess) {
    (void)cudaGetLastError();
    return false;
  }
  return attr.numRegs >= 64;
}
#endif

}  // namespace mla::cuda::sm90
