"""SPEC section 4: every misuse raises a clear Python exception that names the argument,
BEFORE anything is written: the cache (and a decode out= buffer) is bit-identical after
the failed call. Inputs that merely look odd but are legal (garbage past a sequence's
end, a length exactly at the block-table capacity, the last slot) must be accepted."""
import math

import pytest
import torch

import mla_ext
from conftest import (
    DEEPSEEK_SCALE,
    GARBAGE_BLOCK,
    HEAD,
    LATENT,
    ROPE,
    assert_bitwise_equal,
    check_decode_result,
    make_paged_kv,
    make_query,
    poison_,
    randn,
)

DTYPE = torch.bfloat16
B, S_Q, H, BS = 3, 2, 4, 16
SEQLENS = [20, 0, 5]  # sequence 0 uses blocks 0-1 of its table row, sequence 2 uses block 0


class Base:
    """A valid decode + append setup; each bad case replaces one argument."""

    def __init__(self, device, gen):
        self.device = device
        self.kv = make_paged_kv(SEQLENS, BS, gen, DTYPE, device, spare_blocks=2, extra_table_cols=2)
        self.num_blocks = self.kv.cache.shape[0]
        self.q_nope, self.q_pe = make_query(B, S_Q, H, gen, DTYPE, device)
        self.out = poison_(torch.empty(B, S_Q, H, LATENT, dtype=DTYPE, device=device))
        T = 5
        self.kv_c = randn((T, LATENT), gen, DTYPE, device)
        self.k_pe = randn((T, ROPE), gen, DTYPE, device)
        self.slots = torch.tensor([3, -1, 40, 0, self.num_blocks * BS - 1], device=device)

    def decode(self, **over):
        args = dict(q_nope=self.q_nope, q_pe=self.q_pe, cache=self.kv.cache, block_table=self.kv.block_table,
                    cache_seqlens=self.kv.cache_seqlens)
        kwargs = dict(softmax_scale=DEEPSEEK_SCALE, out=self.out)
        for k, v in over.items():
            (args if k in args else kwargs)[k] = v
        return mla_ext.decode(*args.values(), **kwargs)

    def append(self, **over):
        args = dict(kv_c=self.kv_c, k_pe=self.k_pe, cache=self.kv.cache, slot_mapping=self.slots)
        kwargs = {}
        for k, v in over.items():
            (args if k in args else kwargs)[k] = v
        return mla_ext.append_kv(*args.values(), **kwargs)

    def table_with(self, i, j, value):
        t = self.kv.block_table.clone()
        t[i, j] = value
        return t

    def seqlens_with(self, i, value):
        s = self.kv.cache_seqlens.clone()
        s[i] = value
        return s


@pytest.fixture
def base(device, gen):
    return Base(device, gen)


def _q(base, *shape, dtype=DTYPE):
    return torch.randn(*shape, device=base.device).to(dtype)


MAXB = (max(SEQLENS) + BS - 1) // BS + 2  # block-table columns (2 of them garbage)

# (id, exception, regex the message must match, call)
DECODE_CASES = [
    # dtype mixes
    ("q-vs-cache-dtype", TypeError, r"q dtype .* cache", lambda b: b.decode(
        q_nope=b.q_nope.half(), q_pe=b.q_pe.half(), out=b.out.half())),
    ("q-fp32-vs-bf16-cache", TypeError, r"q dtype .* cache", lambda b: b.decode(
        q_nope=b.q_nope.float(), q_pe=b.q_pe.float(), out=b.out.float())),
    ("q_pe-vs-q_nope-dtype", TypeError, r"q_pe dtype .* q_nope", lambda b: b.decode(q_pe=b.q_pe.half())),
    ("q-int", TypeError, r"q must be", lambda b: b.decode(q_nope=b.q_nope.to(torch.int32))),
    ("cache-int", TypeError, r"cache must be", lambda b: b.decode(cache=torch.zeros_like(b.kv.cache, dtype=torch.int16))),
    ("out-dtype", TypeError, r"out dtype", lambda b: b.decode(out=torch.empty_like(b.out, dtype=torch.float32))),
    # last dims
    ("q_nope-511", ValueError, r"q_nope", lambda b: b.decode(q_nope=_q(b, B, S_Q, H, 511))),
    ("q_nope-576-with-q_pe", ValueError, r"q_pe given, q_nope", lambda b: b.decode(q_nope=_q(b, B, S_Q, H, HEAD))),
    ("q_pe-63", ValueError, r"q_pe must be", lambda b: b.decode(q_pe=_q(b, B, S_Q, H, 63))),
    ("q_pe-576", ValueError, r"q_pe must be", lambda b: b.decode(q_pe=_q(b, B, S_Q, H, HEAD))),
    ("packed-575", ValueError, r"without q_pe, q_nope", lambda b: b.decode(q_nope=_q(b, B, S_Q, H, 575), q_pe=None)),
    ("packed-missing-q_pe", ValueError, r"without q_pe, q_nope", lambda b: b.decode(q_pe=None)),
    ("cache-575", ValueError, r"cache's last dim", lambda b: b.decode(cache=b.kv.cache[..., :575])),
    ("cache-2d", ValueError, r"cache must be", lambda b: b.decode(cache=b.kv.cache.view(-1, HEAD))),
    ("cache-4d-not-1", ValueError, r"cache must be", lambda b: b.decode(cache=b.kv.cache.view(-1, 8, 2, HEAD))),
    ("q_nope-3d", ValueError, r"q_nope must be", lambda b: b.decode(q_nope=b.q_nope[0], q_pe=b.q_pe[0])),
    ("out-shape", ValueError, r"out must be", lambda b: b.decode(out=torch.empty(B, S_Q, H, HEAD, dtype=DTYPE,
                                                                                device=b.device))),
    ("out-non-contiguous", ValueError, r"out must be contiguous", lambda b: b.decode(
        out=torch.empty(B, H, S_Q, LATENT, dtype=DTYPE, device=b.device).transpose(1, 2))),
    # mismatched b / h / s_q
    ("q_pe-b", ValueError, r"q_pe's \[b, s_q, h\]", lambda b: b.decode(q_pe=b.q_pe[:2])),
    ("q_pe-s_q", ValueError, r"q_pe's \[b, s_q, h\]", lambda b: b.decode(q_pe=b.q_pe[:, :1])),
    ("q_pe-h", ValueError, r"q_pe's \[b, s_q, h\]", lambda b: b.decode(q_pe=b.q_pe[:, :, :3])),
    ("block_table-b", ValueError, r"block_table must be \[b", lambda b: b.decode(block_table=b.kv.block_table[:2])),
    ("block_table-1d", ValueError, r"block_table must be \[b", lambda b: b.decode(block_table=b.kv.block_table[0])),
    ("cache_seqlens-b", ValueError, r"cache_seqlens must be \[b\]", lambda b: b.decode(
        cache_seqlens=torch.tensor([20, 0, 5, 1], dtype=torch.int32, device=b.device))),
    ("cache_seqlens-2d", ValueError, r"cache_seqlens must be \[b\]", lambda b: b.decode(
        cache_seqlens=b.kv.cache_seqlens.view(3, 1))),
    ("s_q-0", ValueError, r"q_nope needs s_q >= 1", lambda b: b.decode(q_nope=b.q_nope[:, :0], q_pe=b.q_pe[:, :0],
                                                                      out=b.out[:, :0])),
    # non-int index tensors
    ("block_table-float", TypeError, r"block_table must be an int32", lambda b: b.decode(
        block_table=b.kv.block_table.float())),
    ("block_table-int64", TypeError, r"block_table must be an int32", lambda b: b.decode(
        block_table=b.kv.block_table.long())),
    ("cache_seqlens-float", TypeError, r"cache_seqlens must be an int32", lambda b: b.decode(
        cache_seqlens=b.kv.cache_seqlens.float())),
    ("cache_seqlens-int64", TypeError, r"cache_seqlens must be an int32", lambda b: b.decode(
        cache_seqlens=b.kv.cache_seqlens.long())),
    # block ids outside [0, num_blocks) among the blocks a sequence uses
    ("block-negative", IndexError, r"block_table\[0, 1\] = -1", lambda b: b.decode(block_table=b.table_with(0, 1, -1))),
    ("block-eq-num_blocks", IndexError, r"block_table\[2, 0\]", lambda b: b.decode(
        block_table=b.table_with(2, 0, b.num_blocks))),
    ("block-garbage-used", IndexError, r"block_table\[0, 0\]", lambda b: b.decode(
        block_table=b.table_with(0, 0, GARBAGE_BLOCK))),
    ("block-int-min", IndexError, r"block_table\[2, 0\]", lambda b: b.decode(
        block_table=b.table_with(2, 0, -(2**31)))),
    # seqlens beyond capacity / negative
    ("seqlen-beyond-capacity", ValueError, r"cache_seqlens\[2\] = 65 exceeds block_table capacity", lambda b: b.decode(
        cache_seqlens=b.seqlens_with(2, MAXB * BS + 1))),
    ("seqlen-huge", ValueError, r"cache_seqlens\[0\]", lambda b: b.decode(cache_seqlens=b.seqlens_with(0, 2**31 - 1))),
    ("seqlen-negative", ValueError, r"cache_seqlens\[1\] = -1 is negative", lambda b: b.decode(
        cache_seqlens=b.seqlens_with(1, -1))),
    # scales
    ("scale-for-bf16-cache", ValueError, r"scale is only for a float8_e4m3fn cache", lambda b: b.decode(
        scale=torch.ones(1, device=b.device))),
    ("softmax_scale-0", ValueError, r"softmax_scale", lambda b: b.decode(softmax_scale=0.0)),
    ("softmax_scale-negative", ValueError, r"softmax_scale", lambda b: b.decode(softmax_scale=-DEEPSEEK_SCALE)),
    ("softmax_scale-nan", ValueError, r"softmax_scale", lambda b: b.decode(softmax_scale=math.nan)),
    ("softmax_scale-inf", ValueError, r"softmax_scale", lambda b: b.decode(softmax_scale=math.inf)),
    ("fp8-cache-without-scale", ValueError, r"needs scale", lambda b: b.decode(
        cache=torch.zeros_like(b.kv.cache, dtype=torch.float8_e4m3fn))),
    ("fp8-scale-dtype", TypeError, r"scale must be float32", lambda b: b.decode(
        cache=torch.zeros_like(b.kv.cache, dtype=torch.float8_e4m3fn),
        scale=torch.ones(1, dtype=torch.float64, device=b.device))),
    ("fp8-scale-numel", ValueError, r"scale must hold 1 element", lambda b: b.decode(
        cache=torch.zeros_like(b.kv.cache, dtype=torch.float8_e4m3fn), scale=torch.ones(2, device=b.device))),
]


@pytest.mark.parametrize("exc,match,call", [c[1:] for c in DECODE_CASES], ids=[c[0] for c in DECODE_CASES])
def test_bad_decode_input(base, exc, match, call):
    cache_before, out_before = base.kv.cache.clone(), base.out.clone()
    with pytest.raises(exc, match=match):
        call(base)
    assert_bitwise_equal(base.kv.cache, cache_before, "cache changed by a failed decode")
    assert_bitwise_equal(base.out, out_before, "out= buffer written by a failed decode")


def test_decode_missing_softmax_scale(base):
    with pytest.raises(TypeError, match="softmax_scale"):
        mla_ext.decode(base.q_nope, base.q_pe, base.kv.cache, base.kv.block_table, base.kv.cache_seqlens)


def test_decode_accepts_garbage_past_the_end(base):
    """Entries past each sequence's last used block are never validated or read."""
    table = torch.full_like(base.kv.block_table, GARBAGE_BLOCK)
    table[:, 1::2] = -(2**31)
    n0 = (SEQLENS[0] + BS - 1) // BS
    table[0, :n0] = base.kv.block_table[0, :n0]
    table[2, 0] = base.kv.block_table[2, 0]
    base.kv.block_table = table  # sequence 1 (L = 0) has nothing but garbage
    out, lse = base.decode(out=None, return_lse=True)
    check_decode_result(out, lse, base.q_nope, base.q_pe, base.kv, DEEPSEEK_SCALE, True)


def test_decode_accepts_full_capacity(device, gen):
    """L exactly = max_blocks * block_size is legal; one more token is not."""
    kv = make_paged_kv([32, 48], 16, gen, torch.float32, device, extra_table_cols=0)
    q_nope, q_pe = make_query(2, 1, 2, gen, torch.float32, device)
    out, lse = mla_ext.decode(q_nope, q_pe, kv.cache, kv.block_table, kv.cache_seqlens, softmax_scale=0.1,
                              return_lse=True)
    check_decode_result(out, lse, q_nope, q_pe, kv, 0.1, True)
    with pytest.raises(ValueError, match=r"cache_seqlens\[1\] = 49"):
        mla_ext.decode(q_nope, q_pe, kv.cache, kv.block_table, kv.cache_seqlens + 1, softmax_scale=0.1)


def test_cpu_index_checks_cannot_be_switched_off(gen):
    """set_index_checks(False) only skips the (host-syncing) CUDA checks: on the CPU a bad
    block id must still raise instead of being dereferenced."""
    b = Base("cpu", gen)
    old = mla_ext.set_index_checks(False)
    try:
        assert mla_ext.set_index_checks(False) is False
        with pytest.raises(IndexError, match="block_table"):
            b.decode(block_table=b.table_with(0, 1, GARBAGE_BLOCK))
        with pytest.raises(IndexError, match="slot_mapping"):
            b.append(slot_mapping=torch.tensor([0, 1, 2, 3, b.num_blocks * BS]))
    finally:
        mla_ext.set_index_checks(old)
    assert mla_ext.set_index_checks(old) == old


APPEND_CASES = [
    ("kv_c-vs-cache-dtype", TypeError, r"kv_c dtype .* cache", lambda b: b.append(kv_c=b.kv_c.half(),
                                                                               k_pe=b.k_pe.half())),
    ("k_pe-vs-kv_c-dtype", TypeError, r"k_pe dtype .* kv_c", lambda b: b.append(k_pe=b.k_pe.float())),
    ("kv_c-int", TypeError, r"kv_c must be", lambda b: b.append(kv_c=b.kv_c.to(torch.int16),
                                                                k_pe=b.k_pe.to(torch.int16))),
    ("cache-int", TypeError, r"cache must be", lambda b: b.append(cache=torch.zeros_like(b.kv.cache,
                                                                                          dtype=torch.int16))),
    ("kv_c-511", ValueError, r"kv_c must be \[T, 512\]", lambda b: b.append(kv_c=b.kv_c[:, :511])),
    ("kv_c-576", ValueError, r"kv_c must be \[T, 512\]", lambda b: b.append(kv_c=_q(b, 5, HEAD))),
    ("kv_c-1d", ValueError, r"kv_c must be", lambda b: b.append(kv_c=b.kv_c[0])),
    ("k_pe-63", ValueError, r"k_pe must be \[T, 64\]", lambda b: b.append(k_pe=b.k_pe[:, :63])),
    ("k_pe-3d", ValueError, r"k_pe must be", lambda b: b.append(k_pe=b.k_pe[None])),
    ("cache-575", ValueError, r"cache's last dim", lambda b: b.append(cache=b.kv.cache[..., :575])),
    ("cache-1d", ValueError, r"cache must be", lambda b: b.append(cache=b.kv.cache.view(-1))),
    ("T-mismatch", ValueError, r"k_pe has 4", lambda b: b.append(k_pe=b.k_pe[:4])),
    ("slot_mapping-length", ValueError, r"slot_mapping must be \[T\]", lambda b: b.append(slot_mapping=b.slots[:4])),
    ("slot_mapping-2d", ValueError, r"slot_mapping must be \[T\]", lambda b: b.append(
        slot_mapping=b.slots.view(5, 1))),
    ("slot_mapping-float", TypeError, r"slot_mapping must be int64 or int32", lambda b: b.append(
        slot_mapping=b.slots.float())),
    ("slot_mapping-int16", TypeError, r"slot_mapping must be int64 or int32", lambda b: b.append(
        slot_mapping=b.slots.to(torch.int16))),
    # slots beyond the cache; the earlier, valid tokens must not be written either
    ("slot-eq-num_slots", IndexError, r"slot_mapping\[4\] = 80 is beyond the cache", lambda b: b.append(
        slot_mapping=torch.tensor([3, -1, 40, 0, b.num_blocks * BS], device=b.device))),
    ("slot-huge-int64", IndexError, r"slot_mapping\[2\]", lambda b: b.append(
        slot_mapping=torch.tensor([3, 4, 2**40, 0, 1], device=b.device))),
    ("slot-beyond-int32", IndexError, r"slot_mapping\[0\]", lambda b: b.append(
        slot_mapping=torch.tensor([2**31 - 1, 4, 5, 0, 1], dtype=torch.int32, device=b.device))),
    ("scale-for-bf16-cache", ValueError, r"scale is only for a float8_e4m3fn cache", lambda b: b.append(
        scale=torch.ones(1, device=b.device))),
    ("fp8-cache-without-scale", ValueError, r"needs scale", lambda b: b.append(
        cache=torch.zeros_like(b.kv.cache, dtype=torch.float8_e4m3fn))),
]


@pytest.mark.parametrize("exc,match,call", [c[1:] for c in APPEND_CASES], ids=[c[0] for c in APPEND_CASES])
def test_bad_append_input(base, exc, match, call):
    assert base.num_blocks * BS == 80  # the messages above quote it
    cache_before = base.kv.cache.clone()
    with pytest.raises(exc, match=match):
        call(base)
    assert_bitwise_equal(base.kv.cache, cache_before, "cache changed by a failed append")


def test_append_accepts_last_slot_and_large_negative(base):
    before = base.kv.cache.clone()
    slots = torch.tensor([base.num_blocks * BS - 1, -(2**40), -1, 0, 17], device=base.device)
    base.append(slot_mapping=slots)
    expected = mla_ext.reference.append_kv(base.kv_c, base.k_pe, before, slots)
    assert_bitwise_equal(base.kv.cache, expected, "append with the last slot")


# ----------------------------------------------------------------------- device mixes (CUDA)

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for a device mix")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("arg", ["q_nope", "q_pe", "block_table", "cache_seqlens"])
@pytest.mark.parametrize("cache_device", ["cpu", "cuda"])
def test_decode_device_mix(gen, cache_device, arg):
    b = Base(cache_device, gen)
    other = "cpu" if cache_device == "cuda" else "cuda"
    moved = getattr(b, arg) if arg.startswith("q") else getattr(b.kv, arg)
    over = {arg: moved.to(other)}
    if arg == "q_nope":
        over["out"] = b.out.to(other)
    cache_before = b.kv.cache.clone()
    with pytest.raises(ValueError, match=arg):
        b.decode(**over)
    assert_bitwise_equal(b.kv.cache, cache_before, "cache changed by a failed decode")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("arg", ["kv_c", "k_pe", "slot_mapping"])
@pytest.mark.parametrize("cache_device", ["cpu", "cuda"])
def test_append_device_mix(gen, cache_device, arg):
    b = Base(cache_device, gen)
    other = "cpu" if cache_device == "cuda" else "cuda"
    over = {arg: getattr(b, "slots" if arg == "slot_mapping" else arg).to(other)}
    cache_before = b.kv.cache.clone()
    with pytest.raises(ValueError, match=arg):
        b.append(**over)
    assert_bitwise_equal(b.kv.cache, cache_before, "cache changed by a failed append")
