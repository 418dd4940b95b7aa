// CPU kernels. They take the same plain params structs as the CUDA kernels; the
// torch glue in csrc/api has already validated shapes, dtypes and index ranges.
#pragma once
#include "../mla_params.h"

namespace mla::cpu {

// cache[slot] = [kv_c | k_pe] for every slot >= 0. Parallel over tokens.
void append_kv(const AppendParams& params);

// The same into a float8_e4m3fn cache: stores e4m3(x / *scale), round-to-nearest-even,
// saturated to +-448. Inputs may be fp32, fp16 or bf16.
void append_kv_fp8(const AppendParams& params);

// Absorbed MLA decode: out = softmax(scale * q . K^T) . V with V = K[:, :512].
// Writes params.out and params.lse. Parallel over (sequence, KV chunk) with an lse merge.
void decode(const DecodeParams& params);

// Name of the decode kernel a call with this cache dtype would run on this CPU
// ("amx-bf16" (bf16 / fp8 caches), "avx512bf16", "avx512-fp32" (fp16 / fp32), "avx2-bf16"
// (bf16 / fp8 caches), "avx2" or
// "scalar"; MLA_EXT_CPU_ISA
// caps the instruction set).
const char* decode_kernel_name(DType dtype);

// Sparse (top-k) decode: sparse_kernels.h.

}  // namespace mla::cpu
