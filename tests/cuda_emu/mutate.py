"""The driver shared by the mutation checks (mutations.py: the CUDA-core, tensor-core and sparse
kernels; mutations_sm90.py: the Hopper building blocks and kernel). Each mutation plants one
known bug in a copy of csrc/; the script's `evaluate` rebuilds what it needs from that copy and
runs the mutation's checks. A mutation is caught when a check fails; every one must be."""
from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Tuple

from cuda_emu import runner


@dataclass
class Mutation:
    name: str
    path: str     # relative to csrc/
    old: str      # must occur exactly once
    new: str
    checks: List[tuple]  # what to run, in the owning script's own terms


def emulator_failure(e: runner.EmulatorError) -> str:
    """The verdict of a run the emulator or a sanitizer stopped: its first error line."""
    lines = [ln for ln in str(e).splitlines() if any(k in ln for k in ("ERROR", "error", "WARNING", "SUMMARY"))]
    return "error: " + (lines[0] if lines else str(e).splitlines()[0])[:150]


def wrong_result(e: AssertionError) -> str:
    """The verdict of a run whose output the comparison rejected."""
    return "wrong result: " + str(e).splitlines()[0][:150]


# evaluate(mutation, mutant csrc) -> [(what ran, None if it passed else how it failed)]
Evaluate = Callable[[Mutation, Path], List[Tuple[str, Optional[str]]]]


def main(mutations: List[Mutation], evaluate: Evaluate, description: str) -> int:
    """Runs the mutations (--only: those whose name contains the text), prints the kill table,
    returns 1 if one survived or could not be planted."""
    ap = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="", help="run the mutations whose name contains this")
    args = ap.parse_args()
    src = runner.REPO / "csrc"
    survivors = ran = 0
    for m in mutations:
        if args.only not in m.name:
            continue
        ran += 1
        t0 = time.time()
        with tempfile.TemporaryDirectory(prefix="mla-mutant-") as d:
            mutant = Path(d) / "csrc"
            shutil.copytree(src, mutant)
            target = mutant / m.path
            text = target.read_text()
            if text.count(m.old) != 1:
                print(f"FAIL     {m.name}: the planted text occurs {text.count(m.old)} times in {m.path}", flush=True)
                survivors += 1
                continue
            target.write_text(text.replace(m.old, m.new))
            verdicts = evaluate(m, mutant)
        caught = any(v for _, v in verdicts)
        survivors += not caught
        print(f"{'caught' if caught else 'SURVIVED':8} {m.name} ({time.time() - t0:.0f} s)", flush=True)
        for what, v in verdicts:
            print(f"           {what}: {v or 'passed'}", flush=True)
    print(f"\n{ran - survivors} of {ran} planted bugs caught")
    return 1 if survivors else 0
