// Plain parameter structs shared by the torch glue (csrc/api) and the kernels
// (csrc/cpu, csrc/cuda). No torch headers here: CUDA kernels include this file and
// must compile with plain nvcc.
//
// Shape names used in the comments:
//   b   batch (sequences)          s_q  queries per sequence (1, or 2+ for MTP)
//   h   query heads                T    tokens appended in one call
//   NB  cache blocks               BS   block_size (tokens per block)
//   MB  max_blocks_per_seq         D = 576 = DC (512 latent) + DR (64 rope)
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define MLA_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define MLA_HOST_DEVICE inline
#endif

namespace mla {

constexpr int kLatentDim = 512;                     // DC: kv_lora_rank, also head_dim_v
constexpr int kRopeDim = 64;                        // DR: qk_rope_head_dim
constexpr int kHeadDim = kLatentDim + kRopeDim;     // D: one cache row

// Element types the kernels understand. The glue maps torch dtypes onto these.
enum class DType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat8E4M3 = 3 };

struct AppendParams {
  const void* kv_c;         // [T, DC]  row stride kv_c_row_stride elements, last dim contiguous
  const void* k_pe;         // [T, DR]  row stride k_pe_row_stride elements, last dim contiguous
  void* cache;              // [NB, BS, D]  strides cache_block_stride / cache_token_stride, last dim contiguous
  const void* slot_mapping; // [T] int64 or int32 (slot_is_int64); slot = block * BS + offset, < 0 = skip
  const float* scale;       // [1] fp8 dequant scale (cache stores x / scale); nullptr for non-fp8 caches

  int64_t kv_c_row_stride;
  int64_t k_pe_row_stride;
  int64_t cache_block_stride;
  int64_t cache_token_stride;
  int64_t num_tokens;       // T
  int64_t num_blocks;       // NB
  int32_t block_size;       // BS
  bool slot_is_int64;
  DType input_dtype;        // dtype of kv_c and k_pe
  DType cache_dtype;
};

struct DecodeParams {
  const void* q_nope;       // [b, s_q, h, DC]  (or the packed [b, s_q, h, D] query: then q_pe = q_nope + DC)
  const void* q_pe;         // [b, s_q, h, DR]
  const void* cache;        // [NB, BS, D]  strides cache_block_stride / cache_token_stride
  const int32_t* block_table;   // [b, MB]  row stride block_table_batch_stride
  const int32_t* cache_seqlens; // [b]  tokens in the cache per sequence (includes the s_q new ones)
  const float* kv_scale;    // [1] fp8 dequant scale, nullptr for non-fp8 caches
  void* out;                // [b, s_q, h, DC]  contiguous, q's dtype
  float* lse;               // [b, s_q, h]      contiguous, natural log; -inf where no key is visible

  // Split-KV workspace (CUDA only; the CPU kernels ignore these). With num_splits > 1 each
  // split writes a normalised partial output and its lse here, and a combine pass merges
  // them into out / lse. Rows are r = j * h + head (M = s_q * h rows per sequence).
  float* o_accum;           // [b, num_splits, M, DC]  fp32, only read/written when num_splits > 1
  float* lse_accum;         // [b, num_splits, M]      fp32 natural log, -inf = no key seen
  int32_t num_splits;       // KV splits per sequence, from shapes only (never from seqlens values)
  // Device-side schedule (the sm90 kernel, csrc/cuda/schedule.cuh): an int32 workspace the
  // metadata kernel fills from cache_seqlens on the device, and the number of persistent CTAs
  // (SM count x CTAs per SM, filled by the host from the plan). Unused by the other kernels.
  int32_t* sched;           // [sched_ints(units, sched_ctas)] int32
  int32_t sched_ctas;

  // Strides in elements. The head dim of q_nope/q_pe is contiguous.
  int64_t q_nope_batch_stride, q_nope_seq_stride, q_nope_head_stride;
  int64_t q_pe_batch_stride, q_pe_seq_stride, q_pe_head_stride;
  int64_t cache_block_stride, cache_token_stride;
  int64_t block_table_batch_stride;

  int32_t batch;            // b
  int32_t seqlen_q;         // s_q
  int32_t num_heads;        // h
  int32_t num_blocks;       // NB
  int32_t block_size;       // BS
  int32_t max_blocks_per_seq;  // MB
  float softmax_scale;
  bool causal;
  DType q_dtype;            // dtype of q_nope, q_pe and out
  DType cache_dtype;
};

// Number of keys visible to query row j (0 <= j < s_q) of a sequence with cache length L.
// Bottom-right aligned causal mask: query j sees keys t <= L - s_q + j.
MLA_HOST_DEVICE int32_t visible_keys(int32_t seqlen, int32_t seqlen_q, int32_t j, bool causal) {
  if (seqlen <= 0) return 0;
  if (!causal) return seqlen;
  int32_t n = seqlen - seqlen_q + j + 1;
  return n < 0 ? 0 : (n > seqlen ? seqlen : n);
}

// Sparse (top-k) decode, DeepSeek-V3.2's DSA (mla_ext/sparse.py has the math and the
// 656-byte fp8 token layout). One source = a paged cache plus per-query token indices.
struct SparseSource {
  const uint8_t* cache;       // byte base of [NB, BS, token] tokens
  int64_t block_stride;       // bytes; may exceed BS * token bytes (padded blocks)
  int64_t token_stride;       // bytes
  const int32_t* indices;     // [b, s_q, topk] contiguous; token = block * BS + offset, -1 = skip
  const int32_t* topk_length; // [b] or nullptr; slots >= topk_length[b] are skipped
  int32_t topk;
  int32_t block_size;         // BS
  DType dtype;                // kFloat8E4M3: 656-byte tokens; otherwise 576 values of this dtype
};

struct SparseDecodeParams {
  const float* q;             // [b, s_q, h, D] contiguous fp32
  float* out;                 // [b, s_q, h, DC] contiguous fp32
  float* lse;                 // [b, s_q, h] natural log; +inf for a query with no valid slot
  const float* attn_sink;     // [h] or nullptr: out *= 1 / (1 + exp(sink - lse))
  SparseSource main;
  SparseSource extra;         // used when has_extra
  bool has_extra;
  int32_t batch, seqlen_q, num_heads;
  float softmax_scale;
};

}  // namespace mla
