// nvcc build of the sm_90a probe kernel (csrc/cuda/sm90/gemm_probe.cuh): the same source the
// emulator runs, compiled for the GPU to check the PTX is accepted by ptxas with no spills
// (tests/test_cuda_emulated_sm90.py::test_gemm_probe_compiles_for_sm90a). Compile only: running it
// needs a Hopper GPU and tensor maps encoded with cuTensorMapEncodeTiled.
#include "sm90/gemm_probe.cuh"

namespace mla::sm90::probe {
template __global__ void gemm_probe_kernel<__nv_bfloat16, 64, false>(const __grid_constant__ TensorMap, const __grid_constant__ TensorMap, float*, int);
template __global__ void gemm_probe_kernel<__nv_bfloat16, 64, true>(const __grid_constant__ TensorMap, const __grid_constant__ TensorMap, float*, int);
template __global__ void gemm_probe_kernel<__nv_bfloat16, 256, false>(const __grid_constant__ TensorMap, const __grid_constant__ TensorMap, float*, int);
template __global__ void gemm_probe_kernel<__nv_bfloat16, 256, true>(const __grid_constant__ TensorMap, const __grid_constant__ TensorMap, float*, int);
template __global__ void gemm_probe_kernel<__half, 64, true>(const __grid_constant__ TensorMap, const __grid_constant__ TensorMap, float*, int);
}  // namespace mla::sm90::probe
