// CUDA implementations of the mla_ext ops: validate (the shared checks), pick the device
// and the current stream, allocate outputs and the split-KV workspace, call csrc/cuda.
//
// Index-value checks (slot_mapping, block_table, cache_seqlens) need the values on the
// host, i.e. a device->host copy that syncs the stream. They run only when enabled
// (mla_ext.set_index_checks, default on) AND the current stream is not capturing a CUDA
// graph; the kernels never dereference an out-of-range index either way.
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>

#include "../cuda/cuda_kernels.h"
#include "../cuda/sm90/decode_sm90.h"
#include "checks.h"

namespace mla::api {
namespace {

bool capturing() {
  return c10::cuda::currentStreamCaptureStatusMayInitCtx() != c10::cuda::CaptureStatus::None;
}

bool run_index_checks() { return index_checks_enabled() && !capturing(); }

// MLA_EXT_DECODE_IMPL=simple forces the CUDA-core decode kernel (debugging, comparisons);
// read on every call so tests can switch it.
// MLA_EXT_CUDA_SM90=1 opts into the Hopper kernel (csrc/cuda/sm90/decode_sm90.cuh) on sm_90
// devices when the build holds its sm_90a code (an explicit MLA_EXT_DECODE_IMPL wins); the
// planner falls back to the default kernels for the configs it does not support. Opt-in until
// benchmarks/device_check.sh has a GPU record of it.
cuda::DecodeImpl requested_impl(int device) {
  const char* env = std::getenv("MLA_EXT_DECODE_IMPL");
  if (env && std::strcmp(env, "simple") == 0) return cuda::DecodeImpl::kSimple;
  if (env && std::strcmp(env, "tc") == 0) return cuda::DecodeImpl::kTensorCore;
  const char* sm90 = std::getenv("MLA_EXT_CUDA_SM90");
  if (sm90 && std::strcmp(sm90, "1") == 0 && cuda::sm90::decode_sm90_available(device)) return cuda::DecodeImpl::kSm90;
  return cuda::DecodeImpl::kAuto;
}

void append_kv_cuda(at::Tensor kv_c, at::Tensor k_pe, at::Tensor cache, at::Tensor slot_mapping,
                    const std::optional<at::Tensor>& scale) {
  at::Tensor cache3d = cache_3d(cache, "mla_ext.append_kv");
  AppendParams p = check_append(kv_c, k_pe, cache3d, slot_mapping, scale);
  TORCH_CHECK_VALUE(cache3d.is_cuda(), "mla_ext.append_kv: cache must be a CUDA tensor here, got ", cache3d.device());
  const c10::cuda::CUDAGuard guard(cache3d.device());
  if (run_index_checks()) {
    validate_slots(slot_mapping.cpu(), p.num_blocks * p.block_size);
    // The scale's value needs a host copy too: checked with the indices (eager, checks on),
    // never under graph capture, where the kernel reads whatever the tensor holds at replay.
    if (scale.has_value()) validate_scale_value(scale->cpu(), "mla_ext.append_kv");
  }
  if (p.num_tokens == 0) return;
  C10_CUDA_CHECK(cuda::append_kv(p, at::cuda::getCurrentCUDAStream()));
}

// Validates everything except out / lse; returns the params and the 3-D cache view.
DecodeParams prepare_decode(at::Tensor& q_nope, std::optional<at::Tensor>& q_pe, const at::Tensor& cache,
                            const at::Tensor& block_table, const at::Tensor& cache_seqlens, double softmax_scale,
                            bool causal, const std::optional<at::Tensor>& scale, at::Tensor& cache3d) {
  cache3d = cache_3d(cache, "mla_ext.decode");
  DecodeParams p = check_decode(q_nope, q_pe, cache3d, block_table, cache_seqlens, softmax_scale, causal, scale);
  TORCH_CHECK_VALUE(cache3d.is_cuda(), "mla_ext.decode: cache must be a CUDA tensor here, got ", cache3d.device());
  TORCH_CHECK_VALUE(p.batch <= 65535, "mla_ext.decode: at most 65535 sequences per call on CUDA, got ", p.batch);
  return p;
}

// Index checks (maybe), workspace, launch. The device guard is already in place.
void run_decode(DecodeParams p, const at::Tensor& cache3d, const at::Tensor& q_nope, const at::Tensor& block_table,
                const at::Tensor& cache_seqlens, const std::optional<at::Tensor>& scale, at::Tensor& out,
                at::Tensor& lse) {
  if (run_index_checks()) {
    validate_block_table(block_table.cpu(), cache_seqlens.cpu(), p.num_blocks, p.block_size);
    if (scale.has_value()) validate_scale_value(scale->cpu(), "mla_ext.decode");
  }
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  if (p.batch == 0) return;
  const cuda::DecodePlan plan = cuda::plan_decode(p, cache3d.get_device(), requested_impl(cache3d.get_device()));
  at::Tensor o_accum, lse_accum;
  p.num_splits = plan.num_splits;
  if (plan.num_splits > 1) {
    const auto opts = q_nope.options().dtype(at::kFloat);
    o_accum = at::empty({plan.workspace_o}, opts);
    lse_accum = at::empty({plan.workspace_lse}, opts);
    p.o_accum = o_accum.data_ptr<float>();
    p.lse_accum = lse_accum.data_ptr<float>();
  }
  at::Tensor sched;  // the sm90 kernel's device-side schedule (sized from shapes and the SM count)
  if (plan.workspace_sched > 0) {
    sched = at::empty({plan.workspace_sched}, q_nope.options().dtype(at::kInt));
    p.sched = sched.data_ptr<int32_t>();
  }
  C10_CUDA_CHECK(cuda::decode(p, plan, at::cuda::getCurrentCUDAStream()));
}

void decode_out_cuda(at::Tensor q_nope, std::optional<at::Tensor> q_pe, const at::Tensor& cache,
                     const at::Tensor& block_table, const at::Tensor& cache_seqlens, double softmax_scale, bool causal,
                     const std::optional<at::Tensor>& scale, at::Tensor out, at::Tensor lse) {
  at::Tensor cache3d;
  DecodeParams p =
      prepare_decode(q_nope, q_pe, cache, block_table, cache_seqlens, softmax_scale, causal, scale, cache3d);
  check_decode_outputs(q_nope, out, lse);
  const c10::cuda::CUDAGuard guard(cache3d.device());
  run_decode(p, cache3d, q_nope, block_table, cache_seqlens, scale, out, lse);
}

std::tuple<at::Tensor, at::Tensor> decode_cuda(const at::Tensor& q_nope_in, const std::optional<at::Tensor>& q_pe_in,
                                               const at::Tensor& cache, const at::Tensor& block_table,
                                               const at::Tensor& cache_seqlens, double softmax_scale, bool causal,
                                               const std::optional<at::Tensor>& scale) {
  at::Tensor q_nope = q_nope_in;
  std::optional<at::Tensor> q_pe = q_pe_in;
  at::Tensor cache3d;
  DecodeParams p =
      prepare_decode(q_nope, q_pe, cache, block_table, cache_seqlens, softmax_scale, causal, scale, cache3d);
  const c10::cuda::CUDAGuard guard(cache3d.device());
  at::Tensor out = at::empty({q_nope.size(0), q_nope.size(1), q_nope.size(2), kLatentDim}, q_nope.options());
  at::Tensor lse = at::empty({q_nope.size(0), q_nope.size(1), q_nope.size(2)}, q_nope.options().dtype(at::kFloat));
  run_decode(p, cache3d, q_nope, block_table, cache_seqlens, scale, out, lse);
  return {out, lse};
}

}  // namespace
}  // namespace mla::api

TORCH_LIBRARY_IMPL(mla_ext, CUDA, m) {
  m.impl("append_kv", &mla::api::append_kv_cuda);
  m.impl("decode", &mla::api::decode_cuda);
  m.impl("decode_out", &mla::api::decode_out_cuda);
}
