/* The CPU's arithmetic ceilings: GFLOP/s of T threads that do nothing but one instruction.
 *
 *   cc -O2 -pthread fma_peak.c -o fma_peak && ./fma_peak [threads] [probe]
 *
 * probe (default fma256):
 *   fma256   vfmadd231ps on ymm: 8 fp32 lanes x 2 = 16 FLOP per instruction (AVX2 + FMA)
 *   fma512   vfmadd231ps on zmm: 32 FLOP (AVX-512F)
 *   dpbf16   vdpbf16ps on zmm: 16 lanes x 2 bf16 products, each multiply + add = 64 FLOP
 *            (AVX512_BF16: the bf16 ceiling of the avx512bf16 kernel)
 *   amx      tdpbf16ps: a 16 x 32 by 32 x 16 bf16 tile product into 16 x 16 fp32 =
 *            16 * 16 * 32 multiply-adds = 16384 FLOP (AMX-BF16; Linux needs the tile-data
 *            permission, asked for here with arch_prctl)
 * Each thread runs independent accumulator chains (10 vector registers, or 4 tiles) in one
 * inline-assembly loop, so the compiler can neither merge nor drop them, on all-zero data
 * (no denormals). Prints one number: the best of 15 runs (on a shared VM a few runs can lose
 * a core to the host), or nothing and exit status 2 when the probe cannot run here.
 * bench_decode.py compiles and runs it on x86-64 CPUs that have the instructions, and
 * reports the kernels' rate as a percentage of each: ceilings no kernel of that kind can
 * pass. The caller checks cpuid (/proc/cpuinfo): an unsupported instruction is SIGILL. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#if defined(__linux__) && defined(__x86_64__)
#include <sys/syscall.h>
#include <unistd.h>
#endif

enum probe { FMA256, FMA512, DPBF16, AMX };
static enum probe probe = FMA256;
static long iters = 20000000L;

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

#if defined(__x86_64__)
static void spin_fma256(long n) {
  __asm__ volatile(
      "vxorps %%ymm0, %%ymm0, %%ymm0\n vxorps %%ymm1, %%ymm1, %%ymm1\n"
      "vxorps %%ymm2, %%ymm2, %%ymm2\n vxorps %%ymm3, %%ymm3, %%ymm3\n"
      "vxorps %%ymm4, %%ymm4, %%ymm4\n vxorps %%ymm5, %%ymm5, %%ymm5\n"
      "vxorps %%ymm6, %%ymm6, %%ymm6\n vxorps %%ymm7, %%ymm7, %%ymm7\n"
      "vxorps %%ymm8, %%ymm8, %%ymm8\n vxorps %%ymm9, %%ymm9, %%ymm9\n"
      "vxorps %%ymm14, %%ymm14, %%ymm14\n vxorps %%ymm15, %%ymm15, %%ymm15\n"
      "1:\n"
      "vfmadd231ps %%ymm14, %%ymm15, %%ymm0\n vfmadd231ps %%ymm14, %%ymm15, %%ymm1\n"
      "vfmadd231ps %%ymm14, %%ymm15, %%ymm2\n vfmadd231ps %%ymm14, %%ymm15, %%ymm3\n"
      "vfmadd231ps %%ymm14, %%ymm15, %%ymm4\n vfmadd231ps %%ymm14, %%ymm15, %%ymm5\n"
      "vfmadd231ps %%ymm14, %%ymm15, %%ymm6\n vfmadd231ps %%ymm14, %%ymm15, %%ymm7\n"
      "vfmadd231ps %%ymm14, %%ymm15, %%ymm8\n vfmadd231ps %%ymm14, %%ymm15, %%ymm9\n"
      "dec %0\n jnz 1b\n vzeroupper\n"
      : "+r"(n)
      :
      : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm14", "xmm15", "cc");
}

/* The same ten chains on zmm registers with instruction `op` (vfmadd231ps or vdpbf16ps). */
#define SPIN_ZMM(name, op)                                                                        \
  static void name(long n) {                                                                      \
    __asm__ volatile(                                                                             \
        "vpxord %%zmm0, %%zmm0, %%zmm0\n vpxord %%zmm1, %%zmm1, %%zmm1\n"                        \
        "vpxord %%zmm2, %%zmm2, %%zmm2\n vpxord %%zmm3, %%zmm3, %%zmm3\n"                        \
        "vpxord %%zmm4, %%zmm4, %%zmm4\n vpxord %%zmm5, %%zmm5, %%zmm5\n"                        \
        "vpxord %%zmm6, %%zmm6, %%zmm6\n vpxord %%zmm7, %%zmm7, %%zmm7\n"                        \
        "vpxord %%zmm8, %%zmm8, %%zmm8\n vpxord %%zmm9, %%zmm9, %%zmm9\n"                        \
        "vpxord %%zmm14, %%zmm14, %%zmm14\n vpxord %%zmm15, %%zmm15, %%zmm15\n"                  \
        "1:\n"                                                                                    \
        op " %%zmm14, %%zmm15, %%zmm0\n " op " %%zmm14, %%zmm15, %%zmm1\n"                       \
        op " %%zmm14, %%zmm15, %%zmm2\n " op " %%zmm14, %%zmm15, %%zmm3\n"                       \
        op " %%zmm14, %%zmm15, %%zmm4\n " op " %%zmm14, %%zmm15, %%zmm5\n"                       \
        op " %%zmm14, %%zmm15, %%zmm6\n " op " %%zmm14, %%zmm15, %%zmm7\n"                       \
        op " %%zmm14, %%zmm15, %%zmm8\n " op " %%zmm14, %%zmm15, %%zmm9\n"                       \
        "dec %0\n jnz 1b\n vzeroupper\n"                                                          \
        : "+r"(n)                                                                                 \
        :                                                                                         \
        : "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9", "xmm14", \
          "xmm15", "cc");                                                                         \
  }
SPIN_ZMM(spin_fma512, "vfmadd231ps")
SPIN_ZMM(spin_dpbf16, "vdpbf16ps")

/* Four independent tile accumulators (tmm0-3) fed by two zero tiles (tmm4, tmm5). */
static void spin_amx(long n) {
  struct {
    unsigned char palette, start_row, reserved[14];
    unsigned short colsb[16];
    unsigned char rows[16];
  } __attribute__((aligned(64))) cfg;
  memset(&cfg, 0, sizeof cfg);
  cfg.palette = 1;
  for (int t = 0; t < 8; t++) {
    cfg.colsb[t] = 64;
    cfg.rows[t] = 16;
  }
  __asm__ volatile("ldtilecfg %0" ::"m"(cfg) : "memory");
  __asm__ volatile(
      "tilezero %%tmm0\n tilezero %%tmm1\n tilezero %%tmm2\n tilezero %%tmm3\n"
      "tilezero %%tmm4\n tilezero %%tmm5\n"
      "1:\n"
      "tdpbf16ps %%tmm5, %%tmm4, %%tmm0\n tdpbf16ps %%tmm5, %%tmm4, %%tmm1\n"
      "tdpbf16ps %%tmm5, %%tmm4, %%tmm2\n tdpbf16ps %%tmm5, %%tmm4, %%tmm3\n"
      "dec %0\n jnz 1b\n tilerelease\n"
      : "+r"(n)
      :
      : "cc", "memory");
}
#endif

static void* spin(void* arg) {
  (void)arg;
#if defined(__x86_64__)
  switch (probe) {
    case FMA256: spin_fma256(iters); break;
    case FMA512: spin_fma512(iters); break;
    case DPBF16: spin_dpbf16(iters); break;
    case AMX: spin_amx(iters); break;
  }
#endif
  return NULL;
}

int main(int argc, char** argv) {
#if !defined(__x86_64__)
  fprintf(stderr, "x86-64 only\n");
  return 2;
#else
  int threads = argc > 1 ? atoi(argv[1]) : 1;
  if (threads < 1 || threads > 256) threads = 1;
  const char* name = argc > 2 ? argv[2] : "fma256";
  double flop_per_iter; /* per loop iteration of one thread */
  if (strcmp(name, "fma256") == 0) {
    probe = FMA256;
    flop_per_iter = 10 * 16;
  } else if (strcmp(name, "fma512") == 0) {
    probe = FMA512;
    flop_per_iter = 10 * 32;
  } else if (strcmp(name, "dpbf16") == 0) {
    probe = DPBF16;
    flop_per_iter = 10 * 64;
  } else if (strcmp(name, "amx") == 0) {
    probe = AMX;
    flop_per_iter = 4 * 16384.0;
    iters = 400000L; /* ~16 cycles per tile product: ~2e7 cycles per run */
#if defined(__linux__)
    if (syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XTILEDATA */) != 0) {
      fprintf(stderr, "the kernel refused the AMX tile-data permission\n");
      return 2;
    }
#endif
  } else {
    fprintf(stderr, "unknown probe '%s' (fma256, fma512, dpbf16, amx)\n", name);
    return 2;
  }
  pthread_t th[256];
  double best = 0;
  for (int run = 0; run < 15; run++) {
    double t0 = now();
    for (int i = 0; i < threads; i++) pthread_create(&th[i], NULL, spin, NULL);
    for (int i = 0; i < threads; i++) pthread_join(th[i], NULL);
    double gflops = (double)threads * iters * flop_per_iter / (now() - t0) / 1e9;
    if (gflops > best) best = gflops;
  }
  printf("%.1f\n", best);
  return 0;
#endif
}
