// Hopper (sm_90a) PTX wrappers for the MLA kernels: wgmma with shared-memory descriptors,
// mbarrier, bulk / TMA copies, named barriers and setmaxnreg. Torch-free. Like common.cuh,
// every wrapper has an -DMLA_CUDA_EMULATION branch that calls the CPU emulator
// (tests/cuda_emu/emu_sm90.h, docs/cuda-emulation.md), so a kernel written on these runs
// unchanged on the CPU with the emulator's checks.
#pragma once
#include <cstdint>
#include <type_traits>

#include "../common.cuh"

#if defined(MLA_CUDA_EMULATION)
#include "emu_sm90.h"
#ifndef __grid_constant__
#define __grid_constant__
#endif
#else
#include <cuda.h>  // CUtensorMap (a type only: the map is encoded on the host, cuTensorMapEncodeTiled)

#include "wgmma_gen.cuh"
#endif

namespace mla::sm90 {

// ---------------------------------------------------------------------------------------------
// Shared addresses and wgmma matrix descriptors

// p's address in the shared window (18 significant bits).
__device__ __forceinline__ uint32_t smem_addr(const void* p) {
#if defined(MLA_CUDA_EMULATION)
  return ::mla_emu::sm90::smem_address(p);
#else
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
#endif
}

// The descriptor's 2-bit layout field (bits 62-63).
enum class Swizzle : uint32_t { kNone = 0, k128B = 1, k64B = 2, k32B = 3 };

// 64-bit wgmma matrix descriptor (PTX ISA "Matrix Descriptor Format"): start address >> 4 in
// bits 0-13, leading-dimension byte offset >> 4 in 16-29, stride-dimension byte offset >> 4 in
// 32-45, base offset 0 (bits 49-51: the tiles here start at their swizzle atom's alignment),
// layout in 62-63. LBO / SBO meanings per layout and major-ness: see emu_sm90.cpp read_operand.
__device__ __forceinline__ uint64_t make_smem_desc(const void* start, uint32_t lbo_bytes, uint32_t sbo_bytes,
                                                   Swizzle swizzle) {
  const uint64_t addr = (smem_addr(start) & 0x3ffffu) >> 4;
  return addr | (static_cast<uint64_t>((lbo_bytes >> 4) & 0x3fffu) << 16) |
         (static_cast<uint64_t>((sbo_bytes >> 4) & 0x3fffu) << 32) | (static_cast<uint64_t>(swizzle) << 62);
}

// The same descriptor with its start address moved by `bytes` (a multiple of 16), e.g. the next
// k-step of 16 elements inside a 128-byte swizzled K-major row (+32 bytes).
__device__ __forceinline__ uint64_t desc_advance(uint64_t desc, uint32_t bytes) { return desc + (bytes >> 4); }

// ---------------------------------------------------------------------------------------------
// wgmma (all four are .sync.aligned: every thread of the warpgroup executes them together)

__device__ __forceinline__ void wgmma_fence() {
#if defined(MLA_CUDA_EMULATION)
  ::mla_emu::sm90::wgmma_fence();
#else
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#endif
}

__device__ __forceinline__ void wgmma_commit_group() {
#if defined(MLA_CUDA_EMULATION)
  ::mla_emu::sm90::wgmma_commit_group();
#else
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
#endif
}

// Waits until at most N of the warpgroup's committed wgmma groups are pending.
template <int N>
__device__ __forceinline__ void wgmma_wait_group() {
#if defined(MLA_CUDA_EMULATION)
  ::mla_emu::sm90::wgmma_wait_group(N);
#else
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
#endif
}

// Keeps the compiler from moving accumulator register accesses across a wgmma fence / wait.
// (The emulator needs nothing: the accumulators' address escapes into the wgmma calls.)
template <int K>
__device__ __forceinline__ void wgmma_fence_operand(float (&d)[K]) {
#if defined(MLA_CUDA_EMULATION)
  (void)d;
#else
#pragma unroll
  for (int i = 0; i < K; ++i) asm volatile("" : "+f"(d[i])::"memory");
#endif
}

// D[64 x N] = A[64 x 16] B[16 x N] (+ D when accumulate): T (__nv_bfloat16 or __half) inputs
// from shared memory, fp32 accumulators in the PTX fragment order (thread t of the warpgroup,
// value i: row 16 (t / 32) + (t % 32) / 4 + 8 ((i % 4) / 2), column 8 (i / 4) + 2 (t % 4) + i % 2).
// TransA / TransB: 0 K-major, 1 MN-major.
template <typename T, int N, int TransA = 0, int TransB = 0>
__device__ __forceinline__ void wgmma_ss(float (&d)[N / 2], uint64_t desc_a, uint64_t desc_b, bool accumulate) {
  static_assert(N % 8 == 0 && N >= 8 && N <= 256, "wgmma m64nNk16: N a multiple of 8 in [8, 256]");
  static_assert(std::is_same<T, __nv_bfloat16>::value || std::is_same<T, __half>::value, "bf16 or fp16 inputs");
#if defined(MLA_CUDA_EMULATION)
  ::mla_emu::sm90::wgmma_ss(std::is_same<T, __half>::value ? 1 : 0, d, N, desc_a, desc_b, accumulate, TransA, TransB);
#else
  WgmmaSs<T, N, TransA, TransB>::run(d, desc_a, desc_b, accumulate ? 1 : 0);
#endif
}

// The same with A [64 x 16] from registers: thread t's four 32-bit registers hold the bf16 /
// fp16 pairs of the m64k16 fragment (warp w = t / 32 owns rows 16 w..16 w + 15; lane l, register
// i: row 16 w + l / 4 + 8 (i % 2), columns 2 (l % 4) + 8 (i / 2) and + 1, the lower in bits
// 0-15). The registers must not change until the wait_group that completes the wgmma.
template <typename T, int N, int TransB = 0>
__device__ __forceinline__ void wgmma_rs(float (&d)[N / 2], const uint32_t (&a)[4], uint64_t desc_b, bool accumulate) {
  static_assert(N % 8 == 0 && N >= 8 && N <= 256, "wgmma m64nNk16: N a multiple of 8 in [8, 256]");
  static_assert(std::is_same<T, __nv_bfloat16>::value || std::is_same<T, __half>::value, "bf16 or fp16 inputs");
#if defined(MLA_CUDA_EMULATION)
  ::mla_emu::sm90::wgmma_rs(std::is_same<T, __half>::value ? 1 : 0, d, N, a, desc_b, accumulate, TransB);
#else
  WgmmaRs<T, N, TransB>::run(d, a, desc_b, accumulate ? 1 : 0);
#endif
}

// ---------------------------------------------------------------------------------------------
// mbarrier (a uint64_t in shared memory)

__device__ __forceinline__ void mbarrier_init(uint64_t* bar, uint32_t arrivals) {
#if defined(MLA_CUDA_EMULATION)
  ::mla_emu::sm90::mbarrier_init(bar, arrivals);
#else
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(smem_addr(bar)), "r"(arrivals) : "memory");
#endif
}

// Makes the inits visible to the async proxy (bulk copies, TMA) before their first use.
__device__ __forceinline__ void fence_mbarrier_init() {
#if defined(MLA_CUDA_EMULATION)
  ::mla_emu::sm90::fence_mbarrier_init();
#else
  asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
#endif
}

// Orders this thread's generic-proxy shared-memory accesses before later async-proxy ones
// (wgmma operand reads, bulk copy writes) and the reverse.
__device__ __forceinline__ void fence_proxy_async() {
#if defined(MLA_CUDA_EMULATION)
  ::mla_emu::sm90::fence_proxy_async();
#else
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
#endif
}

__device__ __forceinline__ uint64_t mbarrier_arrive(uint64_t* bar) {
#if defined(MLA_CUDA_EMULATION)
  return ::mla_emu::sm90::mbarrier_arrive(bar);
#else
  uint64_t state;
  asm volatile("mbarrier.arrive.shared::cta.b64 %0, [%1];\n" : "=l"(state) : "r"(smem_addr(bar)) : "memory");
  return state;
#endif
}

// Adds tx_bytes to the current phase's expected transaction count, then arrives.
__device__ __forceinline__ uint64_t mbarrier_arrive_expect_tx(uint64_t* bar, uint32_t tx_bytes) {
#if defined(MLA_CUDA_EMULATION)
  return ::mla_emu::sm90::mbarrier_arrive_expect_tx(bar, tx_bytes);
#else
  uint64_t state;
  asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 %0, [%1], %2;\n"
               : "=l"(state)
               : "r"(smem_addr(bar)), "r"(tx_bytes)
               : "memory");
  return state;
#endif
}

// True once the phase of parity `parity` has completed (false: poll again).
__device__ __forceinline__ bool mbarrier_try_wait_parity(uint64_t* bar, uint32_t parity) {
#if defined(MLA_CUDA_EMULATION)
  return ::mla_emu::sm90::mbarrier_try_wait_parity(bar, parity);
#else
  uint32_t done;
  asm volatile(
      "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(done)
      : "r"(smem_addr(bar)), "r"(parity)
      : "memory");
  return done != 0;
#endif
}

__device__ __forceinline__ void mbarrier_wait_parity(uint64_t* bar, uint32_t parity) {
  while (!mbarrier_try_wait_parity(bar, parity)) {
  }
}

// ---------------------------------------------------------------------------------------------
// Bulk copies global -> shared (async proxy), completing their bytes on an mbarrier

// `bytes` (a multiple of 16) from 16-aligned global src to 16-aligned shared dst.
__device__ __forceinline__ void bulk_copy_g2s(void* dst, const void* src, uint32_t bytes, uint64_t* bar) {
#if defined(MLA_CUDA_EMULATION)
  ::mla_emu::sm90::bulk_copy_g2s(dst, src, bytes, bar);
#else
  asm volatile(
      "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];\n" ::"r"(
          smem_addr(dst)),
      "l"(src), "r"(bytes), "r"(smem_addr(bar))
      : "memory");
#endif
}

// A 2-D tiled tensor map: the host encodes it (cuTensorMapEncodeTiled on a GPU; the
// emulator's TensorMap2D fields in emulation) and the kernel takes it as a __grid_constant__
// parameter.
#if defined(MLA_CUDA_EMULATION)
using TensorMap = ::mla_emu::sm90::TensorMap2D;
#else
using TensorMap = CUtensorMap;
#endif

// The box at (c0 inner, c1 outer) element coordinates into 128-aligned shared dst, swizzled as
// the map says; out-of-bounds elements are zero-filled.
__device__ __forceinline__ void tma_load_2d(void* dst, const TensorMap* map, int32_t c0, int32_t c1, uint64_t* bar) {
#if defined(MLA_CUDA_EMULATION)
  ::mla_emu::sm90::tma_load_2d(dst, map, c0, c1, bar);
#else
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], "
      "[%4];\n" ::"r"(smem_addr(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(smem_addr(bar))
      : "memory");
#endif
}

// ---------------------------------------------------------------------------------------------
// Named barriers (ids 1..15; 0 is __syncthreads') and register reallocation

// Waits until `threads` (a multiple of 32) threads have arrived at barrier `id`.
__device__ __forceinline__ void named_barrier_sync(int id, int threads) {
#if defined(MLA_CUDA_EMULATION)
  ::mla_emu::sm90::named_barrier_sync(id, threads);
#else
  asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
#endif
}

// Arrives at barrier `id` without waiting (the producer side of a named-barrier handshake).
__device__ __forceinline__ void named_barrier_arrive(int id, int threads) {
#if defined(MLA_CUDA_EMULATION)
  ::mla_emu::sm90::named_barrier_arrive(id, threads);
#else
  asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(threads) : "memory");
#endif
}

// Raises (inc) or lowers (dec) this warpgroup's per-thread register budget to N.
template <int N>
__device__ __forceinline__ void setmaxnreg_inc() {
  static_assert(N % 8 == 0 && N >= 24 && N <= 256, "setmaxnreg: a multiple of 8 in [24, 256]");
#if defined(MLA_CUDA_EMULATION)
  ::mla_emu::sm90::setmaxnreg(N, true);
#else
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(N));
#endif
}

template <int N>
__device__ __forceinline__ void setmaxnreg_dec() {
  static_assert(N % 8 == 0 && N >= 24 && N <= 256, "setmaxnreg: a multiple of 8 in [24, 256]");
#if defined(MLA_CUDA_EMULATION)
  ::mla_emu::sm90::setmaxnreg(N, false);
#else
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(N));
#endif
}

}  // namespace mla::sm90
