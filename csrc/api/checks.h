// Argument checks shared by the CPU and CUDA glue. Every check names the argument and
// raises before anything is written (SPEC section 4). The functions turn validated
// tensors into the plain params structs the kernels take.
#pragma once
#include <ATen/ATen.h>

#include <optional>

#include "../mla_params.h"

namespace mla::api {

DType to_dtype(at::ScalarType t);

// Accepts [NB, BS, 576] or the FlashMLA view [NB, BS, 1, 576]; returns the 3-D view.
at::Tensor cache_3d(const at::Tensor& cache, const char* op);

// Checks everything that does not need the values of slot_mapping. kv_c / k_pe are
// replaced by contiguous copies when their last dim is strided, and slot_mapping when it
// is strided (kernels and validate_slots index it densely); all are inputs only.
AppendParams check_append(at::Tensor& kv_c, at::Tensor& k_pe, const at::Tensor& cache3d, at::Tensor& slot_mapping,
                          const std::optional<at::Tensor>& scale);

// Checks shapes, dtypes and devices of a decode call; q_pe may be empty (packed q).
// Fills every field of DecodeParams except out / lse.
DecodeParams check_decode(at::Tensor& q_nope, std::optional<at::Tensor>& q_pe, const at::Tensor& cache3d,
                          const at::Tensor& block_table, const at::Tensor& cache_seqlens, double softmax_scale,
                          bool causal, const std::optional<at::Tensor>& scale);

// Checks a caller-provided out / lse pair against the query; used by decode_out.
void check_decode_outputs(const at::Tensor& q_nope, const at::Tensor& out, const at::Tensor& lse);

// Value checks on host (CPU) copies of the index tensors.
void validate_slots(const at::Tensor& slot_mapping_cpu, int64_t num_slots);
void validate_block_table(const at::Tensor& block_table_cpu, const at::Tensor& seqlens_cpu, int64_t num_blocks,
                          int64_t block_size);
void validate_scale_value(const at::Tensor& scale_cpu, const char* op);

// Whether the glue validates index values (on CUDA this costs a host sync, so it is
// skipped under graph capture and may be switched off; kernels never dereference an
// out-of-range index either way).
bool index_checks_enabled();
bool set_index_checks(bool enabled);  // returns the previous setting

}  // namespace mla::api
