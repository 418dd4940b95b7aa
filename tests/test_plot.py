"""benchmarks/plot.py on small synthetic records: the PNGs are written (pixels are not checked),
the pictures whose records are absent are skipped cleanly, and records that cannot be drawn
(a dry-run device record, append-only rows) draw nothing."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("matplotlib", reason="matplotlib (requirements-plots.txt) not installed")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLOT = os.path.join(ROOT, "benchmarks", "plot.py")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

CPU = {"device": "cpu", "torch": "x", "python": "3",
       "cpu": {"model": "Test CPU", "family": 6, "model_id": 1, "flags": ["avx2"], "torch_threads": 2}}
CEIL = {"copy_gbps": 20.0, "matmul_bf16_gflops": 1.0, "matmul_fp32_gflops": 140.0, "fma_peak_gflops": 200.0}


def decode_rec(name, impl, b, h, L, ms, elt=2, sweep=False):
    flops = 2 * b * h * L * 1088
    nbytes = elt * b * (h * 576 + L * 576 + h * 512)
    r = {"name": name, "impl": impl, "op": "decode", "device": "cpu", "dtype": "bf16", "b": b, "s_q": 1, "h": h,
         "L": L, "block_size": 16, "ms": ms, "gflops": flops / ms / 1e6, "gbps": nbytes / ms / 1e6}
    if sweep:
        r["sweep"] = "L"
    return r


def bench_record():
    recs = []
    for name, (b, h, L) in {"cpu-small": (4, 16, 4096), "cpu-heads": (1, 128, 4096)}.items():
        for impl, ms in (("mla_ext", 5.0), ("vllm", 15.0), ("torch-batched", 30.0)):
            recs.append(decode_rec(name, impl, b, h, L, ms))
        recs.append(decode_rec(name, "mla_ext-fp8", b, h, L, 6.0, elt=1))
    recs.append({"name": "append-16384", "impl": "mla_ext", "op": "append_kv", "T": 16384, "ms": 2.0, "gbps": 18.0})
    return {"commit": "abcdef1", "dirty": False, "date": "2026-12-01T00:00:00Z", "note": "synthetic",
            "device_info": CPU, "ceilings": CEIL, "records": recs}


def sweep_record():
    recs = [decode_rec(f"sweep-L{L}", impl, 4, 16, L, ms * L / 4096, sweep=True)
            for L in (512, 2048, 8192) for impl, ms in (("mla_ext", 5.0), ("torch-batched", 30.0))]
    return {"commit": "abcdef1", "date": "2026-12-01T01:00:00Z", "note": "shared machine, not quiet",
            "sweep": {"param": "L", "b": 4, "h": 16, "values": [512, 2048, 8192]},
            "device_info": CPU, "ceilings": CEIL, "records": recs}


def vllm_record():
    recs = [{"backend": be, "batch": bt, "context": ctx, "decode_tokens_per_s": rate * bt}
            for be, rate in (("stock", 10.0), ("mla_ext", 25.0)) for bt in (1, 8) for ctx in (512, 2048)]
    return {"commit": "abcdef1", "date": "2026-12-01T02:00:00Z", "device_info": CPU, "records": recs}


def dry_gpu_record():
    return {"device": None, "dry_run": True, "date": "2026-12-01T00:00:00Z", "commit": "abcdef1",
            "ceilings": {"copy_gbps": None, "bf16_tflops": None}, "results": []}


def gpu_record():
    res = [{"name": "decode-tp8", "impl": "mla_ext", "ms": 0.5, "gbps": 2500.0, "tflops": 40.0},
           {"name": "decode-mtp", "impl": "mla_ext", "ms": 1.0, "gbps": 700.0, "tflops": 300.0},
           {"name": "append-65536", "impl": "mla_ext", "ms": 0.1, "gbps": 2000.0, "tflops": None}]
    return {"device": "Test GPU H0", "date": "2026-12-01T03:00:00Z", "commit": "abcdef1", "dry_run": False,
            "ceilings": {"copy_gbps": 3500.0, "bf16_tflops": 700.0}, "results": res}


def run_plot(results, out):
    return subprocess.run([sys.executable, PLOT, "--results", str(results), "--out", str(out)],
                          capture_output=True, text=True, timeout=300)


def write(dirpath, name, data):
    dirpath.mkdir(parents=True, exist_ok=True)
    (dirpath / name).write_text(json.dumps(data))


def assert_png(path):
    assert path.is_file(), path
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC, path
    assert path.stat().st_size > 5000, path  # an axes with text, not an empty canvas


def test_all_pictures_written(tmp_path):
    res, out = tmp_path / "results", tmp_path / "img"
    write(res, "bench.json", bench_record())
    write(res, "sweep.json", sweep_record())
    write(res, "vllm.json", vllm_record())
    write(res, "gpu.json", gpu_record())
    write(res, "dry.json", dry_gpu_record())
    p = run_plot(res, out)
    assert p.returncode == 0, p.stdout + p.stderr
    names = sorted(os.listdir(out))
    assert names == ["index.md", "roofline-cpu-test-cpu-f6-m1.png", "roofline-gpu-test-gpu-h0.png",
                     "scaling-L-cpu-test-cpu-f6-m1.png", "vllm-tokens-cpu-test-cpu-f6-m1.png"], names
    for n in names[1:]:
        assert_png(out / n)
    index = (out / "index.md").read_text()
    # every picture's caption line names machine, commit, date and record file
    assert "Test CPU (family 6, model 1), 2 threads | measured at abcdef1 | 2026-12-01 | bench.json" in index
    assert "sweep.json" in index and "vllm.json" in index and "Test GPU H0" in index
    assert "dry.json" not in index


def test_missing_records_skip_cleanly(tmp_path):
    res, out = tmp_path / "results", tmp_path / "img"
    write(res, "bench.json", bench_record())
    p = run_plot(res, out)
    assert p.returncode == 0, p.stdout + p.stderr
    assert "tokens/s picture skipped" in p.stdout and "scaling picture skipped" in p.stdout
    assert sorted(os.listdir(out)) == ["index.md", "roofline-cpu-test-cpu-f6-m1.png"]
    assert_png(out / "roofline-cpu-test-cpu-f6-m1.png")


def test_newest_run_per_machine(tmp_path):
    res, out = tmp_path / "results", tmp_path / "img"
    old = bench_record()
    old["date"], old["commit"] = "2026-11-01T00:00:00Z", "0000000"
    write(res, "a_new.json", bench_record())
    write(res, "z_old.json", old)
    p = run_plot(res, out)
    assert p.returncode == 0, p.stdout + p.stderr
    index = (out / "index.md").read_text()
    assert "a_new.json" in index and "z_old.json" not in index


def test_no_records_is_an_error(tmp_path):
    res, out = tmp_path / "results", tmp_path / "img"
    write(res, "dry.json", dry_gpu_record())
    p = run_plot(res, out)
    assert p.returncode == 1
    assert not out.exists() or not any(n.endswith(".png") for n in os.listdir(out))


def test_sweep_only_machine_gets_a_roofline(tmp_path):
    res, out = tmp_path / "results", tmp_path / "img"
    write(res, "sweep.json", sweep_record())
    p = run_plot(res, out)
    assert p.returncode == 0, p.stdout + p.stderr
    assert sorted(os.listdir(out)) == ["index.md", "roofline-cpu-test-cpu-f6-m1.png",
                                       "scaling-L-cpu-test-cpu-f6-m1.png"]
    for n in ("roofline-cpu-test-cpu-f6-m1.png", "scaling-L-cpu-test-cpu-f6-m1.png"):
        assert_png(out / n)


def bench_vllm_record(points):
    """benchmarks/bench_vllm.py's format: one entry per (context, batch), a dict per backend."""
    res = [{"context": ctx, "batch": bt, "stock": {"tokens_per_s": 10.0 * bt}, "mla_ext": {"tokens_per_s": 18.0 * bt},
            "speedup": 1.8} for ctx, bt in points]
    return {"benchmark": "bench_vllm", "date": "2026-12-02T01:00:00+00:00", "commit": "1234567",
            "cpu_model": "Test Xeon", "cpus": 2, "results": res}


def test_bench_vllm_records_plotted_fullest_first(tmp_path):
    """The real bench_vllm.py layout is read; a later repeat of one point does not hide the sweep."""
    res, out = tmp_path / "results", tmp_path / "img"
    write(res, "vllm-full.json", bench_vllm_record([(512, 1), (512, 8), (2048, 1), (2048, 8)]))
    repeat = bench_vllm_record([(2048, 8)])
    repeat["date"] = "2026-12-02T03:00:00+00:00"
    write(res, "vllm-repeat.json", repeat)
    p = run_plot(res, out)
    assert p.returncode == 0, p.stdout + p.stderr
    assert_png(out / "vllm-tokens-cpu-test-xeon.png")
    index = (out / "index.md").read_text()
    assert "vllm-full.json" in index and "vllm-repeat.json" not in index


def test_bench_vllm_quiet_record_preferred_and_context_axis(tmp_path):
    """A quiet record (bench_vllm.py --quiet) is drawn before a fuller one that is not; a
    record of one batch size over several contexts is drawn against context."""
    res, out = tmp_path / "results", tmp_path / "img"
    write(res, "vllm-full-noisy.json", bench_vllm_record([(512, 1), (512, 8), (2048, 1), (2048, 8)]))
    quiet = bench_vllm_record([(512, 8), (2048, 8)])
    quiet.update(quiet=True, date="2026-12-01T03:00:00+00:00")  # older, fewer points, but quiet
    write(res, "vllm-quiet.json", quiet)
    p = run_plot(res, out)
    assert p.returncode == 0, p.stdout + p.stderr
    assert_png(out / "vllm-tokens-cpu-test-xeon.png")
    index = (out / "index.md").read_text()
    assert "vllm-quiet.json" in index and "vllm-full-noisy.json" not in index
