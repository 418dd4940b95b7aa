// CPU latent-cache append: cache[slot] = [kv_c | k_pe], parallel over tokens.
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <cstring>

#include "append_rows.h"
#include "cpu_kernels.h"

namespace mla::cpu {
namespace {

template <typename T>
void append_same_dtype(const AppendParams& p) {
  const T* kv_c = static_cast<const T*>(p.kv_c);
  const T* k_pe = static_cast<const T*>(p.k_pe);
  for_each_destination_row(p, sizeof(T), [&](int64_t t, char* row) {
    std::memcpy(row, kv_c + t * p.kv_c_row_stride, kLatentDim * sizeof(T));
    std::memcpy(row + kLatentDim * sizeof(T), k_pe + t * p.k_pe_row_stride, kRopeDim * sizeof(T));
  });
}

}  // namespace

void append_kv(const AppendParams& p) {
  TORCH_CHECK(p.input_dtype == p.cache_dtype, "mla_ext: CPU append needs inputs of the cache's dtype");
  switch (p.cache_dtype) {
    case DType::kFloat32: append_same_dtype<float>(p); break;
    case DType::kFloat16: append_same_dtype<c10::Half>(p); break;
    case DType::kBFloat16: append_same_dtype<c10::BFloat16>(p); break;
    default: TORCH_CHECK(false, "mla_ext: unsupported cache dtype in the CPU append");
  }
}

}  // namespace mla::cpu
