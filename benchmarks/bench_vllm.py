"""End-to-end vLLM decode speed on CPU: stock CPU_MLA vs mla_ext (MLA_EXT_VLLM_CPU=1).

    make bench-vllm                      # or: ~/.cache/mla_ext/venv-vllm/bin/python benchmarks/bench_vllm.py

Model: a seeded DeepSeek-V2-shaped model (tests/vllm_child.py make_model) with 128 heads
(DeepSeek-V2/V3's head count, one node, no tensor parallelism), kv_lora_rank 512, rope 64,
and a small hidden size (512), MLP (512) and vocabulary (1024), 2 layers, bf16: per decode
step the weights are ~60 MB while attention reads batch x context x 576 cache values per
layer and does 2 x 128 x 1088 FLOPs per cached token, so at context 2048 attention is most
of the step, as it is for long contexts in the real models, where weights are shared
across the batch and the cache is not.

Each backend runs in its own process (this script with --worker), with vLLM in-process
(VLLM_ENABLE_V1_MULTIPROCESSING=0) driven through LLMEngine.add_request / step(): the
batch's prompts (context tokens each) are prefilled, then every later step is a pure
decode step of `batch` tokens, timed one by one (prefill excluded; VLLM_CPU_KVCACHE_SPACE=1). tokens/s = batch /
median step time (after --warmup untimed decode steps). The attention share is the profiler's time in the decode kernel
(mla_ext::decode or _C::mla_decode_kvcache) and in the cache write (mla_ext::append_kv, or
stock's index_put_ ops) over a few profiled steps' wall time. Backends alternate for
--rounds rounds; medians over all timed steps of all rounds.
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

DECODE_OPS = ("mla_ext::decode", "_C::mla_decode_kvcache")
WRITE_OPS = ("mla_ext::append_kv", "aten::index_put_")


def worker(args) -> dict:
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; 8 x 2.1k tokens x 2 layers need ~40 MB
    import torch
    from torch.profiler import ProfilerActivity, profile
    from vllm import LLM, SamplingParams
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    max_ctx = max(args.contexts)
    max_len = max_ctx + args.warmup + args.steps + args.profile_steps + max(args.batches) + 8
    llm = LLM(args.model, skip_tokenizer_init=True, dtype=args.dtype, enforce_eager=True, attention_backend="CPU_MLA",
              max_model_len=max_len, max_num_batched_tokens=max_len, max_num_seqs=max(args.batches),
              seed=0, enable_prefix_caching=False)
    engine = llm.llm_engine
    res = {"backend_path": AttentionBackendEnum.CPU_MLA.get_path(), "torch_threads": torch.get_num_threads(),
           "configs": []}
    rid = 0
    for ctx in args.contexts:
        for batch in args.batches:
            sp = SamplingParams(temperature=0.0, max_tokens=args.warmup + args.steps + args.profile_steps + batch + 4,
                                ignore_eos=True, detokenize=False)
            for i in range(batch):
                prompt = [(7 * rid + 13 * t) % 1000 + 2 for t in range(ctx)]
                engine.add_request(f"r{rid}", {"prompt_token_ids": prompt}, sp)
                rid += 1
            # Prefill: one prompt per step (the token budget is max_model_len, and
            # chunked prefill is off for MLA on CPU), which keeps the prefill's SDPA memory to
            # one sequence's; until every request has its first token.
            t0 = time.perf_counter()
            first = set()
            while len(first) < batch:
                first.update(o.request_id for o in engine.step() if o.outputs and o.outputs[0].token_ids)
            prefill_s = time.perf_counter() - t0
            for _ in range(args.warmup):  # the first decode steps run 3-30x slower (allocations, oneDNN setup)
                engine.step()
            times = []
            for _ in range(args.steps):
                t0 = time.perf_counter()
                outs = engine.step()
                times.append(time.perf_counter() - t0)
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                t0 = time.perf_counter()
                for _ in range(args.profile_steps):
                    engine.step()
                prof_wall = time.perf_counter() - t0
            ev = {e.key: e for e in prof.key_averages()}
            us = lambda names: sum(ev[n].cpu_time_total for n in names if n in ev)  # noqa: E731
            while engine.has_unfinished_requests():
                engine.step()
            res["configs"].append({
                "context": ctx, "batch": batch, "step_s": times, "prefill_s": prefill_s,
                "median_step_s": statistics.median(times), "tokens_per_s": batch / statistics.median(times),
                "profiled_wall_s": prof_wall,
                "decode_kernel_share": us(DECODE_OPS) / 1e6 / prof_wall,
                "cache_write_share": us(WRITE_OPS) / 1e6 / prof_wall,
                "decode_kernel_calls": sum(ev[n].count for n in DECODE_OPS if n in ev),
                "top_ops_ms_per_step": {e.key: round(e.self_cpu_time_total / 1e3 / args.profile_steps, 2) for e in
                                        sorted(ev.values(), key=lambda e: -e.self_cpu_time_total)[:8]},
            })
            print(f"  ctx {ctx} batch {batch}: {res['configs'][-1]['tokens_per_s']:.1f} tok/s "
                  f"(decode kernel {100 * res['configs'][-1]['decode_kernel_share']:.0f}% of a step)", flush=True)
    return res


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
    ap.add_argument("--steps", type=int, default=12, help="timed decode steps per config and round")
    ap.add_argument("--profile-steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=4, help="decode steps run before timing, per config")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--heads", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--out", default=None)
    ap.add_argument("--note", default="")
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--model", default=None)
    ap.add_argument("--worker-out", default=None)
    args = ap.parse_args()
    if args.worker:
        with open(args.worker_out, "w") as f:
            json.dump(worker(args), f)
        sys.stdout.flush()
        os._exit(0)  # skip vLLM's slow in-process engine shutdown; the result is on disk

    import vllm_child  # tests/vllm_child.py: the seeded model

    tmp = Path(tempfile.mkdtemp(prefix="bench_vllm_"))
    model = tmp / "model"
    vllm_child.make_model(str(model), layers=args.layers, heads=args.heads, hidden=args.hidden, vocab=1024,
                          intermediate=512, max_pos=max(args.contexts) + 512)
    common = [sys.executable, __file__, "--worker", "--model", str(model), "--dtype", args.dtype,
              "--steps", str(args.steps), "--profile-steps", str(args.profile_steps), "--warmup", str(args.warmup),
              "--contexts", *map(str, args.contexts), "--batches", *map(str, args.batches)]
    runs = {"stock": [], "mla_ext": []}
    load_before = os.getloadavg()
    for r in range(args.rounds):
        for name in ("stock", "mla_ext"):
            env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), VLLM_ENABLE_V1_MULTIPROCESSING="0")
            env.pop("MLA_EXT_VLLM_CPU", None)
            if name == "mla_ext":
                env["MLA_EXT_VLLM_CPU"] = "1"
            out = tmp / f"{name}_{r}.json"
            print(f"round {r} {name}", flush=True)
            subprocess.run(common + ["--worker-out", str(out)], env=env, check=True,
                           stdout=sys.stdout, stderr=subprocess.DEVNULL)
            runs[name].append(json.loads(out.read_text()))
    load_after = os.getloadavg()

    table = []
    for ctx in args.contexts:
        for batch in args.batches:
            row = {"context": ctx, "batch": batch}
            for name in runs:
                cfgs = [c for run in runs[name] for c in run["configs"] if c["context"] == ctx and c["batch"] == batch]
                steps = [s for c in cfgs for s in c["step_s"]]
                med = statistics.median(steps)
                row[name] = {"tokens_per_s": batch / med, "median_step_ms": 1e3 * med,
                             "per_round_tokens_per_s": [c["tokens_per_s"] for c in cfgs],
                             "decode_kernel_share": statistics.median(c["decode_kernel_share"] for c in cfgs),
                             "cache_write_share": statistics.median(c["cache_write_share"] for c in cfgs)}
            row["speedup"] = row["mla_ext"]["tokens_per_s"] / row["stock"]["tokens_per_s"]
            table.append(row)

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    import torch
    import vllm

    record = {
        "benchmark": "bench_vllm", "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "commit": commit, "cpu_model": cpu_model(), "cpu_flags": cpu_flags(), "cpus": os.cpu_count(),
        "omp_threads": args.threads, "torch": torch.__version__, "vllm": vllm.__version__,
        "model": {"layers": args.layers, "heads": args.heads, "hidden": args.hidden, "kv_lora_rank": 512,
                  "qk_nope": 128, "qk_rope": 64, "v": 128, "vocab": 1024, "intermediate": 512, "dtype": args.dtype},
        "method": ("decode steps timed one by one after the prefill step and warm-up decode steps; "
                   "medians over all timed steps of all rounds"), "warmup_steps": args.warmup,
        "steps_per_round": args.steps, "rounds": args.rounds,
        "quiet": False,
        "note": args.note or ("NOT a quiet machine: 2 shared cores, other agents ran builds during the run; "
                              "medians reported"),
        "loadavg_before": load_before, "loadavg_after": load_after,
        "backend_paths": {n: runs[n][0]["backend_path"] for n in runs},
        "torch_threads_in_worker": {n: runs[n][0]["torch_threads"] for n in runs},
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
