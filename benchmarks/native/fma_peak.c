/* The CPU's fp32 FMA ceiling: GFLOP/s of T threads that do nothing but 256-bit FMAs.
 *
 *   cc -O2 -pthread fma_peak.c -o fma_peak && ./fma_peak [threads]
 *
 * Each thread runs 10 independent vfmadd231ps chains (enough to cover FMA latency x
 * throughput on Zen and Intel cores) in inline assembly, so the compiler can neither
 * merge nor drop them. One FMA on 8 fp32 lanes = 16 FLOP. Prints one number: the best of
 * 15 runs (~0.5 s in all: on a shared VM a few runs can lose a core to the host).
 * bench_decode.py compiles and runs it on x86-64 CPUs with AVX2 + FMA, and reports the
 * kernels' rate as a percentage of it: the ceiling no fp32 kernel can pass. */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define ITERS 20000000L
#define FMAS_PER_ITER 10

static double now(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return t.tv_sec + t.tv_nsec * 1e-9;
}

static void* spin(void* arg) {
  (void)arg;
#if defined(__x86_64__)
  long n = ITERS;
  /* One asm statement holds the whole loop, so every register it uses is defined there:
     all zero (no denormals), ten accumulator chains, the count in a general register. */
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
#endif
  return NULL;
}

int main(int argc, char** argv) {
#if !defined(__x86_64__)
  fprintf(stderr, "x86-64 only\n");
  return 1;
#else
  int threads = argc > 1 ? atoi(argv[1]) : 1;
  if (threads < 1 || threads > 256) threads = 1;
  pthread_t th[256];
  double best = 0;
  for (int run = 0; run < 15; run++) {
    double t0 = now();
    for (int i = 0; i < threads; i++) pthread_create(&th[i], NULL, spin, NULL);
    for (int i = 0; i < threads; i++) pthread_join(th[i], NULL);
    double gflops = (double)threads * ITERS * FMAS_PER_ITER * 16 / (now() - t0) / 1e9;
    if (gflops > best) best = gflops;
  }
  printf("%.1f\n", best);
  return 0;
#endif
}
