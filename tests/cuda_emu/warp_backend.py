"""The SIMT emulator's warp collectives as a backend of tests/test_cute_layouts.py: each call
runs one ldmatrix / mma / shfl through csrc/cuda/common.cuh's real wrappers in the emulator
(collectives_probe.cpp), so the emulator's fragment semantics are checked against CuTe's
layouts, an oracle we did not write."""
from __future__ import annotations

import subprocess

import numpy as np

from cuda_emu import runner


class EmulatorWarpBackend:
    name = "cuda-emulator"

    def __init__(self):
        self._exe = None

    def ldmatrix(self, tiles, trans):
        tiles = np.asarray(tiles, dtype=np.uint16)
        assert tiles.shape == (4, 8, 8)
        return self._call("ldmatrix", [int(bool(trans))] + tiles.ravel().tolist()).reshape(32, 4)

    def mma(self, kind, a, b, c):
        a, b = np.asarray(a, np.uint32), np.asarray(b, np.uint32)
        c = np.ascontiguousarray(np.asarray(c, np.float32)).view(np.uint32)
        words = [0 if kind == "bf16" else 1] + a.ravel().tolist() + b.ravel().tolist() + c.ravel().tolist()
        return self._call("mma", words).reshape(32, 4).view(np.float32)

    def shfl_xor(self, values, mask, lane_mask):
        values = np.asarray(values)
        assert values.shape == (32,)
        bits = values.astype(np.uint32) if values.dtype.itemsize != 4 else values.view(np.uint32)
        out = self._call("shfl", [int(mask), int(lane_mask) & 0xFFFFFFFF] + bits.tolist())
        res = values.copy()
        keep = np.array([(lane_mask >> lane) & 1 for lane in range(32)], dtype=bool)
        conv = out.astype(values.dtype) if values.dtype.itemsize != 4 else out.view(values.dtype)
        res[keep] = conv[keep]
        return res

    def _call(self, op, words):
        if self._exe is None:
            self._exe = runner.build("plain", program="collectives_probe")
        r = subprocess.run([str(self._exe)], input=op + " " + " ".join(str(int(w)) for w in words),
                           capture_output=True, text=True)
        if r.returncode != 0:
            raise ValueError(f"emulated {op} failed ({r.returncode}): {r.stderr.strip()[-300:]}")
        return np.array([int(x) for x in r.stdout.split()], dtype=np.uint64).astype(np.uint32)
