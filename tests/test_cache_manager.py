"""PagedLatentCache: block bookkeeping (grow across block boundaries, free, reuse, out of
blocks), the step metadata it hands to the ops, and an inference loop through it."""
import math

import pytest
import torch

import mla_ext
from mla_ext.cache import OutOfBlocksError, PagedLatentCache


pytestmark = pytest.mark.usefixtures("one_thread")


def _all_slots(c, seq):
    return c.slots(seq, 0, c.seq_len(seq))


def test_grow_across_block_boundaries():
    c = PagedLatentCache(num_blocks=8, block_size=4, dtype=torch.float32)
    s = c.add_sequence()
    assert c.seq_len(s) == 0 and c.blocks(s) == [] and c.num_free_blocks == 8
    assert c.append_slots(s, 3) == [0, 1, 2]  # block 0, offsets 0..2
    assert c.blocks(s) == [0]
    assert c.append_slots(s, 1) == [3]  # fills block 0 exactly: no new block
    assert c.blocks(s) == [0] and c.num_free_blocks == 7
    assert c.append_slots(s, 1) == [4]  # first token of block 1
    assert c.blocks(s) == [0, 1]
    slots = c.append_slots(s, 6)  # crosses into blocks 2 (4 tokens) ... (7 + 6 = 11 tokens -> 3 blocks)
    assert c.seq_len(s) == 11 and len(c.blocks(s)) == 3
    assert slots == [5, 6, 7, 8, 9, 10]
    assert c.append_slots(s, 0) == [] and c.seq_len(s) == 11
    # Slots are unique and lie in the sequence's own blocks.
    allslots = _all_slots(c, s)
    assert len(set(allslots)) == 11
    assert {x // 4 for x in allslots} == set(c.blocks(s))


def test_two_sequences_interleave_blocks_and_table():
    c = PagedLatentCache(num_blocks=6, block_size=2, dtype=torch.float32)
    a, b = c.add_sequence(), c.add_sequence()
    assert (a, b) == (0, 1)
    c.append_slots(a, 3)  # blocks 0, 1
    c.append_slots(b, 1)  # block 2
    c.append_slots(a, 1)  # fills block 1
    c.append_slots(b, 2)  # block 3
    assert c.blocks(a) == [0, 1] and c.blocks(b) == [2, 3]
    table = c.block_table([a, b])
    assert table.dtype == torch.int32 and table.tolist() == [[0, 1], [2, 3]]
    assert c.block_table([b], width=5).tolist() == [[2, 3, 0, 0, 0]]
    with pytest.raises(ValueError, match="width"):
        c.block_table([a], width=1)
    lens = c.cache_seqlens([b, a])
    assert lens.dtype == torch.int32 and lens.tolist() == [3, 4]
    assert set(_all_slots(c, a)).isdisjoint(_all_slots(c, b))


def test_free_and_reuse():
    c = PagedLatentCache(num_blocks=4, block_size=3, dtype=torch.float32)
    a, b = c.add_sequence(), c.add_sequence()
    c.append_slots(a, 7)  # 3 blocks
    c.append_slots(b, 2)  # 1 block
    assert c.num_free_blocks == 0
    freed = c.blocks(a)
    c.free(a)
    assert c.num_free_blocks == 3 and a not in c and c.sequences == [b]
    with pytest.raises(KeyError, match="unknown sequence"):
        c.seq_len(a)
    with pytest.raises(KeyError):
        c.free(a)
    d = c.add_sequence()
    assert d not in (a, b)  # ids are not recycled
    c.append_slots(d, 9)
    assert sorted(c.blocks(d)) == sorted(freed)  # the freed blocks are reused
    assert c.blocks(d) == freed  # in their original order (LIFO free list)
    assert c.num_free_blocks == 0
    c.free(b)
    c.free(d)
    assert c.num_free_blocks == 4 and c.num_used_blocks == 0


def test_out_of_blocks_is_clear_and_atomic():
    c = PagedLatentCache(num_blocks=3, block_size=4, dtype=torch.float32)
    a, b = c.add_sequence(), c.add_sequence()
    c.append_slots(a, 5)  # 2 blocks
    with pytest.raises(OutOfBlocksError, match=r"out of blocks.*2 more block.*only 1 of 3 are free"):
        c.append_slots(b, 5)
    assert c.seq_len(b) == 0 and c.blocks(b) == [] and c.num_free_blocks == 1  # nothing happened
    # A batch step that does not fit leaves every sequence as it was.
    with pytest.raises(OutOfBlocksError):
        c.prepare([a, b], [4, 4])  # a needs 1 more block (5 + 4 = 9 tokens), b needs 1: 2 > 1 free
    assert c.seq_len(a) == 5 and c.seq_len(b) == 0 and c.num_free_blocks == 1
    assert issubclass(OutOfBlocksError, RuntimeError)
    c.prepare([a, b], [3, 0])  # fits in a's second block: no new block at all
    assert c.num_free_blocks == 1
    c.grow_pool(2)
    c.append_slots(b, 12)
    assert c.num_free_blocks == 0 and c.seq_len(b) == 12


def test_prepare_metadata_counts_and_mask():
    c = PagedLatentCache(num_blocks=16, block_size=4, dtype=torch.float32)
    a, b, d = (c.add_sequence() for _ in range(3))
    meta = c.prepare([a, b, d], [3, 5, 0])  # varlen: right-aligned in rows of s_q = 5
    assert meta.query_len == 5 and meta.num_new_tokens == [3, 5, 0]
    sm = meta.slot_mapping.view(3, 5)
    assert meta.slot_mapping.dtype == torch.int64
    assert sm[0, :2].tolist() == [-1, -1] and sm[0, 2:].tolist() == c.slots(a, 0, 3)
    assert sm[1].tolist() == c.slots(b, 0, 5)
    assert sm[2].tolist() == [-1] * 5
    assert meta.cache_seqlens.tolist() == [3, 5, 0]
    assert meta.block_table.shape == (3, 2) and meta.block_table[2].tolist() == [0, 0]

    mask = torch.tensor([[1], [1], [0]], dtype=torch.bool)
    meta = c.prepare([a, b, d], mask)  # one decode step, d idle
    assert meta.slot_mapping.tolist() == [c.slots(a, 3, 4)[0], c.slots(b, 5, 6)[0], -1]
    assert meta.cache_seqlens.tolist() == [4, 6, 0]

    left_padded = torch.tensor([[0, 1, 1], [1, 1, 1], [0, 0, 1]])
    meta = c.prepare([a, b, d], left_padded)
    assert meta.num_new_tokens == [2, 3, 1] and meta.slot_mapping.view(3, 3)[0, 0] == -1
    with pytest.raises(ValueError, match="not left-padded"):
        c.prepare([a, b, d], torch.tensor([[1, 0], [1, 1], [1, 1]]))
    with pytest.raises(ValueError, match="twice"):
        c.prepare([a, a], 1)
    with pytest.raises(ValueError, match="token counts"):
        c.prepare([a, b], [1])
    with pytest.raises(ValueError, match="already exists"):
        c.add_sequence(a)
    named = c.add_sequence("req-42")
    assert c.prepare(["req-42"], 2).cache_seqlens.tolist() == [2] and named == "req-42"


def test_truncate_and_fork():
    c = PagedLatentCache(num_blocks=8, block_size=2, num_layers=2, dtype=torch.float32)
    a = c.add_sequence()
    slots = c.append_slots(a, 5)
    rows = torch.randn(5, 576)
    for layer in range(2):
        mla_ext.append_kv(rows[:, :512] + layer, rows[:, 512:] + layer, c.layer(layer), torch.tensor(slots))
    f = c.fork(a)
    assert c.seq_len(f) == 5 and set(c.blocks(f)).isdisjoint(c.blocks(a))
    for layer in range(2):
        assert torch.equal(c.gather(f, layer), c.gather(a, layer))
        assert torch.equal(c.gather(a, layer), rows + layer)
    free_before = c.num_free_blocks
    c.truncate(a, 2)  # 5 tokens in 3 blocks -> 2 tokens in 1 block
    assert c.seq_len(a) == 2 and len(c.blocks(a)) == 1 and c.num_free_blocks == free_before + 2
    assert torch.equal(c.gather(a), rows[:2])
    with pytest.raises(ValueError, match="new_len"):
        c.truncate(a, 3)


def test_grow_pool_keeps_rows():
    c = PagedLatentCache(num_blocks=2, block_size=3, dtype=torch.float32)
    a = c.add_sequence()
    slots = c.append_slots(a, 6)
    rows = torch.randn(6, 576)
    mla_ext.append_kv(rows[:, :512], rows[:, 512:], c.layer(0), torch.tensor(slots))
    c.grow_pool(3)
    assert c.num_blocks == 5 and c.num_free_blocks == 3
    c.append_slots(a, 1)
    assert torch.equal(c.gather(a)[:6], rows)
    assert c.nbytes() == 5 * 3 * 576 * 4 and c.nbytes(used_only=True) == 3 * 3 * 576 * 4


def test_constructor_errors():
    with pytest.raises(ValueError, match="block_size"):
        PagedLatentCache(4, 0)
    with pytest.raises(ValueError, match="num_blocks"):
        PagedLatentCache(-1, 4)
    with pytest.raises(ValueError, match="num_layers"):
        PagedLatentCache(4, 4, num_layers=0)


@pytest.mark.parametrize("block_size", [1, 3, 16])
def test_inference_loop_matches_dense_attention(block_size):
    """Prefill two prompts, decode a few steps, free one sequence, admit a new one (which
    reuses its blocks): every step's decode equals dense attention over that sequence's rows."""
    g = torch.Generator()
    g.manual_seed(block_size)
    h, scale = 4, 1 / math.sqrt(192)
    c = PagedLatentCache(num_blocks=-(-40 // block_size) * 2 + 2, block_size=block_size, dtype=torch.float32)
    history = {}

    def step(seqs, counts):
        meta = c.prepare(seqs, counts)
        s_q, counts = meta.query_len, meta.num_new_tokens
        rows = torch.randn(len(seqs) * s_q, 576, generator=g)
        mla_ext.append_kv(rows[:, :512], rows[:, 512:], c.layer(0), meta.slot_mapping)
        for i, (s, n) in enumerate(zip(seqs, counts)):
            history.setdefault(s, []).append(rows[i * s_q + s_q - n : (i + 1) * s_q])
        q = torch.randn(len(seqs), s_q, h, 576, generator=g)
        out = mla_ext.decode(q[..., :512], q[..., 512:], c.layer(0), meta.block_table, meta.cache_seqlens, softmax_scale=scale)
        for i, (s, n) in enumerate(zip(seqs, counts)):
            kv = torch.cat(history[s])
            assert torch.equal(c.gather(s), kv)
            L = kv.shape[0]
            for j in range(s_q - n, s_q):  # the real queries (right-aligned)
                vis = kv[: L - s_q + j + 1]
                p = torch.softmax(scale * q[i, j] @ vis.T, -1)
                torch.testing.assert_close(out[i, j], p @ vis[:, :512], atol=2e-5, rtol=2e-5)

    a, b = c.add_sequence(), c.add_sequence()
    step([a, b], [9, 4])  # prefill, varlen
    for _ in range(3):
        step([a, b], 1)
    blocks_a = set(c.blocks(a))
    c.free(a)
    n = c.add_sequence()
    step([n, b], [12, 1])
    assert blocks_a & set(c.blocks(n))  # the new sequence reuses a's freed blocks
    step([n, b], 1)
