"""GPU benchmark of mla_ext's CUDA kernels against the device's own ceilings and a plain
torch implementation, in one run.

    python benchmarks/bench_cuda.py --json out.json [--quick]

Ceilings: a large device-to-device copy (bytes read + written) and a large bf16 matmul.
Shapes (SPEC section 5): decode-tp8, decode-mtp, long-ctx (mla_ext and torch side by side),
append with 65536 tokens. Counting:
    FLOPs = 2 * b * s_q * h * L * (576 + 512)
    bytes = elt * b * (s_q*h*576 + L*576 + s_q*h*512)        (decode, cache read once)
    bytes = elt * T * 576 * 2                                  (append: read + write)
fp8 rows (impl "mla_ext-fp8"): the same shapes with a float8_e4m3fn cache (scale on the
device), the cache counted at 1 byte per element, q / out at 2; each carries
speedup_vs_bf16 = ms(mla_ext, bf16 cache) / ms(mla_ext-fp8), timed in the same run on the
same data (the fp8 cache is the bf16 one quantized), and rel_err_vs_bf16 between the outputs.
Target: decode-tp8 speedup >= 1.6.
Sparse rows (DeepSeek-V3.2 top-k decode, bench_sparse): GB/s of the tokens gathered, for the
tensor-core ("mla_ext-sparse") and the CUDA-core ("mla_ext-sparse-simple") kernels.
"""
import argparse
import json
import math
import os
import sys
import time

import torch

import mla_ext

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_decode import git_commit, progress, time_fn  # noqa: E402  (one timer for every benchmark)

D, DC, DR = 576, 512, 64
SCALE = 1.0 / math.sqrt(192)
FP8_TP8_SPEEDUP_TARGET = 1.6
DECODE_SHAPES = [  # name, b, s_q, h, L
    ("decode-tp8", 128, 1, 16, 4096),
    ("decode-mtp", 128, 2, 128, 4096),
    ("long-ctx", 2, 1, 16, 32768),
]


def time_ms(fn, warmup=3, iters=20):
    """Median of per-iteration CUDA-event times, after warm-up (bench_decode's timer)."""
    return time_fn(fn, "cuda", reps=iters, warmup=warmup)


def ceilings(quick):
    n = (1 << 28) if not quick else (1 << 26)  # 512 MiB of bf16 (128 MiB quick)
    src = torch.randn(n, device="cuda", dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), iters=10)
    copy_gbps = 2 * src.numel() * src.element_size() / ms / 1e6
    del src, dst
    m = 8192 if not quick else 4096
    a = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(m, m, device="cuda", dtype=torch.bfloat16)
    ms = time_ms(lambda: a @ b, iters=10)
    tflops = 2 * m ** 3 / ms / 1e9
    return {"copy_gbps": round(copy_gbps, 1), "bf16_tflops": round(tflops, 1)}


def torch_decode(q, cache, block_table, seqlens, L, block_size):
    """Plain torch: gather the paged rows densely, then matmul / softmax / matmul in bf16
    with fp32 softmax (what a user without a kernel would write). Equal lengths only."""
    b, s_q, h, _ = q.shape
    kv = cache[block_table[:, : L // block_size].long()].reshape(b, L, D)  # [b, L, 576]
    scores = torch.matmul(q.reshape(b, s_q * h, D), kv.transpose(1, 2)).float() * SCALE
    if s_q > 1:
        j = torch.arange(s_q, device=q.device).repeat_interleave(h).view(1, -1, 1)
        t = torch.arange(L, device=q.device).view(1, 1, -1)
        scores = scores.masked_fill(t > L - s_q + j, float("-inf"))
    p = torch.softmax(scores, dim=-1).to(q.dtype)
    return torch.matmul(p, kv[..., :DC]).reshape(b, s_q, h, DC)


def bench_decode(name, b, s_q, h, L, dtype=torch.bfloat16, block_size=64):
    gen = torch.Generator(device="cuda").manual_seed(0)
    blocks_per_seq = L // block_size
    num_blocks = b * blocks_per_seq
    cache = torch.randn(num_blocks, block_size, D, device="cuda", dtype=dtype, generator=gen)
    block_table = torch.randperm(num_blocks, device="cuda", generator=gen).to(torch.int32).view(b, blocks_per_seq)
    seqlens = torch.full((b,), L, dtype=torch.int32, device="cuda")
    q = torch.randn(b, s_q, h, D, device="cuda", dtype=dtype, generator=gen)
    q_nope, q_pe = q[..., :DC].contiguous(), q[..., DC:].contiguous()
    elt = torch.finfo(dtype).bits // 8
    flops = 2 * b * s_q * h * L * (D + DC)
    nbytes = elt * b * (s_q * h * D + L * D + s_q * h * DC)

    def run_ext():
        return mla_ext.decode(q_nope, q_pe, cache, block_table, seqlens, softmax_scale=SCALE)

    out = run_ext()
    rows = []
    ms = time_ms(run_ext)
    rows.append(dict(name=name, impl="mla_ext", ms=round(ms, 4), gbps=round(nbytes / ms / 1e6, 1),
                     tflops=round(flops / ms / 1e9, 2)))

    # fp8 cache: the same values quantized (per-tensor scale on the device), timed now, in this run.
    scale = mla_ext.fp8_scale_for(cache)
    cache8 = torch.empty(cache.shape, device="cuda", dtype=torch.float8_e4m3fn)
    flat16, flat8 = cache.view(-1, D), cache8.view(-1, D)
    all_slots = torch.arange(flat16.shape[0], device="cuda")
    mla_ext.append_kv(flat16[:, :DC], flat16[:, DC:], flat8, all_slots, scale=scale)
    del all_slots

    def run_fp8():
        return mla_ext.decode(q_nope, q_pe, cache8, block_table, seqlens, softmax_scale=SCALE, scale=scale)

    out8 = run_fp8()
    ms8 = time_ms(run_fp8)
    nbytes8 = b * (elt * s_q * h * D + L * D + elt * s_q * h * DC)
    rows.append(dict(name=name, impl="mla_ext-fp8", ms=round(ms8, 4), gbps=round(nbytes8 / ms8 / 1e6, 1),
                     tflops=round(flops / ms8 / 1e9, 2), speedup_vs_bf16=round(ms / ms8, 3),
                     rel_err_vs_bf16=round(((out8.float() - out.float()).norm() / out.float().norm()).item(), 5)))
    if name == "decode-tp8":
        rows[-1]["speedup_target"] = FP8_TP8_SPEEDUP_TARGET
    del cache8, out8
    try:
        ref = torch_decode(q, cache, block_table, seqlens, L, block_size)
        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        rows[-1]["rel_err_vs_torch"] = round(err, 5)
        del ref
        ms = time_ms(lambda: torch_decode(q, cache, block_table, seqlens, L, block_size), warmup=2, iters=5)
        rows.append(dict(name=name, impl="torch", ms=round(ms, 4), gbps=round(nbytes / ms / 1e6, 1),
                         tflops=round(flops / ms / 1e9, 2)))
    except torch.OutOfMemoryError:
        rows.append(dict(name=name, impl="torch", ms=None, gbps=None, tflops=None, note="out of memory"))
    del cache
    torch.cuda.empty_cache()
    return rows


def bench_append(T=65536, dtype=torch.bfloat16, block_size=64):
    gen = torch.Generator(device="cuda").manual_seed(1)
    num_blocks = T // block_size + 8
    cache = torch.zeros(num_blocks, block_size, D, device="cuda", dtype=dtype)
    kv = torch.randn(T, D, device="cuda", dtype=dtype, generator=gen)
    kv_c, k_pe = kv[:, :DC].contiguous(), kv[:, DC:].contiguous()
    slots = torch.randperm(num_blocks * block_size, device="cuda", generator=gen)[:T]
    nbytes = 2 * T * D * (torch.finfo(dtype).bits // 8)
    ms = time_ms(lambda: mla_ext.append_kv(kv_c, k_pe, cache, slots))
    ok = torch.equal(cache.view(-1, D)[slots[:64]], kv[:64])
    rows = [dict(name=f"append-{T}", impl="mla_ext", ms=round(ms, 4), gbps=round(nbytes / ms / 1e6, 1), tflops=0.0,
                 correct=bool(ok))]
    # fp8 cache, same inputs: reads elt bytes, writes 1 byte per value.
    scale = mla_ext.fp8_scale_for(kv)
    cache8 = torch.zeros(num_blocks, block_size, D, device="cuda", dtype=torch.float8_e4m3fn)
    ms8 = time_ms(lambda: mla_ext.append_kv(kv_c, k_pe, cache8, slots, scale=scale))
    from mla_ext import reference
    ok8 = torch.equal(cache8.view(-1, D)[slots[:64]].view(torch.uint8),
                      reference.quantize_fp8(kv[:64], scale).view(torch.uint8))
    nbytes8 = T * D * (torch.finfo(dtype).bits // 8 + 1)
    rows.append(dict(name=f"append-{T}", impl="mla_ext-fp8", ms=round(ms8, 4), gbps=round(nbytes8 / ms8 / 1e6, 1),
                     tflops=0.0, correct=bool(ok8), speedup_vs_bf16=round(ms / ms8, 3)))
    del cache8
    flat = cache.view(-1, D)

    def torch_append():
        flat[slots] = torch.cat([kv_c, k_pe], dim=-1)

    ms = time_ms(torch_append)
    rows.append(dict(name=f"append-{T}", impl="torch", ms=round(ms, 4), gbps=round(nbytes / ms / 1e6, 1), tflops=0.0))
    return rows


SPARSE_SHAPES = [  # name, b, s_q, h, topk, cache tokens (DeepSeek-V3.2 decode: topk 2048, fp8 656-byte cache)
    ("sparse-v32-tp8", 64, 1, 16, 2048, 65536),
    ("sparse-v32", 32, 1, 128, 2048, 65536),
    ("sparse-v32-mtp", 32, 2, 128, 2048, 65536),
]


def bench_sparse(name, b, s_q, h, topk, tokens, block_size=64):
    """mla_ext.sparse_decode on the 656-byte fp8 cache, tensor-core and CUDA-core kernels.
    bytes = b * s_q * topk * 656 (the tokens gathered, once per query) + q (2 B) + out (2 B);
    FLOPs = 2 * b * s_q * h * topk * (576 + 512). Random indices over the whole cache, no -1."""
    from mla_ext import sparse
    g = torch.Generator(device="cuda").manual_seed(1)
    nb = tokens // block_size
    rows = torch.randn(nb, block_size, D, device="cuda", generator=g)
    cache = sparse.quantize_cache(rows)
    del rows
    q = torch.randn(b, s_q, h, D, device="cuda", dtype=torch.bfloat16, generator=g)
    idx = torch.randint(0, tokens, (b, s_q, topk), device="cuda", dtype=torch.int32, generator=g)
    nbytes = b * s_q * topk * 656 + b * s_q * h * (D + DC) * 2
    flops = 2 * b * s_q * h * topk * (D + DC)
    rows_out = []
    for impl in ("auto", "simple"):
        os.environ["MLA_EXT_SPARSE_IMPL"] = impl
        ms = time_ms(lambda: mla_ext.sparse_decode(q, cache, idx, softmax_scale=SCALE))
        rows_out.append(dict(name=name, impl="mla_ext-sparse" + ("" if impl == "auto" else "-simple"),
                             ms=round(ms, 4), gbps=round(nbytes / ms / 1e6, 1), tflops=round(flops / ms / 1e9, 2)))
    os.environ.pop("MLA_EXT_SPARSE_IMPL", None)
    return rows_out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--quick", action="store_true", help="smaller ceilings, fewer shapes (smoke test)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: nothing to benchmark")
        return 0
    mla_ext.set_index_checks(False)  # timing the kernels, not the host-side validation sync
    torch.backends.cuda.matmul.allow_tf32 = False
    t0 = time.perf_counter()
    record = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "index_checks": False,
              **git_commit(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    progress("measuring the ceilings (copy, bf16 matmul)", t0)
    record["ceilings"] = ceilings(args.quick)
    results = []
    shapes = DECODE_SHAPES[: 1 if args.quick else None]
    for i, (name, b, s_q, h, L) in enumerate(shapes):
        progress(f"[{i + 1}/{len(shapes)}] {name}: b={b} s_q={s_q} h={h} L={L} ...", t0)
        results += bench_decode(name, b, s_q, h, L)
    sparse_shapes = SPARSE_SHAPES[: 1 if args.quick else None]
    for i, (name, b, s_q, h, topk, tokens) in enumerate(sparse_shapes):
        progress(f"[{i + 1}/{len(sparse_shapes)}] {name}: b={b} s_q={s_q} h={h} topk={topk} ...", t0)
        results += bench_sparse(name, b, s_q, h, topk, tokens)
    progress("append ...", t0)
    results += bench_append(T=4096 if args.quick else 65536)
    record["results"] = results
    c = record["ceilings"]
    for r in results:
        if r.get("gbps"):
            r["pct_copy"] = round(100 * r["gbps"] / c["copy_gbps"], 1)
        if r.get("tflops"):
            r["pct_matmul"] = round(100 * r["tflops"] / c["bf16_tflops"], 1)
    print(f"{'name':<14} {'impl':<12} {'ms':>9} {'GB/s':>8} {'TFLOPS':>8} {'%copy':>6} {'x bf16':>7}")
    for r in results:
        print(f"{r['name']:<14} {r['impl']:<12} {r['ms'] if r['ms'] is not None else '-':>9} "
              f"{r['gbps'] or '-':>8} {r['tflops'] or '-':>8} {r.get('pct_copy', '-'):>6} "
              f"{r.get('speedup_vs_bf16', '-'):>7}")
    print(f"ceilings: copy {c['copy_gbps']} GB/s, bf16 matmul {c['bf16_tflops']} TFLOPS")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
