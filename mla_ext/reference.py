"""Readable reference implementations of the two ops, in plain torch.

They follow SPEC's math line by line, in float32 by default (float64 on request), with
no paging tricks: each sequence's cache rows are gathered through its block table and
attention is computed densely. Tests and benchmarks compare the kernels against these.
"""
from typing import Optional, Tuple

import torch

LATENT_DIM = 512
ROPE_DIM = 64
HEAD_DIM = LATENT_DIM + ROPE_DIM


def _cache_3d(cache: torch.Tensor) -> torch.Tensor:
    return cache.squeeze(2) if cache.dim() == 4 else cache


def gather_sequence(cache: torch.Tensor, block_table_row: torch.Tensor, seqlen: int) -> torch.Tensor:
    """The first `seqlen` cache rows of one sequence, in order: [seqlen, 576]."""
    cache = _cache_3d(cache)
    block_size = cache.shape[1]
    positions = torch.arange(seqlen, device=cache.device)
    blocks = block_table_row[positions // block_size].long()
    return cache[blocks, positions % block_size]


FP8_E4M3_MAX = 448.0


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale rounded to nearest-even float8_e4m3fn, saturated to +-448 (torch's own
    cast would turn out-of-range values into NaN, hence the clamp first)."""
    return (x.float() / scale.float()).clamp(-FP8_E4M3_MAX, FP8_E4M3_MAX).to(torch.float8_e4m3fn)


def dequantize(cache: torch.Tensor, scale: Optional[torch.Tensor], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The cache's values in `dtype`: x * scale for an fp8 cache, a plain cast otherwise."""
    if cache.dtype == torch.float8_e4m3fn:
        return cache.to(dtype) * scale.to(dtype)
    return cache.to(dtype)


def append_kv(
    kv_c: torch.Tensor,
    k_pe: torch.Tensor,
    cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    scale: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Return a copy of `cache` with rows [kv_c | k_pe] written at the slots >= 0."""
    new = cache.clone()
    flat = _cache_3d(new).reshape(-1, HEAD_DIM)  # [num_blocks * block_size, 576], a view of `new`
    keep = slot_mapping >= 0
    rows = torch.cat([kv_c, k_pe], dim=-1)
    rows = quantize_fp8(rows, scale) if cache.dtype == torch.float8_e4m3fn else rows.to(cache.dtype)
    flat[slot_mapping[keep].long()] = rows[keep]
    return new


def visible_keys(seqlen: int, s_q: int, j: int, causal: bool) -> int:
    """Keys query j of s_q sees in a sequence of `seqlen` cached tokens (SPEC section 1)."""
    if not causal:
        return seqlen
    return max(0, min(seqlen, seqlen - s_q + j + 1))


def decode(
    q_nope: torch.Tensor,
    q_pe: Optional[torch.Tensor],
    cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    softmax_scale: float,
    causal: bool = True,
    compute_dtype: torch.dtype = torch.float32,
    scale: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Absorbed MLA decode, densely per sequence.

    Returns out [b, s_q, h, 512] in q's dtype and lse [b, s_q, h] float32 (natural log;
    -inf, with out = 0, for a query that sees no key). For a float8_e4m3fn cache, pass
    its `scale`: rows are dequantized as x * scale.
    """
    q = q_nope if q_pe is None else torch.cat([q_nope, q_pe], dim=-1)  # [b, s_q, h, 576]
    b, s_q, h, _ = q.shape
    out = torch.zeros(b, s_q, h, LATENT_DIM, dtype=compute_dtype, device=q.device)
    lse = torch.full((b, s_q, h), float("-inf"), dtype=compute_dtype, device=q.device)
    for i in range(b):
        seqlen = int(cache_seqlens[i])
        if seqlen == 0:
            continue
        kv = dequantize(gather_sequence(cache, block_table[i], seqlen), scale, compute_dtype)  # [L, 576]
        scores = softmax_scale * torch.einsum("shd,td->sht", q[i].to(compute_dtype), kv)  # [s_q, h, L]
        if causal:
            # Query j sees keys t <= L - s_q + j (bottom-right aligned).
            j = torch.arange(s_q, device=q.device).view(s_q, 1, 1)
            t = torch.arange(seqlen, device=q.device).view(1, 1, seqlen)
            scores = scores.masked_fill(t > seqlen - s_q + j, float("-inf"))
        row_lse = torch.logsumexp(scores, dim=-1)  # [s_q, h]; -inf where every key is masked
        seen = ~torch.isneginf(row_lse)  # a NaN / inf the query sees propagates; -inf: no key
        probs = torch.where(seen[..., None], torch.exp(scores - row_lse[..., None]), 0.0)
        for j in range(s_q):
            # Only the keys query j sees: a masked key is skipped, not multiplied by 0, so an
            # inf / NaN there cannot reach this query (0 * NaN would be NaN).
            n = visible_keys(seqlen, s_q, j, causal)
            out[i, j] = probs[j, :, :n] @ kv[:n, :LATENT_DIM]
        lse[i] = row_lse
    return out.to(q.dtype), lse.float()
