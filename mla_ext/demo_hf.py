"""Demo, part 2: a small random-weight DeepSeek-V3-shaped HF model generating with
transformers' own attention and with mla_ext (mla_ext.integrations.transformers).

Prints tokens/s of both, the KV-cache bytes (transformers' DynamicCache vs mla_ext's paged
latent cache, and what an expanded per-head K/V cache would take) and whether the greedy
tokens match. Needs `transformers` (pinned in requirements-dev.txt); builds everything
offline from a config, no download.
"""
from __future__ import annotations

import time
from typing import Optional

import torch

__all__ = ["run_hf_demo", "demo_config"]


def demo_config(num_layers: int = 4):
    """DeepSeek-V3's attention shapes (kv_lora 512, rope 64, nope/v 128, q_lora, YaRN) at
    toy width: hidden 1024, 16 heads, first layer dense then a small MoE."""
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        vocab_size=4096,
        hidden_size=1024,
        intermediate_size=2048,
        moe_intermediate_size=256,
        num_hidden_layers=num_layers,
        num_attention_heads=16,
        kv_lora_rank=512,
        q_lora_rank=384,
        qk_rope_head_dim=64,
        qk_nope_head_dim=128,
        v_head_dim=128,
        n_routed_experts=8,
        n_group=2,
        topk_group=1,
        num_experts_per_tok=2,
        n_shared_experts=1,
        first_k_dense_replace=1,
        max_position_embeddings=4096,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.05,
        rope_parameters={
            "rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 4096,
            "mscale": 1.0, "mscale_all_dim": 1.0, "beta_fast": 32, "beta_slow": 1,
        },
    )


def _mb(n: int) -> str:
    return f"{n / 2**20:8.2f} MiB"


def run_hf_demo(
    device: str = "cpu",
    *,
    prompt_lengths=(96, 61, 20, 128),
    new_tokens: int = 32,
    block_size: int = 64,
    dtype: Optional[torch.dtype] = None,
    seed: int = 0,
    num_threads: Optional[int] = 1,
) -> Optional[bool]:
    """Generate greedily with and without mla_ext and print the comparison. Returns
    whether the greedy tokens matched (None when transformers is missing).

    On the CPU the demo runs with `num_threads` intra-op threads (default 1, restored
    afterwards; None keeps torch's setting): the toy model's matmuls are too small to gain
    from threads, and on a busy machine OpenMP threads that oversubscribe the cores make
    each small matmul tens of times slower, which would swamp the comparison.
    """
    if device == "cpu" and num_threads is not None:
        saved = torch.get_num_threads()
        torch.set_num_threads(num_threads)
        try:
            return run_hf_demo(device, prompt_lengths=prompt_lengths, new_tokens=new_tokens, block_size=block_size,
                               dtype=dtype, seed=seed, num_threads=None)
        finally:
            torch.set_num_threads(saved)
    try:
        from transformers import DeepseekV3ForCausalLM
    except ImportError:  # pragma: no cover
        print("HF demo skipped: transformers is not installed (pip install -r requirements-dev.txt)")
        return
    import mla_ext.integrations.transformers as mla_hf

    dtype = dtype or torch.float32
    config = demo_config()
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(config).eval().to(device=device, dtype=dtype)
    g = torch.Generator().manual_seed(seed + 1)
    b, T = len(prompt_lengths), max(prompt_lengths)
    ids = torch.randint(3, config.vocab_size, (b, T), generator=g)
    mask = torch.ones_like(ids)
    for i, n in enumerate(prompt_lengths):  # left padding, as tokenizers do for generation
        ids[i, : T - n] = config.pad_token_id
        mask[i, : T - n] = 0
    ids, mask = ids.to(device), mask.to(device)

    def generate(n):
        return model.generate(
            ids, attention_mask=mask, max_new_tokens=n, min_new_tokens=n, do_sample=False,
            return_dict_in_generate=True, output_logits=True,
        )

    def timed():
        generate(2)  # warm-up
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = generate(new_tokens)
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return out, time.perf_counter() - t0

    h, L = config.num_attention_heads, config.num_hidden_layers
    print(
        f"HF transformers DeepseekV3ForCausalLM, random weights: {L} layers, hidden {config.hidden_size}, {h} heads, "
        f"kv_lora {config.kv_lora_rank}, nope/rope/v {config.qk_nope_head_dim}/{config.qk_rope_head_dim}/"
        f"{config.v_head_dim}, {str(dtype).replace('torch.', '')} on {device}"
        + (f" ({torch.get_num_threads()} thread{'s' if torch.get_num_threads() > 1 else ''})" if device == "cpu" else "")
    )
    print(f"batch of {b} left-padded prompts of {list(prompt_lengths)} tokens, {new_tokens} new tokens each, greedy")

    with torch.no_grad():
        mla_hf.disable(model)
        ref, t_ref = timed()
        mla_hf.enable(model, block_size=block_size)
        try:
            out, t_mla = timed()
            ran = mla_hf.op_counts(model)  # what went through mla_ext (warm-up included)
        finally:
            mla_hf.disable(model)

    tokens = b * new_tokens
    ref_cache = mla_hf.output_cache(ref)  # `.cache` from transformers 5.24 on, `.past_key_values` before
    hf_bytes = mla_hf.hf_cache_nbytes(ref_cache)
    cache = mla_hf.output_cache(out)
    paged_used, paged_pool = cache.nbytes(used_only=True), cache.nbytes(used_only=False)
    real_tokens = sum(cache.num_cached_tokens())
    elt = torch.empty((), dtype=dtype).element_size()
    expanded = real_tokens * L * h * (config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim) * elt
    print(f"  transformers attention: {tokens / t_ref:8.1f} tokens/s  ({t_ref:.2f} s)")
    print(f"  mla_ext (paged, bs={block_size}):  {tokens / t_mla:8.1f} tokens/s  ({t_mla:.2f} s)")
    print(f"    through mla_ext: {ran['steps']} forwards, {ran['layer_steps']} attention-layer calls (warm-up included)")
    print("  KV cache after generation:")
    print(
        f"    transformers DynamicCache     {_mb(hf_bytes)}  (latent rows for {b} x {ref_cache.get_seq_length()} "
        "positions, padding included)"
    )
    print(
        f"    mla_ext paged latent cache    {_mb(paged_used)}  ({real_tokens} real tokens in {cache.paged.num_used_blocks} "
        f"blocks of {block_size}; pool {_mb(paged_pool).strip()})"
    )
    print(f"    expanded per-head K/V         {_mb(expanded)}  (what an MHA-style cache of the same tokens would hold)")
    same = torch.equal(ref.sequences, out.sequences)
    diff = max(float((a.float() - c.float()).abs().max()) for a, c in zip(ref.logits, out.logits))
    verdict = "yes" if same else "NO"
    print(f"  greedy tokens match: {verdict} ({b} x {new_tokens} tokens; max |logit difference| {diff:.2e})")
    return same


if __name__ == "__main__":  # pragma: no cover
    run_hf_demo("cuda" if torch.cuda.is_available() else "cpu")
