#!/usr/bin/env bash
# CI (no GPU needed): compile every csrc/cuda/*.cu with plain nvcc (no torch) for sm_80 and
# sm_90a (csrc/cuda/sm90/*.cu for sm_90a only), fail on any register spill or local-memory use, and print the ptxas resource
# report per kernel; then the host self-test of the fp8 conversion helpers.
#
#   benchmarks/cuda_compile_check.sh                 # archs: sm_80 sm_90a, MAX_JOBS=2
#   ARCHS="sm_80" MAX_JOBS=1 benchmarks/cuda_compile_check.sh
#
# Objects and logs go to build/cuda-compile/. ptxas runs with -warn-spills,-warn-lmem-usage
# and -Werror, so a spill already fails the compile; the log is parsed as well.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
NVCC=${NVCC:-nvcc}
ARCHS=${ARCHS:-"sm_80 sm_90a"}
JOBS=${MAX_JOBS:-2}
OUT=$ROOT/build/cuda-compile
rm -rf "$OUT" && mkdir -p "$OUT"
command -v "$NVCC" >/dev/null || { echo "FAIL: nvcc not found"; exit 1; }
"$NVCC" --version | tail -1

jobs_file=$OUT/jobs
for cu in "$ROOT"/csrc/cuda/*.cu; do
  for arch in $ARCHS; do
    echo "$cu $arch" >>"$jobs_file"
  done
done
# The Hopper kernels (csrc/cuda/sm90/*.cu: wgmma, setmaxnreg) exist for sm_90a only.
for cu in "$ROOT"/csrc/cuda/sm90/*.cu; do
  case " $ARCHS " in *" sm_90a "*) echo "$cu sm_90a" >>"$jobs_file" ;; esac
done

compile_one() {
  local cu=$1 arch=$2 out=$3 nvcc=$4
  local cc=${arch#sm_}
  local name
  name=$(basename "$cu" .cu).$arch
  if "$nvcc" -std=c++17 -O3 -lineinfo --use_fast_math --expt-relaxed-constexpr \
      -gencode="arch=compute_${cc},code=${arch}" \
      -Xptxas=-v,-warn-spills,-warn-lmem-usage,-Werror \
      -c "$cu" -o "$out/$name.o" >"$out/$name.log" 2>&1; then
    echo "ok   $name"
  else
    echo "FAIL $name"; tail -n 20 "$out/$name.log"; return 1
  fi
}
export -f compile_one

start=$(date +%s)
status=0
xargs -P "$JOBS" -L 1 bash -c 'compile_one "$0" "$1" "'"$OUT"'" "'"$NVCC"'"' <"$jobs_file" || status=1
secs=$(( $(date +%s) - start ))

# Per-kernel report: arch, registers, spills, stack, shared memory.
report=$OUT/report.txt
for log in "$OUT"/*.log; do
  awk -v file="$(basename "$log" .log)" '
    /Compiling entry function/ { match($0, /'"'"'[^'"'"']+'"'"'/); fn = substr($0, RSTART + 1, RLENGTH - 2) }
    /bytes stack frame/ { stack = $1; sst = $5; sld = $9 }
    /Used [0-9]+ registers/ {
      regs = $0; sub(/.*Used /, "", regs); sub(/ registers.*/, "", regs)
      smem = "0"; if (match($0, /[0-9]+ bytes smem/)) smem = substr($0, RSTART, RLENGTH - 11)
      printf "%-28s regs %3s  spill st/ld %s/%s  stack %s  static smem %s  %s\n", file, regs, sst, sld, stack, smem, fn
    }' "$log"
done | sort >"$report"
if command -v c++filt >/dev/null; then c++filt <"$report" >"$report.tmp" && mv "$report.tmp" "$report"; fi
cat "$report"

if grep -q "spill st/ld [1-9]\|spill st/ld 0/[1-9]" "$report"; then echo "FAIL: register spills"; status=1; fi
if grep -q "stack [1-9]" "$report"; then echo "FAIL: local memory (stack frame)"; status=1; fi
n=$(wc -l <"$report")
[ "$n" -gt 0 ] || { echo "FAIL: no kernels reported"; status=1; }
# The fp8 helpers' integer parts, compiled for the host: every float's e4m3 rounding must
# equal the CPU kernel's, every code's dequantized pattern the exact value (~25 s).
CXX=${CXX:-c++}
if command -v "$CXX" >/dev/null; then
  if "$CXX" -O2 -std=c++17 "$ROOT/tests/native/fp8_selftest.cpp" -o "$OUT/fp8_selftest" && "$OUT/fp8_selftest" 1; then
    echo "ok   fp8 host self-test (all 2^32 floats)"
  else
    echo "FAIL fp8 host self-test"; status=1
  fi
fi
if [ $status -eq 0 ]; then echo "PASS: cuda_compile_check: $n kernel builds, 0 spills, fp8 self-test ($secs s, $JOBS jobs)"; else exit 1; fi
