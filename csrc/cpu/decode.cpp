// CPU absorbed MLA decode: the driver (flash-decoding on the CPU).
//
// Work item = (sequence, block of query rows, chunk of KV positions). Items are handed to
// the threads of at::parallel_for (torch.set_num_threads is respected) through an atomic
// counter, so uneven sequence lengths balance themselves; one long sequence is cut into
// chunks so that it keeps every core busy. Each item runs an instruction-set kernel
// (the AMX tile kernel of decode_amx.cpp, decode_tile_loop.h with avx2_kernels.h, the
// AVX-512 BF16 one, or the portable one)
// that streams its cache rows tile by tile with an online softmax and leaves an
// unnormalised partial (acc, max, sum). The partials of one sequence are then merged
// through their (max, sum) pairs into out (q's dtype) and lse.
//
// The kernel is chosen per call from the CPU's features (cpuid, cached) and the dtype;
// MLA_EXT_CPU_ISA=scalar|avx2|avx512bf16|amx caps the choice (for tests and benchmarks).
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <new>
#include <vector>

#include "cpu_features.h"
#include "cpu_kernels.h"
#include "decode_impl.h"

namespace mla::cpu {
namespace {

constexpr int32_t kMaxItemRows = 64;   // query rows per item: Q (fp32) + acc stay within L2
constexpr int64_t kMinChunk = 256;     // smallest KV chunk worth an item (~1% overhead)
constexpr int kItemsPerThread = 4;     // aim for this many items per thread (balance)

enum class IsaLevel { kScalar = 0, kAvx2 = 1, kAvx512Bf16 = 2, kAmx = 3 };

IsaLevel requested_level() {
  const char* env = std::getenv("MLA_EXT_CPU_ISA");
  if (env == nullptr || *env == '\0' || std::strcmp(env, "auto") == 0) return IsaLevel::kAmx;
  if (std::strcmp(env, "scalar") == 0) return IsaLevel::kScalar;
  if (std::strcmp(env, "avx2") == 0) return IsaLevel::kAvx2;
  if (std::strcmp(env, "avx512bf16") == 0) return IsaLevel::kAvx512Bf16;
  if (std::strcmp(env, "amx") == 0) return IsaLevel::kAmx;
  TORCH_CHECK_VALUE(false, "MLA_EXT_CPU_ISA must be auto, scalar, avx2, avx512bf16 or amx, got '", env, "'");
}

const DecodeIsa* pick_isa(DType dtype) {
  const CpuFeatures& f = cpu_features();
  const IsaLevel cap = requested_level();
  const DecodeIsa* isa = nullptr;
  if (cap >= IsaLevel::kAmx && f.amx_bf16 && (isa = decode_isa_amx()) && isa->supports(dtype)) return isa;
  if (cap >= IsaLevel::kAvx512Bf16 && f.avx512_bf16 && (isa = decode_isa_avx512bf16()) && isa->supports(dtype))
    return isa;
  if (cap >= IsaLevel::kAvx2 && f.avx2_fma_f16c && (isa = decode_isa_avx2()) && isa->supports(dtype)) return isa;
  return decode_isa_scalar();
}

// A per-thread buffer kept between calls. Why: a fresh allocation of the partials (256 KiB
// for cpu-small, 1 MiB for h = 128) or of a thread's scratch is a fresh mmap whose pages
// fault in again on every decode step. Decode steps repeat the same shapes, so the buffers
// settle; one that grew past kKeepBytes (a one-off huge batch) is freed after its call.
class Workspace {
 public:
  static constexpr size_t kKeepBytes = size_t(64) << 20;
  void* get(size_t bytes) {
    if (bytes > capacity_) {
      release();
      data_ = ::operator new(bytes, std::align_val_t(64));
      capacity_ = bytes;
    }
    return data_;
  }
  void trim() {
    if (capacity_ > kKeepBytes) release();
  }
  ~Workspace() { release(); }

 private:
  void release() {
    if (data_ != nullptr) ::operator delete(data_, std::align_val_t(64));
    data_ = nullptr;
    capacity_ = 0;
  }
  void* data_ = nullptr;
  size_t capacity_ = 0;
};

thread_local Workspace tls_scratch;   // a worker thread's kernel scratch
thread_local Workspace tls_partials;  // the calling thread's partial results

struct Plan {
  std::vector<DecodeItem> items;
  std::vector<int64_t> row_offset;   // first partial row of each item (+ total at the end)
  // Items of (sequence, row block) g are [group_first[g], group_first[g + 1]); groups are
  // ordered by sequence, then row block.
  std::vector<int64_t> group_first;
  int32_t rows_per_block = 0;
  int32_t row_blocks = 0;
};

Plan make_plan(const DecodeParams& p, int num_threads) {
  Plan plan;
  const int32_t rows = p.seqlen_q * p.num_heads;
  plan.row_blocks = (rows + kMaxItemRows - 1) / kMaxItemRows;
  plan.rows_per_block = (rows + plan.row_blocks - 1) / plan.row_blocks;

  int64_t total_keys = 0;
  for (int32_t b = 0; b < p.batch; ++b) total_keys += std::max<int32_t>(p.cache_seqlens[b], 0);
  const int64_t work = total_keys * plan.row_blocks;
  const int64_t target_items = std::max<int64_t>(1, int64_t(kItemsPerThread) * num_threads);
  int64_t chunk = std::max<int64_t>(kMinChunk, (work + target_items - 1) / target_items);
  chunk = (chunk + kKeyTile - 1) / kKeyTile * kKeyTile;

  plan.group_first.push_back(0);
  plan.row_offset.push_back(0);
  for (int32_t b = 0; b < p.batch; ++b) {
    const int32_t len = std::max<int32_t>(p.cache_seqlens[b], 0);
    for (int32_t rb = 0; rb < plan.row_blocks; ++rb) {
      const int32_t r0 = rb * plan.rows_per_block, r1 = std::min(rows, r0 + plan.rows_per_block);
      // Even chunks: split len into ceil(len / chunk) parts of equal size (multiples of 16).
      const int64_t parts = (len + chunk - 1) / chunk;
      int64_t step = parts > 0 ? (len + parts - 1) / parts : 0;
      step = (step + kKeyTile - 1) / kKeyTile * kKeyTile;
      for (int64_t k0 = 0; k0 < len; k0 += step) {
        plan.items.push_back({b, r0, r1, static_cast<int32_t>(k0), static_cast<int32_t>(std::min<int64_t>(len, k0 + step))});
        plan.row_offset.push_back(plan.row_offset.back() + (r1 - r0));
      }
      plan.group_first.push_back(static_cast<int64_t>(plan.items.size()));
    }
  }
  return plan;
}

template <typename QT>
void merge_group(const DecodeParams& p, const Plan& plan, int64_t group, const float* acc, const float* mx,
                 const float* sm, float* merged) {
  const int32_t rows = p.seqlen_q * p.num_heads;
  const int32_t seq = static_cast<int32_t>(group / plan.row_blocks);
  const int32_t r0 = static_cast<int32_t>(group % plan.row_blocks) * plan.rows_per_block;
  const int32_t r1 = std::min(rows, r0 + plan.rows_per_block);
  const int64_t i0 = plan.group_first[group], i1 = plan.group_first[group + 1];
  constexpr float kNegInf = -std::numeric_limits<float>::infinity();
  constexpr float kLn2 = 0.6931471805599453f;
  // fp8 tiles hold value / kFp8TileScale and the cache scale is not applied per element:
  // V's factor comes back here (the scores' factor was folded into q).
  const float out_scale = p.cache_dtype == DType::kFloat8E4M3 ? *p.kv_scale * kFp8TileScale : 1.f;
  for (int32_t r = r0; r < r1; ++r) {
    QT* out = static_cast<QT*>(p.out) + (static_cast<int64_t>(seq) * rows + r) * kLatentDim;
    float* lse = p.lse + static_cast<int64_t>(seq) * rows + r;
    float global_max = kNegInf;
    for (int64_t i = i0; i < i1; ++i) global_max = std::max(global_max, mx[plan.row_offset[i] + (r - r0)]);
    if (global_max == kNegInf) {  // no visible key (L = 0, or causal with L < s_q)
      for (int d = 0; d < kLatentDim; ++d) out[d] = QT(0.f);
      *lse = kNegInf;
      continue;
    }
    float total = 0.f;
    std::fill(merged, merged + kLatentDim, 0.f);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t pr = plan.row_offset[i] + (r - r0);
      if (mx[pr] == kNegInf) continue;
      const float w = std::exp2(mx[pr] - global_max);
      total += w * sm[pr];
      const float* a = acc + pr * kLatentDim;
      for (int d = 0; d < kLatentDim; ++d) merged[d] += w * a[d];
    }
    const float inv = out_scale / total;
    for (int d = 0; d < kLatentDim; ++d) out[d] = QT(merged[d] * inv);
    *lse = (global_max + std::log2(total)) * kLn2;
  }
}

template <typename QT>
void run(const DecodeParams& p, const DecodeIsa& isa) {
  const int num_threads = at::get_num_threads();
  const Plan plan = make_plan(p, num_threads);
  const int64_t n_items = static_cast<int64_t>(plan.items.size());
  const int64_t partial_rows = plan.row_offset.back();
  // Partials of every item (not zero-filled: each item initialises its own rows):
  // acc [partial_rows, 512], then max [partial_rows] and sum [partial_rows].
  const size_t n_rows = static_cast<size_t>(std::max<int64_t>(partial_rows, 1));
  struct TrimOnExit {
    ~TrimOnExit() { tls_partials.trim(); }
  } trim_on_exit;
  float* const acc = static_cast<float*>(tls_partials.get(sizeof(float) * n_rows * (kLatentDim + 2)));
  float* const mx = acc + n_rows * kLatentDim;
  float* const sm = mx + n_rows;

  if (n_items > 0) {
    std::atomic<int64_t> next{0};
    const size_t scratch_bytes = isa.scratch_bytes(plan.rows_per_block);
    const int64_t workers = std::min<int64_t>(num_threads, n_items);
    at::parallel_for(0, workers, 1, [&](int64_t, int64_t) {
      void* const scratch = tls_scratch.get(scratch_bytes);
      for (int64_t i = next.fetch_add(1); i < n_items; i = next.fetch_add(1)) {
        const int64_t r = plan.row_offset[i];
        isa.run_item(p, plan.items[i], PartialOut{acc + r * kLatentDim, mx + r, sm + r}, scratch);
      }
    });
  }

  const int64_t groups = static_cast<int64_t>(p.batch) * plan.row_blocks;
  at::parallel_for(0, groups, 1, [&](int64_t g0, int64_t g1) {
    float merged[kLatentDim];  // one row's merged accumulator (2 KiB, on the stack)
    for (int64_t g = g0; g < g1; ++g) merge_group<QT>(p, plan, g, acc, mx, sm, merged);
  });
}

}  // namespace

const char* decode_kernel_name(DType dtype) { return pick_isa(dtype)->name(dtype); }

void decode(const DecodeParams& p) {
  // The glue guarantees q and cache share a dtype, or an fp32 q (and out) for an fp8 cache.
  TORCH_CHECK(p.q_dtype == p.cache_dtype || (p.cache_dtype == DType::kFloat8E4M3 && p.q_dtype == DType::kFloat32),
              "mla_ext: CPU decode needs q and cache of one dtype, or an fp32 q for an fp8 cache");
  const DecodeIsa& isa = *pick_isa(p.cache_dtype);
  switch (p.q_dtype) {
    case DType::kFloat32: run<float>(p, isa); break;
    case DType::kFloat16: run<c10::Half>(p, isa); break;
    case DType::kBFloat16: run<c10::BFloat16>(p, isa); break;
    default: TORCH_CHECK(false, "mla_ext: unsupported dtype in the CPU decode");
  }
}

}  // namespace mla::cpu
