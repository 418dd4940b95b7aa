// Portable CPU decode kernel: plain C++ loops (the compiler vectorises them for the base
// instruction set). Used on CPUs without AVX2 and for dtypes no faster kernel handles;
// MLA_EXT_CPU_ISA=scalar forces it (tests compare it with the vector kernels).
#include <c10/util/Half.h>

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "decode_impl.h"
#include "fp8.h"

namespace mla::cpu {
namespace {

#include "decode_tile_loop.h"

namespace scalar {

template <class CT>
inline float to_float(typename CT::T x) {
  if constexpr (CT::kType == DType::kFloat32) {
    return x;
  } else if constexpr (CT::kType == DType::kFloat16) {
    return c10::detail::fp16_ieee_to_fp32_value(x);
  } else if constexpr (CT::kType == DType::kFloat8E4M3) {
    return fp8_e4m3_table().value[x] * (1.f / kFp8TileScale);  // exact: a power-of-two factor
  } else {
    const uint32_t bits = static_cast<uint32_t>(x) << 16;
    float f;
    __builtin_memcpy(&f, &bits, sizeof(f));
    return f;
  }
}

struct Kernel : KernelDefaults {
  using QElt = float;
  static constexpr int kQStride = kHeadDim;
  static int prefetch_steps(int) { return 0; }  // never steps: memory is left to the hardware

  template <class CT>
  static void load_q(const DecodeParams& p, int32_t seq, int32_t r0, int32_t rows, float s2scale, float* q) {
    using QC = typename CT::Q;
    for (int32_t r = 0; r < rows; ++r) {
      const QueryRow<typename QC::T> src = query_row<typename QC::T>(p, seq, r0 + r);
      float* dst = q + static_cast<int64_t>(r) * kHeadDim;
      for (int d = 0; d < kLatentDim; ++d) dst[d] = to_float<QC>(src.nope[d]) * s2scale;
      for (int d = 0; d < kRopeDim; ++d) dst[kLatentDim + d] = to_float<QC>(src.pe[d]) * s2scale;
    }
  }

  template <class CT>
  static void prepare_tile(const typename CT::T* const* raw, int n, float* kbuf, const float* zero, const float** kf) {
    if constexpr (CT::kType == DType::kFloat32) {
      for (int i = 0; i < kKeyTile; ++i) kf[i] = raw[i];
    } else {
      for (int i = 0; i < n; ++i) {
        float* dst = kbuf + i * kHeadDim;
        for (int d = 0; d < kHeadDim; ++d) dst[d] = to_float<CT>(raw[i][d]);
        kf[i] = dst;
      }
      for (int i = n; i < kKeyTile; ++i) kf[i] = zero;
    }
  }

  template <class CT>
  static void scores(const float* q, int rows, const typename CT::T* const*, const float* const* kf, float,
                     float* s, Prefetcher& /*the portable kernel leaves memory to the hardware*/) {
    for (int r = 0; r < rows; ++r) {
      const float* qr = q + static_cast<int64_t>(r) * kHeadDim;
      for (int t = 0; t < kKeyTile; ++t) {
        float part[8] = {0, 0, 0, 0, 0, 0, 0, 0};  // 8 partial sums: vectorisable without reassociation
        for (int d = 0; d < kHeadDim; d += 8)
          for (int l = 0; l < 8; ++l) part[l] += qr[d + l] * kf[t][d + l];
        s[r * kScoreStride + t] = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
      }
    }
  }

  static void softmax_row(const float* s, int visible, float* max, float* sum, float* p, float* corr) {
    if (visible <= 0) {
      for (int t = 0; t < kKeyTile; ++t) p[t] = 0.f;
      *corr = 1.f;
      return;
    }
    float tile_max = s[0];
    for (int t = 1; t < visible; ++t) tile_max = s[t] > tile_max ? s[t] : tile_max;
    const float new_max = std::fmax(*max, tile_max);
    const float c = std::exp2(*max - new_max);
    float acc = 0.f;
    for (int t = 0; t < kKeyTile; ++t) {
      p[t] = t < visible ? std::exp2(s[t] - new_max) : 0.f;
      acc += p[t];
    }
    *sum = *sum * c + acc;
    *max = new_max;
    *corr = c;
  }

  static void pv(const float* p, const float* corr, const float* const* vf, int n, int rows, float* acc,
                 Prefetcher&) {
    for (int r = 0; r < rows; ++r) {
      float* ar = acc + static_cast<int64_t>(r) * kLatentDim;
      const float c = corr[r];
      for (int d = 0; d < kLatentDim; ++d) ar[d] *= c;
      for (int t = 0; t < n; ++t) {
        const float pt = p[r * kScoreStride + t];
        const float* v = vf[t];
        for (int d = 0; d < kLatentDim; ++d) ar[d] += pt * v[d];
      }
    }
  }
};

}  // namespace scalar

bool scalar_supports(DType t) {
  return t == DType::kBFloat16 || t == DType::kFloat16 || t == DType::kFloat32 || t == DType::kFloat8E4M3;
}

size_t scalar_scratch_bytes(int32_t max_rows) { return scratch_bytes_impl<scalar::Kernel>(max_rows); }

void scalar_run_item(const DecodeParams& p, const DecodeItem& it, PartialOut out, void* scratch) {
  switch (p.cache_dtype) {
    case DType::kBFloat16: run_item_impl<scalar::Kernel, CacheBF16>(p, it, out, scratch); break;
    case DType::kFloat16: run_item_impl<scalar::Kernel, CacheF16>(p, it, out, scratch); break;
    case DType::kFloat8E4M3: run_item_impl<scalar::Kernel, CacheFP8>(p, it, out, scratch); break;
    default: run_item_impl<scalar::Kernel, CacheF32>(p, it, out, scratch); break;
  }
}

}  // namespace

const DecodeIsa* decode_isa_scalar() {
  static const DecodeIsa isa{[](DType) { return "scalar"; }, &scalar_supports, &scalar_scratch_bytes, &scalar_run_item};
  return &isa;
}

}  // namespace mla::cpu
