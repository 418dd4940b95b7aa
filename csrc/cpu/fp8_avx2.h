// AVX2 fp8 quantisation of cache rows (see fp8_avx2.cpp). Torch-free.
#pragma once
#include <cstdint>

#include "../mla_params.h"

namespace mla::cpu {

// Whether this build contains the AVX2 code (x86-64 GCC/Clang); the CPU check is separate.
bool quantize_fp8_avx2_available();

// dst[i] = e4m3(src[i] / scale), i < n, n a multiple of 32; src is fp32, fp16 or bf16.
void quantize_fp8_row_avx2(const void* src, DType dtype, int n, float scale, uint8_t* dst);

}  // namespace mla::cpu
