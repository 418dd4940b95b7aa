// float8_e4m3fn helpers for the CUDA kernels (the "fn" variant: no infinities, NaN = 0x7f
// with either sign, max 448). No torch headers, no cuda_fp8.h intrinsics: every helper is
// integer arithmetic plus one exact multiply, so the result is the same on every arch
// (sm_80 has no hardware fp8 conversion) and the integer parts also compile for the host,
// where benchmarks/fp8_selftest.cpp checks them against csrc/cpu/fp8.h exhaustively.
#pragma once
#include <cstdint>

#include "../mla_params.h"

namespace mla::cuda {

// ---------------------------------------------------------------------------------------
// Quantize (append): float -> e4m3, round to nearest even, saturating to +-448; +-inf
// saturate too; NaN -> 0x7f | sign. Bit-identical to mla::cpu::float_to_e4m3_saturate
// (csrc/cpu/fp8.h). Pure integer arithmetic on the float's bits, so fast-math / ftz
// compiler flags cannot change it.
MLA_HOST_DEVICE uint32_t e4m3_from_float_bits(uint32_t bits) {
  const uint32_t sign = (bits >> 24) & 0x80u;
  uint32_t a = bits & 0x7fffffffu;
  if (a > 0x7f800000u) return sign | 0x7fu;   // NaN
  if (a >= 0x43e00000u) return sign | 0x7eu;  // >= 448 (and inf): saturate
  if (a < 0x3c800000u) {                      // < 2^-6: e4m3 subnormal, code = RNE(a * 2^9)
    const uint32_t e = a >> 23;               // biased fp32 exponent; a = m * 2^(e - 150)
    if (e < 110) return sign;                 // a < 2^-17: rounds to 0 (also fp32 subnormals)
    const uint32_t m = (a & 0x7fffffu) | 0x800000u;
    const uint32_t s = 141 - e;               // a * 2^9 = m / 2^s, s in [21, 31]
    const uint32_t q = m >> s, rem = m & ((1u << s) - 1u), half = 1u << (s - 1);
    return sign | (q + ((rem > half || (rem == half && (q & 1u))) ? 1u : 0u));  // 8 = 2^-6, the smallest normal
  }
  a += 0x7ffffu + ((a >> 20) & 1u);  // round the 23-bit mantissa to 3 bits, ties to even
  return sign | ((((a >> 23) - 120u) << 3) | ((a >> 20) & 7u));
}

// ---------------------------------------------------------------------------------------
// Dequantize (decode): four e4m3 bytes -> four 16-bit patterns (two per 32-bit word, byte 0
// in the low half of `lo`, byte 1 in its high half, bytes 2 / 3 in `hi`) that hold the
// e4m3 value times a power of two, exactly:
//   kShift = 7: fp16 bits  sign<<15 | code<<7  = x * 2^-8   (e4m3 subnormals -> fp16 subnormals)
//   kShift = 4: bf16 bits  sign<<15 | code<<4  = x * 2^-120 (e4m3 subnormals -> bf16 subnormals)
// (the 4-bit e4m3 exponent lands in the low bits of the wider exponent field, so the rebias
// is the constant factor). One exact multiply by 2^8 / 2^120 (dequant_scale_bits) then gives
// x itself, a normal fp16 / bf16 number. NaN codes (0x7f, 0xff) map to finite patterns here;
// e4m3x4_nan_mask finds them (the caller patches them, off the fast path).
template <int kShift>
MLA_HOST_DEVICE void e4m3x4_to_scaled_bits(uint32_t w, uint32_t& lo, uint32_t& hi) {
  // Spread the bytes into 16-bit lanes: [0 b1 0 b0] and [0 b3 0 b2] (PRMT on the device).
  const uint32_t u_lo = (w & 0xffu) | ((w & 0xff00u) << 8);
  const uint32_t u_hi = ((w >> 16) & 0xffu) | ((w >> 8) & 0xff0000u);
  // code << kShift moves the sign bit to bit 7 + kShift; adding sign * (2^8 - 2^kShift)
  // carries it on to bit 15 without touching the other lane.
  lo = (u_lo << kShift) + (u_lo & 0x00800080u) * ((1u << 8) - (1u << kShift));
  hi = (u_hi << kShift) + (u_hi & 0x00800080u) * ((1u << 8) - (1u << kShift));
}

// Nonzero iff some byte of w is an e4m3 NaN (0x7f or 0xff).
MLA_HOST_DEVICE uint32_t e4m3x4_nan_mask(uint32_t w) {
  const uint32_t v = ~(w | 0x80808080u);  // a byte is 0 exactly where its low 7 bits are all ones
  return (v - 0x01010101u) & ~v & 0x80808080u;
}

// The 16-bit NaN pattern of each lane whose source byte (lane 0 <- byte k0, lane 1 <- byte k1)
// is an e4m3 NaN, else the input lane. Rare path.
MLA_HOST_DEVICE uint32_t e4m3_patch_nan(uint32_t pair, uint32_t w, int k0, int k1, uint32_t nan16) {
  if ((((w >> (8 * k0)) & 0x7fu) == 0x7fu)) pair = (pair & 0xffff0000u) | nan16;
  if ((((w >> (8 * k1)) & 0x7fu) == 0x7fu)) pair = (pair & 0x0000ffffu) | (nan16 << 16);
  return pair;
}

#if defined(__CUDACC__)
// IEEE division rounded to nearest even, whatever --use_fast_math / -ftz say (the CPU
// append divides in plain fp32; x / scale must match it bit for bit).
__device__ __forceinline__ float div_rn(float a, float b) {
  float d;
  asm("div.rn.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
  return d;
}

__device__ __forceinline__ uint8_t e4m3_quantize(float x, float scale) {
  return static_cast<uint8_t>(e4m3_from_float_bits(__float_as_uint(div_rn(x, scale))));
}

// Exact multiply of two packed 16-bit pairs, subnormal inputs honoured (no .ftz exists for
// bf16; the f16 form is written without .ftz). Inline asm, so -ftz cannot change it.
template <typename T>
__device__ __forceinline__ uint32_t mul2_exact(uint32_t a, uint32_t b);

template <>
__device__ __forceinline__ uint32_t mul2_exact<__half>(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  return d;
}

template <>
__device__ __forceinline__ uint32_t mul2_exact<__nv_bfloat16>(uint32_t a, uint32_t b) {
  uint32_t d;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(0x80008000u));  // + (-0): keeps -0
  return d;
}

// Per element type: the pattern shift, the exact factor that undoes it and the NaN pattern.
template <typename T>
struct Fp8Dequant;

template <>
struct Fp8Dequant<__half> {
  static constexpr int kShift = 7;
  static constexpr uint32_t kFactor = 0x5c005c00u;  // fp16 256.0 in both lanes
  static constexpr uint32_t kNaN = 0x7e00u;
};

template <>
struct Fp8Dequant<__nv_bfloat16> {
  static constexpr int kShift = 4;
  static constexpr uint32_t kFactor = 0x7b807b80u;  // bf16 2^120 in both lanes
  static constexpr uint32_t kNaN = 0x7fc0u;
};

// Four e4m3 bytes -> two packed T pairs holding the exact values (NaN codes -> NaN).
template <typename T>
__device__ __forceinline__ void e4m3x4_to(uint32_t w, uint32_t& lo, uint32_t& hi) {
  using D = Fp8Dequant<T>;
  uint32_t a, b;
  e4m3x4_to_scaled_bits<D::kShift>(w, a, b);
  lo = mul2_exact<T>(a, D::kFactor);
  hi = mul2_exact<T>(b, D::kFactor);
  if (e4m3x4_nan_mask(w) != 0u) {  // never taken for values written by append_kv from finite input
    lo = e4m3_patch_nan(lo, w, 0, 1, D::kNaN);
    hi = e4m3_patch_nan(hi, w, 2, 3, D::kNaN);
  }
}

// One e4m3 byte -> float, exactly (CUDA-core kernel). Through the fp16 pattern: x = h * 256.
__device__ __forceinline__ float e4m3_to_float(uint8_t code) {
  if ((code & 0x7fu) == 0x7fu) return __int_as_float(0x7fc00000);
  uint32_t a, b;
  e4m3x4_to_scaled_bits<7>(code, a, b);
  const uint32_t h = mul2_exact<__half>(a, 0x5c005c00u) & 0xffffu;
  __half_raw raw;
  raw.x = static_cast<unsigned short>(h);
  return __half2float(__half(raw));  // h is a normal fp16 (|x| >= 2^-9 > 2^-14) or zero: no ftz issue
}
#endif

}  // namespace mla::cuda
