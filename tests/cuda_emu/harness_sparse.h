// The sparse decode op of the emulator harness (harness.cpp includes this file inside its
// anonymous namespace, after run_decode; it uses that file's Case, Buffer, allocate, die).
//
//   op sparse                                  mla::cuda::sparse_decode through plan_sparse_decode
//   ptr q / out / lse / attn_sink (optional)   SparseCudaParams pointers
//   ptr main_cache / main_indices / main_topk_length (optional), the same with extra_
//   int main_block_stride / main_token_stride (bytes) / main_topk / main_block_size / main_num_tokens
//   int batch / seqlen_q / num_heads / q_dtype / cache_dtype / has_extra,  float softmax_scale
// (harness.cpp includes sparse_kernels.h at the top, outside the anonymous namespace.)

mla::SparseCudaSource read_sparse_source(const Case& c, const std::string& prefix) {
  mla::SparseCudaSource s{};
  s.cache = static_cast<const uint8_t*>(c.ptr(prefix + "cache"));
  s.indices = static_cast<const int32_t*>(c.ptr(prefix + "indices", false));
  s.topk_length = static_cast<const int32_t*>(c.ptr(prefix + "topk_length", false));
  s.block_stride = c.i(prefix + "block_stride");
  s.token_stride = c.i(prefix + "token_stride");
  s.topk = static_cast<int32_t>(c.i(prefix + "topk"));
  s.block_size = static_cast<int32_t>(c.i(prefix + "block_size"));
  s.num_tokens = static_cast<int32_t>(c.i(prefix + "num_tokens"));
  return s;
}

std::string run_sparse(Case& c) {
  mla::SparseCudaParams p{};
  p.q = c.ptr("q");
  p.out = c.ptr("out");
  p.lse = static_cast<float*>(c.ptr("lse"));
  p.attn_sink = static_cast<const float*>(c.ptr("attn_sink", false));
  p.main = read_sparse_source(c, "main_");
  p.has_extra = c.i("has_extra") != 0;
  if (p.has_extra) p.extra = read_sparse_source(c, "extra_");
  INT_FIELD(batch);
  INT_FIELD(seqlen_q);
  INT_FIELD(num_heads);
  p.softmax_scale = static_cast<float>(c.f("softmax_scale"));
  p.q_dtype = dtype(c.i("q_dtype"));
  p.cache_dtype = dtype(c.i("cache_dtype"));

  using mla::cuda::SparseImpl;
  const SparseImpl requested = c.impl == "tc" ? SparseImpl::kTensorCore
                               : c.impl == "simple" ? SparseImpl::kSimple
                                                    : SparseImpl::kAuto;
  const mla::cuda::SparsePlan plan = mla::cuda::plan_sparse_decode(p, 0, requested);
  p.num_splits = plan.num_splits;
  if (plan.num_splits > 1) {  // the split workspace, as the torch glue allocates it (fp32, NaN-filled here)
    Buffer o{allocate(plan.workspace_o * sizeof(float)), static_cast<size_t>(plan.workspace_o) * sizeof(float)};
    Buffer l{allocate(plan.workspace_lse * sizeof(float)), static_cast<size_t>(plan.workspace_lse) * sizeof(float)};
    std::memset(o.data, 0xff, o.bytes);
    std::memset(l.data, 0xff, l.bytes);
    c.buffers["o_accum"] = o;
    c.buffers["lse_accum"] = l;
    p.o_accum = reinterpret_cast<float*>(o.data);
    p.lse_accum = reinterpret_cast<float*>(l.data);
    mla_emu::add_write_once_region(o.data, o.bytes, "o_accum");
    mla_emu::add_write_once_region(l.data, l.bytes, "lse_accum");
  }
  const cudaError_t err = mla::cuda::sparse_decode(p, plan, nullptr);
  if (err != cudaSuccess) die(std::string("sparse_decode returned ") + cudaGetErrorString(err));
  const char* impl = plan.impl == SparseImpl::kTensorCore ? "tc" : "simple";
  return std::string("{\"op\": \"sparse\", \"impl\": \"") + impl + "\", \"config\": " +
         std::to_string(plan.config) + ", \"num_splits\": " + std::to_string(plan.num_splits);
}
