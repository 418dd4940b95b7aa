#!/usr/bin/env bash
# ONE device call: build for this GPU's arch only, run the GPU tests, compute-sanitizer
# (memcheck + racecheck) on small append / decode cases, the GPU benchmark, and write logs
# plus one JSON record under $OUT. Every stage has a timeout inside a global deadline
# (DEADLINE_S, default 450 s) so a hang cannot eat the device budget.
#
#   OUT=/tmp/out benchmarks/device_check.sh          # on the device machine ($OUT is set there)
#   OUT=/tmp/out benchmarks/device_check.sh          # here, without a GPU: dry run, GPU stages skipped
#
# Files under $OUT (at most 8 come back): record.json, build.log, tests.log, sanitizer.log,
# bench.log, bench.json (benchmarks/bench_decode.py, if present), bench_cuda.json,
# bench_cuda_sm90.json (sm_90 only: bench_cuda.py --quick with MLA_EXT_CUDA_SM90=1).
#
# On an sm_90 GPU the build is for 9.0a, and an sm90 stage runs after the CUDA tests (capped,
# ~4 min at most, within the deadline): the stage-1 GEMM probe on the hardware
# (benchmarks/native/sm90_gemm_probe_gpu.cu), which kernel mla_ext.decode runs with
# MLA_EXT_CUDA_SM90=1 (benchmarks/sm90_dispatch_check.py: must be the Hopper one), and
# tests/test_cuda.py -k decode with MLA_EXT_CUDA_SM90=1.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
OUT=${OUT:-$ROOT/build/device-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
DEADLINE_S=${DEADLINE_S:-450}
T0=$(date +%s)
export PYTHONUNBUFFERED=1
WORK=$(mktemp -d)     # junit files and stage times: kept out of $OUT (only 8 files come back)
STAGES=$WORK/stages  # "name rc seconds" lines, folded into record.json
: >"$STAGES"

remaining() { echo $(( DEADLINE_S - ($(date +%s) - T0) )); }

# stage NAME CAP_S LOG cmd...: runs cmd with timeout min(CAP_S, time left), appends to LOG.
stage() {
  local name=$1 cap=$2 log=$3; shift 3
  local left; left=$(remaining)
  local limit=$(( cap < left ? cap : left ))
  if [ "$limit" -lt 10 ]; then
    echo "== $name: skipped (deadline)" | tee -a "$log"; echo "$name skipped 0" >>"$STAGES"; return 124
  fi
  echo "== $name (limit ${limit}s): $*" | tee -a "$log"
  local s; s=$(date +%s)
  timeout -k 5 "$limit" "$@" >>"$log" 2>&1
  local rc=$?
  local secs=$(( $(date +%s) - s ))
  echo "== $name: rc=$rc in ${secs}s" | tee -a "$log"
  echo "$name $rc $secs" >>"$STAGES"
  return $rc
}

HAVE_GPU=0
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then HAVE_GPU=1; fi

{
  echo "date: $(date -u +%FT%TZ)"; echo "host: $(hostname)"; echo "have_gpu: $HAVE_GPU"
  [ $HAVE_GPU = 1 ] && nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv
  command -v nvcc >/dev/null && nvcc --version | tail -2
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda)"
  nproc
} >"$OUT/build.log" 2>&1

# ---- 1. build for this device's arch only, all cores.
BUILD_OK=0
if [ $HAVE_GPU = 1 ]; then
  ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())")
  [ "$ARCH" = "9.0" ] && ARCH=9.0a  # the Hopper kernels (csrc/cuda/sm90) need the arch-specific target
  export TORCH_CUDA_ARCH_LIST=$ARCH MLA_EXT_CUDA=1 MAX_JOBS=${MAX_JOBS:-$(nproc)}
  if stage build 240 "$OUT/build.log" "$PY" -m pip install --no-build-isolation --no-deps -v -e .; then BUILD_OK=1; fi
  grep -E "spill|Used [0-9]+ registers" "$OUT/build.log" | grep -v " 0 bytes spill stores, 0 bytes spill loads" \
    | grep -i "spill" | head -5 | sed 's/^/SPILL: /' | tee -a "$OUT/build.log"
  "$PY" -c "import mla_ext, torch; assert torch._C._dispatch_has_kernel_for_dispatch_key('mla_ext::decode', 'CUDA'); print('import OK', mla_ext.__file__)" \
    >>"$OUT/build.log" 2>&1 || BUILD_OK=0
else
  echo "== build: skipped (no GPU; dry run)" | tee -a "$OUT/build.log"; echo "build skipped 0" >>"$STAGES"
fi

# ---- 2. GPU tests (CUDA vs CPU vs reference, graphs, streams, long varlen, index checks).
if [ $BUILD_OK = 1 ]; then
  stage tests 230 "$OUT/tests.log" "$PY" -m pytest -q --maxfail=30 -p no:cacheprovider -o addopts="" \
    --junitxml="$WORK/junit.xml" tests/test_cuda.py
  # The Hopper kernel (opt-in MLA_EXT_CUDA_SM90=1): the GEMM probe on hardware, the dispatch,
  # the decode tests with it.
  if [ "${ARCH:-}" = "9.0a" ]; then
    stage sm90_probe 60 "$OUT/tests.log" bash -c "nvcc -std=c++17 -O2 -gencode=arch=compute_90a,code=sm_90a \
      -Icsrc/cuda benchmarks/native/sm90_gemm_probe_gpu.cu -o '$WORK/sm90_gemm_probe_gpu' && '$WORK/sm90_gemm_probe_gpu'"
    stage sm90_dispatch 45 "$OUT/tests.log" env MLA_EXT_CUDA_SM90=1 "$PY" benchmarks/sm90_dispatch_check.py
    stage sm90_tests 120 "$OUT/tests.log" env MLA_EXT_CUDA_SM90=1 "$PY" -m pytest -q --maxfail=10 -p no:cacheprovider \
      -o addopts="" --junitxml="$WORK/junit_sm90.xml" tests/test_cuda.py -k decode
  fi
  # The rest of the suite (its tests run on CPU and CUDA), if time allows. The CPU-only
  # native checks (kernel cross-checks, the SIMT emulator and layout oracle: marker
  # `emulated`; they build C++ and never touch the GPU) run in CI instead.
  others=$(ls tests/test_*.py 2>/dev/null \
    | grep -v -e "tests/test_cuda.py" -e "tests/test_cpu_kernels.py" || true)
  if [ -n "$others" ] && [ "$(remaining)" -gt 200 ]; then
    stage tests_rest 60 "$OUT/tests.log" "$PY" -m pytest -q -p no:cacheprovider -o addopts="" -m "not emulated" \
      --junitxml="$WORK/junit_rest.xml" $others
  fi
  # mla_ext as vLLM's MLA backend on CUDA (tests/test_vllm_backend.py -k cuda): only where a
  # CUDA build of vLLM is installed (a bare device machine has none: skipped, logged).
  if "$PY" -c "import vllm" >/dev/null 2>&1; then
    stage tests_vllm 90 "$OUT/tests.log" "$PY" -m pytest -q -p no:cacheprovider -o addopts="" \
      tests/test_vllm_backend.py -k cuda
  else
    echo "== tests_vllm: skipped (vllm not installed)" >>"$OUT/tests.log"; echo "tests_vllm skipped 0" >>"$STAGES"
  fi
else
  echo "== tests: skipped (no GPU build)" >"$OUT/tests.log"; echo "tests skipped 0" >>"$STAGES"
fi

# ---- 3. compute-sanitizer on small cases (no caching allocator, so bounds are real).
if [ $BUILD_OK = 1 ] && command -v compute-sanitizer >/dev/null; then
  for tool in memcheck racecheck; do
    stage "sanitizer_$tool" 90 "$OUT/sanitizer.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      compute-sanitizer --tool "$tool" --error-exitcode 3 "$PY" benchmarks/sanitize_cases.py
  done
else
  echo "== sanitizer: skipped (no GPU build or no compute-sanitizer)" >"$OUT/sanitizer.log"
  echo "sanitizer skipped 0" >>"$STAGES"
fi

# ---- 4. benchmarks: the shared one (if present) and ours (ceilings, shapes, append).
if [ $BUILD_OK = 1 ]; then
  if [ -f benchmarks/bench_decode.py ]; then
    stage bench_decode 120 "$OUT/bench.log" "$PY" benchmarks/bench_decode.py --device cuda --json "$OUT/bench.json"
  else
    echo "== bench_decode: benchmarks/bench_decode.py absent, skipped" >>"$OUT/bench.log"
  fi
  stage bench_cuda 150 "$OUT/bench.log" "$PY" benchmarks/bench_cuda.py --json "$OUT/bench_cuda.json"
  if [ "${ARCH:-}" = "9.0a" ]; then  # the same shapes (quick) with the Hopper kernel, next to the run above
    stage bench_cuda_sm90 90 "$OUT/bench.log" env MLA_EXT_CUDA_SM90=1 "$PY" benchmarks/bench_cuda.py --quick \
      --json "$OUT/bench_cuda_sm90.json"
  fi
else
  echo "== bench: skipped (no GPU build)" >"$OUT/bench.log"; echo "bench skipped 0" >>"$STAGES"
fi

# ---- 5. the record.
"$PY" - "$OUT" "$HAVE_GPU" "$WORK" <<'PYEOF'
import datetime, json, os, re, subprocess, sys
import xml.etree.ElementTree as ET

out, have_gpu, work = sys.argv[1], sys.argv[2] == "1", sys.argv[3]

def sh(cmd):
    try:
        return subprocess.run(cmd, shell=True, capture_output=True, text=True, timeout=20).stdout.strip()
    except Exception:
        return ""

def junit(path):
    if not os.path.exists(path):
        return None
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    tot = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    return {"passed": tot["tests"] - tot["failures"] - tot["errors"] - tot["skipped"],
            "failed": tot["failures"] + tot["errors"], "skipped": tot["skipped"]}

device = None
if have_gpu:
    device = sh("nvidia-smi --query-gpu=name --format=csv,noheader | head -1") or None
commit = sh("git rev-parse HEAD 2>/dev/null") or "unknown"
dirty = bool(sh("git status --porcelain --untracked-files=no 2>/dev/null")) if commit != "unknown" else None

stages = {}
for line in open(os.path.join(work, "stages")):
    name, rc, secs = line.split()
    stages[name] = {"rc": rc, "seconds": int(secs)}

tests = junit(os.path.join(work, "junit.xml")) or {"passed": 0, "failed": 0, "skipped": 0}
rest = junit(os.path.join(work, "junit_rest.xml"))
tests_sm90 = junit(os.path.join(work, "junit_sm90.xml"))
results_sm90 = None
bs = os.path.join(out, "bench_cuda_sm90.json")
if os.path.exists(bs):
    results_sm90 = [{k: r.get(k) for k in ("name", "impl", "ms", "gbps", "tflops")} for r in json.load(open(bs))["results"]]

san_log = open(os.path.join(out, "sanitizer.log")).read() if os.path.exists(os.path.join(out, "sanitizer.log")) else ""
per_tool = {}
for tool in ("memcheck", "racecheck"):
    part = san_log.split(f"== sanitizer_{tool}")
    sect = part[1].split("== sanitizer_")[0] if len(part) > 1 else ""
    m = re.findall(r"ERROR SUMMARY: (\d+) error", sect)
    per_tool[tool] = int(m[-1]) if m else None
ran = [v for v in per_tool.values() if v is not None]
sanitizer = {"errors": sum(ran) if ran else None, **per_tool,
             "rc": {k: stages.get(f"sanitizer_{k}", {}).get("rc") for k in per_tool}}

ceil, results = {"copy_gbps": None, "bf16_tflops": None}, []
bc = os.path.join(out, "bench_cuda.json")
if os.path.exists(bc):
    data = json.load(open(bc))
    ceil = data.get("ceilings", ceil)
    extra = ("rel_err_vs_torch", "speedup_vs_bf16", "rel_err_vs_bf16", "speedup_target", "correct")
    results = [{k: r.get(k) for k in ("name", "impl", "ms", "gbps", "tflops")} | {k: r[k] for k in extra if k in r}
               for r in data["results"]]

targets = {}
def ratio(name, key, den, goal):
    r = next((r for r in results if r["name"].startswith(name) and r["impl"] == "mla_ext"), None)
    if r and r.get(key) and den:
        val = r[key] / den if key == "gbps" else r[key]
        targets[name] = {"value": round(val, 3), "goal": goal, "met": val >= goal}
ratio("decode-tp8", "gbps", ceil.get("copy_gbps"), 0.70)
ratio("long-ctx", "gbps", ceil.get("copy_gbps"), 0.50)
ratio("decode-mtp", "tflops", 1, 250.0)
ratio("append", "gbps", ceil.get("copy_gbps"), 0.70)
# fp8 cache: decode-tp8 with fp8 >= 1.6x faster than with bf16, both timed in this run.
for r in results:
    if r["impl"] == "mla_ext-fp8" and r.get("speedup_vs_bf16") is not None:
        key = r["name"] + "-fp8-speedup"
        goal = r.get("speedup_target")
        targets[key] = {"value": r["speedup_vs_bf16"], "goal": goal, "met": (r["speedup_vs_bf16"] >= goal) if goal else None}

record = {
    "device": device,
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    "commit": commit, "dirty": dirty,
    "tests": tests, "tests_rest": rest, "tests_sm90": tests_sm90, "results_sm90": results_sm90,
    "sanitizer": sanitizer,
    "ceilings": ceil,
    "results": results,
    "targets": targets,
    "stages": stages,
    "dry_run": not have_gpu,
}
json.dump(record, open(os.path.join(out, "record.json"), "w"), indent=1)
print(json.dumps({k: record[k] for k in ("device", "tests", "sanitizer", "ceilings", "targets")}, indent=None))
for r in results:
    print(f"{r['name']:<14} {r['impl']:<12} ms={r['ms']} GB/s={r['gbps']} TFLOPS={r['tflops']}"
          + (f" x_bf16={r['speedup_vs_bf16']}" if "speedup_vs_bf16" in r else ""))
PYEOF
rm -rf "$WORK"
echo "device_check done in $(( $(date +%s) - T0 )) s; files: $(ls "$OUT" | tr '\n' ' ')"
