// One warp-collective on given operands, through the real PTX wrappers of csrc/cuda/common.cuh
// compiled for the emulator: the CPU emulator's ldmatrix / mma / shfl semantics, checked by
// tests/test_cute_layouts.py against CuTe's atom layouts (warp_backend.py drives this).
//
// stdin, whitespace-separated numbers (all 32-bit values in decimal):
//   ldmatrix TRANS  then 256 uint16 (tiles [4][8][8])            -> 128 uint32 (regs [32][4])
//   mma KIND(0 bf16, 1 fp16)  then a [32][4], b [32][2] uint32, c [32][4] float bits -> d [32][4] float bits
//   shfl XOR_MASK MEMBER_MASK  then 32 uint32 values            -> 32 uint32 (lanes outside the mask: 0)
#include <cstdio>
#include <cstring>
#include <iostream>
#include <string>

#include "common.cuh"
#include "emu_runtime.h"

namespace {

struct Probe {
  int op = 0;  // 0 ldmatrix, 1 mma, 2 shfl
  bool trans = false;
  int kind = 0;
  int xor_mask = 0;
  uint32_t member = 0;
  uint16_t tiles[4][8][8];
  uint32_t a[32][4], b[32][2], values[32], result[32][4];
  float c[32][4];
};

__global__ void probe_kernel(Probe* pr) {
  const int lane = threadIdx.x;
  if (pr->op == 0) {
    unsigned char* smem = mla::cuda::dynamic_smem();
    if (lane == 0) std::memcpy(smem, pr->tiles, sizeof(pr->tiles));
    __syncthreads();
    const void* row = smem + (lane / 8) * 128 + (lane % 8) * 16;  // matrix lane / 8, row lane % 8
    uint32_t r[4];
    if (pr->trans) mla::cuda::ldmatrix_x4_trans(r, row);
    else mla::cuda::ldmatrix_x4(r, row);
    for (int i = 0; i < 4; ++i) pr->result[lane][i] = r[i];
  } else if (pr->op == 1) {
    float d[4];
    for (int i = 0; i < 4; ++i) d[i] = pr->c[lane][i];
    if (pr->kind == 0) mla::cuda::mma_16816<__nv_bfloat16>(d, pr->a[lane], pr->b[lane][0], pr->b[lane][1]);
    else mla::cuda::mma_16816<__half>(d, pr->a[lane], pr->b[lane][0], pr->b[lane][1]);
    for (int i = 0; i < 4; ++i) std::memcpy(&pr->result[lane][i], &d[i], 4);
  } else if ((pr->member >> lane) & 1u) {
    pr->result[lane][0] = __shfl_xor_sync(pr->member, pr->values[lane], pr->xor_mask);
  }
}

}  // namespace

int main() {
  static Probe pr;
  std::memset(&pr, 0, sizeof pr);
  std::string op;
  std::cin >> op;
  if (op == "ldmatrix") {
    pr.op = 0;
    int t;
    std::cin >> t;
    pr.trans = t != 0;
    for (auto& m : pr.tiles)
      for (auto& r : m)
        for (auto& v : r) std::cin >> v;
  } else if (op == "mma") {
    pr.op = 1;
    std::cin >> pr.kind;
    for (auto& l : pr.a)
      for (auto& v : l) std::cin >> v;
    for (auto& l : pr.b)
      for (auto& v : l) std::cin >> v;
    for (auto& l : pr.c)
      for (auto& v : l) {
        uint32_t bits;
        std::cin >> bits;
        std::memcpy(&v, &bits, 4);
      }
  } else if (op == "shfl") {
    pr.op = 2;
    std::cin >> pr.xor_mask >> pr.member;
    for (auto& v : pr.values) std::cin >> v;
  } else {
    std::fprintf(stderr, "probe: unknown op %s\n", op.c_str());
    return 2;
  }
  if (!std::cin) {
    std::fprintf(stderr, "probe: short input\n");
    return 2;
  }
  auto kernel = probe_kernel;
  if (MLA_LAUNCH(kernel, 1, 32, pr.op == 0 ? 512 : 0, nullptr, &pr) != cudaSuccess) return 3;
  const int words = pr.op == 0 || pr.op == 1 ? 4 : 1;
  for (int l = 0; l < 32; ++l)
    for (int i = 0; i < words; ++i) std::printf("%u\n", pr.result[l][i]);
  return 0;
}
