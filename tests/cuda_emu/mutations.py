"""Mutation check: proves the emulated suite can fail. Each mutation plants one known bug in a
copy of csrc/, rebuilds the emulator from it (only the objects the change reaches) and runs the
cases named for it; the mutation is caught when a run reports an emulator or sanitizer error
or its output differs from the float64 reference. Every mutation must be caught.

    python tests/cuda_emu/mutations.py            # all, prints the kill table, exit 1 if one survives
    python tests/cuda_emu/mutations.py --only mma  # those whose name contains "mma"

`make test-emulated` runs it; docs/cuda-emulation.md holds the table.
"""
from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # tests/: cuda_cases, cuda_emu

from cuda_cases import DECODE_CASES, SCALE, DecodeCase, check_close  # noqa: E402
from cuda_emu import mutate, runner  # noqa: E402
from cuda_emu.mutate import Mutation  # noqa: E402

CASES = {c.name: c for c in DECODE_CASES}
# A key in the causal band holds NaN (see test_masked_key_with_nan_stays_masked).
NAN_BAND = DecodeCase("nan in a causally masked key", s_q=2, lens=(40, 70))

TC_LOOP = "cuda/decode_tc.cuh"


# checks: (case, flavor, order, device)
M = Mutation
MUTATIONS = [
    M("loop-top barrier deleted (next tile's copies overwrite a stage still being read)", TC_LOOP,
      "    __syncthreads();  // tile `tile` is in shared memory; the stage read last iteration is free\n", "",
      [("bf16 s_q=2 causal", "plain", "random", "sm86")]),
    M("fp8 conversion barrier deleted", TC_LOOP,
      "      __syncthreads();  // the converted tile is complete\n", "",
      [("fp8 cache, bf16 q", "tsan", "forward", "sm90")]),  # plain + random order does not see it
    M("row-max exchange barrier deleted", TC_LOOP,
      "    __syncthreads();  // both key halves' maxima are visible\n", "",
      [("bf16 s_q=2 causal", "plain", "random", "sm90")]),
    M("barrier before P.V deleted", TC_LOOP,
      "    __syncthreads();  // P of all key halves is in shared memory\n", "",
      [("bf16 s_q=2 causal", "plain", "random", "sm90"), ("bf16 s_q=2 causal", "tsan", "forward", "sm90")]),
    M("one cp.async wait too few", TC_LOOP,
      "    cp_async_wait<STAGES - 2>();\n", "    cp_async_wait<STAGES - 1>();\n",
      [("bf16 s_q=2 causal", "plain", "forward", "sm90")]),
    M("ldmatrix .trans made plain (V fragments)", TC_LOOP,
      "      ldmatrix_x4_trans(vb, v_base + t * 8);\n", "      ldmatrix_x4(vb, v_base + t * 8);\n",
      [("bf16 s_q=2 causal", "plain", "forward", "sm90")]),
    M("mma B operand registers swapped (S = Q K^T)", TC_LOOP,
      "        mma_16816<T>(acc[0][n], a0, bf[0], bf[1]);\n", "        mma_16816<T>(acc[0][n], a0, bf[1], bf[0]);\n",
      [("fp16 s_q=2 causal", "plain", "forward", "sm90")]),
    M("causal boundary off by one", TC_LOOP,
      "      s[n][e] = key < rows.lim_lo ? s[n][e] * scale_log2 : -INFINITY;\n",
      "      s[n][e] = key <= rows.lim_lo ? s[n][e] * scale_log2 : -INFINITY;\n",
      [("bf16 s_q=2 causal", "plain", "forward", "sm90")]),
    M("q_pe read with q_nope's head stride (reads past q_pe's end)", TC_LOOP,
      "                : qp + blk.b * p.q_pe_batch_stride + j * p.q_pe_seq_stride + head * p.q_pe_head_stride +\n",
      "                : qp + blk.b * p.q_pe_batch_stride + j * p.q_pe_seq_stride + head * p.q_nope_head_stride +\n",
      [("bf16 s_q=2 causal", "asan", "forward", "sm90")]),
    M("overlapping split ranges", "cuda/common.cuh",
      "  r.tile_end = min(n_tiles, r.tile_begin + per_split);\n",
      "  r.tile_end = min(n_tiles, r.tile_begin + per_split + 1);\n",
      [("bf16 split-KV", "plain", "forward", "sm90")]),
    M("two row blocks write the same rows", TC_LOOP,
      "  blk.m0 = static_cast<int32_t>(blockIdx.x % m_blocks) * BM;\n",
      "  blk.m0 = static_cast<int32_t>(blockIdx.x % m_blocks) * (BM / 2);\n",
      [("bf16 h=128 two row blocks", "plain", "forward", "sm90")]),
    M("shuffle under a lane condition (partial-warp collective)", TC_LOOP,
      "  mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, 1));\n",
      "  if (lane < 16) mx_lo = fmaxf(mx_lo, __shfl_xor_sync(0xffffffffu, mx_lo, 1));\n",
      [("bf16 s_q=2 causal", "plain", "forward", "sm90")]),
    M("masked-key NaN guard removed (0 * NaN in P.V)", TC_LOOP,
      "  if (band_lo < band_hi)  // uniform across the block\n", "  if (false)\n",
      [("nan band", "plain", "forward", "sm90")]),
    M("masked-key scalar path: output columns of the wrong key half", TC_LOOP,
      "  const int col0 = wn * Cfg::kOCols + q8;\n#pragma unroll\n", "  const int col0 = q8;\n#pragma unroll\n",
      [("nan band", "plain", "forward", "sm90")]),
    M("CUDA-core kernel: a key tile's barrier deleted", "cuda/decode.cu",
      "    __syncthreads();  // previous tile's ss / srow fully consumed (and sq written, first time)\n", "",
      [("bf16 simple", "plain", "random", "sm90"), ("bf16 simple", "tsan", "forward", "sm90")]),
]

# Sparse decode (csrc/cuda/sparse_decode.cu): checks name a tests/sparse_cuda_cases.py case
# prefixed "sparse:" (run as planned: the tensor-core kernel for bf16 q and an fp8 cache).
SPARSE = "cuda/sparse_decode.cu"
MUTATIONS += [
    M("sparse tc: barrier after the tile's dequantisation deleted", SPARSE,
      "    __syncthreads();  // the bf16 tile is complete\n", "",
      [("sparse:h16 s_q=2 topk_length", "plain", "random", "sm90"),
       ("sparse:h16 s_q=2 topk_length", "tsan", "forward", "sm90")]),
    M("sparse: topk_length ignored (slots past it read)", SPARSE,
      "  if (s.topk_length == nullptr) return s.topk;\n", "  return s.topk;\n",
      [("sparse:h16 s_q=2 topk_length", "plain", "forward", "sm90")]),
    M("sparse: extra source read at the main slot number", SPARSE,
      "  const int32_t slot = in_main ? v : v - n_main;\n", "  const int32_t slot = v;\n",
      [("sparse:h16 split, extra, lengths", "plain", "forward", "sm90"),
       ("sparse:h16 split, extra, lengths", "asan", "forward", "sm90")]),
    M("sparse tc: fp8 dequantisation takes the scale of the wrong 128-value group", SPARSE,
      "      const float scale = *reinterpret_cast<const float*>(tok + kFp8ScaleOffset + 4 * (c / 16));\n",
      "      const float scale = *reinterpret_cast<const float*>(tok + kFp8ScaleOffset + 4 * (c / 32));\n",
      [("sparse:h16 s_q=2 topk_length", "plain", "forward", "sm90")]),
    M("sparse combine: attention sink dropped", "cuda/combine.cuh",
      "  if (a.attn_sink != nullptr) factor *= 1.f / (1.f + exp2f((a.attn_sink[r % a.num_heads] - lse) * kLog2e));\n", "",
      [("sparse:h128 split topk", "plain", "forward", "sm90")]),
]


def run_sparse_check(case_name: str, flavor: str, order: str, device: str, exe: Path) -> str | None:
    from sparse_cuda_cases import SCALE as SPARSE_SCALE, SPARSE_CASES, check_sparse
    case = {c.name: c for c in SPARSE_CASES}[case_name]
    q, cache, idx, kw = case.inputs()
    try:
        out, lse, info = runner.run_sparse_decode(q, cache, idx, SPARSE_SCALE, **kw, impl=case.impl, device=device,
                                                  order=order, seed=11, flavor=flavor, exe=exe)
    except runner.EmulatorError as e:
        return mutate.emulator_failure(e)
    ref_out, ref_lse = case.reference(q, cache, idx, kw)
    try:
        check_sparse(out, lse, ref_out, ref_lse, case.q_dtype, case.name, tol=case.tolerance(info["impl"]))
    except AssertionError as e:
        return mutate.wrong_result(e)
    return None


def run_check(case_name: str, flavor: str, order: str, device: str, exe: Path) -> str | None:
    """None if the run passed, else how it failed (first line)."""
    if case_name.startswith("sparse:"):
        return run_sparse_check(case_name[len("sparse:"):], flavor, order, device, exe)
    case = NAN_BAND if case_name == "nan band" else CASES[case_name]
    q_nope, q_pe, cache, table, seqlens, scale = case.inputs()
    if case is NAN_BAND:
        last = int(seqlens[0]) - 1
        cache[int(table[0, last // case.block_size]), last % case.block_size, 300] = float("nan")  # wn = 1 columns
    try:
        out, lse, _ = runner.run_decode(q_nope, q_pe, cache, table, seqlens, SCALE, case.causal, kv_scale=scale,
                                        impl=case.impl, device=device, order=order, seed=11, flavor=flavor, exe=exe)
    except runner.EmulatorError as e:
        return mutate.emulator_failure(e)
    ref_out, ref_lse = case.reference(q_nope, q_pe, cache, table, seqlens, scale)
    try:
        if case is NAN_BAND:  # only query 0 must match (query 1 sees the NaN)
            out, lse, ref_out, ref_lse = out[:, 0], lse[:, 0], ref_out[:, 0], ref_lse[:, 0]
        check_close(out, lse, ref_out, ref_lse, case.q_dtype, case.name, tol=case.tolerance())
    except AssertionError as e:
        return mutate.wrong_result(e)
    return None


def evaluate(m: Mutation, mutant: Path):
    verdicts = []
    for case_name, flavor, order, device in m.checks:
        exe = runner.build(flavor, csrc=mutant)
        verdicts.append((f"{case_name} [{flavor} {order} {device}]", run_check(case_name, flavor, order, device, exe)))
    return verdicts


if __name__ == "__main__":
    sys.exit(mutate.main(MUTATIONS, evaluate, __doc__))
