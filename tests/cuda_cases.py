"""Inputs, tolerances and the list of decode / append cases shared by the GPU tests
(tests/test_cuda.py) and the emulated CUDA tests (tests/test_cuda_emulated.py), so both
check the kernels on the same shapes."""
import math

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
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse), empty), f"{what}: lse -inf pattern differs"
    assert (out[empty] == 0).all(), f"{what}: rows that see no key must be 0"
    if (~empty).any():
        lerr = (lse[~empty] - ref_lse[~empty]).abs().max()
        assert lerr < ltol, f"{what}: lse error {lerr:.3g}"


