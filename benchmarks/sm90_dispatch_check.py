"""Which CUDA kernel mla_ext.decode runs with MLA_EXT_CUDA_SM90=1 on this GPU: three decodes
(h=16, s_q=2, 300 keys; bf16 block_size 16 and 64, fp16 block_size 128) under torch.profiler, the
kernel names printed, and exit 1 unless the Hopper kernel (decode_sm90_kernel) ran each time and
its output matches the fp64 reference
(benchmarks/device_check.sh, sm90 stage; the tests under the same variable only check results)."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from cuda_cases import SCALE, DecodeCase, check_close  # noqa: E402

import mla_ext  # noqa: E402

assert os.environ.get("MLA_EXT_CUDA_SM90") == "1", "run with MLA_EXT_CUDA_SM90=1"
# block_size 16: the cp.async gather; 64 and 128: full tiles through TMA boxes (a tensor map that
# fails to encode falls back to the gather silently: same names, only speed tells); fp16 query.
CASES = [
    DecodeCase("sm90 dispatch check", s_q=2, lens=(300, 37)),
    DecodeCase("sm90 dispatch check, block_size=64 (TMA)", s_q=2, lens=(300, 37), block_size=64),
    DecodeCase("sm90 dispatch check, fp16, block_size=128 (TMA)", q_dtype=torch.float16, s_q=2, lens=(300, 37),
               block_size=128),
]
ok = True
for case in CASES:
    q_nope, q_pe, cache, table, seqlens, _ = case.inputs()
    dev = [t.cuda() for t in (q_nope, q_pe, cache, table, seqlens)]
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        out, lse = mla_ext.decode(*dev, softmax_scale=SCALE, causal=True, return_lse=True)
        torch.cuda.synchronize()
    names = sorted({e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA})
    print(f"{case.name}: CUDA kernels:", names)
    ref_out, ref_lse = case.reference(q_nope, q_pe, cache, table, seqlens, None)
    check_close(out, lse, ref_out, ref_lse, case.q_dtype, case.name)
    ran = any("decode_sm90_kernel" in n for n in names)
    print(f"{case.name}: sm90 kernel ran:", ran)
    ok = ok and ran
sys.exit(0 if ok else 1)
