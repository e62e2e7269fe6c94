# wanwu: `make run` serves the general model (EfficientNet-Lite0, Chinese labels) on 127.0.0.1:8080; `make test` runs every
# test against a real Docker engine. Both set up whatever is missing first.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# The worker extra pins torch; ask for it by itself first so pip takes a local CPU build
# where one is configured (override TORCH_PIP_ARGS to pick an index).
TORCH_PIP_ARGS ?= torch==2.13.0
FLAVOR ?= cpu
PYTEST_ARGS ?=

.PHONY: help runtime venv engine base-image image image-cuda test test-cuda unit lint run bench clean

help:
	@echo "make run     set up what is missing, build the worker image, serve the general model on 127.0.0.1:8080"
	@echo "make test    unit, integration and e2e tests against a real Docker engine"
	@echo "make image   build wanwu-worker:$(FLAVOR)"
	@echo "make image-cuda  build wanwu-worker:cuda (several GB of wheels; the demo model still trains on the CPU)"
	@echo "make test-cuda   build wanwu-worker:cuda and run its tests (a GPU is not needed)"
	@echo "make bench   benchmarks: a table on stdout and JSON in bench-results/"
	@echo "make lint    ruff and mypy"

# What `make run` needs (the service and its worker package); the test and lint tools
# come on top for `make test`, `make lint` and `make bench` (23 s more from a warm cache).
$(VENV)/.installed-run: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check $(TORCH_PIP_ARGS)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[worker]'
	touch $@

$(VENV)/.installed: $(VENV)/.installed-run
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[worker,dev]'
	touch $@

runtime: $(VENV)/.installed-run

venv: $(VENV)/.installed

engine:
	@bash deploy/ensure-docker.sh

image: runtime engine
	$(BIN)/wanwu image build --flavor $(FLAVOR)

# The CUDA image: `make image FLAVOR=cuda` under its own name. `make test` builds and
# tests only the cpu image.
image-cuda:
	$(MAKE) image FLAVOR=cuda

test-cuda: image-cuda venv
	$(BIN)/pytest tests/integration/test_cuda_image.py $(PYTEST_ARGS)

unit: venv
	$(BIN)/pytest tests/unit $(PYTEST_ARGS)

test: image venv
	@bash deploy/ensure-browser.sh
	$(BIN)/pytest $(PYTEST_ARGS)

lint: venv
	$(BIN)/ruff check gateway scheduler worker_image tests
	$(BIN)/mypy

run: image
	$(BIN)/wanwu serve --host 127.0.0.1 --port 8080

bench: image venv
	$(BIN)/python -m tests.bench $(BENCH_ARGS)

clean:
	rm -rf $(VENV) worker_image/wheelhouse bench-results .pytest_cache .mypy_cache .ruff_cache

# Wheels of the gateway's own runtime dependencies ([project] dependencies less torch,
# pillow and nvidia-ml-py, which the GPU machine has) for an offline install there:
# `python -m pip install --no-index --find-links gpu-wheels -r gpu-wheels/requirements.txt`,
# then `python -m tests.gpu_check` (tests/gpu_check/__init__.py). setuptools comes along
# for an offline `pip install -e .`. GPU_PYTHONS and GPU_PLATFORM describe that machine
# (binary wheels, MarkupSafe and charset-normalizer, for each Python version listed).
GPU_WHEELS   ?= gpu-wheels
GPU_PYTHONS  ?= 3.11 3.12
GPU_PLATFORM ?= manylinux_2_28_x86_64

.PHONY: gpu-wheels
gpu-wheels: venv
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)
	$(BIN)/python -m tests.gpu_check.requirements > $(GPU_WHEELS)/requirements.txt
	for version in $(GPU_PYTHONS); do \
		$(BIN)/pip download --quiet --dest $(GPU_WHEELS) --only-binary=:all: --implementation cp \
			--python-version $$version --platform $(GPU_PLATFORM) \
			-r $(GPU_WHEELS)/requirements.txt 'setuptools>=68' || exit 1; \
	done
	@du -sh $(GPU_WHEELS)
