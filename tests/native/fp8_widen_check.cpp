// Every e4m3fn code through the fp8 -> bf16 tile widening of the avx2-bf16 CPU kernel
// (avx2_bf16::fp8x16_to_bf16, integer ops + a vpshufb table for the subnormals) against the
// library's decoding table (fp8.h: fp8_e4m3_table, built with ldexp): the widening must give
// the bf16 bits of value / 256 exactly (that value has at most 4 significant bits), and NaN
// for the NaN codes. Needs an AVX2 + F16C CPU.
//   g++ -O2 -std=c++17 -mavx2 -mfma -mf16c -Icsrc/cpu -Icsrc tests/native/fp8_widen_check.cpp
#include <immintrin.h>

#include <cstdint>
#include <cstdio>
#include <cstring>

#include "decode_impl.h"
#include "fp8.h"

namespace mla::cpu {
namespace {
#include "decode_tile_loop.h"
#include "avx2_kernels.h"
#include "avx2_bf16_kernels.h"
}  // namespace
}  // namespace mla::cpu

using namespace mla::cpu;

int main() {
  alignas(32) uint8_t codes[256];
  for (int i = 0; i < 256; ++i) codes[i] = static_cast<uint8_t>(i);
  int bad = 0;
  for (int b = 0; b < 256; b += 16) {
    alignas(32) uint16_t got[16];
    _mm256_store_si256(reinterpret_cast<__m256i*>(got), avx2_bf16::fp8x16_to_bf16(codes + b));
    for (int i = 0; i < 16; ++i) {
      const float want = mla::cpu::fp8_e4m3_table().value[b + i] / 256.f;
      uint32_t bits;
      std::memcpy(&bits, &want, 4);
      const bool want_nan = want != want;
      const bool got_nan = (got[i] & 0x7f80) == 0x7f80 && (got[i] & 0x7f) != 0;
      const bool ok = want_nan ? got_nan : (bits & 0xffff) == 0 && got[i] == static_cast<uint16_t>(bits >> 16);
      if (!ok && bad++ < 10) std::printf("code 0x%02x: got 0x%04x, want 0x%04x\n", b + i, got[i], bits >> 16);
    }
  }
  std::printf("%s: %d of 256 codes differ\n", bad ? "FAIL" : "PASS", bad);
  return bad ? 1 : 0;
}
