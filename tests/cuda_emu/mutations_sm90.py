"""Mutation check of the Hopper emulation (emu_sm90.cpp): each mutation plants one known bug in a
copy of csrc/ (the sm_90a GEMM probe, csrc/cuda/sm90/gemm_probe.cuh, or its PTX wrappers; or the
Hopper decode kernel, csrc/cuda/sm90/decode_sm90.cuh, run through the harness on shared
DECODE_CASES against the float64 reference), rebuilds the probe or harness from it and runs the
listed cases; the bug is caught when a run reports an emulator or
sanitizer error or a result that differs from the float64 matmul. Every mutation must be caught.

    python tests/cuda_emu/mutations_sm90.py              # all; exit 1 if one survives
    python tests/cuda_emu/mutations_sm90.py --only swizzle

`make test-emulated` runs it after mutations.py; docs/cuda-emulation.md holds the table.
"""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/

import torch  # noqa: E402

from cuda_emu import mutate, runner, sm90_runner  # noqa: E402
from cuda_emu.mutate import Mutation  # noqa: E402

PROBE = "cuda/sm90/gemm_probe.cuh"
DECODE = "cuda/sm90/decode_sm90.cuh"
DECODE_HOST = "cuda/sm90/decode_sm90.cu"  # the launcher: the cache's tensor map (TMA path)


# checks: (N, B MN-major, flavor, order) for the probe; (case, flavor, order) for the decode kernel
M = Mutation
MUTATIONS = [
    M("A descriptor: 64-byte swizzle instead of 128", PROBE,
      "make_smem_desc(a_tile, 16, 1024, Swizzle::k128B)", "make_smem_desc(a_tile, 16, 1024, Swizzle::k64B)",
      [(64, False, "plain", "forward")]),
    M("MN-major B descriptor: SBO 2048 instead of 1024 (k-row groups)", PROBE,
      "make_smem_desc(b_tile, 8192, 1024, Swizzle::k128B)", "make_smem_desc(b_tile, 8192, 2048, Swizzle::k128B)",
      [(256, True, "plain", "forward")]),
    M("MN-major B descriptor: LBO 4096 instead of 8192 (64-column blocks)", PROBE,
      "make_smem_desc(b_tile, 8192, 1024, Swizzle::k128B)", "make_smem_desc(b_tile, 4096, 1024, Swizzle::k128B)",
      [(256, True, "plain", "forward")]),
    M("k-step advance of 16 bytes instead of 32 (K-major)", PROBE,
      "desc_advance(desc_a, ks * 32)", "desc_advance(desc_a, ks * 16)",
      [(64, False, "plain", "forward")]),
    M("wgmma wait_group<1> instead of <0> (stage released while its wgmma is in flight)", PROBE,
      "    wgmma_wait_group<0>();\n", "    wgmma_wait_group<1>();\n",
      [(64, False, "plain", "forward")]),
    M("wgmma.fence missing", PROBE, "    wgmma_fence();\n", "",
      [(64, False, "plain", "forward")]),
    M("expect_tx 16 bytes short", PROBE,
      "mbarrier_arrive_expect_tx(&full[s], S::kStageBytes);", "mbarrier_arrive_expect_tx(&full[s], S::kStageBytes - 16);",
      [(64, False, "plain", "forward")]),
    M("full-barrier wait on the wrong parity", PROBE,
      "mbarrier_wait_parity(&full[s], (kc / kStages) & 1);", "mbarrier_wait_parity(&full[s], ((kc / kStages) + 1) & 1);",
      [(64, False, "plain", "forward")]),
    M("producer skips the empty-barrier wait (refills a stage in use)", PROBE,
      "        if (kc >= kStages) mbarrier_wait_parity(&empty[s], ((kc / kStages) - 1) & 1);\n", "",
      [(64, False, "plain", "forward")]),
    M("barrier between mbarrier init and use deleted", PROBE,
      "    fence_mbarrier_init();\n  }\n  __syncthreads();\n", "    fence_mbarrier_init();\n  }\n",
      [(64, False, "tsan", "forward"), (64, False, "plain", "reverse")]),
    M("MN-major B given to wgmma as K-major (trans-b 0)", PROBE,
      "wgmma_ss<T, N, 0, B_MN ? 1 : 0>", "wgmma_ss<T, N, 0, 0>",
      [(64, True, "plain", "forward")]),
]


# The Hopper decode kernel: checks are (DECODE_CASES name, flavor, order). "bf16 s_q=2 causal" has a
# 300-key sequence (5 tiles: both ring stages refilled) and causal MTP rows; "bf16 split-KV" 4 splits.
MAIN = "bf16 s_q=2 causal"
# Not a DECODE_CASES name: tests/test_cuda_emulated_sm90.py's NaN case (a NaN in V column 300 of
# the last key, which query 0 of 2 must not see); checked on both queries' rows.
NAN_CHECK = "nan in a causally masked key, col 300"
DECODE_MUTATIONS = [
    M("decode: V descriptor LBO 4096 instead of 8192 (64-column blocks)", DECODE,
      "make_smem_desc(kv + 4 * wg * kChunkBytes, 8192, 1024, Swizzle::k128B)",
      "make_smem_desc(kv + 4 * wg * kChunkBytes, 4096, 1024, Swizzle::k128B)", [(MAIN, "plain", "forward")]),
    M("decode: V k-step advance 1024 bytes instead of 2048 (16 keys)", DECODE,
      "desc_advance(v_desc, ks * 2048)", "desc_advance(v_desc, ks * 1024)", [(MAIN, "plain", "forward")]),
    M("decode: P register fragment with its row and key halves swapped", DECODE,
      "const int i = 4 * (2 * ks + j / 2) + 2 * (j % 2);", "const int i = 4 * (2 * ks + j % 2) + 2 * (j / 2);",
      [(MAIN, "plain", "forward")]),
    M("decode: O rescaled with the other row's alpha", DECODE,
      "o[i] *= (i % 4) >= 2 ? alpha_hi : alpha_lo;", "o[i] *= (i % 4) < 2 ? alpha_hi : alpha_lo;",
      [(MAIN, "plain", "forward")]),
    M("decode: loader writes the tile unswizzled", DECODE,
      "(((unit % 8) ^ (row % 8)) * 16)", "((unit % 8) * 16)", [(MAIN, "plain", "forward")]),
    M("decode: producer skips the empty-barrier wait (refills a stage in use)", DECODE,
      "      if (it >= kStages) mbarrier_wait_parity(&empty[s], ((it / kStages) - 1) & 1);\n", "",
      [(MAIN, "plain", "forward")]),
    M("decode: empty barrier counts 128 arrivals, not 256 (one consumer warpgroup frees the stage)", DECODE,
      "mbarrier_init(&empty[s], 256);", "mbarrier_init(&empty[s], 128);", [(MAIN, "plain", "forward")]),
    M("decode: keys past the split's end loaded instead of zero-filled (NaN-poisoned slots)", DECODE,
      "key < range.key_end ? cache_row<CacheT>(p, b, key) : nullptr",
      "key < range.tile_end * kBlockN ? cache_row<CacheT>(p, b, key) : nullptr",
      [(MAIN, "plain", "forward")]),
    M("decode: band path adds the non-finite V entries but never zeroes them (0 x NaN reaches masked rows)", DECODE,
      "              *reinterpret_cast<uint32_t*>(v2) = TypeTraits<T>::pack2(nonfinite(v0) ? 0.f : v0, nonfinite(v1) ? 0.f : v1);\n",
      "              (void)v2;\n",
      [(NAN_CHECK, "plain", "forward")]),
    M("decode: band path skipped (no scalar add, no zeroing)", DECODE,
      "    if (fix_lo < fix_hi) {\n", "    if (false) {\n", [(NAN_CHECK, "plain", "forward")]),
    M("decode fp8: kv_scale not folded into the output", DECODE,
      "const float inv = empty_row ? 0.f : kv_scale / tot;", "const float inv = empty_row ? 0.f : 1.f / tot;",
      [("fp8 cache, bf16 q", "plain", "forward")]),
    M("decode fp8: no barrier before the conversion (overwrites the tile the other warpgroup's wgmma reads)", DECODE,
      "      named_barrier_sync(1, 256);\n      const unsigned char* raw8", "      const unsigned char* raw8",
      [("fp8 cache, bf16 q", "plain", "forward"), ("fp8 cache, bf16 q", "plain", "random")]),
    M("decode fp8: converted tile written unswizzled", DECODE,
      "*reinterpret_cast<uint4*>(conv + swizzled_offset(row, unit)) = v;",
      "*reinterpret_cast<uint4*>(conv + row * 128 * kChunks + unit * 16) = v;", [("fp8 cache, bf16 q", "plain", "forward")]),
    M("decode: split partial written to split 0's slot", DECODE,
      "const int64_t base = static_cast<int64_t>(w.slot) * min(M, kBlockM) - m0;",
      "const int64_t base = static_cast<int64_t>(0) * min(M, kBlockM) - m0;", [("bf16 split-KV", "plain", "forward")]),
]

# The TMA producer path (bf16 cache, block_size % 64 == 0): cases of their own, by name.
TMA_BS128 = "TMA: block_size=128 s_q=2, split-KV, partial last tiles"
TMA_BS64 = "TMA: block_size=64 s_q=2 causal, partial last tiles"
EXTRA_CASES = {
    TMA_BS128: dict(block_size=128, s_q=2, lens=(700, 77), extra_cols=30),
    TMA_BS64: dict(block_size=64, s_q=2, lens=(0, 1, 64, 77, 300)),
}
DECODE_MUTATIONS += [
    M("decode TMA: expect_tx one box short (the phase completes before the last box lands)", DECODE,
      "mbarrier_arrive_expect_tx(&full[s], kTileBytes);", "mbarrier_arrive_expect_tx(&full[s], kTileBytes - kChunkBytes);",
      [(TMA_BS64, "plain", "forward")]),
    M("decode TMA: box row ignores the tile's offset in its block (block_size 128 reads keys 0-63 twice)", DECODE,
      "block * p.block_size + key0 % p.block_size", "block * p.block_size", [(TMA_BS128, "plain", "forward")]),
    M("decode TMA: every box at column 0 (the 9 chunks all hold columns 0-63)", DECODE,
      "c * kChunkCols, row0, &full[s]", "0, row0, &full[s]", [(TMA_BS64, "plain", "forward")]),
    M("decode TMA: partial last tiles through TMA too (the tail's poisoned neighbour rows reach P V)", DECODE,
      "cache_tma && (tile + 1) * kBlockN <= range.key_end", "cache_tma && tile * kBlockN < range.key_end",
      [(TMA_BS64, "plain", "forward")]),
    M("decode TMA: box issued to stage 0 whatever the stage (the ring's second stage never filled)", DECODE,
      "tma_load_2d(ring + s * kStageBytes + c * kChunkBytes", "tma_load_2d(ring + c * kChunkBytes",
      [(TMA_BS64, "plain", "forward")]),
    M("decode TMA: an out-of-range block id loads block 0 instead of a zero-filled box", DECODE,
      ": p.num_blocks * p.block_size;  // zero-filled", ": 0;", [("TMA: bad block id", "plain", "forward")]),
    M("decode TMA host: tensor map for a block size not a multiple of 64 (tiles straddle blocks)", DECODE_HOST,
      "p.block_size % kBlockN != 0 ||", "p.block_size % 16 != 0 ||", [(MAIN, "plain", "forward")]),
    M("decode fp16: S = Q K^T wgmma run as bf16 whatever T (fp16 operands read as bf16)", DECODE,
      "wgmma_ss<T, kBlockN, 0, 0>", "wgmma_ss<__nv_bfloat16, kBlockN, 0, 0>", [("fp16 s_q=2 causal", "plain", "forward")]),
    M("decode fp16: P packed as bf16 for an fp16 P V wgmma", DECODE,
      "pa[ks][j] = TypeTraits<T>::pack2(p0, p1);", "pa[ks][j] = TypeTraits<__nv_bfloat16>::pack2(p0, p1);",
      [("fp8 cache, fp16 q, block_size=7", "plain", "forward")]),
    M("decode TMA host: tensor map for padded blocks (block stride ignored)", DECODE_HOST,
      "p.cache_block_stride != static_cast<int64_t>(p.block_size) * p.cache_token_stride ||", "",
      [("TMA: padded block stride", "plain", "forward")]),
]

# The device-side schedule (csrc/cuda/schedule.cuh) and the shared combine (csrc/cuda/combine.cuh),
# run through the sm90 kernel on skewed lengths with few persistent CTAs: checks name a
# SCHED_CASES entry ("sched:..."), run with its CTA count.
SCHEDULE, COMBINE = "cuda/schedule.cuh", "cuda/combine.cuh"
SKEW = "sched:skewed [0, 1, 5000, 17], 4 CTAs"
SKEW_MTP = "sched:skewed s_q=2 h=64, 5 CTAs"
SCHED_MUTATIONS = [
    M("schedule: cost per CTA rounded down (the tail of the work belongs to no CTA)", SCHEDULE,
      "  const int32_t per = max(ceil_div(total, G), kSchedMinCost);\n",
      "  const int32_t per = max(total / G, kSchedMinCost);\n",
      [(SKEW, "plain", "forward")]),
    M("schedule: exclusive scan made inclusive (every unit's position shifted)", SCHEDULE,
      "  int32_t pos = scan[t] - sum;\n", "  int32_t pos = scan[t];\n", [(SKEW_MTP, "plain", "forward")]),
    M("schedule: a piece cut at its CTA's end and a unit's last piece swap slots", SCHEDULE,
      "(w.tile_end < n ? g : ctas + g)", "(w.tile_end < n ? ctas + g : g)", [(SKEW, "plain", "forward")]),
    M("schedule: units with no tile never written (empty sequences keep garbage)", SCHEDULE,
      "        if (pu < lo) continue;\n", "        continue;\n", [(SKEW, "plain", "forward")]),
    M("schedule: combine reads a unit's last piece from slot g, not G + g", SCHEDULE,
      "    c.last = (static_cast<int64_t>(ctas) + g_last) * slot_rows + slot_row;",
      "    c.last = static_cast<int64_t>(g_last) * slot_rows + slot_row;",
      [(SKEW, "plain", "forward")]),
    M("decode: ring tile counter restarted per piece (mbarrier phases out of step)", DECODE,
      "  int it = 0;\n  for (SchedPiece piece; cursor.next(piece);) {\n    const Sm90Work w = sm90_work(p, piece, m_blocks);\n    if",
      "  for (SchedPiece piece; cursor.next(piece);) {\n    int it = 0;\n    const Sm90Work w = sm90_work(p, piece, m_blocks);\n    if",
      [(SKEW, "plain", "forward")]),
    M("decode: next piece's Q loaded while the other warpgroup may still read the last one", DECODE,
      "  named_barrier_sync(1, 256);\n  // Rows past M are zero", "  // Rows past M are zero",
      [(SKEW_MTP, "plain", "random"), (SKEW_MTP, "tsan", "forward")]),
    M("combine: the max over the splits not reduced across lanes", COMBINE,
      "  for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));\n", "",
      [(SKEW, "plain", "forward")]),
    M("combine: weight sum not reduced across lanes", COMBINE,
      "  for (int off = 16; off > 0; off >>= 1) wsum += __shfl_xor_sync(0xffffffffu, wsum, off);\n", "",
      [(SKEW, "plain", "forward")]),
]


def sched_cases():
    from cuda_cases import DecodeCase
    return {
        SKEW: (DecodeCase("sm90 sched skewed [0, 1, 5000, 17]", lens=(0, 1, 5000, 17), extra_cols=2), 4),
        SKEW_MTP: (DecodeCase("sm90 sched skewed s_q=2 h=64: two row blocks", s_q=2, h=64, lens=(17, 0, 2000, 1)), 5),
    }


def run_decode_check(name: str, flavor: str, order: str, exe: Path) -> str | None:
    """None if the shared decode case passed through the sm90 kernel, else how it failed."""
    from cuda_cases import DECODE_CASES, SCALE, DecodeCase, check_close
    ref = None  # (out, lse) when the case's expected result is not the reference on its own inputs
    sms = None  # the emulated SM count (persistent CTAs): the harness default unless a sched case sets it
    if name.startswith("sched:"):
        case, sms = sched_cases()[name]
        q_nope, q_pe, cache, table, seqlens, scale = case.inputs()
    elif name == NAN_CHECK:
        case = DecodeCase("sm90 nan in a causally masked key col 300", s_q=2, lens=(40, 70))
        q_nope, q_pe, cache, table, seqlens, scale = case.inputs()
        last = int(seqlens[0]) - 1
        cache[int(table[0, last // case.block_size]), last % case.block_size, 300] = float("nan")
    elif name == "TMA: bad block id":  # table entry 1 of sequence 0 is -1: zero rows expected
        case = DecodeCase("sm90 TMA bad block id", s_q=2, block_size=64, lens=(300, 70))
        q_nope, q_pe, cache, table, seqlens, scale = case.inputs()
        table[0, 1] = -1
        ref = case.reference(q_nope, q_pe, torch.cat([cache, torch.zeros_like(cache[:1])]),
                             torch.where(table == -1, cache.shape[0], table), seqlens, scale)
    elif name == "TMA: padded block stride":  # blocks of 64 rows, 65 rows apart
        case = DecodeCase("sm90 TMA padded block stride", s_q=2, block_size=64, lens=(70, 200))
        q_nope, q_pe, cache, table, seqlens, scale = case.inputs()
        padded = torch.full((cache.shape[0], 65, cache.shape[2]), float("nan"), dtype=cache.dtype)
        padded[:, :64] = cache
        cache = padded[:, :64]
    else:
        case = DecodeCase(f"sm90 {name}", **EXTRA_CASES[name]) if name in EXTRA_CASES else \
            next(c for c in DECODE_CASES if c.name == name)
        q_nope, q_pe, cache, table, seqlens, scale = case.inputs()
    try:
        out, lse, info = runner.run_decode(q_nope, q_pe, cache, table, seqlens, SCALE, case.causal, kv_scale=scale,
                                           impl="sm90", order=order, seed=3, flavor=flavor, exe=exe, sms=sms)
    except runner.EmulatorError as e:
        return mutate.emulator_failure(e)
    if info["impl"] != "sm90":
        return f"ran {info['impl']}, not sm90"
    ref_out, ref_lse = ref or case.reference(q_nope, q_pe, cache, table, seqlens, scale)
    try:
        if name == NAN_CHECK:  # query 0 of sequence 0 must not see the NaN; query 1 must be all NaN
            if not torch.isnan(out[0, 1]).all():
                return "wrong result: query 1 sees the NaN key but its output is not all NaN"
            check_close(out[:, 0], lse[:, 0], ref_out[:, 0], ref_lse[:, 0], case.q_dtype, "query 0", tol=case.tolerance())
        else:
            check_close(out, lse, ref_out, ref_lse, case.q_dtype, name, tol=case.tolerance())
    except AssertionError as e:
        return mutate.wrong_result(e)
    return None


def run_check(n: int, b_mn: bool, flavor: str, order: str, exe: Path) -> str | None:
    """None if the run passed, else how it failed (first line)."""
    gen = torch.Generator().manual_seed(n * 2 + b_mn)
    k = 256
    a = torch.randn((64, k), generator=gen).bfloat16()
    b = torch.randn((k, n) if b_mn else (n, k), generator=gen).bfloat16()
    try:
        c = sm90_runner.run_gemm(a, b, b_mn, order=order, seed=3, flavor=flavor, exe=exe)
    except runner.EmulatorError as e:
        return mutate.emulator_failure(e)
    ref = a.double() @ (b.double() if b_mn else b.double().T)
    err = (c.double() - ref).abs().max().item()
    if not err <= 1e-4:  # the tolerance of tests/test_cuda_emulated_sm90.py (NaN fails too)
        return f"wrong result: max error {err:.3g}"
    return None


def evaluate(m: Mutation, mutant: Path):
    verdicts = []
    if m.path != PROBE:  # the decode kernel, its schedule or the combine
        for name, flavor, order in m.checks:
            exe = runner.build(flavor, csrc=mutant)
            verdicts.append((f"{name} [{flavor} {order}]", run_decode_check(name, flavor, order, exe)))
    else:
        for n, b_mn, flavor, order in m.checks:
            exe = runner.build(flavor, csrc=mutant, program="sm90_gemm_probe")
            verdicts.append((f"N={n} {'B MN' if b_mn else 'B K'} [{flavor} {order}]", run_check(n, b_mn, flavor, order, exe)))
    return verdicts


if __name__ == "__main__":
    sys.exit(mutate.main(MUTATIONS + DECODE_MUTATIONS + SCHED_MUTATIONS, evaluate, __doc__))
