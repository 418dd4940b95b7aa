"""CUDA kernels: CPU vs CUDA vs reference, CUDA graphs, streams, long varlen batches,
index checks. Skipped where no GPU is visible."""
import math
import os

import pytest
import torch

import mla_ext
from mla_ext import reference

from cuda_cases import (APPEND_CASES, D, DC, DECODE_CASES, DR, IMPLS, SCALE, TOL, check_close, make_paged,
                        make_query)
from sparse_cuda_cases import SCALE as SPARSE_SCALE, SPARSE_CASES, check_sparse, make_cache, to_device

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

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


@pytest.mark.parametrize("case", DECODE_CASES, ids=[c.name for c in DECODE_CASES])
def test_decode_shared_cases(case):
    """tests/cuda_cases.py's list, the one tests/test_cuda_emulated.py runs in the emulator."""
    set_impl(case.impl)
    q_nope, q_pe, cache, table, seqlens, scale = case.inputs()
    ref_out, ref_lse = case.reference(q_nope, q_pe, cache, table, seqlens, scale)
    dev = torch.device("cuda")
    out, lse = mla_ext.decode(q_nope.to(dev), None if q_pe is None else q_pe.to(dev), cache.to(dev), table.to(dev),
                              seqlens.to(dev), softmax_scale=SCALE, causal=case.causal, return_lse=True,
                              scale=None if scale is None else scale.to(dev))
    check_close(out, lse, ref_out, ref_lse, case.q_dtype, case.name, tol=case.tolerance())


@pytest.mark.parametrize("case", APPEND_CASES, ids=[c.name for c in APPEND_CASES])
def test_append_shared_cases(case):
    kv_c, k_pe, cache, slots, scale = case.inputs()
    want = reference.append_kv(kv_c, k_pe, cache, slots, scale)
    dev = torch.device("cuda")
    got = cache.to(dev)
    mla_ext.append_kv(kv_c.to(dev), k_pe.to(dev), got, slots.to(dev), scale=None if scale is None else scale.to(dev))
    assert torch.equal(got.cpu().view(torch.uint8), want.view(torch.uint8)), case.name


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("block_size", [1, 16, 64, 7, 128])  # 64, 128: the sm90 TMA path
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


# ------------------------------------------------------------------------------------ fp8 cache
#
# float8_e4m3fn cache with a per-tensor scale held on the device (SPEC: append stores
# e4m3(x / scale), decode computes on x_stored * scale). Tolerances:
#   tight: against reference.decode(..., scale=) in float64 on the SAME fp8 cache. The
#     dequantization is exact on the GPU (every e4m3 value is a bf16/fp16 number, the scale
#     is folded into fp32 score / output factors), so only the 16-bit P, fp32 accumulation
#     and the final rounding to q's dtype remain: the same error budget as a 16-bit cache.
#   loose: against the bf16-cache decode of the ORIGINAL values. That gap is the fp8
#     quantization error itself (3 mantissa bits: up to 2^-4 relative per element, which
#     moves both the scores and the averaged rows), not a kernel error, so it is bounded by
#     the gap between the two float64 references plus the two kernels' own tight budgets.
FP8_TOL = {torch.bfloat16: (1e-2, 1e-2), torch.float16: (3e-3, 3e-3)}


def fp8_paged(lens, block_size, *, gen, extra_blocks=3, extra_cols=1, margin=1.25):
    """A bf16 paged cache (make_paged, NaN in unused slots) and its fp8 copy written by
    mla_ext.append_kv on the GPU, with the scale on the device."""
    cache16, table, seqlens = make_paged(lens, block_size, torch.bfloat16, gen=gen, extra_blocks=extra_blocks,
                                         extra_cols=extra_cols)
    flat = cache16.view(-1, D)
    used = ~torch.isnan(flat).any(-1)
    scale = mla_ext.fp8_scale_for(flat[used].float(), margin=margin).cuda()
    cache8 = torch.full(cache16.shape, float("nan")).to(torch.float8_e4m3fn).cuda()  # unused slots: NaN codes
    slots = torch.nonzero(used).flatten().cuda()
    rows = flat[used].cuda()
    mla_ext.append_kv(rows[:, :DC].contiguous(), rows[:, DC:].contiguous(), cache8, slots, scale=scale)
    return cache16, cache8, table, seqlens, scale


def rel_err(a, b):
    a, b = a.double().cpu(), b.double().cpu()
    return ((a - b).norm() / b.norm().clamp_min(1e-12)).item()


@pytest.mark.parametrize("in_dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("block_size", [1, 16, 7])
@pytest.mark.parametrize("layout", ["contiguous", "unaligned"])
def test_fp8_append_exact_bytes(in_dtype, block_size, layout):
    """Stored bytes = reference.append_kv (RNE of x / scale, saturated to +-448, never inf or
    NaN), on the 16-value vector path and the scalar path; slots < 0 skipped."""
    gen = torch.Generator().manual_seed(block_size * 3 + in_dtype.itemsize)
    T, num_blocks = 300, 400 // block_size + 2
    rows = torch.randn(T, D + 1, generator=gen) * torch.logspace(-6, 1, T)[:, None]  # subnormal codes too
    rows[0, :8] = torch.tensor([1e30, -1e30, float("inf"), float("-inf"), 0.0, -0.0, 1e-40, -1e-40])
    rows = rows.to(in_dtype)
    if layout == "contiguous":
        kv_c, k_pe = rows[:, :DC].contiguous(), rows[:, DC:D].contiguous()
    else:  # rows start one element off: the scalar kernel
        kv_c, k_pe = rows[:, 1:DC + 1], rows[:, DC + 1:D + 1]
    scale = mla_ext.fp8_scale_for(rows[1:].float(), margin=0.25)  # forces saturation
    cache = torch.full((num_blocks, block_size, D), float("nan")).to(torch.float8_e4m3fn)
    slots = torch.randperm(num_blocks * block_size, generator=gen)[:T]
    slots[3::5] = -1
    expect = reference.append_kv(kv_c, k_pe, cache, slots, scale=scale)
    got = cache.cuda()
    mla_ext.append_kv(kv_c.cuda(), k_pe.cuda(), got, slots.cuda(), scale=scale.cuda())
    assert torch.equal(got.cpu().view(torch.uint8), expect.view(torch.uint8))
    cpu = cache.clone()
    mla_ext.append_kv(kv_c, k_pe, cpu, slots, scale=scale)
    assert torch.equal(cpu.view(torch.uint8), expect.view(torch.uint8))
    written = got.view(-1, D)[slots[slots >= 0].cuda()].float()
    assert torch.isfinite(written).all() and (written.abs() == 448).any()


def test_fp8_append_nan_matches_cpu():
    """NaN input stores 0x7f with the sign (the CPU kernel's rule), on both paths."""
    kv = torch.randn(2, D)
    kv[0, 3], kv[1, 600 - DC] = float("nan"), -float("nan")
    kv[1, 7] = -float("nan")
    scale = torch.tensor([0.01])
    for layout in ("contiguous", "unaligned"):
        big = torch.zeros(2, D + 1)
        big[:, 1:] = kv
        src = kv if layout == "contiguous" else big[:, 1:]
        cpu = torch.zeros(4, 1, D, dtype=torch.float8_e4m3fn)
        mla_ext.append_kv(src[:, :DC], src[:, DC:], cpu, torch.tensor([0, 2]), scale=scale)
        got = torch.zeros(4, 1, D, dtype=torch.float8_e4m3fn, device="cuda")
        mla_ext.append_kv(src[:, :DC].cuda(), src[:, DC:].cuda(), got, torch.tensor([0, 2], device="cuda"),
                          scale=scale.cuda())
        assert torch.equal(got.cpu().view(torch.uint8), cpu.view(torch.uint8))


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("block_size", [1, 16, 64, 7])
@pytest.mark.parametrize("s_q", [1, 2, 4])
def test_fp8_decode_matches(impl, q_dtype, block_size, s_q):
    set_impl(impl)
    gen = torch.Generator().manual_seed(block_size * 10 + s_q + 1000)
    lens = [0, 1, s_q, 37, 300, 129]
    h = 16
    cache16, cache8, table, seqlens, scale = fp8_paged(lens, block_size, gen=gen)
    q_nope, q_pe = make_query(len(lens), s_q, h, q_dtype, gen)
    # tight: float64 reference on the dequantized fp8 cache
    ref_out, ref_lse = reference.decode(q_nope, q_pe, cache8.cpu(), table, seqlens, SCALE, True,
                                        compute_dtype=torch.float64, scale=scale.cpu())
    dev = [t.cuda() for t in (q_nope, q_pe, table, seqlens)]
    out, lse = mla_ext.decode(dev[0], dev[1], cache8, dev[2], dev[3], softmax_scale=SCALE, return_lse=True,
                              scale=scale)
    assert out.dtype == q_dtype and lse.dtype == torch.float32
    check_close(out, lse, ref_out, ref_lse, q_dtype, f"fp8 {impl} {q_dtype} bs={block_size} s_q={s_q}",
                tol=FP8_TOL[q_dtype])
    # loose: against the 16-bit cache of the original values (same kernel family, same q)
    out16, _ = mla_ext.decode(dev[0], dev[1], cache16.to(q_dtype).cuda(), dev[2], dev[3], softmax_scale=SCALE,
                              return_lse=True)
    ref16, _ = reference.decode(q_nope, q_pe, cache16.to(q_dtype), table, seqlens, SCALE, True,
                                compute_dtype=torch.float64)
    quant_gap = rel_err(ref_out, ref16)  # what fp8 quantization alone does: ~0.03 on this data (CPU-measured)
    assert 0 < quant_gap < 0.1, f"quantization gap {quant_gap:.3g} out of the expected range"
    gap = rel_err(out, out16)
    assert gap < quant_gap + 2 * FP8_TOL[q_dtype][0] + TOL[q_dtype][0], \
        f"fp8 vs 16-bit cache gap {gap:.3g} exceeds the quantization gap {quant_gap:.3g} + kernel budgets"


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("h,s_q", [(1, 1), (20, 3), (128, 2), (64, 4)])
def test_fp8_decode_row_blocks_and_packed(impl, q_dtype, h, s_q):
    """Row blocks / padding rows / the packed query and the 4-D cache view with fp8."""
    set_impl(impl)
    gen = torch.Generator().manual_seed(h * 7 + s_q + 1)
    cache16, cache8, table, seqlens, scale = fp8_paged([200, 1, 70], 16, gen=gen)
    q, _ = make_query(3, s_q, h, q_dtype, gen, packed=True)
    ref_out, ref_lse = reference.decode(q, None, cache8.cpu(), table, seqlens, SCALE, True,
                                        compute_dtype=torch.float64, scale=scale.cpu())
    out, lse = mla_ext.decode(q.cuda(), None, cache8.unsqueeze(2), table.cuda(), seqlens.cuda(), softmax_scale=SCALE,
                              return_lse=True, scale=scale)
    check_close(out, lse, ref_out, ref_lse, q_dtype, f"fp8 packed {impl} h={h} s_q={s_q}", tol=FP8_TOL[q_dtype])


@pytest.mark.parametrize("q_dtype", [torch.bfloat16, torch.float16])
def test_fp8_decode_every_code_exact(q_dtype):
    """One key (p = 1, kv_scale = 1): out = the stored values themselves, so every e4m3
    code (subnormals, -0, the largest, both signs) must come back bit-exact through the
    kernel's conversion (tensor cores and the CUDA-core kernel)."""
    codes = torch.cat([torch.arange(0, 127), torch.arange(128, 255)]).to(torch.uint8)  # all but the NaNs
    row = torch.zeros(D, dtype=torch.uint8)
    row[:codes.numel()] = codes
    row[codes.numel():DC] = codes[:DC - codes.numel()].flip(0)
    cache = row.view(1, 1, D).repeat(2, 16, 1).view(torch.float8_e4m3fn).cuda()
    q = torch.zeros(1, 1, 16, D, dtype=q_dtype, device="cuda")
    table = torch.zeros(1, 1, dtype=torch.int32, device="cuda")
    lens = torch.ones(1, dtype=torch.int32, device="cuda")
    want = row[:DC].view(torch.float8_e4m3fn).to(q_dtype)
    for impl in IMPLS:
        set_impl(impl)
        out = mla_ext.decode(q, None, cache, table, lens, softmax_scale=SCALE, scale=torch.ones(1, device="cuda"))
        got = out[0, 0].cpu().float()  # (-0 may come back as +0: the accumulators start at +0)
        assert torch.equal(got, want.float().expand_as(got)), impl


def test_fp8_decode_nan_code_propagates():
    """A NaN code in a row a query sees makes that query's output NaN, as in the reference;
    other sequences are untouched."""
    gen = torch.Generator().manual_seed(21)
    cache16, cache8, table, seqlens, scale = fp8_paged([40, 40], 16, gen=gen)
    blk = int(table[0, 1])
    cache8.view(torch.uint8)[blk, 3, 100] = 0xff
    q_nope, q_pe = make_query(2, 1, 16, torch.bfloat16, gen)
    for impl in IMPLS:
        set_impl(impl)
        out = mla_ext.decode(q_nope.cuda(), q_pe.cuda(), cache8, table.cuda(), seqlens.cuda(), softmax_scale=SCALE,
                             scale=scale)
        assert torch.isnan(out[0]).all(), impl
        assert torch.isfinite(out[1]).all(), impl


def test_fp8_decode_fp32_query_uses_cuda_core_kernel():
    gen = torch.Generator().manual_seed(22)
    cache16, cache8, table, seqlens, scale = fp8_paged([64, 9], 16, gen=gen)
    q_nope, q_pe = make_query(2, 1, 16, torch.float32, gen)
    ref_out, ref_lse = reference.decode(q_nope, q_pe, cache8.cpu(), table, seqlens, SCALE, True,
                                        compute_dtype=torch.float64, scale=scale.cpu())
    out, lse = mla_ext.decode(q_nope.cuda(), q_pe.cuda(), cache8, table.cuda(), seqlens.cuda(), softmax_scale=SCALE,
                              return_lse=True, scale=scale)
    check_close(out, lse, ref_out, ref_lse, torch.float32, "fp8 cache, fp32 q")


def test_fp8_split_kv_long_context():
    gen = torch.Generator().manual_seed(23)
    cache16, cache8, table, seqlens, scale = fp8_paged([5000, 3], 64, gen=gen, extra_cols=40)
    q_nope, q_pe = make_query(2, 1, 16, torch.bfloat16, gen)
    ref_out, ref_lse = reference.decode(q_nope, q_pe, cache8.cpu(), table, seqlens, SCALE, True,
                                        compute_dtype=torch.float64, scale=scale.cpu())
    out, lse = mla_ext.decode(q_nope.cuda(), q_pe.cuda(), cache8, table.cuda(), seqlens.cuda(), softmax_scale=SCALE,
                              return_lse=True, scale=scale)
    check_close(out, lse, ref_out, ref_lse, torch.bfloat16, "fp8 long ctx", tol=FP8_TOL[torch.bfloat16])


def test_fp8_cuda_graph_scale_on_device():
    """append + decode captured once; replays read the CURRENT scale tensor value, new
    seqlens / tables, without host syncs (the scale value check is skipped under capture)."""
    gen = torch.Generator().manual_seed(24)
    b, s_q, h, bs = 3, 2, 16, 16
    lens = [100, 0, 33]
    cache16, cache8, table, seqlens, scale = fp8_paged(lens, bs, gen=gen, extra_blocks=20, extra_cols=10)
    q_nope, q_pe = make_query(b, s_q, h, torch.bfloat16, gen)
    st = dict(q_nope=q_nope.cuda(), q_pe=q_pe.cuda(), table=table.cuda(), lens=seqlens.cuda(), scale=scale.clone())
    new_rows = torch.randn(4, D, generator=gen).cuda()
    slots = torch.tensor([0, 1, -1, 2], device="cuda")
    out = torch.empty(b, s_q, h, DC, dtype=torch.bfloat16, device="cuda")

    def step():
        mla_ext.append_kv(new_rows[:, :DC], new_rows[:, DC:], cache8, slots, scale=st["scale"])
        res, lse = mla_ext.decode(st["q_nope"], st["q_pe"], cache8, st["table"], st["lens"], softmax_scale=SCALE,
                                  return_lse=True, scale=st["scale"])
        out.copy_(res)
        return lse

    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        lse_static = step()
    # new lengths within each sequence's blocks (the table stays valid), a new scale value
    for factor, lens_new in ((1.0, [100, 0, 33]), (2.0, [5, 0, 1]), (0.5, [0, 0, 0]), (1.5, [64, 0, 33])):
        st["scale"].copy_(scale * factor)
        st["lens"].copy_(torch.tensor(lens_new, dtype=torch.int32))
        before = cache8.clone()
        graph.replay()
        torch.cuda.synchronize()
        want = reference.append_kv(new_rows[:, :DC].cpu(), new_rows[:, DC:].cpu(), before.cpu(), slots.cpu(),
                                   scale=st["scale"].cpu())
        assert torch.equal(cache8.cpu().view(torch.uint8), want.view(torch.uint8)), f"append replay x{factor}"
        ref_out, ref_lse = reference.decode(q_nope, q_pe, cache8.cpu(), table, torch.tensor(lens_new, dtype=torch.int32),
                                            SCALE, True, compute_dtype=torch.float64, scale=st["scale"].cpu())
        check_close(out, lse_static, ref_out, ref_lse, torch.bfloat16, f"fp8 graph replay x{factor}",
                    tol=FP8_TOL[torch.bfloat16])


def test_fp8_bad_scale_value_checked_eagerly():
    cache = torch.zeros(2, 4, D, device="cuda").to(torch.float8_e4m3fn)
    kv = torch.randn(1, D, device="cuda")
    for bad in (0.0, float("nan"), -1.0, float("inf")):
        with pytest.raises(ValueError, match="scale must be finite and > 0"):
            mla_ext.append_kv(kv[:, :DC], kv[:, DC:], cache, torch.tensor([0], device="cuda"),
                              scale=torch.tensor([bad], device="cuda"))
        with pytest.raises(ValueError, match="scale must be finite and > 0"):
            mla_ext.decode(torch.randn(1, 1, 2, D, device="cuda", dtype=torch.bfloat16), None, cache,
                           torch.zeros(1, 1, dtype=torch.int32, device="cuda"),
                           torch.ones(1, dtype=torch.int32, device="cuda"), softmax_scale=SCALE,
                           scale=torch.tensor([bad], device="cuda"))
    assert (cache.view(torch.uint8) == 0).all()


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


# ------------------------------------------------------------------------------ sparse decode


@pytest.mark.parametrize("impl", ["auto", "simple"])
@pytest.mark.parametrize("case", SPARSE_CASES, ids=lambda c: c.name)
def test_sparse_decode_shared_cases(case, impl, monkeypatch):
    """tests/sparse_cuda_cases.py's list, the one tests/test_cuda_emulated_sparse.py runs in the
    emulator; the CUDA op against the float64 reference and the CPU op."""
    monkeypatch.setenv("MLA_EXT_SPARSE_IMPL", impl)
    q, cache, idx, kw = case.inputs()
    ref_out, ref_lse = case.reference(q, cache, idx, kw)
    dev = torch.device("cuda")
    kw_dev = {k: to_device(v, dev) for k, v in kw.items()}
    out, lse = mla_ext.sparse_decode(q.to(dev), to_device(cache, dev), idx.to(dev), softmax_scale=SPARSE_SCALE,
                                     **kw_dev)
    assert out.device.type == "cuda" and out.dtype == q.dtype and lse.dtype == torch.float32
    ran_tc = case.expected_impl(impl) == "tc"
    check_sparse(out, lse, ref_out, ref_lse, case.q_dtype, f"{case.name} [{impl}]",
                 tol=case.tolerance("tc" if ran_tc else "simple"))


def test_sparse_decode_padded_cache_keeps_strides_on_gpu():
    """The shared cases reach the GPU with their padded block strides (656 * (bs + pad) bytes)."""
    case = SPARSE_CASES[1]
    _, cache, _, _ = case.inputs()
    moved = to_device(cache, "cuda")
    assert moved.stride() == cache.stride() and case.pad > 0
    assert torch.equal(moved.cpu().view(torch.uint8), cache.view(torch.uint8))


def test_sparse_decode_bad_inputs_on_cuda():
    g = torch.Generator().manual_seed(4)
    cache = make_cache(g, "fp8", 2, 4, 0).cuda()
    q = torch.randn(1, 1, 4, 576, device="cuda", dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"indices\[0, 0, 1\] = 8 is outside the cache"):
        mla_ext.sparse_decode(q, cache, torch.tensor([[[0, 8]]], dtype=torch.int32, device="cuda"), softmax_scale=0.1)
    bf16 = make_cache(g, "bf16", 2, 4, 0).cuda()
    with pytest.raises(TypeError, match="extra_cache must have cache's dtype"):
        mla_ext.sparse_decode(q, cache, torch.zeros(1, 1, 2, dtype=torch.int32, device="cuda"), softmax_scale=0.1,
                              extra_cache=bf16, extra_indices=torch.zeros(1, 1, 2, dtype=torch.int32, device="cuda"))


def test_sparse_decode_cuda_graph_replay_with_new_indices():
    """Planning reads shapes only: a captured sparse decode replays with new index values."""
    case = SPARSE_CASES[4]  # h128 split topk
    q, cache, idx, kw = case.inputs()
    dev = torch.device("cuda")
    q_d, cache_d, idx_d = q.to(dev), to_device(cache, dev), idx.to(dev)
    kw_d = {k: to_device(v, dev) for k, v in kw.items()}
    mla_ext.sparse_decode(q_d, cache_d, idx_d, softmax_scale=SPARSE_SCALE, **kw_d)  # warm-up
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, lse = mla_ext.sparse_decode(q_d, cache_d, idx_d, softmax_scale=SPARSE_SCALE, **kw_d)
    new_idx = idx.flip(-1).contiguous()
    idx_d.copy_(new_idx)
    graph.replay()
    torch.cuda.synchronize()
    ref_out, ref_lse = case.reference(q, cache, new_idx, kw)
    check_sparse(out, lse, ref_out, ref_lse, case.q_dtype, "graph replay", tol=case.tolerance(case.expected_impl()))
