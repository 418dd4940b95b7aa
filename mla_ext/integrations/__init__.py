"""Integrations of mla_ext with model libraries.

    import mla_ext.integrations.transformers as mla_hf
    model = mla_hf.enable(model, block_size=64)     # HF DeepseekV3/V2ForCausalLM

The submodules import their library lazily: importing this package needs nothing extra.
"""

__all__ = ["transformers"]
