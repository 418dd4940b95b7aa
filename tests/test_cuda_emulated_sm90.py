"""The Hopper (sm_90a) building blocks on the CPU: csrc/cuda/sm90/ptx_sm90.cuh's wrappers run in the
SIMT emulator's sm_90 model (tests/cuda_emu/emu_sm90.cpp, docs/cuda-emulation.md "Hopper").

- test_gemm_probe: csrc/cuda/sm90/gemm_probe.cuh end to end (a producer warpgroup loading 128-byte
  swizzled tiles with TMA box copies into a 2-stage mbarrier ring, a consumer warpgroup running
  wgmma m64nNk16 from shared-memory descriptors, K-major and MN-major B) against a float64 matmul.
  `make test` runs the plain build in forward thread order; MLA_EXT_EMU_FULL=1 adds reverse and
  random orders and the ASan+UBSan and TSan builds.
- test_gemm_probe_compiles_for_sm90a: the same source (plus two wgmma_rs kernels) through plain nvcc
  for sm_90a: no spills, and the SASS holds the Hopper instructions the wrappers mean (HGMMA with A
  from shared memory and from registers, UTMALDG, SYNCS, USETMAXREG, WARPGROUP).
- test_decode_sm90: the Hopper decode kernel (csrc/cuda/sm90/decode_sm90.cuh, DecodeImpl::kSm90)
  through the real host code (planner, split-KV workspace, combine) on the shared bf16 DECODE_CASES
  and a few Hopper-specific shapes, against the float64 reference; its sm_90a nvcc build (no spills,
  the HGMMA / LDGSTS / SYNCS / USETMAXREG the source means) in test_decode_sm90_compiles_for_sm90a.
- The descriptor / accumulator semantics themselves are checked against CuTe's GMMA layouts in
  tests/test_cute_layouts.py; tests/cuda_emu/mutations_sm90.py plants bugs that must be caught.
"""
import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import randn
from cuda_cases import DECODE_CASES, SCALE, DecodeCase, check_close
from cuda_emu import runner, sm90_runner
from cuda_emu.pytest_support import EMULATED, MODE_IDS, MODES, build_fixture

pytestmark = EMULATED

ROOT = Path(__file__).resolve().parents[1]


probe = build_fixture("probe", program="sm90_gemm_probe")


@pytest.mark.parametrize("flavor,order", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("n,b_mn,dtype", [(64, False, torch.bfloat16), (64, True, torch.bfloat16),
                                          (256, False, torch.bfloat16), (256, True, torch.bfloat16),
                                          (64, True, torch.float16)],
                         ids=["n64-Bk", "n64-Bmn", "n256-Bk", "n256-Bmn", "n64-Bmn-fp16"])
def test_gemm_probe(n, b_mn, dtype, flavor, order, probe, gen):
    k = 256  # 4 chunks through a 2-stage ring: every stage is refilled once (phase parity 1 is used)
    a = randn((64, k), gen, dtype)
    b = randn((k, n) if b_mn else (n, k), gen, dtype)
    c = sm90_runner.run_gemm(a, b, b_mn, order=order, seed=5, flavor=flavor, exe=probe(flavor))
    ref = a.double() @ (b.double() if b_mn else b.double().T)
    # Products of bf16 are exact; the emulator sums each wgmma's 16 products in double and rounds
    # the fp32 accumulator once per wgmma (K / 16 = 16 roundings of |C| <~ 60: < 1e-4 absolute).
    torch.testing.assert_close(c.double(), ref, rtol=1e-5, atol=1e-4)


def test_gemm_probe_sees_every_operand_element(probe, gen):
    """A single changed element of A or B (one chunk, one k-step) must change C: no part of either
    operand is skipped or read twice (a wrong k-step advance or swizzle would reuse or drop data)."""
    k = 128
    a = randn((64, k), gen, torch.bfloat16)
    b = randn((k, 64), gen, torch.bfloat16)
    base = sm90_runner.run_gemm(a, b, True, exe=probe("plain"))
    for (i, j) in [(0, 0), (37, 70), (63, 127)]:
        a2 = a.clone()
        a2[i, j] += 1
        c = sm90_runner.run_gemm(a2, b, True, exe=probe("plain"))
        changed = (c != base).nonzero().tolist()
        assert {r for r, _ in changed} == {i}, f"A[{i},{j}] changed rows {sorted({r for r, _ in changed})}"
        delta = a2[i, j].double() - a[i, j].double()  # +1 after bf16 rounding
        torch.testing.assert_close(c[i].double() - base[i].double(), delta * b[j].double(), rtol=1e-5, atol=1e-4)


sync_probe = build_fixture("sync_probe", program="sm90_sync_probe")


@pytest.mark.parametrize("flavor,order", MODES, ids=MODE_IDS)
def test_bulk_copy_ring(flavor, order, sync_probe):
    """cp.async.bulk rows through a 2-stage full / empty mbarrier ring (8 chunks: both parities of
    both stages) arrive intact (sm90_sync_probe.cpp bulk_ring: 1 per byte equal to the input)."""
    out = sm90_runner.run_sync_scenario("bulk_ring", order=order, flavor=flavor, exe=sync_probe(flavor))
    assert out.size == 8 * 32 * 256 and out.all(), f"{int((out == 0).sum())} bytes differ"


@pytest.mark.parametrize("flavor,order", MODES, ids=MODE_IDS)
def test_named_barrier_pingpong(flavor, order, sync_probe):
    """Two warpgroups hand a buffer back and forth 4 times with bar.arrive / bar.sync: 4 x (1 + 2)."""
    out = sm90_runner.run_sync_scenario("named_pingpong", order=order, flavor=flavor, exe=sync_probe(flavor))
    assert out.tolist() == [12] * 128


def test_accumulator_read_before_wait_is_poisoned(sync_probe):
    """A wgmma's accumulators read between issue and wait_group are NaN; after the wait, C + A B."""
    out = sm90_runner.run_sync_scenario("acc_before_wait", exe=sync_probe("plain")).view(np.float32).reshape(128, 2)
    assert np.isnan(out[:, 0]).all() and (out[:, 1] == 1.0).all()


@pytest.mark.parametrize("scenario,message", [
    ("never_arrives", "deadlock in block (0,0,0): no thread can make progress; threads 0-63 poll "
                      "mbarrier.try_wait.parity 0 on mbarrier 0x0 (phase 0, pending arrivals 1 of 2"),
    ("named_count", "threads 0-63 poll bar.sync 3, 96 (64 arrived); threads 64-127 have exited"),
    ("setmaxnreg_split", "reached setmaxnreg while other threads of its warpgroup wait in setmaxnreg at another"),
    ("mbar_clobbered", "was overwritten by a plain store since its init"),
    ("rs_regs_changed", "the register A operand of a wgmma.mma_async changed between its issue and the wait_group"),
])
def test_sync_misuse_is_reported(scenario, message, sync_probe):
    """Each misuse ends in the emulator error that names it (a GPU would hang or misbehave)."""
    with pytest.raises(runner.EmulatorError) as e:
        sm90_runner.run_sync_scenario(scenario, exe=sync_probe("plain"))
    assert "mla_emu error" in str(e.value) and message in str(e.value), str(e.value)[-800:]


def _nvcc():
    nvcc = shutil.which(os.environ.get("NVCC", "nvcc"))
    return nvcc


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found")
def test_gemm_probe_compiles_for_sm90a():
    """Plain nvcc for sm_90a: ptxas accepts every wrapper's PTX, no spills or local memory."""
    src = ROOT / "tests" / "cuda_emu" / "sm90_gemm_probe.cu"
    inputs = [src] + sorted((ROOT / "csrc" / "cuda" / "sm90").glob("*.cuh")) + [ROOT / "csrc" / "cuda" / "common.cuh"]
    key = hashlib.sha256(b"".join(p.read_bytes() for p in inputs)).hexdigest()[:16]
    out = ROOT / "build" / "sm90" / f"gemm_probe-{key}"
    out.mkdir(parents=True, exist_ok=True)
    obj, log = out / "probe.o", out / "ptxas.log"
    if not obj.exists():
        cmd = [_nvcc(), "-std=c++17", "-O3", "--use_fast_math", "-gencode=arch=compute_90a,code=sm_90a",
               "-Xptxas=-v,-warn-spills,-warn-lmem-usage,-Werror", f"-I{ROOT / 'csrc' / 'cuda'}", "-c", str(src),
               "-o", str(obj) + ".tmp"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        log.write_text(r.stdout + r.stderr)
        assert r.returncode == 0, f"nvcc failed:\n{(r.stdout + r.stderr)[-4000:]}"
        os.replace(str(obj) + ".tmp", obj)
    text = log.read_text()
    kernels = re.findall(r"Compiling entry function '([^']+)'", text)
    assert len(kernels) == 7, text[-2000:]  # 5 GEMM probe kernels, 2 wgmma_rs compile kernels
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text)
    assert spills and all(s == ("0", "0") for s in spills), spills
    regs = [int(x) for x in re.findall(r"Used (\d+) registers", text)]
    print("ptxas registers per probe kernel:", regs)
    cuobjdump = next(iter(sorted(ROOT.glob(".venv/lib/python3*/site-packages/nvidia/cu*/bin/cuobjdump"))), None)
    cuobjdump = cuobjdump or shutil.which("cuobjdump")
    if cuobjdump is None:
        pytest.skip("compiled; no cuobjdump to read the SASS (make cuda-tools)")
    sass = subprocess.run([str(cuobjdump), "-sass", str(obj)], capture_output=True, text=True, check=True).stdout
    for op, want in [("HGMMA.64x64x16.F32.BF16", 8), ("HGMMA.64x256x16.F32.BF16", 8), ("HGMMA.64x64x16.F32 ", 4), ("UTMALDG.2D", 13),
                     ("SYNCS.PHASECHK.TRANS64.TRYWAIT", 20), ("SYNCS.ARRIVE.TRANS64", 10),
                     ("USETMAXREG.TRY_ALLOC", 5), ("USETMAXREG.DEALLOC", 5), ("WARPGROUP.ARRIVE", 5),
                     ("WARPGROUP.DEPBAR.LE", 5)]:
        assert sass.count(op) >= want, f"{op}: {sass.count(op)} in the SASS, want >= {want}"
    # A from registers (wgmma_rs): the A operand is a register, not a gdesc.
    for pattern in (r"HGMMA\.64x64x16\.F32\.BF16 R\d+, R\d+", r"HGMMA\.64x256x16\.F32 R\d+, R\d+"):
        assert re.search(pattern, sass), f"no {pattern} in the SASS"


def test_generated_wgmma_header_is_current():
    """csrc/cuda/sm90/wgmma_gen.cuh is exactly what gen_wgmma.py writes."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("gen_wgmma", ROOT / "csrc" / "cuda" / "sm90" / "gen_wgmma.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert (ROOT / "csrc" / "cuda" / "sm90" / "wgmma_gen.cuh").read_text() == mod.main()


# ------------------------------------------------------------------------------ the sm90 decode kernel

# Every shared case the kernel supports (bf16 or fp16 query; a cache of the same type or fp8; the
# planner falls back for fp32), plus shapes that exercise its 64-row blocks and 64-key tiles.
SM90_CASES = [c for c in DECODE_CASES if c.q_dtype in (torch.bfloat16, torch.float16) and c.impl == "auto"] + [
    DecodeCase("sm90 bf16 s_q=4 h=16: one full 64-row block", s_q=4, h=16, lens=(0, 1, 64, 129)),
    DecodeCase("sm90 bf16 s_q=3 h=32: padded second row block", s_q=3, h=32, lens=(1, 77), block_size=64),
    DecodeCase("sm90 bf16 h=64 s_q=1, block_size=64, tiles of exactly 64 keys", h=64, lens=(64, 128, 1),
               block_size=64),
    DecodeCase("sm90 fp8 s_q=4 h=16, block_size=1", fp8=True, s_q=4, h=16, lens=(0, 1, 150), block_size=1),
    DecodeCase("sm90 fp16 s_q=2 h=32 split-KV", q_dtype=torch.float16, s_q=2, h=32, lens=(700, 5), extra_cols=30),
    DecodeCase("sm90 fp8 cache, fp16 q, s_q=3 h=32 split-KV", fp8=True, q_dtype=torch.float16, s_q=3, h=32,
               lens=(650, 64), extra_cols=30),
]
assert len(SM90_CASES) >= 19 and sum(c.fp8 for c in SM90_CASES) >= 6, [c.name for c in SM90_CASES]
assert sum(c.q_dtype == torch.float16 for c in SM90_CASES) >= 6, [c.name for c in SM90_CASES]


harness = build_fixture("harness")


def run_sm90(case: DecodeCase, harness, flavor="plain", order="forward"):
    q_nope, q_pe, cache, table, seqlens, scale = case.inputs()
    out, lse, info = runner.run_decode(q_nope, q_pe, cache, table, seqlens, SCALE, case.causal, kv_scale=scale,
                                       impl="sm90", device="sm90", order=order, seed=11, flavor=flavor,
                                       exe=harness(flavor))
    ref_out, ref_lse = case.reference(q_nope, q_pe, cache, table, seqlens, scale)
    return out, lse, ref_out, ref_lse, info


@pytest.mark.parametrize("flavor,order", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("case", SM90_CASES, ids=[c.name for c in SM90_CASES])
def test_decode_sm90(case, flavor, order, harness):
    out, lse, ref_out, ref_lse, info = run_sm90(case, harness, flavor, order)
    assert info["impl"] == "sm90", info  # the Hopper kernel ran, not a fallback
    # Every call: the metadata kernel, the persistent decode kernel (one CTA per emulated SM), the combine.
    assert info["launches"] == 3 and info["sched_ctas"] == 132, info
    # The tolerances of tests/cuda_cases.py TOL (bf16: 2e-2 norm-wise): P is rounded to bf16 before
    # P V, as in the sm80 kernel; the wgmma products are exact, fp32 accumulation.
    check_close(out, lse, ref_out, ref_lse, case.q_dtype, f"{case.name} [sm90 {flavor} {order}]", tol=case.tolerance())


# Where the NaN sits (as in tests/test_cuda_emulated.py): V column 5 (WG 0's output columns),
# 300 (WG 1's), 540 (rope only: the score is NaN, V is finite), and a split-KV run.
SM90_NAN_VARIANTS = {
    "col 5": (dict(), 5),
    "col 300": (dict(), 300),
    "rope col 540": (dict(), 540),
    "col 300 split-KV": (dict(lens=(700, 70), extra_cols=30), 300),
    "col 300 s_q=4 h=16": (dict(s_q=4, h=16, lens=(100, 70)), 300),
    "fp8 col 300": (dict(fp8=True), 300),
    "fp8 col 5 split-KV": (dict(fp8=True, lens=(700, 70), extra_cols=30), 5),
    "fp16 col 300": (dict(q_dtype=torch.float16), 300),
    "fp16 col 5 block_size=64 (TMA tile)": (dict(q_dtype=torch.float16, block_size=64), 5),
    "fp8 fp16-q col 300 split-KV": (dict(fp8=True, q_dtype=torch.float16, lens=(700, 70), extra_cols=30), 300),
}


@pytest.mark.parametrize("variant", list(SM90_NAN_VARIANTS))
def test_decode_sm90_masked_key_with_nan_stays_masked(variant, harness):
    """A key that query j = 0 must not see (causal, s_q >= 2) holds NaN: query 0's output stays
    finite and equal to the reference; the last query (which sees it) is NaN in every column,
    as in the reference. The sm90 kernel's band path (decode_sm90.cuh) is what makes this hold."""
    kw, col = SM90_NAN_VARIANTS[variant]
    case = DecodeCase(f"sm90 nan in a causally masked key {variant}", **{"s_q": 2, "lens": (40, 70), **kw})
    q_nope, q_pe, cache, table, seqlens, scale = case.inputs()
    last = int(seqlens[0]) - 1  # visible to the last query only
    block, slot = int(table[0, last // case.block_size]), last % case.block_size
    if case.fp8:
        cache.view(torch.uint8)[block, slot, col] = 0x7F  # the e4m3fn NaN code
    else:
        cache[block, slot, col] = float("nan")
    out, lse, info = runner.run_decode(q_nope, q_pe, cache, table, seqlens, SCALE, case.causal, kv_scale=scale,
                                       impl="sm90", device="sm90", exe=harness("plain"))
    ref_out, ref_lse = case.reference(q_nope, q_pe, cache, table, seqlens, scale)
    assert info["impl"] == "sm90", info
    if "split" in variant:  # sequence 0's unit is cut over several persistent CTAs (partials + combine)
        spans = schedule_spans(case.lens, case.s_q, case.h, case.causal, info["sched_ctas"])
        assert spans[0][1] > spans[0][0], (info, spans)
    j = case.s_q - 1
    assert torch.isnan(ref_out[0, j]).all() and torch.isnan(ref_lse[0, j]).all()
    assert torch.isnan(out[0, j]).all(), "the last query sees the NaN key: its whole output must be NaN"
    assert torch.isnan(lse[0, j]).all(), "the last query sees the NaN key: its lse must be NaN"
    tol = case.tolerance()
    check_close(out[:, :j], lse[:, :j], ref_out[:, :j], ref_lse[:, :j], case.q_dtype, "earlier queries (key masked)",
                tol=tol)
    check_close(out[1:], lse[1:], ref_out[1:], ref_lse[1:], case.q_dtype, "sequence 1 (no NaN)", tol=tol)


# ---- The TMA producer path (block_size % 64 == 0, 16-bit cache): full tiles through 2-D TMA boxes,
# the partial last tile of each unit through the cp.async gather (decode_sm90.cuh).

def expected_tma_boxes(case: DecodeCase, seqlens, ctas: int) -> int:
    """9 boxes per tile whose 64 keys are all below its piece's key_end, over every piece of the
    schedule (schedule_pieces below: the kernel's pieces and key_end = min(the unit's keys,
    tile_end * 64), in Python)."""
    boxes = 0
    for keys, begin, end in schedule_pieces(seqlens.tolist(), case.s_q, case.h, case.causal, ctas):
        key_end = min(keys, end * 64)
        boxes += 9 * sum((t + 1) * 64 <= key_end for t in range(begin, end))
    return boxes


def cut_units(case: DecodeCase, ctas: int) -> int:
    """Units the schedule cuts over several CTAs (so their pieces go through the partial slots)."""
    return sum(1 for s in schedule_spans(case.lens, case.s_q, case.h, case.causal, ctas) if s and s[1] > s[0])


TMA_CASES = [
    DecodeCase("sm90 TMA bf16 block_size=64 s_q=2: full and partial tiles", s_q=2, block_size=64,
               lens=(0, 1, 64, 77, 300)),
    DecodeCase("sm90 TMA bf16 block_size=128 s_q=4 h=16 causal", s_q=4, h=16, block_size=128, lens=(129, 256, 5)),
    DecodeCase("sm90 TMA bf16 block_size=128 split-KV", block_size=128, lens=(700, 70), extra_cols=30, s_q=2),
    DecodeCase("sm90 TMA bf16 block_size=64 h=64 s_q=3 split-KV, padded rows", block_size=64, h=64, s_q=3,
               lens=(640, 3), extra_cols=30),
    DecodeCase("sm90 TMA fp16 block_size=128 s_q=2 split-KV", q_dtype=torch.float16, block_size=128, s_q=2,
               lens=(700, 77, 128), extra_cols=30),
]


@pytest.mark.parametrize("flavor,order", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("case", TMA_CASES, ids=[c.name for c in TMA_CASES])
def test_decode_sm90_tma(case, flavor, order, harness):
    """Full tiles come through TMA boxes (exactly 9 per full tile, counted by the emulator), partial
    tiles through cp.async with their NaN-poisoned neighbour slots zero-filled: the result equals
    the float64 reference (finite: no poisoned slot reached a product)."""
    out, lse, ref_out, ref_lse, info = run_sm90(case, harness, flavor, order)
    assert info["impl"] == "sm90", info
    if "split" in case.name:  # the schedule cuts a unit: full tiles of non-last pieces go through TMA too
        assert cut_units(case, info["sched_ctas"]) > 0, info
    seqlens = case.inputs()[4]
    want = expected_tma_boxes(case, seqlens, info["sched_ctas"])
    assert want > 0 and info["tma_boxes"] == want, (info, want)
    assert info["cp_async"] > 0, info  # the Q block and the partial tiles
    check_close(out, lse, ref_out, ref_lse, case.q_dtype, f"{case.name} [sm90 {flavor} {order}]", tol=case.tolerance())


@pytest.mark.parametrize("what", ["block_size=16", "padded block stride", "fp8 block_size=64"])
def test_decode_sm90_without_tma_gathers(what, harness):
    """Layouts a 2-D tensor map cannot describe (block_size not a multiple of 64; blocks further
    apart than block_size rows) and the fp8 cache take the cp.async gather for every tile: no TMA
    box, same results."""
    if what == "block_size=16":
        case = DecodeCase("sm90 no TMA bs16", s_q=2, lens=(70, 200))
    elif what == "padded block stride":
        case = DecodeCase("sm90 no TMA padded", s_q=2, block_size=64, lens=(70, 200))
    else:
        case = DecodeCase("sm90 no TMA fp8 bs64", fp8=True, s_q=2, block_size=64, lens=(70, 200))
    q_nope, q_pe, cache, table, seqlens, scale = case.inputs()
    if what == "padded block stride":  # [NB, 64 of 65 rows, 576]: block stride 65 rows
        padded = torch.full((cache.shape[0], 65, cache.shape[2]), float("nan"), dtype=cache.dtype)
        padded[:, :64] = cache
        cache = padded[:, :64]
        assert cache.stride(0) == 65 * 576
    out, lse, info = runner.run_decode(q_nope, q_pe, cache, table, seqlens, SCALE, case.causal, kv_scale=scale,
                                       impl="sm90", device="sm90", exe=harness("plain"))
    ref_out, ref_lse = case.reference(q_nope, q_pe, cache, table, seqlens, scale)
    assert info["impl"] == "sm90" and info["tma_boxes"] == 0, info
    check_close(out, lse, ref_out, ref_lse, case.q_dtype, what, tol=case.tolerance())


@pytest.mark.parametrize("bad_id", [-1, "past the end"])
@pytest.mark.parametrize("block_size", [64, 16], ids=["bs64 TMA", "bs16 gather"])
def test_decode_sm90_out_of_range_block_id_reads_zero_rows(bad_id, block_size, harness):
    """A block-table entry outside [0, NB) inside a sequence (the API's index check would reject it;
    the kernel must still stay in bounds) reads as zero rows on both load paths: through TMA a box
    past the tensor's last row (zero-filled), through the gather zero-filled cp.async. Expected:
    the reference on the same table with that entry pointing at an all-zero block."""
    case = DecodeCase(f"sm90 bad block id {block_size}", s_q=2, block_size=block_size, lens=(300, 70))
    q_nope, q_pe, cache, table, seqlens, scale = case.inputs()
    nb = cache.shape[0]
    bad = -1 if bad_id == -1 else nb + 3
    table[0, 1] = bad  # keys [bs, 2 bs) of sequence 0: a full TMA tile at block_size 64
    out, lse, info = runner.run_decode(q_nope, q_pe, cache, table, seqlens, SCALE, case.causal, kv_scale=scale,
                                       impl="sm90", device="sm90", exe=harness("plain"))
    assert info["impl"] == "sm90" and (info["tma_boxes"] > 0) == (block_size == 64), info
    zero_cache = torch.cat([cache, torch.zeros_like(cache[:1])])
    zero_table = table.clone()
    zero_table[0, 1] = nb
    ref_out, ref_lse = case.reference(q_nope, q_pe, zero_cache, zero_table, seqlens, scale)
    check_close(out, lse, ref_out, ref_lse, case.q_dtype, f"block id {bad}", tol=case.tolerance())


def test_decode_sm90_tma_nan_in_masked_key(harness):
    """Block size 128, s_q = 2 causal: the last key of a full TMA tile (key 127 of a 128-key
    sequence) holds NaN in V column 300; query 0 must not see it (the band fix-up on a TMA tile),
    query 1 is all NaN."""
    case = DecodeCase("sm90 TMA nan band", s_q=2, block_size=128, lens=(128, 70))
    q_nope, q_pe, cache, table, seqlens, scale = case.inputs()
    cache[int(table[0, 0]), 127, 300] = float("nan")
    out, lse, info = runner.run_decode(q_nope, q_pe, cache, table, seqlens, SCALE, case.causal, kv_scale=scale,
                                       impl="sm90", device="sm90", exe=harness("plain"))
    ref_out, ref_lse = case.reference(q_nope, q_pe, cache, table, seqlens, scale)
    assert info["impl"] == "sm90" and info["tma_boxes"] > 0, info
    assert torch.isnan(out[0, 1]).all() and torch.isnan(lse[0, 1]).all()
    check_close(out[:, :1], lse[:, :1], ref_out[:, :1], ref_lse[:, :1], case.q_dtype, "query 0", tol=case.tolerance())
    check_close(out[1:], lse[1:], ref_out[1:], ref_lse[1:], case.q_dtype, "sequence 1", tol=case.tolerance())


@pytest.mark.parametrize("name", ["fp32 simple", "fp8 cache, fp32 q"])
def test_decode_sm90_unsupported_falls_back(name, harness):
    """Asked for the Hopper kernel, a config it does not support (an fp32 query, with an fp32 or an
    fp8 cache) gets the CUDA-core kernel, with correct results."""
    case = next(c for c in DECODE_CASES if c.name == name)
    out, lse, ref_out, ref_lse, info = run_sm90(case, harness)
    assert info["impl"] == "simple", info
    check_close(out, lse, ref_out, ref_lse, case.q_dtype, f"{case.name} [sm90 fallback]", tol=case.tolerance())


@pytest.mark.skipif(_nvcc() is None, reason="nvcc not found")
def test_decode_sm90_compiles_for_sm90a():
    """csrc/cuda/sm90/decode_sm90.cu (bf16 / fp16 query x 16-bit / fp8 cache) through plain nvcc for
    sm_90a: no spills or local memory, and the SASS holds the instructions the design means: HGMMA
    64x64 (S, A and B from shared memory), HGMMA 64x256 with A in registers (O += P V), LDGSTS (the
    cp.async gather), UTMALDG (the TMA boxes of the 16-bit caches), mbarrier SYNCS,
    USETMAXREG (producer down, consumers up)."""
    src = ROOT / "csrc" / "cuda" / "sm90" / "decode_sm90.cu"
    inputs = [src] + sorted((ROOT / "csrc" / "cuda" / "sm90").glob("*.cuh")) + sorted(
        (ROOT / "csrc" / "cuda" / "sm90").glob("*.h")) + [ROOT / "csrc" / "cuda" / "common.cuh", ROOT / "csrc" / "mla_params.h",
                                                      ROOT / "csrc" / "cuda" / "schedule.cuh", ROOT / "csrc" / "cuda" / "combine.cuh"]
    key = hashlib.sha256(b"".join(p.read_bytes() for p in inputs)).hexdigest()[:16]
    out = ROOT / "build" / "sm90" / f"decode-{key}"
    out.mkdir(parents=True, exist_ok=True)
    obj, log = out / "decode_sm90.o", out / "ptxas.log"
    if not obj.exists():
        cmd = [_nvcc(), "-std=c++17", "-O3", "--use_fast_math", "--expt-relaxed-constexpr",
               "-gencode=arch=compute_90a,code=sm_90a", "-Xptxas=-v,-warn-spills,-warn-lmem-usage,-Werror",
               f"-I{ROOT / 'csrc' / 'cuda'}", "-c", str(src), "-o", str(obj) + ".tmp"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        log.write_text(r.stdout + r.stderr)
        assert r.returncode == 0, f"nvcc failed:\n{(r.stdout + r.stderr)[-4000:]}"
        os.replace(str(obj) + ".tmp", obj)
    text = log.read_text()
    entries = re.findall(r"Compiling entry function '([^']+)'", text)
    # <T, kFp8>(params, the cache's tensor map, whether to use it): bf16 / fp16 x 16-bit / fp8 cache
    assert sorted(entries) == sorted(f"_ZN3mla4cuda4sm9018decode_sm90_kernelI{t}Lb{f}EEEvNS_12DecodeParamsE14CUtensorMap_stb"
                                     for t in ("13__nv_bfloat16", "6__half") for f in (0, 1)), text[-2000:]
    assert re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", text) == [("0", "0")] * 4, text[-2000:]
    assert text.count("0 bytes stack frame") == 4, text[-2000:]
    print("ptxas:", re.findall(r"Used \d+ registers[^\n]*", text))
    cuobjdump = next(iter(sorted(ROOT.glob(".venv/lib/python3*/site-packages/nvidia/cu*/bin/cuobjdump"))), None)
    cuobjdump = cuobjdump or shutil.which("cuobjdump")
    if cuobjdump is None:
        pytest.skip("compiled; no cuobjdump to read the SASS (make cuda-tools)")
    sass = subprocess.run([str(cuobjdump), "-sass", str(obj)], capture_output=True, text=True, check=True).stdout
    for op, want in [("HGMMA.64x64x16.F32.BF16", 72), ("HGMMA.64x256x16.F32.BF16", 8), ("LDGSTS.E", 8),
                     ("HGMMA.64x64x16.F32 ", 72), ("HGMMA.64x256x16.F32 ", 8),  # the fp16 kernels
                     ("UTMALDG.2D", 18),  # the 16-bit caches' TMA box loads (block_size % 64 == 0), 9 each
                     ("SYNCS.PHASECHK.TRANS64.TRYWAIT", 2), ("SYNCS.ARRIVE.TRANS64", 2),
                     ("USETMAXREG.TRY_ALLOC", 1), ("USETMAXREG.DEALLOC", 1), ("WARPGROUP.ARRIVE", 2)]:
        assert sass.count(op) >= want, f"{op}: {sass.count(op)} in the SASS, want >= {want}"
    assert re.search(r"HGMMA\.64x256x16\.F32\.BF16 R\d+, R\d+", sass), "O += P V must take A (P) from registers"
    assert re.search(r"HGMMA\.64x256x16\.F32 R\d+, R\d+", sass), "fp16: O += P V must take A (P) from registers"
    # The consumers' register budget after setmaxnreg.inc is 232: the highest register the SASS names.
    top = max(int(x) for x in re.findall(r"\bR(\d+)\b", sass))
    print("highest register named in the SASS:", top)
    assert top < 232, top


# ------------------------------------------------------------------------------ the device-side schedule

SCHED_FIXED_COST, SCHED_MIN_COST = 2, 8  # csrc/cuda/schedule.cuh kSchedFixedCost, kSchedMinCost


def schedule_spans(lens, s_q, h, causal, ctas, block_m=64, block_n=64):
    """A readable model of schedule.cuh: for every (sequence, row block) unit, the CTAs of its first
    and last key tile (None for a unit with no tile). Used to pick cases that split units and write
    others directly; the kernel's results are checked against the float64 reference, not this."""
    M = s_q * h
    costs, tiles = [], []
    for L in lens:
        for m0 in range(0, M, block_m):
            j = (min(m0 + block_m, M) - 1) // h
            keys = max(0, min(L, L - s_q + j + 1)) if causal else L
            keys = keys if L > 0 else 0
            tiles.append(-(-keys // block_n))
            costs.append(SCHED_FIXED_COST + tiles[-1])
    per = max(-(-sum(costs) // ctas), SCHED_MIN_COST)
    spans, pos = [], 0
    for c, n in zip(costs, tiles):
        t0 = pos + SCHED_FIXED_COST
        spans.append(None if n == 0 else (t0 // per, (t0 + n - 1) // per))
        pos += c
    return spans


def schedule_pieces(lens, s_q, h, causal, ctas, block_m=64, block_n=64):
    """The pieces of the same model: (the unit's keys, tile_begin, tile_end) for every CTA's share
    of every unit with tiles (SchedCursor: CTA g owns cost positions [g per, (g + 1) per))."""
    M = s_q * h
    units = []
    for L in lens:
        for m0 in range(0, M, block_m):
            j = (min(m0 + block_m, M) - 1) // h
            keys = max(0, min(L, L - s_q + j + 1)) if causal else L
            units.append(keys if L > 0 else 0)
    costs = [SCHED_FIXED_COST + -(-k // block_n) for k in units]
    total = sum(costs)
    per = max(-(-total // ctas), SCHED_MIN_COST)
    pieces, pos = [], 0
    for keys, c in zip(units, costs):
        n, t0 = -(-keys // block_n), pos + SCHED_FIXED_COST
        for g in range(ctas):
            lo, hi = min(g * per, total), min((g + 1) * per, total)
            begin, end = min(max(lo - t0, 0), n), min(max(hi - t0, 0), n)
            if begin < end:
                pieces.append((keys, begin, end))
        pos += c
    return pieces


# (case, emulated SM count = persistent CTAs). Very skewed lengths, zero-length sequences, units that
# one CTA covers next to units cut into many pieces, a CTA that covers several units, all-empty.
SKEW_CASES = [
    (DecodeCase("sm90 sched skewed [0, 1, 5000, 17]", lens=(0, 1, 5000, 17), extra_cols=2), 4),
    (DecodeCase("sm90 sched skewed [0, 1, 5000, 17] 132 CTAs", lens=(0, 1, 5000, 17), extra_cols=2), 132),
    (DecodeCase("sm90 sched skewed s_q=2 h=64: two row blocks", s_q=2, h=64, lens=(17, 0, 2000, 1)), 5),
    (DecodeCase("sm90 sched skewed fp8 s_q=3", fp8=True, s_q=3, lens=(3000, 0, 2, 65), block_size=7), 3),
    (DecodeCase("sm90 sched one CTA: nothing split", lens=(0, 1, 300, 17)), 1),
    (DecodeCase("sm90 sched many short sequences, 2 CTAs", lens=(5, 0, 64, 65, 1, 130, 3, 0, 200)), 2),
    (DecodeCase("sm90 sched all sequences empty", lens=(0, 0, 0)), 4),
]


@pytest.mark.parametrize("flavor,order", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("case,ctas", SKEW_CASES, ids=[c.name for c, _ in SKEW_CASES])
def test_decode_sm90_schedule(case, ctas, flavor, order, harness):
    """The device-side schedule on skewed lengths: every row against the float64 reference (empty
    sequences: out 0, lse -inf), for a few persistent-CTA counts (the emulated SM count)."""
    q_nope, q_pe, cache, table, seqlens, scale = case.inputs()
    out, lse, info = runner.run_decode(q_nope, q_pe, cache, table, seqlens, SCALE, case.causal, kv_scale=scale,
                                       impl="sm90", device="sm90", sms=ctas, order=order, seed=11, flavor=flavor,
                                       exe=harness(flavor))
    assert info["impl"] == "sm90" and info["sched_ctas"] == ctas and info["launches"] == 3, info
    ref_out, ref_lse = case.reference(q_nope, q_pe, cache, table, seqlens, scale)
    check_close(out, lse, ref_out, ref_lse, case.q_dtype, f"{case.name} [{ctas} CTAs {flavor} {order}]",
                tol=case.tolerance())
    for i, L in enumerate(case.lens):
        if L == 0:
            assert (out[i] == 0).all() and torch.isneginf(lse[i]).all(), f"sequence {i} (empty)"


def test_schedule_cases_cover_split_and_direct_units():
    """The skewed cases really exercise both paths: units cut over several CTAs (partials + combine)
    next to units one CTA writes directly, and zero-tile units (schedule model above)."""
    split = direct = empty = 0
    for case, ctas in SKEW_CASES:
        spans = schedule_spans(case.lens, case.s_q, case.h, case.causal, ctas)
        split += sum(1 for s in spans if s and s[1] > s[0])
        direct += sum(1 for s in spans if s and s[1] == s[0])
        empty += sum(1 for s in spans if s is None)
    assert split >= 5 and direct >= 5 and empty >= 5, (split, direct, empty)
    spans = schedule_spans((0, 1, 5000, 17), 1, 16, True, 4)
    assert spans[2] == (0, 3) and spans[0] is None, spans  # the long sequence spans all 4 CTAs


def test_schedule_pieces_cover_each_tile_once():
    """The piece model the TMA box count rests on: every unit's tiles are covered by its pieces
    exactly once, and as pieces cut units only between 64-key tiles, the full tiles (the TMA ones)
    are each unit's floor(keys / 64) whatever the CTA count."""
    for case in [c for c, _ in SKEW_CASES] + TMA_CASES:
        for ctas in (1, 2, 3, 5, 132):
            pieces = schedule_pieces(case.lens, case.s_q, case.h, case.causal, ctas)
            spans = schedule_spans(case.lens, case.s_q, case.h, case.causal, ctas)
            full = sum(sum((t + 1) * 64 <= min(k, e * 64) for t in range(b, e)) for k, b, e in pieces)
            units = list(_unit_keys(case))
            assert full == sum(k // 64 for k in units), (case.name, ctas)
            assert sum(e - b for _, b, e in pieces) == sum(-(-k // 64) for k in units), (case.name, ctas)
            assert len(pieces) == sum(s[1] - s[0] + 1 for s in spans if s), (case.name, ctas)


def _unit_keys(case: DecodeCase):
    """Each unit's keys (what its row block's last row sees), in schedule order."""
    M = case.s_q * case.h
    for L in case.lens:
        for m0 in range(0, M, 64):
            j = (min(m0 + 64, M) - 1) // case.h
            yield (max(0, min(L, L - case.s_q + j + 1)) if case.causal else L) if L > 0 else 0


def test_decode_sm90_plan_ignores_seqlens(harness):
    """Graph safety: the same shapes with other lengths give the same plan, workspace and launches
    (the schedule is computed on the device), and each result is right."""
    infos = []
    for lens in [(0, 1, 5000, 17), (5000, 5000, 5000, 5000), (0, 0, 0, 0), (1, 2, 3, 4)]:
        case = DecodeCase(f"sm90 sched same shape {lens}", lens=lens)
        q_nope, q_pe, cache, table, seqlens, scale = case.inputs()
        # One block table width (the capacity is a shape): pad to 5000 keys.
        width = -(-5000 // case.block_size) + 1
        table = torch.cat([table, torch.full((4, width - table.shape[1]), -1, dtype=torch.int32)], 1)
        out, lse, info = runner.run_decode(q_nope, q_pe, cache, table, seqlens, SCALE, case.causal, impl="sm90",
                                           device="sm90", sms=6, exe=harness("plain"))
        ref_out, ref_lse = case.reference(q_nope, q_pe, cache, table, seqlens, scale)
        check_close(out, lse, ref_out, ref_lse, case.q_dtype, case.name, tol=case.tolerance())
        infos.append({k: info[k] for k in ("impl", "num_splits", "sched_ctas", "launches")})
    assert all(i == infos[0] for i in infos), infos
    assert infos[0] == {"impl": "sm90", "num_splits": 12, "sched_ctas": 6, "launches": 3}, infos


def test_sm90_mutation_patterns_match_sources():
    """Every planted bug of tests/cuda_emu/mutations_sm90.py (make test-emulated) still finds its text
    exactly once: a refactor must update them, not silently turn a mutation into a no-op."""
    from cuda_emu.mutations_sm90 import DECODE_MUTATIONS, MUTATIONS, SCHED_MUTATIONS
    assert len(SCHED_MUTATIONS) >= 3
    for m in MUTATIONS + DECODE_MUTATIONS + SCHED_MUTATIONS:
        text = (runner.REPO / "csrc" / m.path).read_text()
        assert text.count(m.old) == 1, f"{m.name}: its text occurs {text.count(m.old)} times in csrc/{m.path}"
