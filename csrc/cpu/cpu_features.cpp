#include "cpu_features.h"

#include <cstdint>

#if defined(__x86_64__) || defined(__i386__)
#include <cpuid.h>
#endif
#if defined(__linux__) && defined(__x86_64__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

namespace mla::cpu {
namespace {

// Linux (5.16+) hands out the 8 KiB AMX tile state only on request: the permission is
// per process (every thread, present and future, may then use the tiles), and a
// TILELOADD without it kills the process with SIGILL. Asking again is harmless.
bool request_amx_permission() {
#if defined(__linux__) && defined(__x86_64__)
  constexpr long kArchReqXcompPerm = 0x1023;  // ARCH_REQ_XCOMP_PERM
  constexpr long kXfeatureXtiledata = 18;     // XFEATURE_XTILEDATA
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
#else
  return false;
#endif
}

CpuFeatures detect() {
  CpuFeatures f;
#if defined(__x86_64__) || defined(__i386__)
  unsigned a = 0, b = 0, c = 0, d = 0;
  if (!__get_cpuid(1, &a, &b, &c, &d)) return f;
  const bool osxsave = c & (1u << 27), avx = c & (1u << 28), fma = c & (1u << 12), f16c = c & (1u << 29);
  if (!osxsave || !avx) return f;
  uint32_t xcr0_lo = 0, xcr0_hi = 0;
  __asm__ volatile("xgetbv" : "=a"(xcr0_lo), "=d"(xcr0_hi) : "c"(0));
  const bool ymm_state = (xcr0_lo & 0x6u) == 0x6u;             // SSE + AVX registers
  const bool zmm_state = (xcr0_lo & 0xE6u) == 0xE6u;           // + opmask, ZMM_Hi256, Hi16_ZMM
  if (__get_cpuid_max(0, nullptr) < 7) return f;
  __cpuid_count(7, 0, a, b, c, d);
  const bool avx2 = b & (1u << 5);
  const bool avx512f = b & (1u << 16), avx512dq = b & (1u << 17), avx512bw = b & (1u << 30),
             avx512vl = b & (1u << 31);
  const unsigned max_sub = a;
  const bool amx_bf16 = d & (1u << 22), amx_tile = d & (1u << 24);
  const bool avx512vbmi = c & (1u << 1);  // vpermi2b: the fp8 widening of the AVX-512 and AMX kernels
  bool bf16 = false;
  if (max_sub >= 1) {
    __cpuid_count(7, 1, a, b, c, d);
    bf16 = a & (1u << 5);
  }
  f.avx2_fma_f16c = ymm_state && avx2 && fma && f16c;
  f.avx512_bf16 = f.avx2_fma_f16c && zmm_state && avx512f && avx512dq && avx512bw && avx512vl && bf16;
  f.avx512_bf16_vbmi = f.avx512_bf16 && avx512vbmi;
  const bool tile_state = (xcr0_lo & 0x60000u) == 0x60000u;  // XTILECFG + XTILEDATA
  f.amx_bf16 = f.avx512_bf16_vbmi && amx_tile && amx_bf16 && tile_state && request_amx_permission();
#endif
  return f;
}

}  // namespace

const CpuFeatures& cpu_features() {
  static const CpuFeatures f = detect();
  return f;
}

}  // namespace mla::cpu
