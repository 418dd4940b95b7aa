"""The CUDA kernels' real source (csrc/cuda), executed on the CPU by the SIMT emulator
(tests/cuda_emu, docs/cuda-emulation.md) and checked against the float64 reference.

`make test` runs the fast subset (plain build, forward thread order); `make test-emulated`
(MLA_EXT_EMU_FULL=1) adds the reverse and seeded-random thread orders and the ASan+UBSan and
TSan builds. The cases are tests/cuda_cases.py's, the same ones tests/test_cuda.py runs on a GPU.
"""
import pytest
import torch

from cuda_cases import (APPEND_CASES, DECODE_CASES, SCALE, DecodeCase, check_close)
from cuda_emu import runner
from cuda_emu.pytest_support import EMULATED, FULL, MODE_IDS, MODES, build_fixture

pytestmark = EMULATED

harness = build_fixture("harness")


def run_case(case: DecodeCase, harness, flavor="plain", order="forward", device="sm90", seed=7, inputs=None):
    q_nope, q_pe, cache, table, seqlens, scale = inputs or case.inputs()
    out, lse, info = runner.run_decode(q_nope, q_pe, cache, table, seqlens, SCALE, case.causal, kv_scale=scale,
                                       impl=case.impl, device=device, order=order, seed=seed, flavor=flavor,
                                       exe=harness(flavor))
    ref_out, ref_lse = case.reference(q_nope, q_pe, cache, table, seqlens, scale)
    return out, lse, ref_out, ref_lse, info


def expected_impl(case: DecodeCase):
    return "tc" if case.impl == "auto" and case.q_dtype != torch.float32 else "simple"


@pytest.mark.parametrize("flavor,order", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("case", DECODE_CASES, ids=[c.name for c in DECODE_CASES])
def test_decode(case, flavor, order, harness):
    out, lse, ref_out, ref_lse, info = run_case(case, harness, flavor, order)
    assert info["impl"] == expected_impl(case), info  # the kernel we meant to test is the one that ran
    if "split" in case.name:
        assert info["num_splits"] > 1 and info["launches"] == 2, info  # split kernel + combine
    check_close(out, lse, ref_out, ref_lse, case.q_dtype, f"{case.name} [{flavor} {order}]", tol=case.tolerance())


# Every tensor-core tile configuration: L (sm_90, 227 KB), M (sm_80, 163 KB), S (sm_86 / sm_89, 99 KB).
CONFIG_CASES = [c for c in DECODE_CASES if c.name in (
    "bf16 s_q=2 causal", "fp16 s_q=4 h=64", "fp8 cache, bf16 q", "fp8 cache, fp16 q, block_size=7", "bf16 split-KV")]


@pytest.mark.parametrize("device,config", [("sm80", 1), ("sm86", 2)])
@pytest.mark.parametrize("case", CONFIG_CASES, ids=[c.name for c in CONFIG_CASES])
def test_decode_tile_configs(case, device, config, harness):
    out, lse, ref_out, ref_lse, info = run_case(case, harness, device=device, order="random" if FULL else "forward")
    assert info["impl"] == "tc" and info["config"] == config, info
    check_close(out, lse, ref_out, ref_lse, case.q_dtype, f"{case.name} [{device}]", tol=case.tolerance())


# Where the NaN sits: V column 5 (the first key-half warps' output columns), V column 300 (the
# second half's), column 540 (rope only: the score is NaN but V is finite); fp16 / fp8 caches;
# a long sequence so the split-KV combine merges the NaN row.
NAN_VARIANTS = {
    "bf16 col 5": (dict(), 5),
    "bf16 col 300": (dict(), 300),
    "fp16 col 300": (dict(q_dtype=torch.float16), 300),
    "fp8 col 300": (dict(fp8=True), 300),
    "bf16 rope col 540": (dict(), 540),
    "bf16 col 300 split-KV": (dict(lens=(700, 70), extra_cols=30), 300),
}


@pytest.mark.parametrize("variant", list(NAN_VARIANTS))
@pytest.mark.parametrize("impl", ["auto", "simple"])
@pytest.mark.parametrize("device", ["sm90", "sm86"])
def test_masked_key_with_nan_stays_masked(variant, impl, device, harness):
    """A key that query j = 0 must not see (causal, s_q = 2) holds NaN: query 0's output stays
    finite and equal to the reference; query 1 (which sees it) is NaN in every column, as in the
    reference (an inf / NaN a query sees is never hidden as an empty row)."""
    kw, col = NAN_VARIANTS[variant]
    case = DecodeCase(f"nan in a causally masked key {variant}", s_q=2, impl=impl, **{"lens": (40, 70), **kw})
    q_nope, q_pe, cache, table, seqlens, scale = case.inputs()
    last = int(seqlens[0]) - 1  # visible to query 1 only
    block, slot = int(table[0, last // case.block_size]), last % case.block_size
    if case.fp8:
        cache.view(torch.uint8)[block, slot, col] = 0x7F  # the e4m3fn NaN code
    else:
        cache[block, slot, col] = float("nan")
    out, lse, ref_out, ref_lse, info = run_case(case, harness, device=device,
                                                inputs=(q_nope, q_pe, cache, table, seqlens, scale))
    assert info["impl"] == expected_impl(case)
    if "split" in variant:
        assert info["num_splits"] > 1, info
    assert torch.isnan(ref_out[0, 1]).all() and torch.isnan(ref_lse[0, 1]).all()
    assert torch.isnan(out[0, 1]).all(), "query 1 sees the NaN key: its whole output must be NaN"
    assert torch.isnan(lse[0, 1]).all(), "query 1 sees the NaN key: its lse must be NaN"
    tol = case.tolerance()
    check_close(out[:, 0], lse[:, 0], ref_out[:, 0], ref_lse[:, 0], case.q_dtype, "query 0 (key masked)", tol=tol)
    check_close(out[1:], lse[1:], ref_out[1:], ref_lse[1:], case.q_dtype, "sequence 1 (no NaN)", tol=tol)


@pytest.mark.parametrize("flavor,order", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("case", APPEND_CASES, ids=[c.name for c in APPEND_CASES])
def test_append(case, flavor, order, harness):
    from mla_ext import reference
    kv_c, k_pe, cache, slots, scale = case.inputs()
    got, info = runner.run_append(kv_c, k_pe, cache, slots, scale, order=order, flavor=flavor, exe=harness(flavor))
    want = reference.append_kv(kv_c, k_pe, cache, slots, scale)
    assert info["launches"] == 1
    # Bit-exact: a copy, or the fp8 quantisation the CPU kernel and the reference share; the
    # untouched slots keep their NaN bytes.
    assert torch.equal(got.view(torch.uint8), want.view(torch.uint8)), case.name


@pytest.mark.parametrize("impl", ["auto", "simple"])
@pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float16])
def test_fp8_every_code_exact(impl, q_dtype, harness):
    """One visible key, so each query's output is that key's V row: every finite e4m3 code
    (254 of them, in the first 512 columns) must come out exactly, through the kernels' own
    dequantisation (byte permutes + one exact multiply) and the kv_scale folding."""
    finite = [c for c in range(256) if c & 0x7F != 0x7F]
    row = torch.tensor((finite * 3)[:576], dtype=torch.uint8)
    cache = torch.full((2, 16, 576), 0x7F, dtype=torch.uint8)  # unused slots: the NaN code
    cache[1, 0] = row
    cache = cache.view(torch.float8_e4m3fn)
    table = torch.tensor([[1, 0, 7]], dtype=torch.int32)
    seqlens = torch.tensor([1], dtype=torch.int32)
    gen = torch.Generator().manual_seed(5)
    q = torch.randn(1, 1, 8, 576, generator=gen).to(q_dtype)
    scale = torch.tensor([0.5])  # a power of two: x * scale stays exact
    out, lse, info = runner.run_decode(q[..., :512].contiguous(), q[..., 512:].contiguous(), cache, table, seqlens,
                                       SCALE, True, kv_scale=scale, impl=impl, exe=harness("plain"))
    assert info["impl"] == ("tc" if impl == "auto" else "simple")
    want = (cache[1, 0, :512].to(torch.float64) * 0.5).to(q_dtype).expand(8, 512)
    assert torch.equal(out[0, 0], want)
    assert torch.isfinite(lse).all()


def test_mutation_patterns_match_sources():
    """Every planted bug of the mutation check (tests/cuda_emu/mutations.py, run by make
    test-emulated) still finds its line exactly once: a refactor must update them, not
    silently turn a mutation into a no-op."""
    from cuda_emu.mutations import MUTATIONS
    assert len(MUTATIONS) >= 8
    for m in MUTATIONS:
        text = (runner.REPO / "csrc" / m.path).read_text()
        assert text.count(m.old) == 1, f"{m.name}: its line occurs {text.count(m.old)} times in csrc/{m.path}"
