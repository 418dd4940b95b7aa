"""Small append and decode cases for compute-sanitizer (memcheck, racecheck):

    PYTORCH_NO_CUDA_MEMORY_CACHING=1 compute-sanitizer --tool memcheck python benchmarks/sanitize_cases.py

Exercises the tensor-core kernel (one and several row blocks, several KV splits + combine),
the CUDA-core kernel, odd block sizes, causal MTP rows that see no key, out-of-range
indices with the checks off, and both append paths (16-byte vectors and scalar); the same for
a float8_e4m3fn cache (fp8 ring + conversion, fp8 append vector / scalar paths); and the
sparse decode kernels (sparse_cases)."""
import math
import os

import torch

import mla_ext

D, DC = 576, 512


def decode_case(b, s_q, h, lens, block_size, width_extra=2, dtype=torch.bfloat16, bad=False, fp8=False):
    g = torch.Generator(device="cuda").manual_seed(b * 131 + h)
    need = [max(1, -(-n // block_size)) for n in lens]
    nb = sum(need) + 1
    cache = torch.randn(nb, block_size, D, device="cuda", dtype=dtype, generator=g)
    scale = None
    if fp8:
        scale = torch.full((1,), 0.01, device="cuda")
        cache = (cache.float() / 0.01).clamp(-448, 448).to(torch.float8_e4m3fn)
    table = torch.randint(0, nb, (b, max(need) + width_extra), device="cuda", dtype=torch.int32, generator=g)
    if bad:
        table[0, 0] = nb + 1000
        table[-1, -1] = -3
    seqlens = torch.tensor(lens, dtype=torch.int32, device="cuda")
    q = torch.randn(b, s_q, h, D, device="cuda", dtype=dtype, generator=g)
    out, lse = mla_ext.decode(q[..., :DC], q[..., DC:], cache, table, seqlens, softmax_scale=1 / math.sqrt(192),
                              return_lse=True, scale=scale)
    torch.cuda.synchronize()
    return out, lse


def main():
    for impl in ("auto", "simple"):
        if impl == "simple":
            os.environ["MLA_EXT_DECODE_IMPL"] = "simple"
        decode_case(3, 1, 16, [0, 5, 200], 16)
        decode_case(2, 2, 40, [1, 77], 7)                        # M = 80: two row blocks, padding rows
        decode_case(1, 1, 16, [3000], 64, width_extra=60)         # one CTA -> several KV splits + combine
        decode_case(2, 3, 8, [2, 130], 1)                         # block_size 1, rows that see no key
        decode_case(2, 1, 16, [100, 50], 16, dtype=torch.float16)
        decode_case(3, 1, 16, [0, 5, 200], 16, fp8=True)                       # fp8 ring + conversion
        decode_case(1, 1, 16, [3000], 64, width_extra=60, fp8=True)            # fp8, splits + combine
        decode_case(2, 2, 40, [1, 77], 7, dtype=torch.float16, fp8=True)       # fp8, fp16 q, row blocks
        mla_ext.set_index_checks(False)
        decode_case(2, 1, 16, [100, 10**9], 16, bad=True)         # out-of-range ids and length: clamped
        decode_case(2, 1, 16, [100, 10**9], 16, bad=True, fp8=True)
        mla_ext.set_index_checks(True)
    os.environ.pop("MLA_EXT_DECODE_IMPL", None)
    decode_case(2, 1, 16, [64, 9], 16, dtype=torch.float32)
    cache = torch.zeros(4, 16, D, device="cuda", dtype=torch.bfloat16)
    rows = torch.randn(6, D + 1, device="cuda", dtype=torch.bfloat16)
    slots = torch.tensor([0, 63, -1, 17, 5, 40], device="cuda")
    mla_ext.append_kv(rows[:, :DC].contiguous(), rows[:, DC:D].contiguous(), cache, slots)  # vector path
    mla_ext.append_kv(rows[:, 1:DC + 1], rows[:, DC + 1:], cache, slots)                     # scalar path
    cache8 = torch.zeros(4, 16, D, device="cuda", dtype=torch.float8_e4m3fn)
    s8 = torch.full((1,), 0.02, device="cuda")
    mla_ext.append_kv(rows[:, :DC].contiguous(), rows[:, DC:D].contiguous(), cache8, slots, scale=s8)  # fp8 vector
    mla_ext.append_kv(rows[:, 1:DC + 1], rows[:, DC + 1:], cache8, slots, scale=s8)                     # fp8 scalar
    mla_ext.set_index_checks(False)
    mla_ext.append_kv(rows[:, :DC], rows[:, DC:D], cache, torch.tensor([64, 10**12, -5, 0, 1, 2], device="cuda"))
    mla_ext.append_kv(rows[:, :DC], rows[:, DC:D], cache8, torch.tensor([64, 10**12, -5, 0, 1, 2], device="cuda"),
                      scale=s8)
    torch.cuda.synchronize()
    sparse_cases()
    print("sanitize cases done")


def sparse_cases():
    """Sparse decode (csrc/cuda/sparse_decode.cu): both kernels on a few of the shared cases
    (padded blocks, skipped slots, topk_length, extra cache, splits + combine), then indices
    outside the cache with the checks off (the kernel skips them, never reads them)."""
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from sparse_cuda_cases import SCALE, SPARSE_CASES, to_device
    names = ("h16 s_q=2 topk_length", "h64 extra cache, sink", "h128 split topk", "h16 fp16 q, bf16 cache")
    for impl in ("auto", "simple"):
        os.environ["MLA_EXT_SPARSE_IMPL"] = impl
        for case in (c for c in SPARSE_CASES if c.name in names):
            q, cache, idx, kw = case.inputs()
            kw = {k: to_device(v, "cuda") for k, v in kw.items()}
            mla_ext.sparse_decode(q.cuda(), to_device(cache, "cuda"), idx.cuda(), softmax_scale=SCALE, **kw)
        q, cache, idx, _ = SPARSE_CASES[1].inputs()
        idx[0, 0, :3] = torch.tensor([10**6, -5, 2**31 - 1], dtype=torch.int32)
        mla_ext.set_index_checks(False)
        mla_ext.sparse_decode(q.cuda(), to_device(cache, "cuda"), idx.cuda(), softmax_scale=SCALE)
        mla_ext.set_index_checks(True)
    os.environ.pop("MLA_EXT_SPARSE_IMPL", None)
    torch.cuda.synchronize()


if __name__ == "__main__":
    main()
