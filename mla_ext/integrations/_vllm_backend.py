"""The vLLM backend classes (imported through mla_ext.integrations.vllm, which checks the
vLLM version first). Written against vLLM 0.32's shared MLA classes: MLAAttention drives
prefill (MHA, vLLM's) and decode (absorbed MQA, ours) and calls two hooks per layer:

* `do_kv_cache_update(kv_c_normed [T, 512], k_pe [T, 1, 64], kv_cache [blocks, bs, 576],
  slot_mapping [T'] int64 (-1 = padding), kv_cache_dtype, k_scale)` -> mla_ext.append_kv;
* `forward_mqa((ql_nope [B, N, 512], q_pe [B, N, 64]), kv_cache, attn_metadata, layer)
  -> (o [B, N, 512], lse [B, N])` -> mla_ext.decode, where B = num_decodes * s_q (decodes
  come first in the batch, each with the same s_q: the builder declares UNIFORM).

Two roles, one per vLLM CPU backend it may stand in for (MLA_EXT_VLLM_CPU=1):

* MlaExtBackend (CPU_MLA's place, and CUSTOM on CUDA): vLLM's generic absorption
  (torch.bmm with layer.W_UK_T / layer.W_UV) and CPU_MLA's SDPA prefill. vLLM leaves those
  two weights as strided views of kv_b_proj, which torch.bmm copies into a contiguous
  buffer on every call (~16 MB per weight per layer per step at 128 heads); forward_mqa
  replaces them once by contiguous copies of the same values (the extra memory is one
  kv_b_proj per layer; vLLM's in-place weight reload still works: it copies into them).
* MlaExtAmxBackend (AMX_MLA's place, vLLM's default on AMX CPUs): everything but decode and
  the cache write stays AMX_MLA's (its AMX prefill kernel, its VNNI-packed absorption
  weights, its metadata), so a comparison with stock AMX_MLA isolates the attention kernel.
  bf16 cache only, as AMX_MLA itself (its prefill reads the cache).
"""
from __future__ import annotations

from typing import ClassVar

import torch
from vllm.model_executor.layers.attention.mla_attention import (
    MLACommonBackend,
    MLACommonImpl,
    MLACommonMetadata,
    MLACommonMetadataBuilder,
    QueryLenSupport,
)
from vllm.platforms import current_platform
from vllm.v1.attention.backend import AttentionCGSupport, AttentionLayer, MultipleOf

from .. import ops
from .._ops import HEAD_DIM, LATENT_DIM, ROPE_DIM

__all__ = ["MlaExtBackend", "MlaExtImpl", "MlaExtMetadataBuilder", "MlaExtAmxBackend", "MlaExtAmxImpl",
           "counters"]

# Calls into mla_ext from this backend, per process (tests and benchmarks read them);
# "contiguous_weights": layers whose absorption weights forward_mqa made contiguous.
counters = {"decode": 0, "append_kv": 0, "contiguous_weights": 0}


class MlaExtMetadataBuilder(MLACommonMetadataBuilder[MLACommonMetadata]):
    # mla_ext.decode takes [b, s_q, h, .] queries: every decode request in a batch has the
    # same query length (MTP / speculative verification), causal or not.
    query_len_support: ClassVar[QueryLenSupport] = QueryLenSupport.UNIFORM
    supports_non_causal_multi_token_decode: ClassVar[bool] = True
    # No host sync in decode or append (index checks off under vLLM on CUDA): graphable.
    _cudagraph_support: ClassVar[AttentionCGSupport] = AttentionCGSupport.UNIFORM_BATCH


class MlaExtBackend(MLACommonBackend):
    supported_dtypes: ClassVar[list[torch.dtype]] = [torch.float16, torch.bfloat16, torch.float32]
    supported_kv_cache_dtypes: ClassVar[list] = ["auto", "float16", "bfloat16", "fp8", "fp8_e4m3"]

    @staticmethod
    def get_name() -> str:
        # The enum member it is selected as: CPU_MLA's place on CPU (opt-in), CUSTOM elsewhere.
        return "CPU_MLA" if current_platform.is_cpu() else "CUSTOM"

    @staticmethod
    def get_impl_cls() -> type["MlaExtImpl"]:
        return MlaExtImpl

    @staticmethod
    def get_builder_cls() -> type[MlaExtMetadataBuilder]:
        return MlaExtMetadataBuilder

    @classmethod
    def get_supported_head_sizes(cls) -> list[int]:
        return [HEAD_DIM]

    @staticmethod
    def get_supported_kernel_block_sizes(kv_cache_spec=None) -> list[int | MultipleOf]:
        return [MultipleOf(1)]

    @classmethod
    def supports_block_size(cls, block_size: int | None) -> bool:
        return block_size is None or block_size >= 1


class MlaExtImpl(MLACommonImpl[MLACommonMetadata]):
    can_return_lse_for_decode: bool = True

    def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                 kv_cache_dtype, logits_soft_cap, attn_type, kv_sharing_target_layer_name, **mla_args):
        _check_mla_shape(mla_args)
        if kv_cache_dtype not in MlaExtBackend.supported_kv_cache_dtypes:
            raise NotImplementedError(
                f"mla_ext's vLLM backend supports kv_cache_dtype in {MlaExtBackend.supported_kv_cache_dtypes}; "
                f"got {kv_cache_dtype!r}"
            )
        args = (num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window, kv_cache_dtype,
                logits_soft_cap, attn_type, kv_sharing_target_layer_name)
        if current_platform.is_cpu():
            # vLLM's CPU MLA impl sets up the CPU prefill (SDPA) and skips the GPU prefill
            # kernel selection of MLACommonImpl.__init__, which raises on CPU.
            from vllm.v1.attention.backends.mla.cpu_mla import CPUMLAImpl

            CPUMLAImpl.__init__(self, *args, **mla_args)
        else:
            MLACommonImpl.__init__(self, *args, **mla_args)
            # The index-value checks sync the host on CUDA; vLLM builds its own indices.
            ops.set_index_checks(False)
        # Separate bf16/fp16 query parts even with an fp8 cache (mla_ext scales inside).
        self.supports_quant_query_input = False

    def forward_mqa(
        self,
        q: torch.Tensor | tuple[torch.Tensor, torch.Tensor],
        kv_c_and_k_pe_cache: torch.Tensor,
        attn_metadata: MLACommonMetadata,
        layer: AttentionLayer,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        _contiguous_absorb_weights(layer)
        return _decode(self, q, kv_c_and_k_pe_cache, attn_metadata, layer)

    def do_kv_cache_update(
        self,
        kv_c_normed: torch.Tensor,
        k_pe: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        kv_cache_dtype: str,
        k_scale: torch.Tensor,
    ) -> None:
        _append(kv_c_normed, k_pe, kv_cache, slot_mapping, k_scale)


def _check_mla_shape(mla_args: dict) -> None:
    if mla_args.get("kv_lora_rank") != LATENT_DIM or mla_args.get("qk_rope_head_dim") != ROPE_DIM:
        raise NotImplementedError(
            f"mla_ext's vLLM backend needs kv_lora_rank={LATENT_DIM} and qk_rope_head_dim={ROPE_DIM} "
            f"(DeepSeek-V2/V3); got {mla_args.get('kv_lora_rank')} and {mla_args.get('qk_rope_head_dim')}"
        )


def _contiguous_absorb_weights(layer) -> None:
    """vLLM's MLAAttention keeps W_UK_T [N, P, L] and W_UV [N, L, V] as permuted views of
    kv_b_proj, and torch.bmm on CPU copies such a batch operand into a contiguous buffer
    on every call. Replace each, once, by a contiguous copy of the same values; the layer's
    next bmm (from the next step on) reads it in place."""
    for name in ("W_UK_T", "W_UV"):
        w = getattr(layer, name, None)
        if isinstance(w, torch.Tensor) and w.device.type == "cpu" and not w.is_contiguous():
            setattr(layer, name, torch.nn.Parameter(w.contiguous(), requires_grad=False))
            counters["contiguous_weights"] += 1


def _decode(impl, q, kv_c_and_k_pe_cache: torch.Tensor, attn_metadata: MLACommonMetadata, layer):
    """forward_mqa of both roles: q (ql_nope [B, N, 512], q_pe [B, N, 64]) or packed [B, N, 576]
    -> (o [B, N, 512], lse [B, N]) through mla_ext.decode."""
    assert attn_metadata.decode is not None
    if isinstance(q, tuple):
        q_nope, q_pe = q                     # [B, N, 512] (contiguous), [B, N, 64] (strided rows)
    else:
        q_nope, q_pe = q, None               # packed [B, N, 576]
    tokens, heads = q_nope.shape[0], q_nope.shape[1]
    block_table = attn_metadata.decode.block_table
    seq_lens = attn_metadata.decode.seq_lens
    batch = seq_lens.shape[0]
    if batch == 0 or tokens % batch != 0:
        raise RuntimeError(
            f"mla_ext decode expects the same query length for every decode request; got "
            f"{tokens} query tokens for {batch} requests"
        )
    s_q = tokens // batch
    q_nope = q_nope.view(batch, s_q, heads, q_nope.shape[-1])
    if q_pe is not None:
        q_pe = q_pe.view(batch, s_q, heads, q_pe.shape[-1])
    cache, scale = _cache_and_scale(kv_c_and_k_pe_cache, layer._k_scale)
    out, lse = ops.decode(
        q_nope, q_pe, cache,
        block_table if block_table.dtype == torch.int32 else block_table.to(torch.int32),
        seq_lens if seq_lens.dtype == torch.int32 else seq_lens.to(torch.int32),
        softmax_scale=impl.scale, causal=bool(attn_metadata.causal), return_lse=True, scale=scale,
    )
    counters["decode"] += 1
    return out.view(tokens, heads, LATENT_DIM), lse.view(tokens, heads)


def _append(kv_c_normed: torch.Tensor, k_pe: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor,
            k_scale: torch.Tensor | None) -> None:
    """do_kv_cache_update of both roles: kv_c_normed [T, 512], k_pe [T, 1, 64] -> the cache
    rows named by slot_mapping [T'] (T' <= T; -1 = padding) through mla_ext.append_kv."""
    if kv_cache.numel() == 0:
        return
    n = slot_mapping.numel()                 # kv_c_normed / k_pe may be padded past it
    cache, scale = _cache_and_scale(kv_cache, k_scale)
    ops.append_kv(kv_c_normed[:n], k_pe[:n].reshape(n, ROPE_DIM), cache, slot_mapping.reshape(n), scale=scale)
    counters["append_kv"] += 1


try:  # AMX_MLA exists in vLLM's CPU builds of 0.32 (and on every platform's source tree)
    from vllm.v1.attention.backends.mla.amx_mla import AMXMLABackend, AMXMLAImpl
except ImportError:  # pragma: no cover - a vLLM without it: only the CPU_MLA / CUSTOM role
    AMXMLABackend = AMXMLAImpl = None

if AMXMLABackend is not None:

    class MlaExtAmxImpl(AMXMLAImpl):
        """AMX_MLA with mla_ext's decode and cache write; its prefill, its packed absorption
        weights (bmm_cpu) and its metadata stay AMX_MLA's."""

        can_return_lse_for_decode: bool = True

        def __init__(self, num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                     kv_cache_dtype, logits_soft_cap, attn_type, kv_sharing_target_layer_name, **mla_args):
            _check_mla_shape(mla_args)
            if kv_cache_dtype != "auto":
                # AMX_MLA's prefill (cpu_mla_extend) reads the cache as bf16.
                raise NotImplementedError(
                    f"mla_ext in AMX_MLA's place keeps AMX_MLA's prefill, which reads a bf16 cache only; got "
                    f"kv_cache_dtype={kv_cache_dtype!r}. For an fp8 cache select attention_backend='CPU_MLA' "
                    f"(with MLA_EXT_VLLM_CPU=1 mla_ext serves it, decode and prefill)."
                )
            super().__init__(num_heads, head_size, scale, num_kv_heads, alibi_slopes, sliding_window,
                             kv_cache_dtype, logits_soft_cap, attn_type, kv_sharing_target_layer_name, **mla_args)
            self.supports_quant_query_input = False

        def forward_mqa(self, q, kv_c_and_k_pe_cache, attn_metadata, layer):
            return _decode(self, q, kv_c_and_k_pe_cache, attn_metadata, layer)

        def do_kv_cache_update(self, kv_c_normed, k_pe, kv_cache, slot_mapping, kv_cache_dtype, k_scale) -> None:
            _append(kv_c_normed, k_pe, kv_cache, slot_mapping, k_scale)

    class MlaExtAmxBackend(AMXMLABackend):
        @staticmethod
        def get_name() -> str:
            return "AMX_MLA"

        @staticmethod
        def get_impl_cls() -> type["MlaExtAmxImpl"]:
            return MlaExtAmxImpl
else:  # pragma: no cover
    MlaExtAmxBackend = MlaExtAmxImpl = None


def _cache_and_scale(kv_cache: torch.Tensor, k_scale: torch.Tensor | None):
    """vLLM hands an fp8 cache as uint8 (cache writes) or float8_e4m3fn (decode); mla_ext
    wants float8_e4m3fn and the per-tensor scale as float32 [1] (x stored as x / scale)."""
    if kv_cache.dtype in (torch.uint8, torch.float8_e4m3fn):
        cache = kv_cache.view(torch.float8_e4m3fn)
        if k_scale is None:
            scale = torch.ones(1, dtype=torch.float32, device=kv_cache.device)
        else:
            scale = k_scale.reshape(1).to(torch.float32)
        return cache, scale
    return kv_cache, None
