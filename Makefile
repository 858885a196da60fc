# The two commands of the README: `make demo` and `make test`. Both set up .venv on first use.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# CPU-only machines: DeepSpeed on its CPU accelerator and Triton in its interpreter. run/env.sh
# chooses by what is present, so the same targets work on GPU machines.
ENV := . run/env.sh &&

.PHONY: install demo test test-fast lint format clean gpu-deps gpu-check

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml run/setup.sh
	./run/setup.sh
	touch $(STAMP)

demo: install
	$(ENV) ./run/demo.sh

test: install
	$(ENV) $(BIN)/python -m pytest tests -q -n 2 --dist loadfile

test-fast: install
	$(ENV) $(BIN)/python -m pytest tests -q -n 2 --dist loadfile -m "not slow"

lint: install
	$(BIN)/ruff check megatron_glm kernels data_tools tests run benchmarks
	$(BIN)/ruff format --check megatron_glm kernels data_tools tests run benchmarks

format: install
	$(BIN)/ruff check --fix megatron_glm kernels data_tools tests run benchmarks
	$(BIN)/ruff format megatron_glm kernels data_tools tests run benchmarks

# On a GPU node with CUDA torch and triton in its python3 (no network needed): the kernel tests on CUDA,
# glm-pretrain of glm-large with an evaluation, a checkpoint, a kill and a resume, and the model-step
# table (benchmarks/gpu_check.py). `make gpu-deps` first, where pip works: DeepSpeed and its
# dependencies into gpu-deps/, which the check puts on PYTHONPATH.
GPU_PYTHON ?= python3
gpu-deps:
	benchmarks/gpu_deps.sh

gpu-check:
	PYTHONPATH=$(CURDIR):$(CURDIR)/gpu-deps $(GPU_PYTHON) benchmarks/gpu_check.py --out $${OUT:-outputs/gpu-check}

clean:
	rm -rf outputs .pytest_cache
