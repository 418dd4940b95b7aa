"""Huge pages for CPU caches.

A paged latent cache on the CPU is read in scattered 18-72 KB blocks. With the default 4 KiB
pages every block touches 5-18 pages, and once the cache is larger than the TLB's reach
(a few MB) each of them costs a page walk: on a 2-vCPU Xeon (AMX) a 151 MB bf16 cache
decoded at 8.4 us per 64-key block with 4 KiB pages and 6.4 us with 2 MiB pages (one
thread, docs/cpu-kernel.md). Linux gives huge pages to memory that asks for them
(`/sys/kernel/mm/transparent_hugepage/enabled` = madvise, the default on many distributions)
or to all memory (= always).

    cache = torch.zeros(num_blocks, block_size, 576, dtype=torch.bfloat16)
    mla_ext.use_huge_pages(cache)      # before or after filling it

`use_huge_pages` marks the tensor's memory for huge pages (MADV_HUGEPAGE) and, by default,
asks the kernel to rebuild the pages already in use as huge pages now (MADV_COLLAPSE,
Linux >= 6.1) instead of leaving that to the background khugepaged scan. It is explicit
(nothing in mla_ext changes the memory of tensors it is handed) and it raises when the
kernel refuses, with the reason.
"""
from __future__ import annotations

import ctypes
import errno
import os
import sys

import torch

__all__ = ["use_huge_pages"]

HUGE_PAGE_BYTES = 2 << 20
_MADV_HUGEPAGE = 14
_MADV_COLLAPSE = 25
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def _thp_setting() -> str:
    """The active transparent-huge-page mode ('always', 'madvise', 'never') or 'unknown'."""
    try:
        with open(_THP_SETTING) as f:
            text = f.read()
    except OSError:
        return "unknown"
    for word in text.split():
        if word.startswith("[") and word.endswith("]"):
            return word[1:-1]
    return "unknown"


def _madvise(addr: int, length: int, advice: int) -> int:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    libc.madvise.restype = ctypes.c_int
    return 0 if libc.madvise(addr, length, advice) == 0 else ctypes.get_errno()


def use_huge_pages(tensor: torch.Tensor, *, collapse: bool = True) -> int:
    """Back a CPU tensor's memory with 2 MiB transparent huge pages.

    The whole storage behind `tensor` is advised, rounded inward to 2 MiB boundaries (a
    storage smaller than one huge page is left alone). Returns the number of bytes advised.

    collapse=True also rebuilds the pages already in use as huge pages now (MADV_COLLAPSE,
    Linux >= 6.1; about 0.1 s per 64 MB); collapse=False only marks the range, so pages
    touched from then on come as huge pages and older ones wait for khugepaged.

    Raises ValueError for a tensor that is not on the CPU, and OSError (naming the errno and
    the system's transparent_hugepage mode) when the kernel refuses, e.g. with THP disabled
    ('never') or a kernel without MADV_COLLAPSE (then collapse=False still helps new pages).
    """
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"use_huge_pages: expected a torch.Tensor, got {type(tensor).__name__}")
    if tensor.device.type != "cpu":
        raise ValueError(f"use_huge_pages: the tensor must be on the CPU, got {tensor.device}")
    if not sys.platform.startswith("linux"):
        raise OSError(errno.ENOSYS, f"use_huge_pages: transparent huge pages are a Linux feature ({sys.platform})")
    storage = tensor.untyped_storage()
    start, nbytes = storage.data_ptr(), storage.nbytes()
    lo = (start + HUGE_PAGE_BYTES - 1) // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
    hi = (start + nbytes) // HUGE_PAGE_BYTES * HUGE_PAGE_BYTES
    if hi <= lo:
        return 0
    steps = [(_MADV_HUGEPAGE, "MADV_HUGEPAGE")] + ([(_MADV_COLLAPSE, "MADV_COLLAPSE")] if collapse else [])
    for advice, name in steps:
        err = _madvise(lo, hi - lo, advice)
        if err:
            hint = " (MADV_COLLAPSE needs Linux >= 6.1: try collapse=False)" if advice == _MADV_COLLAPSE else ""
            raise OSError(err, f"use_huge_pages: madvise({name}) over {hi - lo} bytes failed: {os.strerror(err)}; "
                               f"transparent_hugepage is '{_thp_setting()}'{hint}")
    return hi - lo
