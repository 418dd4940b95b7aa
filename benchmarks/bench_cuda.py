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

Timing. "ms" is the kernel time per call with the host out of the way: `KERNEL_CALLS` calls
captured in one CUDA graph, the graph replayed between two events, the median replay divided
by the number of calls (a 25 us kernel timed with an event pair around each eagerly
launched and synchronised call reads ~2x slow: launch latency and the host's own work
land inside the events). Where capture fails (the record's "timing" says why), the same
calls run back to back between two events with no synchronisation in between. "eager_ms" is
the other number users feel: one eager call, launched and synchronised, event to event.
Index checks are off in both (they would sync the host, and a graph cannot hold them).
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


KERNEL_CALLS = 20  # calls per captured graph (per burst without a graph)
KERNEL_REPS = 7    # graph replays timed; the median is reported


def time_ms(fn, warmup=3, iters=20):
    """Eager latency: median of per-call CUDA-event times, each call synchronised
    (bench_decode's timer): launch and host work included."""
    return time_fn(fn, "cuda", reps=iters, warmup=warmup)


def kernel_ms(fn, calls=KERNEL_CALLS, reps=KERNEL_REPS):
    """Per-call device time: `calls` calls of fn captured in one CUDA graph, replayed `reps`
    times between two events; returns (median ms per call, how it was timed)."""
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as capture requires
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    try:
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            for _ in range(calls):
                fn()
        graph.replay()
        torch.cuda.synchronize()
        run, how = graph.replay, f"cuda graph of {calls} calls"
    except Exception as e:  # noqa: BLE001 - any capture failure: time a burst instead, say why
        torch.cuda.synchronize()

        def run():
            for _ in range(calls):
                fn()

        how = f"{calls} eager calls back to back (graph capture failed: {type(e).__name__}: {str(e)[:120]})"
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / calls)
    times.sort()
    return times[len(times) // 2], how


def timed_row(fn, nbytes, flops, **fields):
    """One result row: kernel time (graph) for ms / GB/s / TFLOPS, plus the eager latency."""
    ms, how = kernel_ms(fn)
    eager = time_ms(fn)
    return dict(**fields, ms=round(ms, 4), eager_ms=round(eager, 4), timing=how,
                gbps=round(nbytes / ms / 1e6, 1), tflops=round(flops / ms / 1e9, 2))


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
    rows = [timed_row(run_ext, nbytes, flops, name=name, impl="mla_ext")]
    ms = rows[-1]["ms"]

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
    nbytes8 = b * (elt * s_q * h * D + L * D + elt * s_q * h * DC)
    rows.append(timed_row(run_fp8, nbytes8, flops, name=name, impl="mla_ext-fp8"))
    ms8 = rows[-1]["ms"]
    rows[-1].update(speedup_vs_bf16=round(ms / ms8, 3),
                    rel_err_vs_bf16=round(((out8.float() - out.float()).norm() / out.float().norm()).item(), 5))
    if name == "decode-tp8":
        rows[-1]["speedup_target"] = FP8_TP8_SPEEDUP_TARGET
    del cache8, out8
    try:
        ref = torch_decode(q, cache, block_table, seqlens, L, block_size)
        err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()
        rows[-1]["rel_err_vs_torch"] = round(err, 5)
        del ref
        rows.append(timed_row(lambda: torch_decode(q, cache, block_table, seqlens, L, block_size), nbytes, flops,
                              name=name, impl="torch"))
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
    rows = [timed_row(lambda: mla_ext.append_kv(kv_c, k_pe, cache, slots), nbytes, 0, name=f"append-{T}",
                      impl="mla_ext")]
    ms = rows[-1]["ms"]
    rows[-1]["correct"] = bool(torch.equal(cache.view(-1, D)[slots[:64]], kv[:64]))
    # fp8 cache, same inputs: reads elt bytes, writes 1 byte per value.
    scale = mla_ext.fp8_scale_for(kv)
    cache8 = torch.zeros(num_blocks, block_size, D, device="cuda", dtype=torch.float8_e4m3fn)
    nbytes8 = T * D * (torch.finfo(dtype).bits // 8 + 1)
    rows.append(timed_row(lambda: mla_ext.append_kv(kv_c, k_pe, cache8, slots, scale=scale), nbytes8, 0,
                          name=f"append-{T}", impl="mla_ext-fp8"))
    from mla_ext import reference
    ok8 = torch.equal(cache8.view(-1, D)[slots[:64]].view(torch.uint8),
                      reference.quantize_fp8(kv[:64], scale).view(torch.uint8))
    rows[-1].update(correct=bool(ok8), speedup_vs_bf16=round(ms / rows[-1]["ms"], 3))
    del cache8
    flat = cache.view(-1, D)

    def torch_append():
        flat[slots] = torch.cat([kv_c, k_pe], dim=-1)

    rows.append(timed_row(torch_append, nbytes, 0, name=f"append-{T}", impl="torch"))
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
        rows_out.append(timed_row(lambda: mla_ext.sparse_decode(q, cache, idx, softmax_scale=SCALE), nbytes, flops,
                                  name=name, impl="mla_ext-sparse" + ("" if impl == "auto" else "-simple")))
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
              "timing": "ms: per call inside a CUDA graph of %d calls, median of %d replays; eager_ms: one "
                        "synchronised eager call" % (KERNEL_CALLS, KERNEL_REPS),
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
    print(f"{'name':<14} {'impl':<12} {'ms':>9} {'eager ms':>9} {'GB/s':>8} {'TFLOPS':>8} {'%copy':>6} {'x bf16':>7}")
    for r in results:
        print(f"{r['name']:<14} {r['impl']:<12} {r['ms'] if r['ms'] is not None else '-':>9} "
              f"{r.get('eager_ms', '-'):>9} "
              f"{r['gbps'] or '-':>8} {r['tflops'] or '-':>8} {r.get('pct_copy', '-'):>6} "
              f"{r.get('speedup_vs_bf16', '-'):>7}")
    print(f"ceilings: copy {c['copy_gbps']} GB/s, bf16 matmul {c['bf16_tflops']} TFLOPS")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(record, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
