// Test-only (benchmarks/avx512_emulation/run.sh): see run.sh.
// Runs the AVX-512 kernels' logic (intrinsics emulated in C) against the AVX2 kernels, item by
// item, for every cache dtype: avx512bf16 (bf16; fp8 with a bf16-exact and with a general fp32
// query) and avx512-fp32 (fp16, fp32). Cache rows outside the sequence hold NaN. Then every
// e4m3fn code through the fp8 widening, bit for bit.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include "decode_impl.h"
using namespace mla; using namespace mla::cpu;

static uint16_t to_bf16(float f) { uint32_t u; memcpy(&u, &f, 4); return uint16_t((u + 0x7FFF + ((u >> 16) & 1)) >> 16); }
static float bf16_value(uint16_t b) { uint32_t u = uint32_t(b) << 16; float f; memcpy(&f, &u, 4); return f; }
static uint16_t to_fp16(float f) { const _Float16 h = static_cast<_Float16>(f); uint16_t b; memcpy(&b, &h, 2); return b; }
// e4m3fn: sign | e (4 bits, bias 7) | m (3 bits); e = 0 subnormal; 0x7f / 0xff NaN.
static float fp8_value(uint8_t c) {
  const int e = (c >> 3) & 15, m = c & 7;
  const float mag = e ? std::ldexp(1.f + m / 8.f, e - 7) : std::ldexp(float(m), -9);
  return (c & 0x80) ? -mag : mag;
}
static float rnd() { return (rand() % 20001 - 10000) / 5000.f; }  // [-2, 2]

enum Case { kBf16, kFp16, kFp32, kFp8BfQuery, kFp8Fp32Query, kCases };
static const char* kCaseName[kCases] = {"bf16", "fp16 (avx512-fp32)", "fp32 (avx512-fp32)", "fp8, bf16-exact query",
                                        "fp8, fp32 query"};

struct Inputs {
  std::vector<uint8_t> cache;  // raw bytes, elt bytes per value
  std::vector<uint8_t> q;      // [rows, 576] in the query dtype
  std::vector<int32_t> table;
  int32_t seqlen = 0;
  float kv_scale = 1.f;
};

// One cache value of dtype t, from x (fp8: the code nearest x * 64, clamped to +-448).
static void put(DType t, uint8_t* dst, float x) {
  switch (t) {
    case DType::kBFloat16: { uint16_t b = to_bf16(x); memcpy(dst, &b, 2); break; }
    case DType::kFloat16: { uint16_t b = to_fp16(x); memcpy(dst, &b, 2); break; }
    case DType::kFloat32: memcpy(dst, &x, 4); break;
    default: {
      uint8_t best = 0; float err = 1e30f;
      for (int c = 0; c < 256; ++c) {
        if ((c & 0x7f) == 0x7f) continue;
        const float d = std::fabs(fp8_value(uint8_t(c)) - x * 64);
        if (d < err) { err = d; best = uint8_t(c); }
      }
      *dst = best;
    }
  }
}
static void put_nan(DType t, uint8_t* dst) {
  switch (t) {
    case DType::kBFloat16: { uint16_t b = 0x7fc0; memcpy(dst, &b, 2); break; }
    case DType::kFloat16: { uint16_t b = 0x7e00; memcpy(dst, &b, 2); break; }
    case DType::kFloat32: { float f = NAN; memcpy(dst, &f, 4); break; }
    default: *dst = 0x7f;
  }
}
static int elt_bytes(DType t) { return t == DType::kFloat32 ? 4 : t == DType::kFloat8E4M3 ? 1 : 2; }

static DecodeParams make_params(Inputs& in, DType cache_t, DType q_t, int bs, int nb, int h, int s_q, int causal) {
  const int rows = s_q * h, qe = elt_bytes(q_t);
  DecodeParams p{};
  p.q_nope = in.q.data(); p.q_pe = in.q.data() + 512 * qe; p.cache = in.cache.data(); p.block_table = in.table.data();
  p.cache_seqlens = &in.seqlen; p.kv_scale = &in.kv_scale;
  p.q_nope_batch_stride = rows * 576; p.q_nope_seq_stride = h * 576; p.q_nope_head_stride = 576;
  p.q_pe_batch_stride = rows * 576; p.q_pe_seq_stride = h * 576; p.q_pe_head_stride = 576;
  p.cache_block_stride = bs * 576; p.cache_token_stride = 576; p.block_table_batch_stride = nb;
  p.batch = 1; p.seqlen_q = s_q; p.num_heads = h; p.num_blocks = nb; p.block_size = bs; p.max_blocks_per_seq = nb;
  p.softmax_scale = 0.0721f; p.causal = causal; p.q_dtype = q_t; p.cache_dtype = cache_t;
  return p;
}

struct Result { std::vector<float> acc, max, sum; };
static Result run(const DecodeIsa* isa, const DecodeParams& p, const DecodeItem& it) {
  const int rows = it.row_end - it.row_begin;
  Result r{std::vector<float>(rows * 512), std::vector<float>(rows), std::vector<float>(rows)};
  void* scratch = aligned_alloc(64, (isa->scratch_bytes(rows) + 63) / 64 * 64);
  isa->run_item(p, it, PartialOut{r.acc.data(), r.max.data(), r.sum.data()}, scratch);
  free(scratch);
  return r;
}

// Every e4m3fn code but the two NaNs as V of a one-key item with q = 0: P = 1, so the
// partial is the widened row itself, value / 256 (kFp8TileScale), exactly. (The AVX2 kernel's
// widening is checked the same way by tests/test_cpu_kernels.py.)
static int fp8_every_code(const DecodeIsa* isa) {
  Inputs in;
  in.cache.assign(576, 0);
  int n = 0;
  for (int c = 0; c < 256; ++c)
    if ((c & 0x7f) != 0x7f) in.cache[n++] = uint8_t(c);
  in.q.assign(576 * 4, 0);
  in.table = {0};
  in.seqlen = 1;
  const DecodeParams p = make_params(in, DType::kFloat8E4M3, DType::kFloat32, 1, 1, 1, 1, 0);
  const Result r = run(isa, p, DecodeItem{0, 0, 1, 0, 1});
  int bad = r.sum[0] == 1.f ? 0 : 1;
  for (int d = 0; d < 512; ++d) {
    const float want = fp8_value(in.cache[d]) / 256.f;
    if (!(r.acc[d] == want)) {  // -0 (code 0x80) accumulates to +0: equal, as it must be
      if (++bad < 5) printf("FAIL fp8 code 0x%02x -> %g, want %g\n", in.cache[d], r.acc[d], want);
    }
  }
  printf("fp8 widening: %s (254 codes, bit for bit)\n", bad ? "FAIL" : "ok");
  return bad != 0;
}

// Both kernels accumulate in fp32 in different orders: they agree to <= 4e-6 here (lse in
// log2 units, normalised outputs of magnitude <= 2). An fp32 query that lost its third bf16
// part differs by ~3e-5, so the bound is set between the two.
constexpr double kTol = 1e-5;

int main() {
  srand(1);
  const DecodeIsa* a = decode_isa_avx512bf16(); const DecodeIsa* b = decode_isa_avx2();
  int total_fails = 0;
  for (int kase = 0; kase < kCases; ++kase) {
    const DType cache_t = kase == kBf16 ? DType::kBFloat16 : kase == kFp16 ? DType::kFloat16
                        : kase == kFp32 ? DType::kFloat32 : DType::kFloat8E4M3;
    const DType q_t = kase >= kFp8BfQuery ? DType::kFloat32 : cache_t;
    int fails = 0, cases = 0;
    double worst = 0;
    for (int bs : {1, 7, 16, 64}) for (int h : {1, 3, 16, 128}) for (int s_q : {1, 2, 3}) for (int causal : {0, 1})
    for (int L : {1, 5, 16, 17, 40, 300}) {
      const int rows = s_q * h; if (rows > 64 && L > 40) continue;
      if (kase != kBf16 && (bs == 7 || bs == 64 || s_q == 3)) continue;  // the tile loop is shared: fewer shapes
      const int nb = (L + bs - 1) / bs + 2, ce = elt_bytes(cache_t), qe = elt_bytes(q_t);
      Inputs in;
      in.cache.resize((size_t)nb * bs * 576 * ce);
      for (size_t i = 0; i < in.cache.size() / ce; ++i) put_nan(cache_t, &in.cache[i * ce]);  // unused rows: NaN
      in.table.resize(nb); for (int i = 0; i < nb; ++i) in.table[i] = (i * 5 + 1) % nb;
      for (int t = 0; t < L; ++t) {
        uint8_t* row = &in.cache[((size_t)in.table[t / bs] * bs + t % bs) * 576 * ce];
        for (int d = 0; d < 576; ++d) put(cache_t, row + d * ce, rnd());
      }
      in.q.resize((size_t)rows * 576 * qe);
      for (int i = 0; i < rows * 576; ++i) {
        float x = rnd();
        if (kase == kFp8BfQuery || q_t != DType::kFloat32) x = bf16_value(to_bf16(x));
        if (q_t == DType::kFloat32) memcpy(&in.q[i * 4], &x, 4); else put(q_t, &in.q[i * qe], x);
      }
      in.seqlen = L;
      in.kv_scale = 1.f / 64;
      const DecodeParams p = make_params(in, cache_t, q_t, bs, nb, h, s_q, causal);
      for (int split : {0, 1}) {  // whole range, or a middle chunk
        const int k0 = split ? L / 3 : 0, k1 = split ? (2 * L) / 3 + 1 : L;
        if (k1 <= k0) continue;
        const DecodeItem it{0, 0, rows, k0, k1};
        const Result ra = run(a, p, it), rb = run(b, p, it);
        double err = 0;
        for (int r = 0; r < rows; ++r) {
          if (std::isinf(ra.max[r]) || std::isinf(rb.max[r])) { if (ra.max[r] != rb.max[r]) err = 1e9; continue; }
          err = std::fmax(err, std::fabs((ra.max[r] + std::log2(ra.sum[r])) - (rb.max[r] + std::log2(rb.sum[r]))));
          for (int d = 0; d < 512; ++d)
            err = std::fmax(err, std::fabs(ra.acc[r * 512 + d] / ra.sum[r] - rb.acc[r * 512 + d] / rb.sum[r]));
        }
        ++cases;
        worst = std::fmax(worst, err);
        if (!(err < kTol)) {
          ++fails;
          printf("FAIL %s bs=%d h=%d s_q=%d causal=%d L=%d split=%d err=%g\n", kCaseName[kase], bs, h, s_q, causal, L, split, err);
        }
      }
    }
    printf("%s: %d/%d cases agree (emulated AVX-512 kernel vs AVX2 kernel), largest difference %.2g\n",
           kCaseName[kase], cases - fails, cases, worst);
    total_fails += fails;
  }
  total_fails += fp8_every_code(a);
  return total_fails != 0;
}
