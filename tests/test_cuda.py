"""CUDA kernels: CPU vs CUDA vs reference, CUDA graphs, streams, long varlen batches,
index checks. Skipped where no GPU is visible."""
import math
import os

import pytest
import torch

import mla_ext
from mla_ext import reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

D, DC, DR = 576, 512, 64
SCALE = 1.0 / math.sqrt(192)
# Relative (norm-wise) output error allowed against the fp32 reference, and lse abs error.
TOL = {torch.bfloat16: (2e-2, 2e-2), torch.float16: (5e-3, 5e-3), torch.float32: (1e-4, 1e-4)}
IMPLS = ["auto", "simple"]  # MLA_EXT_DECODE_IMPL: tensor cores where possible / CUDA-core kernel


@pytest.fixture(autouse=True)
def _restore_state():
    old_env = os.environ.get("MLA_EXT_DECODE_IMPL")
    old_checks = mla_ext.set_index_checks(True)
    mla_ext.set_index_checks(old_checks)
    yield
    mla_ext.set_index_checks(old_checks)
    if old_env is None:
        os.environ.pop("MLA_EXT_DECODE_IMPL", None)
    else:
        os.environ["MLA_EXT_DECODE_IMPL"] = old_env


def set_impl(impl):
    if impl == "auto":
        os.environ.pop("MLA_EXT_DECODE_IMPL", None)
    else:
        os.environ["MLA_EXT_DECODE_IMPL"] = impl


def make_paged(lens, block_size, dtype, *, extra_blocks=3, extra_cols=1, gen=None, poison=True):
    """A paged cache holding len(lens) sequences in shuffled blocks. Unused slots and the
    block-table entries past each sequence's end hold NaN / garbage ids."""
    gen = gen or torch.Generator().manual_seed(0)
    need = [max(1, -(-n // block_size)) for n in lens]
    num_blocks = sum(need) + extra_blocks
    cache = torch.randn(num_blocks, block_size, D, generator=gen).to(dtype)
    perm = torch.randperm(num_blocks, generator=gen)
    width = max(need) + extra_cols
    table = torch.randint(-5, 10**6, (len(lens), width), generator=gen, dtype=torch.int64).to(torch.int32)
    used = torch.zeros(num_blocks, block_size, dtype=torch.bool)
    pos = 0
    for i, n in enumerate(lens):
        ids = perm[pos:pos + need[i]]
        pos += need[i]
        table[i, :need[i]] = ids.to(torch.int32)
        for t in range(n):
            used[ids[t // block_size], t % block_size] = True
    if poison and dtype != torch.int32:
        cache[~used] = float("nan")
    return cache, table, torch.tensor(lens, dtype=torch.int32)


def make_query(b, s_q, h, dtype, gen, packed=False):
    q = torch.randn(b, s_q, h, D, generator=gen).to(dtype)
    if packed:
        return q, None
    return q[..., :DC].contiguous(), q[..., DC:].contiguous()


def check_close(out, lse, ref_out, ref_lse, dtype, what=""):
    out, lse = out.float().cpu(), lse.float().cpu()
    ref_out, ref_lse = ref_out.float().cpu(), ref_lse.float().cpu()
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    rtol, ltol = TOL[dtype]
    err = (out - ref_out).norm() / ref_out.norm().clamp_min(1e-6)
    assert err < rtol, f"{what}: relative output error {err:.3g} >= {rtol}"
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), empty), f"{what}: lse -inf pattern differs"
    assert (out[empty] == 0).all(), f"{what}: rows that see no key must be 0"
    if (~empty).any():
        lerr = (lse[~empty] - ref_lse[~empty]).abs().max()
        assert lerr < ltol, f"{what}: lse error {lerr:.3g}"


def run_three_ways(q_nope, q_pe, cache, table, lens, causal, dtype, what):
    """Reference (fp32, CPU), CPU op and CUDA op on the same inputs."""
    ref_out, ref_lse = reference.decode(q_nope, q_pe, cache, table, lens, SCALE, causal)
    cpu_out, cpu_lse = mla_ext.decode(q_nope, q_pe, cache, table, lens, softmax_scale=SCALE, causal=causal,
                                      return_lse=True)
    check_close(cpu_out, cpu_lse, ref_out, ref_lse, dtype, what + " [cpu]")
    dev = torch.device("cuda")
    out, lse = mla_ext.decode(q_nope.to(dev), None if q_pe is None else q_pe.to(dev), cache.to(dev),
                              table.to(dev), lens.to(dev), softmax_scale=SCALE, causal=causal, return_lse=True)
    assert out.device.type == "cuda" and out.dtype == dtype and lse.dtype == torch.float32
    check_close(out, lse, ref_out, ref_lse, dtype, what + " [cuda]")
    return out, lse


# ----------------------------------------------------------------------------------------- decode


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("block_size", [1, 16, 64, 7])
@pytest.mark.parametrize("s_q", [1, 2, 3, 4])
def test_decode_matches(impl, dtype, block_size, s_q):
    set_impl(impl)
    gen = torch.Generator().manual_seed(block_size * 10 + s_q)
    lens = [0, 1, s_q, 37, 300, 129]
    h = 16
    cache, table, seqlens = make_paged(lens, block_size, dtype, gen=gen)
    q_nope, q_pe = make_query(len(lens), s_q, h, dtype, gen)
    run_three_ways(q_nope, q_pe, cache, table, seqlens, True, dtype, f"{impl} {dtype} bs={block_size} s_q={s_q}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("h,s_q", [(1, 1), (20, 3), (35, 2), (128, 2), (128, 1), (64, 4)])
@pytest.mark.parametrize("causal", [True, False])
def test_decode_row_blocks(impl, dtype, h, s_q, causal):
    """M = s_q * h below, at and across the 64 / 32-row tiles, with padding rows."""
    set_impl(impl)
    gen = torch.Generator().manual_seed(h * 7 + s_q)
    lens = [200, 1, 70] if s_q <= 2 else [s_q - 1, 200, 5]
    cache, table, seqlens = make_paged(lens, 16, dtype, gen=gen)
    q_nope, q_pe = make_query(len(lens), s_q, h, dtype, gen)
    run_three_ways(q_nope, q_pe, cache, table, seqlens, causal, dtype, f"{impl} h={h} s_q={s_q} causal={causal}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_packed_query_and_4d_cache(impl, dtype):
    set_impl(impl)
    gen = torch.Generator().manual_seed(3)
    cache, table, seqlens = make_paged([65, 130], 64, dtype, gen=gen)
    q, _ = make_query(2, 2, 16, dtype, gen, packed=True)
    ref_out, ref_lse = reference.decode(q, None, cache, table, seqlens, SCALE, True)
    out, lse = mla_ext.decode(q.cuda(), None, cache.unsqueeze(2).cuda(), table.cuda(), seqlens.cuda(),
                              softmax_scale=SCALE, return_lse=True)
    check_close(out, lse, ref_out, ref_lse, dtype, "packed q, 4-D cache")


@pytest.mark.parametrize("impl", IMPLS)
def test_decode_split_kv_long_context(impl):
    """Few sequences, long context: the planner splits the KV length; the combine merges."""
    set_impl(impl)
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(4)
    cache, table, seqlens = make_paged([5000, 3], 64, dtype, gen=gen, extra_cols=40)
    q_nope, q_pe = make_query(2, 1, 16, dtype, gen)
    run_three_ways(q_nope, q_pe, cache, table, seqlens, True, dtype, f"{impl} long ctx")


def test_decode_seqlens_span_0_to_32768():
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(5)
    lens = [0, 1, 17, 1000, 4096, 8191, 20000, 32768]
    cache, table, seqlens = make_paged(lens, 64, dtype, gen=gen, poison=True)
    q_nope, q_pe = make_query(len(lens), 1, 16, dtype, gen)
    ref_out, ref_lse = reference.decode(q_nope, q_pe, cache, table, seqlens, SCALE, True)
    out, lse = mla_ext.decode(q_nope.cuda(), q_pe.cuda(), cache.cuda(), table.cuda(), seqlens.cuda(),
                              softmax_scale=SCALE, return_lse=True)
    check_close(out, lse, ref_out, ref_lse, dtype, "seqlens 0..32768")


def test_decode_all_empty_and_out_argument():
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(6)
    cache, table, _ = make_paged([10, 10], 16, dtype, gen=gen)
    seqlens = torch.zeros(2, dtype=torch.int32, device="cuda")
    q_nope, q_pe = make_query(2, 2, 16, dtype, gen)
    out = torch.full((2, 2, 16, DC), float("nan"), dtype=dtype, device="cuda")
    res, lse = mla_ext.decode(q_nope.cuda(), q_pe.cuda(), cache.cuda(), table.cuda(), seqlens, softmax_scale=SCALE,
                              out=out, return_lse=True)
    assert res.data_ptr() == out.data_ptr()
    assert (out == 0).all() and torch.isinf(lse).all() and (lse < 0).all()


def test_decode_unaligned_query_uses_fallback():
    """A query view whose rows are not 16-byte aligned still decodes correctly."""
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(7)
    cache, table, seqlens = make_paged([40, 90], 16, dtype, gen=gen)
    big = torch.randn(2, 1, 16, DC + 3, generator=gen).to(dtype)
    q_nope = big[..., 1:DC + 1]  # last dim contiguous, rows start 2 bytes off
    q_pe = torch.randn(2, 1, 16, DR, generator=gen).to(dtype)
    ref_out, ref_lse = reference.decode(q_nope, q_pe, cache, table, seqlens, SCALE, True)
    out, lse = mla_ext.decode(q_nope.cuda(), q_pe.cuda(), cache.cuda(), table.cuda(), seqlens.cuda(),
                              softmax_scale=SCALE, return_lse=True)
    check_close(out, lse, ref_out, ref_lse, dtype, "unaligned q")


# ------------------------------------------------------------------------------- graphs, streams


def test_decode_cuda_graph_replay_with_new_seqlens_and_tables():
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(8)
    b, s_q, h, bs = 4, 2, 16, 16
    lens_a = [100, 0, 33, 700]
    cache, table_a, seqlens_a = make_paged(lens_a, bs, dtype, gen=gen, extra_blocks=80, extra_cols=60)
    q_nope, q_pe = make_query(b, s_q, h, dtype, gen)
    cache_d = cache.cuda()
    st = dict(q_nope=q_nope.cuda(), q_pe=q_pe.cuda(), table=table_a.cuda(), lens=seqlens_a.cuda())
    out = torch.empty(b, s_q, h, DC, dtype=dtype, device="cuda")

    def step():
        res, lse = mla_ext.decode(st["q_nope"], st["q_pe"], cache_d, st["table"], st["lens"], softmax_scale=SCALE,
                                  return_lse=True)
        out.copy_(res)
        return lse

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()  # warm-up outside capture (index checks run here)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):  # index checks are on by default: they must be skipped, not sync
        lse_static = step()

    # New lengths and a new block table (other blocks, other order) of the same shapes.
    for lens in ([5, 900, 0, 64], [1, 1, 1, 1], [0, 0, 0, 0], [960, 17, 480, 2]):
        gen2 = torch.Generator().manual_seed(sum(lens))
        need = [max(1, -(-n // bs)) for n in lens]
        perm = torch.randperm(cache.shape[0], generator=gen2)[:sum(need)]
        table = torch.randint(0, cache.shape[0], table_a.shape, generator=gen2, dtype=torch.int32)
        pos = 0
        for i, n in enumerate(need):
            table[i, :n] = perm[pos:pos + n].to(torch.int32)
            pos += n
        # every used slot must be finite for the reference: refill the used blocks
        cache_new = cache.clone()
        cache_new[perm] = torch.randn(len(perm), bs, D, generator=gen2).to(dtype)
        cache_d.copy_(cache_new)
        st["table"].copy_(table)
        st["lens"].copy_(torch.tensor(lens, dtype=torch.int32))
        graph.replay()
        torch.cuda.synchronize()
        ref_out, ref_lse = reference.decode(q_nope, q_pe, cache_new, table, torch.tensor(lens, dtype=torch.int32),
                                            SCALE, True)
        check_close(out, lse_static, ref_out, ref_lse, dtype, f"graph replay lens={lens}")


def test_append_cuda_graph_replay():
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(9)
    cache = torch.zeros(8, 16, D, dtype=dtype, device="cuda")
    kv_c = torch.randn(5, DC, generator=gen).to(dtype).cuda()
    k_pe = torch.randn(5, DR, generator=gen).to(dtype).cuda()
    slots = torch.tensor([0, 17, -1, 100, 127], dtype=torch.int64, device="cuda")
    mla_ext.append_kv(kv_c, k_pe, cache, slots)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        mla_ext.append_kv(kv_c, k_pe, cache, slots)
    slots.copy_(torch.tensor([3, -1, 50, 51, 2], device="cuda"))
    before = cache.clone()
    graph.replay()
    torch.cuda.synchronize()
    expect = reference.append_kv(kv_c, k_pe, before, slots)
    assert torch.equal(cache, expect)


def test_non_default_stream():
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(10)
    cache, table, seqlens = make_paged([300, 64, 1], 16, dtype, gen=gen)
    q_nope, q_pe = make_query(3, 1, 16, dtype, gen)
    ref_out, ref_lse = reference.decode(q_nope, q_pe, cache, table, seqlens, SCALE, True)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        args = [t.cuda(non_blocking=False) for t in (q_nope, q_pe, cache, table, seqlens)]
        out, lse = mla_ext.decode(*args, softmax_scale=SCALE, return_lse=True)
        c2 = torch.zeros(4, 16, D, dtype=dtype, device="cuda")
        kv = torch.randn(3, D, device="cuda").to(dtype)
        mla_ext.append_kv(kv[:, :DC], kv[:, DC:], c2, torch.tensor([0, 63, -1], device="cuda"))
    s.synchronize()
    check_close(out, lse, ref_out, ref_lse, dtype, "side stream")
    assert torch.equal(c2[0, 0], kv[0]) and torch.equal(c2[3, 15], kv[1])


# ---------------------------------------------------------------------------------------- append


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("block_size", [1, 16, 7])
@pytest.mark.parametrize("slot_dtype", [torch.int64, torch.int32])
@pytest.mark.parametrize("layout", ["contiguous", "strided", "unaligned"])
def test_append_matches(dtype, block_size, slot_dtype, layout):
    gen = torch.Generator().manual_seed(block_size)
    T, num_blocks = 37, 9
    cache = torch.randn(num_blocks, block_size, D, generator=gen).to(dtype)
    rows = torch.randn(T, D + 2, generator=gen).to(dtype)
    if layout == "contiguous":
        kv_c, k_pe = rows[:, :DC].contiguous(), rows[:, DC:D].contiguous()
    elif layout == "strided":  # row stride D + 2 (16-byte multiple only for some dtypes)
        kv_c, k_pe = rows[:, :DC], rows[:, DC:D]
    else:  # rows start one element off
        kv_c, k_pe = rows[:, 1:DC + 1], rows[:, DC + 1:D + 1]
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:T].to(slot_dtype)
    slots[::5] = -1
    expect = reference.append_kv(kv_c, k_pe, cache, slots)
    got = cache.cuda()
    mla_ext.append_kv(kv_c.cuda(), k_pe.cuda(), got, slots.cuda())
    assert torch.equal(got.cpu(), expect)
    cpu = cache.clone()
    mla_ext.append_kv(kv_c, k_pe, cpu, slots)
    assert torch.equal(cpu, expect)


def test_append_empty_and_4d():
    cache = torch.zeros(2, 4, 1, D, dtype=torch.bfloat16, device="cuda")
    e = torch.empty(0, DC, dtype=torch.bfloat16, device="cuda")
    mla_ext.append_kv(e, torch.empty(0, DR, dtype=torch.bfloat16, device="cuda"), cache,
                      torch.empty(0, dtype=torch.int64, device="cuda"))
    kv = torch.randn(1, D, device="cuda").to(torch.bfloat16)
    mla_ext.append_kv(kv[:, :DC], kv[:, DC:], cache, torch.tensor([5], device="cuda"))
    assert torch.equal(cache[1, 1, 0], kv[0]) and cache.float().abs().sum() == kv.float().abs().sum()


def test_fp8_not_implemented_on_cuda():
    cache = torch.zeros(2, 4, D, device="cuda").to(torch.float8_e4m3fn)
    scale = torch.ones(1, device="cuda")
    kv = torch.randn(1, D, device="cuda")
    with pytest.raises(NotImplementedError):
        mla_ext.append_kv(kv[:, :DC], kv[:, DC:], cache, torch.tensor([0], device="cuda"), scale=scale)
    q = torch.randn(1, 1, 2, D, device="cuda")
    with pytest.raises(NotImplementedError):
        mla_ext.decode(q, None, cache, torch.zeros(1, 1, dtype=torch.int32, device="cuda"),
                       torch.ones(1, dtype=torch.int32, device="cuda"), softmax_scale=SCALE, scale=scale)


# --------------------------------------------------------------------------------- index checks


def bad_index_case():
    dtype = torch.bfloat16
    gen = torch.Generator().manual_seed(11)
    cache, table, seqlens = make_paged([50, 20], 16, dtype, gen=gen)
    q_nope, q_pe = make_query(2, 1, 16, dtype, gen)
    return [t.cuda() for t in (q_nope, q_pe, cache, table, seqlens)]


def test_index_checks_on_raise():
    q_nope, q_pe, cache, table, seqlens = bad_index_case()
    mla_ext.set_index_checks(True)
    bad = table.clone()
    bad[0, 1] = cache.shape[0] + 5
    with pytest.raises(IndexError, match="block_table"):
        mla_ext.decode(q_nope, q_pe, cache, bad, seqlens, softmax_scale=SCALE)
    long = seqlens.clone()
    long[1] = table.shape[1] * cache.shape[1] + 1
    with pytest.raises(ValueError, match="cache_seqlens"):
        mla_ext.decode(q_nope, q_pe, cache, table, long, softmax_scale=SCALE)
    kv = torch.randn(1, D, device="cuda").to(torch.bfloat16)
    with pytest.raises(IndexError, match="slot_mapping"):
        mla_ext.append_kv(kv[:, :DC], kv[:, DC:], cache, torch.tensor([cache.shape[0] * 16], device="cuda"))


@pytest.mark.parametrize("impl", IMPLS)
def test_index_checks_off_never_crash(impl):
    """With checks off, out-of-range ids, negative / huge seqlens and slots past the cache
    must neither fault nor touch memory; rows of good sequences stay correct."""
    set_impl(impl)
    q_nope, q_pe, cache, table, seqlens = bad_index_case()
    mla_ext.set_index_checks(False)
    bad = table.clone()
    bad[0, :] = torch.tensor([-7, 2**31 - 1, cache.shape[0]], dtype=torch.int32, device="cuda")[
        torch.arange(bad.shape[1], device="cuda") % 3]
    lens = seqlens.clone()
    lens[1] = 2**31 - 1
    out = mla_ext.decode(q_nope, q_pe, cache, bad, lens, softmax_scale=SCALE)
    lens[1] = -5
    out2, lse2 = mla_ext.decode(q_nope, q_pe, cache, table, lens, softmax_scale=SCALE, return_lse=True)
    torch.cuda.synchronize()
    assert out.shape == q_nope.shape and (out2[1] == 0).all() and torch.isinf(lse2[1]).all()
    ref_out, ref_lse = reference.decode(q_nope[:1].cpu(), q_pe[:1].cpu(), cache.cpu(), table[:1].cpu(),
                                        seqlens[:1].cpu(), SCALE, True)
    check_close(out2[:1], lse2[:1], ref_out, ref_lse, torch.bfloat16, "good row next to bad ones")
    before = cache.clone()
    kv = torch.randn(3, D, device="cuda").to(torch.bfloat16)
    mla_ext.append_kv(kv[:, :DC], kv[:, DC:], cache,
                      torch.tensor([cache.numel() // D, 2**40, -3], device="cuda"))
    torch.cuda.synchronize()
    assert torch.equal(cache, before)
