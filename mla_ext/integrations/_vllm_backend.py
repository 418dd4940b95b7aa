"""The vLLM backend classes (imported through mla_ext.integrations.vllm, which checks the
vLLM version first). Written against vLLM 0.32's shared MLA classes: MLAAttention drives
prefill (MHA, vLLM's) and decode (absorbed MQA, ours) and calls two hooks per layer:

* `do_kv_cache_update(kv_c_normed [T, 512], k_pe [T, 1, 64], kv_cache [blocks, bs, 576],
  slot_mapping [T'] int64 (-1 = padding), kv_cache_dtype, k_scale)` -> mla_ext.append_kv;
* `forward_mqa((ql_nope [B, N, 512], q_pe [B, N, 64]), kv_cache, attn_metadata, layer)
  -> (o [B, N, 512], lse [B, N])` -> mla_ext.decode, where B = num_decodes * s_q (decodes
  come first in the batch, each with the same s_q: the builder declares UNIFORM).
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

__all__ = ["MlaExtBackend", "MlaExtImpl", "MlaExtMetadataBuilder", "counters"]

# Calls into mla_ext from this backend, per process (tests and benchmarks read them).
counters = {"decode": 0, "append_kv": 0}


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
        if mla_args.get("kv_lora_rank") != LATENT_DIM or mla_args.get("qk_rope_head_dim") != ROPE_DIM:
            raise NotImplementedError(
                f"mla_ext's vLLM backend needs kv_lora_rank={LATENT_DIM} and qk_rope_head_dim={ROPE_DIM} "
                f"(DeepSeek-V2/V3); got {mla_args.get('kv_lora_rank')} and {mla_args.get('qk_rope_head_dim')}"
            )
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
            softmax_scale=self.scale, causal=bool(attn_metadata.causal), return_lse=True, scale=scale,
        )
        counters["decode"] += 1
        return out.view(tokens, heads, LATENT_DIM), lse.view(tokens, heads)

    def do_kv_cache_update(
        self,
        kv_c_normed: torch.Tensor,
        k_pe: torch.Tensor,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        kv_cache_dtype: str,
        k_scale: torch.Tensor,
    ) -> None:
        if kv_cache.numel() == 0:
            return
        n = slot_mapping.numel()                 # kv_c_normed / k_pe may be padded past it
        cache, scale = _cache_and_scale(kv_cache, k_scale)
        ops.append_kv(kv_c_normed[:n], k_pe[:n].reshape(n, ROPE_DIM), cache, slot_mapping.reshape(n), scale=scale)
        counters["append_kv"] += 1


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
