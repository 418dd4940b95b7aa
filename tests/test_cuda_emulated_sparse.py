"""The CUDA sparse decode kernels' real source (csrc/cuda/sparse_decode.cu), executed on the
CPU by the SIMT emulator (tests/cuda_emu, docs/cuda-emulation.md) and checked against the
float64 reference (mla_ext.sparse.sparse_decode).

`make test` runs the fast subset (plain build, forward thread order); MLA_EXT_EMU_FULL=1
(`make test-emulated`) adds the reverse and seeded-random thread orders and the ASan+UBSan and
TSan builds. The cases are tests/sparse_cuda_cases.py's, the ones tests/test_cuda.py runs on a GPU.
"""
import pytest
import torch

from cuda_emu import runner
from cuda_emu.pytest_support import EMULATED, FULL, MODE_IDS, MODES, build_fixture
from sparse_cuda_cases import NAN_BYTE, SCALE, SPARSE_CASES, SparseCase, check_sparse, make_cache, poison_unused

pytestmark = EMULATED

harness = build_fixture("harness")


def run_case(case: SparseCase, harness, flavor="plain", order="forward", device="sm90", impl=None, inputs=None):
    q, cache, idx, kw = inputs or case.inputs()
    out, lse, info = runner.run_sparse_decode(q, cache, idx, SCALE, **kw, impl=impl or case.impl, device=device,
                                              order=order, seed=7, flavor=flavor, exe=harness(flavor))
    ref_out, ref_lse = case.reference(q, cache, idx, kw)
    return out, lse, ref_out, ref_lse, info


# (case, impl): every case as planned ("auto": tensor cores for bf16 q with an fp8 / bf16
# cache), and those once more on the CUDA-core kernel.
CASE_IMPLS = [(c, "auto") for c in SPARSE_CASES] + [(c, "simple") for c in SPARSE_CASES
                                                   if c.expected_impl("auto") == "tc"]


@pytest.mark.parametrize("flavor,order", MODES, ids=MODE_IDS)
@pytest.mark.parametrize("case,impl", CASE_IMPLS, ids=[f"{c.name}-{i}" for c, i in CASE_IMPLS])
def test_sparse_decode(case, impl, flavor, order, harness):
    out, lse, ref_out, ref_lse, info = run_case(case, harness, flavor, order, impl=impl)
    assert info["impl"] == case.expected_impl(impl), info  # the kernel we meant to test is the one that ran
    if case.splits:  # the split + combine path runs where meant
        assert info["num_splits"] > 1 and info["launches"] == 2, info
    check_sparse(out, lse, ref_out, ref_lse, case.q_dtype, f"{case.name} [{impl} {flavor} {order}]",
                 tol=case.tolerance(info["impl"]))
    if case.all_invalid_row or (case.topk_length and not case.extra):
        assert torch.isposinf(lse).any(), "the case must hold an empty query"


@pytest.mark.parametrize("device", ["sm80", "sm86"])
@pytest.mark.parametrize("case", [c for c in SPARSE_CASES if c.name in ("h8 fp32 q, fp32 cache", "h128 split topk", "h32 bf16 cache, split")],
                         ids=lambda c: c.name)
def test_sparse_devices(case, device, harness):
    """Smaller devices: fewer SMs (another split count) and less shared memory (sm86: 99 KB,
    the fp32 cache's ring is the largest)."""
    out, lse, ref_out, ref_lse, info = run_case(case, harness, device=device, order="random" if FULL else "forward")
    assert info["impl"] == case.expected_impl(), info
    if info["impl"] == "tc":
        want = {"fp8": {"sm80": 0, "sm86": 2}, "bf16": {"sm80": 1, "sm86": 2}}[case.cache][device]
        assert info["config"] == want, info  # the largest tile configuration the device's shared memory holds
    check_sparse(out, lse, ref_out, ref_lse, case.q_dtype, f"{case.name} [{device}]", tol=case.tolerance(info["impl"]))


def test_sparse_nan_in_a_read_value_reads_as_zero(harness):
    """A NaN code, a NaN scale and a NaN rope value inside tokens that valid slots name: the
    reference reads each as 0 (FlashMLA's nan_to_num), and so must the kernel."""
    case = SparseCase("nan in read values", h=16, s_q=2, topk=24, p_invalid=0.0)
    q, cache, idx, kw = case.inputs()
    c = cache.squeeze(2).view(torch.uint8)
    bs = c.shape[1]
    t0, t1, t2 = int(idx[0, 0, 0]), int(idx[0, 0, 1]), int(idx[1, 1, 3])
    c[t0 // bs, t0 % bs, 17] = 0x7F                      # e4m3 NaN code
    c[t1 // bs, t1 % bs, 512 + 4:512 + 8] = NAN_SCALE     # scale of values 128..255
    c[t2 // bs, t2 % bs, 528 + 2 * 9 + 1] = 0x7F          # high byte of rope value 9 -> NaN
    c[t2 // bs, t2 % bs, 528 + 2 * 9] = 0xC0
    for impl in ("auto", "simple"):
        out, lse, ref_out, ref_lse, info = run_case(case, harness, impl=impl, inputs=(q, cache, idx, kw))
        assert info["impl"] == case.expected_impl(impl)
        assert not torch.isnan(ref_out).any()
        check_sparse(out, lse, ref_out, ref_lse, case.q_dtype, f"{case.name} [{impl}]", tol=case.tolerance(info["impl"]))


NAN_SCALE = torch.tensor([float("nan")], dtype=torch.float32).view(torch.uint8)


def test_sparse_empty_topk(harness):
    """topk = 0 on the main source with an extra source, and a call where no query has a slot."""
    case = SparseCase("empty topk", h=16, topk=1)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 1, 16, 576, generator=g).to(torch.bfloat16)
    cache = make_cache(g, "fp8", 2, 8, 1)
    idx = torch.full((2, 1, 5), -1, dtype=torch.int32)
    poison_unused(cache, idx, None)
    out, lse, ref_out, ref_lse, _ = run_case(case, harness, inputs=(q, cache, idx, {}))
    assert torch.isposinf(lse).all() and torch.all(out == 0)
    check_sparse(out, lse, ref_out, ref_lse, torch.bfloat16, "all slots -1", tol=case.tolerance("tc"))
    extra_idx = torch.tensor([[[3, -1, 9]], [[-1, -1, -1]]], dtype=torch.int32)
    extra = make_cache(g, "fp8", 2, 8, 0)
    kw = dict(extra_cache=extra, extra_indices=extra_idx)
    out, lse, ref_out, ref_lse, _ = run_case(case, harness, inputs=(q, cache, torch.zeros(2, 1, 0, dtype=torch.int32),
                                                                     kw))
    assert torch.isfinite(lse[0]).all() and torch.isposinf(lse[1]).all()
    check_sparse(out, lse, ref_out, ref_lse, torch.bfloat16, "main topk 0, extra", tol=case.tolerance("tc"))


@pytest.mark.parametrize("impl", ["auto", "simple"])
def test_sparse_fp8_every_code_exact(impl, harness):
    """One valid slot, so each head's output is that token's dequantised latent row: every e4m3
    code (NaN codes read as 0) times its group's power-of-two scale must come out exactly,
    through both kernels' own dequantisation (P = 1 and l = 1 exactly)."""
    from mla_ext import sparse
    codes = torch.tensor([c for c in range(256)] * 2, dtype=torch.uint8)  # 512 latent codes, NaN codes included
    token = torch.zeros(656, dtype=torch.uint8)
    token[:512] = codes
    scales = torch.tensor([2.0 ** -3, 1.0, 2.0 ** 5, 2.0 ** -10], dtype=torch.float32)
    token[512:528] = scales.view(torch.uint8)
    g = torch.Generator().manual_seed(12)
    token[528:] = torch.randn(64, generator=g).to(torch.bfloat16).view(torch.uint8)
    cache = torch.full((2, 4, 1, 656), NAN_BYTE, dtype=torch.uint8)
    cache[1, 2, 0] = token
    cache = cache.view(torch.float8_e4m3fn)
    q = torch.randn(1, 1, 16, 576, generator=g).to(torch.bfloat16)
    idx = torch.tensor([[[-1, 6, -1]]], dtype=torch.int32)
    out, lse, info = runner.run_sparse_decode(q, cache, idx, SCALE, impl=impl, exe=harness("plain"))
    assert info["impl"] == ("tc" if impl == "auto" else "simple")
    want = torch.nan_to_num(sparse.dequantize_tokens(cache[1, 2, 0], torch.float64)[:512], nan=0.0)
    assert torch.equal(out[0, 0].double(), want.to(torch.bfloat16).double().expand(16, 512))
    assert torch.equal(want.to(torch.bfloat16).double(), want)  # the values are bf16 numbers: exact is exact
    assert torch.isfinite(lse).all()
