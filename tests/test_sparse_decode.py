"""mla_ext.sparse_decode (native CPU op) against the float64 reference in mla_ext.sparse.

Tolerances: the kernel reads exactly the values the reference reads (fp8 * power-of-two
scale and bf16 are exact in fp32; q is cast to fp32 exactly) and accumulates in fp32 over
at most a few hundred slots, so an fp32 output is within ~1e-5 of the float64 one (we
allow 2e-5 abs + rel on values of order 1); a bf16 output adds one bf16 rounding (2^-8 rel).
"""
import os
import zlib

import pytest
import torch

import mla_ext
from mla_ext import sparse

NAN_BYTE = 0xFF  # e4m3 NaN code, and a NaN in the fp32 scales and bf16 rope


def _gen(seed):
    g = torch.Generator().manual_seed(seed)
    return g


def _make_cache(g, kind, num_blocks, block_size, pad):
    """A cache whose every token is NaN (all bytes 0xFF) until written; returns (cache, rows_written_mask)."""
    rows = torch.randn(num_blocks, block_size, 576, generator=g).to(torch.bfloat16)
    if kind.startswith("fp8"):
        cache = sparse.quantize_cache(rows, block_padding=pad)
    else:
        dtype = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}[kind]
        storage = torch.randn(num_blocks, block_size + pad, 1, 576, generator=g).to(dtype)
        cache = storage[:, :block_size]
        cache.copy_(rows.unsqueeze(2).to(dtype))
    return cache


def _poison(cache, used_tokens):
    """Every token not in used_tokens becomes all-0xFF bytes (NaN in every field)."""
    c = cache.squeeze(2)
    nb, bs = c.shape[:2]
    for t in range(nb * bs):
        if t not in used_tokens:
            c[t // bs, t % bs].view(torch.uint8).fill_(NAN_BYTE)


def _indices(g, b, s_q, topk, num_tokens, p_invalid=0.3):
    idx = torch.randint(0, num_tokens, (b, s_q, topk), generator=g, dtype=torch.int32)
    drop = torch.rand(b, s_q, topk, generator=g) < p_invalid
    return idx.masked_fill(drop, -1)


def _used(idx, topk_length):
    used = set()
    b, s_q, topk = idx.shape
    for i in range(b):
        n = topk if topk_length is None else int(topk_length[i])
        used.update(int(t) for t in idx[i, :, :n].flatten() if t >= 0)
    return used


def _compare(q, out, lse, ref_out, ref_lse):
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), empty) and torch.all(lse[empty] > 0)
    assert torch.all(out[empty] == 0)
    torch.testing.assert_close(lse[~empty].double(), ref_lse[~empty], atol=2e-5, rtol=2e-5)
    if q.dtype == torch.float32:
        torch.testing.assert_close(out.double(), ref_out, atol=2e-5, rtol=2e-5)
    else:
        torch.testing.assert_close(out, ref_out.to(q.dtype), atol=2e-5, rtol=2 ** -7)


CASES = [
    # kind, b, s_q, h, block_size, num_blocks, pad, topk, q dtype
    ("fp8", 2, 1, 16, 64, 3, 0, 40, torch.float32),
    ("fp8", 3, 2, 20, 16, 5, 1, 33, torch.float32),
    ("fp8", 1, 4, 64, 8, 6, 3, 70, torch.bfloat16),
    ("fp8", 2, 3, 1, 1, 50, 2, 17, torch.float32),
    ("bf16", 2, 2, 17, 16, 4, 1, 50, torch.float32),
    ("bf16", 2, 1, 128, 64, 2, 0, 64, torch.bfloat16),
    ("fp32", 1, 3, 5, 4, 9, 2, 9, torch.float16),
    # bf16 q over fp8 / bf16 caches: the AVX-512 BF16 kernel where the CPU has it. Head
    # counts off its 8-head score block, several 32-slot tiles and a last tile of <= 16,
    # two head groups (h > 64).
    ("fp8", 2, 2, 7, 16, 8, 1, 45, torch.bfloat16),
    ("fp8", 1, 1, 128, 64, 4, 1, 300, torch.bfloat16),
    ("bf16", 1, 2, 20, 4, 12, 3, 40, torch.bfloat16),
]

_CPU_FLAGS = set()
if os.path.exists("/proc/cpuinfo"):
    with open("/proc/cpuinfo") as f:
        _CPU_FLAGS = set(next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), []))
HAS_AVX2 = {"avx2", "fma", "f16c"} <= _CPU_FLAGS
HAS_AVX512BF16 = {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"} <= _CPU_FLAGS
HAS_AMX = HAS_AVX512BF16 and {"amx_bf16", "amx_tile"} <= _CPU_FLAGS
BF16_EXACT = (torch.float8_e4m3fn, torch.bfloat16)


def expected_kernel(q_dtype, cache_dtype, extra_dtype=None):
    """The sparse kernel build a call should run, from /proc/cpuinfo and MLA_EXT_CPU_ISA."""
    cap = os.environ.get("MLA_EXT_CPU_ISA", "auto")
    if (cap not in ("scalar", "avx2") and HAS_AVX512BF16 and q_dtype == torch.bfloat16 and cache_dtype in BF16_EXACT
            and (extra_dtype is None or extra_dtype in BF16_EXACT)):
        return "amx" if cap != "avx512bf16" and HAS_AMX else "avx512bf16"
    return "avx2" if cap != "scalar" and HAS_AVX2 else "scalar"


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(x) for x in c))
@pytest.mark.parametrize("extras", ["plain", "topk_length", "extra", "sink"])
def test_matches_reference(case, extras):
    kind, b, s_q, h, bs, nb, pad, topk, qdt = case
    g = _gen(zlib.crc32(repr((case[:-1], extras)).encode()))
    cache = _make_cache(g, kind, nb, bs, pad)
    idx = _indices(g, b, s_q, topk, nb * bs)
    if topk > 3:
        idx[0, 0, 1] = idx[0, 0, 2] = 3  # a duplicated token counts twice
    q = torch.randn(b, s_q, h, 576, generator=g).to(qdt)
    kw = {}
    topk_length = None
    if extras in ("topk_length", "extra"):
        topk_length = torch.randint(0, topk + 1, (b,), generator=g, dtype=torch.int32)
        topk_length[0] = 0 if b > 1 else topk_length[0]  # a sequence with no slot
        kw["topk_length"] = topk_length
    _poison(cache, _used(idx, topk_length))
    if extras == "extra":
        extra = _make_cache(g, "fp8" if kind != "fp8" else "bf16", 2, 32, 1)
        eidx = _indices(g, b, s_q, 12, 64)
        elen = torch.randint(0, 13, (b,), generator=g, dtype=torch.int32)
        _poison(extra, _used(eidx, elen))
        kw.update(extra_cache=extra, extra_indices=eidx, extra_topk_length=elen)
    if extras == "sink":
        kw["attn_sink"] = torch.randn(h, generator=g) * 2
        kw["attn_sink"][0] = float("-inf")  # sink of -inf: factor 1
    scale = 576 ** -0.5
    extra_dtype = kw["extra_cache"].dtype if "extra_cache" in kw else None
    if _CPU_FLAGS:
        assert mla_ext.cpu_sparse_decode_kernel(qdt, cache.dtype, extra_dtype) == expected_kernel(qdt, cache.dtype, extra_dtype)
    out, lse = mla_ext.ops.sparse_decode(q, cache, idx, softmax_scale=scale, **kw)
    assert out.dtype == qdt and out.shape == (b, s_q, h, 512) and lse.shape == (b, s_q, h)
    ref_out, ref_lse = sparse.sparse_decode(
        q, cache, idx, scale, topk_length=kw.get("topk_length"), extra_cache=kw.get("extra_cache"),
        extra_indices=kw.get("extra_indices"), extra_topk_length=kw.get("extra_topk_length"),
        attn_sink=kw.get("attn_sink"))
    assert not torch.isnan(ref_out).any()
    _compare(q, out, lse, ref_out, ref_lse)


def test_all_invalid_rows_and_zero_topk_length():
    g = _gen(5)
    cache = _make_cache(g, "fp8", 2, 8, 1)
    q = torch.randn(3, 2, 4, 576, generator=g)
    idx = _indices(g, 3, 2, 6, 16, p_invalid=0.0)
    idx[1] = -1  # every slot of sequence 1 skipped
    idx[2, 1] = -1  # query 1 of sequence 2
    topk_length = torch.tensor([0, 6, 6], dtype=torch.int32)  # sequence 0: no slot
    sink = torch.zeros(4)
    out, lse = mla_ext.ops.sparse_decode(q, cache, idx, softmax_scale=0.1, topk_length=topk_length, attn_sink=sink)
    assert torch.all(out[:2] == 0) and torch.all(lse[:2] == float("inf"))
    assert torch.all(out[2, 1] == 0) and torch.all(lse[2, 1] == float("inf"))
    assert torch.isfinite(lse[2, 0]).all() and (out[2, 0] != 0).any()
    ref_out, ref_lse = sparse.sparse_decode(q, cache, idx, 0.1, topk_length=topk_length, attn_sink=sink)
    _compare(q, out, lse, ref_out, ref_lse)


def test_duplicates_equal_doubled_weight():
    """Naming a token twice is the same as naming it once with its score raised by log 2."""
    g = _gen(6)
    cache = _make_cache(g, "fp8", 1, 4, 0)
    q = torch.randn(1, 1, 2, 576, generator=g)
    out2, lse2 = mla_ext.ops.sparse_decode(q, cache, torch.tensor([[[0, 1, 1]]], dtype=torch.int32), softmax_scale=1.0)
    out1, lse1 = mla_ext.ops.sparse_decode(q, cache, torch.tensor([[[0, 1]]], dtype=torch.int32), softmax_scale=1.0)
    assert not torch.allclose(out1, out2)
    ref_out, ref_lse = sparse.sparse_decode(q, cache, torch.tensor([[[0, 1, 1]]], dtype=torch.int32), 1.0)
    _compare(q, out2, lse2, ref_out, ref_lse)


def test_padded_stride_equals_packed():
    g = _gen(7)
    rows = torch.randn(4, 16, 576, generator=g).to(torch.bfloat16)
    q = torch.randn(2, 2, 8, 576, generator=g)
    idx = _indices(g, 2, 2, 30, 64)
    a = mla_ext.ops.sparse_decode(q, sparse.quantize_cache(rows), idx, softmax_scale=0.05)
    b = mla_ext.ops.sparse_decode(q, sparse.quantize_cache(rows, block_padding=5), idx, softmax_scale=0.05)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def _bad_call(**over):
    g = _gen(8)
    args = dict(
        q=torch.randn(2, 1, 4, 576, generator=g),
        cache=_make_cache(g, "fp8", 2, 4, 0),
        indices=torch.tensor([[[0, 7, -1]], [[1, 2, 3]]], dtype=torch.int32),
        softmax_scale=0.1,
    )
    args.update(over)
    return mla_ext.ops.sparse_decode(args.pop("q"), args.pop("cache"), args.pop("indices"), **args)


def test_bad_inputs_named():
    _bad_call()  # the base call is fine
    with pytest.raises(ValueError, match=r"indices\[0, 0, 1\] = 8 is outside the cache \(8 tokens"):
        _bad_call(indices=torch.tensor([[[0, 8, -1]], [[1, 2, 3]]], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"indices\[1, 0, 0\] = -2 is outside the cache"):
        _bad_call(indices=torch.tensor([[[0, 1, -1]], [[-2, 2, 3]]], dtype=torch.int32))
    # an out-of-cache index past topk_length is never read: accepted
    _bad_call(indices=torch.tensor([[[0, 99, -1]], [[1, 2, 3]]], dtype=torch.int32),
              topk_length=torch.tensor([1, 3], dtype=torch.int32))
    with pytest.raises(TypeError, match="indices must be int32"):
        _bad_call(indices=torch.tensor([[[0, 7, -1]], [[1, 2, 3]]], dtype=torch.int64))
    with pytest.raises(ValueError, match=r"topk_length\[1\] = 4 is outside \[0, topk\] = \[0, 3\]"):
        _bad_call(topk_length=torch.tensor([1, 4], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"topk_length\[0\] = -1"):
        _bad_call(topk_length=torch.tensor([-1, 0], dtype=torch.int32))
    with pytest.raises(TypeError, match="topk_length must be int32"):
        _bad_call(topk_length=torch.tensor([1, 1], dtype=torch.int64))
    with pytest.raises(TypeError, match="cache must be float8_e4m3fn"):
        _bad_call(cache=torch.zeros(2, 4, 576, dtype=torch.int8))
    with pytest.raises(ValueError, match="656-byte tokens"):
        _bad_call(cache=torch.zeros(2, 4, 576, dtype=torch.float8_e4m3fn))
    with pytest.raises(ValueError, match=r"cache's last dim must be 576"):
        _bad_call(cache=torch.zeros(2, 4, 656, dtype=torch.bfloat16))
    with pytest.raises(TypeError, match="q must be bfloat16, float16 or float32"):
        _bad_call(q=torch.zeros(2, 1, 4, 576, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"indices must be \[b, s_q, topk\] = \[2, 1, topk\]"):
        _bad_call(indices=torch.zeros(2, 2, 3, dtype=torch.int32))
    with pytest.raises(TypeError, match="attn_sink must be float32"):
        _bad_call(attn_sink=torch.zeros(4, dtype=torch.bfloat16))
    with pytest.raises(ValueError, match=r"attn_sink must be \[h_q\] = \[4\]"):
        _bad_call(attn_sink=torch.zeros(3))
    with pytest.raises(ValueError, match="extra_cache and extra_indices go together"):
        _bad_call(extra_cache=_make_cache(_gen(1), "bf16", 1, 4, 0))
    with pytest.raises(ValueError, match=r"extra_indices\[0, 0, 0\] = 4 is outside the cache \(4 tokens"):
        _bad_call(extra_cache=_make_cache(_gen(1), "bf16", 1, 4, 0),
                  extra_indices=torch.tensor([[[4]], [[0]]], dtype=torch.int32))


def test_opcheck():
    g = _gen(9)
    cache = _make_cache(g, "fp8", 2, 8, 1)
    q = torch.randn(2, 2, 4, 576, generator=g)
    idx = _indices(g, 2, 2, 10, 16)
    extra = _make_cache(g, "bf16", 1, 8, 0)
    eidx = _indices(g, 2, 2, 5, 8)
    bf16_cache = _make_cache(g, "bf16", 2, 8, 1)
    args = (q, bf16_cache, idx, 0.1, torch.tensor([10, 4], dtype=torch.int32), extra, eidx, None, torch.randn(4))
    torch.library.opcheck(torch.ops.mla_ext.sparse_decode.default, args)
    # With a float8 tensor among the inputs, opcheck's schema test cannot run: it does
    # arithmetic on every input, which torch does not implement for float8_e4m3fn. The
    # fake-tensor, autograd-registration and AOT-dispatch tests still run.
    utils = ("test_autograd_registration", "test_faketensor", "test_aot_dispatch_dynamic")
    torch.library.opcheck(torch.ops.mla_ext.sparse_decode.default, (q.bfloat16(), cache, idx, 0.1), test_utils=utils)
    torch.library.opcheck(torch.ops.mla_ext.sparse_decode.default, args[:1] + (cache,) + args[2:], test_utils=utils)


@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512bf16", "amx"])
@pytest.mark.parametrize("qdt", [torch.bfloat16, torch.float32])
def test_every_kernel_build_matches_reference(isa, qdt, monkeypatch):
    """Each build (portable, AVX2 + FMA, AVX-512 BF16, AMX), forced by MLA_EXT_CPU_ISA (read
    per call), on the same inputs: its name is the one expected, and it matches the
    reference. fp32 q never takes the bf16 builds (q would not be exact in bf16)."""
    if (isa == "avx2" and not HAS_AVX2 or isa == "avx512bf16" and not HAS_AVX512BF16
            or isa == "amx" and not HAS_AMX):
        pytest.skip(f"this CPU lacks {isa}")
    monkeypatch.setenv("MLA_EXT_CPU_ISA", isa)
    want = isa if isa in ("scalar", "avx2") or qdt == torch.bfloat16 else "avx2"
    assert mla_ext.cpu_sparse_decode_kernel(qdt, torch.float8_e4m3fn, torch.bfloat16) == want
    g = _gen(10)
    cache = _make_cache(g, "fp8", 5, 16, 1)
    extra = _make_cache(g, "bf16", 2, 8, 1)
    q = torch.randn(2, 2, 24, 576, generator=g).to(qdt)
    idx = _indices(g, 2, 2, 70, 80)
    eidx = _indices(g, 2, 2, 9, 16)
    topk_length = torch.tensor([70, 37], dtype=torch.int32)
    _poison(cache, _used(idx, topk_length))
    _poison(extra, _used(eidx, None))
    sink = torch.randn(24, generator=g)
    kw = dict(topk_length=topk_length, extra_cache=extra, extra_indices=eidx, attn_sink=sink)
    out, lse = mla_ext.ops.sparse_decode(q, cache, idx, softmax_scale=0.07, **kw)
    ref_out, ref_lse = sparse.sparse_decode(q, cache, idx, 0.07, **kw)
    _compare(q, out, lse, ref_out, ref_lse)


@pytest.mark.parametrize("isa", ["avx512bf16", "amx"])
def test_builds_agree_with_each_other(isa, monkeypatch):
    """The AVX-512 BF16 / AMX builds and the portable one on the same bf16 inputs: all
    accumulate in fp32 over exact inputs, so they differ by fp32 rounding only (before the
    bf16 output rounding, which may then differ by one bf16 ulp: 2^-7 relative)."""
    if not (HAS_AMX if isa == "amx" else HAS_AVX512BF16):
        pytest.skip(f"this CPU lacks {isa}")
    g = _gen(11)
    cache = _make_cache(g, "fp8", 8, 32, 0)
    q = torch.randn(3, 1, 33, 576, generator=g).to(torch.bfloat16)
    idx = _indices(g, 3, 1, 200, 256)
    outs = {}
    for build in ("scalar", isa):
        monkeypatch.setenv("MLA_EXT_CPU_ISA", build)
        assert mla_ext.cpu_sparse_decode_kernel(q.dtype, cache.dtype) == build
        outs[build] = mla_ext.ops.sparse_decode(q, cache, idx, softmax_scale=0.05)
    torch.testing.assert_close(outs[isa][1], outs["scalar"][1], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[isa][0], outs["scalar"][0], atol=1e-5, rtol=2 ** -7)


@pytest.mark.parametrize("isa", ["scalar", "auto"])
@pytest.mark.parametrize("kind", ["fp8", "bf16"])
def test_all_minus_inf_scores_are_an_empty_row(isa, kind, monkeypatch):
    """A query whose every valid score is -inf has lse = -inf in the reference: an empty row
    (out 0, lse +inf), not NaN. A -inf in the rope part of a token (q's rope 1 there) gives
    that token score -inf while its V stays finite."""
    monkeypatch.setenv("MLA_EXT_CPU_ISA", isa)
    g = _gen(12)
    cache = _make_cache(g, kind, 2, 8, 1)
    c = cache.squeeze(2)
    for t in range(8):  # tokens 0..7: score -inf
        rope = c[t // 8, t % 8].view(torch.uint8)[-128:].view(torch.bfloat16) if kind == "fp8" else c[t // 8, t % 8, 512:]
        rope[0] = float("-inf")
    q = torch.randn(2, 1, 9, 576, generator=g).to(torch.bfloat16)
    q[..., 512] = 1.0
    idx = torch.tensor([[[0, 3, -1, 7]], [[2, 9, 12, 5]]], dtype=torch.int32)  # row 0: only -inf tokens
    out, lse = mla_ext.ops.sparse_decode(q, cache, idx, softmax_scale=0.1)
    ref_out, ref_lse = sparse.sparse_decode(q, cache, idx, 0.1)
    assert torch.all(ref_lse[0] == float("inf")) and torch.isfinite(ref_lse[1]).all()
    assert not torch.isnan(out).any()
    _compare(q, out, lse, ref_out, ref_lse)


def test_block_size_one_any_token_stride():
    """With block_size 1 the token stride is never used: torch may give that size-1 dim any
    stride, and the call must not be refused for it."""
    g = _gen(13)
    packed = _make_cache(g, "fp8", 12, 1, 0).squeeze(2)  # [12, 1, 656]
    odd = torch.empty_strided((12, 1, 656), (656, 1, 1), dtype=torch.float8_e4m3fn)
    odd.view(torch.uint8).copy_(packed.view(torch.uint8))
    q = torch.randn(1, 2, 4, 576, generator=g).to(torch.bfloat16)
    idx = _indices(g, 1, 2, 10, 12)
    a = mla_ext.ops.sparse_decode(q, packed, idx, softmax_scale=0.1)
    b = mla_ext.ops.sparse_decode(q, odd, idx, softmax_scale=0.1)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
