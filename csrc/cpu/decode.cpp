// CPU absorbed MLA decode (flash-decoding on the CPU).
//
// Work item = (sequence, chunk of KV positions). Each item streams its cache rows in
// tiles of kKeyTile keys: the tile is converted to fp32 once and then serves every
// query row of the sequence (all heads x s_q), first as K (576 wide) for the scores
// and then as V (its first 512 columns) for the output. Softmax is online, in fp32.
// Items of one sequence are merged through their (max, sum) pair into out and lse.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "cpu_kernels.h"

namespace mla::cpu {
namespace {

constexpr int kKeyTile = 16;          // keys converted to fp32 at a time
constexpr int64_t kMinChunk = 256;    // smallest KV chunk worth a work item

template <typename T>
inline float to_float(T x) { return static_cast<float>(x); }

// A work item's running softmax state for all M = s_q * h query rows.
struct PartialState {
  float* acc;   // [M, DC]  unnormalised sum of p * V
  float* max;   // [M]      running max of the scores (-inf: nothing seen)
  float* sum;   // [M]      running sum of exp(score - max)
};

struct WorkItem {
  int32_t seq;
  int32_t key_begin;
  int32_t key_end;
};

template <typename QT, typename CT>
class DecodeKernel {
 public:
  explicit DecodeKernel(const DecodeParams& p) : p_(p), rows_(p.seqlen_q * p.num_heads) {}

  void run() {
    std::vector<WorkItem> items = plan_items();
    const int64_t n_items = static_cast<int64_t>(items.size());
    // Partial states for every item: acc [n_items, M, DC], max/sum [n_items, M].
    std::vector<float> acc(static_cast<size_t>(n_items) * rows_ * kLatentDim);
    std::vector<float> mx(static_cast<size_t>(n_items) * rows_);
    std::vector<float> sm(static_cast<size_t>(n_items) * rows_);

    at::parallel_for(0, n_items, 1, [&](int64_t begin, int64_t end) {
      std::vector<float> q(static_cast<size_t>(rows_) * kHeadDim);   // [M, D] fp32 query
      std::vector<float> k(static_cast<size_t>(kKeyTile) * kHeadDim); // [kKeyTile, D] fp32 keys
      std::vector<float> s(static_cast<size_t>(rows_) * kKeyTile);   // [M, kKeyTile] scores
      for (int64_t i = begin; i < end; ++i) {
        PartialState st{acc.data() + i * rows_ * kLatentDim, mx.data() + i * rows_, sm.data() + i * rows_};
        run_item(items[i], st, q.data(), k.data(), s.data());
      }
    });

    // Merge the items of each sequence (they are contiguous in `items`).
    std::vector<int64_t> first(p_.batch + 1, 0);
    for (const WorkItem& it : items) first[it.seq + 1]++;
    for (int32_t b = 0; b < p_.batch; ++b) first[b + 1] += first[b];
    at::parallel_for(0, p_.batch, 1, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end; ++b) merge(static_cast<int32_t>(b), first[b], first[b + 1], acc, mx, sm);
    });
  }

 private:
  const DecodeParams& p_;
  const int32_t rows_;  // M = s_q * h; row r = j * h + head

  // Sequences with no keys get no item; their rows are written as empty by merge().
  std::vector<WorkItem> plan_items() const {
    int64_t total_keys = 0;
    for (int32_t b = 0; b < p_.batch; ++b) total_keys += std::max<int32_t>(p_.cache_seqlens[b], 0);
    // Aim for a few items per thread so one long sequence still uses every core.
    const int64_t target_items = std::max<int64_t>(1, 4 * at::get_num_threads());
    int64_t chunk = std::max<int64_t>(kMinChunk, (total_keys + target_items - 1) / target_items);
    chunk = (chunk + kKeyTile - 1) / kKeyTile * kKeyTile;
    std::vector<WorkItem> items;
    for (int32_t b = 0; b < p_.batch; ++b) {
      const int32_t len = p_.cache_seqlens[b];
      for (int64_t k0 = 0; k0 < len; k0 += chunk)
        items.push_back({b, static_cast<int32_t>(k0), static_cast<int32_t>(std::min<int64_t>(len, k0 + chunk))});
    }
    return items;
  }

  const CT* cache_row(int32_t seq, int32_t key) const {
    const int32_t block = p_.block_table[seq * p_.block_table_batch_stride + key / p_.block_size];
    return static_cast<const CT*>(p_.cache) + block * p_.cache_block_stride +
           (key % p_.block_size) * p_.cache_token_stride;
  }

  void load_query(int32_t seq, float* q) const {
    const QT* qn = static_cast<const QT*>(p_.q_nope);
    const QT* qp = static_cast<const QT*>(p_.q_pe);
    for (int32_t j = 0; j < p_.seqlen_q; ++j) {
      for (int32_t h = 0; h < p_.num_heads; ++h) {
        float* dst = q + (static_cast<int64_t>(j) * p_.num_heads + h) * kHeadDim;
        const QT* src_n = qn + seq * p_.q_nope_batch_stride + j * p_.q_nope_seq_stride + h * p_.q_nope_head_stride;
        const QT* src_p = qp + seq * p_.q_pe_batch_stride + j * p_.q_pe_seq_stride + h * p_.q_pe_head_stride;
        // Fold the softmax scale into q once instead of into every score.
        for (int d = 0; d < kLatentDim; ++d) dst[d] = to_float(src_n[d]) * p_.softmax_scale;
        for (int d = 0; d < kRopeDim; ++d) dst[kLatentDim + d] = to_float(src_p[d]) * p_.softmax_scale;
      }
    }
  }

  void run_item(const WorkItem& it, PartialState st, float* q, float* k, float* s) const {
    const int32_t len = p_.cache_seqlens[it.seq];
    load_query(it.seq, q);
    std::fill(st.acc, st.acc + static_cast<int64_t>(rows_) * kLatentDim, 0.f);
    std::fill(st.max, st.max + rows_, -std::numeric_limits<float>::infinity());
    std::fill(st.sum, st.sum + rows_, 0.f);

    // Keys visible to row r are [0, limit[j]) with j = r / h.
    std::vector<int32_t> limit(p_.seqlen_q);
    for (int32_t j = 0; j < p_.seqlen_q; ++j) limit[j] = visible_keys(len, p_.seqlen_q, j, p_.causal);

    for (int32_t t0 = it.key_begin; t0 < it.key_end; t0 += kKeyTile) {
      const int n = std::min<int32_t>(kKeyTile, it.key_end - t0);
      for (int i = 0; i < n; ++i) {
        const CT* row = cache_row(it.seq, t0 + i);
        float* dst = k + i * kHeadDim;
        for (int d = 0; d < kHeadDim; ++d) dst[d] = to_float(row[d]);
      }
      for (int32_t r = 0; r < rows_; ++r) {
        const int32_t visible = std::min<int32_t>(n, limit[r / p_.num_heads] - t0);
        if (visible <= 0) continue;  // this row sees none of the tile (causal)
        const float* qr = q + static_cast<int64_t>(r) * kHeadDim;
        float* sr = s + r * kKeyTile;
        float tile_max = -std::numeric_limits<float>::infinity();
        for (int i = 0; i < visible; ++i) {
          const float* kr = k + i * kHeadDim;
          float dot = 0.f;
          for (int d = 0; d < kHeadDim; ++d) dot += qr[d] * kr[d];
          sr[i] = dot;
          tile_max = std::max(tile_max, dot);
        }
        const float new_max = std::max(st.max[r], tile_max);
        const float correction = std::exp(st.max[r] - new_max);  // exp(-inf) = 0 on the first tile
        float* ar = st.acc + static_cast<int64_t>(r) * kLatentDim;
        if (correction != 1.f)
          for (int d = 0; d < kLatentDim; ++d) ar[d] *= correction;
        float tile_sum = 0.f;
        for (int i = 0; i < visible; ++i) {
          const float pr = std::exp(sr[i] - new_max);
          tile_sum += pr;
          const float* vr = k + i * kHeadDim;  // V = first DC columns of the key row
          for (int d = 0; d < kLatentDim; ++d) ar[d] += pr * vr[d];
        }
        st.sum[r] = st.sum[r] * correction + tile_sum;
        st.max[r] = new_max;
      }
    }
  }

  void merge(int32_t seq, int64_t item_begin, int64_t item_end, const std::vector<float>& acc,
             const std::vector<float>& mx, const std::vector<float>& sm) const {
    QT* out = static_cast<QT*>(p_.out) + static_cast<int64_t>(seq) * rows_ * kLatentDim;
    float* lse = p_.lse + static_cast<int64_t>(seq) * rows_;
    std::vector<float> merged(kLatentDim);
    for (int32_t r = 0; r < rows_; ++r) {
      float global_max = -std::numeric_limits<float>::infinity();
      for (int64_t i = item_begin; i < item_end; ++i) global_max = std::max(global_max, mx[i * rows_ + r]);
      QT* out_r = out + static_cast<int64_t>(r) * kLatentDim;
      if (global_max == -std::numeric_limits<float>::infinity()) {  // no visible key
        for (int d = 0; d < kLatentDim; ++d) out_r[d] = QT(0.f);
        lse[r] = -std::numeric_limits<float>::infinity();
        continue;
      }
      std::fill(merged.begin(), merged.end(), 0.f);
      float total = 0.f;
      for (int64_t i = item_begin; i < item_end; ++i) {
        const float m = mx[i * rows_ + r];
        if (m == -std::numeric_limits<float>::infinity()) continue;
        const float w = std::exp(m - global_max);
        total += w * sm[i * rows_ + r];
        const float* a = acc.data() + (i * rows_ + r) * kLatentDim;
        for (int d = 0; d < kLatentDim; ++d) merged[d] += w * a[d];
      }
      const float inv = 1.f / total;
      for (int d = 0; d < kLatentDim; ++d) out_r[d] = QT(merged[d] * inv);
      lse[r] = global_max + std::log(total);
    }
  }
};

}  // namespace

void decode(const DecodeParams& p) {
  // The glue guarantees q and cache share a dtype (fp8 caches are handled elsewhere).
  TORCH_CHECK(p.q_dtype == p.cache_dtype, "mla_ext: CPU decode needs q and cache of one dtype");
  switch (p.q_dtype) {
    case DType::kFloat32: DecodeKernel<float, float>(p).run(); break;
    case DType::kFloat16: DecodeKernel<c10::Half, c10::Half>(p).run(); break;
    case DType::kBFloat16: DecodeKernel<c10::BFloat16, c10::BFloat16>(p).run(); break;
    default: TORCH_CHECK(false, "mla_ext: unsupported dtype in the CPU decode");
  }
}

}  // namespace mla::cpu
