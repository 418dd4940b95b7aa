"""mla_ext.append_kv: cache[slot] = [kv_c | k_pe], bit for bit; padding slots (< 0)
skipped; every other cache byte untouched (NaN poison included)."""
import pytest
import torch

import mla_ext
from conftest import (
    DEEPSEEK_SCALE,
    HEAD,
    LATENT,
    LSE_ATOL,
    LSE_RTOL,
    OUT_TOL_VS_FP64,
    ROPE,
    assert_bitwise_equal,
    check_decode_result,
    dense_decode,
    make_paged_kv,
    make_query,
    poison_,
    randn,
)

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


def random_slots(num_slots: int, num_tokens: int, num_pad: int, gen, slot_dtype=torch.int64) -> torch.Tensor:
    """num_tokens distinct slots in random order, num_pad of them replaced by padding (< 0)."""
    slots = torch.randperm(num_slots, generator=gen)[:num_tokens]
    pad_at = torch.randperm(num_tokens, generator=gen)[:num_pad]
    slots[pad_at] = torch.tensor([-1, -7, -(2**31)] * num_pad, dtype=torch.int64)[:num_pad]
    return slots.to(slot_dtype)


def special_values_(t: torch.Tensor) -> torch.Tensor:
    """Put values an arithmetic copy would alter into t: -0.0, subnormals, +-inf, the
    largest finite value. A bit-exact copy must keep them all."""
    info = torch.finfo(t.dtype)
    vals = torch.tensor([-0.0, info.smallest_normal / 4, -info.smallest_normal / 8, float("inf"), float("-inf"),
                         info.max, info.tiny], dtype=torch.float64).to(t.dtype)
    t.view(-1)[: len(vals)] = vals.to(t.device)
    return t


# (dtype, slot dtype, block_size, num_tokens): zipped so each axis value meets different partners;
# 200 tokens span several parallel chunks of the CPU kernel.
APPEND_CASES = [
    (BF16, torch.int64, 16, 200),
    (FP16, torch.int32, 1, 37),
    (FP32, torch.int64, 7, 90),
    (BF16, torch.int32, 64, 130),
    (FP32, torch.int32, 16, 1),
]


@pytest.mark.parametrize("dtype,slot_dtype,block_size,T", APPEND_CASES,
                         ids=[f"{str(c[0])[6:]}-{str(c[1])[6:]}-bs{c[2]}-T{c[3]}" for c in APPEND_CASES])
def test_append_exact_copy(device, gen, dtype, slot_dtype, block_size, T):
    num_blocks = (T + 40) // block_size + 2
    cache = poison_(torch.empty(num_blocks, block_size, HEAD, dtype=dtype))
    # Some slots hold real data already (stale rows that are not rewritten must survive too).
    cache[0, 0] = randn(HEAD, gen, dtype)
    cache = cache.to(device)
    kv_c = special_values_(randn((T, LATENT), gen, dtype, device))
    k_pe = special_values_(randn((T, ROPE), gen, dtype, device))
    slots = random_slots(num_blocks * block_size, T, T // 5, gen, slot_dtype).to(device)
    before = cache.clone()

    assert mla_ext.append_kv(kv_c, k_pe, cache, slots) is None

    expected = mla_ext.reference.append_kv(kv_c, k_pe, before, slots)
    assert_bitwise_equal(cache, expected, "cache after append")
    flat, flat_before = cache.view(-1, HEAD), before.view(-1, HEAD)
    written = torch.zeros(flat.shape[0], dtype=torch.bool, device=device)
    for t, s in enumerate(slots.tolist()):
        if s >= 0:
            assert_bitwise_equal(flat[s, :LATENT], kv_c[t], f"kv_c of token {t}")
            assert_bitwise_equal(flat[s, LATENT:], k_pe[t], f"k_pe of token {t}")
            written[s] = True
    assert_bitwise_equal(flat[~written], flat_before[~written], "rows not addressed must stay untouched")
    assert int(written.sum()) == int((slots >= 0).sum())


@pytest.mark.parametrize("slot_dtype", [torch.int32, torch.int64])
def test_append_zero_tokens_and_all_padding(device, gen, slot_dtype):
    cache = poison_(torch.empty(3, 16, HEAD, dtype=BF16, device=device))
    cache[1] = 1.5
    before = cache.clone()
    empty_c = torch.empty(0, LATENT, dtype=BF16, device=device)
    empty_p = torch.empty(0, ROPE, dtype=BF16, device=device)
    mla_ext.append_kv(empty_c, empty_p, cache, torch.empty(0, dtype=slot_dtype, device=device))
    assert_bitwise_equal(cache, before, "T = 0")
    kv_c = randn((4, LATENT), gen, BF16, device)
    k_pe = randn((4, ROPE), gen, BF16, device)
    mla_ext.append_kv(kv_c, k_pe, cache, torch.tensor([-1, -2, -1, -100], dtype=slot_dtype, device=device))
    assert_bitwise_equal(cache, before, "all-padding slots")


def test_append_4d_cache_view(device, gen):
    cache4 = poison_(torch.empty(5, 7, 1, HEAD, dtype=FP16, device=device))
    before = cache4.clone()
    kv_c = randn((20, LATENT), gen, FP16, device)
    k_pe = randn((20, ROPE), gen, FP16, device)
    slots = random_slots(35, 20, 3, gen).to(device)
    mla_ext.append_kv(kv_c, k_pe, cache4, slots)
    expected = mla_ext.reference.append_kv(kv_c, k_pe, before.squeeze(2), slots)
    assert_bitwise_equal(cache4.squeeze(2), expected, "4-D cache view")


@pytest.mark.parametrize("dtype", [BF16, FP32])
def test_append_strided_inputs(device, gen, dtype):
    """kv_c / k_pe as column slices of one [T, 600] projection output, kv_c with a strided
    last dim, a cache whose rows are padded in memory, and a non-contiguous slot_mapping."""
    T, block_size, nb = 24, 16, 4
    proj = randn((T, 600), gen, dtype, device)
    kv_c, k_pe = proj[:, :LATENT], proj[:, LATENT + 10: LATENT + 10 + ROPE]
    kv_c_t = randn((LATENT, T), gen, dtype, device).t()  # stride(-1) == T
    assert kv_c.stride(0) == 600 and kv_c_t.stride(-1) != 1
    big = poison_(torch.empty(nb, block_size, 640, dtype=dtype, device=device))
    cache = big[:, :, :HEAD]
    big_before = big.clone()

    slot_store = torch.full((2 * T,), 5, dtype=torch.int64, device=device)  # decoys at odd indices
    slot_store[0::2] = random_slots(nb * block_size, T, 4, gen).to(device)
    slots = slot_store[0::2]
    assert not slots.is_contiguous()

    mla_ext.append_kv(kv_c, k_pe, cache, slots)
    expected = mla_ext.reference.append_kv(kv_c, k_pe, big_before[:, :, :HEAD], slots.contiguous())
    assert_bitwise_equal(cache, expected, "strided kv_c / k_pe / slot_mapping")
    assert_bitwise_equal(big[:, :, HEAD:], big_before[:, :, HEAD:], "padding columns of the cache rows")

    mla_ext.append_kv(kv_c_t, k_pe, cache, slots)
    expected = mla_ext.reference.append_kv(kv_c_t, k_pe, expected, slots.contiguous())
    assert_bitwise_equal(cache, expected, "kv_c with a strided last dim")


def test_append_overwrites_and_keeps_inputs(device, gen):
    cache = poison_(torch.empty(2, 4, HEAD, dtype=FP32, device=device))
    first_c, first_p = randn((3, LATENT), gen, FP32, device), randn((3, ROPE), gen, FP32, device)
    mla_ext.append_kv(first_c, first_p, cache, torch.tensor([1, 2, 3], device=device))
    kv_c, k_pe = randn((2, LATENT), gen, FP32, device), randn((2, ROPE), gen, FP32, device)
    slots = torch.tensor([2, 6], device=device)
    inputs_before = [kv_c.clone(), k_pe.clone(), slots.clone()]
    expected = mla_ext.reference.append_kv(kv_c, k_pe, cache, slots)
    mla_ext.append_kv(kv_c, k_pe, cache, slots)
    assert_bitwise_equal(cache, expected, "second append overwrites slot 2")
    assert_bitwise_equal(cache.view(-1, HEAD)[1, :LATENT], first_c[0], "slot 1 from the first append")
    for t, b in zip([kv_c, k_pe, slots], inputs_before):
        assert_bitwise_equal(t, b, "append modified an input")


@pytest.mark.parametrize("dtype,block_size,s_q", [(BF16, 16, 1), (FP16, 7, 2), (FP32, 1, 3), (BF16, 64, 4)])
def test_append_then_decode(device, gen, dtype, block_size, s_q):
    """A serving step: prefill rows appended in one call, then the s_q new tokens of every
    sequence in a second (with padding tokens mixed in), then decode over the cache."""
    seqlens = [45, 0, 2, 70, s_q]
    b, h = len(seqlens), 16
    kv = make_paged_kv(seqlens, block_size, gen, dtype, device, fill=False)
    assert bool(kv.cache.isnan().all())

    def slots_of(i, positions):
        table = kv.block_table[i].cpu().long()
        return table[positions // block_size] * block_size + positions % block_size

    prefill_rows, prefill_slots, step_rows, step_slots = [], [], [], []
    for i, L in enumerate(seqlens):
        n_new = min(L, s_q)
        pos = torch.arange(L)
        prefill_rows.append(kv.dense[i][: L - n_new])
        prefill_slots.append(slots_of(i, pos[: L - n_new]))
        step_rows.append(kv.dense[i][L - n_new:])
        step_slots.append(slots_of(i, pos[L - n_new:]))
        step_rows.append(randn((1, HEAD), gen, dtype))  # a padding token of the batch
        step_slots.append(torch.tensor([-1]))
    for rows, slots, slot_dtype in ((prefill_rows, prefill_slots, torch.int64), (step_rows, step_slots, torch.int32)):
        rows = torch.cat(rows).to(device)
        mla_ext.append_kv(rows[:, :LATENT], rows[:, LATENT:], kv.cache, torch.cat(slots).to(slot_dtype).to(device))

    # Exactly the used slots are written; everything else is still the NaN poison.
    flat = kv.cache.view(-1, HEAD).cpu()
    used = torch.zeros(flat.shape[0], dtype=torch.bool)
    used[kv.used_slots()] = True
    assert bool(flat[~used].isnan().all()) and not bool(flat[used].isnan().any())

    q_nope, q_pe = make_query(b, s_q, h, gen, dtype, device)
    out, lse = mla_ext.decode(
        q_nope, q_pe, kv.cache, kv.block_table, kv.cache_seqlens, softmax_scale=DEEPSEEK_SCALE, return_lse=True
    )
    check_decode_result(out, lse, q_nope, q_pe, kv, DEEPSEEK_SCALE, True)
    o64, l64 = dense_decode(q_nope, q_pe, kv.dense, DEEPSEEK_SCALE, True)
    atol, rtol = OUT_TOL_VS_FP64[dtype]
    torch.testing.assert_close(out.cpu().double(), o64, atol=atol, rtol=rtol)
    torch.testing.assert_close(lse.cpu().double(), l64, atol=LSE_ATOL, rtol=LSE_RTOL)
