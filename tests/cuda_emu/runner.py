"""Build and drive the SIMT emulator: csrc/cuda compiled as host C++ (-DMLA_CUDA_EMULATION)
plus tests/cuda_emu/{emu_runtime,harness}.cpp, in three flavours:

  plain   -O1, the emulator's own checks (barriers, collectives, cp.async, shared bounds,
          write-once outputs)
  asan    + AddressSanitizer and UndefinedBehaviorSanitizer (every global buffer is its own
          allocation of its real size; shared memory past its declared size is poisoned)
  tsan    + ThreadSanitizer (each CUDA thread a fiber; barriers, warp collectives, launch
          and block end are the only happens-before edges)

Objects and binaries are cached under ~/.cache/mla_ext/emu/ by the content of every source and
header they are built from (and the flags), so editing a kernel rebuilds on the next run. `run_decode` / `run_append` take torch tensors laid out as
mla_ext.decode / append_kv take them and return what the emulated CUDA call wrote.
"""
from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[2]
EMU_DIR = Path(__file__).resolve().parent
CACHE_ROOT = Path(os.environ.get("MLA_EXT_EMU_CACHE", Path.home() / ".cache" / "mla_ext" / "emu"))
CUDA_HOME = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda"))

# The divergence checks compare call sites (return addresses): keep GCC from merging two
# identical __syncthreads() / collective calls of different source lines into one.
NO_MERGE = ["-fno-crossjumping", "-fno-tree-tail-merge"]
FLAVORS = {
    "plain": ["-O1"],
    "asan": ["-O1", "-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"],
    "tsan": ["-O1", "-fsanitize=thread"],
}
# The runtime is not under test: optimised in every flavour; under tsan not instrumented
# (its bookkeeping is shared by all fibers by design) but annotating the kernel's traffic.
RUNTIME_FLAGS = {"plain": ["-O2"], "asan": ["-O2"], "tsan": ["-O2", "-fno-sanitize=thread", "-DMLA_EMU_TSAN=1"]}
KERNEL_SOURCES = ["append_kv.cu", "decode.cu", "decode_tc_bf16.cu", "decode_tc_fp16.cu", "decode_tc_fp8_bf16.cu",
                  "decode_tc_fp8_fp16.cu", "sparse_decode.cu", "sm90/decode_sm90.cu"]
EMU_SOURCES = ["emu_runtime.cpp", "emu_sm90.cpp", "harness.cpp"]
ERROR_EXIT = 86  # mla_emu::kErrorExitCode

DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2, torch.float8_e4m3fn: 3}
SAN_ENV = {
    "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0:halt_on_error=1",
    "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
    "TSAN_OPTIONS": "halt_on_error=1:exitcode=66:report_signal_unsafe=0",
}


def cuda_include() -> Path:
    for cand in (CUDA_HOME / "include", Path("/usr/local/cuda-13.0/include")):
        if (cand / "cuda_bf16.h").exists():
            return cand
    raise FileNotFoundError("CUDA toolkit headers (cuda_bf16.h) not found; set CUDA_HOME")


def available() -> str | None:
    """None if the emulator can be built here, else the reason it cannot."""
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        return "no C++ compiler (g++)"
    try:
        cuda_include()
    except FileNotFoundError as e:
        return str(e)
    return None


def _sources(csrc: Path) -> list[Path]:
    return [csrc / "cuda" / s for s in KERNEL_SOURCES] + [EMU_DIR / s for s in EMU_SOURCES]


def _local_includes(src: Path, dirs: list[Path], seen: set) -> None:
    """The quoted #includes of `src` that resolve in `dirs` (or next to it), recursively."""
    for line in src.read_text().splitlines():
        line = line.strip()
        if not line.startswith("#include \""):
            continue
        name = line.split('"')[1]
        for d in [src.parent, *dirs]:
            cand = (d / name).resolve()
            if cand.is_file():
                if cand not in seen:
                    seen.add(cand)
                    _local_includes(cand, dirs, seen)
                break


def _object_key(src: Path, dirs: list[Path], flags: list[str]) -> str:
    """Hash of a translation unit: its source, every local header it reaches, the flags."""
    seen: set = set()
    _local_includes(src, dirs, seen)
    h = hashlib.sha256(" ".join(flags).encode())
    for f in [src, *sorted(seen)]:
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def build(flavor: str = "plain", csrc: Path | None = None, jobs: int | None = None, program: str = "harness") -> Path:
    """The harness binary for `flavor`, built from `csrc` (default: the repo's csrc/), or with
    program="collectives_probe" the one-collective probe (collectives_probe.cpp). Objects are
    cached by content, so a mutated copy of csrc rebuilds only what its change reaches."""
    csrc = Path(csrc or REPO / "csrc")
    cxx = os.environ.get("CXX", "g++")
    dirs = [EMU_DIR, csrc / "cuda"]
    common = ["-std=c++17", "-g", "-fno-strict-aliasing", "-Wall", "-Wno-unknown-pragmas", "-DMLA_CUDA_EMULATION",
              *NO_MERGE, f"-I{cuda_include()}", *(f"-I{d}" for d in dirs)] + FLAVORS[flavor]
    obj_dir = CACHE_ROOT / "obj" / flavor
    obj_dir.mkdir(parents=True, exist_ok=True)

    def compile_one(src: Path) -> Path:
        # The runtime is not under test: optimised in every flavour (see RUNTIME_FLAGS).
        flags = common + (RUNTIME_FLAGS[flavor] if src.name in ("emu_runtime.cpp", "emu_sm90.cpp") else [])
        # Keyed by content, not paths: a mutated copy of csrc reuses every object it does not change.
        key_flags = [cxx, *(f for f in flags if not f.startswith("-I"))]
        obj = obj_dir / f"{src.name}-{_object_key(src, dirs, key_flags)}.o"
        if obj.exists():
            return obj
        tmp = obj.with_suffix(f".{os.getpid()}.tmp")
        cmd = [cxx, *flags, "-x", "c++", "-c", str(src), "-o", str(tmp)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"emulator build failed: {' '.join(cmd)}\n{r.stderr[-4000:]}")
        os.replace(tmp, obj)
        return obj

    jobs = jobs or int(os.environ.get("MAX_JOBS", os.cpu_count() or 1))
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        sources = _sources(csrc) if program == "harness" else [EMU_DIR / "emu_runtime.cpp", EMU_DIR / "emu_sm90.cpp",
                                                               EMU_DIR / f"{program}.cpp"]
        objs = list(pool.map(compile_one, sources))
    digest = hashlib.sha256("".join(o.name for o in objs).encode()).hexdigest()[:16]
    exe = CACHE_ROOT / "bin" / f"{program}-{flavor}-{digest}"
    if not exe.exists():
        exe.parent.mkdir(parents=True, exist_ok=True)
        tmp = exe.with_suffix(f".{os.getpid()}.tmp")
        r = subprocess.run([cxx, *FLAVORS[flavor], "-o", str(tmp), *map(str, objs)], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"emulator link failed: {r.stderr[-4000:]}")
        os.replace(tmp, exe)
    return exe


# ------------------------------------------------------------------------------ case files


@dataclass
class EmuResult:
    info: dict                      # plan and counters printed by the harness
    outputs: dict = field(default_factory=dict)


class EmulatorError(AssertionError):
    """The emulator or a sanitizer reported a problem (message: its stderr)."""


class _CaseWriter:
    def __init__(self, directory: Path):
        self.dir = directory
        self.lines: list[str] = []
        self.storages: dict[int, tuple[str, torch.Tensor]] = {}  # storage data_ptr -> (buffer, uint8 view)

    def tensor(self, field_name: str, t: torch.Tensor) -> None:
        """Pointer field -> t, inside a buffer holding t's whole storage (its real allocation)."""
        storage = t.untyped_storage()
        key = storage.data_ptr()
        if key not in self.storages:
            name = f"buf{len(self.storages)}"
            raw = torch.empty(0, dtype=torch.uint8).set_(storage)
            raw.numpy().tofile(self.dir / f"{name}.bin")
            self.lines.append(f"buffer {name} {raw.numel()} {name}.bin")
            self.storages[key] = (name, raw)
        name, _ = self.storages[key]
        self.lines.append(f"ptr {field_name} {name} {t.data_ptr() - key}")

    def output(self, field_name: str, nbytes: int, writeonce: bool = True) -> str:
        name = f"out_{field_name}"
        self.lines.append(f"buffer {name} {nbytes} -")
        self.lines.append(f"ptr {field_name} {name} 0")
        self.lines.append(f"output {name}")
        if writeonce:
            self.lines.append(f"writeonce {name}")
        return name

    def set(self, kind: str, key: str, value) -> None:
        self.lines.append(f"{kind} {key} {value}")

    def write(self) -> None:
        (self.dir / "case.txt").write_text("\n".join(self.lines) + "\n")


def _run(exe: Path, directory: Path, flavor: str) -> dict:
    env = dict(os.environ, **SAN_ENV)
    r = subprocess.run([str(exe), str(directory)], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        raise EmulatorError(f"emulated run ({flavor}) exited {r.returncode}:\n{r.stderr[-6000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def _common(w: _CaseWriter, order: str, seed: int, sms: int, smem_optin: int) -> None:
    w.lines += [f"order {order}", f"seed {seed}", f"sms {sms}", f"smem_optin {smem_optin}"]


# Emulated devices: SM count and the opt-in shared memory per block, which select the
# tensor-core tile configuration (L: 227 KB sm_90, M: 163 KB sm_80, S: 99 KB sm_86 / sm_89).
DEVICES = {"sm90": (132, 232448), "sm80": (108, 166912), "sm86": (84, 101376)}


def run_decode(q_nope, q_pe, cache, block_table, cache_seqlens, softmax_scale, causal=True, kv_scale=None, *,
               impl="auto", device="sm90", sms=None, order="forward", seed=1, flavor="plain",
               exe: Path | None = None):
    """mla_ext.decode's math through the emulated CUDA kernels. q_nope [b, s_q, h, 512 or 576]
    (packed when q_pe is None), cache [NB, BS, 576] or [NB, BS, 1, 576]. Returns (out, lse, info)."""
    exe = exe or build(flavor)
    if q_pe is None:
        q_pe = q_nope[..., 512:]
        q_nope = q_nope[..., :512]
    if cache.dim() == 4:
        cache = cache.squeeze(2)
    b, s_q, h, _ = q_nope.shape
    # The params structs take strides for the outer dims only: the rest must be dense.
    for name, t in (("q_nope", q_nope), ("q_pe", q_pe), ("cache", cache)):
        assert t.stride(-1) == 1, f"{name}: the last dim must be contiguous"
    assert block_table.dtype == torch.int32 and block_table.stride(1) == 1, "block_table: int32, rows contiguous"
    assert cache_seqlens.dtype == torch.int32 and cache_seqlens.is_contiguous(), "cache_seqlens: contiguous int32"
    cache_u = cache.view(torch.uint8) if cache.dtype == torch.float8_e4m3fn else cache
    with tempfile.TemporaryDirectory(prefix="emu-") as d:
        w = _CaseWriter(Path(d))
        w.lines.append("op decode")
        w.lines.append(f"impl {impl}")
        dev_sms, optin = DEVICES[device]
        _common(w, order, seed, sms or dev_sms, optin)
        w.tensor("q_nope", q_nope)
        w.tensor("q_pe", q_pe)
        w.tensor("cache", cache_u)
        w.tensor("block_table", block_table)
        w.tensor("cache_seqlens", cache_seqlens)
        if kv_scale is not None:
            w.tensor("kv_scale", kv_scale.reshape(1).to(torch.float32))
        es = q_nope.element_size()
        out_name = w.output("out", b * s_q * h * 512 * es)
        lse_name = w.output("lse", b * s_q * h * 4)
        for prefix, t in (("q_nope", q_nope), ("q_pe", q_pe)):
            w.set("int", f"{prefix}_batch_stride", t.stride(0))
            w.set("int", f"{prefix}_seq_stride", t.stride(1))
            w.set("int", f"{prefix}_head_stride", t.stride(2))
        w.set("int", "cache_block_stride", cache.stride(0))
        w.set("int", "cache_token_stride", cache.stride(1))
        w.set("int", "block_table_batch_stride", block_table.stride(0))
        for k, v in dict(batch=b, seqlen_q=s_q, num_heads=h, num_blocks=cache.shape[0], block_size=cache.shape[1],
                         max_blocks_per_seq=block_table.shape[1], causal=int(causal),
                         q_dtype=DTYPE_CODE[q_nope.dtype], cache_dtype=DTYPE_CODE[cache.dtype]).items():
            w.set("int", k, v)
        w.set("float", "softmax_scale", repr(float(softmax_scale)))
        w.write()
        info = _run(exe, Path(d), flavor)
        out = torch.from_numpy(np.fromfile(Path(d) / f"{out_name}.out", dtype=np.uint8)).view(q_nope.dtype)
        lse = torch.from_numpy(np.fromfile(Path(d) / f"{lse_name}.out", dtype=np.uint8)).view(torch.float32)
    return out.reshape(b, s_q, h, 512), lse.reshape(b, s_q, h), info


def run_append(kv_c, k_pe, cache, slot_mapping, scale=None, *, order="forward", seed=1, flavor="plain",
               exe: Path | None = None):
    """mla_ext.append_kv through the emulated CUDA kernels; returns (new cache, info)."""
    exe = exe or build(flavor)
    if cache.dim() == 4:
        cache = cache.squeeze(2)
    for name, t in (("kv_c", kv_c), ("k_pe", k_pe), ("cache", cache)):
        assert t.stride(-1) == 1, f"{name}: the last dim must be contiguous"
    assert slot_mapping.dtype in (torch.int32, torch.int64) and slot_mapping.is_contiguous(), "slot_mapping"
    cache_u = cache.view(torch.uint8) if cache.dtype == torch.float8_e4m3fn else cache
    with tempfile.TemporaryDirectory(prefix="emu-") as d:
        w = _CaseWriter(Path(d))
        w.lines.append("op append")
        _common(w, order, seed, 132, 232448)
        w.tensor("kv_c", kv_c)
        w.tensor("k_pe", k_pe)
        w.tensor("slot_mapping", slot_mapping)
        if scale is not None:
            w.tensor("scale", scale.reshape(1).to(torch.float32))
        w.tensor("cache", cache_u)
        cache_buf, raw = w.storages[cache_u.untyped_storage().data_ptr()]
        w.lines.append(f"output {cache_buf}")
        w.lines.append(f"writeonce {cache_buf}")
        for k, v in dict(kv_c_row_stride=kv_c.stride(0), k_pe_row_stride=k_pe.stride(0),
                         cache_block_stride=cache.stride(0), cache_token_stride=cache.stride(1),
                         num_tokens=kv_c.shape[0], num_blocks=cache.shape[0], block_size=cache.shape[1],
                         slot_is_int64=int(slot_mapping.dtype == torch.int64), input_dtype=DTYPE_CODE[kv_c.dtype],
                         cache_dtype=DTYPE_CODE[cache.dtype]).items():
            w.set("int", k, v)
        w.write()
        info = _run(exe, Path(d), flavor)
        data = torch.from_numpy(np.fromfile(Path(d) / f"{cache_buf}.out", dtype=np.uint8))
    new_storage = raw.clone()
    new_storage.copy_(data)
    result = torch.empty(0, dtype=cache.dtype).set_(new_storage.untyped_storage(), cache.storage_offset(),
                                                     cache.shape, cache.stride())
    return result, info


def run_sparse_decode(q, cache, indices, softmax_scale, topk_length=None, extra_cache=None, extra_indices=None,
                      extra_topk_length=None, attn_sink=None, *, impl="auto", device="sm90", sms=None,
                      order="forward", seed=1, flavor="plain", exe: Path | None = None):
    """mla_ext.sparse_decode through the emulated CUDA kernels (csrc/cuda/sparse_decode.cu).
    q [b, s_q, h, 576] contiguous; cache float8_e4m3fn [NB, BS, (1,) 656] or 16 / 32-bit
    [NB, BS, (1,) 576] (padded block strides fine); indices [b, s_q, topk] int32.
    Returns (out [b, s_q, h, 512] in q's dtype, lse [b, s_q, h] float32, info)."""
    exe = exe or build(flavor)
    b, s_q, h, _ = q.shape
    assert q.is_contiguous(), "q must be contiguous"
    with tempfile.TemporaryDirectory(prefix="emu-") as d:
        w = _CaseWriter(Path(d))
        w.lines.append("op sparse")
        w.lines.append(f"impl {impl}")
        dev_sms, optin = DEVICES[device]
        _common(w, order, seed, sms or dev_sms, optin)
        w.tensor("q", q)
        cache_dtype = None
        for prefix, c, idx, length in (("main_", cache, indices, topk_length),
                                       ("extra_", extra_cache, extra_indices, extra_topk_length)):
            if c is None:
                continue
            c3 = c.squeeze(2) if c.dim() == 4 else c
            assert c3.stride(-1) == 1, "cache: the last dim must be contiguous"
            assert cache_dtype in (None, c3.dtype), "both caches must share a dtype"
            cache_dtype = c3.dtype
            es = c3.element_size()
            w.tensor(prefix + "cache", c3.view(torch.uint8) if c3.dtype == torch.float8_e4m3fn else c3)
            assert idx.dtype == torch.int32 and idx.is_contiguous() and idx.shape[:2] == (b, s_q)
            if idx.numel():
                w.tensor(prefix + "indices", idx)
            if length is not None:
                assert length.dtype == torch.int32 and length.is_contiguous()
                w.tensor(prefix + "topk_length", length)
            for k, v in dict(block_stride=c3.stride(0) * es, token_stride=c3.stride(1) * es, topk=idx.shape[2],
                             block_size=c3.shape[1], num_tokens=c3.shape[0] * c3.shape[1]).items():
                w.set("int", prefix + k, v)
        if attn_sink is not None:
            w.tensor("attn_sink", attn_sink.to(torch.float32).contiguous())
        out_name = w.output("out", b * s_q * h * 512 * q.element_size())
        lse_name = w.output("lse", b * s_q * h * 4)
        for k, v in dict(batch=b, seqlen_q=s_q, num_heads=h, has_extra=int(extra_cache is not None),
                         q_dtype=DTYPE_CODE[q.dtype], cache_dtype=DTYPE_CODE[cache_dtype]).items():
            w.set("int", k, v)
        w.set("float", "softmax_scale", repr(float(softmax_scale)))
        w.write()
        info = _run(exe, Path(d), flavor)
        out = torch.from_numpy(np.fromfile(Path(d) / f"{out_name}.out", dtype=np.uint8)).view(q.dtype)
        lse = torch.from_numpy(np.fromfile(Path(d) / f"{lse_name}.out", dtype=np.uint8)).view(torch.float32)
    return out.reshape(b, s_q, h, 512), lse.reshape(b, s_q, h), info
