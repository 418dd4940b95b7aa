"""mla_ext.flash_mla: FlashMLA's current decode API (get_mla_metadata / FlashMLASchedMeta /
flash_mla_with_kvcache), checked against its documented shapes and semantics:

    q [b, s_q, h_q, 576], k_cache [num_blocks, page_block_size, 1, 576],
    block_table [b, max_blocks] int32, cache_seqlens [b] int32, head_dim_v = 512
    -> out [b, s_q, h_q, 512] (q's dtype), softmax_lse [b, h_q, s_q] float32,
       out = 0 and lse = +inf for a query that sees no key.
    softmax_scale defaults to 1/sqrt(head_dim) = 1/sqrt(576); causal defaults to False.
    get_mla_metadata() (or the older get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv))
    -> (FlashMLASchedMeta(), None); the first decode call fills the schedule, later calls
    with the same object must agree with it.
"""
import inspect
import math
import random
import re
import zlib

import pytest
import torch

import mla_ext
from mla_ext import reference
from mla_ext.flash_mla import FlashMLASchedMeta, flash_mla_with_kvcache, get_mla_metadata

from conftest import DEVICES  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")

INF = math.inf


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
    query j of a length-L sequence to keys t <= L - s_q + j; a query that sees no key gets
    out 0 and lse +inf. Returns out [b, s_q, h_q, 512], lse [b, h_q, s_q]."""
    q = q.cpu().double()
    b, s_q, h, _ = q.shape
    out = torch.zeros(b, s_q, h, 512, dtype=torch.float64)
    lse = torch.full((b, h, s_q), INF, dtype=torch.float64)
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


# ----------------------------------------------------------------------------- call styles


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("page", [64, 1, 16, 7])
@pytest.mark.parametrize("style", ["new", "old"])
def test_both_call_styles_shapes_and_values(dev, page, style):
    b, s_q, h_q, h_kv = 3, 1, 16, 1
    q, k_cache, block_table, cache_seqlens, dense = _make(b, s_q, h_q, page, [70, 1, 130], torch.float32, dev, page)
    if style == "new":
        sched_meta, num_splits = get_mla_metadata()
    else:
        sched_meta, num_splits = get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv)
    assert isinstance(sched_meta, FlashMLASchedMeta) and num_splits is None
    assert not sched_meta.have_initialized and sched_meta.config is None
    scale = 1 / math.sqrt(192)
    for _layer in range(2):  # the same schedule serves every layer
        o, lse = flash_mla_with_kvcache(
            q, k_cache, block_table, cache_seqlens, 512, sched_meta, num_splits, softmax_scale=scale, causal=True
        )
        assert o.shape == (b, s_q, h_q, 512) and o.dtype == q.dtype and o.device == q.device
        assert lse.shape == (b, h_q, s_q) and lse.dtype == torch.float32 and lse.is_contiguous()
        ref_o, ref_lse = _reference(q, dense, scale, causal=True)
        torch.testing.assert_close(o.cpu().double(), ref_o, atol=5e-5, rtol=5e-5)
        torch.testing.assert_close(lse.cpu().double(), ref_lse, atol=5e-5, rtol=1e-5)
    # Filled on the first call, FlashMLA's Config fields in FlashMLA's order.
    assert sched_meta.have_initialized
    c = sched_meta.config
    assert (c.b, c.s_q, c.h_q, c.page_block_size, c.h_k) == (b, s_q, h_q, page, 1)
    assert (c.causal, c.is_fp8_kvcache, c.topk, c.extra_page_block_size, c.extra_topk) == (True, False, None, None, None)
    names = [f.name for f in FlashMLASchedMeta.Config.__dataclass_fields__.values()][:10]
    assert names == ["b", "s_q", "h_q", "page_block_size", "h_k", "causal", "is_fp8_kvcache", "topk",
                     "extra_page_block_size", "extra_topk"]
    assert sched_meta.tile_scheduler_metadata.dtype == torch.int32 and sched_meta.tile_scheduler_metadata.shape[1] == 8
    assert sched_meta.num_splits.shape == (b + 1,) and sched_meta.num_splits.device == q.device


def test_old_style_keywords_and_extras_accepted():
    lens = torch.tensor([5, 9], dtype=torch.int32)
    for args, kwargs in [
        ((lens, 16, 1), {}),
        ((lens, 16, 1, 16, False, None), {}),
        ((), dict(cache_seqlens=lens, num_q_tokens_per_head_k=16, num_heads_k=1, num_heads_q=16)),
        ((lens,), dict(num_heads_per_head_k=16, num_heads_k=1)),  # FlashMLA's first keyword name
        ((), dict(something_new=3)),  # FlashMLA ignores every argument; unknown keywords too
    ]:
        meta, splits = get_mla_metadata(*args, **kwargs)
        assert isinstance(meta, FlashMLASchedMeta) and splits is None


def test_old_style_arguments_checked_against_first_call():
    q, k_cache, bt, lens, _ = _make(2, 2, 4, 8, [9, 3], torch.float32, "cpu", 4)
    meta, splits = get_mla_metadata(lens, 2 * 4 // 1, 1)
    flash_mla_with_kvcache(q, k_cache, bt, lens, 512, meta, splits)  # agrees
    meta, splits = get_mla_metadata(lens, 4, 1)  # s_q * h_q // h_kv should be 8
    with pytest.raises(ValueError, match="num_q_tokens_per_head_k"):
        flash_mla_with_kvcache(q, k_cache, bt, lens, 512, meta, splits)
    assert not meta.have_initialized  # a rejected call leaves the schedule empty
    meta, splits = get_mla_metadata(lens[:1], 8, 1)
    with pytest.raises(ValueError, match="batch"):
        flash_mla_with_kvcache(q, k_cache, bt, lens, 512, meta, splits)
    meta, splits = get_mla_metadata(lens, 8, 1, 5)
    with pytest.raises(ValueError, match="num_heads_q"):
        flash_mla_with_kvcache(q, k_cache, bt, lens, 512, meta, splits)


# ----------------------------------------------------------------------------- schedule consistency


def _base_call():
    q, k_cache, bt, lens, _ = _make(2, 2, 4, 8, [9, 3], torch.float32, "cpu", 6)
    return dict(q=q, k_cache=k_cache, block_table=bt, cache_seqlens=lens, head_dim_v=512)


@pytest.mark.parametrize(
    "change, field",
    [
        (lambda a: a.update(q=a["q"][:1], block_table=a["block_table"][:1], cache_seqlens=a["cache_seqlens"][:1]), "batch size"),
        (lambda a: a.update(q=a["q"][:, :1]), "seq_len_q"),
        (lambda a: a.update(q=a["q"][:, :, :3]), "num_heads_q"),
        (lambda a: a.update(k_cache=a["k_cache"].view(-1, 4, 1, 576), block_table=_halve_blocks(a["block_table"])), "page_block_size"),
        (lambda a: a.update(causal=True), "causal"),
        (lambda a: a.update(q=a["q"].bfloat16(), k_cache=a["k_cache"].bfloat16()), "q's dtype"),
    ],
    ids=["b", "s_q", "h_q", "page", "causal", "dtype"],
)
def test_schedule_mismatch_named(change, field):
    args = _base_call()
    meta, splits = get_mla_metadata()
    o0, lse0 = flash_mla_with_kvcache(**args, tile_scheduler_metadata=meta, num_splits=splits)
    saved = (meta.config, meta.tile_scheduler_metadata, meta.num_splits)
    changed = dict(args)
    change(changed)
    with pytest.raises(ValueError, match=re.escape(field)) as err:
        flash_mla_with_kvcache(**changed, tile_scheduler_metadata=meta, num_splits=splits)
    assert "FlashMLASchedMeta" in str(err.value) and "->" in str(err.value)
    assert (meta.config, meta.tile_scheduler_metadata, meta.num_splits) == saved  # untouched
    # The same call with a fresh schedule runs; the original call still runs with the old one.
    flash_mla_with_kvcache(**changed, tile_scheduler_metadata=get_mla_metadata()[0])
    o1, lse1 = flash_mla_with_kvcache(**args, tile_scheduler_metadata=meta, num_splits=splits)
    assert torch.equal(o0, o1) and torch.equal(lse0, lse1)




def _halve_blocks(bt):
    """Block table for the same cache viewed with half the page size: block k -> 2k, 2k+1."""
    return torch.stack([2 * bt, 2 * bt + 1], dim=-1).reshape(bt.shape[0], -1).to(torch.int32)


def test_page_size_view_gives_same_result():
    # The page-size change above is a real alternative layout of the same tokens.
    args = _base_call()
    o0, lse0 = flash_mla_with_kvcache(**args, tile_scheduler_metadata=get_mla_metadata()[0])
    args.update(k_cache=args["k_cache"].view(-1, 4, 1, 576), block_table=_halve_blocks(args["block_table"]))
    o1, lse1 = flash_mla_with_kvcache(**args, tile_scheduler_metadata=get_mla_metadata()[0])
    torch.testing.assert_close(o1, o0, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse1, lse0, atol=1e-6, rtol=1e-6)


def test_schedule_cache_dtype_and_num_splits():
    args = _base_call()
    meta, _ = get_mla_metadata()
    flash_mla_with_kvcache(**args, tile_scheduler_metadata=meta)
    with pytest.raises(ValueError, match="num_splits must be None"):
        flash_mla_with_kvcache(**args, tile_scheduler_metadata=meta, num_splits=meta.num_splits)
    # A changed cache dtype (with q's unchanged) is named on its own.
    cfg = meta.config
    meta.config = type(cfg)(**{**cfg.__dict__, "kv_dtype": torch.float16})
    with pytest.raises(ValueError, match="k_cache's dtype: torch.float16 -> torch.float32"):
        flash_mla_with_kvcache(**args, tile_scheduler_metadata=meta)
    with pytest.raises(TypeError, match="FlashMLASchedMeta"):
        flash_mla_with_kvcache(**args, tile_scheduler_metadata="meta")


# ----------------------------------------------------------------------------- lse convention


@pytest.mark.parametrize("dev", DEVICES)
def test_query_without_keys_gets_zero_and_plus_inf(dev):
    # Sequence 1 is empty; in sequence 2 (L = 2 < s_q = 3) causal query 0 sees nothing.
    q, k_cache, bt, lens, dense = _make(3, 3, 4, 8, [9, 1, 2], torch.float32, dev, 2)
    lens = torch.tensor([9, 0, 2], dtype=torch.int32, device=dev)
    dense[1] = dense[1][:0]
    meta, _ = get_mla_metadata()
    o, lse = flash_mla_with_kvcache(q, k_cache, bt, lens, 512, meta, None, causal=True)
    assert torch.equal(o[1], torch.zeros_like(o[1])) and bool((lse[1] == INF).all())
    assert torch.equal(o[2, 0], torch.zeros_like(o[2, 0])) and bool((lse[2, :, 0] == INF).all())
    assert bool(torch.isfinite(lse[0]).all()) and bool(torch.isfinite(lse[2, :, 1:]).all())
    ref_o, ref_lse = _reference(q, dense, 576**-0.5, causal=True)
    torch.testing.assert_close(o.cpu().double(), ref_o, atol=5e-5, rtol=5e-5)
    torch.testing.assert_close(lse.cpu().double(), ref_lse, atol=5e-5, rtol=1e-5)
    # The native op keeps SPEC's -inf for the same queries.
    _, native_lse = mla_ext.decode(q, None, k_cache, bt, lens, softmax_scale=576**-0.5, causal=True, return_lse=True)
    assert bool((native_lse[1] == -INF).all()) and bool((native_lse[2, 0] == -INF).all())
    torch.testing.assert_close(native_lse.transpose(1, 2)[0], lse[0])


# ----------------------------------------------------------------------------- keywords


FLASHMLA_PARAMS = [
    "q", "k_cache", "block_table", "cache_seqlens", "head_dim_v", "tile_scheduler_metadata", "num_splits",
    "softmax_scale", "causal", "is_fp8_kvcache", "indices", "attn_sink", "extra_k_cache",
    "extra_indices_in_kvcache", "topk_length", "extra_topk_length",
]


def test_signature_is_flashmlas():
    params = inspect.signature(flash_mla_with_kvcache).parameters
    assert list(params) == FLASHMLA_PARAMS
    defaults = {n: p.default for n, p in params.items() if p.default is not inspect.Parameter.empty}
    assert defaults == dict(
        num_splits=None, softmax_scale=None, causal=False, is_fp8_kvcache=False, indices=None, attn_sink=None,
        extra_k_cache=None, extra_indices_in_kvcache=None, topk_length=None, extra_topk_length=None,
    )


def test_every_keyword_accepted_by_name():
    q, k_cache, bt, lens, dense = _make(2, 1, 4, 16, [20, 5], torch.float32, "cpu", 8)
    meta, splits = get_mla_metadata()
    o, lse = flash_mla_with_kvcache(
        q=q, k_cache=k_cache, block_table=bt, cache_seqlens=lens, head_dim_v=512, tile_scheduler_metadata=meta,
        num_splits=splits, softmax_scale=0.05, causal=False, is_fp8_kvcache=False, indices=None, attn_sink=None,
        extra_k_cache=None, extra_indices_in_kvcache=None, topk_length=None, extra_topk_length=None,
    )
    ref_o, ref_lse = _reference(q, dense, 0.05, causal=False)
    torch.testing.assert_close(o.double(), ref_o, atol=5e-5, rtol=5e-5)
    torch.testing.assert_close(lse.double(), ref_lse, atol=5e-5, rtol=1e-5)


@pytest.mark.parametrize("name", ["topk_length", "extra_k_cache", "extra_indices_in_kvcache", "extra_topk_length"])
def test_sparse_keywords_need_indices(name):
    q, k_cache, bt, lens, _ = _make(2, 1, 4, 16, [20, 5], torch.float32, "cpu", 9)
    values = dict(
        topk_length=torch.full((2,), 8, dtype=torch.int32), extra_k_cache=k_cache,
        extra_indices_in_kvcache=torch.zeros(2, 1, 8, dtype=torch.int32),
        extra_topk_length=torch.full((2,), 8, dtype=torch.int32),
    )
    meta, _ = get_mla_metadata()
    with pytest.raises(ValueError, match=f"{name} given without indices"):
        flash_mla_with_kvcache(q, k_cache, bt, lens, 512, meta, None, **{name: values[name]})
    with pytest.raises(NotImplementedError, match="is_fp8_kvcache=True with dense decode"):
        flash_mla_with_kvcache(q, k_cache, bt, lens, 512, meta, None, is_fp8_kvcache=True)
    assert not meta.have_initialized


# ----------------------------------------------------------------------------- sparse decode


def _sparse_case(b, s_q, h_q, page, num_blocks, topk, fp8, seed):
    from mla_ext import sparse

    g = torch.Generator().manual_seed(seed)
    rows = torch.randn(num_blocks, page, 1, 576, generator=g).to(torch.bfloat16)
    k_cache = sparse.quantize_cache(rows, block_padding=1) if fp8 else rows
    q = torch.randn(b, s_q, h_q, 576, generator=g).to(torch.bfloat16)
    idx = torch.randint(0, num_blocks * page, (b, s_q, topk), generator=g, dtype=torch.int32)
    idx = idx.masked_fill(torch.rand(b, s_q, topk, generator=g) < 0.25, -1)
    return q, k_cache, idx


@pytest.mark.parametrize("fp8", [True, False])
def test_sparse_decode_through_flash_mla(fp8):
    from mla_ext import sparse

    b, s_q, h_q, topk = 2, 2, 16, 24
    q, k_cache, idx = _sparse_case(b, s_q, h_q, 64, 3, topk, fp8, 21)
    extra_q, extra_cache, extra_idx = _sparse_case(b, s_q, h_q, 16, 2, 8, fp8, 22)
    topk_length = torch.tensor([topk, 0], dtype=torch.int32)
    extra_len = torch.tensor([3, 8], dtype=torch.int32)
    sink = torch.linspace(-2, 2, h_q)
    meta, splits = get_mla_metadata()
    kw = dict(is_fp8_kvcache=fp8, indices=idx, attn_sink=sink, extra_k_cache=extra_cache,
              extra_indices_in_kvcache=extra_idx, topk_length=topk_length, extra_topk_length=extra_len)
    o, lse = flash_mla_with_kvcache(q, k_cache, None, None, 512, meta, splits, **kw)
    assert o.dtype == torch.bfloat16 and o.shape == (b, s_q, h_q, 512) and lse.shape == (b, h_q, s_q)
    ref_o, ref_lse = sparse.sparse_decode(
        q, k_cache, idx, 576 ** -0.5, topk_length=topk_length, extra_cache=extra_cache, extra_indices=extra_idx,
        extra_topk_length=extra_len, attn_sink=sink)
    torch.testing.assert_close(o, ref_o.to(torch.bfloat16), atol=2e-5, rtol=2 ** -7)
    torch.testing.assert_close(lse.double(), ref_lse.transpose(1, 2), atol=2e-5, rtol=2e-5)
    c = meta.config
    assert (c.topk, c.extra_page_block_size, c.extra_topk, c.is_fp8_kvcache) == (topk, 16, 8, fp8)
    o2, lse2 = flash_mla_with_kvcache(q, k_cache, None, None, 512, meta, None, **kw)  # same schedule: fine
    assert torch.equal(o2, o) and torch.equal(lse2, lse)
    if fp8:  # vLLM's FlashMLA sparse backend hands the cache over as raw bytes (a uint8 view)
        kw_bytes = dict(kw, extra_k_cache=extra_cache.view(torch.uint8))
        o3, lse3 = flash_mla_with_kvcache(q, k_cache.view(torch.uint8), None, None, 512, meta, None, **kw_bytes)
        assert torch.equal(o3, o) and torch.equal(lse3, lse)
    kw["indices"] = idx[..., :10].contiguous()
    kw["topk_length"] = None
    with pytest.raises(ValueError, match=r"topk \(indices.shape\[-1\]\): 24 -> 10"):
        flash_mla_with_kvcache(q, k_cache, None, None, 512, meta, None, **kw)


def test_sparse_decode_flash_mla_rules():
    q, k_cache, idx = _sparse_case(1, 1, 4, 16, 2, 8, True, 23)
    meta, _ = get_mla_metadata()
    with pytest.raises(ValueError, match="causal must be False"):
        flash_mla_with_kvcache(q, k_cache, None, None, 512, meta, None, causal=True, is_fp8_kvcache=True, indices=idx)
    with pytest.raises(ValueError, match="is_fp8_kvcache=False but k_cache is torch.float8_e4m3fn"):
        flash_mla_with_kvcache(q, k_cache, None, None, 512, meta, None, indices=idx)
    with pytest.raises(ValueError, match="extra_k_cache and extra_indices_in_kvcache go together"):
        flash_mla_with_kvcache(q, k_cache, None, None, 512, meta, None, is_fp8_kvcache=True, indices=idx,
                               extra_k_cache=k_cache)
    with pytest.raises(ValueError, match=r"indices\[0, 0, 0\] = 32 is outside the cache"):
        flash_mla_with_kvcache(q, k_cache, None, None, 512, meta, None, is_fp8_kvcache=True,
                               indices=torch.full_like(idx, 32))
    assert not meta.have_initialized
    # a query whose every slot is skipped: out 0, lse +inf
    o, lse = flash_mla_with_kvcache(q, k_cache, None, None, 512, meta, None, is_fp8_kvcache=True,
                                    indices=torch.full_like(idx, -1))
    assert torch.all(o == 0) and torch.all(lse == INF)


# ----------------------------------------------------------------------------- attention sink (dense)


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attn_sink_dense(dev, dtype):
    b, s_q, h_q = 3, 2, 6
    q, k_cache, bt, lens, dense = _make(b, s_q, h_q, 16, [40, 0, 1], dtype, dev, 12)
    dense[1] = dense[1][:0]
    # Finite sinks on both sides of the typical lse, and the two infinities:
    # -inf leaves the output alone, +inf zeroes it.
    sink = torch.tensor([-INF, -2.0, 0.5, 3.0, 12.0, INF], dtype=torch.float32, device=dev)
    o, lse = flash_mla_with_kvcache(q, k_cache, bt, lens, 512, get_mla_metadata()[0], None, causal=True, attn_sink=sink)
    o_plain, lse_plain = flash_mla_with_kvcache(q, k_cache, bt, lens, 512, get_mla_metadata()[0], None, causal=True)
    assert torch.equal(lse, lse_plain)  # lse is the keys' alone
    ref_o, ref_lse = _reference(q, dense, 576**-0.5, causal=True)
    s = sink.cpu().double().view(1, 1, h_q)
    factor = 1.0 / (1.0 + torch.exp(s - ref_lse.transpose(1, 2)))  # [b, s_q, h_q]
    factor = torch.where(ref_lse.transpose(1, 2) == INF, 0.0, factor)  # empty queries stay 0
    ref_sunk = ref_o * factor.unsqueeze(-1)
    tol = dict(atol=5e-5, rtol=5e-5) if dtype == torch.float32 else dict(atol=1e-3, rtol=2.0**-7)
    torch.testing.assert_close(o.cpu().double(), ref_sunk, **tol)
    assert not torch.isnan(o).any()
    assert torch.equal(o[..., 0, :], o_plain[..., 0, :])  # sink -inf: untouched
    assert torch.equal(o[..., 5, :], torch.zeros_like(o[..., 5, :]))  # sink +inf: zero
    assert torch.equal(o[1], torch.zeros_like(o[1])) and bool((lse[1] == INF).all())
    # The sink shrinks every other head's output, by a visible amount for sink >= lse - 3.
    assert not torch.allclose(o[0, :, 3], o_plain[0, :, 3])


def test_attn_sink_bad_inputs_named():
    q, k_cache, bt, lens, _ = _make(2, 1, 4, 16, [20, 5], torch.float32, "cpu", 13)
    for bad in [torch.zeros(3), torch.zeros(4, dtype=torch.float64), torch.zeros(1, 4), [0.0] * 4]:
        with pytest.raises(ValueError, match="attn_sink must be a float32 tensor \\[h_q\\] = \\[4\\]"):
            flash_mla_with_kvcache(q, k_cache, bt, lens, 512, get_mla_metadata()[0], None, attn_sink=bad)


# ----------------------------------------------------------------------------- defaults, dtypes, legacy


@pytest.mark.parametrize("dev", DEVICES)
def test_defaults_scale_576_and_not_causal(dev):
    b, s_q, h_q = 2, 3, 4
    q, k_cache, bt, lens, dense = _make(b, s_q, h_q, 16, [20, 5], torch.float32, dev, 11)
    meta, splits = get_mla_metadata()
    o, lse = flash_mla_with_kvcache(q, k_cache, bt, lens, 512, meta, splits)  # FlashMLA's defaults
    ref_o, ref_lse = _reference(q, dense, 576**-0.5, causal=False)
    torch.testing.assert_close(o.cpu().double(), ref_o, atol=5e-5, rtol=5e-5)
    torch.testing.assert_close(lse.cpu().double(), ref_lse, atol=5e-5, rtol=1e-5)
    # causal=False: every query of a sequence sees the same keys, so with identical queries
    # the rows are identical; with causal=True the earlier queries see fewer keys.
    q_same = q[:, :1].expand(b, s_q, h_q, 576).contiguous()
    o_nc, _ = flash_mla_with_kvcache(q_same, k_cache, bt, lens, 512, meta, splits)
    o_c, _ = flash_mla_with_kvcache(q_same, k_cache, bt, lens, 512, get_mla_metadata()[0], None, causal=True)
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


def test_squeezed_cache_and_legacy_metadata():
    q, k_cache, bt, lens, _ = _make(2, 1, 4, 8, [9, 1], torch.float32, "cpu", 2)
    meta, splits = get_mla_metadata()
    o, lse = flash_mla_with_kvcache(q, k_cache, bt, lens, 512, meta, splits, causal=True)
    o3, lse3 = flash_mla_with_kvcache(q, k_cache.squeeze(2), bt, lens, 512, get_mla_metadata()[0], None, causal=True)
    assert torch.equal(o3, o) and torch.equal(lse3, lse)
    # FlashMLA's first API: a [parts, 8] int32 tensor and num_splits [b + 1]; None is tolerated too.
    legacy_meta = torch.zeros(4, 8, dtype=torch.int32)
    legacy_splits = torch.arange(3, dtype=torch.int32)
    o4, lse4 = flash_mla_with_kvcache(q, k_cache, bt, lens, 512, legacy_meta, legacy_splits, causal=True)
    o5, _ = flash_mla_with_kvcache(q, k_cache, bt, lens, 512, None, None, causal=True)
    assert torch.equal(o4, o) and torch.equal(lse4, lse) and torch.equal(o5, o)
    with pytest.raises(ValueError, match="num_splits"):
        flash_mla_with_kvcache(q, k_cache, bt, lens, 512, legacy_meta, legacy_splits[:-1])
    with pytest.raises(ValueError, match="tile_scheduler_metadata"):
        flash_mla_with_kvcache(q, k_cache, bt, lens, 512, legacy_meta[0], legacy_splits)


def test_errors():
    q, k_cache, bt, lens, _ = _make(2, 1, 4, 8, [9, 3], torch.float32, "cpu", 3)
    meta = get_mla_metadata()[0]
    with pytest.raises(ValueError, match="head_dim_v"):
        flash_mla_with_kvcache(q, k_cache, bt, lens, 128, meta, None)
    with pytest.raises(ValueError, match="KV heads"):
        flash_mla_with_kvcache(q, k_cache.expand(-1, -1, 2, -1), bt, lens, 512, meta, None)
    with pytest.raises(ValueError, match="q must be"):
        flash_mla_with_kvcache(q[..., :512], k_cache, bt, lens, 512, meta, None)
    with pytest.raises(ValueError, match="block_table and cache_seqlens are required"):
        flash_mla_with_kvcache(q, k_cache, None, lens, 512, meta, None)
    with pytest.raises(TypeError, match="cache_seqlens must be int32"):
        get_mla_metadata(lens.long(), 4, 1)
    with pytest.raises(ValueError, match="cache_seqlens must be a 1-D"):
        get_mla_metadata(lens.view(1, 2), 4, 1)
    with pytest.raises(ValueError, match="num_q_tokens_per_head_k"):
        get_mla_metadata(lens, 0, 1)
    with pytest.raises(ValueError, match="num_heads_k"):
        get_mla_metadata(lens, 4, 0)
    with pytest.raises(TypeError, match="num_heads_k must be an int"):
        get_mla_metadata(lens, 4, 1.5)
    with pytest.raises(TypeError, match="positional"):
        get_mla_metadata(lens, 4, 1, 4, False, None, 7)
    with pytest.raises((TypeError, ValueError), match="block_table"):  # the op's own checks name the argument
        flash_mla_with_kvcache(q, k_cache, bt.float(), lens, 512, meta, None)
    assert not meta.have_initialized  # every rejected call left the schedule empty


# ----------------------------------------------------------------------------- FlashMLA's dense test, ported


def _flashmla_style_case(b, s_q, s_k, h_q, is_varlen, have_zero_seqlen_k, block_size, dtype, seed):
    """FlashMLA's dense-decoding test data: q and K are randn / 10 clamped to [-1, 1]; varlen
    lengths ~ N(s_k, s_k / 2) but at least s_q; some lengths zeroed; a shuffled block table
    whose entries past a sequence's end are 2147480000; NaN in every unused cache row."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    lens = [s_k] * b
    if is_varlen:
        lens = [max(int(rng.normalvariate(s_k, s_k / 2)), s_q) for _ in range(b)]
    if have_zero_seqlen_k:
        lens = [0 if torch.randn(1, generator=g).item() > 0 else L for L in lens]
    max_pad = -(-max(max(lens), 1) // 256) * 256
    blocks_per_seq = max_pad // block_size
    q = (torch.randn(b, s_q, h_q, 576, generator=g) / 10).clamp(-1, 1).to(dtype)
    block_table = torch.randperm(b * blocks_per_seq, generator=g).to(torch.int32).view(b, blocks_per_seq)
    k_cache = (torch.randn(b * blocks_per_seq, block_size, 1, 576, generator=g) / 10).clamp(-1, 1)
    for i, L in enumerate(lens):
        used = -(-L // block_size)
        k_cache[block_table[i, used:].long()] = float("nan")
        if L % block_size:
            k_cache[block_table[i, used - 1].long(), L % block_size:] = float("nan")
        block_table[i, used:] = 2147480000
    return q, k_cache.to(dtype), block_table, torch.tensor(lens, dtype=torch.int32)


def _assert_close_flashmla(name, ans, ref, abs_tol, rel_tol, cos_diff_tol=None):
    """Elementwise |ans - ref| <= abs_tol + rel_tol * |ref| (infinities must match exactly),
    and optionally 1 - cos(ans, ref) <= cos_diff_tol over the finite part."""
    ans, ref = ans.double(), ref.double()
    inf_ref = torch.isinf(ref)
    assert torch.equal(torch.isinf(ans), inf_ref) and torch.equal(ans[inf_ref], ref[inf_ref]), f"{name}: infinities differ"
    assert not torch.isnan(ans).any(), f"{name}: NaN"
    a, r = ans[~inf_ref], ref[~inf_ref]
    err = (a - r).abs()
    bad = err > abs_tol + rel_tol * r.abs()
    assert not bad.any(), f"{name}: {int(bad.sum())} elements off, max err {float(err.max()):.3g}"
    if cos_diff_tol is not None and r.numel():
        denom = (a * a).sum() + (r * r).sum()
        if denom > 0:
            cos_diff = 1 - 2 * (a * r).sum() / denom
            assert cos_diff <= cos_diff_tol, f"{name}: cos diff {float(cos_diff):.3g}"


_PORT_CASES = [
    # b, s_q, s_k, h_q, varlen, zero_seqlen, causal, block_size
    (1, 1, 20, 1, False, False, False, 64),
    (2, 2, 140, 3, True, False, True, 64),
    (2, 4, 20, 9, False, False, True, 64),
    (6, 1, 140, 64, True, False, False, 64),
    (2, 2, 140, 128, True, False, True, 64),
    (3, 4, 140, 63, True, False, False, 64),
    (8, 2, 300, 16, True, True, False, 64),  # FlashMLA's corner case: some lengths zero
    (8, 2, 300, 16, True, True, True, 64),
    (3, 2, 140, 9, True, True, True, 16),  # page sizes FlashMLA does not take
    (2, 3, 70, 5, True, False, True, 1),
]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("case", _PORT_CASES, ids=lambda c: "b{}sq{}sk{}h{}{}{}{}p{}".format(
    c[0], c[1], c[2], c[3], "V" if c[4] else "", "Z" if c[5] else "", "C" if c[6] else "", c[7]))
def test_flashmla_dense_decoding_port(case, dtype):
    b, s_q, s_k, h_q, varlen, zero, causal, block_size = case
    seed = zlib.crc32(repr((case, dtype)).encode())
    q, k_cache, block_table, lens = _flashmla_style_case(b, s_q, s_k, h_q, varlen, zero, block_size, dtype, seed)
    sched_meta, num_splits = get_mla_metadata()
    out, lse = flash_mla_with_kvcache(q, k_cache, block_table, lens, 512, sched_meta, num_splits, causal=causal)
    # mla_ext.reference (float64), in FlashMLA's conventions: default scale 1/sqrt(576), causal
    # bottom-right aligned, lse [b, h_q, s_q] with +inf (and out 0) where a query sees no key.
    ref_out, ref_lse = reference.decode(
        q, None, k_cache, block_table, lens, 576**-0.5, causal=causal, compute_dtype=torch.float64
    )
    ref_lse = ref_lse.double().transpose(1, 2)
    ref_lse = ref_lse.masked_fill(ref_lse == -INF, INF)
    if zero:
        assert bool((lens == 0).any()) and bool((lse == INF).any())
    _assert_close_flashmla("out", out, ref_out.to(dtype), abs_tol=8e-4, rel_tol=2.01 / 128, cos_diff_tol=5e-6)
    _assert_close_flashmla("lse", lse, ref_lse, abs_tol=1e-6, rel_tol=8.01 / 65536)
