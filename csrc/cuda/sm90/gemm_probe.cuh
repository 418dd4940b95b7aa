// End-to-end probe of the sm_90a building blocks (ptx_sm90.cuh), the pattern the Hopper decode
// kernel will use: one CTA of two warpgroups. Warpgroup 1 is the producer (one thread issues TMA
// box copies of A and B into a STAGES-deep ring of 128-byte-swizzled tiles, full / empty
// mbarriers with expect_tx); warpgroup 0 consumes each stage with four wgmma m64nNk16 k-steps.
//
//   C[64 x N] (fp32) = A[64 x K] (T = bf16 or fp16, K contiguous) * B, where B is
//     B_MN = false: [N x K] T, K contiguous (K-major, like the K cache in S = Q K^T)
//     B_MN = true:  [K x N] T, N contiguous (MN-major, like V in O = P V)
//
// Shared-memory tiles (all 1024-aligned, 128-byte swizzle on the shared address bits):
//   A stage: 64 rows x 128 B (64 k), K-major: row r at 128 r, 8-row groups 1024 B apart (SBO).
//   B stage, K-major: N rows x 128 B, the same layout (SBO 1024).
//   B stage, MN-major: N / 64 boxes of 64 k-rows x 128 B (64 n); k-row groups of 8 are 1024 B
//     apart (SBO), 64-column n blocks 8 KB apart (LBO).
// Not part of the extension build (a .cuh): tests/cuda_emu/sm90_gemm_probe.cpp runs it in the
// emulator, tests/cuda_emu/sm90_gemm_probe.cu compiles it with nvcc for sm_90a.
#pragma once
#include "ptx_sm90.cuh"

namespace mla::sm90::probe {

constexpr int kStages = 2;
constexpr int kKChunk = 64;                 // k elements per stage: one 128-byte swizzle row
constexpr int kThreads = 256;               // warpgroup 0: consumer, warpgroup 1: producer
constexpr uint32_t kATileBytes = 64 * 128;  // 64 rows x 64 bf16

template <int N>
struct Smem {
  static constexpr uint32_t kBTileBytes = N * 128;
  static constexpr uint32_t kStageBytes = kATileBytes + kBTileBytes;  // multiple of 1024
  static constexpr uint32_t kBarOffset = kStages * kStageBytes;
  static constexpr uint32_t kBytes = kBarOffset + 2 * kStages * 8;
};

template <typename T, int N, bool B_MN>
__global__ void __launch_bounds__(kThreads, 1)
    gemm_probe_kernel(const __grid_constant__ TensorMap map_a, const __grid_constant__ TensorMap map_b,
                      float* __restrict__ c, int k_chunks) {
  using S = Smem<N>;
  unsigned char* smem = mla::cuda::dynamic_smem();
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + S::kBarOffset);  // [kStages]: the tiles landed
  uint64_t* empty = full + kStages;                                     // [kStages]: consumed
  // threadIdx.x is re-read after each barrier rather than cached: the emulator's threadIdx is an
  // opaque call, which keeps GCC from threading the role branches through the barrier (a copy
  // of __syncthreads per branch would read as a divergent barrier).
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbarrier_init(&full[s], 1);     // the producer's arrive.expect_tx (+ the copies' bytes)
      mbarrier_init(&empty[s], 128);  // every consumer thread
    }
    fence_mbarrier_init();
  }
  __syncthreads();

  if (threadIdx.x >= 128) {  // producer warpgroup: few registers, one thread issues the copies
    setmaxnreg_dec<40>();
    if (threadIdx.x == 128) {
      for (int kc = 0; kc < k_chunks; ++kc) {
        const int s = kc % kStages;
        if (kc >= kStages) mbarrier_wait_parity(&empty[s], ((kc / kStages) - 1) & 1);
        unsigned char* a_tile = smem + s * S::kStageBytes;
        unsigned char* b_tile = a_tile + kATileBytes;
        mbarrier_arrive_expect_tx(&full[s], S::kStageBytes);
        tma_load_2d(a_tile, &map_a, kc * kKChunk, 0, &full[s]);
        if (B_MN) {
          for (int nb = 0; nb < N / 64; ++nb) tma_load_2d(b_tile + nb * 8192, &map_b, nb * 64, kc * kKChunk, &full[s]);
        } else {
          tma_load_2d(b_tile, &map_b, kc * kKChunk, 0, &full[s]);
        }
      }
    }
    return;
  }

  // Consumer warpgroup.
  setmaxnreg_inc<232>();
  float acc[N / 2];
#pragma unroll
  for (int i = 0; i < N / 2; ++i) acc[i] = 0.f;
  for (int kc = 0; kc < k_chunks; ++kc) {
    const int s = kc % kStages;
    mbarrier_wait_parity(&full[s], (kc / kStages) & 1);
    const unsigned char* a_tile = smem + s * S::kStageBytes;
    const unsigned char* b_tile = a_tile + kATileBytes;
    const uint64_t desc_a = make_smem_desc(a_tile, 16, 1024, Swizzle::k128B);
    const uint64_t desc_b = B_MN ? make_smem_desc(b_tile, 8192, 1024, Swizzle::k128B)
                                 : make_smem_desc(b_tile, 16, 1024, Swizzle::k128B);
    wgmma_fence_operand(acc);
    wgmma_fence();
#pragma unroll
    for (int ks = 0; ks < kKChunk / 16; ++ks) {
      // k-step ks: 32 bytes further along a K-major row; 16 rows (2 SBO groups) down an MN-major tile.
      const uint64_t da = desc_advance(desc_a, ks * 32);
      const uint64_t db = B_MN ? desc_advance(desc_b, ks * 2048) : desc_advance(desc_b, ks * 32);
      wgmma_ss<T, N, 0, B_MN ? 1 : 0>(acc, da, db, true);
    }
    wgmma_commit_group();
    wgmma_wait_group<0>();
    wgmma_fence_operand(acc);
    mbarrier_arrive(&empty[s]);  // this thread's reads of stage s are complete
  }

  // Accumulator fragment: value i of thread t at row 16 (t / 32) + (t % 32) / 4 + 8 ((i % 4) / 2),
  // column 8 (i / 4) + 2 (t % 4) + i % 2.
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
  for (int i = 0; i < N / 2; ++i) {
    const int row = 16 * warp + lane / 4 + 8 * ((i % 4) / 2);
    const int col = 8 * (i / 4) + 2 * (lane % 4) + (i % 2);
    c[row * N + col] = acc[i];
  }
}

}  // namespace mla::sm90::probe
