# One-command setup, tests and the main job on a fresh machine (see README).
#   make test    venv + torch + build (CUDA part forced when nvcc exists) + whole test suite
#   make demo    the main job on its embedded default (synthetic Cityscapes-layout data)
#   make bench   every benchmark, small shapes, on this machine

VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_VERSION ?= 2.14.1
# CUDA_HOME if set, else the toolkit that the nvcc on PATH (or /usr/local/cuda) belongs to; a
# folder of CUDA headers without nvcc is no toolkit (FORCE_CUDA=1 would fail there).
CUDA_ROOT ?= $(or $(CUDA_HOME),$(shell d=$$(dirname $$(command -v nvcc 2>/dev/null || echo /usr/local/cuda/bin/nvcc)); \
	for c in "$$d/.." /usr/local/cuda; do [ -f "$$c/include/cuda_runtime.h" ] && [ -x "$$c/bin/nvcc" ] && { cd "$$c" && pwd; break; }; done))
# torch's CUDA headers include cuBLAS/cuSPARSE headers that a bare toolkit may lack; the
# CUDA build of torch ships them under nvidia/cu13.
NVIDIA_DIR = $(shell $(PY) -c "import os, nvidia; print(os.path.join(list(nvidia.__path__)[0], 'cu13'))" 2>/dev/null)
BUILD_ENV = $(if $(CUDA_ROOT),FORCE_CUDA=1 CUDA_HOME=$(CUDA_ROOT) CPATH=$(NVIDIA_DIR)/include$${CPATH:+:$$CPATH} \
	LIBRARY_PATH=$(NVIDIA_DIR)/lib$${LIBRARY_PATH:+:$$LIBRARY_PATH},FORCE_CUDA=0)
SOURCES := setup.py pyproject.toml $(shell find csrc -type f 2>/dev/null)

.PHONY: setup test demo bench clean

setup: $(VENV)/.built

$(VENV)/.deps:
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==$(TORCH_VERSION) numpy pillow pytest ninja setuptools wheel
	touch $@

$(VENV)/.built: $(VENV)/.deps $(SOURCES)
	$(BUILD_ENV) MAX_JOBS=$${MAX_JOBS:-2} $(PY) -m pip install -q --no-build-isolation --no-deps -e .
	$(PY) -c "import bisenet_fast as bf; print(bf.build_info())"
	touch $@

test: setup
	TRITON_INTERPRET=1 $(PY) -m pytest -q -rs

demo: setup
	$(PY) -m bisenet_fast.demo

bench: setup
	$(PY) -m benchmarks.run --quick

clean:
	rm -rf build *.egg-info bisenet_fast/*.so $(VENV)
