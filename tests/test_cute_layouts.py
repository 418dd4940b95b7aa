"""Warp collectives of the tensor-core kernel against an oracle we did not write: CuTe's atom
layouts (issue 10, item 4), and the Hopper wgmma model against CuTe's GMMA layouts (issue 11; see
"Hopper wgmma" below: descriptors, swizzled shared-memory atoms, the 64xN accumulator layout).

tests/cute_layouts/cute_tables.json holds, printed by tests/cute_layouts/cute_layout_tables.cpp
from CUTLASS 4.2's own traits (MMA_Traits<SM80_16x8x16_F32BF16BF16F32_TN> and <..F32F16F16F32_TN>,
Copy_Traits<SM75_U32x4_LDSM_N> and <SM75_U16x8_LDSM_T>), which (row, col) of the tile each
lane's register value is. When g++, the nvidia-cutlass headers and the CUDA headers are present
(`make cuda-tools`), test_snapshot_matches_cute rebuilds the program and requires the same JSON.

Every check runs through a *backend*: any object with the three methods below (arrays are numpy;
"lane" is the lane id 0..31; a 16-bit pair in a 32-bit register keeps the first value -- lower
column / k index, as listed in the tables -- in bits 0-15):

  ldmatrix(tiles, trans) -> regs
      ldmatrix.sync.aligned.m8n8.x4[.trans].shared.b16.
      tiles: uint16 (4, 8, 8); tiles[i, r, :] = the eight 16-bit elements of the 16-byte row whose
             address lane 8 * i + r supplies (matrix i, row r).
      trans: bool.
      regs:  uint32 (32, 4); regs[lane, i] = destination register i of that lane.
  mma(kind, a, b, c) -> d
      mma.sync.aligned.m16n8k16.row.col.f32.{kind}.{kind}.f32, kind "bf16" or "fp16".
      a: uint32 (32, 4) A registers, b: uint32 (32, 2) B registers (16-bit bit patterns),
      c: float32 (32, 4) accumulators; d: float32 (32, 4). The test data are small integers, so
      every product and sum is exact and any summation order must give the same d.
  shfl_xor(values, mask, lane_mask) -> out
      __shfl_xor_sync(lane_mask, values[lane], mask) executed by the lanes of lane_mask.
      values: (32,) array, any dtype; mask: int in [0, 32); lane_mask: int, 32-bit member mask.
      out: (32,) same dtype; out[l] = values[l ^ mask] for l in lane_mask (other lanes: not
      compared). A lane of lane_mask reading a lane outside it (undefined in PTX) must raise.

BACKENDS holds NumpyWarpModel (the PTX-ISA fragment formulas, groupID = lane >> 2,
threadID_in_group = lane % 4, written without looking at the tables) and the CPU emulator of
csrc/cuda (tests/cuda_emu/warp_backend.py: each call runs the real common.cuh wrappers in the
emulator). Other implementations plug in by appending to BACKENDS, or without editing this file
through MLA_EXT_WARP_BACKENDS="module:attr[,module:attr]" (attr: a backend
object or a class to instantiate; module importable from tests/). The checker functions return
lists of mismatches; test_checkers_reject_wrong_models proves each catches planted bugs.
"""
from __future__ import annotations

import glob
import hashlib
import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

pytestmark = pytest.mark.emulated

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TABLE_DIR = os.path.join(HERE, "cute_layouts")
SNAPSHOT = os.path.join(TABLE_DIR, "cute_tables.json")
GENERATOR = os.path.join(TABLE_DIR, "cute_layout_tables.cpp")


def load_tables(path: str = SNAPSHOT) -> dict:
    with open(path) as fh:
        return json.load(fh)


TABLES = load_tables()


# ---------------------------------------------------------------------------------------------
# 16-bit encodings


def to_bits(kind: str, x) -> np.ndarray:
    """float values -> uint16 bit patterns (round to nearest even)."""
    x = np.asarray(x, dtype=np.float32)
    if kind == "fp16":
        return x.astype(np.float16).view(np.uint16)
    if kind == "bf16":
        u = x.view(np.uint32).astype(np.uint64)
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    raise ValueError(kind)


def from_bits(kind: str, bits) -> np.ndarray:
    bits = np.asarray(bits, dtype=np.uint16)
    if kind == "fp16":
        return bits.view(np.float16).astype(np.float64)
    if kind == "bf16":
        return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)
    raise ValueError(kind)


def half(reg, h: int):
    """16-bit half h (0: bits 0-15) of 32-bit registers."""
    return ((np.asarray(reg, dtype=np.uint32) >> np.uint32(16 * h)) & np.uint32(0xFFFF)).astype(np.uint16)


def pack(lo, hi) -> np.ndarray:
    return np.asarray(lo, dtype=np.uint32) | (np.asarray(hi, dtype=np.uint32) << np.uint32(16))


# ---------------------------------------------------------------------------------------------
# The backend-independent model (PTX ISA, "Matrix Fragments for mma.m16n8k16" and "ldmatrix")


class NumpyWarpModel:
    name = "numpy"

    @staticmethod
    def group_tig(lane):
        return lane >> 2, lane & 3  # groupID, threadID_in_group

    def a_coord(self, lane, i):  # A register value i (0..7) -> (row m, col k)
        g, t = self.group_tig(lane)
        return g + 8 * ((i >> 1) & 1), 2 * t + (i & 1) + 8 * (i >> 2)

    def b_coord(self, lane, i):  # B value i (0..3) -> (row k, col n)
        g, t = self.group_tig(lane)
        return 2 * t + (i & 1) + 8 * (i >> 1), g

    def c_coord(self, lane, i):  # C / D value i (0..3) -> (row m, col n)
        g, t = self.group_tig(lane)
        return g + 8 * (i >> 1), 2 * t + (i & 1)

    def decode(self, kind, bits):
        return from_bits(kind, bits)

    def ldmatrix(self, tiles, trans):
        tiles = np.asarray(tiles, dtype=np.uint16)
        assert tiles.shape == (4, 8, 8)
        regs = np.zeros((32, 4), dtype=np.uint32)
        for lane in range(32):
            r, c = lane >> 2, 2 * (lane & 3)
            for i in range(4):
                if trans:
                    lo, hi = tiles[i, c, r], tiles[i, c + 1, r]
                else:
                    lo, hi = tiles[i, r, c], tiles[i, r, c + 1]
                regs[lane, i] = pack(lo, hi)
        return regs

    def mma(self, kind, a, b, c):
        a, b, c = np.asarray(a, np.uint32), np.asarray(b, np.uint32), np.asarray(c, np.float32)
        assert a.shape == (32, 4) and b.shape == (32, 2) and c.shape == (32, 4)
        A, B, C = np.zeros((16, 16)), np.zeros((16, 8)), np.zeros((16, 8))
        for lane in range(32):
            for i in range(8):
                A[self.a_coord(lane, i)] = self.decode(kind, half(a[lane, i >> 1], i & 1))
            for i in range(4):
                B[self.b_coord(lane, i)] = self.decode(kind, half(b[lane, i >> 1], i & 1))
                C[self.c_coord(lane, i)] = c[lane, i]
        D = A @ B + C
        d = np.zeros((32, 4), dtype=np.float32)
        for lane in range(32):
            for i in range(4):
                d[lane, i] = D[self.c_coord(lane, i)]
        return d

    def shfl_xor(self, values, mask, lane_mask):
        values = np.asarray(values)
        assert values.shape == (32,)
        out = values.copy()
        for lane in range(32):
            if lane_mask >> lane & 1:
                src = lane ^ mask
                if not lane_mask >> src & 1:
                    raise ValueError(f"lane {lane} reads lane {src}, which is not in member mask {lane_mask:#x}")
                out[lane] = values[src]
        return out


def _extra_backends() -> list:
    found = []
    for spec in filter(None, os.environ.get("MLA_EXT_WARP_BACKENDS", "").split(",")):
        mod_name, _, attr = spec.partition(":")
        sys.path.insert(0, HERE)
        obj = getattr(importlib.import_module(mod_name), attr)
        found.append(obj() if isinstance(obj, type) else obj)
    return found


def _emulator_backends() -> list:
    """The SIMT emulator's collectives (tests/cuda_emu), where it can be built."""
    from cuda_emu import runner
    if runner.available() is not None:
        return []
    from cuda_emu.warp_backend import EmulatorWarpBackend
    return [EmulatorWarpBackend()]


BACKENDS = [NumpyWarpModel()] + _emulator_backends() + _extra_backends()


# ---------------------------------------------------------------------------------------------
# Checkers: backend -> list of mismatches (empty: agrees with CuTe)


def _ldmatrix_from_rows(backend, smem, rows, cols, trans):
    """ldmatrix .x4 as the kernel issues it: lane l supplies the address of smem[rows[l],
    cols[l]:cols[l] + 8] (uint16 smem)."""
    tiles = np.zeros((4, 8, 8), dtype=np.uint16)
    for lane in range(32):
        tiles[lane // 8, lane % 8] = smem[rows[lane], cols[lane]:cols[lane] + 8]
    return np.asarray(backend.ldmatrix(tiles, trans))


def check_ldmatrix(backend, trans: bool, tables=TABLES) -> list[str]:
    """Every destination half against CuTe's (source lane, element) for that lane and value."""
    table = tables["ldmatrix_x4_trans" if trans else "ldmatrix_x4"]["dst"]
    tiles = (1 + np.arange(4 * 8 * 8)).reshape(4, 8, 8).astype(np.uint16)  # unique codes
    regs = np.asarray(backend.ldmatrix(tiles, trans))
    if regs.shape != (32, 4):
        return [f"ldmatrix returned shape {regs.shape}, want (32, 4)"]
    bad = []
    for lane in range(32):
        for v, (s, j) in enumerate(table[lane]):
            got, want = half(regs[lane, v // 2], v % 2), tiles[s // 8, s % 8, j]
            if got != want:
                bad.append(f"ldmatrix{'.trans' if trans else ''} lane {lane} reg {v // 2} half {v % 2}: "
                           f"element {int(got)}, CuTe says matrix {s // 8} row {s % 8} col {j} ({int(want)})")
    return bad


def _mma_pack(kind, A, B, C, tab):
    """A (16 x 16), B (16 k x 8 n), C (16 x 8) -> registers, placed by CuTe's tables."""
    a = np.zeros((32, 4), np.uint32)
    b = np.zeros((32, 2), np.uint32)
    c = np.zeros((32, 4), np.float32)
    abits, bbits = to_bits(kind, A), to_bits(kind, B)
    for lane in range(32):
        for v, (m, k) in enumerate(tab["A"][lane]):
            a[lane, v // 2] |= np.uint32(abits[m, k]) << np.uint32(16 * (v % 2))
        for v, (n, k) in enumerate(tab["B"][lane]):
            b[lane, v // 2] |= np.uint32(bbits[k, n]) << np.uint32(16 * (v % 2))
        for v, (m, n) in enumerate(tab["C"][lane]):
            c[lane, v] = C[m, n]
    return a, b, c


def _mma_unpack(d, tab):
    D = np.full((16, 8), np.nan)
    for lane in range(32):
        for v, (m, n) in enumerate(tab["C"][lane]):
            D[m, n] = d[lane, v]
    return D


def check_mma(backend, kind: str, tables=TABLES, trials: int = 6, seed: int = 0) -> list[str]:
    """Operands placed in registers by CuTe's A / B / C layouts; the backend's d, read back by
    CuTe's C layout, must equal A @ B + C exactly (small integers and halves: exact in bf16,
    fp16 and fp32). One-hot cases first, so a layout error names the element."""
    tab = tables[f"mma_m16n8k16_{kind}"]
    rng = np.random.default_rng(seed)
    cases = []
    for m, k, n in ((0, 0, 0), (9, 3, 5), (15, 15, 7), (4, 10, 2)):
        A, B = np.zeros((16, 16)), np.zeros((16, 8))
        A[m, k], B[k, n] = 1.0, 2.0
        cases.append((f"one-hot A[{m},{k}] B[{k},{n}]", A, B, np.zeros((16, 8))))
    for t in range(trials):
        A = rng.integers(-8, 9, (16, 16)) * 0.5
        B = rng.integers(-8, 9, (16, 8)) * 0.25
        C = rng.integers(-64, 65, (16, 8)).astype(np.float64)
        cases.append((f"random #{t}", A, B, C))
    bad = []
    for label, A, B, C in cases:
        a, b, c = _mma_pack(kind, A, B, C, tab)
        d = np.asarray(backend.mma(kind, a, b, c))
        if d.shape != (32, 4):
            return [f"mma returned shape {d.shape}, want (32, 4)"]
        D, want = _mma_unpack(d, tab), A @ B + C
        if not np.array_equal(D, want):
            m, n = np.argwhere(D != want)[0]
            bad.append(f"mma {kind} {label}: D[{m},{n}] = {D[m, n]}, want {want[m, n]} "
                       f"({int((D != want).sum())} of 128 wrong)")
    return bad


def check_shfl_xor(backend, tables=TABLES) -> list[str]:
    """Butterfly semantics for every mask, a partial member mask, the error on a read outside the
    member mask, and the kernel's use: the quad reduction (xor 1, 2) over a C fragment gives every
    lane the maximum of its rows -- the lanes CuTe's C layout puts on the same row."""
    bad = []
    vals = np.arange(100, 132, dtype=np.float32)
    for mask in (1, 2, 4, 8, 16, 31):
        out = np.asarray(backend.shfl_xor(vals, mask, 0xFFFFFFFF))
        want = vals[np.arange(32) ^ mask]
        if not np.array_equal(out, want):
            bad.append(f"shfl_xor mask {mask}: lanes {np.flatnonzero(out != want).tolist()} wrong")
    out = np.asarray(backend.shfl_xor(vals, 1, 0x0000FFFF))
    if not np.array_equal(out[:16], vals[np.arange(16) ^ 1]):
        bad.append("shfl_xor with member mask 0xffff: lanes 0-15 wrong")
    try:
        backend.shfl_xor(vals, 16, 0x0000FFFF)
        bad.append("shfl_xor: lane 0 read lane 16 outside member mask 0xffff without an error")
    except Exception:  # noqa: BLE001 -- any error is the contract
        pass
    # Row maxima as the kernel takes them (fmaxf with __shfl_xor_sync 1 then 2, per C half).
    tab = tables["mma_m16n8k16_bf16"]["C"]
    S = np.random.default_rng(1).permutation(16 * 8).reshape(16, 8).astype(np.float32)
    for v0 in (0, 2):  # values {0,1} share one row, {2,3} another (CuTe's table says which)
        part = np.array([max(S[tuple(tab[lane][v0])], S[tuple(tab[lane][v0 + 1])]) for lane in range(32)],
                        dtype=np.float32)
        for mask in (1, 2):
            part = np.maximum(part, np.asarray(backend.shfl_xor(part, mask, 0xFFFFFFFF)))
        for lane in range(32):
            rows = {tab[lane][v0][0], tab[lane][v0 + 1][0]}
            if len(rows) != 1:
                bad.append(f"CuTe C layout: lane {lane} values {v0},{v0 + 1} on rows {rows}")
                continue
            if part[lane] != S[rows.pop()].max():
                bad.append(f"quad max (xor 1, 2): lane {lane} values {v0},{v0 + 1} not its row maximum")
    return bad


# The kernel's per-lane ldmatrix addresses (row, column) of decode_tc.cuh, restated.
KERNEL_ADDRESSES = {
    "Q": lambda l: (l & 15, (l >> 4) * 8),  # a_base (and P: the same pattern on sP)
    "K": lambda l: (l & 7, (l >> 3) * 8),  # b_base
    "V": lambda l: ((l & 7) + ((l >> 3) & 1) * 8, (l >> 4) * 8),  # v_base (.trans)
}


def check_kernel_fragments(backend, kind: str = "bf16", tables=TABLES, addresses=KERNEL_ADDRESSES) -> list[str]:
    """The decode kernel's ldmatrix addressing (decode_tc.cuh, restated here) must produce CuTe's
    fragments, and ldmatrix + mma through the backend must give Q K^T and P V:
      Q / P (A operand): lane l -> row l & 15, column 8 (l >> 4) (+ k)
      K (B of S = Q K^T): lane l -> key (l & 7) + 8 n, column 8 (l >> 3) + k: regs {0,1} k-step
        k, regs {2,3} k-step k + 16
      V (B of O = P V, .trans): lane l -> key (l & 7) + 8 ((l >> 3) & 1), column 8 (l >> 4) + 8 t:
        regs {0,1} output columns 8 t.., regs {2,3} 8 (t + 1)..
    """
    tab = tables[f"mma_m16n8k16_{kind}"]
    rng = np.random.default_rng(2)
    bad = []
    lanes = np.arange(32)
    Q = rng.integers(-4, 5, (16, 32)) * 0.5  # 16 query rows x 32 head dims
    K = rng.integers(-4, 5, (8, 32)) * 0.5  # 8 keys x 32 dims
    V = rng.integers(-4, 5, (16, 16)) * 0.5  # 16 keys x 16 output columns
    Qb, Kb, Vb = to_bits(kind, Q), to_bits(kind, K), to_bits(kind, V)

    qr, qc = addresses["Q"](lanes)
    kr, kc = addresses["K"](lanes)
    vr, vc = addresses["V"](lanes)
    a0 = _ldmatrix_from_rows(backend, Qb, qr, qc, False)  # dims 0..15
    a1 = _ldmatrix_from_rows(backend, Qb, qr, qc + 16, False)  # dims 16..31
    bf = _ldmatrix_from_rows(backend, Kb, kr, kc, False)
    vb = _ldmatrix_from_rows(backend, Vb, vr, vc, True)
    for lane in range(32):
        for v, (m, k) in enumerate(tab["A"][lane]):
            for regs, k0, name in ((a0, 0, "Q k-step 0"), (a1, 16, "Q k-step 16")):
                if half(regs[lane, v // 2], v % 2) != Qb[m, k0 + k]:
                    bad.append(f"{name}: lane {lane} value {v} is not Q[{m},{k0 + k}] (CuTe A)")
        for v, (n, k) in enumerate(tab["B"][lane]):
            for r0, k0 in ((0, 0), (2, 16)):
                if half(bf[lane, r0 + v // 2], v % 2) != Kb[n, k0 + k]:
                    bad.append(f"K regs {r0},{r0 + 1}: lane {lane} value {v} is not K[{n},{k0 + k}] (CuTe B)")
            for r0, n0 in ((0, 0), (2, 8)):
                if half(vb[lane, r0 + v // 2], v % 2) != Vb[k, n0 + n]:
                    bad.append(f"V regs {r0},{r0 + 1}: lane {lane} value {v} is not V[{k},{n0 + n}] (CuTe B)")
    zero = np.zeros((32, 4), np.float32)
    s = backend.mma(kind, a1, bf[:, 2:4], backend.mma(kind, a0, bf[:, 0:2], zero))
    if not np.array_equal(_mma_unpack(np.asarray(s), tab), Q @ K.T):
        bad.append("S = Q K^T through ldmatrix + two mma differs from numpy")
    p = a0  # P = the first 16 columns of Q, as 16 x 16 A operand
    o = np.stack([np.asarray(backend.mma(kind, p, vb[:, 2 * t:2 * t + 2], zero)) for t in (0, 1)])
    O = np.concatenate([_mma_unpack(o[0], tab), _mma_unpack(o[1], tab)], axis=1)
    if not np.array_equal(O, Q[:, :16] @ V):
        bad.append("O = P V through ldmatrix.trans + mma differs from numpy")
    return bad


CHECKS = {
    "ldmatrix": lambda be: check_ldmatrix(be, False),
    "ldmatrix.trans": lambda be: check_ldmatrix(be, True),
    "mma bf16": lambda be: check_mma(be, "bf16"),
    "mma fp16": lambda be: check_mma(be, "fp16"),
    "shfl_xor": check_shfl_xor,
    "kernel fragments bf16": lambda be: check_kernel_fragments(be, "bf16"),
    "kernel fragments fp16": lambda be: check_kernel_fragments(be, "fp16"),
}


def all_checks(backend) -> dict[str, list[str]]:
    """Every checker; a backend that raises counts as a mismatch of that check."""
    out = {}
    for name, fn in CHECKS.items():
        try:
            out[name] = fn(backend)
        except Exception as e:  # noqa: BLE001
            out[name] = [f"raised {e!r}"]
    return out


# ---------------------------------------------------------------------------------------------
# Tests


@pytest.mark.parametrize("backend", BACKENDS, ids=lambda b: getattr(b, "name", type(b).__name__))
@pytest.mark.parametrize("check", list(CHECKS))
def test_backend_matches_cute(backend, check):
    bad = CHECKS[check](backend)
    assert not bad, f"{len(bad)} mismatches, first: " + "; ".join(bad[:5])


# Planted bugs: each wrong model must be rejected by the named checks (and only a wrong model).
class SwappedGroupTig(NumpyWarpModel):
    """mma fragments with groupID and threadID_in_group roles swapped (lane & 7, lane >> 3)."""

    @staticmethod
    def group_tig(lane):
        return lane & 7, lane >> 3


class TransIgnored(NumpyWarpModel):
    def ldmatrix(self, tiles, trans):
        return super().ldmatrix(tiles, False)


class HalvesSwapped(NumpyWarpModel):
    """ldmatrix puts the lower column in bits 16-31."""

    def ldmatrix(self, tiles, trans):
        r = super().ldmatrix(tiles, trans)
        return (r >> np.uint32(16)) | (r << np.uint32(16))


class MatrixOrderReversed(NumpyWarpModel):
    """ldmatrix .x4: register i from matrix 3 - i."""

    def ldmatrix(self, tiles, trans):
        return super().ldmatrix(np.asarray(tiles)[::-1], trans)


class Bf16AsFp16(NumpyWarpModel):
    def decode(self, kind, bits):
        return from_bits("fp16", bits)


class CValueOrderSwapped(NumpyWarpModel):
    """accumulator i on row g + 8 (i & 1), column 2 t + (i >> 1) (the two bits of i swapped)."""

    def c_coord(self, lane, i):
        g, t = self.group_tig(lane)
        return g + 8 * (i & 1), 2 * t + (i >> 1)


class BKHalvesSwapped(NumpyWarpModel):
    """B value i's k row: 8 (i & 1) + 2 t + (i >> 1) instead of 2 t + (i & 1) + 8 (i >> 1)."""

    def b_coord(self, lane, i):
        g, t = self.group_tig(lane)
        return 2 * t + (i >> 1) + 8 * (i & 1), g


class ShflDown(NumpyWarpModel):
    def shfl_xor(self, values, mask, lane_mask):
        values = np.asarray(values)
        out = values.copy()
        for lane in range(32):
            if lane_mask >> lane & 1 and lane + mask < 32:
                out[lane] = values[lane + mask]
        return out


class ShflIgnoresMemberMask(NumpyWarpModel):
    def shfl_xor(self, values, mask, lane_mask):
        return np.asarray(values)[np.arange(32) ^ mask]


WRONG_MODELS = [  # (model, checks that must report it)
    (SwappedGroupTig(), ["mma bf16", "mma fp16", "kernel fragments bf16"]),
    (TransIgnored(), ["ldmatrix.trans", "kernel fragments bf16"]),
    (HalvesSwapped(), ["ldmatrix", "ldmatrix.trans", "kernel fragments fp16"]),
    (MatrixOrderReversed(), ["ldmatrix", "ldmatrix.trans", "kernel fragments bf16"]),
    (Bf16AsFp16(), ["mma bf16", "kernel fragments bf16"]),
    (CValueOrderSwapped(), ["mma bf16", "mma fp16"]),
    (BKHalvesSwapped(), ["mma fp16", "kernel fragments fp16"]),
    (ShflDown(), ["shfl_xor"]),
    (ShflIgnoresMemberMask(), ["shfl_xor"]),
]


@pytest.mark.parametrize("model,checks", WRONG_MODELS, ids=lambda x: type(x).__name__ if not isinstance(x, list) else "")
def test_checkers_reject_wrong_models(model, checks):
    results = all_checks(model)
    missed = [c for c in checks if not results[c]]
    assert not missed, f"{type(model).__name__} passed {missed}: the checker cannot see this bug"


@pytest.mark.parametrize("operand,wrong", [
    ("V", lambda l: ((l & 7) + ((l >> 4) & 1) * 8, ((l >> 3) & 1) * 8)),  # lane bits 3 / 4 swapped in .trans
    ("K", lambda l: (l & 7, ((l >> 3) ^ 1) * 8)),  # k-steps of one ldmatrix swapped
    ("Q", lambda l: (l & 7 | (l & 16) >> 1, (l >> 3 & 1) * 8)),  # x4 matrices in row-major order
])
def test_kernel_fragment_checker_rejects_wrong_addresses(operand, wrong):
    """The kernel-addressing check can fail: a wrong lane in one ldmatrix address is reported."""
    assert not check_kernel_fragments(NumpyWarpModel(), "bf16")
    bad = check_kernel_fragments(NumpyWarpModel(), "bf16", addresses={**KERNEL_ADDRESSES, operand: wrong})
    assert bad and any(operand in b for b in bad), bad[:3]


def test_tables_are_consistent():
    """The snapshot itself: each table is a bijection onto its tile, the two mma atoms agree (the
    fragment layout does not depend on the element type), and every lane's register pairs are
    adjacent columns of one row (what the kernel's 32-bit P stores and output stores assume)."""
    t = TABLES
    assert t["cutlass_version"] == "4.2.0"
    for key in GMMA_SMEM:  # each k-step's offsets: a bijection onto distinct 16-bit slots
        for step in t[key]["ksteps"]:
            offs = [o for row in step["offsets"] for o in row]
            assert len(set(offs)) == len(offs) and all(o % 2 == 0 for o in offs), key
    assert sorted(tuple(v) for row in t["gmma_rs_a_64x16"]["A"] for v in row) == \
        [(m, k) for m in range(64) for k in range(16)]
    for n in (8, 64):
        coords = sorted(tuple(v) for row in t[f"gmma_acc_64x{n}"]["C"] for v in row)
        assert coords == [(m, j) for m in range(64) for j in range(n)]
    for key in ("mma_m16n8k16_bf16", "mma_m16n8k16_fp16"):
        tab = t[key]
        for op, shape in (("A", (16, 16)), ("B", (8, 16)), ("C", (16, 8))):
            coords = [tuple(x) for lane in tab[op] for x in lane]
            assert sorted(coords) == [(i, j) for i in range(shape[0]) for j in range(shape[1])], (key, op)
        for lane in tab["C"]:
            assert lane[0][0] == lane[1][0] and lane[1][1] == lane[0][1] + 1
            assert lane[2][0] == lane[3][0] and lane[3][1] == lane[2][1] + 1
    for op in ("A", "B", "C"):
        assert t["mma_m16n8k16_bf16"][op] == t["mma_m16n8k16_fp16"][op]
    for key in ("ldmatrix_x4", "ldmatrix_x4_trans"):
        coords = sorted(tuple(x) for lane in t[key]["dst"] for x in lane)
        assert coords == [(s, j) for s in range(32) for j in range(8)], key


# ---------------------------------------------------------------------------------------------
# Hopper wgmma (issue 11): the emulator's descriptor decoding and accumulator layout against CuTe's
# GMMA layouts. Both operands are placed at the byte offsets CuTe's GMMA::Layout_*_Atom<bf16> tiles
# give (the swizzle applied by CuTe), described by CuTe's make_gmma_desc descriptors, multiplied by
# one wgmma through csrc/cuda/sm90/ptx_sm90.cuh in the emulator, and the accumulators are read back
# through CuTe's CLayout_64xN. Nothing on the path from the tables to the product uses our formulas.

GMMA_SMEM = sorted(k for k in TABLES if k.startswith("gmma_smem_"))
A_BASE, B_BASE, SMEM_BYTES = 0, 32768, 65536  # two 1024-aligned operand regions


def cute_layout_fn(text: str):
    """A flat-nested CuTe layout string "((a,b,..),(c,..)):((s,..),(t,..))" -> f(thread, value) index
    (colexicographic coordinates, as CuTe orders them)."""
    shape_s, stride_s = text.replace("_", "").split(":")
    parse = lambda x: [[int(v) for v in grp.strip("()").split(",")] for grp in x[1:-1].split("),(")]
    shapes, strides = parse(shape_s), parse(stride_s)

    def f(*coords):
        idx = 0
        for c, shp, strd in zip(coords, shapes, strides):
            for extent, step in zip(shp, strd):
                idx += (c % extent) * step
                c //= extent
        return idx
    return f


def acc_coords(n: int, tables=TABLES):
    """[thread][value] -> (m, n) of the 64 x n accumulator tile, from CuTe (the 64x8 / 64x64 tables,
    else the 64x256 layout with its N / 8 mode resized)."""
    key = f"gmma_acc_64x{n}"
    if key in tables:
        return [[tuple(v) for v in t] for t in tables[key]["C"]]
    text = tables["gmma_acc_64x256_layout"].replace("_32)", f"_{n // 8})")
    f = cute_layout_fn(text)
    return [[(f(t, v) % 64, f(t, v) // 64) for v in range(n // 2)] for t in range(128)]


def place(smem, entry, kstep, values, base):
    """values [rows][16] (bf16 bits) at CuTe's byte offsets of k-step `kstep` of `entry`, from `base`."""
    offs = np.asarray(entry["ksteps"][kstep]["offsets"])
    rows = values.shape[0]
    flat = (base + offs[:rows]).ravel()
    smem.view(np.uint16)[flat // 2] = values.ravel()


def cute_desc(entry, kstep, base):
    step = entry["ksteps"][kstep]
    return int(step["desc"], 16) + ((base + step["start"]) >> 4), (base + step["start"], step["lbo"], step["sbo"],
                                                                    step["layout_type"])


class GmmaCase:
    """One wgmma: A [64 x 16] with layout entry a_key at k-step ka, B [n x 16] with b_key at kb."""

    def __init__(self, a_key, ka, b_key, kb, n):
        self.a, self.b, self.ka, self.kb, self.n = TABLES[a_key], TABLES[b_key], ka, kb, n
        self.trans_a, self.trans_b = int(self.a["major"] == "MN"), int(self.b["major"] == "MN")

    def run(self, A, B, C, offsets_b=None, kind="bf16"):
        """D = A B^T + C through the emulator; A [64, 16], B [n, 16], C [64, n] float."""
        from cuda_emu import sm90_runner
        smem = np.zeros(SMEM_BYTES, dtype=np.uint8)
        place(smem, self.a, self.ka, to_bits(kind, A), A_BASE)
        place(smem, offsets_b or self.b, self.kb, to_bits(kind, B), B_BASE)
        da, fa = cute_desc(self.a, self.ka, A_BASE)
        db, fb = cute_desc(self.b, self.kb, B_BASE)
        coords = acc_coords(self.n)
        acc = np.array([[C[m, nn] for (m, nn) in t] for t in coords], dtype=np.float32)
        built_a, built_b, out = sm90_runner.run_wgmma(self.n, self.trans_a, self.trans_b, True, da, db, fa, fb,
                                                      smem, acc, kind=kind)
        D = np.zeros((64, self.n))
        for t, row in enumerate(coords):
            for v, (m, nn) in enumerate(row):
                D[m, nn] = out[t, v]
        return D, (built_a, built_b), (da, db)


IDENTITY_A = np.eye(64, 16)  # D[m, n] = B[n, m] for m < 16


@pytest.mark.parametrize("key", GMMA_SMEM)
@pytest.mark.parametrize("kstep", [0, 1], ids=["kstep0", "kstep3"])
def test_wgmma_reads_cute_gmma_layout_as_b(key, kstep):
    """Every (n, k) of a CuTe GMMA layout, given as the B operand with CuTe's descriptor, reaches the
    product as B[n, k]: once with value n + 1, once with k + 1 (both exact in bf16)."""
    n = TABLES[key]["mn"]
    case = GmmaCase("gmma_smem_k_inter", 0, key, kstep, n)
    rows, cols = np.meshgrid(np.arange(n), np.arange(16), indexing="ij")
    for label, B in (("row", rows + 1.0), ("column", cols + 1.0)):
        D, built, want_desc = case.run(IDENTITY_A, B, np.zeros((64, n)))
        assert np.array_equal(D[:16], B.T), f"{key} k-step {kstep}: B {label} ids wrong at " \
            f"{np.argwhere(D[:16] != B.T)[:4].tolist()} (D[k, n] vs B[n, k])"
        assert np.array_equal(D[16:], np.zeros((48, n)))
        assert built == want_desc, f"make_smem_desc {[hex(x) for x in built]} != CuTe {[hex(x) for x in want_desc]}"


@pytest.mark.parametrize("key", GMMA_SMEM)
def test_wgmma_reads_cute_gmma_layout_as_a(key):
    """The same layouts as the A operand (64 rows; trans-a for MN-major), B an identity selector."""
    case = GmmaCase(key, 1, "gmma_smem_k_inter", 0, 16)
    rows, cols = np.meshgrid(np.arange(64), np.arange(16), indexing="ij")
    for label, A in (("row", rows + 1.0), ("column", cols + 1.0)):
        D, built, want_desc = case.run(A, np.eye(16), np.zeros((64, 16)))
        assert np.array_equal(D, A), f"{key}: A {label} ids wrong at {np.argwhere(D != A)[:4].tolist()}"
        assert built == want_desc


@pytest.mark.parametrize("kind", ["bf16", "fp16"])
@pytest.mark.parametrize("n", [8, 64, 128])
def test_wgmma_accumulators_follow_cute_clayout(n, kind):
    """Random A, B, C (small integers: every sum exact): D = A B^T + C through CuTe's accumulator
    layout (64x8, 64x64 tables; 64x128 from the 64x256 layout) and its SW128 K-major operands."""
    rng = np.random.default_rng(n)
    A = rng.integers(-8, 9, (64, 16)) * 0.5
    B = rng.integers(-8, 9, (n, 16)) * 0.25
    C = rng.integers(-64, 65, (64, n)).astype(np.float64)
    b_key = "gmma_smem_k_sw128" if n <= 64 else "gmma_smem_mn_sw128"
    D, _, _ = GmmaCase("gmma_smem_k_sw128", 1, b_key, 1, n).run(A, B, C, kind=kind)
    assert np.array_equal(D, A @ B.T + C), np.argwhere(D != A @ B.T + C)[:4].tolist()


@pytest.mark.parametrize("kind", ["bf16", "fp16"])
@pytest.mark.parametrize("b_key,n", [("gmma_smem_k_sw128", 64), ("gmma_smem_mn_sw128", 128)])
def test_wgmma_rs_a_registers_follow_cute_alayout(b_key, n, kind):
    """wgmma with A from registers (wgmma_rs): each thread's four registers hold A as CuTe's
    SM90_64xNx16_F32BF16BF16_RS ALayout says (value v in register v / 2, low half when v is even)."""
    from cuda_emu import sm90_runner
    rng = np.random.default_rng(n + len(kind))
    A = rng.integers(-8, 9, (64, 16)) * 0.5
    B = rng.integers(-8, 9, (n, 16)) * 0.25
    C = rng.integers(-64, 65, (64, n)).astype(np.float64)
    bits = to_bits(kind, A)
    regs = np.zeros((128, 4), dtype=np.uint32)
    for t, vals in enumerate(TABLES["gmma_rs_a_64x16"]["A"]):
        for v, (m, k) in enumerate(vals):
            regs[t, v // 2] |= np.uint32(bits[m, k]) << np.uint32(16 * (v % 2))
    smem = np.zeros(SMEM_BYTES, dtype=np.uint8)
    entry = TABLES[b_key]
    place(smem, entry, 1, to_bits(kind, B), B_BASE)
    db, fb = cute_desc(entry, 1, B_BASE)
    coords = acc_coords(n)
    acc = np.array([[C[m, nn] for (m, nn) in t] for t in coords], dtype=np.float32)
    _, _, out = sm90_runner.run_wgmma(n, 2, int(entry["major"] == "MN"), True, 0, db, (0, 0, 0, 0), fb, smem, acc,
                                      kind=kind, a_regs=regs)
    D = np.zeros((64, n))
    for t, row in enumerate(coords):
        for v, (m, nn) in enumerate(row):
            D[m, nn] = out[t, v]
    assert np.array_equal(D, A @ B.T + C), np.argwhere(D != A @ B.T + C)[:4].tolist()


def test_cute_acc_layout_evaluator_matches_tables():
    """The layout-string evaluator used for N = 128 reproduces CuTe's printed 64x8 / 64x64 tables."""
    for n in (8, 64):
        t = TABLES[f"gmma_acc_64x{n}"]
        f = cute_layout_fn(t["C_layout"])
        assert [[(f(th, v) % 64, f(th, v) // 64) for v in range(n // 2)] for th in range(128)] == \
            [[tuple(v) for v in row] for row in t["C"]]


def test_wgmma_layout_check_can_fail():
    """The B-layout check sees a wrong swizzle: SW64 offsets under CuTe's SW128 descriptor differ."""
    case = GmmaCase("gmma_smem_k_inter", 0, "gmma_smem_k_sw128", 0, 64)
    rows, cols = np.meshgrid(np.arange(64), np.arange(16), indexing="ij")
    D, _, _ = case.run(IDENTITY_A, cols + 1.0, np.zeros((64, 64)), offsets_b=TABLES["gmma_smem_k_sw64"])
    assert not np.array_equal(D[:16], (cols + 1.0).T)


# ---- regenerating the snapshot from the CuTe headers


def _cutlass_include() -> str | None:
    spec = importlib.util.find_spec("cutlass_library")
    if spec is None or not spec.submodule_search_locations:
        return None
    inc = os.path.join(list(spec.submodule_search_locations)[0], "source", "include")
    return inc if os.path.exists(os.path.join(inc, "cute", "atom", "mma_traits_sm80.hpp")) else None


def _cuda_includes() -> list[str] | None:
    """CUDA toolkit include dirs (cute/util/debug.hpp includes cuda_runtime_api.h, cutlass.h
    includes <cuda/std/...> from CCCL)."""
    cands = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"]
    nvcc = shutil.which("nvcc")
    if nvcc:
        cands.append(os.path.dirname(os.path.dirname(os.path.realpath(nvcc))))
    cands += sorted(glob.glob("/usr/local/cuda-*"), reverse=True)
    for base in filter(None, cands):
        inc = os.path.join(base, "include")
        if os.path.exists(os.path.join(inc, "cuda_runtime_api.h")):
            dirs = [inc]
            if os.path.isdir(os.path.join(inc, "cccl")):
                dirs.append(os.path.join(inc, "cccl"))
            return dirs
    return None


def generate_tables(out_dir: str) -> dict:
    """Build cute_layout_tables.cpp with g++ (cached by the inputs' hash) and run it."""
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("g++")
    cutlass, cuda = _cutlass_include(), _cuda_includes()
    if not cxx or not cutlass or not cuda:
        pytest.skip(f"needs g++ ({cxx}), the nvidia-cutlass headers ({cutlass}; make cuda-tools) and the "
                    f"CUDA headers ({cuda})")
    with open(GENERATOR, "rb") as fh:
        key = hashlib.sha256(fh.read() + repr((cxx, cutlass, cuda)).encode()).hexdigest()[:16]
    exe = os.path.join(out_dir, f"cute_layout_tables-{key}")
    if not os.path.exists(exe):
        os.makedirs(out_dir, exist_ok=True)
        cmd = [cxx, "-std=c++17", "-O1", "-w", f"-I{cutlass}", *[f"-I{d}" for d in cuda], GENERATOR, "-o", exe + ".tmp"]
        res = subprocess.run(cmd, capture_output=True, text=True)
        assert res.returncode == 0, "cute_layout_tables.cpp does not compile:\n" + res.stderr[-3000:]
        os.replace(exe + ".tmp", exe)
    res = subprocess.run([exe], capture_output=True, text=True, check=True)
    return json.loads(res.stdout)


def test_snapshot_matches_cute():
    fresh = generate_tables(os.path.join(ROOT, "build", "cute_layouts"))
    assert fresh == TABLES, ("tests/cute_layouts/cute_tables.json differs from what CuTe's headers give now; "
                             "regenerate it with the program in tests/cute_layouts/ and review the diff")
