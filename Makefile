# Quickstart: `make demo` runs the main job, `make test` runs the tests. Both create a
# local virtualenv (.venv) with pinned dependencies and the CPU torch wheel on first use.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
# The CUDA build check (CI, no GPU needed) uses a separate venv with a CUDA build of torch.
CUDA_VENV ?= $(HOME)/.cache/mla_ext/venv-cuda
CUDA_TORCH_SPEC ?= torch==2.14.1
NVCC ?= nvcc
MAX_JOBS ?= 2

.PHONY: demo test bench build venv cuda-compile-check cuda-build-check clean

$(VENV)/.deps: requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)" -r requirements-dev.txt
	touch $@

venv: $(VENV)/.deps

# Rebuilds only what changed (ninja); MLA_EXT_CUDA=0 because the default torch is CPU-only.
$(VENV)/.built: $(VENV)/.deps setup.py $(shell find csrc -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh')
	MAX_JOBS=$(MAX_JOBS) MLA_EXT_CUDA=0 $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	touch $@

build: $(VENV)/.built

demo: build
	$(PY) -m mla_ext

test: build
	$(PY) -m pytest -q tests

bench: build
	$(PY) benchmarks/bench_decode.py --device cpu

clean:
	rm -rf build *.egg-info mla_ext/*.so $(VENV)
