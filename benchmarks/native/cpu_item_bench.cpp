// Times and cross-checks the AVX2 decode kernels on one work item, without torch.
//
//   g++ -O3 -std=c++17 -fwrapv -mavx2 -mfma -mf16c -pthread -Icsrc/cpu -Icsrc
//       benchmarks/native/cpu_item_bench.cpp -o /tmp/cpu_item_bench      (one line)
//   /tmp/cpu_item_bench [rows=16] [keys=8192] [threads=1] [--l2]
//
// Each thread runs one item: `rows` query rows against `keys` bf16 cache rows whose 16-row
// blocks are scattered at random (the decode's memory pattern); --l2 makes every block
// table entry point into 16 blocks (295 KiB), so the cache stays in L2 and what remains is
// the kernels' own speed. Two kernels, side by side: avx2_bf16 (bf16 tiles read in place)
// and avx2 (tiles widened to fp32), both through the same tile loop as the library
// (decode_tile_loop.h, compiled here with -fwrapv like every torch extension).
// Output: best-of-30 ms, GFLOP/s and % of one core's FMA peak given as MLA_FMA_PEAK
// (GFLOP/s per core, e.g. from benchmarks/native/fma_peak.c), the speed ratio of the two
// kernels (same run, same inputs), and the largest difference between their partial
// results (they differ only in summation order).
// It exits non-zero when they disagree, so it doubles as a test (tests/test_cpu_kernels.py).
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <thread>
#include <vector>

#include "decode_impl.h"

namespace mla::cpu {
namespace {
#include "decode_tile_loop.h"
#include "avx2_kernels.h"
#include "avx2_bf16_kernels.h"
}  // namespace
}  // namespace mla::cpu

using namespace mla;
using namespace mla::cpu;

namespace {

uint16_t to_bf16(float f) {  // round to nearest even
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}

struct Item {
  std::vector<float> acc, max, sum;
  explicit Item(int rows) : acc(static_cast<size_t>(rows) * kLatentDim), max(rows), sum(rows) {}
  PartialOut out() { return PartialOut{acc.data(), max.data(), sum.data()}; }
};

}  // namespace

int main(int argc, char** argv) {
  int pos[3] = {16, 8192, 1};
  bool l2 = false;
  for (int i = 1, k = 0; i < argc; ++i) {
    if (std::strcmp(argv[i], "--l2") == 0) l2 = true;
    else if (k < 3) pos[k++] = std::atoi(argv[i]);
  }
  const int rows = pos[0], keys = pos[1], threads = pos[2];
  if (rows < 1 || rows > 64 || keys < 1 || threads < 1 || threads > 64) {
    std::fprintf(stderr, "rows in [1, 64], keys >= 1, threads in [1, 64]\n");
    return 2;
  }
  const char* peak_env = std::getenv("MLA_FMA_PEAK");
  const double peak = peak_env ? std::atof(peak_env) : 0.0;

  const int bs = 16, blocks_per_seq = (keys + bs - 1) / bs, nb = blocks_per_seq * threads;
  std::mt19937 rng(1234);
  std::normal_distribution<float> normal(0.f, 0.5f);
  std::vector<uint16_t> cache(static_cast<size_t>(nb) * bs * kHeadDim);
  for (auto& c : cache) c = to_bf16(normal(rng));
  std::vector<int32_t> table(nb);
  for (int i = 0; i < nb; ++i) table[i] = i;
  std::shuffle(table.begin(), table.end(), rng);
  if (l2)
    for (auto& t : table) t %= 16;
  std::vector<uint16_t> q(static_cast<size_t>(threads) * rows * kHeadDim);
  for (auto& c : q) c = to_bf16(normal(rng));
  std::vector<int32_t> seqlens(threads, keys);

  DecodeParams p{};
  p.q_nope = q.data();
  p.q_pe = q.data() + kLatentDim;
  p.cache = cache.data();
  p.block_table = table.data();
  p.cache_seqlens = seqlens.data();
  p.q_nope_batch_stride = p.q_pe_batch_stride = static_cast<int64_t>(rows) * kHeadDim;
  p.q_nope_seq_stride = p.q_pe_seq_stride = static_cast<int64_t>(rows) * kHeadDim;
  p.q_nope_head_stride = p.q_pe_head_stride = kHeadDim;
  p.cache_block_stride = static_cast<int64_t>(bs) * kHeadDim;
  p.cache_token_stride = kHeadDim;
  p.block_table_batch_stride = blocks_per_seq;
  p.batch = threads;
  p.seqlen_q = 1;
  p.num_heads = rows;
  p.num_blocks = nb;
  p.block_size = bs;
  p.max_blocks_per_seq = blocks_per_seq;
  p.softmax_scale = 1.f / std::sqrt(192.f);
  p.causal = true;
  p.q_dtype = p.cache_dtype = DType::kBFloat16;

  const size_t scratch_bytes =
      std::max(scratch_bytes_impl<avx2::Kernel>(rows), scratch_bytes_impl<avx2_bf16::Kernel>(rows));
  std::vector<std::vector<char>> scratch(threads, std::vector<char>(scratch_bytes + 64));
  const auto aligned = [&](int t) {
    return reinterpret_cast<void*>((reinterpret_cast<uintptr_t>(scratch[t].data()) + 63) & ~uintptr_t(63));
  };

  struct Result {
    const char* name;
    double ms;
    std::vector<Item> items;
  };
  std::vector<Result> results;
  for (int kernel = 0; kernel < 2; ++kernel) {
    Result r{kernel == 0 ? "avx2_bf16" : "avx2", 1e30, std::vector<Item>(threads, Item(rows))};
    const auto work = [&](int t) {
      const DecodeItem it{t, 0, rows, 0, keys};
      if (kernel == 0) run_item_impl<avx2_bf16::Kernel, CacheBF16>(p, it, r.items[t].out(), aligned(t));
      else run_item_impl<avx2::Kernel, CacheBF16>(p, it, r.items[t].out(), aligned(t));
    };
    for (int rep = 0; rep < 30; ++rep) {
      const auto t0 = std::chrono::steady_clock::now();
      if (threads == 1) {
        work(0);
      } else {
        std::vector<std::thread> pool;
        for (int t = 0; t < threads; ++t) pool.emplace_back(work, t);
        for (auto& th : pool) th.join();
      }
      r.ms = std::min(r.ms, std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - t0).count());
    }
    results.push_back(std::move(r));
  }

  const double flops = 2.0 * rows * keys * (kHeadDim + kLatentDim) * threads;
  for (const auto& r : results) {
    const double gflops = flops / r.ms / 1e6;
    std::printf("%-9s rows=%d keys=%d threads=%d%s: %.3f ms  %.1f GFLOP/s", r.name, rows, keys, threads,
                l2 ? " (L2-resident cache)" : "", r.ms, gflops);
    if (peak > 0) std::printf("  %.0f%% of FMA peak", 100.0 * gflops / (peak * threads));
    std::printf("\n");
  }
  std::printf("avx2_bf16 / avx2 speed: %.2fx\n", results[1].ms / results[0].ms);
  // Partials agree: same max (the max of the same fp32 scores up to summation order), and
  // acc / sum relative to the row's sum.
  double worst = 0.0;
  for (int t = 0; t < threads; ++t) {
    const Item& a = results[0].items[t];
    const Item& b = results[1].items[t];
    for (int r = 0; r < rows; ++r) {
      const double scale = std::max<double>(a.sum[r], 1e-30);
      worst = std::max<double>(worst, std::fabs(a.max[r] - b.max[r]));
      worst = std::max<double>(worst, std::fabs(a.sum[r] - b.sum[r]) / scale);
      for (int d = 0; d < kLatentDim; ++d)
        worst = std::max<double>(worst, std::fabs(a.acc[static_cast<size_t>(r) * kLatentDim + d] -
                                          b.acc[static_cast<size_t>(r) * kLatentDim + d]) / scale);
    }
  }
  std::printf("max difference between the kernels: %.3g\n", worst);
  return worst < 1e-4 ? 0 : 1;
}
