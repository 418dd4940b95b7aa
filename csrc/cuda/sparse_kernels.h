// Host-side entry points of the CUDA sparse (top-k) decode kernels (sparse_decode.cu).
// No torch headers: the glue in csrc/api/sparse_cuda_ops.cpp validates tensors, fills
// SparseCudaParams, allocates the split workspace and passes the current stream.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "../sparse_params.h"

namespace mla::cuda {

enum class SparseImpl : int32_t {
  kAuto = 0,        // tensor cores where they apply, else the simple kernel
  kTensorCore = 1,  // mma.sync kernel: bf16 q with an fp8 (656-byte) or bf16 cache, where a tile
                    // configuration fits the device's shared memory; otherwise kSimple runs
  kSimple = 2,      // CUDA-core kernel: every q / cache dtype, fp32 math throughout
};

struct SparsePlan {
  SparseImpl impl;        // never kAuto after planning
  int32_t config;         // tensor-core tile configuration (0 large .. 2 small, sparse_decode.cu), -1 otherwise
  int32_t num_splits;     // topk splits per (query, head group); 1 = no workspace, no combine pass
  int64_t workspace_o;    // floats needed for SparseCudaParams::o_accum   (0 when num_splits == 1)
  int64_t workspace_lse;  // floats needed for SparseCudaParams::lse_accum (0 when num_splits == 1)
};

// Chooses the kernel and the split count from shapes, dtypes and the device's attributes
// only (never from index values), so a captured CUDA graph stays valid when they change.
SparsePlan plan_sparse_decode(const SparseCudaParams& params, int device, SparseImpl requested);

// Runs the plan on `stream`: writes out / lse (through the workspace when num_splits > 1).
// Requirements (the glue checks them): every cache base, block and token stride 16-byte
// aligned; q / out contiguous. Never syncs the host.
cudaError_t sparse_decode(const SparseCudaParams& params, const SparsePlan& plan, cudaStream_t stream);

}  // namespace mla::cuda
