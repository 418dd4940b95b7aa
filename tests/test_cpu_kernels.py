"""The CPU decode kernels against each other and against the fp64 reference.

decode.cpp picks one instruction-set kernel per call (MLA_EXT_CPU_ISA caps the choice):
  * amx-bf16 (bf16 and fp8 caches, CPUs with AMX): tile products, tested at the end of this
    file against the float64 reference;
  * avx512bf16 (bf16 caches: vdpbf16ps scores, fp32 FMA P.V; fp8 caches on CPUs with
    AVX512-VBMI: rows widened to bf16 by table, the fp32 query in up to three bf16 parts,
    P.V on the bf16 rows' even / odd halves); avx512-fp32 (fp16 / fp32 caches): the avx2
    kernel's fp32 tiles on 512-bit FMAs (all under isa=avx512bf16);
  * avx2_bf16 (bf16 and fp8 caches): 16-bit tiles read in place, query and accumulators
    de-interleaved per 16 columns, restored by `finish`;
  * avx2 (fp16 and fp32 caches): fp32 tiles;
  * scalar: the portable kernel.
Their register blocks leave remainders (score blocks of 2 rows, PV blocks of 6 rows), so the
row counts below cover every remainder, one full 64-row item and a split into row blocks.
Every case also splits long sequences into KV chunks (two threads, several items), so the
merge and the prefetch of each next tile run across block-table jumps.

Three native checks run here too: the torch-free timing harness of the AVX2 kernels
(benchmarks/native/cpu_item_bench.cpp, which compares their partial results), every e4m3
code through the fp8 -> bf16 tile widening (tests/native/fp8_widen_check.cpp), and the
AVX-512 kernels' logic under emulated intrinsics (benchmarks/avx512_emulation).
"""
import os
import shutil
import subprocess
import sys

import pytest
import torch

import mla_ext
from mla_ext import reference

from conftest import DEEPSEEK_SCALE, make_paged_kv, make_query

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# (s_q, h): query rows per sequence = s_q * h, at block size 16; then other block sizes
# (the row cursor crosses a block boundary inside a tile) for a few row counts.
ROW_SHAPES = [(1, 1), (1, 2), (1, 3), (1, 5), (1, 7), (1, 11), (2, 3), (1, 13), (1, 16), (4, 16), (1, 128)]
CASES = [(s_q, h, 16) for s_q, h in ROW_SHAPES] + [
    (s_q, h, bs) for bs in (1, 7, 48) for s_q, h in [(1, 3), (2, 7), (1, 16)]
]
CACHE_DTYPES = [torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn]

# out is fp32 here, so both kernels are compared far below bf16 resolution: they differ
# only in the summation order of fp32 dot products over 576 terms and of 300+ keys.
CROSS_TOL = dict(rtol=2e-5, atol=2e-6)
# fp32 output against the float64 reference on the same (exactly representable) inputs:
# fp32 accumulation over 576-term dot products and ~1000 keys.
REF_TOL_FP32 = dict(rtol=1e-4, atol=1e-5)


def _decode(isa, monkeypatch, *args, **kwargs):
    monkeypatch.setenv("MLA_EXT_CPU_ISA", isa)
    return mla_ext.decode(*args, **kwargs)


def _kernel_for(isa: str, cache_dtype: torch.dtype) -> str:
    """The kernel decode.cpp picks for this dtype under MLA_EXT_CPU_ISA=isa."""
    old = os.environ.get("MLA_EXT_CPU_ISA")
    os.environ["MLA_EXT_CPU_ISA"] = isa
    try:
        return mla_ext.cpu_decode_kernel(cache_dtype)
    finally:
        if old is None:
            del os.environ["MLA_EXT_CPU_ISA"]
        else:
            os.environ["MLA_EXT_CPU_ISA"] = old


@pytest.mark.parametrize("s_q, h, block_size", CASES)
@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES)
@pytest.mark.parametrize("isa", ["avx2", "avx512bf16", "auto"])
def test_vector_kernel_matches_scalar_kernel(isa, s_q, h, block_size, cache_dtype, gen, monkeypatch):
    monkeypatch.setenv("MLA_EXT_CPU_ISA", isa)
    kernel = mla_ext.cpu_decode_kernel(cache_dtype)
    if kernel == "scalar":
        pytest.skip("this CPU has no vector kernel for this dtype")
    if kernel.startswith("amx-"):
        pytest.skip("the AMX kernel (P in two bf16 parts, not bit-comparable at CROSS_TOL): "
                    "test_amx_kernel_against_reference covers it")
    lower = {"avx2": None, "avx512bf16": "avx2", "auto": "avx512bf16"}[isa]
    if lower is not None and _kernel_for(lower, cache_dtype) == kernel:
        pytest.skip(f"{isa} picks {kernel} here, already covered by isa={lower}")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # several items per sequence, whatever the machine
    try:
        seqlens = [0, 1, 17, 300, 1000 if h < 128 else 400]
        kv = make_paged_kv(seqlens, block_size, gen, torch.float32, "cpu", spare_blocks=2)
        scale = None
        cache = kv.cache
        q_dtype = torch.float32
        if cache_dtype == torch.float8_e4m3fn:
            scale = mla_ext.fp8_scale_for(torch.nan_to_num(cache, nan=0.0))
            cache = reference.quantize_fp8(cache, scale)
        else:
            cache = cache.to(cache_dtype)
            q_dtype = cache_dtype
        q_nope, q_pe = make_query(len(seqlens), s_q, h, gen, q_dtype, "cpu")
        # fp32 queries and outputs where the kernel allows it; bf16 / fp16 caches need q of
        # their dtype, so compare in that dtype with the reference as the arbiter instead.
        args = (q_nope, q_pe, cache, kv.block_table, kv.cache_seqlens)
        kw = dict(softmax_scale=DEEPSEEK_SCALE, causal=True, return_lse=True, scale=scale)
        out_vec, lse_vec = _decode(isa, monkeypatch, *args, **kw)
        out_ref_kernel, lse_ref_kernel = _decode("scalar", monkeypatch, *args, **kw)
        ref_out, ref_lse = reference.decode(*args, DEEPSEEK_SCALE, causal=True, compute_dtype=torch.float64,
                                            scale=scale)
        assert torch.isfinite(out_vec).all(), "NaN poison leaked into the output"
        torch.testing.assert_close(lse_vec, lse_ref_kernel, **CROSS_TOL)
        torch.testing.assert_close(lse_vec.double(), ref_lse.double(), **REF_TOL_FP32)
        if q_dtype == torch.float32:
            torch.testing.assert_close(out_vec, out_ref_kernel, **CROSS_TOL)
            torch.testing.assert_close(out_vec.double(), ref_out.double(), **REF_TOL_FP32)
        else:
            # Both round an fp32 result to q's dtype; where the fp32 values straddle a
            # rounding boundary they may differ by one unit in the last place (relative
            # size up to 2^-7 in bf16, 2^-10 in fp16).
            ulp = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}[q_dtype]
            torch.testing.assert_close(out_vec.float(), out_ref_kernel.float(), rtol=ulp, atol=ulp * 1e-2)
            torch.testing.assert_close(out_vec.double(), ref_out.double(), rtol=2 * ulp, atol=2 * ulp * 1e-1)
    finally:
        torch.set_num_threads(threads)


NEEDS_GXX = pytest.mark.skipif(
    not sys.platform.startswith("linux") or shutil.which(os.environ.get("CXX", "g++")) is None, reason="needs g++ on Linux"
)


def _cpu_has_avx2() -> bool:
    """The library's own answer (cpuid + OS state): is the AVX2 kernel available here?"""
    old = os.environ.get("MLA_EXT_CPU_ISA")
    os.environ["MLA_EXT_CPU_ISA"] = "avx2"
    try:
        return mla_ext.cpu_decode_kernel(torch.float16) == "avx2"
    finally:
        if old is None:
            del os.environ["MLA_EXT_CPU_ISA"]
        else:
            os.environ["MLA_EXT_CPU_ISA"] = old


def _build_native(src: str, exe: str) -> None:
    """Compile a torch-free C++ check against csrc/cpu for AVX2 (+ -fwrapv, like torch builds)."""
    cxx = os.environ.get("CXX", "g++")
    subprocess.run([cxx, "-O2", "-std=c++17", "-fwrapv", "-mavx2", "-mfma", "-mf16c", "-pthread",
                    "-I" + os.path.join(ROOT, "csrc", "cpu"), "-I" + os.path.join(ROOT, "csrc"),
                    os.path.join(ROOT, src), "-o", exe], check=True, capture_output=True, timeout=300)


@NEEDS_GXX
@pytest.mark.skipif(not _cpu_has_avx2(), reason="needs an AVX2 + FMA + F16C CPU")
@pytest.mark.parametrize("args", [["5", "300", "2", "--l2"], ["16", "100", "1"], ["64", "40", "1"]])
def test_item_bench_kernels_agree(args, tmp_path):
    """benchmarks/native/cpu_item_bench.cpp (the torch-free timing harness of the two AVX2
    kernels) builds, runs, and finds the two kernels' partial results equal."""
    exe = str(tmp_path / "cpu_item_bench")
    _build_native(os.path.join("benchmarks", "native", "cpu_item_bench.cpp"), exe)
    res = subprocess.run([exe, *args], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "max difference between the kernels" in res.stdout


@NEEDS_GXX
@pytest.mark.skipif(not _cpu_has_avx2(), reason="needs an AVX2 + FMA + F16C CPU")
def test_fp8_tile_widening_every_code(tmp_path):
    """All 256 e4m3fn codes through the avx2-bf16 kernel's fp8 -> bf16 widening, bit for bit
    against the library's e4m3 decoding table (tests/native/fp8_widen_check.cpp)."""
    exe = str(tmp_path / "fp8_widen_check")
    _build_native(os.path.join("tests", "native", "fp8_widen_check.cpp"), exe)
    res = subprocess.run([exe], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and "PASS" in res.stdout, res.stdout


@NEEDS_GXX
def test_avx512_kernel_logic_under_emulation():
    """The AVX-512 kernels (avx512bf16 for bf16 and fp8 caches, avx512-fp32) cannot run on an
    AVX2-only CPU: their logic is checked by recompiling decode_avx512.cpp with the AVX-512
    intrinsics emulated in C and comparing it, item by item, with the AVX2 kernels for every
    cache dtype, plus every fp8 code widened bit for bit (benchmarks/avx512_emulation/run.sh)."""
    import platform

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("x86-64 only")
    script = os.path.join(ROOT, "benchmarks", "avx512_emulation", "run.sh")
    res = subprocess.run(["sh", script], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    # Each dtype's line ran (a case list emptied by mistake would print "0/0").
    for case in ("bf16", "fp16", "fp32", "fp8, bf16-exact query", "fp8, fp32 query"):
        line = next((ln for ln in res.stdout.splitlines() if ln.startswith(case + ":") or ln.startswith(case + " (")), "")
        agree, total = (int(x) for x in line.split(": ", 1)[1].split(" ", 1)[0].split("/"))
        assert agree == total >= 300, line
    assert "fp8 widening: ok" in res.stdout


@pytest.mark.parametrize("cache_dtype", CACHE_DTYPES)
@pytest.mark.parametrize("isa", ["scalar", "avx2", "avx512bf16", "auto"])
def test_nan_in_a_causally_masked_key_stays_masked(isa, cache_dtype, monkeypatch):
    """s_q = 2, causal: the last key of sequence 0 holds an inf / NaN in its V columns, so only
    query 1 sees it. Query 0 must equal the float64 reference (a masked key is skipped, never
    multiplied by P = 0: 0 * NaN is NaN); query 1 is non-finite, as in the reference. The
    emulated CUDA kernels have the same test (tests/test_cuda_emulated.py)."""
    monkeypatch.setenv("MLA_EXT_CPU_ISA", isa)
    gen = torch.Generator().manual_seed(11)
    bs, lens, h = 16, [40, 70], 4
    cache = torch.randn(10, bs, 576, generator=gen)
    table = torch.tensor([[2, 5, 0, 7, 9], [1, 3, 4, 6, 8]], dtype=torch.int32)
    seqlens = torch.tensor(lens, dtype=torch.int32)
    last = lens[0] - 1
    bad = float("inf") if cache_dtype == torch.float32 else float("nan")
    cache[int(table[0, last // bs]), last % bs, 5] = bad
    scale = None
    if cache_dtype == torch.float8_e4m3fn:
        scale = torch.tensor([0.02])
        cache = reference.quantize_fp8(cache, scale)
        cache.view(torch.uint8)[int(table[0, last // bs]), last % bs, 5] = 0x7F  # the NaN code
    else:
        cache = cache.to(cache_dtype)
    q_dtype = torch.float32 if cache_dtype in (torch.float32, torch.float8_e4m3fn) else cache_dtype
    q = torch.randn(2, 2, h, 576, generator=gen).to(q_dtype)
    out, lse = mla_ext.decode(q[..., :512], q[..., 512:], cache, table, seqlens, softmax_scale=0.07, causal=True,
                              return_lse=True, scale=scale)
    ref_out, ref_lse = reference.decode(q[..., :512], q[..., 512:], cache, table, seqlens, 0.07, True,
                                        compute_dtype=torch.float64, scale=scale)
    assert not torch.isfinite(ref_out[0, 1]).all() and not torch.isfinite(out[0, 1]).all()
    tol = dict(rtol=2e-2, atol=2e-2) if q_dtype != torch.float32 else dict(rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(out[0, 0].double(), ref_out[0, 0].double(), **tol)
    torch.testing.assert_close(out[1].double(), ref_out[1].double(), **tol)
    torch.testing.assert_close(lse[:, 0].double(), ref_lse[:, 0].double(), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- the AMX kernel
#
# decode_amx.cpp computes both products on AMX tiles (TDPBF16PS: bf16 inputs, fp32
# accumulation). A bf16 query is used as is; an fp32 query (fp8 caches) is split into three
# bf16 parts (24 significant bits); P is carried as two bf16 parts (|P - hi - mid| <= 2^-16 P).
# So it is held to the same float64-oracle tolerance as the fp32-arithmetic kernels.


def _cpu_flags() -> set:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


CPU_HAS_AMX = {"amx_tile", "amx_bf16", "avx512_bf16"} <= _cpu_flags()
NEEDS_AMX = pytest.mark.skipif(not CPU_HAS_AMX, reason="needs a CPU with AMX-BF16 (amx_tile, amx_bf16 and "
                                                       "avx512_bf16 in /proc/cpuinfo)")
AMX_DTYPES = [torch.bfloat16, torch.float16, torch.float8_e4m3fn]
# fp16 caches run the same kernel with K, V and q split exactly into two bf16 parts each.
_AMX_NAME = {torch.bfloat16: "amx-bf16", torch.float16: "amx-bf16x2", torch.float8_e4m3fn: "amx-bf16"}


def _amx_tol(q_dtype: torch.dtype) -> dict:
    """Output tolerance of the AMX kernel against the float64 reference: fp32 accumulation
    (~1e-5 on O(1) outputs, see conftest's FP32_ATOL) plus the split P's relative weight error
    (<= 2^-16 per weight; the ~1000 weights' rounding errors have random signs, so the output
    moves by ~1e-6: measured <= 6e-6 with fp32 outputs at h = 16 / 128, block sizes 16 / 64,
    L <= 1000): atol 4e-5. With a bf16 query the output and the reference's (computed in
    float64, returned in q's dtype) are both rounded to bf16: where the exact value sits near
    a rounding boundary they differ by one ulp, 2^-7 |x| (conftest's OUT_TOL_VS_FP32_REF;
    every kernel needs it); 2^-10 |x| with an fp16 query."""
    ulp = {torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}.get(q_dtype, 0.0)
    return dict(rtol=ulp + 2e-5, atol=4e-5)


# Query rows s_q * h: 1, 16, 128 (two row blocks), 32 and 64 (causal s_q > 1), 15 (padded to
# a 16-row tile); block sizes 1 and 7 (key tiles copied from scattered rows), 16 and 64
# (key tiles loaded in place from the cache).
AMX_CASES = [(s_q, h, bs) for s_q, h in [(1, 1), (1, 16), (1, 128), (2, 16), (3, 5), (4, 16)] for bs in (1, 7, 16, 64)]


@NEEDS_AMX
@pytest.mark.parametrize("s_q, h, block_size", AMX_CASES)
@pytest.mark.parametrize("cache_dtype", AMX_DTYPES)
def test_amx_kernel_against_reference(s_q, h, block_size, cache_dtype, gen, monkeypatch):
    """The AMX kernel (really the one that runs: asserted) against the float64 reference, on
    a NaN-poisoned paged cache, lengths 0 / 1 / 17 / 300 / 1000 (partial key blocks, several
    items per sequence on two threads), causal."""
    monkeypatch.setenv("MLA_EXT_CPU_ISA", "amx")
    assert mla_ext.cpu_decode_kernel(cache_dtype) == _AMX_NAME[cache_dtype], "the CPU has AMX but the AMX kernel is not picked"
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seqlens = [0, 1, 17, 300, 1000 if s_q * h < 128 else 400]
        kv = make_paged_kv(seqlens, block_size, gen, torch.float32, "cpu", spare_blocks=2)
        scale = None
        if cache_dtype == torch.float8_e4m3fn:
            scale = mla_ext.fp8_scale_for(torch.nan_to_num(kv.cache, nan=0.0))
            cache = reference.quantize_fp8(kv.cache, scale)
            q_dtype = torch.float32
        else:
            cache = kv.cache.to(cache_dtype)
            q_dtype = cache_dtype
        q_nope, q_pe = make_query(len(seqlens), s_q, h, gen, q_dtype, "cpu")
        if cache_dtype == torch.float8_e4m3fn and block_size in (1, 16):
            # An fp32 query whose values are all bf16 numbers takes the one-part score
            # product (mid / lo would be zero); the other block sizes run the three-part one.
            q_nope, q_pe = q_nope.bfloat16().float(), q_pe.bfloat16().float()
        args = (q_nope, q_pe, cache, kv.block_table, kv.cache_seqlens)
        out, lse = mla_ext.decode(*args, softmax_scale=DEEPSEEK_SCALE, causal=True, return_lse=True, scale=scale)
        ref_out, ref_lse = reference.decode(*args, DEEPSEEK_SCALE, causal=True, compute_dtype=torch.float64,
                                            scale=scale)
        assert torch.isfinite(out).all(), "NaN poison leaked into the output"
        torch.testing.assert_close(out.double(), ref_out.double(), **_amx_tol(q_dtype))
        # Scores: exact bf16 products with fp32 accumulation, as close as the fp32 kernels'
        # (conftest's LSE tolerance); -inf for L = 0.
        torch.testing.assert_close(lse.double(), ref_lse.double(), rtol=1e-5, atol=2e-5)
    finally:
        torch.set_num_threads(threads)


@NEEDS_AMX
def test_amx_kernel_beats_pure_bf16_scores_for_fp32_queries(gen, monkeypatch):
    """An fp32 query (fp8 cache) keeps its 24 bits through the three-part split: the AMX
    kernel's lse must be much closer to the float64 one than a bf16-rounded query allows."""
    monkeypatch.setenv("MLA_EXT_CPU_ISA", "amx")
    kv = make_paged_kv([500], 16, gen, torch.float32, "cpu")
    scale = mla_ext.fp8_scale_for(torch.nan_to_num(kv.cache, nan=0.0))
    cache = reference.quantize_fp8(kv.cache, scale)
    q_nope, q_pe = make_query(1, 1, 16, gen, torch.float32, "cpu")
    args = (cache, kv.block_table, kv.cache_seqlens)
    _, lse = mla_ext.decode(q_nope, q_pe, *args, softmax_scale=DEEPSEEK_SCALE, return_lse=True, scale=scale)
    _, ref = reference.decode(q_nope, q_pe, *args, DEEPSEEK_SCALE, compute_dtype=torch.float64, scale=scale)
    _, rounded = reference.decode(q_nope.bfloat16().float(), q_pe.bfloat16().float(), *args, DEEPSEEK_SCALE,
                                  compute_dtype=torch.float64, scale=scale)
    err = (lse.double() - ref).abs().max().item()
    err_bf16_q = (rounded - ref).abs().max().item()
    assert err < err_bf16_q / 10, (err, err_bf16_q)


@NEEDS_AMX
def test_amx_fp16_split_is_exact_on_every_finite_value(monkeypatch):
    """fp16 caches run on bf16 tiles with every value split into hi + lo: the split must be
    exact. Each of 127 sequences sees one key (P = 1 exactly) under a zero query, so its output
    is that key's V row, bit for bit; together the rows hold every finite fp16 bit pattern
    (normals, subnormals, +-0). A lost lo part would be off by up to 2^-9 relative."""
    monkeypatch.setenv("MLA_EXT_CPU_ISA", "amx")
    assert mla_ext.cpu_decode_kernel(torch.float16) == "amx-bf16x2"
    bits = torch.arange(65536, dtype=torch.int32).to(torch.int16)
    finite = bits[(bits.int() & 0x7C00) != 0x7C00]  # 63488 patterns
    n_seq = (finite.numel() + 511) // 512
    v = torch.zeros(n_seq * 512, dtype=torch.int16)
    v[: finite.numel()] = finite
    cache = torch.zeros(n_seq, 16, 576, dtype=torch.float16)
    cache[:, 0, :512] = v.view(n_seq, 512).view(torch.float16)
    cache[:, 1:] = float("nan")  # past each sequence's one key
    table = torch.arange(n_seq, dtype=torch.int32).view(n_seq, 1)
    q = torch.zeros(n_seq, 1, 16, 576, dtype=torch.float16)
    out = mla_ext.decode(q[..., :512], q[..., 512:], cache, table, torch.ones(n_seq, dtype=torch.int32),
                         softmax_scale=0.1)
    expected = cache[:, 0, :512].unsqueeze(1).expand(n_seq, 16, 512)
    # Value equality (-0 sums to +0 like in any kernel; every other pattern is its own value).
    assert torch.equal(out[:, 0], expected)


@pytest.mark.parametrize("isa, kernel", [("amx", "amx-bf16"), ("avx512bf16", "avx512bf16")])
def test_avx512_fp8_widening_every_code(isa, kernel, monkeypatch):
    """All 254 finite e4m3fn codes through the AMX and AVX-512 BF16 kernels' fp8 -> bf16
    widening (vpermi2b tables), bit for bit: one key (P = 1 exactly), a zero query, a
    power-of-two scale, so out = V * scale exactly; the NaN code (0x7f) gives NaN. Where the
    CPU lacks the kernel, benchmarks/avx512_emulation checks the AVX-512 one's logic."""
    monkeypatch.setenv("MLA_EXT_CPU_ISA", isa)
    if mla_ext.cpu_decode_kernel(torch.float8_e4m3fn) != kernel:
        pytest.skip(f"this CPU has no {kernel} kernel for fp8 caches")
    codes = torch.tensor([c for c in range(256) if c & 0x7F != 0x7F], dtype=torch.uint8)
    row = torch.zeros(576, dtype=torch.uint8)
    row[:254] = codes
    row[256:510] = codes.flip(0)
    cache = row.view(1, 1, 576).repeat(1, 16, 1).view(torch.float8_e4m3fn)
    table = torch.zeros(1, 1, dtype=torch.int32)
    scale = torch.tensor([0.5])
    q = torch.zeros(1, 1, 1, 576)
    out = mla_ext.decode(q[..., :512], q[..., 512:], cache, table, torch.tensor([1], dtype=torch.int32),
                         softmax_scale=0.1, scale=scale)
    expected = cache[0, 0, :512].float() * 0.5
    assert torch.equal(out[0, 0, 0], expected)
    nan_row = row.clone()
    nan_row[5] = 0x7F
    cache_nan = nan_row.view(1, 1, 576).repeat(1, 16, 1).view(torch.float8_e4m3fn)
    out = mla_ext.decode(q[..., :512], q[..., 512:], cache_nan, table, torch.tensor([1], dtype=torch.int32),
                         softmax_scale=0.1, scale=scale)
    assert torch.isnan(out[0, 0, 0, 5])


def test_amx_kernel_is_picked_exactly_when_the_cpu_has_amx():
    """auto picks the AMX kernel for bf16, fp16 and fp8 caches on an AMX CPU (and never
    elsewhere); fp32 caches keep theirs; MLA_EXT_CPU_ISA=avx512bf16 turns AMX off."""
    for dt in AMX_DTYPES:
        assert (_kernel_for("auto", dt) == _AMX_NAME[dt]) == CPU_HAS_AMX
        assert not _kernel_for("avx512bf16", dt).startswith("amx")
    assert not _kernel_for("auto", torch.float32).startswith("amx")


def test_fp8_caches_take_the_avx512_kernel_exactly_when_the_cpu_has_vbmi():
    """Under MLA_EXT_CPU_ISA=avx512bf16 an fp8 cache runs avx512bf16 when the CPU has
    AVX512_BF16 and AVX512-VBMI (the widening's vpermi2b), else the AVX2 kernel."""
    flags = _cpu_flags()
    expected = ("avx512bf16" if {"avx512_bf16", "avx512vbmi"} <= flags
                else "avx2-bf16" if _cpu_has_avx2() else "scalar")
    assert _kernel_for("avx512bf16", torch.float8_e4m3fn) == expected
