// Scenarios for the Hopper synchronisation model of the emulator (emu_sm90.cpp), each a small
// kernel on csrc/cuda/sm90/ptx_sm90.cuh's real wrappers; tests/test_cuda_emulated_sm90.py checks
// the good ones' outputs and that each bad one ends in the emulator error it must.
//
//   sm90_sync_probe SCENARIO ORDER SEED   stdout: output words (uint32, one per line)
// Scenarios:
//   bulk_ring       a producer thread streams 8 chunks of 32 rows x 256 B (one cp.async.bulk per
//                   row) through a 2-stage full / empty mbarrier ring; a consumer warpgroup copies
//                   each chunk out: the output must equal the input
//   named_pingpong  two warpgroups hand a buffer back and forth 4 times with bar.arrive / bar.sync
//                   on barriers 1 and 2 (256 threads each); each adds its warpgroup id + 1
//   acc_before_wait (bad) reads a wgmma accumulator between issue and wait_group: NaN comes out
//   never_arrives   (bad) waits on an mbarrier nobody arrives at: a deadlock report
//   named_count     (bad) bar.sync with a count larger than the threads that arrive: deadlock
//   setmaxnreg_split (bad) half a warpgroup asks for 232 registers, half for 240
//   mbar_clobbered  (bad) a plain store overwrites a live mbarrier
//   rs_regs_changed (bad) a thread changes its A registers while their wgmma_rs is in flight
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "emu_runtime.h"
#include "sm90/ptx_sm90.cuh"

namespace {

namespace s9 = mla::sm90;
constexpr int kRows = 32, kRowBytes = 256, kChunks = 8, kStages = 2;
constexpr int kChunkBytes = kRows * kRowBytes;

__global__ void bulk_ring_kernel(const unsigned char* in, unsigned char* out) {
  unsigned char* smem = mla::cuda::dynamic_smem();
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + kStages * kChunkBytes);
  uint64_t* empty = full + kStages;
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      s9::mbarrier_init(&full[s], 1);
      s9::mbarrier_init(&empty[s], 128);
    }
    s9::fence_mbarrier_init();
  }
  __syncthreads();
  if (threadIdx.x >= 128) {
    if (threadIdx.x == 128) {
      for (int c = 0; c < kChunks; ++c) {
        const int s = c % kStages;
        if (c >= kStages) s9::mbarrier_wait_parity(&empty[s], ((c / kStages) - 1) & 1);
        s9::mbarrier_arrive_expect_tx(&full[s], kChunkBytes);
        for (int r = 0; r < kRows; ++r)
          s9::bulk_copy_g2s(smem + s * kChunkBytes + r * kRowBytes, in + (c * kRows + r) * kRowBytes, kRowBytes,
                            &full[s]);
      }
    }
    return;
  }
  for (int c = 0; c < kChunks; ++c) {
    const int s = c % kStages;
    s9::mbarrier_wait_parity(&full[s], (c / kStages) & 1);
    for (int i = threadIdx.x; i < kChunkBytes; i += 128) out[c * kChunkBytes + i] = smem[s * kChunkBytes + i];
    s9::mbarrier_arrive(&empty[s]);
  }
}

__global__ void named_pingpong_kernel(uint32_t* out) {
  uint32_t* buf = reinterpret_cast<uint32_t*>(mla::cuda::dynamic_smem());  // [128]
  const int wg = threadIdx.x / 128, t = threadIdx.x % 128;
  if (wg == 0) buf[t] = 0;
  for (int round = 0; round < 4; ++round) {
    // Warpgroup 0 owns the buffer first; barrier 1 hands it to warpgroup 1, barrier 2 back.
    if (wg == 0) {
      if (round > 0) s9::named_barrier_sync(2, 256);
      buf[t] += 1;
      s9::named_barrier_arrive(1, 256);
    } else {
      s9::named_barrier_sync(1, 256);
      buf[t] += 2;
      s9::named_barrier_arrive(2, 256);
    }
  }
  if (wg == 0) {
    s9::named_barrier_sync(2, 256);
    out[t] = buf[t];
  }
}

__global__ void acc_before_wait_kernel(uint32_t* out) {
  unsigned char* smem = mla::cuda::dynamic_smem();  // A 64 x 16 and B 8 x 16, K-major, no swizzle: zeros
  for (int i = threadIdx.x; i < 4096; i += 128) smem[i] = 0;
  s9::fence_proxy_async();  // generic-proxy stores, then async-proxy (wgmma) reads
  __syncthreads();
  float acc[4] = {1.f, 1.f, 1.f, 1.f};
  const uint64_t da = s9::make_smem_desc(smem, 1024, 128, s9::Swizzle::kNone);
  const uint64_t db = s9::make_smem_desc(smem + 2048, 128, 128, s9::Swizzle::kNone);
  s9::wgmma_fence();
  s9::wgmma_ss<__nv_bfloat16, 8>(acc, da, db, true);
  s9::wgmma_commit_group();
  float early;
  std::memcpy(&early, &acc[0], 4);  // too early: the wgmma is still in flight
  s9::wgmma_wait_group<0>();
  std::memcpy(&out[threadIdx.x * 2], &early, 4);
  std::memcpy(&out[threadIdx.x * 2 + 1], &acc[0], 4);  // after the wait: 1 + 0
}

__global__ void never_arrives_kernel(int /*MLA_LAUNCH needs an argument*/) {
  uint64_t* bar = reinterpret_cast<uint64_t*>(mla::cuda::dynamic_smem());
  if (threadIdx.x == 0) s9::mbarrier_init(bar, 2);
  __syncthreads();
  if (threadIdx.x == 0) s9::mbarrier_arrive(bar);  // one of the two arrivals
  s9::mbarrier_wait_parity(bar, 0);
}

__global__ void named_count_kernel(int /*MLA_LAUNCH needs an argument*/) {
  if (threadIdx.x < 64) s9::named_barrier_sync(3, 96);  // 64 threads arrive, the rest exit
}

__global__ void setmaxnreg_split_kernel(int /*MLA_LAUNCH needs an argument*/) {
  if (threadIdx.x < 64) s9::setmaxnreg_inc<232>();
  else s9::setmaxnreg_inc<240>();
}

__global__ void mbar_clobbered_kernel(int /*MLA_LAUNCH needs an argument*/) {
  uint64_t* bar = reinterpret_cast<uint64_t*>(mla::cuda::dynamic_smem());
  if (threadIdx.x == 0) s9::mbarrier_init(bar, 1);
  __syncthreads();
  if (threadIdx.x == 0) {
    *bar = 0;  // a plain store into the live mbarrier
    s9::mbarrier_arrive(bar);
  }
}

__global__ void rs_regs_changed_kernel(int /*MLA_LAUNCH needs an argument*/) {
  unsigned char* smem = mla::cuda::dynamic_smem();  // B 8 x 16, K-major, no swizzle: zeros
  for (int i = threadIdx.x; i < 256; i += 128) smem[i] = 0;
  s9::fence_proxy_async();
  __syncthreads();
  float acc[4] = {0.f, 0.f, 0.f, 0.f};
  uint32_t a[4] = {1u, 2u, 3u, 4u};
  s9::wgmma_fence();
  s9::wgmma_rs<__nv_bfloat16, 8>(acc, a, s9::make_smem_desc(smem, 128, 128, s9::Swizzle::kNone), true);
  s9::wgmma_commit_group();
  if (threadIdx.x == 5) a[2] = 7u;  // the wgmma still reads these registers
  s9::wgmma_wait_group<0>();
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 4) return 2;
  const std::string scenario = argv[1];
  mla_emu::config().order = static_cast<mla_emu::Order>(std::atoi(argv[2]));
  mla_emu::config().seed = std::strtoull(argv[3], nullptr, 10);
  std::vector<uint32_t> out;
  cudaError_t e = cudaErrorInvalidValue;
  if (scenario == "bulk_ring") {
    const size_t bytes = static_cast<size_t>(kChunks) * kChunkBytes;
    unsigned char* in = static_cast<unsigned char*>(std::aligned_alloc(256, bytes));
    unsigned char* o = static_cast<unsigned char*>(std::aligned_alloc(256, bytes));
    for (size_t i = 0; i < bytes; ++i) in[i] = static_cast<unsigned char>((i * 7 + i / 251) & 0xff);
    const int smem = kStages * kChunkBytes + 4 * 8;
    e = MLA_LAUNCH(bulk_ring_kernel, 1, 256, smem, nullptr, in, o);
    for (size_t i = 0; i < bytes; ++i) out.push_back(o[i] == in[i] ? 1u : 0u);
  } else if (scenario == "named_pingpong") {
    out.resize(128);
    e = MLA_LAUNCH(named_pingpong_kernel, 1, 256, 512, nullptr, out.data());
  } else if (scenario == "acc_before_wait") {
    out.resize(256);
    e = MLA_LAUNCH(acc_before_wait_kernel, 1, 128, 4096, nullptr, out.data());
  } else if (scenario == "never_arrives") {
    e = MLA_LAUNCH(never_arrives_kernel, 1, 64, 64, nullptr, 0);
  } else if (scenario == "named_count") {
    e = MLA_LAUNCH(named_count_kernel, 1, 128, 64, nullptr, 0);
  } else if (scenario == "setmaxnreg_split") {
    e = MLA_LAUNCH(setmaxnreg_split_kernel, 1, 128, 64, nullptr, 0);
  } else if (scenario == "rs_regs_changed") {
    e = MLA_LAUNCH(rs_regs_changed_kernel, 1, 128, 256, nullptr, 0);
  } else if (scenario == "mbar_clobbered") {
    e = MLA_LAUNCH(mbar_clobbered_kernel, 1, 32, 64, nullptr, 0);
  } else {
    std::fprintf(stderr, "unknown scenario %s\n", scenario.c_str());
    return 2;
  }
  if (e != cudaSuccess) return 3;
  for (uint32_t v : out) std::printf("%u\n", v);
  return 0;
}
