// Prints, as JSON, the warp fragment layouts of the tensor-core instructions the decode kernel
// uses, taken from CuTe's own atom traits (CUTLASS headers from the nvidia-cutlass wheel), so the
// tests check our lane models against an oracle we did not write:
//
//   mma.sync m16n8k16 (MMA_Traits<SM80_16x8x16_F32BF16BF16F32_TN>, ..._F32F16F16F32_TN):
//     A[lane][v] = (m, k), v = 0..7 (register v / 2, low half when v is even)
//     B[lane][v] = (n, k), v = 0..3 (register v / 2)
//     C[lane][v] = (m, n), v = 0..3 (one fp32 per register)
//   ldmatrix .x4 / .x4.trans (Copy_Traits<SM75_U32x4_LDSM_N>, <SM75_U16x8_LDSM_T>):
//     dst[lane][v] = (s, j): register v / 2 (low half when v is even) of `lane` receives 16-bit
//     element j of the 16-byte row whose address lane s supplied.
//
//   wgmma m64nNk16 fp32 accumulators (MMA_Traits<SM90_64xNx16_F32BF16BF16_SS<K, K>>::CLayout):
//     C[thread][v] = (m, n), thread 0..127 of the warpgroup, v = 0..N/2-1
//   wgmma A from registers (MMA_Traits<SM90_64x64x16_F32BF16BF16_RS<K, K>>::ALayout):
//     A[thread][v] = (m, k), v = 0..7 (register v / 2, low half when v is even)
//   GMMA shared-memory operand layouts for 16-bit types (GMMA::Layout_{K,MN}_{INTER,SW32,SW64,
//   SW128}_Atom<bf16> tiled to a 64 x 64 tile, 128 x 64 for MN SW128 so that two MN blocks
//   exist, 1024-aligned): for k-steps 0 and 3 of 16, make_gmma_desc's descriptor (start address
//   0 on the host) and its LBO / SBO / layout type, the step's start offset, and the byte offset
//   of every (mn, k) element of the step's sub-tile (the swizzle applied).
//
// CuTe's TV layouts map (thread, value) to an index: for MMA into the M x K (A), N x K (B),
// M x N (C) tile, column-major (converted with cute::idx2crd); for copies into a bit array,
// where SrcLayout says which bits each source thread's row holds and DstLayout which bits land
// in each destination register. The program inverts SrcLayout by brute force and requires every
// 16-bit destination element to be 16 consecutive source bits of one row.
//
// Build (host only, no nvcc): g++ -std=c++17 -I<cutlass>/include -I<cuda>/include
//   -I<cuda>/include/cccl cute_layout_tables.cpp   (tests/test_cute_layouts.py does it).
#include <cstdio>
#include <cstdlib>
#include <vector>

#include <fcntl.h>
#include <unistd.h>

#include <cute/atom/copy_traits_sm75.hpp>
#include <cute/atom/mma_traits_sm80.hpp>
#include <cute/atom/mma_traits_sm90_gmma.hpp>
#include <cute/tensor.hpp>
#include <cutlass/version.h>

using namespace cute;

namespace {

void fail(const char* what) {
  std::fprintf(stderr, "cute_layout_tables: %s\n", what);
  std::exit(1);
}

// TV layout (32 threads x V values) -> [[row, col] per value] per thread, the index converted
// with idx2crd into the column-major (rows x cols) tile.
template <class TV, int kRows, int kCols>
void print_mma_operand(const char* key, bool last) {
  constexpr int kThreads = size<0>(TV{});
  constexpr int kVals = size<1>(TV{});
  static_assert(kThreads == 32, "one warp");
  std::printf("    \"%s_layout\": \"", key);
  print(TV{});
  std::printf("\",\n    \"%s\": [", key);
  for (int t = 0; t < kThreads; ++t) {
    std::printf("%s\n      [", t ? "," : "");
    for (int v = 0; v < kVals; ++v) {
      const int idx = TV{}(t, v);
      const auto rc = idx2crd(idx, make_shape(Int<kRows>{}, Int<kCols>{}));
      std::printf("%s[%d, %d]", v ? ", " : "", int(get<0>(rc)), int(get<1>(rc)));
    }
    std::printf("]");
  }
  std::printf("\n    ]%s\n", last ? "" : ",");
}

template <class Op>
void print_mma(const char* key, const char* atom, bool last) {
  using T = MMA_Traits<Op>;
  using MNK = typename T::Shape_MNK;
  constexpr int M = size<0>(MNK{}), N = size<1>(MNK{}), K = size<2>(MNK{});
  static_assert(M == 16 && N == 8 && K == 16, "m16n8k16");
  std::printf("  \"%s\": {\n    \"atom\": \"%s\",\n    \"shape_mnk\": [%d, %d, %d],\n", key, atom, M, N, K);
  print_mma_operand<typename T::ALayout, M, K>("A", false);
  print_mma_operand<typename T::BLayout, N, K>("B", false);
  print_mma_operand<typename T::CLayout, M, N>("C", true);
  std::printf("  }%s\n", last ? "" : ",");
}

// ldmatrix: 32 source threads x 128 bits (one 16-byte row each), 32 destination threads x
// 4 registers x 32 bits. Flat destination value index = 32 * register + bit.
template <class Op>
void print_ldsm(const char* key, const char* atom, bool last) {
  using Tr = Copy_Traits<Op>;
  using Src = typename Tr::SrcLayout;
  using Dst = typename Tr::DstLayout;
  constexpr int kSrcThr = size<0>(Src{}), kSrcBits = size<1>(Src{});
  constexpr int kDstThr = size<0>(Dst{}), kDstBits = size<1>(Dst{});
  static_assert(kSrcThr == 32 && kSrcBits == 128 && kDstThr == 32 && kDstBits == 128, "ldmatrix .x4");
  constexpr int kTotal = kSrcThr * kSrcBits;
  std::vector<int> src_thr(kTotal, -1), src_bit(kTotal, -1);
  for (int s = 0; s < kSrcThr; ++s)
    for (int b = 0; b < kSrcBits; ++b) {
      const int bit = Src{}(s, b);
      if (bit < 0 || bit >= kTotal || src_thr[bit] != -1) fail("SrcLayout is not a bijection");
      src_thr[bit] = s;
      src_bit[bit] = b;
    }
  std::printf("  \"%s\": {\n    \"atom\": \"%s\",\n    \"src_layout\": \"", key, atom);
  print(Src{});
  std::printf("\",\n    \"dst_layout\": \"");
  print(Dst{});
  std::printf("\",\n    \"dst\": [");
  for (int t = 0; t < kDstThr; ++t) {
    std::printf("%s\n      [", t ? "," : "");
    for (int e = 0; e < kDstBits / 16; ++e) {  // 16-bit element e = register e / 2, half e % 2
      const int bit0 = Dst{}(t, 16 * e);
      const int s = src_thr[bit0], b = src_bit[bit0];
      if (b % 16 != 0) fail("destination element does not start a source element");
      for (int i = 1; i < 16; ++i) {
        const int bit = Dst{}(t, 16 * e + i);
        if (src_thr[bit] != s || src_bit[bit] != b + i) fail("destination element is not one source element");
      }
      std::printf("%s[%d, %d]", e ? ", " : "", s, b / 16);
    }
    std::printf("]");
  }
  std::printf("\n    ]\n  }%s\n", last ? "" : ",");
}

// wgmma accumulators: 128 threads x N/2 values -> (m, n) of the column-major 64 x N tile.
template <int N, class Op>
void print_gmma_acc(const char* key, const char* atom) {
  using CL = typename MMA_Traits<Op>::CLayout;
  static_assert(size<0>(CL{}) == 128 && size<1>(CL{}) == N / 2, "64xN accumulators");
  std::printf("  \"%s\": {\n    \"atom\": \"%s\",\n    \"n\": %d,\n    \"C_layout\": \"", key, atom, N);
  print(CL{});
  std::printf("\",\n    \"C\": [");
  for (int t = 0; t < 128; ++t) {
    std::printf("%s\n      [", t ? "," : "");
    for (int v = 0; v < N / 2; ++v) {
      const int idx = CL{}(t, v);
      std::printf("%s[%d, %d]", v ? ", " : "", idx % 64, idx / 64);
    }
    std::printf("]");
  }
  std::printf("\n    ]\n  },\n");
}

// make_gmma_desc on the host prints a warning to stdout (no cvta there) and leaves the start
// address 0: silence stdout around it; the start offset is taken from the tensor instead.
cute::GmmaDescriptor quiet_desc_k(cute::GmmaDescriptor (*make)(const void*), const void* arg) {
  std::fflush(stdout);
  const int saved = dup(1), null = open("/dev/null", O_WRONLY);
  dup2(null, 1);
  cute::GmmaDescriptor d = make(arg);
  std::fflush(stdout);
  dup2(saved, 1);
  close(null);
  close(saved);
  return d;
}

alignas(1024) unsigned char g_smem[64 * 1024];

// One GMMA smem layout: the tile, then per k-step of 16 the descriptor fields and element offsets.
template <GMMA::Major kMajor, class Atom, int kMN>
void print_gmma_smem(const char* key, const char* atom, const char* major) {
  using T = cutlass::bfloat16_t;
  auto tile = tile_to_shape(Atom{}, Shape<Int<kMN>, _64>{});
  Tensor full = make_tensor(make_smem_ptr(reinterpret_cast<T*>(g_smem)), tile);
  std::printf("  \"%s\": {\n    \"atom\": \"%s\",\n    \"major\": \"%s\",\n    \"mn\": %d,\n    \"tile_layout\": \"",
              key, atom, major, kMN);
  print(tile);
  std::printf("\",\n    \"ksteps\": [");
  for (int ks : {0, 3}) {  // the first k-step and one with a start offset
    Tensor step = local_tile(full, Shape<Int<kMN>, _16>{}, make_coord(0, ks));
    static decltype(step)* current;
    current = &step;
    auto make = [](const void*) { return SM90::GMMA::make_gmma_desc<kMajor>(*current); };
    const cute::GmmaDescriptor d = quiet_desc_k(make, nullptr);
    const long start = reinterpret_cast<const unsigned char*>(&step(0, 0)) - g_smem;
    std::printf("%s\n      {\"kstep\": %d, \"desc\": \"0x%016llx\", \"lbo\": %d, \"sbo\": %d, \"layout_type\": %d, \"base_offset\": %d, \"start\": %ld,"
                " \"offsets\": [",
                ks ? "," : "", ks, static_cast<unsigned long long>(d.desc_), int(d.bitfield.leading_byte_offset_) * 16, int(d.bitfield.stride_byte_offset_) * 16,
                int(d.bitfield.layout_type_), int(d.bitfield.base_offset_), start);
    for (int r = 0; r < kMN; ++r) {
      std::printf("%s[", r ? ", " : "");
      for (int k = 0; k < 16; ++k)
        std::printf("%s%ld", k ? ", " : "", long(reinterpret_cast<const unsigned char*>(&step(r, k)) - g_smem));
      std::printf("]");
    }
    std::printf("]}");
  }
  std::printf("\n    ]\n  },\n");
}

}  // namespace

int main() {
  std::printf("{\n  \"generator\": \"tests/cute_layouts/cute_layout_tables.cpp\",\n");
  std::printf("  \"cutlass_version\": \"%d.%d.%d\",\n", CUTLASS_MAJOR, CUTLASS_MINOR, CUTLASS_PATCH);
  print_mma<SM80_16x8x16_F32BF16BF16F32_TN>("mma_m16n8k16_bf16", "SM80_16x8x16_F32BF16BF16F32_TN", false);
  print_mma<SM80_16x8x16_F32F16F16F32_TN>("mma_m16n8k16_fp16", "SM80_16x8x16_F32F16F16F32_TN", false);
  print_ldsm<SM75_U32x4_LDSM_N>("ldmatrix_x4", "SM75_U32x4_LDSM_N", false);
  print_ldsm<SM75_U16x8_LDSM_T>("ldmatrix_x4_trans", "SM75_U16x8_LDSM_T", false);
  using GMMA::Major;
  print_gmma_acc<8, SM90_64x8x16_F32BF16BF16_SS<Major::K, Major::K>>("gmma_acc_64x8", "SM90_64x8x16_F32BF16BF16_SS");
  print_gmma_acc<64, SM90_64x64x16_F32BF16BF16_SS<Major::K, Major::K>>("gmma_acc_64x64",
                                                                        "SM90_64x64x16_F32BF16BF16_SS");
  {  // A from registers (RS): 128 threads x 8 values -> (m, k) of the column-major 64 x 16 A tile
    using AL = typename MMA_Traits<SM90_64x64x16_F32BF16BF16_RS<Major::K, Major::K>>::ALayout;
    std::printf("  \"gmma_rs_a_64x16\": {\n    \"atom\": \"SM90_64x64x16_F32BF16BF16_RS\",\n    \"A_layout\": \"");
    print(AL{});
    std::printf("\",\n    \"A\": [");
    for (int t = 0; t < 128; ++t) {
      std::printf("%s\n      [", t ? "," : "");
      for (int v = 0; v < 8; ++v) std::printf("%s[%d, %d]", v ? ", " : "", int(AL{}(t, v)) % 64, int(AL{}(t, v)) / 64);
      std::printf("]");
    }
    std::printf("\n    ]\n  },\n");
  }
  std::printf("  \"gmma_acc_64x256_layout\": \"");
  print(typename MMA_Traits<SM90_64x256x16_F32BF16BF16_SS<Major::K, Major::K>>::CLayout{});
  std::printf("\",\n");
  using B16 = cutlass::bfloat16_t;
  print_gmma_smem<Major::K, GMMA::Layout_K_INTER_Atom<B16>, 64>("gmma_smem_k_inter", "Layout_K_INTER_Atom<bf16>", "K");
  print_gmma_smem<Major::K, GMMA::Layout_K_SW32_Atom<B16>, 64>("gmma_smem_k_sw32", "Layout_K_SW32_Atom<bf16>", "K");
  print_gmma_smem<Major::K, GMMA::Layout_K_SW64_Atom<B16>, 64>("gmma_smem_k_sw64", "Layout_K_SW64_Atom<bf16>", "K");
  print_gmma_smem<Major::K, GMMA::Layout_K_SW128_Atom<B16>, 64>("gmma_smem_k_sw128", "Layout_K_SW128_Atom<bf16>", "K");
  print_gmma_smem<Major::MN, GMMA::Layout_MN_INTER_Atom<B16>, 64>("gmma_smem_mn_inter", "Layout_MN_INTER_Atom<bf16>",
                                                                   "MN");
  print_gmma_smem<Major::MN, GMMA::Layout_MN_SW32_Atom<B16>, 64>("gmma_smem_mn_sw32", "Layout_MN_SW32_Atom<bf16>", "MN");
  print_gmma_smem<Major::MN, GMMA::Layout_MN_SW64_Atom<B16>, 64>("gmma_smem_mn_sw64", "Layout_MN_SW64_Atom<bf16>", "MN");
  print_gmma_smem<Major::MN, GMMA::Layout_MN_SW128_Atom<B16>, 128>("gmma_smem_mn_sw128", "Layout_MN_SW128_Atom<bf16>",
                                                                   "MN");
  std::printf("  \"end\": true\n");
  std::printf("}\n");
  return 0;
}
