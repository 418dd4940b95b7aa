"""mla_ext.sparse: the 656-byte layout, its quantiser and the reference sparse decode,
against small cases computed by hand."""
import math

import pytest
import torch

from mla_ext import sparse


def _token_bytes(tok):
    return tok.view(torch.uint8)


def test_layout_constants():
    assert sparse.TOKEN_BYTES == 656
    assert (sparse.SCALE_OFFSET, sparse.ROPE_OFFSET) == (512, 528)


def test_quantize_hand_case():
    row = torch.zeros(576)
    row[0] = 896.0  # tile 0: amax 896 -> 896 / 448 = 2 -> scale 2
    row[1] = 1.0  # stored as 0.5
    row[128] = 448.0  # tile 1: amax 448 -> ratio 1 -> scale 1
    row[129] = -3.0
    row[256] = 449.0  # tile 2: ratio just above 1 -> scale 2
    # tile 3 all zero: ratio clamped to 1e-4 -> scale 2^ceil(log2(1e-4)) = 2^-13
    row[512] = 1.5  # rope, bf16
    row[575] = -2.25
    tok = sparse.quantize_tokens(row)
    assert tok.dtype == torch.float8_e4m3fn and tok.shape == (656,)
    raw = _token_bytes(tok)
    scales = raw[512:528].view(torch.float32)
    assert scales.tolist() == [2.0, 1.0, 2.0, 2.0 ** -13]
    codes = raw[:512].view(torch.float8_e4m3fn).float()
    assert codes[0] == 448.0 and codes[1] == 0.5
    assert codes[128] == 448.0 and codes[129] == -3.0
    assert codes[256] == 224.0  # 449 / 2 = 224.5 -> nearest e4m3 (step 16 in [128, 256)) = 224
    assert torch.all(codes[384:512] == 0)
    rope = raw[528:].view(torch.bfloat16).float()
    assert rope[0] == 1.5 and rope[63] == -2.25
    back = sparse.dequantize_tokens(tok)
    assert back[0] == 896.0 and back[1] == 1.0 and back[128] == 448.0 and back[256] == 448.0
    assert back[512] == 1.5 and back[575] == -2.25


def test_quantize_scales_power_of_two_and_bounded():
    torch.manual_seed(0)
    rows = torch.randn(7, 5, 576, dtype=torch.bfloat16) * torch.logspace(-6, 3, 5).view(1, 5, 1).to(torch.bfloat16)
    tok = sparse.quantize_tokens(rows)
    scales = tok.view(torch.uint8)[..., 512:528].contiguous().view(torch.float32)
    assert torch.all(torch.log2(scales) == torch.round(torch.log2(scales)))
    amax = rows[..., :512].float().abs().reshape(7, 5, 4, 128).amax(-1)
    assert torch.all(amax / scales <= 448.0)
    # Each scale is the smallest power of two >= max(amax / 448, 1e-4).
    expect = torch.tensor([[[2.0 ** math.ceil(math.log2(max(a / 448.0, 1e-4))) for a in t.tolist()] for t in r] for r in amax])
    assert torch.equal(scales, expect)
    back = sparse.dequantize_tokens(tok)
    # e4m3 keeps 3 mantissa bits: rounding error <= 2^-4 relative, or half the subnormal step.
    err = (back[..., :512] - rows[..., :512].float()).abs().reshape(7, 5, 4, 128)
    bound = torch.maximum(rows[..., :512].float().abs().reshape(7, 5, 4, 128) / 16, scales.unsqueeze(-1) * 2.0 ** -10)
    assert torch.all(err <= bound)
    assert torch.equal(back[..., 512:], rows[..., 512:].float())


def test_quantize_cache_padding():
    torch.manual_seed(1)
    cache = torch.randn(3, 4, 1, 576, dtype=torch.bfloat16)
    plain = sparse.quantize_cache(cache)
    padded = sparse.quantize_cache(cache, block_padding=1)
    assert plain.shape == padded.shape == (3, 4, 1, 656)
    assert plain.stride(0) == 4 * 656 and padded.stride(0) == 5 * 656
    assert torch.equal(plain.view(torch.uint8), padded.view(torch.uint8))
    assert torch.equal(sparse.cache_rows(plain), sparse.cache_rows(padded))


def _unit_cache():
    """A float64 cache of 2 blocks x 2 tokens; token t has latent[0] = t + 1, latent[1] = 10 (t + 1)."""
    cache = torch.zeros(2, 2, 576, dtype=torch.float64)
    for t in range(4):
        cache.view(4, 576)[t, 0] = t + 1
        cache.view(4, 576)[t, 1] = 10 * (t + 1)
    return cache


def _q(h=1, s_q=1, b=1, a=1.0):
    q = torch.zeros(b, s_q, h, 576, dtype=torch.float64)
    q[..., 0] = a
    return q


def test_reference_hand_case():
    cache = _unit_cache()
    idx = torch.tensor([[[0, 3, -1]]], dtype=torch.int32)
    out, lse = sparse.sparse_decode(_q(), cache, idx, softmax_scale=0.5)
    # scores 0.5 * 1, 0.5 * 4; slot 2 skipped
    s = [0.5, 2.0]
    l = math.log(sum(math.exp(x) for x in s))
    p = [math.exp(x - l) for x in s]
    assert lse.item() == pytest.approx(l, abs=1e-12)
    assert out[0, 0, 0, 0].item() == pytest.approx(p[0] * 1 + p[1] * 4, abs=1e-12)
    assert out[0, 0, 0, 1].item() == pytest.approx(p[0] * 10 + p[1] * 40, abs=1e-12)
    assert torch.all(out[0, 0, 0, 2:] == 0)


def test_reference_duplicates_topk_length_and_empty():
    cache = _unit_cache()
    idx = torch.tensor([[[1, 1, 2]], [[0, 2, 3]]], dtype=torch.int32)
    topk_length = torch.tensor([2, 0], dtype=torch.int32)
    out, lse = sparse.sparse_decode(_q(b=2), cache, idx, softmax_scale=1.0, topk_length=topk_length)
    # batch 0: token 1 twice (slot 2 past topk_length): lse = 2 + log 2, out = token 1
    assert lse[0, 0, 0].item() == pytest.approx(2 + math.log(2), abs=1e-12)
    assert out[0, 0, 0, 0].item() == pytest.approx(2.0, abs=1e-12)
    # batch 1: topk_length 0 -> no valid slot: out 0, lse +inf
    assert lse[1, 0, 0].item() == float("inf")
    assert torch.all(out[1] == 0)


def test_reference_all_invalid_with_sink():
    cache = _unit_cache()
    idx = torch.full((1, 2, 2), -1, dtype=torch.int32)
    idx[0, 1, 0] = 0
    sink = torch.tensor([0.25])
    out, lse = sparse.sparse_decode(_q(s_q=2), cache, idx, softmax_scale=1.0, attn_sink=sink)
    assert lse[0, 0, 0].item() == float("inf") and torch.all(out[0, 0] == 0)
    # query 1 sees token 0 alone: lse = 1, out = token 0 * 1 / (1 + exp(0.25 - 1))
    assert lse[0, 1, 0].item() == pytest.approx(1.0)
    assert out[0, 1, 0, 1].item() == pytest.approx(10.0 / (1 + math.exp(0.25 - 1.0)), abs=1e-12)


def test_reference_nan_in_unused_slots_and_extra_cache():
    cache = _unit_cache()
    cache.view(4, 576)[2] = float("nan")  # token 2 is named only by a -1-free slot past topk_length
    extra = torch.zeros(1, 3, 576, dtype=torch.float64)
    extra[0, 1, 0] = 5.0
    idx = torch.tensor([[[0, 2]]], dtype=torch.int32)
    extra_idx = torch.tensor([[[1, -1, 0]]], dtype=torch.int32)
    out, lse = sparse.sparse_decode(
        _q(), cache, idx, 1.0, topk_length=torch.tensor([1], dtype=torch.int32), extra_cache=extra,
        extra_indices=extra_idx, extra_topk_length=torch.tensor([1], dtype=torch.int32))
    # token 0 (score 1) and extra token 1 (score 5)
    l = math.log(math.exp(1) + math.exp(5))
    assert lse.item() == pytest.approx(l)
    assert out[0, 0, 0, 0].item() == pytest.approx((math.exp(1) * 1 + math.exp(5) * 5) / math.exp(l))
    assert not torch.isnan(out).any()


def test_reference_fp8_cache_matches_dequantised_rows():
    torch.manual_seed(2)
    cache = torch.randn(4, 8, 1, 576, dtype=torch.bfloat16)
    q = torch.randn(2, 2, 3, 576, dtype=torch.bfloat16)
    idx = torch.randint(-1, 32, (2, 2, 10), dtype=torch.int32)
    fp8 = sparse.quantize_cache(cache, block_padding=2)
    rows = sparse.cache_rows(fp8, torch.float64).reshape(4, 8, 576)
    out8, lse8 = sparse.sparse_decode(q, fp8, idx, 0.1)
    outr, lser = sparse.sparse_decode(q, rows, idx, 0.1)
    assert torch.equal(out8, outr) and torch.equal(lse8, lser)


def test_append_kv_writes_quantised_tokens():
    torch.manual_seed(3)
    rows = torch.randn(10, 576, dtype=torch.bfloat16) * 5
    cache = sparse.quantize_cache(torch.zeros(3, 4, 576), block_padding=1)
    before = cache.view(torch.uint8).clone()
    slots = torch.tensor([5, -1, 0, 11, 2, -7, 6, 7, 1, 9], dtype=torch.int64)
    sparse.append_kv(rows[:, :512], rows[:, 512:], cache, slots)
    flat = cache.squeeze(2).view(torch.uint8)
    expect = sparse.quantize_tokens(rows).view(torch.uint8)
    written = set()
    for i, s in enumerate(slots.tolist()):
        if s >= 0:
            assert torch.equal(flat[s // 4, s % 4], expect[i])
            written.add(s)
    for s in set(range(12)) - written:
        assert torch.equal(flat[s // 4, s % 4], before.squeeze(2)[s // 4, s % 4])
    # the padding token after each block is untouched (all zero)
    assert torch.all(cache.squeeze(2).as_strided((3, 656), (5 * 656, 1), 4 * 656).view(torch.uint8) == 0)
    with pytest.raises(ValueError, match="slot 12 is outside the cache"):
        sparse.append_kv(rows[:1, :512], rows[:1, 512:], cache, torch.tensor([12]))
    with pytest.raises(ValueError, match="cache must be float8_e4m3fn"):
        sparse.append_kv(rows[:1, :512], rows[:1, 512:], torch.zeros(3, 4, 576, dtype=torch.bfloat16), torch.tensor([0]))
