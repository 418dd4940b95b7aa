"""float8_e4m3fn latent cache: exact stored bytes for append, scale helper, bad scales."""
import os
import shutil
import subprocess

import pytest
import torch

import mla_ext
from mla_ext import reference

from conftest import DEVICES


def _bytes(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.uint8)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_size", [1, 16, 7])
def test_append_fp8_exact_bytes(device, dtype, block_size):
    gen = torch.Generator().manual_seed(block_size * 10 + int(dtype.itemsize))
    tokens, num_blocks = 700, 900 // block_size + 2
    # Magnitudes over 5 decades so subnormals, normals and saturated values all occur.
    kv_c = torch.randn(tokens, 512, generator=gen) * torch.logspace(-5, 1, tokens)[:, None]
    k_pe = torch.randn(tokens, 64, generator=gen)
    scale = mla_ext.fp8_scale_for(torch.cat([kv_c, k_pe], -1), margin=0.25).to(device)  # forces saturation
    kv_c, k_pe = kv_c.to(dtype).to(device), k_pe.to(dtype).to(device)
    cache = torch.full((num_blocks, block_size, 576), float("nan"), device=device).to(torch.float8_e4m3fn)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:tokens].to(device)
    slots[::5] = -1  # padding tokens

    expected = reference.append_kv(kv_c, k_pe, cache, slots, scale=scale)
    mla_ext.append_kv(kv_c, k_pe, cache, slots, scale=scale)

    assert torch.equal(_bytes(cache), _bytes(expected))
    stored = cache.float()
    assert (stored.abs() == 448).any(), "the test should exercise saturation"
    written = reference.gather_sequence(cache.view(-1, 1, 576), slots[slots >= 0].int(), int((slots >= 0).sum()))
    assert torch.isfinite(written.float()).all(), "saturation must never store inf or NaN"


def test_fp8_rounding_matches_torch_in_range():
    # Inside +-448 the stored byte must be torch's own round-to-nearest-even cast of x / scale.
    values = torch.linspace(-448, 448, 512 * 64).view(64, 512)
    k_pe = torch.zeros(64, 64)
    scale = torch.tensor([1.0])
    cache = torch.zeros(64, 1, 576, dtype=torch.float8_e4m3fn)
    mla_ext.append_kv(values, k_pe, cache, torch.arange(64), scale=scale)
    assert torch.equal(_bytes(cache[:, 0, :512]), _bytes(values.to(torch.float8_e4m3fn)))


def test_fp8_scale_for():
    x = torch.tensor([[-3.0, 1.5], [0.25, 2.0]])
    assert torch.allclose(mla_ext.fp8_scale_for(x), torch.tensor([3.0 / 448]))
    assert torch.allclose(mla_ext.fp8_scale_for(x, margin=2.0), torch.tensor([6.0 / 448]))
    assert mla_ext.fp8_scale_for(torch.zeros(3)).item() == 1.0


@pytest.mark.parametrize(
    "scale, match",
    [
        (None, "needs scale"),
        (torch.tensor([1.0], dtype=torch.float64), "scale must be float32"),
        (torch.tensor([1.0, 2.0]), "scale must hold 1 element"),
        (torch.tensor([0.0]), "scale must be finite and > 0"),
        (torch.tensor([float("nan")]), "scale must be finite and > 0"),
    ],
)
def test_fp8_bad_scale_leaves_cache_untouched(scale, match):
    cache = torch.zeros(4, 16, 576, dtype=torch.float8_e4m3fn)
    before = cache.clone()
    with pytest.raises((ValueError, TypeError), match=match):
        mla_ext.append_kv(torch.randn(3, 512), torch.randn(3, 64), cache, torch.arange(3), scale=scale)
    assert torch.equal(_bytes(cache), _bytes(before))


def test_scale_rejected_for_bf16_cache():
    cache = torch.zeros(4, 16, 576, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="scale is only for a float8_e4m3fn cache"):
        mla_ext.append_kv(torch.randn(3, 512, dtype=torch.bfloat16), torch.randn(3, 64, dtype=torch.bfloat16), cache,
                          torch.arange(3), scale=torch.tensor([1.0]))


# --------------------------------------------------------------------------- fp8 decode

from conftest import DEEPSEEK_SCALE, make_paged_kv, make_query, varlen_seqlens  # noqa: E402

# Tight: the kernel widens every e4m3 code exactly and folds the scale into q and the
# output, so against an unrounded float64 reference over the *dequantized* cache only fp32
# accumulation and the final rounding to q's dtype remain: half an ulp of the output
# (at most 2^-8 relative for bf16, 2^-11 for fp16) plus fp32 noise.
TIGHT = {torch.bfloat16: dict(rtol=2**-8, atol=2**-10), torch.float16: dict(rtol=2**-10, atol=2**-12),
         torch.float32: dict(rtol=1e-5, atol=1e-5)}


def _fp8_case(seqlens, block_size, gen, device):
    kv = make_paged_kv(seqlens, block_size, gen, dtype=torch.float32, device=device)
    scale = mla_ext.fp8_scale_for(torch.nan_to_num(kv.cache, nan=0.0)).to(device)
    cache8 = reference.quantize_fp8(kv.cache, scale)  # NaN poison stays NaN (code 0x7f)
    return kv, cache8, scale


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("isa", ["auto", "scalar"])
@pytest.mark.parametrize(
    "dtype, block_size, h, s_q, causal, packed",
    [
        (torch.bfloat16, 16, 16, 1, True, False),
        (torch.bfloat16, 1, 3, 3, True, True),
        (torch.float16, 7, 16, 2, False, False),
        (torch.float16, 64, 128, 1, True, True),
        (torch.float32, 16, 4, 4, True, False),
    ],
)
def test_decode_fp8_vs_float64_reference(device, isa, dtype, block_size, h, s_q, causal, packed, gen, monkeypatch):
    if isa != "auto" and device != "cpu":
        pytest.skip("MLA_EXT_CPU_ISA only picks CPU kernels")
    monkeypatch.setenv("MLA_EXT_CPU_ISA", isa)
    seqlens = varlen_seqlens(4, 300, gen) + [1, 2]  # includes 0, and L < s_q when causal
    kv, cache8, scale = _fp8_case(seqlens, block_size, gen, device)
    q_nope, q_pe = make_query(len(seqlens), s_q, h, gen, dtype, device)
    q_args = (torch.cat([q_nope, q_pe], -1), None) if packed else (q_nope, q_pe)

    out, lse = mla_ext.decode(*q_args, cache8, kv.block_table, kv.cache_seqlens, softmax_scale=DEEPSEEK_SCALE,
                              causal=causal, return_lse=True, scale=scale)
    # The reference keeps float64 (a float64 query): rounding it to q's dtype as well would
    # leave two roundings of nearly equal numbers, which may differ by a whole ulp.
    q64 = tuple(None if t is None else t.double() for t in q_args)
    ref_out, ref_lse = reference.decode(*q64, cache8, kv.block_table, kv.cache_seqlens, DEEPSEEK_SCALE,
                                        causal=causal, compute_dtype=torch.float64, scale=scale)
    assert ref_out.dtype == torch.float64
    assert out.dtype == dtype and torch.isfinite(out).all(), "NaN poison leaked or dtype changed"
    torch.testing.assert_close(out.double(), ref_out.double(), **TIGHT[dtype])
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)  # lse is fp32 in both


@pytest.mark.parametrize("device", DEVICES)
def test_decode_fp8_close_to_bf16_cache(device, gen):
    # Loose: fp8 loses information (3 mantissa bits), so compare against the bf16-cache
    # decode of the same values through the quantization error the reference itself sees:
    # |kernel(fp8) - kernel(bf16)| <= |ref(fp8) - ref(bf16)| + both kernels' tight budgets.
    seqlens = [500, 37, 0, 256]
    kv, cache8, scale = _fp8_case(seqlens, 16, gen, device)
    cache16 = kv.cache.to(torch.bfloat16)
    q_nope, q_pe = make_query(len(seqlens), 1, 16, gen, torch.bfloat16, device)
    args = (kv.block_table, kv.cache_seqlens)
    out8 = mla_ext.decode(q_nope, q_pe, cache8, *args, softmax_scale=DEEPSEEK_SCALE, scale=scale).double()
    out16 = mla_ext.decode(q_nope, q_pe, cache16, *args, softmax_scale=DEEPSEEK_SCALE).double()
    ref8, _ = reference.decode(q_nope, q_pe, cache8, *args, DEEPSEEK_SCALE, compute_dtype=torch.float64, scale=scale)
    ref16, _ = reference.decode(q_nope, q_pe, cache16, *args, DEEPSEEK_SCALE, compute_dtype=torch.float64)
    quantization_gap = (ref8.double() - ref16.double()).abs().max().item()
    assert 0 < quantization_gap < 0.5, "fp8 should differ from bf16, by a quantization error only"
    budget = 2 * (TIGHT[torch.bfloat16]["atol"] + TIGHT[torch.bfloat16]["rtol"] * out16.abs().max().item())
    assert (out8 - out16).abs().max().item() <= quantization_gap + budget


@pytest.mark.parametrize("device", DEVICES)
def test_decode_fp8_needs_scale(device):
    cache = torch.zeros(2, 16, 576, device=device).to(torch.float8_e4m3fn)
    q = torch.randn(1, 1, 4, 576, dtype=torch.bfloat16, device=device)
    bt = torch.zeros(1, 2, dtype=torch.int32, device=device)
    sl = torch.ones(1, dtype=torch.int32, device=device)
    with pytest.raises(ValueError, match="needs scale"):
        mla_ext.decode(q, None, cache, bt, sl, softmax_scale=0.1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_append_fp8_vector_and_portable_paths_agree_on_every_bit_pattern(dtype, monkeypatch):
    # Every 16-bit pattern (zeros, subnormals, normals, +-inf, NaNs), at three scales, through
    # the AVX2 quantiser (when the CPU has it) and the portable one: identical bytes.
    x = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(dtype)
    x = x[: (65536 // 576) * 576].view(-1, 576)
    stored = {}
    for isa in ("auto", "scalar"):
        monkeypatch.setenv("MLA_EXT_CPU_ISA", isa)
        for s in (1.0, 0.37, 3e-3):
            cache = torch.zeros(x.shape[0], 1, 576, dtype=torch.float8_e4m3fn)
            mla_ext.append_kv(x[:, :512], x[:, 512:], cache, torch.arange(x.shape[0]), scale=torch.tensor([s]))
            stored[isa, s] = _bytes(cache).view(-1)
    for s in (1.0, 0.37, 3e-3):
        assert torch.equal(stored["auto", s], stored["scalar", s])
    codes, flat = stored["scalar", 1.0], x.reshape(-1).float()
    assert ((codes[flat.isnan()] & 0x7F) == 0x7F).all(), "NaN stays NaN"
    assert ((codes[flat.isinf()] & 0x7F) == 0x7E).all(), "inf saturates to 448"


def test_fp8_helpers_host_selftest(tmp_path):
    """csrc/cuda/fp8.cuh's integer helpers compiled for the host vs csrc/cpu/fp8.h (every
    97th float bit pattern plus every e4m3 boundary; cuda_compile_check.sh runs all 2^32)."""
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    exe = str(tmp_path / "fp8_selftest")
    subprocess.run([cxx, "-O2", "-std=c++17", os.path.join(root, "tests", "native", "fp8_selftest.cpp"), "-o", exe],
                   check=True)
    res = subprocess.run([exe, "97"], capture_output=True, text=True)
    assert res.returncode == 0 and "PASS" in res.stdout, res.stdout
