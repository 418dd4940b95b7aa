"""mla_ext.flash_mla: FlashMLA's documented decode API (get_mla_metadata,
flash_mla_with_kvcache), checked against its documented shapes and semantics:

    q [b, s_q, h_q, 576], k_cache [num_blocks, page_block_size, 1, 576],
    block_table [b, max_blocks] int32, cache_seqlens [b] int32, head_dim_v = 512
    -> out [b, s_q, h_q, 512] (q's dtype), softmax_lse [b, h_q, s_q] float32
    softmax_scale defaults to 1/sqrt(head_dim) = 1/sqrt(576); causal defaults to False.
    get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv)
    -> tile_scheduler_metadata [num_sm_parts, 8] int32, num_splits [b + 1] int32
"""
import math

import pytest
import torch

from mla_ext.flash_mla import flash_mla_with_kvcache, get_mla_metadata

from conftest import DEVICES  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


def _make(b, s_q, h_q, page, seqlens, dtype, device, seed):
    """A FlashMLA-style paged cache: blocks handed out in a random order, NaN in unused rows."""
    g = torch.Generator()
    g.manual_seed(seed)
    max_blocks = max(-(-L // page) for L in seqlens) + 1
    num_blocks = b * max_blocks
    perm = torch.randperm(num_blocks, generator=g).to(torch.int32)
    block_table = perm.view(b, max_blocks)
    k_cache = torch.full((num_blocks, page, 1, 576), float("nan"))
    dense = []
    for i, L in enumerate(seqlens):
        rows = torch.randn(L, 576, generator=g)
        dense.append(rows)
        pos = torch.arange(L)
        k_cache[block_table[i, pos // page].long(), pos % page, 0] = rows
    q = torch.randn(b, s_q, h_q, 576, generator=g)
    k_cache = k_cache.to(dtype)
    dense = [d.to(dtype) for d in dense]
    lens = torch.tensor(seqlens, dtype=torch.int32)
    return q.to(dtype).to(device), k_cache.to(device), block_table.to(device), lens.to(device), dense


def _reference(q, dense, scale, causal):
    """FlashMLA's semantics in float64: scores = scale * q k^T, V = k[:, :512]; causal masks
    query j of a length-L sequence to keys t <= L - s_q + j. Returns out, lse [b, h_q, s_q]."""
    q = q.cpu().double()
    b, s_q, h, _ = q.shape
    out = torch.zeros(b, s_q, h, 512, dtype=torch.float64)
    lse = torch.full((b, h, s_q), -math.inf, dtype=torch.float64)
    for i in range(b):
        k = dense[i].double()
        L = k.shape[0]
        for j in range(s_q):
            n = max(0, L - s_q + j + 1) if causal else L
            if n == 0:
                continue
            s = scale * q[i, j] @ k[:n].T  # [h, n]
            lse[i, :, j] = torch.logsumexp(s, -1)
            out[i, j] = torch.softmax(s, -1) @ k[:n, :512]
    return out, lse


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("page", [64, 1, 16, 7])
def test_readme_loop_shapes_and_values(dev, page):
    b, s_q, h_q, h_kv = 3, 1, 16, 1
    q, k_cache, block_table, cache_seqlens, dense = _make(b, s_q, h_q, page, [70, 1, 130], torch.float32, dev, page)
    tile_scheduler_metadata, num_splits = get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv)
    assert tile_scheduler_metadata.dtype == torch.int32 and tile_scheduler_metadata.dim() == 2
    assert tile_scheduler_metadata.shape[1] == 8 and tile_scheduler_metadata.shape[0] >= 1
    assert num_splits.dtype == torch.int32 and num_splits.shape == (b + 1,)
    assert tile_scheduler_metadata.device == cache_seqlens.device == num_splits.device
    scale = 1 / math.sqrt(192)
    for _layer in range(2):  # the same metadata serves every layer
        o, lse = flash_mla_with_kvcache(
            q, k_cache, block_table, cache_seqlens, 512, tile_scheduler_metadata, num_splits, softmax_scale=scale, causal=True
        )
        assert o.shape == (b, s_q, h_q, 512) and o.dtype == q.dtype and o.device == q.device
        assert lse.shape == (b, h_q, s_q) and lse.dtype == torch.float32 and lse.is_contiguous()
    ref_o, ref_lse = _reference(q, dense, scale, causal=True)
    torch.testing.assert_close(o.cpu().double(), ref_o, atol=5e-5, rtol=5e-5)
    torch.testing.assert_close(lse.cpu().double(), ref_lse, atol=5e-5, rtol=1e-5)


@pytest.mark.parametrize("dev", DEVICES)
def test_defaults_scale_576_and_not_causal(dev):
    b, s_q, h_q = 2, 3, 4
    q, k_cache, bt, lens, dense = _make(b, s_q, h_q, 16, [20, 5], torch.float32, dev, 11)
    meta, splits = get_mla_metadata(lens, s_q * h_q, 1)
    o, lse = flash_mla_with_kvcache(q, k_cache, bt, lens, 512, meta, splits)  # FlashMLA's defaults
    ref_o, ref_lse = _reference(q, dense, 576**-0.5, causal=False)
    torch.testing.assert_close(o.cpu().double(), ref_o, atol=5e-5, rtol=5e-5)
    torch.testing.assert_close(lse.cpu().double(), ref_lse, atol=5e-5, rtol=1e-5)
    # causal=False: every query of a sequence sees the same keys, so with identical queries
    # the rows are identical; with causal=True the earlier queries see fewer keys.
    q_same = q[:, :1].expand(b, s_q, h_q, 576).contiguous()
    o_nc, _ = flash_mla_with_kvcache(q_same, k_cache, bt, lens, 512, meta, splits)
    o_c, _ = flash_mla_with_kvcache(q_same, k_cache, bt, lens, 512, meta, splits, causal=True)
    assert torch.equal(o_nc[:, 0], o_nc[:, 2])
    torch.testing.assert_close(o_c[:, 2], o_nc[:, 2])  # the last query sees everything either way
    assert not torch.allclose(o_c[:, 0], o_nc[:, 0])


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_dtypes_mtp_causal(dev, dtype):
    b, s_q, h_q = 2, 2, 8  # MTP-style: 2 queries per sequence
    q, k_cache, bt, lens, dense = _make(b, s_q, h_q, 64, [100, 2], dtype, dev, 5)
    meta, splits = get_mla_metadata(lens, s_q * h_q, 1)
    o, lse = flash_mla_with_kvcache(q, k_cache, bt, lens, 512, meta, splits, softmax_scale=0.1, causal=True)
    assert o.dtype == dtype and lse.dtype == torch.float32
    ref_o, ref_lse = _reference(q, dense, 0.1, causal=True)
    rtol = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    torch.testing.assert_close(o.cpu().double(), ref_o, atol=1e-4, rtol=rtol)
    torch.testing.assert_close(lse.cpu().double(), ref_lse, atol=1e-4, rtol=1e-5)


def test_empty_sequence_and_squeezed_cache():
    q, k_cache, bt, lens, dense = _make(2, 1, 4, 8, [9, 1], torch.float32, "cpu", 2)
    lens = torch.tensor([9, 0], dtype=torch.int32)  # L = 0: output 0, lse -inf
    meta, splits = get_mla_metadata(lens, 4, 1)
    o, lse = flash_mla_with_kvcache(q, k_cache, bt, lens, 512, meta, splits, causal=True)
    assert torch.equal(o[1], torch.zeros_like(o[1])) and bool((lse[1] == -math.inf).all())
    o3, lse3 = flash_mla_with_kvcache(q, k_cache.squeeze(2), bt, lens, 512, meta, splits, causal=True)
    assert torch.equal(o3, o) and torch.equal(lse3, lse)
    # None metadata is tolerated too (mla_ext schedules itself).
    o4, _ = flash_mla_with_kvcache(q, k_cache, bt, lens, 512, None, None, causal=True)
    assert torch.equal(o4, o)


def test_errors():
    q, k_cache, bt, lens, _ = _make(2, 1, 4, 8, [9, 3], torch.float32, "cpu", 3)
    meta, splits = get_mla_metadata(lens, 4, 1)
    with pytest.raises(ValueError, match="head_dim_v"):
        flash_mla_with_kvcache(q, k_cache, bt, lens, 128, meta, splits)
    with pytest.raises(ValueError, match="KV heads"):
        flash_mla_with_kvcache(q, k_cache.expand(-1, -1, 2, -1), bt, lens, 512, meta, splits)
    with pytest.raises(ValueError, match="q must be"):
        flash_mla_with_kvcache(q[..., :512], k_cache, bt, lens, 512, meta, splits)
    with pytest.raises(ValueError, match="num_splits"):
        flash_mla_with_kvcache(q, k_cache, bt, lens, 512, meta, splits[:-1])
    with pytest.raises(TypeError, match="cache_seqlens"):
        get_mla_metadata(lens.long(), 4, 1)
    with pytest.raises(ValueError, match="num_heads"):
        get_mla_metadata(lens, 0, 1)
    with pytest.raises((TypeError, ValueError), match="block_table"):  # the op's own checks name the argument
        flash_mla_with_kvcache(q, k_cache, bt.float(), lens, 512, meta, splits)
