"""Shared helpers for the mla_ext tests.

Every test gets its own random inputs, drawn from a generator seeded from the test's node
id, so a failure reproduces exactly with `pytest -k <name>` while different tests (and
different parameters of one test) still see different data.

Inputs are built to catch the usual paging bugs:
  * the cache is poisoned: every slot that no sequence uses holds NaN (an unusual NaN bit
    pattern, 0xFF.. bytes), including the tail of each sequence's last block and whole
    spare blocks, so a kernel that reads one row too many produces NaN;
  * block tables are random permutations of the block ids, so a kernel that ignores the
    table (or indexes it wrongly) reads the wrong rows;
  * entries past a sequence's last used block are garbage: a huge id (2147480000), -1, or
    the id of a valid but NaN-filled block;
  * batches are varlen and may contain empty sequences (L = 0, padded CUDA-graph slots).

The names below are imported by the test modules with `from conftest import ...`.
"""
from __future__ import annotations

import math
import os
import zlib
from dataclasses import dataclass
from typing import List, Optional, Sequence

import pytest
import torch

import mla_ext

LATENT = mla_ext.LATENT_DIM  # 512
ROPE = mla_ext.ROPE_DIM  # 64
HEAD = mla_ext.HEAD_DIM  # 576

GARBAGE_BLOCK = 2147480000  # an "uninitialised" block-table entry, far outside any cache

# DeepSeek's own softmax scale: 1/sqrt(qk_nope + qk_rope) = 1/sqrt(192).
DEEPSEEK_SCALE = 1.0 / math.sqrt(192.0)

DEVICES: List[str] = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
FLOAT_DTYPES = [torch.bfloat16, torch.float16, torch.float32]


@pytest.fixture
def one_thread():
    """Tiny shapes: one intra-op thread is fastest and immune to a busy machine's
    oversubscription; torch's setting is restored afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(params=DEVICES)
def device(request) -> str:
    """Every test taking `device` runs on the CPU and, on a machine with a GPU, on CUDA."""
    return request.param


def seed_for(name: str) -> int:
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


@pytest.fixture
def gen(request) -> torch.Generator:
    """A CPU generator seeded from the test's node id (parameters included)."""
    g = torch.Generator()
    g.manual_seed(seed_for(request.node.nodeid))
    return g


def randn(shape, gen: torch.Generator, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """Standard-normal values drawn on the CPU (reproducible on every device), then cast."""
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(dtype=dtype, device=device)


def randint(low: int, high: int, gen: torch.Generator) -> int:
    return int(torch.randint(low, high, (1,), generator=gen))


# --------------------------------------------------------------------------- bitwise views


def int_view(t: torch.Tensor) -> torch.Tensor:
    """The tensor's bytes reinterpreted as integers, so NaN compares bit for bit."""
    t = t.contiguous()
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor, msg: str = "") -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype, msg
    a, e = int_view(actual.cpu()), int_view(expected.cpu())
    if not torch.equal(a, e):
        diff = (a != e).nonzero()
        raise AssertionError(f"{msg}: {diff.shape[0]} elements differ bitwise, first at {diff[0].tolist()}")


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with all-ones bytes: a NaN (with a non-canonical payload) in every float dtype."""
    t.view(torch.uint8).fill_(0xFF)
    return t


# --------------------------------------------------------------------------- paged cache


@dataclass
class PagedKV:
    cache: torch.Tensor  # [NB, BS, 576], NaN where unused
    block_table: torch.Tensor  # [b, MB] int32, garbage past each sequence's end
    cache_seqlens: torch.Tensor  # [b] int32
    block_size: int
    dense: List[torch.Tensor]  # per sequence: its rows [L, 576] in order (cache dtype, CPU)

    @property
    def batch(self) -> int:
        return self.block_table.shape[0]

    @property
    def num_slots(self) -> int:
        return self.cache.shape[0] * self.cache.shape[1]

    def used_slots(self) -> torch.Tensor:
        """All slots (block * BS + offset) holding some sequence's rows."""
        slots = []
        for i, L in enumerate(self.cache_seqlens.tolist()):
            pos = torch.arange(L)
            blocks = self.block_table[i].cpu()[pos // self.block_size].long()
            slots.append(blocks * self.block_size + pos % self.block_size)
        return torch.cat(slots) if slots else torch.zeros(0, dtype=torch.long)


def make_paged_kv(
    seqlens: Sequence[int],
    block_size: int,
    gen: torch.Generator,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    spare_blocks: int = 3,
    extra_table_cols: int = 2,
    fill: bool = True,
) -> PagedKV:
    """A NaN-poisoned paged cache holding random rows for sequences of the given lengths.

    Blocks are handed out in a random permutation; `spare_blocks` blocks stay unused (NaN)
    and `extra_table_cols` garbage columns are appended to the block table. With
    fill=False the cache stays all-NaN (the caller appends the rows) but `dense` still
    holds the rows that belong at each position.
    """
    seqlens = [int(x) for x in seqlens]
    b = len(seqlens)
    blocks_needed = [(L + block_size - 1) // block_size for L in seqlens]
    num_blocks = sum(blocks_needed) + spare_blocks
    max_blocks = max(blocks_needed, default=0) + extra_table_cols
    perm = torch.randperm(num_blocks, generator=gen)

    table = torch.empty(b, max_blocks, dtype=torch.int32)
    # Garbage past the end: huge ids, -1, and valid ids of NaN-filled spare blocks.
    spare = perm[sum(blocks_needed):]
    choices = torch.tensor([GARBAGE_BLOCK, -1] + spare.tolist(), dtype=torch.int32)
    table.copy_(choices[torch.randint(0, len(choices), (b, max_blocks), generator=gen)])

    cache = poison_(torch.empty(num_blocks, block_size, HEAD, dtype=dtype))
    dense = []
    next_block = 0
    for i, L in enumerate(seqlens):
        n = blocks_needed[i]
        table[i, :n] = perm[next_block: next_block + n].to(torch.int32)
        next_block += n
        rows = randn((L, HEAD), gen, dtype)
        dense.append(rows)
        if fill and L:
            pos = torch.arange(L)
            cache[table[i, pos // block_size].long(), pos % block_size] = rows
    return PagedKV(
        cache=cache.to(device),
        block_table=table.to(device),
        cache_seqlens=torch.tensor(seqlens, dtype=torch.int32, device=device),
        block_size=block_size,
        dense=dense,
    )


def make_query(b: int, s_q: int, h: int, gen: torch.Generator, dtype=torch.float32, device="cpu"):
    """(q_nope [b,s_q,h,512], q_pe [b,s_q,h,64]) standard normal."""
    q = randn((b, s_q, h, HEAD), gen, dtype, device)
    return q[..., :LATENT].contiguous(), q[..., LATENT:].contiguous()


def varlen_seqlens(b: int, max_len: int, gen: torch.Generator, min_len: int = 0, zero: bool = True) -> List[int]:
    """b random lengths in [min_len, max_len]; one of them is 0 when zero=True and b > 1."""
    lens = torch.randint(min_len, max_len + 1, (b,), generator=gen).tolist()
    if zero and b > 1:
        lens[randint(0, b, gen)] = 0
    return lens


# --------------------------------------------------------------------------- references


def dense_decode(
    q_nope: torch.Tensor,
    q_pe: Optional[torch.Tensor],
    dense: Sequence[torch.Tensor],
    softmax_scale: float,
    causal: bool,
):
    """Float64 attention computed straight from each sequence's dense rows (no paging):
    an oracle independent of block tables. Returns (out [b,s_q,h,512] f64, lse f64)."""
    q = (q_nope if q_pe is None else torch.cat([q_nope, q_pe], -1)).cpu().double()
    b, s_q, h, _ = q.shape
    out = torch.zeros(b, s_q, h, LATENT, dtype=torch.float64)
    lse = torch.full((b, s_q, h), -math.inf, dtype=torch.float64)
    for i in range(b):
        kv = dense[i].cpu().double()
        L = kv.shape[0]
        for j in range(s_q):
            n = max(0, min(L, L - s_q + j + 1)) if causal else L
            if n == 0:
                continue
            s = softmax_scale * q[i, j] @ kv[:n].T  # [h, n]
            m = torch.logsumexp(s, -1)
            out[i, j] = torch.exp(s - m[:, None]) @ kv[:n, :LATENT]
            lse[i, j] = m
    return out, lse


# Tolerances for comparing the kernel with a reference computed from the SAME (already
# rounded) inputs. Both sides accumulate in fp32 (SPEC: softmax and accumulation in fp32),
# so they differ by fp32 summation order: a 576-long dot product of O(1) values carries an
# error of about sqrt(576) * 2^-24 * sum|q_d k_d| * scale ~ 1e-5 on scores of size ~2;
# that error passes through exp() into the weights (relative) and into outputs that are
# convex combinations of O(1) cache values, so ~1e-5 absolute (measured: <= 8e-6 at
# L = 1000, h = 128); 2e-5 leaves a 2x margin. A half-precision output is then rounded once more: two correctly
# rounded values of nearly the same number differ by at most one ulp, i.e. <= 2^-7 |x|
# for bf16 (8-bit significand) and <= 2^-10 |x| for fp16 (11-bit significand).
FP32_ATOL = 2e-5
FP32_RTOL = 2e-5
OUT_TOL_VS_FP32_REF = {  # (atol, rtol) kernel vs reference.decode (fp32, rounded to q's dtype)
    torch.float32: (FP32_ATOL, FP32_RTOL),
    torch.float16: (FP32_ATOL, 2.0**-10),
    torch.bfloat16: (FP32_ATOL, 2.0**-7),
}
# Against the float64 oracle (unrounded), the kernel's only extra error is its own fp32
# accumulation plus ONE rounding to the output dtype: half an ulp, 2^-8 |x| for bf16 and
# 2^-11 |x| for fp16.
OUT_TOL_VS_FP64 = {
    torch.float32: (FP32_ATOL, FP32_RTOL),
    torch.float16: (FP32_ATOL, 2.0**-11 + FP32_RTOL),
    torch.bfloat16: (FP32_ATOL, 2.0**-8 + FP32_RTOL),
}
# lse is fp32 whatever the dtype and never rounded to q's dtype: only the score error.
LSE_ATOL = 2e-5
LSE_RTOL = 1e-5


def expected_empty_rows(seqlens: Sequence[int], s_q: int, causal: bool) -> torch.Tensor:
    """[b, s_q] bool: True where query j of sequence i sees no key."""
    rows = []
    for L in seqlens:
        rows.append([(L == 0) or (causal and L - s_q + j + 1 <= 0) for j in range(s_q)])
    return torch.tensor(rows, dtype=torch.bool).reshape(len(seqlens), s_q)


def check_decode_result(out, lse, q_nope, q_pe, kv: PagedKV, softmax_scale: float, causal: bool):
    """Full check of one decode call: against reference.decode (fp32), against the float64
    dense oracle, exact zeros / -inf for rows that see nothing, finiteness elsewhere."""
    b, s_q, h = q_nope.shape[:3]
    dtype = q_nope.dtype
    assert out.shape == (b, s_q, h, LATENT) and out.dtype == dtype and out.device == q_nope.device
    assert lse.shape == (b, s_q, h) and lse.dtype == torch.float32 and lse.device == q_nope.device
    out, lse = out.cpu(), lse.cpu()

    empty = expected_empty_rows(kv.cache_seqlens.tolist(), s_q, causal)  # [b, s_q]
    # Rows that see no key: output exactly 0 (not NaN, not garbage) and lse = -inf.
    assert torch.equal(out[empty], torch.zeros_like(out[empty])), "rows that see no key must be exactly 0"
    assert bool((lse[empty] == -math.inf).all()), "rows that see no key must have lse = -inf"
    # Everything else is finite: NaN poison in unused slots never reaches the output.
    assert bool(torch.isfinite(out).all()), "non-finite output (NaN poison leaked?)"
    assert bool(torch.isfinite(lse[~empty]).all()), "non-finite lse on a row that sees keys"

    ref_out, ref_lse = mla_ext.reference.decode(
        q_nope.cpu(), None if q_pe is None else q_pe.cpu(), kv.cache.cpu(), kv.block_table.cpu(),
        kv.cache_seqlens.cpu(), softmax_scale, causal,
    )
    atol, rtol = OUT_TOL_VS_FP32_REF[dtype]
    torch.testing.assert_close(out, ref_out, atol=atol, rtol=rtol, msg=lambda m: "vs reference.decode: " + m)
    torch.testing.assert_close(lse, ref_lse, atol=LSE_ATOL, rtol=LSE_RTOL, msg=lambda m: "lse vs reference: " + m)

    # The same math in float64 on the same (upcast) values: the kernel's total error.
    o64, l64 = mla_ext.reference.decode(
        q_nope.cpu().double(), None if q_pe is None else q_pe.cpu().double(), kv.cache.cpu().double(),
        kv.block_table.cpu(), kv.cache_seqlens.cpu(), softmax_scale, causal, compute_dtype=torch.float64,
    )
    assert o64.dtype == torch.float64
    atol, rtol = OUT_TOL_VS_FP64[dtype]
    torch.testing.assert_close(out.double(), o64, atol=atol, rtol=rtol, msg=lambda m: "vs float64 oracle: " + m)
    torch.testing.assert_close(lse, l64.float(), atol=LSE_ATOL, rtol=LSE_RTOL, msg=lambda m: "lse vs fp64: " + m)


# --------------------------------------------------------------------------- emulated CUDA, CI sample
#
# MLA_EXT_EMU_FULL=1 runs every emulated case in five modes (plain forward, reverse and random
# thread orders, ASan+UBSan, TSan): ~25 minutes on 2 cores. MLA_EXT_EMU_FULL=sample (CI's
# `make test-emulated`) keeps the plain forward runs and a fixed quarter of the other modes'
# runs, chosen by a hash of the test id, so every run of the sample is the same set and each
# kernel family still meets every mode; `make test-emulated-full` runs them all (do it before
# a CUDA kernel change lands).
EMU_SAMPLE_SHARE = 4
_EXTRA_MODES = ("plain-reverse", "plain-random", "asan-random", "tsan-forward")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("MLA_EXT_EMU_FULL") != "sample":
        return
    keep, drop = [], []
    for item in items:
        extra = item.get_closest_marker("emulated") is not None and any(m in item.nodeid for m in _EXTRA_MODES)
        (drop if extra and zlib.crc32(item.nodeid.encode()) % EMU_SAMPLE_SHARE else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
