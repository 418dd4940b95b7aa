// The stage-1 Hopper GEMM probe (csrc/cuda/sm90/gemm_probe.cuh: TMA boxes into a 2-stage
// mbarrier ring, wgmma from 128-byte-swizzled shared tiles) run ON a Hopper GPU and compared
// with a float64 host matmul: the hardware check of what tests/test_cuda_emulated_sm90.py
// verifies in the emulator (descriptor layouts, swizzle, K- and MN-major B, TMA encode).
//
//   nvcc -std=c++17 -O2 -gencode=arch=compute_90a,code=sm_90a -Icsrc/cuda \
//        benchmarks/native/sm90_gemm_probe_gpu.cu -o build/sm90_gemm_probe_gpu && build/sm90_gemm_probe_gpu
//
// Prints one line per configuration and exits 0 only if every max error is <= 1e-3 (bf16
// products are exact; fp32 accumulation over K = 256 of |C| <~ 60). benchmarks/device_check.sh
// runs it in its sm90 stage.
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <type_traits>
#include <vector>

#include "sm90/gemm_probe.cuh"
#include "sm90/tensor_map.cuh"

namespace {

using mla::sm90::TensorMap;
namespace probe = mla::sm90::probe;

uint16_t to_bits(float x, bool fp16) {
  if (fp16) {
    const __half h = __float2half_rn(x);
    uint16_t b;
    std::memcpy(&b, &h, 2);
    return b;
  }
  const __nv_bfloat16 h = __float2bfloat16_rn(x);
  uint16_t b;
  std::memcpy(&b, &h, 2);
  return b;
}

double from_bits(uint16_t b, bool fp16) {
  if (fp16) {
    __half h;
    std::memcpy(&h, &b, 2);
    return __half2float(h);
  }
  __nv_bfloat16 h;
  std::memcpy(&h, &b, 2);
  return __bfloat162float(h);
}

#define CHECK(x)                                                                        \
  do {                                                                                  \
    cudaError_t e_ = (x);                                                               \
    if (e_ != cudaSuccess) {                                                            \
      std::printf("FAIL %s:%d %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(1);                                                                     \
    }                                                                                   \
  } while (0)

template <typename T, int N, bool B_MN>
double run(unsigned seed) {
  constexpr int K = 256;
  constexpr bool kFp16 = std::is_same<T, __half>::value;
  std::srand(seed);
  std::vector<uint16_t> a(64 * K), b(static_cast<size_t>(N) * K);
  for (auto& x : a) x = to_bits(static_cast<float>(std::rand()) / RAND_MAX * 2.f - 1.f, kFp16);
  for (auto& x : b) x = to_bits(static_cast<float>(std::rand()) / RAND_MAX * 2.f - 1.f, kFp16);
  uint16_t *da, *db;
  float* dc;
  CHECK(cudaMalloc(&da, a.size() * 2));
  CHECK(cudaMalloc(&db, b.size() * 2));
  CHECK(cudaMalloc(&dc, 64 * N * 4));
  CHECK(cudaMemcpy(da, a.data(), a.size() * 2, cudaMemcpyHostToDevice));
  CHECK(cudaMemcpy(db, b.data(), b.size() * 2, cudaMemcpyHostToDevice));
  CHECK(cudaMemset(dc, 0xff, 64 * N * 4));
  TensorMap map_a, map_b;
  CHECK(mla::sm90::make_tensor_map_2d(&map_a, da, K, 64, K * 2, probe::kKChunk, 64, 128));
  if (B_MN)
    CHECK(mla::sm90::make_tensor_map_2d(&map_b, db, N, K, N * 2, 64, probe::kKChunk, 128));
  else
    CHECK(mla::sm90::make_tensor_map_2d(&map_b, db, K, N, K * 2, probe::kKChunk, N, 128));
  auto kernel = probe::gemm_probe_kernel<T, N, B_MN>;
  const int smem = probe::Smem<N>::kBytes;
  CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem));
  kernel<<<1, probe::kThreads, smem>>>(map_a, map_b, dc, K / probe::kKChunk);
  CHECK(cudaGetLastError());
  CHECK(cudaDeviceSynchronize());
  std::vector<float> c(64 * N);
  CHECK(cudaMemcpy(c.data(), dc, c.size() * 4, cudaMemcpyDeviceToHost));
  double err = 0;
  for (int i = 0; i < 64; ++i)
    for (int j = 0; j < N; ++j) {
      double ref = 0;
      for (int k = 0; k < K; ++k)
        ref += from_bits(a[i * K + k], kFp16) * from_bits(B_MN ? b[k * N + j] : b[static_cast<size_t>(j) * K + k], kFp16);
      const double d = std::fabs(c[i * N + j] - ref);
      err = std::isnan(d) ? INFINITY : std::max(err, d);
    }
  cudaFree(da);
  cudaFree(db);
  cudaFree(dc);
  return err;
}

}  // namespace

int main() {
  int fails = 0;
  auto report = [&](const char* what, double err) {
    const bool ok = err <= 1e-3;
    fails += !ok;
    std::printf("%s sm90 gemm probe %-18s max |C - C_fp64| = %.3g\n", ok ? "ok  " : "FAIL", what, err);
  };
  report("bf16 N=64 B K", run<__nv_bfloat16, 64, false>(1));
  report("bf16 N=64 B MN", run<__nv_bfloat16, 64, true>(2));
  report("bf16 N=256 B K", run<__nv_bfloat16, 256, false>(3));
  report("bf16 N=256 B MN", run<__nv_bfloat16, 256, true>(4));
  report("fp16 N=64 B MN", run<__half, 64, true>(5));
  return fails ? 1 : 0;
}
