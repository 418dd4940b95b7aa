// Runs csrc/cuda/sm90/gemm_probe.cuh in the emulator (tests/test_cuda_emulated_sm90.py drives it).
//
//   sm90_gemm_probe N B_MN K ORDER SEED FP16 < A bits (64 x K uint16) then B bits (N x K or K x N uint16)
//   -> C (64 x N float32, raw) on stdout; emulator errors exit 86 with "mla_emu error: ..." on stderr.
// ORDER: 0 forward, 1 reverse, 2 random. FP16: 0 bf16, 1 fp16 inputs. Every tensor is its own allocation of its exact size.
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "emu_runtime.h"
#include "sm90/gemm_probe.cuh"
#include "sm90/tensor_map.cuh"

namespace {

using mla::sm90::TensorMap;

// The host helper the kernels will use (csrc/cuda/sm90/tensor_map.cuh), 128-byte swizzle.
TensorMap map_2d(const void* base, uint64_t inner, uint64_t outer, uint32_t box_inner, uint32_t box_outer) {
  TensorMap m;
  if (mla::sm90::make_tensor_map_2d(&m, base, inner, outer, inner * 2, box_inner, box_outer, 128) != cudaSuccess) {
    std::fprintf(stderr, "sm90_gemm_probe: make_tensor_map_2d rejected the map\n");
    std::exit(2);
  }
  return m;
}

template <typename T, int N, bool B_MN>
int run(int k, const uint16_t* a, const uint16_t* b, float* c) {
  namespace p = mla::sm90::probe;
  const TensorMap map_a = map_2d(a, k, 64, p::kKChunk, 64);
  const TensorMap map_b = B_MN ? map_2d(b, N, k, 64, p::kKChunk) : map_2d(b, k, N, p::kKChunk, N);
  auto kernel = p::gemm_probe_kernel<T, N, B_MN>;
  const int smem = p::Smem<N>::kBytes;
  if (cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem) != cudaSuccess) return 3;
  if (MLA_LAUNCH(kernel, 1, p::kThreads, smem, nullptr, map_a, map_b, c, k / p::kKChunk) != cudaSuccess) return 3;
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 7) {
    std::fprintf(stderr, "usage: sm90_gemm_probe N B_MN K ORDER SEED FP16 < A B\n");
    return 2;
  }
  const int n = std::atoi(argv[1]), b_mn = std::atoi(argv[2]), k = std::atoi(argv[3]), fp16 = std::atoi(argv[6]);
  mla_emu::config().order = static_cast<mla_emu::Order>(std::atoi(argv[4]));
  mla_emu::config().seed = std::strtoull(argv[5], nullptr, 10);
  if (k <= 0 || k % 64 != 0) return 2;
  // Exact-size allocations (ASan sees a read past either tensor).
  uint16_t* a = static_cast<uint16_t*>(std::aligned_alloc(64, 64 * k * 2));
  uint16_t* b = static_cast<uint16_t*>(std::aligned_alloc(64, static_cast<size_t>(n) * k * 2));
  float* c = static_cast<float*>(std::aligned_alloc(64, 64 * n * 4));
  if (std::fread(a, 2, 64 * k, stdin) != static_cast<size_t>(64 * k) ||
      std::fread(b, 2, static_cast<size_t>(n) * k, stdin) != static_cast<size_t>(n) * k) {
    std::fprintf(stderr, "sm90_gemm_probe: short input\n");
    return 2;
  }
  std::memset(c, 0xff, 64 * n * 4);
  int rc = 2;
  if (fp16) {
    if (n == 64 && b_mn) rc = run<__half, 64, true>(k, a, b, c);
  } else {
    if (n == 64 && !b_mn) rc = run<__nv_bfloat16, 64, false>(k, a, b, c);
    if (n == 64 && b_mn) rc = run<__nv_bfloat16, 64, true>(k, a, b, c);
    if (n == 256 && !b_mn) rc = run<__nv_bfloat16, 256, false>(k, a, b, c);
    if (n == 256 && b_mn) rc = run<__nv_bfloat16, 256, true>(k, a, b, c);
  }
  if (rc != 0) return rc;
  std::fwrite(c, 4, 64 * n, stdout);
  std::free(a);
  std::free(b);
  std::free(c);
  return 0;
}
