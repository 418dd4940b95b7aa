// Op schemas: one op name per operation; CPU and CUDA kernels register behind the
// dispatch keys (cpu_ops.cpp, cuda_ops.cpp). Python-side fake kernels live in
// mla_ext/_ops.py so torch.compile can trace the ops.
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "../cpu/cpu_kernels.h"
#include "checks.h"

extern "C" {
// `import mla_ext._C` loads this library, which runs the registrations below. The
// module itself is empty: everything is reached through torch.ops.mla_ext.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace {
bool set_index_checks(bool enabled) { return mla::api::set_index_checks(enabled); }
std::string cpu_decode_kernel(c10::ScalarType cache_dtype) {
  return mla::cpu::decode_kernel_name(mla::api::to_dtype(cache_dtype));
}
}  // namespace

TORCH_LIBRARY(mla_ext, m) {
  m.def(
      "append_kv(Tensor kv_c, Tensor k_pe, Tensor(a!) cache, Tensor slot_mapping, Tensor? scale=None) -> ()");
  m.def(
      "decode(Tensor q_nope, Tensor? q_pe, Tensor cache, Tensor block_table, Tensor cache_seqlens, "
      "float softmax_scale, bool causal=True, Tensor? scale=None) -> (Tensor out, Tensor lse)");
  m.def(
      "decode_out(Tensor q_nope, Tensor? q_pe, Tensor cache, Tensor block_table, Tensor cache_seqlens, "
      "float softmax_scale, bool causal, Tensor? scale, Tensor(a!) out, Tensor(b!) lse) -> ()");
  // Host-side switch for the index-value checks (see docs/api.md); returns the old value.
  m.def("set_index_checks(bool enabled) -> bool", &set_index_checks);
  // Which CPU decode kernel runs for a cache dtype on this machine (reads MLA_EXT_CPU_ISA).
  m.def("cpu_decode_kernel(ScalarType cache_dtype) -> str", &cpu_decode_kernel);
}
