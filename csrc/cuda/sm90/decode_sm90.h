// Host-side view of the Hopper decode kernel (decode_sm90.cuh): what the planner in decode.cu
// needs without pulling in the kernel or the sm_90a PTX wrappers. Torch-free.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>

#include "../../mla_params.h"

namespace mla::cuda::sm90 {

constexpr int kDecodeBlockM = 64;  // query rows per CTA
constexpr int kDecodeBlockN = 64;  // keys per tile (the split granularity)
// Dynamic shared memory of one CTA: alignment slack + Q + 2 ring stages + mbarriers.
constexpr size_t kDecodeSmemBytes = 1024 + 3 * 9 * 64 * 128 + 4 * 8;

// bf16 or fp16 query; a cache of the same type, or float8_e4m3fn with p.kv_scale; 16-byte
// aligned rows. Grid: p.sched_ctas persistent CTAs of 384 threads that walk the schedule in p.sched
// (csrc/cuda/schedule.cuh: the metadata kernel must have filled it on the same stream before;
// decode.cu's decode() launches all three kernels).
// The kernel body exists only in an sm_90a build (elsewhere it traps): decode.cu dispatches it
// only when asked to (MLA_EXT_CUDA_SM90=1 on an sm_90 device).
cudaError_t launch_decode_sm90(const DecodeParams& p, cudaStream_t stream);

// Whether `device` is an sm_90 GPU and this build holds the kernel's sm_90a code (an extension
// built without 9.0a in TORCH_CUDA_ARCH_LIST has only the trapping stub). GPU builds only.
bool decode_sm90_available(int device);

}  // namespace mla::cuda::sm90
