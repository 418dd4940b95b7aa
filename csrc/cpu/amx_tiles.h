// The AMX tile instructions both AMX kernels use (decode_amx.cpp, sparse_decode_avx512.cpp),
// as inline assembly with "memory" clobbers. GCC 12's <amxtileintrin.h> issues TILELOADD /
// TILESTORED through asm statements that name only the pointer, not the memory behind it, so
// the compiler may move ordinary stores to a tile's source past the load (or loads of a
// stored tile before the store); these macros forbid that. Include inside a function-target
// region that enables AMX or not: the assembler accepts the mnemonics either way.
#pragma once

#include <cstdint>

#define MLA_TILE_LOAD(t, base, stride)                                                     \
  __asm__ volatile("tileloadd (%0,%1,1), %%tmm" #t ::"r"(static_cast<const void*>(base)), \
                   "r"(static_cast<long>(stride))                                          \
                   : "memory")
#define MLA_TILE_STORE(t, base, stride)                                                     \
  __asm__ volatile("tilestored %%tmm" #t ", (%0,%1,1)" ::"r"(static_cast<void*>(base)), \
                   "r"(static_cast<long>(stride))                                           \
                   : "memory")
#define MLA_TILE_ZERO(t) __asm__ volatile("tilezero %%tmm" #t ::)
// C += A . B (AT&T operand order: B, A, C).
#define MLA_TILE_DP(c, a, b) __asm__ volatile("tdpbf16ps %%tmm" #b ", %%tmm" #a ", %%tmm" #c ::)

namespace mla::cpu::amx_tiles {

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Every tile register: 16 rows of 64 bytes (bf16: 16 x 32, fp32: 16 x 16).
inline void configure_all_16x64() {
  TileConfig cfg;
  for (int t = 0; t < 8; ++t) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  __asm__ volatile("ldtilecfg %0" ::"m"(cfg) : "memory");
}

inline void release() { __asm__ volatile("tilerelease" ::: "memory"); }

}  // namespace mla::cpu::amx_tiles
