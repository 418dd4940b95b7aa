// CPU implementations of the mla_ext ops: validate, then call csrc/cpu kernels.
// On the CPU the index-value checks are always on: they cost a pass over small tensors.
#include <torch/library.h>

#include "../cpu/cpu_kernels.h"
#include "checks.h"

namespace mla::api {
namespace {

void append_kv_cpu(at::Tensor kv_c, at::Tensor k_pe, at::Tensor cache, at::Tensor slot_mapping,
                   const std::optional<at::Tensor>& scale) {
  at::Tensor cache3d = cache_3d(cache, "mla_ext.append_kv");
  AppendParams p = check_append(kv_c, k_pe, cache3d, slot_mapping, scale);
  validate_slots(slot_mapping, p.num_blocks * p.block_size);
  if (scale.has_value()) validate_scale_value(*scale, "mla_ext.append_kv");
  if (p.num_tokens == 0) return;
  if (p.cache_dtype == DType::kFloat8E4M3) cpu::append_kv_fp8(p);
  else cpu::append_kv(p);
}

void decode_out_cpu(at::Tensor q_nope, std::optional<at::Tensor> q_pe, const at::Tensor& cache,
                    const at::Tensor& block_table, const at::Tensor& cache_seqlens, double softmax_scale, bool causal,
                    const std::optional<at::Tensor>& scale, at::Tensor out, at::Tensor lse) {
  at::Tensor cache3d = cache_3d(cache, "mla_ext.decode");
  DecodeParams p = check_decode(q_nope, q_pe, cache3d, block_table, cache_seqlens, softmax_scale, causal, scale);
  check_decode_outputs(q_nope, out, lse);
  validate_block_table(block_table, cache_seqlens, p.num_blocks, p.block_size);
  if (scale.has_value()) validate_scale_value(*scale, "mla_ext.decode");
  p.lse = lse.data_ptr<float>();
  if (p.cache_dtype == DType::kFloat8E4M3 && q_nope.scalar_type() != at::kFloat) {
    // The CPU kernels read an fp8 cache with an fp32 query and write an fp32 output:
    // converting q and out (h * s_q rows per sequence) costs little next to the cache.
    at::Tensor q_nope32 = q_nope.to(at::kFloat);
    std::optional<at::Tensor> q_pe32;
    if (q_pe.has_value()) q_pe32 = q_pe->to(at::kFloat);
    p = check_decode(q_nope32, q_pe32, cache3d, block_table, cache_seqlens, softmax_scale, causal, scale);
    at::Tensor out32 = at::empty(out.sizes(), out.options().dtype(at::kFloat));
    p.out = out32.data_ptr();
    p.lse = lse.data_ptr<float>();
    if (p.batch == 0) return;
    cpu::decode(p);
    out.copy_(out32);
    return;
  }
  p.out = out.data_ptr();
  if (p.batch == 0) return;
  cpu::decode(p);
}

std::tuple<at::Tensor, at::Tensor> decode_cpu(const at::Tensor& q_nope, const std::optional<at::Tensor>& q_pe,
                                              const at::Tensor& cache, const at::Tensor& block_table,
                                              const at::Tensor& cache_seqlens, double softmax_scale, bool causal,
                                              const std::optional<at::Tensor>& scale) {
  const int64_t b = q_nope.dim() == 4 ? q_nope.size(0) : 0;
  TORCH_CHECK_VALUE(q_nope.dim() == 4, "mla_ext.decode: q_nope must be [b, s_q, h, 512] or [b, s_q, h, 576], got ",
                    q_nope.sizes());
  at::Tensor out = at::empty({b, q_nope.size(1), q_nope.size(2), kLatentDim}, q_nope.options());
  at::Tensor lse = at::empty({b, q_nope.size(1), q_nope.size(2)}, q_nope.options().dtype(at::kFloat));
  decode_out_cpu(q_nope, q_pe, cache, block_table, cache_seqlens, softmax_scale, causal, scale, out, lse);
  return {out, lse};
}

}  // namespace
}  // namespace mla::api

TORCH_LIBRARY_IMPL(mla_ext, CPU, m) {
  m.impl("append_kv", &mla::api::append_kv_cpu);
  m.impl("decode", &mla::api::decode_cpu);
  m.impl("decode_out", &mla::api::decode_out_cpu);
}
