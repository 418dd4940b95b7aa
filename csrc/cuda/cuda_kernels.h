// Host-side entry points of the CUDA kernels. No torch headers: the glue in
// csrc/api/cuda_ops.cpp validates tensors, fills the params structs, allocates the
// split-KV workspace and passes the current stream.
#pragma once
#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "../mla_params.h"

namespace mla::cuda {

// cache[slot] = [kv_c | k_pe] for every slot in [0, NB * BS); other slots are skipped.
// One pass; 16-byte loads/stores when every pointer and row stride is 16-byte aligned.
cudaError_t append_kv(const AppendParams& params, cudaStream_t stream);

enum class DecodeImpl : int32_t {
  kAuto = 0,        // tensor cores for bf16/fp16 with 16-byte aligned rows, else the simple kernel
  kTensorCore = 1,  // mma.sync + ldmatrix + cp.async pipeline (falls back to kSimple where it cannot run)
  kSimple = 2,      // CUDA-core kernel: any dtype, any alignment
  kSm90 = 3,        // Hopper wgmma + mbarrier kernel (sm90/decode_sm90.cuh): bf16 q and cache, 16-byte
                    // aligned rows, an sm_90a build; otherwise planned as kAuto. Opt-in only
                    // (MLA_EXT_CUDA_SM90=1) until it has run on a GPU.
};

struct DecodePlan {
  DecodeImpl impl;      // never kAuto after planning
  int32_t config;       // tensor-core tile configuration: a TcConfigId (decode_tc.cuh), -1 otherwise
  int32_t num_splits;   // KV splits per (sequence, row block); 1 = no workspace, no combine pass.
                        // kSm90: the partial slots of the scheduled workspace (2 per persistent CTA)
  int64_t workspace_o;    // floats needed for DecodeParams::o_accum   (0 when num_splits == 1)
  int64_t workspace_lse;  // floats needed for DecodeParams::lse_accum (0 when num_splits == 1)
  int32_t sched_ctas;       // kSm90: persistent CTAs of the device-side schedule (0: not scheduled)
  int64_t workspace_sched;  // int32s needed for DecodeParams::sched (0 when not scheduled)
};

// Chooses the kernel and the number of KV splits from shapes, dtypes, alignment and the
// device's attributes only (never from the values of cache_seqlens or block_table), so a
// captured CUDA graph stays valid when those values change. `device` is the CUDA ordinal.
DecodePlan plan_decode(const DecodeParams& params, int device, DecodeImpl requested);

// Runs the plan on `stream`: writes out / lse (through the workspace when num_splits > 1).
// params.o_accum / lse_accum must hold the plan's workspace sizes. Never syncs the host.
cudaError_t decode(const DecodeParams& params, const DecodePlan& plan, cudaStream_t stream);

}  // namespace mla::cuda
