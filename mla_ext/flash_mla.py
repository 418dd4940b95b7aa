"""FlashMLA's public decode API (its current form) over mla_ext's kernels.

Code written against FlashMLA's interface

    sched_meta, num_splits = get_mla_metadata()          # (FlashMLASchedMeta(), None)
    for layer in layers:
        o, lse = flash_mla_with_kvcache(q, k_cache, block_table, cache_seqlens, 512,
                                        sched_meta, num_splits, causal=True)

runs unchanged with `from mla_ext.flash_mla import get_mla_metadata, flash_mla_with_kvcache`,
on any page size (FlashMLA: 64), on the CPU or any GPU mla_ext is built for (FlashMLA:
Hopper / Blackwell), in bf16 / fp16 / fp32. The older call style,
`get_mla_metadata(cache_seqlens, s_q * h_q // h_kv, h_kv, ...)`, is accepted too (its
arguments are checked, then used only to check the first decode call against them) and
returns the same `(FlashMLASchedMeta(), None)`.

Shapes and defaults are FlashMLA's:

    q              [b, s_q, h_q, 576]          rope part last: [q_lat (512) | q_pe (64)]
    k_cache        [num_blocks, page, 1, 576]  (the squeezed [num_blocks, page, 576] is accepted too)
    block_table    [b, max_blocks] int32       entries past a sequence's end are ignored
    cache_seqlens  [b] int32
    head_dim_v     512 (V is the first 512 columns of K)
    softmax_scale  default 1/sqrt(576) = q.shape[-1] ** -0.5, FlashMLA's default. DeepSeek
                   models need 1/sqrt(192) * mscale^2 (mla_ext.absorb.mla_softmax_scale):
                   pass it explicitly.
    causal         default False; with s_q > 1, query j of a sequence of length L sees keys
                   t <= L - s_q + j (bottom-right aligned).
    attn_sink      optional [h_q] float32: out *= 1 / (1 + exp(attn_sink - lse)), lse unchanged
                   (FlashMLA takes it in sparse mode only; here dense calls accept it too).
    returns        out [b, s_q, h_q, 512] in q's dtype, lse [b, h_q, s_q] float32 (natural log).
                   A query that sees no key (L = 0, or causal with L < s_q) gets out = 0 and
                   lse = +inf, FlashMLA's convention (so an lse-weighted merge ignores it);
                   the native mla_ext.decode returns -inf there (SPEC).

The schedule object (FlashMLASchedMeta) is filled on the first call and checked on every
later call with it: batch, s_q, h_q, page size, KV heads, causal, is_fp8_kvcache, topk,
the extra cache's page size and topk (FlashMLA's checks), plus q's and the cache's dtypes
and the device (mla_ext's). A mismatch raises ValueError naming the field. mla_ext's kernels
schedule themselves, so the tensors it holds are placeholders (no host sync).

Sparse decode (DeepSeek-V3.2): with `indices` [b, s_q, topk] int32 the call goes to
mla_ext.sparse_decode (math: mla_ext/sparse.py, FlashMLA's reference): block_table and
cache_seqlens are ignored (may be None), causal must be False, `topk_length`,
`extra_k_cache` / `extra_indices_in_kvcache` / `extra_topk_length` and `attn_sink` work as
in FlashMLA. `is_fp8_kvcache=True` means the 656-byte fp8 token cache (float8_e4m3fn
[num_blocks, page, 1, 656], mla_ext.sparse.quantize_cache writes it; padded block strides
are fine); with `is_fp8_kvcache=False` a bf16 / fp16 / fp32 [..., 576] cache is read
sparsely too (mla_ext's addition; FlashMLA's sparse decode is fp8 only). A query with no
valid slot gets out = 0 and lse = +inf. `is_fp8_kvcache=True` without indices (FlashMLA's
dense fp8 mode) raises NotImplementedError; the sparse keywords without indices raise
ValueError.
"""
import dataclasses
import operator
from typing import Any, Optional, Tuple, Union

import torch

from . import ops
from ._ops import HEAD_DIM, LATENT_DIM

__all__ = ["FlashMLASchedMeta", "get_mla_metadata", "flash_mla_with_kvcache", "TILE_SCHEDULER_METADATA_SIZE"]

TILE_SCHEDULER_METADATA_SIZE = 8  # FlashMLA's TileSchedulerMetaDataSize (int32 words per part)

_INCONSISTENT = (
    " The same FlashMLASchedMeta may only be reused for calls with the same shapes and settings;"
    " call get_mla_metadata() again for a new one."
)


@dataclasses.dataclass
class FlashMLASchedMeta:
    """FlashMLA's scheduling object: empty from get_mla_metadata(), filled by the first
    flash_mla_with_kvcache call, checked by later ones."""

    @dataclasses.dataclass
    class Config:
        # FlashMLA's fields, in its order.
        b: int
        s_q: int
        h_q: int
        page_block_size: int
        h_k: int
        causal: bool
        is_fp8_kvcache: bool
        topk: Optional[int]
        extra_page_block_size: Optional[int]
        extra_topk: Optional[int]
        # mla_ext's additions (defaults, so FlashMLA-style positional construction works).
        q_dtype: Optional[torch.dtype] = None
        kv_dtype: Optional[torch.dtype] = None
        device: Optional[torch.device] = None

    have_initialized: bool = False
    config: Optional[Config] = None
    tile_scheduler_metadata: Optional[torch.Tensor] = None  # [num_parts, 8] int32 placeholder
    num_splits: Optional[torch.Tensor] = None  # [b + 1] int32 placeholder
    # Hints from an old-style get_mla_metadata(cache_seqlens, s_q*h_q//h_kv, h_kv, ...) call,
    # checked against the first decode call (mla_ext's addition).
    expected: Optional[dict] = None


def _num_parts(device: torch.device, rows_per_head_k: int, num_heads_k: int) -> int:
    if device.type == "cuda":
        sm_count = torch.cuda.get_device_properties(device).multi_processor_count
        return max(1, sm_count // max(1, num_heads_k) // max(1, -(-rows_per_head_k // 64)))
    return max(1, torch.get_num_threads())


_OLD_NAMES = ("cache_seqlens", "num_q_tokens_per_head_k", "num_heads_k", "num_heads_q", "is_fp8_kvcache", "topk")


def get_mla_metadata(*args: Any, **kwargs: Any) -> Tuple[FlashMLASchedMeta, None]:
    """FlashMLA's scheduling call: returns (FlashMLASchedMeta(), None).

    No argument is needed. The old call style is accepted:
    get_mla_metadata(cache_seqlens, num_q_tokens_per_head_k, num_heads_k, num_heads_q=None,
    is_fp8_kvcache=False, topk=None) (num_q_tokens_per_head_k = s_q * h_q // h_kv; the name
    num_heads_per_head_k works too). Those arguments are checked (cache_seqlens a 1-D int32
    tensor, head counts >= 1) and the first flash_mla_with_kvcache call with the returned
    object must agree with them (batch, s_q * h_q // h_k, h_k, h_q); other keywords are ignored,
    as FlashMLA ignores them all.
    """
    if len(args) > len(_OLD_NAMES):
        raise TypeError(f"get_mla_metadata: at most {len(_OLD_NAMES)} positional arguments ({', '.join(_OLD_NAMES)}), got {len(args)}")
    given = dict(zip(_OLD_NAMES, args))
    if "num_heads_per_head_k" in kwargs:  # FlashMLA's first name for it
        kwargs = dict(kwargs)
        kwargs["num_q_tokens_per_head_k"] = kwargs.pop("num_heads_per_head_k")
    for name in _OLD_NAMES:
        if name in kwargs:
            if name in given:
                raise TypeError(f"get_mla_metadata: got multiple values for argument '{name}'")
            given[name] = kwargs[name]
    expected = {}
    cache_seqlens = given.get("cache_seqlens")
    if cache_seqlens is not None:
        if not isinstance(cache_seqlens, torch.Tensor) or cache_seqlens.dim() != 1:
            raise ValueError(
                f"get_mla_metadata: cache_seqlens must be a 1-D int32 tensor [b], got {getattr(cache_seqlens, 'shape', type(cache_seqlens))}"
            )
        if cache_seqlens.dtype != torch.int32:
            raise TypeError(f"get_mla_metadata: cache_seqlens must be int32, got {cache_seqlens.dtype}")
        expected["b"] = cache_seqlens.shape[0]
    for name in ("num_q_tokens_per_head_k", "num_heads_k", "num_heads_q"):
        value = given.get(name)
        if value is None:
            continue
        try:
            if isinstance(value, bool):
                raise TypeError
            value = operator.index(value)
        except TypeError:
            raise TypeError(f"get_mla_metadata: {name} must be an int, got {type(value).__name__}") from None
        if value < 1:
            raise ValueError(f"get_mla_metadata: {name} (a number of heads) must be >= 1, got {value}")
        expected[name] = value
    return FlashMLASchedMeta(expected=expected or None), None


def _check_expected(meta: FlashMLASchedMeta, b: int, s_q: int, h_q: int, h_k: int) -> None:
    exp = meta.expected or {}
    actual = {"b": b, "num_q_tokens_per_head_k": s_q * h_q // h_k, "num_heads_k": h_k, "num_heads_q": h_q}
    what = {
        "b": "the batch (cache_seqlens.shape[0])",
        "num_q_tokens_per_head_k": "num_q_tokens_per_head_k (s_q * h_q // h_k)",
        "num_heads_k": "num_heads_k",
        "num_heads_q": "num_heads_q",
    }
    for key, value in exp.items():
        if value != actual[key]:
            raise ValueError(
                f"flash_mla_with_kvcache: get_mla_metadata was given {what[key]} = {value}, but this call has "
                f"{actual[key]} (q [b, s_q, h_q] = [{b}, {s_q}, {h_q}], h_k = {h_k})."
            )


_SPARSE_ARGS = ("indices", "topk_length", "extra_k_cache", "extra_indices_in_kvcache", "extra_topk_length")


def flash_mla_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    block_table: Optional[torch.Tensor],
    cache_seqlens: Optional[torch.Tensor],
    head_dim_v: int,
    tile_scheduler_metadata: Union[FlashMLASchedMeta, torch.Tensor, None],
    num_splits: Optional[torch.Tensor] = None,
    softmax_scale: Optional[float] = None,
    causal: bool = False,
    is_fp8_kvcache: bool = False,
    indices: Optional[torch.Tensor] = None,
    attn_sink: Optional[torch.Tensor] = None,
    extra_k_cache: Optional[torch.Tensor] = None,
    extra_indices_in_kvcache: Optional[torch.Tensor] = None,
    topk_length: Optional[torch.Tensor] = None,
    extra_topk_length: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """FlashMLA's decode: MQA over a paged cache with head_dim 576 and head_dim_v 512.

    See the module docstring for shapes. Returns (out [b, s_q, h_q, 512], lse [b, h_q, s_q]
    float32, +inf where a query sees no key).

    tile_scheduler_metadata: the FlashMLASchedMeta from get_mla_metadata (filled here on the
    first call, checked on later ones; num_splits must then be None), or, as FlashMLA's first
    API had it, a 2-D int32 tensor with num_splits a [b + 1] tensor (shape-checked only), or None.

    With indices: sparse decode (module docstring). Raises NotImplementedError for
    is_fp8_kvcache=True without indices; ValueError for sparse keywords without indices, for
    head_dim_v != 512, a k_cache with more than one KV head, a schedule that does not fit the
    call; every other check is mla_ext.decode's.
    """
    if indices is None:
        sparse_given = [name for name, v in zip(
            _SPARSE_ARGS[1:], (topk_length, extra_k_cache, extra_indices_in_kvcache, extra_topk_length)
        ) if v is not None]
        if sparse_given:
            raise ValueError(
                f"flash_mla_with_kvcache: {', '.join(sparse_given)} given without indices; they belong to sparse decode "
                "(pass indices [b, s_q, topk] int32), and must be None for dense decode."
            )
        if is_fp8_kvcache:
            raise NotImplementedError(
                "flash_mla_with_kvcache: is_fp8_kvcache=True with dense decode (no indices) is not implemented in "
                "mla_ext; the 656-byte fp8 cache is read by sparse decode (indices=...). For dense decode pass a "
                "bf16 / fp16 / fp32 k_cache with is_fp8_kvcache=False."
            )
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
    if is_fp8_kvcache:
        # vLLM's FlashMLA sparse backend passes the 656-byte cache as raw bytes (a uint8 view):
        # FlashMLA accepts that, so the drop-in does too.
        if isinstance(k_cache, torch.Tensor) and k_cache.dtype in (torch.uint8, torch.int8):
            k_cache = k_cache.view(torch.float8_e4m3fn)
        if isinstance(extra_k_cache, torch.Tensor) and extra_k_cache.dtype in (torch.uint8, torch.int8):
            extra_k_cache = extra_k_cache.view(torch.float8_e4m3fn)
    if indices is None and (block_table is None or cache_seqlens is None):
        raise ValueError("flash_mla_with_kvcache: block_table and cache_seqlens are required for dense decode")
    if indices is not None:
        _check_sparse_call(k_cache, is_fp8_kvcache, causal, extra_k_cache, extra_indices_in_kvcache)
    b, s_q, h_q = q.shape[0], q.shape[1], q.shape[2]
    if attn_sink is not None:
        if not isinstance(attn_sink, torch.Tensor) or attn_sink.shape != (h_q,) or attn_sink.dtype != torch.float32:
            raise ValueError(
                f"flash_mla_with_kvcache: attn_sink must be a float32 tensor [h_q] = [{h_q}], got "
                f"{getattr(attn_sink, 'dtype', type(attn_sink))} {tuple(getattr(attn_sink, 'shape', ()))}"
            )
        if attn_sink.device != q.device:
            raise ValueError(f"flash_mla_with_kvcache: attn_sink is on {attn_sink.device}, q on {q.device}")

    meta = tile_scheduler_metadata
    config = None
    if isinstance(meta, FlashMLASchedMeta):
        if num_splits is not None:
            raise ValueError(
                "flash_mla_with_kvcache: num_splits must be None with a FlashMLASchedMeta (pass the second value "
                f"get_mla_metadata returned), got {type(num_splits).__name__}"
            )
        config = FlashMLASchedMeta.Config(
            b, s_q, h_q, k_cache.shape[1], k_cache.shape[2] if k_cache.dim() == 4 else 1,
            bool(causal), bool(is_fp8_kvcache),
            indices.shape[-1] if indices is not None else None,
            extra_k_cache.shape[1] if extra_k_cache is not None else None,
            extra_indices_in_kvcache.shape[-1] if extra_indices_in_kvcache is not None else None,
            q.dtype, k_cache.dtype, q.device,
        )
        if meta.have_initialized:
            _check_config(meta.config, config)
        else:
            _check_expected(meta, b, s_q, h_q, config.h_k)
    elif meta is None or isinstance(meta, torch.Tensor):
        if meta is not None and meta.dim() != 2:
            raise ValueError(
                "flash_mla_with_kvcache: tile_scheduler_metadata must be the FlashMLASchedMeta from get_mla_metadata "
                f"(or FlashMLA's older 2-D int32 tensor), got a {meta.dim()}-D tensor"
            )
        if num_splits is not None and (not isinstance(num_splits, torch.Tensor) or num_splits.shape != (b + 1,)):
            raise ValueError(
                f"flash_mla_with_kvcache: num_splits must be None or FlashMLA's older [b + 1] = [{b + 1}] tensor, "
                f"got {getattr(num_splits, 'shape', type(num_splits))}"
            )
    else:
        raise TypeError(
            "flash_mla_with_kvcache: tile_scheduler_metadata must be the FlashMLASchedMeta from get_mla_metadata, "
            f"got {type(meta).__name__}"
        )

    if softmax_scale is None:
        softmax_scale = q.shape[-1] ** (-0.5)
    if indices is not None:
        out, lse = ops.sparse_decode(
            q, k_cache, indices, softmax_scale=softmax_scale, topk_length=topk_length, extra_cache=extra_k_cache,
            extra_indices=extra_indices_in_kvcache, extra_topk_length=extra_topk_length, attn_sink=attn_sink,
        )  # lse [b, s_q, h_q], +inf where a query has no valid slot
        lse = lse.transpose(1, 2).contiguous()
        _fill_schedule(meta, config, q, b, s_q, h_q)
        return out, lse
    out, lse = ops.decode(
        q, None, k_cache, block_table, cache_seqlens, softmax_scale=softmax_scale, causal=causal, return_lse=True
    )  # lse [b, s_q, h_q], -inf where a query sees no key
    if attn_sink is not None:
        # out *= 1 / (1 + exp(sink - lse)) = sigmoid(lse - sink). Queries with lse = -inf already
        # have out = 0; the where() keeps sink = -inf there from making NaN.
        factor = torch.sigmoid(lse - attn_sink)
        factor = torch.where(lse == float("-inf"), 0.0, factor)
        out = (out.float() * factor.unsqueeze(-1)).to(out.dtype)
    lse = lse.transpose(1, 2).contiguous()
    lse = lse.masked_fill(lse == float("-inf"), float("inf"))  # FlashMLA: +inf for a query that sees no key

    _fill_schedule(meta, config, q, b, s_q, h_q)
    return out, lse


def _fill_schedule(meta, config, q: torch.Tensor, b: int, s_q: int, h_q: int) -> None:
    if isinstance(meta, FlashMLASchedMeta) and not meta.have_initialized:
        meta.config = config
        parts = _num_parts(q.device, s_q * h_q // config.h_k, config.h_k)
        meta.tile_scheduler_metadata = torch.zeros(parts, TILE_SCHEDULER_METADATA_SIZE, dtype=torch.int32, device=q.device)
        meta.num_splits = torch.arange(b + 1, dtype=torch.int32, device=q.device)
        meta.have_initialized = True


def _check_sparse_call(k_cache, is_fp8_kvcache, causal, extra_k_cache, extra_indices_in_kvcache) -> None:
    """FlashMLA's rules for a sparse call (plus bf16 / fp16 / fp32 caches, which mla_ext adds)."""
    if causal:
        raise ValueError("flash_mla_with_kvcache: causal must be False with indices (sparse decode), as in FlashMLA")
    if (extra_k_cache is None) != (extra_indices_in_kvcache is None):
        raise ValueError("flash_mla_with_kvcache: extra_k_cache and extra_indices_in_kvcache go together")
    for name, cache in (("k_cache", k_cache), ("extra_k_cache", extra_k_cache)):
        if cache is None:
            continue
        fp8 = cache.dtype == torch.float8_e4m3fn
        if bool(is_fp8_kvcache) != fp8:
            raise ValueError(
                f"flash_mla_with_kvcache: is_fp8_kvcache={bool(is_fp8_kvcache)} but {name} is {cache.dtype}; the "
                "656-byte fp8 cache is float8_e4m3fn with is_fp8_kvcache=True, a bf16 / fp16 / fp32 cache "
                "(mla_ext's addition; FlashMLA's sparse decode is fp8 only) goes with is_fp8_kvcache=False"
            )


_FIELD_WHAT = {
    "b": "batch size (q.shape[0])",
    "s_q": "seq_len_q (q.shape[1])",
    "h_q": "num_heads_q (q.shape[2])",
    "page_block_size": "page_block_size (k_cache.shape[1])",
    "h_k": "num_heads_k (k_cache.shape[2])",
    "causal": "causal",
    "is_fp8_kvcache": "is_fp8_kvcache",
    "topk": "topk (indices.shape[-1])",
    "extra_page_block_size": "extra page_block_size (extra_k_cache.shape[1])",
    "extra_topk": "extra topk (extra_indices_in_kvcache.shape[-1])",
    "q_dtype": "q's dtype",
    "kv_dtype": "k_cache's dtype",
    "device": "device",
}


def _check_config(old: "FlashMLASchedMeta.Config", new: "FlashMLASchedMeta.Config") -> None:
    changed = [
        f"{_FIELD_WHAT[f.name]}: {getattr(old, f.name)} -> {getattr(new, f.name)}"
        for f in dataclasses.fields(old)
        if getattr(old, f.name) != getattr(new, f.name)
    ]
    if changed:
        raise ValueError(
            "flash_mla_with_kvcache: this call does not match the FlashMLASchedMeta filled by the first call ("
            + "; ".join(changed) + ")." + _INCONSISTENT
        )
