"""Weight absorption (mla_ext.absorb): the absorbed decode equals the non-absorbed MLA
attention, the helpers' layouts, and DeepSeek's softmax scale (YaRN mscale)."""
import math

import pytest
import torch

import mla_ext
from mla_ext.absorb import (
    absorb_query,
    expand_output,
    mla_softmax_scale,
    split_kv_b_proj,
    yarn_mscale,
)

from conftest import DEVICES  # noqa: E402


pytestmark = pytest.mark.usefixtures("one_thread")


def _gen(seed):
    g = torch.Generator()
    g.manual_seed(seed)
    return g


def _paged(rows_per_seq, block_size, dtype, device, g):
    """Scatter each sequence's rows [L, 576] into a shuffled paged cache; NaN elsewhere."""
    counts = [-(-r.shape[0] // block_size) for r in rows_per_seq]
    nb = sum(counts) + 2
    perm = torch.randperm(nb, generator=g)
    cache = torch.full((nb, block_size, 576), float("nan"), dtype=dtype)
    table = torch.zeros(len(rows_per_seq), max(max(counts), 1), dtype=torch.int32)
    nxt = 0
    for i, rows in enumerate(rows_per_seq):
        blocks = perm[nxt : nxt + counts[i]]
        nxt += counts[i]
        table[i, : counts[i]] = blocks.to(torch.int32)
        pos = torch.arange(rows.shape[0])
        cache[blocks[pos // block_size], pos % block_size] = rows.to(dtype)
    seqlens = torch.tensor([r.shape[0] for r in rows_per_seq], dtype=torch.int32)
    return cache.to(device), table.to(device), seqlens.to(device)


def _unabsorbed_attention(q_nope, q_pe, c, kpe, kv_b, h, nope, v, scale, causal):
    """Textbook MLA in float64: expand K/V per head from the latent, softmax attention."""
    w = kv_b.double().view(h, nope + v, 512)
    w_uk, w_uv = w[:, :nope], w[:, nope:]  # [h, nope, 512], [h, v, 512]
    L = c.shape[0]
    s_q = q_nope.shape[0]
    k_nope = torch.einsum("hnl,tl->htn", w_uk, c.double())  # [h, L, nope]
    vals = torch.einsum("hvl,tl->htv", w_uv, c.double())  # [h, L, v]
    scores = torch.einsum("shn,htn->sht", q_nope.double(), k_nope) + torch.einsum("shr,tr->sht", q_pe.double(), kpe.double())
    scores = scores * scale
    if causal:
        j = torch.arange(s_q).view(s_q, 1, 1)
        t = torch.arange(L).view(1, 1, L)
        scores = scores.masked_fill(t > L - s_q + j, float("-inf"))
    p = torch.softmax(scores, dim=-1)
    return torch.einsum("sht,htv->shv", p, vals)  # [s_q, h, v]


@pytest.mark.parametrize("dev", DEVICES)
@pytest.mark.parametrize(
    "h,nope,v,s_q,block_size,causal",
    [(4, 128, 128, 1, 16, True), (3, 128, 128, 2, 5, True), (2, 32, 48, 3, 1, False), (16, 128, 128, 1, 64, True)],
)
def test_absorbed_decode_equals_unabsorbed_attention(dev, h, nope, v, s_q, block_size, causal):
    g = _gen(1000 * h + 10 * s_q + block_size)
    seqlens = [7, 1 + s_q, 33]
    b = len(seqlens)
    kv_b = torch.randn(h * (nope + v), 512, generator=g) / math.sqrt(512)
    lat = [torch.randn(L, 512, generator=g) for L in seqlens]
    kpe = [torch.randn(L, 64, generator=g) for L in seqlens]
    q_nope = torch.randn(b, s_q, h, nope, generator=g)
    q_pe = torch.randn(b, s_q, h, 64, generator=g)
    scale = mla_softmax_scale(nope, 64)

    cache, table, lens = _paged([torch.cat([c, k], -1) for c, k in zip(lat, kpe)], block_size, torch.float32, dev, g)
    w = split_kv_b_proj(kv_b.to(dev), h, nope, v)
    q_lat = absorb_query(q_nope.to(dev), w.w_uk_t)
    o_lat = mla_ext.decode(q_lat, q_pe.to(dev), cache, table, lens, softmax_scale=scale, causal=causal)
    out = expand_output(o_lat, w.w_uv).cpu()
    assert out.shape == (b, s_q, h, v)
    for i in range(b):
        ref = _unabsorbed_attention(q_nope[i], q_pe[i], lat[i], kpe[i], kv_b, h, nope, v, scale, causal)
        torch.testing.assert_close(out[i].double(), ref, atol=2e-5, rtol=2e-5)


def test_absorbed_decode_bf16_close_to_fp32():
    g = _gen(7)
    h, nope, v, L = 4, 128, 128, 40
    kv_b = torch.randn(h * (nope + v), 512, generator=g) / math.sqrt(512)
    rows = torch.randn(L, 576, generator=g)
    q_nope = torch.randn(1, 1, h, nope, generator=g)
    q_pe = torch.randn(1, 1, h, 64, generator=g)
    scale = mla_softmax_scale()
    outs = {}
    for dt in (torch.float32, torch.bfloat16):
        cache, table, lens = _paged([rows], 16, dt, "cpu", g)
        w = split_kv_b_proj(kv_b, h, nope, v, dtype=dt)
        o_lat = mla_ext.decode(absorb_query(q_nope.to(dt), w.w_uk_t), q_pe.to(dt), cache, table, lens, softmax_scale=scale)
        outs[dt] = expand_output(o_lat, w.w_uv)
        assert outs[dt].dtype == dt
    torch.testing.assert_close(outs[torch.bfloat16].float(), outs[torch.float32], atol=3e-2, rtol=3e-2)


def test_split_layout_and_views():
    h, nope, v = 3, 8, 5
    w = torch.arange(h * (nope + v) * 512, dtype=torch.float32).view(h * (nope + v), 512)
    a = split_kv_b_proj(w, h, nope, v)
    assert a.w_uk_t.shape == (h, nope, 512) and a.w_uv.shape == (h, 512, v)
    # Views, not copies: they follow in-place weight updates (e.g. loading a checkpoint).
    assert a.w_uk_t.data_ptr() == w.data_ptr()
    for i in range(h):
        rows = w[i * (nope + v) : (i + 1) * (nope + v)]
        assert torch.equal(a.w_uk_t[i], rows[:nope])  # W_UK_i [nope, 512]
        assert torch.equal(a.w_uv[i], rows[nope:].T)  # W_UV_i^T [512, v]
    c = split_kv_b_proj(w, h, nope, v, contiguous=True)
    assert c.w_uk_t.is_contiguous() and c.w_uv.is_contiguous() and torch.equal(c.w_uv, a.w_uv)
    d = split_kv_b_proj(w, h, nope, v, dtype=torch.bfloat16)
    assert d.w_uk_t.dtype == torch.bfloat16


def test_absorb_query_and_expand_output_match_per_head_matmuls():
    g = _gen(3)
    h, nope, v = 4, 16, 24
    kv_b = torch.randn(h * (nope + v), 512, generator=g, dtype=torch.float64)
    w = split_kv_b_proj(kv_b, h, nope, v)
    q = torch.randn(2, 3, h, nope, generator=g, dtype=torch.float64)
    o_lat = torch.randn(2, 3, h, 512, generator=g, dtype=torch.float64)
    W = kv_b.view(h, nope + v, 512)
    q_lat = absorb_query(q, w.w_uk_t)
    o = expand_output(o_lat, w.w_uv)
    assert q_lat.shape == (2, 3, h, 512) and q_lat.is_contiguous() and o.shape == (2, 3, h, v)
    for i in range(h):
        # SPEC: q_lat_i = W_UK_i^T q_nope_i and o_i = W_UV_i o_lat_i, column vectors.
        torch.testing.assert_close(q_lat[:, :, i], (W[i, :nope].T @ q[:, :, i].unsqueeze(-1)).squeeze(-1))
        torch.testing.assert_close(o[:, :, i], (W[i, nope:] @ o_lat[:, :, i].unsqueeze(-1)).squeeze(-1))


def test_shape_errors_name_the_argument():
    with pytest.raises(ValueError, match="kv_b_weight"):
        split_kv_b_proj(torch.zeros(4 * 256, 256), 4, 128, 128)  # kv_lora_rank 256
    with pytest.raises(ValueError, match="kv_b_weight"):
        split_kv_b_proj(torch.zeros(3 * 256, 512), 4, 128, 128)  # wrong head count
    w = split_kv_b_proj(torch.zeros(4 * 256, 512), 4, 128, 128)
    with pytest.raises(ValueError, match="absorb_query"):
        absorb_query(torch.zeros(1, 1, 4, 64), w.w_uk_t)
    with pytest.raises(ValueError, match="expand_output"):
        expand_output(torch.zeros(1, 1, 3, 512), w.w_uv)


def test_softmax_scale_deepseek_and_yarn():
    assert mla_softmax_scale() == pytest.approx(1 / math.sqrt(192))
    assert mla_softmax_scale(rope_scaling=None) != pytest.approx(1 / math.sqrt(576))
    v3 = {"type": "yarn", "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0, "original_max_position_embeddings": 4096}
    m = 0.1 * math.log(40) + 1
    assert yarn_mscale(40, 1.0) == pytest.approx(m)
    assert mla_softmax_scale(128, 64, v3) == pytest.approx(m * m / math.sqrt(192))
    assert mla_softmax_scale(128, 64, v3) == pytest.approx(0.13523, abs=1e-5)  # SPEC's number for V3
    assert mla_softmax_scale(128, 64, dict(v3, rope_type="yarn")) == pytest.approx(0.13523, abs=1e-5)
    assert mla_softmax_scale(128, 64, dict(v3, mscale_all_dim=0)) == pytest.approx(1 / math.sqrt(192))
    assert mla_softmax_scale(128, 64, {"rope_type": "default", "mscale_all_dim": 1.0, "factor": 40}) == pytest.approx(
        1 / math.sqrt(192)
    )
    assert yarn_mscale(1.0, 1.0) == 1.0 and yarn_mscale(0.5, 1.0) == 1.0


def test_softmax_scale_matches_transformers():
    mdl = pytest.importorskip("transformers.models.deepseek_v3.modeling_deepseek_v3")
    for rp in (
        {"rope_type": "default"},
        {"rope_type": "yarn", "factor": 40.0, "mscale": 1.0, "mscale_all_dim": 1.0},
        {"rope_type": "yarn", "factor": 4.0, "mscale": 0.707, "mscale_all_dim": 0.707},
    ):
        assert mla_softmax_scale(128, 64, rp) == pytest.approx(mdl.yarn_apply_mscale(rp, 192**-0.5))
