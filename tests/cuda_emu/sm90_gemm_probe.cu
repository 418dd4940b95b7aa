// nvcc build of the sm_90a probe kernel (csrc/cuda/sm90/gemm_probe.cuh): the same source the
// emulator runs, compiled for the GPU to check the PTX is accepted by ptxas with no spills
// (tests/test_cuda_emulated_sm90.py::test_gemm_probe_compiles_for_sm90a). Compile only: running it
// needs a Hopper GPU; the host helper that encodes the tensor maps is compiled here too.
#include "sm90/gemm_probe.cuh"
#include "sm90/tensor_map.cuh"

namespace mla::sm90::probe {
template __global__ void gemm_probe_kernel<__nv_bfloat16, 64, false>(const __grid_constant__ TensorMap, const __grid_constant__ TensorMap, float*, int);
template __global__ void gemm_probe_kernel<__nv_bfloat16, 64, true>(const __grid_constant__ TensorMap, const __grid_constant__ TensorMap, float*, int);
template __global__ void gemm_probe_kernel<__nv_bfloat16, 256, false>(const __grid_constant__ TensorMap, const __grid_constant__ TensorMap, float*, int);
template __global__ void gemm_probe_kernel<__nv_bfloat16, 256, true>(const __grid_constant__ TensorMap, const __grid_constant__ TensorMap, float*, int);
template __global__ void gemm_probe_kernel<__half, 64, true>(const __grid_constant__ TensorMap, const __grid_constant__ TensorMap, float*, int);

// Host: the tensor maps of a 64 x K A and an [N x K] B (what a launcher would pass).
cudaError_t encode_probe_maps(TensorMap* a, TensorMap* b, const void* a_ptr, const void* b_ptr, int n, int k) {
  const cudaError_t e = make_tensor_map_2d(a, a_ptr, k, 64, k * 2, kKChunk, 64, 128);
  return e != cudaSuccess ? e : make_tensor_map_2d(b, b_ptr, k, n, k * 2, kKChunk, n, 128);
}
}  // namespace mla::sm90::probe

// wgmma with A from registers (not used by the GEMM probe): its PTX through ptxas, both input
// types, both B majors. C[64 x N] = A (each thread's 4 registers) * B (a K- or MN-major SW128 tile).
namespace mla::sm90::probe {
template <typename T, int N, int TransB>
__global__ void __launch_bounds__(128, 1) wgmma_rs_compile_kernel(const uint32_t* __restrict__ a_regs,
                                                                   float* __restrict__ c) {
  unsigned char* smem = mla::cuda::dynamic_smem();
  uint32_t a[4];
#pragma unroll
  for (int i = 0; i < 4; ++i) a[i] = a_regs[threadIdx.x * 4 + i];
  float acc[N / 2];
  wgmma_fence();
  wgmma_rs<T, N, TransB>(acc, a, make_smem_desc(smem, TransB ? 8192 : 16, 1024, Swizzle::k128B), false);
  wgmma_commit_group();
  wgmma_wait_group<0>();
  wgmma_fence_operand(acc);
#pragma unroll
  for (int i = 0; i < N / 2; ++i) c[threadIdx.x * (N / 2) + i] = acc[i];
}
template __global__ void wgmma_rs_compile_kernel<__nv_bfloat16, 64, 1>(const uint32_t*, float*);
template __global__ void wgmma_rs_compile_kernel<__half, 256, 0>(const uint32_t*, float*);
}  // namespace mla::sm90::probe
