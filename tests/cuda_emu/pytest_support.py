"""What the emulated test files (tests/test_cuda_emulated*.py) share: their marks, the modes
they run in, and the session fixtures that build the emulator's programs."""
import os

import pytest

from cuda_emu import runner

# Every emulated test: marked (`-m "not emulated"` leaves them out) and skipped, with the
# reason, where the emulator cannot be built here.
EMULATED = [
    pytest.mark.emulated,
    pytest.mark.skipif(runner.available() is not None, reason=f"CUDA emulation unavailable: {runner.available()}"),
]

# MLA_EXT_EMU_FULL=1 (make test-emulated-full) runs every extra mode; "sample" (make
# test-emulated) too, and conftest.py then keeps a fixed share of them.
FULL = os.environ.get("MLA_EXT_EMU_FULL") in ("1", "sample")
# (build flavour, thread order): `make test` runs the plain build in forward order only. The
# inputs are per case; a mode changes nothing but the build and the order threads run in.
MODES = [("plain", "forward")] + ([("plain", "reverse"), ("plain", "random"), ("asan", "random"),
                                   ("tsan", "forward")] if FULL else [])
MODE_IDS = [f"{flavor}-{order}" for flavor, order in MODES]


def build_fixture(name: str, program: str = "harness"):
    """A session fixture called `name`: flavour -> the binary of the emulator's `program` in that
    flavour, built on first use (runner.build also caches objects by content across sessions).
    A test module binds it to a module attribute: `harness = build_fixture("harness")`."""

    def fixture():
        built = {}

        def get(flavor):
            if flavor not in built:
                built[flavor] = runner.build(flavor, program=program)
            return built[flavor]

        return get

    return pytest.fixture(scope="session", name=name)(fixture)
