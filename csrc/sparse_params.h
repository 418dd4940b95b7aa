// Parameters of the CUDA sparse (top-k) decode kernels (csrc/cuda/sparse_decode.cu),
// DeepSeek-V3.2's DSA; math and the 656-byte fp8 token layout in mla_ext/sparse.py. Plain
// struct, no torch headers (the .cu includes it). Shape names: see mla_params.h, plus
//   topk   slots per query of the main source     topk_x  slots per query of the extra one
//   NT     tokens of a source's cache (NB * BS)    S      topk splits (num_splits)
#pragma once
#include <cstdint>

#include "mla_params.h"

namespace mla {

// One (cache, indices, topk_length) source of a sparse decode call.
struct SparseCudaSource {
  const uint8_t* cache;        // [NB, BS, token bytes] byte base; token bytes 656 (fp8) or 576 * element size
  const int32_t* indices;      // [b, s_q, topk] contiguous; token = block * BS + offset, -1 = skip
  const int32_t* topk_length;  // [b] or nullptr; slots >= topk_length[b] are skipped
  int64_t block_stride;        // bytes, multiple of 16; may exceed BS * token bytes (padded blocks)
  int64_t token_stride;        // bytes, multiple of 16
  int32_t topk;                // slots per query
  int32_t block_size;          // BS
  int32_t num_tokens;          // NT = NB * BS: an index outside [0, NT) is never read (the glue rejects it)
};

struct SparseCudaParams {
  const void* q;               // [b, s_q, h, D] contiguous, q_dtype
  void* out;                   // [b, s_q, h, DC] contiguous, q_dtype
  float* lse;                  // [b, s_q, h] natural log; +inf where a query has no valid slot
  const float* attn_sink;      // [h] or nullptr: out *= 1 / (1 + exp(sink - lse)), lse unchanged
  SparseCudaSource main;
  SparseCudaSource extra;      // read only when has_extra
  // Split-topk workspace: with num_splits > 1 each split writes a normalised partial output
  // (no sink) and its lse (-inf = no valid slot in the split); a combine kernel merges them.
  // Rows are r = (bi * s_q + j) * h + head.
  float* o_accum;              // [S, b * s_q * h, DC] fp32, used when num_splits > 1
  float* lse_accum;            // [S, b * s_q * h] fp32, used when num_splits > 1
  int32_t num_splits;          // S >= 1, from shapes only
  bool has_extra;
  int32_t batch, seqlen_q, num_heads;  // b, s_q, h
  float softmax_scale;
  DType q_dtype;               // kBFloat16, kFloat16 or kFloat32: q and out
  DType cache_dtype;           // of both sources: kFloat8E4M3 (656-byte tokens), kBFloat16, kFloat16 or kFloat32
};

}  // namespace mla
