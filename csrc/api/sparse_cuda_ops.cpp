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
#include "sparse_checks.h"

namespace mla::api {
namespace {

using sparse::kOp;

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

// One (cache, indices, topk_length) source checked (sparse_checks.h), plus what the CUDA
// kernel needs: 16-byte aligned tokens; the index values checked on a host copy (a stream
// sync) when checks are on and no graph is being captured. `which` is "" or "extra_".
SparseCudaSource check_source(const std::string& which, const at::Tensor& cache, const at::Tensor& indices,
                              const std::optional<at::Tensor>& topk_length, const at::Tensor& q,
                              sparse::CheckedSource& keep) {
  keep = sparse::check_source_shapes(which, cache, indices, topk_length, q);
  const at::Tensor& c = keep.cache3d;
  const int64_t esize = c.element_size();
  // The kernel gathers tokens with 16-byte copies (block_size 1: the token stride is unused).
  const int64_t token_stride = keep.one_token_per_block ? keep.width : c.stride(1);
  TORCH_CHECK_VALUE(c.numel() == 0 || (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 == 0 &&
                                       (c.stride(0) * esize) % 16 == 0 && (token_stride * esize) % 16 == 0),
                    kOp, ": on CUDA, ", which, "cache's data pointer and its block and token strides must be "
                    "multiples of 16 bytes, got strides ", cache.strides(), " (elements of ", esize, " bytes)");
  if (index_checks_enabled() && !capturing()) {
    const at::Tensor idx_cpu = keep.indices.cpu();
    const at::Tensor len_cpu = keep.topk_length.defined() ? keep.topk_length.cpu() : at::Tensor();
    sparse::check_index_values(which, keep, idx_cpu.numel() ? idx_cpu.data_ptr<int32_t>() : nullptr,
                               len_cpu.defined() ? len_cpu.data_ptr<int32_t>() : nullptr, q.size(0), q.size(1));
  }
  SparseCudaSource s{};
  s.cache = c.numel() ? static_cast<const uint8_t*>(c.data_ptr()) : nullptr;
  s.indices = keep.indices.numel() ? keep.indices.data_ptr<int32_t>() : nullptr;
  s.topk_length = keep.topk_length.defined() ? keep.topk_length.data_ptr<int32_t>() : nullptr;
  s.block_stride = c.stride(0) * esize;
  s.token_stride = token_stride * esize;
  s.topk = static_cast<int32_t>(keep.topk);
  s.block_size = static_cast<int32_t>(c.size(1));
  s.num_tokens = static_cast<int32_t>(keep.num_tokens);
  return s;
}

std::tuple<at::Tensor, at::Tensor> sparse_decode_cuda(
    const at::Tensor& q_in, const at::Tensor& cache, const at::Tensor& indices, double softmax_scale,
    const std::optional<at::Tensor>& topk_length, const std::optional<at::Tensor>& extra_cache,
    const std::optional<at::Tensor>& extra_indices, const std::optional<at::Tensor>& extra_topk_length,
    const std::optional<at::Tensor>& attn_sink) {
  sparse::check_query_and_options(q_in, softmax_scale, extra_cache, extra_indices, extra_topk_length);
  TORCH_CHECK_VALUE(q_in.is_cuda(), kOp, ": q must be a CUDA tensor here, got ", q_in.device());
  const auto qt = q_in.scalar_type();
  const int64_t b = q_in.size(0), s_q = q_in.size(1), h = q_in.size(2);
  TORCH_CHECK_VALUE(b <= 65535 && s_q <= 65535 && h < (int64_t{1} << 24), kOp,
                    ": on CUDA at most 65535 sequences and 65535 queries per sequence, got q ", q_in.sizes());
  const c10::cuda::CUDAGuard guard(q_in.device());
  const at::Tensor q = q_in.contiguous();
  sparse::CheckedSource keep_main, keep_extra;
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
  const at::Tensor sink = sparse::check_attn_sink(attn_sink, q);
  if (sink.defined()) p.attn_sink = sink.data_ptr<float>();
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
