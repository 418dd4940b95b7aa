#!/usr/bin/env bash
# CI (no GPU needed): build the full CUDAExtension against a CUDA build of torch and check
# that the library loads and registers CUDA kernels for every op.
#
#   benchmarks/cuda_build_check.sh            # venv: $MLA_EXT_CUDA_VENV or /root/.cache/mla_ext/venv-cuda
#   MAX_JOBS=2 TORCH_CUDA_ARCH_LIST="8.0;9.0a" benchmarks/cuda_build_check.sh
#   MLA_EXT_INCREMENTAL=1 benchmarks/cuda_build_check.sh   # reuse the last objects
#
# The build goes to build/cuda-check/ and
# the result is imported from there; the source tree and the venv are left untouched.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
VENV=${MLA_EXT_CUDA_VENV:-/root/.cache/mla_ext/venv-cuda}
if [ ! -x "$VENV/bin/python" ]; then
  echo "== creating $VENV"
  python3 -m venv "$VENV"
  "$VENV/bin/pip" install -q "${MLA_EXT_CUDA_TORCH_SPEC:-torch==2.14.1}" ninja==1.13.0 setuptools==80.9.0 numpy==2.3.5
fi
PY=$VENV/bin/python
export PATH="$VENV/bin:$PATH"  # ninja
export MLA_EXT_CUDA=1
export MAX_JOBS=${MAX_JOBS:-2}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-"8.0;8.6;8.9;9.0a"}  # setup.py's default: 9.0a builds the real sm_90a kernel
OUTDIR=$ROOT/build/cuda-check
# A clean build by default, so ptxas reports on every kernel (the spill check reads it);
# MLA_EXT_INCREMENTAL=1 keeps the objects of the last run.
[ "${MLA_EXT_INCREMENTAL:-0}" = 1 ] || rm -rf "$OUTDIR"
mkdir -p "$OUTDIR/lib" "$OUTDIR/tmp"
LOG=$OUTDIR/build.log

echo "== building CUDAExtension (archs $TORCH_CUDA_ARCH_LIST, MAX_JOBS=$MAX_JOBS), log: $LOG"
start=$(date +%s)
cd "$ROOT"
if ! "$PY" setup.py -q build_ext --build-lib "$OUTDIR/lib" --build-temp "$OUTDIR/tmp" >"$LOG" 2>&1; then
  tail -n 60 "$LOG"
  echo "FAIL: build"
  exit 1
fi
echo "   built in $(( $(date +%s) - start )) s"
# Any spill reported by ptxas fails the check (setup.py passes -Xptxas=-v,-warn-spills).
if grep -E "bytes spill (stores|loads)" "$LOG" | grep -vq " 0 bytes spill stores, 0 bytes spill loads"; then
  grep -E "spill" "$LOG" | grep -v " 0 bytes spill stores, 0 bytes spill loads" | head
  echo "FAIL: register spills"
  exit 1
fi
if grep -q "warning.*spill\|Registers are spilled" "$LOG"; then grep "spill" "$LOG" | head; echo "FAIL: spill warning"; exit 1; fi

# The Python package (subpackages included) next to the freshly built library.
tar --exclude='*.so' --exclude='__pycache__' -cf - mla_ext | tar -xf - -C "$OUTDIR/lib"
cd "$OUTDIR" && PYTHONPATH="$OUTDIR/lib" "$PY" - <<'PYEOF'
import torch
import mla_ext

has = torch._C._dispatch_has_kernel_for_dispatch_key
missing = [f"{op}/{key}" for op in ("decode", "decode_out", "append_kv", "sparse_decode") for key in ("CPU", "CUDA")
           if not has(f"mla_ext::{op}", key)]
assert not missing, f"ops without kernels: {missing}"
print(f"   import mla_ext OK from {mla_ext.__file__}; torch {torch.__version__}; CPU+CUDA kernels registered")
if not torch.cuda.is_available():
    # Without a GPU the CPU path must still work from this build.
    q = torch.randn(1, 1, 2, 576, dtype=torch.bfloat16)
    cache = torch.randn(2, 4, 576, dtype=torch.bfloat16)
    out = mla_ext.decode(q, None, cache, torch.tensor([[0, 1]], dtype=torch.int32),
                         torch.tensor([5], dtype=torch.int32), softmax_scale=0.07)
    assert out.shape == (1, 1, 2, 512) and torch.isfinite(out).all()
    print("   no GPU here: CPU decode from the CUDA build OK")
PYEOF
echo "PASS: cuda_build_check ($(( $(date +%s) - start )) s)"
