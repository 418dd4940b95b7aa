// Interface between the CPU decode driver (decode.cpp: planning, threads, merge) and the
// per-instruction-set kernels (decode_scalar.cpp, decode_avx2.cpp, decode_avx512.cpp).
//
// Torch-free on purpose: the instruction-set files compile their code under
// `#pragma GCC target(...)` and must not instantiate any torch / std inline function
// there (the linker could keep that AVX copy for the whole library, and a CPU without
// AVX would then hit an illegal instruction in unrelated code).
#pragma once
#include <cstddef>
#include <cstdint>

#include "../mla_params.h"

namespace mla::cpu {

constexpr int kKeyTile = 16;           // keys per tile: one score GEMM + one PV GEMM
constexpr int kScoreStride = kKeyTile + 4;  // padded row stride of the score / probability tiles

// fp8 tiles hold (stored e4m3 value) / kFp8TileScale, exactly: every such value is a
// normal bf16 (and the e4m3 bits shifted into an fp16 give it too), so the widening is
// integer work. The factor is folded back with the cache scale (q and the merge).
constexpr float kFp8TileScale = 256.f;

// One unit of parallel work: query rows [row_begin, row_end) of sequence `seq` (row
// r = j * h + head over the s_q * h rows), against keys [key_begin, key_end).
struct DecodeItem {
  int32_t seq;
  int32_t row_begin, row_end;
  int32_t key_begin, key_end;
};

// An item's unnormalised partial result, in the log2 domain:
//   acc[r] = sum_t 2^(s2[r,t] - max[r]) * V[t]   (512 floats per row)
//   sum[r] = sum_t 2^(s2[r,t] - max[r])
// with s2 = softmax_scale * log2(e) * (q . k). max = -inf when the row saw no key.
struct PartialOut {
  float* acc;
  float* max;
  float* sum;
};

// One instruction set's kernel. run_item processes one item with `scratch` (at least
// scratch_bytes(rows) bytes, 64-byte aligned, reused across items of one thread).
struct DecodeIsa {
  const char* (*name)(DType dtype);  // the kernel that runs for this cache dtype
  bool (*supports)(DType dtype);
  size_t (*scratch_bytes)(int32_t max_rows);
  void (*run_item)(const DecodeParams& p, const DecodeItem& item, PartialOut out, void* scratch);
};

// Each returns nullptr when the library was built without that kernel. Whether the
// running CPU can execute it is decided in decode.cpp (cpu_features.h).
const DecodeIsa* decode_isa_scalar();
const DecodeIsa* decode_isa_avx2();
const DecodeIsa* decode_isa_avx512bf16();
const DecodeIsa* decode_isa_amx();  // AMX tiles: bf16 and fp8 caches (decode_amx.cpp)

}  // namespace mla::cpu
