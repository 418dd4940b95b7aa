// The per-item loop of the CPU decode, shared by every instruction set.
//
// Included by decode_{scalar,avx2,avx512}.cpp INSIDE `namespace mla::cpu { namespace {`,
// after their `#pragma GCC target`, so it gets compiled once per instruction set with
// internal linkage. It therefore includes nothing and calls no std:: template.
//
// For one item (sequence, rows, key range) it walks the keys in tiles of kKeyTile:
//   1. gather the tile's cache row pointers through the block table (padding: a zero row);
//   2. K::prepare_tile  : fp32 view of the tile (fp32 cache: the rows themselves, no copy;
//                         bf16/fp16: converted once into a small per-thread buffer, then
//                         reused by every query row);
//   3. K::scores        : S[rows, 16] = Q . K^T (the small GEMM over 576 columns), in the
//                         log2 domain (softmax_scale * log2(e) folded into q or S);
//   4. K::softmax_row   : mask invisible keys, online max / sum update, P = 2^(S - max),
//                         and the factor corr = 2^(old max - new max) for the accumulator;
//   5. K::pv            : acc[rows, 512] = corr * acc + P . V, V = the first 512 columns
//                         of the same tile rows (the second small GEMM).
//
// Kernel interface K (see avx2_kernels.h for the reference implementation):
//   using QElt; static constexpr int kQStride;        prepared-query element and row stride
//   template <class CT> static void load_q(p, seq, row_begin, rows, s2scale, QElt* q);
//   template <class CT> using TileT;                   element type of the prepared tile rows
//                                                      (float, or uint16_t for the bf16 kernel)
//   template <class CT> static void prepare_tile(const CT::T* const* raw, int n, float* kbuf,
//                                                const float* zero, const TileT** kf);
//   template <class CT> static void scores(const QElt* q, int rows, const CT::T* const* raw,
//                                          const TileT* const* kf, float s2scale, float* s,
//                                          Prefetcher& pf);
//   static void softmax_row(const float* s, int visible, float* max, float* sum, float* p,
//                           float* corr);
//   static void pv(const float* p, const float* corr, const TileT* const* vf, int n, int rows,
//                  float* acc, Prefetcher& pf);
//   template <class CT> static void finish(float* acc, int rows);   after the last tile (a
//                                                      kernel may keep acc's columns permuted)
//   static int prefetch_steps(int rows);               pf.step() calls per tile (0: none)
// scores / pv call pf.step() once per register block, which spreads the prefetches of the
// next tile's rows over the current tile's compute.


// Fully unroll a micro-kernel's constant-trip loops early, so that its accumulator arrays
// live in registers. Without it, under -fwrapv (part of Python's CFLAGS and therefore of
// every torch extension build) GCC 12 stores the accumulators to the stack on every
// iteration of the key loop, which halves the PV kernel's speed.
#define MLA_UNROLL _Pragma("GCC unroll 16")

// Prefetches the next tile's cache rows a few lines at a time. Why: the kernels read a tile
// four rows at a time, which the hardware prefetcher does not run ahead of, and issuing a
// whole tile's 288 lines (bf16) at once fills the miss buffers and stalls the core. A few
// lines per register block keeps a steady trickle of requests under a tile of compute.
// The kernel says how many steps a tile takes (K::prefetch_steps(rows)); the lines are
// spread so that they are all requested by about three quarters of the tile (h = 16, bf16:
// 3 lines per step). A kernel that never steps (the portable one) returns 0: no prefetch.
struct Prefetcher {
  const char* rows[kKeyTile];
  int num_rows = 0;   // rows of the next tile
  int row_bytes = 0;  // bytes of one cache row (a multiple of 64: 576 x 1, 2 or 4)
  int per_step = 0;   // lines per step
  int row = 0;        // where the next prefetch goes: rows[row] + offset
  int offset = 0;
  void start(int n, int steps) {
    num_rows = steps > 0 ? n : 0;
    const int lines = num_rows * (row_bytes / 64);
    const int budget = steps - steps / 4;  // steps in the first three quarters of the tile
    per_step = budget > 0 ? (lines + budget - 1) / budget : 0;
    row = 0;
    offset = 0;
  }
  void step() {  // counters, not a division per line: this runs ~100 times per tile
    for (int i = 0; i < per_step && row < num_rows; ++i) {
      __builtin_prefetch(rows[row] + offset, 0, 3);
      offset += 64;
      if (offset == row_bytes) {
        offset = 0;
        ++row;
      }
    }
  }
};

// Cache element types: T is the storage type, kType the runtime tag, Q the element type
// of the query (the cache's own type, except for fp8 caches whose query comes as fp32).
struct CacheF32 { using T = float; static constexpr DType kType = DType::kFloat32; using Q = CacheF32; };
struct CacheF16 { using T = uint16_t; static constexpr DType kType = DType::kFloat16; using Q = CacheF16; };
struct CacheBF16 { using T = uint16_t; static constexpr DType kType = DType::kBFloat16; using Q = CacheBF16; };
// float8_e4m3fn: tiles hold the stored value times 2^-8 (exact; see kFp8TileScale), and
// the per-tensor scale is folded into q for the scores and into the output in the merge,
// so the kernels never multiply a cache element by the scale.
struct CacheFP8 { using T = uint8_t; static constexpr DType kType = DType::kFloat8E4M3; using Q = CacheF32; };

// Defaults of the kernel interface: fp32 tiles, accumulators in natural column order.
struct KernelDefaults {
  template <class CT>
  using TileT = float;
  template <class CT>
  static void finish(float*, int) {}
};

// Where query row `row` (= j * h + head) of sequence `seq` starts: its 512 latent values
// and its 64 rope values, in the query's element type T.
template <class T>
struct QueryRow {
  const T* nope;
  const T* pe;
};
template <class T>
inline QueryRow<T> query_row(const DecodeParams& p, int32_t seq, int32_t row) {
  const int32_t j = row / p.num_heads, head = row % p.num_heads;
  return {static_cast<const T*>(p.q_nope) + seq * p.q_nope_batch_stride + j * p.q_nope_seq_stride +
              head * p.q_nope_head_stride,
          static_cast<const T*>(p.q_pe) + seq * p.q_pe_batch_stride + j * p.q_pe_seq_stride +
              head * p.q_pe_head_stride};
}

// A row count as a type, so that a register block's height can be a template argument.
template <int N>
struct Rows {
  static constexpr int value = N;
};
template <int N, class F>
inline void row_tail(int n, int r, F& f) {
  if constexpr (N > 0) {
    if (n == N) f(Rows<N>{}, r);
    else row_tail<N - 1>(n, r, f);
  }
}
// The row loop of every micro-kernel: f(Rows<RB>{}, r) for r = 0, RB, 2 RB, ..., then once
// f(Rows<rows - r>{}, r) for the remaining rows (each tail height compiled on its own).
template <int RB, class F>
inline void for_row_blocks(int rows, F&& f) {
  int r = 0;
  for (; r + RB <= rows; r += RB) f(Rows<RB>{}, r);
  row_tail<RB - 1>(rows - r, r, f);
}

// Prefetcher::step() calls per tile of a kernel that steps once per score block (score_rb
// rows x score_kb keys) and once per PV block (pv_rb rows x pv_cols columns).
constexpr int register_block_steps(int rows, int score_rb, int score_kb, int pv_rb, int pv_cols) {
  return (rows + score_rb - 1) / score_rb * (kKeyTile / score_kb) + (rows + pv_rb - 1) / pv_rb * (kLatentDim / pv_cols);
}

constexpr float kLog2e = 1.4426950408889634f;
constexpr int kPtrSlots = kKeyTile + 8;  // tile row pointers, padded for key blocks past 16

inline size_t align64(size_t x) { return (x + 63) & ~static_cast<size_t>(63); }

// Byte offsets of the per-thread scratch areas (each 64-byte aligned).
struct ScratchLayout {
  size_t q, kbuf, s, p, corr, run_max, run_sum, limit, raw, kf, zero, total;
  ScratchLayout(int32_t rows, size_t q_row_bytes) {
    size_t o = 0;
    q = o;     o = align64(o + static_cast<size_t>(rows) * q_row_bytes);
    kbuf = o;  o = align64(o + sizeof(float) * kKeyTile * kHeadDim);
    s = o;     o = align64(o + sizeof(float) * static_cast<size_t>(rows) * kScoreStride);
    p = o;     o = align64(o + sizeof(float) * static_cast<size_t>(rows) * kScoreStride);
    corr = o;  o = align64(o + sizeof(float) * static_cast<size_t>(rows));
    run_max = o; o = align64(o + sizeof(float) * static_cast<size_t>(rows));
    run_sum = o; o = align64(o + sizeof(float) * static_cast<size_t>(rows));
    limit = o; o = align64(o + sizeof(int32_t) * static_cast<size_t>(rows));
    raw = o;   o = align64(o + sizeof(void*) * kPtrSlots);
    kf = o;    o = align64(o + sizeof(void*) * kPtrSlots);
    zero = o;  o = align64(o + sizeof(float) * kHeadDim);
    total = o;
  }
};

// Whether the V part (columns [0, 512)) of a cache row holds an inf or NaN.
// Cache rows of consecutive keys of one sequence, from key `key` on, walked with a (block,
// offset) cursor: no division per key. Only blocks holding the keys asked for are looked up.
template <class T>
struct CacheRowCursor {
  const T* cache;
  const int32_t* table;  // the sequence's block-table row
  const DecodeParams& p;
  int64_t block;
  int32_t offset;
  CacheRowCursor(const DecodeParams& params, int32_t seq, int32_t key)
      : cache(static_cast<const T*>(params.cache)),
        table(params.block_table + static_cast<int64_t>(seq) * params.block_table_batch_stride),
        p(params),
        block(key / params.block_size),
        offset(key % params.block_size) {}
  const T* operator()() {
    const T* row = cache + static_cast<int64_t>(table[block]) * p.cache_block_stride +
                   static_cast<int64_t>(offset) * p.cache_token_stride;
    if (++offset == p.block_size) {
      offset = 0;
      ++block;
    }
    return row;
  }
};

template <class CT>
inline bool v_has_nonfinite(const typename CT::T* row) {
  for (int d = 0; d < kLatentDim; ++d) {
    if constexpr (CT::kType == DType::kFloat32) {
      uint32_t u;
      __builtin_memcpy(&u, row + d, 4);
      if ((u & 0x7f800000u) == 0x7f800000u) return true;
    } else if constexpr (CT::kType == DType::kBFloat16) {
      if ((row[d] & 0x7f80u) == 0x7f80u) return true;
    } else if constexpr (CT::kType == DType::kFloat16) {
      if ((row[d] & 0x7c00u) == 0x7c00u) return true;
    } else {
      if ((row[d] & 0x7fu) == 0x7fu) return true;  // e4m3fn: NaN is the only non-finite code
    }
  }
  return false;
}

template <class K>
size_t scratch_bytes_impl(int32_t max_rows) {
  return ScratchLayout(max_rows, K::kQStride * sizeof(typename K::QElt)).total;
}

template <class K, class CT>
void run_item_impl(const DecodeParams& p, const DecodeItem& it, PartialOut out, void* scratch) {
  using T = typename CT::T;
  using QElt = typename K::QElt;
  using TileT = typename K::template TileT<CT>;
  const int32_t rows = it.row_end - it.row_begin;
  const ScratchLayout lay(rows, K::kQStride * sizeof(QElt));
  char* base = static_cast<char*>(scratch);
  QElt* q = reinterpret_cast<QElt*>(base + lay.q);
  float* kbuf = reinterpret_cast<float*>(base + lay.kbuf);
  float* s = reinterpret_cast<float*>(base + lay.s);
  float* pr = reinterpret_cast<float*>(base + lay.p);
  float* corr = reinterpret_cast<float*>(base + lay.corr);
  // The running max / sum stay in this thread's scratch until the item ends: the partials
  // of items on other threads may share their cache lines.
  float* run_max = reinterpret_cast<float*>(base + lay.run_max);
  float* run_sum = reinterpret_cast<float*>(base + lay.run_sum);
  int32_t* limit = reinterpret_cast<int32_t*>(base + lay.limit);
  const T** raw = reinterpret_cast<const T**>(base + lay.raw);
  const TileT** kf = reinterpret_cast<const TileT**>(base + lay.kf);
  Prefetcher pf;
  pf.row_bytes = static_cast<int>(kHeadDim * sizeof(T));
  static_assert(kHeadDim * sizeof(T) % 64 == 0, "cache rows are whole 64-byte lines");
  float* zero = reinterpret_cast<float*>(base + lay.zero);
  for (int d = 0; d < kHeadDim; ++d) zero[d] = 0.f;  // all-zero bits: a zero row in every dtype

  float s2scale = p.softmax_scale * kLog2e;
  if constexpr (CT::kType == DType::kFloat8E4M3) s2scale *= *p.kv_scale * kFp8TileScale;
  K::template load_q<CT>(p, it.seq, it.row_begin, rows, s2scale, q);

  const int32_t len = p.cache_seqlens[it.seq];
  int32_t min_limit = it.key_end;  // keys [min_limit, key_end) are masked for some rows (causal band)
  for (int32_t r = 0; r < rows; ++r) {
    limit[r] = visible_keys(len, p.seqlen_q, (it.row_begin + r) / p.num_heads, p.causal);
    min_limit = limit[r] < min_limit ? limit[r] : min_limit;
  }
  for (int64_t i = 0; i < static_cast<int64_t>(rows) * kLatentDim; ++i) out.acc[i] = 0.f;
  for (int32_t r = 0; r < rows; ++r) {
    run_max[r] = -__builtin_inff();
    run_sum[r] = 0.f;
  }

  for (int i = 0; i < kPtrSlots; ++i) {
    raw[i] = reinterpret_cast<const T*>(zero);
    kf[i] = reinterpret_cast<const TileT*>(zero);
  }

  CacheRowCursor<T> next_row(p, it.seq, it.key_begin);
  // pf.rows always holds the rows of the tile after the current one.
  const int prefetch_steps = K::prefetch_steps(rows);
  const int first_n = it.key_end - it.key_begin < kKeyTile ? it.key_end - it.key_begin : kKeyTile;
  for (int i = 0; i < first_n; ++i) pf.rows[i] = reinterpret_cast<const char*>(next_row());

  for (int32_t t0 = it.key_begin; t0 < it.key_end; t0 += kKeyTile) {
    const int n = it.key_end - t0 < kKeyTile ? it.key_end - t0 : kKeyTile;
    for (int i = 0; i < n; ++i) raw[i] = reinterpret_cast<const T*>(pf.rows[i]);
    for (int i = n; i < kKeyTile; ++i) raw[i] = reinterpret_cast<const T*>(zero);
    const int32_t after = it.key_end - t0 - n;
    const int next_n = after < kKeyTile ? after : kKeyTile;
    for (int i = 0; i < next_n; ++i) pf.rows[i] = reinterpret_cast<const char*>(next_row());
    pf.start(next_n, prefetch_steps);

    K::template prepare_tile<CT>(raw, n, kbuf, zero, kf);

    K::template scores<CT>(q, rows, raw, kf, s2scale, s, pf);
    for (int32_t r = 0; r < rows; ++r) {
      int32_t visible = limit[r] - t0;
      visible = visible < 0 ? 0 : (visible > n ? n : visible);
      K::softmax_row(s + r * kScoreStride, visible, run_max + r, run_sum + r, pr + r * kScoreStride, corr + r);
    }
    // A masked key has P = 0, but 0 * inf / NaN is NaN: if a key of the causal band holds a
    // non-finite V value, each row takes only the keys it sees (rare; finite data never).
    bool band_nonfinite = false;
    for (int i = min_limit > t0 ? min_limit - t0 : 0; i < n && !band_nonfinite; ++i)
      band_nonfinite = v_has_nonfinite<CT>(raw[i]);
    if (!band_nonfinite) {
      K::pv(pr, corr, kf, n, rows, out.acc, pf);
    } else {
      for (int32_t r = 0; r < rows; ++r) {
        int32_t visible = limit[r] - t0;
        visible = visible < 0 ? 0 : (visible > n ? n : visible);
        K::pv(pr + r * kScoreStride, corr + r, kf, visible, 1, out.acc + static_cast<int64_t>(r) * kLatentDim, pf);
      }
    }
  }
  K::template finish<CT>(out.acc, rows);
  for (int32_t r = 0; r < rows; ++r) {
    out.max[r] = run_max[r];
    out.sum[r] = run_sum[r];
  }
}
