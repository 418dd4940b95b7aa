"""mla_ext as a vLLM MLA attention backend (an out-of-tree plugin).

Install mla_ext into the same environment as vLLM; its `vllm.general_plugins` entry point
(`mla_ext = mla_ext.integrations.vllm:register`, in setup.py) runs `register()` in every
vLLM process. Then:

* CUDA: `LLM(..., attention_backend="CUSTOM")` selects mla_ext.
* CPU: vLLM's CPU platform only accepts CPU_MLA / AMX_MLA for MLA models, so mla_ext takes
  their places, and only when asked: `MLA_EXT_VLLM_CPU=1` in the environment. Then
  `attention_backend="CPU_MLA"` runs MlaExtBackend (decode and cache writes ours, the rest
  CPU_MLA's), and AMX_MLA (vLLM's default on AMX CPUs, or asked for by name) runs
  MlaExtAmxBackend (decode and cache writes ours, AMX_MLA's prefill and absorption).
  Without the variable, stock vLLM runs exactly as before.

What runs where: decode (the absorbed MQA over the paged latent cache, s_q >= 1, causal or
not, with the LSE) is `mla_ext.decode`; cache writes are `mla_ext.append_kv` (bf16 / fp16 /
fp32 caches and kv_cache_dtype="fp8", any block size); prefill stays vLLM's (the backend
inherits vLLM's shared MLA prefill path: SDPA on CPU, vLLM's prefill kernels on CUDA).

Supported vLLM releases: SUPPORTED_VLLM_VERSIONS (checked with the classes built, so a
different vLLM fails with a message naming them rather than somewhere inside vLLM).
The backend classes live in `mla_ext.integrations._vllm_backend` and are re-exported here
lazily: importing this module (what the plugin does in every vLLM process) imports nothing
from vLLM's internals.
"""
from __future__ import annotations

import logging
import os

__all__ = [
    "register",
    "check_vllm_version",
    "SUPPORTED_VLLM_VERSIONS",
    "CPU_OPT_IN_ENV",
    "BACKEND_PATH",
    "AMX_BACKEND_PATH",
    "MlaExtBackend",
    "MlaExtImpl",
    "MlaExtMetadataBuilder",
    "MlaExtAmxBackend",
    "MlaExtAmxImpl",
]

# Releases whose MLA interfaces (forward_mqa / do_kv_cache_update / MLACommon* in
# vllm.model_executor.layers.attention.mla_attention) this backend was written and tested
# against, as "major.minor" prefixes.
SUPPORTED_VLLM_VERSIONS = ("0.32",)
CPU_OPT_IN_ENV = "MLA_EXT_VLLM_CPU"
BACKEND_PATH = "mla_ext.integrations.vllm.MlaExtBackend"
AMX_BACKEND_PATH = "mla_ext.integrations.vllm.MlaExtAmxBackend"

_log = logging.getLogger(__name__)
_LAZY = ("MlaExtBackend", "MlaExtImpl", "MlaExtMetadataBuilder", "MlaExtAmxBackend", "MlaExtAmxImpl")


def _vllm_version() -> str:
    import vllm

    return getattr(vllm, "__version__", "unknown")


def check_vllm_version(version: str | None = None) -> str:
    """Raise RuntimeError unless `version` (default: the installed vLLM's) is supported."""
    version = _vllm_version() if version is None else version
    release = version.split("+")[0]
    parts = release.split(".")
    if ".".join(parts[:2]) not in SUPPORTED_VLLM_VERSIONS:
        raise RuntimeError(
            f"mla_ext's vLLM backend supports vLLM {', '.join(v + '.x' for v in SUPPORTED_VLLM_VERSIONS)}; "
            f"this is vLLM {version}. Use a supported vLLM release, or unset {CPU_OPT_IN_ENV} and do not "
            f"select attention_backend='CUSTOM' to run vLLM's own MLA backend."
        )
    return version


def cpu_opt_in() -> bool:
    return os.environ.get(CPU_OPT_IN_ENV, "0").strip().lower() in ("1", "true", "yes", "on")


def register() -> None:
    """The `vllm.general_plugins` entry point (runs in every vLLM process, possibly twice).

    Always: registers mla_ext as AttentionBackendEnum.CUSTOM (inert until selected).
    With MLA_EXT_VLLM_CPU=1: also serves vLLM's two CPU MLA backends, CPU_MLA (by
    MlaExtBackend) and AMX_MLA (by MlaExtAmxBackend; vLLM picks AMX_MLA by itself on AMX CPUs,
    so overriding CPU_MLA alone would leave the opt-in silently unused there), after checking
    the vLLM version: an opt-in on an unsupported release raises here, naming the supported ones.
    Never raises without the opt-in, so installing mla_ext cannot break stock vLLM.
    """
    if not cpu_opt_in():
        try:
            from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

            register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)
        except (ImportError, AttributeError) as e:  # another vLLM layout: stock vLLM must still start
            _log.warning("mla_ext: not registered as a vLLM backend on this vLLM (%s)", e)
        return
    check_vllm_version()
    from vllm.v1.attention.backends.registry import AttentionBackendEnum, register_backend

    register_backend(AttentionBackendEnum.CUSTOM, BACKEND_PATH)
    served = {name: path for name, path in (("CPU_MLA", BACKEND_PATH), ("AMX_MLA", AMX_BACKEND_PATH))
              if hasattr(AttentionBackendEnum, name)}
    for name, path in served.items():
        register_backend(getattr(AttentionBackendEnum, name), path)
    _log.info("mla_ext: %s=1, served: %s", CPU_OPT_IN_ENV, ", ".join(f"{n} by {p}" for n, p in served.items()))


def __getattr__(name: str):
    # PEP 562: vLLM resolves BACKEND_PATH with import_module + getattr, which lands here.
    if name in _LAZY:
        check_vllm_version()
        from . import _vllm_backend

        return getattr(_vllm_backend, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
