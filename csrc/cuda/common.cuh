// Device helpers shared by the CUDA kernels: element types, 16-byte async copies,
// ldmatrix and the m16n8k16 tensor-core MMA (sm_80+), dynamic shared memory and the launch
// macro. No torch headers.
//
// Every PTX instruction the kernels use sits in a wrapper here or in fp8.cuh. Built with
// -DMLA_CUDA_EMULATION (plain g++, tests/cuda_emu), the wrappers and MLA_LAUNCH call the
// SIMT emulator instead, and the kernel bodies run unchanged on the CPU
// (docs/cuda-emulation.md).
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../mla_params.h"

#if defined(MLA_CUDA_EMULATION)
#include "mla_cuda_emu.h"  // tests/cuda_emu: fibers, barriers, warp collectives, lazy cp.async
#define MLA_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::mla_emu::launch(kernel, grid, block, smem, stream, __VA_ARGS__)
#else
// kernel<<<grid, block, smem, stream>>>(args); `kernel` must be one token (no template commas).
#define MLA_LAUNCH(kernel, grid, block, smem, stream, ...) kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#endif

namespace mla::cuda {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;

template <typename T>
struct TypeTraits;

template <>
struct TypeTraits<float> {
  static __device__ __forceinline__ float to_float(float x) { return x; }
  static __device__ __forceinline__ float from_float(float x) { return x; }
};

template <>
struct TypeTraits<__half> {
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
  // Two floats as one 32-bit register holding (lo, hi) halves.
  static __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
};

template <>
struct TypeTraits<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
  static __device__ __forceinline__ uint32_t pack2(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
};

// The block's dynamic shared memory (the launch's third <<< >>> argument), 128-byte aligned.
// Kernels carve all their shared arrays from it, so its size is declared in one place.
__device__ __forceinline__ unsigned char* dynamic_smem() {
#if defined(MLA_CUDA_EMULATION)
  return ::mla_emu::dynamic_smem();
#else
  extern __shared__ __align__(128) unsigned char dynamic_smem_bytes[];
  return dynamic_smem_bytes;
#endif
}

#if !defined(MLA_CUDA_EMULATION)
__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}
#endif

// 16-byte global -> shared copy that bypasses L1. When `valid` is false nothing is
// read from `src` (source size 0) and the 16 destination bytes are zero-filled.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
#if defined(MLA_CUDA_EMULATION)
  ::mla_emu::cp_async_16(dst, src, valid);
#else
  const int src_bytes = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(smem_u32(dst)), "l"(src), "r"(src_bytes)
               : "memory");
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(MLA_CUDA_EMULATION)
  ::mla_emu::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

// Waits until at most N of this thread's committed cp.async groups are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
#if defined(MLA_CUDA_EMULATION)
  ::mla_emu::cp_async_wait(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// Four 8x8 16-bit matrices; lane l supplies the row address of matrix l / 8, row l % 8.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* p) {
#if defined(MLA_CUDA_EMULATION)
  ::mla_emu::ldmatrix_x4(r, p, /*trans=*/false);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
#endif
}

__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* p) {
#if defined(MLA_CUDA_EMULATION)
  ::mla_emu::ldmatrix_x4(r, p, /*trans=*/true);
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_u32(p)));
#endif
}

// d += a * b for one m16n8k16 tile, fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                        uint32_t b1) {
#if defined(MLA_CUDA_EMULATION)
  ::mla_emu::mma_16816(::mla_emu::MmaKind::kBf16, d, a, b0, b1);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
#if defined(MLA_CUDA_EMULATION)
  ::mla_emu::mma_16816(::mla_emu::MmaKind::kFp16, d, a, b0, b1);
#else
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#endif
}

// Cache length clamped to [0, block-table capacity]: a bad seqlen can never index past
// the block table's row.
__device__ __forceinline__ int32_t clamped_seqlen(const DecodeParams& p, int32_t b) {
  const int64_t capacity = static_cast<int64_t>(p.max_blocks_per_seq) * p.block_size;
  const int64_t len = p.cache_seqlens[b];
  return static_cast<int32_t>(len < 0 ? 0 : (len > capacity ? capacity : len));
}

// Address of cache row `key` of sequence `b`, or nullptr when the block id there is
// outside [0, num_blocks). `key` must be < clamped_seqlen(p, b).
template <typename T>
__device__ __forceinline__ const T* cache_row(const DecodeParams& p, int32_t b, int32_t key) {
  const int32_t idx = key / p.block_size;
  const int32_t block = p.block_table[static_cast<int64_t>(b) * p.block_table_batch_stride + idx];
  if (block < 0 || block >= p.num_blocks) return nullptr;
  return static_cast<const T*>(p.cache) + static_cast<int64_t>(block) * p.cache_block_stride +
         static_cast<int64_t>(key - idx * p.block_size) * p.cache_token_stride;
}

__host__ __device__ __forceinline__ int32_t ceil_div(int64_t a, int64_t b) {
  return static_cast<int32_t>((a + b - 1) / b);
}

// The keys [key_begin, key_end) a split covers: tiles of `tile` keys out of n_keys,
// spread evenly over num_splits. Depends on n_keys (a device value), never on the grid.
struct SplitRange {
  int32_t tile_begin, tile_end, key_end;
};

__device__ __forceinline__ SplitRange split_range(int32_t n_keys, int32_t tile, int32_t split, int32_t num_splits) {
  const int32_t n_tiles = ceil_div(n_keys, tile);
  const int32_t per_split = ceil_div(n_tiles, num_splits);
  SplitRange r;
  r.tile_begin = min(n_tiles, split * per_split);
  r.tile_end = min(n_tiles, r.tile_begin + per_split);
  r.key_end = min(n_keys, r.tile_end * tile);
  return r;
}

}  // namespace mla::cuda
