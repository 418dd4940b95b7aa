// CUDA implementation of mla_ext.sparse_decode (the schema lives in sparse_ops.cpp): the
// same argument checks as the CPU op (each names the argument), then the plan, the split
// workspace and csrc/cuda/sparse_decode.cu on the current stream.
//
// Index-value checks (every read index inside its cache, topk_length in [0, topk]) need the
// values on the host: a device->host copy that syncs the stream. They run when enabled
// (mla_ext.set_index_checks, default on) and the stream is not capturing a CUDA graph; the
// kernel never reads a token outside the cache either way (it clamps topk_length and skips
// such an index).
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>

#include "../cuda/sparse_kernels.h"
#include "checks.h"

namespace mla::api {
namespace {

constexpr const char* kOp = "mla_ext.sparse_decode";
constexpr int64_t kFp8TokenBytes = 656;

bool capturing() {
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}

// MLA_EXT_SPARSE_IMPL=simple|tc picks the kernel (tests, comparisons); read on every call.
cuda::SparseImpl requested_impl() {
  const char* env = std::getenv("MLA_EXT_SPARSE_IMPL");
  if (env && std::strcmp(env, "simple") == 0) return cuda::SparseImpl::kSimple;
  if (env && std::strcmp(env, "tc") == 0) return cuda::SparseImpl::kTensorCore;
  return cuda::SparseImpl::kAuto;
}

struct KeepAlive {
  at::Tensor indices, topk_length;
};

// Checks one (cache, indices, topk_length) source; `which` is "" or "extra_".
SparseCudaSource check_source(const std::string& which, const at::Tensor& cache, const at::Tensor& indices,
                              const std::optional<at::Tensor>& topk_length, const at::Tensor& q, KeepAlive& keep) {
  const std::string cname = which + "cache", iname = which + "indices", lname = which + "topk_length";
  const int64_t b = q.size(0), s_q = q.size(1);
  TORCH_CHECK_VALUE(cache.device() == q.device(), kOp, ": ", cname, " is on ", cache.device(), " but q is on ",
                    q.device());
  const auto st = cache.scalar_type();
  const bool fp8 = st == at::kFloat8_e4m3fn;
  TORCH_CHECK_TYPE(fp8 || st == at::kBFloat16 || st == at::kHalf || st == at::kFloat, kOp, ": ", cname,
                   " must be float8_e4m3fn (656-byte tokens) or bfloat16 / float16 / float32, got ", st);
  const int64_t width = fp8 ? kFp8TokenBytes : kHeadDim;
  TORCH_CHECK_VALUE(cache.dim() == 3 || (cache.dim() == 4 && cache.size(2) == 1), kOp, ": ", cname,
                    " must be [num_blocks, block_size, ", width, "] or [num_blocks, block_size, 1, ", width, "], got ",
                    cache.sizes());
  TORCH_CHECK_VALUE(cache.size(-1) == width, kOp, ": ", cname, "'s last dim must be ", width,
                    fp8 ? " (a float8_e4m3fn cache holds DeepSeek-V3.2's 656-byte tokens)" : " (512 latent + 64 rope)",
                    ", got ", cache.size(-1));
  const at::Tensor c = cache.dim() == 4 ? cache.select(2, 0) : cache;
  TORCH_CHECK_VALUE(c.size(1) >= 1, kOp, ": ", cname, "'s block_size must be >= 1");
  TORCH_CHECK_VALUE(c.numel() == 0 || (c.stride(2) == 1 && c.stride(1) >= width && c.stride(0) >= 0), kOp, ": ",
                    cname, " must have a contiguous last dim and non-overlapping tokens, got strides ", cache.strides());
  const int64_t esize = c.element_size();
  // The kernel gathers tokens with 16-byte copies.
  TORCH_CHECK_VALUE(c.numel() == 0 || (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 == 0 &&
                                       (c.stride(0) * esize) % 16 == 0 && (c.stride(1) * esize) % 16 == 0),
                    kOp, ": on CUDA, ", cname, "'s data pointer and its block and token strides must be multiples of 16 "
                    "bytes, got strides ", cache.strides(), " (elements of ", esize, " bytes)");
  TORCH_CHECK_TYPE(indices.scalar_type() == at::kInt, kOp, ": ", iname, " must be int32, got ", indices.scalar_type());
  TORCH_CHECK_VALUE(indices.dim() == 3 && indices.size(0) == b && indices.size(1) == s_q, kOp, ": ", iname,
                    " must be [b, s_q, topk] = [", b, ", ", s_q, ", topk], got ", indices.sizes());
  TORCH_CHECK_VALUE(indices.device() == q.device(), kOp, ": ", iname, " is on ", indices.device(), " but q is on ",
                    q.device());
  const int64_t topk = indices.size(2);
  const int64_t num_tokens = c.size(0) * c.size(1);
  TORCH_CHECK_VALUE(num_tokens < (int64_t{1} << 31) && topk < (int64_t{1} << 31), kOp, ": ", cname, " holds ",
                    num_tokens, " tokens; int32 indices address at most 2^31 - 1");
  keep.indices = indices.contiguous();
  if (topk_length.has_value()) {
    const at::Tensor& len = *topk_length;
    TORCH_CHECK_TYPE(len.scalar_type() == at::kInt, kOp, ": ", lname, " must be int32, got ", len.scalar_type());
    TORCH_CHECK_VALUE(len.dim() == 1 && len.size(0) == b, kOp, ": ", lname, " must be [b] = [", b, "], got ",
                      len.sizes());
    TORCH_CHECK_VALUE(len.device() == q.device(), kOp, ": ", lname, " is on ", len.device(), " but q is on ",
                      q.device());
    keep.topk_length = len.contiguous();
  }
  if (index_checks_enabled() && !capturing()) {
    const at::Tensor idx_cpu = keep.indices.cpu();
    const at::Tensor len_cpu = keep.topk_length.defined() ? keep.topk_length.cpu() : at::Tensor();
    const int32_t* l = len_cpu.defined() ? len_cpu.data_ptr<int32_t>() : nullptr;
    if (l != nullptr)
      for (int64_t i = 0; i < b; ++i)
        TORCH_CHECK_VALUE(l[i] >= 0 && l[i] <= topk, kOp, ": ", lname, "[", i, "] = ", l[i],
                          " is outside [0, topk] = [0, ", topk, "] (topk = ", iname, ".shape[-1])");
    const int32_t* idx = idx_cpu.data_ptr<int32_t>();
    for (int64_t i = 0; i < b; ++i) {
      const int64_t used = l ? l[i] : topk;
      for (int64_t j = 0; j < s_q; ++j)
        for (int64_t k = 0; k < used; ++k) {
          const int32_t t = idx[(i * s_q + j) * topk + k];
          TORCH_CHECK_VALUE(t == -1 || (t >= 0 && t < num_tokens), kOp, ": ", iname, "[", i, ", ", j, ", ", k,
                            "] = ", t, " is outside the cache (", num_tokens, " tokens = ", c.size(0), " blocks x ",
                            c.size(1), "; -1 skips a slot)");
        }
    }
  }
  SparseCudaSource s{};
  s.cache = c.numel() ? static_cast<const uint8_t*>(c.data_ptr()) : nullptr;
  s.indices = keep.indices.numel() ? keep.indices.data_ptr<int32_t>() : nullptr;
  s.topk_length = keep.topk_length.defined() ? keep.topk_length.data_ptr<int32_t>() : nullptr;
  s.block_stride = c.stride(0) * esize;
  s.token_stride = c.stride(1) * esize;
  s.topk = static_cast<int32_t>(topk);
  s.block_size = static_cast<int32_t>(c.size(1));
  s.num_tokens = static_cast<int32_t>(num_tokens);
  return s;
}

std::tuple<at::Tensor, at::Tensor> sparse_decode_cuda(
    const at::Tensor& q_in, const at::Tensor& cache, const at::Tensor& indices, double softmax_scale,
    const std::optional<at::Tensor>& topk_length, const std::optional<at::Tensor>& extra_cache,
    const std::optional<at::Tensor>& extra_indices, const std::optional<at::Tensor>& extra_topk_length,
    const std::optional<at::Tensor>& attn_sink) {
  TORCH_CHECK_VALUE(q_in.dim() == 4 && q_in.size(3) == kHeadDim, kOp, ": q must be [b, s_q, h_q, ", kHeadDim,
                    "], got ", q_in.sizes());
  const auto qt = q_in.scalar_type();
  TORCH_CHECK_TYPE(qt == at::kBFloat16 || qt == at::kHalf || qt == at::kFloat, kOp,
                   ": q must be bfloat16, float16 or float32, got ", qt);
  TORCH_CHECK_VALUE(q_in.is_cuda(), kOp, ": q must be a CUDA tensor here, got ", q_in.device());
  TORCH_CHECK_VALUE(std::isfinite(softmax_scale), kOp, ": softmax_scale must be finite, got ", softmax_scale);
  TORCH_CHECK_VALUE(extra_cache.has_value() == extra_indices.has_value(), kOp,
                    ": extra_cache and extra_indices go together (got ",
                    extra_cache.has_value() ? "extra_cache" : "extra_indices", " alone)");
  TORCH_CHECK_VALUE(!extra_topk_length.has_value() || extra_cache.has_value(), kOp,
                    ": extra_topk_length needs extra_cache and extra_indices");
  const int64_t b = q_in.size(0), s_q = q_in.size(1), h = q_in.size(2);
  TORCH_CHECK_VALUE(b <= 65535 && s_q <= 65535 && h < (int64_t{1} << 24), kOp,
                    ": on CUDA at most 65535 sequences and 65535 queries per sequence, got q ", q_in.sizes());
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous();
  KeepAlive keep_main, keep_extra;
  SparseCudaParams p{};
  p.main = check_source("", cache, indices, topk_length, q, keep_main);
  p.cache_dtype = to_dtype(cache.scalar_type());
  if (extra_cache.has_value()) {
    p.extra = check_source("extra_", *extra_cache, *extra_indices, extra_topk_length, q, keep_extra);
    p.has_extra = true;
    TORCH_CHECK_TYPE(extra_cache->scalar_type() == cache.scalar_type(), kOp,
                     ": on CUDA, extra_cache must have cache's dtype (", cache.scalar_type(), "), got ",
                     extra_cache->scalar_type());
  }
  at::Tensor sink;
  if (attn_sink.has_value()) {
    TORCH_CHECK_TYPE(attn_sink->scalar_type() == at::kFloat, kOp, ": attn_sink must be float32, got ",
                     attn_sink->scalar_type());
    TORCH_CHECK_VALUE(attn_sink->dim() == 1 && attn_sink->size(0) == h, kOp, ": attn_sink must be [h_q] = [", h,
                      "], got ", attn_sink->sizes());
    TORCH_CHECK_VALUE(attn_sink->device() == q.device(), kOp, ": attn_sink is on ", attn_sink->device(),
                      " but q is on ", q.device());
    sink = attn_sink->contiguous();
    p.attn_sink = sink.data_ptr<float>();
  }
  at::Tensor out = at::empty({b, s_q, h, kLatentDim}, q.options());
  at::Tensor lse = at::empty({b, s_q, h}, q.options().dtype(at::kFloat));
  if (b * s_q * h == 0) return {out, lse};
  p.q = q.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.batch = static_cast<int32_t>(b);
  p.seqlen_q = static_cast<int32_t>(s_q);
  p.num_heads = static_cast<int32_t>(h);
  p.softmax_scale = static_cast<float>(softmax_scale);
  p.q_dtype = to_dtype(qt);
  const cuda::SparsePlan plan = cuda::plan_sparse_decode(p, q.get_device(), requested_impl());
  at::Tensor o_accum, lse_accum;
  if (plan.num_splits > 1) {
    const auto opts = q.options().dtype(at::kFloat);
    o_accum = at::empty({plan.workspace_o}, opts);
    lse_accum = at::empty({plan.workspace_lse}, opts);
    p.o_accum = o_accum.data_ptr<float>();
    p.lse_accum = lse_accum.data_ptr<float>();
  }
  C10_CUDA_CHECK(cuda::sparse_decode(p, plan, at::cuda::getCurrentCUDAStream()));
  return {out, lse};
}

}  // namespace
}  // namespace mla::api

TORCH_LIBRARY_IMPL(mla_ext, CUDA, m) { m.impl("sparse_decode", &mla::api::sparse_decode_cuda); }
