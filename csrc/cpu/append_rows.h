// The token loop shared by the CPU append kernels: slot lookup, padding skip, parallelism.
#pragma once
#include <ATen/Parallel.h>

#include <cstddef>
#include <cstdint>

#include "../mla_params.h"

namespace mla::cpu {

// Calls write_row(t, row) for every token t with slot_mapping[t] >= 0, where `row` points
// at that slot's cache row (cache elements of `cache_elt_bytes`). Parallel over tokens.
template <typename WriteRow>
void for_each_destination_row(const AppendParams& p, size_t cache_elt_bytes, const WriteRow& write_row) {
  char* cache = static_cast<char*>(p.cache);
  // Rows are 576+ bytes each: a grain of 64 tokens keeps thread start-up negligible.
  at::parallel_for(0, p.num_tokens, 64, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) {
      const int64_t slot = p.slot_is_int64 ? static_cast<const int64_t*>(p.slot_mapping)[t]
                                           : static_cast<const int32_t*>(p.slot_mapping)[t];
      if (slot < 0) continue;  // padding token
      const int64_t element = (slot / p.block_size) * p.cache_block_stride + (slot % p.block_size) * p.cache_token_stride;
      write_row(t, cache + element * static_cast<int64_t>(cache_elt_bytes));
    }
  });
}

}  // namespace mla::cpu
