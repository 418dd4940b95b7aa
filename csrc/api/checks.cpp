#include "checks.h"

#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>

namespace mla::api {
namespace {

std::atomic<bool> g_index_checks{[] {
  const char* env = std::getenv("MLA_EXT_INDEX_CHECKS");
  return !(env && std::strcmp(env, "0") == 0);
}()};

bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

void check_same_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& cache) {
  TORCH_CHECK_VALUE(t.device() == cache.device(), op, ": ", name, " is on ", t.device(), " but cache is on ",
                    cache.device(), "; all tensors must be on one device");
}

void check_index_dtype(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kInt, op, ": ", name, " must be an int32 tensor, got ", t.scalar_type());
}

// Replaces t by a contiguous copy when its innermost dim is strided (kernels read rows).
void make_rows_contiguous(at::Tensor& t) {
  if (t.numel() > 0 && t.stride(-1) != 1) t = t.contiguous();
}

void check_scale(const char* op, const at::Tensor& cache, const std::optional<at::Tensor>& scale) {
  const bool fp8 = cache.scalar_type() == at::kFloat8_e4m3fn;
  if (!fp8) {
    TORCH_CHECK_VALUE(!scale.has_value(), op, ": scale is only for a float8_e4m3fn cache; this cache is ",
                      cache.scalar_type());
    return;
  }
  TORCH_CHECK_VALUE(scale.has_value(), op, ": a float8_e4m3fn cache needs scale (a float32 tensor of 1 element)");
  TORCH_CHECK_TYPE(scale->scalar_type() == at::kFloat, op, ": scale must be float32, got ", scale->scalar_type());
  TORCH_CHECK_VALUE(scale->numel() == 1, op, ": scale must hold 1 element, got ", scale->numel());
  check_same_device(op, "scale", *scale, cache);
}

}  // namespace

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::kFloat32;
    case at::kHalf: return DType::kFloat16;
    case at::kBFloat16: return DType::kBFloat16;
    case at::kFloat8_e4m3fn: return DType::kFloat8E4M3;
    default: TORCH_CHECK_TYPE(false, "mla_ext: unsupported dtype ", t);
  }
}

at::Tensor cache_3d(const at::Tensor& cache, const char* op) {
  TORCH_CHECK_VALUE(cache.dim() == 3 || (cache.dim() == 4 && cache.size(2) == 1), op,
                    ": cache must be [num_blocks, block_size, 576] or [num_blocks, block_size, 1, 576], got ",
                    cache.sizes());
  TORCH_CHECK_VALUE(cache.size(-1) == kHeadDim, op, ": cache's last dim must be ", kHeadDim, " (512 latent + 64 rope), got ",
                    cache.size(-1));
  TORCH_CHECK_TYPE(is_float_dtype(cache.scalar_type()) || cache.scalar_type() == at::kFloat8_e4m3fn, op,
                   ": cache must be float32, float16, bfloat16 or float8_e4m3fn, got ", cache.scalar_type());
  at::Tensor c = cache.dim() == 4 ? cache.select(2, 0) : cache;
  TORCH_CHECK_VALUE(c.size(1) >= 1, op, ": cache's block_size must be >= 1");
  TORCH_CHECK_VALUE(c.numel() == 0 || c.stride(2) == 1, op, ": cache's last dim must be contiguous (stride 1)");
  return c;
}

AppendParams check_append(at::Tensor& kv_c, at::Tensor& k_pe, const at::Tensor& cache, at::Tensor& slot_mapping,
                          const std::optional<at::Tensor>& scale) {
  const char* op = "mla_ext.append_kv";
  TORCH_CHECK_VALUE(kv_c.dim() == 2 && kv_c.size(1) == kLatentDim, op, ": kv_c must be [T, ", kLatentDim, "], got ",
                    kv_c.sizes());
  TORCH_CHECK_VALUE(k_pe.dim() == 2 && k_pe.size(1) == kRopeDim, op, ": k_pe must be [T, ", kRopeDim, "], got ",
                    k_pe.sizes());
  TORCH_CHECK_VALUE(k_pe.size(0) == kv_c.size(0), op, ": kv_c has ", kv_c.size(0), " tokens but k_pe has ",
                    k_pe.size(0));
  TORCH_CHECK_TYPE(is_float_dtype(kv_c.scalar_type()), op, ": kv_c must be float32, float16 or bfloat16, got ",
                   kv_c.scalar_type());
  TORCH_CHECK_TYPE(k_pe.scalar_type() == kv_c.scalar_type(), op, ": k_pe dtype ", k_pe.scalar_type(),
                   " differs from kv_c dtype ", kv_c.scalar_type());
  if (cache.scalar_type() != at::kFloat8_e4m3fn)
    TORCH_CHECK_TYPE(kv_c.scalar_type() == cache.scalar_type(), op, ": kv_c dtype ", kv_c.scalar_type(),
                     " differs from cache dtype ", cache.scalar_type());
  TORCH_CHECK_TYPE(slot_mapping.scalar_type() == at::kLong || slot_mapping.scalar_type() == at::kInt, op,
                   ": slot_mapping must be int64 or int32, got ", slot_mapping.scalar_type());
  TORCH_CHECK_VALUE(slot_mapping.dim() == 1 && slot_mapping.size(0) == kv_c.size(0), op,
                    ": slot_mapping must be [T] with T = ", kv_c.size(0), ", got ", slot_mapping.sizes());
  check_same_device(op, "kv_c", kv_c, cache);
  check_same_device(op, "k_pe", k_pe, cache);
  check_same_device(op, "slot_mapping", slot_mapping, cache);
  check_scale(op, cache, scale);
  make_rows_contiguous(kv_c);
  make_rows_contiguous(k_pe);
  slot_mapping = slot_mapping.contiguous();

  AppendParams p{};
  p.kv_c = kv_c.data_ptr();
  p.k_pe = k_pe.data_ptr();
  p.cache = cache.data_ptr();
  p.slot_mapping = slot_mapping.data_ptr();
  p.scale = scale.has_value() ? scale->data_ptr<float>() : nullptr;
  p.kv_c_row_stride = kv_c.stride(0);
  p.k_pe_row_stride = k_pe.stride(0);
  p.cache_block_stride = cache.stride(0);
  p.cache_token_stride = cache.stride(1);
  p.num_tokens = kv_c.size(0);
  p.num_blocks = cache.size(0);
  p.block_size = static_cast<int32_t>(cache.size(1));
  p.slot_is_int64 = slot_mapping.scalar_type() == at::kLong;
  p.input_dtype = to_dtype(kv_c.scalar_type());
  p.cache_dtype = to_dtype(cache.scalar_type());
  return p;
}

DecodeParams check_decode(at::Tensor& q_nope, std::optional<at::Tensor>& q_pe, const at::Tensor& cache,
                          const at::Tensor& block_table, const at::Tensor& cache_seqlens, double softmax_scale,
                          bool causal, const std::optional<at::Tensor>& scale) {
  const char* op = "mla_ext.decode";
  TORCH_CHECK_VALUE(q_nope.dim() == 4, op, ": q_nope must be [b, s_q, h, 512] (or packed [b, s_q, h, 576]), got ",
                    q_nope.sizes());
  TORCH_CHECK_TYPE(is_float_dtype(q_nope.scalar_type()), op, ": q must be float32, float16 or bfloat16, got ",
                   q_nope.scalar_type());
  const int64_t b = q_nope.size(0), s_q = q_nope.size(1), h = q_nope.size(2);
  TORCH_CHECK_VALUE(s_q >= 1 && h >= 1, op, ": q_nope needs s_q >= 1 and h >= 1, got ", q_nope.sizes());
  if (q_pe.has_value()) {
    TORCH_CHECK_VALUE(q_nope.size(3) == kLatentDim, op, ": with q_pe given, q_nope's last dim must be ", kLatentDim,
                      ", got ", q_nope.size(3));
    TORCH_CHECK_VALUE(q_pe->dim() == 4 && q_pe->size(3) == kRopeDim, op, ": q_pe must be [b, s_q, h, ", kRopeDim,
                      "], got ", q_pe->sizes());
    TORCH_CHECK_VALUE(q_pe->size(0) == b && q_pe->size(1) == s_q && q_pe->size(2) == h, op,
                      ": q_pe's [b, s_q, h] = ", q_pe->sizes().slice(0, 3), " differs from q_nope's ",
                      q_nope.sizes().slice(0, 3));
    TORCH_CHECK_TYPE(q_pe->scalar_type() == q_nope.scalar_type(), op, ": q_pe dtype ", q_pe->scalar_type(),
                     " differs from q_nope dtype ", q_nope.scalar_type());
    check_same_device(op, "q_pe", *q_pe, cache);
  } else {
    TORCH_CHECK_VALUE(q_nope.size(3) == kHeadDim, op, ": without q_pe, q_nope must be the packed query [b, s_q, h, ",
                      kHeadDim, "], got ", q_nope.sizes());
  }
  check_same_device(op, "q_nope", q_nope, cache);
  if (cache.scalar_type() != at::kFloat8_e4m3fn)
    TORCH_CHECK_TYPE(q_nope.scalar_type() == cache.scalar_type(), op, ": q dtype ", q_nope.scalar_type(),
                     " differs from cache dtype ", cache.scalar_type());
  check_index_dtype(op, "block_table", block_table);
  check_index_dtype(op, "cache_seqlens", cache_seqlens);
  TORCH_CHECK_VALUE(block_table.dim() == 2 && block_table.size(0) == b, op, ": block_table must be [b, max_blocks] with b = ",
                    b, ", got ", block_table.sizes());
  TORCH_CHECK_VALUE(cache_seqlens.dim() == 1 && cache_seqlens.size(0) == b, op, ": cache_seqlens must be [b] with b = ",
                    b, ", got ", cache_seqlens.sizes());
  check_same_device(op, "block_table", block_table, cache);
  check_same_device(op, "cache_seqlens", cache_seqlens, cache);
  TORCH_CHECK_VALUE(std::isfinite(softmax_scale) && softmax_scale > 0, op, ": softmax_scale must be a finite number > 0, got ",
                    softmax_scale);
  check_scale(op, cache, scale);
  TORCH_CHECK_VALUE(cache.size(0) <= INT32_MAX, op, ": at most 2^31-1 cache blocks are supported");

  make_rows_contiguous(q_nope);
  if (q_pe.has_value()) make_rows_contiguous(*q_pe);
  TORCH_CHECK_VALUE(block_table.numel() == 0 || block_table.stride(1) == 1, op, ": block_table rows must be contiguous");
  TORCH_CHECK_VALUE(cache_seqlens.numel() <= 1 || cache_seqlens.stride(0) == 1, op, ": cache_seqlens must be contiguous");

  DecodeParams p{};
  p.q_nope = q_nope.data_ptr();
  p.q_nope_batch_stride = q_nope.stride(0);
  p.q_nope_seq_stride = q_nope.stride(1);
  p.q_nope_head_stride = q_nope.stride(2);
  if (q_pe.has_value()) {
    p.q_pe = q_pe->data_ptr();
    p.q_pe_batch_stride = q_pe->stride(0);
    p.q_pe_seq_stride = q_pe->stride(1);
    p.q_pe_head_stride = q_pe->stride(2);
  } else {  // packed query: the rope part is the last 64 values of each 576-wide row
    p.q_pe = static_cast<const char*>(q_nope.data_ptr()) + kLatentDim * q_nope.element_size();
    p.q_pe_batch_stride = p.q_nope_batch_stride;
    p.q_pe_seq_stride = p.q_nope_seq_stride;
    p.q_pe_head_stride = p.q_nope_head_stride;
  }
  p.cache = cache.data_ptr();
  p.cache_block_stride = cache.stride(0);
  p.cache_token_stride = cache.stride(1);
  p.block_table = block_table.data_ptr<int32_t>();
  p.block_table_batch_stride = block_table.stride(0);
  p.cache_seqlens = cache_seqlens.data_ptr<int32_t>();
  p.kv_scale = scale.has_value() ? scale->data_ptr<float>() : nullptr;
  p.batch = static_cast<int32_t>(b);
  p.seqlen_q = static_cast<int32_t>(s_q);
  p.num_heads = static_cast<int32_t>(h);
  p.num_blocks = static_cast<int32_t>(cache.size(0));
  p.block_size = static_cast<int32_t>(cache.size(1));
  p.max_blocks_per_seq = static_cast<int32_t>(block_table.size(1));
  p.softmax_scale = static_cast<float>(softmax_scale);
  p.causal = causal;
  p.q_dtype = to_dtype(q_nope.scalar_type());
  p.cache_dtype = to_dtype(cache.scalar_type());
  return p;
}

void check_decode_outputs(const at::Tensor& q_nope, const at::Tensor& out, const at::Tensor& lse) {
  const char* op = "mla_ext.decode";
  const auto bsh = q_nope.sizes().slice(0, 3);
  TORCH_CHECK_VALUE(out.dim() == 4 && out.sizes().slice(0, 3) == bsh && out.size(3) == kLatentDim, op,
                    ": out must be [b, s_q, h, 512] = [", bsh, ", 512], got ", out.sizes());
  TORCH_CHECK_TYPE(out.scalar_type() == q_nope.scalar_type(), op, ": out dtype ", out.scalar_type(),
                   " differs from q dtype ", q_nope.scalar_type());
  TORCH_CHECK_VALUE(out.device() == q_nope.device(), op, ": out is on ", out.device(), " but q is on ", q_nope.device());
  TORCH_CHECK_VALUE(out.is_contiguous(), op, ": out must be contiguous");
  TORCH_CHECK_VALUE(lse.dim() == 3 && lse.sizes() == bsh, op, ": lse must be [b, s_q, h] = ", bsh, ", got ", lse.sizes());
  TORCH_CHECK_TYPE(lse.scalar_type() == at::kFloat, op, ": lse must be float32, got ", lse.scalar_type());
  TORCH_CHECK_VALUE(lse.device() == q_nope.device(), op, ": lse is on ", lse.device(), " but q is on ", q_nope.device());
  TORCH_CHECK_VALUE(lse.is_contiguous(), op, ": lse must be contiguous");
}

void validate_slots(const at::Tensor& slot_mapping_cpu, int64_t num_slots) {
  const int64_t n = slot_mapping_cpu.numel();
  auto check = [&](auto* slots) {
    for (int64_t t = 0; t < n; ++t)
      TORCH_CHECK_INDEX(slots[t] < num_slots, "mla_ext.append_kv: slot_mapping[", t, "] = ", slots[t],
                        " is beyond the cache (num_blocks * block_size = ", num_slots, " slots)");
  };
  if (slot_mapping_cpu.scalar_type() == at::kLong) check(slot_mapping_cpu.data_ptr<int64_t>());
  else check(slot_mapping_cpu.data_ptr<int32_t>());
}

void validate_block_table(const at::Tensor& block_table_cpu, const at::Tensor& seqlens_cpu, int64_t num_blocks,
                          int64_t block_size) {
  const int64_t b = block_table_cpu.size(0), max_blocks = block_table_cpu.size(1);
  const int32_t* table = block_table_cpu.data_ptr<int32_t>();
  const int64_t row_stride = block_table_cpu.stride(0);
  const int32_t* seqlens = seqlens_cpu.data_ptr<int32_t>();
  for (int64_t i = 0; i < b; ++i) {
    const int64_t len = seqlens[i];
    TORCH_CHECK_VALUE(len >= 0, "mla_ext.decode: cache_seqlens[", i, "] = ", len, " is negative");
    TORCH_CHECK_VALUE(len <= max_blocks * block_size, "mla_ext.decode: cache_seqlens[", i, "] = ", len,
                      " exceeds block_table capacity ", max_blocks * block_size, " (", max_blocks,
                      " blocks x block_size ", block_size, ")");
    const int64_t used = (len + block_size - 1) / block_size;
    for (int64_t j = 0; j < used; ++j) {
      const int32_t block = table[i * row_stride + j];
      TORCH_CHECK_INDEX(block >= 0 && block < num_blocks, "mla_ext.decode: block_table[", i, ", ", j, "] = ", block,
                        " is outside [0, num_blocks = ", num_blocks, ") and sequence ", i, " (length ", len,
                        ") uses that block");
    }
  }
}

void validate_scale_value(const at::Tensor& scale_cpu, const char* op) {
  const float s = scale_cpu.data_ptr<float>()[0];
  TORCH_CHECK_VALUE(std::isfinite(s) && s > 0, op, ": scale must be finite and > 0, got ", s);
}

bool index_checks_enabled() { return g_index_checks.load(); }

bool set_index_checks(bool enabled) { return g_index_checks.exchange(enabled); }

}  // namespace mla::api
