"""mla_ext.use_huge_pages and PagedLatentCache(huge_pages=True): the advice reaches the kernel
(the tensor's pages show up as AnonHugePages in /proc/self/smaps), results are unchanged,
and misuse is refused clearly."""
import sys

import pytest
import torch

import mla_ext
from mla_ext import memory
from mla_ext import reference

from conftest import DEEPSEEK_SCALE, make_paged_kv, make_query

LINUX_THP = sys.platform.startswith("linux") and memory._thp_setting() in ("always", "madvise")
NEEDS_THP = pytest.mark.skipif(not LINUX_THP, reason="needs Linux with transparent huge pages ('always' or 'madvise')")


def _huge_bytes_in(lo: int, hi: int) -> int:
    """Bytes of AnonHugePages in the mappings of /proc/self/smaps that overlap [lo, hi)."""
    total, overlap = 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and ":" not in head:
                a, b = (int(x, 16) for x in head.split("-"))
                overlap = a < hi and b > lo
            elif overlap and line.startswith("AnonHugePages:"):
                total += int(line.split()[1]) * 1024
    return total


@NEEDS_THP
def test_use_huge_pages_collapses_the_tensor_memory():
    t = torch.randn(24 << 20 >> 2)  # 24 MB, already touched: 4 KiB pages
    start = t.untyped_storage().data_ptr()
    advised = mla_ext.use_huge_pages(t)
    assert advised > 0 and advised % memory.HUGE_PAGE_BYTES == 0
    assert advised >= t.numel() * 4 - 2 * memory.HUGE_PAGE_BYTES
    assert _huge_bytes_in(start, start + t.numel() * 4) >= advised // 2, "the kernel kept 4 KiB pages"


def test_use_huge_pages_refuses_misuse():
    with pytest.raises(TypeError, match="torch.Tensor"):
        mla_ext.use_huge_pages([1, 2, 3])
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="on the CPU"):
            mla_ext.use_huge_pages(torch.zeros(4, device="cuda"))
    assert mla_ext.use_huge_pages(torch.zeros(16)) == 0  # smaller than one huge page: left alone


def test_use_huge_pages_reports_the_kernel_refusal(monkeypatch):
    monkeypatch.setattr(memory, "_madvise", lambda addr, length, advice: 22)  # EINVAL
    monkeypatch.setattr(memory, "_thp_setting", lambda: "never")
    with pytest.raises(OSError, match=r"MADV_HUGEPAGE.*transparent_hugepage is 'never'"):
        mla_ext.use_huge_pages(torch.zeros(8 << 20 >> 2))


@NEEDS_THP
def test_decode_on_a_huge_page_cache_matches_the_reference(gen):
    """Same bytes, other pages: the result must not change (and the paged cache manager's
    option gives huge pages from the first touch)."""
    kv = make_paged_kv([700, 33, 0], 16, gen, torch.float32, "cpu", spare_blocks=300)
    cache = kv.cache.to(torch.bfloat16)
    q_nope, q_pe = make_query(3, 1, 16, gen, torch.bfloat16, "cpu")
    args = (kv.block_table, kv.cache_seqlens)
    before = mla_ext.decode(q_nope, q_pe, cache, *args, softmax_scale=DEEPSEEK_SCALE)
    assert mla_ext.use_huge_pages(cache) > 0
    after = mla_ext.decode(q_nope, q_pe, cache, *args, softmax_scale=DEEPSEEK_SCALE)
    assert torch.equal(before, after)
    ref, _ = reference.decode(q_nope, q_pe, cache, *args, DEEPSEEK_SCALE, compute_dtype=torch.float64)
    torch.testing.assert_close(after.double(), ref.double(), rtol=2.0**-7, atol=2e-5)  # one bf16 ulp

    pool = mla_ext.PagedLatentCache(num_blocks=512, block_size=64, num_layers=2, huge_pages=True)
    assert pool.huge_pages
    start = pool.caches.untyped_storage().data_ptr()
    assert _huge_bytes_in(start, start + pool.caches.numel() * 2) > 0
    pool.grow_pool(64)
    assert pool.num_blocks == 576 and bool((pool.caches == 0).all())


def test_paged_cache_refuses_huge_pages_off_the_cpu():
    with pytest.raises(ValueError, match="huge_pages is for CPU caches"):
        mla_ext.PagedLatentCache(num_blocks=4, block_size=16, device="meta", huge_pages=True)
