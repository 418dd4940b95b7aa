"""End-to-end vLLM decode speed on CPU: stock vLLM vs mla_ext (MLA_EXT_VLLM_CPU=1), for each of
vLLM's two CPU MLA backends mla_ext can take the place of:

    stock        CPU_MLA (vLLM's portable CPU MLA; its pick on CPUs without AMX)
    mla_ext      mla_ext in CPU_MLA's place
    stock_amx    AMX_MLA (vLLM's default on AMX CPUs), only where the CPU has AMX
    mla_ext_amx  mla_ext in AMX_MLA's place (AMX_MLA's prefill and absorption kept)

    make bench-vllm                      # or: ~/.cache/mla_ext/venv-vllm/bin/python benchmarks/bench_vllm.py

Model: a seeded DeepSeek-V2-shaped model (tests/vllm_child.py make_model) with 128 heads
(DeepSeek-V2/V3's head count, one node, no tensor parallelism), kv_lora_rank 512, rope 64,
and a small hidden size (512), MLP (512) and vocabulary (1024), 2 layers, bf16: the weights
are ~160 MB (mostly the 128 heads' projections) while attention reads batch x context x 576
cache values per layer and does 2 x 128 x 1088 FLOPs per cached token, so at context 2048 and
batch 8 attention is the largest part of a step (stock: 50 %; the rest is vLLM's per-step
work common to both backends, see docs/performance.md), as in long-context serving of the
real models, where the weights are shared by the batch and the cache is not.

Each backend runs in its own process (this script with --worker), vLLM in-process
(VLLM_ENABLE_V1_MULTIPROCESSING=0) driven through LLMEngine.add_request / step(); all stay
resident. Per config (context x batch): each prefills its prompts (one per step, not timed)
and runs --warmup decode steps, then single decode steps of `batch` tokens are timed in turn,
the order rotated every step, so the shared machine's load swings hit all alike (runs that
timed each backend separately varied 5x within minutes here). tokens/s = batch / median
step time (prefill excluded; VLLM_CPU_KVCACHE_SPACE=1). The attention share is the
profiler's time in the decode kernel (mla_ext::decode, CPU_MLA's _C::mla_decode_kvcache or
AMX_MLA's _C::decode_attention_cpu) and in the cache write (mla_ext::append_kv, CPU_MLA's
index_put_ or AMX_MLA's _C::concat_and_cache_mla_cpu)
over --profile-steps profiled steps' wall time.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

DECODE_OPS = ("mla_ext::decode", "_C::mla_decode_kvcache", "_C::decode_attention_cpu")
# name -> (vLLM attention_backend, MLA_EXT_VLLM_CPU opt-in)
BACKENDS = {"stock": ("CPU_MLA", False), "mla_ext": ("CPU_MLA", True),
            "stock_amx": ("AMX_MLA", False), "mla_ext_amx": ("AMX_MLA", True)}
# ours -> the stock backend it takes the place of
PAIRS = {"mla_ext": "stock", "mla_ext_amx": "stock_amx"}
WRITE_OPS = ("mla_ext::append_kv", "aten::index_put_", "_C::concat_and_cache_mla_cpu")


class Worker:
    """The worker side: one vLLM engine in this process, driven by JSON commands on stdin,
    answering on the file descriptor --reply-fd (vLLM logs to stdout / stderr)."""

    def __init__(self, args):
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; 8 x 2.1k tokens x 2 layers need ~40 MB
        import torch
        from vllm import LLM
        from vllm.v1.attention.backends.registry import AttentionBackendEnum

        self.args = args
        self.max_len = max(args.contexts) + args.warmup + args.steps + args.profile_steps + max(args.batches) + 8
        llm = LLM(args.model, skip_tokenizer_init=True, dtype=args.dtype, enforce_eager=True,
                  attention_backend=args.attention_backend, max_model_len=self.max_len, max_num_batched_tokens=self.max_len,
                  max_num_seqs=max(args.batches), seed=0, enable_prefix_caching=False)
        self.engine = llm.llm_engine
        self.rid = 0
        self.info = {"backend_path": AttentionBackendEnum[args.attention_backend].get_path(),
                     "torch_threads": torch.get_num_threads()}

    def config(self, ctx: int, batch: int) -> dict:
        from vllm import SamplingParams

        sp = SamplingParams(temperature=0.0, max_tokens=self.max_len - ctx - 2, ignore_eos=True, detokenize=False)
        for _ in range(batch):
            prompt = [(7 * self.rid + 13 * t) % 1000 + 2 for t in range(ctx)]
            self.engine.add_request(f"r{self.rid}", {"prompt_token_ids": prompt}, sp)
            self.rid += 1
        # Prefill: one prompt per step (the token budget is max_model_len, and chunked prefill
        # is off for MLA on CPU), which keeps the prefill's SDPA memory to one sequence's;
        # until every request has its first token. Then untimed warm-up decode steps (the
        # first ones run 3-30x slower: allocations, oneDNN setup).
        t0 = time.perf_counter()
        first = set()
        while len(first) < batch:
            first.update(o.request_id for o in self.engine.step() if o.outputs and o.outputs[0].token_ids)
        prefill_s = time.perf_counter() - t0
        for _ in range(self.args.warmup):
            self.engine.step()
        return {"prefill_s": prefill_s}

    def step(self) -> dict:
        t0 = time.perf_counter()
        outs = self.engine.step()
        return {"t": time.perf_counter() - t0, "tokens": sum(1 for o in outs)}

    def profile(self, n: int) -> dict:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            for _ in range(n):
                self.engine.step()
            wall = time.perf_counter() - t0
        ev = {e.key: e for e in prof.key_averages()}
        us = lambda names: sum(ev[k].cpu_time_total for k in names if k in ev)  # noqa: E731
        return {"profiled_wall_s": wall, "decode_kernel_share": us(DECODE_OPS) / 1e6 / wall,
                "cache_write_share": us(WRITE_OPS) / 1e6 / wall,
                "decode_kernel_calls": sum(ev[k].count for k in DECODE_OPS if k in ev),
                "top_ops_ms_per_step": {e.key: round(e.self_cpu_time_total / 1e3 / n, 2) for e in
                                        sorted(ev.values(), key=lambda e: -e.self_cpu_time_total)[:8]}}

    def finish(self) -> dict:
        self.engine.abort_request([f"r{i}" for i in range(self.rid)])
        while self.engine.has_unfinished_requests():
            self.engine.step()
        return {}


def worker_main(args) -> None:
    reply = os.fdopen(args.reply_fd, "w", buffering=1)
    w = Worker(args)
    reply.write(json.dumps(w.info) + "\n")
    for line in sys.stdin:
        cmd = json.loads(line)
        op = cmd.pop("op")
        if op == "exit":
            break
        reply.write(json.dumps(getattr(w, op)(**cmd)) + "\n")
    reply.flush()
    sys.stdout.flush()
    os._exit(0)  # skip vLLM's slow in-process engine shutdown


class Client:
    """The parent's handle on one worker process."""

    def __init__(self, name: str, argv: list, env: dict):
        r, wfd = os.pipe()
        self.name = name
        self.proc = subprocess.Popen(argv + ["--reply-fd", str(wfd)], env=env, stdin=subprocess.PIPE, text=True,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, pass_fds=(wfd,))
        os.close(wfd)
        self.replies = os.fdopen(r, "r")

    def read(self) -> dict:
        line = self.replies.readline()
        if not line:
            raise RuntimeError(f"worker {self.name} died (rc {self.proc.poll()})")
        return json.loads(line)

    def send(self, op: str, **kw) -> None:
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        self.proc.stdin.flush()

    def call(self, op: str, **kw) -> dict:
        self.send(op, **kw)
        return self.read()


def cpu_model() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def cpu_flags() -> list:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("flags"):
                return sorted(f for f in line.split()[2:] if f.startswith(("avx", "amx")))
    except OSError:
        pass
    return []


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--contexts", type=int, nargs="+", default=[512, 2048])
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--steps", type=int, default=16, help="timed decode steps per config and backend")
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=4, help="decode steps run before timing, per config")
    ap.add_argument("--heads", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", default=None)
    ap.add_argument("--note", default="")
    ap.add_argument("--quiet", action="store_true", help="record that nothing else ran on the machine")
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--model", default=None)
    ap.add_argument("--reply-fd", type=int, default=None)
    ap.add_argument("--attention-backend", default="CPU_MLA", help=argparse.SUPPRESS)  # worker only
    ap.add_argument("--backends", nargs="+", default=None, choices=list(BACKENDS),
                    help="default: all four on an AMX CPU, else stock and mla_ext")
    args = ap.parse_args()
    if args.worker:
        worker_main(args)

    import vllm_child  # tests/vllm_child.py: the seeded model

    tmp = Path(tempfile.mkdtemp(prefix="bench_vllm_"))
    model = tmp / "model"
    vllm_child.make_model(str(model), layers=args.layers, heads=args.heads, hidden=args.hidden, vocab=1024,
                          intermediate=512, max_pos=max(args.contexts) + 512)
    argv = [sys.executable, __file__, "--worker", "--model", str(model), "--dtype", args.dtype,
            "--steps", str(args.steps), "--profile-steps", str(args.profile_steps), "--warmup", str(args.warmup),
            "--contexts", *map(str, args.contexts), "--batches", *map(str, args.batches)]
    import torch

    amx = bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())
    names = args.backends or (list(BACKENDS) if amx else ["stock", "mla_ext"])
    default_stock = "stock_amx" if amx else "stock"  # what vLLM runs on this CPU when not told
    load_before = os.getloadavg()
    clients = {}
    for name in names:  # all resident at once, started together
        backend, opt_in = BACKENDS[name]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), VLLM_ENABLE_V1_MULTIPROCESSING="0")
        env.pop("MLA_EXT_VLLM_CPU", None)
        if opt_in:
            env["MLA_EXT_VLLM_CPU"] = "1"
        clients[name] = Client(name, argv + ["--attention-backend", backend], env)
    info = {name: c.read() for name, c in clients.items()}
    for name, got in info.items():  # never time stock vLLM under mla_ext's name (or the reverse)
        ours = got["backend_path"].startswith("mla_ext.")
        if ours != BACKENDS[name][1]:
            raise SystemExit(
                f"bench_vllm: worker {name!r} runs {got['backend_path']} for {BACKENDS[name][0]}; expected "
                f"{'mla_ext' if BACKENDS[name][1] else 'stock vLLM'}. Is mla_ext installed in this venv "
                f"(`make vllm-venv`; vLLM logs 'Failed to load plugin mla_ext' otherwise)?")

    table = []
    for ctx in args.contexts:
        for batch in args.batches:
            row = {"context": ctx, "batch": batch}
            for c in clients.values():  # prefill + warm-up, one after the other (not timed)
                row.setdefault("_prefill", {})[c.name] = c.call("config", ctx=ctx, batch=batch)["prefill_s"]
            times = {n: [] for n in names}
            for i in range(args.steps):  # single decode steps, the order rotated every step
                k = i % len(names)
                for n in names[k:] + names[:k]:
                    times[n].append(clients[n].call("step")["t"])
            for n in names:
                prof = clients[n].call("profile", n=args.profile_steps)
                clients[n].call("finish")
                med = statistics.median(times[n])
                row[n] = {"tokens_per_s": batch / med, "median_step_ms": 1e3 * med,
                          "step_ms": [round(1e3 * t, 2) for t in times[n]], "prefill_s": row["_prefill"][n], **prof}
            del row["_prefill"]
            parts = []
            for ours, stock in PAIRS.items():
                if ours in row and stock in row:
                    key = "speedup" if ours == "mla_ext" else f"speedup_{ours[len('mla_ext_'):]}"
                    row[key] = row[ours]["tokens_per_s"] / row[stock]["tokens_per_s"]
                    parts.append(f"{ours} {row[ours]['tokens_per_s']:.1f} vs {stock} "
                                 f"{row[stock]['tokens_per_s']:.1f} tok/s ({row[key]:.2f}x; decode kernel "
                                 f"{100 * row[ours]['decode_kernel_share']:.0f}% vs "
                                 f"{100 * row[stock]['decode_kernel_share']:.0f}% of a step)")
            ours_best = max((n for n in names if n in PAIRS), key=lambda n: row[n]["tokens_per_s"], default=None)
            if ours_best and default_stock in row:
                row["speedup_vs_default"] = row[ours_best]["tokens_per_s"] / row[default_stock]["tokens_per_s"]
                parts.append(f"best mla_ext ({ours_best}) vs vLLM's default here ({default_stock}): "
                             f"{row['speedup_vs_default']:.2f}x")
            print(f"ctx {ctx} batch {batch}: " + "; ".join(parts), flush=True)
            table.append(row)
    for c in clients.values():
        c.send("exit")
    load_after = os.getloadavg()

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    import vllm

    record = {
        "benchmark": "bench_vllm", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit, "cpu_model": cpu_model(), "cpu_flags": cpu_flags(), "cpus": os.cpu_count(),
        "omp_threads": args.threads, "torch": torch.__version__, "vllm": vllm.__version__,
        "model": {"layers": args.layers, "heads": args.heads, "hidden": args.hidden, "kv_lora_rank": 512,
                  "qk_nope": 128, "qk_rope": 64, "v": 128, "vocab": 1024, "intermediate": 512, "dtype": args.dtype},
        "method": ("every backend resident in its own process; after each config's prefill and "
                   "warm-up steps, single decode steps timed in turn, the order rotated every step, "
                   "so that the machine's load swings hit all alike; medians"),
        "backends": {n: {"attention_backend": BACKENDS[n][0], "mla_ext_opt_in": BACKENDS[n][1]} for n in names},
        "vllm_default_backend": default_stock,
        "warmup_steps": args.warmup, "timed_steps": args.steps,
        "quiet": args.quiet,
        "note": args.note or ("NOT a quiet machine: 2 shared cores, other agents ran builds during the run; "
                              "medians reported"),
        "loadavg_before": load_before, "loadavg_after": load_after,
        "backend_paths": {n: info[n]["backend_path"] for n in info},
        "torch_threads_in_worker": {n: info[n]["torch_threads"] for n in info},
        "results": table,
    }
    print(json.dumps(table, indent=1))
    out = args.out or str(ROOT / "benchmarks" / "results" / f"vllm-cpu-{record['date'][:10]}-{commit}.json")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w") as f:
        json.dump(record, f, indent=1)
    print("wrote", out)


if __name__ == "__main__":
    main()
