// Host side of the TMA box copies (ptx_sm90.cuh tma_load_2d): encodes a 2-D tiled tensor map of
// 16-bit elements. On a GPU build it calls the driver's cuTensorMapEncodeTiled, fetched through
// the runtime (cudaGetDriverEntryPointByVersion, so nothing links libcuda directly); in the
// emulation build it fills the emulator's TensorMap2D with the same meaning. Torch-free.
#pragma once
#include <cstdint>

#include "ptx_sm90.cuh"

#if !defined(MLA_CUDA_EMULATION)
#include <cudaTypedefs.h>  // PFN_cuTensorMapEncodeTiled_v12000
#endif

namespace mla::sm90 {

// A tensor of [outer][inner] 16-bit elements at `base` (16-byte aligned), rows `outer_stride_bytes`
// apart (a multiple of 16); boxes of box_outer x box_inner elements land in shared memory row after
// row, swizzled by swizzle_bytes (0, 32, 64, 128; box_inner * 2 must not exceed it). Elements outside
// the tensor read as zero. Returns cudaSuccess or cudaErrorInvalidValue.
inline cudaError_t make_tensor_map_2d(TensorMap* map, const void* base, uint64_t inner, uint64_t outer,
                                      uint64_t outer_stride_bytes, uint32_t box_inner, uint32_t box_outer,
                                      int swizzle_bytes) {
  if (reinterpret_cast<uintptr_t>(base) % 16 != 0 || outer_stride_bytes % 16 != 0 || box_inner == 0 ||
      box_outer == 0 || box_inner > 256 || box_outer > 256 || (box_inner * 2) % 16 != 0 ||
      (swizzle_bytes != 0 && swizzle_bytes != 32 && swizzle_bytes != 64 && swizzle_bytes != 128) ||
      (swizzle_bytes != 0 && box_inner * 2 > static_cast<uint32_t>(swizzle_bytes)))
    return cudaErrorInvalidValue;
#if defined(MLA_CUDA_EMULATION)
  *map = TensorMap{};
  map->base = base;
  map->dims[0] = inner;
  map->dims[1] = outer;
  map->outer_stride_bytes = outer_stride_bytes;
  map->box[0] = box_inner;
  map->box[1] = box_outer;
  map->elem_bytes = 2;
  map->swizzle_bytes = swizzle_bytes;
  return cudaSuccess;
#else
  static PFN_cuTensorMapEncodeTiled_v12000 encode = nullptr;
  if (encode == nullptr) {
    cudaDriverEntryPointQueryResult found;
    void* fn = nullptr;
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found) !=
            cudaSuccess ||
        found != cudaDriverEntryPointSuccess)
      return cudaErrorInvalidValue;
    encode = reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn);
  }
  const cuuint64_t dims[2] = {inner, outer};
  const cuuint64_t strides[1] = {outer_stride_bytes};  // dimension 0 is contiguous
  const cuuint32_t box[2] = {box_inner, box_outer};
  const cuuint32_t element_strides[2] = {1, 1};
  const CUtensorMapSwizzle swizzle = swizzle_bytes == 128  ? CU_TENSOR_MAP_SWIZZLE_128B
                                     : swizzle_bytes == 64 ? CU_TENSOR_MAP_SWIZZLE_64B
                                     : swizzle_bytes == 32 ? CU_TENSOR_MAP_SWIZZLE_32B
                                                           : CU_TENSOR_MAP_SWIZZLE_NONE;
  const CUresult r = encode(map, CU_TENSOR_MAP_DATA_TYPE_UINT16, 2, const_cast<void*>(base), dims, strides, box,
                            element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE, swizzle,
                            CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE);
  return r == CUDA_SUCCESS ? cudaSuccess : cudaErrorInvalidValue;
#endif
}

}  // namespace mla::sm90
