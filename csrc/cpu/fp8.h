// float8_e4m3fn (the "fn" variant: no infinities, one NaN per sign, max 448) on the CPU.
// Used by the fp8 latent cache: append stores round_to_nearest_even(x / scale) saturated
// to +-448, decode multiplies the stored value by scale on load.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>

namespace mla::cpu {

constexpr float kFp8E4M3Max = 448.f;

// Round-to-nearest-even, saturating: out-of-range values and +-inf become +-448,
// NaN stays NaN (0x7f with the sign).
inline uint8_t float_to_e4m3_saturate(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  const uint8_t sign = static_cast<uint8_t>((bits >> 24) & 0x80);
  const float a = std::fabs(x);
  if (std::isnan(a)) return sign | 0x7f;
  if (a >= kFp8E4M3Max) return sign | 0x7e;
  if (a < 0.015625f) {  // below the smallest normal 2^-6: subnormal steps of 2^-9
    // nearbyint rounds half to even; a code of 8 is exactly the smallest normal (0x08).
    return sign | static_cast<uint8_t>(std::nearbyint(a * 512.f));
  }
  std::memcpy(&bits, &a, sizeof bits);
  bits += 0x7ffff + ((bits >> 20) & 1);  // round the 23-bit mantissa to 3 bits, ties to even
  const uint32_t exponent = (bits >> 23) - 127 + 7;
  const uint32_t mantissa = (bits >> 20) & 7;
  return sign | static_cast<uint8_t>((exponent << 3) | mantissa);
}

// All 256 e4m3fn codes as floats (index = the stored byte).
struct Fp8E4M3Table {
  float value[256];
  Fp8E4M3Table() {
    for (int code = 0; code < 256; ++code) {
      const int exponent = (code >> 3) & 15, mantissa = code & 7;
      float v;
      if (exponent == 15 && mantissa == 7) v = NAN;
      else if (exponent == 0) v = std::ldexp(static_cast<float>(mantissa), -9);
      else v = std::ldexp(1.f + mantissa / 8.f, exponent - 7);
      value[code] = (code & 0x80) ? -v : v;
    }
  }
};

inline const Fp8E4M3Table& fp8_e4m3_table() {
  static const Fp8E4M3Table table;
  return table;
}

}  // namespace mla::cpu
