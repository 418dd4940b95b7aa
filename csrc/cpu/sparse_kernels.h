// CPU sparse (top-k) MLA decode, DeepSeek-V3.2's DSA: the entry points of its kernels
// (semantics: mla_ext/sparse.py; params: SparseDecodeParams in ../mla_params.h).
#pragma once
#include "../mla_params.h"

namespace mla::cpu {

// The sparse kernel builds, best first. Which one runs depends on the CPU (cpuid), the
// dtypes and MLA_EXT_CPU_ISA (auto | scalar | avx2 | avx512bf16 | amx caps the choice, as for
// the dense kernels):
//   amx:        the avx512bf16 kernel with its scores on AMX tiles (+ AMX-BF16 / AMX-TILE);
//   avx512bf16: bf16 q over 656-byte fp8 / bf16 caches (every value it reads is exact in
//               bf16), AVX-512 F/BW/VL/DQ + AVX512_BF16;
//   avx2:       the portable body compiled for AVX2 + FMA (any dtype);
//   scalar:     the portable body.
// Name of the build a call with these dtypes runs now ("amx", "avx512bf16", "avx2" or "scalar");
// has_extra = false ignores extra_cache_dtype.
const char* sparse_decode_kernel_name(DType q_dtype, DType cache_dtype, bool has_extra, DType extra_cache_dtype);

// Runs that build: writes out / lse (+inf where a query has no valid slot or every valid
// score is -inf). q_dtype is the dtype the caller's q had before its fp32 copy in p.q.
void sparse_decode(const SparseDecodeParams& p, DType q_dtype);

// The AVX-512 BF16 build (sparse_decode_avx512.cpp); false when this compiler could not
// build it (then the caller falls back).
bool sparse_decode_avx512bf16_built();
void sparse_decode_avx512bf16(const SparseDecodeParams& p);
// The same with the scores on AMX tiles (needs AMX-BF16 + AMX-TILE and the OS's leave).
bool sparse_decode_amx_usable();
void sparse_decode_amx(const SparseDecodeParams& p);

// Quantises new tokens into a 656-byte fp8 cache (mla_ext/sparse.py's layout and quantiser,
// bit for bit; sparse_append.cpp): slot = block * block_size + offset, slot < 0 skips.
struct SparseAppendParams {
  const void* kv_c;          // [T, 512], row stride kv_c_row_stride elements, last dim contiguous
  const void* k_pe;          // [T, 64],  row stride k_pe_row_stride elements, last dim contiguous
  int64_t kv_c_row_stride;
  int64_t k_pe_row_stride;
  DType input_dtype;         // of kv_c and k_pe: kFloat32 / kBFloat16 / kFloat16
  const void* slot_mapping;  // [T] int32 or int64 (slot_is_int64)
  bool slot_is_int64;
  uint8_t* cache;            // byte base of [NB, BS, 656] tokens
  int64_t block_stride;      // bytes (may exceed BS * 656: padded blocks)
  int64_t token_stride;      // bytes
  int64_t num_tokens;        // T
  int32_t block_size;        // BS
};
void sparse_append(const SparseAppendParams& p);

}  // namespace mla::cpu
