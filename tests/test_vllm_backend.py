"""mla_ext as vLLM's MLA attention backend (mla_ext.integrations.vllm), on CPU.

Runs in the vLLM venv (`make test-vllm`); skipped where vllm is not installed.

* In-process: the registration (inert without MLA_EXT_VLLM_CPU=1), the version check, and
  the backend's two hooks (forward_mqa, do_kv_cache_update) called the way vLLM calls them,
  against the float64 reference at block sizes 1 / 7 / 16 / 64, s_q 1 and 3 (causal and
  not), fp32 / bf16 / fp16 and the fp8 cache vLLM hands over as uint8.
* End to end, each vLLM run in its own process (tests/vllm_child.py) on a small seeded
  DeepSeek-V2 (safetensors, 2 layers, 4 heads, kv_lora_rank 512): stock CPU_MLA vs mla_ext
  in fp32 (greedy tokens identical, logprobs close, on prompts of 5 / 17 / 40 / 70 tokens
  plus 24 new ones: every decode crosses 16-token blocks), the profiler's proof of which
  ops ran, a negative control (a wrong softmax scale moves the logprobs far past the
  tolerance) and the fp8 cache (equal to a cache of e4m3-rounded rows, close to the exact one).
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

vllm = pytest.importorskip("vllm", reason="vllm is not installed (make test-vllm builds its venv)")

import mla_ext  # noqa: E402
from conftest import LSE_ATOL, LSE_RTOL, OUT_TOL_VS_FP64, make_paged_kv, randn, varlen_seqlens  # noqa: E402
from mla_ext.integrations import vllm as mla_vllm  # noqa: E402

try:
    mla_vllm.check_vllm_version()
except RuntimeError as e:  # pragma: no cover - depends on the installed vllm
    pytest.skip(str(e), allow_module_level=True)

from vllm.v1.attention.backends.registry import AttentionBackendEnum  # noqa: E402

HERE = Path(__file__).resolve().parent
CHILD = HERE / "vllm_child.py"
LATENT, ROPE, HEADS = 512, 64, 4
PROMPT_LENS = (5, 17, 40, 70)
MAX_TOKENS = 24
# fp32 end to end: the two decode kernels sum the same products in different orders
# (~1e-6 relative on the attention output); through two layers and the lm_head the
# logprobs moved by < 1e-5 in our runs. 1e-3 leaves room for other CPUs' rounding and is
# still ~100x below what the negative control moves them.
FP32_LOGPROB_TOL = 1e-3
NEGATIVE_SCALE = 1.5  # softmax_scale * 1.5: a plausible bug (e.g. 1/sqrt(192) vs 1/sqrt(576)-like mixups)


# --------------------------------------------------------------------------- registration


@pytest.fixture
def clean_registry():
    saved = {m: m.is_overridden() and m.get_path()
             for m in (AttentionBackendEnum.CUSTOM, AttentionBackendEnum.CPU_MLA, AttentionBackendEnum.AMX_MLA)}
    yield
    from vllm.v1.attention.backends.registry import register_backend

    for member, path in saved.items():
        member.clear_override()
        if path:
            register_backend(member, path)


def test_plugin_entry_point_is_installed():
    from importlib.metadata import entry_points

    eps = {e.name: e.value for e in entry_points(group="vllm.general_plugins")}
    assert eps.get("mla_ext") == "mla_ext.integrations.vllm:register"


def test_register_without_opt_in_leaves_cpu_mla_alone(clean_registry, monkeypatch):
    monkeypatch.delenv(mla_vllm.CPU_OPT_IN_ENV, raising=False)
    AttentionBackendEnum.CPU_MLA.clear_override()
    AttentionBackendEnum.AMX_MLA.clear_override()
    amx_path = AttentionBackendEnum.AMX_MLA.get_path()
    mla_vllm.register()
    mla_vllm.register()  # vLLM may run plugins more than once per process
    assert AttentionBackendEnum.CPU_MLA.get_path() == "vllm.v1.attention.backends.mla.cpu_mla.CPUMLABackend"
    assert AttentionBackendEnum.AMX_MLA.get_path() == amx_path
    assert AttentionBackendEnum.CUSTOM.get_path() == mla_vllm.BACKEND_PATH
    assert AttentionBackendEnum.CUSTOM.get_class() is mla_vllm.MlaExtBackend


def test_register_with_opt_in_takes_cpu_mla(clean_registry, monkeypatch):
    monkeypatch.setenv(mla_vllm.CPU_OPT_IN_ENV, "1")
    mla_vllm.register()
    assert AttentionBackendEnum.CPU_MLA.get_class() is mla_vllm.MlaExtBackend
    # vLLM picks AMX_MLA by itself on AMX CPUs: the opt-in serves it too, never silently stock.
    # It keeps AMX_MLA's prefill and absorption there, so its role is a subclass of AMX_MLA's.
    assert AttentionBackendEnum.AMX_MLA.get_class() is mla_vllm.MlaExtAmxBackend
    from vllm.v1.attention.backends.mla.amx_mla import AMXMLABackend, AMXMLAImpl

    assert issubclass(mla_vllm.MlaExtAmxBackend, AMXMLABackend)
    assert issubclass(mla_vllm.MlaExtAmxBackend.get_impl_cls(), AMXMLAImpl)
    assert mla_vllm.MlaExtAmxBackend.get_name() == "AMX_MLA"
    assert mla_vllm.MlaExtBackend.get_name() == "CPU_MLA"  # its enum member on CPU


def test_unsupported_vllm_version_is_refused(clean_registry, monkeypatch):
    assert mla_vllm.check_vllm_version("0.32.0+cpu") == "0.32.0+cpu"
    for bad in ("0.31.2", "0.33.0", "1.0.0"):
        with pytest.raises(RuntimeError, match=r"supports vLLM 0\.32\.x; this is vLLM " + bad.replace(".", r"\.")):
            mla_vllm.check_vllm_version(bad)
    monkeypatch.setattr(mla_vllm, "_vllm_version", lambda: "0.31.2")
    monkeypatch.setenv(mla_vllm.CPU_OPT_IN_ENV, "1")
    with pytest.raises(RuntimeError, match="0.32.x"):
        mla_vllm.register()  # opted in on an unsupported release: refuse loudly
    monkeypatch.delenv(mla_vllm.CPU_OPT_IN_ENV)
    mla_vllm.register()  # not opted in: never raises (stock vLLM must keep working)
    with pytest.raises(RuntimeError, match="0.32.x"):
        mla_vllm.MlaExtBackend  # selecting the backend (CUSTOM) on it fails with the message


def test_backend_declares_what_it_runs():
    b = mla_vllm.MlaExtBackend
    assert b.is_mla() and b.get_supported_head_sizes() == [576]
    assert all(b.supports_block_size(n) for n in (1, 7, 16, 64, 128))
    for dt in (torch.float32, torch.bfloat16, torch.float16):
        assert b.supports_dtype(dt)
    for kv in ("auto", "bfloat16", "fp8", "fp8_e4m3"):
        assert b.supports_kv_cache_dtype(kv)
    assert b.get_impl_cls() is mla_vllm.MlaExtImpl and b.get_builder_cls() is mla_vllm.MlaExtMetadataBuilder


# --------------------------------------------------------------------------- the hooks


def make_impl(kv_cache_dtype="auto", scale=1.0 / 192**0.5, **overrides):
    mla = dict(q_lora_rank=None, kv_lora_rank=LATENT, qk_nope_head_dim=128, qk_rope_head_dim=ROPE,
               qk_head_dim=192, v_head_dim=128, kv_b_proj=None)
    mla.update(overrides)
    return mla_vllm.MlaExtImpl(HEADS, 576, scale, 1, None, None, kv_cache_dtype, None, "decoder", None, **mla)


def vllm_query(tokens, gen, dtype):
    """(ql_nope [T, N, 512] contiguous, q_pe [T, N, 64] with strided rows): what MLAAttention hands over."""
    ql_nope = randn((tokens, HEADS, LATENT), gen, dtype)
    q_full = randn((tokens, HEADS, 128 + ROPE), gen, dtype)
    return ql_nope, q_full[..., 128:]


@pytest.mark.parametrize("block_size", [1, 7, 16, 64])
@pytest.mark.parametrize("s_q,causal", [(1, True), (3, True), (3, False)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_forward_mqa_matches_reference(block_size, s_q, causal, dtype, gen, one_thread):
    b = 3
    seqlens = varlen_seqlens(b, 90, gen, min_len=s_q, zero=False)
    kv = make_paged_kv(seqlens, block_size, gen, dtype)
    ql_nope, q_pe = vllm_query(b * s_q, gen, dtype)
    impl = make_impl()
    meta = SimpleNamespace(decode=SimpleNamespace(block_table=kv.block_table, seq_lens=kv.cache_seqlens),
                           causal=causal, num_decodes=b)
    mla_ext.integrations._vllm_backend.counters["decode"] = 0
    out, lse = impl.forward_mqa((ql_nope, q_pe), kv.cache, meta, SimpleNamespace(_k_scale=torch.tensor(1.0)))
    assert mla_ext.integrations._vllm_backend.counters["decode"] == 1
    assert out.shape == (b * s_q, HEADS, LATENT) and out.dtype == dtype
    assert lse.shape == (b * s_q, HEADS) and lse.dtype == torch.float32
    o64, l64 = mla_ext.reference.decode(ql_nope.double().view(b, s_q, HEADS, LATENT),
                                        q_pe.double().reshape(b, s_q, HEADS, ROPE),
                                        kv.cache, kv.block_table, kv.cache_seqlens, impl.scale, causal=causal,
                                        compute_dtype=torch.float64)
    atol, rtol = OUT_TOL_VS_FP64[dtype]
    torch.testing.assert_close(out.double().view(b, s_q, HEADS, LATENT), o64, atol=atol, rtol=rtol)
    torch.testing.assert_close(lse.view(b, s_q, HEADS), l64.float(), atol=LSE_ATOL, rtol=LSE_RTOL)


@pytest.mark.parametrize("block_size", [1, 16, 64])
def test_fp8_cache_write_and_decode(block_size, gen, one_thread):
    """vLLM's fp8 path: the cache is allocated as uint8, written by do_kv_cache_update with
    layer._k_scale (stores x / scale), then viewed as float8_e4m3fn for forward_mqa."""
    b, T_pad = 2, 3
    seqlens = [19, 40]
    num_blocks = sum((L + block_size - 1) // block_size for L in seqlens) + 2
    cache_u8 = torch.zeros(num_blocks, block_size, 576, dtype=torch.uint8)
    perm = torch.randperm(num_blocks, generator=gen).to(torch.int32)
    width = max((L + block_size - 1) // block_size for L in seqlens)
    table = torch.zeros(b, width, dtype=torch.int32)
    slots, start = [], 0
    for i, L in enumerate(seqlens):
        n = (L + block_size - 1) // block_size
        table[i, :n] = perm[start:start + n]
        start += n
        slots += [int(table[i, t // block_size]) * block_size + t % block_size for t in range(L)]
    T = len(slots)
    slot_mapping = torch.tensor(slots + [-1] * 2, dtype=torch.int64)  # -1 = padding, skipped
    kv_c = randn((T + 2 + T_pad, LATENT), gen, torch.bfloat16)      # padded past slot_mapping
    k_pe = randn((T + 2 + T_pad, 1, ROPE), gen, torch.bfloat16)
    k_scale = torch.tensor(0.05)
    impl = make_impl("fp8")
    impl.do_kv_cache_update(kv_c, k_pe, cache_u8, slot_mapping, "fp8", k_scale)
    cache8 = cache_u8.view(torch.float8_e4m3fn)
    expected = mla_ext.reference.append_kv(kv_c[:T], k_pe[:T, 0], torch.zeros_like(cache8), slot_mapping[:T],
                                          scale=k_scale.reshape(1))
    assert torch.equal(cache_u8, expected.view(torch.uint8)), "fp8 rows differ from x / scale rounded to e4m3"

    ql_nope, q_pe = vllm_query(b, gen, torch.bfloat16)
    meta = SimpleNamespace(decode=SimpleNamespace(block_table=table, seq_lens=torch.tensor(seqlens, dtype=torch.int32)),
                           causal=True, num_decodes=b)
    out, lse = impl.forward_mqa((ql_nope, q_pe), cache8, meta, SimpleNamespace(_k_scale=k_scale))
    o64, l64 = mla_ext.reference.decode(ql_nope.double().view(b, 1, HEADS, LATENT), q_pe.double().reshape(b, 1, HEADS, ROPE), cache8,
                                        table, meta.decode.seq_lens, impl.scale, compute_dtype=torch.float64,
                                        scale=k_scale.reshape(1))
    atol, rtol = OUT_TOL_VS_FP64[torch.bfloat16]
    torch.testing.assert_close(out.double().view(b, 1, HEADS, LATENT), o64, atol=atol, rtol=rtol)
    torch.testing.assert_close(lse.view(b, 1, HEADS), l64.float(), atol=LSE_ATOL, rtol=LSE_RTOL)


def test_cache_update_skips_padding_and_empty_cache(gen):
    impl = make_impl()
    cache = torch.full((2, 16, 576), float("nan"))
    kv_c, k_pe = randn((5, LATENT), gen), randn((5, 1, ROPE), gen)
    impl.do_kv_cache_update(kv_c, k_pe, cache, torch.tensor([3, -1, 17, -1], dtype=torch.int64), "auto", torch.tensor(1.0))
    flat = cache.view(-1, 576)
    torch.testing.assert_close(flat[3], torch.cat([kv_c[0], k_pe[0, 0]]), rtol=0, atol=0)
    torch.testing.assert_close(flat[17], torch.cat([kv_c[2], k_pe[2, 0]]), rtol=0, atol=0)
    assert torch.isnan(flat[[0, 1, 2, 4, 16, 18]]).all()
    impl.do_kv_cache_update(kv_c, k_pe, torch.empty(0, 16, 576), torch.tensor([0]), "auto", torch.tensor(1.0))


def test_absorption_weights_made_contiguous_once(gen):
    """vLLM's MLAAttention holds W_UK_T [N, P, L] and W_UV [N, L, V] as permuted views of
    kv_b_proj (torch.bmm copies them on every call); forward_mqa swaps in contiguous copies
    of the same values, once."""
    n, p, lat, v = HEADS, 128, LATENT, 128
    w_uk, w_uv = randn((lat, n, p), gen), randn((lat, n, v), gen)
    layer = torch.nn.Module()
    layer.W_UK_T = torch.nn.Parameter(w_uk.permute(1, 2, 0), requires_grad=False)  # as vLLM 0.32 leaves them
    layer.W_UV = torch.nn.Parameter(w_uv.transpose(0, 1), requires_grad=False)
    layer._k_scale = torch.tensor(1.0)
    kv = make_paged_kv([9], 16, gen, torch.float32)
    meta = SimpleNamespace(decode=SimpleNamespace(block_table=kv.block_table, seq_lens=kv.cache_seqlens),
                           causal=True, num_decodes=1)
    impl, counters = make_impl(), mla_ext.integrations._vllm_backend.counters
    before = counters["contiguous_weights"]
    for _ in range(2):
        impl.forward_mqa(vllm_query(1, gen, torch.float32), kv.cache, meta, layer)
    assert counters["contiguous_weights"] - before == 2
    assert layer.W_UK_T.is_contiguous() and layer.W_UV.is_contiguous()
    assert torch.equal(layer.W_UK_T, w_uk.permute(1, 2, 0)) and torch.equal(layer.W_UV, w_uv.transpose(0, 1))
    assert isinstance(layer.W_UK_T, torch.nn.Parameter) and "W_UK_T" in dict(layer.named_parameters())


def test_amx_role_refuses_fp8_cache():
    """In AMX_MLA's place mla_ext keeps AMX_MLA's prefill, which reads a bf16 cache only."""
    mla = dict(q_lora_rank=None, kv_lora_rank=LATENT, qk_nope_head_dim=128, qk_rope_head_dim=ROPE,
               qk_head_dim=192, v_head_dim=128, kv_b_proj=None)
    with pytest.raises(NotImplementedError, match="CPU_MLA"):
        mla_vllm.MlaExtAmxImpl(HEADS, 576, 0.07, 1, None, None, "fp8", None, "decoder", None, **mla)
    with pytest.raises(NotImplementedError, match="kv_lora_rank=512"):
        mla_vllm.MlaExtAmxImpl(HEADS, 576, 0.07, 1, None, None, "auto", None, "decoder", None,
                               **{**mla, "kv_lora_rank": 256})


def test_impl_refuses_other_mla_shapes():
    with pytest.raises(NotImplementedError, match="kv_lora_rank=512"):
        make_impl(kv_lora_rank=256)
    with pytest.raises(NotImplementedError, match="kv_cache_dtype"):
        make_impl("fp8_e5m2")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (and a CUDA build of vLLM)")
@pytest.mark.parametrize("block_size", [16, 64])
@pytest.mark.parametrize("s_q", [1, 2])
def test_cuda_hooks_match_reference(block_size, s_q, gen):
    """The same backend on a CUDA build of vLLM: mla_ext's CUDA kernels behind both hooks."""
    b, dtype = 4, torch.bfloat16
    seqlens = varlen_seqlens(b, 300, gen, min_len=s_q, zero=False)
    kv = make_paged_kv(seqlens, block_size, gen, dtype)
    ql_nope, q_pe = vllm_query(b * s_q, gen, dtype)
    impl = make_impl()
    meta = SimpleNamespace(decode=SimpleNamespace(block_table=kv.block_table.cuda(), seq_lens=kv.cache_seqlens.cuda()),
                           causal=True, num_decodes=b)
    out, lse = impl.forward_mqa((ql_nope.cuda(), q_pe.cuda()), kv.cache.cuda(), meta,
                                SimpleNamespace(_k_scale=torch.tensor(1.0, device="cuda")))
    o64, l64 = mla_ext.reference.decode(ql_nope.double().view(b, s_q, HEADS, LATENT),
                                        q_pe.double().reshape(b, s_q, HEADS, ROPE), kv.cache, kv.block_table,
                                        kv.cache_seqlens, impl.scale, compute_dtype=torch.float64)
    atol, rtol = OUT_TOL_VS_FP64[dtype]
    torch.testing.assert_close(out.cpu().double().view(b, s_q, HEADS, LATENT), o64, atol=atol, rtol=rtol)
    torch.testing.assert_close(lse.cpu().view(b, s_q, HEADS), l64.float(), atol=LSE_ATOL, rtol=LSE_RTOL)
    cache = torch.zeros(4, block_size, 576, dtype=dtype, device="cuda")
    kv_c, k_pe = randn((3, LATENT), gen, dtype, "cuda"), randn((3, 1, ROPE), gen, dtype, "cuda")
    impl.do_kv_cache_update(kv_c, k_pe, cache, torch.tensor([5, -1, 2 * block_size], device="cuda"), "auto",
                            torch.tensor(1.0, device="cuda"))
    flat = cache.view(-1, 576)
    assert torch.equal(flat[5], torch.cat([kv_c[0], k_pe[0, 0]])) and torch.equal(flat[2 * block_size], torch.cat([kv_c[2], k_pe[2, 0]]))


# --------------------------------------------------------------------------- end to end


def _child_env(opt_in: bool, multiprocessing: bool = False) -> dict:
    env = dict(os.environ)
    env.pop(mla_vllm.CPU_OPT_IN_ENV, None)
    if opt_in:
        env[mla_vllm.CPU_OPT_IN_ENV] = "1"
    env["VLLM_ENABLE_V1_MULTIPROCESSING"] = "1" if multiprocessing else "0"
    if multiprocessing:  # collective_rpc with a function (tests/vllm_child.py --worker-info)
        env["VLLM_ALLOW_INSECURE_SERIALIZATION"] = "1"
    env["PYTHONPATH"] = str(HERE.parent) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _run_child(args, env, log: Path, timeout=600) -> None:
    with open(log, "w") as f:
        r = subprocess.run([sys.executable, str(CHILD), *args], env=env, stdout=f, stderr=subprocess.STDOUT,
                           timeout=timeout)
    if r.returncode != 0:
        tail = log.read_text()[-4000:]
        raise AssertionError(f"vllm child {args} failed (rc {r.returncode}); log tail:\n{tail}")


@pytest.fixture(scope="module")
def e2e(tmp_path_factory):
    """The four vLLM runs, each in its own process, two at a time."""
    d = tmp_path_factory.mktemp("vllm_e2e")
    model = d / "model"
    _run_child(["make-model", str(model)], _child_env(False), d / "make_model.log")
    rng = random.Random(0)
    prompts = [[rng.randrange(2, 512) for _ in range(n)] for n in PROMPT_LENS]
    (d / "prompts.json").write_text(json.dumps(prompts))
    common = ["generate", str(model), "--prompts", str(d / "prompts.json"), "--max-tokens", str(MAX_TOKENS)]
    runs = {  # longest first: the pool runs two at a time
        "ours_fp32": (common + ["--profile", "--negative-scale", str(NEGATIVE_SCALE), "--fp8-rows-pass"], True),
        "stock_fp32": (common + ["--profile"], False),
        "ours_fp8": (common + ["--kv-cache-dtype", "fp8"], True),
        # vLLM's default: the engine core and its worker in processes of their own.
        "ours_fp32_mp": (common + ["--worker-info"], True, True),
    }

    def one(name):
        args, *env_args = runs[name]
        _run_child(args + ["--out", str(d / f"{name}.json")], _child_env(*env_args), d / f"{name}.log")
        return name, json.loads((d / f"{name}.json").read_text())

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(one, runs))


def _max_logprob_diff(a, b):
    return max(abs(x - y) for oa, ob in zip(a, b) for x, y in zip(oa["logprobs"], ob["logprobs"]))


def test_e2e_fp32_tokens_identical_logprobs_close(e2e):
    stock, ours = e2e["stock_fp32"]["outputs"], e2e["ours_fp32"]["outputs"]
    assert len(stock) == len(ours) == len(PROMPT_LENS)
    for i, (s, o) in enumerate(zip(stock, ours)):
        assert len(s["tokens"]) == MAX_TOKENS
        assert s["tokens"] == o["tokens"], f"prompt {i} ({PROMPT_LENS[i]} tokens): greedy tokens differ"
    assert _max_logprob_diff(stock, ours) < FP32_LOGPROB_TOL


def test_e2e_which_ops_ran(e2e):
    """The profiler inside each vLLM process: with the opt-in every decode / cache write
    was mla_ext's and vLLM's CPU MLA decode kernel never ran; without it, the reverse."""
    steps = (MAX_TOKENS - 1) * 2  # decode steps x layers
    stock, ours = e2e["stock_fp32"], e2e["ours_fp32"]
    assert stock["backend_path"] == "vllm.v1.attention.backends.mla.cpu_mla.CPUMLABackend"
    assert stock["op_counts"]["_C::mla_decode_kvcache"] >= steps
    assert stock["op_counts"]["mla_ext::decode"] == 0 and stock["op_counts"]["mla_ext::append_kv"] == 0
    assert stock["counters"] == {"decode": 0, "append_kv": 0, "contiguous_weights": 0}

    assert ours["backend_path"] == mla_vllm.BACKEND_PATH
    assert ours["op_counts"]["_C::mla_decode_kvcache"] == 0
    assert ours["op_counts"]["mla_ext::decode"] >= steps
    assert ours["op_counts"]["mla_ext::append_kv"] >= steps + 2  # + the prefill's writes
    assert ours["counters"]["decode"] == ours["op_counts"]["mla_ext::decode"]
    assert ours["counters"]["append_kv"] == ours["op_counts"]["mla_ext::append_kv"]
    # Both absorption weights of both layers were made contiguous, once each (in the warm-up).
    assert ours["counters_total"]["contiguous_weights"] == 2 * 2 and ours["counters"]["contiguous_weights"] == 0
    assert stock["counters_total"]["contiguous_weights"] == 0


def test_e2e_default_multiprocessing_mode(e2e):
    """vLLM's default: the model runs in a worker process of its own, which loads the plugin
    itself; read from inside it (collective_rpc): every attention layer's impl is mla_ext's
    and its decode / cache-write counters ran. (Outputs are not compared here: in this mode
    stock CPU_MLA's own greedy tokens differ from its in-process run, already at the first
    token, i.e. in vLLM's prefill, when another process loads the machine; not investigated.)"""
    run = e2e["ours_fp32_mp"]
    (info,) = run["worker_info"]
    assert info["pid"] != run["pid"]
    assert info["impls"] == ["MlaExtImpl"]
    assert info["counters"]["decode"] >= (MAX_TOKENS - 1) * 2 and info["counters"]["append_kv"] > 0
    assert run["counters"] == {"decode": 0, "append_kv": 0, "contiguous_weights": 0}  # nothing ran in the parent


def test_e2e_negative_control_wrong_scale(e2e):
    """The comparison can fail: the same engine with softmax_scale x 1.5 in mla_ext's decode
    moves the logprobs far past FP32_LOGPROB_TOL."""
    stock, wrong = e2e["stock_fp32"]["outputs"], e2e["ours_fp32"]["negative_outputs"]
    first = [abs(s["logprobs"][1] - w["logprobs"][1]) for s, w in zip(stock, wrong)]  # first decoded token
    assert min(first) > 10 * FP32_LOGPROB_TOL, first


# --------------------------------------------------------------------------- AMX_MLA's place


def _amx_cpu() -> bool:
    return bool(getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)())


# bf16 end to end (AMX_MLA takes bf16 models only): both decode kernels accumulate in fp32
# but round the attention output to bf16 (2^-9 relative) in different places; through two
# layers the chosen tokens' logprobs moved by <= 0.045 in our runs (tokens identical over
# all 24 steps). 0.15 leaves room for a near-tie flip's neighbourhood while a wrong kernel
# (or the wrong scale, ~0.4) shows.
BF16_LOGPROB_TOL = 0.15
BF16_MIN_AGREEING_TOKENS = 8  # a near-tie may flip a later greedy token; not the first 8


@pytest.fixture(scope="module")
def e2e_amx(tmp_path_factory):
    """Stock AMX_MLA vs mla_ext in its place (MLA_EXT_VLLM_CPU=1), bf16, each in its own process."""
    if not _amx_cpu():
        pytest.skip("AMX_MLA needs a CPU with AMX tiles (torch.cpu._is_amx_tile_supported() is False here)")
    d = tmp_path_factory.mktemp("vllm_e2e_amx")
    model = d / "model"
    _run_child(["make-model", str(model)], _child_env(False), d / "make_model.log")
    rng = random.Random(0)
    prompts = [[rng.randrange(2, 512) for _ in range(n)] for n in PROMPT_LENS]
    (d / "prompts.json").write_text(json.dumps(prompts))
    common = ["generate", str(model), "--prompts", str(d / "prompts.json"), "--max-tokens", str(MAX_TOKENS),
              "--dtype", "bfloat16", "--attention-backend", "AMX_MLA", "--profile"]

    def one(name_opt_in):
        name, opt_in = name_opt_in
        _run_child(common + ["--out", str(d / f"{name}.json")], _child_env(opt_in), d / f"{name}.log")
        return name, json.loads((d / f"{name}.json").read_text())

    with ThreadPoolExecutor(max_workers=2) as pool:
        return dict(pool.map(one, [("stock", False), ("ours", True)]))


def test_e2e_amx_role_which_ops_ran(e2e_amx):
    steps = (MAX_TOKENS - 1) * 2
    stock, ours = e2e_amx["stock"], e2e_amx["ours"]
    assert stock["backend_path"] == "vllm.v1.attention.backends.mla.amx_mla.AMXMLABackend"
    assert stock["op_counts"]["_C::decode_attention_cpu"] >= steps
    assert stock["op_counts"]["mla_ext::decode"] == 0 and stock["op_counts"]["mla_ext::append_kv"] == 0
    assert ours["backend_path"] == mla_vllm.AMX_BACKEND_PATH
    assert ours["op_counts"]["_C::decode_attention_cpu"] == 0 and ours["op_counts"]["_C::concat_and_cache_mla_cpu"] == 0
    assert ours["op_counts"]["mla_ext::decode"] >= steps and ours["op_counts"]["mla_ext::append_kv"] >= steps + 2
    assert ours["counters"]["decode"] == ours["op_counts"]["mla_ext::decode"]
    # AMX_MLA's own packed absorption weights stay in use: the generic ones are never touched.
    assert ours["counters_total"]["contiguous_weights"] == 0


def test_e2e_amx_role_matches_stock_amx(e2e_amx):
    stock, ours = e2e_amx["stock"]["outputs"], e2e_amx["ours"]["outputs"]
    assert len(stock) == len(ours) == len(PROMPT_LENS)
    for i, (s, o) in enumerate(zip(stock, ours)):
        assert len(s["tokens"]) == len(o["tokens"]) == MAX_TOKENS
        agree = next((t for t, (x, y) in enumerate(zip(s["tokens"], o["tokens"])) if x != y), MAX_TOKENS)
        assert agree >= BF16_MIN_AGREEING_TOKENS, f"prompt {i}: greedy tokens differ at step {agree}"
        diff = max(abs(x - y) for x, y in zip(s["logprobs"][:agree], o["logprobs"][:agree]))
        assert diff < BF16_LOGPROB_TOL, f"prompt {i}: logprob diff {diff}"


def test_e2e_fp8_cache(e2e):
    """kv_cache_dtype="fp8" through mla_ext (vLLM allocates uint8, passes k_scale, views the
    cache as e4m3 for decode), fp32 model:

    * equals, to fp32 rounding, the same engine with an fp32 cache whose rows were rounded
      through e4m3 before being written (ours_fp32's second pass): tokens identical, logprobs
      within FP32_LOGPROB_TOL. So the fp8 cache costs exactly its rounding, nothing else.
    * against the unrounded cache, the rounding moves the first decoded token's logprob by
      less than half of what the wrong softmax scale does (measured: ~0.05 vs ~0.4 mean).

    fp32 rather than bf16 models: in bf16 the two decode kernels' different summation
    orders flip bf16 roundings of the attention output, and a random model's near-tied
    logits then turn those into different greedy tokens; fp32 keeps the comparison tight.
    """
    fp8, rows = e2e["ours_fp8"], e2e["ours_fp32"]["fp8_rows_outputs"]
    assert e2e["ours_fp8"]["counters"]["decode"] >= (MAX_TOKENS - 1) * 2
    for i, (a, b) in enumerate(zip(fp8["outputs"], rows)):
        assert a["tokens"] == b["tokens"], f"prompt {i}: fp8 cache vs e4m3-rounded rows: tokens differ"
    assert _max_logprob_diff(fp8["outputs"], rows) < FP32_LOGPROB_TOL

    exact, wrong = e2e["ours_fp32"]["outputs"], e2e["ours_fp32"]["negative_outputs"]
    mean_first = lambda x, y: sum(abs(p["logprobs"][1] - q["logprobs"][1]) for p, q in zip(x, y)) / len(x)  # noqa: E731
    for a, b in zip(fp8["outputs"], exact):
        assert a["tokens"][0] == b["tokens"][0] and abs(a["logprobs"][0] - b["logprobs"][0]) < FP32_LOGPROB_TOL
    assert mean_first(fp8["outputs"], exact) < mean_first(wrong, e2e["stock_fp32"]["outputs"]) / 2
