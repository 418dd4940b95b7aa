// Test-only (benchmarks/avx512_emulation/run.sh): see run.sh.
// Runs the AVX-512 BF16 kernel's logic (intrinsics emulated in C) against the AVX2 kernel.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>
#include "decode_impl.h"
using namespace mla; using namespace mla::cpu;
static uint16_t to_bf16(float f) { uint32_t u; memcpy(&u, &f, 4); return uint16_t((u + 0x7FFF + ((u >> 16) & 1)) >> 16); }
int main() {
  srand(1);
  const DecodeIsa* a = decode_isa_avx512bf16(); const DecodeIsa* b = decode_isa_avx2();
  int fails = 0, cases = 0;
  for (int bs : {1, 7, 16, 64}) for (int h : {1, 3, 16, 128}) for (int s_q : {1, 2, 3}) for (int causal : {0, 1})
  for (int L : {1, 5, 16, 17, 40, 300}) {
    const int rows = s_q * h; if (rows > 64 && L > 40) continue;
    const int nb = (L + bs - 1) / bs + 2;
    std::vector<uint16_t> cache((size_t)nb * bs * 576);
    for (auto& x : cache) x = to_bf16((rand() % 20001 - 10000) / 5000.f);
    std::vector<int32_t> bt(nb); for (int i = 0; i < nb; ++i) bt[i] = (i * 5 + 1) % nb;
    std::vector<uint16_t> q((size_t)rows * 576); for (auto& x : q) x = to_bf16((rand() % 20001 - 10000) / 5000.f);
    int32_t sl = L;
    DecodeParams p{};
    p.q_nope = q.data(); p.q_pe = q.data() + 512; p.cache = cache.data(); p.block_table = bt.data(); p.cache_seqlens = &sl;
    p.q_nope_batch_stride = rows * 576; p.q_nope_seq_stride = h * 576; p.q_nope_head_stride = 576;
    p.q_pe_batch_stride = rows * 576; p.q_pe_seq_stride = h * 576; p.q_pe_head_stride = 576;
    p.cache_block_stride = bs * 576; p.cache_token_stride = 576; p.block_table_batch_stride = nb;
    p.batch = 1; p.seqlen_q = s_q; p.num_heads = h; p.num_blocks = nb; p.block_size = bs; p.max_blocks_per_seq = nb;
    p.softmax_scale = 0.0721f; p.causal = causal; p.q_dtype = p.cache_dtype = DType::kBFloat16;
    for (int split : {0, 1}) {  // whole range, or a middle chunk
      const int k0 = split ? L / 3 : 0, k1 = split ? (2 * L) / 3 + 1 : L;
      if (k1 <= k0) continue;
      DecodeItem it{0, 0, rows, k0, k1};
      std::vector<float> acc_a(rows * 512), acc_b(rows * 512), ma(rows), mb(rows), sa(rows), sb(rows);
      void* sca = aligned_alloc(64, (a->scratch_bytes(rows) + 63) / 64 * 64);
      void* scb = aligned_alloc(64, (b->scratch_bytes(rows) + 63) / 64 * 64);
      a->run_item(p, it, PartialOut{acc_a.data(), ma.data(), sa.data()}, sca);
      b->run_item(p, it, PartialOut{acc_b.data(), mb.data(), sb.data()}, scb);
      free(sca); free(scb);
      double err = 0;
      for (int r = 0; r < rows; ++r) {
        if (std::isinf(ma[r]) || std::isinf(mb[r])) { if (ma[r] != mb[r]) err = 1e9; continue; }
        err = std::fmax(err, std::fabs((ma[r] + std::log2(sa[r])) - (mb[r] + std::log2(sb[r]))));
        for (int d = 0; d < 512; ++d)
          err = std::fmax(err, std::fabs(acc_a[r * 512 + d] / sa[r] - acc_b[r * 512 + d] / sb[r]));
      }
      ++cases;
      if (!(err < 1e-4)) { ++fails; printf("FAIL bs=%d h=%d s_q=%d causal=%d L=%d split=%d err=%g\n", bs, h, s_q, causal, L, split, err); }
    }
  }
  printf("%d/%d cases agree (emulated AVX-512 BF16 kernel vs AVX2 kernel)\n", cases - fails, cases);
  return fails != 0;
}
