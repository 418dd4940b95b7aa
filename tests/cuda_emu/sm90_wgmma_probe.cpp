// One wgmma.mma_async through csrc/cuda/sm90/ptx_sm90.cuh's real wrappers in the emulator, on a
// shared-memory image and descriptors the caller gives: tests/test_cute_layouts.py places both
// operands at the byte offsets CuTe's GMMA layouts give and passes CuTe's descriptors, then reads
// the accumulators back through CuTe's accumulator layout.
//
// stdin, whitespace-separated decimal numbers:
//   KIND (0 bf16, 1 fp16) N TRANS_A TRANS_B ACCUMULATE DESC_A DESC_B
//   START_A LBO_A SBO_A LAYOUT_A START_B LBO_B SBO_B LAYOUT_B   (rebuilt with make_smem_desc)
//   SMEM_BYTES, then that many bytes, then 128 x N/2 accumulator float bits (thread-major),
//   then, when TRANS_A is 2 (A from registers: wgmma_rs), 128 x 4 A register words
// stdout: the two descriptors make_smem_desc built, then 128 x N/2 result float bits.
#include <cstdio>
#include <cstring>
#include <iostream>
#include <vector>

#include "emu_runtime.h"
#include "sm90/ptx_sm90.cuh"

namespace {

struct Probe {
  int kind = 0, n = 0, trans_a = 0, trans_b = 0, accumulate = 1;
  uint64_t desc_a = 0, desc_b = 0, built_a = 0, built_b = 0;
  uint32_t start[2], lbo[2], sbo[2], layout[2];
  std::vector<unsigned char> smem;
  std::vector<uint32_t> acc;     // [128][n / 2]
  std::vector<uint32_t> a_regs;  // [128][4] (TRANS_A 2)
};

template <typename T, int N, int TA, int TB>
__global__ void wgmma_probe_kernel(Probe* p) {
  namespace s9 = mla::sm90;
  unsigned char* smem = mla::cuda::dynamic_smem();
  const int t = threadIdx.x;
  if (t == 0) {
    std::memcpy(smem, p->smem.data(), p->smem.size());
    p->built_a = s9::make_smem_desc(smem + p->start[0], p->lbo[0], p->sbo[0], static_cast<s9::Swizzle>(p->layout[0]));
    p->built_b = s9::make_smem_desc(smem + p->start[1], p->lbo[1], p->sbo[1], static_cast<s9::Swizzle>(p->layout[1]));
    s9::fence_proxy_async();  // generic-proxy stores, then async-proxy (wgmma) reads
  }
  __syncthreads();
  float acc[N / 2];
  std::memcpy(acc, &p->acc[static_cast<size_t>(threadIdx.x) * (N / 2)], sizeof acc);
  uint32_t a[4];
  std::memcpy(a, &p->a_regs[static_cast<size_t>(threadIdx.x) * 4], sizeof a);
  s9::wgmma_fence();
  if (TA == 2) s9::wgmma_rs<T, N, TB>(acc, a, p->desc_b, p->accumulate != 0);
  else s9::wgmma_ss<T, N, TA == 1 ? 1 : 0, TB>(acc, p->desc_a, p->desc_b, p->accumulate != 0);
  s9::wgmma_commit_group();
  s9::wgmma_wait_group<0>();
  std::memcpy(&p->acc[static_cast<size_t>(threadIdx.x) * (N / 2)], acc, sizeof acc);
}

template <typename T, int N, int TA, int TB>
cudaError_t launch(Probe* p) {
  auto kernel = wgmma_probe_kernel<T, N, TA, TB>;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(p->smem.size()));
  return MLA_LAUNCH(kernel, 1, 128, p->smem.size(), nullptr, p);
}

template <typename T, int N>
cudaError_t launch_t(Probe* p) {
  if (p->trans_a == 0 && p->trans_b == 0) return launch<T, N, 0, 0>(p);
  if (p->trans_a == 0 && p->trans_b == 1) return launch<T, N, 0, 1>(p);
  if (p->trans_a == 1 && p->trans_b == 0) return launch<T, N, 1, 0>(p);
  if (p->trans_a == 1 && p->trans_b == 1) return launch<T, N, 1, 1>(p);
  if (p->trans_a == 2 && p->trans_b == 0) return launch<T, N, 2, 0>(p);
  return launch<T, N, 2, 1>(p);
}

template <int N>
cudaError_t launch_n(Probe* p) {
  return p->kind == 0 ? launch_t<__nv_bfloat16, N>(p) : launch_t<__half, N>(p);
}

}  // namespace

int main() {
  static Probe p;
  size_t bytes = 0;
  std::cin >> p.kind >> p.n >> p.trans_a >> p.trans_b >> p.accumulate >> p.desc_a >> p.desc_b;
  for (int i = 0; i < 2; ++i) std::cin >> p.start[i] >> p.lbo[i] >> p.sbo[i] >> p.layout[i];
  std::cin >> bytes;
  p.smem.resize(bytes);
  for (auto& b : p.smem) {
    unsigned v;
    std::cin >> v;
    b = static_cast<unsigned char>(v);
  }
  p.acc.resize(static_cast<size_t>(128) * p.n / 2);
  for (auto& v : p.acc) std::cin >> v;
  p.a_regs.assign(128 * 4, 0);
  if (p.trans_a == 2)
    for (auto& v : p.a_regs) std::cin >> v;
  if (!std::cin) {
    std::fprintf(stderr, "probe: short input\n");
    return 2;
  }
  cudaError_t e = cudaErrorInvalidValue;
  switch (p.n) {
    case 8: e = launch_n<8>(&p); break;
    case 16: e = launch_n<16>(&p); break;
    case 64: e = launch_n<64>(&p); break;
    case 128: e = launch_n<128>(&p); break;
    default: std::fprintf(stderr, "probe: N %d not built\n", p.n); return 2;
  }
  if (e != cudaSuccess) return 3;
  std::printf("%llu\n%llu\n", static_cast<unsigned long long>(p.built_a), static_cast<unsigned long long>(p.built_b));
  for (uint32_t v : p.acc) std::printf("%u\n", v);
  return 0;
}
