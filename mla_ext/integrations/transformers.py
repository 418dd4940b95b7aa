"""Drop-in mla_ext attention for Hugging Face transformers' DeepSeek-V2 / V3 models.

    from transformers import DeepseekV3ForCausalLM
    import mla_ext.integrations.transformers as mla_hf

    model = mla_hf.enable(DeepseekV3ForCausalLM(...), block_size=64)
    out = model.generate(input_ids, attention_mask=mask, max_new_tokens=32)   # unchanged

Supported transformers releases: TRANSFORMERS_SPEC (>= 5.19.0, < 5.25; the `mla_ext[hf]`
extra). `enable` refuses any other release at once, naming the installed version and the
range. Inside the range, differences between releases are found by feature detection (e.g.
5.24 renamed the cache argument of every forward from `past_key_values` to `cache`).

What `enable` does:

* every DeepseekV3Attention / DeepseekV2Attention gets an mla_ext forward (its class is
  swapped for a subclass; parameters, state_dict and `isinstance` are unchanged);
* `generate` gets an `MlaExtCache` (a transformers `Cache`) instead of a DynamicCache: it
  owns a `PagedLatentCache` (one [num_blocks, block_size, 576] tensor per layer, one block
  table for all layers) and tracks the padded lengths transformers expects;
* a forward pre-hook on the decoder model turns each step's 2-D attention mask into paged
  metadata once per step (slot_mapping with -1 on padding, block_table, cache_seqlens).

Per layer and step, the latent row [c_t | k_pe_t] of every real token is written with
`mla_ext.append_kv` (padding never enters the cache). The first step (prefill) computes
attention with transformers' own attention function on the prompt (as the model would);
every later step absorbs W_UK into the query, calls `mla_ext.decode` over the paged cache,
then applies W_UV and o_proj. q_pe and k_pe are taken exactly as transformers computes them
(after its rope, whatever `rope_interleave` says), so the dot products match.

Never a silent fallback inside generate: a generate call on an enabled model whose steps do
not all run through mla_ext (a caller's own cache, `use_cache=False`, or a transformers
change that bypasses the hooks) raises. A plain `model(...)` forward without an MlaExtCache
runs transformers' own attention (as `prefill="standard"` does for the prompt anyway).
"""
from __future__ import annotations

import functools
import inspect
import os
import sys
import types
from typing import Any, Dict, List, Optional

import torch
import transformers as _transformers
from packaging.version import Version

from .transformers_range import TRANSFORMERS_BELOW, TRANSFORMERS_MIN, TRANSFORMERS_SPEC


class UnsupportedTransformersError(RuntimeError):
    """The installed transformers release is outside TRANSFORMERS_SPEC."""


def _version_message(version: str) -> str:
    return (
        f"mla_ext.integrations.transformers supports transformers {TRANSFORMERS_SPEC}, but transformers {version} is "
        f"installed; install a supported release: pip install 'mla_ext[hf]' (or 'transformers{TRANSFORMERS_SPEC}'). "
        "MLA_EXT_HF_ANY_VERSION=1 lets enable() try anyway (it still raises rather than fall back silently)."
    )


def transformers_supported(version: Optional[str] = None) -> bool:
    """Whether a transformers version (default: the installed one) is in TRANSFORMERS_SPEC."""
    base = Version(Version(version or _transformers.__version__).base_version)
    return Version(TRANSFORMERS_MIN) <= base < Version(TRANSFORMERS_BELOW)


def check_transformers_version(version: Optional[str] = None) -> None:
    """Raises UnsupportedTransformersError (installed version + supported range) outside
    TRANSFORMERS_SPEC, unless MLA_EXT_HF_ANY_VERSION=1."""
    version = version or _transformers.__version__
    if not transformers_supported(version) and os.environ.get("MLA_EXT_HF_ANY_VERSION") != "1":
        raise UnsupportedTransformersError(_version_message(version))


try:
    from transformers.cache_utils import Cache, CacheLayerMixin, DynamicCache
except ImportError as _err:  # releases far outside the range
    raise ImportError(_version_message(_transformers.__version__)) from _err

from .. import ops
from ..absorb import absorb_query, expand_output, split_kv_b_proj
from ..cache import PagedLatentCache, StepMetadata

__all__ = [
    "enable", "disable", "is_enabled", "MlaExtCache", "hf_cache_nbytes", "output_cache", "cache_kwarg", "op_counts",
    "check_transformers_version", "transformers_supported", "UnsupportedTransformersError", "MlaExtNotUsedError",
    "SUPPORTED_MODEL_TYPES", "TRANSFORMERS_SPEC",
]

SUPPORTED_MODEL_TYPES = ("deepseek_v3", "deepseek_v2")
_ATTENTION_CLASS_NAMES = ("DeepseekV3Attention", "DeepseekV2Attention")


# --------------------------------------------------------------------------- the cache


class _LatentLayer(CacheLayerMixin):
    """One layer's view of an MlaExtCache for transformers' bookkeeping: only the padded
    length (what transformers builds masks and positions from). The rows live in the
    owning MlaExtCache's PagedLatentCache."""

    is_compileable = False
    is_sliding = False
    is_croppable = True
    supports_early_init = False

    def __init__(self) -> None:
        super().__init__()
        self.length = 0
        self.is_initialized = True

    def lazy_initialization(self, key_states, value_states) -> None:  # nothing to allocate
        pass

    def update(self, key_states, value_states, *args, **kwargs):
        raise RuntimeError(
            "MlaExtCache holds mla_ext's paged latent cache and is written by the attention that "
            "mla_ext.integrations.transformers.enable() installs; this attention layer was not patched"
        )

    def get_mask_sizes(self, query_length: int):
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return -1

    def get_max_cache_shape(self) -> int:  # the older name of get_max_length
        return -1

    def reset(self) -> None:
        self.length = 0

    # Row-wise edits are done once for all layers by MlaExtCache (one block table).
    def crop(self, tokens_to_remove: int) -> None:
        pass

    def reorder_cache(self, beam_idx) -> None:
        pass

    def batch_repeat_interleave(self, repeats: int) -> None:
        pass

    def batch_select_indices(self, indices) -> None:
        pass

    def offload(self):
        pass

    def prefetch(self):
        pass


class MlaExtCache(Cache):
    """A transformers Cache backed by a paged latent cache (576 values per real token and
    layer, in blocks of `block_size` tokens).

    Args:
        config: the model config (num_hidden_layers is read).
        block_size: tokens per block (any >= 1).
        num_blocks: initial pool size; default: enough for `max_batch_size` sequences of
            `max_cache_len` tokens when both are given, else sized at the first step. The
            pool grows (reallocating) when a step needs more blocks.
        max_batch_size, max_cache_len: sizing hints (generate passes them).

    Batch row i of every forward is sequence `seq_ids[i]` of `paged` (created at the
    first step). `get_seq_length()` is the padded length transformers counts (left padding
    included); the paged cache holds only real tokens.
    """

    def __init__(
        self,
        config,
        block_size: int = 64,
        *,
        num_blocks: Optional[int] = None,
        max_batch_size: Optional[int] = None,
        max_cache_len: Optional[int] = None,
    ) -> None:
        text_config = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
        super().__init__(layers=[_LatentLayer() for _ in range(text_config.num_hidden_layers)])
        if int(block_size) < 1:
            raise ValueError(f"MlaExtCache: block_size must be >= 1, got {block_size}")
        self.block_size = int(block_size)
        self.num_blocks = num_blocks
        # Not `self.max_batch_size` / `self.max_cache_len`: transformers <= 5.19's Cache has
        # read-only properties of those names.
        self._hint_batch = max_batch_size
        self._hint_len = max_cache_len
        self.paged: Optional[PagedLatentCache] = None
        self.seq_ids: Optional[List[int]] = None
        self.step: Optional[_Step] = None
        self._real: Optional[torch.Tensor] = None  # [b, padded length] bool on the CPU: which positions are cached

    # ------------------------------------------------------------------ per-step bookkeeping

    def begin_step(self, attention_mask: Optional[torch.Tensor], batch: int, query_len: int, dtype, device) -> "_Step":
        """Called once per forward (by the pre-hook) before any layer runs: grows every
        sequence by its real new tokens and builds the step's metadata."""
        past = self.get_seq_length()
        if attention_mask is None:
            new = torch.ones(batch, query_len, dtype=torch.bool)
        else:
            if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
                raise NotImplementedError(
                    "mla_ext's transformers integration needs the 2-D [batch, past + new] attention_mask (custom 4-D masks "
                    "are not supported)"
                )
            if attention_mask.shape[0] != batch or attention_mask.shape[1] < query_len:
                raise ValueError(
                    f"attention_mask {tuple(attention_mask.shape)} does not fit a batch of {batch} x {query_len} new tokens"
                )
            new = attention_mask[:, -query_len:].to("cpu", torch.bool) if query_len else torch.zeros(batch, 0, dtype=torch.bool)
        if self.paged is None:
            self._allocate(batch, query_len, dtype, device)
        elif len(self.seq_ids) != batch:
            raise ValueError(f"MlaExtCache holds {len(self.seq_ids)} sequences but this step has a batch of {batch}")
        needed = self._blocks_needed(new.sum(1).tolist())
        if needed > self.paged.num_free_blocks:
            self.paged.grow_pool(max(needed - self.paged.num_free_blocks, self.paged.num_blocks // 2, 1))
        meta = self.paged.prepare(self.seq_ids, new)
        self._real = new if self._real is None else torch.cat([self._real, new], 1)
        self.step = _Step(meta=meta, prefill=(past == 0), query_len=query_len)
        return self.step

    def _blocks_needed(self, counts: List[int]) -> int:
        bs = self.paged.block_size
        total = 0
        for s, n in zip(self.seq_ids, counts):
            have = len(self.paged._blocks[s])
            total += max(0, -(-(self.paged.seq_len(s) + n) // bs) - have)
        return total

    def _allocate(self, batch: int, query_len: int, dtype, device) -> None:
        per_seq = self._hint_len if self._hint_len is not None else query_len + 128
        rows = max(batch, self._hint_batch or 0)
        num_blocks = self.num_blocks if self.num_blocks is not None else rows * -(-max(per_seq, 1) // self.block_size)
        self.paged = PagedLatentCache(num_blocks, self.block_size, num_layers=len(self.layers), dtype=dtype, device=device)
        self.seq_ids = [self.paged.add_sequence() for _ in range(batch)]

    # ------------------------------------------------------------------ introspection

    def nbytes(self, used_only: bool = True) -> int:
        """Bytes of the paged latent cache: the blocks in use (default) or the whole pool."""
        return 0 if self.paged is None else self.paged.nbytes(used_only=used_only)

    def num_cached_tokens(self) -> List[int]:
        """Real tokens cached per batch row (padding excluded)."""
        return [] if self.paged is None else [self.paged.seq_len(s) for s in self.seq_ids]

    # ------------------------------------------------------------------ transformers Cache API

    def reset(self) -> None:
        super().reset()
        if self.paged is not None:
            for s in self.seq_ids:
                self.paged.free(s)
            self.seq_ids = [self.paged.add_sequence() for _ in self.seq_ids]
        self._real = None
        self.step = None

    def crop(self, tokens_to_remove: int) -> None:
        """Drop the last -tokens_to_remove positions (assisted generation's rollback)."""
        if tokens_to_remove > 0:
            raise ValueError("MlaExtCache.crop takes a negative number of tokens to remove")
        n = -int(tokens_to_remove)
        if n == 0 or self.paged is None:
            return
        n = min(n, self._real.shape[1])
        drop = self._real[:, -n:].sum(1).tolist()
        for s, k in zip(self.seq_ids, drop):
            self.paged.truncate(s, self.paged.seq_len(s) - k)
        self._real = self._real[:, :-n]
        for layer in self.layers:
            layer.length = max(0, layer.length - n)

    def _remap(self, rows: List[int]) -> None:
        """New batch row i := a copy of old row rows[i] (beam search, batch expansion)."""
        if self.paged is None:
            return
        old = self.seq_ids
        need = sum(-(-self.paged.seq_len(old[r]) // self.paged.block_size) for r in rows)
        if need > self.paged.num_free_blocks:
            self.paged.grow_pool(need - self.paged.num_free_blocks)
        self.seq_ids = [self.paged.fork(old[r]) for r in rows]
        for s in old:
            self.paged.free(s)
        self._real = self._real[torch.tensor(rows, dtype=torch.long)]

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._remap([int(i) for i in beam_idx.tolist()])

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.paged is not None:
            self._remap([i for i in range(len(self.seq_ids)) for _ in range(repeats)])

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.paged is not None:
            self._remap([int(i) for i in torch.as_tensor(indices).reshape(-1).tolist()])

    @property
    def batch_size(self) -> int:
        return -1 if self.seq_ids is None else len(self.seq_ids)

    def __repr__(self) -> str:
        return f"MlaExtCache(layers={len(self.layers)}, block_size={self.block_size}, paged={self.paged!r})"


class _Step:
    __slots__ = ("meta", "prefill", "query_len", "layers_run")

    def __init__(self, meta: StepMetadata, prefill: bool, query_len: int) -> None:
        self.meta, self.prefill, self.query_len = meta, prefill, query_len
        self.layers_run = 0  # attention layers that ran this step through mla_ext


def hf_cache_nbytes(cache) -> int:
    """Bytes held by a transformers DynamicCache (keys and values of every layer)."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


# --------------------------------------------------------------------------- the attention


def _modeling_module(orig_cls):
    """The attention's modelling module: its own rope functions (so q_pe / k_pe match
    transformers bit for bit) and attention functions."""
    return sys.modules[orig_cls.__module__]


def _project(attn, hidden_states: torch.Tensor, position_embeddings):
    """transformers' MLA projections and rope, in its own layouts and op order.

    Returns q_nope [b,h,s,nope], q_rot [b,h,s,64], kv_c [b,1,s,512], k_rot [b,1,s,64].
    """
    b, s = hidden_states.shape[:-1]
    if attn.q_lora_rank is None:
        q = attn.q_proj(hidden_states)
    else:
        q = attn.q_b_proj(attn.q_a_layernorm(attn.q_a_proj(hidden_states)))
    q = q.view(b, s, -1, attn.qk_head_dim).transpose(1, 2)
    q_nope, q_rot = torch.split(q, [attn.qk_nope_head_dim, attn.qk_rope_head_dim], dim=-1)
    compressed_kv = attn.kv_a_proj_with_mqa(hidden_states)
    kv_c, k_rot = torch.split(compressed_kv, [attn.kv_lora_rank, attn.qk_rope_head_dim], dim=-1)
    kv_c = attn.kv_a_layernorm(kv_c).view(b, 1, s, attn.kv_lora_rank)
    k_rot = k_rot.view(b, 1, s, attn.qk_rope_head_dim)
    mod = attn._mla_ext_modeling
    if hasattr(mod, "apply_rotary_emb"):  # DeepSeek-V2: complex frequencies
        q_rot, k_rot = mod.apply_rotary_emb(q_rot, k_rot, position_embeddings.to(q_rot.device))
    else:  # DeepSeek-V3: (cos, sin), interleaved or not
        cos, sin = position_embeddings
        if getattr(attn.config, "rope_interleave", False):
            q_rot, k_rot = mod.apply_rotary_pos_emb_interleave(q_rot, k_rot, cos, sin)
        else:
            q_rot, k_rot = mod.apply_rotary_pos_emb(q_rot, k_rot, cos, sin)
    return q_nope, q_rot, kv_c, k_rot


class _MlaExtAttentionMixin:
    """Mixed into a copy of the model's attention class by enable()."""

    _mla_ext_orig_cls: type
    _mla_ext_modeling: types.ModuleType

    def mla_decode_step(
        self,
        hidden_states: torch.Tensor,
        position_embeddings,
        kv_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
        block_table: torch.Tensor,
        cache_seqlens: torch.Tensor,
    ) -> torch.Tensor:
        """One absorbed-MLA step of this layer over the paged cache: project, rope, write
        the new latent rows (append_kv), absorb W_UK into q, decode, apply W_UV and o_proj.

        hidden_states [b, s_q, hidden]; kv_cache this layer's [num_blocks, block_size, 576];
        slot_mapping [b*s_q] (-1 = padding); block_table / cache_seqlens as for decode
        (cache_seqlens counting the new tokens). Pure tensor code, no host sync: it can be
        torch.compile'd (fullgraph) and captured in a CUDA graph.
        """
        b, s = hidden_states.shape[:-1]
        q_nope, q_rot, kv_c, k_rot = _project(self, hidden_states, position_embeddings)
        ops.append_kv(kv_c.reshape(b * s, self.kv_lora_rank), k_rot.reshape(b * s, self.qk_rope_head_dim), kv_cache, slot_mapping)
        w = split_kv_b_proj(self.kv_b_proj.weight, self.num_heads, self.qk_nope_head_dim, self.v_head_dim)
        q_lat = absorb_query(q_nope.transpose(1, 2), w.w_uk_t)  # [b, s, h, 512]
        o_lat = ops.decode(
            q_lat, q_rot.transpose(1, 2), kv_cache, block_table, cache_seqlens, softmax_scale=self.scaling, causal=True
        )
        o = expand_output(o_lat, w.w_uv)  # [b, s, h, v]
        return self.o_proj(o.reshape(b, s, self.num_heads * self.v_head_dim))

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, **kwargs):
        cache = _find_cache(kwargs)
        if not isinstance(cache, MlaExtCache) or cache.step is None:
            return self._mla_ext_orig_cls.forward(
                self, hidden_states, position_embeddings=position_embeddings, attention_mask=attention_mask, **kwargs
            )
        kwargs = {k: v for k, v in kwargs.items() if k not in _CACHE_KWARGS}
        step = cache.step
        meta = step.meta
        if hidden_states.shape[1] != step.query_len:
            raise RuntimeError("mla_ext: hidden_states length does not match the step prepared by the model pre-hook")
        kv_cache = cache.paged.layer(self.layer_idx)
        cache.layers[self.layer_idx].length += step.query_len
        step.layers_run += 1
        if not (step.prefill and self._mla_ext_prefill == "standard"):
            out = self.mla_decode_step(
                hidden_states, position_embeddings, kv_cache, meta.slot_mapping, meta.block_table, meta.cache_seqlens
            )
            return out, None

        # Prefill: transformers' own attention over the prompt; the latent rows go to the paged cache.
        b, s = hidden_states.shape[:-1]
        q_nope, q_rot, kv_c, k_rot = _project(self, hidden_states, position_embeddings)
        ops.append_kv(kv_c.reshape(b * s, self.kv_lora_rank), k_rot.reshape(b * s, self.qk_rope_head_dim), kv_cache, meta.slot_mapping)
        query_states = torch.cat((q_nope, q_rot), dim=-1)
        key_states, value_states = self.expand_kv(kv_c, k_rot)
        interface = self._mla_ext_modeling.ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, self._mla_ext_modeling.eager_attention_forward
        )
        attn_output, attn_weights = interface(
            self,
            query_states,
            key_states,
            value_states,
            attention_mask,
            dropout=0.0 if not self.training else self.attention_dropout,
            scaling=self.scaling,
            **kwargs,
        )
        attn_output = attn_output.reshape(b, s, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


_PATCHED_CLASSES: Dict[type, type] = {}

# What a forward calls its cache argument: `cache` from transformers 5.24 on, `past_key_values`
# before (5.24 still accepts the old name, deprecated).
_CACHE_KWARGS = ("cache", "past_key_values")


class MlaExtNotUsedError(RuntimeError):
    """enable() cannot route the model's attention through mla_ext, or a generate call on an
    enabled model did not run through it (raised instead of falling back silently)."""


def _find_cache(kwargs):
    for name in _CACHE_KWARGS:
        if kwargs.get(name) is not None:
            return kwargs[name]
    return None


def _cache_param(fn, what: str) -> str:
    """The name under which `fn` takes the cache (feature detection, not a version check)."""
    params = inspect.signature(fn).parameters
    for name in _CACHE_KWARGS:
        if name in params:
            return name
    raise MlaExtNotUsedError(
        f"mla_ext: {what} takes no cache argument (none of {_CACHE_KWARGS} in {list(params)}) in transformers "
        f"{_transformers.__version__}; mla_ext cannot route its attention (supported: transformers {TRANSFORMERS_SPEC})"
    )


def cache_kwarg(model) -> str:
    """The keyword `model(...)` takes its cache under: "cache" (transformers >= 5.24) or
    "past_key_values" (before)."""
    return _cache_param(type(model).forward, type(model).__name__ + ".forward")


def output_cache(output):
    """The cache of a model / generate output (`.cache` from transformers 5.24 on,
    `.past_key_values` before)."""
    for name in _CACHE_KWARGS:
        cache = getattr(output, name, None)
        if cache is not None:
            return cache
    return None


# What the patched attention uses of transformers' (checked by enable(), before any change).
_ATTN_ATTRS = ("kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj", "q_lora_rank", "qk_head_dim",
               "qk_nope_head_dim", "qk_rope_head_dim", "kv_lora_rank", "v_head_dim", "num_heads", "scaling",
               "layer_idx", "expand_kv")
_MODULE_ATTRS = ("ALL_ATTENTION_FUNCTIONS", "eager_attention_forward")


def _check_attention(module) -> None:
    cls = type(module)
    mod = _modeling_module(cls)
    missing = [a for a in _ATTN_ATTRS if not hasattr(module, a)] + [f"{mod.__name__}.{a}" for a in _MODULE_ATTRS if not hasattr(mod, a)]
    if not (hasattr(mod, "apply_rotary_emb") or hasattr(mod, "apply_rotary_pos_emb")):
        missing.append(f"{mod.__name__}.apply_rotary_emb / apply_rotary_pos_emb")
    if missing:
        raise MlaExtNotUsedError(
            f"mla_ext: {cls.__name__} of transformers {_transformers.__version__} lacks {missing}; mla_ext cannot route "
            f"its attention (supported: transformers {TRANSFORMERS_SPEC})"
        )
    _cache_param(cls.forward, cls.__name__ + ".forward")


def _patched_class(orig_cls: type) -> type:
    if orig_cls not in _PATCHED_CLASSES:
        _PATCHED_CLASSES[orig_cls] = type(
            "MlaExt" + orig_cls.__name__,
            (_MlaExtAttentionMixin, orig_cls),
            {"_mla_ext_orig_cls": orig_cls, "_mla_ext_modeling": _modeling_module(orig_cls), "__module__": __name__},
        )
    return _PATCHED_CLASSES[orig_cls]


# --------------------------------------------------------------------------- enable / disable


def _pre_hook(module, args, kwargs):
    state = module._mla_ext_state
    cache = _find_cache(kwargs)
    if not isinstance(cache, MlaExtCache):
        if state["generating"]:
            raise MlaExtNotUsedError(
                f"mla_ext is enabled on this model but generate() called its decoder with "
                f"{type(cache).__name__ if cache is not None else 'no cache'} instead of an MlaExtCache, so its "
                "attention would not run through mla_ext. Do not pass your own cache, cache_implementation or "
                "use_cache=False to generate() on an enabled model (or mla_hf.disable(model) first)."
            )
        return None
    x = kwargs.get("input_ids")
    if x is None and args:
        x = args[0]
    if x is None:
        x = kwargs.get("inputs_embeds")
    if x is None:
        return None
    batch, query_len = x.shape[0], x.shape[1]
    param = state["param"]
    cache.begin_step(kwargs.get("attention_mask"), batch, query_len, param.dtype, param.device)
    state["counts"]["steps"] += 1
    return None


def _post_hook(module, args, kwargs, output):
    cache = _find_cache(kwargs)
    if not isinstance(cache, MlaExtCache) or cache.step is None:
        return None
    step, cache.step = cache.step, None
    state = module._mla_ext_state
    state["counts"]["layer_steps"] += step.layers_run
    if output is not None and step.layers_run != len(state["patched"]):
        raise MlaExtNotUsedError(
            f"mla_ext: only {step.layers_run} of {len(state['patched'])} attention layers ran through mla_ext in this "
            f"forward (transformers {_transformers.__version__} called them without the MlaExtCache)"
        )
    return None


def _decoder(model):
    base = getattr(model, "model", None)
    return base if isinstance(base, torch.nn.Module) and hasattr(base, "layers") else model


def is_enabled(model) -> bool:
    return getattr(model, "_mla_ext_state", None) is not None


def op_counts(model) -> Dict[str, int]:
    """What ran through mla_ext since enable(): "steps" (decoder forwards with an
    MlaExtCache) and "layer_steps" (attention layer calls over the paged cache)."""
    state = getattr(model, "_mla_ext_state", None)
    return {} if state is None else dict(state["counts"])


def enable(model, block_size: int = 64, *, num_blocks: Optional[int] = None, prefill: str = "standard"):
    """Make every MLA attention of an HF DeepSeek-V3 / V2 model run decode steps through mla_ext.

    Args:
        model: a DeepseekV3ForCausalLM / DeepseekV2ForCausalLM (or their base models).
        block_size: tokens per block of the paged latent cache (any >= 1).
        num_blocks: pool size of the caches generate creates (default: sized from the
            batch and max length generate asks for).
        prefill: "standard" (default) computes the first step's attention with the model's
            own attention function; "mla" sends it through mla_ext.decode too (causal).

    Returns the same model object, modified in place. `model.generate(...)` is unchanged for
    the caller; pass `MlaExtCache(model.config, block_size)` as the cache argument of a plain
    forward (`cache_kwarg(model)`) to use the paged cache there. `disable(model)` undoes everything.

    Raises UnsupportedTransformersError outside TRANSFORMERS_SPEC and MlaExtNotUsedError when
    the model's attention cannot be routed through mla_ext.
    """
    check_transformers_version()
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"mla_ext.integrations.transformers.enable: model_type {model_type!r} is not one of {SUPPORTED_MODEL_TYPES}")
    if config.kv_lora_rank != 512 or config.qk_rope_head_dim != 64:
        raise ValueError(
            f"mla_ext kernels need kv_lora_rank = 512 and qk_rope_head_dim = 64, the model has "
            f"{config.kv_lora_rank} and {config.qk_rope_head_dim}"
        )
    if prefill not in ("standard", "mla"):
        raise ValueError(f"prefill must be 'standard' or 'mla', got {prefill!r}")
    if int(block_size) < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if is_enabled(model):
        disable(model)

    # Feature detection first, so that nothing is modified when something is missing.
    targets = [m for m in model.modules() if type(m).__name__ in _ATTENTION_CLASS_NAMES and not isinstance(m, _MlaExtAttentionMixin)]
    if not targets:
        raise ValueError("enable: found no DeepseekV3Attention / DeepseekV2Attention module in the model")
    for m in targets:
        _check_attention(m)
    classes = {type(m): _patched_class(type(m)) for m in targets}
    decoder = _decoder(model)
    _cache_param(type(decoder).forward, type(decoder).__name__ + ".forward")
    orig_prepare = getattr(model, "_prepare_cache_for_generation", None)
    prepare_params = inspect.signature(orig_prepare).parameters if orig_prepare is not None else {}
    if hasattr(model, "generate") and not {"generation_config", "model_kwargs"} <= set(prepare_params):
        raise MlaExtNotUsedError(
            f"mla_ext: transformers {_transformers.__version__} has no GenerationMixin._prepare_cache_for_generation"
            f"(generation_config, model_kwargs, ...), where mla_ext installs its cache (supported: {TRANSFORMERS_SPEC})"
        )

    patched = []
    for module in targets:
        cls = type(module)
        module.__class__ = classes[cls]
        module._mla_ext_prefill = prefill
        patched.append((module, cls))

    state: Dict[str, Any] = {
        "patched": patched, "decoder": decoder, "block_size": int(block_size), "generating": 0,
        "param": next(patched[0][0].parameters()), "counts": {"steps": 0, "layer_steps": 0},
    }
    decoder._mla_ext_state = state
    state["handles"] = [
        decoder.register_forward_pre_hook(_pre_hook, with_kwargs=True),
        decoder.register_forward_hook(_post_hook, with_kwargs=True, always_call=True),
    ]
    if hasattr(model, "generate"):
        prepare_sig = inspect.signature(orig_prepare)

        def _prepare_cache_for_generation(self, *args, **kwargs):
            arguments = prepare_sig.bind(*args, **kwargs).arguments
            model_kwargs, generation_config = arguments["model_kwargs"], arguments["generation_config"]
            user_cache = _find_cache(model_kwargs)
            result = orig_prepare(*args, **kwargs)
            names = [k for k in _CACHE_KWARGS if type(model_kwargs.get(k)) is DynamicCache]
            if user_cache is None and names:
                rows = max(generation_config.num_beams or 1, generation_config.num_return_sequences or 1)
                rows *= arguments.get("batch_size") or 1
                model_kwargs[names[0]] = MlaExtCache(
                    self.config, block_size, num_blocks=num_blocks, max_batch_size=rows,
                    max_cache_len=arguments.get("max_cache_length"),
                )
            return result

        orig_generate = model.generate

        @functools.wraps(orig_generate)
        def generate(*args, **kwargs):
            steps = state["counts"]["steps"]
            state["generating"] += 1
            try:
                out = orig_generate(*args, **kwargs)
            finally:
                state["generating"] -= 1
            if state["counts"]["steps"] == steps:
                raise MlaExtNotUsedError(
                    f"mla_ext: generate() ran no step through mla_ext (transformers {_transformers.__version__}); "
                    f"supported: transformers {TRANSFORMERS_SPEC}"
                )
            return out

        model._prepare_cache_for_generation = types.MethodType(_prepare_cache_for_generation, model)
        model.generate = generate
        state["patched_generate"] = True
    model._mla_ext_state = state
    return model


def disable(model):
    """Undo enable(): original attention classes, no hooks, transformers' own caches."""
    state = getattr(model, "_mla_ext_state", None)
    if state is None:
        return model
    for module, cls in state["patched"]:
        module.__class__ = cls
        module.__dict__.pop("_mla_ext_prefill", None)
    for h in state["handles"]:
        h.remove()
    state["decoder"].__dict__.pop("_mla_ext_state", None)
    if state.get("patched_generate"):
        model.__dict__.pop("_prepare_cache_for_generation", None)
        model.__dict__.pop("generate", None)
    model._mla_ext_state = None
    return model
