"""Weight absorption for MLA: turn a DeepSeek `kv_b_proj` into the two per-head matrices
that surround `mla_ext.decode`, and the softmax scale DeepSeek uses.

DeepSeek's `kv_b_proj` is an nn.Linear(kv_lora_rank=512 -> h * (qk_nope + v)) whose weight
is [h * (qk_nope + v), 512]; viewed as [h, qk_nope + v, 512], head i holds

    W_UK_i = w[i, :qk_nope]   [qk_nope, 512]    k_nope_i,t = W_UK_i c_t
    W_UV_i = w[i, qk_nope:]   [v, 512]          v_i,t      = W_UV_i c_t

Absorption (SPEC section 1) moves W_UK into the query and W_UV after the attention:

    q_lat_i = W_UK_i^T q_nope_i     [512]    so  q_lat_i . c_t = q_nope_i . k_nope_i,t
    o_i     = W_UV_i   o_lat_i      [v]      so  o_i = sum_t p_t v_i,t

Layout (that of vLLM's MLA backends): both matrices are stored as the RIGHT operand of a
per-head batched matmul over row vectors, heads first, so that no transpose is needed at
run time:

    w_uk_t [h, qk_nope, 512]    q_lat[..., i, :] = q_nope[..., i, :] @ w_uk_t[i]
    w_uv   [h, 512, v]          o[..., i, :]     = o_lat[..., i, :]  @ w_uv[i]

`w_uk_t` is a plain view of kv_b_proj's weight (no copy); `w_uv` is a transposed view, or
a contiguous copy when `contiguous=True` (better for repeated GPU matmuls).
"""
import math
from typing import Mapping, NamedTuple, Optional

import torch

from ._ops import LATENT_DIM

__all__ = [
    "AbsorbedWeights",
    "split_kv_b_proj",
    "absorb_query",
    "expand_output",
    "yarn_mscale",
    "mla_softmax_scale",
]


class AbsorbedWeights(NamedTuple):
    """The per-head matrices around the absorbed decode (see the module docstring)."""

    w_uk_t: torch.Tensor  # [h, qk_nope, 512]: q_lat = q_nope @ w_uk_t (per head)
    w_uv: torch.Tensor  # [h, 512, v]:        o = o_lat @ w_uv (per head)


def split_kv_b_proj(
    kv_b_weight: torch.Tensor,
    num_heads: int,
    qk_nope_head_dim: int = 128,
    v_head_dim: int = 128,
    *,
    dtype: Optional[torch.dtype] = None,
    contiguous: bool = False,
) -> AbsorbedWeights:
    """Split a DeepSeek kv_b_proj weight [h * (qk_nope + v), 512] into (w_uk_t, w_uv).

    Returns views of `kv_b_weight` unless `dtype` differs or `contiguous=True`, in which
    case both are fresh contiguous tensors. Raises ValueError on a shape that does not
    match `num_heads`, `qk_nope_head_dim`, `v_head_dim` and kv_lora_rank = 512.
    """
    if not isinstance(kv_b_weight, torch.Tensor) or kv_b_weight.dim() != 2:
        raise ValueError(f"kv_b_weight must be a 2-D tensor [h*(qk_nope+v), 512], got {getattr(kv_b_weight, 'shape', type(kv_b_weight))}")
    per_head = qk_nope_head_dim + v_head_dim
    if num_heads <= 0 or qk_nope_head_dim <= 0 or v_head_dim <= 0:
        raise ValueError(f"num_heads, qk_nope_head_dim and v_head_dim must be positive, got {num_heads}, {qk_nope_head_dim}, {v_head_dim}")
    if tuple(kv_b_weight.shape) != (num_heads * per_head, LATENT_DIM):
        raise ValueError(
            f"kv_b_weight has shape {tuple(kv_b_weight.shape)}, expected [num_heads * (qk_nope_head_dim + v_head_dim), "
            f"kv_lora_rank] = [{num_heads} * ({qk_nope_head_dim} + {v_head_dim}), {LATENT_DIM}]"
        )
    w = kv_b_weight if dtype is None else kv_b_weight.to(dtype)
    w = w.view(num_heads, per_head, LATENT_DIM)
    w_uk_t = w[:, :qk_nope_head_dim, :]  # [h, nope, 512]
    w_uv = w[:, qk_nope_head_dim:, :].transpose(1, 2)  # [h, 512, v]
    if contiguous:
        w_uk_t, w_uv = w_uk_t.contiguous(), w_uv.contiguous()
    return AbsorbedWeights(w_uk_t, w_uv)


def absorb_query(q_nope: torch.Tensor, w_uk_t: torch.Tensor) -> torch.Tensor:
    """q_nope [..., h, qk_nope] -> q_lat [..., h, 512] = per head q_nope @ w_uk_t[h].

    The result is contiguous and in q_nope's dtype (the matmul accumulates in fp32 for
    half types, as torch's matmuls do); feed it to `mla_ext.decode` as `q_nope`.
    """
    if q_nope.dim() < 2 or w_uk_t.dim() != 3 or q_nope.shape[-2:] != w_uk_t.shape[:2]:
        raise ValueError(
            f"absorb_query: q_nope [..., h, qk_nope] {tuple(q_nope.shape)} does not match w_uk_t [h, qk_nope, 512] {tuple(w_uk_t.shape)}"
        )
    lead = q_nope.shape[:-2]
    h, d = q_nope.shape[-2:]
    x = q_nope.reshape(-1, h, d).transpose(0, 1)  # [h, N, nope]
    q_lat = torch.bmm(x, w_uk_t.to(q_nope.dtype))  # [h, N, 512]
    return q_lat.transpose(0, 1).reshape(*lead, h, w_uk_t.shape[-1]).contiguous()


def expand_output(o_lat: torch.Tensor, w_uv: torch.Tensor) -> torch.Tensor:
    """o_lat [..., h, 512] (what decode returns) -> o [..., h, v] = per head o_lat @ w_uv[h].

    Flatten the last two dims and apply the attention's o_proj to get the layer output.
    """
    if o_lat.dim() < 2 or w_uv.dim() != 3 or o_lat.shape[-2] != w_uv.shape[0] or o_lat.shape[-1] != w_uv.shape[1]:
        raise ValueError(f"expand_output: o_lat [..., h, 512] {tuple(o_lat.shape)} does not match w_uv [h, 512, v] {tuple(w_uv.shape)}")
    lead = o_lat.shape[:-2]
    h = o_lat.shape[-2]
    x = o_lat.reshape(-1, h, o_lat.shape[-1]).transpose(0, 1)  # [h, N, 512]
    o = torch.bmm(x, w_uv.to(o_lat.dtype))  # [h, N, v]
    return o.transpose(0, 1).reshape(*lead, h, w_uv.shape[-1])


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention-temperature correction, 0.1 * mscale * ln(factor) + 1 (1 if factor <= 1)."""
    if factor <= 1.0:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


def mla_softmax_scale(
    qk_nope_head_dim: int = 128,
    qk_rope_head_dim: int = 64,
    rope_scaling: Optional[Mapping] = None,
) -> float:
    """The softmax scale DeepSeek-V2/V3 use, to pass as `decode(..., softmax_scale=...)`.

    1/sqrt(qk_nope + qk_rope) (= 1/sqrt(192)), times mscale^2 when `rope_scaling` is a YaRN
    config with a non-zero `mscale_all_dim`, mscale = yarn_mscale(factor, mscale_all_dim).
    `rope_scaling` is the model config's `rope_scaling` / `rope_parameters` dict (keys
    `type` or `rope_type`, `factor`, `mscale_all_dim`). DeepSeek-V3 (factor 40,
    mscale_all_dim 1) gives 0.13523.

    The scale is computed for the UNABSORBED head dim on purpose: absorption does not change
    the dot products, so it must not change the scale (in particular it is not 1/sqrt(576)).
    """
    scale = (qk_nope_head_dim + qk_rope_head_dim) ** -0.5
    if rope_scaling:
        kind = rope_scaling.get("rope_type", rope_scaling.get("type", "default"))
        mscale_all_dim = rope_scaling.get("mscale_all_dim", 0)
        if kind not in (None, "default") and mscale_all_dim:
            m = yarn_mscale(float(rope_scaling["factor"]), float(mscale_all_dim))
            scale *= m * m
    return scale
