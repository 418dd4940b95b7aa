"""One vLLM run in its own process, for tests/test_vllm_backend.py and benchmarks/bench_vllm.py.

    python tests/vllm_child.py make-model DIR [--layers 2 --heads 4 --hidden 256 ...]
    python tests/vllm_child.py generate DIR --prompts P.json --out OUT.json [--dtype float32]
        [--kv-cache-dtype auto|fp8] [--max-tokens 24] [--negative-scale F] [--fp8-rows-pass] [--worker-info] [--profile]

`generate` runs vLLM in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0, so torch.profiler and
the backend's counters see the model's ops) with attention_backend="CPU_MLA" (or
--attention-backend AMX_MLA); whether mla_ext serves it is decided by MLA_EXT_VLLM_CPU in the
environment the caller gives.
Greedy decoding, token ids in and out (no tokenizer), ignore_eos. Writes JSON: tokens and
the chosen tokens' logprobs per prompt, which attention ops ran (profiler event counts),
mla_ext's backend counters and the backend class vLLM resolved for CPU_MLA.

--negative-scale F generates a second time in the same engine with mla_ext's decode given
softmax_scale * F ("negative_outputs"): a negative control, a wrong scale must show.
--fp8-rows-pass generates a second time with every cache row rounded through e4m3 before
it is written to the (bf16) cache ("fp8_rows_outputs"): what a kv_cache_dtype="fp8" run
must reproduce.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

# Ops whose profiler events tell which decode / cache write ran.
OPS = ("mla_ext::decode", "mla_ext::decode_out", "mla_ext::append_kv", "_C::mla_decode_kvcache",
       "_C::decode_attention_cpu", "_C::concat_and_cache_mla_cpu")  # the last two: AMX_MLA's


def make_model(path: str, layers: int = 2, heads: int = 4, hidden: int = 256, vocab: int = 512,
               intermediate: int = 512, init_std: float = 0.08, seed: int = 0, max_pos: int = 4096) -> None:
    """A small DeepSeek-V2 (MLA with kv_lora_rank 512, rope 64, nope 128, v 128; dense MLPs),
    seeded random weights saved as safetensors. init_std 0.08 (not HF's 0.02) gives attention
    scores of order 1, so attention is far from uniform and a wrong softmax scale shows."""
    import torch
    from transformers import DeepseekV2Config, DeepseekV2ForCausalLM

    cfg = DeepseekV2Config(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, moe_intermediate_size=intermediate,
        num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
        q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, first_k_dense_replace=layers,
        max_position_embeddings=max_pos, initializer_range=init_std, tie_word_embeddings=False,
        rope_theta=10000.0, bos_token_id=0, eos_token_id=1, torch_dtype="float32",
    )
    torch.manual_seed(seed)
    model = DeepseekV2ForCausalLM(cfg).to(torch.float32)
    with torch.no_grad():  # norms at 1 + noise so they are not all identical
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.copy_(1.0 + 0.1 * torch.randn_like(p))
    model.save_pretrained(path, safe_serialization=True)


def generate(args) -> dict:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    import torch
    from vllm import LLM, SamplingParams

    from mla_ext.integrations import _vllm_backend as backend_mod

    with open(args.prompts) as f:
        prompts = json.load(f)
    llm = LLM(args.model, skip_tokenizer_init=True, dtype=args.dtype, enforce_eager=True,
              attention_backend=args.attention_backend, kv_cache_dtype=args.kv_cache_dtype,
              max_model_len=args.max_model_len, max_num_seqs=max(len(prompts), 1), seed=0,
              enable_prefix_caching=False)
    from vllm.v1.attention.backends.registry import AttentionBackendEnum

    backend_path = AttentionBackendEnum[args.attention_backend].get_path()
    sp = SamplingParams(temperature=0.0, max_tokens=args.max_tokens, logprobs=1, ignore_eos=True,
                        detokenize=False)
    inputs = [{"prompt_token_ids": p} for p in prompts]
    llm.generate(inputs[:1], SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True, detokenize=False),
                 use_tqdm=False)  # warm-up
    counters_before = dict(backend_mod.counters)
    op_counts = {}
    t0 = time.perf_counter()
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            outs = llm.generate(inputs, sp, use_tqdm=False)
        for ev in prof.key_averages():
            if ev.key in OPS:
                op_counts[ev.key] = ev.count
    else:
        outs = llm.generate(inputs, sp, use_tqdm=False)
    elapsed = time.perf_counter() - t0
    result = {"backend_path": backend_path, "op_counts": {k: op_counts.get(k, 0) for k in OPS},
              "counters": {k: backend_mod.counters[k] - counters_before[k] for k in backend_mod.counters},
              "counters_total": dict(backend_mod.counters),  # warm-up included
              "elapsed_s": elapsed, "torch": torch.__version__, "pid": os.getpid(), "outputs": []}
    result["outputs"] = _tokens_and_logprobs(outs)
    if args.worker_info:
        # Which attention impl the model's layers have and mla_ext's call counters, read
        # inside vLLM's worker (its own process under the default multiprocessing).
        result["worker_info"] = llm.collective_rpc(_attention_info)
    if args.negative_scale is not None:
        # Negative control, same engine: mla_ext's decode gets softmax_scale * factor.
        real_forward_mqa = backend_mod.MlaExtImpl.forward_mqa

        def forward_mqa_wrong_scale(self, *a, **kw):
            right = self.scale
            self.scale = right * args.negative_scale
            try:
                return real_forward_mqa(self, *a, **kw)
            finally:
                self.scale = right

        backend_mod.MlaExtImpl.forward_mqa = forward_mqa_wrong_scale
        result["negative_outputs"] = _tokens_and_logprobs(llm.generate(inputs, sp, use_tqdm=False))
        backend_mod.MlaExtImpl.forward_mqa = real_forward_mqa
    if args.fp8_rows_pass:
        # Same engine (bf16 cache), every cache row rounded through e4m3 as vLLM's fp8 cache
        # stores it (x / k_scale, saturated) and scaled back: what an fp8 cache must equal.
        import mla_ext.reference as ref

        real_update = backend_mod.MlaExtImpl.do_kv_cache_update

        def update_fp8_rounded(self, kv_c, k_pe, kv_cache, slot_mapping, kv_cache_dtype, k_scale):
            s = k_scale.reshape(1).float()
            rnd = lambda x: (ref.quantize_fp8(x, s).float() * s).to(x.dtype)  # noqa: E731
            real_update(self, rnd(kv_c), rnd(k_pe), kv_cache, slot_mapping, kv_cache_dtype, k_scale)

        backend_mod.MlaExtImpl.do_kv_cache_update = update_fp8_rounded
        result["fp8_rows_outputs"] = _tokens_and_logprobs(llm.generate(inputs, sp, use_tqdm=False))
        backend_mod.MlaExtImpl.do_kv_cache_update = real_update
    return result


def _attention_info(worker) -> dict:
    import sys as _sys

    model = worker.model_runner.model
    impls = sorted({type(m.impl).__name__ for m in model.modules() if hasattr(m, "impl")})
    mod = _sys.modules.get("mla_ext.integrations._vllm_backend")
    return {"pid": os.getpid(), "impls": impls, "counters": dict(mod.counters) if mod else None}


def _tokens_and_logprobs(outs) -> list:
    res = []
    for o in outs:
        c = o.outputs[0]
        lps = [float(step[tok].logprob) for tok, step in zip(c.token_ids, c.logprobs)]
        res.append({"tokens": list(c.token_ids), "logprobs": lps})
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("make-model")
    m.add_argument("path")
    for k, v in dict(layers=2, heads=4, hidden=256, vocab=512, intermediate=512, seed=0).items():
        m.add_argument("--" + k, type=int, default=v)
    g = sub.add_parser("generate")
    g.add_argument("model")
    g.add_argument("--prompts", required=True)
    g.add_argument("--out", required=True)
    g.add_argument("--dtype", default="float32")
    g.add_argument("--kv-cache-dtype", default="auto")
    g.add_argument("--attention-backend", default="CPU_MLA", choices=["CPU_MLA", "AMX_MLA"])
    g.add_argument("--max-tokens", type=int, default=24)
    g.add_argument("--max-model-len", type=int, default=256)
    g.add_argument("--negative-scale", type=float, default=None)
    g.add_argument("--fp8-rows-pass", action="store_true")
    g.add_argument("--worker-info", action="store_true")
    g.add_argument("--profile", action="store_true")
    args = ap.parse_args()
    if args.cmd == "make-model":
        make_model(args.path, layers=args.layers, heads=args.heads, hidden=args.hidden, vocab=args.vocab,
                   intermediate=args.intermediate, seed=args.seed)
        return
    result = generate(args)
    with open(args.out, "w") as f:
        json.dump(result, f)
    # vLLM's in-process engine takes tens of seconds to shut down on a busy machine; the
    # result is on disk, so leave at once.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
