"""Sparse MLA decode (DeepSeek-V3.2's DeepSeek Sparse Attention) in plain torch: the
656-byte fp8 token layout, its quantiser / dequantiser, and the reference decode.

The 656-byte token (FlashMLA's "V3.2 fp8 sparse" layout), bytes in order:

    [  0, 512)  512 float8_e4m3fn latent values
    [512, 528)  4 float32 scales, scale t for latent values [128 t, 128 t + 128)
    [528, 656)  64 rope values in bfloat16 (not quantised)

A latent value is stored as e4m3(x / scale_t) (round to nearest even) with
scale_t = 2 ^ ceil(log2(max(amax_t / 448, 1e-4))), amax_t the largest |x| of the 128
values: a power of two, so x / scale_t is exact and amax_t / scale_t <= 448. The cache
tensor is float8_e4m3fn [num_blocks, block_size, 656] (or [..., 1, 656]); the block
stride may exceed block_size * 656 (padded blocks), the token stride must be 656.

Sparse decode: query (b, j) attends to the tokens named by indices[b, j, :]
(token = block_id * block_size + offset into the paged cache; -1 = skip; slots at or past
topk_length[b] = skip), plus, optionally, those named by extra_indices into a second cache.
Everything here follows FlashMLA's own reference (tests/ref.py, ref_sparse_attn_decode):

    s      = softmax_scale * q . k        over the valid slots of both caches (a token named
                                          twice counts twice); NaN in a gathered value reads as 0
    lse    = logsumexp(s)                 (natural log)
    out    = softmax(s) . v               with v = k[:512]
    sink:  out *= 1 / (1 + exp(attn_sink[h] - lse))   (lse itself unchanged)
    a query with no valid slot: out = 0 and lse = +inf.
"""
from typing import Optional, Tuple

import torch

LATENT_DIM = 512
ROPE_DIM = 64
HEAD_DIM = LATENT_DIM + ROPE_DIM
TILE = 128  # latent values per scale
NUM_TILES = LATENT_DIM // TILE
FP8_MAX = 448.0
SCALE_FLOOR = 1e-4  # smallest amax / 448 a scale is computed from (FlashMLA's margin)
TOKEN_BYTES = LATENT_DIM + 4 * NUM_TILES + 2 * ROPE_DIM  # 656
SCALE_OFFSET = LATENT_DIM  # byte offset of the 4 float32 scales
ROPE_OFFSET = LATENT_DIM + 4 * NUM_TILES  # byte offset of the bf16 rope values


def fp8_scales(latent: torch.Tensor) -> torch.Tensor:
    """The 4 power-of-two scales of each token: [..., 512] -> [..., 4] float32.

    scale = the smallest power of two >= max(amax / 448, 1e-4), amax / 448 rounded once in
    fp32. Taken exactly from the float's exponent (frexp), not as 2^ceil(torch.log2(r)) the
    way FlashMLA's tests/quant.py writes it: the two agree except where r lies within an ulp
    or two above a power of two, where log2's rounding gives the power below. r = amax / 448
    with amax a bf16 or fp16 value never lands there (amax = M 2^E with M < 2^11, and
    M / 7 is either a power of two or at least 1/1792 away from one), so on bf16 / fp16
    inputs this is FlashMLA's quantiser bit for bit; mla_ext.sparse_append_kv (native)
    computes exactly this.
    """
    amax = latent.float().abs().reshape(*latent.shape[:-1], NUM_TILES, TILE).amax(dim=-1)
    ratio = (amax / FP8_MAX).clamp_min(SCALE_FLOOR)
    mantissa, exponent = torch.frexp(ratio)  # ratio = mantissa * 2^exponent, mantissa in [0.5, 1)
    exponent = torch.where(mantissa == 0.5, exponent - 1, exponent)
    scale = torch.ldexp(torch.ones_like(ratio), exponent)
    return torch.where(torch.isfinite(ratio), scale, ratio).float()  # inf and NaN pass through


def quantize_tokens(rows: torch.Tensor) -> torch.Tensor:
    """[..., 576] float rows -> [..., 656] float8_e4m3fn tokens (the bytes of the layout)."""
    if rows.shape[-1] != HEAD_DIM:
        raise ValueError(f"quantize_tokens: rows must be [..., {HEAD_DIM}], got {tuple(rows.shape)}")
    lead = rows.shape[:-1]
    latent = rows[..., :LATENT_DIM].float()
    scales = fp8_scales(latent)  # [..., 4]
    scaled = latent.reshape(*lead, NUM_TILES, TILE) / scales.unsqueeze(-1)  # exact: powers of two
    codes = scaled.reshape(*lead, LATENT_DIM).to(torch.float8_e4m3fn).view(torch.uint8)
    scale_bytes = scales.contiguous().view(torch.uint8).reshape(*lead, 4 * NUM_TILES)
    rope_bytes = rows[..., LATENT_DIM:].to(torch.bfloat16).contiguous().view(torch.uint8).reshape(*lead, 2 * ROPE_DIM)
    return torch.cat([codes, scale_bytes, rope_bytes], dim=-1).view(torch.float8_e4m3fn)


def quantize_cache(cache: torch.Tensor, block_padding: int = 0) -> torch.Tensor:
    """A [num_blocks, block_size, (1,) 576] float cache as a float8_e4m3fn
    [num_blocks, block_size, 1, 656] cache. With block_padding = p > 0 every block is
    followed by p unused tokens' worth of bytes (block stride (block_size + p) * 656),
    as FlashMLA's test quantiser allocates it (p = 1); the padding is left zero."""
    c = cache.squeeze(2) if cache.dim() == 4 else cache
    num_blocks, block_size, _ = c.shape
    storage = torch.zeros(num_blocks, block_size + block_padding, TOKEN_BYTES, dtype=torch.float8_e4m3fn,
                          device=cache.device)
    out = storage[:, :block_size]
    out.view(torch.uint8).copy_(quantize_tokens(c).view(torch.uint8))
    return out.unsqueeze(2)


def append_kv(kv_c: torch.Tensor, k_pe: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Quantise new tokens into a 656-byte fp8 cache, in place (plain torch, any device).

    kv_c [T, 512] and k_pe [T, 64] (any float dtype; the rope part is stored as bf16),
    cache float8_e4m3fn [num_blocks, block_size, (1,) 656] (padded block strides are fine),
    slot_mapping [T] int32 / int64, slot = block_id * block_size + offset, < 0 skips the token.
    The bytes written equal quantize_tokens(cat(kv_c, k_pe)), i.e. FlashMLA's quantiser.
    """
    c = cache.squeeze(2) if cache.dim() == 4 else cache
    if c.dtype != torch.float8_e4m3fn or c.dim() != 3 or c.shape[-1] != TOKEN_BYTES or c.stride(-1) != 1:
        raise ValueError(
            f"sparse.append_kv: cache must be float8_e4m3fn [num_blocks, block_size, (1,) {TOKEN_BYTES}] with a "
            f"contiguous last dim, got {cache.dtype} {tuple(cache.shape)}")
    if kv_c.dim() != 2 or kv_c.shape[1] != LATENT_DIM or k_pe.shape != (kv_c.shape[0], ROPE_DIM):
        raise ValueError(f"sparse.append_kv: kv_c must be [T, {LATENT_DIM}] and k_pe [T, {ROPE_DIM}], got "
                         f"{tuple(kv_c.shape)} and {tuple(k_pe.shape)}")
    if slot_mapping.dtype not in (torch.int32, torch.int64) or slot_mapping.shape != (kv_c.shape[0],):
        raise ValueError(f"sparse.append_kv: slot_mapping must be int32 / int64 [T] = [{kv_c.shape[0]}], got "
                         f"{slot_mapping.dtype} {tuple(slot_mapping.shape)}")
    num_blocks, block_size, _ = c.shape
    keep = slot_mapping >= 0
    slots = slot_mapping[keep].long()
    if slots.numel() and int(slots.max()) >= num_blocks * block_size:
        raise ValueError(f"sparse.append_kv: slot {int(slots.max())} is outside the cache "
                         f"({num_blocks * block_size} slots = {num_blocks} blocks x {block_size})")
    tokens = quantize_tokens(torch.cat([kv_c, k_pe], dim=-1)[keep]).view(torch.uint8)
    c.view(torch.uint8)[slots // block_size, slots % block_size] = tokens


def dequantize_tokens(tokens: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[..., 656] float8_e4m3fn tokens -> [..., 576] rows in `dtype` (value * its scale; rope as stored)."""
    if tokens.shape[-1] != TOKEN_BYTES:
        raise ValueError(f"dequantize_tokens: tokens must be [..., {TOKEN_BYTES}], got {tuple(tokens.shape)}")
    raw = tokens.contiguous().view(torch.uint8)
    lead = raw.shape[:-1]
    codes = raw[..., :LATENT_DIM].contiguous().view(torch.float8_e4m3fn).to(dtype)
    scales = raw[..., SCALE_OFFSET:ROPE_OFFSET].contiguous().view(torch.float32).to(dtype)
    rope = raw[..., ROPE_OFFSET:].contiguous().view(torch.bfloat16).to(dtype)
    latent = (codes.reshape(*lead, NUM_TILES, TILE) * scales.unsqueeze(-1)).reshape(*lead, LATENT_DIM)
    return torch.cat([latent, rope], dim=-1)


def cache_rows(cache: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Every token of a paged cache as rows [num_blocks * block_size, 576] in `dtype`
    (a 656-byte fp8 cache is dequantised; block padding is skipped)."""
    c = cache.squeeze(2) if cache.dim() == 4 else cache
    if c.dtype == torch.float8_e4m3fn:
        if c.shape[-1] != TOKEN_BYTES:
            raise ValueError(f"a float8_e4m3fn sparse cache holds {TOKEN_BYTES}-byte tokens, got last dim {c.shape[-1]}")
        return dequantize_tokens(c, dtype).reshape(-1, HEAD_DIM)
    return c.to(dtype).reshape(-1, HEAD_DIM)


def _gather(cache: torch.Tensor, indices: torch.Tensor, topk_length: Optional[torch.Tensor],
            dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gathered rows [b, s_q, topk, 576] and the invalid-slot mask [b, s_q, topk]."""
    b, s_q, topk = indices.shape
    rows = cache_rows(cache, dtype)
    invalid = indices == -1
    if topk_length is not None:
        slot = torch.arange(topk, device=indices.device).view(1, 1, topk)
        invalid = invalid | (slot >= topk_length.view(b, 1, 1).to(indices.device))
    safe = indices.long().clamp_min(0)
    safe = torch.where(invalid, torch.zeros_like(safe), safe)
    gathered = rows.index_select(0, safe.reshape(-1)).reshape(b, s_q, topk, HEAD_DIM)
    return gathered, invalid


def sparse_decode(
    q: torch.Tensor,
    cache: torch.Tensor,
    indices: torch.Tensor,
    softmax_scale: float,
    topk_length: Optional[torch.Tensor] = None,
    extra_cache: Optional[torch.Tensor] = None,
    extra_indices: Optional[torch.Tensor] = None,
    extra_topk_length: Optional[torch.Tensor] = None,
    attn_sink: Optional[torch.Tensor] = None,
    compute_dtype: torch.dtype = torch.float64,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Reference sparse decode (module docstring), computed in `compute_dtype`.

    q        [b, s_q, h_q, 576]
    cache    [num_blocks, block_size, (1,) 656] float8_e4m3fn, or [..., 576] float
    indices  [b, s_q, topk] int32
    Returns out [b, s_q, h_q, 512] and lse [b, s_q, h_q], both in compute_dtype
    (lse = +inf and out = 0 for a query with no valid slot).
    """
    b, s_q, h_q, _ = q.shape
    kv, invalid = _gather(cache, indices, topk_length, compute_dtype)
    if extra_cache is not None:
        kv1, invalid1 = _gather(extra_cache, extra_indices, extra_topk_length, compute_dtype)
        kv = torch.cat([kv, kv1], dim=2)
        invalid = torch.cat([invalid, invalid1], dim=2)
    kv = torch.nan_to_num(kv, nan=0.0, posinf=float("inf"), neginf=float("-inf"))  # NaN reads as 0
    scores = softmax_scale * torch.einsum("bshd,bstd->bsht", q.to(compute_dtype), kv)
    scores = scores.masked_fill(invalid.unsqueeze(2), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # [b, s_q, h_q]; -inf where no slot is valid
    empty = lse == float("-inf")
    probs = torch.exp(scores - torch.where(empty, 0.0, lse).unsqueeze(-1))  # 0 everywhere on an empty row
    # Invalid slots are multiplied by exactly 0, and their gathered rows are finite (NaN -> 0)
    # only if the cache holds no inf there: zero them so nothing unused reaches the output.
    kv_v = kv[..., :LATENT_DIM].masked_fill(invalid.unsqueeze(-1), 0.0)
    out = torch.einsum("bsht,bstd->bshd", probs, kv_v)
    if attn_sink is not None:
        factor = 1.0 / (1.0 + torch.exp(attn_sink.to(compute_dtype).view(1, 1, h_q) - lse))
        out = out * factor.unsqueeze(-1)
    out = out.masked_fill(empty.unsqueeze(-1), 0.0)
    lse = lse.masked_fill(empty, float("inf"))
    return out, lse
