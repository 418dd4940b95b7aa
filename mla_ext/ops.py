"""The public operations. Thin wrappers over torch.ops.mla_ext.*: the C++ layer checks
every argument (naming it) before anything is written; see docs/api.md."""
from typing import Optional, Tuple, Union

import torch

from . import _ops  # noqa: F401  (registers the ops)


def append_kv(
    kv_c: torch.Tensor,
    k_pe: torch.Tensor,
    cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    *,
    scale: Optional[torch.Tensor] = None,
) -> None:
    """Write new tokens into the paged latent cache, in place.

    kv_c          [T, 512]  normalised latent c_t (cache dtype; any float dtype for an fp8 cache)
    k_pe          [T, 64]   rotated rope key
    cache         [num_blocks, block_size, 576] or [num_blocks, block_size, 1, 576]
    slot_mapping  [T] int64 or int32; slot = block_id * block_size + offset; < 0 skips the token
    scale         float32 [1], only for a float8_e4m3fn cache (stores x / scale)
    """
    torch.ops.mla_ext.append_kv(kv_c, k_pe, cache, slot_mapping, scale)


def decode(
    q_nope: torch.Tensor,
    q_pe: Optional[torch.Tensor],
    cache: torch.Tensor,
    block_table: torch.Tensor,
    cache_seqlens: torch.Tensor,
    *,
    softmax_scale: float,
    causal: bool = True,
    return_lse: bool = False,
    out: Optional[torch.Tensor] = None,
    scale: Optional[torch.Tensor] = None,
) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
    """Absorbed MLA decode attention over the paged latent cache.

    q_nope         [b, s_q, h, 512]  absorbed query W_UK^T q_nope (or the packed [b, s_q, h, 576] with q_pe=None)
    q_pe           [b, s_q, h, 64]   rotated rope query, or None for a packed q_nope
    cache          [num_blocks, block_size, 576] (or [..., 1, 576]); dtype = q's (or float8_e4m3fn with scale)
    block_table    [b, max_blocks_per_seq] int32
    cache_seqlens  [b] int32, tokens in the cache per sequence (including the s_q new ones)
    softmax_scale  required: DeepSeek uses 1/sqrt(192) (times mscale^2 under YaRN)
    causal         bottom-right aligned mask for s_q > 1: query j sees keys t <= L - s_q + j
    out            optional [b, s_q, h, 512] output buffer in q's dtype

    Returns out [b, s_q, h, 512] in q's dtype, and lse [b, s_q, h] fp32 (natural log) when return_lse.
    """
    if out is None:
        out, lse = torch.ops.mla_ext.decode(
            q_nope, q_pe, cache, block_table, cache_seqlens, float(softmax_scale), causal, scale
        )
    else:
        lse = torch.empty(q_nope.shape[:3], dtype=torch.float32, device=q_nope.device)
        torch.ops.mla_ext.decode_out(
            q_nope, q_pe, cache, block_table, cache_seqlens, float(softmax_scale), causal, scale, out, lse
        )
    return (out, lse) if return_lse else out


def set_index_checks(enabled: bool) -> bool:
    """Turn the index-value checks on or off; returns the previous setting.

    On the CPU they always run. On CUDA they need a host sync, so they run only in eager
    mode outside graph capture, and only while enabled (default: on, or
    MLA_EXT_INDEX_CHECKS=0 in the environment to start off). Kernels never dereference an
    out-of-range index either way.
    """
    return torch.ops.mla_ext.set_index_checks(enabled)


def cpu_decode_kernel(cache_dtype: torch.dtype) -> str:
    """Name of the CPU decode kernel that runs for a cache of this dtype on this machine:
    "amx-bf16" (bf16 and fp8 caches on CPUs with AMX), "avx512bf16" (bf16, and fp8 where the
    CPU also has AVX512-VBMI), "avx512-fp32" (fp16 / fp32 on AVX-512-BF16 CPUs), "avx2-bf16"
    (bf16 and fp8 caches), "avx2" (fp16 / fp32) or "scalar". Chosen per call from the CPU's features; MLA_EXT_CPU_ISA=scalar|avx2|
    avx512bf16|amx caps it."""
    return torch.ops.mla_ext.cpu_decode_kernel(cache_dtype)


def sparse_decode(
    q: torch.Tensor,
    cache: torch.Tensor,
    indices: torch.Tensor,
    *,
    softmax_scale: float,
    topk_length: Optional[torch.Tensor] = None,
    extra_cache: Optional[torch.Tensor] = None,
    extra_indices: Optional[torch.Tensor] = None,
    extra_topk_length: Optional[torch.Tensor] = None,
    attn_sink: Optional[torch.Tensor] = None,
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Sparse (top-k) MLA decode, DeepSeek-V3.2's DSA; math in mla_ext/sparse.py (FlashMLA's reference).

    q                  [b, s_q, h_q, 576] bf16 / fp16 / fp32 (rope part last)
    cache              float8_e4m3fn [num_blocks, block_size, (1,) 656] (V3.2's 656-byte tokens,
                       mla_ext.sparse.quantize_cache) or bf16 / fp16 / fp32 [..., 576];
                       the block stride may be padded, the last dim must be contiguous
    indices            [b, s_q, topk] int32, token = block_id * block_size + offset, -1 = skip
    topk_length        optional [b] int32 in [0, topk]: slots at or past it are skipped
    extra_cache, extra_indices, extra_topk_length: an optional second source, same rules
    attn_sink          optional [h_q] float32: out *= 1 / (1 + exp(sink - lse)), lse unchanged

    Returns out [b, s_q, h_q, 512] in q's dtype and lse [b, s_q, h_q] float32 (natural log);
    a query with no valid slot gets out = 0 and lse = +inf (FlashMLA's convention).

    CPU and CUDA tensors (sm_80+; on CUDA both caches share one dtype and every cache's base
    and block / token strides are multiples of 16 bytes). The CUDA kernel is verified through
    the CPU emulation of its source (docs/cuda-emulation.md); its first GPU run is pending.
    """
    return torch.ops.mla_ext.sparse_decode(
        q, cache, indices, float(softmax_scale), topk_length, extra_cache, extra_indices, extra_topk_length, attn_sink
    )


def sparse_append_kv(kv_c: torch.Tensor, k_pe: torch.Tensor, cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    """Quantise new tokens into a 656-byte fp8 sparse cache (DeepSeek-V3.2's layout), in place.

    kv_c          [T, 512] float32 / bfloat16 / float16 (rows may be strided, last dim contiguous)
    k_pe          [T, 64]  same dtype; stored as bf16
    cache         float8_e4m3fn (or its uint8 view) [num_blocks, block_size, (1,) 656];
                  padded block strides are fine (mla_ext.sparse.quantize_cache(..., block_padding=p))
    slot_mapping  [T] int32 / int64, slot = block_id * block_size + offset; < 0 skips the token;
                  a slot past the cache raises (named); each slot at most once per call

    The bytes written equal mla_ext.sparse.quantize_tokens(cat(kv_c, k_pe)) bit for bit
    (per 128 latent values: scale = the smallest power of two >= max(amax / 448, 1e-4),
    codes = e4m3fn(x / scale); FlashMLA's quantiser, see mla_ext/sparse.py). CPU tensors.
    """
    torch.ops.mla_ext.sparse_append_kv(kv_c, k_pe, cache, slot_mapping)


def cpu_sparse_decode_kernel(q_dtype: torch.dtype, cache_dtype: torch.dtype,
                             extra_cache_dtype: Optional[torch.dtype] = None) -> str:
    """Name of the CPU sparse decode kernel a call with these dtypes runs on this machine:
    "amx" / "avx512bf16" (bf16 q over float8_e4m3fn 656-byte / bf16 caches, on CPUs with
    AMX-BF16 / AVX-512 BF16), "avx2" or "scalar". Chosen per call;
    MLA_EXT_CPU_ISA=scalar|avx2|avx512bf16|amx caps it."""
    return torch.ops.mla_ext.cpu_sparse_decode_kernel(q_dtype, cache_dtype, extra_cache_dtype)
