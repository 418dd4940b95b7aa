"""Sweep the CPU decode and append kernels against mla_ext.reference.

Covers block sizes 1/7/16/64, heads 1/3/16/128, s_q 1..4 causal and not, lengths 0,
1, 15, 16, 17, non-multiples of the 16-key tile and long ones split over several work
items, bf16 / fp16 / fp32, the packed query, strided queries, NaN-poisoned unused slots,
and every instruction-set kernel this CPU can run (MLA_EXT_CPU_ISA caps the choice).

    python benchmarks/check_cpu_decode.py [--quick] [--isa scalar,avx2,auto]
"""
import argparse
import itertools
import math
import os
import sys

import torch

import mla_ext
from mla_ext import reference

TOL = {torch.float32: (1e-4, 1e-4), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}


def make_case(g, b, s_q, h, bs, lens, dtype, poison=True):
    max_len = max(lens + [1])
    mb = (max_len + bs - 1) // bs + 1
    nb = b * mb + 3
    cache = torch.randn(nb, bs, 576, generator=g).to(dtype)
    if poison:
        cache.fill_(float("nan"))
    perm = torch.randperm(nb, generator=g)
    block_table = torch.full((b, mb), 2147480000, dtype=torch.int32)
    for i, L in enumerate(lens):
        nblk = (L + bs - 1) // bs
        ids = perm[i * mb : i * mb + nblk]
        block_table[i, :nblk] = ids.int()
        if L:
            rows = torch.randn(L, 576, generator=g).to(dtype)
            flat = cache.view(-1, 576)
            pos = torch.arange(L)
            flat[ids[pos // bs].long() * bs + pos % bs] = rows
    q = torch.randn(b, s_q, h, 576, generator=g).to(dtype)
    return q, cache, block_table, torch.tensor(lens, dtype=torch.int32)


def check_one(g, b, s_q, h, bs, lens, dtype, causal, packed=False, strided=False, scale=None):
    q, cache, bt, sl = make_case(g, b, s_q, h, bs, lens, dtype)
    scale = scale if scale is not None else 1 / math.sqrt(192)
    if strided:  # q_nope / q_pe as strided views of a wider tensor
        big = torch.randn(b, s_q, h, 700, generator=g).to(dtype)
        big[..., :576] = q
        qn, qp = big[..., :512], big[..., 512:576]
    else:
        qn, qp = q[..., :512], q[..., 512:]
    if packed:
        out, lse = mla_ext.decode(q, None, cache, bt, sl, softmax_scale=scale, causal=causal, return_lse=True)
    else:
        out, lse = mla_ext.decode(qn, qp, cache, bt, sl, softmax_scale=scale, causal=causal, return_lse=True)
    ref_out, ref_lse = reference.decode(q, None, cache, bt, sl, scale, causal=causal, compute_dtype=torch.float64)
    atol, rtol = TOL[dtype]
    ok_out = torch.allclose(out.double(), ref_out.double().to(dtype).double(), atol=atol, rtol=rtol)
    fin = torch.isfinite(ref_lse)
    ok_lse = torch.equal(fin, torch.isfinite(lse)) and torch.allclose(lse[fin].double(), ref_lse[fin].double(), atol=1e-4, rtol=1e-5)
    ok_inf = bool((lse[~fin] == float("-inf")).all()) and bool((out[~fin] == 0).all())
    if not (ok_out and ok_lse and ok_inf):
        err = (out.double() - ref_out.double()).abs().max().item()
        print(f"FAIL b={b} s_q={s_q} h={h} bs={bs} lens={lens} {dtype} causal={causal} packed={packed} "
              f"strided={strided}: out_err={err:.3g} lse_ok={ok_lse} empty_ok={ok_inf}")
        return False
    return True


def check_append(g, dtype, bs, T):
    nb = (T + bs - 1) // bs + 2
    cache = torch.randn(nb, bs, 576, generator=g).to(dtype)
    kv = torch.randn(T, 512, generator=g).to(dtype)
    kpe = torch.randn(T, 64, generator=g).to(dtype)
    slots = torch.randperm(nb * bs, generator=g)[:T]
    if T:
        slots[torch.rand(T, generator=g) < 0.2] = -1
    expect = reference.append_kv(kv, kpe, cache, slots)
    mla_ext.append_kv(kv, kpe, cache, slots)
    bits = torch.int32 if dtype == torch.float32 else torch.int16
    ok = torch.equal(cache.view(bits), expect.view(bits))  # bit for bit
    if not ok:
        print(f"FAIL append {dtype} bs={bs} T={T}")
    return ok


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--isa", default="scalar,avx2,auto")
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    fails = total = 0
    for isa in args.isa.split(","):
        os.environ["MLA_EXT_CPU_ISA"] = isa
        n0 = total
        for dtype in (torch.bfloat16, torch.float16, torch.float32):
            for bs, h, s_q, causal in itertools.product((1, 7, 16, 64), (1, 3, 16, 128), (1, 2, 3, 4), (True, False)):
                if args.quick and (h == 128 and bs != 16):
                    continue
                lens_pool = [[0], [1], [15, 16, 17], [3, 0, 40], [100, 257]]
                if not args.quick or bs == 16:
                    lens_pool.append([1000, 33, 2])
                for lens in lens_pool:
                    if h == 128 and sum(lens) > 500 and s_q > 2:
                        continue
                    total += 1
                    fails += not check_one(g, len(lens), s_q, h, bs, lens, dtype, causal)
            # long sequences split into several items, packed and strided queries, odd scales
            for lens in ([5000], [4097, 31, 2049]):
                total += 2
                fails += not check_one(g, len(lens), 2, 16, 16, lens, dtype, True, packed=True)
                fails += not check_one(g, len(lens), 1, 5, 64, lens, dtype, False, strided=True, scale=0.13523)
            total += 1
            fails += not check_one(g, 2, 1, 16, 16, [300, 40], dtype, True, scale=3.0)  # large scores
            for bs, T in itertools.product((1, 7, 16, 64), (0, 1, 5, 100, 300)):
                total += 1
                fails += not check_append(g, dtype, bs, T)
        print(f"isa={isa}: {total - n0} cases", flush=True)
    print(f"{total - fails}/{total} passed")
    sys.exit(1 if fails else 0)


if __name__ == "__main__":
    main()
