"""Inputs, tolerances and the list of decode / append cases shared by the GPU tests
(tests/test_cuda.py) and the emulated CUDA tests (tests/test_cuda_emulated.py), so both
check the kernels on the same shapes."""
import math
import zlib
from dataclasses import dataclass
from typing import Tuple

import torch

D, DC, DR = 576, 512, 64
SCALE = 1.0 / math.sqrt(192)
# Relative (norm-wise) output error allowed against the fp32 reference, and lse abs error.
TOL = {torch.bfloat16: (2e-2, 2e-2), torch.float16: (5e-3, 5e-3), torch.float32: (1e-4, 1e-4)}
IMPLS = ["auto", "simple"]  # MLA_EXT_DECODE_IMPL: tensor cores where possible / CUDA-core kernel


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


def check_close(out, lse, ref_out, ref_lse, dtype, what="", tol=None):
    out, lse = out.float().cpu(), lse.float().cpu()
    ref_out, ref_lse = ref_out.float().cpu(), ref_lse.float().cpu()
    assert torch.isfinite(out).all(), f"{what}: non-finite output"
    rtol, ltol = tol or TOL[dtype]
    err = (out - ref_out).norm() / ref_out.norm().clamp_min(1e-6)
    assert err < rtol, f"{what}: relative output error {err:.3g} >= {rtol}"
    # Row by row too: one wrong head or 8-column tile can hide in the whole tensor's norm.
    rows_out, rows_ref = out.reshape(-1, out.shape[-1]), ref_out.reshape(-1, ref_out.shape[-1])
    row_err = (rows_out - rows_ref).norm(dim=-1) / rows_ref.norm(dim=-1).clamp_min(1e-3)
    assert row_err.max() < 2 * rtol, f"{what}: row {int(row_err.argmax())} relative error {row_err.max():.3g}"
    empty = torch.isneginf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty), f"{what}: lse -inf pattern differs"
    assert (out[empty] == 0).all(), f"{what}: rows that see no key must be 0"
    if (~empty).any():
        lerr = (lse[~empty] - ref_lse[~empty]).abs().max()
        assert lerr < ltol, f"{what}: lse error {lerr:.3g}"




# ------------------------------------------------------------------------------ shared cases
#
# One list of decode and append cases, run by tests/test_cuda.py on a GPU and by
# tests/test_cuda_emulated.py through the CPU emulation of the same CUDA sources. Every case
# builds its own inputs from a generator seeded by its name: NaN in unused cache slots,
# garbage block-table tails, shuffled blocks (make_paged).

# fp8 cache tolerance against the float64 reference on the SAME fp8 values: the
# dequantisation is exact on the GPU (every e4m3 value is a bf16 / fp16 number, the scale is
# folded into fp32 factors), so only the 16-bit P and the final rounding remain.
FP8_TOL = {torch.bfloat16: (1e-2, 1e-2), torch.float16: (3e-3, 3e-3), torch.float32: TOL[torch.float32]}


def _seed(name):
    return zlib.crc32(name.encode()) & 0x7FFFFFFF


@dataclass(frozen=True)
class DecodeCase:
    name: str
    q_dtype: torch.dtype = torch.bfloat16
    fp8: bool = False              # float8_e4m3fn cache with a per-tensor scale
    lens: Tuple[int, ...] = (0, 1, 37, 300)
    block_size: int = 16
    s_q: int = 1
    h: int = 16
    causal: bool = True
    packed: bool = False           # q as one [b, s_q, h, 576] tensor (q_pe = None)
    cache_4d: bool = False         # FlashMLA's [NB, BS, 1, 576] view
    extra_cols: int = 1            # garbage block-table entries past each sequence
    impl: str = "auto"             # "auto": tensor cores where they can run; "simple": CUDA cores

    def inputs(self):
        """(q_nope, q_pe, cache, block_table, seqlens, scale) on the CPU; scale None unless fp8."""
        gen = torch.Generator().manual_seed(_seed(self.name))
        cache_dtype = torch.bfloat16 if self.fp8 else self.q_dtype
        cache, table, seqlens = make_paged(list(self.lens), self.block_size, cache_dtype, gen=gen,
                                           extra_cols=self.extra_cols)
        scale = None
        if self.fp8:
            cache, scale = to_fp8_cache(cache)
        q_nope, q_pe = make_query(len(self.lens), self.s_q, self.h, self.q_dtype, gen, packed=self.packed)
        if self.cache_4d:
            cache = cache.unsqueeze(2)
        return q_nope, q_pe, cache, table, seqlens, scale

    def reference(self, q_nope, q_pe, cache, table, seqlens, scale):
        from mla_ext import reference
        c = cache.squeeze(2) if cache.dim() == 4 else cache
        return reference.decode(q_nope, q_pe, c, table, seqlens, SCALE, self.causal, compute_dtype=torch.float64,
                                scale=scale)

    def tolerance(self):
        return FP8_TOL[self.q_dtype] if self.fp8 else TOL[self.q_dtype]


def to_fp8_cache(cache16):
    """The float8_e4m3fn copy of a make_paged cache (unused slots: the NaN code) and its scale,
    quantised as mla_ext.append_kv does (x / scale, round to nearest even, saturate)."""
    from mla_ext import reference
    flat = cache16.view(-1, D)
    used = ~torch.isnan(flat).any(-1)
    amax = flat[used].float().abs().max().clamp_min(1e-6)
    scale = (amax * 1.25 / reference.FP8_E4M3_MAX).reshape(1).float()
    cache8 = torch.full(cache16.shape, float("nan")).to(torch.float8_e4m3fn)
    cache8.view(-1, D)[used] = reference.quantize_fp8(flat[used].float(), scale)
    return cache8, scale


_D = DecodeCase
DECODE_CASES = [
    # every 16-bit type through both kernels; varlen with 0 and 1; s_q 1-4, causal and not
    _D("bf16 s_q=2 causal", s_q=2),
    _D("fp16 s_q=2 causal", q_dtype=torch.float16, s_q=2),
    _D("bf16 s_q=3 non-causal", s_q=3, causal=False, h=3),
    _D("fp16 s_q=4 h=64", q_dtype=torch.float16, s_q=4, h=64, lens=(3, 200, 5)),
    _D("bf16 h=128 two row blocks", h=128, lens=(70, 1, 129)),
    _D("bf16 h=1", h=1, lens=(0, 33, 1)),
    _D("bf16 block_size=1", block_size=1, lens=(0, 1, 40, 65), s_q=2),
    _D("fp16 block_size=7", q_dtype=torch.float16, block_size=7, lens=(1, 50, 99), s_q=3),
    _D("bf16 block_size=64 packed q, 4-D cache", block_size=64, lens=(65, 130), s_q=2, packed=True, cache_4d=True),
    _D("bf16 simple", impl="simple", s_q=2),
    _D("fp16 simple non-causal", q_dtype=torch.float16, impl="simple", s_q=3, causal=False, h=3),
    _D("fp32 simple", q_dtype=torch.float32, s_q=2, lens=(0, 1, 37, 100)),
    # float8_e4m3fn cache: tensor cores for bf16 / fp16 queries, CUDA cores for fp32
    _D("fp8 cache, bf16 q", fp8=True, s_q=2),
    _D("fp8 cache, fp16 q, block_size=7", fp8=True, q_dtype=torch.float16, block_size=7, lens=(1, 60, 3)),
    _D("fp8 cache, bf16 q, h=64 s_q=4", fp8=True, s_q=4, h=64, lens=(5, 90)),
    _D("fp8 cache, bf16 q, simple", fp8=True, impl="simple", s_q=2, lens=(0, 45, 9)),
    _D("fp8 cache, fp32 q", fp8=True, q_dtype=torch.float32, lens=(1, 40)),
    # long context, few sequences: the planner splits the KV length, the combine merges
    _D("bf16 split-KV", lens=(700, 3), extra_cols=30),
    _D("fp8 split-KV, s_q=2", fp8=True, lens=(650, 0), s_q=2, extra_cols=30),
    _D("fp16 simple split-KV", q_dtype=torch.float16, impl="simple", lens=(400,), extra_cols=20, h=2),
]


@dataclass(frozen=True)
class AppendCase:
    name: str
    in_dtype: torch.dtype = torch.bfloat16
    fp8: bool = False              # float8_e4m3fn cache (quantised on append)
    block_size: int = 16
    tokens: int = 37
    slot_dtype: torch.dtype = torch.int64
    layout: str = "contiguous"     # contiguous | strided (row stride > width) | unaligned (odd offsets)

    def inputs(self):
        """(kv_c [T, 512], k_pe [T, 64], cache (NaN-filled), slot_mapping [T] with padding, scale)."""
        gen = torch.Generator().manual_seed(_seed(self.name))
        num_blocks = -(-self.tokens // self.block_size) + 2
        cache_dtype = torch.float8_e4m3fn if self.fp8 else self.in_dtype
        cache = torch.full((num_blocks, self.block_size, D), float("nan")).to(cache_dtype)
        slots = torch.randperm(num_blocks * self.block_size, generator=gen)[: self.tokens]
        slots[torch.rand(self.tokens, generator=gen) < 0.2] = -1  # padding tokens: skipped
        rows = torch.randn(self.tokens, D + 16, generator=gen).to(self.in_dtype)
        if self.layout == "strided":
            kv_c, k_pe = rows[:, :DC], rows[:, DC + 8:DC + 8 + DR]          # row stride 592
        elif self.layout == "unaligned":
            flat = torch.randn(self.tokens * D + 1, generator=gen).to(self.in_dtype)[1:].view(self.tokens, D)
            kv_c, k_pe = flat[:, :DC], flat[:, DC:]                           # 1 element off alignment
        else:
            kv_c, k_pe = rows[:, :DC].contiguous(), rows[:, DC:D].contiguous()
        scale = torch.tensor([0.02]) if self.fp8 else None
        return kv_c, k_pe, cache, slots.to(self.slot_dtype), scale


_A = AppendCase
APPEND_CASES = [
    _A(f"{dt} bs={bs} {layout} {str(sd).split('.')[-1]}", in_dtype=dt, block_size=bs, layout=layout, slot_dtype=sd)
    for dt in (torch.bfloat16, torch.float16, torch.float32)
    for bs, layout, sd in ((1, "contiguous", torch.int64), (7, "strided", torch.int32), (16, "unaligned", torch.int64),
                           (64, "contiguous", torch.int32))
] + [
    _A(f"fp8 from {dt} bs={bs} {layout}", in_dtype=dt, fp8=True, block_size=bs, layout=layout)
    for dt in (torch.bfloat16, torch.float16, torch.float32)
    for bs, layout in ((16, "contiguous"), (7, "unaligned"))
]
