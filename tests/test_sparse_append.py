"""mla_ext.sparse_append_kv (native quantiser of the 656-byte fp8 sparse cache) against
mla_ext.sparse.quantize_tokens, byte for byte, and sparse.quantize_tokens against
FlashMLA's quantiser as its tests/quant.py states it (scale = 2 ** ceil(log2(...)))."""
import zlib

import pytest
import torch

import mla_ext
from mla_ext import sparse

POISON = 0xA5  # bytes no write may leave behind in an untouched slot


def _fresh_cache(num_blocks, block_size, pad, four_d, with_storage=False):
    """A poisoned cache; with pad > 0 each block is followed by pad unused tokens."""
    storage = torch.full((num_blocks, block_size + pad, sparse.TOKEN_BYTES), POISON, dtype=torch.uint8)
    cache = storage[:, :block_size].view(torch.float8_e4m3fn)
    cache = cache.unsqueeze(2) if four_d else cache
    return (cache, storage) if with_storage else cache


def _rows(g, T, dtype, wide_range):
    rows = torch.randn(T, 576, generator=g)
    if wide_range:  # every tile its own magnitude: scales from the 1e-4 floor up to 2^20
        rows = rows * torch.logspace(-9, 6, 4 * T, base=10.0)[torch.randperm(4 * T, generator=g)].reshape(T, 4).repeat_interleave(144, dim=1)
    return rows.to(dtype)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("block_size,pad,four_d", [(16, 0, False), (8, 1, True), (1, 2, False)])
def test_bytes_equal_quantize_tokens(dtype, slot_dtype, block_size, pad, four_d):
    g = torch.Generator().manual_seed(zlib.crc32(repr((dtype, slot_dtype, block_size, pad)).encode()))
    T = 23
    num_blocks = max(3, 40 // block_size)  # more slots than tokens
    cache, storage = _fresh_cache(num_blocks, block_size, pad, four_d, with_storage=True)
    rows = _rows(g, T, dtype, wide_range=True)
    rows[3, 7] = 0.0
    rows[4, :128] = 0.0  # an all-zero tile: the scale floor 2^-13
    rows[5, 128] = 448.0 * 8  # an exact power-of-two ratio
    slots = torch.randperm(num_blocks * block_size, generator=g)[:T].to(slot_dtype)
    slots[::5] = -1  # skipped tokens
    kv_c, k_pe = rows[:, :512], rows[:, 512:]  # strided views of one [T, 576] tensor
    mla_ext.sparse_append_kv(kv_c, k_pe, cache, slots)

    raw = (cache.squeeze(2) if four_d else cache).view(torch.uint8).reshape(-1, sparse.TOKEN_BYTES)
    expected = sparse.quantize_tokens(rows).view(torch.uint8)
    written = set()
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            assert torch.equal(raw[s], expected[i]), f"token {i} -> slot {s}"
            written.add(s)
    untouched = [s for s in range(num_blocks * block_size) if s not in written]
    assert torch.all(raw[untouched] == POISON)
    assert torch.all(storage[:, block_size:] == POISON)  # the padding between blocks is never written


def test_special_values_match_torch():
    """inf / NaN / overflow-edge inputs quantise as torch's ops do (NaN tile -> NaN scale)."""
    rows = torch.randn(4, 576)
    rows[0, 5] = float("nan")
    rows[1, 200] = float("inf")
    rows[2, 300] = 3.0e38
    rows[3, 520] = float("nan")  # rope NaN
    cache = _fresh_cache(1, 4, 0, False)
    mla_ext.sparse_append_kv(rows[:, :512], rows[:, 512:], cache, torch.arange(4))
    got = cache.view(torch.uint8)[0]
    expected = sparse.quantize_tokens(rows).view(torch.uint8)
    # NaN payloads may differ between torch's vectorised conversions and c10's scalar ones:
    # compare NaN-ness, then every other byte exactly.
    got_codes = got[:, :512].view(torch.float8_e4m3fn).float()
    exp_codes = expected[:, :512].view(torch.float8_e4m3fn).float()
    assert torch.equal(torch.isnan(got_codes), torch.isnan(exp_codes))
    assert torch.equal(got_codes.nan_to_num(7.0), exp_codes.nan_to_num(7.0))
    got_rest = torch.cat([got[:, 512:528].view(torch.float32), got[:, 528:].view(torch.bfloat16).float()], 1)
    exp_rest = torch.cat([expected[:, 512:528].view(torch.float32), expected[:, 528:].view(torch.bfloat16).float()], 1)
    assert torch.equal(torch.isnan(got_rest), torch.isnan(exp_rest))
    assert torch.equal(got_rest.nan_to_num(7.0), exp_rest.nan_to_num(7.0))
    assert torch.isnan(exp_rest[0, 0]) and torch.isinf(exp_rest[1, 1])


def _flashmla_style_scales(latent):
    """FlashMLA's tests/quant.py formula, written out: 2 ** ceil(log2(max(amax / 448, 1e-4)))."""
    amax = latent.float().abs().reshape(*latent.shape[:-1], 4, 128).amax(-1)
    return torch.pow(2, torch.clamp_min(amax / 448.0, 1e-4).log2().ceil()).float()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_scales_equal_flashmla_formula_on_half_inputs(dtype):
    """On bf16 / fp16 inputs the exact power-of-two ceiling and FlashMLA's log2 formula agree
    (sparse.fp8_scales' docstring says why); every bf16 amax magnitude is tried."""
    g = torch.Generator().manual_seed(3)
    if dtype == torch.bfloat16:  # every positive finite bf16 with a ratio >= 1e-4 as amax
        amax = torch.arange(0x3800, 0x7f80, dtype=torch.int32).to(torch.int16).view(torch.bfloat16)
    else:
        amax = torch.arange(0x0400, 0x7c00, dtype=torch.int32).to(torch.int16).view(torch.float16)
    latent = torch.zeros(amax.numel(), 512, dtype=dtype)
    latent[:, ::128] = amax.unsqueeze(1)
    latent[:, 1::128] = (torch.rand(amax.numel(), 4, generator=g) * amax.float().unsqueeze(1)).to(dtype)
    assert torch.equal(sparse.fp8_scales(latent), _flashmla_style_scales(latent))


def test_quantize_tokens_equals_flashmla_formula_bytes():
    g = torch.Generator().manual_seed(4)
    rows = _rows(g, 64, torch.bfloat16, wide_range=True)
    tok = sparse.quantize_tokens(rows).view(torch.uint8)
    scales = _flashmla_style_scales(rows[:, :512])
    codes = (rows[:, :512].float().reshape(64, 4, 128) / scales.unsqueeze(-1)).reshape(64, 512).to(torch.float8_e4m3fn)
    assert torch.equal(tok[:, :512], codes.view(torch.uint8))
    assert torch.equal(tok[:, 512:528].contiguous().view(torch.float32), scales)
    assert torch.equal(tok[:, 528:].contiguous().view(torch.bfloat16), rows[:, 512:])


def test_roundtrip_through_sparse_decode():
    """Tokens appended natively decode as the fp64 reference reads them."""
    g = torch.Generator().manual_seed(5)
    cache = _fresh_cache(4, 8, 1, True)
    cache.view(torch.uint8).zero_()
    rows = torch.randn(32, 576, generator=g).to(torch.bfloat16)
    mla_ext.sparse_append_kv(rows[:, :512], rows[:, 512:], cache, torch.arange(32))
    q = torch.randn(1, 1, 8, 576, generator=g).to(torch.bfloat16)
    idx = torch.randperm(32, generator=g)[:20].to(torch.int32).view(1, 1, 20)
    out, lse = mla_ext.sparse_decode(q, cache, idx, softmax_scale=0.05)
    ref_out, ref_lse = sparse.sparse_decode(q, cache, idx, 0.05)
    # bf16 output: one bf16 rounding (2^-8 relative) over fp32 accumulation
    torch.testing.assert_close(out, ref_out.to(torch.bfloat16), atol=2e-5, rtol=2 ** -7)
    torch.testing.assert_close(lse.double(), ref_lse, atol=2e-5, rtol=2e-5)


def test_bad_inputs_named():
    cache = _fresh_cache(2, 4, 0, False)
    kv, pe = torch.randn(3, 512), torch.randn(3, 64)
    slots = torch.tensor([0, 7, -1])
    mla_ext.sparse_append_kv(kv, pe, cache, slots)
    with pytest.raises(ValueError, match=r"slot_mapping\[1\] = 8 is outside the cache \(8 slots = 2 blocks x 4"):
        mla_ext.sparse_append_kv(kv, pe, cache, torch.tensor([0, 8, -1]))
    with pytest.raises(TypeError, match="slot_mapping must be int64 or int32"):
        mla_ext.sparse_append_kv(kv, pe, cache, slots.float())
    with pytest.raises(ValueError, match=r"slot_mapping must be \[T\] = \[3\]"):
        mla_ext.sparse_append_kv(kv, pe, cache, slots[:2])
    with pytest.raises(TypeError, match="kv_c must be float32, bfloat16 or float16"):
        mla_ext.sparse_append_kv(kv.double(), pe.double(), cache, slots)
    with pytest.raises(TypeError, match="k_pe dtype"):
        mla_ext.sparse_append_kv(kv, pe.bfloat16(), cache, slots)
    with pytest.raises(ValueError, match=r"k_pe must be \[T, 64\]"):
        mla_ext.sparse_append_kv(kv, pe[:2], cache, slots)
    with pytest.raises(ValueError, match=r"kv_c must be \[T, 512\]"):
        mla_ext.sparse_append_kv(torch.randn(3, 576), pe, cache, slots)
    with pytest.raises(TypeError, match="cache must be float8_e4m3fn"):
        mla_ext.sparse_append_kv(kv, pe, torch.zeros(2, 4, 656, dtype=torch.bfloat16), slots)
    with pytest.raises(ValueError, match="cache must be \\[num_blocks, block_size, 656\\]"):
        mla_ext.sparse_append_kv(kv, pe, torch.zeros(2, 4, 576, dtype=torch.float8_e4m3fn), slots)
    # the uint8 view of the cache (vLLM's) is accepted and writes the same bytes
    raw = torch.full((2, 4, 656), POISON, dtype=torch.uint8)
    mla_ext.sparse_append_kv(kv, pe, raw, slots)
    assert torch.equal(raw, cache.view(torch.uint8))
