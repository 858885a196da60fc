# The two commands of the README: `make demo` and `make test`. Both set up .venv on first use.
SHELL := /bin/bash
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# CPU-only machines: DeepSpeed on its CPU accelerator and Triton in its interpreter. run/env.sh
# chooses by what is present, so the same targets work on GPU machines.
ENV := . run/env.sh &&

.PHONY: install demo test test-fast lint format clean

install: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt pyproject.toml run/setup.sh
	./run/setup.sh
	touch $(STAMP)

demo: install
	$(ENV) ./run/demo.sh

test: install
	$(ENV) $(BIN)/python -m pytest tests -q

test-fast: install
	$(ENV) $(BIN)/python -m pytest tests -q -m "not slow"

lint: install
	$(BIN)/ruff check megatron_glm kernels data_tools tests run benchmarks
	$(BIN)/ruff format --check megatron_glm kernels data_tools tests run benchmarks

format: install
	$(BIN)/ruff check --fix megatron_glm kernels data_tools tests run benchmarks
	$(BIN)/ruff format megatron_glm kernels data_tools tests run benchmarks

clean:
	rm -rf outputs .pytest_cache
