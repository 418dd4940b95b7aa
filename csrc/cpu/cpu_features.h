// Run-time CPU feature detection (x86-64: cpuid + xgetbv), so one build runs everywhere:
// a kernel is used only when the CPU has its instructions AND the OS saves their registers.
#pragma once

namespace mla::cpu {

struct CpuFeatures {
  bool avx2_fma_f16c = false;   // AVX2 + FMA + F16C, with YMM state enabled by the OS
  bool avx512_bf16 = false;     // AVX-512 F/BW/VL/DQ + AVX512_BF16, with ZMM state enabled
  // avx512_bf16 + AVX512-VBMI (vpermi2b: the fp8 -> bf16 widening by table). Zen 4 / 5 and
  // every AMX CPU have it; Cooper Lake, the first with AVX512_BF16, does not.
  bool avx512_bf16_vbmi = false;
  // avx512_bf16 + AMX-TILE + AMX-BF16, the OS enables the tile state (XCR0 bits 17, 18)
  // and granted this process the tile data (Linux: arch_prctl(ARCH_REQ_XCOMP_PERM)).
  bool amx_bf16 = false;
};

// Detected once, then cached.
const CpuFeatures& cpu_features();

}  // namespace mla::cpu
