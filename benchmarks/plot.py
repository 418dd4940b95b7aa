"""Pictures of the recorded benchmark runs: PNGs under docs/img/ from the JSON under benchmarks/results/.

    python benchmarks/plot.py [--results benchmarks/results] [--out docs/img]      (or: make plots)

Needs matplotlib only (requirements-plots.txt; headless Agg backend), neither torch nor a
built mla_ext. Nothing is drawn from a number that is not in a record. Pictures:

1. roofline-<machine>.png, one per machine: GFLOP/s (TFLOP/s on GPUs) against arithmetic
   intensity, FLOPs per byte counted as in SPEC section 5 (= the record's gflops / gbps, so
   an fp8 cache counts 1 byte per value); the ceilings measured in the SAME run as lines
   (copy bandwidth as the sloped roof, the fp32 FMA peak and torch's fp32 / bf16 matmul
   rates as flat ones); one labelled point per shape x implementation. Drawn from the
   machine's newest full run (bench_decode.py without --sweep, device_check.sh's
   record.json or bench_cuda.py's JSON), or from its newest sweep where it has no full run.
2. scaling-L-<machine>.png: milliseconds per decode call against context length L, log-log,
   one line per implementation, from the machine's newest `bench_decode.py --sweep L` run,
   with the same-run bound max(bytes / copy rate, FLOPs / best compute ceiling) dashed.
3. vllm-tokens-<machine>.png: decode tokens/s against batch size, stock vLLM vs mla_ext, one
   line per backend and context length, from benchmarks/bench_vllm.py records when any
   exist; skipped (with a line saying so) otherwise. A record file counts as one when its
   entries (under "records" or "results") carry a batch size ("batch" or "b"), a decode rate
   ("decode_tokens_per_s", "tokens_per_s" or "tok_s") and a backend ("backend" or "impl").

Each picture names its record file, machine, commit and date; index.md beside the PNGs
lists the same for the docs' captions. Machines: a CPU is its /proc/cpuinfo model name,
family and model number (records before the provenance fields say nothing else); a GPU its
name. Dates and commits: the record's own fields (bench_decode.py writes them since the
--sweep mode), else the commit that added the file to git ("added in"), else the file time.
"""
from __future__ import annotations

import argparse
import datetime
import glob
import json
import math
import os
import re
import subprocess
import sys
import textwrap
from typing import Dict, List, Optional, Tuple

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One look per implementation, the same in every picture.
STYLE = {
    "mla_ext": ("tab:blue", "o", "mla_ext (bf16 cache)"),
    "mla_ext-fp8": ("tab:cyan", "s", "mla_ext (fp8 cache)"),
    "vllm": ("tab:red", "^", "vLLM CPU MLA kernel"),
    "torch-batched": ("tab:green", "D", "plain torch, batched gather + bmm"),
    "torch": ("tab:olive", "X", "plain torch, per-sequence reference"),
    "stock": ("tab:red", "^", "stock vLLM"),
    "stock_amx": ("tab:orange", "v", "stock vLLM, AMX_MLA"),
    "mla_ext_amx": ("tab:purple", "P", "vLLM + mla_ext in AMX_MLA's place"),
}
OTHER_COLOURS = ["tab:purple", "tab:brown", "tab:pink", "tab:gray"]


def style(impl: str, i: int = 0) -> Tuple[str, str, str]:
    return STYLE.get(impl, (OTHER_COLOURS[i % len(OTHER_COLOURS)], "P", impl))


# --------------------------------------------------------------------------- records


class Run:
    """One record file, normalised: machine, provenance, ceilings, decode points."""

    def __init__(self, path: str, data: dict):
        self.path = path
        self.file = os.path.basename(path)
        self.data = data
        self.kind = "unknown"  # bench | sweep | gpu-check | vllm
        self.is_gpu = False
        self.machine = "unknown machine"
        self.slug = "unknown"
        self.threads: Optional[int] = None
        self.ceilings: Dict[str, float] = {}
        self.points: List[dict] = []  # decode records: name, impl, ms, gflops, gbps, L, b, h, s_q
        self.commit, self.when, self.provenance = provenance(path, data)
        self.date = self.when[:10]
        self.note = data.get("note")
        dev = data.get("device_info") or {}
        lb, la = dev.get("load_before"), dev.get("load_after")
        self.load = (f"1-min load average {lb[0]:.1f} before, {la[0]:.1f} after" if lb and la else None)


def slugify(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def git(*args: str) -> Optional[str]:
    try:
        r = subprocess.run(["git", "-C", ROOT, *args], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    out = r.stdout.strip()
    return out if r.returncode == 0 and out else None


def provenance(path: str, data: dict) -> Tuple[Optional[str], str, str]:
    """(commit, ISO date and time, how the two are known)."""
    commit, date = data.get("commit"), data.get("date")
    if commit and commit != "unknown" and date:
        c = str(commit)[:7] + (" + local changes" if data.get("dirty") else "")
        return c, str(date), "measured at"
    added = git("log", "--diff-filter=A", "--follow", "--format=%h %cI", "--", os.path.abspath(path))
    if added:
        h, d = added.splitlines()[-1].split()
        return h, d, "added in"
    mtime = datetime.datetime.fromtimestamp(os.path.getmtime(path), datetime.timezone.utc)
    return None, mtime.isoformat(timespec="seconds"), "file dated"


def cpu_machine(dev: dict) -> Tuple[str, str]:
    cpu = dev.get("cpu") or {}
    model = cpu.get("model") or "unknown CPU"
    parts = [f"family {cpu['family']}" if "family" in cpu else None,
             f"model {cpu['model_id']}" if "model_id" in cpu else None]
    extra = ", ".join(p for p in parts if p)
    name = f"{model} ({extra})" if extra else model
    slug = slugify(model) + (f"-f{cpu['family']}" if "family" in cpu else "") + \
        (f"-m{cpu['model_id']}" if "model_id" in cpu else "")
    return name, "cpu-" + slug


def vllm_rows(entries: list) -> List[dict]:
    rows = []
    for e in entries:
        if not isinstance(e, dict):
            continue
        # benchmarks/bench_vllm.py: one entry per (context, batch), one dict per backend in it.
        nested = [k for k in ("stock", "mla_ext", "stock_amx", "mla_ext_amx") if isinstance(e.get(k), dict)]
        if nested and e.get("batch") is not None:
            rows += vllm_rows([{**e[k], "backend": k, "batch": e["batch"], "context": e.get("context")} for k in nested])
            continue
        batch = e.get("batch", e.get("b"))
        rate = next((e[k] for k in ("decode_tokens_per_s", "tokens_per_s", "tok_s") if e.get(k) is not None), None)
        backend = e.get("backend", e.get("impl"))
        if batch is None or rate is None or backend is None:
            continue
        ctx = next((e[k] for k in ("context", "ctx", "L", "context_len", "prompt_len") if e.get(k) is not None), None)
        rows.append({"batch": int(batch), "tokens_per_s": float(rate), "backend": str(backend), "context": ctx})
    return rows


def load_run(path: str) -> Optional[Run]:
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, ValueError) as e:
        print(f"# plot: skipping {path}: {e}", file=sys.stderr)
        return None
    if not isinstance(data, dict):
        return None
    run = Run(path, data)
    entries = data.get("records", data.get("results"))
    if not isinstance(entries, list):
        return None

    rows = vllm_rows(entries)
    if rows:
        run.kind = "vllm"
        run.points = rows
        dev = data.get("device_info") or {}
        if dev.get("cpu"):
            run.machine, run.slug = cpu_machine(dev)
        elif data.get("device") or dev.get("gpu"):
            run.is_gpu = True
            run.machine = str(data.get("device") or dev.get("gpu"))
            run.slug = "gpu-" + slugify(run.machine)
        elif data.get("cpu_model"):  # bench_vllm.py names the CPU at the top level
            run.machine = str(data["cpu_model"]) + (f", {data['cpus']} CPUs" if data.get("cpus") else "")
            run.slug = "cpu-" + slugify(str(data["cpu_model"]))
        else:
            run.machine = str(data.get("machine", "unknown machine"))
            run.slug = slugify(run.machine) or "unknown"
        return run

    if "device_info" in data:  # bench_decode.py (CPU or CUDA)
        dev = data["device_info"]
        ceil = data.get("ceilings") or {}
        if dev.get("device") == "cuda":
            run.is_gpu = True
            run.machine = str(dev.get("gpu", "unknown GPU"))
            run.slug = "gpu-" + slugify(run.machine)
        else:
            run.machine, run.slug = cpu_machine(dev)
            run.threads = (dev.get("cpu") or {}).get("torch_threads")
        for key, label in (("copy_gbps", "copy_gbps"), ("fma_peak_gflops", "fma_gflops"),
                           ("matmul_fp32_gflops", "matmul_fp32_gflops"), ("matmul_bf16_gflops", "matmul_bf16_gflops")):
            if ceil.get(key):
                run.ceilings[label] = float(ceil[key])
        decode = [r for r in entries if r.get("op", "decode") == "decode" and r.get("gflops") and r.get("gbps")]
        run.kind = "sweep" if data.get("sweep") or any(r.get("sweep") for r in decode) else "bench"
    elif "results" in data and ("device" in data or "dry_run" in data):  # device_check.sh record.json
        if data.get("dry_run") or not data.get("device"):
            return None
        run.kind, run.is_gpu = "gpu-check", True
        run.machine = str(data["device"])
        run.slug = "gpu-" + slugify(run.machine)
        ceil = data.get("ceilings") or {}
        if ceil.get("copy_gbps"):
            run.ceilings["copy_gbps"] = float(ceil["copy_gbps"])
        if ceil.get("bf16_tflops"):
            run.ceilings["matmul_bf16_gflops"] = float(ceil["bf16_tflops"]) * 1e3
        decode = []
        for r in entries:
            if r.get("tflops") and r.get("gbps") and not str(r.get("name", "")).startswith("append"):
                decode.append({**r, "gflops": float(r["tflops"]) * 1e3})
    else:
        return None
    run.points = [{"name": r.get("name", "?"), "impl": r.get("impl", "?"), "ms": float(r["ms"]),
                   "gflops": float(r["gflops"]), "gbps": float(r["gbps"]), "L": r.get("L"), "b": r.get("b"),
                   "h": r.get("h"), "s_q": r.get("s_q"), "kernel": r.get("kernel"), "block_size": r.get("block_size")}
                  for r in decode if r.get("ms")]
    return run if run.points else None


def load_runs(results: str) -> List[Run]:
    paths = sorted(glob.glob(os.path.join(results, "**", "*.json"), recursive=True))
    return [r for r in (load_run(p) for p in paths) if r is not None]


def newest(runs: List[Run]) -> Run:
    """The newest run; among runs of one time (one commit) the one with the most threads, then the last name."""
    return max(runs, key=lambda r: (r.when, r.threads or 0, r.file))


def by_machine(runs: List[Run], kind: Tuple[str, ...]) -> Dict[str, Run]:
    groups: Dict[str, List[Run]] = {}
    for r in runs:
        if r.kind in kind:
            groups.setdefault(r.slug, []).append(r)
    if kind == ("vllm",):
        # A quiet record (bench_vllm.py --quiet) before any that is not; then a repeat of one
        # (context, batch) point must not hide the full sweep: the most points, the newest.
        def pick(rs):
            rs = [r for r in rs if r.data.get("quiet") is True] or rs
            return newest([r for r in rs if len(r.points) == max(len(x.points) for x in rs)])

        return {slug: pick(rs) for slug, rs in sorted(groups.items())}
    return {slug: newest(rs) for slug, rs in sorted(groups.items())}


def save(fig, run: "Run", out: str, kind: str) -> str:
    """Footer (machine, commit, date, record), layout, PNG out/<kind>-<machine>.png."""
    fig.tight_layout(rect=(0, footer(fig, run), 1, 1))
    path = os.path.join(out, f"{kind}-{run.slug}.png")
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def caption(run: Run) -> str:
    threads = f", {run.threads} threads" if run.threads else ""
    commit = f"{run.provenance} {run.commit}, " if run.commit else ""
    return f"{run.machine}{threads}; {commit}{run.date}; {run.file}"


# --------------------------------------------------------------------------- pictures


def short(name: str) -> str:
    """A point's label: the shape name, "sweep-L4096" as "L=4096"."""
    return "L=" + name[len("sweep-L"):] if name.startswith("sweep-L") else name


def footer(fig, run: Run) -> float:
    """Machine, commit, date, record (and the run's note) under the axes; returns the figure
    fraction they take, for tight_layout's rect."""
    text = caption(run) + (f"; {run.load}" if run.load else "")
    if run.note:
        text += f"\nnote: {run.note}"
    width = int(fig.get_figwidth() * 16)  # characters of 7-point text per line at this size
    lines = [w for para in text.split("\n") for w in textwrap.wrap(para, width)]
    fig.text(0.01, 0.005, "\n".join(lines), fontsize=7, color="0.35", ha="left", va="bottom")
    return 0.01 + 0.13 * len(lines) / fig.get_figheight()


def place_labels(ax, labels, points, xlim, ylim, div, axes_in) -> None:
    """Annotate each (text, x, y, colour) beside its point, on the first side (right, left, then
    the same raised or lowered) where the text overlaps neither a marker nor a label already
    placed. Positions are estimated in axes fractions of the log-log axes (7-point text)."""
    (x0, x1), (y0, y1) = xlim, ylim
    w_in, h_in = axes_in

    def frac(x, y):
        return math.log(x / x0) / math.log(x1 / x0), math.log(y / y0) / math.log(y1 / y0)

    pt_x, pt_y = 1 / 72 / w_in, 1 / 72 / h_in  # one point as a fraction of the axes
    boxes = []
    for x, y in points:  # markers, ~8 points wide
        fx, fy = frac(x, y)
        boxes.append((fx - 5 * pt_x, fx + 5 * pt_x, fy - 5 * pt_y, fy + 5 * pt_y))

    def free(b):
        return 0 <= b[0] and b[1] <= 1 and 0 <= b[2] and b[3] <= 1 and not any(
            b[0] < o[1] and o[0] < b[1] and b[2] < o[3] and o[2] < b[3] for o in boxes)

    for text, x, y, colour in sorted(labels, key=lambda t: -t[2]):
        fx, fy = frac(x, y)
        width, height = 3.9 * len(text) * pt_x, 8 * pt_y
        choice = None
        for dx, dy in ((7, -3), (-7, -3), (7, 6), (-7, 6), (7, -12), (-7, -12)):
            bx0 = fx + dx * pt_x - (width if dx < 0 else 0)
            box = (bx0, bx0 + width, fy + dy * pt_y, fy + dy * pt_y + height)
            if free(box):
                choice = (dx, dy, box)
                break
        dx, dy, box = choice or (7, -3, (fx, fx + width, fy, fy + height))
        boxes.append(box)
        ax.annotate(text, (x, y / div), textcoords="offset points", xytext=(dx, dy),
                    ha="right" if dx < 0 else "left", va="bottom", fontsize=7, color=colour)


def roofline(run: Run, out: str) -> str:
    gpu = run.is_gpu
    unit, div = ("TFLOP/s", 1e3) if gpu else ("GFLOP/s", 1.0)
    pts = run.points
    ai = [p["gflops"] / p["gbps"] for p in pts]
    flat = sorted(((k, v) for k, v in run.ceilings.items() if k != "copy_gbps"), key=lambda kv: -kv[1])
    top = flat[0][1] if flat else None
    bw = run.ceilings.get("copy_gbps")
    ridge = top / bw if top and bw else None
    lo = min(ai + ([ridge] if ridge else [])) / 3
    hi = max(ai + ([ridge] if ridge else [])) * 3
    xs = [lo * (hi / lo) ** (i / 200) for i in range(201)]
    ys_all = [p["gflops"] for p in pts] + [v for _, v in flat]
    y_lo, y_hi = min(ys_all) / 2, max(ys_all) * 3

    fig, ax = plt.subplots(figsize=(11, 6))
    names = {"fma_gflops": "fp32 FMA peak (fma_peak.c)", "matmul_fp32_gflops": "torch fp32 matmul",
             "matmul_bf16_gflops": "torch bf16 matmul"}
    if bw:
        ys = [min(bw * x, top) if top else bw * x for x in xs]
        ax.plot(xs, [y / div for y in ys], color="black", lw=2,
                label=f"roof: copy {bw:.1f} GB/s x intensity,\ncapped by the best compute ceiling")
        ax.plot(xs, [bw * x / div for x in xs], color="black", lw=0.8, ls=":")
    for (k, v), ls in zip(flat, ["--", "-.", ":", (0, (5, 1))]):
        ax.axhline(v / div, color="0.35", lw=1, ls=ls, label=f"{names.get(k, k)}: {v / div:.3g} {unit}")
    impls = list(dict.fromkeys(p["impl"] for p in pts))
    # One marker per shape x implementation; shapes of one implementation that land on the same
    # spot (same intensity, within 15 % in rate) share one label so that the text stays legible.
    labels = []
    for i, impl in enumerate(impls):
        colour, marker, label = style(impl, i)
        mine = [(p, x) for p, x in zip(pts, ai) if p["impl"] == impl]
        ax.scatter([x for _, x in mine], [p["gflops"] / div for p, _ in mine], color=colour, marker=marker, s=60,
                   zorder=3, label=label, edgecolors="black", linewidths=0.5)
        groups: List[List[Tuple[dict, float]]] = []
        for p, x in sorted(mine, key=lambda px: (px[1], px[0]["gflops"])):
            g = next((g for g in groups if abs(math.log(x / g[0][1])) < 0.1
                      and abs(math.log(p["gflops"] / g[0][0]["gflops"])) < 0.14), None)
            (g.append((p, x)) if g else groups.append([(p, x)]))
        labels += [(", ".join(short(q["name"]) for q, _ in g), g[0][1], g[0][0]["gflops"], colour) for g in groups]
    place_labels(ax, labels, [(x, p["gflops"]) for p, x in zip(pts, ai)], (lo, hi), (y_lo, y_hi), div,
                 axes_in=(fig.get_figwidth() * 0.68, fig.get_figheight() * 0.78))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlim(lo, hi)
    ax.set_ylim(y_lo / div, y_hi / div)
    ax.set_xlabel("arithmetic intensity, FLOPs / byte (SPEC section 5: cache read once)")
    ax.set_ylabel(unit)
    if run.kind == "sweep":
        p0 = pts[0]
        shapes = (f"--sweep L: b={p0.get('b')}, s_q={p0.get('s_q')}, h={p0.get('h')}, "
                  f"L = {', '.join(str(L) for L in sorted({p['L'] for p in pts}))}")
    else:
        shapes = ", ".join(dict.fromkeys(
            f"{p['name']} (b={p['b']}, h={p['h']}, L={p['L']})" if p.get("L") else p["name"] for p in pts))
    shapes = "\n".join(textwrap.wrap(shapes, 130))
    ax.set_title(f"Decode roofline: {run.machine}" + (f", {run.threads} threads" if run.threads else "")
                 + f"\n{shapes}", fontsize=9)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return save(fig, run, out, "roofline")


def scaling_L(run: Run, out: str) -> str:
    pts = [p for p in run.points if p.get("L")]
    impls = list(dict.fromkeys(p["impl"] for p in pts))
    fig, ax = plt.subplots(figsize=(8, 5.5))
    for i, impl in enumerate(impls):
        rows = sorted((p for p in pts if p["impl"] == impl), key=lambda p: p["L"])
        colour, marker, label = style(impl, i)
        kernels = sorted({p["kernel"] for p in rows if p.get("kernel")})
        label += f" [{', '.join(kernels)} kernel]" if kernels else ""
        ax.plot([p["L"] for p in rows], [p["ms"] for p in rows], color=colour, marker=marker, label=label)
    # Same-run lower bound: the bf16 cache read at the copy rate, or the FLOPs at the best ceiling.
    base = sorted((p for p in pts if p["impl"] == "mla_ext"), key=lambda p: p["L"])
    bw = run.ceilings.get("copy_gbps")
    peak = max((v for k, v in run.ceilings.items() if k != "copy_gbps"), default=None)
    if base and bw and peak:
        bound = [max(p["gflops"] * p["ms"] / peak, p["gbps"] * p["ms"] / bw) for p in base]
        ax.plot([p["L"] for p in base], bound, color="black", ls="--", lw=1,
                label=f"same-run bound: max(bytes / {bw:.1f} GB/s, FLOPs / {peak:.3g} GFLOP/s)")
    Ls = sorted({p["L"] for p in pts})
    ax.set_xscale("log", base=2)
    ax.set_xticks(Ls, [str(L) for L in Ls])
    ax.set_yscale("log")
    ax.set_xlabel("context length L (tokens per sequence)")
    ax.set_ylabel("ms per decode call (median)")
    p0 = pts[0]
    ax.set_title(f"Decode time vs context: {run.machine}" + (f", {run.threads} threads" if run.threads else "")
                 + f"\nb={p0.get('b')}, s_q={p0.get('s_q')}, h={p0.get('h')}, block size {p0.get('block_size')}",
                 fontsize=9)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8)
    return save(fig, run, out, "scaling-L")


def vllm_tokens(run: Run, out: str) -> str:
    fig, ax = plt.subplots(figsize=(8, 5.5))
    names = {"stock": "stock vLLM (CPU_MLA)", "mla_ext": "vLLM + mla_ext (CPU_MLA's place)",
             "stock_amx": "stock vLLM (AMX_MLA)", "mla_ext_amx": "vLLM + mla_ext (AMX_MLA's place)"}
    batches = sorted({p["batch"] for p in run.points})
    ctxs_all = sorted({p["context"] for p in run.points if p["context"] is not None})
    # One batch size and several contexts (a --batches 8 record): context on the x axis,
    # one line per backend; otherwise batch on the x axis, one line per backend and context.
    by_context = len(batches) == 1 and len(ctxs_all) > 1
    x_of = (lambda p: p["context"]) if by_context else (lambda p: p["batch"])  # noqa: E731
    keys = list(dict.fromkeys((p["backend"], None if by_context else p["context"]) for p in run.points))
    backends = list(dict.fromkeys(b for b, _ in keys))
    ctxs = list(dict.fromkeys(c for _, c in keys))
    for backend, ctx in keys:
        rows = sorted((p for p in run.points if p["backend"] == backend and (by_context or p["context"] == ctx)),
                      key=x_of)
        colour, marker, _ = style(backend, backends.index(backend))
        ls = ["-", "--", "-.", ":"][ctxs.index(ctx) % 4]
        ax.plot([x_of(p) for p in rows], [p["tokens_per_s"] for p in rows], color=colour, marker=marker, ls=ls,
                label=names.get(backend, backend) + (f", context {ctx}" if ctx is not None else ""))
    xs = ctxs_all if by_context else batches
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(x) for x in xs])
    ax.set_xlabel(f"context length (tokens), batch {batches[0]}" if by_context
                  else "batch size (sequences decoding together)")
    ax.set_ylabel("decode tokens/s (prefill excluded)")
    ax.set_title(f"vLLM decode throughput, stock vs mla_ext: {run.machine}", fontsize=9)
    ax.grid(True, which="both", alpha=0.25)
    ax.legend(fontsize=8)
    return save(fig, run, out, "vllm-tokens")


# --------------------------------------------------------------------------- main


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--results", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "img"))
    args = ap.parse_args(argv)

    runs = load_runs(args.results)
    if not runs:
        print(f"# plot: no usable records under {args.results}", file=sys.stderr)
        return 1
    os.makedirs(args.out, exist_ok=True)
    written: List[Tuple[str, Run]] = []
    full = by_machine(runs, ("bench", "gpu-check"))
    sweeps = by_machine(runs, ("sweep",))
    # A machine with sweeps only gets its roofline from its newest sweep (one point per L x impl).
    for run in {**sweeps, **full}.values():
        written.append((roofline(run, args.out), run))
    for run in sweeps.values():
        written.append((scaling_L(run, args.out), run))
    if not sweeps:
        print("# plot: no `bench_decode.py --sweep L` record: scaling picture skipped")
    vllm = by_machine(runs, ("vllm",))
    for run in vllm.values():
        written.append((vllm_tokens(run, args.out), run))
    if not vllm:
        print("# plot: no vLLM records (benchmarks/bench_vllm.py): tokens/s picture skipped")

    lines = ["# Pictures made by benchmarks/plot.py (`make plots`) from benchmarks/results/", "",
             "| picture | machine | commit | date | record |", "|---|---|---|---|---|"]
    for path, run in written:
        threads = f", {run.threads} threads" if run.threads else ""
        commit = f"{run.provenance} {run.commit}" if run.commit else "-"
        lines.append(f"| {os.path.basename(path)} | {run.machine}{threads} | {commit} | {run.date} | {run.file} |")
        print(f"# wrote {path}  ({caption(run)})")
    with open(os.path.join(args.out, "index.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
