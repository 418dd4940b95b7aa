// Host self-test of the integer fp8 helpers in csrc/cuda/fp8.cuh (compiled as plain C++):
//   1. e4m3_from_float_bits (the CUDA append's rounding) against the CPU kernel's
//      float_to_e4m3_saturate (csrc/cpu/fp8.h) for every float bit pattern (or every
//      `stride`-th, plus all patterns near the e4m3 rounding boundaries);
//   2. e4m3x4_to_scaled_bits (the CUDA decode's dequantization) for all 256 codes, both
//      patterns (fp16 x 2^-8, bf16 x 2^-120), against the CPU table, and e4m3x4_nan_mask.
//
//   c++ -O2 -std=c++17 tests/native/fp8_selftest.cpp -o /tmp/fp8_selftest && /tmp/fp8_selftest [stride]
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "../../csrc/cpu/fp8.h"
#include "../../csrc/cuda/fp8.cuh"

static float from_bits(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

static float half_bits_to_float(uint32_t h) {  // exact fp16 -> float
  const int sign = (h >> 15) & 1, e = (h >> 10) & 31, m = h & 1023;
  float v = e == 0 ? std::ldexp(static_cast<float>(m), -24) : std::ldexp(1.f + m / 1024.f, e - 15);
  if (e == 31) v = m ? NAN : INFINITY;
  return sign ? -v : v;
}

static float bf16_bits_to_float(uint32_t h) {  // exact bf16 -> float (float keeps bf16 subnormals)
  return from_bits(h << 16);
}

int main(int argc, char** argv) {
  const uint64_t stride = argc > 1 ? std::strtoull(argv[1], nullptr, 10) : 1;
  uint64_t checked = 0, bad = 0;
  auto check = [&](uint32_t bits) {
    const uint8_t want = mla::cpu::float_to_e4m3_saturate(from_bits(bits));
    const uint32_t got = mla::cuda::e4m3_from_float_bits(bits);
    ++checked;
    if (got != want && bad++ < 10)
      std::printf("MISMATCH quantize bits=0x%08x (%g): cuda 0x%02x cpu 0x%02x\n", bits, from_bits(bits), got, want);
  };
  for (uint64_t b = 0; b <= 0xffffffffull; b += stride) check(static_cast<uint32_t>(b));
  // Every e4m3 value's neighbourhood (ties, just above / below) at full resolution.
  for (int code = 0; code < 128; ++code) {
    const float v = mla::cpu::fp8_e4m3_table().value[code];
    if (std::isnan(v)) continue;
    uint32_t vb;
    std::memcpy(&vb, &v, 4);
    for (uint32_t s = 0; s < 2; ++s)
      for (int64_t d = -(1 << 20) - 2; d <= (1 << 20) + 2; d += (d > -64 && d < 64) ? 1 : 4093) {
        const int64_t b = static_cast<int64_t>(vb) + d;
        if (b >= 0 && b <= 0x7fffffff) check(static_cast<uint32_t>(b) | (s << 31));
      }
  }
  std::printf("quantize: %llu patterns checked, %llu mismatches\n", (unsigned long long)checked, (unsigned long long)bad);

  uint64_t dbad = 0;
  for (uint32_t code = 0; code < 256; ++code) {
    const float want = mla::cpu::fp8_e4m3_table().value[code];
    const uint32_t w = code | (code << 8) | ((code ^ 0x80u) << 16) | (0x38u << 24);
    uint32_t f16lo, f16hi, bflo, bfhi;
    mla::cuda::e4m3x4_to_scaled_bits<7>(w, f16lo, f16hi);
    mla::cuda::e4m3x4_to_scaled_bits<4>(w, bflo, bfhi);
    const bool is_nan = std::isnan(want);
    const bool nan_flag = mla::cuda::e4m3x4_nan_mask(w) != 0;
    if (nan_flag != is_nan) { ++dbad; std::printf("nan mask wrong for 0x%02x\n", code); }
    if (is_nan) continue;
    const float lanes16[4] = {half_bits_to_float(f16lo & 0xffff), half_bits_to_float(f16lo >> 16),
                              half_bits_to_float(f16hi & 0xffff), half_bits_to_float(f16hi >> 16)};
    const float lanesbf[4] = {bf16_bits_to_float(bflo & 0xffff), bf16_bits_to_float(bflo >> 16),
                              bf16_bits_to_float(bfhi & 0xffff), bf16_bits_to_float(bfhi >> 16)};
    const float wants[4] = {want, want, -want, 1.0f};  // 0x38 = 1.0
    for (int l = 0; l < 4; ++l) {
      const float a = std::ldexp(lanes16[l], 8), b = std::ldexp(lanesbf[l], 120);
      if (a != wants[l] || b != wants[l] || std::signbit(a) != std::signbit(wants[l]) ||
          std::signbit(b) != std::signbit(wants[l])) {
        if (dbad++ < 10) std::printf("MISMATCH dequant code 0x%02x lane %d: f16 %g bf16 %g want %g\n", code, l, a, b, wants[l]);
      }
    }
  }
  std::printf("dequantize: 256 codes x 4 lanes, %llu mismatches\n", (unsigned long long)dbad);
  if (bad || dbad) { std::printf("FAIL\n"); return 1; }
  std::printf("PASS\n");
  return 0;
}
