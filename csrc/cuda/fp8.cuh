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
// Byte permute (PRMT): result byte n = byte (sel >> 4n) & 7 of the 8-byte value {y, x}.
MLA_HOST_DEVICE uint32_t byte_perm(uint32_t x, uint32_t y, uint32_t sel) {
#if defined(__CUDA_ARCH__)
  return __byte_perm(x, y, sel);
#else
  const uint64_t v = (static_cast<uint64_t>(y) << 32) | x;
  uint32_t r = 0;
  for (int n = 0; n < 4; ++n) r |= static_cast<uint32_t>((v >> (8 * ((sel >> (4 * n)) & 7))) & 0xffu) << (8 * n);
  return r;
#endif
}

template <int kShift>
MLA_HOST_DEVICE void e4m3x4_to_scaled_bits(uint32_t w, uint32_t& lo, uint32_t& hi) {
  const uint32_t mag = w & 0x7f7f7f7fu, sgn = w & 0x80808080u;
  // Magnitudes spread into the low bytes of the 16-bit lanes ([0 m1 0 m0], [0 m3 0 m2]),
  // sign bytes into the high bytes ([s1 0 s0 0]: the sign lands on bit 15), then one
  // shift-add (LEA) per pair: 2 PRMT + 1 LEA per two values.
  lo = (byte_perm(mag, 0u, 0x4140u) << kShift) + byte_perm(sgn, 0u, 0x1404u);
  hi = (byte_perm(mag, 0u, 0x4342u) << kShift) + byte_perm(sgn, 0u, 0x3424u);
}

// Nonzero iff some byte of w is an e4m3 NaN (0x7f or 0xff): low 7 bits + 1 carries into
// bit 7 of that byte only (never into the next byte).
MLA_HOST_DEVICE uint32_t e4m3x4_nan_mask(uint32_t w) { return ((w & 0x7f7f7f7fu) + 0x01010101u) & 0x80808080u; }

// The 16-bit NaN pattern of each lane whose source byte (lane 0 <- byte k0, lane 1 <- byte k1)
// is an e4m3 NaN, else the input lane. Rare path.
MLA_HOST_DEVICE uint32_t e4m3_patch_nan(uint32_t pair, uint32_t w, int k0, int k1, uint32_t nan16) {
  if ((((w >> (8 * k0)) & 0x7fu) == 0x7fu)) pair = (pair & 0xffff0000u) | nan16;
  if ((((w >> (8 * k1)) & 0x7fu) == 0x7fu)) pair = (pair & 0x0000ffffu) | (nan16 << 16);
  return pair;
}

#if defined(__CUDACC__) || defined(MLA_CUDA_EMULATION)
// IEEE division rounded to nearest even, whatever --use_fast_math / -ftz say (the CPU
// append divides in plain fp32; x / scale must match it bit for bit).
__device__ __forceinline__ float div_rn(float a, float b) {
#if defined(MLA_CUDA_EMULATION)
  return a / b;  // host fp32 division is IEEE round-to-nearest-even
#else
  float d;
  asm("div.rn.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
  return d;
#endif
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
#if defined(MLA_CUDA_EMULATION)
  const __half2 r = __hmul2(*reinterpret_cast<const __half2*>(&a), *reinterpret_cast<const __half2*>(&b));
  return *reinterpret_cast<const uint32_t*>(&r);
#else
  uint32_t d;
  asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  return d;
#endif
}

template <>
__device__ __forceinline__ uint32_t mul2_exact<__nv_bfloat16>(uint32_t a, uint32_t b) {
#if defined(MLA_CUDA_EMULATION)
  const __nv_bfloat162 r =
      __hmul2(*reinterpret_cast<const __nv_bfloat162*>(&a), *reinterpret_cast<const __nv_bfloat162*>(&b));
  return *reinterpret_cast<const uint32_t*>(&r);
#else
  uint32_t d;
  asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(0x80008000u));  // + (-0): keeps -0
  return d;
#endif
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

// Four e4m3 bytes -> two packed T pairs holding the exact values; NaN codes are NOT
// patched here (see e4m3x8_to).
template <typename T>
__device__ __forceinline__ void e4m3x4_to_no_nan(uint32_t w, uint32_t& lo, uint32_t& hi) {
  using D = Fp8Dequant<T>;
  uint32_t a, b;
  e4m3x4_to_scaled_bits<D::kShift>(w, a, b);
  lo = mul2_exact<T>(a, D::kFactor);
  hi = mul2_exact<T>(b, D::kFactor);
}

// Eight e4m3 bytes (w.x = bytes 0..3) -> eight T values (v.x = values 0, 1, ...), exact,
// NaN codes -> NaN (one branch per 8 bytes, never taken for finite appended values).
template <typename T>
__device__ __forceinline__ void e4m3x8_to(const uint2 w, uint4& v) {
  e4m3x4_to_no_nan<T>(w.x, v.x, v.y);
  e4m3x4_to_no_nan<T>(w.y, v.z, v.w);
  if ((e4m3x4_nan_mask(w.x) | e4m3x4_nan_mask(w.y)) != 0u) {
    constexpr uint32_t nan16 = Fp8Dequant<T>::kNaN;
    v.x = e4m3_patch_nan(v.x, w.x, 0, 1, nan16);
    v.y = e4m3_patch_nan(v.y, w.x, 2, 3, nan16);
    v.z = e4m3_patch_nan(v.z, w.y, 0, 1, nan16);
    v.w = e4m3_patch_nan(v.w, w.y, 2, 3, nan16);
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
