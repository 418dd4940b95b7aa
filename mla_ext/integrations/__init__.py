"""Integrations of mla_ext with model libraries.

    import mla_ext.integrations.transformers as mla_hf
    model = mla_hf.enable(model, block_size=64)     # HF DeepseekV3/V2ForCausalLM

    # vLLM: a plugin (entry point), nothing to call; MLA_EXT_VLLM_CPU=1 on CPU (see vllm.py)

The submodules import their library lazily: importing this package needs nothing extra.
"""

__all__ = ["transformers", "vllm"]
