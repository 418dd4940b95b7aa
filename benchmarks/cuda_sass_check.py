#!/usr/bin/env python3
"""SASS check of the CUDA kernels (no GPU): what ptxas really emitted for each kernel.

ptxas -v (benchmarks/cuda_compile_check.sh) says a kernel compiles without spills; it does not
say that the tensor-core kernel still runs on the tensor cores. A PTX wrapper in common.cuh
that compiles to something else (mma -> scalar FMAs, ldmatrix.trans -> plain ldmatrix,
cp.async -> plain loads, a dropped barrier or wait_group) still compiles and links. This
script disassembles the objects with cuobjdump (pip wheel nvidia-cuda-cuobjdump, installed by
`make cuda-tools`; the CUDA 13.0 toolkit here ships without it) and checks each tensor-core
decode kernel (every decode_tc_kernel<T, Cfg> instantiation, sm_80 and sm_90a) against RULES:

  HMMA.16816.F32.BF16 (bf16) / HMMA.16816.F32 (fp16), and no HMMA of another shape or type
  LDSM.16.M88.4 (ldmatrix .x4) and LDSM.16.MT88.4 (ldmatrix .x4.trans)
  LDGSTS (cp.async 16 B), LDGDEPBAR (commit_group), DEPBAR.LE SB0 (wait_group)
  BAR.SYNC at least once per __syncthreads of the kernel (4; fp8: 5)
  SHFL.BFLY (the __shfl_xor_sync row reductions)
  fp8 cache only: PRMT (the e4m3 byte spreading)
  no LDL / STL (local memory: spills) and no stack frame

and prints registers / stack / spill instructions / HMMA / LDSM / LDGSTS / BAR counts for every
kernel of every object. `--mutations` then plants bugs one at a time in a temporary copy of
csrc/ (MUTATIONS below), recompiles the affected file and asserts that the rules catch each one.

  benchmarks/cuda_sass_check.py --objects build/cuda-compile     # reuse cuda_compile_check.sh's objects
  benchmarks/cuda_sass_check.py                                   # compile into build/cuda-sass
  benchmarks/cuda_sass_check.py --objects build/cuda-compile --mutations
"""
from __future__ import annotations

import argparse
import dataclasses
import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = ("sm_80", "sm_90a")
# The flags of benchmarks/cuda_compile_check.sh minus -Werror on spills: a spill must show up
# in the SASS (LDL / STL), not stop the compile, so the mutation that forces one is checkable.
NVCC_FLAGS = ["-std=c++17", "-O3", "-lineinfo", "--use_fast_math", "--expt-relaxed-constexpr", "-Xptxas=-v"]


# ----------------------------------------------------------------------------------------------
# Parsing cuobjdump output


@dataclasses.dataclass
class Instr:
    opcode: str  # full opcode with modifiers, e.g. "HMMA.16816.F32.BF16"
    operands: str  # e.g. "R156, R176.reuse, R172, R156"
    pred: str = ""  # guard predicate, e.g. "@!P0", or ""


@dataclasses.dataclass
class Function:
    name: str  # mangled
    arch: str  # "sm_80"
    instrs: list[Instr] = dataclasses.field(default_factory=list)
    regs: int | None = None
    stack: int | None = None
    local: int | None = None
    demangled: str = ""

    def count(self, pattern: str, operands: str | None = None) -> int:
        rx = re.compile(pattern)
        orx = re.compile(operands) if operands else None
        return sum(1 for i in self.instrs if rx.search(i.opcode) and (orx is None or orx.search(i.operands)))


_CODE_FOR = re.compile(r"^\s*code for (sm_\w+)\s*$")
_FUNCTION = re.compile(r"^\s*Function\s*:\s*(\S+)\s*$")
# "/*0050*/   @!P0 LDG.E R5, [R2.64] ;   /* 0x... */"; the encoding may sit on this line or the next.
_INSTR = re.compile(r"^\s*/\*[0-9a-fA-F]+\*/\s+(?P<pred>@!?U?P[T0-9]+\s+)?(?P<op>[A-Z][A-Z0-9_]*(?:\.[A-Za-z0-9_]+)*)(?P<rest>[^;]*);")


def parse_sass(text: str) -> list[Function]:
    """Functions of `cuobjdump -sass` output, in order; each carries its arch and instructions."""
    funcs: list[Function] = []
    arch = ""
    cur: Function | None = None
    for line in text.splitlines():
        m = _CODE_FOR.match(line)
        if m:
            arch, cur = m.group(1), None
            continue
        m = _FUNCTION.match(line)
        if m:
            cur = Function(name=m.group(1), arch=arch)
            funcs.append(cur)
            continue
        if cur is None:
            continue
        m = _INSTR.match(line)
        if m:
            cur.instrs.append(Instr(m.group("op"), m.group("rest").strip(), (m.group("pred") or "").strip()))
    return funcs


_RES_FUNC = re.compile(r"^\s*Function\s+(\S+?):\s*$")
_RES_VALS = re.compile(r"\b(REG|STACK|SHARED|LOCAL):(\d+)")


def parse_res_usage(text: str) -> dict[tuple[str, str], dict[str, int]]:
    """`cuobjdump -res-usage` -> {(arch, mangled name): {"REG": .., "STACK": .., "LOCAL": ..}}."""
    out: dict[tuple[str, str], dict[str, int]] = {}
    arch, name = "", None
    for line in text.splitlines():
        m = re.match(r"^\s*arch = (sm_\w+)", line)
        if m:
            arch = m.group(1)
            continue
        m = _RES_FUNC.match(line)
        if m:
            name = m.group(1)
            continue
        if name is not None:
            vals = dict((k, int(v)) for k, v in _RES_VALS.findall(line))
            if vals:
                out[(arch, name)] = vals
                name = None
    return out


def demangle(names: list[str]) -> dict[str, str]:
    if not names:
        return {}
    try:
        res = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True, check=True)
        lines = res.stdout.splitlines()
        if len(lines) == len(names):
            return dict(zip(names, lines))
    except (OSError, subprocess.CalledProcessError):
        pass
    return {n: n for n in names}


# ----------------------------------------------------------------------------------------------
# Rules


@dataclasses.dataclass(frozen=True)
class Rule:
    """`pattern` (regex searched in the opcode; `operands` optionally in the operands) must occur
    at least `min` times (and at most `max`, when given) in every kernel the rule applies to."""

    name: str
    pattern: str
    min: int = 1
    max: int | None = None
    operands: str | None = None
    applies: str = "all"  # "all", "bf16", "fp16", "fp8", "16bit" (16-bit cache)
    why: str = ""

    def applies_to(self, k: "TcKernel") -> bool:
        return {
            "all": True,
            "bf16": k.dtype == "bf16",
            "fp16": k.dtype == "fp16",
            "fp8": k.fp8,
            "16bit": not k.fp8,
        }[self.applies]


@dataclasses.dataclass
class TcKernel:
    """A decode_tc_kernel instantiation: q / compute type and whether the cache is fp8."""

    func: Function
    dtype: str  # "bf16" | "fp16"
    fp8: bool
    config: str


# __syncthreads() of decode_tc_kernel (tests/test_cuda_sass_rules.py counts them in the source):
# loop top, row maxima, P, row sums; the fp8 cache adds "converted tile complete".
BARRIERS_16BIT = 4
BARRIERS_FP8 = 5

RULES: tuple[Rule, ...] = (
    Rule("hmma_bf16", r"^HMMA\.16816\.F32\.BF16$", applies="bf16",
         why="mma.sync.m16n8k16.row.col.f32.bf16.bf16.f32 on the tensor cores"),
    Rule("hmma_fp16", r"^HMMA\.16816\.F32$", applies="fp16",
         why="mma.sync.m16n8k16.row.col.f32.f16.f16.f32 on the tensor cores"),
    Rule("hmma_only_bf16", r"^HMMA(?!\.16816\.F32\.BF16$)", min=0, max=0, applies="bf16",
         why="no HMMA of another shape or element type in a bf16 kernel"),
    Rule("hmma_only_fp16", r"^HMMA(?!\.16816\.F32$)", min=0, max=0, applies="fp16",
         why="no HMMA of another shape or element type in an fp16 kernel"),
    Rule("ldsm_x4", r"^LDSM\.16\.M88\.4$", why="ldmatrix.x4 (Q, K and P fragments)"),
    Rule("ldsm_x4_trans", r"^LDSM\.16\.MT88\.4$", why="ldmatrix.x4.trans (V fragments)"),
    Rule("ldgsts", r"^LDGSTS\..*\b128\b", why="cp.async 16 B global -> shared"),
    Rule("cp_async_commit", r"^LDGDEPBAR$", why="cp.async.commit_group"),
    Rule("cp_async_wait", r"^DEPBAR\.LE$", operands=r"\bSB0\b", why="cp.async.wait_group"),
    Rule("bar_sync_16bit", r"^BAR\.SYNC", min=BARRIERS_16BIT, applies="16bit",
         why="4 __syncthreads: loop top, row maxima, P, row sums"),
    Rule("bar_sync_fp8", r"^BAR\.SYNC", min=BARRIERS_FP8, applies="fp8",
         why="5 __syncthreads: the 16-bit kernel's 4 + converted tile complete"),
    Rule("shfl_bfly", r"^SHFL\.BFLY$", why="__shfl_xor_sync quad reductions"),
    Rule("prmt_fp8", r"^PRMT$", applies="fp8", why="e4m3 bytes spread into 16-bit lanes"),
    Rule("no_local_memory", r"^(LDL|STL)\b", min=0, max=0, why="no spills / local memory"),
)


def rule_table(rules: tuple[Rule, ...] = RULES) -> str:
    return "\n".join(f"  {r.name:<18} {r.applies:<6} {r.pattern:<34} min {r.min}"
                     + (f" max {r.max}" if r.max is not None else "") + f"  ({r.why})" for r in rules)


_TC_NAME = re.compile(r"decode_tc_kernel<\s*(?P<t>__nv_bfloat16|__half)\s*,\s*(?P<cfg>.*)>\s*\(")


def tc_kernel(func: Function, obj: str = "") -> TcKernel | None:
    """The TcKernel of a decode_tc_kernel instantiation, else None. fp8: the config's last
    template argument (TcConfig<.., true>), or, when the demangled name does not say, the
    object's file name (decode_tc_fp8_*.o)."""
    m = _TC_NAME.search(func.demangled or func.name)
    if not m:
        return None
    cfg = m.group("cfg").strip()
    flags = re.findall(r"\b(true|false)\b", cfg)
    fp8 = flags[-1] == "true" if flags else "fp8" in os.path.basename(obj)
    return TcKernel(func, "bf16" if m.group("t") == "__nv_bfloat16" else "fp16", fp8, cfg)


# The Hopper decode kernel (csrc/cuda/sm90/decode_sm90.cuh, sm_90a only): wgmma from shared memory
# and from registers, the TMA box loads of full tiles (16-bit cache), the cp.async gather (the Q
# block, partial tiles, other block sizes, the fp8 cache), the mbarrier pipeline, setmaxnreg.
SM90_RULES: tuple[Rule, ...] = (
    Rule("sm90_hgmma_ss", r"^HGMMA\.64x64x16\.F32", operands=r"^R\d+, gdesc\[",
         why="S = Q K^T: wgmma m64n64k16, A and B from shared-memory descriptors"),
    Rule("sm90_hgmma_rs", r"^HGMMA\.64x256x16\.F32", operands=r"^R\d+, R\d+",
         why="O += P V: wgmma m64n256k16, A (P) from registers"),
    Rule("sm90_utmaldg", r"^UTMALDG\.2D", applies="16bit",
         why="TMA box loads of full tiles (16-bit cache, block_size % 64 == 0)"),
    Rule("sm90_ldgsts", r"^LDGSTS", why="cp.async gather: Q, partial tiles, other block sizes, fp8"),
    Rule("sm90_mbarrier_wait", r"^SYNCS\.PHASECHK\.TRANS64\.TRYWAIT", why="mbarrier.try_wait.parity"),
    Rule("sm90_mbarrier_arrive", r"^SYNCS\.ARRIVE\.TRANS64", why="mbarrier.arrive (.expect_tx)"),
    Rule("sm90_setmaxnreg", r"^USETMAXREG", min=2, why="setmaxnreg: producer down, consumers up"),
    Rule("no_local_memory", r"^(LDL|STL)\b", min=0, max=0, why="no spills / local memory"),
)

_SM90_NAME = re.compile(r"decode_sm90_kernel<\s*(?:(?P<t>__nv_bfloat16|__half)\s*,\s*)?(?P<fp8>true|false)\s*>")


def sm90_kernel(func: Function) -> TcKernel | None:
    """A decode_sm90_kernel instantiation ([T,] kFp8) as a TcKernel (config "sm90"), else None."""
    m = _SM90_NAME.search(func.demangled or func.name)
    if not m:
        return None
    return TcKernel(func, "fp16" if m.group("t") == "__half" else "bf16", m.group("fp8") == "true", "sm90")


def check_kernel(k: TcKernel, rules: tuple[Rule, ...] = RULES) -> list[tuple[str, str]]:
    """Failed rules of one kernel as (rule name, 'found N, want ...') pairs (empty: all pass)."""
    fails = []
    for r in rules:
        if not r.applies_to(k):
            continue
        n = k.func.count(r.pattern, r.operands)
        if n < r.min or (r.max is not None and n > r.max):
            want = f">= {r.min}" if r.max is None else (f"== {r.max}" if r.min == r.max else f"in [{r.min}, {r.max}]")
            fails.append((r.name, f"found {n}, want {want} ({r.why})"))
    if k.func.stack:
        fails.append(("stack_frame", f"{k.func.stack} bytes (spills / local arrays)"))
    if k.func.local:
        fails.append(("local_memory", f"{k.func.local} bytes"))
    return fails


# ----------------------------------------------------------------------------------------------
# Tools, compiling, disassembling


def find_tool(name: str) -> str | None:
    """`name` from PATH, else from the nvidia-cuda-* wheels of this Python's site-packages."""
    path = shutil.which(name)
    if path:
        return path
    import site

    dirs = list(site.getsitepackages()) + [site.getusersitepackages()]
    for d in dirs:
        for cand in sorted(glob.glob(os.path.join(d, "nvidia", "cu*", "bin", name)), reverse=True):
            if os.access(cand, os.X_OK):
                return cand
    return None


def nvcc_compile(nvcc: str, cu: str, arch: str, out_o: str, include_dirs: tuple[str, ...] = ()) -> tuple[bool, str]:
    cc = arch[3:]
    cmd = [nvcc, *NVCC_FLAGS, f"-gencode=arch=compute_{cc},code={arch}", *[f"-I{d}" for d in include_dirs],
           "-c", cu, "-o", out_o]
    res = subprocess.run(cmd, capture_output=True, text=True)
    return res.returncode == 0, res.stdout + res.stderr


def disassemble(cuobjdump: str, obj: str) -> list[Function]:
    sass = subprocess.run([cuobjdump, "-sass", obj], capture_output=True, text=True, check=True).stdout
    res = subprocess.run([cuobjdump, "-res-usage", obj], capture_output=True, text=True, check=True).stdout
    funcs = parse_sass(sass)
    usage = parse_res_usage(res)
    names = demangle([f.name for f in funcs])
    for f in funcs:
        f.demangled = names.get(f.name, f.name)
        u = usage.get((f.arch, f.name), {})
        f.regs, f.stack, f.local = u.get("REG"), u.get("STACK"), u.get("LOCAL")
    return funcs


def short_name(f: Function) -> str:
    d = f.demangled or f.name
    d = d.replace("(anonymous namespace)::", "").replace("mla::cuda::", "").replace("mla::", "")
    d = re.sub(r"\([^()]*\)$", "", d)  # the parameter list
    return d.replace("__nv_bfloat16", "bf16").replace("__half", "fp16").replace("void ", "")


def report_line(obj: str, f: Function) -> str:
    spill = f.count(r"^(LDL|STL)\b")
    return (f"{os.path.basename(obj):<28} regs {f.regs if f.regs is not None else '?':>3}  stack {f.stack or 0}"
            f"  LDL/STL {spill}  HMMA {f.count(r'^HMMA'):>3}  LDSM {f.count(r'^LDSM'):>3}"
            f"  LDGSTS {f.count(r'^LDGSTS'):>3}  BAR {f.count(r'^BAR.SYNC'):>2}  {short_name(f)}")


def check_objects(cuobjdump: str, objs: list[str], archs: tuple[str, ...], quiet: bool = False
                  ) -> tuple[list[tuple[str, str]], int]:
    """Report every kernel, check every decode_tc kernel. Returns ([(rule, message)], #tc kernels)."""
    failures, n_tc, lines = [], 0, []
    n_sm90 = 0
    seen_archs: dict[str, int] = {}
    for obj in objs:
        funcs = disassemble(cuobjdump, obj)
        if os.path.basename(obj).startswith("decode_sm90.sm_90a") and not any(sm90_kernel(f) for f in funcs):
            failures.append(("no_sm90_kernel", f"{os.path.basename(obj)}: no decode_sm90_kernel instantiation"))
        if os.path.basename(obj).startswith("decode_tc") and not any(tc_kernel(f, obj) for f in funcs):
            failures.append(("no_tc_kernel", f"{os.path.basename(obj)}: no decode_tc_kernel instantiation"))
        for f in funcs:
            lines.append(report_line(obj, f))
            if f.count(r"^(LDL|STL)\b") or f.stack or f.local:
                failures.append(("local_memory", f"{os.path.basename(obj)} {short_name(f)}: local memory / spills"))
            k9 = sm90_kernel(f)
            if k9 is not None:
                n_sm90 += 1
                for rule, msg in check_kernel(k9, SM90_RULES):
                    failures.append((rule, f"{os.path.basename(obj)} {f.arch} {short_name(f)}: {rule}: {msg}"))
                continue
            k = tc_kernel(f, obj)
            if k is None:
                continue
            n_tc += 1
            seen_archs[f.arch] = seen_archs.get(f.arch, 0) + 1
            for rule, msg in check_kernel(k):
                failures.append((rule, f"{os.path.basename(obj)} {f.arch} {short_name(f)}: {rule}: {msg}"))
    if not quiet:
        print("\n".join(sorted(lines)))
        if n_sm90:
            sm90_fails = sum(1 for rule, _ in failures if rule.startswith("sm90_"))
            print(f"\n{n_sm90} decode_sm90 kernels checked against {len(SM90_RULES)} sm90 rules: {sm90_fails} failed")
    for a in archs:
        if not seen_archs.get(a):
            failures.append(("no_tc_kernel", f"no decode_tc_kernel found for {a}"))
    return failures, n_tc


# ----------------------------------------------------------------------------------------------
# Mutations: each plants one bug in a copy of csrc/ and must be caught by RULES.


@dataclasses.dataclass(frozen=True)
class Mutation:
    name: str
    file: str  # relative to csrc/cuda
    pattern: str  # regex (re.S | re.M), first match replaced ...
    replacement: str  # ... by this (re.sub template)
    compile: tuple[str, ...]  # .cu files (relative to csrc/cuda) to recompile
    expect: str  # the rule that should catch it (reported; any failed rule counts as caught)
    count: int = 1  # how many matches to replace (0: all)
    occurrence: int = 0  # with count == 1: which match (0-based; -1: the last)


_MMA_BF16 = r"(mma_16816<__nv_bfloat16>\(.*?\)\s*\{).*?(\n\})"
MUTATIONS: tuple[Mutation, ...] = (
    Mutation("ldmatrix .trans made plain", "common.cuh", r"m8n8\.x4\.trans\.shared\.b16", "m8n8.x4.shared.b16",
             ("decode_tc_bf16.cu",), "ldsm_x4_trans"),
    Mutation("mma.sync replaced by scalar FMAs", "common.cuh", _MMA_BF16,
             r"\1\n  for (int i = 0; i < 4; ++i) {\n"
             r"    const __nv_bfloat162 x = *reinterpret_cast<const __nv_bfloat162*>(&a[i]);\n"
             r"    const __nv_bfloat162 y = *reinterpret_cast<const __nv_bfloat162*>(i < 2 ? &b0 : &b1);\n"
             r"    d[i] = fmaf(__low2float(x), __low2float(y), fmaf(__high2float(x), __high2float(y), d[i]));\n"
             r"  }\2",
             ("decode_tc_bf16.cu",), "hmma_bf16"),
    Mutation("bf16 mma with the fp16 type string", "common.cuh",
             r"(mma\.sync\.aligned\.m16n8k16\.row\.col\.f32\.)bf16\.bf16(\.f32)", r"\1f16.f16\2",
             ("decode_tc_bf16.cu",), "hmma_only_bf16"),
    Mutation("cp.async replaced by a plain load + store", "common.cuh",
             r"(void cp_async_16\(void\* dst, const void\* src, bool valid\)\s*\{).*?(\n\})",
             r"\1\n  *static_cast<uint4*>(dst) = valid ? *static_cast<const uint4*>(src) : make_uint4(0, 0, 0, 0);\2",
             ("decode_tc_bf16.cu",), "ldgsts"),
    Mutation("cp.async.wait_group dropped", "common.cuh",
             r'asm volatile\("cp\.async\.wait_group %0;\\n" ::"n"\(N\) : "memory"\);', "",
             ("decode_tc_bf16.cu",), "cp_async_wait"),
    Mutation("first __syncthreads deleted (bf16)", "decode_tc.cuh", r"__syncthreads\(\);", ";",
             ("decode_tc_bf16.cu",), "bar_sync_16bit", occurrence=0),
    Mutation("__shfl_xor_sync replaced by __shfl_down_sync", "decode_tc.cuh", r"__shfl_xor_sync", "__shfl_down_sync",
             ("decode_tc_fp16.cu",), "shfl_bfly", count=0),
    Mutation("register cap 128 (launch bounds: 2 CTAs / SM) -> spills", "decode_tc.cuh",
             r"__launch_bounds__\(Cfg::kThreads, 1\)", "__launch_bounds__(Cfg::kThreads, 2)",
             ("decode_tc_fp16.cu",), "no_local_memory"),
)


def barrier_mutations() -> tuple[Mutation, ...]:
    """One mutation per __syncthreads() of decode_tc.cuh (deleted alone, fp8 bf16 kernels: they
    run every barrier), generated from the current source so a new barrier is covered too."""
    with open(os.path.join(ROOT, "csrc", "cuda", "decode_tc.cuh")) as fh:
        src = fh.read()
    hits = list(re.finditer(r"__syncthreads\(\);", src))
    return tuple(
        Mutation(f"__syncthreads {i + 1}/{len(hits)} (decode_tc.cuh:{src.count(chr(10), 0, h.start()) + 1}) deleted (fp8)",
                 "decode_tc.cuh", r"__syncthreads\(\);", ";", ("decode_tc_fp8_bf16.cu",), "bar_sync_fp8", occurrence=i)
        for i, h in enumerate(hits))


MUTATIONS = MUTATIONS + barrier_mutations()


def apply_mutation(src: str, m: Mutation) -> str:
    """`src` with the mutation applied; ValueError when its pattern no longer matches (the
    source changed: update MUTATIONS) -- a mutation that silently does nothing would pass."""
    rx = re.compile(m.pattern, re.S | re.M)
    hits = list(rx.finditer(src))
    if not hits:
        raise ValueError(f"mutation {m.name!r}: pattern {m.pattern!r} not found in {m.file}")
    if m.count == 0:
        return rx.sub(m.replacement, src)
    h = hits[m.occurrence]
    return src[: h.start()] + h.expand(m.replacement) + src[h.end():]


def run_mutation(m: Mutation | None, nvcc: str, cuobjdump: str, arch: str, workdir: str,
                 files: tuple[str, ...] = ()) -> tuple[str, list[tuple[str, str]]]:
    """Compile `m.compile` in a private copy of csrc/ with the mutation planted and check it:
    ('caught' | 'MISSED' | 'wrong rule' | 'compile error', failures). m = None is the control
    run: the same copy and flags unmutated (compiling `files`), which must give 'clean'."""
    tree = os.path.join(workdir, re.sub(r"\W+", "_", m.name if m else "control"))
    shutil.copytree(os.path.join(ROOT, "csrc"), os.path.join(tree, "csrc"))
    if m is not None:
        path = os.path.join(tree, "csrc", "cuda", m.file)
        with open(path) as fh:
            src = fh.read()
        try:
            mutated = apply_mutation(src, m)
        except ValueError as e:
            return "stale pattern", [("pattern", str(e))]
        with open(path, "w") as fh:
            fh.write(mutated)
        files = m.compile
    objs = []
    for cu in files:
        obj = os.path.join(tree, os.path.basename(cu)[:-3] + f".{arch}.o")
        ok, log = nvcc_compile(nvcc, os.path.join(tree, "csrc", "cuda", cu), arch, obj)
        if not ok:
            return "compile error", [("compile", log[-2000:])]
        objs.append(obj)
    failures, n_tc = check_objects(cuobjdump, objs, (arch,), quiet=True)
    if m is None:
        return ("clean" if not failures and n_tc else "control FAILS"), failures
    if not failures:
        return "MISSED", failures
    return ("caught" if any(rule == m.expect for rule, _ in failures) else "wrong rule"), failures


def run_mutations(nvcc: str, cuobjdump: str, arch: str, jobs: int) -> bool:
    """Every mutation must be caught by its expected rule, and the control (the same files,
    same flags, no mutation) must pass every rule."""
    print(f"\n== mutations ({len(MUTATIONS)}, {arch}, {jobs} jobs): each must fail its rule")
    start = time.time()
    control_files = tuple(sorted({cu for m in MUTATIONS for cu in m.compile}))
    with tempfile.TemporaryDirectory(prefix="sass-mut-") as work:
        with ThreadPoolExecutor(max_workers=max(1, jobs)) as pool:
            control = pool.submit(run_mutation, None, nvcc, cuobjdump, arch, work, control_files)
            results = list(pool.map(lambda m: run_mutation(m, nvcc, cuobjdump, arch, work), MUTATIONS))
            control_status, control_fails = control.result()
    ok = control_status == "clean"
    print(f"  {control_status:<13} {'control: ' + ', '.join(control_files) + ' unmutated':<58}")
    for _, msg in control_fails[:5]:
        print("      " + msg.replace("\n", "\n      "))
    for m, (status, fails) in zip(MUTATIONS, results):
        rules = sorted({rule for rule, _ in fails}) if status in ("caught", "wrong rule") else []
        print(f"  {status:<13} {m.name:<58} by {', '.join(rules) or '-'}"
              + ("" if status == "caught" else f"  (expected {m.expect})"))
        if status != "caught":
            ok = False
            for _, msg in fails[:5]:
                print("      " + msg.replace("\n", "\n      "))
    n_caught = sum(1 for s, _ in results if s == "caught")
    print(f"  {n_caught}/{len(MUTATIONS)} caught by their rule, control {control_status} ({time.time() - start:.0f} s)")
    return ok


# ----------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--objects", help="directory of nvcc objects NAME.sm_XX.o (cuda_compile_check.sh's build/cuda-compile); "
                    "compiled into build/cuda-sass when absent or empty")
    ap.add_argument("--archs", default=" ".join(ARCHS))
    ap.add_argument("--nvcc", default=os.environ.get("NVCC", "nvcc"))
    ap.add_argument("--jobs", type=int, default=int(os.environ.get("MAX_JOBS", "2")))
    ap.add_argument("--mutations", action="store_true", help="also plant the bugs of MUTATIONS and require each caught")
    ap.add_argument("--mutation-arch", default="sm_80")
    ap.add_argument("--rules", action="store_true", help="print the rules and exit")
    args = ap.parse_args(argv)
    if args.rules:
        print(rule_table())
        print(rule_table(SM90_RULES))
        return 0
    archs = tuple(args.archs.split())

    cuobjdump = find_tool("cuobjdump")
    if cuobjdump is None:
        print("FAIL: cuobjdump not found (make cuda-tools installs the nvidia-cuda-cuobjdump wheel)")
        return 1
    print(f"cuobjdump: {cuobjdump}")

    objs: list[str] = []
    if args.objects:
        objs = sorted(o for a in archs for o in glob.glob(os.path.join(args.objects, f"*.{a}.o")))
        sources = [f for f in glob.glob(os.path.join(ROOT, "csrc", "**", "*"), recursive=True) if os.path.isfile(f)]
        newest = max((os.path.getmtime(f) for f in sources), default=0.0)
        if objs and min(os.path.getmtime(o) for o in objs) < newest:
            print(f"objects in {args.objects} are older than csrc/: recompiling")
            objs = []
    if not objs:
        if shutil.which(args.nvcc) is None:
            print(f"FAIL: no objects in {args.objects} and no nvcc ({args.nvcc})")
            return 1
        out = os.path.join(ROOT, "build", "cuda-sass")
        os.makedirs(out, exist_ok=True)
        jobs = [(cu, a) for cu in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu"))) for a in archs]
        if "sm_90a" in archs:  # the Hopper kernels exist for sm_90a only (as in cuda_compile_check.sh)
            jobs += [(cu, "sm_90a") for cu in sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "sm90", "*.cu")))]
        print(f"compiling {len(jobs)} objects into {out}")

        def one(job):
            cu, a = job
            obj = os.path.join(out, os.path.basename(cu)[:-3] + f".{a}.o")
            ok, log = nvcc_compile(args.nvcc, cu, a, obj)
            return obj, ok, log

        with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            for obj, ok, log in pool.map(one, jobs):
                if not ok:
                    print(f"FAIL compile {obj}\n{log[-3000:]}")
                    return 1
                objs.append(obj)
    print(f"{len(objs)} objects\n")
    print("rules for every decode_tc_kernel:\n" + rule_table() + "\n")
    print("rules for every decode_sm90_kernel (sm_90a):\n" + rule_table(SM90_RULES) + "\n")

    failures, n_tc = check_objects(cuobjdump, objs, archs)
    status = 0
    if failures:
        print("\nFAIL:\n  " + "\n  ".join(msg for _, msg in failures))
        status = 1
    else:
        print(f"\nok   {n_tc} decode_tc kernels pass {len(RULES)} rules; no kernel uses local memory")
    if args.mutations:
        nvcc = shutil.which(args.nvcc)
        if nvcc is None:
            print("FAIL: --mutations needs nvcc")
            return 1
        if not run_mutations(nvcc, cuobjdump, args.mutation_arch, args.jobs):
            print("FAIL: some mutation was not caught")
            status = 1
    if status == 0:
        print(f"PASS: cuda_sass_check: {n_tc} tensor-core kernels" + (f", {len(MUTATIONS)}/{len(MUTATIONS)} mutations caught" if args.mutations else ""))
    return status


if __name__ == "__main__":
    sys.exit(main())
