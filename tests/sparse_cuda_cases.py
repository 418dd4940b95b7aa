"""Sparse decode cases shared by the emulated CUDA tests (tests/test_cuda_emulated_sparse.py),
the GPU tests (tests/test_cuda.py) and the mutation check (tests/cuda_emu/mutations.py):
inputs built from a generator seeded by the case name, the float64 reference
(mla_ext.sparse.sparse_decode) and the comparison.

Every case poisons what the kernel must not read: each cache token that no valid slot names
is all 0xFF bytes (NaN codes, NaN scales, NaN rope), blocks are padded (the padding is
0xFF too), and the index slots past topk_length hold garbage (-7, ids past the cache).
"""
import zlib
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch

from mla_ext import sparse

SCALE = 576 ** -0.5
NAN_BYTE = 0xFF

# Tolerances against the float64 reference on the same (exact) dequantised values.
# The simple kernel computes in fp32 throughout (q and every cache value are exact in fp32),
# so an fp32 output is within a few ulps of accumulated rounding over <= a few hundred slots
# (exp2 / log2 are approximate instructions on the GPU: ~2^-22 relative): 2e-5. A 16-bit
# output adds one rounding of the output: 2^-8 relative (bf16), 2^-11 (fp16), as
# torch.testing's defaults for those dtypes.
SIMPLE_TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=1e-5, rtol=2 ** -8),
              torch.float16: dict(atol=1e-5, rtol=2 ** -10)}
LSE_TOL = dict(atol=2e-5, rtol=2e-5)
# The tensor-core kernel (bf16 q only) rounds P to bf16 for the P.V MMA (2^-9 relative per
# weight, while the row sum uses the fp32 weights), then the output to bf16: the error is
# at most ~2^-9 * max|v| (|v| <= ~4 for these randn rows) on top of the output's rounding,
# and far less on average (independent rounding signs). S = Q K^T is exact-product fp32.
TC_TOL = dict(atol=4e-3, rtol=2 ** -7)


@dataclass(frozen=True)
class SparseCase:
    name: str
    b: int = 2
    s_q: int = 1
    h: int = 16
    topk: int = 40
    block_size: int = 16
    num_blocks: int = 6
    pad: int = 1                      # padded block stride: (block_size + pad) tokens
    q_dtype: torch.dtype = torch.bfloat16
    cache: str = "fp8"                # fp8 (656-byte tokens) | bf16 | fp16 | fp32
    p_invalid: float = 0.3            # share of -1 slots
    topk_length: bool = False         # random lengths, sequence 0 gets 0
    extra: bool = False               # a second cache with its own indices and lengths
    sink: bool = False
    duplicates: bool = False          # some slots name the same token
    all_invalid_row: bool = False     # query (1, last) has every slot -1
    impl: str = "auto"
    splits: bool = False              # the plan must split topk (asserted by the tests)

    def inputs(self):
        g = torch.Generator().manual_seed(zlib.crc32(self.name.encode()) & 0x7FFFFFFF)
        cache = make_cache(g, self.cache, self.num_blocks, self.block_size, self.pad)
        nt = self.num_blocks * self.block_size
        idx = random_indices(g, self.b, self.s_q, self.topk, nt, self.p_invalid)
        if self.duplicates:
            idx[0, 0, 1] = idx[0, 0, 2] = idx[0, 0, 5] = 3
            idx[-1, -1, -1] = idx[-1, -1, 0]
        if self.all_invalid_row:
            idx[-1, -1] = -1
        kw = {}
        if self.topk_length:
            length = torch.randint(1, self.topk + 1, (self.b,), generator=g, dtype=torch.int32)
            length[0] = 0  # a sequence with no slot
            kw["topk_length"] = length
        garbage_past_length(g, idx, kw.get("topk_length"), nt)
        poison_unused(cache, idx, kw.get("topk_length"))
        if self.extra:
            ebs, enb, etopk = 8, 5, 24
            extra = make_cache(g, self.cache, enb, ebs, 2)
            eidx = random_indices(g, self.b, self.s_q, etopk, enb * ebs, self.p_invalid)
            elen = torch.randint(0, etopk + 1, (self.b,), generator=g, dtype=torch.int32)
            garbage_past_length(g, eidx, elen, enb * ebs)
            poison_unused(extra, eidx, elen)
            kw.update(extra_cache=extra, extra_indices=eidx, extra_topk_length=elen)
        if self.sink:
            sink = torch.randn(self.h, generator=g) * 2
            sink[0] = float("-inf")  # factor 1
            kw["attn_sink"] = sink
        q = torch.randn(self.b, self.s_q, self.h, 576, generator=g).to(self.q_dtype)
        return q, cache, idx, kw

    def expected_impl(self, impl=None):
        impl = impl or self.impl
        tc = impl != "simple" and self.q_dtype == torch.bfloat16 and self.cache in ("fp8", "bf16")
        return "tc" if tc else "simple"

    def tolerance(self, impl_ran):
        return TC_TOL if impl_ran == "tc" else SIMPLE_TOL[self.q_dtype]

    def reference(self, q, cache, idx, kw):
        return sparse.sparse_decode(q, cache, idx, SCALE, **kw)


def make_cache(g, kind, num_blocks, block_size, pad):
    """[num_blocks, block_size, 1, width] cache with a padded block stride (padding 0xFF)."""
    rows = torch.randn(num_blocks, block_size, 576, generator=g)
    if kind == "fp8":
        cache = sparse.quantize_cache(rows, block_padding=pad)
    else:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[kind]
        cache = torch.empty(num_blocks, block_size + pad, 1, 576, dtype=dtype)[:, :block_size]
        cache.copy_(rows.unsqueeze(2).to(dtype))
    full = torch.empty(0, dtype=torch.uint8).set_(cache.untyped_storage())
    c = cache.squeeze(2)
    padding = torch.ones(full.numel(), dtype=torch.bool)
    bs = c.stride(0) * c.element_size()
    tok = c.stride(1) * c.element_size()
    width = c.shape[-1] * c.element_size()
    for blk in range(num_blocks):
        for t in range(block_size):
            start = blk * bs + t * tok
            padding[start:start + width] = False
    full[padding] = NAN_BYTE
    return cache


def random_indices(g, b, s_q, topk, num_tokens, p_invalid):
    idx = torch.randint(0, num_tokens, (b, s_q, topk), generator=g, dtype=torch.int32)
    drop = torch.rand(b, s_q, topk, generator=g) < p_invalid
    return idx.masked_fill(drop, -1)


def garbage_past_length(g, idx, length, num_tokens):
    """Slots at / past topk_length are never read: fill them with ids the cache does not hold
    (-7, past its end) and with ids of tokens that no valid slot names (poisoned, so a kernel
    that reads them sees 0xFF bytes: NaN, which it reads as 0, still a wrong extra weight)."""
    if length is None:
        return
    for i in range(idx.shape[0]):
        n = int(length[i])
        if n < idx.shape[2]:
            junk = torch.randint(0, num_tokens, idx[i, :, n:].shape, generator=g, dtype=torch.int32)
            junk[..., 1::3] = -7
            junk[..., 2::3] += num_tokens + 10 ** 5
            idx[i, :, n:] = junk


def poison_unused(cache, idx, length):
    """Every token no valid slot names becomes all 0xFF bytes (NaN in every field)."""
    c = cache.squeeze(2)
    nb, bs = c.shape[:2]
    used = torch.zeros(nb * bs, dtype=torch.bool)
    for i in range(idx.shape[0]):
        n = idx.shape[2] if length is None else int(length[i])
        sel = idx[i, :, :n].flatten()
        used[sel[sel >= 0].long()] = True
    for t in torch.nonzero(~used).flatten().tolist():
        c[t // bs, t % bs].view(torch.uint8).fill_(NAN_BYTE)


def to_device(t, device):
    """t on `device` with its strides and storage offset kept (a padded cache's block stride;
    Tensor.to would make a non-dense view contiguous)."""
    raw = torch.empty(0, dtype=torch.uint8).set_(t.untyped_storage()).to(device)
    return torch.empty(0, dtype=t.dtype, device=device).set_(raw.untyped_storage(), t.storage_offset(), t.shape,
                                                             t.stride())


def check_sparse(out, lse, ref_out, ref_lse, q_dtype, what="", tol=None):
    """Empty queries (reference lse +inf): out exactly 0 and lse +inf. Others: out within the
    dtype's tolerance, lse within LSE_TOL; no NaN anywhere (the cases never feed a NaN)."""
    out, lse = out.cpu(), lse.cpu()
    empty = torch.isposinf(ref_lse)
    assert torch.equal(torch.isposinf(lse), empty), f"{what}: lse +inf (empty query) pattern differs"
    assert torch.all(out[empty] == 0), f"{what}: a query with no valid slot must output 0"
    assert not torch.isnan(out).any() and not torch.isnan(lse).any(), f"{what}: NaN in the output"
    torch.testing.assert_close(lse[~empty].double(), ref_lse[~empty], **LSE_TOL, msg=lambda m: f"{what}: lse: {m}")
    tol = tol or SIMPLE_TOL[q_dtype]
    torch.testing.assert_close(out.double(), ref_out, **tol, msg=lambda m: f"{what}: out: {m}")


C = SparseCase
SPARSE_CASES = [
    C("h1 bf16 q", h=1, topk=20),
    C("h16 s_q=2 topk_length", s_q=2, topk_length=True, pad=3),
    C("h16 all-invalid row, duplicates", s_q=2, duplicates=True, all_invalid_row=True, p_invalid=0.5),
    C("h64 extra cache, sink", h=64, s_q=2, topk=24, extra=True, sink=True, topk_length=True),
    C("h128 split topk", b=1, h=128, topk=256, num_blocks=20, block_size=32, sink=True, splits=True),
    C("h16 split, extra, lengths", b=2, h=16, topk=400, num_blocks=30, extra=True, topk_length=True, sink=True,
      splits=True),
    C("h20 fp32 q", h=20, q_dtype=torch.float32, sink=True),
    C("h16 fp16 q, bf16 cache", q_dtype=torch.float16, cache="bf16", s_q=2),
    C("h8 fp32 q, fp32 cache", h=8, q_dtype=torch.float32, cache="fp32", block_size=4, num_blocks=9),
    C("h16 fp16 cache, block_size 1", cache="fp16", block_size=1, num_blocks=50, topk=17),
    C("h32 bf16 cache, split", h=32, cache="bf16", topk=300, num_blocks=12, splits=True, sink=True),
]
