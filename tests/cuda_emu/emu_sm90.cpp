// Hopper extensions of the SIMT emulator (see emu_sm90.h for the model, docs/cuda-emulation.md
// for what it does not model). Built like emu_runtime.cpp: optimised, and under the tsan flavour
// not instrumented but annotating the kernel's memory traffic by hand.
#include "emu_sm90.h"

#include <cmath>
#include <cstdio>
#include <cstring>
#include <deque>
#include <map>
#include <string>
#include <vector>

#include "emu_runtime.h"

#if defined(MLA_EMU_TSAN)
#include <sanitizer/tsan_interface.h>
extern "C" void __tsan_read_range(void* addr, unsigned long size);
extern "C" void __tsan_write_range(void* addr, unsigned long size);
#define TSAN_READ(p, n) __tsan_read_range(const_cast<void*>(static_cast<const void*>(p)), n)
#define TSAN_WRITE(p, n) __tsan_write_range(static_cast<void*>(p), n)
#define TSAN_RELEASE(p) __tsan_release(static_cast<void*>(p))
#define TSAN_ACQUIRE(p) __tsan_acquire(static_cast<void*>(p))
#else
#define TSAN_READ(p, n) ((void)0)
#define TSAN_WRITE(p, n) ((void)0)
#define TSAN_RELEASE(p) ((void)0)
#define TSAN_ACQUIRE(p) ((void)0)
#endif

namespace mla_emu {
unsigned char* dynamic_smem();  // emu_runtime.cpp: the running block's shared window
namespace sm90 {
namespace {

unsigned char* smem_base() { return dynamic_smem(); }

std::string hexs(uint64_t v) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "0x%llx", static_cast<unsigned long long>(v));
  return buf;
}

[[noreturn]] void error(const std::string& msg) { fail(where_current() + ": " + msg); }

// ---- Swizzle: XOR of address bits [7, 7 + b) into bits [4, 4 + b) of the shared address
// (CuTe's Swizzle<b, 4, 3>); b = 3, 2, 1 for the 128, 64, 32-byte modes.
uint32_t swizzle(uint32_t addr, int swizzle_bytes) {
  const int bits = swizzle_bytes == 128 ? 3 : swizzle_bytes == 64 ? 2 : swizzle_bytes == 32 ? 1 : 0;
  const uint32_t mask = (1u << bits) - 1u;
  return addr ^ (((addr >> 7) & mask) << 4);
}

// ---- Bulk copies in flight, per mbarrier.
struct BulkCopy {
  int kind = 0;  // 0: 1-D, 1: TMA 2-D
  unsigned char* dst = nullptr;
  const unsigned char* src = nullptr;
  uint32_t bytes = 0;
  TensorMap2D map;
  int32_t c0 = 0, c1 = 0;
};

struct Mbarrier {
  uint32_t expected = 0, pending = 0;
  int64_t tx = 0;
  uint64_t phase = 0;  // completed phases
  std::vector<BulkCopy> in_flight;
  char tsan_sync = 0;
};

constexpr uint64_t kMbarrierMagic = 0x5245495252414272ull;  // marks the 8 bytes of a live mbarrier

struct NamedBarrier {
  int expected = 0, arrived = 0;
  uint64_t generation = 0;
  char tsan_sync[2] = {0, 0};
};

// ---- wgmma.
constexpr int kWg = 128;
enum class WgKind { kNone, kFence, kMma, kCommit, kWait, kSetmaxnreg };
const char* wg_name(WgKind k) {
  switch (k) {
    case WgKind::kFence: return "wgmma.fence";
    case WgKind::kMma: return "wgmma.mma_async";
    case WgKind::kCommit: return "wgmma.commit_group";
    case WgKind::kWait: return "wgmma.wait_group";
    case WgKind::kSetmaxnreg: return "setmaxnreg";
    default: return "none";
  }
}

struct WgArgs {
  float* acc = nullptr;
  const uint32_t* a_regs = nullptr;  // wgmma with A from registers (RS), else nullptr
  int kind = 0, n = 0, trans_a = 0, trans_b = 0, value = 0;
  uint64_t desc_a = 0, desc_b = 0;
  bool scale_d = true, increase = false;
};

struct WgOp {
  uint64_t desc_a = 0, desc_b = 0;
  int kind = 0, n = 0, trans_a = 0, trans_b = 0;
  bool scale_d = true;
  float* acc[kWg];
  const uint32_t* a_regs[kWg];  // RS: each thread's A registers (a_regs[0] == nullptr: SS)
  bool chained[kWg];
  std::vector<float> c;                  // [kWg][n / 2]: accumulators captured at issue
  std::vector<uint16_t> a_issue, b_issue;  // operands as they were at issue
};

struct Warpgroup {
  WgKind kind = WgKind::kNone;
  const void* site = nullptr;
  int arrived = 0;
  uint64_t episode = 0;
  WgArgs args[kWg];
  bool fenced[kWg];
  std::vector<WgOp> open;
  std::deque<std::vector<WgOp>> committed;
  char tsan_sync[2] = {0, 0};
};

struct State {
  std::map<uint32_t, Mbarrier> bars;  // by shared address
  NamedBarrier named[16];
  std::vector<Warpgroup> wgs;
};

State& st() {
  static State s;
  return s;
}

// ---- mbarrier helpers.
Mbarrier& bar_at(void* p, const char* op) {
  if (!smem_contains(p, 8) || reinterpret_cast<uintptr_t>(p) % 8 != 0)
    error(std::string(op) + ": mbarrier address is not 8 aligned bytes of shared memory");
  const uint32_t a = smem_address(p);
  auto it = st().bars.find(a);
  uint64_t word;
  std::memcpy(&word, p, 8);
  if (it == st().bars.end()) error(std::string(op) + " on shared address " + hexs(a) + ", which holds no initialised mbarrier");
  if (word != (kMbarrierMagic ^ a))
    error(std::string(op) + ": the mbarrier at shared address " + hexs(a) +
          " was overwritten by a plain store since its init");
  TSAN_READ(p, 8);  // ordered after the init only through a barrier (or the initialising thread)
  return it->second;
}

std::string bar_state(uint32_t a, const Mbarrier& b) {
  return "mbarrier " + hexs(a) + " (phase " + std::to_string(b.phase) + ", pending arrivals " +
         std::to_string(b.pending) + " of " + std::to_string(b.expected) + ", tx " + std::to_string(b.tx) +
         " bytes, copies in flight " + std::to_string(b.in_flight.size()) + ")";
}

void maybe_complete(Mbarrier& b) {
  if (b.pending == 0 && b.tx == 0) {
    ++b.phase;
    b.pending = b.expected;
    note_progress();
  }
}

void land(BulkCopy& c) {
  if (c.kind == 0) {
    TSAN_READ(c.src, c.bytes);
    TSAN_WRITE(c.dst, c.bytes);
    std::memcpy(c.dst, c.src, c.bytes);
    return;
  }
  const TensorMap2D& m = c.map;
  const uint32_t row_bytes = m.box[0] * m.elem_bytes;
  const uint32_t dst0 = smem_address(c.dst);
  unsigned char* base = c.dst - dst0;
  for (uint32_t y = 0; y < m.box[1]; ++y)
    for (uint32_t x = 0; x < m.box[0]; ++x) {
      const int64_t gx = static_cast<int64_t>(c.c0) + x, gy = static_cast<int64_t>(c.c1) + y;
      unsigned char* d = base + swizzle(dst0 + y * row_bytes + x * m.elem_bytes, m.swizzle_bytes);
      TSAN_WRITE(d, m.elem_bytes);
      if (gx < 0 || gy < 0 || gx >= static_cast<int64_t>(m.dims[0]) || gy >= static_cast<int64_t>(m.dims[1])) {
        std::memset(d, 0, m.elem_bytes);  // out-of-bounds box elements are zero-filled
      } else {
        const unsigned char* s = static_cast<const unsigned char*>(m.base) + gy * m.outer_stride_bytes + gx * m.elem_bytes;
        TSAN_READ(s, m.elem_bytes);
        std::memcpy(d, s, m.elem_bytes);
      }
    }
}

uint32_t copy_bytes(const BulkCopy& c) { return c.kind == 0 ? c.bytes : c.map.box[0] * c.map.box[1] * c.map.elem_bytes; }

// Lands every copy in flight on b (issue order) and completes their bytes.
bool land_all(Mbarrier& b) {
  if (b.in_flight.empty()) return false;
  std::vector<BulkCopy> copies;
  copies.swap(b.in_flight);
  // The copies land in whichever thread polls; for TSan they follow their issue (released at
  // issue_copy) like the async proxy's writes would.
  TSAN_ACQUIRE(&b.tsan_sync);
  for (size_t i = 0; i < copies.size(); ++i) {
    land(copies[i]);
    b.tx -= copy_bytes(copies[i]);
    TSAN_RELEASE(&b.tsan_sync);  // the copy's writes happen before the phase completes
    const uint64_t phase = b.phase;
    maybe_complete(b);
    // A phase that completes while copies issued before it are still in flight: their bytes would
    // count towards the next phase (expect_tx short of the bytes issued), and a GPU's waiter may
    // read their destination before they land.
    if (b.phase != phase && i + 1 < copies.size())
      fail("mbarrier phase " + std::to_string(phase) + " completed with " + std::to_string(copies.size() - i - 1) +
           " of its bulk copies still in flight (expect_tx smaller than the bytes issued?)");
  }
  note_progress();
  return true;
}

void issue_copy(BulkCopy c, void* bar, const char* op) {
  Mbarrier& b = bar_at(bar, op);
  TSAN_WRITE(c.dst, copy_bytes(c));
  std::memset(c.dst, 0xff, copy_bytes(c));  // poisoned (NaN) until the copy lands
  b.in_flight.push_back(c);
  TSAN_RELEASE(&b.tsan_sync);
  note_progress();
}

// ---- Warpgroup rendezvous: every thread of the warpgroup at the same instruction.
Warpgroup& my_warpgroup() {
  const int t = current_thread();
  const int wg = t / kWg;
  if (static_cast<int64_t>(wg + 1) * kWg > block_threads())
    error("a warpgroup instruction in a warpgroup of fewer than 128 threads (block of " +
          std::to_string(block_threads()) + ")");
  return st().wgs[wg];
}

void execute(Warpgroup& g, WgKind kind);

void wg_arrive(WgKind kind, const void* site, const WgArgs& a) {
  Warpgroup& g = my_warpgroup();
  const int t = current_thread() % kWg;
  if (g.arrived == 0) {
    g.kind = kind;
    g.site = site;
  } else if (g.kind != kind || g.site != site) {
    error(std::string("reached ") + wg_name(kind) + " while other threads of its warpgroup wait in " +
          wg_name(g.kind) + " at another instruction; .sync.aligned needs the whole warpgroup converged");
  }
  g.args[t] = a;
  TSAN_RELEASE(&g.tsan_sync[g.episode & 1]);
  const uint64_t episode = g.episode;
  if (++g.arrived == kWg) {
    TSAN_ACQUIRE(&g.tsan_sync[episode & 1]);
    execute(g, kind);
    g.arrived = 0;
    g.kind = WgKind::kNone;
    TSAN_RELEASE(&g.tsan_sync[episode & 1]);
    ++g.episode;
    note_progress();
    return;
  }
  while (g.episode == episode)
    spin_yield(&g, episode, std::string(wg_name(kind)) + " (warpgroup rendezvous, " + std::to_string(g.arrived) +
                                " of 128 threads arrived)");
  TSAN_ACQUIRE(&g.tsan_sync[episode & 1]);
}

// The 16-bit matrix [rows][16] an operand descriptor addresses (PTX ISA, "Matrix Descriptor
// Format" and the canonical layouts of "Shared Memory Matrix Layout"; in units of 16 bytes,
// T = 8 elements, W = swizzle bytes / 16, or 1 without swizzle):
//   K-major   none: ((8,m),(T,2)):((1T,SBO),(1,LBO))       swizzled: ((8,m),(T,2)):((WT,SBO),(1,T))
//   MN-major  none: ((T,1,m),(8,k)):((1,T,SBO),(1T,LBO))   swizzled: ((T,W,m),(8,k)):((1,T,LBO),(WT,SBO))
// then the swizzle XORs shared-address bits [7, 7 + log2 W) into bits [4, ...).
std::vector<uint16_t> read_operand(uint64_t desc, int rows, bool mn_major, const char* which) {
  const uint32_t start = static_cast<uint32_t>(desc & 0x3fff) << 4;
  const uint32_t lbo = static_cast<uint32_t>((desc >> 16) & 0x3fff) << 4;
  const uint32_t sbo = static_cast<uint32_t>((desc >> 32) & 0x3fff) << 4;
  const uint32_t base_offset = static_cast<uint32_t>((desc >> 49) & 7);
  const int layout = static_cast<int>((desc >> 62) & 3);
  const int swz = layout == 1 ? 128 : layout == 2 ? 64 : layout == 3 ? 32 : 0;
  if (base_offset != 0)
    error(std::string("wgmma ") + which + " descriptor has base offset " + std::to_string(base_offset) +
          "; the emulator models base offset 0 only");
  const uint32_t W = swz ? swz / 16 : 1;
  const size_t window = dynamic_smem_size();
  unsigned char* base = smem_base();
  std::vector<uint16_t> m(static_cast<size_t>(rows) * 16);
  for (int r = 0; r < rows; ++r)
    for (int k = 0; k < 16; ++k) {
      uint32_t off;
      if (!mn_major) {
        off = start + (r / 8) * sbo + (r % 8) * 16 * W + (k % 8) * 2 + (k / 8) * (swz ? 16 : lbo);
      } else {
        const uint32_t ni = r % 8, nj = (r / 8) % W, nm = r / (8 * W), kr = k % 8, kg = k / 8;
        off = swz ? start + ni * 2 + nj * 16 + nm * lbo + kr * 16 * W + kg * sbo
                  : start + ni * 2 + nm * sbo + kr * 16 + kg * lbo;
      }
      const uint32_t addr = swizzle(off, swz);
      if (addr + 2 > window)
        error(std::string("wgmma ") + which + " operand element (" + std::to_string(r) + ", " + std::to_string(k) +
              ") at shared address " + hexs(addr) + " lies outside the block's " + std::to_string(window) +
              " bytes of shared memory (descriptor " + hexs(desc) + ")");
      TSAN_READ(base + addr, 2);
      std::memcpy(&m[static_cast<size_t>(r) * 16 + k], base + addr, 2);
    }
  return m;
}

double bf16_to_double(uint16_t x) {
  const uint32_t u = static_cast<uint32_t>(x) << 16;
  float v;
  std::memcpy(&v, &u, 4);
  return v;
}

double fp16_to_double(uint16_t x) {
  const int sign = x >> 15, exp = (x >> 10) & 31, man = x & 1023;
  double v;
  if (exp == 31) v = man ? NAN : INFINITY;
  else if (exp == 0) v = std::ldexp(static_cast<double>(man), -24);  // subnormal
  else v = std::ldexp(static_cast<double>(man + 1024), exp - 25);
  return sign ? -v : v;
}

// Accumulator value i of thread t (0..127) of a 64 x n tile: PTX "wgmma .m64nNk16 D fragment".
inline void acc_coord(int t, int i, int& row, int& col) {
  const int warp = t / 32, lane = t % 32;
  row = 16 * warp + lane / 4 + 8 * ((i % 4) / 2);
  col = 8 * (i / 4) + 2 * (lane % 4) + (i % 2);
}

// The A [64 x 16] of an RS wgmma from the threads' registers (PTX "wgmma .m64nNk16 A fragment":
// the mma.m16n8k16 A layout per warp, warp w on rows 16 w..16 w + 15).
std::vector<uint16_t> gather_a_regs(const uint32_t* const (&regs)[kWg]) {
  std::vector<uint16_t> m(64 * 16);
  for (int t = 0; t < kWg; ++t) {
    const int warp = t / 32, lane = t % 32;
    TSAN_READ(regs[t], 16);
    for (int i = 0; i < 4; ++i)
      for (int h = 0; h < 2; ++h) {
        const int row = 16 * warp + lane / 4 + 8 * (i % 2), col = 2 * (lane % 4) + 8 * (i / 2) + h;
        m[row * 16 + col] = static_cast<uint16_t>(regs[t][i] >> (16 * h));
      }
  }
  return m;
}

std::vector<uint16_t> read_a(const WgOp& op) {
  return op.a_regs[0] != nullptr ? gather_a_regs(op.a_regs) : read_operand(op.desc_a, 64, op.trans_a != 0, "A");
}

void run_op(WgOp& op) {
  const std::vector<uint16_t> a = read_a(op);
  const std::vector<uint16_t> b = read_operand(op.desc_b, op.n, op.trans_b != 0, "B");
  if (a != op.a_issue || b != op.b_issue)
    error(std::string("the ") + (a != op.a_issue ? (op.a_regs[0] ? "register" : "shared-memory") : "shared-memory") +
          (a != op.a_issue ? " A" : " B") +
          " operand of a wgmma.mma_async changed between its issue and the wait_group that completes it");
  const int per = op.n / 2;
  auto to_double = op.kind == 0 ? bf16_to_double : fp16_to_double;
  for (int t = 0; t < kWg; ++t) {
    float* acc = op.acc[t];
    TSAN_WRITE(acc, per * sizeof(float));
    for (int i = 0; i < per; ++i) {
      int row, col;
      acc_coord(t, i, row, col);
      double sum = 0;  // exact products, one final rounding (like the mma.sync model)
      if (op.scale_d) sum = op.chained[t] ? acc[i] : op.c[static_cast<size_t>(t) * per + i];
      for (int k = 0; k < 16; ++k) sum += to_double(a[row * 16 + k]) * to_double(b[col * 16 + k]);
      acc[i] = static_cast<float>(sum);
    }
  }
}

void execute(Warpgroup& g, WgKind kind) {
  switch (kind) {
    case WgKind::kFence:
      for (bool& f : g.fenced) f = true;
      break;
    case WgKind::kSetmaxnreg:
      for (int t = 1; t < kWg; ++t)
        if (g.args[t].value != g.args[0].value || g.args[t].increase != g.args[0].increase)
          error("setmaxnreg with different counts within one warpgroup (" + std::to_string(g.args[0].value) +
                " vs " + std::to_string(g.args[t].value) + ")");
      break;
    case WgKind::kCommit:
      g.committed.push_back(std::move(g.open));
      g.open.clear();
      break;
    case WgKind::kWait: {
      for (int t = 1; t < kWg; ++t)
        if (g.args[t].value != g.args[0].value) error("wgmma.wait_group with different counts within one warpgroup");
      const size_t keep = static_cast<size_t>(g.args[0].value);
      while (g.committed.size() > keep) {
        for (WgOp& op : g.committed.front()) run_op(op);
        g.committed.pop_front();
      }
      for (bool& f : g.fenced) f = false;  // the accumulators are the threads' registers again
      break;
    }
    case WgKind::kMma: {
      const WgArgs& a0 = g.args[0];
      for (int t = 0; t < kWg; ++t) {
        const WgArgs& a = g.args[t];
        if ((a.a_regs == nullptr) != (a0.a_regs == nullptr) || a.kind != a0.kind || a.n != a0.n || a.desc_a != a0.desc_a || a.desc_b != a0.desc_b || a.scale_d != a0.scale_d ||
            a.trans_a != a0.trans_a || a.trans_b != a0.trans_b)
          error("wgmma.mma_async with different descriptors, shape or scale-d within one warpgroup (thread " +
                std::to_string(t) + " vs 0)");
        if (!g.fenced[t])
          error("wgmma.mma_async without a wgmma.fence since the warpgroup's last wgmma.wait_group (thread " +
                std::to_string(t) + " of the warpgroup)");
      }
      if (a0.n < 8 || a0.n > 256 || a0.n % 8 != 0) error("wgmma N must be a multiple of 8 in [8, 256]");
      WgOp op;
      op.desc_a = a0.desc_a;
      op.desc_b = a0.desc_b;
      op.kind = a0.kind;
      op.n = a0.n;
      op.trans_a = a0.trans_a;
      op.trans_b = a0.trans_b;
      op.scale_d = a0.scale_d;
      for (int t = 0; t < kWg; ++t) op.a_regs[t] = g.args[t].a_regs;
      op.a_issue = read_a(op);
      op.b_issue = read_operand(op.desc_b, op.n, op.trans_b != 0, "B");
      const int per = op.n / 2;
      op.c.assign(static_cast<size_t>(kWg) * per, 0.f);
      for (int t = 0; t < kWg; ++t) {
        float* acc = g.args[t].acc;
        op.acc[t] = acc;
        op.chained[t] = false;
        // An earlier wgmma still in flight on the same registers: this one accumulates onto its
        // result (PTX orders accumulator accesses of same-shape wgmmas). Partial overlap is a bug.
        auto check = [&](const WgOp& prev) {
          const float* p = prev.acc[t];
          if (p == acc && prev.n == op.n) {
            op.chained[t] = true;
          } else if (p < acc + per && acc < p + prev.n / 2) {
            error("wgmma.mma_async accumulators overlap those of a wgmma still in flight with another shape");
          }
        };
        for (const auto& grp : g.committed)
          for (const WgOp& prev : grp) check(prev);
        for (const WgOp& prev : g.open) check(prev);
        if (!op.chained[t]) {
          TSAN_READ(acc, per * sizeof(float));
          TSAN_WRITE(acc, per * sizeof(float));
          std::memcpy(&op.c[static_cast<size_t>(t) * per], acc, per * sizeof(float));
          std::memset(acc, 0xff, per * sizeof(float));  // NaN until the covering wait_group
        }
      }
      g.open.push_back(std::move(op));
      break;
    }
    default: break;
  }
}

// ---- Block hooks.
void block_begin() {
  State& s = st();
  s.bars.clear();
  for (NamedBarrier& b : s.named) b = NamedBarrier{};
  s.wgs.assign(static_cast<size_t>(block_threads() / kWg), Warpgroup{});
  for (Warpgroup& g : s.wgs)
    for (bool& f : g.fenced) f = false;
}

void block_end() {
  State& s = st();
  for (auto& [addr, b] : s.bars)
    if (!b.in_flight.empty())
      fail("a block exited with " + std::to_string(b.in_flight.size()) + " bulk copies in flight on mbarrier " +
           hexs(addr) + " (nobody waited for them)");
  for (size_t i = 0; i < s.wgs.size(); ++i)
    if (!s.wgs[i].open.empty() || !s.wgs[i].committed.empty())
      fail("warpgroup " + std::to_string(i) + " exited with wgmma.mma_async operations no wgmma.wait_group covered");
}

bool block_stall() {
  bool any = false;
  for (auto& [addr, b] : st().bars) any = land_all(b) || any;
  return any;
}

const bool registered = [] {
  BlockHooks h;
  h.begin = block_begin;
  h.end = block_end;
  h.on_stall = block_stall;
  add_block_hooks(h);
  return true;
}();

}  // namespace

// ---- Entry points (never inlined: __builtin_return_address(0) is the kernel's call site).
uint32_t smem_address(const void* p) {
  return static_cast<uint32_t>(static_cast<const unsigned char*>(p) - smem_base());
}

void mbarrier_init(void* bar, uint32_t arrivals) {
  if (!smem_contains(bar, 8) || reinterpret_cast<uintptr_t>(bar) % 8 != 0)
    error("mbarrier.init: address is not 8 aligned bytes of shared memory");
  if (arrivals == 0 || arrivals > (1u << 20) - 1) error("mbarrier.init: arrival count out of [1, 2^20 - 1]");
  const uint32_t a = smem_address(bar);
  Mbarrier& b = st().bars[a];
  if (!b.in_flight.empty()) error("mbarrier.init on an mbarrier with bulk copies in flight");
  b = Mbarrier{};
  b.expected = b.pending = arrivals;
  const uint64_t word = kMbarrierMagic ^ a;
  TSAN_WRITE(bar, 8);
  std::memcpy(bar, &word, 8);
  note_progress();
}

uint64_t mbarrier_arrive(void* bar) {
  Mbarrier& b = bar_at(bar, "mbarrier.arrive");
  const uint64_t token = b.phase;
  if (b.pending == 0)  // only possible while bytes are outstanding: an arrival of the next phase
    error("mbarrier.arrive on " + bar_state(smem_address(bar), b) +
          ": more arrivals than its count before the phase completed");
  TSAN_RELEASE(&b.tsan_sync);
  --b.pending;
  maybe_complete(b);
  note_progress();
  return token;
}

uint64_t mbarrier_arrive_expect_tx(void* bar, uint32_t tx_bytes) {
  Mbarrier& b = bar_at(bar, "mbarrier.arrive.expect_tx");
  if (tx_bytes > (1u << 20) - 1) error("mbarrier.arrive.expect_tx: tx count out of range");
  b.tx += tx_bytes;
  return mbarrier_arrive(bar);
}

bool mbarrier_try_wait_parity(void* bar, uint32_t parity) {
  Mbarrier& b = bar_at(bar, "mbarrier.try_wait.parity");
  if ((b.phase & 1) == (parity & 1)) land_all(b);  // lazy copies land when someone waits for them
  if ((b.phase & 1) != (parity & 1)) {
    TSAN_ACQUIRE(&b.tsan_sync);
    return true;
  }
  spin_yield(&b, b.phase,
             "mbarrier.try_wait.parity " + std::to_string(parity & 1) + " on " + bar_state(smem_address(bar), b));
  return false;
}

void fence_mbarrier_init() {}  // one CTA: the init is ordered by the barrier that must follow it
void fence_proxy_async() {}    // not modeled (docs/cuda-emulation.md)

void bulk_copy_g2s(void* smem_dst, const void* global_src, uint32_t bytes, void* bar) {
  if (bytes == 0 || bytes % 16 != 0) error("cp.async.bulk: size " + std::to_string(bytes) + " is not a multiple of 16");
  if (!smem_contains(smem_dst, bytes) || reinterpret_cast<uintptr_t>(smem_dst) % 16 != 0)
    error("cp.async.bulk: destination is not 16-aligned bytes inside shared memory");
  if (reinterpret_cast<uintptr_t>(global_src) % 16 != 0) error("cp.async.bulk: source is not 16-byte aligned");
  BulkCopy c;
  c.dst = static_cast<unsigned char*>(smem_dst);
  c.src = static_cast<const unsigned char*>(global_src);
  c.bytes = bytes;
  issue_copy(c, bar, "cp.async.bulk");
}

namespace {
uint64_t g_tma_boxes = 0;
}  // namespace
uint64_t tma_boxes_issued() { return g_tma_boxes; }

void tma_load_2d(void* smem_dst, const TensorMap2D* map, int32_t c0, int32_t c1, void* bar) {
  ++g_tma_boxes;
  const TensorMap2D& m = *map;
  const uint32_t row_bytes = m.box[0] * m.elem_bytes;
  if (m.elem_bytes != 1 && m.elem_bytes != 2 && m.elem_bytes != 4) error("tensor map: element size");
  if (row_bytes % 16 != 0 || m.box[1] == 0 || m.box[1] > 256 || m.box[0] > 256)
    error("tensor map: the box's inner extent must be a multiple of 16 bytes, each extent at most 256");
  if (m.swizzle_bytes != 0 && row_bytes > static_cast<uint32_t>(m.swizzle_bytes))
    error("tensor map: the box's inner extent (" + std::to_string(row_bytes) + " B) exceeds the swizzle span");
  if (m.outer_stride_bytes % 16 != 0 || reinterpret_cast<uintptr_t>(m.base) % 16 != 0)
    error("tensor map: base and outer stride must be 16-byte aligned");
  const uint32_t bytes = row_bytes * m.box[1];
  if (!smem_contains(smem_dst, bytes) || reinterpret_cast<uintptr_t>(smem_dst) % 128 != 0)
    error("cp.async.bulk.tensor: destination is not 128-aligned bytes inside shared memory");
  BulkCopy c;
  c.kind = 1;
  c.dst = static_cast<unsigned char*>(smem_dst);
  c.map = m;
  c.c0 = c0;
  c.c1 = c1;
  issue_copy(c, bar, "cp.async.bulk.tensor.2d");
}

namespace {
void named_arrive(int id, int threads, bool wait) {
  if (id < 1 || id > 15) error("named barrier id " + std::to_string(id) + " outside 1..15 (0 is __syncthreads')");
  if (threads <= 0 || threads % 32 != 0 || threads > block_threads())
    error("named barrier thread count " + std::to_string(threads) + " is not a positive multiple of 32 within the block");
  NamedBarrier& b = st().named[id];
  if (b.arrived == 0) b.expected = threads;
  else if (b.expected != threads)
    error("named barrier " + std::to_string(id) + " reached with counts " + std::to_string(threads) + " and " +
          std::to_string(b.expected));
  const uint64_t gen = b.generation;
  TSAN_RELEASE(&b.tsan_sync[gen & 1]);
  note_progress();
  if (++b.arrived == b.expected) {
    b.arrived = 0;
    ++b.generation;
  } else if (wait) {
    while (b.generation == gen)
      spin_yield(&b, gen, "bar.sync " + std::to_string(id) + ", " + std::to_string(threads) + " (" +
                              std::to_string(b.arrived) + " arrived)");
  }
  if (wait) TSAN_ACQUIRE(&b.tsan_sync[gen & 1]);
}
}  // namespace

void named_barrier_sync(int id, int threads) { named_arrive(id, threads, true); }
void named_barrier_arrive(int id, int threads) { named_arrive(id, threads, false); }

void setmaxnreg(int registers, bool increase) {
  if (registers < 24 || registers > 256 || registers % 8 != 0)
    error("setmaxnreg " + std::to_string(registers) + ": the count must be a multiple of 8 in [24, 256]");
  WgArgs a;
  a.value = registers;
  a.increase = increase;
  wg_arrive(WgKind::kSetmaxnreg, __builtin_return_address(0), a);
}

void wgmma_fence() { wg_arrive(WgKind::kFence, __builtin_return_address(0), WgArgs{}); }
void wgmma_commit_group() { wg_arrive(WgKind::kCommit, __builtin_return_address(0), WgArgs{}); }
void wgmma_wait_group(int pending) {
  WgArgs a;
  a.value = pending;
  wg_arrive(WgKind::kWait, __builtin_return_address(0), a);
}

void wgmma_rs(int kind, float* acc, int n, const uint32_t* a_regs, uint64_t desc_b, bool scale_d, int trans_b) {
  WgArgs a;
  a.kind = kind;
  a.acc = acc;
  a.n = n;
  a.a_regs = a_regs;
  a.desc_b = desc_b;
  a.scale_d = scale_d;
  a.trans_b = trans_b;
  wg_arrive(WgKind::kMma, __builtin_return_address(0), a);
}

void wgmma_ss(int kind, float* acc, int n, uint64_t desc_a, uint64_t desc_b, bool scale_d, int trans_a,
              int trans_b) {
  WgArgs a;
  a.kind = kind;
  a.acc = acc;
  a.n = n;
  a.desc_a = desc_a;
  a.desc_b = desc_b;
  a.scale_d = scale_d;
  a.trans_a = trans_a;
  a.trans_b = trans_b;
  wg_arrive(WgKind::kMma, __builtin_return_address(0), a);
}

}  // namespace sm90
}  // namespace mla_emu
