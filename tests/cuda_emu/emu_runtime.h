// Host side of the SIMT emulator: configuration, error reporting and the output-overlap
// check, used by the harness (harness.cpp). The device side is mla_cuda_emu.h.
#pragma once
#include <cstddef>
#include <cstdint>
#include <string>

namespace mla_emu {

enum class Order : int { kForward = 0, kReverse = 1, kRandom = 2 };

struct Config {
  Order order = Order::kForward;  // thread order within a round, and block order in a grid
  uint64_t seed = 1;              // for Order::kRandom
  int sms = 132;                  // cudaDevAttrMultiProcessorCount of the emulated device
  int smem_optin = 232448;        // cudaDevAttrMaxSharedMemoryPerBlockOptin (227 KB: sm_90)
};
Config& config();

// Buffers every block of a launch may write only once: the launch fails if two blocks of one
// grid write the same byte of a registered region (split-KV ranges that overlap, a row
// written by two row blocks, two tokens appended to one slot).
void add_write_once_region(void* begin, size_t bytes, const char* name);
void clear_write_once_regions();

// Counters a test can assert on (launches, blocks, fibers switched, collectives completed).
struct Stats {
  uint64_t launches = 0, blocks = 0, switches = 0, barriers = 0, shuffles = 0, ldmatrix = 0, mma = 0,
           cp_async = 0;
};
const Stats& stats();

// Every emulator error (divergent barrier, partial-warp collective, shared memory out of
// bounds, a copy never waited for, two blocks writing one byte) ends the process with this
// exit code and one line on stderr starting "mla_emu error:".
constexpr int kErrorExitCode = 86;
[[noreturn]] void fail(const std::string& message);

}  // namespace mla_emu
