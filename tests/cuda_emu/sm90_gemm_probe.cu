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
