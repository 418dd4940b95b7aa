"""mla_ext: DeepSeek Multi-head Latent Attention (MLA) kernels for PyTorch.

    mla_ext.append_kv(kv_c, k_pe, cache, slot_mapping)           # write the paged latent cache
    mla_ext.decode(q_nope, q_pe, cache, block_table, cache_seqlens,
                   softmax_scale=...)                             # absorbed decode attention
    mla_ext.sparse_decode(q, cache, indices, softmax_scale=...)   # DeepSeek-V3.2 top-k decode
    mla_ext.sparse_append_kv(kv_c, k_pe, cache, slot_mapping)    # its 656-byte fp8 cache

See README.md and docs/ for the layouts and the math.
"""
from . import absorb, flash_mla, integrations, reference, sparse
from ._ops import HEAD_DIM, LATENT_DIM, ROPE_DIM
from .absorb import absorb_query, expand_output, mla_softmax_scale, split_kv_b_proj
from .cache import OutOfBlocksError, PagedLatentCache, StepMetadata
from .fp8 import fp8_scale_for
from .memory import use_huge_pages
from .ops import append_kv, cpu_decode_kernel, decode, set_index_checks, sparse_decode
from .ops import cpu_sparse_decode_kernel, sparse_append_kv

__all__ = [
    "append_kv",
    "decode",
    "sparse_decode",
    "sparse_append_kv",
    "cpu_sparse_decode_kernel",
    "set_index_checks",
    "cpu_decode_kernel",
    "fp8_scale_for",
    "split_kv_b_proj",
    "absorb_query",
    "expand_output",
    "mla_softmax_scale",
    "PagedLatentCache",
    "use_huge_pages",
    "StepMetadata",
    "OutOfBlocksError",
    "absorb",
    "flash_mla",
    "integrations",
    "reference",
    "sparse",
    "LATENT_DIM",
    "ROPE_DIM",
    "HEAD_DIM",
]
__version__ = "0.1.0"
