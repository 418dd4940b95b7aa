"""CPU-only check of the tensor-core decode kernel's fragment layouts and tile bookkeeping
through a lane-level numpy emulation (tests/emulate_tc.py). Runs without a GPU."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

sys.path.insert(0, os.path.dirname(__file__))
emulate_tc = pytest.importorskip("emulate_tc")

CASES = [  # cfg, b, s_q, h, lens, block_size, num_splits, causal, fp8 (q dtype of the conversion)
    ((64, 32, 3), 1, 2, 40, [77], 7, 1, True, None),
    ((64, 32, 3), 2, 3, 4, [2, 45], 1, 2, True, None),
    ((64, 32, 2), 1, 1, 16, [100], 64, 3, False, None),
    ((32, 16, 3), 1, 4, 16, [50], 3, 2, True, None),
    ((64, 32, 4), 2, 1, 16, [70, 0], 16, 1, True, "bf16"),   # fp8 cache, sm_90 configuration
    ((64, 32, 2), 2, 3, 4, [2, 45], 1, 2, True, "fp16"),     # fp8, sm_80 configuration, splits
    ((32, 16, 4), 1, 2, 20, [50], 7, 2, True, "bf16"),       # fp8, sm_86/89 configuration
]


@pytest.mark.parametrize("case", CASES)
def test_tc_kernel_emulation(case):
    cfg, b, s_q, h, lens, bs, splits, causal, fp8 = case
    assert emulate_tc.run(cfg, b, s_q, h, lens, bs, splits, causal=causal, fp8=fp8)


@pytest.mark.parametrize("kind", ["bf16", "fp16"])
def test_fp8_conversion_every_code(kind):
    import torch
    allc = np.arange(256, dtype=np.uint64)
    words = allc | (allc << 8) | (allc << 16) | (allc << 24)
    want = torch.arange(256, dtype=torch.int32).to(torch.uint8).view(torch.float8_e4m3fn).double().numpy()
    got = emulate_tc.e4m3x4_to(words, kind)
    for k in range(4):
        assert np.array_equal(got[:, k], want, equal_nan=True)


def test_fp8_helpers_host_selftest(tmp_path):
    """csrc/cuda/fp8.cuh's integer helpers compiled for the host vs csrc/cpu/fp8.h (every
    97th float bit pattern plus every e4m3 boundary; cuda_compile_check.sh runs all 2^32)."""
    cxx = shutil.which(os.environ.get("CXX", "c++")) or shutil.which("g++")
    if cxx is None:
        pytest.skip("no C++ compiler")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    exe = str(tmp_path / "fp8_selftest")
    subprocess.run([cxx, "-O2", "-std=c++17", os.path.join(root, "tests", "native", "fp8_selftest.cpp"), "-o", exe],
                   check=True)
    res = subprocess.run([exe, "97"], capture_output=True, text=True)
    assert res.returncode == 0 and "PASS" in res.stdout, res.stdout
