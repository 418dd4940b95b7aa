"""Drives the Hopper probes of the SIMT emulator (emu_sm90.cpp): the end-to-end TMA + mbarrier +
wgmma GEMM (csrc/cuda/sm90/gemm_probe.cuh through sm90_gemm_probe.cpp) and the single-wgmma
descriptor probe (sm90_wgmma_probe.cpp). Builds through runner.build, so objects are cached by
content and a mutated copy of csrc rebuilds only what its change reaches."""
from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import torch

from cuda_emu import runner

ORDERS = {"forward": 0, "reverse": 1, "random": 2}


def bits16(t: torch.Tensor) -> np.ndarray:
    """bf16 / fp16 tensor -> its uint16 bit patterns."""
    assert t.dtype in (torch.bfloat16, torch.float16)
    return t.contiguous().view(torch.int16).numpy().view(np.uint16)


def run_gemm(a: torch.Tensor, b: torch.Tensor, b_mn: bool, *, order="forward", seed=1, flavor="plain",
             exe: Path | None = None) -> torch.Tensor:
    """C [64, N] fp32 = a [64, K] @ (b [K, N] if b_mn else b [N, K]^T), through the emulated kernel;
    a and b both bf16 or both fp16 (fp16: N = 64 with b_mn only)."""
    exe = exe or runner.build(flavor, program="sm90_gemm_probe")
    k = a.shape[1]
    n = b.shape[1] if b_mn else b.shape[0]
    assert a.shape == (64, k) and b.shape == ((k, n) if b_mn else (n, k))
    assert a.dtype == b.dtype
    data = bits16(a).tobytes() + bits16(b).tobytes()
    env = dict(os.environ, **runner.SAN_ENV)
    r = subprocess.run([str(exe), str(n), str(int(b_mn)), str(k), str(ORDERS[order]), str(seed),
                        str(int(a.dtype == torch.float16))], input=data,
                       capture_output=True, env=env)
    if r.returncode != 0:
        raise runner.EmulatorError(f"emulated sm90 gemm ({flavor}) exited {r.returncode}:\n"
                                   f"{r.stderr.decode(errors='replace')[-6000:]}")
    return torch.from_numpy(np.frombuffer(r.stdout, dtype=np.float32).copy()).reshape(64, n)


def run_wgmma(n: int, trans_a: int, trans_b: int, accumulate: bool, desc_a: int, desc_b: int, fields_a, fields_b,
              smem: np.ndarray, acc: np.ndarray, *, kind="bf16", a_regs: np.ndarray | None = None, flavor="plain",
              exe: Path | None = None):
    """One wgmma m64nNk16 bf16 / fp16 (SS) through ptx_sm90.cuh in the emulator (sm90_wgmma_probe.cpp).
    fields_*: (start, lbo, sbo, layout_type) that make_smem_desc rebuilds; smem: uint8 image of the
    shared window; acc: float32 [128, n / 2] accumulators in; a_regs: uint32 [128, 4], A from
    registers (wgmma_rs, with trans_a=2). Returns (built_a, built_b, acc out)."""
    exe = exe or runner.build(flavor, program="sm90_wgmma_probe")
    acc = np.ascontiguousarray(acc, dtype=np.float32)
    assert acc.shape == (128, n // 2)
    words = [{"bf16": 0, "fp16": 1}[kind], n, trans_a, trans_b, int(accumulate), desc_a, desc_b, *fields_a, *fields_b, smem.size]
    text = " ".join(map(str, words)) + " " + " ".join(map(str, smem.tolist())) + " " + \
        " ".join(map(str, acc.view(np.uint32).ravel().tolist()))
    if trans_a == 2:
        text += " " + " ".join(map(str, np.asarray(a_regs, dtype=np.uint32).ravel().tolist()))
    r = subprocess.run([str(exe)], input=text, capture_output=True, text=True, env=dict(os.environ, **runner.SAN_ENV))
    if r.returncode != 0:
        raise runner.EmulatorError(f"emulated wgmma exited {r.returncode}: {r.stderr.strip()[-600:]}")
    vals = [int(x) for x in r.stdout.split()]
    out = np.array(vals[2:], dtype=np.uint64).astype(np.uint32).view(np.float32).reshape(128, n // 2)
    return vals[0], vals[1], out


def run_sync_scenario(name: str, *, order="forward", seed=1, flavor="plain", exe: Path | None = None) -> np.ndarray:
    """A scenario of sm90_sync_probe.cpp; its output words, or EmulatorError."""
    exe = exe or runner.build(flavor, program="sm90_sync_probe")
    r = subprocess.run([str(exe), name, str(ORDERS[order]), str(seed)], capture_output=True, text=True,
                       env=dict(os.environ, **runner.SAN_ENV))
    if r.returncode != 0:
        raise runner.EmulatorError(f"sm90 scenario {name} ({flavor}) exited {r.returncode}:\n{r.stderr[-3000:]}")
    return np.array([int(x) for x in r.stdout.split()], dtype=np.uint64).astype(np.uint32)
