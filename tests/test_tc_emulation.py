"""CPU-only check of the tensor-core decode kernel's fragment layouts and tile bookkeeping
through a lane-level numpy emulation (tests/emulate_tc.py). Runs without a GPU."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))
emulate_tc = pytest.importorskip("emulate_tc")

CASES = [  # cfg, b, s_q, h, lens, block_size, num_splits, causal
    ((64, 32, 3), 1, 2, 40, [77], 7, 1, True),
    ((64, 32, 3), 2, 3, 4, [2, 45], 1, 2, True),
    ((64, 32, 2), 1, 1, 16, [100], 64, 3, False),
    ((32, 16, 3), 1, 4, 16, [50], 3, 2, True),
]


@pytest.mark.parametrize("case", CASES)
def test_tc_kernel_emulation(case):
    cfg, b, s_q, h, lens, bs, splits, causal = case
    assert emulate_tc.run(cfg, b, s_q, h, lens, bs, splits, causal=causal)
