// SIMT emulator runtime: runs a CUDA grid on one host thread, block after block, each CUDA
// thread a fiber with its own stack. A fiber runs until it reaches a barrier, a warp
// collective or its end; the scheduler then resumes the next runnable fiber in the configured
// order (forward, reverse or seeded random, reshuffled every round). See docs/cuda-emulation.md.
#include "emu_runtime.h"

#include <sys/mman.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "mla_cuda_emu.h"
#include "emu_sm90.h"  // polling waits and block hooks of the sm_90 extensions (emu_sm90.cpp)

#if defined(__SANITIZE_ADDRESS__)
#define MLA_EMU_ASAN 1
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#endif
// The tsan flavour builds this file WITHOUT -fsanitize=thread (-DMLA_EMU_TSAN=1): the
// emulator's own bookkeeping is shared by all fibers by design and must not be checked. The
// kernel's memory traffic that passes through here (cp.async, ldmatrix) is reported to TSan
// by hand, attributed to the CUDA thread that issues it.
#if defined(MLA_EMU_TSAN)
#include <sanitizer/tsan_interface.h>
extern "C" void __tsan_read_range(void* addr, unsigned long size);
extern "C" void __tsan_write_range(void* addr, unsigned long size);
#define MLA_EMU_TSAN_READ(p, n) __tsan_read_range(const_cast<void*>(static_cast<const void*>(p)), n)
#define MLA_EMU_TSAN_WRITE(p, n) __tsan_write_range(static_cast<void*>(p), n)
#else
#define MLA_EMU_TSAN_READ(p, n) ((void)0)
#define MLA_EMU_TSAN_WRITE(p, n) ((void)0)
#endif

// ---------------------------------------------------------------------------------------
// x86-64 context switch: saves the callee-saved registers, MXCSR and the x87 control word on
// the current stack, stores the stack pointer to *save_sp and continues on load_sp. About 3x
// cheaper than swapcontext (no signal-mask system call).
extern "C" void mla_emu_switch(void** save_sp, void* load_sp);
extern "C" void mla_emu_fiber_entry();
asm(R"(
  .text
  .globl mla_emu_switch
  .type mla_emu_switch, @function
mla_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size mla_emu_switch, .-mla_emu_switch

  .globl mla_emu_fiber_entry
  .type mla_emu_fiber_entry, @function
mla_emu_fiber_entry:
  movq %r12, %rdi
  callq *%r13
  ud2
  .size mla_emu_fiber_entry, .-mla_emu_fiber_entry
)");

namespace mla_emu {

ThreadCoords* g_current = nullptr;
uint3 g_block_idx;
dim3 g_block_dim, g_grid_dim;

namespace {

constexpr size_t kStackBytes = 256 * 1024;  // sanitizer frames are large
constexpr size_t kGuardBytes = 4096;        // PROT_NONE page below each stack
constexpr size_t kSmemCanary = 64;          // bytes after dynamic shared memory checked per block

enum class State { kRunnable, kAtBarrier, kInCollective, kDone };
enum class CollKind { kNone, kShfl, kVote, kLdmatrix, kLdmatrixTrans, kMmaBf16, kMmaFp16 };

const char* kind_name(CollKind k) {
  switch (k) {
    case CollKind::kShfl: return "__shfl_xor_sync";
    case CollKind::kVote: return "__any_sync";
    case CollKind::kLdmatrix: return "ldmatrix.x4";
    case CollKind::kLdmatrixTrans: return "ldmatrix.x4.trans";
    case CollKind::kMmaBf16: return "mma.m16n8k16.bf16";
    case CollKind::kMmaFp16: return "mma.m16n8k16.f16";
    default: return "none";
  }
}

struct Copy {
  unsigned char* dst;
  const unsigned char* src;  // nullptr: zero-fill (src-size 0)
};

// One lane's operands of a warp collective, filled at arrival.
struct LaneArgs {
  uint32_t value = 0;              // shfl: the lane's value
  int lane_mask = 0;               // shfl: xor partner
  const unsigned char* addr = 0;   // ldmatrix: the row address this lane supplies
  uint32_t a[4] = {0, 0, 0, 0};    // mma A fragment
  uint32_t b[2] = {0, 0};          // mma B fragment
  float c[4] = {0, 0, 0, 0};       // mma C fragment
  uint32_t result[4] = {0, 0, 0, 0};
  float d[4] = {0, 0, 0, 0};
};

struct Fiber : ThreadCoords {
  void* sp = nullptr;
  unsigned char* stack_lo = nullptr;  // usable stack [stack_lo, stack_lo + kStackBytes)
  int linear = 0, lane = 0, warp = 0;
  State state = State::kDone;
  const void* site = nullptr;  // barrier or collective call site
  LaneArgs args;
  std::vector<Copy> open_group;
  std::deque<std::vector<Copy>> committed;
  // Polling waits (spin_yield, sm_90): what the fiber's last yield polled, and whether this
  // resume only polled the same thing again (no progress).
  bool polled = false, repeat_poll = false;
  const void* poll_key = nullptr;
  uint64_t poll_generation = 0;
  std::string poll_what;
#if MLA_EMU_ASAN
  void* fake_stack = nullptr;
#endif
#if MLA_EMU_TSAN
  void* tsan_fiber = nullptr;
#endif
};

struct WarpCollective {
  CollKind kind = CollKind::kNone;
  uint32_t expected = 0;  // lanes that must arrive
  uint32_t arrived = 0;
  const void* site = nullptr;
  uint64_t episode = 0;
  char tsan_sync[2] = {0, 0};  // happens-before objects, alternating per episode
};

struct Region {
  unsigned char* begin;
  size_t bytes;
  std::string name;
  std::vector<int32_t> owner;          // per byte: the block (linear id) that wrote it in this launch
  std::vector<unsigned char> mask;     // per byte: 0xff once a block of this launch wrote it
  std::vector<unsigned char> before;   // the region as the running block found it
};

struct Runtime {
  Config cfg;
  Stats stats;
  std::vector<Fiber> fibers;
  int64_t nthreads = 0;  // threads per block of the running launch
  std::vector<WarpCollective> warps;
  void* main_sp = nullptr;
  unsigned char* smem = nullptr;
  size_t smem_bytes = 0;
  uint64_t barrier_episode = 0;
  char tsan_barrier[2] = {0, 0};
  char tsan_launch = 0;
  char tsan_block_end = 0;
  std::mt19937_64 rng{1};
  std::map<const void*, int> max_dynamic_smem;  // cudaFuncSetAttribute
  cudaError_t last_error = cudaSuccess;
  std::vector<Region> regions;
  int64_t block_linear = 0;
  uint64_t progress = 0;  // note_progress(): a state a polling fiber may wait for changed
  std::vector<BlockHooks> hooks;
#if MLA_EMU_ASAN
  void* main_fake_stack = nullptr;
  const void* main_stack_bottom = nullptr;
  size_t main_stack_size = 0;
#endif
#if MLA_EMU_TSAN
  void* tsan_main = nullptr;
#endif
};

Runtime& rt() {
  static Runtime r;
  return r;
}

Fiber& cur() { return *static_cast<Fiber*>(g_current); }

std::string hex(const void* p) {
  char buf[32];
  std::snprintf(buf, sizeof buf, "%p", p);
  return buf;
}

std::string where() {
  Fiber& f = cur();
  char buf[160];
  std::snprintf(buf, sizeof buf, "block (%u,%u,%u) thread %d (warp %d lane %d)", g_block_idx.x, g_block_idx.y,
                g_block_idx.z, f.linear, f.warp, f.lane);
  return buf;
}

// ---- Switching. Fibers always switch back to the scheduler (the main context).
void switch_to_fiber(Fiber& f) {
  Runtime& r = rt();
  g_current = &f;
  ++r.stats.switches;
#if MLA_EMU_TSAN
  __tsan_switch_to_fiber(f.tsan_fiber, __tsan_switch_to_fiber_no_sync);
#endif
#if MLA_EMU_ASAN
  __sanitizer_start_switch_fiber(&r.main_fake_stack, f.stack_lo, kStackBytes);
#endif
  mla_emu_switch(&r.main_sp, f.sp);
#if MLA_EMU_ASAN
  __sanitizer_finish_switch_fiber(r.main_fake_stack, nullptr, nullptr);
#endif
  g_current = nullptr;
}

void yield_to_scheduler() {
  Runtime& r = rt();
  Fiber& f = cur();
#if MLA_EMU_TSAN
  __tsan_switch_to_fiber(r.tsan_main, __tsan_switch_to_fiber_no_sync);
#endif
#if MLA_EMU_ASAN
  __sanitizer_start_switch_fiber(f.state == State::kDone ? nullptr : &f.fake_stack, r.main_stack_bottom,
                                 r.main_stack_size);
#endif
  mla_emu_switch(&f.sp, r.main_sp);
#if MLA_EMU_ASAN
  __sanitizer_finish_switch_fiber(f.fake_stack, &r.main_stack_bottom, &r.main_stack_size);
#endif
}

KernelBody g_body = nullptr;
void* g_ctx = nullptr;

void complete_copies(Fiber& f, size_t keep);

extern "C" void fiber_main(Fiber* f) {
#if MLA_EMU_ASAN
  __sanitizer_finish_switch_fiber(nullptr, &rt().main_stack_bottom, &rt().main_stack_size);
#endif
#if MLA_EMU_TSAN
  __tsan_acquire(&rt().tsan_launch);
#endif
  g_body(g_ctx);
  if (!f->open_group.empty() || !f->committed.empty())
    fail(where() + " exited with cp.async copies that no cp.async.wait_group covered");
#if MLA_EMU_TSAN
  __tsan_release(&rt().tsan_block_end);
#endif
  f->state = State::kDone;
  yield_to_scheduler();
  __builtin_trap();  // a finished fiber is never resumed
}

void init_fiber(Fiber& f) {
  if (f.stack_lo == nullptr) {
    void* m = mmap(nullptr, kStackBytes + kGuardBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (m == MAP_FAILED) fail("cannot map a fiber stack");
    mprotect(m, kGuardBytes, PROT_NONE);
    f.stack_lo = static_cast<unsigned char*>(m) + kGuardBytes;
  }
#if MLA_EMU_ASAN
  __asan_unpoison_memory_region(f.stack_lo, kStackBytes);  // redzones of the previous block's frames
  f.fake_stack = nullptr;
#endif
  // Initial frame popped by mla_emu_switch: [mxcsr | fpu cw], r15, r14, r13, r12, rbx, rbp, ret.
  uint64_t* sp = reinterpret_cast<uint64_t*>(f.stack_lo + kStackBytes - 16 - 8 * 8);
  uint32_t mxcsr;
  uint16_t fpcw;
  asm volatile("stmxcsr %0" : "=m"(mxcsr));
  asm volatile("fnstcw %0" : "=m"(fpcw));
  sp[0] = static_cast<uint64_t>(mxcsr) | (static_cast<uint64_t>(fpcw) << 32);
  sp[1] = 0;                                           // r15
  sp[2] = 0;                                           // r14
  sp[3] = reinterpret_cast<uint64_t>(&fiber_main);     // r13: entry
  sp[4] = reinterpret_cast<uint64_t>(&f);              // r12: its argument
  sp[5] = 0;                                           // rbx
  sp[6] = 0;                                           // rbp
  sp[7] = reinterpret_cast<uint64_t>(&mla_emu_fiber_entry);
  f.sp = sp;
  f.state = State::kRunnable;
  f.open_group.clear();
  f.committed.clear();
  f.polled = f.repeat_poll = false;
  f.poll_key = nullptr;
  f.poll_what.clear();
#if MLA_EMU_TSAN
  // One TSan fiber per thread slot, reused by later blocks: ordered after them anyway (block
  // end -> launch edges), and creating 256 fibers per block costs more than the block.
  if (f.tsan_fiber == nullptr) f.tsan_fiber = __tsan_create_fiber(0);
#endif
}

bool in_smem(const void* p, size_t bytes) {
  const unsigned char* c = static_cast<const unsigned char*>(p);
  Runtime& r = rt();
  return c >= r.smem && c + bytes <= r.smem + r.smem_bytes;
}

// ---- Warp collectives: arrive, and either complete (last lane) or wait.
// Returns with the collective complete and this lane's results in cur().args.
void warp_arrive(CollKind kind, uint32_t expected, const void* site) {
  Runtime& r = rt();
  Fiber& f = cur();
  WarpCollective& w = r.warps[f.warp];
  const uint32_t bit = 1u << f.lane;
  if (!(expected & bit)) fail(where() + ": " + kind_name(kind) + " called by a lane outside its member mask");
  if (w.arrived == 0) {
    w.kind = kind;
    w.expected = expected;
    w.site = site;
  } else {
    if (w.kind != kind)
      fail(where() + " reached " + kind_name(kind) + " while other lanes of its warp wait in " + kind_name(w.kind));
    if (w.expected != expected) fail(where() + ": lanes of one warp pass different member masks to " + kind_name(kind));
    if (kind != CollKind::kShfl && kind != CollKind::kVote && w.site != site)
      fail(where() + ": lanes of one warp reached " + kind_name(kind) + " at different instructions (" + hex(site) +
           " vs " + hex(w.site) + "); .aligned collectives need the whole warp converged");
  }
#if MLA_EMU_TSAN
  __tsan_release(&w.tsan_sync[w.episode & 1]);
#endif
  w.arrived |= bit;
  if (w.arrived != w.expected) {
    f.state = State::kInCollective;
    f.site = site;
    yield_to_scheduler();
#if MLA_EMU_TSAN
    __tsan_acquire(&w.tsan_sync[(w.episode - 1) & 1]);
#endif
    return;
  }
  // Last lane: every member's operands are in its args; compute all results.
#if MLA_EMU_TSAN
  __tsan_acquire(&w.tsan_sync[w.episode & 1]);
#endif
  const int base = f.warp * 32;
  auto lane_args = [&](int l) -> LaneArgs& { return r.fibers[base + l].args; };
  switch (kind) {
    case CollKind::kShfl:
      ++r.stats.shuffles;
      for (int l = 0; l < 32; ++l) {
        if (!(expected & (1u << l))) continue;
        const int src = l ^ lane_args(l).lane_mask;
        if (src >= 32 || !(expected & (1u << src)))
          fail(where() + ": __shfl_xor_sync lane " + std::to_string(l) + " reads lane " + std::to_string(src) +
               ", which is not in the member mask (undefined value)");
        lane_args(l).result[0] = lane_args(src).value;
      }
      break;
    case CollKind::kVote: {
      ++r.stats.shuffles;
      uint32_t any = 0;
      for (int l = 0; l < 32; ++l)
        if (expected & (1u << l)) any |= lane_args(l).value;
      for (int l = 0; l < 32; ++l)
        if (expected & (1u << l)) lane_args(l).result[0] = any;
      break;
    }
    case CollKind::kLdmatrix:
    case CollKind::kLdmatrixTrans: {
      ++r.stats.ldmatrix;
      // Matrix i's row rr comes from lane 8 i + rr: eight 16-bit values.
      uint16_t m[4][8][8];
      for (int l = 0; l < 32; ++l) std::memcpy(m[l / 8][l % 8], lane_args(l).addr, 16);
      for (int l = 0; l < 32; ++l)
        for (int i = 0; i < 4; ++i) {
          const int g = l / 4, t = l % 4;
          const uint16_t lo = kind == CollKind::kLdmatrix ? m[i][g][2 * t] : m[i][2 * t][g];
          const uint16_t hi = kind == CollKind::kLdmatrix ? m[i][g][2 * t + 1] : m[i][2 * t + 1][g];
          lane_args(l).result[i] = static_cast<uint32_t>(lo) | (static_cast<uint32_t>(hi) << 16);
        }
      break;
    }
    case CollKind::kMmaBf16:
    case CollKind::kMmaFp16: {
      ++r.stats.mma;
      const bool bf16 = kind == CollKind::kMmaBf16;
      auto to_f = [bf16](uint16_t x) -> double {
        if (bf16) {
          const uint32_t u = static_cast<uint32_t>(x) << 16;
          float v;
          std::memcpy(&v, &u, 4);
          return v;
        }
        __half_raw h;
        h.x = x;
        return __half2float(__half(h));
      };
      double A[16][16], B[16][8], C[16][8];
      for (int l = 0; l < 32; ++l) {
        const int g = l / 4, t = l % 4;
        const LaneArgs& a = lane_args(l);
        for (int half = 0; half < 2; ++half) {
          A[g][2 * t + half] = to_f(a.a[0] >> (16 * half));
          A[g + 8][2 * t + half] = to_f(a.a[1] >> (16 * half));
          A[g][2 * t + 8 + half] = to_f(a.a[2] >> (16 * half));
          A[g + 8][2 * t + 8 + half] = to_f(a.a[3] >> (16 * half));
          B[2 * t + half][g] = to_f(a.b[0] >> (16 * half));
          B[2 * t + 8 + half][g] = to_f(a.b[1] >> (16 * half));
        }
        C[g][2 * t] = a.c[0];
        C[g][2 * t + 1] = a.c[1];
        C[g + 8][2 * t] = a.c[2];
        C[g + 8][2 * t + 1] = a.c[3];
      }
      for (int l = 0; l < 32; ++l) {
        const int g = l / 4, t = l % 4;
        const int rows[4] = {g, g, g + 8, g + 8}, cols[4] = {2 * t, 2 * t + 1, 2 * t, 2 * t + 1};
        for (int e = 0; e < 4; ++e) {
          double acc = C[rows[e]][cols[e]];  // products are exact; one rounding at the end
          for (int k = 0; k < 16; ++k) acc += A[rows[e]][k] * B[k][cols[e]];
          lane_args(l).d[e] = static_cast<float>(acc);
        }
      }
      break;
    }
    default: fail("internal: unknown collective");
  }
  w.arrived = 0;
  w.kind = CollKind::kNone;
  ++w.episode;
#if MLA_EMU_TSAN
  __tsan_release(&w.tsan_sync[(w.episode - 1) & 1]);
#endif
  for (int l = 0; l < 32; ++l)
    if ((expected & (1u << l)) && l != f.lane) r.fibers[base + l].state = State::kRunnable;
}

uint32_t warp_lanes(const Fiber& f) {
  // Lanes that exist in this warp (a block size that is not a multiple of 32 has a short last warp).
  const int n = static_cast<int>(rt().nthreads) - f.warp * 32;
  return n >= 32 ? 0xffffffffu : ((1u << n) - 1u);
}

void complete_copies(Fiber& f, size_t keep) {
  while (f.committed.size() > keep) {
    for (const Copy& c : f.committed.front()) {
      MLA_EMU_TSAN_WRITE(c.dst, 16);
      if (c.src != nullptr) {
        MLA_EMU_TSAN_READ(c.src, 16);
        std::memcpy(c.dst, c.src, 16);
      } else {
        std::memset(c.dst, 0, 16);
      }
    }
    f.committed.pop_front();
  }
}

// ---- Scheduling one block.
void describe_deadlock() {
  Runtime& r = rt();
  std::string msg = "deadlock in block (" + std::to_string(g_block_idx.x) + "," + std::to_string(g_block_idx.y) +
                    "," + std::to_string(g_block_idx.z) + "):";
  for (size_t wi = 0; wi < r.warps.size(); ++wi) {
    const WarpCollective& w = r.warps[wi];
    if (w.arrived == 0) continue;
    msg += " warp " + std::to_string(wi) + " waits in " + kind_name(w.kind) + " (lanes arrived 0x";
    char buf[16];
    std::snprintf(buf, sizeof buf, "%08x", w.arrived);
    msg += buf;
    std::snprintf(buf, sizeof buf, "%08x", w.expected);
    msg += std::string(", member mask 0x") + buf + ");";
    int barrier = 0, done = 0;
    for (int l = 0; l < 32; ++l) {
      const size_t i = wi * 32 + l;
      if (static_cast<int64_t>(i) >= r.nthreads || !(w.expected & (1u << l)) || (w.arrived & (1u << l))) continue;
      barrier += r.fibers[i].state == State::kAtBarrier;
      done += r.fibers[i].state == State::kDone;
    }
    msg += " of the missing lanes " + std::to_string(barrier) + " sit at __syncthreads, " + std::to_string(done) +
           " have exited;";
  }
  fail(msg + " a collective reached by part of a warp never completes on a GPU (a hang)");
}

// Every runnable fiber polls (mbarrier try_wait, a warpgroup rendezvous, a named barrier) and
// nothing they wait for can change: on a GPU this block hangs.
void describe_poll_deadlock(int64_t nthreads) {
  Runtime& r = rt();
  std::string msg = "deadlock in block (" + std::to_string(g_block_idx.x) + "," + std::to_string(g_block_idx.y) +
                    "," + std::to_string(g_block_idx.z) + "): no thread can make progress;";
  // Consecutive threads in the same state, one clause each.
  auto state_of = [&](int64_t t) -> std::string {
    const Fiber& f = r.fibers[t];
    switch (f.state) {
      case State::kDone: return "have exited";
      case State::kAtBarrier: return "wait at __syncthreads";
      case State::kInCollective: return "wait in a warp collective";
      default: return f.polled ? "poll " + f.poll_what : "are runnable";
    }
  };
  int64_t start = 0;
  for (int64_t t = 1; t <= nthreads; ++t) {
    if (t < nthreads && state_of(t) == state_of(start)) continue;
    msg += " threads " + std::to_string(start) + "-" + std::to_string(t - 1) + " " + state_of(start) + ";";
    start = t;
  }
  fail(msg);
}

void run_block(int64_t nthreads) {
  Runtime& r = rt();
  for (int64_t t = 0; t < nthreads; ++t) {
    Fiber& f = r.fibers[t];
    f.linear = static_cast<int>(t);
    f.warp = static_cast<int>(t / 32);
    f.lane = static_cast<int>(t % 32);
    f.thread_idx.x = static_cast<unsigned>(t % g_block_dim.x);
    f.thread_idx.y = static_cast<unsigned>((t / g_block_dim.x) % g_block_dim.y);
    f.thread_idx.z = static_cast<unsigned>(t / (static_cast<int64_t>(g_block_dim.x) * g_block_dim.y));
    init_fiber(f);
  }
  for (WarpCollective& w : r.warps) w.arrived = 0, w.kind = CollKind::kNone;
  std::vector<int> order(nthreads);
  for (int64_t t = 0; t < nthreads; ++t) order[t] = static_cast<int>(t);
  if (r.cfg.order == Order::kReverse) std::reverse(order.begin(), order.end());
#if MLA_EMU_TSAN
  __tsan_release(&r.tsan_launch);
#endif
  while (true) {
    if (r.cfg.order == Order::kRandom) std::shuffle(order.begin(), order.end(), r.rng);
    bool ran = false, progress = false;
    const uint64_t progress_before = r.progress;
    for (int t : order) {
      Fiber& f = r.fibers[t];
      if (f.state != State::kRunnable) continue;
      const bool polled_before = f.polled;
      f.polled = f.repeat_poll = false;
      switch_to_fiber(f);
      ran = true;
      // Progress unless the fiber only polled again what it polled at its previous yield.
      if (!(polled_before && f.polled && f.repeat_poll)) progress = true;
    }
    if (ran && (progress || r.progress != progress_before)) continue;
    if (ran) {
      // Every runnable fiber polls a wait that cannot complete by itself: let the async
      // machinery finish what is in flight (bulk copies), else the block hangs.
      bool unblocked = false;
      for (const BlockHooks& h : r.hooks)
        if (h.on_stall != nullptr && h.on_stall()) unblocked = true;
      if (unblocked) continue;
      describe_poll_deadlock(nthreads);
    }
    int64_t done = 0, at_barrier = 0, in_coll = 0;
    for (int64_t t = 0; t < nthreads; ++t) {
      done += r.fibers[t].state == State::kDone;
      at_barrier += r.fibers[t].state == State::kAtBarrier;
      in_coll += r.fibers[t].state == State::kInCollective;
    }
    if (done == nthreads) break;
    if (in_coll > 0) describe_deadlock();
    // Everyone left is at a barrier.
    if (done > 0)
      fail("__syncthreads in block (" + std::to_string(g_block_idx.x) + "," + std::to_string(g_block_idx.y) +
           ") reached by " + std::to_string(at_barrier) + " threads while " + std::to_string(done) +
           " threads of the block have exited (a barrier inside divergent control flow)");
    const void* site = nullptr;
    for (int64_t t = 0; t < nthreads; ++t) {
      const Fiber& f = r.fibers[t];
      if (site == nullptr) site = f.site;
      if (f.site != site)
        fail("divergent __syncthreads in block (" + std::to_string(g_block_idx.x) + "," +
             std::to_string(g_block_idx.y) + "): thread " + std::to_string(t) + " waits at " + hex(f.site) +
             ", thread 0 at " + hex(r.fibers[0].site));
    }
    ++r.stats.barriers;
    ++r.barrier_episode;
    for (int64_t t = 0; t < nthreads; ++t) r.fibers[t].state = State::kRunnable;
  }
#if MLA_EMU_TSAN
  __tsan_acquire(&r.tsan_block_end);
#endif
}

// ---- Write-once regions: before a block, bytes written by earlier blocks of this launch are
// complemented (mask 0xff); after it, any such byte that is not its complement any more was
// written again. Other changed bytes now belong to this block. Word-wise: a region costs a few
// passes of memory bandwidth per block.
template <typename F>
void for_words(Region& g, F&& f) {
  const size_t words = g.bytes / 8;
  for (size_t w = 0; w < words; ++w) f(w * 8, 8);
  if (g.bytes % 8) f(words * 8, g.bytes % 8);
}

uint64_t load(const unsigned char* p, size_t n) {
  uint64_t v = 0;
  std::memcpy(&v, p, n);
  return v;
}

void store(unsigned char* p, uint64_t v, size_t n) { std::memcpy(p, &v, n); }

void regions_before_block() {
  for (Region& g : rt().regions) {
    for_words(g, [&](size_t i, size_t n) {
      const uint64_t m = load(g.mask.data() + i, n);
      if (m) store(g.begin + i, load(g.begin + i, n) ^ m, n);
    });
    std::memcpy(g.before.data(), g.begin, g.bytes);
  }
}

void regions_after_block(int64_t block) {
  for (Region& g : rt().regions) {
    for_words(g, [&](size_t i, size_t n) {
      const uint64_t now = load(g.begin + i, n), diff = now ^ load(g.before.data() + i, n);
      const uint64_t m = load(g.mask.data() + i, n);
      if (diff == 0) {
        if (m) store(g.begin + i, now ^ m, n);  // restore the earlier blocks' bytes
        return;
      }
      for (size_t k = 0; k < n; ++k) {
        const size_t byte = i + k;
        if (g.begin[byte] == g.before[byte]) {
          g.begin[byte] ^= g.mask[byte];
        } else if (g.mask[byte]) {
          fail("blocks " + std::to_string(g.owner[byte]) + " and " + std::to_string(block) +
               " of one launch both write byte " + std::to_string(byte) + " of " + g.name);
        } else {
          g.mask[byte] = 0xff;
          g.owner[byte] = static_cast<int32_t>(block);
        }
      }
    });
  }
}

}  // namespace

Config& config() { return rt().cfg; }
uint3 thread_idx() { return g_current->thread_idx; }
const Stats& stats() { return rt().stats; }

void fail(const std::string& message) {
  std::fprintf(stderr, "mla_emu error: %s\n", message.c_str());
  std::fflush(stderr);
  std::_Exit(kErrorExitCode);
}

void add_write_once_region(void* begin, size_t bytes, const char* name) {
  Region g;
  g.begin = static_cast<unsigned char*>(begin);
  g.bytes = bytes;
  g.name = name;
  rt().regions.push_back(std::move(g));
}

void clear_write_once_regions() { rt().regions.clear(); }

// ---- Device-side entry points.
void syncthreads() {
  Fiber& f = cur();
  f.site = __builtin_return_address(0);
  f.state = State::kAtBarrier;
#if MLA_EMU_TSAN
  Runtime& r = rt();
  const uint64_t episode = r.barrier_episode;
  __tsan_release(&r.tsan_barrier[episode & 1]);
#endif
  yield_to_scheduler();
#if MLA_EMU_TSAN
  __tsan_acquire(&r.tsan_barrier[episode & 1]);
#endif
}

uint32_t shfl_xor_b32(uint32_t mask, uint32_t value, int lane_mask, const void* site) {
  Fiber& f = cur();
  f.args.value = value;
  f.args.lane_mask = lane_mask;
  warp_arrive(CollKind::kShfl, mask, site);
  return cur().args.result[0];
}

bool vote_any(uint32_t mask, bool predicate, const void* site) {
  cur().args.value = predicate ? 1u : 0u;
  warp_arrive(CollKind::kVote, mask, site);
  return cur().args.result[0] != 0;
}

void ldmatrix_x4(uint32_t (&r)[4], const void* smem_addr, bool trans) {
  const void* site = __builtin_return_address(0);
  Fiber& f = cur();
  if (!in_smem(smem_addr, 16) || reinterpret_cast<uintptr_t>(smem_addr) % 16 != 0)
    fail(where() + ": ldmatrix row address " + hex(smem_addr) +
         " is not a 16-byte aligned row inside the block's shared memory");
  if (warp_lanes(f) != 0xffffffffu) fail(where() + ": ldmatrix in a warp of fewer than 32 threads (.aligned needs all 32)");
  f.args.addr = static_cast<const unsigned char*>(smem_addr);
  MLA_EMU_TSAN_READ(smem_addr, 16);  // this lane's row, read at the collective
  warp_arrive(trans ? CollKind::kLdmatrixTrans : CollKind::kLdmatrix, warp_lanes(f), site);
  for (int i = 0; i < 4; ++i) r[i] = cur().args.result[i];
}

void mma_16816(MmaKind kind, float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  const void* site = __builtin_return_address(0);
  Fiber& f = cur();
  if (warp_lanes(f) != 0xffffffffu) fail(where() + ": mma.sync in a warp of fewer than 32 threads (.aligned needs all 32)");
  for (int i = 0; i < 4; ++i) f.args.a[i] = a[i], f.args.c[i] = d[i];
  f.args.b[0] = b0;
  f.args.b[1] = b1;
  warp_arrive(kind == MmaKind::kBf16 ? CollKind::kMmaBf16 : CollKind::kMmaFp16, warp_lanes(f), site);
  for (int i = 0; i < 4; ++i) d[i] = cur().args.d[i];
}

void cp_async_16(void* smem_dst, const void* global_src, bool valid) {
  Fiber& f = cur();
  if (!in_smem(smem_dst, 16) || reinterpret_cast<uintptr_t>(smem_dst) % 16 != 0)
    fail(where() + ": cp.async destination " + hex(smem_dst) + " is not 16 aligned bytes inside shared memory");
  if (valid && reinterpret_cast<uintptr_t>(global_src) % 16 != 0)
    fail(where() + ": cp.async source " + hex(global_src) + " is not 16-byte aligned");
  ++rt().stats.cp_async;
  unsigned char* dst = static_cast<unsigned char*>(smem_dst);
  MLA_EMU_TSAN_WRITE(dst, 16);
  std::memset(dst, 0xff, 16);  // poisoned (NaN in every element type) until a wait covers it
  f.open_group.push_back({dst, valid ? static_cast<const unsigned char*>(global_src) : nullptr});
}

void cp_async_commit() {
  Fiber& f = cur();
  f.committed.push_back(std::move(f.open_group));
  f.open_group.clear();
}

void cp_async_wait(int n) { complete_copies(cur(), static_cast<size_t>(n)); }

unsigned char* dynamic_smem() { return rt().smem; }

// ---- Hooks of the sm_90 extensions (emu_sm90.h).
void spin_yield(const void* key, uint64_t generation, const std::string& what) {
  Fiber& f = cur();
  f.repeat_poll = f.poll_key == key && f.poll_generation == generation && f.poll_what == what;
  f.polled = true;
  f.poll_key = key;
  f.poll_generation = generation;
  f.poll_what = what;
  yield_to_scheduler();
}
void note_progress() { ++rt().progress; }
void add_block_hooks(const BlockHooks& hooks) { rt().hooks.push_back(hooks); }
int current_thread() { return cur().linear; }
int64_t block_threads() { return rt().nthreads; }
size_t dynamic_smem_size() { return rt().smem_bytes; }
bool smem_contains(const void* p, size_t bytes) { return in_smem(p, bytes); }
std::string where_current() { return where(); }

cudaError_t run_grid(const void* kernel_id, dim3 grid, dim3 block, size_t dynamic_smem_bytes, KernelBody body,
                     void* ctx) {
  Runtime& r = rt();
  const int64_t nthreads = static_cast<int64_t>(block.x) * block.y * block.z;
  if (nthreads <= 0 || nthreads > 1024 || grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 ||
      grid.z > 65535)
    return r.last_error = cudaErrorInvalidConfiguration;
  if (dynamic_smem_bytes > 48 * 1024) {
    auto it = r.max_dynamic_smem.find(kernel_id);
    if (it == r.max_dynamic_smem.end() || static_cast<size_t>(it->second) < dynamic_smem_bytes)
      return r.last_error = cudaErrorInvalidValue;  // needs cudaFuncSetAttribute first, as on a GPU
  }
  if (dynamic_smem_bytes > static_cast<size_t>(r.cfg.smem_optin)) return r.last_error = cudaErrorInvalidValue;
  ++r.stats.launches;
#if MLA_EMU_TSAN
  if (r.tsan_main == nullptr) r.tsan_main = __tsan_get_current_fiber();
#endif
  r.rng.seed(r.cfg.seed + r.stats.launches);
  g_block_dim = block;
  g_grid_dim = grid;
  g_body = body;
  g_ctx = ctx;
  // Fibers [0, nthreads) are the block's threads; the vector only grows (stacks are reused).
  if (r.fibers.size() < static_cast<size_t>(nthreads)) r.fibers.resize(nthreads);
  r.nthreads = nthreads;
  r.warps.assign((nthreads + 31) / 32, WarpCollective{});
  for (Region& g : r.regions) {
    g.owner.assign(g.bytes, -1);
    g.mask.assign(g.bytes, 0);
    g.before.resize(g.bytes);
  }

  const int64_t nblocks = static_cast<int64_t>(grid.x) * grid.y * grid.z;
  std::vector<int64_t> blocks(nblocks);
  for (int64_t i = 0; i < nblocks; ++i) blocks[i] = i;
  if (r.cfg.order == Order::kReverse) std::reverse(blocks.begin(), blocks.end());
  if (r.cfg.order == Order::kRandom) std::shuffle(blocks.begin(), blocks.end(), r.rng);
  for (int64_t id : blocks) {
    g_block_idx.x = static_cast<unsigned>(id % grid.x);
    g_block_idx.y = static_cast<unsigned>((id / grid.x) % grid.y);
    g_block_idx.z = static_cast<unsigned>(id / (static_cast<int64_t>(grid.x) * grid.y));
    // The declared bytes, then a tail: ASan builds poison it (any access is reported), plain
    // builds fill it with a canary checked after the block.
    r.smem_bytes = dynamic_smem_bytes;
    // 1024-aligned like the shared window's start: the sm_90 swizzle modes act on address bits.
    const size_t alloc_bytes = ((dynamic_smem_bytes + kSmemCanary + 1023) / 1024) * 1024;
    r.smem = static_cast<unsigned char*>(std::aligned_alloc(1024, alloc_bytes));
    std::memset(r.smem + dynamic_smem_bytes, 0xa5, alloc_bytes - dynamic_smem_bytes);
#if MLA_EMU_ASAN
    __asan_poison_memory_region(r.smem + dynamic_smem_bytes, alloc_bytes - dynamic_smem_bytes);
#endif
    std::memset(r.smem, 0xff, dynamic_smem_bytes);  // NaN in every element type
    regions_before_block();
    ++r.stats.blocks;
    for (const BlockHooks& h : r.hooks)
      if (h.begin != nullptr) h.begin();
    run_block(nthreads);
    for (const BlockHooks& h : r.hooks)
      if (h.end != nullptr) h.end();
#if MLA_EMU_ASAN
    __asan_unpoison_memory_region(r.smem, alloc_bytes);
#endif
    for (size_t i = dynamic_smem_bytes; i < alloc_bytes; ++i)
      if (r.smem[i] != 0xa5)
        fail("block (" + std::to_string(g_block_idx.x) + "," + std::to_string(g_block_idx.y) +
             ") wrote past the end of its " + std::to_string(dynamic_smem_bytes) + " bytes of dynamic shared memory");
    std::free(r.smem);
    r.smem = nullptr;
    regions_after_block(id);
  }
  return cudaSuccess;
}

}  // namespace mla_emu

// ---- The few CUDA runtime calls the launchers and the planner make.
extern "C" {
cudaError_t cudaGetLastError(void) {
  const cudaError_t e = mla_emu::rt().last_error;
  mla_emu::rt().last_error = cudaSuccess;
  return e;
}
cudaError_t cudaPeekAtLastError(void) { return mla_emu::rt().last_error; }
cudaError_t cudaFuncSetAttribute(const void* func, enum cudaFuncAttribute attr, int value) {
  if (attr != cudaFuncAttributeMaxDynamicSharedMemorySize) return cudaErrorInvalidValue;
  if (value > mla_emu::rt().cfg.smem_optin) return cudaErrorInvalidValue;
  mla_emu::rt().max_dynamic_smem[func] = value;
  return cudaSuccess;
}
cudaError_t cudaDeviceGetAttribute(int* value, enum cudaDeviceAttr attr, int device) {
  if (device != 0) return cudaErrorInvalidDevice;
  switch (attr) {
    case cudaDevAttrMultiProcessorCount: *value = mla_emu::rt().cfg.sms; return cudaSuccess;
    case cudaDevAttrMaxSharedMemoryPerBlockOptin: *value = mla_emu::rt().cfg.smem_optin; return cudaSuccess;
    default: return cudaErrorInvalidValue;
  }
}
const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    default: return "emulated CUDA error";
  }
}
}
