// mla_ext.sparse_decode and mla_ext.sparse_append_kv (the 656-byte fp8 quantiser): the
// schemas, their checks (each names the argument) and the CPU glue. Semantics:
// mla_ext/sparse.py (FlashMLA's ref_sparse_attn_decode and quantiser).
#include <torch/library.h>

#include <cmath>
#include <string>
#include <utility>

#include "../cpu/cpu_kernels.h"
#include "../cpu/sparse_kernels.h"
#include "checks.h"
#include "sparse_checks.h"

namespace mla::api {
namespace {

using sparse::kFp8TokenBytes;
using sparse::kOp;

// One (cache, indices, topk_length) source checked (sparse_checks.h, index values on the
// host: CPU tensors), as the kernel reads it; `which` is "" or "extra_".
SparseSource check_source(const std::string& which, const at::Tensor& cache, const at::Tensor& indices,
                          const std::optional<at::Tensor>& topk_length, const at::Tensor& q,
                          sparse::CheckedSource& keep) {
  keep = sparse::check_source_shapes(which, cache, indices, topk_length, q);
  const int32_t* idx = keep.indices.numel() ? keep.indices.data_ptr<int32_t>() : nullptr;
  const int32_t* l = keep.topk_length.defined() ? keep.topk_length.data_ptr<int32_t>() : nullptr;
  sparse::check_index_values(which, keep, idx, l, q.size(0), q.size(1));
  const at::Tensor& c = keep.cache3d;
  const int64_t esize = c.element_size();
  SparseSource s{};
  s.cache = c.numel() ? static_cast<const uint8_t*>(c.data_ptr()) : nullptr;
  s.block_stride = c.stride(0) * esize;
  s.token_stride = keep.one_token_per_block ? keep.width * esize : c.stride(1) * esize;
  s.indices = idx;
  s.topk_length = l;
  s.topk = static_cast<int32_t>(keep.topk);
  s.block_size = static_cast<int32_t>(c.size(1));
  s.dtype = to_dtype(c.scalar_type());
  return s;
}

std::tuple<at::Tensor, at::Tensor> sparse_decode_cpu(
    const at::Tensor& q, const at::Tensor& cache, const at::Tensor& indices, double softmax_scale,
    const std::optional<at::Tensor>& topk_length, const std::optional<at::Tensor>& extra_cache,
    const std::optional<at::Tensor>& extra_indices, const std::optional<at::Tensor>& extra_topk_length,
    const std::optional<at::Tensor>& attn_sink) {
  sparse::check_query_and_options(q, softmax_scale, extra_cache, extra_indices, extra_topk_length);
  const auto qt = q.scalar_type();
  const int64_t b = q.size(0), s_q = q.size(1), h = q.size(2);
  TORCH_CHECK_VALUE(b < (int64_t{1} << 31) && s_q < (int64_t{1} << 31) && h < (int64_t{1} << 31), kOp,
                    ": q's dims must fit int32, got ", q.sizes());
  sparse::CheckedSource keep_main, keep_extra;
  SparseDecodeParams p{};
  p.main = check_source("", cache, indices, topk_length, q, keep_main);
  if (extra_cache.has_value()) {
    p.extra = check_source("extra_", *extra_cache, *extra_indices, extra_topk_length, q, keep_extra);
    p.has_extra = true;
  }
  const at::Tensor sink = sparse::check_attn_sink(attn_sink, q);
  if (sink.defined()) p.attn_sink = sink.data_ptr<float>();
  at::Tensor q32 = q.to(at::kFloat).contiguous();
  at::Tensor out32 = at::empty({b, s_q, h, kLatentDim}, q.options().dtype(at::kFloat));
  at::Tensor lse = at::empty({b, s_q, h}, q.options().dtype(at::kFloat));
  p.q = q32.data_ptr<float>();
  p.out = out32.data_ptr<float>();
  p.lse = lse.data_ptr<float>();
  p.batch = static_cast<int32_t>(b);
  p.seqlen_q = static_cast<int32_t>(s_q);
  p.num_heads = static_cast<int32_t>(h);
  p.softmax_scale = static_cast<float>(softmax_scale);
  if (b * s_q * h > 0) cpu::sparse_decode(p, to_dtype(qt));
  at::Tensor out = qt == at::kFloat ? out32 : out32.to(qt);
  return {out, lse};
}

// mla_ext.sparse_append_kv: quantises new tokens into the 656-byte fp8 cache, in place.
void sparse_append_kv_cpu(const at::Tensor& kv_c, const at::Tensor& k_pe, const at::Tensor& cache,
                          const at::Tensor& slot_mapping) {
  constexpr const char* op = "mla_ext.sparse_append_kv";
  TORCH_CHECK_VALUE(kv_c.dim() == 2 && kv_c.size(1) == kLatentDim, op, ": kv_c must be [T, ", kLatentDim, "], got ",
                    kv_c.sizes());
  TORCH_CHECK_VALUE(k_pe.dim() == 2 && k_pe.size(1) == kRopeDim && k_pe.size(0) == kv_c.size(0), op,
                    ": k_pe must be [T, ", kRopeDim, "] = [", kv_c.size(0), ", ", kRopeDim, "], got ", k_pe.sizes());
  const auto dt = kv_c.scalar_type();
  TORCH_CHECK_TYPE(dt == at::kFloat || dt == at::kBFloat16 || dt == at::kHalf, op,
                   ": kv_c must be float32, bfloat16 or float16, got ", dt);
  TORCH_CHECK_TYPE(k_pe.scalar_type() == dt, op, ": k_pe dtype ", k_pe.scalar_type(), " differs from kv_c dtype ", dt);
  TORCH_CHECK_TYPE(cache.scalar_type() == at::kFloat8_e4m3fn || cache.scalar_type() == at::kByte, op,
                   ": cache must be float8_e4m3fn (or its uint8 view) holding 656-byte tokens, got ",
                   cache.scalar_type());
  TORCH_CHECK_VALUE((cache.dim() == 3 || (cache.dim() == 4 && cache.size(2) == 1)) && cache.size(-1) == kFp8TokenBytes,
                    op, ": cache must be [num_blocks, block_size, ", kFp8TokenBytes, "] or [num_blocks, block_size, 1, ",
                    kFp8TokenBytes, "], got ", cache.sizes());
  const at::Tensor c = cache.dim() == 4 ? cache.select(2, 0) : cache;
  const int64_t num_blocks = c.size(0), block_size = c.size(1);
  TORCH_CHECK_VALUE(block_size >= 1, op, ": cache's block_size must be >= 1");
  TORCH_CHECK_VALUE(c.numel() == 0 || (c.stride(2) == 1 && (block_size == 1 || c.stride(1) >= kFp8TokenBytes) &&
                                       (num_blocks == 1 || c.stride(0) >= block_size * kFp8TokenBytes)),
                    op, ": cache must have a contiguous last dim and non-overlapping tokens, got strides ",
                    cache.strides());
  const auto st = slot_mapping.scalar_type();
  TORCH_CHECK_TYPE(st == at::kLong || st == at::kInt, op, ": slot_mapping must be int64 or int32, got ", st);
  TORCH_CHECK_VALUE(slot_mapping.dim() == 1 && slot_mapping.size(0) == kv_c.size(0), op,
                    ": slot_mapping must be [T] = [", kv_c.size(0), "], got ", slot_mapping.sizes());
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor*>{"kv_c", &kv_c}, {"k_pe", &k_pe},
                                {"slot_mapping", &slot_mapping}})
    TORCH_CHECK_VALUE(t->device() == cache.device(), op, ": ", name, " is on ", t->device(), " but cache is on ",
                      cache.device());
  // Rows may be strided (e.g. kv_c and k_pe as views of one [T, 576] tensor); the last dim
  // must be contiguous for the kernel.
  const at::Tensor kv = kv_c.stride(1) == 1 ? kv_c : kv_c.contiguous();
  const at::Tensor pe = k_pe.stride(1) == 1 ? k_pe : k_pe.contiguous();
  const at::Tensor slots = slot_mapping.contiguous();
  const int64_t num_slots = num_blocks * block_size;
  for (int64_t i = 0; i < slots.size(0); ++i) {
    const int64_t v = st == at::kLong ? slots.data_ptr<int64_t>()[i] : slots.data_ptr<int32_t>()[i];
    TORCH_CHECK_VALUE(v < num_slots, op, ": slot_mapping[", i, "] = ", v, " is outside the cache (", num_slots,
                      " slots = ", num_blocks, " blocks x ", block_size, "; < 0 skips a token)");
  }
  if (kv.size(0) == 0) return;
  cpu::SparseAppendParams p{};
  p.kv_c = kv.data_ptr();
  p.k_pe = pe.data_ptr();
  p.kv_c_row_stride = kv.stride(0);
  p.k_pe_row_stride = pe.stride(0);
  p.input_dtype = to_dtype(dt);
  p.slot_mapping = slots.data_ptr();
  p.slot_is_int64 = st == at::kLong;
  p.cache = static_cast<uint8_t*>(c.data_ptr());
  p.block_stride = c.stride(0);  // 1-byte elements: strides are bytes
  p.token_stride = block_size == 1 ? kFp8TokenBytes : c.stride(1);
  p.num_tokens = kv.size(0);
  p.block_size = static_cast<int32_t>(block_size);
  cpu::sparse_append(p);
}

// Which CPU sparse kernel a call with these dtypes runs on this machine (MLA_EXT_CPU_ISA
// is read per call). The fp8 cache is named by float8_e4m3fn (656-byte tokens).
std::string cpu_sparse_decode_kernel(c10::ScalarType q_dtype, c10::ScalarType cache_dtype,
                                     std::optional<c10::ScalarType> extra_cache_dtype) {
  const DType extra = extra_cache_dtype.has_value() ? to_dtype(*extra_cache_dtype) : DType::kFloat32;
  return cpu::sparse_decode_kernel_name(to_dtype(q_dtype), to_dtype(cache_dtype), extra_cache_dtype.has_value(), extra);
}

}  // namespace
}  // namespace mla::api

TORCH_LIBRARY_FRAGMENT(mla_ext, m) {
  m.def(
      "sparse_decode(Tensor q, Tensor cache, Tensor indices, float softmax_scale, Tensor? topk_length=None, "
      "Tensor? extra_cache=None, Tensor? extra_indices=None, Tensor? extra_topk_length=None, "
      "Tensor? attn_sink=None) -> (Tensor out, Tensor lse)");
  m.def("sparse_append_kv(Tensor kv_c, Tensor k_pe, Tensor(a!) cache, Tensor slot_mapping) -> ()");
  m.def("cpu_sparse_decode_kernel(ScalarType q_dtype, ScalarType cache_dtype, ScalarType? extra_cache_dtype=None) -> str",
        &mla::api::cpu_sparse_decode_kernel);
}

TORCH_LIBRARY_IMPL(mla_ext, CPU, m) {
  m.impl("sparse_decode", &mla::api::sparse_decode_cpu);
  m.impl("sparse_append_kv", &mla::api::sparse_append_kv_cpu);
}
