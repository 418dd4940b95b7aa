"""Which CUDA kernel mla_ext.decode runs with MLA_EXT_CUDA_SM90=1 on this GPU: one bf16 decode
(h=16, s_q=2, 300 keys) under torch.profiler, the kernel names printed, and exit 1 unless the
Hopper kernel (decode_sm90_kernel) ran and its output matches the fp64 reference
(benchmarks/device_check.sh, sm90 stage; the tests under the same variable only check results)."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
from cuda_cases import SCALE, DecodeCase, check_close  # noqa: E402

import mla_ext  # noqa: E402

assert os.environ.get("MLA_EXT_CUDA_SM90") == "1", "run with MLA_EXT_CUDA_SM90=1"
case = DecodeCase("sm90 dispatch check", s_q=2, lens=(300, 37))
q_nope, q_pe, cache, table, seqlens, _ = case.inputs()
dev = [t.cuda() for t in (q_nope, q_pe, cache, table, seqlens)]
with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
    out, lse = mla_ext.decode(*dev, softmax_scale=SCALE, causal=True, return_lse=True)
    torch.cuda.synchronize()
names = sorted({e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA})
print("CUDA kernels:", names)
ref_out, ref_lse = case.reference(q_nope, q_pe, cache, table, seqlens, None)
check_close(out, lse, ref_out, ref_lse, case.q_dtype, "sm90 dispatch check")
ok = any("decode_sm90_kernel" in n for n in names)
print("sm90 kernel ran:", ok)
sys.exit(0 if ok else 1)
