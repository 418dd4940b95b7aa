// The argument checks mla_ext.sparse_decode shares between its CPU (sparse_ops.cpp) and CUDA
// (sparse_cuda_ops.cpp) implementations, so both refuse the same inputs with the same words.
// Each message names the argument ("cache" or "extra_cache", ...). Device-specific limits
// (CUDA's 16-byte alignment, grid sizes) stay in each file.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <string>

#include "../mla_params.h"

namespace mla::api::sparse {

constexpr const char* kOp = "mla_ext.sparse_decode";
constexpr int64_t kFp8TokenBytes = 656;  // DeepSeek-V3.2's fp8 token: 512 e4m3 + 4 fp32 scales + 64 bf16

// q, the scale and how the optional arguments go together.
inline void check_query_and_options(const at::Tensor& q, double softmax_scale,
                                    const std::optional<at::Tensor>& extra_cache,
                                    const std::optional<at::Tensor>& extra_indices,
                                    const std::optional<at::Tensor>& extra_topk_length) {
  TORCH_CHECK_VALUE(q.dim() == 4 && q.size(3) == kHeadDim, kOp, ": q must be [b, s_q, h_q, ", kHeadDim, "], got ",
                    q.sizes());
  const auto qt = q.scalar_type();
  TORCH_CHECK_TYPE(qt == at::kBFloat16 || qt == at::kHalf || qt == at::kFloat, kOp,
                   ": q must be bfloat16, float16 or float32, got ", qt);
  TORCH_CHECK_VALUE(std::isfinite(softmax_scale), kOp, ": softmax_scale must be finite, got ", softmax_scale);
  TORCH_CHECK_VALUE(extra_cache.has_value() == extra_indices.has_value(), kOp,
                    ": extra_cache and extra_indices go together (got ",
                    extra_cache.has_value() ? "extra_cache" : "extra_indices", " alone)");
  TORCH_CHECK_VALUE(!extra_topk_length.has_value() || extra_cache.has_value(), kOp,
                    ": extra_topk_length needs extra_cache and extra_indices");
}

// One (cache, indices, topk_length) source after its shape / dtype / device / stride checks.
struct CheckedSource {
  at::Tensor cache3d;       // [num_blocks, block_size, width] (a 4-D cache's head dim dropped)
  at::Tensor indices;       // [b, s_q, topk] int32, contiguous
  at::Tensor topk_length;   // [b] int32, contiguous, or undefined
  int64_t width = 0;        // values per token: 656 (fp8 bytes) or 576
  int64_t topk = 0;
  int64_t num_tokens = 0;   // num_blocks * block_size
  bool one_token_per_block = false;  // block_size 1: the token stride is never used
};

// `which` is "" or "extra_" for the messages. Index values are not read here (see
// check_index_values): on CUDA that needs a host copy.
inline CheckedSource check_source_shapes(const std::string& which, const at::Tensor& cache, const at::Tensor& indices,
                                         const std::optional<at::Tensor>& topk_length, const at::Tensor& q) {
  const std::string cname = which + "cache", iname = which + "indices", lname = which + "topk_length";
  const int64_t b = q.size(0), s_q = q.size(1);
  TORCH_CHECK_VALUE(cache.device() == q.device(), kOp, ": ", cname, " is on ", cache.device(), " but q is on ",
                    q.device());
  const auto st = cache.scalar_type();
  const bool fp8 = st == at::kFloat8_e4m3fn;
  TORCH_CHECK_TYPE(fp8 || st == at::kBFloat16 || st == at::kHalf || st == at::kFloat, kOp, ": ", cname,
                   " must be float8_e4m3fn (656-byte tokens) or bfloat16 / float16 / float32, got ", st);
  CheckedSource s;
  s.width = fp8 ? kFp8TokenBytes : kHeadDim;
  TORCH_CHECK_VALUE(cache.dim() == 3 || (cache.dim() == 4 && cache.size(2) == 1), kOp, ": ", cname,
                    " must be [num_blocks, block_size, ", s.width, "] or [num_blocks, block_size, 1, ", s.width,
                    "], got ", cache.sizes());
  TORCH_CHECK_VALUE(cache.size(-1) == s.width, kOp, ": ", cname, "'s last dim must be ", s.width,
                    fp8 ? " (a float8_e4m3fn cache holds DeepSeek-V3.2's 656-byte tokens)" : " (512 latent + 64 rope)",
                    ", got ", cache.size(-1));
  const at::Tensor c = cache.dim() == 4 ? cache.select(2, 0) : cache;
  TORCH_CHECK_VALUE(c.size(1) >= 1, kOp, ": ", cname, "'s block_size must be >= 1");
  // A dim of size 1 may carry any stride (torch does not normalise them): with block_size 1
  // the token stride is never used, with one block the block stride neither.
  s.one_token_per_block = c.size(1) == 1;
  const bool one_block = c.size(0) == 1;
  TORCH_CHECK_VALUE(c.numel() == 0 || (c.stride(2) == 1 && (s.one_token_per_block || c.stride(1) >= s.width) &&
                                       (one_block || c.stride(0) >= 0)),
                    kOp, ": ", cname, " must have a contiguous last dim and non-overlapping tokens, got strides ",
                    cache.strides());
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kInt, kOp, ": ", iname, " must be int32, got ", indices.scalar_type());
  TORCH_CHECK_VALUE(indices.dim() == 3 && indices.size(0) == b && indices.size(1) == s_q, kOp, ": ", iname,
                    " must be [b, s_q, topk] = [", b, ", ", s_q, ", topk], got ", indices.sizes());
  TORCH_CHECK_VALUE(indices.device() == q.device(), kOp, ": ", iname, " is on ", indices.device(), " but q is on ",
                    q.device());
  s.topk = indices.size(2);
  TORCH_CHECK_VALUE(s.topk < (int64_t{1} << 31), kOp, ": ", iname, ".shape[-1] (topk) = ", s.topk,
                    " does not fit int32");
  s.num_tokens = c.size(0) * c.size(1);
  TORCH_CHECK_VALUE(s.num_tokens < (int64_t{1} << 31), kOp, ": ", cname, " holds ", s.num_tokens,
                    " tokens; int32 indices address at most 2^31 - 1");
  if (topk_length.has_value()) {
    const at::Tensor& len = *topk_length;
    TORCH_CHECK_TYPE(len.scalar_type() == at::kInt, kOp, ": ", lname, " must be int32, got ", len.scalar_type());
    TORCH_CHECK_VALUE(len.dim() == 1 && len.size(0) == b, kOp, ": ", lname, " must be [b] = [", b, "], got ",
                      len.sizes());
    TORCH_CHECK_VALUE(len.device() == q.device(), kOp, ": ", lname, " is on ", len.device(), " but q is on ",
                      q.device());
    s.topk_length = len.contiguous();
  }
  s.cache3d = c;
  s.indices = indices.contiguous();
  return s;
}

// topk_length in [0, topk] and every slot that is read naming a token of the cache (-1 =
// skip): idx [b, s_q, topk] and len [b] (or nullptr) are host pointers.
inline void check_index_values(const std::string& which, const CheckedSource& s, const int32_t* idx,
                               const int32_t* len, int64_t b, int64_t s_q) {
  const std::string iname = which + "indices", lname = which + "topk_length";
  if (len != nullptr)
    for (int64_t i = 0; i < b; ++i)
      TORCH_CHECK_VALUE(len[i] >= 0 && len[i] <= s.topk, kOp, ": ", lname, "[", i, "] = ", len[i],
                        " is outside [0, topk] = [0, ", s.topk, "] (topk = ", iname, ".shape[-1])");
  for (int64_t i = 0; i < b; ++i) {
    const int64_t used = len ? len[i] : s.topk;
    for (int64_t j = 0; j < s_q; ++j)
      for (int64_t k = 0; k < used; ++k) {
        const int32_t t = idx[(i * s_q + j) * s.topk + k];
        TORCH_CHECK_VALUE(t == -1 || (t >= 0 && t < s.num_tokens), kOp, ": ", iname, "[", i, ", ", j, ", ", k,
                          "] = ", t, " is outside the cache (", s.num_tokens, " tokens = ", s.cache3d.size(0),
                          " blocks x ", s.cache3d.size(1), "; -1 skips a slot)");
      }
  }
}

// attn_sink [h_q] float32 on q's device, contiguous; undefined when absent.
inline at::Tensor check_attn_sink(const std::optional<at::Tensor>& attn_sink, const at::Tensor& q) {
  if (!attn_sink.has_value()) return at::Tensor();
  const int64_t h = q.size(2);
  TORCH_CHECK_TYPE(attn_sink->scalar_type() == at::kFloat, kOp, ": attn_sink must be float32, got ",
                   attn_sink->scalar_type());
  TORCH_CHECK_VALUE(attn_sink->dim() == 1 && attn_sink->size(0) == h, kOp, ": attn_sink must be [h_q] = [", h,
                    "], got ", attn_sink->sizes());
  TORCH_CHECK_VALUE(attn_sink->device() == q.device(), kOp, ": attn_sink is on ", attn_sink->device(),
                    " but q is on ", q.device());
  return attn_sink->contiguous();
}

}  // namespace mla::api::sparse
