// Sparse (top-k) MLA decode on the CPU, portable C++ (the compiler vectorises the inner
// loops). Work item = (sequence, query, group of heads). Per item the valid slots of the
// main and the extra source are walked in tiles of kTile tokens: each token is gathered
// and dequantised once per tile into fp32 rows (656-byte fp8 tokens: value * its tile's
// scale, rope from bf16; NaN reads as 0, as FlashMLA's reference does), then every head
// of the group runs an online softmax over the tile. Invalid slots are never read.
// The body (sparse_decode_body.h) is compiled twice: portable, and for AVX2 + FMA (chosen
// when the CPU has them; MLA_EXT_CPU_ISA=scalar forces the portable build).
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

const char* sparse_decode_kernel_name() {
  const char* env = std::getenv("MLA_EXT_CPU_ISA");
  const bool scalar = env && std::strcmp(env, "scalar") == 0;
  return !scalar && cpu_features().avx2_fma_f16c ? "avx2" : "scalar";
}

void sparse_decode(const SparseDecodeParams& p) {
  if (std::strcmp(sparse_decode_kernel_name(), "avx2") == 0) sparse_avx2::run(p);
  else sparse_portable::run(p);
}

}  // namespace mla::cpu
