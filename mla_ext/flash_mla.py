"""FlashMLA's public decode API over mla_ext's kernels.

Code written against FlashMLA's documented interface

    tile_scheduler_metadata, num_splits = get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv)
    o, lse = flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, dv,
                                    tile_scheduler_metadata, num_splits, causal=True)

runs unchanged with `from mla_ext.flash_mla import get_mla_metadata, flash_mla_with_kvcache`,
on any page size (FlashMLA: 64 only), on the CPU or any GPU mla_ext is built for (FlashMLA:
Hopper), in bf16 / fp16 / fp32.

Shapes and defaults are FlashMLA's:

    q              [b, s_q, h_q, 576]          rope part last: [q_lat (512) | q_pe (64)]
    k_cache        [num_blocks, page, 1, 576]  (the squeezed [num_blocks, page, 576] is accepted too)
    block_table    [b, max_blocks] int32
    cache_seqlens  [b] int32
    head_dim_v     512 (V is the first 512 columns of K)
    softmax_scale  default 1/sqrt(576) = q.shape[-1] ** -0.5, FlashMLA's default. DeepSeek
                   models need 1/sqrt(192) * mscale^2 (mla_ext.absorb.mla_softmax_scale):
                   pass it explicitly.
    causal         default False; with s_q > 1, query j of a sequence of length L sees keys
                   t <= L - s_q + j (bottom-right aligned).
    returns        out [b, s_q, h_q, 512] in q's dtype, lse [b, h_q, s_q] float32 (natural log)

mla_ext's kernels schedule themselves, so the metadata is only checked for shape: it
exists for signature compatibility (and costs no host sync).
"""
from typing import Optional, Tuple

import torch

from . import ops
from ._ops import HEAD_DIM, LATENT_DIM

__all__ = ["get_mla_metadata", "flash_mla_with_kvcache", "TILE_SCHEDULER_METADATA_SIZE"]

TILE_SCHEDULER_METADATA_SIZE = 8  # FlashMLA's TileSchedulerMetaDataSize (int32 words per part)


def _num_parts(device: torch.device, num_heads_per_head_k: int, num_heads_k: int) -> int:
    if device.type == "cuda":
        sm_count = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, sm_count // max(1, num_heads_k) // max(1, -(-num_heads_per_head_k // 64)))
    return max(1, torch.get_num_threads())


def get_mla_metadata(
    cache_seqlens: torch.Tensor,
    num_heads_per_head_k: int,
    num_heads_k: int,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """FlashMLA's scheduling-metadata call.

    cache_seqlens         [b] int32
    num_heads_per_head_k  s_q * h_q // h_kv
    num_heads_k           h_kv (1 for MLA)

    Returns (tile_scheduler_metadata [num_parts, 8] int32, num_splits [b + 1] int32), on
    cache_seqlens' device. mla_ext does not need them (its kernels split the work
    themselves); they are valid placeholders: num_splits is the prefix sum of one split per
    sequence.
    """
    if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dim() != 1:
        raise ValueError(f"get_mla_metadata: cache_seqlens must be a 1-D int32 tensor [b], got {getattr(cache_seqlens, 'shape', type(cache_seqlens))}")
    if cache_seqlens.dtype != torch.int32:
        raise TypeError(f"get_mla_metadata: cache_seqlens must be int32, got {cache_seqlens.dtype}")
    if int(num_heads_per_head_k) < 1 or int(num_heads_k) < 1:
        raise ValueError(
            f"get_mla_metadata: num_heads_per_head_k and num_heads_k must be >= 1, got {num_heads_per_head_k}, {num_heads_k}"
        )
    device = cache_seqlens.device
    parts = _num_parts(device, int(num_heads_per_head_k), int(num_heads_k))
    tile_scheduler_metadata = torch.zeros(parts, TILE_SCHEDULER_METADATA_SIZE, dtype=torch.int32, device=device)
    num_splits = torch.arange(cache_seqlens.shape[0] + 1, dtype=torch.int32, device=device)
    return tile_scheduler_metadata, num_splits


def flash_mla_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    head_dim_v: int,
    tile_scheduler_metadata: Optional[torch.Tensor],
    num_splits: Optional[torch.Tensor],
    softmax_scale: Optional[float] = None,
    causal: bool = False,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """FlashMLA's decode: MQA over a paged cache with head_dim 576 and head_dim_v 512.

    See the module docstring for shapes. Returns (out [b, s_q, h_q, 512], lse [b, h_q, s_q]
    float32). Raises ValueError for head_dim_v != 512, a k_cache with more than one KV head,
    or metadata whose shape does not fit the batch; every other check is mla_ext.decode's.
    """
    if int(head_dim_v) != LATENT_DIM:
        raise ValueError(f"flash_mla_with_kvcache: head_dim_v must be {LATENT_DIM} (MLA's latent width), got {head_dim_v}")
    if not isinstance(q, torch.Tensor) or q.dim() != 4 or q.shape[-1] != HEAD_DIM:
        raise ValueError(f"flash_mla_with_kvcache: q must be [b, s_q, h_q, {HEAD_DIM}], got {getattr(q, 'shape', type(q))}")
    if not isinstance(k_cache, torch.Tensor) or k_cache.dim() not in (3, 4):
        raise ValueError(
            f"flash_mla_with_kvcache: k_cache must be [num_blocks, page_block_size, num_heads_k, {HEAD_DIM}], "
            f"got {getattr(k_cache, 'shape', type(k_cache))}"
        )
    if k_cache.dim() == 4 and k_cache.shape[2] != 1:
        raise ValueError(
            f"flash_mla_with_kvcache: k_cache has {k_cache.shape[2]} KV heads; MLA (and mla_ext) uses num_heads_k = 1"
        )
    b = q.shape[0]
    if num_splits is not None and (not isinstance(num_splits, torch.Tensor) or num_splits.shape != (b + 1,)):
        raise ValueError(
            f"flash_mla_with_kvcache: num_splits must be the [b + 1] = [{b + 1}] tensor from get_mla_metadata, "
            f"got {getattr(num_splits, 'shape', type(num_splits))}"
        )
    if tile_scheduler_metadata is not None and (
        not isinstance(tile_scheduler_metadata, torch.Tensor) or tile_scheduler_metadata.dim() != 2
    ):
        raise ValueError("flash_mla_with_kvcache: tile_scheduler_metadata must be the 2-D tensor from get_mla_metadata")
    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** (-0.5)
    out, lse = ops.decode(
        q, None, k_cache, block_table, cache_seqlens, softmax_scale=softmax_scale, causal=causal, return_lse=True
    )
    return out, lse.transpose(1, 2).contiguous()
