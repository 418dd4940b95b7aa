"""Loads the compiled library and registers fake (meta) kernels for torch.compile."""
import torch

from . import _C  # noqa: F401  (loading the library registers torch.ops.mla_ext.*)

LATENT_DIM = 512  # kv_lora_rank: the latent part of a cache row, also the output width
ROPE_DIM = 64  # qk_rope_head_dim
HEAD_DIM = LATENT_DIM + ROPE_DIM  # one cache row


@torch.library.register_fake("mla_ext::decode")
def _decode_fake(q_nope, q_pe, cache, block_table, cache_seqlens, softmax_scale, causal=True, scale=None):
    torch._check(q_nope.dim() == 4, lambda: "mla_ext.decode: q_nope must be 4-D")
    b, s_q, h = q_nope.shape[:3]
    out = q_nope.new_empty((b, s_q, h, LATENT_DIM))
    lse = q_nope.new_empty((b, s_q, h), dtype=torch.float32)
    return out, lse


@torch.library.register_fake("mla_ext::decode_out")
def _decode_out_fake(q_nope, q_pe, cache, block_table, cache_seqlens, softmax_scale, causal, scale, out, lse):
    return None


@torch.library.register_fake("mla_ext::append_kv")
def _append_kv_fake(kv_c, k_pe, cache, slot_mapping, scale=None):
    return None


@torch.library.register_fake("mla_ext::sparse_decode")
def _sparse_decode_fake(q, cache, indices, softmax_scale, topk_length=None, extra_cache=None, extra_indices=None,
                        extra_topk_length=None, attn_sink=None):
    torch._check(q.dim() == 4, lambda: "mla_ext.sparse_decode: q must be 4-D")
    b, s_q, h = q.shape[:3]
    out = q.new_empty((b, s_q, h, LATENT_DIM))
    lse = q.new_empty((b, s_q, h), dtype=torch.float32)
    return out, lse


@torch.library.register_fake("mla_ext::sparse_append_kv")
def _sparse_append_kv_fake(kv_c, k_pe, cache, slot_mapping):
    return None
