// Quantiser of the 656-byte fp8 sparse cache (DeepSeek-V3.2, FlashMLA's "V3.2 fp8 sparse"
// layout; mla_ext/sparse.py documents it and holds the torch twin, quantize_tokens). Per
// token, per tile of 128 latent values:
//   scale = the smallest power of two >= max(amax / 448, 1e-4)   (fp32: amax / 448 rounded
//           once, as torch divides; then the exact power-of-two ceiling of that value)
//   code  = e4m3fn(x / scale)  (exact division by a power of two, then torch's own fp32 ->
//           e4m3fn rounding, c10::Float8_e4m3fn: nearest even, NaN at and above 480)
// and the 64 rope values as bf16 (c10::BFloat16: nearest even). A NaN in a tile makes its
// scale and codes NaN, as in torch. Parallel over tokens; scalar code (an append writes a
// handful of tokens per decode step).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Float8_e4m3fn.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstring>

#include "sparse_kernels.h"

namespace mla::cpu {
namespace {

constexpr int kQuantTile = 128;
constexpr int kNumTiles = kLatentDim / kQuantTile;
constexpr int kScaleOffset = kLatentDim;        // bytes
constexpr int kRopeOffset = kLatentDim + 16;    // bytes

// The smallest power of two >= r, for r >= 1e-4 (finite); NaN and inf pass through.
inline float pow2_ceil(float r) {
  if (!std::isfinite(r)) return r;
  int e = 0;
  const float m = std::frexp(r, &e);  // r = m * 2^e, m in [0.5, 1)
  return std::ldexp(1.f, m == 0.5f ? e - 1 : e);
}

template <typename T>
void quantize_token(const T* kv_c, const T* k_pe, uint8_t* tok) {
  float scales[kNumTiles];
  for (int t = 0; t < kNumTiles; ++t) {
    const T* x = kv_c + t * kQuantTile;
    float amax = 0.f;
    bool nan = false;
    for (int i = 0; i < kQuantTile; ++i) {
      const float a = std::fabs(static_cast<float>(x[i]));
      nan |= a != a;
      amax = a > amax ? a : amax;
    }
    const float ratio = nan ? NAN : std::fmax(amax / 448.f, 1e-4f);
    const float scale = pow2_ceil(ratio);
    scales[t] = scale;
    for (int i = 0; i < kQuantTile; ++i) {
      const c10::Float8_e4m3fn code(static_cast<float>(x[i]) / scale);
      tok[t * kQuantTile + i] = code.x;
    }
  }
  std::memcpy(tok + kScaleOffset, scales, sizeof scales);
  for (int i = 0; i < kRopeDim; ++i) {
    const c10::BFloat16 r(static_cast<float>(k_pe[i]));
    std::memcpy(tok + kRopeOffset + 2 * i, &r.x, 2);
  }
}

template <typename T>
void run(const SparseAppendParams& p) {
  const T* kv_c = static_cast<const T*>(p.kv_c);
  const T* k_pe = static_cast<const T*>(p.k_pe);
  at::parallel_for(0, p.num_tokens, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const int64_t slot = p.slot_is_int64 ? static_cast<const int64_t*>(p.slot_mapping)[i]
                                           : static_cast<const int32_t*>(p.slot_mapping)[i];
      if (slot < 0) continue;
      uint8_t* tok = p.cache + (slot / p.block_size) * p.block_stride + (slot % p.block_size) * p.token_stride;
      quantize_token(kv_c + i * p.kv_c_row_stride, k_pe + i * p.k_pe_row_stride, tok);
    }
  });
}

}  // namespace

void sparse_append(const SparseAppendParams& p) {
  switch (p.input_dtype) {
    case DType::kFloat32: run<float>(p); break;
    case DType::kBFloat16: run<c10::BFloat16>(p); break;
    case DType::kFloat16: run<c10::Half>(p); break;
    default: break;  // rejected by the op's checks
  }
}

}  // namespace mla::cpu
