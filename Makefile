# Two commands on a fresh machine: `make demo` (the main job) and `make test` (the test suite).
# Each first creates .venv if missing and installs the project into it (offline-pinned torch) with
# its `dev` extra, which holds `train` (model, trainer, CLI) and the test tools. A kernels-only
# user runs `pip install avpt-kernels`: torch, triton, numpy, safetensors.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
# torch 2.14.1 + torchvision 0.29.1 install from this project's machines' local package cache;
# PyPI's torchvision does not import beside the CPU-only torch 2.13 wheel.
TORCH_PIN := torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.installed
# The GPU machines' Triton (torch 2.11.0 brings triton 3.6.0; from PyPI, CUDA build, ~5 GB), for
# `make aot` only: compile checks need no GPU. Never used by `make test`.
VENV36   := .venv-triton36
BIN36    := $(VENV36)/bin
TORCH36_PIN := torch==2.11.0 'numpy>=2.4' pytest
STAMP36  := $(VENV36)/.installed

.PHONY: setup setup-triton36 test demo compare aot aot-triton38 aot-triton36 bench gpu-wheels gpu-check gpu-check-dry gpu-profile gpu-sweep clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check $(TORCH_PIN)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev]'
	@touch $(STAMP)

# --no-deps: the AOT check needs the kernels only, against the torch/triton pinned here.
setup-triton36: $(STAMP36)

$(STAMP36): pyproject.toml setup.py Makefile
	@test -x $(BIN36)/python || $(PYTHON) -m venv $(VENV36)
	$(BIN36)/python -m pip install --quiet --disable-pip-version-check $(TORCH36_PIN)
	$(BIN36)/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	$(BIN36)/python -c "import triton; v = triton.__version__; assert v.startswith('3.6.'), v"
	@touch $(STAMP36)

# The unit tests, then the benchmarks as a smoke run (every row produced, nothing timed; the
# JSON goes to a temporary folder so a test run leaves the tree clean).
test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not extended" --durations=15 tests
	AVPT_BENCH_RESULTS=$$(mktemp -d) $(BIN)/python -m pytest -q -p no:cacheprovider benchmarks --benchmark-disable

# The slow cases `make test` leaves out (pytest marker `extended`: the bounded-error rule at the
# model's shapes under the Triton interpreter).
.PHONY: test-extended
test-extended: $(STAMP)
	$(BIN)/python -m pytest -q -m extended tests

# Latency and memory of the ops (and, as they land, the model): JSON under benchmarks/results/.
bench: $(STAMP)
	$(BIN)/python -m pytest -q benchmarks

demo: $(STAMP)
	$(BIN)/avpt demo

compare: $(STAMP)
	$(BIN)/python -m avpt_kernels.compare

# Ahead-of-time compile of every kernel configuration for sm_80 and sm_90a (no GPU needed):
# registers, spills and shared memory per config -> benchmarks/results/aot.json, one entry per
# Triton version: 3.8 (.venv, what CI checks via tests/test_aot.py) and 3.6 (.venv-triton36, the
# GPU machines' version; created on first use). Runs both, fails if either fails. Measured on
# this project's 2-core CPU machine (176 configs x 2 targets each, one compile process each, the
# two checks side by side): 3.8 check 6.2 min, 3.6 check 5.7 min.
AOT_JSON := benchmarks/results/aot.json
aot: $(STAMP) $(STAMP36)
	@rc=0; \
	env -u TRITON_INTERPRET $(BIN)/python -m avpt_kernels.aot --out $(AOT_JSON) || rc=1; \
	env -u TRITON_INTERPRET $(BIN36)/python -m avpt_kernels.aot --out $(AOT_JSON) || rc=1; \
	exit $$rc

aot-triton38: $(STAMP)
	env -u TRITON_INTERPRET $(BIN)/python -m avpt_kernels.aot --out $(AOT_JSON)

aot-triton36: $(STAMP36)
	env -u TRITON_INTERPRET $(BIN36)/python -m avpt_kernels.aot --out $(AOT_JSON)

# Pure-Python packages a CUDA machine without a registry may lack, as wheels in .whl/ (ignored
# by git; carry it to that machine). Run here, where pip reaches the registry.
# pytest-xdist (+ execnet): the GPU tier on every core.
GPU_WHEELS := open_clip_torch==3.3.0 ftfy wcwidth pydicom openpyxl et_xmlfile \
	pytest-xdist==3.8.0 execnet==2.1.2
gpu-wheels:
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: -d .whl $(GPU_WHEELS)

# On a CUDA machine that brings its own torch/triton (no venv, no registry), as one device call
# (under 9 minutes): the GPU tier of the tests (every device-path test, `-m "not cpu_only"`, on
# every core), then the benchmarks, then the profile, each under its own time limit; the wheels
# of .whl/ first. Results, logs, tracebacks and SUMMARY.md in $$OUT/gpu-check_<device>_<date>/
# (else under benchmarks/results/): benchmarks/gpu_check.py. GPU_CHECK_ARGS: e.g. --tier-s 200.
GPU_SITE := /tmp/avpt-site
GPU_OUT := $(if $(OUT),$(OUT),benchmarks/results)
GPU_CHECK_ARGS ?=
gpu-check:
	$(PYTHON) -m benchmarks.gpu_check --out $(GPU_OUT) $(GPU_CHECK_ARGS)

# The same script's plumbing on a CPU in well under a minute (tiny phases; also run by `make test`
# as tests/test_gpu_check.py), into a temporary folder.
gpu-check-dry: $(STAMP)
	$(BIN)/python -m benchmarks.gpu_check --dry --out $$(mktemp -d)

# Where a forward's time goes on the GPU (wall vs GPU busy, top kernels): benchmarks/gpu_profile.py
gpu-profile:
	PYTHONPATH=.:$(GPU_SITE) $(PYTHON) -m benchmarks.gpu_profile > $(GPU_OUT)/gpu-profile.txt 2>&1

# The fused PIM's launch parameters swept at the model shape (benchmarks/pim_sweep.py)
gpu-sweep:
	PYTHONPATH=.:$(GPU_SITE) $(PYTHON) -m benchmarks.pim_sweep --out $(GPU_OUT)

clean:
	rm -rf $(VENV) $(VENV36) build *.egg-info .pytest_cache
