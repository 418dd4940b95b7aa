"""CPU benchmark of mla_ext.sparse_decode: DeepSeek-V3.2's decode shape scaled to this machine
(h_q 128, topk 2048, s_q 1-2, a 32k-token 656-byte fp8 cache, bf16 q) against a plain torch
gather + dequantise + matmul of the same slots, in fp32 (the baseline since the first record)
and in bf16 (torch's bf16 bmm: oneDNN, AMX where the CPU has it). Prints (and with --json
writes) per case: median ms, and GB/s of the bytes the indices name (valid slots x 656 bytes
per query), for every kernel build in --isa (MLA_EXT_CPU_ISA caps; the record names the
build that ran).

    .venv/bin/python benchmarks/bench_sparse.py [--threads N] [--isa auto,avx2] [--json out.json] [--note "..."]

A development measurement, not a test: numbers depend on the machine and its load.
"""
import argparse
import datetime
import json
import os
import subprocess
import platform
import statistics
import time

import torch

from mla_ext import ops, sparse


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def torch_baseline(q, cache, idx, scale, dtype=torch.float32):
    """Gather the named tokens, dequantise them, attend with matmuls (in `dtype`; softmax in fp32)."""
    b, s_q, h, _ = q.shape
    rows = cache.squeeze(2).reshape(-1, sparse.TOKEN_BYTES)
    safe = idx.long().clamp_min(0)
    kv = sparse.dequantize_tokens(rows[safe.reshape(-1)], dtype).reshape(b * s_q, -1, 576)
    scores = torch.bmm(q.to(dtype).reshape(b * s_q, h, 576), kv.transpose(1, 2)).float() * scale
    scores = scores.masked_fill((idx < 0).reshape(b * s_q, 1, -1), float("-inf"))
    lse = torch.logsumexp(scores, -1)
    out = torch.bmm(torch.softmax(scores, -1).to(dtype), kv[..., :512])
    return out.reshape(b, s_q, h, 512), lse


def timeit(fn, reps):
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--json")
    ap.add_argument("--isa", default="auto", help="comma-separated MLA_EXT_CPU_ISA values to measure")
    ap.add_argument("--note", default="", help="recorded in the JSON: say whether the machine was quiet")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    block, num_blocks, h, topk = 64, 512, 128, 2048  # 32768 tokens
    cache = sparse.quantize_cache(torch.randn(num_blocks, block, 576, generator=g).to(torch.bfloat16), block_padding=1)
    scale = 192 ** -0.5
    records = []
    for b, s_q in ((1, 1), (1, 2), (4, 1)):
        q = torch.randn(b, s_q, h, 576, generator=g).to(torch.bfloat16)
        idx = torch.randperm(num_blocks * block, generator=g)[: b * s_q * topk].to(torch.int32).reshape(b, s_q, topk)
        gathered = b * s_q * topk * sparse.TOKEN_BYTES
        t_ref = timeit(lambda: torch_baseline(q, cache, idx, scale), args.reps)
        t_ref16 = timeit(lambda: torch_baseline(q, cache, idx, scale, torch.bfloat16), args.reps)
        flop = 2 * b * s_q * h * topk * (576 + 512)
        for isa in args.isa.split(","):
            os.environ["MLA_EXT_CPU_ISA"] = isa
            kernel = ops.cpu_sparse_decode_kernel(q.dtype, cache.dtype)
            t_op = timeit(lambda: ops.sparse_decode(q, cache, idx, softmax_scale=scale), args.reps)
            rec = dict(b=b, s_q=s_q, h_q=h, topk=topk, cache_tokens=num_blocks * block, threads=args.threads,
                       isa=isa, kernel=kernel, op_ms=t_op * 1e3, torch_ms=t_ref * 1e3, torch_bf16_ms=t_ref16 * 1e3,
                       op_gbps=gathered / t_op / 1e9, torch_gbps=gathered / t_ref / 1e9,
                       torch_bf16_gbps=gathered / t_ref16 / 1e9, op_gflops=flop / t_op / 1e9,
                       torch_gflops=flop / t_ref / 1e9, torch_bf16_gflops=flop / t_ref16 / 1e9,
                       speedup_vs_torch=t_ref / t_op, speedup_vs_torch_bf16=t_ref16 / t_op)
            records.append(rec)
            print(f"b={b} s_q={s_q} h={h} topk={topk} [{kernel}]: mla_ext {rec['op_ms']:.2f} ms "
                  f"({rec['op_gbps']:.2f} GB/s, {rec['op_gflops']:.0f} GFLOP/s); torch gather+matmul fp32 "
                  f"{rec['torch_ms']:.2f} ms ({t_ref / t_op:.2f}x), bf16 {rec['torch_bf16_ms']:.2f} ms "
                  f"({t_ref16 / t_op:.2f}x)")
        os.environ.pop("MLA_EXT_CPU_ISA", None)
    if args.json:
        with open(args.json, "w") as f:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
            json.dump(dict(cpu=_cpu_model(), torch=torch.__version__, commit=commit,
                           date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                           loadavg=os.getloadavg(), note=args.note, records=records), f, indent=1)


if __name__ == "__main__":
    main()
