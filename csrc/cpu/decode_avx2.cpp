// CPU decode kernel for x86-64 with AVX2 + FMA + F16C (Haswell / Zen and later).
//
// Everything between the push_options / pop_options pragmas is compiled for AVX2 and has
// internal linkage; decode.cpp calls it only after checking the CPU (cpu_features.h), so
// the same library still loads and runs on a CPU without AVX2.
#include <immintrin.h>

#include <cstddef>
#include <cstdint>

#include "decode_impl.h"

#if defined(__x86_64__) && defined(__GNUC__)
#define MLA_HAVE_AVX2_KERNEL 1
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")

namespace mla::cpu {
namespace {

#include "decode_tile_loop.h"
#include "avx2_kernels.h"
#include "avx2_bf16_kernels.h"

bool avx2_supports(DType t) {
  return t == DType::kBFloat16 || t == DType::kFloat16 || t == DType::kFloat32 || t == DType::kFloat8E4M3;
}

const char* avx2_kernel_name(DType t) {
  return t == DType::kBFloat16 || t == DType::kFloat8E4M3 ? "avx2-bf16" : "avx2";
}

size_t avx2_scratch_bytes(int32_t max_rows) {
  const size_t generic = scratch_bytes_impl<avx2::Kernel>(max_rows);
  const size_t bf16 = scratch_bytes_impl<avx2_bf16::Kernel>(max_rows);
  return generic > bf16 ? generic : bf16;
}

void avx2_run_item(const DecodeParams& p, const DecodeItem& it, PartialOut out, void* scratch) {
  switch (p.cache_dtype) {
    // bf16 and fp8 tiles stay 16-bit (avx2_bf16_kernels.h); fp16 / fp32 ones are fp32.
    case DType::kBFloat16: run_item_impl<avx2_bf16::Kernel, CacheBF16>(p, it, out, scratch); break;
    case DType::kFloat8E4M3: run_item_impl<avx2_bf16::Kernel, CacheFP8>(p, it, out, scratch); break;
    case DType::kFloat16: run_item_impl<avx2::Kernel, CacheF16>(p, it, out, scratch); break;
    default: run_item_impl<avx2::Kernel, CacheF32>(p, it, out, scratch); break;
  }
}

}  // namespace
}  // namespace mla::cpu

#pragma GCC pop_options
#endif

namespace mla::cpu {

const DecodeIsa* decode_isa_avx2() {
#ifdef MLA_HAVE_AVX2_KERNEL
  static const DecodeIsa isa{&avx2_kernel_name, &avx2_supports, &avx2_scratch_bytes, &avx2_run_item};
  return &isa;
#else
  return nullptr;
#endif
}

}  // namespace mla::cpu
