"""The main job: a DeepSeek-V2-Lite-shaped MLA attention layer through a real decode loop.

Prefill writes each prompt's latent rows into a paged cache with mla_ext.append_kv; every
decode step appends the new token's row and runs mla_ext.decode (absorbed attention on
the latents). Each step's output is checked against the textbook, non-absorbed path that
expands per-head K and V from the same latents. Weights are random: the point is the
data flow and the numbers, not the text.
"""
import argparse
import math
import time
from dataclasses import dataclass

import torch

from . import ops
from ._ops import HEAD_DIM, LATENT_DIM, ROPE_DIM


@dataclass
class LayerShape:
    """DeepSeek-V2-Lite attention (SPEC section 6): 16 heads, no q LoRA."""

    hidden: int = 2048
    heads: int = 16
    nope: int = 128  # qk_nope_head_dim
    rope: int = ROPE_DIM  # qk_rope_head_dim
    v: int = 128  # v_head_dim
    kv_lora_rank: int = LATENT_DIM


class MLALayer:
    """Random-weight MLA attention with both the absorbed and the expanded computation."""

    def __init__(self, shape: LayerShape, generator: torch.Generator):
        s = shape
        self.s = s

        def weight(out_features, in_features):
            return torch.randn(out_features, in_features, generator=generator) / math.sqrt(in_features)

        self.w_q = weight(s.heads * (s.nope + s.rope), s.hidden)  # q_proj
        self.w_kv_a = weight(s.kv_lora_rank + s.rope, s.hidden)  # kv_a_proj_with_mqa
        self.kv_norm = 1.0 + 0.1 * torch.randn(s.kv_lora_rank, generator=generator)  # kv_a_layernorm weight
        self.w_kv_b = weight(s.heads * (s.nope + s.v), s.kv_lora_rank)  # kv_b_proj
        self.w_o = weight(s.hidden, s.heads * s.v)  # o_proj
        w = self.w_kv_b.view(s.heads, s.nope + s.v, s.kv_lora_rank)
        self.w_uk = w[:, : s.nope]  # [h, 128, 512]: latent -> per-head key (nope part)
        self.w_uv = w[:, s.nope :]  # [h, 128, 512]: latent -> per-head value
        self.softmax_scale = 1.0 / math.sqrt(s.nope + s.rope)  # 1/sqrt(192), as DeepSeek

    def rope(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotate-half RoPE over the last dim (64) at the given positions. x [..., T, (h,) 64]."""
        half = self.s.rope // 2
        inv_freq = 1.0 / (10000 ** (torch.arange(half, dtype=torch.float32) / half))
        angles = positions.float()[:, None] * inv_freq[None]  # [T, 32]
        cos, sin = angles.cos(), angles.sin()
        if x.dim() == 3:  # [T, h, 64]
            cos, sin = cos[:, None], sin[:, None]
        x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)

    def latent_rows(self, hidden: torch.Tensor, positions: torch.Tensor):
        """What the cache stores per token: c = RMSNorm(W_DKV x) [T, 512], k_pe = RoPE(W_KR x) [T, 64]."""
        kv = hidden @ self.w_kv_a.T
        c, k_pe = kv[:, : self.s.kv_lora_rank], kv[:, self.s.kv_lora_rank :]
        c = c * torch.rsqrt(c.pow(2).mean(-1, keepdim=True) + 1e-6) * self.kv_norm
        return c, self.rope(k_pe, positions)

    def queries(self, hidden: torch.Tensor, positions: torch.Tensor):
        """Per-head q_nope [T, h, 128] and rotated q_pe [T, h, 64]."""
        q = (hidden @ self.w_q.T).view(-1, self.s.heads, self.s.nope + self.s.rope)
        return q[..., : self.s.nope], self.rope(q[..., self.s.nope :], positions)

    def expanded_attention(self, q_nope, q_pe, rows: torch.Tensor) -> torch.Tensor:
        """Textbook MHA for one query token over one sequence's cache rows [L, 576]: o [h, 128]."""
        c, k_pe = rows[:, :LATENT_DIM].float(), rows[:, LATENT_DIM:].float()
        k_nope = torch.einsum("hdc,tc->thd", self.w_uk, c)  # [L, h, 128]: expanded keys
        v = torch.einsum("hdc,tc->thd", self.w_uv, c)  # [L, h, 128]: expanded values
        scores = (torch.einsum("hd,thd->ht", q_nope, k_nope) + q_pe @ k_pe.T) * self.softmax_scale
        return torch.einsum("ht,thd->hd", scores.softmax(-1), v)


def kv_bytes_table(heads: int, elt: int = 2) -> list[tuple[str, int]]:
    """KV-cache bytes per token per layer for one layer with `heads` query heads."""
    return [
        ("MLA latent (512 + 64)", HEAD_DIM * elt),
        (f"MHA ({heads} heads x (192 K + 128 V))", heads * (192 + 128) * elt),
        ("GQA (8 KV heads x 128 x K,V)", 8 * 128 * 2 * elt),
    ]


def run(batch: int = 4, steps: int = 32, block_size: int = 16, dtype=torch.bfloat16, device: str = "cpu", seed: int = 0):
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    shape = LayerShape()
    layer = MLALayer(shape, gen)
    prompt_lens = torch.randint(64, 512, (batch,), generator=gen).tolist()
    max_len = max(prompt_lens) + steps

    # Paged cache: every sequence gets enough blocks for prompt + steps, in shuffled order,
    # and unused slots hold NaN to show they never reach the output.
    blocks_per_seq = -(-max_len // block_size)
    num_blocks = batch * blocks_per_seq + 8
    cache = torch.full((num_blocks, block_size, HEAD_DIM), float("nan"), dtype=dtype, device=device)
    block_table = torch.randperm(num_blocks, generator=gen)[: batch * blocks_per_seq].view(batch, -1)
    block_table = block_table.to(torch.int32).to(device)

    def slots(seqs: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """slot_mapping [T] int64 for tokens at `positions` of sequences `seqs`."""
        seqs, positions = seqs.to(device), positions.to(device)
        return block_table[seqs, positions // block_size].long() * block_size + positions % block_size

    print(f"mla_ext demo: DeepSeek-V2-Lite attention layer (h={shape.heads}, kv_lora_rank={shape.kv_lora_rank}, "
          f"rope={shape.rope}), random weights, {dtype}, {device}")
    print(f"batch {batch}, prompt lengths {prompt_lens}, {steps} decode steps, block_size {block_size}")
    print()
    print("KV-cache bytes per token per layer (bf16):")
    for heads, label in ((shape.heads, "V2-Lite, 16 heads"), (128, "V3, 128 heads")):
        table = kv_bytes_table(heads)
        mla = table[0][1]
        print(f"  {label}:")
        for name, nbytes in table:
            print(f"    {name:<36} {nbytes:>7,d} B   {nbytes / mla:5.1f}x MLA")
    cache_bytes = cache.numel() * cache.element_size()
    print(f"paged latent cache: {num_blocks} blocks x {block_size} tokens x 576 = {cache_bytes / 2**20:.2f} MiB "
          f"(one layer; {cache_bytes / (num_blocks * block_size):.0f} B per slot)")
    print()

    # Prefill: write every prompt token's latent row into the cache.
    t0 = time.perf_counter()
    for seq, n in enumerate(prompt_lens):
        positions = torch.arange(n)
        c, k_pe = layer.latent_rows(torch.randn(n, shape.hidden, generator=gen), positions)
        ops.append_kv(c.to(dtype).to(device), k_pe.to(dtype).to(device), cache,
                      slots(torch.full_like(positions, seq), positions))
    prefill_s = time.perf_counter() - t0

    seqlens = torch.tensor(prompt_lens, dtype=torch.int32)
    decode_s, max_err, max_ref = 0.0, 0.0, 0.0
    for _ in range(steps):
        positions = seqlens.clone()  # the new token's position in each sequence
        hidden = torch.randn(batch, shape.hidden, generator=gen)
        c, k_pe = layer.latent_rows(hidden, positions)
        q_nope, q_pe = layer.queries(hidden, positions)  # [b, h, 128], [b, h, 64]
        q_lat = torch.einsum("bhd,hdc->bhc", q_nope, layer.w_uk)  # absorb W_UK: [b, h, 512]
        seqlens += 1
        seqlens_dev = seqlens.to(device)

        t0 = time.perf_counter()
        ops.append_kv(c.to(dtype).to(device), k_pe.to(dtype).to(device), cache, slots(torch.arange(batch), positions))
        o_lat = ops.decode(q_lat[:, None].to(dtype).to(device), q_pe[:, None].to(dtype).to(device), cache,
                           block_table, seqlens_dev, softmax_scale=layer.softmax_scale)  # [b, 1, h, 512]
        decode_s += time.perf_counter() - t0
        o_abs = torch.einsum("bhc,hdc->bhd", o_lat[:, 0].float().cpu(), layer.w_uv)  # apply W_UV: [b, h, 128]

        # The expanded path over the same (rounded) cache rows. It starts from the fp32
        # q_nope while the kernel saw q_lat rounded to `dtype`: the gap is that rounding.
        for seq in range(batch):
            n = int(seqlens[seq])
            pos = torch.arange(n, device=device)
            rows = cache[block_table[seq, pos // block_size].long(), pos % block_size].cpu()
            o_ref = layer.expanded_attention(q_nope[seq], q_pe[seq].to(dtype).float(), rows)
            max_err = max(max_err, (o_abs[seq] - o_ref).abs().max().item())
            max_ref = max(max_ref, o_ref.abs().max().item())
    out = torch.einsum("bhd,ohd->bo", o_abs, layer.w_o.view(shape.hidden, shape.heads, shape.v))  # o_proj

    tokens = batch * steps
    print(f"prefill: {sum(prompt_lens)} tokens appended in {prefill_s * 1e3:.1f} ms (incl. projections)")
    print(f"decode:  {tokens} tokens in {decode_s * 1e3:.1f} ms of append_kv + decode -> "
          f"{tokens / decode_s:,.0f} tokens/s for this layer")
    print(f"absorbed vs expanded attention output: max |error| = {max_err:.2e} "
          f"(max |output| {max_ref:.2e}, {dtype} cache)")
    print(f"layer output after o_proj: {tuple(out.shape)}, finite: {bool(torch.isfinite(out).all())}")
    tolerance = 0.05 * max_ref if dtype != torch.float32 else 1e-4 * max_ref
    ok = max_err <= tolerance and bool(torch.isfinite(out).all())
    print("OK: absorbed decode matches the expanded computation" if ok else "MISMATCH")
    return ok


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mla_ext", description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--skip-hf", action="store_true", help="skip part 2 (the HF transformers model)")
    args = parser.parse_args(argv)
    print("=== Part 1: one MLA layer, absorbed decode vs the expanded computation\n")
    ok = run(args.batch, args.steps, args.block_size, getattr(torch, args.dtype), args.device)
    if not args.skip_hf:
        print("\n=== Part 2: a random DeepSeek-V3-shaped HF transformers model generating with and without mla_ext\n")
        try:
            from .demo_hf import run_hf_demo
        except ImportError as err:  # transformers is optional for the library, pinned for the demo
            print(f"skipped: {err} (pip install -r requirements-dev.txt)")
        else:
            ok = run_hf_demo(device=args.device) is not False and ok
    return 0 if ok else 1
