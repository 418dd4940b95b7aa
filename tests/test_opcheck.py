"""The ops are well-behaved torch custom ops: schema, fake (meta) kernels and dispatch
agree with the real kernels (torch.library.opcheck), and a decode step compiles with
torch.compile(fullgraph=True) and matches eager."""
import pytest
import torch

import mla_ext
from conftest import DEEPSEEK_SCALE, HEAD, LATENT, ROPE, assert_bitwise_equal, make_paged_kv, make_query, poison_, randn

BF16, FP32 = torch.bfloat16, torch.float32

# (seqlens, block_size, s_q, h, dtype, causal, packed)
DECODE_SHAPES = [
    ([9, 0, 20], 16, 1, 4, FP32, True, False),
    ([5, 3], 7, 3, 2, BF16, True, True),
    ([17], 1, 2, 16, torch.float16, False, False),
]


@pytest.mark.parametrize("seqlens,block_size,s_q,h,dtype,causal,packed", DECODE_SHAPES)
def test_opcheck_decode(device, gen, seqlens, block_size, s_q, h, dtype, causal, packed):
    kv = make_paged_kv(seqlens, block_size, gen, dtype, device)
    q_nope, q_pe = make_query(len(seqlens), s_q, h, gen, dtype, device)
    if packed:
        q_nope, q_pe = torch.cat([q_nope, q_pe], -1), None
    args = (q_nope, q_pe, kv.cache, kv.block_table, kv.cache_seqlens, DEEPSEEK_SCALE, causal, None)
    torch.library.opcheck(torch.ops.mla_ext.decode.default, args)

    out = torch.empty(len(seqlens), s_q, h, LATENT, dtype=dtype, device=device)
    lse = torch.empty(len(seqlens), s_q, h, dtype=torch.float32, device=device)
    torch.library.opcheck(torch.ops.mla_ext.decode_out.default, args + (out, lse))
    # decode_out really writes what decode returns (opcheck ran on copies of out / lse)
    poison_(out), poison_(lse)
    assert torch.ops.mla_ext.decode_out(*args, out, lse) is None
    o_ref, l_ref = torch.ops.mla_ext.decode(*args)
    assert_bitwise_equal(out, o_ref, "decode_out out")
    assert_bitwise_equal(lse, l_ref, "decode_out lse")


@pytest.mark.parametrize("dtype,slot_dtype,T,cache4d", [(BF16, torch.int64, 6, False), (FP32, torch.int32, 3, True),
                                                       (torch.float16, torch.int64, 0, False)])
def test_opcheck_append(device, gen, dtype, slot_dtype, T, cache4d):
    cache = poison_(torch.empty(3, 16, HEAD, dtype=dtype, device=device))
    if cache4d:
        cache = cache.unsqueeze(2)
    kv_c = randn((T, LATENT), gen, dtype, device)
    k_pe = randn((T, ROPE), gen, dtype, device)
    slots = torch.tensor([5, -1, 47, 0, 16, 30][:T], dtype=slot_dtype, device=device)
    torch.library.opcheck(torch.ops.mla_ext.append_kv.default, (kv_c, k_pe, cache, slots, None))


def test_fake_decode_shapes():
    """The fake kernel used by torch.compile reports the real output shapes / dtypes."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q = torch.empty(3, 2, 16, HEAD, dtype=BF16)
        cache = torch.empty(10, 64, 1, HEAD, dtype=BF16)
        out, lse = torch.ops.mla_ext.decode(q, None, cache, torch.empty(3, 4, dtype=torch.int32),
                                            torch.empty(3, dtype=torch.int32), 0.1, True, None)
        assert out.shape == (3, 2, 16, LATENT) and out.dtype == BF16
        assert lse.shape == (3, 2, 16) and lse.dtype == torch.float32


def _decode_step(kv_c, k_pe, slot_mapping, cache, q_nope, q_pe, block_table, cache_seqlens):
    """One serving step: write the new tokens' latents, then attend over the cache."""
    mla_ext.append_kv(kv_c, k_pe, cache, slot_mapping)
    out, lse = mla_ext.decode(q_nope, q_pe, cache, block_table, cache_seqlens, softmax_scale=DEEPSEEK_SCALE,
                              return_lse=True)
    return out * 2, lse  # an op after the custom op, so the compiled graph is not just the call


def _step_inputs(device, gen, dtype, s_q):
    seqlens = [33, s_q, 70]
    kv = make_paged_kv(seqlens, 16, gen, dtype, device)
    # the last s_q rows of each sequence are the new tokens: poison them, then append them again
    flat = kv.cache.view(-1, HEAD)
    slots = kv.used_slots()
    new_slots, new_rows = [], []
    start = 0
    for i, L in enumerate(seqlens):
        new_slots.append(slots[start + L - s_q: start + L])
        new_rows.append(kv.dense[i][L - s_q:])
        start += L
    new_slots = torch.cat(new_slots).to(device)
    new_rows = torch.cat(new_rows).to(device)
    flat[new_slots] = float("nan")
    q_nope, q_pe = make_query(len(seqlens), s_q, 16, gen, dtype, device)
    return (new_rows[:, :LATENT], new_rows[:, LATENT:], new_slots, kv.cache, q_nope, q_pe, kv.block_table,
            kv.cache_seqlens)


@pytest.mark.parametrize("backend", ["inductor"])
def test_compile_decode_step(device, gen, backend):
    torch._dynamo.reset()
    dtype, s_q = BF16, 2
    inputs = _step_inputs(device, gen, dtype, s_q)
    eager_inputs = [t.clone() for t in inputs]
    compiled = torch.compile(_decode_step, fullgraph=True, backend=backend)

    out_c, lse_c = compiled(*inputs)
    out_e, lse_e = _decode_step(*eager_inputs)
    assert_bitwise_equal(inputs[3], eager_inputs[3], "cache after the compiled append")
    assert not bool(inputs[3].isnan().all())
    assert bool(torch.isfinite(out_c).all())
    assert_bitwise_equal(out_c, out_e, "compiled out")
    assert_bitwise_equal(lse_c, lse_e, "compiled lse")

    # A second step (two more tokens per sequence, a fresh query; the new rows fit in the
    # sequences' last blocks) reuses the compiled graph and still matches eager.
    table = inputs[6].cpu()
    lens = (inputs[7].cpu() + s_q).tolist()
    slots = torch.tensor([table[i, p // 16].item() * 16 + p % 16 for i, L in enumerate(lens) for p in (L - 2, L - 1)])
    slots = slots.to(device)
    for t in (inputs, eager_inputs):
        t[7].add_(s_q)
    kv_c, k_pe = randn((6, LATENT), gen, dtype, device), randn((6, ROPE), gen, dtype, device)
    q_nope, q_pe = make_query(3, s_q, 16, gen, dtype, device)
    step2 = lambda t: (kv_c, k_pe, slots, t[3], q_nope, q_pe, t[6], t[7])  # noqa: E731
    out_c, lse_c = compiled(*step2(inputs))
    out_e, lse_e = _decode_step(*step2(eager_inputs))
    assert_bitwise_equal(inputs[3], eager_inputs[3], "cache after step 2")
    assert bool(torch.isfinite(out_c).all())
    assert_bitwise_equal(out_c, out_e, "compiled out, step 2")
    assert_bitwise_equal(lse_c, lse_e, "compiled lse, step 2")


@pytest.mark.parametrize("dtype,slot_dtype,four_d", [(BF16, torch.int64, False), (FP32, torch.int32, True)])
def test_opcheck_sparse_append(gen, dtype, slot_dtype, four_d):
    # A uint8 view of the 656-byte cache: opcheck's schema test does arithmetic on every
    # input, which torch lacks for float8_e4m3fn (the op takes both dtypes).
    cache = torch.zeros(3, 4, 656, dtype=torch.uint8)
    if four_d:
        cache = cache.unsqueeze(2)
    kv_c = randn((5, LATENT), gen, dtype)
    k_pe = randn((5, ROPE), gen, dtype)
    slots = torch.tensor([5, -1, 11, 0, 7], dtype=slot_dtype)
    torch.library.opcheck(torch.ops.mla_ext.sparse_append_kv.default, (kv_c, k_pe, cache, slots))
