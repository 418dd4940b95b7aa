// Hopper (sm_90a) extensions of the SIMT emulator: what csrc/cuda/sm90/ptx_sm90.cuh calls when
// it is compiled with -DMLA_CUDA_EMULATION. Implemented in emu_sm90.cpp on top of two hooks of
// emu_runtime.cpp: polling waits (spin_yield) and per-block begin / end / stall callbacks.
//
//   wgmma.mma_async (SS)    a 128-thread warpgroup rendezvous; A and B are read from shared memory
//                           through the 64-bit matrix descriptors (canonical layouts, swizzle
//                           none / 32 / 64 / 128 B on the shared address bits, as PTX defines
//                           them); the product lands at the wait_group that covers its group.
//                           Accumulators are NaN-poisoned at issue; shared operands changed
//                           between issue and completion are an error.
//   mbarrier                phase, pending arrivals and tx-count; try_wait polls, and a wait no
//                           thread or copy can complete is reported as a deadlock.
//   cp.async.bulk (1-D), cp.async.bulk.tensor.2d (TMA, our TensorMap2D)
//                           lazy: the destination is poisoned at issue; the copy lands (and
//                           completes its bytes on the mbarrier) when a thread polls that
//                           mbarrier, or when the block would otherwise hang.
//   bar.sync / bar.arrive   named barriers 1..15 with a thread count.
//   setmaxnreg              a check: a multiple of 8 in [24, 256], uniform across the warpgroup.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace mla_emu {

// ---- Hooks in emu_runtime.cpp.
// The calling fiber yields and stays runnable (a poll of something another fiber or the async
// machinery will change). `key`, `generation` and `what` name what it polls: a round in which
// every runnable fiber polls again exactly what it polled before, and nothing called
// note_progress(), is a deadlock unless a stall hook makes progress.
void spin_yield(const void* key, uint64_t generation, const std::string& what);
void note_progress();
struct BlockHooks {
  void (*begin)() = nullptr;     // before a block's first thread runs (shared memory is fresh)
  void (*end)() = nullptr;       // after its last thread exited (checks: nothing left in flight)
  bool (*on_stall)() = nullptr;  // every runnable thread polls in vain: finish async work; true if any
};
void add_block_hooks(const BlockHooks& hooks);
int current_thread();          // linear thread id in the block
int64_t block_threads();
size_t dynamic_smem_size();
bool smem_contains(const void* p, size_t bytes);
std::string where_current();   // "block (x,y,z) thread t (warp w lane l)"

namespace sm90 {

// The address of p in the shared window (its offset from the block's dynamic shared memory,
// which the emulator aligns to 1024 bytes like a real shared window).
uint32_t smem_address(const void* p);

// ---- mbarrier (8 bytes of shared memory, 8-byte aligned).
void mbarrier_init(void* bar, uint32_t arrivals);
uint64_t mbarrier_arrive(void* bar);
uint64_t mbarrier_arrive_expect_tx(void* bar, uint32_t tx_bytes);
bool mbarrier_try_wait_parity(void* bar, uint32_t parity);  // polls (yields) when not complete
void fence_mbarrier_init();
void fence_proxy_async();

// ---- Bulk copies global -> shared, completing `tx bytes` on `bar`.
void bulk_copy_g2s(void* smem_dst, const void* global_src, uint32_t bytes, void* bar);

// Our stand-in for CUtensorMap (cuTensorMapEncodeTiled's result): a 2-D tiled tensor of 16-bit
// or 8-bit elements, dimension 0 contiguous.
struct TensorMap2D {
  const void* base = nullptr;
  uint64_t dims[2] = {0, 0};       // elements: inner, outer
  uint64_t outer_stride_bytes = 0;  // bytes between consecutive outer indices (multiple of 16)
  uint32_t box[2] = {0, 0};        // box size: inner (box[0] * elem_bytes <= swizzle span), outer
  uint32_t elem_bytes = 2;
  int swizzle_bytes = 0;           // 0 (none), 32, 64 or 128
};
void tma_load_2d(void* smem_dst, const TensorMap2D* map, int32_t c0, int32_t c1, void* bar);
// TMA box copies issued since the process started (tests assert that a path used TMA).
uint64_t tma_boxes_issued();

// ---- Named barriers (ids 1..15; 0 is __syncthreads'), `threads` a multiple of 32.
void named_barrier_sync(int id, int threads);
void named_barrier_arrive(int id, int threads);

// ---- setmaxnreg.{inc,dec}.sync.aligned.u32
void setmaxnreg(int registers, bool increase);

// ---- wgmma (warpgroup = 4 consecutive warps starting at a multiple of 4).
void wgmma_fence();
void wgmma_commit_group();
void wgmma_wait_group(int pending);
// D[64 x n] (+)= A[64 x 16] B[16 x n]: this thread's n / 2 accumulators at acc (PTX fragment order).
// kind: 0 bf16, 1 fp16 inputs. trans_a / trans_b: 0 K-major, 1 MN-major (imm-trans-a / -b).
void wgmma_ss(int kind, float* acc, int n, uint64_t desc_a, uint64_t desc_b, bool scale_d, int trans_a, int trans_b);
// A from registers: this thread's four 32-bit registers of the m64k16 A fragment (K-major).
void wgmma_rs(int kind, float* acc, int n, const uint32_t* a_regs, uint64_t desc_b, bool scale_d, int trans_b);

}  // namespace sm90
}  // namespace mla_emu
