"""mla_ext.decode against mla_ext.reference.decode (fp32) and a float64 computation.

The parameter grid is not a cartesian product: CASES zips the axes (block size, heads,
s_q, causal, dtype, batch layout, scale) so that every value of every axis appears
several times, each time with different partners, for a dozen kernel calls instead of
hundreds.
"""
import pytest
import torch

import mla_ext
from conftest import (
    DEEPSEEK_SCALE,
    FLOAT_DTYPES,
    GARBAGE_BLOCK,
    HEAD,
    LATENT,
    LSE_ATOL,
    LSE_RTOL,
    OUT_TOL_VS_FP64,
    ROPE,
    assert_bitwise_equal,
    check_decode_result,
    dense_decode,
    expected_empty_rows,
    make_paged_kv,
    make_query,
    poison_,
    randn,
    varlen_seqlens,
)

V3_SCALE = 0.13523  # DeepSeek-V3: 1/sqrt(192) * mscale^2 under YaRN
BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32

# (block_size, heads, s_q, causal, dtype, seqlens, softmax_scale)
CASES = [
    (1, 1, 1, True, FP32, [5, 0, 33], DEEPSEEK_SCALE),
    (16, 3, 2, True, BF16, [17, 1, 0, 64], DEEPSEEK_SCALE),  # L=1 < s_q=2: query 0 sees nothing
    (64, 16, 3, False, FP16, [130, 2, 0], V3_SCALE),
    (7, 128, 4, True, FP32, [3, 50, 0, 7], DEEPSEEK_SCALE),  # L=3 < s_q=4
    (7, 16, 1, False, BF16, [700, 13], V3_SCALE),  # long: several KV chunks merged
    (16, 128, 2, False, FP32, [33, 0, 16], V3_SCALE),
    (64, 3, 4, True, BF16, [1000, 4, 65], DEEPSEEK_SCALE),  # long causal, L == s_q
    (1, 16, 3, False, FP16, [9, 2], DEEPSEEK_SCALE),  # non-causal with L < s_q: all rows see all keys
    (16, 1, 4, False, FP32, [0, 0], DEEPSEEK_SCALE),  # every sequence empty
    (64, 128, 1, True, FP16, [64, 128, 0, 1], V3_SCALE),  # exact block multiples
    (7, 3, 3, True, FP16, [2, 3, 4, 0, 7], DEEPSEEK_SCALE),  # L < s_q, L == s_q, L == block_size
    (1, 128, 2, True, BF16, [300, 1], V3_SCALE),
    (16, 16, 2, True, FP32, [290, 17, 0, 3, 31, 256, 1, 16, 15], V3_SCALE),  # many sequences
]


def _case_id(c):
    bs, h, s_q, causal, dtype, lens, scale = c
    return f"bs{bs}-h{h}-sq{s_q}-{'causal' if causal else 'full'}-{str(dtype)[6:]}-b{len(lens)}"


@pytest.mark.parametrize("block_size,h,s_q,causal,dtype,seqlens,scale", CASES, ids=[_case_id(c) for c in CASES])
def test_decode_matches_reference(device, gen, block_size, h, s_q, causal, dtype, seqlens, scale):
    kv = make_paged_kv(seqlens, block_size, gen, dtype, device)
    q_nope, q_pe = make_query(len(seqlens), s_q, h, gen, dtype, device)
    out, lse = mla_ext.decode(
        q_nope, q_pe, kv.cache, kv.block_table, kv.cache_seqlens, softmax_scale=scale, causal=causal, return_lse=True
    )
    check_decode_result(out, lse, q_nope, q_pe, kv, scale, causal)


@pytest.mark.parametrize("dtype,block_size", [(BF16, 16), (FP16, 5), (FP32, 64)])
def test_random_varlen_batch(device, gen, dtype, block_size):
    """A batch of 8 random lengths in [0, 150], one of them 0, MTP-style s_q = 2."""
    seqlens = varlen_seqlens(8, 150, gen)
    assert 0 in seqlens
    kv = make_paged_kv(seqlens, block_size, gen, dtype, device)
    q_nope, q_pe = make_query(8, 2, 16, gen, dtype, device)
    out, lse = mla_ext.decode(
        q_nope, q_pe, kv.cache, kv.block_table, kv.cache_seqlens, softmax_scale=DEEPSEEK_SCALE, return_lse=True
    )
    check_decode_result(out, lse, q_nope, q_pe, kv, DEEPSEEK_SCALE, True)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_decode_matches_dense_oracle(device, gen, dtype):
    """Against float64 attention over each sequence's rows in order, with no block table
    at all: catches a paging bug that reference.decode's gather might share."""
    kv = make_paged_kv([37, 0, 5, 16], 16, gen, dtype, device)
    q_nope, q_pe = make_query(4, 2, 16, gen, dtype, device)
    out, lse = mla_ext.decode(
        q_nope, q_pe, kv.cache, kv.block_table, kv.cache_seqlens, softmax_scale=DEEPSEEK_SCALE, return_lse=True
    )
    o64, l64 = dense_decode(q_nope, q_pe, kv.dense, DEEPSEEK_SCALE, True)
    atol, rtol = OUT_TOL_VS_FP64[dtype]
    torch.testing.assert_close(out.cpu().double(), o64, atol=atol, rtol=rtol)
    torch.testing.assert_close(lse.cpu().double(), l64, atol=LSE_ATOL, rtol=LSE_RTOL)


@pytest.mark.parametrize("causal", [True, False])
def test_rows_that_see_no_key(device, gen, causal):
    """L = 0 rows, and (causal) query j with L - s_q + j < 0: out exactly 0, lse = -inf,
    even though the output buffer and the unused cache slots hold NaN."""
    s_q, h = 4, 3
    seqlens = [0, 1, 2, 3, 4, 5]
    kv = make_paged_kv(seqlens, 2, gen, FP32, device)
    q_nope, q_pe = make_query(len(seqlens), s_q, h, gen, FP32, device)
    out = poison_(torch.empty(len(seqlens), s_q, h, LATENT, device=device))
    out, lse = mla_ext.decode(
        q_nope, q_pe, kv.cache, kv.block_table, kv.cache_seqlens, softmax_scale=DEEPSEEK_SCALE, causal=causal,
        return_lse=True, out=out,
    )
    empty = expected_empty_rows(seqlens, s_q, causal)
    if causal:  # L=0: 4 rows, L=1: 3, L=2: 2, L=3: 1, then none
        assert empty.sum().item() == 4 + 3 + 2 + 1
        # Query j of a sequence with L keys sees exactly L - s_q + j + 1 of them: with one
        # visible key the output IS that key's latent and lse is its score.
        L, j = 3, 1  # L=3, s_q=4: query j sees L - s_q + j + 1 = j keys, so j=1 sees key 0 only
        key0 = kv.dense[L][0].to(device)
        torch.testing.assert_close(out[L, j], key0[:LATENT].expand(h, LATENT), atol=1e-6, rtol=1e-6)
        score = DEEPSEEK_SCALE * (torch.cat([q_nope[L, j], q_pe[L, j]], -1) @ key0)
        torch.testing.assert_close(lse[L, j], score, atol=1e-4, rtol=1e-5)
    else:
        assert empty.sum().item() == 4
    check_decode_result(out, lse, q_nope, q_pe, kv, DEEPSEEK_SCALE, causal)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES)
def test_packed_query_equals_split(device, gen, dtype):
    """FlashMLA's packed q [b, s_q, h, 576] with q_pe=None gives the same bits as the split
    q_nope / q_pe pair (the kernel sees the same 576 values either way)."""
    kv = make_paged_kv([40, 0, 9], 16, gen, dtype, device)
    q = randn((3, 2, 16, HEAD), gen, dtype, device)
    args = (kv.cache, kv.block_table, kv.cache_seqlens)
    o_packed, l_packed = mla_ext.decode(q, None, *args, softmax_scale=DEEPSEEK_SCALE, return_lse=True)
    o_split, l_split = mla_ext.decode(
        q[..., :LATENT].contiguous(), q[..., LATENT:].contiguous(), *args, softmax_scale=DEEPSEEK_SCALE,
        return_lse=True,
    )
    assert_bitwise_equal(o_packed, o_split, "out packed vs split")
    assert_bitwise_equal(l_packed, l_split, "lse packed vs split")
    check_decode_result(o_packed, l_packed, q, None, kv, DEEPSEEK_SCALE, True)


def test_return_lse_and_out_buffer(device, gen):
    dtype = BF16
    kv = make_paged_kv([21, 0, 3], 7, gen, dtype, device)
    q_nope, q_pe = make_query(3, 2, 3, gen, dtype, device)
    args = (q_nope, q_pe, kv.cache, kv.block_table, kv.cache_seqlens)

    only_out = mla_ext.decode(*args, softmax_scale=V3_SCALE)
    assert isinstance(only_out, torch.Tensor)
    out, lse = mla_ext.decode(*args, softmax_scale=V3_SCALE, return_lse=True)
    assert_bitwise_equal(only_out, out, "return_lse must not change out")

    # out= : written in place (every element, including the all-zero rows), and returned.
    buf = poison_(torch.empty(3, 2, 3, LATENT, dtype=dtype, device=device))
    res = mla_ext.decode(*args, softmax_scale=V3_SCALE, out=buf)
    assert res is buf
    assert_bitwise_equal(buf, out, "out= buffer")
    buf2 = poison_(torch.empty_like(buf))
    res2, lse2 = mla_ext.decode(*args, softmax_scale=V3_SCALE, out=buf2, return_lse=True)
    assert res2 is buf2
    assert_bitwise_equal(lse2, lse, "lse with out=")
    check_decode_result(buf2, lse2, q_nope, q_pe, kv, V3_SCALE, True)


@pytest.mark.parametrize("dtype", [FP16, FP32])
def test_4d_cache_view(device, gen, dtype):
    """The FlashMLA cache layout [NB, BS, 1, 576] gives the same bits as [NB, BS, 576]."""
    kv = make_paged_kv([50, 0, 64, 1], 64, gen, dtype, device)
    q_nope, q_pe = make_query(4, 3, 16, gen, dtype, device)
    rest = (kv.block_table, kv.cache_seqlens)
    o3, l3 = mla_ext.decode(q_nope, q_pe, kv.cache, *rest, softmax_scale=DEEPSEEK_SCALE, return_lse=True)
    cache4 = kv.cache.unsqueeze(2)
    assert cache4.shape == (kv.cache.shape[0], 64, 1, HEAD)
    o4, l4 = mla_ext.decode(q_nope, q_pe, cache4, *rest, softmax_scale=DEEPSEEK_SCALE, return_lse=True)
    assert_bitwise_equal(o4, o3, "4-D cache out")
    assert_bitwise_equal(l4, l3, "4-D cache lse")
    check_decode_result(o4, l4, q_nope, q_pe, kv, DEEPSEEK_SCALE, True)


@pytest.mark.parametrize("dtype", [BF16, FP32])
def test_noncontiguous_query(device, gen, dtype):
    """q_nope / q_pe as slices of bigger tensors, with heads and s_q swapped in memory."""
    b, s_q, h = 3, 2, 16
    kv = make_paged_kv([30, 5, 0], 16, gen, dtype, device)
    # storage [b, h, s_q, 700]: q_nope = [..., 8:520], q_pe = [..., 600:664], then swap to [b, s_q, h, .]
    big = randn((b, h, s_q, 700), gen, dtype, device)
    q_nope = big[..., 8: 8 + LATENT].transpose(1, 2)
    q_pe = big[..., 600: 600 + ROPE].transpose(1, 2)
    assert not q_nope.is_contiguous() and not q_pe.is_contiguous()
    before = big.clone()
    args = (kv.cache, kv.block_table, kv.cache_seqlens)
    out, lse = mla_ext.decode(q_nope, q_pe, *args, softmax_scale=DEEPSEEK_SCALE, return_lse=True)
    o_ref, l_ref = mla_ext.decode(
        q_nope.contiguous(), q_pe.contiguous(), *args, softmax_scale=DEEPSEEK_SCALE, return_lse=True
    )
    assert_bitwise_equal(out, o_ref, "non-contiguous q")
    assert_bitwise_equal(lse, l_ref, "non-contiguous q lse")
    assert_bitwise_equal(big, before, "decode wrote into q")
    check_decode_result(out, lse, q_nope, q_pe, kv, DEEPSEEK_SCALE, True)

    # A packed query whose last dim is strided (not stride 1) also works.
    packed = randn((b, s_q, HEAD, h), gen, dtype, device).transpose(2, 3)
    assert packed.stride(-1) != 1
    o_p = mla_ext.decode(packed, None, *args, softmax_scale=DEEPSEEK_SCALE)
    assert_bitwise_equal(o_p, mla_ext.decode(packed.contiguous(), None, *args, softmax_scale=DEEPSEEK_SCALE))


def test_strided_cache_and_block_table(device, gen):
    """A cache whose rows are padded in memory ([NB, BS, 640][..., :576], offset by one
    block) and a block table that is a column slice of a wider table."""
    dtype = FP32
    kv = make_paged_kv([45, 0, 12], 16, gen, dtype, device)
    nb = kv.cache.shape[0]
    big = randn((nb + 1, 16, 640), gen, dtype, device)
    big[..., HEAD:] = float("nan")  # the padding columns must never be read either
    cache = big[1:, :, :HEAD]
    cache.copy_(kv.cache)
    wide = torch.full((3, kv.block_table.shape[1] + 5), -3, dtype=torch.int32, device=device)
    wide[:, 2: 2 + kv.block_table.shape[1]] = kv.block_table
    table = wide[:, 2: 2 + kv.block_table.shape[1]]
    assert not cache.is_contiguous() and not table.is_contiguous()
    q_nope, q_pe = make_query(3, 2, 16, gen, dtype, device)
    out, lse = mla_ext.decode(q_nope, q_pe, cache, table, kv.cache_seqlens, softmax_scale=V3_SCALE, return_lse=True)
    check_decode_result(out, lse, q_nope, q_pe, kv, V3_SCALE, True)


def test_decode_does_not_modify_inputs(device, gen):
    kv = make_paged_kv([19, 0, 7], 7, gen, BF16, device)
    q_nope, q_pe = make_query(3, 3, 3, gen, BF16, device)
    inputs = [q_nope, q_pe, kv.cache, kv.block_table, kv.cache_seqlens]
    before = [t.clone() for t in inputs]
    mla_ext.decode(*inputs, softmax_scale=DEEPSEEK_SCALE, causal=False, return_lse=True)
    for t, b in zip(inputs, before):
        assert_bitwise_equal(t, b, "decode modified an input")


@pytest.mark.parametrize("dtype", [BF16, FP32])
def test_large_scores_are_stable(device, gen, dtype):
    """Scores of magnitude ~100 (exp overflows fp32 above 88.7): the softmax must subtract
    its running max, across several KV chunks of a long sequence."""
    kv = make_paged_kv([600, 3], 16, gen, dtype, device)
    q_nope, q_pe = make_query(2, 2, 3, gen, dtype, device)
    q_nope, q_pe = q_nope * 60, q_pe * 60
    out, lse = mla_ext.decode(
        q_nope, q_pe, kv.cache, kv.block_table, kv.cache_seqlens, softmax_scale=DEEPSEEK_SCALE, return_lse=True
    )
    assert lse.max().item() > 89  # the case really exercises overflow of a naive exp
    check_decode_result(out, lse, q_nope, q_pe, kv, DEEPSEEK_SCALE, True)


def test_replay_with_new_seqlens_and_block_table(device, gen):
    """CUDA-graph style: the same tensors, updated in place between calls."""
    dtype = BF16
    kv = make_paged_kv([40, 0, 17], 16, gen, dtype, device)
    q_nope, q_pe = make_query(3, 1, 16, gen, dtype, device)
    out = torch.empty(3, 1, 16, LATENT, dtype=dtype, device=device)
    for lens in ([40, 0, 17], [0, 33, 1], [48, 16, 0]):
        step = make_paged_kv(lens, 16, gen, dtype, device, spare_blocks=0, extra_table_cols=0)
        # Reuse the first cache when big enough, as a serving engine would.
        kv.cache_seqlens.copy_(step.cache_seqlens)
        table = torch.full_like(kv.block_table, GARBAGE_BLOCK)
        table[:, : step.block_table.shape[1]] = step.block_table
        kv.block_table.copy_(table)
        poison_(kv.cache)
        kv.cache[: step.cache.shape[0]] = step.cache
        kv.dense = step.dense
        _, lse = mla_ext.decode(
            q_nope, q_pe, kv.cache, kv.block_table, kv.cache_seqlens, softmax_scale=DEEPSEEK_SCALE, out=out,
            return_lse=True,
        )
        check_decode_result(out, lse, q_nope, q_pe, kv, DEEPSEEK_SCALE, True)


def test_causal_is_bottom_right_aligned(device, gen):
    """With s_q > 1 and causal, query j of a sequence of L keys equals a single-query
    decode over the first L - s_q + j + 1 keys (the MTP / speculative-decoding rule)."""
    dtype = FP32
    s_q, L = 3, 20
    kv = make_paged_kv([L], 4, gen, dtype, device)
    q_nope, q_pe = make_query(1, s_q, 16, gen, dtype, device)
    out, lse = mla_ext.decode(
        q_nope, q_pe, kv.cache, kv.block_table, kv.cache_seqlens, softmax_scale=DEEPSEEK_SCALE, return_lse=True
    )
    for j in range(s_q):
        n = L - s_q + j + 1
        o_j, l_j = mla_ext.decode(
            q_nope[:, j: j + 1], q_pe[:, j: j + 1], kv.cache, kv.block_table,
            torch.tensor([n], dtype=torch.int32, device=device), softmax_scale=DEEPSEEK_SCALE, return_lse=True,
        )
        torch.testing.assert_close(out[:, j], o_j[:, 0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse[:, j], l_j[:, 0], atol=1e-5, rtol=1e-5)
    # and non-causal sees all L keys for every j
    full = mla_ext.decode(q_nope, q_pe, kv.cache, kv.block_table, kv.cache_seqlens, softmax_scale=DEEPSEEK_SCALE,
                          causal=False)
    assert not torch.allclose(full[:, 0], out[:, 0], atol=1e-3)
    torch.testing.assert_close(full[:, -1], out[:, -1], atol=1e-5, rtol=1e-5)
