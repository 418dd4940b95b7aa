"""A paged latent-cache manager: the host-side bookkeeping around `append_kv` / `decode`.

    cache = PagedLatentCache(num_blocks=256, block_size=64, num_layers=61, dtype=torch.bfloat16, device="cuda")
    a, b = cache.add_sequence(), cache.add_sequence()
    meta = cache.prepare([a, b], [prompt_len_a, prompt_len_b])     # prefill: allocates blocks
    for layer in range(61):
        mla_ext.append_kv(kv_c, k_pe, cache.layer(layer), meta.slot_mapping)
    ...
    meta = cache.prepare([a, b], 1)                                 # each decode step
    out = mla_ext.decode(q_lat, q_pe, cache.layer(layer), meta.block_table, meta.cache_seqlens, softmax_scale=...)
    cache.free(a)                                                   # its blocks go back to the pool

One block table serves every layer (as in vLLM): a sequence's token t lives in the same slot
of every layer's cache tensor. All bookkeeping is plain Python on the host; `prepare` ends
with one small host-to-device copy per metadata tensor, so the decode step itself (append,
decode) never syncs and can be captured in a CUDA graph (give `prepare` a fixed `width`
and copy the metadata into the graph's static tensors).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Dict, Hashable, List, Optional, Sequence, Union

import torch

from ._ops import HEAD_DIM
from .memory import use_huge_pages

__all__ = ["PagedLatentCache", "StepMetadata", "OutOfBlocksError"]


class OutOfBlocksError(RuntimeError):
    """Raised by PagedLatentCache when a request needs more free blocks than the pool has.

    Nothing is allocated when it is raised: the cache is left exactly as it was.
    """


@dataclass
class StepMetadata:
    """The tensors one forward step needs, on the cache's device.

    slot_mapping   [b * s_q] int64   slot of each (sequence, query position), row-major; -1 = padding
    block_table    [b, width] int32  block ids of each sequence; entries past its end are 0
    cache_seqlens  [b] int32         tokens cached per sequence, the new ones included
    query_len      s_q, the padded number of new positions per sequence
    num_new_tokens per sequence, the real new tokens (right-aligned in its row of s_q)
    """

    slot_mapping: torch.Tensor
    block_table: torch.Tensor
    cache_seqlens: torch.Tensor
    query_len: int
    num_new_tokens: List[int]


class PagedLatentCache:
    """A pool of fixed-size blocks holding MLA latent rows [c | k_pe] (576 values per token).

    Args:
        num_blocks:  blocks in the pool (shared by all sequences).
        block_size:  tokens per block, any value >= 1.
        num_layers:  one cache tensor per layer, all indexed by the same block tables.
        dtype, device: of the cache tensors (the model's compute dtype).
        huge_pages:  CPU only: back the cache tensors with 2 MiB pages (mla_ext.use_huge_pages;
                     raises where the kernel refuses). Decode of a cache larger than the
                     TLB's reach (a few MB) waits on page walks with 4 KiB pages.

    `caches` is one tensor [num_layers, num_blocks, block_size, 576]; `layer(i)` is the
    [num_blocks, block_size, 576] view to pass to the ops. Sequence ids are any hashable;
    `add_sequence()` without an id hands out 0, 1, 2, ...
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        *,
        num_layers: int = 1,
        dtype: torch.dtype = torch.bfloat16,
        device: Union[str, torch.device] = "cpu",
        huge_pages: bool = False,
    ) -> None:
        if int(num_blocks) < 0:
            raise ValueError(f"PagedLatentCache: num_blocks must be >= 0, got {num_blocks}")
        if int(block_size) < 1:
            raise ValueError(f"PagedLatentCache: block_size must be >= 1, got {block_size}")
        if int(num_layers) < 1:
            raise ValueError(f"PagedLatentCache: num_layers must be >= 1, got {num_layers}")
        self.block_size = int(block_size)
        self.num_layers = int(num_layers)
        self.dtype = dtype
        self.device = torch.device(device)
        if huge_pages and self.device.type != "cpu":
            raise ValueError(f"PagedLatentCache: huge_pages is for CPU caches, got device {self.device}")
        self.huge_pages = bool(huge_pages)
        self.caches = self._new_caches(int(num_blocks))
        # LIFO free list: the most recently freed block is reused first; fresh pools hand out 0, 1, 2, ...
        self._free: List[int] = list(range(int(num_blocks) - 1, -1, -1))
        self._blocks: Dict[Hashable, List[int]] = {}
        self._lens: Dict[Hashable, int] = {}
        self._ids = itertools.count()

    # ------------------------------------------------------------------ pool

    @property
    def num_blocks(self) -> int:
        return self.caches.shape[1]

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    def layer(self, i: int) -> torch.Tensor:
        """Layer i's cache, [num_blocks, block_size, 576] (a view of `caches`)."""
        return self.caches[i]

    def nbytes(self, used_only: bool = False) -> int:
        """Bytes of the cache tensors: the whole pool, or only the blocks in use."""
        blocks = self.num_used_blocks if used_only else self.num_blocks
        return self.num_layers * blocks * self.block_size * HEAD_DIM * self.caches.element_size()

    def grow_pool(self, extra_blocks: int) -> None:
        """Add `extra_blocks` blocks to the pool. Reallocates the cache tensors (copying the
        rows held), so earlier `layer()` views and captured CUDA graphs go stale."""
        extra_blocks = int(extra_blocks)
        if extra_blocks < 0:
            raise ValueError(f"grow_pool: extra_blocks must be >= 0, got {extra_blocks}")
        if extra_blocks == 0:
            return
        old = self.num_blocks
        new = self._new_caches(old + extra_blocks)
        new[:, :old].copy_(self.caches)
        self.caches = new
        self._free = list(range(old + extra_blocks - 1, old - 1, -1)) + self._free

    def _new_caches(self, num_blocks: int) -> torch.Tensor:
        # Advised before the zero fill, so the pages are huge from their first touch.
        caches = torch.empty(self.num_layers, num_blocks, self.block_size, HEAD_DIM, dtype=self.dtype, device=self.device)
        if self.huge_pages:
            use_huge_pages(caches, collapse=False)
        return caches.zero_()

    # ------------------------------------------------------------------ sequences

    def add_sequence(self, seq_id: Optional[Hashable] = None) -> Hashable:
        """Register an empty sequence and return its id."""
        if seq_id is None:
            seq_id = next(self._ids)
            while seq_id in self._lens:
                seq_id = next(self._ids)
        elif seq_id in self._lens:
            raise ValueError(f"PagedLatentCache: sequence {seq_id!r} already exists")
        self._blocks[seq_id] = []
        self._lens[seq_id] = 0
        return seq_id

    @property
    def sequences(self) -> List[Hashable]:
        return list(self._lens)

    def __contains__(self, seq_id: Hashable) -> bool:
        return seq_id in self._lens

    def _check(self, seq_id: Hashable) -> None:
        if seq_id not in self._lens:
            raise KeyError(f"PagedLatentCache: unknown sequence {seq_id!r} (add_sequence() first; freed ids are gone)")

    def seq_len(self, seq_id: Hashable) -> int:
        self._check(seq_id)
        return self._lens[seq_id]

    def blocks(self, seq_id: Hashable) -> List[int]:
        """The block ids of a sequence, in order (a copy)."""
        self._check(seq_id)
        return list(self._blocks[seq_id])

    def _blocks_needed(self, seq_id: Hashable, n: int) -> int:
        have = len(self._blocks[seq_id])
        need = -(-(self._lens[seq_id] + n) // self.block_size)
        return max(0, need - have)

    def _reserve(self, counts: Dict[Hashable, int]) -> None:
        """Allocate the blocks for `counts[seq] new tokens` for every sequence, all or nothing."""
        for s, n in counts.items():
            self._check(s)
            if int(n) < 0:
                raise ValueError(f"PagedLatentCache: negative token count {n} for sequence {s!r}")
        needed = {s: self._blocks_needed(s, int(n)) for s, n in counts.items()}
        total = sum(needed.values())
        if total > len(self._free):
            raise OutOfBlocksError(
                f"PagedLatentCache: out of blocks: {total} more block(s) of {self.block_size} tokens needed for "
                f"{len(counts)} sequence(s), but only {len(self._free)} of {self.num_blocks} are free. Free finished "
                f"sequences, or create the cache with more num_blocks (or call grow_pool)."
            )
        for s, k in needed.items():
            for _ in range(k):
                self._blocks[s].append(self._free.pop())

    def slots(self, seq_id: Hashable, start: int, stop: int) -> List[int]:
        """Slots (block * block_size + offset) of positions [start, stop) of a sequence."""
        blocks, bs = self._blocks[seq_id], self.block_size
        return [blocks[p // bs] * bs + p % bs for p in range(start, stop)]

    def append_slots(self, seq_id: Hashable, n: int = 1) -> List[int]:
        """Grow a sequence by n tokens (allocating blocks as needed); return their slots."""
        self._check(seq_id)
        self._reserve({seq_id: n})
        start = self._lens[seq_id]
        self._lens[seq_id] = start + int(n)
        return self.slots(seq_id, start, start + int(n))

    def truncate(self, seq_id: Hashable, new_len: int) -> None:
        """Drop a sequence's tokens past `new_len` (e.g. rejected speculative tokens); blocks
        no longer needed go back to the pool."""
        self._check(seq_id)
        if not 0 <= int(new_len) <= self._lens[seq_id]:
            raise ValueError(f"truncate: new_len must be in [0, {self._lens[seq_id]}], got {new_len}")
        self._lens[seq_id] = int(new_len)
        keep = -(-int(new_len) // self.block_size)
        blocks = self._blocks[seq_id]
        while len(blocks) > keep:
            self._free.append(blocks.pop())

    def free(self, seq_id: Hashable) -> None:
        """Forget a sequence and return its blocks to the pool (their rows are not cleared)."""
        self._check(seq_id)
        self._free.extend(reversed(self._blocks.pop(seq_id)))
        del self._lens[seq_id]

    def fork(self, src: Hashable, dst: Optional[Hashable] = None) -> Hashable:
        """A new sequence holding a copy of `src`'s rows (all layers); returns its id."""
        self._check(src)
        n = self._lens[src]
        need = -(-n // self.block_size)
        if need > len(self._free):
            raise OutOfBlocksError(
                f"PagedLatentCache: out of blocks: fork needs {need} block(s), only {len(self._free)} of {self.num_blocks} are free"
            )
        dst = self.add_sequence(dst)
        self._reserve({dst: n})
        self._lens[dst] = n
        if need:
            src_ids = torch.tensor(self._blocks[src], device=self.device)
            dst_ids = torch.tensor(self._blocks[dst], device=self.device)
            self.caches[:, dst_ids] = self.caches[:, src_ids]
        return dst

    # ------------------------------------------------------------------ batch metadata

    def block_table(self, seq_ids: Sequence[Hashable], width: Optional[int] = None) -> torch.Tensor:
        """[len(seq_ids), width] int32 on the cache's device; width defaults to the longest
        sequence's block count (at least 1). Entries past a sequence's end are 0."""
        rows = [self.blocks(s) for s in seq_ids]
        longest = max((len(r) for r in rows), default=0)
        if width is None:
            width = max(1, longest)
        elif width < longest:
            raise ValueError(f"block_table: width {width} is smaller than a sequence's {longest} blocks")
        table = torch.zeros(len(rows), width, dtype=torch.int32)
        for i, r in enumerate(rows):
            if r:
                table[i, : len(r)] = torch.tensor(r, dtype=torch.int32)
        return table.to(self.device)

    def cache_seqlens(self, seq_ids: Sequence[Hashable]) -> torch.Tensor:
        """[len(seq_ids)] int32 on the cache's device."""
        return torch.tensor([self.seq_len(s) for s in seq_ids], dtype=torch.int32).to(self.device)

    def prepare(
        self,
        seq_ids: Sequence[Hashable],
        new_tokens: Union[int, Sequence[int], torch.Tensor],
        *,
        width: Optional[int] = None,
    ) -> StepMetadata:
        """Grow the sequences by their new tokens and return the step's metadata.

        new_tokens: an int (the same count for every sequence), a list of counts, or a bool
        mask [b, s_q] (True = a real token). Each sequence's real tokens must come last in
        its row (left padding), which is what `decode`'s bottom-right-aligned causal mask
        expects; counts are laid out that way, padded to the largest count. The slots of
        padding positions are -1, so `append_kv` skips them. All or nothing: on
        OutOfBlocksError no sequence has grown.
        """
        seq_ids = list(seq_ids)
        b = len(seq_ids)
        if len(set(seq_ids)) != b:
            raise ValueError("prepare: seq_ids contains a sequence twice")
        if isinstance(new_tokens, torch.Tensor):
            if new_tokens.dim() != 2 or new_tokens.shape[0] != b:
                raise ValueError(f"prepare: a new_tokens mask must be [b={b}, s_q], got {tuple(new_tokens.shape)}")
            rows = new_tokens.to("cpu", torch.bool).tolist()
            s_q = new_tokens.shape[1]
            counts = []
            for i, row in enumerate(rows):
                n = sum(row)
                if any(row[: s_q - n]):
                    raise ValueError(
                        f"prepare: row {i} of the new_tokens mask is not left-padded ({row}); real tokens must come "
                        "after the padding"
                    )
                counts.append(n)
        else:
            counts = [int(new_tokens)] * b if isinstance(new_tokens, int) else [int(n) for n in new_tokens]
            if len(counts) != b:
                raise ValueError(f"prepare: {len(counts)} token counts for {b} sequences")
            s_q = max(counts, default=0)
        self._reserve(dict(zip(seq_ids, counts)))
        slot_mapping: List[int] = []
        for s, n in zip(seq_ids, counts):
            start = self._lens[s]
            self._lens[s] = start + n
            slot_mapping.extend([-1] * (s_q - n))
            slot_mapping.extend(self.slots(s, start, start + n))
        return StepMetadata(
            slot_mapping=torch.tensor(slot_mapping, dtype=torch.int64).to(self.device),
            block_table=self.block_table(seq_ids, width),
            cache_seqlens=self.cache_seqlens(seq_ids),
            query_len=s_q,
            num_new_tokens=counts,
        )

    def gather(self, seq_id: Hashable, layer: int = 0) -> torch.Tensor:
        """A sequence's rows [len, 576] in order (a copy; for tests and debugging)."""
        n = self.seq_len(seq_id)
        slots = torch.tensor(self.slots(seq_id, 0, n), dtype=torch.long, device=self.device)
        return self.layer(layer).reshape(-1, HEAD_DIM)[slots]

    def __repr__(self) -> str:
        return (
            f"PagedLatentCache(num_blocks={self.num_blocks}, block_size={self.block_size}, num_layers={self.num_layers}, "
            f"dtype={self.dtype}, device={self.device}, sequences={len(self._lens)}, free_blocks={self.num_free_blocks})"
        )
