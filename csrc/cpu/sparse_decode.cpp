// Sparse (top-k) MLA decode on the CPU, portable C++ (the compiler vectorises the inner
// loops). Work item = (sequence, query, group of heads). Per item the valid slots of the
// main and the extra source are walked in tiles of kTile tokens: each token is gathered
// and dequantised once per tile into fp32 rows (656-byte fp8 tokens: value * its tile's
// scale, rope from bf16; NaN reads as 0, as FlashMLA's reference does), then every head
// of the group runs an online softmax over the tile. Invalid slots are never read.
// The body (sparse_decode_body.h) is compiled twice: portable, and for AVX2 + FMA. This file
// also picks the build a call runs (sparse_kernels.h): the AVX-512 BF16 kernel
// (sparse_decode_avx512.cpp) where it applies, else one of these two.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu_features.h"
#include "cpu_kernels.h"
#include "fp8.h"
#include "sparse_kernels.h"
#include "sparse_slots.h"

namespace mla::cpu {
namespace sparse_portable {
#include "sparse_decode_body.h"
}  // namespace sparse_portable

#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace sparse_avx2 {
#include "sparse_decode_body.h"
}  // namespace sparse_avx2
#pragma GCC pop_options

namespace {

enum class SparseIsa { kScalar = 0, kAvx2 = 1, kAvx512Bf16 = 2, kAmx = 3 };

// MLA_EXT_CPU_ISA caps the choice, as for the dense kernels; unknown values are the
// dense driver's to reject (here they cap nothing).
SparseIsa requested_cap() {
  const char* env = std::getenv("MLA_EXT_CPU_ISA");
  if (env == nullptr) return SparseIsa::kAmx;
  if (std::strcmp(env, "scalar") == 0) return SparseIsa::kScalar;
  if (std::strcmp(env, "avx2") == 0) return SparseIsa::kAvx2;
  if (std::strcmp(env, "avx512bf16") == 0) return SparseIsa::kAvx512Bf16;
  return SparseIsa::kAmx;
}

// bf16 holds every value such a cache yields exactly: fp8 code x power-of-two scale
// (3 mantissa bits, fp32's exponent range) and bf16.
bool bf16_exact(DType cache) { return cache == DType::kFloat8E4M3 || cache == DType::kBFloat16; }

SparseIsa pick(DType q, DType cache, bool has_extra, DType extra) {
  const SparseIsa cap = requested_cap();
  const CpuFeatures& f = cpu_features();
  if (cap >= SparseIsa::kAvx512Bf16 && f.avx512_bf16 && sparse_decode_avx512bf16_built() && q == DType::kBFloat16 &&
      bf16_exact(cache) && (!has_extra || bf16_exact(extra)))
    return cap >= SparseIsa::kAmx && sparse_decode_amx_usable() ? SparseIsa::kAmx : SparseIsa::kAvx512Bf16;
  if (cap >= SparseIsa::kAvx2 && f.avx2_fma_f16c) return SparseIsa::kAvx2;
  return SparseIsa::kScalar;
}

}  // namespace

const char* sparse_decode_kernel_name(DType q, DType cache, bool has_extra, DType extra) {
  switch (pick(q, cache, has_extra, extra)) {
    case SparseIsa::kAmx: return "amx";
    case SparseIsa::kAvx512Bf16: return "avx512bf16";
    case SparseIsa::kAvx2: return "avx2";
    default: return "scalar";
  }
}

void sparse_decode(const SparseDecodeParams& p, DType q_dtype) {
  switch (pick(q_dtype, p.main.dtype, p.has_extra, p.extra.dtype)) {
    case SparseIsa::kAmx: sparse_decode_amx(p); break;
    case SparseIsa::kAvx512Bf16: sparse_decode_avx512bf16(p); break;
    case SparseIsa::kAvx2: sparse_avx2::run(p); break;
    default: sparse_portable::run(p); break;
  }
}

}  // namespace mla::cpu
