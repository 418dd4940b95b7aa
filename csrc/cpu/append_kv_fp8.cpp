// CPU append into a float8_e4m3fn latent cache: cache[slot] = e4m3(x / scale), saturated.
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstdlib>
#include <cstring>

#include "append_rows.h"
#include "cpu_features.h"
#include "cpu_kernels.h"
#include "fp8.h"
#include "fp8_avx2.h"

namespace mla::cpu {
namespace {

// The AVX2 path: the same bytes as the portable loop below (tests compare both).
void quantize_rows_avx2(const AppendParams& p) {
  const size_t elt = p.input_dtype == DType::kFloat32 ? 4 : 2;
  const char* kv_c = static_cast<const char*>(p.kv_c);
  const char* k_pe = static_cast<const char*>(p.k_pe);
  const float scale = *p.scale;
  for_each_destination_row(p, 1, [&](int64_t t, char* dst) {
    uint8_t* row = reinterpret_cast<uint8_t*>(dst);
    quantize_fp8_row_avx2(kv_c + t * p.kv_c_row_stride * elt, p.input_dtype, kLatentDim, scale, row);
    quantize_fp8_row_avx2(k_pe + t * p.k_pe_row_stride * elt, p.input_dtype, kRopeDim, scale, row + kLatentDim);
  });
}

bool use_avx2() {
  const char* env = std::getenv("MLA_EXT_CPU_ISA");  // "scalar" forces the portable path
  if (env != nullptr && std::strcmp(env, "scalar") == 0) return false;
  return quantize_fp8_avx2_available() && cpu_features().avx2_fma_f16c;
}

template <typename T>
void quantize_rows(const AppendParams& p) {
  const T* kv_c = static_cast<const T*>(p.kv_c);
  const T* k_pe = static_cast<const T*>(p.k_pe);
  const float scale = *p.scale;  // divide, not multiply by 1/scale: SPEC stores round(x / scale) exactly
  for_each_destination_row(p, 1, [&](int64_t t, char* dst) {
    uint8_t* row = reinterpret_cast<uint8_t*>(dst);
    const T* c = kv_c + t * p.kv_c_row_stride;
    const T* r = k_pe + t * p.k_pe_row_stride;
    for (int d = 0; d < kLatentDim; ++d) row[d] = float_to_e4m3_saturate(static_cast<float>(c[d]) / scale);
    for (int d = 0; d < kRopeDim; ++d) row[kLatentDim + d] = float_to_e4m3_saturate(static_cast<float>(r[d]) / scale);
  });
}

}  // namespace

void append_kv_fp8(const AppendParams& p) {
  TORCH_CHECK(p.cache_dtype == DType::kFloat8E4M3 && p.scale != nullptr, "mla_ext: append_kv_fp8 needs an fp8 cache");
  if (use_avx2()) return quantize_rows_avx2(p);
  switch (p.input_dtype) {
    case DType::kFloat32: quantize_rows<float>(p); break;
    case DType::kFloat16: quantize_rows<c10::Half>(p); break;
    case DType::kBFloat16: quantize_rows<c10::BFloat16>(p); break;
    default: TORCH_CHECK(false, "mla_ext: unsupported input dtype for an fp8 cache");
  }
}

}  // namespace mla::cpu
