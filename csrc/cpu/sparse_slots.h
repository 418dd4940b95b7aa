// The valid slots of one sparse query (both sources, in order) and the address of a
// named token: shared by every build of the sparse decode kernel (sparse_decode_body.h,
// sparse_decode_avx512.cpp). Plain C++, no instruction-set specific code.
#pragma once
#include <algorithm>
#include <cstdint>

#include "../mla_params.h"

namespace mla::cpu {

// Byte address of token `token` (= block * block_size + offset) of a source's cache.
inline const uint8_t* sparse_token_ptr(const SparseSource& s, int32_t token) {
  const int64_t block = token / s.block_size, offset = token % s.block_size;
  return s.cache + block * s.block_stride + offset * s.token_stride;
}

// Asks for every cache line of a token (656 bytes fp8, 576 values otherwise) ahead of use:
// the named tokens lie anywhere in the cache, so the hardware prefetcher cannot guess them.
inline void sparse_prefetch_token(const SparseSource& s, int32_t token) {
  const uint8_t* tok = sparse_token_ptr(s, token);
  const int bytes = s.dtype == DType::kFloat8E4M3 ? 656 : s.dtype == DType::kFloat32 ? 4 * 576 : 2 * 576;
  for (int off = 0; off < bytes; off += 64) __builtin_prefetch(tok + off, 0, 3);
  __builtin_prefetch(tok + bytes - 1, 0, 3);
}

// Walks the valid slots of (main, extra) for query (bi, j) in order: -1 and slots at or
// past topk_length[bi] are skipped, a token named twice is returned twice.
struct SparseSlotCursor {
  const SparseDecodeParams& p;
  int64_t bi, j;
  int source = 0;  // 0 main, 1 extra, 2 done
  int32_t slot = 0;

  int32_t limit(const SparseSource& s) const {
    return s.topk_length ? std::min(s.topk_length[bi], s.topk) : s.topk;
  }
  // Fills up to `cap` (source, token) pairs; returns how many (0 = no slot left).
  int next(int cap, const SparseSource** srcs, int32_t* tokens) {
    int n = 0;
    while (n < cap && source < 2) {
      if (source == 1 && !p.has_extra) {
        source = 2;
        break;
      }
      const SparseSource& s = source == 0 ? p.main : p.extra;
      const int32_t* idx = s.indices + (bi * p.seqlen_q + j) * static_cast<int64_t>(s.topk);
      const int32_t end = limit(s);
      while (n < cap && slot < end) {
        const int32_t t = idx[slot++];
        if (t == -1) continue;
        srcs[n] = &s;
        tokens[n++] = t;
      }
      if (slot >= end) {
        ++source;
        slot = 0;
      }
    }
    return n;
  }
};

}  // namespace mla::cpu
